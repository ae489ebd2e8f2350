//! Confining paths to the workspace. Checked twice: lexically here (fast, and a clear message
//! for `../` and absolute paths), then in the machine with `realpath -m`, which also follows
//! symbolic links (see `script::PRELUDE`).

use super::WORKSPACE_DIR;

/// Why a path the model gave is refused; the message is the tool's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathRefused {
    #[error("{field} is empty")]
    Empty { field: String },
    #[error("{field} {input:?} contains a NUL byte")]
    NulByte { field: String, input: String },
    #[error("{}", outside_message(field, input, resolved))]
    Outside {
        field: String,
        input: String,
        resolved: String,
    },
}

/// `input` made absolute against `/workspace` and normalised (`.`, `..` and repeated `/`
/// removed) without touching any filesystem, or why it is refused.
pub(crate) fn lexical_workspace_path(field: &str, input: &str) -> Result<String, PathRefused> {
    if input.is_empty() {
        return Err(PathRefused::Empty {
            field: field.to_string(),
        });
    }
    if input.contains('\0') {
        return Err(PathRefused::NulByte {
            field: field.to_string(),
            input: input.to_string(),
        });
    }
    let mut components: Vec<&str> = Vec::new();
    if !input.starts_with('/') {
        components.extend(WORKSPACE_DIR.split('/').filter(|part| !part.is_empty()));
    }
    for part in input.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                components.pop();
            }
            name => components.push(name),
        }
    }
    let normalised = format!("/{}", components.join("/"));
    if is_within_workspace(&normalised) {
        Ok(normalised)
    } else {
        Err(PathRefused::Outside {
            field: field.to_string(),
            input: input.to_string(),
            resolved: normalised,
        })
    }
}

pub(crate) fn is_within_workspace(path: &str) -> bool {
    path == WORKSPACE_DIR
        || path
            .strip_prefix(WORKSPACE_DIR)
            .is_some_and(|rest| rest.starts_with('/'))
}

pub(crate) fn outside_message(field: &str, input: &str, resolved: &str) -> String {
    format!("{field} {input:?} is outside {WORKSPACE_DIR} (it resolves to {resolved}); only paths inside {WORKSPACE_DIR} are allowed")
}

/// How a path inside the workspace is shown to the model: relative to `/workspace`.
pub(crate) fn display_path(absolute: &str) -> String {
    match absolute.strip_prefix(WORKSPACE_DIR) {
        Some("") => ".".to_string(),
        Some(rest) => rest.trim_start_matches('/').to_string(),
        None => absolute.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_land_in_the_workspace() {
        assert_eq!(lexical_workspace_path("path", "a/b.txt").unwrap(), "/workspace/a/b.txt");
        assert_eq!(lexical_workspace_path("path", "./a//b/../c").unwrap(), "/workspace/a/c");
        assert_eq!(lexical_workspace_path("path", ".").unwrap(), "/workspace");
        assert_eq!(lexical_workspace_path("path", "/workspace/x").unwrap(), "/workspace/x");
        assert_eq!(lexical_workspace_path("path", "/workspace/").unwrap(), "/workspace");
    }

    #[test]
    fn escapes_are_refused_with_the_resolved_path() {
        let error = lexical_workspace_path("path", "../x").unwrap_err().to_string();
        assert!(error.contains("\"../x\" is outside /workspace"), "{error}");
        assert!(error.contains("resolves to /x"), "{error}");
        let error = lexical_workspace_path("path", "/etc/passwd").unwrap_err().to_string();
        assert!(error.contains("resolves to /etc/passwd"), "{error}");
        assert!(lexical_workspace_path("path", "/workspace-other/a").is_err());
        assert!(lexical_workspace_path("path", "a/../../workspace2").is_err());
        assert!(lexical_workspace_path("path", "/").is_err());
        assert!(lexical_workspace_path("path", "")
            .unwrap_err()
            .to_string()
            .contains("path is empty"));
        assert!(lexical_workspace_path("cwd", "a\0b")
            .unwrap_err()
            .to_string()
            .contains("NUL"));
    }

    #[test]
    fn display_paths_are_relative() {
        assert_eq!(display_path("/workspace"), ".");
        assert_eq!(display_path("/workspace/a/b"), "a/b");
    }
}
