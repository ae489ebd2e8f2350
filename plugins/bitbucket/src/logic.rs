//! What the Bitbucket Cloud provider decides without talking to Bitbucket: which URLs are
//! Bitbucket repositories (`WORKSPACE/REPO_SLUG`), the clone URL and credentials, the "create a
//! pull request" request, and how to read Bitbucket's answers and webhook deliveries. Plain
//! functions, tested natively.

use flotilla_guest_support::{
    created_pull_request, encode_path_component, found_pull_request, header, json_string, json_u64, parse_json,
    query_string, remote_failure, render_message, webhook_json, CloneSpec, Failure, HttpRequest, PullRequest,
    PullRequestInput, RepoRef, Settings, TwoPartRepository as Repository, WebhookEvent,
};
use serde_json::{json, Value};

pub const NAME: &str = "bitbucket";
pub const DISPLAY_NAME: &str = "Bitbucket Cloud";
pub const DEFAULT_TOKEN_SECRET: &str = "bitbucket-token";
const PUBLIC_HOST: &str = "bitbucket.org";
const PUBLIC_API_BASE: &str = "https://api.bitbucket.org/2.0";
/// The user name Bitbucket expects with a repository, project or workspace access token.
const GIT_USER: &str = "x-token-auth";

pub fn url_patterns() -> Vec<String> {
    vec![
        "https://bitbucket.org/WORKSPACE/REPO".to_string(),
        "git@bitbucket.org:WORKSPACE/REPO.git".to_string(),
    ]
}

fn repository(url: &str, settings: &Settings) -> Option<Repository> {
    Repository::parse(url, &settings.claimed_hosts(&[PUBLIC_HOST]))
}

fn not_bitbucket(url: &str) -> Failure {
    Failure::InvalidInput(format!(
        "{url:?} is not a Bitbucket repository URL (https://bitbucket.org/WORKSPACE/REPO, or a host in the `hosts` setting)"
    ))
}

pub fn match_url(url: &str, settings: &Settings) -> Option<RepoRef> {
    repository(url, settings).map(Repository::repo_ref)
}

pub fn clone_spec(url: &str, settings: &Settings) -> Result<CloneSpec, Failure> {
    let repository = repository(url, settings).ok_or_else(|| not_bitbucket(url))?;
    Ok(CloneSpec {
        url: repository.clone_url(),
        auth_header: Some((
            "Authorization".to_string(),
            format!("Basic {}", settings.basic_placeholder(GIT_USER)?),
        )),
    })
}

/// `https://api.bitbucket.org/2.0` for bitbucket.org; another host (a loopback test forge)
/// serves the same paths under `{scheme}://{host}/2.0` unless `api-base` says otherwise.
fn api_base(repository: &Repository, settings: &Settings) -> String {
    if let Some(api_base) = &settings.api_base {
        return api_base.clone();
    }
    if repository.url.web_host() == PUBLIC_HOST {
        PUBLIC_API_BASE.to_string()
    } else {
        format!("{}/2.0", repository.url.web_origin())
    }
}

/// The repository's pull requests endpoint, `{api}/repositories/WORKSPACE/SLUG/pullrequests`.
fn pullrequests_url(input: &PullRequestInput, settings: &Settings) -> Result<String, Failure> {
    let repository = repository(&input.repository_url, settings).ok_or_else(|| not_bitbucket(&input.repository_url))?;
    Ok(format!(
        "{}/repositories/{}/{}/pullrequests",
        api_base(&repository, settings),
        encode_path_component(&repository.owner),
        encode_path_component(&repository.name)
    ))
}

fn api_headers(settings: &Settings) -> Result<Vec<(String, String)>, Failure> {
    Ok(vec![
        (
            "Authorization".to_string(),
            format!("Bearer {}", settings.token_placeholder()?),
        ),
        ("Accept".to_string(), "application/json".to_string()),
        ("User-Agent".to_string(), "flotilla".to_string()),
    ])
}

