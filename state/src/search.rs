//! A fixed-size signature of the text a `ListAgents` search looks in (an agent's name, prompt
//! and summary), so that a search skips most records without lowercasing them.
//!
//! A search matches a record when the lowercase of one of its texts contains the lowercase
//! needle. Every byte trigram of the lowercase needle is then a byte trigram of that lowercase
//! text, so a record whose signature lacks one of the needle's trigram bits cannot match: the
//! signature answers "cannot match" or "may match", never wrongly "cannot". A record that may
//! match is still checked against its text, so results are exactly those of a full scan.
//!
//! Each trigram sets one of [`SIGNATURE_BITS`] bits (a Bloom filter with one hash). The
//! signature's size does not depend on the text: a prompt of 256 KiB sets most bits and is
//! then a candidate for every search, which costs time on that record only, never memory. A
//! needle shorter than three bytes has no trigram and every record is a candidate.

use std::sync::OnceLock;

use crate::types::AgentRecord;

/// Bits in one signature.
pub const SIGNATURE_BITS: usize = 512;
const WORDS: usize = SIGNATURE_BITS / 64;

/// Which trigram bits the lowercase texts of one agent (or one needle) set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SearchSignature([u64; WORDS]);

impl SearchSignature {
    /// The signature of texts as a search sees them: each lowercased, trigrams within one text.
    pub fn of_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> SearchSignature {
        let mut signature = SearchSignature::default();
        for text in texts {
            signature.add_lowercase(&text.to_lowercase());
        }
        signature
    }

    /// The signature of the texts a search looks in: the agent's name, prompt and summary.
    pub fn of_record(record: &AgentRecord) -> SearchSignature {
        SearchSignature::of_texts(
            [record.spec.name.as_str(), record.spec.prompt.as_str()]
                .into_iter()
                .chain(record.summary.as_deref()),
        )
    }

    /// The bits a search for `needle` requires (empty for a needle under three bytes once
    /// lowercased).
    pub fn of_needle(needle: &str) -> SearchSignature {
        SearchSignature::of_texts([needle])
    }

    /// Whether a record with this signature may hold `needle` (whose signature is `needle`).
    pub fn may_contain(&self, needle: &SearchSignature) -> bool {
        // A plain loop over the words: a search tests tens of thousands of signatures per page,
        // and in an unoptimised build iterator adapters cost a call each.
        for word in 0..WORDS {
            if self.0[word] & needle.0[word] != needle.0[word] {
                return false;
            }
        }
        true
    }

    fn add_lowercase(&mut self, lowercase: &str) {
        for window in lowercase.as_bytes().windows(3) {
            let trigram = u32::from(window[0]) | u32::from(window[1]) << 8 | u32::from(window[2]) << 16;
            // A multiplicative hash spreads similar trigrams over the bits; the top bits of the
            // product are the best mixed.
            let bit = (trigram.wrapping_mul(0x9E37_79B1) >> (32 - SIGNATURE_BITS.trailing_zeros())) as usize;
            self.0[bit / 64] |= 1 << (bit % 64);
        }
    }
}

/// An agent's signature, taken the first time a search needs it rather than when the agent is
/// applied: every node applies every create, and hashing the prompt there (2.5-3 % of the
/// members' CPU at 64 clients) was work for searches most records never meet. A search takes
/// the signatures it walks once each; a summary change gives the agent a new, empty cell. The
/// cell takes its record as an argument, so it must only ever be asked with that agent's record.
#[derive(Debug, Default)]
pub struct LazySignature(OnceLock<SearchSignature>);

impl LazySignature {
    /// The signature of `record` (the agent this cell belongs to), taken now if no search took
    /// it before. Concurrent searches take it once.
    pub fn of(&self, record: &AgentRecord) -> SearchSignature {
        *self.0.get_or_init(|| SearchSignature::of_record(record))
    }

    /// The signature, when a search (or a rebuild) has taken it.
    pub fn taken(&self) -> Option<SearchSignature> {
        self.0.get().copied()
    }
}

impl Clone for LazySignature {
    fn clone(&self) -> Self {
        match self.taken() {
            Some(signature) => LazySignature(OnceLock::from(signature)),
            None => LazySignature::default(),
        }
    }
}

/// Two cells of the same record are equal whether or not a search has filled either: the
/// signature is a function of the record, and states compare by their records. Filled cells
/// must hold the same bits.
impl PartialEq for LazySignature {
    fn eq(&self, other: &Self) -> bool {
        match (self.taken(), other.taken()) {
            (Some(mine), Some(theirs)) => mine == theirs,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SearchSignature;

    #[test]
    fn a_text_holding_a_needle_may_contain_it() {
        let texts = ["Fix the Build", "ÉTÉ À PARIS", "Kelvin \u{212A} sign", "", "abc"];
        let needles = [
            "build", "fix the", "été", "k", "à p", "", "xyz", "abcd", "kelvin k", "THE b",
        ];
        for text in texts {
            let signature = SearchSignature::of_texts([text]);
            for needle in needles {
                if text.to_lowercase().contains(&needle.to_lowercase()) {
                    assert!(
                        signature.may_contain(&SearchSignature::of_needle(needle)),
                        "{text:?} holds {needle:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_signature_rules_out_most_absent_needles() {
        let signature = SearchSignature::of_texts(["refactor the parser", "agent-17"]);
        let ruled_out = ["database migration", "kubernetes", "zzzz", "qwerty"]
            .iter()
            .filter(|needle| !signature.may_contain(&SearchSignature::of_needle(needle)))
            .count();
        assert!(ruled_out >= 3, "only {ruled_out} absent needles ruled out");
    }
}
