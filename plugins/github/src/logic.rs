//! What the GitHub provider decides without talking to GitHub: which URLs are GitHub
//! repositories, the clone URL and credentials, the "create a pull request" request, and how
//! to read GitHub's answers and webhook deliveries. Plain functions, tested natively.

use flotilla_guest_support::{
    branch_of_ref, created_pull_request, encode_path_component, found_pull_request, header, json_string, json_u64,
    parse_json, query_string, remote_failure, webhook_json, CloneSpec, Failure, HttpRequest, PullRequest,
    PullRequestInput, RepoRef, Settings, TwoPartRepository as Repository, WebhookEvent,
};
use serde_json::{json, Value};

pub const NAME: &str = "github";
pub const DISPLAY_NAME: &str = "GitHub";
pub const DEFAULT_TOKEN_SECRET: &str = "github-token";
/// The public forge; GitHub Enterprise Server hosts come from the `hosts` setting.
const PUBLIC_HOST: &str = "github.com";
const PUBLIC_API_BASE: &str = "https://api.github.com";
/// The user name GitHub expects with an installation or personal token over git's HTTP.
const GIT_USER: &str = "x-access-token";
const API_VERSION: &str = "2022-11-28";

pub fn url_patterns() -> Vec<String> {
    vec![
        "https://github.com/OWNER/REPO".to_string(),
        "git@github.com:OWNER/REPO.git".to_string(),
        "https://HOST/OWNER/REPO for each host in the `hosts` setting (GitHub Enterprise Server)".to_string(),
    ]
}

fn repository(url: &str, settings: &Settings) -> Option<Repository> {
    Repository::parse(url, &settings.claimed_hosts(&[PUBLIC_HOST]))
}

fn not_github(url: &str) -> Failure {
    Failure::InvalidInput(format!(
        "{url:?} is not a GitHub repository URL (https://github.com/OWNER/REPO, or a host in the `hosts` setting)"
    ))
}

pub fn match_url(url: &str, settings: &Settings) -> Option<RepoRef> {
    repository(url, settings).map(Repository::repo_ref)
}

pub fn clone_spec(url: &str, settings: &Settings) -> Result<CloneSpec, Failure> {
    let repository = repository(url, settings).ok_or_else(|| not_github(url))?;
    Ok(CloneSpec {
        url: repository.clone_url(),
        auth_header: Some((
            "Authorization".to_string(),
            format!("Basic {}", settings.basic_placeholder(GIT_USER)?),
        )),
    })
}

/// `https://api.github.com` for github.com, `{scheme}://{host}/api/v3` for GitHub Enterprise
/// Server, or the `api-base` setting.
fn api_base(repository: &Repository, settings: &Settings) -> String {
    if let Some(api_base) = &settings.api_base {
        return api_base.clone();
    }
    if repository.url.web_host() == PUBLIC_HOST {
        PUBLIC_API_BASE.to_string()
    } else {
        format!("{}/api/v3", repository.url.web_origin())
    }
}

/// The repository's pulls endpoint, `{api}/repos/OWNER/REPO/pulls`.
fn pulls_url(input: &PullRequestInput, settings: &Settings) -> Result<(Repository, String), Failure> {
    let repository = repository(&input.repository_url, settings).ok_or_else(|| not_github(&input.repository_url))?;
    let url = format!(
        "{}/repos/{}/{}/pulls",
        api_base(&repository, settings),
        encode_path_component(&repository.owner),
        encode_path_component(&repository.name)
    );
    Ok((repository, url))
}

fn api_headers(settings: &Settings) -> Result<Vec<(String, String)>, Failure> {
    Ok(vec![
        (
            "Authorization".to_string(),
            format!("Bearer {}", settings.token_placeholder()?),
        ),
        ("Accept".to_string(), "application/vnd.github+json".to_string()),
        ("X-GitHub-Api-Version".to_string(), API_VERSION.to_string()),
        ("User-Agent".to_string(), "flotilla".to_string()),
    ])
}

pub fn pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let (_, url) = pulls_url(input, settings)?;
    let headers = api_headers(settings)?;
    let body = json!({
        "title": input.title,
        "head": input.head_branch,
        "base": input.base_branch,
        "body": input.body,
        "draft": input.draft,
    });
    Ok(HttpRequest::post_json(url, headers, &body))
}

pub fn pull_request_response(status: u16, body: &[u8]) -> Result<PullRequest, Failure> {
    if (200..300).contains(&status) {
        return created_pull_request(status, body, "/html_url", "/number");
    }
    Err(remote_failure(
        status,
        parse_json(body).and_then(|value| error_message(&value)),
        body,
    ))
}

/// GitHub refuses a second open pull request of one head and base with 422 "A pull request
/// already exists for OWNER:BRANCH."
pub fn already_open(status: u16, body: &[u8]) -> bool {
    status == 422 && String::from_utf8_lossy(body).contains("A pull request already exists")
}

