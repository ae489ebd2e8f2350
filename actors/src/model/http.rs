//! The HTTP side shared by the providers: retries with bounded backoff, the provider's error
//! message from an error body, the whole-turn and idle-stream timeouts, the event-stream read
//! loop that feeds a wire-format assembler, and the bounded read of a whole (not streamed)
//! response that feeds a wire-format parser.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc::Sender;

use flotilla_raft::retry::RetryPolicy;

use super::sse::{SseEvent, SseParser};
use super::MAX_WHOLE_RESPONSE_BYTES;
use super::{emit, ModelError, StreamEvent, TurnResponse, MAX_ERROR_BODY_BYTES};

/// Waits between attempts at a model request; the number of retries is the model's own
/// (`max_retries`).
pub(crate) const MODEL_REQUEST_RETRY: RetryPolicy = RetryPolicy {
    first_delay_ms: 200,
    max_delay_ms: 5_000,
    max_retries: None,
};
/// Longest `retry-after` honoured; a server asking for more waits this long.
pub(crate) const MAX_RETRY_AFTER_MS: u64 = 30_000;
const MAX_CONNECT_TIMEOUT_MS: u64 = 30_000;
/// Longest provider message or body excerpt kept in an error.
const MAX_ERROR_MESSAGE_CHARS: usize = 2_000;

#[derive(Debug, Clone)]
pub(crate) struct HttpSettings {
    /// Without a trailing slash.
    pub(crate) base_url: String,
    pub(crate) timeout_ms: u64,
    pub(crate) stream_idle_timeout_ms: u64,
    pub(crate) max_retries: u32,
}

/// Turns the events of one provider's stream into [`StreamEvent`]s and a [`TurnResponse`].
pub(crate) trait StreamAssembly {
    /// Handles one SSE event, pushing the stream events it produces onto `out`.
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ModelError>;
    /// True once the provider has said the response is complete.
    fn is_complete(&self) -> bool;
    /// The assembled response, once the stream has ended.
    fn finish(self) -> Result<TurnResponse, ModelError>;
}

pub(crate) fn build_client(settings: &HttpSettings) -> Result<reqwest::Client, ModelError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(settings.timeout_ms.min(MAX_CONNECT_TIMEOUT_MS)))
        .build()
        .map_err(|error| ModelError::Config(format!("cannot build the HTTP client: {}", error_chain(&error))))
}

/// Runs one streamed turn within the whole-turn timeout: sends with retries, then feeds the
/// event stream to `assembly`, emitting its events, and finally emits [`StreamEvent::Done`].
pub(crate) async fn run_streamed_turn<A: StreamAssembly>(
    settings: &HttpSettings,
    make_request: &(dyn Fn() -> reqwest::RequestBuilder + Send + Sync),
    assembly: A,
    events: &Sender<StreamEvent>,
) -> Result<TurnResponse, ModelError> {
    within_turn_timeout(settings, stream_turn(settings, make_request, assembly, events)).await
}

/// Runs one turn whose response comes whole within the whole-turn timeout: sends with the same
/// retries as a streamed turn, reads the body (at most [`MAX_WHOLE_RESPONSE_BYTES`], with the
/// idle timeout between its pieces), hands it to `parse`, and emits the response as events
/// (see [`whole_response_events`]) so watchers see the turn as if it had streamed at once.
pub(crate) async fn run_whole_turn(
    settings: &HttpSettings,
    make_request: &(dyn Fn() -> reqwest::RequestBuilder + Send + Sync),
    parse: fn(&[u8]) -> Result<TurnResponse, ModelError>,
    events: &Sender<StreamEvent>,
) -> Result<TurnResponse, ModelError> {
    within_turn_timeout(settings, whole_turn(settings, make_request, parse, events)).await
}

async fn within_turn_timeout(
    settings: &HttpSettings,
    turn: impl Future<Output = Result<TurnResponse, ModelError>>,
) -> Result<TurnResponse, ModelError> {
    let whole_turn = Duration::from_millis(settings.timeout_ms);
    match tokio::time::timeout(whole_turn, turn).await {
        Ok(outcome) => outcome,
        Err(_elapsed) => Err(ModelError::Timeout {
            after_ms: settings.timeout_ms,
        }),
    }
}

