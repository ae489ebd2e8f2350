//! How an agent's commits leave its machine. The node never runs git over a workspace: its
//! `.git` is the machine's, and host git reading it would follow its alternates and symlinked
//! refs to any repository on the host, and would read its config (`core.fsmonitor`,
//! `include.path`, `core.sshCommand`, remotes with `ext::`) and hooks. Instead git inside the
//! machine writes a bundle of the work branch over the base commit to [`PUSH_BUNDLE_PATH`] (its
//! alternates and links can only reach the machine's own files), the node copies that one file
//! out beneath the workspace without following a symlink and only up to [`MAX_PUSH_BUNDLE_BYTES`],
//! checks that it is a bundle, and fetches it into the mirror with git isolated from every
//! config but the mirror's own, no hooks, no transport but the bundle file, and every object
//! checked by fsck.

use std::io::Read;
use std::path::{Path, PathBuf};

use flotilla_sandbox::{copy_workspace_file, WorkspaceFileError};

/// Where, relative to the workspace, the machine writes the bundle of its work branch. Inside
/// `.git`, so that the agent's next `git add -A` never commits it.
pub const PUSH_BUNDLE_PATH: &str = ".git/flotilla-push.bundle";
/// The largest bundle the node copies out of a machine.
pub const MAX_PUSH_BUNDLE_BYTES: u64 = 1024 * 1024 * 1024;
/// How long git inside the machine may take to write the bundle.
pub const PUSH_BUNDLE_TIMEOUT_MS: u64 = 300_000;

/// What the machine made of its work branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushSource {
    /// A bundle at [`PUSH_BUNDLE_PATH`] of `refs/heads/BRANCH` over the base commit.
    Bundle,
    /// The branch holds no commit the base lacks; it is at `tip` (the machine's word, checked
    /// against the mirror before use).
    NothingNew { tip: String },
}

/// Why a bundle could not be taken from a workspace.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the workspace's bundle: {0}")]
    File(#[from] WorkspaceFileError),
    #[error("the machine wrote no bundle at {PUSH_BUNDLE_PATH}")]
    Missing,
    #[error("the workspace's bundle {PUSH_BUNDLE_PATH} is not a git bundle (it starts with {start:?})")]
    NotABundle { start: String },
    #[error("cannot make a file for the workspace's bundle in {dir}: {source}")]
    TempFile {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("copying the workspace's bundle did not finish: {0}")]
    Task(String),
}

/// The first lines git writes at the start of a bundle, versions 2 and 3. Checked by the node
/// because git, handed a file that is not a bundle, takes it as a repository path, and a file
/// reading `gitdir: /elsewhere` would send it to another repository on the host.
const BUNDLE_SIGNATURES: [&[u8]; 2] = [b"# v2 git bundle\n", b"# v3 git bundle\n"];

/// Copies the bundle out of the workspace (the machine's `/workspace` as the node sees it) into a
/// node-owned temporary file in `dir`, off the async runtime. The file is removed when dropped.
pub async fn copy_bundle(workspace: &Path, dir: &Path, max_bytes: u64) -> Result<tempfile::NamedTempFile, BundleError> {
    let (workspace, dir) = (workspace.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || copy_bundle_blocking(&workspace, &dir, max_bytes))
        .await
        .map_err(|error| BundleError::Task(error.to_string()))?
}

fn copy_bundle_blocking(workspace: &Path, dir: &Path, max_bytes: u64) -> Result<tempfile::NamedTempFile, BundleError> {
    let temp_file_error = |source| BundleError::TempFile {
        dir: dir.display().to_string(),
        source,
    };
    let mut copy = tempfile::Builder::new()
        .prefix(".incoming-")
        .suffix(".bundle")
        .tempfile_in(dir)
        .map_err(temp_file_error)?;
    if copy_workspace_file(workspace, PUSH_BUNDLE_PATH, max_bytes, copy.as_file_mut())?.is_none() {
        return Err(BundleError::Missing);
    }
    let mut start = Vec::new();
    std::fs::File::open(copy.path())
        .and_then(|file| file.take(BUNDLE_SIGNATURES[0].len() as u64).read_to_end(&mut start))
        .map_err(temp_file_error)?;
    if !BUNDLE_SIGNATURES.iter().any(|signature| start == *signature) {
        return Err(BundleError::NotABundle {
            start: String::from_utf8_lossy(&start).into_owned(),
        });
    }
    Ok(copy)
}

/// Arguments that put git, run by the node over what a machine sent, out of reach of any
/// config but the repository's own (which the node wrote): no hooks, no transport but those
/// the caller names after these, and fsck on every object received.
pub const ISOLATED_GIT_CONFIG: [&str; 10] = [
    "-c",
    "protocol.allow=never",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "transfer.fsckObjects=true",
    "-c",
    "fetch.fsckObjects=true",
    "-c",
    "core.fsmonitor=false",
];

/// Environment for isolated git: no system or global config, a home the node chose, and none
/// of the variables that would point git at other object stores or config.
pub fn isolated_git_env(home: &Path) -> (Vec<(String, String)>, [&'static str; 8]) {
    let set = vec![
        ("GIT_CONFIG_NOSYSTEM".to_string(), "1".to_string()),
        ("GIT_CONFIG_GLOBAL".to_string(), "/dev/null".to_string()),
        ("HOME".to_string(), home.display().to_string()),
    ];
    let removed = [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
        "XDG_CONFIG_HOME",
    ];
    (set, removed)
}

/// Whether `text` is a full object id (SHA-1 or SHA-256), as git prints one.
pub fn is_object_id(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// The directory that holds `mirror`, where incoming bundles are copied.
pub fn incoming_dir(mirror: &Path) -> PathBuf {
    mirror
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
