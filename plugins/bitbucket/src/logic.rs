//! Bitbucket Cloud as a [`Forge`]: which URLs are Bitbucket repositories
//! (`WORKSPACE/REPO_SLUG`), the REST API's paths, headers and bodies, how Bitbucket may say a
//! pull request is already open and how to look that one up (with BBQL), and how to read its
//! answers and webhook deliveries. The rest of the provider is the shared skeleton.

use flotilla_guest_support::{
    encode_path_component, json_string, json_u64, query_string, rendered_field, Forge, ForgeRepository, LookupAnswer,
    PullRequestFields, PullRequestInput, Settings, WebhookDetails, WebhookKind,
};
use serde_json::{json, Value};

/// bitbucket.org.
pub struct Bitbucket;

const PUBLIC_API_BASE: &str = "https://api.bitbucket.org/2.0";
/// The user name Bitbucket expects with a repository, project or workspace access token.
const GIT_USER: &str = "x-token-auth";

impl Forge for Bitbucket {
    const NAME: &'static str = "bitbucket";
    const DISPLAY_NAME: &'static str = "Bitbucket Cloud";
    const FORGE_NAME: &'static str = "Bitbucket";
    const REPOSITORY_NOUN: &'static str = "Bitbucket repository";
    const EXAMPLE_URL: &'static str = "https://bitbucket.org/WORKSPACE/REPO";
    const DEFAULT_TOKEN_SECRET: &'static str = "bitbucket-token";
    const PUBLIC_HOST: &'static str = "bitbucket.org";

    fn url_patterns() -> Vec<String> {
        vec![
            "https://bitbucket.org/WORKSPACE/REPO".to_string(),
            "git@bitbucket.org:WORKSPACE/REPO.git".to_string(),
        ]
    }

    fn git_user(_settings: &Settings) -> &str {
        GIT_USER
    }

    /// `https://api.bitbucket.org/2.0` for bitbucket.org; another host (a loopback test forge)
    /// serves the same paths under `{scheme}://{host}/2.0`.
    fn default_api_base(repository: &ForgeRepository) -> String {
        if repository.url.web_host() == Self::PUBLIC_HOST {
            PUBLIC_API_BASE.to_string()
        } else {
            format!("{}/2.0", repository.url.web_origin())
        }
    }

    /// `/repositories/WORKSPACE/SLUG/pullrequests`.
    fn pull_requests_path(repository: &ForgeRepository) -> String {
        format!(
            "/repositories/{}/{}/pullrequests",
            encode_path_component(&repository.owner),
            encode_path_component(&repository.name)
        )
    }

    fn token_header(token_placeholder: String) -> (String, String) {
        ("Authorization".to_string(), format!("Bearer {token_placeholder}"))
    }

    fn create_pull_request_body(input: &PullRequestInput) -> Value {
        json!({
            "title": input.title,
            "description": input.body,
            "source": {"branch": {"name": input.head_branch}},
            "destination": {"branch": {"name": input.base_branch}},
            "draft": input.draft,
        })
    }

    const PULL_REQUEST_FIELDS: PullRequestFields = PullRequestFields {
        url_pointer: "/links/html/href",
        number_pointer: "/id",
    };

    /// Bitbucket's error body: `{"type": "error", "error": {"message": "...", "detail": "...",
    /// "fields": {"source": ["..."]}}}`; every part present is kept.
    fn error_message(answer: &Value) -> Option<String> {
        let error = answer.get("error")?;
        let parts: Vec<String> = ["message", "detail", "fields"]
            .into_iter()
            .filter_map(|key| rendered_field(error, key))
            .collect();
        (!parts.is_empty()).then(|| parts.join(": "))
    }

    /// Bitbucket answers a create whose source and destination already have an open pull
    /// request with 400 (the status of its validation errors); the lookup decides whether one
    /// is open, so a 400 for another reason costs one extra request and keeps its own message.
    fn may_be_already_open(status: u16, _body: &[u8]) -> bool {
        status == 400 || status == 409
    }

    /// `GET .../pullrequests?q=source.branch.name="HEAD" AND destination.branch.name="BASE" AND
    /// state="OPEN"` (Bitbucket's query language, BBQL).
    fn open_pull_request_lookup_url(
        pull_requests_url: &str,
        _repository: &ForgeRepository,
        input: &PullRequestInput,
    ) -> String {
        let filter = format!(
            "source.branch.name = {} AND destination.branch.name = {} AND state = \"OPEN\"",
            bbql_string(&input.head_branch),
            bbql_string(&input.base_branch)
        );
        format!("{pull_requests_url}{}", query_string(&[("q", &filter)]))
    }

    /// A page of pull requests: `{"values": [...], "page": 1, ...}`.
    const LOOKUP_ANSWER: LookupAnswer = LookupAnswer::List { pointer: "/values" };

    const WEBHOOK_EVENT_HEADERS: &'static [&'static str] = &["X-Event-Key"];

    /// `repo:push`, `pullrequest:*` and pull request comments; everything else is ignored.
    fn webhook_kind(event: &str) -> Option<WebhookKind> {
        if event == "repo:push" {
            Some(WebhookKind::Push)
        } else if event.starts_with("pullrequest:comment_") {
            Some(WebhookKind::Comment)
        } else if event.starts_with("pullrequest:") {
            Some(WebhookKind::PullRequest)
        } else {
            None
        }
    }

    const WEBHOOK_REPOSITORY_URL_POINTER: &'static str = "/repository/links/html/href";

    fn webhook_details(kind: WebhookKind, payload: &Value) -> Option<WebhookDetails> {
        let actor = json_string(payload, "/actor/nickname")
            .or_else(|| json_string(payload, "/actor/username"))
            .or_else(|| json_string(payload, "/actor/display_name"));
        Some(match kind {
            WebhookKind::Push => WebhookDetails {
                branch: pushed_branch(payload),
                pull_request_number: None,
                actor,
            },
            WebhookKind::PullRequest | WebhookKind::Comment => WebhookDetails {
                branch: json_string(payload, "/pullrequest/source/branch/name"),
                pull_request_number: json_u64(payload, "/pullrequest/id"),
                actor,
            },
        })
    }
}

