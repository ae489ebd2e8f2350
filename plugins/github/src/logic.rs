//! GitHub as a [`Forge`]: which URLs are GitHub repositories, the REST API's paths, headers and
//! bodies, how GitHub says a pull request is already open and how to look that one up, and how
//! to read its answers and webhook deliveries. The rest of the provider is the shared skeleton.

use flotilla_guest_support::{
    branch_of_ref, encode_path_component, json_string, json_u64, query_string, Forge, ForgeRepository, LookupAnswer,
    PullRequestFields, PullRequestInput, Settings, WebhookDetails, WebhookKind,
};
use serde_json::{json, Value};

/// github.com and GitHub Enterprise Server.
pub struct GitHub;

const PUBLIC_API_BASE: &str = "https://api.github.com";
/// The user name GitHub expects with an installation or personal token over git's HTTP.
const GIT_USER: &str = "x-access-token";
const API_VERSION: &str = "2022-11-28";

impl Forge for GitHub {
    const NAME: &'static str = "github";
    const DISPLAY_NAME: &'static str = "GitHub";
    const FORGE_NAME: &'static str = "GitHub";
    const REPOSITORY_NOUN: &'static str = "GitHub repository";
    const EXAMPLE_URL: &'static str = "https://github.com/OWNER/REPO";
    const DEFAULT_TOKEN_SECRET: &'static str = "github-token";
    /// GitHub Enterprise Server hosts come from the `hosts` setting.
    const PUBLIC_HOST: &'static str = "github.com";

    fn url_patterns() -> Vec<String> {
        vec![
            "https://github.com/OWNER/REPO".to_string(),
            "git@github.com:OWNER/REPO.git".to_string(),
            "https://HOST/OWNER/REPO for each host in the `hosts` setting (GitHub Enterprise Server)".to_string(),
        ]
    }

    fn git_user(_settings: &Settings) -> &str {
        GIT_USER
    }

    /// `https://api.github.com` for github.com, `{scheme}://{host}/api/v3` for GitHub Enterprise
    /// Server.
    fn default_api_base(repository: &ForgeRepository) -> String {
        if repository.url.web_host() == Self::PUBLIC_HOST {
            PUBLIC_API_BASE.to_string()
        } else {
            format!("{}/api/v3", repository.url.web_origin())
        }
    }

    /// `/repos/OWNER/REPO/pulls`.
    fn pull_requests_path(repository: &ForgeRepository) -> String {
        format!(
            "/repos/{}/{}/pulls",
            encode_path_component(&repository.owner),
            encode_path_component(&repository.name)
        )
    }

    fn token_header(token_placeholder: String) -> (String, String) {
        ("Authorization".to_string(), format!("Bearer {token_placeholder}"))
    }

    const ACCEPT: &'static str = "application/vnd.github+json";

    fn extra_api_headers() -> Vec<(String, String)> {
        vec![("X-GitHub-Api-Version".to_string(), API_VERSION.to_string())]
    }

    fn create_pull_request_body(input: &PullRequestInput) -> Value {
        json!({
            "title": input.title,
            "head": input.head_branch,
            "base": input.base_branch,
            "body": input.body,
            "draft": input.draft,
        })
    }

    const PULL_REQUEST_FIELDS: PullRequestFields = PullRequestFields {
        url_pointer: "/html_url",
        number_pointer: "/number",
    };

    /// GitHub's error body: `{"message": "Validation Failed", "errors": [{"message": "A pull
    /// request already exists for acme:feature."}]}`; errors without a message name the
    /// resource, field and code (`{"resource": "PullRequest", "field": "head", "code": "invalid"}`).
    fn error_message(answer: &Value) -> Option<String> {
        let message = json_string(answer, "/message");
        let details: Vec<String> = answer
            .get("errors")
            .and_then(Value::as_array)
            .map(|errors| errors.iter().filter_map(error_detail).collect())
            .unwrap_or_default();
        match (message, details.first()) {
            (Some(message), Some(detail)) => Some(format!("{message}: {detail}")),
            (Some(message), None) => Some(message),
            (None, Some(detail)) => Some(detail.clone()),
            (None, None) => None,
        }
    }

    /// GitHub refuses a second open pull request of one head and base with 422 "A pull request
    /// already exists for OWNER:BRANCH."
    fn may_be_already_open(status: u16, body: &[u8]) -> bool {
        status == 422 && String::from_utf8_lossy(body).contains("A pull request already exists")
    }

