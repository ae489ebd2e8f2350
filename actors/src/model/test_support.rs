//! Fake model servers for the provider tests: axum apps on 127.0.0.1:0 that record each request
//! and answer with whatever the test's reply function says for that request number.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{build_provider, ModelConfig, ModelError, ModelProvider, ProviderKind, StreamEvent, TurnResponse};
use super::{TurnRequest, DEFAULT_MAX_RETRIES, DEFAULT_STREAM_IDLE_TIMEOUT_MS};

pub(crate) const TEST_API_KEY: &str = "test-key-123";
/// Long enough for a slow CI machine, short enough that a hung test fails soon.
const TURN_DEADLINE: Duration = Duration::from_secs(20);

pub(crate) enum Reply {
    /// A 200 event stream, sent as these body pieces.
    Sse(Vec<String>),
    /// Any status with a body (error bodies, 429 with headers...).
    Status {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Accepts the request and never answers.
    Hang,
    /// Starts an event stream with this piece, then goes silent forever.
    SseThenHang(String),
}

#[derive(Debug, Clone)]
pub(crate) struct RecordedRequest {
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: serde_json::Value,
}

type ReplyFunction = dyn Fn(usize) -> Reply + Send + Sync;

struct FakeState {
    requests: Mutex<Vec<RecordedRequest>>,
    reply: Box<ReplyFunction>,
}

pub(crate) struct FakeServer {
    pub(crate) address: String,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// `reply` is given the 1-based number of the request.
    pub(crate) async fn start(reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        let state = Arc::new(FakeState {
            requests: Mutex::new(Vec::new()),
            reply: Box::new(reply),
        });
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let address = format!("http://{}", listener.local_addr().expect("local address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake server runs");
        });
        Self { address, state, task }
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(state): State<Arc<FakeState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let number = {
        let mut requests = state.requests.lock().unwrap();
        requests.push(RecordedRequest {
            path: uri.path().to_string(),
            headers,
            body,
        });
        requests.len()
    };
    let event_stream = || {
        Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
    };
    match (state.reply)(number) {
        Reply::Sse(pieces) => {
            let pieces = futures::stream::iter(pieces.into_iter().map(Ok::<_, std::convert::Infallible>));
            event_stream().body(Body::from_stream(pieces)).unwrap()
        }
        Reply::Status { status, headers, body } => {
            let mut response = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            for (name, value) in headers {
                response = response.header(name, value);
            }
            response.body(Body::from(body)).unwrap()
        }
        Reply::Hang => std::future::pending().await,
        Reply::SseThenHang(first) => {
            let pieces =
                futures::stream::iter([Ok::<_, std::convert::Infallible>(first)]).chain(futures::stream::pending());
            event_stream().body(Body::from_stream(pieces)).unwrap()
        }
    }
}

/// Splits an SSE body into pieces of `piece_len` characters, so events arrive cut mid-line.
pub(crate) fn pieces(body: &str, piece_len: usize) -> Vec<String> {
    let characters: Vec<char> = body.chars().collect();
    characters
        .chunks(piece_len)
        .map(|piece| piece.iter().collect())
        .collect()
}

/// A provider of `kind` pointed at `base_url`, authenticated with [`TEST_API_KEY`].
pub(crate) fn provider(kind: ProviderKind, base_url: &str, timeout_ms: u64) -> Arc<dyn ModelProvider> {
    provider_from(&config(kind, base_url, timeout_ms))
}

/// The configuration [`provider`] builds from, for tests that change an option first.
pub(crate) fn config(kind: ProviderKind, base_url: &str, timeout_ms: u64) -> ModelConfig {
    ModelConfig {
        provider: kind,
        base_url: Some(base_url.to_string()),
        model: "test-model".to_string(),
        api_key_env: None,
        api_key_secret: Some("MODEL_KEY".to_string()),
        script: None,
        timeout_ms,
        stream_idle_timeout_ms: DEFAULT_STREAM_IDLE_TIMEOUT_MS,
        max_retries: DEFAULT_MAX_RETRIES,
        stream: true,
        tool_choice: None,
    }
}

/// The provider `config` describes, its key secret resolving to [`TEST_API_KEY`].
pub(crate) fn provider_from(config: &ModelConfig) -> Arc<dyn ModelProvider> {
    build_provider(config, &|name| (name == "MODEL_KEY").then(|| TEST_API_KEY.to_string())).expect("provider builds")
}

/// Runs one turn with a deadline and returns its outcome and every event it sent.
pub(crate) async fn run_turn(
    provider: &dyn ModelProvider,
    request: &TurnRequest,
) -> (Result<TurnResponse, ModelError>, Vec<StreamEvent>) {
    let (sender, mut receiver) = mpsc::channel(4096);
    let outcome = tokio::time::timeout(TURN_DEADLINE, provider.turn(request, sender))
        .await
        .unwrap_or_else(|_| panic!("turn did not finish within {TURN_DEADLINE:?}"));
    let mut events = Vec::new();
    while let Some(event) = receiver.recv().await {
        events.push(event);
    }
    (outcome, events)
}

/// The text deltas of `events`, concatenated.
pub(crate) fn streamed_text(events: &[StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::TextDelta(delta) => Some(delta.as_str()),
            _ => None,
        })
        .collect()
}

/// The arguments deltas of tool call `id`, concatenated.
pub(crate) fn streamed_arguments(events: &[StreamEvent], id: &str) -> String {
    events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::ToolCallArgumentsDelta { id: call, delta } if call == id => Some(delta.as_str()),
            _ => None,
        })
        .collect()
}