pub fn pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let url = pullrequests_url(input, settings)?;
    let headers = api_headers(settings)?;
    let body = json!({
        "title": input.title,
        "description": input.body,
        "source": {"branch": {"name": input.head_branch}},
        "destination": {"branch": {"name": input.base_branch}},
        "draft": input.draft,
    });
    Ok(HttpRequest::post_json(url, headers, &body))
}

pub fn pull_request_response(status: u16, body: &[u8]) -> Result<PullRequest, Failure> {
    if (200..300).contains(&status) {
        return created_pull_request(status, body, "/links/html/href", "/id");
    }
    Err(remote_failure(
        status,
        parse_json(body).and_then(|value| error_message(&value)),
        body,
    ))
}

/// Bitbucket answers a create whose source and destination already have an open pull request
/// with 400 (the status of its validation errors); the lookup decides whether one is open, so a
/// 400 for another reason costs one extra request and keeps its own message.
pub fn already_open(status: u16, _body: &[u8]) -> bool {
    status == 400 || status == 409
}

/// A BBQL string literal: `"..."` with `\` and `"` escaped.
fn bbql_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `GET .../pullrequests?q=source.branch.name="HEAD" AND destination.branch.name="BASE" AND
/// state="OPEN"` (Bitbucket's query language, BBQL).
pub fn open_pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let url = pullrequests_url(input, settings)?;
    let filter = format!(
        "source.branch.name = {} AND destination.branch.name = {} AND state = \"OPEN\"",
        bbql_string(&input.head_branch),
        bbql_string(&input.base_branch)
    );
    let query = query_string(&[("q", &filter)]);
    Ok(HttpRequest::get(format!("{url}{query}"), api_headers(settings)?))
}

/// A page of pull requests: `{"values": [...], "page": 1, ...}`.
pub fn open_pull_request_response(status: u16, body: &[u8]) -> Result<Option<PullRequest>, Failure> {
    found_pull_request(
        status,
        body,
        Some("/values"),
        ("/links/html/href", "/id"),
        error_message,
    )
}

/// Bitbucket's error body: `{"type": "error", "error": {"message": "...", "detail": "...",
/// "fields": {"source": ["..."]}}}`; every part present is kept.
fn error_message(value: &Value) -> Option<String> {
    let error = value.get("error")?;
    let mut parts: Vec<String> = Vec::new();
    if let Some(message) = error.get("message").map(render_message).filter(|text| !text.is_empty()) {
        parts.push(message);
    }
    if let Some(detail) = error.get("detail").map(render_message).filter(|text| !text.is_empty()) {
        parts.push(detail);
    }
    if let Some(fields) = error.get("fields").map(render_message).filter(|text| !text.is_empty()) {
        parts.push(fields);
    }
    (!parts.is_empty()).then(|| parts.join(": "))
}

