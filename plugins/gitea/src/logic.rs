//! Gitea and Forgejo as a [`Forge`]: which URLs are their repositories, the REST API's paths,
//! headers and bodies, how they say a pull request is already open and how to look that one up,
//! and how to read their answers and webhook deliveries. The rest of the provider is the shared
//! skeleton.

use flotilla_guest_support::{
    branch_of_ref, encode_path_component, json_string, json_u64, render_message, rendered_field, Forge,
    ForgeRepository, LookupAnswer, PullRequestFields, PullRequestInput, Settings, WebhookDetails, WebhookKind,
};
use serde_json::{json, Value};

/// codeberg.org and self-hosted Gitea and Forgejo.
pub struct Gitea;

/// Gitea and Forgejo take a token as the Basic auth password whatever the user name is.
const DEFAULT_GIT_USER: &str = "flotilla";
/// The title prefix that marks a pull request as work in progress (Gitea's draft).
const DRAFT_PREFIX: &str = "WIP: ";

impl Forge for Gitea {
    const NAME: &'static str = "gitea";
    const DISPLAY_NAME: &'static str = "Gitea / Forgejo";
    const FORGE_NAME: &'static str = "Gitea";
    const REPOSITORY_NOUN: &'static str = "Gitea or Forgejo repository";
    const EXAMPLE_URL: &'static str = "https://codeberg.org/OWNER/REPO";
    const DEFAULT_TOKEN_SECRET: &'static str = "gitea-token";
    /// The best-known public Forgejo instance; every other instance comes from the `hosts`
    /// setting.
    const PUBLIC_HOST: &'static str = "codeberg.org";

    fn url_patterns() -> Vec<String> {
        vec![
            "https://codeberg.org/OWNER/REPO".to_string(),
            "git@codeberg.org:OWNER/REPO.git".to_string(),
            "https://HOST/OWNER/REPO for each host in the `hosts` setting (self-hosted Gitea or Forgejo)".to_string(),
        ]
    }

    fn git_user(settings: &Settings) -> &str {
        settings.username.as_deref().unwrap_or(DEFAULT_GIT_USER)
    }

    /// `{scheme}://{host}/api/v1`.
    fn default_api_base(repository: &ForgeRepository) -> String {
        format!("{}/api/v1", repository.url.web_origin())
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
        ("Authorization".to_string(), format!("token {token_placeholder}"))
    }

    fn create_pull_request_body(input: &PullRequestInput) -> Value {
        json!({
            "head": input.head_branch,
            "base": input.base_branch,
            "title": input.title_marking_draft(DRAFT_PREFIX),
            "body": input.body,
        })
    }

    const PULL_REQUEST_FIELDS: PullRequestFields = PullRequestFields {
        url_pointer: "/html_url",
        number_pointer: "/number",
    };

    /// Gitea's error body: `{"message": "...", "url": "https://.../api/swagger"}`, sometimes
    /// with `"errors": [...]`, or a bare list of binding errors.
    fn error_message(answer: &Value) -> Option<String> {
        if let Some(binding_errors) = answer.as_array() {
            return binding_errors_message(binding_errors);
        }
        match (rendered_field(answer, "message"), rendered_field(answer, "errors")) {
            (Some(message), Some(errors)) => Some(format!("{message}: {errors}")),
            (message, errors) => message.or(errors),
        }
    }

    /// Gitea and Forgejo refuse a second open pull request of one head and base with 409 "pull
    /// request already exists for these targets".
    fn may_be_already_open(status: u16, _body: &[u8]) -> bool {
        status == 409
    }

    /// `GET .../pulls/BASE/HEAD`: the pull request of a base and head branch (the head's `/`s
    /// stay path separators, which the route takes as one branch name).
    fn open_pull_request_lookup_url(
        pull_requests_url: &str,
        _repository: &ForgeRepository,
        input: &PullRequestInput,
    ) -> String {
        let head: Vec<String> = input.head_branch.split('/').map(encode_path_component).collect();
        format!(
            "{pull_requests_url}/{}/{}",
            encode_path_component(&input.base_branch),
            head.join("/")
        )
    }

    /// The pull request itself; 404 when there is none.
    const LOOKUP_ANSWER: LookupAnswer = LookupAnswer::Single;

    /// The lookup by branches returns the pull request even when it is closed.
    fn is_still_open(pull_request: &Value) -> bool {
        json_string(pull_request, "/state").is_none_or(|state| state == "open")
    }

