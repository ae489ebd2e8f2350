//! The `scripted` provider: replays a JSON file of model replies, one per turn, in order.
//! The turn replayed is chosen by the conversation: with N assistant messages in the request,
//! turn N+1 of the script is the reply.
//!
//! ```json
//! {"turns": [{"text": "Looking.", "tool_calls": [{"name": "run_command", "arguments": {"command": "ls"}}]},
//!            {"text": "Done."}]}
//! ```

use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use tokio::sync::mpsc::Sender;

use super::{
    emit, ModelError, ModelProvider, Role, StopReason, StreamEvent, ToolCall, TurnRequest, TurnResponse, Usage,
};

/// Largest script file read.
pub const MAX_SCRIPT_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    turns: Vec<ScriptedTurn>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedTurn {
    #[serde(default)]
    text: String,
    #[serde(default)]
    tool_calls: Vec<ScriptedToolCall>,
    /// How long the reply takes, as a model's would (demos and benchmarks); at most
    /// [`MAX_SCRIPTED_DELAY_MS`].
    #[serde(default)]
    delay_ms: u64,
}

/// Longest a scripted reply may be made to take.
pub const MAX_SCRIPTED_DELAY_MS: u64 = 600_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedToolCall {
    name: String,
    #[serde(default = "empty_object")]
    arguments: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Replays a script. Holds no position: the turn to replay is read from the conversation, so a
/// resumed agent (after a checkpoint on another node, or a follow-up) gets the next scripted turn
/// and agents sharing one provider do not disturb each other.
pub struct ScriptedProvider {
    name: String,
    turns: Vec<ScriptedTurn>,
}

impl ScriptedProvider {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let describe = |error: &dyn std::fmt::Display| ModelError::Script(format!("{}: {error}", path.display()));
        let file = std::fs::File::open(path).map_err(|error| describe(&error))?;
        let mut text = String::new();
        file.take(MAX_SCRIPT_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|error| describe(&error))?;
        if text.len() as u64 > MAX_SCRIPT_BYTES {
            return Err(describe(&format!("script is larger than {MAX_SCRIPT_BYTES} bytes")));
        }
        Self::from_json(&text).map_err(|error| match error {
            ModelError::Script(message) => ModelError::Script(format!("{}: {message}", path.display())),
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let script: Script = serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|error| ModelError::Script(format!("at {}: {}", error.path(), error.inner())))?;
        Ok(Self {
            name: "scripted".to_string(),
            turns: script.turns,
        })
    }

    /// The reply to `request`: turn N (0-based) of the script, where N is the number of assistant
    /// messages already in the conversation. Tool call ids are `call_{turn}_{call}`, both 1-based,
    /// so the same conversation always gets the same ids.
    fn turn_for(&self, request: &TurnRequest) -> Result<(TurnResponse, u64), ModelError> {
        let turn_index = request
            .messages
            .iter()
            .filter(|message| message.role == Role::Assistant)
            .count();
        let Some(turn) = self.turns.get(turn_index) else {
            return Err(ModelError::Script(format!(
                "script has {} turns; turn {} was asked for",
                self.turns.len(),
                turn_index + 1
            )));
        };
        let tool_calls: Vec<ToolCall> = turn
            .tool_calls
            .iter()
            .enumerate()
            .map(|(call_index, call)| ToolCall {
                id: format!("call_{}_{}", turn_index + 1, call_index + 1),
                name: call.name.clone(),
                arguments_json: call.arguments.to_string(),
            })
            .collect();
        let stop_reason = if tool_calls.is_empty() {
            StopReason::EndTurn
        } else {
            StopReason::ToolUse
        };
        Ok((
            TurnResponse {
                text: turn.text.clone(),
                tool_calls,
                usage: Usage::default(),
                stop_reason,
            },
            turn.delay_ms,
        ))
    }
}

#[async_trait::async_trait]
impl ModelProvider for ScriptedProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn scripted(&self) -> bool {
        true
    }

    async fn turn(&self, request: &TurnRequest, events: Sender<StreamEvent>) -> Result<TurnResponse, ModelError> {
        let (response, delay_ms) = self.turn_for(request)?;
        if delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay_ms.min(MAX_SCRIPTED_DELAY_MS))).await;
        }
        for delta in split_in_two(&response.text) {
            emit(&events, StreamEvent::TextDelta(delta.to_string())).await;
        }
        for call in &response.tool_calls {
            emit(
                &events,
                StreamEvent::ToolCallStarted {
                    id: call.id.clone(),
                    name: call.name.clone(),
                },
            )
            .await;
            let delta = call.arguments_json.clone();
            emit(
                &events,
                StreamEvent::ToolCallArgumentsDelta {
                    id: call.id.clone(),
                    delta,
                },
            )
            .await;
        }
        emit(&events, StreamEvent::Done(response.clone())).await;
        Ok(response)
    }
}