/// A BBQL string literal: `"..."` with `\` and `"` escaped.
fn bbql_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The branch a push delivery names: one delivery may describe several ref changes, and the
/// first branch one is reported.
fn pushed_branch(payload: &Value) -> Option<String> {
    let changes = payload.pointer("/push/changes")?.as_array()?;
    changes.iter().find_map(|change| {
        let new_or_old = change
            .get("new")
            .filter(|new| !new.is_null())
            .or_else(|| change.get("old"))?;
        (json_string(new_or_old, "/type").as_deref() == Some("branch"))
            .then(|| json_string(new_or_old, "/name"))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_guest_support::forge;
    use flotilla_guest_support::{Failure, PullRequest, RepoRef};

    fn settings(api_base: Option<&str>) -> Settings {
        let api_base = api_base.map(str::to_string);
        Settings::read(
            move |key| match key {
                "api-base" => api_base.clone(),
                "hosts" => Some("127.0.0.1:7000".to_string()),
                _ => None,
            },
            Bitbucket::DEFAULT_TOKEN_SECRET,
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
        assert!(Bitbucket::may_be_already_open(
            400,
            br#"{"type": "error", "error": {"message": "already open"}}"#
        ));
        assert!(!Bitbucket::may_be_already_open(401, b"{}"));
        let lookup = forge::open_pull_request_request::<Bitbucket>(
            &input("https://bitbucket.org/acme/widgets"),
            &settings(None),
        )
        .unwrap();
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
            forge::open_pull_request_response::<Bitbucket>(
                200,
                br#"{"values": [{"id": 5, "links": {"html": {"href": "https://bitbucket.org/acme/widgets/pull-requests/5"}}}], "pagelen": 10, "size": 1, "page": 1}"#
            ),
            Ok(Some(PullRequest {
                url: "https://bitbucket.org/acme/widgets/pull-requests/5".to_string(),
                number: 5
            }))
        );
        assert_eq!(
            forge::open_pull_request_response::<Bitbucket>(
                200,
                br#"{"values": [], "pagelen": 10, "size": 0, "page": 1}"#
            ),
            Ok(None)
        );
        assert!(matches!(
            forge::open_pull_request_response::<Bitbucket>(400, br#"{"type": "error", "error": {"message": "Invalid query"}}"#),
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
            assert_eq!(
                forge::match_url::<Bitbucket>(url, &settings(None)),
                Some(expected.clone()),
                "{url}"
            );
        }
        for url in [
            "https://github.com/acme/widgets",
            "https://bitbucket.org/acme",
            "https://bitbucket.org/acme/widgets/pull-requests/1",
        ] {
            assert_eq!(forge::match_url::<Bitbucket>(url, &settings(None)), None, "{url}");
        }
    }

    #[test]
    fn the_clone_spec_uses_x_token_auth() {
        let spec = forge::clone_spec::<Bitbucket>("git@bitbucket.org:acme/widgets.git", &settings(None)).unwrap();
        assert_eq!(spec.url, "https://bitbucket.org/acme/widgets.git");
        assert_eq!(
            spec.auth_header.unwrap().1,
            "Basic {{basic:x-token-auth:secret:bitbucket-token}}"
        );
    }

    #[test]
    fn the_pull_request_request_follows_the_rest_api() {
        let request =
            forge::pull_request_request::<Bitbucket>(&input("https://bitbucket.org/acme/widgets"), &settings(None))
                .unwrap();
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
        let overridden = forge::pull_request_request::<Bitbucket>(
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
            forge::pull_request_response::<Bitbucket>(201, created),
            Ok(PullRequest {
                url: "https://bitbucket.org/acme/widgets/pull-requests/5".to_string(),
                number: 5
            })
        );
        let error =
            br#"{"type":"error","error":{"message":"Bad request","fields":{"source":["source branch not found"]}}}"#;
        assert_eq!(
            forge::pull_request_response::<Bitbucket>(400, error),
            Err(Failure::Remote {
                status: 400,
                message: "Bad request: source: source branch not found".to_string()
            })
        );
        let not_found = br#"{"type":"error","error":{"message":"Repository acme/nope not found"}}"#;
        assert_eq!(
            forge::pull_request_response::<Bitbucket>(404, not_found),
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
        let event = forge::parse_webhook::<Bitbucket>(&headers("repo:push"), push.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(event.branch.as_deref(), Some("flotilla/fix-1"));
        assert_eq!(event.actor.as_deref(), Some("jdoe"));
        let created = json!({
            "actor": {"nickname": "jdoe"},
            "repository": {"links": {"html": {"href": "https://bitbucket.org/acme/widgets"}}},
            "pullrequest": {"id": 5, "source": {"branch": {"name": "flotilla/fix-1"}}}
        });
        let event = forge::parse_webhook::<Bitbucket>(&headers("pullrequest:created"), created.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            (event.kind.as_str(), event.pull_request_number),
            ("pull-request", Some(5))
        );
        let comment =
            forge::parse_webhook::<Bitbucket>(&headers("pullrequest:comment_created"), created.to_string().as_bytes())
                .unwrap()
                .unwrap();
        assert_eq!(comment.kind, "comment");
        assert_eq!(
            forge::parse_webhook::<Bitbucket>(&headers("issue:created"), b"{}"),
            Ok(None)
        );
    }
}