    /// Forgejo's header, Gitea's, and the Gogs-compatible one.
    const WEBHOOK_EVENT_HEADERS: &'static [&'static str] = &["X-Forgejo-Event", "X-Gitea-Event", "X-Gogs-Event"];

    /// Pushes, pull requests and comments on pull requests; the rest is ignored.
    fn webhook_kind(event: &str) -> Option<WebhookKind> {
        match event {
            "push" => Some(WebhookKind::Push),
            "pull_request" => Some(WebhookKind::PullRequest),
            "issue_comment" | "pull_request_comment" => Some(WebhookKind::Comment),
            _ => None,
        }
    }

    const WEBHOOK_REPOSITORY_URL_POINTER: &'static str = "/repository/html_url";

    fn webhook_details(kind: WebhookKind, payload: &Value) -> Option<WebhookDetails> {
        let actor = json_string(payload, "/sender/login")
            .or_else(|| json_string(payload, "/sender/username"))
            .or_else(|| json_string(payload, "/pusher/login"));
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
                // Gitea sends comments on pull requests as `issue_comment` with `is_pull: true`.
                let on_pull_request = payload.pointer("/is_pull").and_then(Value::as_bool).unwrap_or(false)
                    || payload
                        .pointer("/issue/pull_request")
                        .is_some_and(|pull| !pull.is_null());
                if !on_pull_request {
                    return None;
                }
                WebhookDetails {
                    branch: None,
                    pull_request_number: json_u64(payload, "/issue/number"),
                    actor,
                }
            }
        };
        Some(details)
    }
}

