//! The search signature never rules out a record a full scan would match: for any text and any
//! slice of it, in any case, the signature of the text may contain the slice.

use flotilla_state::search::SearchSignature;
use proptest::prelude::*;

/// A text mixing ASCII, accented and case-changing characters (the Kelvin sign lowercases to
/// `k`, `İ` to two characters), and a slice of it given by two fractions of its length.
fn text_and_slice() -> impl Strategy<Value = (String, String)> {
    let text = proptest::collection::vec(
        prop_oneof![
            4 => proptest::char::range('a', 'z'),
            2 => proptest::char::range('A', 'Z'),
            1 => Just(' '),
            1 => proptest::sample::select(vec!['É', 'é', 'À', '\u{212A}', 'İ', 'Σ', 'ς', 'ß', '日']),
            1 => any::<char>(),
        ],
        0..40,
    )
    .prop_map(|chars| chars.into_iter().collect::<String>());
    (text, 0.0..1.0f64, 0.0..1.0f64).prop_map(|(text, from, to)| {
        let chars: Vec<char> = text.chars().collect();
        let (from, to) = (from.min(to), from.max(to));
        let from = (from * chars.len() as f64) as usize;
        let to = (to * chars.len() as f64) as usize;
        let slice: String = chars[from..to].iter().collect();
        (text, slice)
    })
}

proptest! {
    #[test]
    fn a_text_may_contain_every_needle_a_scan_finds_in_it(
        (text, slice) in text_and_slice(),
        other in "[a-zA-Z ]{0,12}",
        upper in any::<bool>(),
    ) {
        let needle = if upper { slice.to_uppercase() } else { slice.clone() };
        let signature = SearchSignature::of_texts([other.as_str(), text.as_str()]);
        if text.to_lowercase().contains(&needle.to_lowercase()) {
            prop_assert!(
                signature.may_contain(&SearchSignature::of_needle(&needle)),
                "{:?} holds {:?} but its signature rules it out", text, needle
            );
        }
    }
}
