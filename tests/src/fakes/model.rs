//! [`FakeModelServer`]: one loopback HTTP server that answers both the OpenAI Chat Completions
//! (`POST /v1/chat/completions`) and the Anthropic Messages (`POST /v1/messages`) streaming
//! APIs from a script the test sets.
//!
//! The reply to a request is the script's turn number N, where N is the number of assistant
//! messages in the request: a conversation gets the same reply whichever protocol or node asks
//! for it, so a turn resumed elsewhere is deterministic. Tool call ids are derived from the
//! turn and the call's position (`call_t{N}_{i}`, `toolu_t{N}_{i}`) for the same reason.
//!
//! Faults are queued, one per request in arrival order, and take precedence over the script;
//! a [`Gate`] holds the requests of one turn until the test lets them go.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Requests kept for [`FakeModelServer::requests`]; older ones are dropped.
pub const MAX_RECORDED_REQUESTS: usize = 1000;
/// Largest request body accepted (a long conversation is a few MiB at most).
pub const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Most faults that may wait in the queue at once.
pub const MAX_QUEUED_FAULTS: usize = 1024;
/// Input tokens reported for every turn.
pub const FAKE_INPUT_TOKENS: u64 = 100;
/// Output tokens reported for every turn.
pub const FAKE_OUTPUT_TOKENS: u64 = 20;
/// The text of every turn past the end of the script.
pub const AFTER_SCRIPT_TEXT: &str = "done";

const OPENAI_PATH: &str = "/v1/chat/completions";
const ANTHROPIC_PATH: &str = "/v1/messages";
const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";
/// Text and argument strings are cut into this many stream pieces (fewer if shorter).
const PIECES_PER_STRING: usize = 3;

/// One scripted assistant reply.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeTurn {
    pub text: String,
    /// `(tool name, arguments object)`, in order.
    pub tool_calls: Vec<(String, Value)>,
}

impl FakeTurn {
    /// A reply of plain text that ends the turn.
    pub fn text(text: impl Into<String>) -> FakeTurn {
        FakeTurn {
            text: text.into(),
            tool_calls: Vec::new(),
        }
    }

    /// A reply that calls one tool and says nothing.
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> FakeTurn {
        FakeTurn::text("").with_tool_call(name, arguments)
    }

    /// Adds one more tool call to this reply.
    pub fn with_tool_call(mut self, name: impl Into<String>, arguments: Value) -> FakeTurn {
        self.tool_calls.push((name.into(), arguments));
        self
    }
}

/// What the next request gets instead of its scripted reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This status with this body (`content-type: application/json`) and, when set, a
    /// `retry-after` header in seconds.
    Status {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// Accepts the request and never answers (until the server is dropped).
    Hang,
    /// A 200 event stream whose only event's data is not JSON.
    MalformedSse,
    /// A 200 event stream that sends the first event of the real reply, then goes silent.
    HangMidStream,
}

impl Fault {
    /// A status fault with OpenAI's error body.
    pub fn openai_status(status: u16, kind: &str, code: Option<&str>, message: &str) -> Fault {
        Fault::Status {
            status,
            body: openai_error_body(kind, code, message),
            retry_after: None,
        }
    }

    /// A status fault with Anthropic's error body.
    pub fn anthropic_status(status: u16, kind: &str, message: &str) -> Fault {
        Fault::Status {
            status,
            body: anthropic_error_body(kind, message),
            retry_after: None,
        }
    }

    /// The same fault with `retry-after: seconds` (status faults only; others are unchanged).
    pub fn with_retry_after(self, seconds: u64) -> Fault {
        match self {
            Fault::Status { status, body, .. } => Fault::Status {
                status,
                body,
                retry_after: Some(seconds),
            },
            other => other,
        }
    }
}

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
pub fn openai_error_body(kind: &str, code: Option<&str>, message: &str) -> String {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } }).to_string()
}

/// Anthropic's error body: `{"type":"error","error":{"type","message"}}`.
pub fn anthropic_error_body(kind: &str, message: &str) -> String {
    json!({ "type": "error", "error": { "type": kind, "message": message } }).to_string()
}

