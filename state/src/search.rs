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
            if text.is_ascii() {
                // The lowercase of an ASCII text is its bytes' ASCII lowercase: folded on the
                // way, without a lowercased copy of a prompt of up to 256 KiB.
                signature.add_trigrams(text.as_bytes(), u8::to_ascii_lowercase);
            } else {
                signature.add_trigrams(text.to_lowercase().as_bytes(), |byte| *byte);
            }
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

    /// Sets the bit of every trigram of `bytes` as `fold` maps them (bytes 0, 1, 2 of a trigram
    /// in the low, middle and high byte of a `u32`).
    fn add_trigrams(&mut self, bytes: &[u8], fold: impl Fn(&u8) -> u8) {
        let [a, b, rest @ ..] = bytes else {
            return;
        };
        let mut words = self.0;
        let mut trigram = u32::from(fold(a)) << 8 | u32::from(fold(b)) << 16;
        for byte in rest {
            trigram = trigram >> 8 | u32::from(fold(byte)) << 16;
            // A multiplicative hash spreads similar trigrams over the bits; the top bits of the
            // product are the best mixed.
            let bit = (trigram.wrapping_mul(0x9E37_79B1) >> (32 - SIGNATURE_BITS.trailing_zeros())) as usize;
            words[bit / 64] |= 1 << (bit % 64);
        }
        self.0 = words;
    }
}

#[cfg(test)]
mod tests {
    use super::SearchSignature;

    /// The signature as defined: the lowercased text's byte windows of three.
    fn by_definition(text: &str) -> SearchSignature {
        let mut words = [0u64; super::WORDS];
        for window in text.to_lowercase().as_bytes().windows(3) {
            let trigram = u32::from(window[0]) | u32::from(window[1]) << 8 | u32::from(window[2]) << 16;
            let bit = (trigram.wrapping_mul(0x9E37_79B1) >> (32 - super::SIGNATURE_BITS.trailing_zeros())) as usize;
            words[bit / 64] |= 1 << (bit % 64);
        }
        SearchSignature(words)
    }

    #[test]
    fn the_signature_is_that_of_the_lowercased_texts_trigrams() {
        let texts = [
            "",
            "a",
            "ab",
            "abc",
            "Fix The BUILD please",
            "ÉTÉ À PARIS",
            "Kelvin \u{212A} sign",
            "ΣΑΣ mixed ASCII",
            "tabs\tand\nnewlines ~~~ [0-9]+ {}",
            "İstanbul",
        ];
        for text in texts {
            assert_eq!(SearchSignature::of_texts([text]), by_definition(text), "{text:?}");
        }
        let long: String = (0..5000).map(|i| char::from(b' ' + (i * 7 % 95) as u8)).collect();
        assert_eq!(SearchSignature::of_texts([long.as_str()]), by_definition(&long));
    }

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
