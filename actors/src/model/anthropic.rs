//! The `anthropic` provider: the Messages API with tools and streaming.

use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc::Sender;

use super::http::{self, HttpSettings, StreamAssembly};
use super::sse::SseEvent;
use super::{ApiKey, ModelError, ModelProvider, Role, StopReason, StreamEvent, ToolCall, TurnRequest};
use super::{TurnResponse, Usage, MAX_RESPONSE_TEXT_BYTES, MAX_TOOL_ARGUMENTS_BYTES, MAX_TOOL_CALLS_PER_TURN};

pub const ANTHROPIC_VERSION: &str = "2023-06-01";

pub struct AnthropicProvider {
    name: String,
    model: String,
    settings: HttpSettings,
    client: reqwest::Client,
    api_key: HeaderValue,
}

impl AnthropicProvider {
    pub(crate) fn new(settings: HttpSettings, model: String, api_key: ApiKey) -> Result<Self, ModelError> {
        let mut api_key = HeaderValue::from_str(api_key.expose())
            .map_err(|_| ModelError::Config("the API key contains characters not allowed in a header".into()))?;
        api_key.set_sensitive(true);
        Ok(Self {
            name: format!("anthropic:{model}"),
            model,
            client: http::build_client(&settings)?,
            settings,
            api_key,
        })
    }
}

#[async_trait::async_trait]
impl ModelProvider for AnthropicProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn scripted(&self) -> bool {
        false
    }

    async fn turn(&self, request: &TurnRequest, events: Sender<StreamEvent>) -> Result<TurnResponse, ModelError> {
        let body = serde_json::to_vec(&request_body(&self.model, request)?)
            .map_err(|error| ModelError::Config(format!("cannot encode the request: {error}")))?;
        let url = format!("{}/v1/messages", self.settings.base_url);
        let make_request = || {
            self.client
                .post(&url)
                .header("x-api-key", self.api_key.clone())
                .header("anthropic-version", ANTHROPIC_VERSION)
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "text/event-stream")
                .body(body.clone())
        };
        http::run_streamed_turn(&self.settings, &make_request, StreamAssembler::default(), &events).await
    }
}