/// Which API a request was made to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireProtocol {
    OpenAi,
    Anthropic,
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// The body as JSON; `Value::Null` when it was not JSON.
    pub body: Value,
    /// The number of assistant messages in the body, when it has a `messages` array.
    pub turn_index: Option<usize>,
}

impl RecordedRequest {
    /// The protocol named by the path, if any.
    pub fn protocol(&self) -> Option<WireProtocol> {
        protocol_of(&self.path)
    }

    /// A header as text, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// Holds every request of one turn until released. Dropping it releases them too, so a test
/// that panics never leaves a request hanging; keep it in a named variable (`_gate` is fine,
/// `_` drops it at once).
#[must_use = "dropping a Gate releases the turn at once"]
pub struct Gate {
    turn_index: usize,
    open: watch::Sender<bool>,
}

impl Gate {
    pub fn turn_index(&self) -> usize {
        self.turn_index
    }

    /// Lets the held requests (and any later ones for this turn) go on.
    pub fn release(&self) {
        self.open.send_replace(true);
    }
}

/// The fake server and the handle tests steer it with. Clones share one server, which stops
/// (and lets go of hung and held requests) when the last clone is dropped.
#[derive(Clone)]
pub struct FakeModelServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    _server: Arc<ServerTask>,
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    /// Bumped whenever a request reaches its turn, to wake [`FakeModelServer::wait_for_turn_request`].
    arrivals: watch::Sender<u64>,
    /// Set when the server stops; hung and held requests end then.
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct Behaviour {
    script: Vec<FakeTurn>,
    faults: VecDeque<Fault>,
    gates: HashMap<usize, watch::Receiver<bool>>,
    requests_per_turn: BTreeMap<usize, u64>,
    requests: VecDeque<RecordedRequest>,
    request_count: u64,
    expected_api_key: Option<String>,
}

struct ServerTask {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.task.abort();
    }
}

impl FakeModelServer {
    /// Starts a server on a free loopback port with an empty script (every turn says
    /// [`AFTER_SCRIPT_TEXT`]) and no API key check.
    pub async fn start() -> FakeModelServer {
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(Behaviour::default()),
            arrivals: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
            .with_state(shared.clone());
        let (listener, address) = super::bind_loopback("fake model server").await;
        let task = super::serve(listener, app, "fake model server");
        FakeModelServer {
            _server: Arc::new(ServerTask {
                shared: shared.clone(),
                task,
            }),
            shared,
            address,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT/v1`: the OpenAI provider appends `/chat/completions`.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.address)
    }

    /// `http://127.0.0.1:PORT`: the Anthropic provider appends `/v1/messages`.
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Replaces the script; requests already answered are not affected.
    pub fn set_script(&self, script: Vec<FakeTurn>) {
        self.behaviour().script = script;
    }

    /// Requires this API key from now on: `authorization: Bearer KEY` (OpenAI) or
    /// `x-api-key: KEY` (Anthropic). Without it, Anthropic requests need some `x-api-key` and
    /// OpenAI requests need none.
    pub fn require_api_key(&self, key: impl Into<String>) {
        self.behaviour().expected_api_key = Some(key.into());
    }

    /// Queues a fault for the next request that has none yet (FIFO, one per request).
    pub fn push_fault(&self, fault: Fault) {
        let mut behaviour = self.behaviour();
        assert!(
            behaviour.faults.len() < MAX_QUEUED_FAULTS,
            "more than {MAX_QUEUED_FAULTS} faults queued on the fake model server"
        );
        behaviour.faults.push_back(fault);
    }

    /// Faults queued and not yet served.
    pub fn pending_faults(&self) -> usize {
        self.behaviour().faults.len()
    }

    /// Holds every request for `turn_index` until the returned gate is released or dropped,
    /// or the server stops. A second gate for the same turn replaces the first for later
    /// requests.
    pub fn hold_turn(&self, turn_index: usize) -> Gate {
        let (open, receiver) = watch::channel(false);
        self.behaviour().gates.insert(turn_index, receiver);
        Gate { turn_index, open }
    }

    /// Waits until a request for `turn_index` has reached the script (that is, passed the key
    /// check and got no fault; it may now be held by a gate). False if none came within
    /// `deadline`.
    pub async fn wait_for_turn_request(&self, turn_index: usize, deadline: Duration) -> bool {
        let give_up_at = tokio::time::Instant::now() + deadline;
        // Subscribing before checking means no arrival between the two is missed.
        let mut arrivals = self.shared.arrivals.subscribe();
        loop {
            if self.turn_request_count(turn_index) > 0 {
                return true;
            }
            match tokio::time::timeout_at(give_up_at, arrivals.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return self.turn_request_count(turn_index) > 0,
            }
        }
    }

    /// Requests for `turn_index` that reached the script so far.
    pub fn turn_request_count(&self, turn_index: usize) -> u64 {
        self.behaviour()
            .requests_per_turn
            .get(&turn_index)
            .copied()
            .unwrap_or(0)
    }

    /// The last [`MAX_RECORDED_REQUESTS`] requests, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.behaviour().requests.iter().cloned().collect()
    }

    /// Every request received since the start, including those no longer recorded.
    pub fn request_count(&self) -> u64 {
        self.behaviour().request_count
    }

    fn behaviour(&self) -> MutexGuard<'_, Behaviour> {
        self.shared.behaviour()
    }
}

