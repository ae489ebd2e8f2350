//! What the GitLab provider decides without talking to GitLab: which URLs are GitLab
//! projects (with subgroups: `group/sub/project`), the clone URL and credentials, the "create a
//! merge request" request, and how to read GitLab's answers and webhook deliveries. Plain
//! functions, tested natively.

use flotilla_guest_support::{
    created_pull_request, encode_path_component, found_pull_request, header, is_plain_name, json_string, json_u64,
    parse_json, parse_remote_url, query_string, remote_failure, render_message, webhook_json, CloneSpec, Failure,
    HttpRequest, PullRequest, PullRequestInput, RemoteUrl, RepoRef, Settings, WebhookEvent,
};
use serde_json::{json, Value};

pub const NAME: &str = "gitlab";
pub const DISPLAY_NAME: &str = "GitLab";
pub const DEFAULT_TOKEN_SECRET: &str = "gitlab-token";
/// The public forge; self-managed instances come from the `hosts` setting.
const PUBLIC_HOST: &str = "gitlab.com";
/// GitLab takes any user name with a token over git's HTTP; `oauth2` is the documented one.
const GIT_USER: &str = "oauth2";
/// The title prefix that makes a merge request a draft (GitLab has no draft field on create).
const DRAFT_PREFIX: &str = "Draft: ";

pub fn url_patterns() -> Vec<String> {
    vec![
        "https://gitlab.com/GROUP[/SUBGROUP...]/PROJECT".to_string(),
        "git@gitlab.com:GROUP[/SUBGROUP...]/PROJECT.git".to_string(),
        "https://HOST/GROUP/PROJECT for each host in the `hosts` setting (self-managed GitLab)".to_string(),
    ]
}

/// A GitLab project: its URL and full path (`group/sub/project`).
struct Project {
    url: RemoteUrl,
    /// Every group on the path, joined with `/`.
    namespace: String,
    name: String,
}

