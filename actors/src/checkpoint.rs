//! The conversation of an agent after a finished turn, as written to Raft: postcard, then LZ4.
//! It must fit [`flotilla_raft::command::MAX_CHECKPOINT_BYTES`]; when it does not, the oldest
//! tool results are shortened first (the model can always run the tool again), then the
//! oldest assistant texts, so that a long run still resumes with its structure intact.

use serde::{Deserialize, Serialize};

use crate::model::{Message, Role};

/// The layout version; a checkpoint of another version is refused, not misread.
pub const CHECKPOINT_VERSION: u32 = 1;
/// What a shortened message keeps of its content.
const KEPT_WHEN_SHORTENED: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transcript {
    pub version: u32,
    pub messages: Vec<Message>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("checkpoint is not readable: {0}")]
    Corrupt(String),
    #[error("checkpoint version {found} is not supported (this node reads {CHECKPOINT_VERSION})")]
    Version { found: u32 },
    #[error("the conversation does not fit a checkpoint of {limit} bytes even when shortened")]
    TooLarge { limit: usize },
}

fn compress(transcript: &Transcript) -> Vec<u8> {
    let bytes = postcard::to_stdvec(transcript).expect("a transcript always serialises");
    lz4_flex::compress_prepend_size(&bytes)
}

/// Encodes the messages within `limit` bytes, shortening old tool results and texts if needed.
/// The returned flag says whether anything was shortened.
pub fn encode(messages: &[Message], limit: usize) -> Result<(Vec<u8>, bool), CheckpointError> {
    let mut transcript = Transcript {
        version: CHECKPOINT_VERSION,
        messages: messages.to_vec(),
    };
    let encoded = compress(&transcript);
    if encoded.len() <= limit {
        return Ok((encoded, false));
    }
    // Shorten oldest first: tool results, then assistant texts; the system prompt, the task and
    // follow-ups stay whole.
    for role in [Role::Tool, Role::Assistant] {
        let candidates: Vec<usize> = transcript
            .messages
            .iter()
            .enumerate()
            .filter(|(_, message)| message.role == role && message.content.len() > KEPT_WHEN_SHORTENED)
            .map(|(index, _)| index)
            .collect();
        // Halve the remaining candidates each round, so a huge transcript takes few encodings.
        let mut done = 0;
        while done < candidates.len() {
            let step = ((candidates.len() - done) / 2).max(1);
            for &index in &candidates[done..done + step] {
                let message = &mut transcript.messages[index];
                let (kept, _) = crate::tools::cap_text(&message.content, KEPT_WHEN_SHORTENED);
                message.content = format!("{kept}\n[shortened in the checkpoint]");
            }
            done += step;
            let encoded = compress(&transcript);
            if encoded.len() <= limit {
                return Ok((encoded, true));
            }
        }
    }
    Err(CheckpointError::TooLarge { limit })
}

pub fn decode(data: &[u8]) -> Result<Transcript, CheckpointError> {
    let bytes =
        lz4_flex::decompress_size_prepended(data).map_err(|error| CheckpointError::Corrupt(error.to_string()))?;
    let transcript: Transcript =
        postcard::from_bytes(&bytes).map_err(|error| CheckpointError::Corrupt(error.to_string()))?;
    if transcript.version != CHECKPOINT_VERSION {
        return Err(CheckpointError::Version {
            found: transcript.version,
        });
    }
    Ok(transcript)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ToolCall;

    fn conversation(tool_output_bytes: usize, turns: usize) -> Vec<Message> {
        let mut messages = vec![Message::system("system"), Message::user("add a function")];
        for turn in 0..turns {
            messages.push(Message::assistant(
                format!("turn {turn}"),
                vec![ToolCall {
                    id: format!("call_{turn}"),
                    name: "run_command".into(),
                    arguments_json: r#"{"command":"make test"}"#.into(),
                }],
            ));
            // Pseudo-random output (xorshift), so the limit is reached by size, not repetition.
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ turn as u64;
            let output: String = (0..tool_output_bytes)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from(b'a' + (seed % 26) as u8)
                })
                .collect();
            messages.push(Message::tool_result(format!("call_{turn}"), output));
        }
        messages
    }

    #[test]
    fn a_checkpoint_round_trips_and_compresses() {
        let messages = vec![
            Message::system("system"),
            Message::user("task ".repeat(2000)),
            Message::assistant("ok", Vec::new()),
        ];
        let (data, shortened) = encode(&messages, 1024 * 1024).unwrap();
        assert!(!shortened);
        assert!(data.len() < 2000, "{} bytes", data.len());
        assert_eq!(decode(&data).unwrap().messages, messages);
    }

    #[test]
    fn an_oversized_conversation_is_shortened_oldest_tool_output_first() {
        let messages = conversation(20_000, 20);
        let limit = 150 * 1024;
        let (data, shortened) = encode(&messages, limit).unwrap();
        assert!(shortened);
        assert!(data.len() <= limit);
        let restored = decode(&data).unwrap().messages;
        assert_eq!(restored.len(), messages.len());
        assert!(restored[3].content.ends_with("[shortened in the checkpoint]"));
        assert_eq!(restored.last(), messages.last(), "the newest output is kept whole");
        assert_eq!(restored[1], messages[1], "the task is never shortened");
    }

    #[test]
    fn garbage_and_impossible_limits_are_clear_errors() {
        assert!(matches!(decode(b"not a checkpoint"), Err(CheckpointError::Corrupt(_))));
        let messages = vec![Message::user("x".repeat(10_000))];
        assert_eq!(encode(&messages, 16), Err(CheckpointError::TooLarge { limit: 16 }));
    }
}