impl Shared {
    fn behaviour(&self) -> MutexGuard<'_, Behaviour> {
        // A test that panicked while holding the lock must not turn every later request into
        // a second panic; the state is still consistent (every update is a single step).
        self.behaviour.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    async fn until_shutdown(&self) {
        let mut shutdown = self.shutdown.subscribe();
        // An error means the sender is gone, which also means the server stopped.
        let _ = shutdown.wait_for(|stopped| *stopped).await;
    }
}

fn protocol_of(path: &str) -> Option<WireProtocol> {
    match path {
        OPENAI_PATH => Some(WireProtocol::OpenAi),
        ANTHROPIC_PATH => Some(WireProtocol::Anthropic),
        _ => None,
    }
}

/// The number of assistant messages in the body: the script turn that answers it.
fn turn_index_of(body: &Value) -> Option<usize> {
    let messages = body.get("messages")?.as_array()?;
    Some(
        messages
            .iter()
            .filter(|message| message.get("role").and_then(Value::as_str) == Some("assistant"))
            .count(),
    )
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let turn_index = turn_index_of(&body);
    let path = uri.path().to_string();
    let expected_api_key = shared.record(RecordedRequest {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
        body: body.clone(),
        turn_index,
    });

    let Some(protocol) = protocol_of(&path) else {
        return json_response(
            404,
            &openai_error_body("invalid_request_error", None, &format!("unknown path {path}")),
        );
    };
    if method != Method::POST {
        return error_response(
            protocol,
            405,
            "invalid_request_error",
            &format!("{method} is not allowed on {path}"),
        );
    }
    if let Some(refusal) = check_credentials(protocol, &headers, expected_api_key.as_deref()) {
        return refusal;
    }

    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake-model")
        .to_string();
    let fault = shared.behaviour().faults.pop_front();
    if let Some(fault) = fault {
        return fault_response(&shared, protocol, fault, turn_index.unwrap_or(0), &model).await;
    }
    scripted_response(&shared, protocol, turn_index, &body, &model).await
}

impl Shared {
    /// Counts and records `request` (keeping the last [`MAX_RECORDED_REQUESTS`]), and returns
    /// the API key requests must carry, if one is set.
    fn record(&self, request: RecordedRequest) -> Option<String> {
        let mut behaviour = self.behaviour();
        behaviour.request_count += 1;
        if behaviour.requests.len() >= MAX_RECORDED_REQUESTS {
            behaviour.requests.pop_front();
        }
        behaviour.requests.push_back(request);
        behaviour.expected_api_key.clone()
    }

