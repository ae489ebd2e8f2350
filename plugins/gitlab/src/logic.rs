//! GitLab as a [`Forge`]: which URLs are GitLab projects (with subgroups: `group/sub/project`),
//! the REST API's merge request paths, headers and bodies, how GitLab says a merge request is
//! already open and how to look that one up, and how to read its answers and webhook
//! deliveries. The rest of the provider is the shared skeleton.

use flotilla_guest_support::{
    branch_of_ref, encode_path_component, is_plain_name, json_string, json_u64, query_string, rendered_field, Forge,
    ForgeRepository, LookupAnswer, PullRequestFields, PullRequestInput, Settings, WebhookDetails, WebhookKind,
};
use serde_json::{json, Value};

/// gitlab.com and self-managed GitLab.
pub struct GitLab;

/// GitLab takes any user name with a token over git's HTTP; `oauth2` is the documented one.
const GIT_USER: &str = "oauth2";
/// The title prefix that makes a merge request a draft (GitLab has no draft field on create).
const DRAFT_PREFIX: &str = "Draft: ";

impl Forge for GitLab {
    const NAME: &'static str = "gitlab";
    const DISPLAY_NAME: &'static str = "GitLab";
    const FORGE_NAME: &'static str = "GitLab";
    const REPOSITORY_NOUN: &'static str = "GitLab project";
    const EXAMPLE_URL: &'static str = "https://gitlab.com/GROUP/PROJECT";
    const DEFAULT_TOKEN_SECRET: &'static str = "gitlab-token";
    /// Self-managed instances come from the `hosts` setting.
    const PUBLIC_HOST: &'static str = "gitlab.com";

    fn url_patterns() -> Vec<String> {
        vec![
            "https://gitlab.com/GROUP[/SUBGROUP...]/PROJECT".to_string(),
            "git@gitlab.com:GROUP[/SUBGROUP...]/PROJECT.git".to_string(),
            "https://HOST/GROUP/PROJECT for each host in the `hosts` setting (self-managed GitLab)".to_string(),
        ]
    }

    /// Every group on the path, joined with `/`, owns the project; a browser URL puts the
    /// project's pages after `/-/` (`/group/project/-/merge_requests/3`).
    fn owner_and_name(segments: &[String]) -> Option<(String, String)> {
        let path: Vec<&String> = segments.iter().take_while(|segment| *segment != "-").collect();
        let (name, groups) = path.split_last()?;
        if groups.is_empty() || !path.iter().all(|segment| is_plain_name(segment)) {
            return None;
        }
        let namespace = groups.iter().map(|group| group.as_str()).collect::<Vec<_>>().join("/");
        Some((namespace, name.to_string()))
    }

    fn git_user(_settings: &Settings) -> &str {
        GIT_USER
    }

    /// `{scheme}://{host}/api/v4`.
    fn default_api_base(repository: &ForgeRepository) -> String {
        format!("{}/api/v4", repository.url.web_origin())
    }

    /// `/projects/URL-ENCODED-PATH/merge_requests`.
    fn pull_requests_path(repository: &ForgeRepository) -> String {
        format!(
            "/projects/{}/merge_requests",
            encode_path_component(&repository.full_path())
        )
    }

    fn token_header(token_placeholder: String) -> (String, String) {
        ("PRIVATE-TOKEN".to_string(), token_placeholder)
    }

    fn create_pull_request_body(input: &PullRequestInput) -> Value {
        json!({
            "source_branch": input.head_branch,
            "target_branch": input.base_branch,
            "title": input.title_marking_draft(DRAFT_PREFIX),
            "description": input.body,
        })
    }

    const PULL_REQUEST_FIELDS: PullRequestFields = PullRequestFields {
        url_pointer: "/web_url",
        number_pointer: "/iid",
    };

    /// GitLab's error bodies: `{"message": "401 Unauthorized"}`, `{"message": ["Another open
    /// merge request already exists for this source branch: !1"]}`, `{"message": {"title":
    /// ["can't be blank"]}}`, or OAuth's `{"error": "invalid_token", "error_description": "..."}`.
    fn error_message(answer: &Value) -> Option<String> {
        if let Some(message) = rendered_field(answer, "message") {
            return Some(message);
        }
        let error = rendered_field(answer, "error")?;
        match json_string(answer, "/error_description") {
            Some(description) => Some(format!("{error}: {description}")),
            None => Some(error),
        }
    }

    /// GitLab allows one open merge request per source branch and refuses another with 409
    /// "Another open merge request already exists for this source branch: !IID".
    fn may_be_already_open(status: u16, _body: &[u8]) -> bool {
        status == 409
    }

    /// `GET .../merge_requests?state=opened&source_branch=HEAD&target_branch=BASE`.
    fn open_pull_request_lookup_url(
        pull_requests_url: &str,
        _repository: &ForgeRepository,
        input: &PullRequestInput,
    ) -> String {
        let query = query_string(&[
            ("state", "opened"),
            ("source_branch", &input.head_branch),
            ("target_branch", &input.base_branch),
        ]);
        format!("{pull_requests_url}{query}")
    }

    const LOOKUP_ANSWER: LookupAnswer = LookupAnswer::List { pointer: "" };

