//! The skeleton, run against a small made-up forge whose API answers come from a closure.

use serde_json::json;

use super::*;
use crate::http::query_string;
use crate::json::json_u64;

/// A forge at `forge.example` with a GitHub-like API, a 409 for a second open pull request and
/// a list lookup.
struct ExampleForge;

impl Forge for ExampleForge {
    const NAME: &'static str = "example";
    const DISPLAY_NAME: &'static str = "Example";
    const FORGE_NAME: &'static str = "Example";
    const REPOSITORY_NOUN: &'static str = "Example repository";
    const EXAMPLE_URL: &'static str = "https://forge.example/OWNER/REPO";
    const DEFAULT_TOKEN_SECRET: &'static str = "example-token";
    const PUBLIC_HOST: &'static str = "forge.example";

    fn url_patterns() -> Vec<String> {
        vec![Self::EXAMPLE_URL.to_string()]
    }

    fn git_user(_settings: &Settings) -> &str {
        "git"
    }

    fn default_api_base(repository: &ForgeRepository) -> String {
        format!("{}/api", repository.url.web_origin())
    }

    fn pull_requests_path(repository: &ForgeRepository) -> String {
        format!("/repos/{}/pulls", repository.full_path())
    }

    fn token_header(token_placeholder: String) -> (String, String) {
        ("Authorization".to_string(), format!("Bearer {token_placeholder}"))
    }

    fn extra_api_headers() -> Vec<(String, String)> {
        vec![("X-Api-Version".to_string(), "1".to_string())]
    }

    fn create_pull_request_body(input: &PullRequestInput) -> Value {
        json!({"head": input.head_branch, "base": input.base_branch})
    }

    const PULL_REQUEST_FIELDS: PullRequestFields = PullRequestFields {
        url_pointer: "/html_url",
        number_pointer: "/number",
    };

    fn error_message(answer: &Value) -> Option<String> {
        json_string(answer, "/message")
    }

    fn may_be_already_open(status: u16, _body: &[u8]) -> bool {
        status == 409
    }

    fn open_pull_request_lookup_url(
        pull_requests_url: &str,
        _repository: &ForgeRepository,
        input: &PullRequestInput,
    ) -> String {
        format!("{pull_requests_url}{}", query_string(&[("head", &input.head_branch)]))
    }

    const LOOKUP_ANSWER: LookupAnswer = LookupAnswer::List { pointer: "" };

    const WEBHOOK_EVENT_HEADERS: &'static [&'static str] = &["X-Example-Event", "X-Other-Event"];

    fn webhook_kind(event: &str) -> Option<WebhookKind> {
        match event {
            "push" => Some(WebhookKind::Push),
            "comment" => Some(WebhookKind::Comment),
            _ => None,
        }
    }

    const WEBHOOK_REPOSITORY_URL_POINTER: &'static str = "/repository/html_url";

    fn webhook_details(kind: WebhookKind, payload: &Value) -> Option<WebhookDetails> {
        match kind {
            WebhookKind::Comment => json_u64(payload, "/number").map(|number| WebhookDetails {
                pull_request_number: Some(number),
                ..WebhookDetails::default()
            }),
            _ => Some(WebhookDetails {
                branch: json_string(payload, "/branch"),
                ..WebhookDetails::default()
            }),
        }
    }
}

fn settings() -> Settings {
    read_settings::<ExampleForge>(|key| (key == "hosts").then(|| "127.0.0.1:9000".to_string()))
}

fn input() -> PullRequestInput {
    PullRequestInput {
        repository_url: "git@forge.example:acme/widgets.git".to_string(),
        head_branch: "flotilla/fix-1".to_string(),
        base_branch: "main".to_string(),
        title: "Fix it".to_string(),
        body: "Body".to_string(),
        draft: false,
    }
}

fn answer(status: u16, body: &str) -> Result<HttpResponse, &'static str> {
    Ok(HttpResponse {
        status,
        body: body.as_bytes().to_vec(),
    })
}

#[test]
fn urls_clone_specs_and_requests_follow_the_forge() {
    let settings = settings();
    let matched = match_url::<ExampleForge>("http://127.0.0.1:9000/acme/widgets.git", &settings).unwrap();
    assert_eq!(matched.web_url, "http://127.0.0.1:9000/acme/widgets");
    assert_eq!(match_url::<ExampleForge>("https://forge.example/acme", &settings), None);
    let spec = clone_spec::<ExampleForge>("https://forge.example/acme/widgets", &settings).unwrap();
    assert_eq!(spec.url, "https://forge.example/acme/widgets.git");
    assert_eq!(spec.auth_header.unwrap().1, "Basic {{basic:git:secret:example-token}}");
    assert_eq!(
        clone_spec::<ExampleForge>("https://other.example/a/b", &settings),
        Err(Failure::InvalidInput(
            "\"https://other.example/a/b\" is not a Example repository URL (https://forge.example/OWNER/REPO, or a \
             host in the `hosts` setting)"
                .to_string()
        ))
    );
    let request = pull_request_request::<ExampleForge>(&input(), &settings).unwrap();
    assert_eq!(request.url, "https://forge.example/api/repos/acme/widgets/pulls");
    let names: Vec<&str> = request.headers.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["Authorization", "Accept", "X-Api-Version", "User-Agent", "Content-Type"]
    );
    assert_eq!(request.header("authorization"), Some("Bearer {{secret:example-token}}"));
}