/// `X-Event-Key: repo:push`, `pullrequest:*` and pull request comments become events;
/// everything else is ignored.
pub fn parse_webhook(headers: &[(String, String)], body: &[u8]) -> Result<Option<WebhookEvent>, Failure> {
    let Some(event) = header(headers, "X-Event-Key") else {
        return Ok(None);
    };
    let event = event.trim();
    let kind = if event == "repo:push" {
        "push"
    } else if event.starts_with("pullrequest:comment_") {
        "comment"
    } else if event.starts_with("pullrequest:") {
        "pull-request"
    } else {
        return Ok(None);
    };
    let payload = webhook_json("Bitbucket", body)?;
    let repository_url = json_string(&payload, "/repository/links/html/href")
        .ok_or_else(|| Failure::InvalidInput("Bitbucket webhook body has no repository.links.html.href".to_string()))?;
    let actor = json_string(&payload, "/actor/nickname")
        .or_else(|| json_string(&payload, "/actor/username"))
        .or_else(|| json_string(&payload, "/actor/display_name"));
    let event = if kind == "push" {
        // One delivery may describe several ref changes; the first branch one is reported.
        let branch = payload
            .pointer("/push/changes")
            .and_then(Value::as_array)
            .and_then(|changes| {
                changes.iter().find_map(|change| {
                    let new_or_old = change
                        .get("new")
                        .filter(|new| !new.is_null())
                        .or_else(|| change.get("old"))?;
                    (json_string(new_or_old, "/type").as_deref() == Some("branch"))
                        .then(|| json_string(new_or_old, "/name"))
                        .flatten()
                })
            });
        WebhookEvent {
            kind: kind.to_string(),
            repository_url,
            branch,
            pull_request_number: None,
            actor,
        }
    } else {
        WebhookEvent {
            kind: kind.to_string(),
            repository_url,
            branch: json_string(&payload, "/pullrequest/source/branch/name"),
            pull_request_number: json_u64(&payload, "/pullrequest/id"),
            actor,
        }
    };
    Ok(Some(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(api_base: Option<&str>) -> Settings {
        let api_base = api_base.map(str::to_string);
        Settings::read(
            move |key| match key {
                "api-base" => api_base.clone(),
                "hosts" => Some("127.0.0.1:7000".to_string()),
                _ => None,
            },
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
            draft: false,
        }
    }

    #[test]
    fn an_already_open_pull_request_is_looked_up_with_bbql() {
        assert!(already_open(
            400,
            br#"{"type": "error", "error": {"message": "already open"}}"#
        ));
        assert!(!already_open(401, b"{}"));
        let lookup = open_pull_request_request(&input("https://bitbucket.org/acme/widgets"), &settings(None)).unwrap();
        assert_eq!(lookup.method, "GET");
        assert_eq!(
            lookup.url,
            "https://api.bitbucket.org/2.0/repositories/acme/widgets/pullrequests?q=\
             source.branch.name%20%3D%20%22flotilla%2Ffix-1%22%20AND%20destination.branch.name%20%3D%20%22main%22\
             %20AND%20state%20%3D%20%22OPEN%22"
        );
        assert_eq!(
            lookup.header("authorization"),
            Some("Bearer {{secret:bitbucket-token}}")
        );
        assert_eq!(bbql_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(
            open_pull_request_response(
                200,
                br#"{"values": [{"id": 5, "links": {"html": {"href": "https://bitbucket.org/acme/widgets/pull-requests/5"}}}], "pagelen": 10, "size": 1, "page": 1}"#
            ),
            Ok(Some(PullRequest {
                url: "https://bitbucket.org/acme/widgets/pull-requests/5".to_string(),
                number: 5
            }))
        );
        assert_eq!(
            open_pull_request_response(200, br#"{"values": [], "pagelen": 10, "size": 0, "page": 1}"#),
            Ok(None)
        );
        assert!(matches!(
            open_pull_request_response(400, br#"{"type": "error", "error": {"message": "Invalid query"}}"#),
            Err(Failure::Remote { status: 400, ref message }) if message.contains("Invalid query")
        ));
    }

    #[test]
    fn bitbucket_urls_match_in_every_form() {
        let expected = RepoRef {
            host: "bitbucket.org".to_string(),
            owner: "acme".to_string(),
            name: "widgets".to_string(),
            web_url: "https://bitbucket.org/acme/widgets".to_string(),
        };
        for url in [
            "https://bitbucket.org/acme/widgets",
            "https://jdoe@bitbucket.org/acme/widgets.git",
            "git@bitbucket.org:acme/widgets.git",
        ] {
            assert_eq!(match_url(url, &settings(None)), Some(expected.clone()), "{url}");
        }
        for url in [
            "https://github.com/acme/widgets",
            "https://bitbucket.org/acme",
            "https://bitbucket.org/acme/widgets/pull-requests/1",
        ] {
            assert_eq!(match_url(url, &settings(None)), None, "{url}");
        }
    }

    #[test]
    fn the_clone_spec_uses_x_token_auth() {
        let spec = clone_spec("git@bitbucket.org:acme/widgets.git", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://bitbucket.org/acme/widgets.git");
        assert_eq!(
            spec.auth_header.unwrap().1,
            "Basic {{basic:x-token-auth:secret:bitbucket-token}}"
        );
    }

    #[test]
    fn the_pull_request_request_follows_the_rest_api() {
        let request = pull_request_request(&input("https://bitbucket.org/acme/widgets"), &settings(None)).unwrap();
        assert_eq!(
            request.url,
            "https://api.bitbucket.org/2.0/repositories/acme/widgets/pullrequests"
        );
        assert_eq!(
            request.header("authorization"),
            Some("Bearer {{secret:bitbucket-token}}")
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_slice(request.body.as_deref().unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "title": "Fix it",
                "description": "Body",
                "source": {"branch": {"name": "flotilla/fix-1"}},
                "destination": {"branch": {"name": "main"}},
                "draft": false
            })
        );
        let overridden = pull_request_request(
            &input("http://127.0.0.1:7000/acme/widgets"),
            &settings(Some("http://127.0.0.1:7000/2.0/")),
        )
        .unwrap();
        assert_eq!(
            overridden.url,
            "http://127.0.0.1:7000/2.0/repositories/acme/widgets/pullrequests"
        );
    }

    #[test]
    fn answers_become_pull_requests_or_errors_in_bitbuckets_words() {
        let created =
            br#"{"type":"pullrequest","id":5,"links":{"html":{"href":"https://bitbucket.org/acme/widgets/pull-requests/5"}}}"#;
        assert_eq!(
            pull_request_response(201, created),
            Ok(PullRequest {
                url: "https://bitbucket.org/acme/widgets/pull-requests/5".to_string(),
                number: 5
            })
        );
        let error =
            br#"{"type":"error","error":{"message":"Bad request","fields":{"source":["source branch not found"]}}}"#;
        assert_eq!(
            pull_request_response(400, error),
            Err(Failure::Remote {
                status: 400,
                message: "Bad request: source: source branch not found".to_string()
            })
        );
        let not_found = br#"{"type":"error","error":{"message":"Repository acme/nope not found"}}"#;
        assert_eq!(
            pull_request_response(404, not_found),
            Err(Failure::Remote {
                status: 404,
                message: "Repository acme/nope not found".to_string()
            })
        );
    }

    #[test]
    fn deliveries_become_events() {
        let headers = |key: &str| vec![("X-Event-Key".to_string(), key.to_string())];
        let push = json!({
            "actor": {"nickname": "jdoe", "display_name": "J Doe"},
            "repository": {"links": {"html": {"href": "https://bitbucket.org/acme/widgets"}}},
            "push": {"changes": [{"new": {"type": "branch", "name": "flotilla/fix-1"}, "old": null}]}
        });
        let event = parse_webhook(&headers("repo:push"), push.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(event.branch.as_deref(), Some("flotilla/fix-1"));
        assert_eq!(event.actor.as_deref(), Some("jdoe"));
        let created = json!({
            "actor": {"nickname": "jdoe"},
            "repository": {"links": {"html": {"href": "https://bitbucket.org/acme/widgets"}}},
            "pullrequest": {"id": 5, "source": {"branch": {"name": "flotilla/fix-1"}}}
        });
        let event = parse_webhook(&headers("pullrequest:created"), created.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            (event.kind.as_str(), event.pull_request_number),
            ("pull-request", Some(5))
        );
        let comment = parse_webhook(&headers("pullrequest:comment_created"), created.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(comment.kind, "comment");
        assert_eq!(parse_webhook(&headers("issue:created"), b"{}"), Ok(None));
    }
}
