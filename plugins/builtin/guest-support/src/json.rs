//! Reading JSON answers: fields at JSON pointers, and a readable rendering of whatever shape a
//! forge's message takes.

use serde_json::Value;

/// The body as JSON, if it is JSON.
pub fn parse_json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

/// The string at JSON pointer `pointer` (`/links/html/href`).
pub fn json_string(value: &Value, pointer: &str) -> Option<String> {
    value.pointer(pointer)?.as_str().map(str::to_string)
}

/// The unsigned number at JSON pointer `pointer`.
pub fn json_u64(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer)?.as_u64()
}

/// A readable rendering of a forge's message value: a string as it is, a list joined with
/// "; ", an object as `key: value` pairs (GitLab's `{"source_branch": ["is invalid"]}`).
pub fn render_message(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .map(render_message)
            .filter(|item| !item.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        Value::Object(fields) => fields
            .iter()
            .map(|(key, value)| format!("{key}: {}", render_message(value)))
            .collect::<Vec<_>>()
            .join("; "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The non-empty rendering of the field `key` of `value`, if it has one.
pub fn rendered_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).map(render_message).filter(|text| !text.is_empty())
}

/// `text` cut to `max_chars` characters, with `…` when something was cut.
pub(crate) fn truncate_chars(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_render_readably() {
        let gitlab = json!({"source_branch": ["is invalid", "is missing"], "title": ["can't be blank"]});
        assert_eq!(
            render_message(&gitlab),
            "source_branch: is invalid; is missing; title: can't be blank"
        );
        assert_eq!(rendered_field(&json!({"message": ""}), "message"), None);
        assert_eq!(
            rendered_field(&json!({"message": ["a"]}), "message").as_deref(),
            Some("a")
        );
        assert_eq!(truncate_chars("abcdef", 3), "abc…");
    }
}