    /// Counts a request for `turn_index` as arrived, then waits while a [`Gate`] holds that
    /// turn (until it is released or dropped, or the server stops).
    async fn pass_turn_gate(&self, turn_index: usize) {
        let gate = {
            let mut behaviour = self.behaviour();
            *behaviour.requests_per_turn.entry(turn_index).or_default() += 1;
            behaviour.gates.get(&turn_index).cloned()
        };
        self.arrivals.send_modify(|arrivals| *arrivals += 1);
        if let Some(mut gate) = gate {
            tokio::select! {
                // An error means the Gate was dropped, which releases the turn.
                _ = gate.wait_for(|open| *open) => {}
                _ = self.until_shutdown() => {}
            }
        }
    }

    /// The script's turn `turn_index`, or plain [`AFTER_SCRIPT_TEXT`] past its end.
    fn scripted_turn(&self, turn_index: usize) -> FakeTurn {
        let behaviour = self.behaviour();
        behaviour
            .script
            .get(turn_index)
            .cloned()
            .unwrap_or_else(|| FakeTurn::text(AFTER_SCRIPT_TEXT))
    }
}

/// The scripted reply to a request that got no fault, streamed in `protocol`'s events once its
/// turn's gate lets it; a request with no messages or that does not stream is refused.
async fn scripted_response(
    shared: &Shared,
    protocol: WireProtocol,
    turn_index: Option<usize>,
    body: &Value,
    model: &str,
) -> Response {
    let Some(turn_index) = turn_index else {
        return error_response(
            protocol,
            400,
            "invalid_request_error",
            "messages: an array of messages is required",
        );
    };
    if body.get("stream") != Some(&Value::Bool(true)) {
        return error_response(
            protocol,
            400,
            "invalid_request_error",
            "this fake server only streams: set \"stream\": true",
        );
    }

    shared.pass_turn_gate(turn_index).await;
    let turn = shared.scripted_turn(turn_index);
    let events = match protocol {
        WireProtocol::OpenAi => {
            let include_usage = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
            openai_events(turn_index, &turn, model, include_usage)
        }
        WireProtocol::Anthropic => anthropic_events(turn_index, &turn, model),
    };
    // Each event is its own body chunk, so the client sees the stream arrive in pieces.
    let chunks = futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    event_stream_response(Body::from_stream(chunks))
}

/// A refusal when the credentials are missing or wrong, in the protocol's own words.
fn check_credentials(protocol: WireProtocol, headers: &HeaderMap, expected_api_key: Option<&str>) -> Option<Response> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    match protocol {
        WireProtocol::OpenAi => {
            let expected = expected_api_key?;
            let given = header("authorization").and_then(|value| value.strip_prefix("Bearer "));
            let message = match given {
                Some(key) if key == expected => return None,
                Some(_) => "Incorrect API key provided.",
                None => "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            };
            let code = given.map(|_| "invalid_api_key");
            Some(json_response(
                401,
                &openai_error_body("invalid_request_error", code, message),
            ))
        }
        WireProtocol::Anthropic => {
            let refusal = match (header("x-api-key"), expected_api_key) {
                (None, _) => "x-api-key header is required",
                (Some(given), Some(expected)) if given != expected => "invalid x-api-key",
                (Some(_), _) if header("anthropic-version").is_none() => {
                    // The real API answers a missing version with 400, not 401.
                    let body = anthropic_error_body("invalid_request_error", "anthropic-version: header is required");
                    return Some(json_response(400, &body));
                }
                (Some(_), _) => return None,
            };
            Some(json_response(
                401,
                &anthropic_error_body("authentication_error", refusal),
            ))
        }
    }
}