    /// `GET .../pulls?state=open&head=OWNER:BRANCH&base=BASE` (GitHub filters `head` by
    /// `user:ref-name`).
    fn open_pull_request_lookup_url(
        pull_requests_url: &str,
        repository: &ForgeRepository,
        input: &PullRequestInput,
    ) -> String {
        let head = format!("{}:{}", repository.owner, input.head_branch);
        let query = query_string(&[("state", "open"), ("head", &head), ("base", &input.base_branch)]);
        format!("{pull_requests_url}{query}")
    }

    const LOOKUP_ANSWER: LookupAnswer = LookupAnswer::List { pointer: "" };

    const WEBHOOK_EVENT_HEADERS: &'static [&'static str] = &["X-GitHub-Event"];

    /// Pushes, pull requests and comments on or reviews of pull requests; everything else (ping,
    /// issues, stars...) is ignored.
    fn webhook_kind(event: &str) -> Option<WebhookKind> {
        match event {
            "push" => Some(WebhookKind::Push),
            "pull_request" => Some(WebhookKind::PullRequest),
            "issue_comment" | "pull_request_review_comment" | "pull_request_review" => Some(WebhookKind::Comment),
            _ => None,
        }
    }

    const WEBHOOK_REPOSITORY_URL_POINTER: &'static str = "/repository/html_url";

    fn webhook_details(kind: WebhookKind, payload: &Value) -> Option<WebhookDetails> {
        let actor = json_string(payload, "/sender/login").or_else(|| json_string(payload, "/pusher/name"));
        let details = match kind {
            WebhookKind::Push => WebhookDetails {
                branch: json_string(payload, "/ref").and_then(|git_ref| branch_of_ref(&git_ref)),
                pull_request_number: None,
                actor,
            },
            WebhookKind::PullRequest => WebhookDetails {
                branch: json_string(payload, "/pull_request/head/ref"),
                pull_request_number: json_u64(payload, "/number").or_else(|| json_u64(payload, "/pull_request/number")),
                actor,
            },
            WebhookKind::Comment => {
                // A comment on an issue that is not a pull request is not ours to report.
                let on_plain_issue = payload
                    .get("issue")
                    .is_some_and(|issue| issue.get("pull_request").is_none());
                if on_plain_issue {
                    return None;
                }
                WebhookDetails {
                    branch: json_string(payload, "/pull_request/head/ref"),
                    pull_request_number: json_u64(payload, "/pull_request/number")
                        .or_else(|| json_u64(payload, "/issue/number")),
                    actor,
                }
            }
        };
        Some(details)
    }
}

