//! A streamed chat completion: Chat Completions chunks assembled into a [`TurnResponse`].

use serde::Deserialize;

use super::super::http::StreamAssembly;
use super::super::sse::SseEvent;
use super::super::{ModelError, StopReason, StreamEvent, ToolCall, TurnResponse, Usage};
use super::super::{MAX_RESPONSE_TEXT_BYTES, MAX_TOOL_ARGUMENTS_BYTES, MAX_TOOL_CALLS_PER_TURN};

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct ChunkUsage {
    #[serde(default)]
    pub(super) prompt_tokens: u64,
    #[serde(default)]
    pub(super) completion_tokens: u64,
}

struct PartialToolCall {
    index: u64,
    id: String,
    name: String,
    arguments: String,
    /// Whether `ToolCallStarted` went out; it waits for the function name.
    started: bool,
}

/// Assembles a Chat Completions stream: text deltas, tool calls gathered by `index` (id and name
/// in the first delta, argument fragments after), usage and the finish reason.
#[derive(Default)]
pub(crate) struct StreamAssembler {
    text: String,
    tool_calls: Vec<PartialToolCall>,
    usage: Usage,
    finish_reason: Option<String>,
    saw_done: bool,
}

impl StreamAssembler {
    fn on_tool_call_delta(&mut self, delta: ToolCallDelta, out: &mut Vec<StreamEvent>) -> Result<(), ModelError> {
        let position = match delta.index {
            Some(index) => self.tool_calls.iter().position(|call| call.index == index),
            // Servers that leave out `index` send each call whole or continue the last one.
            None => match &delta.id {
                Some(id) if !self.tool_calls.iter().any(|call| &call.id == id) => None,
                _ => self.tool_calls.len().checked_sub(1),
            },
        };
        let position = match position {
            Some(position) => position,
            None => {
                if self.tool_calls.len() >= MAX_TOOL_CALLS_PER_TURN {
                    return Err(ModelError::TooLarge {
                        what: format!("the number of tool calls (over {MAX_TOOL_CALLS_PER_TURN})"),
                        limit_bytes: MAX_TOOL_CALLS_PER_TURN,
                    });
                }
                let index = delta.index.unwrap_or(self.tool_calls.len() as u64);
                self.tool_calls.push(PartialToolCall {
                    index,
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                    started: false,
                });
                self.tool_calls.len() - 1
            }
        };
        let call = &mut self.tool_calls[position];
        if call.id.is_empty() {
            if let Some(id) = delta.id.filter(|id| !id.is_empty()) {
                call.id = id;
            }
        }
        let (name, arguments) = match delta.function {
            Some(function) => (function.name, function.arguments.unwrap_or_default()),
            None => (None, String::new()),
        };
        if call.name.is_empty() {
            if let Some(name) = name.filter(|name| !name.is_empty()) {
                call.name = name;
            }
        }
        if call.arguments.len() + arguments.len() > MAX_TOOL_ARGUMENTS_BYTES {
            return Err(ModelError::TooLarge {
                what: format!("the arguments of tool call {:?}", call.name),
                limit_bytes: MAX_TOOL_ARGUMENTS_BYTES,
            });
        }
        call.arguments.push_str(&arguments);
        if !call.started {
            if call.name.is_empty() {
                return Ok(());
            }
            if call.id.is_empty() {
                call.id = format!("call_{}", call.index);
            }
            call.started = true;
            out.push(StreamEvent::ToolCallStarted {
                id: call.id.clone(),
                name: call.name.clone(),
            });
            if !call.arguments.is_empty() {
                out.push(StreamEvent::ToolCallArgumentsDelta {
                    id: call.id.clone(),
                    delta: call.arguments.clone(),
                });
            }
        } else if !arguments.is_empty() {
            out.push(StreamEvent::ToolCallArgumentsDelta {
                id: call.id.clone(),
                delta: arguments,
            });
        }
        Ok(())
    }
}

impl StreamAssembly for StreamAssembler {
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ModelError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.saw_done = true;
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|error| {
            ModelError::Malformed(format!(
                "chat completion chunk is not the expected JSON ({error}): {data:.200}"
            ))
        })?;
        if let Some(error) = chunk.error {
            let message = error
                .get("message")
                .and_then(|message| message.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            return Err(ModelError::Unavailable {
                attempts: 0,
                last: format!("error in the response stream: {message}"),
            });
        }
        if let Some(usage) = chunk.usage {
            self.usage = Usage {
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
            };
        }
        for choice in chunk.choices.into_iter().filter(|choice| choice.index == 0) {
            if let Some(delta) = choice.delta {
                if let Some(content) = delta.content.filter(|content| !content.is_empty()) {
                    if self.text.len() + content.len() > MAX_RESPONSE_TEXT_BYTES {
                        return Err(ModelError::TooLarge {
                            what: "the response text".to_string(),
                            limit_bytes: MAX_RESPONSE_TEXT_BYTES,
                        });
                    }
                    self.text.push_str(&content);
                    out.push(StreamEvent::TextDelta(content));
                }
                for tool_call in delta.tool_calls.unwrap_or_default() {
                    self.on_tool_call_delta(tool_call, out)?;
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.saw_done
    }

    fn finish(self) -> Result<TurnResponse, ModelError> {
        let Some(finish_reason) = self.finish_reason else {
            return Err(ModelError::Malformed(
                "the event stream ended without a finish_reason for the response".to_string(),
            ));
        };
        let mut tool_calls = Vec::with_capacity(self.tool_calls.len());
        for call in self.tool_calls {
            if call.name.is_empty() {
                return Err(ModelError::Malformed(format!(
                    "tool call at index {} has no function name",
                    call.index
                )));
            }
            let arguments_json = if call.arguments.trim().is_empty() {
                "{}".to_string()
            } else {
                call.arguments
            };
            tool_calls.push(ToolCall {
                id: call.id,
                name: call.name,
                arguments_json,
            });
        }
        Ok(TurnResponse {
            stop_reason: stop_reason(&finish_reason, !tool_calls.is_empty()),
            text: self.text,
            tool_calls,
            usage: self.usage,
        })
    }
}

pub(super) fn stop_reason(finish_reason: &str, has_tool_calls: bool) -> StopReason {
    match finish_reason {
        // Some compatible servers say "stop" even when the message carries tool calls.
        "stop" if has_tool_calls => StopReason::ToolUse,
        "stop" => StopReason::EndTurn,
        "tool_calls" | "function_call" => StopReason::ToolUse,
        "length" => StopReason::MaxTokens,
        other => StopReason::Other(other.to_string()),
    }
}
