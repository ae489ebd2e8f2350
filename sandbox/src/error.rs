//! The crate's one error type. Messages are lowercase, say what was wanted and what was found,
//! and name the input (a file, a machine, a user, a path).

use std::path::PathBuf;

use crate::seccomp::SeccompError;
use crate::workspace_file::WorkspaceFileError;

/// A malformed environment.json: where it is wrong and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct EnvironmentError {
    /// The file as the user knows it, e.g. `.flotilla/environment.json`.
    pub file: String,
    /// 1-based; `None` when the error is not tied to a position (e.g. the file cannot be read).
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The field path in the document, e.g. `terminals[0].name`; `None` for the document itself.
    pub field: Option<String>,
    /// What is wrong, without the file and position.
    pub message: String,
}

impl EnvironmentError {
    fn render(&self) -> String {
        let mut rendered = self.file.clone();
        if let (Some(line), Some(column)) = (self.line, self.column) {
            rendered.push_str(&format!(" line {line} column {column}"));
        }
        rendered.push_str(": ");
        rendered.push_str(&self.message);
        rendered
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Environment(#[from] EnvironmentError),

    /// A file of a workspace (the repository's content) that the node refused or failed to read.
    #[error(transparent)]
    WorkspaceFile(#[from] WorkspaceFileError),

    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{tool} is needed by the bwrap machine driver but was not found ({hint})")]
    MissingTool { tool: String, hint: String },

    #[error("cgroup {}: {detail}", path.display())]
    Cgroup { path: PathBuf, detail: String },

    #[error("mount of {} failed: {detail}", target.display())]
    Mount { target: PathBuf, detail: String },

    #[error("user {user:?} does not exist in base image {image} (looked in its /etc/passwd)")]
    UnknownUser { user: String, image: String },

    #[error("invalid machine limit {field}: {detail}")]
    InvalidLimit { field: &'static str, detail: String },

    #[error("invalid machine spec: {detail}")]
    InvalidSpec { detail: String },

    #[error("machine {machine} did not start: {detail}")]
    MachineStart { machine: String, detail: String },

    #[error("machine {machine} is not running ({detail})")]
    MachineStopped { machine: String, detail: String },

    #[error("machine {machine} has no terminal named {terminal:?}")]
    UnknownTerminal { machine: String, terminal: String },

    #[error("{program} failed in machine {machine}: {detail}")]
    MachineCommand {
        machine: String,
        program: String,
        detail: String,
    },

    #[error("{program} failed: {detail}")]
    HostCommand { program: String, detail: String },

    #[error("base image {image} is not prepared: {detail}")]
    ImageNotPrepared { image: String, detail: String },

    #[error("unknown base image {found:?} (expected \"host\" or \"debian\")")]
    UnknownBaseImage { found: String },

    #[error("install for {repository} failed with {outcome}; last output lines:\n{last_lines}")]
    InstallFailed {
        repository: String,
        outcome: String,
        last_lines: String,
    },

    #[error("start command failed with {outcome}; last output lines:\n{last_lines}")]
    StartFailed { outcome: String, last_lines: String },

    #[error("machine {machine} was not made by the {driver} driver")]
    ForeignMachine { machine: String, driver: &'static str },

    #[error("{what} is not supported by the bwrap machine driver")]
    Unsupported { what: String },

    /// The system-call filter every machine process runs under could not be made or handed over.
    #[error(transparent)]
    SystemCallFilter(#[from] SeccompError),
}

impl SandboxError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SandboxError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
