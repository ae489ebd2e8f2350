//! [`Failure`], why a provider call failed on the guest's side of the WIT boundary, and the
//! readable rendering of a forge's error answers into one.

use crate::json::truncate_chars;

/// Longest forge message passed on in an error, in characters; a proxy's HTML error page
/// must not fill the node's log or the user's terminal.
pub const MAX_REMOTE_MESSAGE_CHARS: usize = 1000;

/// Why a provider call failed, before the HTTP transport is involved or after the forge
/// answered (mirrors the WIT `plugin-error` without its `http` case, which the glue passes on
/// from the host as it is). Its messages cross the WIT boundary as strings, by the interface's
/// design.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Unsupported(String),
    InvalidInput(String),
    Remote { status: u16, message: String },
}

/// A remote failure with `message` if the forge gave one, or else the start of the body, or
/// the status line when the body is empty. Cut to [`MAX_REMOTE_MESSAGE_CHARS`].
pub fn remote_failure(status: u16, message: Option<String>, body: &[u8]) -> Failure {
    let message = message
        .map(|message| message.trim().to_string())
        .filter(|message| !message.is_empty())
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                format!("HTTP {status} {} with an empty body", reason_phrase(status))
            } else {
                text.to_string()
            }
        });
    Failure::Remote {
        status,
        message: truncate_chars(&message, MAX_REMOTE_MESSAGE_CHARS),
    }
}

/// The usual reason phrase of the status codes forges answer with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The forge's refusal of a create, with why looking up the open pull request it spoke of
/// failed too.
pub fn refusal_with_failed_lookup(refused: Failure, lookup: Failure) -> Failure {
    let lookup = match lookup {
        Failure::Unsupported(message) | Failure::InvalidInput(message) => message,
        Failure::Remote { status, message } => format!("HTTP {status}: {message}"),
    };
    match refused {
        Failure::Remote { status, message } => Failure::Remote {
            status,
            message: format!("{message} (looking up the open pull request failed: {lookup})"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_fall_back_to_the_body_or_status_and_are_cut() {
        assert_eq!(
            remote_failure(502, None, b"<html>bad gateway</html>"),
            Failure::Remote {
                status: 502,
                message: "<html>bad gateway</html>".to_string()
            }
        );
        assert_eq!(
            remote_failure(401, None, b""),
            Failure::Remote {
                status: 401,
                message: "HTTP 401 Unauthorized with an empty body".to_string()
            }
        );
        let long = "x".repeat(MAX_REMOTE_MESSAGE_CHARS + 10);
        let Failure::Remote { message, .. } = remote_failure(500, Some(long), b"") else {
            panic!("expected a remote failure");
        };
        assert_eq!(message.chars().count(), MAX_REMOTE_MESSAGE_CHARS + 1);
    }

    #[test]
    fn refusals_keep_the_forges_words() {
        let refused = Failure::Remote {
            status: 422,
            message: "A pull request already exists".to_string(),
        };
        let lookup = Failure::Remote {
            status: 500,
            message: "boom".to_string(),
        };
        assert_eq!(
            refusal_with_failed_lookup(refused, lookup),
            Failure::Remote {
                status: 422,
                message: "A pull request already exists (looking up the open pull request failed: HTTP 500: boom)"
                    .to_string()
            }
        );
    }
}
