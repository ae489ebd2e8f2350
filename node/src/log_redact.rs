//! The node's own log output never carries a secret value: every log line goes through a
//! writer that replaces the values this node knows (every team, user and cluster secret it can
//! open, its node-level secrets, and the session credentials it made for machines) with
//! `[redacted:NAME]` before a byte reaches standard error. The set lives here, process-wide,
//! because the log subscriber is made before the node is; the node replaces it whenever the
//! replicated secrets change (see `server::secrets::follow_known_values`).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, RwLock};

use flotilla_actors::secrets::{Redactor, StreamRedactor};
use tracing_subscriber::fmt::MakeWriter;

/// The values the log writer redacts now.
static KNOWN: RwLock<Option<Arc<Redactor>>> = RwLock::new(None);
/// What the redactor is made of: the secrets the node knows, and session credentials it made.
static SOURCES: Mutex<Sources> = Mutex::new(Sources {
    known: Vec::new(),
    sessions: VecDeque::new(),
});

/// Session credential values kept; older ones expired long since.
const MAX_SESSION_VALUES: usize = 512;

struct Sources {
    known: Vec<(String, String)>,
    sessions: VecDeque<(String, String)>,
}

/// Replaces the secret values redacted from log lines (session credentials stay).
pub fn set_known_values(values: &[(String, String)]) {
    let mut sources = SOURCES.lock().expect("log redaction lock poisoned");
    sources.known = values.to_vec();
    rebuild(&sources);
}

/// Adds session credentials the node made for a machine.
pub fn remember_session_values(values: &[(String, String)]) {
    let mut sources = SOURCES.lock().expect("log redaction lock poisoned");
    sources.sessions.extend(values.iter().cloned());
    while sources.sessions.len() > MAX_SESSION_VALUES {
        sources.sessions.pop_front();
    }
    rebuild(&sources);
}

/// Each value is also redacted in the escaped forms a log line can carry it in (a `?` field's
/// debug quoting, a JSON string).
fn rebuild(sources: &Sources) {
    let mut forms: Vec<(&str, String)> = Vec::new();
    for (name, value) in sources.known.iter().chain(&sources.sessions) {
        forms.push((name, value.clone()));
        let debug = format!("{value:?}");
        let debug = debug[1..debug.len() - 1].to_string();
        let json = serde_json::to_string(value).unwrap_or_default();
        let json = json
            .get(1..json.len().saturating_sub(1))
            .unwrap_or_default()
            .to_string();
        for escaped in [debug, json] {
            if escaped != *value && !escaped.is_empty() {
                forms.push((name, escaped));
            }
        }
    }
    let redactor = Redactor::new(forms.iter().map(|(name, value)| (*name, value.as_str())));
    *KNOWN.write().expect("log redaction lock poisoned") = Some(Arc::new(redactor));
}

/// The values redacted now (empty before the node set any).
pub fn known() -> Arc<Redactor> {
    KNOWN
        .read()
        .expect("log redaction lock poisoned")
        .clone()
        .unwrap_or_default()
}

/// Wraps the subscriber's writer: each log line is written through a [`RedactingWriter`].
pub struct RedactingMakeWriter<M> {
    inner: M,
}

impl<M> RedactingMakeWriter<M> {
    pub fn new(inner: M) -> RedactingMakeWriter<M> {
        RedactingMakeWriter { inner }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMakeWriter<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter::new(self.inner.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        RedactingWriter::new(self.inner.make_writer_for(meta))
    }
}

/// One log line's writer. The line usually arrives in one write; a value cut between two
/// writes is still found, because the stream redactor holds back at most the longest value's
/// length until the writer is flushed or dropped.
pub struct RedactingWriter<W: Write> {
    inner: W,
    /// `None` when no value is known: bytes pass straight through.
    stream: Option<StreamRedactor>,
}

impl<W: Write> RedactingWriter<W> {
    fn new(inner: W) -> RedactingWriter<W> {
        let redactor = known();
        let stream = (!redactor.is_empty()).then(|| redactor.stream());
        RedactingWriter { inner, stream }
    }

    fn write_held(&mut self) -> std::io::Result<()> {
        if let Some(stream) = &mut self.stream {
            let rest = stream.finish();
            self.inner.write_all(&rest)?;
        }
        Ok(())
    }
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut self.stream {
            None => self.inner.write(bytes),
            Some(stream) => {
                let ready = stream.push(bytes);
                self.inner.write_all(&ready)?;
                Ok(bytes.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.write_held()?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for RedactingWriter<W> {
    fn drop(&mut self) {
        let _ = self.write_held();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, as the subscriber's would be.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_carry_names_instead_of_values_in_every_form() {
        set_known_values(&[
            ("TEAM_TOKEN".to_string(), "tok-\"quoted\"-123456".to_string()),
            ("PLAIN".to_string(), "plain-value-987".to_string()),
        ]);
        let out = Shared::default();
        let shared = out.clone();
        let make = RedactingMakeWriter::new(move || shared.clone());
        let subscriber = tracing_subscriber::fmt().with_writer(make).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(value = ?"tok-\"quoted\"-123456", "a line with plain-value-987 in it");
            tracing::info!("raw tok-\"quoted\"-123456 here");
        });
        let mut split = RedactingWriter::new(out.clone());
        split.write_all(b"cut plain-val").expect("write");
        split.write_all(b"ue-987 across writes\n").expect("write");
        drop(split);
        let text = String::from_utf8(out.0.lock().expect("buffer").clone()).expect("text");
        assert!(!text.contains("plain-value-987"), "{text}");
        assert!(!text.contains("quoted"), "{text}");
        assert!(text.contains("a line with [redacted:PLAIN] in it"), "{text}");
        assert!(
            text.contains("value=[redacted:TEAM_TOKEN]") || text.contains("value=\"[redacted:TEAM_TOKEN]\""),
            "{text}"
        );
        assert!(text.contains("raw [redacted:TEAM_TOKEN] here"), "{text}");
        assert!(text.contains("cut [redacted:PLAIN] across writes"), "{text}");
    }
}
