//! What the Gitea/Forgejo provider decides without talking to the forge: which URLs are its
//! repositories, the clone URL and credentials, the "create a pull request" request, and how
//! to read the forge's answers and webhook deliveries. Plain functions, tested natively.

use flotilla_guest_support::{
    branch_of_ref, created_pull_request, encode_path_component, found_pull_request, header, json_string, json_u64,
    parse_json, remote_failure, render_message, webhook_json, CloneSpec, Failure, HttpRequest, PullRequest,
    PullRequestInput, RepoRef, Settings, TwoPartRepository as Repository, WebhookEvent,
};
use serde_json::{json, Value};

pub const NAME: &str = "gitea";
pub const DISPLAY_NAME: &str = "Gitea / Forgejo";
pub const DEFAULT_TOKEN_SECRET: &str = "gitea-token";
/// The best-known public Forgejo instance; every other instance comes from the `hosts` setting.
const PUBLIC_HOST: &str = "codeberg.org";
/// Gitea and Forgejo take a token as the Basic auth password whatever the user name is.
const DEFAULT_GIT_USER: &str = "flotilla";
/// The title prefix that marks a pull request as work in progress (Gitea's draft).
const DRAFT_PREFIX: &str = "WIP: ";

pub fn url_patterns() -> Vec<String> {
    vec![
        "https://codeberg.org/OWNER/REPO".to_string(),
        "git@codeberg.org:OWNER/REPO.git".to_string(),
        "https://HOST/OWNER/REPO for each host in the `hosts` setting (self-hosted Gitea or Forgejo)".to_string(),
    ]
}

fn repository(url: &str, settings: &Settings) -> Option<Repository> {
    Repository::parse(url, &settings.claimed_hosts(&[PUBLIC_HOST]))
}

fn not_gitea(url: &str) -> Failure {
    Failure::InvalidInput(format!(
        "{url:?} is not a Gitea or Forgejo repository URL (https://codeberg.org/OWNER/REPO, or a host in the `hosts` setting)"
    ))
}

pub fn match_url(url: &str, settings: &Settings) -> Option<RepoRef> {
    repository(url, settings).map(Repository::repo_ref)
}

pub fn clone_spec(url: &str, settings: &Settings) -> Result<CloneSpec, Failure> {
    let repository = repository(url, settings).ok_or_else(|| not_gitea(url))?;
    let user = settings.username.as_deref().unwrap_or(DEFAULT_GIT_USER);
    Ok(CloneSpec {
        url: repository.clone_url(),
        auth_header: Some((
            "Authorization".to_string(),
            format!("Basic {}", settings.basic_placeholder(user)?),
        )),
    })
}

/// `{scheme}://{host}/api/v1`, or the `api-base` setting.
fn api_base(repository: &Repository, settings: &Settings) -> String {
    match &settings.api_base {
        Some(api_base) => api_base.clone(),
        None => format!("{}/api/v1", repository.url.web_origin()),
    }
}

/// The repository's pulls endpoint, `{api}/repos/OWNER/REPO/pulls`.
fn pulls_url(input: &PullRequestInput, settings: &Settings) -> Result<String, Failure> {
    let repository = repository(&input.repository_url, settings).ok_or_else(|| not_gitea(&input.repository_url))?;
    Ok(format!(
        "{}/repos/{}/{}/pulls",
        api_base(&repository, settings),
        encode_path_component(&repository.owner),
        encode_path_component(&repository.name)
    ))
}

fn api_headers(settings: &Settings) -> Result<Vec<(String, String)>, Failure> {
    Ok(vec![
        (
            "Authorization".to_string(),
            format!("token {}", settings.token_placeholder()?),
        ),
        ("Accept".to_string(), "application/json".to_string()),
        ("User-Agent".to_string(), "flotilla".to_string()),
    ])
}