/// Binding errors come as a bare list: `[{"fieldNames": ["Head"], "message": "Required"}]`.
fn binding_errors_message(binding_errors: &[Value]) -> Option<String> {
    let rendered: Vec<String> = binding_errors
        .iter()
        .map(
            |error| match (error.get("fieldNames"), json_string(error, "/message")) {
                (Some(fields), Some(message)) => format!("{}: {message}", render_message(fields)),
                _ => render_message(error),
            },
        )
        .filter(|text| !text.is_empty())
        .collect();
    (!rendered.is_empty()).then(|| rendered.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_guest_support::forge;
    use flotilla_guest_support::{Failure, PullRequest};

    fn settings(hosts: Option<&str>) -> Settings {
        let hosts = hosts.map(str::to_string);
        Settings::read(
            move |key| if key == "hosts" { hosts.clone() } else { None },
            Gitea::DEFAULT_TOKEN_SECRET,
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
    fn an_already_open_pull_request_is_looked_up_by_base_and_head() {
        assert!(Gitea::may_be_already_open(
            409,
            br#"{"message": "pull request already exists for these targets [id: 3001]"}"#
        ));
        assert!(!Gitea::may_be_already_open(422, b"[]"));
        let lookup =
            forge::open_pull_request_request::<Gitea>(&input("https://codeberg.org/acme/widgets"), &settings(None))
                .unwrap();
        assert_eq!(lookup.method, "GET");
        assert_eq!(
            lookup.url,
            "https://codeberg.org/api/v1/repos/acme/widgets/pulls/main/flotilla/fix-1"
        );
        assert_eq!(lookup.header("authorization"), Some("token {{secret:gitea-token}}"));
        assert_eq!(
            forge::open_pull_request_response::<Gitea>(
                200,
                br#"{"number": 2, "state": "open", "html_url": "https://codeberg.org/acme/widgets/pulls/2"}"#
            ),
            Ok(Some(PullRequest {
                url: "https://codeberg.org/acme/widgets/pulls/2".to_string(),
                number: 2
            }))
        );
        assert_eq!(
            forge::open_pull_request_response::<Gitea>(
                200,
                br#"{"number": 1, "state": "closed", "html_url": "https://codeberg.org/acme/widgets/pulls/1"}"#
            ),
            Ok(None)
        );
        assert_eq!(
            forge::open_pull_request_response::<Gitea>(404, br#"{"message": "The target couldn't be found."}"#),
            Ok(None)
        );
        assert!(matches!(
            forge::open_pull_request_response::<Gitea>(401, br#"{"message": "token is required"}"#),
            Err(Failure::Remote { status: 401, .. })
        ));
    }

    #[test]
    fn codeberg_and_configured_hosts_match() {
        let codeberg = forge::match_url::<Gitea>("git@codeberg.org:acme/widgets.git", &settings(None)).unwrap();
        assert_eq!(codeberg.web_url, "https://codeberg.org/acme/widgets");
        let settings = settings(Some("git.example.com"));
        let own = forge::match_url::<Gitea>("https://git.example.com/acme/widgets.git", &settings).unwrap();
        assert_eq!((own.owner.as_str(), own.name.as_str()), ("acme", "widgets"));
        for url in [
            "https://github.com/acme/widgets",
            "https://codeberg.org/acme",
            "https://codeberg.org/acme/widgets/pulls/1",
        ] {
            assert_eq!(forge::match_url::<Gitea>(url, &settings), None, "{url}");
        }
    }

    #[test]
    fn the_clone_spec_sends_the_token_as_a_basic_password() {
        let spec = forge::clone_spec::<Gitea>("https://codeberg.org/acme/widgets", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://codeberg.org/acme/widgets.git");
        assert_eq!(
            spec.auth_header.unwrap().1,
            "Basic {{basic:flotilla:secret:gitea-token}}"
        );
    }

    #[test]
    fn the_pull_request_request_follows_the_rest_api() {
        let request =
            forge::pull_request_request::<Gitea>(&input("https://codeberg.org/acme/widgets"), &settings(None)).unwrap();
        assert_eq!(request.url, "https://codeberg.org/api/v1/repos/acme/widgets/pulls");
        assert_eq!(request.header("authorization"), Some("token {{secret:gitea-token}}"));
        assert_eq!(request.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_slice(request.body.as_deref().unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"head": "flotilla/fix-1", "base": "main", "title": "WIP: Fix it", "body": "Body"})
        );
    }

    #[test]
    fn answers_become_pull_requests_or_errors_in_giteas_words() {
        let created = br#"{"id": 10, "number": 3, "html_url": "https://codeberg.org/acme/widgets/pulls/3"}"#;
        assert_eq!(
            forge::pull_request_response::<Gitea>(201, created),
            Ok(PullRequest {
                url: "https://codeberg.org/acme/widgets/pulls/3".to_string(),
                number: 3
            })
        );
        let exists = br#"{"message":"pull request already exists for these targets [id: 3, issue_id: 4, head_repo_id: 1, base_repo_id: 1, head_branch: flotilla/fix-1, base_branch: main]","url":"https://codeberg.org/api/swagger"}"#;
        let Err(Failure::Remote { status, message }) = forge::pull_request_response::<Gitea>(409, exists) else {
            panic!("expected a remote error");
        };
        assert_eq!(status, 409);
        assert!(
            message.starts_with("pull request already exists for these targets"),
            "{message}"
        );
        let binding = br#"[{"fieldNames":["Head"],"classification":"RequiredError","message":"Required"}]"#;
        assert_eq!(
            forge::pull_request_response::<Gitea>(422, binding),
            Err(Failure::Remote {
                status: 422,
                message: "Head: Required".to_string()
            })
        );
        assert_eq!(
            forge::pull_request_response::<Gitea>(401, br#"{"message":"token is required","url":"x"}"#),
            Err(Failure::Remote {
                status: 401,
                message: "token is required".to_string()
            })
        );
    }

    #[test]
    fn deliveries_become_events() {
        let push = json!({
            "ref": "refs/heads/flotilla/fix-1",
            "repository": {"html_url": "https://codeberg.org/acme/widgets"},
            "sender": {"login": "jdoe"}
        });
        let forgejo = vec![("X-Forgejo-Event".to_string(), "push".to_string())];
        let event = forge::parse_webhook::<Gitea>(&forgejo, push.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(event.branch.as_deref(), Some("flotilla/fix-1"));
        let gitea = vec![("X-Gitea-Event".to_string(), "pull_request".to_string())];
        let opened = json!({
            "action": "opened",
            "number": 3,
            "pull_request": {"number": 3, "head": {"ref": "flotilla/fix-1"}},
            "repository": {"html_url": "https://codeberg.org/acme/widgets"},
            "sender": {"login": "jdoe"}
        });
        let event = forge::parse_webhook::<Gitea>(&gitea, opened.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            (event.kind.as_str(), event.pull_request_number),
            ("pull-request", Some(3))
        );
        let release = vec![("X-Gitea-Event".to_string(), "release".to_string())];
        assert_eq!(forge::parse_webhook::<Gitea>(&release, b"{}"), Ok(None));
    }
}