/// The Messages API request for `request`: system messages become the top-level `system`,
/// assistant tool calls `tool_use` blocks, tool results `tool_result` blocks of a user message,
/// and consecutive messages of one role are merged (the API wants roles to alternate).
pub(crate) fn request_body(model: &str, request: &TurnRequest) -> Result<serde_json::Value, ModelError> {
    let mut system = Vec::new();
    let mut messages: Vec<(&str, Vec<serde_json::Value>)> = Vec::new();
    for message in &request.messages {
        let (role, blocks) = match message.role {
            Role::System => {
                system.push(message.content.as_str());
                continue;
            }
            Role::User => ("user", text_block(&message.content).into_iter().collect()),
            Role::Assistant => {
                let mut blocks: Vec<serde_json::Value> = text_block(&message.content).into_iter().collect();
                for call in &message.tool_calls {
                    let input: serde_json::Value = if call.arguments_json.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&call.arguments_json).map_err(|error| {
                            ModelError::Malformed(format!(
                                "arguments of earlier tool call {:?} ({}) are not JSON: {error}",
                                call.id, call.name
                            ))
                        })?
                    };
                    blocks.push(json!({ "type": "tool_use", "id": call.id, "name": call.name, "input": input }));
                }
                ("assistant", blocks)
            }
            Role::Tool => {
                let block = json!({
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id.as_deref().unwrap_or_default(),
                    "content": message.content,
                });
                ("user", vec![block])
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match messages.last_mut() {
            Some((last_role, last_blocks)) if *last_role == role => last_blocks.extend(blocks),
            _ => messages.push((role, blocks)),
        }
    }
    let messages: Vec<serde_json::Value> = messages
        .into_iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    let mut body = json!({
        "model": model,
        "max_tokens": request.max_output_tokens,
        "messages": messages,
        "stream": true,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if !request.tools.is_empty() {
        let tools: Vec<serde_json::Value> = request
            .tools
            .iter()
            .map(|tool| json!({ "name": tool.name, "description": tool.description, "input_schema": tool.parameters }))
            .collect();
        body["tools"] = serde_json::Value::Array(tools);
    }
    Ok(body)
}

/// The API refuses empty text blocks.
fn text_block(text: &str) -> Option<serde_json::Value> {
    (!text.is_empty()).then(|| json!({ "type": "text", "text": text }))
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireMessageStart,
    },
    ContentBlockStart {
        index: u64,
        content_block: WireContentBlock,
    },
    ContentBlockDelta {
        index: u64,
        delta: WireBlockDelta,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        delta: WireMessageDelta,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: WireError,
    },
    /// Events added to the API later are skipped, as its versioning policy asks.
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct WireMessageStart {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireContentBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: serde_json::Value,
    },
    /// Thinking and server-side tool blocks are not part of the turn's answer.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct WireMessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

#[derive(Clone)]
enum OpenBlock {
    Text,
    /// Position in `tool_calls`, and the `input` of the start event in case no delta follows.
    ToolUse {
        position: usize,
        initial_input: serde_json::Value,
    },
    Ignored,
}

/// Assembles a Messages API stream from its events, dispatched on each payload's `type`.
#[derive(Default)]
pub(crate) struct StreamAssembler {
    text: String,
    tool_calls: Vec<ToolCall>,
    open_blocks: Vec<(u64, OpenBlock)>,
    usage: Usage,
    stop_reason: Option<String>,
    saw_message_stop: bool,
}

impl StreamAssembler {
    fn push_text(&mut self, text: String, out: &mut Vec<StreamEvent>) -> Result<(), ModelError> {
        if text.is_empty() {
            return Ok(());
        }
        if self.text.len() + text.len() > MAX_RESPONSE_TEXT_BYTES {
            return Err(ModelError::TooLarge {
                what: "the response text".to_string(),
                limit_bytes: MAX_RESPONSE_TEXT_BYTES,
            });
        }
        self.text.push_str(&text);
        out.push(StreamEvent::TextDelta(text));
        Ok(())
    }

    fn update_usage(&mut self, usage: Option<WireUsage>) {
        if let Some(usage) = usage {
            if let Some(input_tokens) = usage.input_tokens {
                self.usage.input_tokens = input_tokens;
            }
            if let Some(output_tokens) = usage.output_tokens {
                self.usage.output_tokens = output_tokens;
            }
        }
    }

    fn block(&self, index: u64) -> Result<OpenBlock, ModelError> {
        self.open_blocks
            .iter()
            .find(|(open_index, _)| *open_index == index)
            .map(|(_, block)| block.clone())
            .ok_or_else(|| ModelError::Malformed(format!("content block {index} was not started")))
    }
}

impl StreamAssembler {
    fn on_block_start(
        &mut self,
        index: u64,
        content_block: WireContentBlock,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), ModelError> {
        if self.open_blocks.iter().any(|(open_index, _)| *open_index == index) {
            return Err(ModelError::Malformed(format!(
                "content block {index} was started twice"
            )));
        }
        let block = match content_block {
            WireContentBlock::Text { text } => {
                self.push_text(text, out)?;
                OpenBlock::Text
            }
            WireContentBlock::ToolUse { id, name, input } => {
                if self.tool_calls.len() >= MAX_TOOL_CALLS_PER_TURN {
                    return Err(ModelError::TooLarge {
                        what: format!("the number of tool calls (over {MAX_TOOL_CALLS_PER_TURN})"),
                        limit_bytes: MAX_TOOL_CALLS_PER_TURN,
                    });
                }
                out.push(StreamEvent::ToolCallStarted {
                    id: id.clone(),
                    name: name.clone(),
                });
                self.tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments_json: String::new(),
                });
                OpenBlock::ToolUse {
                    position: self.tool_calls.len() - 1,
                    initial_input: input,
                }
            }
            WireContentBlock::Other => OpenBlock::Ignored,
        };
        self.open_blocks.push((index, block));
        Ok(())
    }

    fn on_block_delta(
        &mut self,
        index: u64,
        delta: WireBlockDelta,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), ModelError> {
        match (self.block(index)?, delta) {
            (OpenBlock::Text, WireBlockDelta::TextDelta { text }) => self.push_text(text, out)?,
            (OpenBlock::ToolUse { position, .. }, WireBlockDelta::InputJsonDelta { partial_json }) => {
                let call = &mut self.tool_calls[position];
                if call.arguments_json.len() + partial_json.len() > MAX_TOOL_ARGUMENTS_BYTES {
                    return Err(ModelError::TooLarge {
                        what: format!("the arguments of tool call {:?}", call.name),
                        limit_bytes: MAX_TOOL_ARGUMENTS_BYTES,
                    });
                }
                call.arguments_json.push_str(&partial_json);
                if !partial_json.is_empty() {
                    out.push(StreamEvent::ToolCallArgumentsDelta {
                        id: call.id.clone(),
                        delta: partial_json,
                    });
                }
            }
            (OpenBlock::Ignored, _) | (_, WireBlockDelta::Other) => {}
            (_, _) => {
                return Err(ModelError::Malformed(format!(
                    "content block {index} got a delta of another kind"
                )));
            }
        }
        Ok(())
    }

    /// A tool call whose input came whole in its start block (and no deltas) keeps that input.
    fn on_block_stop(&mut self, index: u64) -> Result<(), ModelError> {
        if let OpenBlock::ToolUse {
            position,
            initial_input,
        } = self.block(index)?
        {
            let call = &mut self.tool_calls[position];
            if call.arguments_json.trim().is_empty() {
                call.arguments_json = match &initial_input {
                    serde_json::Value::Object(fields) if !fields.is_empty() => initial_input.to_string(),
                    _ => "{}".to_string(),
                };
            }
        }
        Ok(())
    }
}

