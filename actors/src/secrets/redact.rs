//! Replaces secret values with `[redacted:NAME]`: one Aho-Corasick automaton over every value
//! an agent's machine received (and the node's own secrets), applied where events are made,
//! where tool output goes back to the model, and to the node's log lines. Values shorter than
//! [`MIN_REDACTED_BYTES`] are not redacted: they would blank out ordinary words and numbers
//! while hiding nothing a guess would not find.

use std::borrow::Cow;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// Shortest value that is redacted.
pub const MIN_REDACTED_BYTES: usize = 6;

/// Finds and replaces a fixed set of values.
#[derive(Clone, Default)]
pub struct Redactor {
    matcher: Option<AhoCorasick>,
    /// Replacement text per pattern, in the automaton's order.
    replacements: Vec<String>,
    longest: usize,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Redactor")
            .field("values", &self.replacements.len())
            .finish()
    }
}

impl Redactor {
    /// A redactor for `(name, value)` pairs. A value given under two names is redacted under
    /// the first; where one value holds another, the longer one wins where both match.
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a str)>) -> Redactor {
        let mut values: Vec<&str> = Vec::new();
        let mut replacements = Vec::new();
        for (name, value) in secrets {
            if value.len() < MIN_REDACTED_BYTES || values.contains(&value) {
                continue;
            }
            values.push(value);
            replacements.push(format!("[redacted:{name}]"));
        }
        if values.is_empty() {
            return Redactor::default();
        }
        let longest = values.iter().map(|value| value.len()).max().unwrap_or(0);
        let matcher = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&values)
            .expect("a few thousand literal values always build");
        Redactor {
            matcher: Some(matcher),
            replacements,
            longest,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// `text` with every value replaced.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let Some(matcher) = &self.matcher else {
            return Cow::Borrowed(text);
        };
        if !matcher.is_match(text) {
            return Cow::Borrowed(text);
        }
        Cow::Owned(matcher.replace_all(text, &self.replacements))
    }

    /// `bytes` with every value replaced (for writers that see bytes, not text).
    pub fn redact_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        match &self.matcher {
            Some(matcher) => matcher.replace_all_bytes(bytes, &self.replacements),
            None => bytes.to_vec(),
        }
    }

    /// The length of the longest value, in bytes: a stream holds back one byte less.
    pub fn longest_bytes(&self) -> usize {
        self.longest
    }

    /// Redacts `text` in place.
    pub fn redact_in_place(&self, text: &mut String) {
        if let Cow::Owned(redacted) = self.redact(text) {
            *text = redacted;
        }
    }

    /// A redactor for output that arrives in chunks.
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor {
            redactor: self.clone(),
            tail: Vec::new(),
        }
    }
}

/// A redactor that can be replaced while it is in use: a run's, whose values change when its
/// session credentials are renewed. Clones share one current redactor.
#[derive(Clone, Default, Debug)]
pub struct SharedRedactor(std::sync::Arc<std::sync::RwLock<Redactor>>);

impl From<Redactor> for SharedRedactor {
    fn from(redactor: Redactor) -> SharedRedactor {
        SharedRedactor(std::sync::Arc::new(std::sync::RwLock::new(redactor)))
    }
}

impl SharedRedactor {
    /// The redactor in use now.
    pub fn current(&self) -> Redactor {
        self.0.read().expect("redactor lock poisoned").clone()
    }

    /// Replaces the redactor for every clone.
    pub fn replace(&self, redactor: Redactor) {
        *self.0.write().expect("redactor lock poisoned") = redactor;
    }

    pub fn is_empty(&self) -> bool {
        self.0.read().expect("redactor lock poisoned").is_empty()
    }

    /// `text` with every current value replaced.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        self.0.read().expect("redactor lock poisoned").redact(text)
    }

    pub fn redact_in_place(&self, text: &mut String) {
        self.0.read().expect("redactor lock poisoned").redact_in_place(text);
    }

    /// A stream redactor over the current values.
    pub fn stream(&self) -> StreamRedactor {
        self.0.read().expect("redactor lock poisoned").stream()
    }
}

/// Redacts a byte stream cut into arbitrary chunks: it holds back the last `longest - 1` bytes
/// of what it saw, so that a value split between two chunks is still found.
pub struct StreamRedactor {
    redactor: Redactor,
    tail: Vec<u8>,
}