    const WEBHOOK_EVENT_HEADERS: &'static [&'static str] = &["X-Gitlab-Event"];

    /// Pushes, merge requests and notes; everything else (tag pushes, issues, pipelines...) is
    /// ignored.
    fn webhook_kind(event: &str) -> Option<WebhookKind> {
        match event {
            "Push Hook" => Some(WebhookKind::Push),
            "Merge Request Hook" => Some(WebhookKind::PullRequest),
            "Note Hook" => Some(WebhookKind::Comment),
            _ => None,
        }
    }

    const WEBHOOK_REPOSITORY_URL_POINTER: &'static str = "/project/web_url";

    fn webhook_details(kind: WebhookKind, payload: &Value) -> Option<WebhookDetails> {
        let details = match kind {
            WebhookKind::Push => WebhookDetails {
                branch: json_string(payload, "/ref").and_then(|git_ref| branch_of_ref(&git_ref)),
                pull_request_number: None,
                actor: json_string(payload, "/user_username"),
            },
            WebhookKind::PullRequest => WebhookDetails {
                branch: json_string(payload, "/object_attributes/source_branch"),
                pull_request_number: json_u64(payload, "/object_attributes/iid"),
                actor: json_string(payload, "/user/username"),
            },
            WebhookKind::Comment => {
                // Notes on issues, commits and snippets are not about a merge request.
                payload.get("merge_request")?;
                WebhookDetails {
                    branch: json_string(payload, "/merge_request/source_branch"),
                    pull_request_number: json_u64(payload, "/merge_request/iid"),
                    actor: json_string(payload, "/user/username"),
                }
            }
        };
        Some(details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_guest_support::forge;
    use flotilla_guest_support::{Failure, PullRequest, RepoRef, WebhookEvent};

    fn settings(hosts: Option<&str>) -> Settings {
        let hosts = hosts.map(str::to_string);
        Settings::read(
            move |key| if key == "hosts" { hosts.clone() } else { None },
            GitLab::DEFAULT_TOKEN_SECRET,
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
        assert!(GitLab::may_be_already_open(
            409,
            br#"{"message": ["Another open merge request already exists for this source branch: !4"]}"#
        ));
        assert!(!GitLab::may_be_already_open(400, br#"{"error": "title is missing"}"#));
        let lookup = forge::open_pull_request_request::<GitLab>(
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
            forge::open_pull_request_response::<GitLab>(
                200,
                br#"[{"iid": 4, "web_url": "https://gitlab.com/acme/platform/widgets/-/merge_requests/4"}]"#
            ),
            Ok(Some(PullRequest {
                url: "https://gitlab.com/acme/platform/widgets/-/merge_requests/4".to_string(),
                number: 4
            }))
        );
        assert_eq!(forge::open_pull_request_response::<GitLab>(200, b"[]"), Ok(None));
        assert!(matches!(
            forge::open_pull_request_response::<GitLab>(404, br#"{"message": "404 Project Not Found"}"#),
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
            assert_eq!(
                forge::match_url::<GitLab>(url, &settings(None)),
                Some(expected.clone()),
                "{url}"
            );
        }
        let top_level = forge::match_url::<GitLab>("https://gitlab.com/acme/widgets", &settings(None)).unwrap();
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
            assert_eq!(forge::match_url::<GitLab>(url, &settings(None)), None, "{url}");
        }
    }

    #[test]
    fn self_managed_hosts_use_their_own_api() {
        let settings = settings(Some("gitlab.example.com,127.0.0.1:9000"));
        let request =
            forge::pull_request_request::<GitLab>(&input("https://gitlab.example.com/acme/widgets", false), &settings)
                .unwrap();
        assert_eq!(
            request.url,
            "https://gitlab.example.com/api/v4/projects/acme%2Fwidgets/merge_requests"
        );
        let loopback =
            forge::pull_request_request::<GitLab>(&input("http://127.0.0.1:9000/a/b/c.git", false), &settings).unwrap();
        assert_eq!(
            loopback.url,
            "http://127.0.0.1:9000/api/v4/projects/a%2Fb%2Fc/merge_requests"
        );
    }

    #[test]
    fn the_clone_spec_uses_oauth2_basic_auth() {
        let spec = forge::clone_spec::<GitLab>("git@gitlab.com:acme/platform/widgets.git", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://gitlab.com/acme/platform/widgets.git");
        assert_eq!(
            spec.auth_header.unwrap().1,
            "Basic {{basic:oauth2:secret:gitlab-token}}"
        );
    }

    #[test]
    fn the_merge_request_request_follows_the_rest_api() {
        let request = forge::pull_request_request::<GitLab>(
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
            forge::pull_request_response::<GitLab>(201, created),
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
                forge::pull_request_response::<GitLab>(status, body),
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
        let event = forge::parse_webhook::<GitLab>(&headers("Push Hook"), push.to_string().as_bytes())
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
        let event =
            forge::parse_webhook::<GitLab>(&headers("Merge Request Hook"), merge_request.to_string().as_bytes())
                .unwrap()
                .unwrap();
        assert_eq!(
            (event.kind.as_str(), event.pull_request_number),
            ("pull-request", Some(7))
        );
        let issue_note = json!({"project": {"web_url": "https://gitlab.com/a/b"}, "issue": {"iid": 1}});
        assert_eq!(
            forge::parse_webhook::<GitLab>(&headers("Note Hook"), issue_note.to_string().as_bytes()),
            Ok(None)
        );
        assert_eq!(
            forge::parse_webhook::<GitLab>(&headers("Pipeline Hook"), b"{}"),
            Ok(None)
        );
    }
}
