//! A whole (not streamed) chat completion parsed into a [`TurnResponse`].

use serde::Deserialize;

use super::super::{ModelError, ToolCall, TurnResponse, Usage};
use super::super::{MAX_RESPONSE_TEXT_BYTES, MAX_TOOL_ARGUMENTS_BYTES, MAX_TOOL_CALLS_PER_TURN};
use super::stream::{stop_reason, ChunkUsage};

/// A whole (not streamed) chat completion.
#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    message: Option<CompletionMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CompletionMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<CompletionToolCall>>,
}

#[derive(Deserialize)]
struct CompletionToolCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<CompletionFunction>,
}

#[derive(Deserialize)]
struct CompletionFunction {
    #[serde(default)]
    name: Option<String>,
    /// A JSON string by the specification; some servers send the object itself.
    #[serde(default)]
    arguments: Option<serde_json::Value>,
}

/// Parses a whole chat completion (`"stream": false`): the first choice's message text and tool
/// calls, its finish reason and the usage, within the same limits as a streamed response.
pub(crate) fn parse_completion(body: &[u8]) -> Result<TurnResponse, ModelError> {
    let completion: Completion = serde_json::from_slice(body).map_err(|error| {
        let text = String::from_utf8_lossy(body);
        ModelError::Malformed(format!(
            "chat completion is not the expected JSON ({error}): {:.200}",
            text.trim()
        ))
    })?;
    if let Some(error) = completion.error {
        let message = error
            .get("message")
            .and_then(|message| message.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string());
        return Err(ModelError::Unavailable {
            attempts: 0,
            last: format!("error in the response: {message}"),
        });
    }
    let Some(choice) = completion.choices.into_iter().find(|choice| choice.index == 0) else {
        return Err(ModelError::Malformed(
            "chat completion has no choice with index 0".to_string(),
        ));
    };
    let Some(finish_reason) = choice.finish_reason else {
        return Err(ModelError::Malformed(
            "chat completion has no finish_reason".to_string(),
        ));
    };
    let message = choice.message.unwrap_or(CompletionMessage {
        content: None,
        tool_calls: None,
    });
    let text = message.content.unwrap_or_default();
    if text.len() > MAX_RESPONSE_TEXT_BYTES {
        return Err(ModelError::TooLarge {
            what: "the response text".to_string(),
            limit_bytes: MAX_RESPONSE_TEXT_BYTES,
        });
    }
    let calls = message.tool_calls.unwrap_or_default();
    if calls.len() > MAX_TOOL_CALLS_PER_TURN {
        return Err(ModelError::TooLarge {
            what: format!("the number of tool calls (over {MAX_TOOL_CALLS_PER_TURN})"),
            limit_bytes: MAX_TOOL_CALLS_PER_TURN,
        });
    }
    let mut tool_calls = Vec::with_capacity(calls.len());
    for (position, call) in calls.into_iter().enumerate() {
        let function = call.function.unwrap_or(CompletionFunction {
            name: None,
            arguments: None,
        });
        let Some(name) = function.name.filter(|name| !name.is_empty()) else {
            return Err(ModelError::Malformed(format!(
                "tool call at index {position} has no function name"
            )));
        };
        let arguments_json = match function.arguments {
            Some(serde_json::Value::String(arguments)) if !arguments.trim().is_empty() => arguments,
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::String(_)) => "{}".to_string(),
            Some(object) => object.to_string(),
        };
        if arguments_json.len() > MAX_TOOL_ARGUMENTS_BYTES {
            return Err(ModelError::TooLarge {
                what: format!("the arguments of tool call {name:?}"),
                limit_bytes: MAX_TOOL_ARGUMENTS_BYTES,
            });
        }
        let id = call
            .id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("call_{position}"));
        tool_calls.push(ToolCall {
            id,
            name,
            arguments_json,
        });
    }
    let usage = completion
        .usage
        .map(|usage| Usage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        })
        .unwrap_or_default();
    Ok(TurnResponse {
        stop_reason: stop_reason(&finish_reason, !tool_calls.is_empty()),
        text,
        tool_calls,
        usage,
    })
}
