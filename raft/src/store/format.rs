//! The state format a data dir was written in, kept in `DATA_DIR/state-format` (one decimal
//! number). A node refuses a data dir stamped newer than its own [`crate::STATE_FORMAT_VERSION`]
//! (a downgrade would misread records it does not know) and stamps its own otherwise. A data
//! dir with no stamp was written before formats were numbered: format 1.

use std::io::Write as _;
use std::path::{Path, PathBuf};

pub const STATE_FORMAT_FILE: &str = "state-format";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "data dir {dir} holds state format {found}, newer than this binary's {supported}: start it with a flotilla that reads format {found} (a downgrade is not supported)"
    )]
    Newer { dir: String, found: u32, supported: u32 },
    #[error("{path} does not hold a state format version (a number), found {found:?}")]
    Malformed { path: String, found: String },
    #[error("cannot read or write {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn stamp_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE_FORMAT_FILE)
}

/// The format the data dir is stamped with, if any.
pub fn stored_state_format(data_dir: &Path) -> Result<Option<u32>, FormatError> {
    let path = stamp_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FormatError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    text.trim().parse().map(Some).map_err(|_| FormatError::Malformed {
        path: path.display().to_string(),
        found: text.trim().chars().take(40).collect(),
    })
}

/// Refuses a data dir stamped newer than `supported`, and stamps `supported` (through a
/// temporary file and a rename, synced) when it is not stamped with it already.
pub fn check_and_stamp(data_dir: &Path, supported: u32) -> Result<(), FormatError> {
    match stored_state_format(data_dir)? {
        Some(found) if found > supported => Err(FormatError::Newer {
            dir: data_dir.display().to_string(),
            found,
            supported,
        }),
        Some(found) if found == supported => Ok(()),
        _ => stamp(data_dir, supported),
    }
}

fn stamp(data_dir: &Path, version: u32) -> Result<(), FormatError> {
    let path = stamp_path(data_dir);
    let temporary = path.with_extension("tmp");
    let io = |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    writeln!(file, "{version}").map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, &path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_stamp_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().expect("temp dir");
        check_and_stamp(dir.path(), 1).expect("stamps a fresh dir");
        assert_eq!(stored_state_format(dir.path()).expect("reads"), Some(1));
        std::fs::write(dir.path().join(STATE_FORMAT_FILE), "7\n").expect("write");
        let message = check_and_stamp(dir.path(), 1).expect_err("refused").to_string();
        assert!(
            message.contains("state format 7") && message.contains("binary's 1"),
            "{message}"
        );
        check_and_stamp(dir.path(), 7).expect("the same version passes");
        check_and_stamp(dir.path(), 8).expect("a newer binary stamps its own");
        assert_eq!(stored_state_format(dir.path()).expect("reads"), Some(8));
    }

    #[test]
    fn a_malformed_stamp_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(STATE_FORMAT_FILE), "two").expect("write");
        let message = check_and_stamp(dir.path(), 1).expect_err("refused").to_string();
        assert!(message.contains("\"two\""), "{message}");
    }
}