async fn fault_response(
    shared: &Shared,
    protocol: WireProtocol,
    fault: Fault,
    turn_index: usize,
    model: &str,
) -> Response {
    match fault {
        Fault::Status {
            status,
            body,
            retry_after,
        } => {
            let mut response = json_response(status, &body);
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(
                    "retry-after",
                    seconds.to_string().parse().expect("digits are a header value"),
                );
            }
            response
        }
        Fault::Hang => {
            shared.until_shutdown().await;
            json_response(
                503,
                &openai_error_body("server_error", None, "the fake model server stopped"),
            )
        }
        Fault::MalformedSse => {
            let event = match protocol {
                WireProtocol::OpenAi => "data: {not json\n\n",
                WireProtocol::Anthropic => "event: message_start\ndata: {not json\n\n",
            };
            event_stream_response(Body::from(event))
        }
        Fault::HangMidStream => {
            // The first event (a role chunk, `message_start`) is the same whatever the reply.
            let reply = FakeTurn::text(AFTER_SCRIPT_TEXT);
            let first = match protocol {
                WireProtocol::OpenAi => openai_events(turn_index, &reply, model, true),
                WireProtocol::Anthropic => anthropic_events(turn_index, &reply, model),
            }
            .swap_remove(0);
            let mut shutdown = shared.shutdown.subscribe();
            let silence = futures::stream::once(async move {
                let _ = shutdown.wait_for(|stopped| *stopped).await;
            })
            .filter_map(|()| async { None::<Result<String, Infallible>> });
            let chunks = futures::stream::iter([Ok::<_, Infallible>(first)]).chain(silence);
            event_stream_response(Body::from_stream(chunks))
        }
    }
}

fn json_response(status: u16, body: &str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_else(|error| panic!("fault status {status} is not a valid HTTP status: {error}"))
}

fn error_response(protocol: WireProtocol, status: u16, kind: &str, message: &str) -> Response {
    let body = match protocol {
        WireProtocol::OpenAi => openai_error_body(kind, None, message),
        WireProtocol::Anthropic => anthropic_error_body(kind, message),
    };
    json_response(status, &body)
}

fn event_stream_response(body: Body) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", EVENT_STREAM)
        .header("cache-control", "no-cache")
        .body(body)
        .expect("a static event-stream response is valid")
}

/// `text` cut into at most [`PIECES_PER_STRING`] pieces, at least two when it has two
/// characters or more; none when it is empty.
fn pieces(text: &str) -> Vec<String> {
    let characters: Vec<char> = text.chars().collect();
    if characters.is_empty() {
        return Vec::new();
    }
    let piece_len = characters.len().div_ceil(PIECES_PER_STRING);
    characters
        .chunks(piece_len)
        .map(|piece| piece.iter().collect())
        .collect()
}

fn arguments_text(arguments: &Value) -> String {
    serde_json::to_string(arguments).expect("a JSON value serialises")
}

/// A Chat Completions stream, as `data: ...` frames ending with `data: [DONE]`: a role chunk,
/// the text in pieces, each tool call's id and name then its arguments in pieces, a chunk
/// with the finish reason and, when the request asked for it (as the real API requires), a
/// usage chunk with no choices.
fn openai_events(turn_index: usize, turn: &FakeTurn, model: &str, include_usage: bool) -> Vec<String> {
    let chunk = |choices: Value| {
        json!({
            "id": format!("chatcmpl-fake-t{turn_index}"),
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": choices,
        })
    };
    let delta = |delta: Value, finish_reason: Value| {
        chunk(json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }]))
    };
    let mut chunks = vec![delta(json!({ "role": "assistant", "content": "" }), Value::Null)];
    for piece in pieces(&turn.text) {
        chunks.push(delta(json!({ "content": piece }), Value::Null));
    }
    for (call_index, (name, arguments)) in turn.tool_calls.iter().enumerate() {
        let start = json!({
            "index": call_index,
            "id": format!("call_t{turn_index}_{call_index}"),
            "type": "function",
            "function": { "name": name, "arguments": "" },
        });
        chunks.push(delta(json!({ "tool_calls": [start] }), Value::Null));
        for piece in pieces(&arguments_text(arguments)) {
            let more = json!({ "index": call_index, "function": { "arguments": piece } });
            chunks.push(delta(json!({ "tool_calls": [more] }), Value::Null));
        }
    }
    let finish_reason = if turn.tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    chunks.push(delta(json!({}), json!(finish_reason)));
    if include_usage {
        let mut usage = chunk(json!([]));
        usage["usage"] = json!({
            "prompt_tokens": FAKE_INPUT_TOKENS,
            "completion_tokens": FAKE_OUTPUT_TOKENS,
            "total_tokens": FAKE_INPUT_TOKENS + FAKE_OUTPUT_TOKENS,
        });
        chunks.push(usage);
    }
    let mut frames: Vec<String> = chunks.iter().map(|chunk| format!("data: {chunk}\n\n")).collect();
    frames.push("data: [DONE]\n\n".to_string());
    frames
}

