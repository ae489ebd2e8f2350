//! Checks of the fakes themselves: the git server works with a real `git` (clone, push, auth,
//! refused pushes), the real model providers of `flotilla-actors` parse the fake model
//! server's streams and react to its faults as they would to a real provider's, and the Skiff
//! forge opens, refuses and holds pull requests as its tests expect.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::model::{build_provider, Message, ModelConfig, ModelError, ModelProvider, ProviderKind};
use flotilla_actors::model::{StopReason, StreamEvent, ToolSpec, TurnRequest, TurnResponse, Usage};
use flotilla_tests::fakes::model::{anthropic_error_body, openai_error_body, FAKE_INPUT_TOKENS, FAKE_OUTPUT_TOKENS};
use flotilla_tests::fakes::{create_bare_repository, FakeModelServer, FakeTurn, Fault, GitHttpServer, SkiffForge};
use flotilla_tests::wait_for;
use serde_json::json;

/// Any one git command or model turn here takes well under a second; this only bounds a hang.
const STEP_DEADLINE: Duration = Duration::from_secs(10);
const GIT_USER: &str = "agent";
const GIT_PASSWORD: &str = "s3cret-pass";
const MODEL_KEY_SECRET: &str = "FAKE_MODEL_KEY";
const MODEL_KEY: &str = "sk-fake-0123";

// ---------------------------------------------------------------- git over HTTP