#[test]
fn a_created_pull_request_is_returned() {
    let mut sent = Vec::new();
    let created = create_pull_request::<ExampleForge, _>(&input(), &settings(), |request| {
        sent.push(request.method.clone());
        answer(
            201,
            r#"{"number": 4, "html_url": "https://forge.example/acme/widgets/pull/4"}"#,
        )
    });
    assert_eq!(created.map(|pull_request| pull_request.number), Ok(4));
    assert_eq!(sent, ["POST"]);
}

#[test]
fn a_refused_duplicate_is_looked_up_and_returned() {
    let mut sent = Vec::new();
    let found = create_pull_request::<ExampleForge, _>(&input(), &settings(), |request| {
        sent.push(request.url.clone());
        match request.method.as_str() {
            "POST" => answer(409, r#"{"message": "already open"}"#),
            _ => answer(
                200,
                r#"[{"number": 3, "html_url": "https://forge.example/acme/widgets/pull/3"}]"#,
            ),
        }
    });
    assert_eq!(found.map(|pull_request| pull_request.number), Ok(3));
    assert_eq!(
        sent[1],
        "https://forge.example/api/repos/acme/widgets/pulls?head=flotilla%2Ffix-1"
    );
}

#[test]
fn a_refusal_stands_when_the_lookup_finds_nothing_or_fails() {
    let refused = |lookup_status: u16, lookup_body: &'static str| {
        create_pull_request::<ExampleForge, _>(&input(), &settings(), move |request| match request.method.as_str() {
            "POST" => answer(409, r#"{"message": "already open"}"#),
            _ => answer(lookup_status, lookup_body),
        })
    };
    assert_eq!(
        refused(200, "[]"),
        Err(CreateFailure::Failure(Failure::Remote {
            status: 409,
            message: "already open".to_string()
        }))
    );
    assert_eq!(
        refused(500, r#"{"message": "boom"}"#),
        Err(CreateFailure::Failure(Failure::Remote {
            status: 409,
            message: "already open (looking up the open pull request failed: HTTP 500: boom)".to_string()
        }))
    );
}

#[test]
fn other_refusals_and_transport_failures_are_not_looked_up() {
    let mut sent = 0;
    let refused = create_pull_request::<ExampleForge, _>(&input(), &settings(), |_| {
        sent += 1;
        answer(401, r#"{"message": "bad token"}"#)
    });
    assert_eq!(sent, 1);
    assert_eq!(
        refused,
        Err(CreateFailure::Failure(Failure::Remote {
            status: 401,
            message: "bad token".to_string()
        }))
    );
    let unreachable = create_pull_request::<ExampleForge, _>(&input(), &settings(), |_| Err("timed out"));
    assert_eq!(unreachable, Err(CreateFailure::Http("timed out")));
}

#[test]
fn deliveries_become_events_and_others_are_ignored() {
    let headers = |name: &str, event: &str| vec![(name.to_string(), event.to_string())];
    let push = br#"{"repository": {"html_url": "https://forge.example/a/b"}, "branch": "x"}"#;
    let event = parse_webhook::<ExampleForge>(&headers("x-other-event", " push "), push)
        .unwrap()
        .unwrap();
    assert_eq!(
        event,
        WebhookEvent {
            kind: "push".to_string(),
            repository_url: "https://forge.example/a/b".to_string(),
            branch: Some("x".to_string()),
            pull_request_number: None,
            actor: None,
        }
    );
    let comment = br#"{"repository": {"html_url": "https://forge.example/a/b"}}"#;
    assert_eq!(
        parse_webhook::<ExampleForge>(&headers("X-Example-Event", "comment"), comment),
        Ok(None)
    );
    assert_eq!(
        parse_webhook::<ExampleForge>(&headers("X-Example-Event", "star"), b"x"),
        Ok(None)
    );
    assert_eq!(parse_webhook::<ExampleForge>(&[], b"x"), Ok(None));
    assert_eq!(
        parse_webhook::<ExampleForge>(&headers("X-Example-Event", "push"), b"{}"),
        Err(Failure::InvalidInput(
            "Example webhook body has no repository.html_url".to_string()
        ))
    );
}