/// One entry of GitHub's `errors`: its message, or `Resource.field code`.
fn error_detail(error: &Value) -> Option<String> {
    match error {
        Value::String(text) => Some(text.clone()),
        Value::Object(_) => json_string(error, "/message").or_else(|| {
            let part = |key: &str| json_string(error, &format!("/{key}"));
            let location = match (part("resource"), part("field")) {
                (Some(resource), Some(field)) => format!("{resource}.{field}"),
                (Some(only), None) | (None, Some(only)) => only,
                (None, None) => return part("code"),
            };
            Some(
                format!("{location} {}", part("code").unwrap_or_default())
                    .trim()
                    .to_string(),
            )
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_guest_support::forge;
    use flotilla_guest_support::{Failure, PullRequest, RepoRef};

    fn settings(hosts: Option<&str>) -> Settings {
        let hosts = hosts.map(str::to_string);
        Settings::read(
            move |key| if key == "hosts" { hosts.clone() } else { None },
            GitHub::DEFAULT_TOKEN_SECRET,
        )
    }

    fn input(url: &str) -> PullRequestInput {
        PullRequestInput {
            repository_url: url.to_string(),
            head_branch: "flotilla/fix-1".to_string(),
            base_branch: "main".to_string(),
            title: "Fix it".to_string(),
            body: "Body".to_string(),
            draft: true,
        }
    }

    #[test]
    fn github_urls_in_every_form_name_the_same_repository() {
        let expected = RepoRef {
            host: "github.com".to_string(),
            owner: "acme".to_string(),
            name: "widgets".to_string(),
            web_url: "https://github.com/acme/widgets".to_string(),
        };
        for url in [
            "https://github.com/acme/widgets",
            "https://github.com/acme/widgets.git",
            "https://github.com/acme/widgets/",
            "https://user@github.com/acme/widgets.git",
            "git@github.com:acme/widgets.git",
            "ssh://git@github.com/acme/widgets.git",
            "http://github.com/acme/widgets",
        ] {
            assert_eq!(
                forge::match_url::<GitHub>(url, &settings(None)),
                Some(expected.clone()),
                "{url}"
            );
        }
    }

    #[test]
    fn other_hosts_and_paths_are_refused() {
        for url in [
            "https://gitlab.com/acme/widgets",
            "https://github.com/acme",
            "https://github.com/acme/widgets/pull/3",
            "https://ghe.example.com/acme/widgets",
            "https://github.com.evil.example/acme/widgets",
            "file:///srv/acme/widgets.git",
        ] {
            assert_eq!(forge::match_url::<GitHub>(url, &settings(None)), None, "{url}");
        }
    }

    #[test]
    fn enterprise_and_loopback_hosts_come_from_the_settings() {
        let settings = settings(Some("ghe.example.com, 127.0.0.1:8080"));
        let enterprise = forge::match_url::<GitHub>("https://ghe.example.com/acme/widgets", &settings).unwrap();
        assert_eq!(enterprise.web_url, "https://ghe.example.com/acme/widgets");
        let loopback = forge::match_url::<GitHub>("http://127.0.0.1:8080/acme/widgets.git", &settings).unwrap();
        assert_eq!(loopback.host, "127.0.0.1:8080");
        assert_eq!(loopback.web_url, "http://127.0.0.1:8080/acme/widgets");
    }

    #[test]
    fn the_clone_spec_is_https_with_a_basic_token_header() {
        let spec = forge::clone_spec::<GitHub>("git@github.com:acme/widgets.git", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://github.com/acme/widgets.git");
        assert_eq!(
            spec.auth_header,
            Some((
                "Authorization".to_string(),
                "Basic {{basic:x-access-token:secret:github-token}}".to_string()
            ))
        );
        let loopback =
            forge::clone_spec::<GitHub>("http://127.0.0.1:8080/acme/widgets", &settings(Some("127.0.0.1:8080")))
                .unwrap();
        assert_eq!(loopback.url, "http://127.0.0.1:8080/acme/widgets.git");
        assert!(matches!(
            forge::clone_spec::<GitHub>("https://gitlab.com/a/b", &settings(None)),
            Err(Failure::InvalidInput(_))
        ));
    }

    #[test]
    fn the_pull_request_request_follows_the_rest_api() {
        let request =
            forge::pull_request_request::<GitHub>(&input("https://github.com/acme/widgets"), &settings(None)).unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, "https://api.github.com/repos/acme/widgets/pulls");
        assert_eq!(request.header("authorization"), Some("Bearer {{secret:github-token}}"));
        assert_eq!(request.header("accept"), Some("application/vnd.github+json"));
        assert_eq!(request.header("x-github-api-version"), Some("2022-11-28"));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert!(request.header("user-agent").is_some());
        let body: Value = serde_json::from_slice(request.body.as_deref().unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"title": "Fix it", "head": "flotilla/fix-1", "base": "main", "body": "Body", "draft": true})
        );
        let enterprise = forge::pull_request_request::<GitHub>(
            &input("https://ghe.example.com/acme/widgets"),
            &settings(Some("ghe.example.com")),
        )
        .unwrap();
        assert_eq!(
            enterprise.url,
            "https://ghe.example.com/api/v3/repos/acme/widgets/pulls"
        );
    }

    #[test]
    fn an_already_open_pull_request_is_looked_up_by_head_and_base() {
        let refusal = br#"{"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom", "message": "A pull request already exists for acme:flotilla/fix-1."}], "status": "422"}"#;
        assert!(GitHub::may_be_already_open(422, refusal));
        assert!(!GitHub::may_be_already_open(
            422,
            br#"{"message": "Validation Failed", "errors": [{"field": "head", "code": "invalid"}]}"#
        ));
        assert!(!GitHub::may_be_already_open(401, br#"{"message": "Bad credentials"}"#));
        let lookup =
            forge::open_pull_request_request::<GitHub>(&input("https://github.com/acme/widgets"), &settings(None))
                .unwrap();
        assert_eq!(lookup.method, "GET");
        assert_eq!(
            lookup.url,
            "https://api.github.com/repos/acme/widgets/pulls?state=open&head=acme%3Aflotilla%2Ffix-1&base=main"
        );
        assert_eq!(lookup.header("authorization"), Some("Bearer {{secret:github-token}}"));
        assert_eq!(lookup.header("x-github-api-version"), Some("2022-11-28"));
        assert_eq!(lookup.body, None);
        assert_eq!(
            forge::open_pull_request_response::<GitHub>(
                200,
                br#"[{"number": 3, "html_url": "https://github.com/acme/widgets/pull/3"}]"#
            ),
            Ok(Some(PullRequest {
                url: "https://github.com/acme/widgets/pull/3".to_string(),
                number: 3
            }))
        );
        assert_eq!(forge::open_pull_request_response::<GitHub>(200, b"[]"), Ok(None));
        assert!(matches!(
            forge::open_pull_request_response::<GitHub>(401, br#"{"message": "Bad credentials"}"#),
            Err(Failure::Remote { status: 401, ref message }) if message == "Bad credentials"
        ));
    }

    #[test]
    fn the_api_base_setting_wins() {
        let settings = Settings::read(
            |key| (key == "api-base").then(|| "http://127.0.0.1:9/api/".to_string()),
            GitHub::DEFAULT_TOKEN_SECRET,
        );
        let request =
            forge::pull_request_request::<GitHub>(&input("https://github.com/acme/widgets"), &settings).unwrap();
        assert_eq!(request.url, "http://127.0.0.1:9/api/repos/acme/widgets/pulls");
    }

    #[test]
    fn answers_become_pull_requests_or_remote_errors_in_githubs_words() {
        let created = br#"{"number": 42, "html_url": "https://github.com/acme/widgets/pull/42", "id": 1}"#;
        assert_eq!(
            forge::pull_request_response::<GitHub>(201, created),
            Ok(PullRequest {
                url: "https://github.com/acme/widgets/pull/42".to_string(),
                number: 42
            })
        );
        let exists = br#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","code":"custom","message":"A pull request already exists for acme:flotilla/fix-1."}],"documentation_url":"https://docs.github.com/rest","status":"422"}"#;
        assert_eq!(
            forge::pull_request_response::<GitHub>(422, exists),
            Err(Failure::Remote {
                status: 422,
                message: "Validation Failed: A pull request already exists for acme:flotilla/fix-1.".to_string()
            })
        );
        let invalid =
            br#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","field":"head","code":"invalid"}]}"#;
        assert_eq!(
            forge::pull_request_response::<GitHub>(422, invalid),
            Err(Failure::Remote {
                status: 422,
                message: "Validation Failed: PullRequest.head invalid".to_string()
            })
        );
        let unauthorized = br#"{"message":"Bad credentials","documentation_url":"https://docs.github.com/rest"}"#;
        assert_eq!(
            forge::pull_request_response::<GitHub>(401, unauthorized),
            Err(Failure::Remote {
                status: 401,
                message: "Bad credentials".to_string()
            })
        );
    }

    fn headers(event: &str) -> Vec<(String, String)> {
        vec![("X-GitHub-Event".to_string(), event.to_string())]
    }

    #[test]
    fn push_and_pull_request_deliveries_become_events() {
        let push = json!({
            "ref": "refs/heads/flotilla/fix-1",
            "repository": {"html_url": "https://github.com/acme/widgets"},
            "pusher": {"name": "octocat"},
            "sender": {"login": "octocat"}
        });
        let event = forge::parse_webhook::<GitHub>(&headers("push"), push.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(event.kind, "push");
        assert_eq!(event.branch.as_deref(), Some("flotilla/fix-1"));
        assert_eq!(event.actor.as_deref(), Some("octocat"));
        let opened = json!({
            "action": "opened",
            "number": 42,
            "pull_request": {"number": 42, "head": {"ref": "flotilla/fix-1"}},
            "repository": {"html_url": "https://github.com/acme/widgets"},
            "sender": {"login": "octocat"}
        });
        let event = forge::parse_webhook::<GitHub>(&headers("pull_request"), opened.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(event.kind, "pull-request");
        assert_eq!(event.pull_request_number, Some(42));
        assert_eq!(event.repository_url, "https://github.com/acme/widgets");
    }

    #[test]
    fn other_deliveries_are_ignored_and_bad_bodies_refused() {
        assert_eq!(forge::parse_webhook::<GitHub>(&headers("ping"), b"{}"), Ok(None));
        assert_eq!(forge::parse_webhook::<GitHub>(&[], b"{}"), Ok(None));
        let issue_comment = json!({"issue": {"number": 3}, "repository": {"html_url": "https://github.com/a/b"}});
        assert_eq!(
            forge::parse_webhook::<GitHub>(&headers("issue_comment"), issue_comment.to_string().as_bytes()),
            Ok(None)
        );
        assert!(matches!(
            forge::parse_webhook::<GitHub>(&headers("push"), b"not json"),
            Err(Failure::InvalidInput(_))
        ));
    }
}