/// The text as at most two non-empty deltas, cut at a character boundary near the middle.
fn split_in_two(text: &str) -> Vec<&str> {
    let middle = (0..=text.len() / 2)
        .rev()
        .find(|&index| text.is_char_boundary(index))
        .unwrap_or(0);
    [&text[..middle], &text[middle..]]
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{run_turn, streamed_arguments, streamed_text};
    use super::super::{build_provider, Message, ModelConfig};
    use super::*;

    const SCRIPT: &str = r#"{"turns": [
        {"text": "Let me look around.", "tool_calls": [
            {"name": "list_dir", "arguments": {"path": "."}},
            {"name": "run_command", "arguments": {"command": "cargo test"}}
        ]},
        {"text": "", "tool_calls": [{"name": "read_file", "arguments": {"path": "README.md"}}]},
        {"text": "Všechno hotovo."}
    ]}"#;

    /// A conversation that has had `assistant_messages` assistant replies, each followed by a
    /// tool result, after a system prompt and a task.
    fn request_after(assistant_messages: usize) -> TurnRequest {
        let mut messages = vec![
            Message::system("You are a coding agent."),
            Message::user("Fix the build."),
        ];
        for number in 1..=assistant_messages {
            messages.push(Message::assistant(format!("reply {number}"), Vec::new()));
            messages.push(Message::tool_result(format!("call_{number}_1"), "ok"));
        }
        TurnRequest {
            messages,
            tools: Vec::new(),
            max_output_tokens: 100,
        }
    }

    fn provider_from_file() -> (tempfile::TempDir, std::sync::Arc<dyn ModelProvider>) {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("script.json");
        std::fs::write(&path, SCRIPT).unwrap();
        let config: ModelConfig = toml::from_str(&format!("provider = \"scripted\"\nscript = {:?}\n", path)).unwrap();
        let provider = build_provider(&config, &|_| None).expect("scripted provider builds");
        (directory, provider)
    }

    #[tokio::test]
    async fn replays_the_turn_the_conversation_asks_for_and_fails_past_the_end() {
        let (_directory, provider) = provider_from_file();
        assert!(provider.scripted());
        assert_eq!(provider.name(), "scripted");

        let (first, events) = run_turn(provider.as_ref(), &request_after(0)).await;
        let first = first.expect("first turn");
        assert_eq!(first.text, "Let me look around.");
        assert_eq!(streamed_text(&events), "Let me look around.");
        assert_eq!(
            events
                .iter()
                .filter(|event| matches!(event, StreamEvent::TextDelta(_)))
                .count(),
            2
        );
        let ids: Vec<&str> = first.tool_calls.iter().map(|call| call.id.as_str()).collect();
        assert_eq!(ids, ["call_1_1", "call_1_2"]);
        assert_eq!(first.tool_calls[1].name, "run_command");
        assert_eq!(first.tool_calls[1].arguments_json, r#"{"command":"cargo test"}"#);
        assert_eq!(streamed_arguments(&events, "call_1_1"), r#"{"path":"."}"#);
        assert_eq!(first.stop_reason, StopReason::ToolUse);
        assert_eq!(events.last(), Some(&StreamEvent::Done(first.clone())));

        let (second, _) = run_turn(provider.as_ref(), &request_after(1)).await;
        assert_eq!(second.unwrap().tool_calls[0].id, "call_2_1");
        let (third, events) = run_turn(provider.as_ref(), &request_after(2)).await;
        let third = third.unwrap();
        assert_eq!(third.text, "Všechno hotovo.");
        assert_eq!(streamed_text(&events), "Všechno hotovo.");
        assert_eq!(third.stop_reason, StopReason::EndTurn);

        let (fourth, events) = run_turn(provider.as_ref(), &request_after(3)).await;
        assert_eq!(
            fourth,
            Err(ModelError::Script(
                "script has 3 turns; turn 4 was asked for".to_string()
            ))
        );
        assert!(events.is_empty());
    }

    #[tokio::test]
    async fn the_same_conversation_gets_the_same_reply() {
        let provider = ScriptedProvider::from_json(SCRIPT).unwrap();
        // Asking twice for the first turn (a retry, or a second agent on the same provider)
        // replays it twice rather than moving on.
        let (once, once_events) = run_turn(&provider, &request_after(0)).await;
        let (again, again_events) = run_turn(&provider, &request_after(0)).await;
        assert_eq!(once.clone().unwrap().tool_calls[0].id, "call_1_1");
        assert_eq!(once, again);
        assert_eq!(once_events, again_events);

        // A conversation resumed from a checkpoint with two assistant messages gets turn 3,
        // whatever this provider was asked before.
        let fresh = ScriptedProvider::from_json(SCRIPT).unwrap();
        let (resumed, _) = run_turn(&fresh, &request_after(2)).await;
        let resumed = resumed.unwrap();
        assert_eq!(resumed.text, "Všechno hotovo.");
        assert_eq!(resumed.stop_reason, StopReason::EndTurn);
        let (resumed_again, _) = run_turn(&provider, &request_after(2)).await;
        assert_eq!(resumed_again.unwrap(), resumed);
    }

    #[tokio::test]
    async fn only_assistant_messages_count_toward_the_turn() {
        let provider = ScriptedProvider::from_json(SCRIPT).unwrap();
        let mut request = request_after(1);
        request
            .messages
            .push(Message::user("A follow-up: also update the docs."));
        request.messages.push(Message::user("And the changelog."));
        let (reply, _) = run_turn(&provider, &request).await;
        let reply = reply.unwrap();
        assert_eq!(reply.tool_calls.len(), 1);
        assert_eq!(reply.tool_calls[0].id, "call_2_1");
        assert_eq!(reply.tool_calls[0].name, "read_file");
    }

    #[test]
    fn a_bad_script_names_where_it_is_wrong() {
        let error = ScriptedProvider::from_json(r#"{"turns": [{"text": "a"}, {"tool_calls": [{"arguments": {}}]}]}"#)
            .err()
            .expect("script without a tool name is refused");
        assert!(
            matches!(&error, ModelError::Script(message) if message.contains("turns[1].tool_calls[0]")),
            "{error}"
        );
        let missing = ScriptedProvider::from_file(Path::new("/nonexistent/script.json"))
            .err()
            .unwrap();
        assert!(matches!(&missing, ModelError::Script(message) if message.contains("/nonexistent/script.json")));
    }

    #[test]
    fn splits_text_at_a_character_boundary() {
        assert_eq!(split_in_two("ab"), ["a", "b"]);
        assert_eq!(split_in_two("é"), ["é"]);
        assert_eq!(split_in_two(""), Vec::<&str>::new());
    }
}