impl StreamRedactor {
    /// Takes the next chunk; answers what can be passed on now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let Some(matcher) = &self.redactor.matcher else {
            return chunk.to_vec();
        };
        self.tail.extend_from_slice(chunk);
        let buffer = std::mem::take(&mut self.tail);
        // A match that starts before `safe` fits whole in the buffer: no later byte changes it.
        let safe = buffer.len().saturating_sub(self.redactor.longest - 1);
        let mut out = Vec::with_capacity(buffer.len());
        let mut at = 0;
        for found in matcher.find_iter(&buffer) {
            if found.start() >= safe {
                break;
            }
            out.extend_from_slice(&buffer[at..found.start()]);
            out.extend_from_slice(self.redactor.replacements[found.pattern().as_usize()].as_bytes());
            at = found.end();
        }
        let keep_from = at.max(safe);
        out.extend_from_slice(&buffer[at..keep_from]);
        self.tail = buffer[keep_from..].to_vec();
        out
    }

    /// The bytes held back, redacted: the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let tail = std::mem::take(&mut self.tail);
        self.redactor.redact_bytes(&tail)
    }

    /// Bytes held back now: never more than the longest value less one, plus the end of a
    /// character cut between chunks.
    pub fn held_bytes(&self) -> usize {
        self.tail.len()
    }

    /// [`push`](Self::push) for text: what is passed on ends on a character boundary (the
    /// rest of a character cut by the hold-back waits for the next chunk), so every piece is
    /// text of its own.
    pub fn push_str(&mut self, chunk: &str) -> String {
        let mut out = self.push(chunk.as_bytes());
        // Every chunk is whole text and values are text, so the bytes passed on are whole text
        // except where the hold-back cut a character: that end goes back to the tail.
        let complete = match std::str::from_utf8(&out) {
            Ok(_) => out.len(),
            Err(error) => error.valid_up_to(),
        };
        let mut cut = out.split_off(complete);
        cut.append(&mut self.tail);
        self.tail = cut;
        String::from_utf8(out).expect("cut at the end of the last whole character")
    }

    /// [`finish`](Self::finish) for text.
    pub fn finish_str(&mut self) -> String {
        String::from_utf8_lossy(&self.finish()).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_replaced_by_their_names() {
        let redactor = Redactor::new([("TOKEN", "tok-123456"), ("PASSWORD", "hunter22")]);
        assert_eq!(
            redactor.redact("a tok-123456 b hunter22 c tok-123456"),
            "a [redacted:TOKEN] b [redacted:PASSWORD] c [redacted:TOKEN]"
        );
        assert!(matches!(redactor.redact("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn short_values_are_left_alone() {
        let redactor = Redactor::new([("PIN", "12345"), ("KEY", "abcdef")]);
        assert_eq!(redactor.redact("12345 abcdef"), "12345 [redacted:KEY]");
        assert!(Redactor::new([("PIN", "1")]).is_empty());
    }

    #[test]
    fn overlapping_values_redact_the_longest() {
        let redactor = Redactor::new([
            ("SHORT", "secret-1"),
            ("LONG", "secret-1-extended"),
            ("SAME", "secret-1"),
        ]);
        assert_eq!(
            redactor.redact("x secret-1-extended y secret-1 z"),
            "x [redacted:LONG] y [redacted:SHORT] z"
        );
    }

    #[test]
    fn a_value_split_across_chunks_is_found() {
        let redactor = Redactor::new([("TOKEN", "tok-abcdef-123"), ("OTHER", "zyxwvu")]);
        let text = b"start tok-abcdef-123 middle zyxwvu end tok-abcdef-123";
        for size in 1..text.len() {
            let mut stream = redactor.stream();
            let mut out = Vec::new();
            for chunk in text.chunks(size) {
                out.extend(stream.push(chunk));
            }
            out.extend(stream.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "start [redacted:TOKEN] middle [redacted:OTHER] end [redacted:TOKEN]",
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn a_value_split_at_every_offset_never_shows_and_text_stays_whole() {
        let value = "sk-é-abcdef-ü-123456";
        let redactor = Redactor::new([("MODEL_KEY", value), ("OTHER", "zyxwvu-ß")]);
        let text = format!("Here is the key: {value}. Done ✓ zyxwvu-ß!");
        let expected = "Here is the key: [redacted:MODEL_KEY]. Done ✓ [redacted:OTHER]!";
        let boundaries: Vec<usize> = (0..=text.len()).filter(|at| text.is_char_boundary(*at)).collect();
        for first in &boundaries {
            for second in boundaries.iter().filter(|second| *second >= first) {
                let mut stream = redactor.stream();
                let mut pieces = Vec::new();
                for chunk in [&text[..*first], &text[*first..*second], &text[*second..]] {
                    pieces.push(stream.push_str(chunk));
                    assert!(stream.held_bytes() < value.len() + 4, "held {}", stream.held_bytes());
                }
                pieces.push(stream.finish_str());
                for piece in &pieces {
                    assert!(!piece.contains("abcdef"), "{piece:?} shows part of a value");
                }
                assert_eq!(pieces.concat(), expected, "cut at {first} and {second}");
            }
        }
    }

    #[test]
    fn a_split_longer_value_wins_over_its_prefix() {
        let redactor = Redactor::new([("SHORT", "secret-1"), ("LONG", "secret-1-extended")]);
        let mut stream = redactor.stream();
        let mut out = stream.push(b"x secret-1");
        out.extend(stream.push(b"-extended y"));
        out.extend(stream.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "x [redacted:LONG] y");
    }

    /// Prints the cost of redacting a MiB of output with a hundred values (run with
    /// `--nocapture` to see it); asserts only that it is found everywhere.
    #[test]
    fn redaction_cost_per_mib() {
        let values: Vec<(String, String)> = (0..100)
            .map(|index| (format!("NAME_{index}"), format!("value-{index:04}-{}", "x".repeat(16))))
            .collect();
        let redactor = Redactor::new(values.iter().map(|(name, value)| (name.as_str(), value.as_str())));
        let mut text = String::new();
        while text.len() < 1024 * 1024 {
            text.push_str("an ordinary line of tool output, with numbers 0123456789\n");
            if text.len().is_multiple_of(7) {
                text.push_str(&values[42].1);
            }
        }
        text.push_str(&values[42].1);
        let started = std::time::Instant::now();
        let redacted = redactor.redact(&text);
        let elapsed = started.elapsed();
        assert!(!redacted.contains(&values[42].1));
        assert!(redacted.contains("[redacted:NAME_42]"));
        println!("redacting 1 MiB with 100 values took {elapsed:?}");
    }
}