/// Runs git with no system or user configuration and never a prompt, plus `env`.
async fn git(args: &[&str], cwd: &Path, env: &[(String, String)]) -> Output {
    let mut command = tokio::process::Command::new("git");
    command
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "t05")
        .env("GIT_AUTHOR_EMAIL", "t05@example.test")
        .env("GIT_COMMITTER_NAME", "t05")
        .env("GIT_COMMITTER_EMAIL", "t05@example.test")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .env_remove("GIT_CONFIG_COUNT")
        .envs(env.iter().map(|(name, value)| (name.as_str(), value.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(STEP_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("git {args:?} did not finish within {STEP_DEADLINE:?}"))
        .unwrap_or_else(|error| panic!("could not run git {args:?}: {error}"))
}

async fn git_ok(args: &[&str], cwd: &Path, env: &[(String, String)]) -> String {
    let output = git(args, cwd, env).await;
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

async fn rev_parse(git_dir: &Path, revision: &str) -> String {
    let git_dir = git_dir.display().to_string();
    git_ok(&["--git-dir", &git_dir, "rev-parse", revision], Path::new("/"), &[]).await
}

/// A project root holding `sample.git`, served with the test credentials.
async fn git_server() -> (tempfile::TempDir, GitHttpServer) {
    let root = tempfile::Builder::new()
        .prefix("flotilla-t05-git-")
        .tempdir()
        .expect("temp dir");
    create_bare_repository(
        root.path(),
        "sample",
        &[("README.md", "a sample\n"), ("src/lib.rs", "")],
    );
    let server = GitHttpServer::start(root.path(), GIT_USER, GIT_PASSWORD).await;
    (root, server)
}

async fn commit_file(clone: &Path, file: &str, contents: &str) -> String {
    std::fs::write(clone.join(file), contents).expect("write a file in the clone");
    git_ok(&["add", file], clone, &[]).await;
    git_ok(&["commit", "--quiet", "-m", &format!("add {file}")], clone, &[]).await;
    git_ok(&["rev-parse", "HEAD"], clone, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_git_clone_and_push_through_the_http_backend() {
    let (root, server) = git_server().await;
    let work = tempfile::tempdir().expect("temp dir");
    let credentials = server.git_credentials_env();
    let url = server.repository_url("sample");

    git_ok(&["clone", "--quiet", &url, "clone"], work.path(), &credentials).await;
    let clone = work.path().join("clone");
    assert_eq!(
        std::fs::read_to_string(clone.join("README.md")).expect("README.md in the clone"),
        "a sample\n"
    );
    assert_eq!(
        git_ok(&["rev-parse", "--abbrev-ref", "HEAD"], &clone, &[]).await,
        "main"
    );

    let pushed = commit_file(&clone, "NOTES.md", "pushed over http\n").await;
    git_ok(&["push", "--quiet", "origin", "main"], &clone, &credentials).await;
    assert_eq!(
        rev_parse(&root.path().join("sample.git"), "refs/heads/main").await,
        pushed
    );
    assert_eq!(server.pushes_accepted(), 1);

    // A second push of a new branch, to see receive-pack work more than once.
    git_ok(
        &["push", "--quiet", "origin", "main:refs/heads/agent/work"],
        &clone,
        &credentials,
    )
    .await;
    assert_eq!(
        rev_parse(&server.repository_path("sample"), "refs/heads/agent/work").await,
        pushed
    );
    assert_eq!(server.pushes_accepted(), 2);

    // A push bigger than git's 1 MiB post buffer goes as a chunked body with no length.
    let incompressible = pseudo_random_bytes(3 * 1024 * 1024, 0x5eed_f0f0);
    std::fs::write(clone.join("blob.bin"), &incompressible).expect("write a big file");
    git_ok(&["add", "blob.bin"], &clone, &[]).await;
    git_ok(&["commit", "--quiet", "-m", "a big file"], &clone, &[]).await;
    let big = git_ok(&["rev-parse", "HEAD"], &clone, &[]).await;
    git_ok(&["push", "--quiet", "origin", "main"], &clone, &credentials).await;
    assert_eq!(
        rev_parse(&server.repository_path("sample"), "refs/heads/main").await,
        big
    );
    assert_eq!(server.pushes_accepted(), 3);

    // And it comes back in a fresh clone.
    git_ok(&["clone", "--quiet", &url, "again"], work.path(), &credentials).await;
    let cloned = std::fs::read(work.path().join("again").join("blob.bin")).expect("blob.bin in the new clone");
    assert!(cloned == incompressible, "blob.bin came back different");
}

/// Deterministic bytes that do not compress (xorshift64 from `seed`).
fn pseudo_random_bytes(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_git_without_the_right_credentials_is_refused() {
    let (_root, server) = git_server().await;
    let work = tempfile::tempdir().expect("temp dir");
    let url = server.repository_url("sample");

    let anonymous = git(&["clone", "--quiet", &url, "anonymous"], work.path(), &[]).await;
    assert!(!anonymous.status.success(), "a clone without credentials succeeded");
    let stderr = String::from_utf8_lossy(&anonymous.stderr);
    assert!(
        stderr.contains("terminal prompts disabled") || stderr.contains("401"),
        "unexpected error from git: {stderr}"
    );

    let wrong = flotilla_tests::fakes::git_extra_header_env(&flotilla_tests::fakes::basic_authorization(
        GIT_USER,
        "not-the-password",
    ));
    let refused = git(&["clone", "--quiet", &url, "wrong"], work.path(), &wrong).await;
    assert!(!refused.status.success(), "a clone with a wrong password succeeded");
    assert!(!work.path().join("wrong").join("README.md").exists());

    // The challenge itself, as a browser or curl would see it.
    let response = raw_http_get(server.address(), "/sample.git/info/refs?service=git-upload-pack").await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"flotilla-test\""),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_git_push_is_refused_when_the_server_rejects_pushes() {
    let (root, server) = git_server().await;
    let work = tempfile::tempdir().expect("temp dir");
    let credentials = server.git_credentials_env();
    git_ok(
        &["clone", "--quiet", &server.repository_url("sample"), "clone"],
        work.path(),
        &credentials,
    )
    .await;
    let clone = work.path().join("clone");
    let bare = root.path().join("sample.git");
    let before = rev_parse(&bare, "refs/heads/main").await;

    server.reject_pushes(true);
    commit_file(&clone, "REFUSED.md", "never arrives\n").await;
    let push = git(&["push", "--quiet", "origin", "main"], &clone, &credentials).await;
    assert!(!push.status.success(), "a push went through while pushes are rejected");
    let stderr = String::from_utf8_lossy(&push.stderr);
    assert!(stderr.contains("403"), "unexpected error from git: {stderr}");
    assert_eq!(rev_parse(&bare, "refs/heads/main").await, before);
    assert_eq!(server.pushes_accepted(), 0);

    server.reject_pushes(false);
    git_ok(&["push", "--quiet", "origin", "main"], &clone, &credentials).await;
    assert_ne!(rev_parse(&bare, "refs/heads/main").await, before);
    assert_eq!(server.pushes_accepted(), 1);
}

/// One `GET` over a fresh connection; the whole response as text.
async fn raw_http_get(address: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send the request");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read the response");
        String::from_utf8_lossy(&response).into_owned()
    };
    tokio::time::timeout(STEP_DEADLINE, exchange)
        .await
        .expect("the raw HTTP exchange finished in time")
}

// ---------------------------------------------------------------- model providers

fn model_config(kind: ProviderKind, server: &FakeModelServer) -> ModelConfig {
    let base_url = match kind {
        ProviderKind::Anthropic => server.anthropic_base_url(),
        _ => server.openai_base_url(),
    };
    ModelConfig {
        provider: kind,
        base_url: Some(base_url),
        model: "fake-model-1".to_string(),
        api_key_env: None,
        api_key_secret: Some(MODEL_KEY_SECRET.to_string()),
        script: None,
        timeout_ms: 5_000,
        stream_idle_timeout_ms: 2_000,
        max_retries: 2,
        stream: true,
        tool_choice: None,
    }
}

/// A provider whose key comes from the secret resolver, so the test changes no environment.
fn provider_from(config: &ModelConfig) -> Arc<dyn ModelProvider> {
    build_provider(config, &|name| {
        (name == MODEL_KEY_SECRET).then(|| MODEL_KEY.to_string())
    })
    .unwrap_or_else(|error| panic!("building a {:?} provider failed: {error}", config.provider))
}

fn provider(kind: ProviderKind, server: &FakeModelServer) -> Arc<dyn ModelProvider> {
    provider_from(&model_config(kind, server))
}

/// Runs one turn within [`STEP_DEADLINE`]; the outcome and the events streamed.
async fn run_turn(
    provider: &dyn ModelProvider,
    request: &TurnRequest,
) -> (Result<TurnResponse, ModelError>, Vec<StreamEvent>) {
    let (sender, mut receiver) = tokio::sync::mpsc::channel(1024);
    let outcome = tokio::time::timeout(STEP_DEADLINE, provider.turn(request, sender))
        .await
        .unwrap_or_else(|_| panic!("a turn of {} did not end within {STEP_DEADLINE:?}", provider.name()));
    let mut events = Vec::new();
    while let Some(event) = receiver.recv().await {
        events.push(event);
    }
    (outcome, events)
}

fn first_request() -> TurnRequest {
    TurnRequest {
        messages: vec![
            Message::system("You are a coding agent."),
            Message::user("Read the README."),
        ],
        tools: vec![ToolSpec {
            name: "read_file".to_string(),
            description: "Read a file of the workspace.".to_string(),
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
        }],
        max_output_tokens: 1024,
    }
}

/// The conversation after `reply`, with each of its tool calls answered.
fn next_request(mut request: TurnRequest, reply: &TurnResponse) -> TurnRequest {
    request
        .messages
        .push(Message::assistant(reply.text.clone(), reply.tool_calls.clone()));
    for call in &reply.tool_calls {
        request
            .messages
            .push(Message::tool_result(call.id.clone(), "a sample service"));
    }
    request
}

fn tool_call_script() -> Vec<FakeTurn> {
    vec![
        FakeTurn::text("Let me read it.")
            .with_tool_call("read_file", json!({"path": "README.md", "lines": [1, 20], "note": "é"})),
        FakeTurn::text("It describes a sample service."),
    ]
}

/// The scripted conversation through a real provider: a tool-call turn, a text turn, and the
/// fallback past the end of the script.
async fn scripted_conversation(kind: ProviderKind, call_id_prefix: &str) -> FakeModelServer {
    let server = FakeModelServer::start().await;
    server.require_api_key(MODEL_KEY);
    server.set_script(tool_call_script());
    let provider = provider(kind, &server);
    let expected_usage = Usage {
        input_tokens: FAKE_INPUT_TOKENS,
        output_tokens: FAKE_OUTPUT_TOKENS,
    };

    let request = first_request();
    let (outcome, events) = run_turn(provider.as_ref(), &request).await;
    let first = outcome.unwrap_or_else(|error| panic!("{kind:?} turn 0 failed: {error}"));
    assert_eq!(first.text, "Let me read it.");
    assert_eq!(first.stop_reason, StopReason::ToolUse);
    assert_eq!(first.usage, expected_usage);
    assert_eq!(first.tool_calls.len(), 1);
    let call = &first.tool_calls[0];
    assert_eq!(call.id, format!("{call_id_prefix}_t0_0"));
    assert_eq!(call.name, "read_file");
    let arguments: serde_json::Value = serde_json::from_str(&call.arguments_json).expect("arguments are JSON");
    assert_eq!(arguments, tool_call_script()[0].tool_calls[0].1);
    // The text and the arguments really arrived in pieces.
    let text_pieces = events
        .iter()
        .filter(|event| matches!(event, StreamEvent::TextDelta(_)))
        .count();
    let argument_pieces = events
        .iter()
        .filter(|event| matches!(event, StreamEvent::ToolCallArgumentsDelta { id, .. } if *id == call.id))
        .count();
    assert!(text_pieces >= 2, "text came in {text_pieces} piece(s): {events:?}");
    assert!(
        argument_pieces >= 2,
        "arguments came in {argument_pieces} piece(s): {events:?}"
    );
    assert!(matches!(events.last(), Some(StreamEvent::Done(done)) if *done == first));

    let request = next_request(request, &first);
    let (outcome, _events) = run_turn(provider.as_ref(), &request).await;
    let second = outcome.unwrap_or_else(|error| panic!("{kind:?} turn 1 failed: {error}"));
    assert_eq!(second.text, "It describes a sample service.");
    assert!(second.tool_calls.is_empty());
    assert_eq!(second.stop_reason, StopReason::EndTurn);
    assert_eq!(second.usage, expected_usage);

    // Asking again for the same conversation gives the same reply.
    let (again, _events) = run_turn(provider.as_ref(), &request).await;
    assert_eq!(again, Ok(second.clone()));

    let request = next_request(request, &second);
    let (outcome, _events) = run_turn(provider.as_ref(), &request).await;
    let past_the_end = outcome.unwrap_or_else(|error| panic!("{kind:?} turn 2 failed: {error}"));
    assert_eq!(past_the_end.text, "done");
    assert!(past_the_end.tool_calls.is_empty());

    assert_eq!(server.request_count(), 4);
    assert_eq!(server.turn_request_count(1), 2);
    let recorded = server.requests();
    assert_eq!(
        recorded.iter().map(|request| request.turn_index).collect::<Vec<_>>(),
        vec![Some(0), Some(1), Some(1), Some(2)]
    );
    assert_eq!(recorded[0].body["model"], "fake-model-1");
    assert_eq!(recorded[0].body["stream"], true);
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_openai_provider_parses_the_fake_stream() {
    let server = scripted_conversation(ProviderKind::Openai, "call").await;
    let request = &server.requests()[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {MODEL_KEY}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_anthropic_provider_parses_the_fake_stream() {
    let server = scripted_conversation(ProviderKind::Anthropic, "toolu").await;
    let request = &server.requests()[0];
    assert_eq!(request.path, "/v1/messages");
    assert_eq!(request.header("x-api-key"), Some(MODEL_KEY));
    assert!(request.header("anthropic-version").is_some());
    assert_eq!(request.body["system"], "You are a coding agent.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_conversation_moves_between_protocols_with_the_same_replies() {
    let server = FakeModelServer::start().await;
    server.set_script(tool_call_script());
    let openai = provider(ProviderKind::Openai, &server);
    let anthropic = provider(ProviderKind::Anthropic, &server);
    let request = first_request();
    let (first, _events) = run_turn(openai.as_ref(), &request).await;
    let first = first.expect("openai turn 0");
    let (second, _events) = run_turn(anthropic.as_ref(), &next_request(request, &first)).await;
    assert_eq!(second.expect("anthropic turn 1").text, "It describes a sample service.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_rate_limit_is_retried_and_then_succeeds() {
    let server = FakeModelServer::start().await;
    server.set_script(vec![FakeTurn::text("after the retry")]);
    server.push_fault(
        Fault::openai_status(429, "requests", Some("rate_limit_exceeded"), "Rate limit reached").with_retry_after(0),
    );
    server.push_fault(Fault::anthropic_status(529, "overloaded_error", "Overloaded").with_retry_after(0));

    let (outcome, _events) = run_turn(provider(ProviderKind::Openai, &server).as_ref(), &first_request()).await;
    assert_eq!(outcome.expect("openai after a 429").text, "after the retry");
    let (outcome, _events) = run_turn(provider(ProviderKind::Anthropic, &server).as_ref(), &first_request()).await;
    assert_eq!(outcome.expect("anthropic after a 529").text, "after the retry");
    assert_eq!(server.request_count(), 4);
    assert_eq!(server.pending_faults(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_bad_request_is_rejected_with_the_providers_message() {
    let server = FakeModelServer::start().await;
    server.push_fault(Fault::Status {
        status: 400,
        body: openai_error_body("invalid_request_error", None, "Invalid 'messages': empty"),
        retry_after: None,
    });
    server.push_fault(Fault::Status {
        status: 400,
        body: anthropic_error_body("invalid_request_error", "max_tokens: must be positive"),
        retry_after: None,
    });
    let (outcome, _events) = run_turn(provider(ProviderKind::Openai, &server).as_ref(), &first_request()).await;
    assert_eq!(
        outcome,
        Err(ModelError::Rejected {
            status: 400,
            message: "Invalid 'messages': empty".to_string()
        })
    );
    let (outcome, _events) = run_turn(provider(ProviderKind::Anthropic, &server).as_ref(), &first_request()).await;
    assert_eq!(
        outcome,
        Err(ModelError::Rejected {
            status: 400,
            message: "max_tokens: must be positive".to_string()
        })
    );
    // A rejection is not retried.
    assert_eq!(server.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_wrong_or_missing_keys_get_the_protocols_401() {
    let server = FakeModelServer::start().await;
    server.require_api_key("sk-the-right-one");
    let (outcome, _events) = run_turn(provider(ProviderKind::Openai, &server).as_ref(), &first_request()).await;
    assert!(
        matches!(&outcome, Err(ModelError::Rejected { status: 401, message }) if message.contains("Incorrect API key")),
        "{outcome:?}"
    );
    let keyless = ModelConfig {
        api_key_secret: None,
        ..model_config(ProviderKind::Openai, &server)
    };
    let (outcome, _events) = run_turn(provider_from(&keyless).as_ref(), &first_request()).await;
    assert!(
        matches!(&outcome, Err(ModelError::Rejected { status: 401, message }) if message.contains("didn't provide an API key")),
        "{outcome:?}"
    );
    let (outcome, _events) = run_turn(provider(ProviderKind::Anthropic, &server).as_ref(), &first_request()).await;
    assert_eq!(
        outcome,
        Err(ModelError::Rejected {
            status: 401,
            message: "invalid x-api-key".to_string()
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_malformed_stream_is_reported_as_malformed() {
    let server = FakeModelServer::start().await;
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        server.push_fault(Fault::MalformedSse);
        let (outcome, _events) = run_turn(provider(kind, &server).as_ref(), &first_request()).await;
        assert!(
            matches!(&outcome, Err(ModelError::Malformed(message)) if message.contains("{not json")),
            "{kind:?}: {outcome:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_hung_request_or_stream_times_out() {
    let server = FakeModelServer::start().await;
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        server.push_fault(Fault::Hang);
        let whole_turn = ModelConfig {
            timeout_ms: 300,
            ..model_config(kind, &server)
        };
        let (outcome, _events) = run_turn(provider_from(&whole_turn).as_ref(), &first_request()).await;
        assert_eq!(outcome, Err(ModelError::Timeout { after_ms: 300 }), "{kind:?}");

        server.push_fault(Fault::HangMidStream);
        let idle = ModelConfig {
            stream_idle_timeout_ms: 200,
            ..model_config(kind, &server)
        };
        let (outcome, _events) = run_turn(provider_from(&idle).as_ref(), &first_request()).await;
        assert_eq!(outcome, Err(ModelError::Timeout { after_ms: 200 }), "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_held_turn_waits_for_its_gate() {
    let server = FakeModelServer::start().await;
    server.set_script(tool_call_script());
    let gate = server.hold_turn(0);
    let provider = provider(ProviderKind::Anthropic, &server);
    let turn = tokio::spawn({
        let provider = provider.clone();
        async move { run_turn(provider.as_ref(), &first_request()).await.0 }
    });
    assert!(
        server.wait_for_turn_request(0, STEP_DEADLINE).await,
        "no request for turn 0 arrived within {STEP_DEADLINE:?}"
    );
    // The gate is closed, so the turn cannot have ended, however long this took.
    assert!(!turn.is_finished());
    assert!(!server.wait_for_turn_request(1, Duration::from_millis(50)).await);
    gate.release();
    let reply = tokio::time::timeout(STEP_DEADLINE, turn)
        .await
        .expect("the released turn ended in time")
        .expect("the turn task did not panic")
        .expect("the released turn succeeded");
    assert_eq!(reply.tool_calls[0].id, "toolu_t0_0");

    // Dropping a gate releases its turn as well.
    let dropped_gate = server.hold_turn(1);
    drop(dropped_gate);
    let (outcome, _events) = run_turn(provider.as_ref(), &next_request(first_request(), &reply)).await;
    assert!(outcome.is_ok(), "{outcome:?}");
}

// ---------------------------------------------------------------- the skiff forge

const SKIFF_TOKEN: &str = "skiff-token-0123";
const SKIFF_PULLS: &str = "/api/repos/acme/widgets/pulls";

/// One `POST` of `body` over a fresh connection: the status and the JSON answer.
async fn raw_http_post(
    address: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send the request");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read the response");
        String::from_utf8_lossy(&response).into_owned()
    };
    let response = tokio::time::timeout(STEP_DEADLINE, exchange)
        .await
        .expect("the raw HTTP exchange finished in time");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("an incomplete response: {response}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response}"));
    let answer =
        serde_json::from_str(body).unwrap_or_else(|error| panic!("the answer is not JSON ({error}): {response}"));
    (status, answer)
}

fn skiff_pull_request(title: &str, head: &str) -> String {
    json!({
        "title": title,
        "body": "Made by an agent.",
        "head": head,
        "base": "main",
        "draft": false,
        "opened_by": "skiff 1",
    })
    .to_string()
}

/// A pull request from `head` with the right token; the status and the answer.
async fn post_skiff_pull_request(forge: &SkiffForge, path: &str, head: &str) -> (u16, serde_json::Value) {
    let authorization = format!("Bearer {SKIFF_TOKEN}");
    raw_http_post(
        forge.address(),
        path,
        &[
            ("Authorization", authorization.as_str()),
            ("Content-Type", "application/json"),
        ],
        &skiff_pull_request(&format!("Work on {head}"), head),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_skiff_forge_opens_pull_requests_and_refuses_the_rest() {
    let forge = SkiffForge::start(SKIFF_TOKEN).await;
    forge.add_repository("acme/widgets");
    assert_eq!(forge.host(), forge.address().to_string());
    assert_eq!(forge.api_base(), format!("http://{}", forge.address()));
    let body = skiff_pull_request("Add a health endpoint", "agent/one");
    let json_content = ("Content-Type", "application/json");

    let (status, answer) = raw_http_post(forge.address(), SKIFF_PULLS, &[json_content], &body).await;
    assert_eq!((status, &answer["message"]), (401, &json!("bad credentials")));
    let (status, answer) = raw_http_post(
        forge.address(),
        SKIFF_PULLS,
        &[("Authorization", "Bearer not-the-token"), json_content],
        &body,
    )
    .await;
    assert_eq!((status, &answer["message"]), (401, &json!("bad credentials")));

    let (status, answer) = post_skiff_pull_request(&forge, "/api/repos/acme/gadgets/pulls", "agent/one").await;
    assert_eq!((status, &answer["message"]), (404, &json!("repository not found")));

    let authorization = format!("Bearer {SKIFF_TOKEN}");
    let (status, _answer) = raw_http_post(
        forge.address(),
        SKIFF_PULLS,
        &[("Authorization", authorization.as_str()), json_content],
        r#"{"title": "no head", "base": "main"}"#,
    )
    .await;
    assert_eq!(status, 422);

    let (status, answer) = post_skiff_pull_request(&forge, SKIFF_PULLS, "agent/one").await;
    assert_eq!(status, 201, "{answer}");
    let first_url = format!("{}/acme/widgets/pulls/1", forge.api_base());
    assert_eq!(answer["number"], 1);
    assert_eq!(answer["html_url"], first_url.as_str());
    assert_eq!(answer["head"], "agent/one");
    assert_eq!(answer["base"], "main");
    assert_eq!(answer["title"], "Work on agent/one");

    let (status, answer) = post_skiff_pull_request(&forge, SKIFF_PULLS, "agent/two").await;
    assert_eq!((status, &answer["number"]), (201, &json!(2)));

    let (status, answer) = post_skiff_pull_request(&forge, SKIFF_PULLS, "agent/one").await;
    assert_eq!(
        (status, &answer["message"]),
        (422, &json!("a pull request for agent/one already exists"))
    );

    let opened = forge.pull_requests();
    assert_eq!(opened.len(), 2);
    assert_eq!(opened[0].repository, "acme/widgets");
    assert_eq!(opened[0].number, 1);
    assert_eq!(opened[0].url, first_url);
    assert_eq!(opened[0].head, "agent/one");
    assert_eq!(opened[0].base, "main");
    assert_eq!(opened[0].title, "Work on agent/one");
    assert_eq!(opened[0].body, "Made by an agent.");
    assert_eq!(opened[0].opened_by.as_deref(), Some("skiff 1"));
    assert_eq!(opened[1].head, "agent/two");

    // Every request is recorded, refused ones included.
    let requests = forge.requests();
    assert_eq!(requests.len(), 7);
    assert!(requests.iter().all(|request| request.method == "POST"));
    assert_eq!(requests[0].header("authorization"), None);
    assert_eq!(requests[1].header("Authorization"), Some("Bearer not-the-token"));
    assert_eq!(requests[2].path, "/api/repos/acme/gadgets/pulls");
    assert_eq!(requests[4].json()["head"], "agent/one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_skiff_forge_holds_pull_requests_until_released() {
    let forge = SkiffForge::start(SKIFF_TOKEN).await;
    forge.add_repository("acme/widgets");
    forge.hold_pull_requests(true);
    let held = tokio::spawn({
        let forge = forge.clone();
        async move { post_skiff_pull_request(&forge, SKIFF_PULLS, "agent/held").await }
    });
    let waiting = &forge;
    wait_for("the pull request to wait at the gate", STEP_DEADLINE, || async move {
        (waiting.pending_pull_requests() == 1).then_some(())
    })
    .await;
    // Received and recorded, but not answered nor opened while the gate is held.
    assert_eq!(forge.requests().len(), 1);
    assert!(forge.pull_requests().is_empty());
    assert!(!held.is_finished());

    forge.hold_pull_requests(false);
    let (status, answer) = tokio::time::timeout(STEP_DEADLINE, held)
        .await
        .expect("the released request was answered in time")
        .expect("the request task did not panic");
    assert_eq!((status, &answer["number"]), (201, &json!(1)));
    assert_eq!(forge.pending_pull_requests(), 0);
    assert_eq!(forge.pull_requests().len(), 1);

    // Once the forge stops, a held request is answered rather than left hanging.
    forge.hold_pull_requests(true);
    let held = tokio::spawn({
        let forge = forge.clone();
        async move {
            let address = forge.address();
            let authorization = format!("Bearer {SKIFF_TOKEN}");
            let body = skiff_pull_request("Held at the end", "agent/last");
            drop(forge);
            raw_http_post(
                address,
                SKIFF_PULLS,
                &[
                    ("Authorization", authorization.as_str()),
                    ("Content-Type", "application/json"),
                ],
                &body,
            )
            .await
        }
    });
    wait_for(
        "the second pull request to wait at the gate",
        STEP_DEADLINE,
        || async move { (waiting.pending_pull_requests() == 1).then_some(()) },
    )
    .await;
    drop(forge);
    let (status, answer) = tokio::time::timeout(STEP_DEADLINE, held)
        .await
        .expect("the held request was answered when the forge stopped")
        .expect("the request task did not panic");
    assert_eq!((status, &answer["message"]), (503, &json!("the forge stopped")));
}
