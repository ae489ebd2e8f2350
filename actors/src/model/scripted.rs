//! The `scripted` provider: replays a JSON file of model replies, one per turn, in order.
//!
//! ```json
//! {"turns": [{"text": "Looking.", "tool_calls": [{"name": "run_command", "arguments": {"command": "ls"}}]},
//!            {"text": "Done."}]}
//! ```

use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use serde::Deserialize;
use tokio::sync::mpsc::Sender;

use super::{emit, ModelError, ModelProvider, StopReason, StreamEvent, ToolCall, TurnRequest, TurnResponse, Usage};

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
}

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

struct Position {
    next_turn: usize,
    next_call_number: u64,
}

pub struct ScriptedProvider {
    name: String,
    turns: Vec<ScriptedTurn>,
    position: Mutex<Position>,
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
            position: Mutex::new(Position {
                next_turn: 0,
                next_call_number: 1,
            }),
        })
    }

    /// Takes the next turn of the script and numbers its tool calls.
    fn next_turn(&self) -> Result<TurnResponse, ModelError> {
        let mut position = self.position.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(turn) = self.turns.get(position.next_turn) else {
            return Err(ModelError::Script(format!(
                "script has {} turns; turn {} was asked for",
                self.turns.len(),
                position.next_turn + 1
            )));
        };
        position.next_turn += 1;
        let mut tool_calls = Vec::with_capacity(turn.tool_calls.len());
        for call in &turn.tool_calls {
            tool_calls.push(ToolCall {
                id: format!("call_{}", position.next_call_number),
                name: call.name.clone(),
                arguments_json: call.arguments.to_string(),
            });
            position.next_call_number += 1;
        }
        let stop_reason = if tool_calls.is_empty() {
            StopReason::EndTurn
        } else {
            StopReason::ToolUse
        };
        Ok(TurnResponse {
            text: turn.text.clone(),
            tool_calls,
            usage: Usage::default(),
            stop_reason,
        })
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

    async fn turn(&self, _request: &TurnRequest, events: Sender<StreamEvent>) -> Result<TurnResponse, ModelError> {
        let response = self.next_turn()?;
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
    use super::super::{build_provider, ModelConfig};
    use super::*;

    const SCRIPT: &str = r#"{"turns": [
        {"text": "Let me look around.", "tool_calls": [
            {"name": "list_dir", "arguments": {"path": "."}},
            {"name": "run_command", "arguments": {"command": "cargo test"}}
        ]},
        {"text": "", "tool_calls": [{"name": "read_file", "arguments": {"path": "README.md"}}]},
        {"text": "Všechno hotovo."}
    ]}"#;

    fn request() -> TurnRequest {
        TurnRequest {
            messages: Vec::new(),
            tools: Vec::new(),
            max_output_tokens: 100,
        }
    }

    #[tokio::test]
    async fn replays_turns_in_order_with_deterministic_ids_and_fails_past_the_end() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("script.json");
        std::fs::write(&path, SCRIPT).unwrap();
        let config: ModelConfig = toml::from_str(&format!("provider = \"scripted\"\nscript = {:?}\n", path)).unwrap();
        let provider = build_provider(&config, &|_| None).expect("scripted provider builds");
        assert!(provider.scripted());
        assert_eq!(provider.name(), "scripted");

        let (first, events) = run_turn(provider.as_ref(), &request()).await;
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
        assert_eq!(ids, ["call_1", "call_2"]);
        assert_eq!(first.tool_calls[1].name, "run_command");
        assert_eq!(first.tool_calls[1].arguments_json, r#"{"command":"cargo test"}"#);
        assert_eq!(streamed_arguments(&events, "call_1"), r#"{"path":"."}"#);
        assert_eq!(first.stop_reason, StopReason::ToolUse);
        assert_eq!(events.last(), Some(&StreamEvent::Done(first.clone())));

        let (second, _) = run_turn(provider.as_ref(), &request()).await;
        assert_eq!(second.unwrap().tool_calls[0].id, "call_3");
        let (third, events) = run_turn(provider.as_ref(), &request()).await;
        let third = third.unwrap();
        assert_eq!(third.text, "Všechno hotovo.");
        assert_eq!(streamed_text(&events), "Všechno hotovo.");
        assert_eq!(third.stop_reason, StopReason::EndTurn);

        let (fourth, events) = run_turn(provider.as_ref(), &request()).await;
        assert_eq!(
            fourth,
            Err(ModelError::Script(
                "script has 3 turns; turn 4 was asked for".to_string()
            ))
        );
        assert!(events.is_empty());
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