/// `GET .../pulls?state=open&head=OWNER:BRANCH&base=BASE`: the open pull request of the head
/// and base (GitHub filters `head` by `user:ref-name`).
pub fn open_pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let (repository, url) = pulls_url(input, settings)?;
    let head = format!("{}:{}", repository.owner, input.head_branch);
    let query = query_string(&[("state", "open"), ("head", &head), ("base", &input.base_branch)]);
    Ok(HttpRequest::get(format!("{url}{query}"), api_headers(settings)?))
}

pub fn open_pull_request_response(status: u16, body: &[u8]) -> Result<Option<PullRequest>, Failure> {
    found_pull_request(status, body, Some(""), ("/html_url", "/number"), error_message)
}

/// GitHub's error body: `{"message": "Validation Failed", "errors": [{"message": "A pull
/// request already exists for acme:feature."}]}`; errors without a message name the resource,
/// field and code (`{"resource": "PullRequest", "field": "head", "code": "invalid"}`).
fn error_message(value: &Value) -> Option<String> {
    let message = json_string(value, "/message");
    let details: Vec<String> = value
        .get("errors")
        .and_then(Value::as_array)
        .map(|errors| {
            errors
                .iter()
                .filter_map(|error| match error {
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
                })
                .collect()
        })
        .unwrap_or_default();
    match (message, details.first()) {
        (Some(message), Some(detail)) => Some(format!("{message}: {detail}")),
        (Some(message), None) => Some(message),
        (None, Some(detail)) => Some(detail.clone()),
        (None, None) => None,
    }
}