impl Project {
    fn full_path(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn project(url: &str, settings: &Settings) -> Option<Project> {
    let parsed = parse_remote_url(url)?;
    if !parsed.host_is_one_of(&settings.claimed_hosts(&[PUBLIC_HOST])) {
        return None;
    }
    // A browser URL puts the project's pages after `/-/` (`/group/project/-/merge_requests/3`).
    let path: Vec<&String> = parsed.segments.iter().take_while(|segment| *segment != "-").collect();
    let (name, groups) = path.split_last()?;
    if groups.is_empty() || !path.iter().all(|segment| is_plain_name(segment)) {
        return None;
    }
    let namespace = groups.iter().map(|group| group.as_str()).collect::<Vec<_>>().join("/");
    let name = name.to_string();
    Some(Project {
        url: parsed,
        namespace,
        name,
    })
}

fn not_gitlab(url: &str) -> Failure {
    Failure::InvalidInput(format!(
        "{url:?} is not a GitLab project URL (https://gitlab.com/GROUP/PROJECT, or a host in the `hosts` setting)"
    ))
}

pub fn match_url(url: &str, settings: &Settings) -> Option<RepoRef> {
    let project = project(url, settings)?;
    Some(RepoRef {
        host: project.url.web_host(),
        web_url: format!("{}/{}", project.url.web_origin(), project.full_path()),
        owner: project.namespace,
        name: project.name,
    })
}

pub fn clone_spec(url: &str, settings: &Settings) -> Result<CloneSpec, Failure> {
    let project = project(url, settings).ok_or_else(|| not_gitlab(url))?;
    Ok(CloneSpec {
        url: format!("{}/{}.git", project.url.web_origin(), project.full_path()),
        auth_header: Some((
            "Authorization".to_string(),
            format!("Basic {}", settings.basic_placeholder(GIT_USER)?),
        )),
    })
}

/// `{scheme}://{host}/api/v4`, or the `api-base` setting.
fn api_base(project: &Project, settings: &Settings) -> String {
    match &settings.api_base {
        Some(api_base) => api_base.clone(),
        None => format!("{}/api/v4", project.url.web_origin()),
    }
}

/// The project's merge requests endpoint, `{api}/projects/URL-ENCODED-PATH/merge_requests`.
fn merge_requests_url(input: &PullRequestInput, settings: &Settings) -> Result<String, Failure> {
    let project = project(&input.repository_url, settings).ok_or_else(|| not_gitlab(&input.repository_url))?;
    Ok(format!(
        "{}/projects/{}/merge_requests",
        api_base(&project, settings),
        encode_path_component(&project.full_path())
    ))
}

fn api_headers(settings: &Settings) -> Result<Vec<(String, String)>, Failure> {
    Ok(vec![
        ("PRIVATE-TOKEN".to_string(), settings.token_placeholder()?),
        ("Accept".to_string(), "application/json".to_string()),
        ("User-Agent".to_string(), "flotilla".to_string()),
    ])
}

pub fn pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let url = merge_requests_url(input, settings)?;
    let headers = api_headers(settings)?;
    let title = if input.draft && !input.title.starts_with(DRAFT_PREFIX) {
        format!("{DRAFT_PREFIX}{}", input.title)
    } else {
        input.title.clone()
    };
    let body = json!({
        "source_branch": input.head_branch,
        "target_branch": input.base_branch,
        "title": title,
        "description": input.body,
    });
    Ok(HttpRequest::post_json(url, headers, &body))
}

pub fn pull_request_response(status: u16, body: &[u8]) -> Result<PullRequest, Failure> {
    if (200..300).contains(&status) {
        return created_pull_request(status, body, "/web_url", "/iid");
    }
    Err(remote_failure(
        status,
        parse_json(body).and_then(|value| error_message(&value)),
        body,
    ))
}

/// GitLab allows one open merge request per source branch and refuses another with 409
/// "Another open merge request already exists for this source branch: !IID".
pub fn already_open(status: u16, _body: &[u8]) -> bool {
    status == 409
}

/// `GET .../merge_requests?state=opened&source_branch=HEAD&target_branch=BASE`.
pub fn open_pull_request_request(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let url = merge_requests_url(input, settings)?;
    let query = query_string(&[
        ("state", "opened"),
        ("source_branch", &input.head_branch),
        ("target_branch", &input.base_branch),
    ]);
    Ok(HttpRequest::get(format!("{url}{query}"), api_headers(settings)?))
}

pub fn open_pull_request_response(status: u16, body: &[u8]) -> Result<Option<PullRequest>, Failure> {
    found_pull_request(status, body, Some(""), ("/web_url", "/iid"), error_message)
}

/// GitLab's error bodies: `{"message": "401 Unauthorized"}`, `{"message": ["Another open
/// merge request already exists for this source branch: !1"]}`, `{"message": {"title":
/// ["can't be blank"]}}`, or OAuth's `{"error": "invalid_token", "error_description": "..."}`.
fn error_message(value: &Value) -> Option<String> {
    if let Some(message) = value.get("message") {
        let rendered = render_message(message);
        if !rendered.is_empty() {
            return Some(rendered);
        }
    }
    let error = value
        .get("error")
        .map(render_message)
        .filter(|error| !error.is_empty())?;
    match json_string(value, "/error_description") {
        Some(description) => Some(format!("{error}: {description}")),
        None => Some(error),
    }
}

/// `X-Gitlab-Event: Push Hook`, `Merge Request Hook` and notes on merge requests become events;
/// everything else (tag pushes, issues, pipelines...) is ignored.
pub fn parse_webhook(headers: &[(String, String)], body: &[u8]) -> Result<Option<WebhookEvent>, Failure> {
    let Some(event) = header(headers, "X-Gitlab-Event") else {
        return Ok(None);
    };
    let kind = match event.trim() {
        "Push Hook" => "push",
        "Merge Request Hook" => "pull-request",
        "Note Hook" => "comment",
        _ => return Ok(None),
    };
    let payload = webhook_json("GitLab", body)?;
    let repository_url = json_string(&payload, "/project/web_url")
        .ok_or_else(|| Failure::InvalidInput("GitLab webhook body has no project.web_url".to_string()))?;
    let event = match kind {
        "push" => WebhookEvent {
            kind: kind.to_string(),
            repository_url,
            branch: json_string(&payload, "/ref").and_then(|git_ref| flotilla_guest_support::branch_of_ref(&git_ref)),
            pull_request_number: None,
            actor: json_string(&payload, "/user_username"),
        },
        "pull-request" => WebhookEvent {
            kind: kind.to_string(),
            repository_url,
            branch: json_string(&payload, "/object_attributes/source_branch"),
            pull_request_number: json_u64(&payload, "/object_attributes/iid"),
            actor: json_string(&payload, "/user/username"),
        },
        _ => {
            // Notes on issues, commits and snippets are not about a merge request.
            if payload.get("merge_request").is_none() {
                return Ok(None);
            }
            WebhookEvent {
                kind: kind.to_string(),
                repository_url,
                branch: json_string(&payload, "/merge_request/source_branch"),
                pull_request_number: json_u64(&payload, "/merge_request/iid"),
                actor: json_string(&payload, "/user/username"),
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

    fn input(url: &str, draft: bool) -> PullRequestInput {
        PullRequestInput {
            repository_url: url.to_string(),
            head_branch: "flotilla/fix-1".to_string(),
            base_branch: "main".to_string(),
            title: "Fix it".to_string(),
            body: "Body".to_string(),
            draft,
        }
    }

    #[test]
    fn an_already_open_merge_request_is_looked_up_by_source_and_target() {
        assert!(already_open(
            409,
            br#"{"message": ["Another open merge request already exists for this source branch: !4"]}"#
        ));
        assert!(!already_open(400, br#"{"error": "title is missing"}"#));
        let lookup = open_pull_request_request(
            &input("https://gitlab.com/acme/platform/widgets", false),
            &settings(None),
        )
        .unwrap();
        assert_eq!(lookup.method, "GET");
        assert_eq!(
            lookup.url,
            "https://gitlab.com/api/v4/projects/acme%2Fplatform%2Fwidgets/merge_requests\
             ?state=opened&source_branch=flotilla%2Ffix-1&target_branch=main"
        );
        assert_eq!(lookup.header("private-token"), Some("{{secret:gitlab-token}}"));
        assert_eq!(lookup.body, None);
        assert_eq!(
            open_pull_request_response(
                200,
                br#"[{"iid": 4, "web_url": "https://gitlab.com/acme/platform/widgets/-/merge_requests/4"}]"#
            ),
            Ok(Some(PullRequest {
                url: "https://gitlab.com/acme/platform/widgets/-/merge_requests/4".to_string(),
                number: 4
            }))
        );
        assert_eq!(open_pull_request_response(200, b"[]"), Ok(None));
        assert!(matches!(
            open_pull_request_response(404, br#"{"message": "404 Project Not Found"}"#),
            Err(Failure::Remote { status: 404, .. })
        ));
    }

    #[test]
    fn projects_with_subgroups_match_in_every_form() {
        let expected = RepoRef {
            host: "gitlab.com".to_string(),
            owner: "acme/platform".to_string(),
            name: "widgets".to_string(),
            web_url: "https://gitlab.com/acme/platform/widgets".to_string(),
        };
        for url in [
            "https://gitlab.com/acme/platform/widgets",
            "https://gitlab.com/acme/platform/widgets.git",
            "https://oauth2@gitlab.com/acme/platform/widgets.git",
            "https://gitlab.com/acme/platform/widgets/-/merge_requests/3",
            "git@gitlab.com:acme/platform/widgets.git",
            "ssh://git@gitlab.com/acme/platform/widgets.git",
        ] {
            assert_eq!(match_url(url, &settings(None)), Some(expected.clone()), "{url}");
        }
        let top_level = match_url("https://gitlab.com/acme/widgets", &settings(None)).unwrap();
        assert_eq!((top_level.owner.as_str(), top_level.name.as_str()), ("acme", "widgets"));
    }

    #[test]
    fn other_hosts_and_paths_are_refused() {
        for url in [
            "https://github.com/acme/widgets",
            "https://gitlab.com/acme",
            "https://gitlab.com/-/profile",
            "https://gitlab.example.com/acme/widgets",
            "file:///srv/acme/widgets.git",
        ] {
            assert_eq!(match_url(url, &settings(None)), None, "{url}");
        }
    }

    #[test]
    fn self_managed_hosts_use_their_own_api() {
        let settings = settings(Some("gitlab.example.com,127.0.0.1:9000"));
        let request =
            pull_request_request(&input("https://gitlab.example.com/acme/widgets", false), &settings).unwrap();
        assert_eq!(
            request.url,
            "https://gitlab.example.com/api/v4/projects/acme%2Fwidgets/merge_requests"
        );
        let loopback = pull_request_request(&input("http://127.0.0.1:9000/a/b/c.git", false), &settings).unwrap();
        assert_eq!(
            loopback.url,
            "http://127.0.0.1:9000/api/v4/projects/a%2Fb%2Fc/merge_requests"
        );
    }

    #[test]
    fn the_clone_spec_uses_oauth2_basic_auth() {
        let spec = clone_spec("git@gitlab.com:acme/platform/widgets.git", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://gitlab.com/acme/platform/widgets.git");
        assert_eq!(
            spec.auth_header.unwrap().1,
            "Basic {{basic:oauth2:secret:gitlab-token}}"
        );
    }

    #[test]
    fn the_merge_request_request_follows_the_rest_api() {
        let request = pull_request_request(
            &input("https://gitlab.com/acme/platform/widgets", true),
            &settings(None),
        )
        .unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(
            request.url,
            "https://gitlab.com/api/v4/projects/acme%2Fplatform%2Fwidgets/merge_requests"
        );
        assert_eq!(request.header("private-token"), Some("{{secret:gitlab-token}}"));
        assert_eq!(request.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_slice(request.body.as_deref().unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"source_branch": "flotilla/fix-1", "target_branch": "main", "title": "Draft: Fix it", "description": "Body"})
        );
    }

    #[test]
    fn answers_become_merge_requests_or_readable_errors() {
        let created = br#"{"id": 99, "iid": 7, "web_url": "https://gitlab.com/acme/widgets/-/merge_requests/7"}"#;
        assert_eq!(
            pull_request_response(201, created),
            Ok(PullRequest {
                url: "https://gitlab.com/acme/widgets/-/merge_requests/7".to_string(),
                number: 7
            })
        );
        let cases: [(u16, &[u8], &str); 5] = [
            (
                409,
                br#"{"message":["Another open merge request already exists for this source branch: !7"]}"#,
                "Another open merge request already exists for this source branch: !7",
            ),
            (401, br#"{"message":"401 Unauthorized"}"#, "401 Unauthorized"),
            (404, br#"{"message":"404 Project Not Found"}"#, "404 Project Not Found"),
            (
                400,
                br#"{"message":{"source_branch":["is invalid"]}}"#,
                "source_branch: is invalid",
            ),
            (
                401,
                br#"{"error":"invalid_token","error_description":"Token was revoked."}"#,
                "invalid_token: Token was revoked.",
            ),
        ];
        for (status, body, message) in cases {
            assert_eq!(
                pull_request_response(status, body),
                Err(Failure::Remote {
                    status,
                    message: message.to_string()
                })
            );
        }
    }

    fn headers(event: &str) -> Vec<(String, String)> {
        vec![("X-Gitlab-Event".to_string(), event.to_string())]
    }

    #[test]
    fn deliveries_become_events() {
        let push = json!({
            "object_kind": "push",
            "ref": "refs/heads/flotilla/fix-1",
            "user_username": "jsmith",
            "project": {"web_url": "https://gitlab.com/acme/widgets"}
        });
        let event = parse_webhook(&headers("Push Hook"), push.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            event,
            WebhookEvent {
                kind: "push".to_string(),
                repository_url: "https://gitlab.com/acme/widgets".to_string(),
                branch: Some("flotilla/fix-1".to_string()),
                pull_request_number: None,
                actor: Some("jsmith".to_string()),
            }
        );
        let merge_request = json!({
            "object_kind": "merge_request",
            "user": {"username": "jsmith"},
            "project": {"web_url": "https://gitlab.com/acme/widgets"},
            "object_attributes": {"iid": 7, "source_branch": "flotilla/fix-1", "action": "open"}
        });
        let event = parse_webhook(&headers("Merge Request Hook"), merge_request.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            (event.kind.as_str(), event.pull_request_number),
            ("pull-request", Some(7))
        );
        let issue_note = json!({"project": {"web_url": "https://gitlab.com/a/b"}, "issue": {"iid": 1}});
        assert_eq!(
            parse_webhook(&headers("Note Hook"), issue_note.to_string().as_bytes()),
            Ok(None)
        );
        assert_eq!(parse_webhook(&headers("Pipeline Hook"), b"{}"), Ok(None));
    }
}