pub fn pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let url = pulls_url(input, settings)?;
    let headers = api_headers(settings)?;
    let title = if input.draft && !input.title.starts_with(DRAFT_PREFIX) {
        format!("{DRAFT_PREFIX}{}", input.title)
    } else {
        input.title.clone()
    };
    let body = json!({
        "head": input.head_branch,
        "base": input.base_branch,
        "title": title,
        "body": input.body,
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

/// Gitea and Forgejo refuse a second open pull request of one head and base with 409 "pull
/// request already exists for these targets".
pub fn already_open(status: u16, _body: &[u8]) -> bool {
    status == 409
}

/// `GET .../pulls/BASE/HEAD`: the pull request of a base and head branch (the head's `/`s stay
/// path separators, which the route takes as one branch name).
pub fn open_pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let url = pulls_url(input, settings)?;
    let head: Vec<String> = input.head_branch.split('/').map(encode_path_component).collect();
    Ok(HttpRequest::get(
        format!("{url}/{}/{}", encode_path_component(&input.base_branch), head.join("/")),
        api_headers(settings)?,
    ))
}

/// The pull request, if it is still open; 404 when there is none.
pub fn open_pull_request_response(status: u16, body: &[u8]) -> Result<Option<PullRequest>, Failure> {
    let closed = (200..300).contains(&status)
        && parse_json(body).is_some_and(|value| json_string(&value, "/state").is_some_and(|state| state != "open"));
    if closed {
        return Ok(None);
    }
    found_pull_request(status, body, None, ("/html_url", "/number"), error_message)
}

/// Gitea's error body: `{"message": "...", "url": "https://.../api/swagger"}`, sometimes with
/// `"errors": [...]`, or a bare list of binding errors.
fn error_message(value: &Value) -> Option<String> {
    // Binding errors come as a bare list: `[{"fieldNames": ["Head"], "message": "Required"}]`.
    if let Some(binding_errors) = value.as_array() {
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
        return (!rendered.is_empty()).then(|| rendered.join("; "));
    }
    let message = value.get("message").map(render_message).filter(|text| !text.is_empty());
    let errors = value.get("errors").map(render_message).filter(|text| !text.is_empty());
    match (message, errors) {
        (Some(message), Some(errors)) => Some(format!("{message}: {errors}")),
        (message, errors) => message.or(errors),
    }
}

/// `X-Gitea-Event` (or Forgejo's `X-Forgejo-Event`, or the Gogs-compatible `X-Gogs-Event`):
/// push, pull_request and comments on pull requests become events; the rest is ignored.
pub fn parse_webhook(headers: &[(String, String)], body: &[u8]) -> Result<Option<WebhookEvent>, Failure> {
    let Some(event) = header(headers, "X-Forgejo-Event")
        .or_else(|| header(headers, "X-Gitea-Event"))
        .or_else(|| header(headers, "X-Gogs-Event"))
    else {
        return Ok(None);
    };
    let kind = match event.trim() {
        "push" => "push",
        "pull_request" => "pull-request",
        "issue_comment" | "pull_request_comment" => "comment",
        _ => return Ok(None),
    };
    let payload = webhook_json("Gitea", body)?;
    let repository_url = json_string(&payload, "/repository/html_url")
        .ok_or_else(|| Failure::InvalidInput("Gitea webhook body has no repository.html_url".to_string()))?;
    let actor = json_string(&payload, "/sender/login")
        .or_else(|| json_string(&payload, "/sender/username"))
        .or_else(|| json_string(&payload, "/pusher/login"));
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
            // Gitea sends comments on pull requests as `issue_comment` with `is_pull: true`.
            let on_pull_request = payload.pointer("/is_pull").and_then(Value::as_bool).unwrap_or(false)
                || payload
                    .pointer("/issue/pull_request")
                    .is_some_and(|pull| !pull.is_null());
            if !on_pull_request {
                return Ok(None);
            }
            WebhookEvent {
                kind: kind.to_string(),
                repository_url,
                branch: None,
                pull_request_number: json_u64(&payload, "/issue/number"),
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
    fn an_already_open_pull_request_is_looked_up_by_base_and_head() {
        assert!(already_open(
            409,
            br#"{"message": "pull request already exists for these targets [id: 3001]"}"#
        ));
        assert!(!already_open(422, b"[]"));
        let lookup = open_pull_request_request(&input("https://codeberg.org/acme/widgets"), &settings(None)).unwrap();
        assert_eq!(lookup.method, "GET");
        assert_eq!(
            lookup.url,
            "https://codeberg.org/api/v1/repos/acme/widgets/pulls/main/flotilla/fix-1"
        );
        assert_eq!(lookup.header("authorization"), Some("token {{secret:gitea-token}}"));
        assert_eq!(
            open_pull_request_response(
                200,
                br#"{"number": 2, "state": "open", "html_url": "https://codeberg.org/acme/widgets/pulls/2"}"#
            ),
            Ok(Some(PullRequest {
                url: "https://codeberg.org/acme/widgets/pulls/2".to_string(),
                number: 2
            }))
        );
        assert_eq!(
            open_pull_request_response(
                200,
                br#"{"number": 1, "state": "closed", "html_url": "https://codeberg.org/acme/widgets/pulls/1"}"#
            ),
            Ok(None)
        );
        assert_eq!(
            open_pull_request_response(404, br#"{"message": "The target couldn't be found."}"#),
            Ok(None)
        );
        assert!(matches!(
            open_pull_request_response(401, br#"{"message": "token is required"}"#),
            Err(Failure::Remote { status: 401, .. })
        ));
    }

    #[test]
    fn codeberg_and_configured_hosts_match() {
        let codeberg = match_url("git@codeberg.org:acme/widgets.git", &settings(None)).unwrap();
        assert_eq!(codeberg.web_url, "https://codeberg.org/acme/widgets");
        let settings = settings(Some("git.example.com"));
        let own = match_url("https://git.example.com/acme/widgets.git", &settings).unwrap();
        assert_eq!((own.owner.as_str(), own.name.as_str()), ("acme", "widgets"));
        for url in [
            "https://github.com/acme/widgets",
            "https://codeberg.org/acme",
            "https://codeberg.org/acme/widgets/pulls/1",
        ] {
            assert_eq!(match_url(url, &settings), None, "{url}");
        }
    }

    #[test]
    fn the_clone_spec_sends_the_token_as_a_basic_password() {
        let spec = clone_spec("https://codeberg.org/acme/widgets", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://codeberg.org/acme/widgets.git");
        assert_eq!(
            spec.auth_header.unwrap().1,
            "Basic {{basic:flotilla:secret:gitea-token}}"
        );
    }

    #[test]
    fn the_pull_request_request_follows_the_rest_api() {
        let request = pull_request_request(&input("https://codeberg.org/acme/widgets"), &settings(None)).unwrap();
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
            pull_request_response(201, created),
            Ok(PullRequest {
                url: "https://codeberg.org/acme/widgets/pulls/3".to_string(),
                number: 3
            })
        );
        let exists = br#"{"message":"pull request already exists for these targets [id: 3, issue_id: 4, head_repo_id: 1, base_repo_id: 1, head_branch: flotilla/fix-1, base_branch: main]","url":"https://codeberg.org/api/swagger"}"#;
        let Err(Failure::Remote { status, message }) = pull_request_response(409, exists) else {
            panic!("expected a remote error");
        };
        assert_eq!(status, 409);
        assert!(
            message.starts_with("pull request already exists for these targets"),
            "{message}"
        );
        let binding = br#"[{"fieldNames":["Head"],"classification":"RequiredError","message":"Required"}]"#;
        assert_eq!(
            pull_request_response(422, binding),
            Err(Failure::Remote {
                status: 422,
                message: "Head: Required".to_string()
            })
        );
        assert_eq!(
            pull_request_response(401, br#"{"message":"token is required","url":"x"}"#),
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
        let event = parse_webhook(&forgejo, push.to_string().as_bytes()).unwrap().unwrap();
        assert_eq!(event.branch.as_deref(), Some("flotilla/fix-1"));
        let gitea = vec![("X-Gitea-Event".to_string(), "pull_request".to_string())];
        let opened = json!({
            "action": "opened",
            "number": 3,
            "pull_request": {"number": 3, "head": {"ref": "flotilla/fix-1"}},
            "repository": {"html_url": "https://codeberg.org/acme/widgets"},
            "sender": {"login": "jdoe"}
        });
        let event = parse_webhook(&gitea, opened.to_string().as_bytes()).unwrap().unwrap();
        assert_eq!(
            (event.kind.as_str(), event.pull_request_number),
            ("pull-request", Some(3))
        );
        let release = vec![("X-Gitea-Event".to_string(), "release".to_string())];
        assert_eq!(parse_webhook(&release, b"{}"), Ok(None));
    }
}