/// `X-GitHub-Event: push` and `pull_request` become events (and comments on pull requests);
/// everything else (ping, issues, stars...) is ignored.
pub fn parse_webhook(headers: &[(String, String)], body: &[u8]) -> Result<Option<WebhookEvent>, Failure> {
    let Some(event) = header(headers, "X-GitHub-Event") else {
        return Ok(None);
    };
    let kind = match event.trim() {
        "push" => "push",
        "pull_request" => "pull-request",
        "issue_comment" | "pull_request_review_comment" | "pull_request_review" => "comment",
        _ => return Ok(None),
    };
    let payload = webhook_json("GitHub", body)?;
    let repository_url = json_string(&payload, "/repository/html_url")
        .ok_or_else(|| Failure::InvalidInput("GitHub webhook body has no repository.html_url".to_string()))?;
    let actor = json_string(&payload, "/sender/login").or_else(|| json_string(&payload, "/pusher/name"));
    let event = match kind {
        "push" => WebhookEvent {
            kind: kind.to_string(),
            repository_url,
            branch: json_string(&payload, "/ref").and_then(|git_ref| branch_of_ref(&git_ref)),
            pull_request_number: None,
            actor,
        },
        "pull-request" => WebhookEvent {
            kind: kind.to_string(),
            repository_url,
            branch: json_string(&payload, "/pull_request/head/ref"),
            pull_request_number: json_u64(&payload, "/number").or_else(|| json_u64(&payload, "/pull_request/number")),
            actor,
        },
        _ => {
            // A comment on an issue that is not a pull request is not ours to report.
            let on_issue = payload.get("issue");
            let on_pull_request = on_issue.is_none_or(|issue| issue.get("pull_request").is_some());
            if !on_pull_request {
                return Ok(None);
            }
            WebhookEvent {
                kind: kind.to_string(),
                repository_url,
                branch: json_string(&payload, "/pull_request/head/ref"),
                pull_request_number: json_u64(&payload, "/pull_request/number")
                    .or_else(|| json_u64(&payload, "/issue/number")),
                actor,
            }
        }
    };
    Ok(Some(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(hosts: Option<&str>) -> Settings {
        let hosts = hosts.map(str::to_string);
        Settings::read(
            move |key| if key == "hosts" { hosts.clone() } else { None },
            DEFAULT_TOKEN_SECRET,
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
            assert_eq!(match_url(url, &settings(None)), Some(expected.clone()), "{url}");
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
            assert_eq!(match_url(url, &settings(None)), None, "{url}");
        }
    }

    #[test]
    fn enterprise_and_loopback_hosts_come_from_the_settings() {
        let settings = settings(Some("ghe.example.com, 127.0.0.1:8080"));
        let enterprise = match_url("https://ghe.example.com/acme/widgets", &settings).unwrap();
        assert_eq!(enterprise.web_url, "https://ghe.example.com/acme/widgets");
        let loopback = match_url("http://127.0.0.1:8080/acme/widgets.git", &settings).unwrap();
        assert_eq!(loopback.host, "127.0.0.1:8080");
        assert_eq!(loopback.web_url, "http://127.0.0.1:8080/acme/widgets");
    }

    #[test]
    fn the_clone_spec_is_https_with_a_basic_token_header() {
        let spec = clone_spec("git@github.com:acme/widgets.git", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://github.com/acme/widgets.git");
        assert_eq!(
            spec.auth_header,
            Some((
                "Authorization".to_string(),
                "Basic {{basic:x-access-token:secret:github-token}}".to_string()
            ))
        );
        let loopback = clone_spec("http://127.0.0.1:8080/acme/widgets", &settings(Some("127.0.0.1:8080"))).unwrap();
        assert_eq!(loopback.url, "http://127.0.0.1:8080/acme/widgets.git");
        assert!(matches!(
            clone_spec("https://gitlab.com/a/b", &settings(None)),
            Err(Failure::InvalidInput(_))
        ));
    }

    #[test]
    fn the_pull_request_request_follows_the_rest_api() {
        let request = pull_request_request(&input("https://github.com/acme/widgets"), &settings(None)).unwrap();
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
        let enterprise = pull_request_request(
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
        assert!(already_open(422, refusal));
        assert!(!already_open(
            422,
            br#"{"message": "Validation Failed", "errors": [{"field": "head", "code": "invalid"}]}"#
        ));
        assert!(!already_open(401, br#"{"message": "Bad credentials"}"#));
        let lookup = open_pull_request_request(&input("https://github.com/acme/widgets"), &settings(None)).unwrap();
        assert_eq!(lookup.method, "GET");
        assert_eq!(
            lookup.url,
            "https://api.github.com/repos/acme/widgets/pulls?state=open&head=acme%3Aflotilla%2Ffix-1&base=main"
        );
        assert_eq!(lookup.header("authorization"), Some("Bearer {{secret:github-token}}"));
        assert_eq!(lookup.header("x-github-api-version"), Some("2022-11-28"));
        assert_eq!(lookup.body, None);
        assert_eq!(
            open_pull_request_response(
                200,
                br#"[{"number": 3, "html_url": "https://github.com/acme/widgets/pull/3"}]"#
            ),
            Ok(Some(PullRequest {
                url: "https://github.com/acme/widgets/pull/3".to_string(),
                number: 3
            }))
        );
        assert_eq!(open_pull_request_response(200, b"[]"), Ok(None));
        assert!(matches!(
            open_pull_request_response(401, br#"{"message": "Bad credentials"}"#),
            Err(Failure::Remote { status: 401, ref message }) if message == "Bad credentials"
        ));
    }

    #[test]
    fn the_api_base_setting_wins() {
        let settings = Settings::read(
            |key| (key == "api-base").then(|| "http://127.0.0.1:9/api/".to_string()),
            DEFAULT_TOKEN_SECRET,
        );
        let request = pull_request_request(&input("https://github.com/acme/widgets"), &settings).unwrap();
        assert_eq!(request.url, "http://127.0.0.1:9/api/repos/acme/widgets/pulls");
    }

    #[test]
    fn answers_become_pull_requests_or_remote_errors_in_githubs_words() {
        let created = br#"{"number": 42, "html_url": "https://github.com/acme/widgets/pull/42", "id": 1}"#;
        assert_eq!(
            pull_request_response(201, created),
            Ok(PullRequest {
                url: "https://github.com/acme/widgets/pull/42".to_string(),
                number: 42
            })
        );
        let exists = br#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","code":"custom","message":"A pull request already exists for acme:flotilla/fix-1."}],"documentation_url":"https://docs.github.com/rest","status":"422"}"#;
        assert_eq!(
            pull_request_response(422, exists),
            Err(Failure::Remote {
                status: 422,
                message: "Validation Failed: A pull request already exists for acme:flotilla/fix-1.".to_string()
            })
        );
        let invalid =
            br#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","field":"head","code":"invalid"}]}"#;
        assert_eq!(
            pull_request_response(422, invalid),
            Err(Failure::Remote {
                status: 422,
                message: "Validation Failed: PullRequest.head invalid".to_string()
            })
        );
        let unauthorized = br#"{"message":"Bad credentials","documentation_url":"https://docs.github.com/rest"}"#;
        assert_eq!(
            pull_request_response(401, unauthorized),
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
        let event = parse_webhook(&headers("push"), push.to_string().as_bytes())
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
        let event = parse_webhook(&headers("pull_request"), opened.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(event.kind, "pull-request");
        assert_eq!(event.pull_request_number, Some(42));
        assert_eq!(event.repository_url, "https://github.com/acme/widgets");
    }

    #[test]
    fn other_deliveries_are_ignored_and_bad_bodies_refused() {
        assert_eq!(parse_webhook(&headers("ping"), b"{}"), Ok(None));
        assert_eq!(parse_webhook(&[], b"{}"), Ok(None));
        let issue_comment = json!({"issue": {"number": 3}, "repository": {"html_url": "https://github.com/a/b"}});
        assert_eq!(
            parse_webhook(&headers("issue_comment"), issue_comment.to_string().as_bytes()),
            Ok(None)
        );
        assert!(matches!(
            parse_webhook(&headers("push"), b"not json"),
            Err(Failure::InvalidInput(_))
        ));
    }
}