async fn whole_turn(
    settings: &HttpSettings,
    make_request: &(dyn Fn() -> reqwest::RequestBuilder + Send + Sync),
    parse: fn(&[u8]) -> Result<TurnResponse, ModelError>,
    events: &Sender<StreamEvent>,
) -> Result<TurnResponse, ModelError> {
    let (response, attempts) = send_with_retries(settings, make_request).await?;
    let body = read_whole_body(settings, response, attempts).await?;
    let response = parse(&body).map_err(|error| with_attempts(error, attempts))?;
    for event in whole_response_events(&response) {
        emit(events, event).await;
    }
    Ok(response)
}

/// Reads a successful response's body, failing past [`MAX_WHOLE_RESPONSE_BYTES`] or after
/// `stream_idle_timeout_ms` without a piece.
async fn read_whole_body(
    settings: &HttpSettings,
    mut response: reqwest::Response,
    attempts: u32,
) -> Result<Vec<u8>, ModelError> {
    let too_large = || ModelError::TooLarge {
        what: "the response body".to_string(),
        limit_bytes: MAX_WHOLE_RESPONSE_BYTES,
    };
    if response
        .content_length()
        .is_some_and(|length| length > MAX_WHOLE_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let idle = Duration::from_millis(settings.stream_idle_timeout_ms);
    let mut body = Vec::new();
    loop {
        let next = tokio::time::timeout(idle, response.chunk())
            .await
            .map_err(|_elapsed| ModelError::Timeout {
                after_ms: settings.stream_idle_timeout_ms,
            })?;
        match next {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_WHOLE_RESPONSE_BYTES {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(error) => {
                return Err(ModelError::Unavailable {
                    attempts,
                    last: format!("reading the response body: {}", error_chain(&error)),
                })
            }
        }
    }
}

/// The events a whole response stands for: its text as one delta, each tool call started and
/// given all its arguments in one delta, then [`StreamEvent::Done`].
pub(crate) fn whole_response_events(response: &TurnResponse) -> Vec<StreamEvent> {
    let mut events = Vec::with_capacity(2 + 2 * response.tool_calls.len());
    if !response.text.is_empty() {
        events.push(StreamEvent::TextDelta(response.text.clone()));
    }
    for call in &response.tool_calls {
        events.push(StreamEvent::ToolCallStarted {
            id: call.id.clone(),
            name: call.name.clone(),
        });
        events.push(StreamEvent::ToolCallArgumentsDelta {
            id: call.id.clone(),
            delta: call.arguments_json.clone(),
        });
    }
    events.push(StreamEvent::Done(response.clone()));
    events
}

async fn stream_turn<A: StreamAssembly>(
    settings: &HttpSettings,
    make_request: &(dyn Fn() -> reqwest::RequestBuilder + Send + Sync),
    mut assembly: A,
    events: &Sender<StreamEvent>,
) -> Result<TurnResponse, ModelError> {
    let (response, attempts) = send_with_retries(settings, make_request).await?;
    if let Some(content_type) = response.headers().get(reqwest::header::CONTENT_TYPE) {
        let content_type = String::from_utf8_lossy(content_type.as_bytes()).into_owned();
        if !content_type.to_ascii_lowercase().starts_with("text/event-stream") {
            let body = read_bounded_body(response).await;
            return Err(ModelError::Malformed(format!(
                "expected an event stream (text/event-stream), found {content_type:?}: {}",
                excerpt(&String::from_utf8_lossy(&body))
            )));
        }
    }
    let idle = Duration::from_millis(settings.stream_idle_timeout_ms);
    let mut body = response.bytes_stream();
    let mut parser = SseParser::new();
    let mut produced = Vec::new();
    while !assembly.is_complete() {
        let next = tokio::time::timeout(idle, body.next())
            .await
            .map_err(|_elapsed| ModelError::Timeout {
                after_ms: settings.stream_idle_timeout_ms,
            })?;
        let parsed = match next {
            Some(Ok(chunk)) => parser.push(&chunk)?,
            Some(Err(error)) => {
                return Err(ModelError::Unavailable {
                    attempts,
                    last: format!("reading the response stream: {}", error_chain(&error)),
                })
            }
            None => {
                if let Some(event) = parser.finish()? {
                    assembly
                        .on_event(event, &mut produced)
                        .map_err(|error| with_attempts(error, attempts))?;
                }
                for event in produced.drain(..) {
                    emit(events, event).await;
                }
                break;
            }
        };
        for event in parsed {
            assembly
                .on_event(event, &mut produced)
                .map_err(|error| with_attempts(error, attempts))?;
            for event in produced.drain(..) {
                emit(events, event).await;
            }
            if assembly.is_complete() {
                break;
            }
        }
    }
    let response = assembly.finish()?;
    emit(events, StreamEvent::Done(response.clone())).await;
    Ok(response)
}

/// Sends until a 2xx response, retrying 408, 429, 5xx and transport errors with backoff.
/// Returns the response and the number of attempts made.
async fn send_with_retries(
    settings: &HttpSettings,
    make_request: &(dyn Fn() -> reqwest::RequestBuilder + Send + Sync),
) -> Result<(reqwest::Response, u32), ModelError> {
    let mut delays = MODEL_REQUEST_RETRY
        .with_max_retries(settings.max_retries as usize)
        .delays();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (retry_after_ms, last) = match make_request().send().await {
            Ok(response) if response.status().is_success() => return Ok((response, attempts)),
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after_ms = parse_retry_after_ms(response.headers());
                let message = provider_error_message(&read_bounded_body(response).await);
                if !is_retryable_status(status) {
                    return Err(ModelError::Rejected { status, message });
                }
                (retry_after_ms, format!("http {status}: {message}"))
            }
            Err(error) if error.is_builder() => {
                return Err(ModelError::Config(format!(
                    "cannot build the request: {}",
                    error_chain(&error)
                )))
            }
            Err(error) => (None, error_chain(&error)),
        };
        let Some(backoff) = delays.next() else {
            return Err(ModelError::Unavailable { attempts, last });
        };
        tracing::debug!(attempts, %last, "model request failed; retrying");
        tokio::time::sleep(retry_delay(backoff, retry_after_ms)).await;
    }
}

