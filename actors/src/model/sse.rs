//! A small, bounded parser of `text/event-stream` bodies (the WHATWG server-sent events format),
//! fed with body chunks as they arrive. Lines may end in `\n`, `\r\n` or `\r`, and a chunk may
//! end anywhere, even inside a UTF-8 sequence.

use super::{ModelError, MAX_SSE_EVENT_BYTES};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when the server named the event.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    previous_byte_was_cr: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk of the body and returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, ModelError> {
        let mut completed = Vec::new();
        for &byte in chunk {
            let previous_byte_was_cr = std::mem::replace(&mut self.previous_byte_was_cr, byte == b'\r');
            match byte {
                b'\n' if previous_byte_was_cr => {}
                b'\n' | b'\r' => {
                    if let Some(event) = self.end_line()? {
                        completed.push(event);
                    }
                }
                _ => {
                    if self.line.len() >= MAX_SSE_EVENT_BYTES {
                        return Err(too_large());
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(completed)
    }

    /// Ends the body: a last line or event without its terminating blank line still counts.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, ModelError> {
        if !self.line.is_empty() {
            if let Some(event) = self.end_line()? {
                return Ok(Some(event));
            }
        }
        Ok(self.dispatch())
    }

    fn end_line(&mut self) -> Result<Option<SseEvent>, ModelError> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        let line = String::from_utf8(line)
            .map_err(|error| ModelError::Malformed(format!("event stream line is not UTF-8: {error}")))?;
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > MAX_SSE_EVENT_BYTES {
                    return Err(too_large());
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
        })
    }
}

fn too_large() -> ModelError {
    ModelError::TooLarge {
        what: "one event-stream event".to_string(),
        limit_bytes: MAX_SSE_EVENT_BYTES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_chunks(body: &[u8], chunk_len: usize) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in body.chunks(chunk_len) {
            events.extend(parser.push(chunk).unwrap());
        }
        events.extend(parser.finish().unwrap());
        events
    }

    #[test]
    fn parses_events_whatever_the_chunking_and_line_endings() {
        let body = "event: message_start\ndata: {\"a\":1}\n\n: comment\r\ndata: é\r\ndata:two\r\n\r\ndata: [DONE]\r\r";
        let expected = vec![
            SseEvent {
                event: Some("message_start".to_string()),
                data: "{\"a\":1}".to_string(),
            },
            SseEvent {
                event: None,
                data: "é\ntwo".to_string(),
            },
            SseEvent {
                event: None,
                data: "[DONE]".to_string(),
            },
        ];
        for chunk_len in 1..body.len() {
            assert_eq!(
                parse_in_chunks(body.as_bytes(), chunk_len),
                expected,
                "chunk length {chunk_len}"
            );
        }
    }

    #[test]
    fn last_event_without_blank_line_counts() {
        assert_eq!(
            parse_in_chunks(b"data: x", 3),
            vec![SseEvent {
                event: None,
                data: "x".to_string()
            }]
        );
    }

    #[test]
    fn overlong_line_is_refused() {
        let mut parser = SseParser::new();
        let chunk = vec![b'a'; MAX_SSE_EVENT_BYTES + 1];
        assert!(matches!(parser.push(&chunk), Err(ModelError::TooLarge { .. })));
    }
}
