//! The arguments of each tool, as the model sends them (a JSON object, fields in snake_case).

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::ToolOutput;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunCommandArguments {
    pub command: String,
    pub cwd: Option<String>,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadFileArguments {
    pub path: String,
    pub start_line: Option<u64>,
    pub end_line: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteFileArguments {
    pub path: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EditFileArguments {
    pub path: String,
    pub old_string: String,
    pub new_string: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListDirArguments {
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchArguments {
    pub pattern: String,
    pub path: Option<String>,
    pub regex: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadTerminalArguments {
    pub name: String,
    pub lines: Option<usize>,
}

/// Parses a tool's arguments, or explains to the model what was wrong and where. Some models
/// send an empty string for a call without arguments: that is read as `{}`.
pub(crate) fn parse_arguments<T: DeserializeOwned>(tool: &str, arguments_json: &str) -> Result<T, ToolOutput> {
    let text = if arguments_json.trim().is_empty() {
        "{}"
    } else {
        arguments_json
    };
    let failure = |message: String| ToolOutput::failure(format!("invalid arguments for {tool}: {message}"));
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if path == "." || path.is_empty() {
            failure(inner.to_string())
        } else {
            failure(format!("field `{path}`: {inner}"))
        }
    })?;
    deserializer.end().map_err(|error| failure(error.to_string()))?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_arguments_parse() {
        let parsed: ReadFileArguments = parse_arguments("read_file", r#"{"path": "a.txt", "start_line": 2}"#).unwrap();
        assert_eq!(
            parsed,
            ReadFileArguments {
                path: "a.txt".into(),
                start_line: Some(2),
                end_line: None,
            }
        );
        let empty: ListDirArguments = parse_arguments("list_dir", "  ").unwrap();
        assert_eq!(empty, ListDirArguments { path: None });
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let failure = parse_arguments::<ReadFileArguments>("read_file", r#"{"path": 3}"#).unwrap_err();
        assert!(failure.failed);
        assert!(failure.content.contains("read_file"), "{}", failure.content);
        assert!(failure.content.contains("`path`"), "{}", failure.content);
        assert!(failure.content.contains("expected a string"), "{}", failure.content);
    }

    #[test]
    fn a_missing_or_unknown_field_is_named() {
        let missing = parse_arguments::<WriteFileArguments>("write_file", r#"{"path": "a"}"#).unwrap_err();
        assert!(
            missing.content.contains("missing field `content`"),
            "{}",
            missing.content
        );
        let unknown = parse_arguments::<ListDirArguments>("list_dir", r#"{"dir": "a"}"#).unwrap_err();
        assert!(unknown.content.contains("unknown field `dir`"), "{}", unknown.content);
    }

    #[test]
    fn malformed_json_is_refused() {
        let failure = parse_arguments::<ListDirArguments>("list_dir", r#"{"path": "a""#).unwrap_err();
        assert!(failure.failed);
        assert!(
            failure.content.starts_with("invalid arguments for list_dir:"),
            "{}",
            failure.content
        );
        let trailing = parse_arguments::<ListDirArguments>("list_dir", r#"{} {}"#).unwrap_err();
        assert!(trailing.content.contains("trailing characters"), "{}", trailing.content);
    }
}
