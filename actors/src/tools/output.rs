//! Capping text to a byte budget without splitting a character, and saying so.

/// Room kept for the note that says how much was cut, so that a capped text still fits.
const CUT_NOTE_ROOM_BYTES: usize = 48;

/// The note put where output was left out.
pub(crate) fn cut_note(omitted_bytes: u64) -> String {
    format!("[output cut: {omitted_bytes} bytes omitted]")
}

/// The largest index `<= index` that is a character boundary of `text`.
pub(crate) fn floor_char_boundary(text: &str, index: usize) -> usize {
    if index >= text.len() {
        return text.len();
    }
    let mut boundary = index;
    while !text.is_char_boundary(boundary) {
        boundary -= 1;
    }
    boundary
}

/// `text` if it fits in `max_bytes`; otherwise its beginning, cut on a character boundary, and a
/// note saying how many bytes were left out (the whole stays within `max_bytes` when the budget
/// leaves room for the note). The flag says whether anything was cut.
pub fn cap_text(text: &str, max_bytes: usize) -> (String, bool) {
    if text.len() <= max_bytes {
        return (text.to_string(), false);
    }
    let keep = floor_char_boundary(text, max_bytes.saturating_sub(CUT_NOTE_ROOM_BYTES));
    let omitted = (text.len() - keep) as u64;
    let mut capped = String::with_capacity(keep + CUT_NOTE_ROOM_BYTES);
    capped.push_str(&text[..keep]);
    if !capped.is_empty() && !capped.ends_with('\n') {
        capped.push('\n');
    }
    capped.push_str(&cut_note(omitted));
    (capped, true)
}

/// The first `max_bytes` of `bytes` as text (invalid UTF-8 replaced), cut on a character
/// boundary, and whether anything was left out.
pub(crate) fn head_text(bytes: &[u8], max_bytes: usize) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= max_bytes {
        return (text.into_owned(), false);
    }
    let keep = floor_char_boundary(&text, max_bytes);
    (text[..keep].to_string(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_whole() {
        assert_eq!(cap_text("hello", 100), ("hello".to_string(), false));
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_a_note() {
        let text = "é".repeat(100);
        let (capped, cut) = cap_text(&text, 101);
        assert!(cut);
        assert!(capped.len() <= 101, "{}", capped.len());
        let kept = capped.split('\n').next().unwrap();
        assert!(kept.chars().all(|character| character == 'é'));
        let omitted = text.len() - kept.len();
        assert!(
            capped.ends_with(&format!("[output cut: {omitted} bytes omitted]")),
            "{capped}"
        );
    }

    #[test]
    fn a_tiny_budget_still_says_what_was_cut() {
        let (capped, cut) = cap_text("abcdef", 2);
        assert!(cut);
        assert_eq!(capped, "[output cut: 6 bytes omitted]");
    }

    #[test]
    fn head_text_takes_the_beginning() {
        assert_eq!(head_text("añb".as_bytes(), 2), ("a".to_string(), true));
        assert_eq!(head_text(b"ab", 2), ("ab".to_string(), false));
    }
}