/// Stream assemblers and whole-response parsers report in-response failures with 0 attempts;
/// the count is known here.
fn with_attempts(error: ModelError, attempts: u32) -> ModelError {
    match error {
        ModelError::Unavailable { attempts: 0, last } => ModelError::Unavailable { attempts, last },
        other => other,
    }
}

fn is_retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// The wait after a failed attempt: the server's `retry-after` when it sent one (capped),
/// otherwise the policy's `backoff`.
pub(crate) fn retry_delay(backoff: Duration, retry_after_ms: Option<u64>) -> Duration {
    match retry_after_ms {
        Some(retry_after_ms) => Duration::from_millis(retry_after_ms.min(MAX_RETRY_AFTER_MS)),
        None => backoff,
    }
}

/// `retry-after` in seconds (an HTTP date is ignored and backoff applies instead).
fn parse_retry_after_ms(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let seconds: f64 = value.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| (seconds.min(MAX_RETRY_AFTER_MS as f64 / 1000.0) * 1000.0) as u64)
}

async fn read_bounded_body(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ERROR_BODY_BYTES - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The provider's own message from an error body: `error.message` (OpenAI and Anthropic),
/// `error` as a string or a top-level `message` (some compatible servers), else the body text.
pub(crate) fn provider_error_message(body: &[u8]) -> String {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let message = json
            .pointer("/error/message")
            .and_then(|value| value.as_str())
            .or_else(|| json.get("error").and_then(|value| value.as_str()))
            .or_else(|| json.get("message").and_then(|value| value.as_str()));
        if let Some(message) = message {
            return excerpt(message);
        }
    }
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        "empty error body".to_string()
    } else {
        excerpt(text.trim())
    }
}

fn excerpt(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// An error with its sources, which is where reqwest puts the useful part ("connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_retry_after_is_honoured_within_limits() {
        let delays: Vec<u64> = MODEL_REQUEST_RETRY
            .with_max_retries(7)
            .delays()
            .map(|backoff| retry_delay(backoff, None).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![200, 400, 800, 1600, 3200, 5000, 5000]);
        let first_backoff = Duration::from_millis(200);
        assert_eq!(retry_delay(first_backoff, Some(2_000)), Duration::from_secs(2));
        assert_eq!(
            retry_delay(first_backoff, Some(3_600_000)),
            Duration::from_millis(MAX_RETRY_AFTER_MS)
        );
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(parse_retry_after_ms(&headers), Some(3_000));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after_ms(&headers), None);
    }

    #[test]
    fn error_message_comes_from_the_body() {
        let openai = br#"{"error":{"message":"Invalid model","type":"invalid_request_error"}}"#;
        assert_eq!(provider_error_message(openai), "Invalid model");
        let anthropic =
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: required"}}"#;
        assert_eq!(provider_error_message(anthropic), "max_tokens: required");
        assert_eq!(
            provider_error_message(br#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(provider_error_message(b"Bad Gateway\n"), "Bad Gateway");
        assert_eq!(provider_error_message(b""), "empty error body");
    }
}