/// A Messages stream, as `event:`/`data:` frames: `message_start` with the input tokens, a
/// `ping`, a text block (when there is text) and one `tool_use` block per call, each with
/// its deltas in pieces, then `message_delta` with the stop reason and output tokens and
/// `message_stop`.
fn anthropic_events(turn_index: usize, turn: &FakeTurn, model: &str) -> Vec<String> {
    let mut events = vec![
        json!({
            "type": "message_start",
            "message": {
                "id": format!("msg_fake_t{turn_index}"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": { "input_tokens": FAKE_INPUT_TOKENS, "output_tokens": 1 },
            },
        }),
        json!({ "type": "ping" }),
    ];
    let mut block_index = 0;
    if !turn.text.is_empty() {
        events.push(json!({
            "type": "content_block_start",
            "index": block_index,
            "content_block": { "type": "text", "text": "" },
        }));
        for piece in pieces(&turn.text) {
            events.push(json!({
                "type": "content_block_delta",
                "index": block_index,
                "delta": { "type": "text_delta", "text": piece },
            }));
        }
        events.push(json!({ "type": "content_block_stop", "index": block_index }));
        block_index += 1;
    }
    for (call_index, (name, arguments)) in turn.tool_calls.iter().enumerate() {
        events.push(json!({
            "type": "content_block_start",
            "index": block_index,
            "content_block": {
                "type": "tool_use",
                "id": format!("toolu_t{turn_index}_{call_index}"),
                "name": name,
                "input": {},
            },
        }));
        // The real API opens every tool_use block with an empty partial_json.
        let mut partial_jsons = vec![String::new()];
        partial_jsons.extend(pieces(&arguments_text(arguments)));
        for partial_json in partial_jsons {
            events.push(json!({
                "type": "content_block_delta",
                "index": block_index,
                "delta": { "type": "input_json_delta", "partial_json": partial_json },
            }));
        }
        events.push(json!({ "type": "content_block_stop", "index": block_index }));
        block_index += 1;
    }
    let stop_reason = if turn.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    events.push(json!({
        "type": "message_delta",
        "delta": { "stop_reason": stop_reason, "stop_sequence": null },
        "usage": { "output_tokens": FAKE_OUTPUT_TOKENS },
    }));
    events.push(json!({ "type": "message_stop" }));
    events
        .iter()
        .map(|event| {
            let name = event["type"].as_str().expect("every event has a type");
            format!("event: {name}\ndata: {event}\n\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_cut_into_two_or_more_pieces_that_join_back() {
        assert!(pieces("").is_empty());
        assert_eq!(pieces("x"), vec!["x"]);
        assert_eq!(pieces("{}"), vec!["{", "}"]);
        let text = "héllo wörld";
        let cut = pieces(text);
        assert!(cut.len() >= 2, "{cut:?}");
        assert_eq!(cut.concat(), text);
    }

    #[test]
    fn the_turn_is_the_number_of_assistant_messages() {
        let body = json!({"messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
            {"role": "tool", "content": "t"},
            {"role": "assistant", "content": "b"},
        ]});
        assert_eq!(turn_index_of(&body), Some(2));
        assert_eq!(turn_index_of(&json!({"model": "m"})), None);
    }
}