impl StreamAssembly for StreamAssembler {
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ModelError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(());
        }
        let event: WireEvent = serde_json::from_str(data).map_err(|error| {
            ModelError::Malformed(format!(
                "messages stream event is not the expected JSON ({error}): {data:.200}"
            ))
        })?;
        match event {
            WireEvent::MessageStart { message } => self.update_usage(message.usage),
            WireEvent::ContentBlockStart { index, content_block } => self.on_block_start(index, content_block, out)?,
            WireEvent::ContentBlockDelta { index, delta } => self.on_block_delta(index, delta, out)?,
            WireEvent::ContentBlockStop { index } => self.on_block_stop(index)?,
            WireEvent::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                self.update_usage(usage);
            }
            WireEvent::MessageStop => self.saw_message_stop = true,
            WireEvent::Ping | WireEvent::Unknown => {}
            WireEvent::Error { error } => {
                return Err(ModelError::Unavailable {
                    attempts: 0,
                    last: format!("error in the response stream: {}: {}", error.kind, error.message),
                });
            }
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.saw_message_stop
    }

    fn finish(self) -> Result<TurnResponse, ModelError> {
        if !self.saw_message_stop {
            return Err(ModelError::Malformed(
                "the event stream ended before message_stop".to_string(),
            ));
        }
        let stop_reason = match self.stop_reason.as_deref() {
            Some("end_turn") => StopReason::EndTurn,
            Some("tool_use") => StopReason::ToolUse,
            Some("max_tokens") => StopReason::MaxTokens,
            Some(other) => StopReason::Other(other.to_string()),
            None => StopReason::Other("none given".to_string()),
        };
        let mut tool_calls = self.tool_calls;
        for call in &mut tool_calls {
            if call.arguments_json.trim().is_empty() {
                call.arguments_json = "{}".to_string();
            }
        }
        Ok(TurnResponse {
            text: self.text,
            tool_calls,
            usage: self.usage,
            stop_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{pieces, provider, run_turn, streamed_arguments, streamed_text};
    use super::super::test_support::{FakeServer, Reply, TEST_API_KEY};
    use super::super::{Message, ProviderKind, ToolSpec};
    use super::*;

    fn sse(events: &[serde_json::Value]) -> String {
        events
            .iter()
            .map(|event| format!("event: {}\ndata: {event}\n\n", event["type"].as_str().unwrap()))
            .collect()
    }

    fn request() -> TurnRequest {
        TurnRequest {
            messages: vec![
                Message::system("You are a coding agent."),
                Message::user("Run the tests."),
                Message::assistant(
                    "Running them.",
                    vec![
                        ToolCall {
                            id: "toolu_1".to_string(),
                            name: "run_command".to_string(),
                            arguments_json: r#"{"command":"cargo test"}"#.to_string(),
                        },
                        ToolCall {
                            id: "toolu_2".to_string(),
                            name: "read_file".to_string(),
                            arguments_json: r#"{"path":"Cargo.toml"}"#.to_string(),
                        },
                    ],
                ),
                Message::tool_result("toolu_1", "ok: 3 passed"),
                Message::tool_result("toolu_2", "[package]"),
            ],
            tools: vec![ToolSpec {
                name: "run_command".to_string(),
                description: "Run a shell command.".to_string(),
                parameters: json!({"type": "object", "properties": {"command": {"type": "string"}}}),
            }],
            max_output_tokens: 2048,
        }
    }

    fn message_start() -> serde_json::Value {
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "content": [], "model": "test-model", "stop_reason": null,
            "usage": {"input_tokens": 25, "output_tokens": 1}}})
    }

    fn text_answer() -> String {
        sse(&[
            message_start(),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "All "}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tests pass ✓"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": 15}}),
            json!({"type": "message_stop"}),
        ])
    }

    #[tokio::test]
    async fn streams_a_text_answer() {
        let server = FakeServer::start(|_| Reply::Sse(pieces(&text_answer(), 11))).await;
        let provider = provider(ProviderKind::Anthropic, &server.address, 5_000);
        let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
        let response = outcome.expect("turn succeeds");
        assert_eq!(response.text, "All tests pass ✓");
        assert_eq!(streamed_text(&events), "All tests pass ✓");
        assert!(response.tool_calls.is_empty());
        assert_eq!(response.stop_reason, StopReason::EndTurn);
        assert_eq!(
            response.usage,
            Usage {
                input_tokens: 25,
                output_tokens: 15
            }
        );
        assert_eq!(events.last(), Some(&StreamEvent::Done(response)));
    }

    #[tokio::test]
    async fn reassembles_a_tool_call_split_over_deltas_and_sends_the_right_request() {
        let arguments = r#"{"path": "src/main.rs", "start_line": 10}"#;
        let (first, rest) = arguments.split_at(3);
        let (second, third) = rest.split_at(17);
        let body = sse(&[
            message_start(),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Reading."}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use",
                "id": "toolu_abc", "name": "read_file", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": first}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": second}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": third}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 40}}),
            json!({"type": "message_stop"}),
        ]);
        let server = FakeServer::start(move |_| Reply::Sse(pieces(&body, 6))).await;
        let provider = provider(ProviderKind::Anthropic, &server.address, 5_000);
        let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
        let response = outcome.expect("turn succeeds");
        assert_eq!(response.text, "Reading.");
        assert_eq!(
            response.tool_calls,
            vec![ToolCall {
                id: "toolu_abc".to_string(),
                name: "read_file".to_string(),
                arguments_json: arguments.to_string()
            }]
        );
        assert_eq!(response.stop_reason, StopReason::ToolUse);
        assert!(events.contains(&StreamEvent::ToolCallStarted {
            id: "toolu_abc".to_string(),
            name: "read_file".to_string()
        }));
        assert_eq!(streamed_arguments(&events, "toolu_abc"), arguments);

        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        let received = &requests[0];
        assert_eq!(received.path, "/v1/messages");
        assert_eq!(received.headers["x-api-key"], TEST_API_KEY);
        assert_eq!(received.headers["anthropic-version"], ANTHROPIC_VERSION);
        assert_eq!(received.headers["content-type"], "application/json");
        assert!(received.headers.get("authorization").is_none());
        let expected = json!({
            "model": "test-model",
            "max_tokens": 2048,
            "stream": true,
            "system": "You are a coding agent.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Run the tests."}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Running them."},
                    {"type": "tool_use", "id": "toolu_1", "name": "run_command", "input": {"command": "cargo test"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "read_file", "input": {"path": "Cargo.toml"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok: 3 passed"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "[package]"},
                ]},
            ],
            "tools": [{
                "name": "run_command",
                "description": "Run a shell command.",
                "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
            }],
        });
        assert_eq!(received.body, expected);
    }

    #[tokio::test]
    async fn retries_after_429_then_succeeds() {
        let server = FakeServer::start(|number| match number {
            1 => Reply::Status {
                status: 429,
                headers: vec![("retry-after", "0".to_string())],
                body: r#"{"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}"#.to_string(),
            },
            _ => Reply::Sse(vec![text_answer()]),
        })
        .await;
        let provider = provider(ProviderKind::Anthropic, &server.address, 5_000);
        let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
        assert_eq!(outcome.expect("second attempt succeeds").text, "All tests pass ✓");
        assert_eq!(server.requests().len(), 2);
    }

    #[tokio::test]
    async fn a_400_is_rejected_at_once_with_the_provider_message() {
        let server = FakeServer::start(|_| Reply::Status {
            status: 400,
            headers: Vec::new(),
            body:
                r#"{"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}}"#
                    .to_string(),
        })
        .await;
        let provider = provider(ProviderKind::Anthropic, &server.address, 5_000);
        let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
        assert_eq!(
            outcome,
            Err(ModelError::Rejected {
                status: 400,
                message: "max_tokens: too large".to_string()
            })
        );
        assert!(events.is_empty());
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn a_server_that_hangs_times_out() {
        let server = FakeServer::start(|_| Reply::Hang).await;
        let provider = provider(ProviderKind::Anthropic, &server.address, 300);
        let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
        assert_eq!(outcome, Err(ModelError::Timeout { after_ms: 300 }));
    }

    #[tokio::test]
    async fn malformed_sse_is_reported() {
        let server =
            FakeServer::start(|_| Reply::Sse(vec!["event: message_start\ndata: {not json\n\n".to_string()])).await;
        let provider = provider(ProviderKind::Anthropic, &server.address, 5_000);
        let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
        assert!(
            matches!(&outcome, Err(ModelError::Malformed(message)) if message.contains("{not json")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn an_error_event_in_the_stream_is_reported() {
        let body = sse(&[
            message_start(),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ]);
        let server = FakeServer::start(move |_| Reply::Sse(vec![body.clone()])).await;
        let provider = provider(ProviderKind::Anthropic, &server.address, 5_000);
        let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
        let Err(ModelError::Unavailable { attempts: 1, last }) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(last.contains("overloaded_error: Overloaded"), "{last}");
    }
}
