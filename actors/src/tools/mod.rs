//! The agent's tools: what the model may do to its machine.
//!
//! Every call runs inside the agent's machine through [`MachineDriver::exec`] (or
//! [`MachineDriver::read_terminal`]), so the node's own filesystem is never touched; the machine
//! is the security boundary. Paths are further confined to `/workspace`: checked lexically here,
//! then resolved with `realpath -m` inside the machine, so a symbolic link cannot lead out of it.
//! User strings never become shell code: they reach the scripts through environment variables
//! (file content base64-encoded), and the scripts only expand them inside double quotes.
//!
//! A tool that fails (bad arguments, a refused path, a missing file, a command that exits
//! non-zero) is an answer for the model, not an error of the turn: [`run_tool`] always returns a
//! [`ToolOutput`], capped at [`ToolLimits::max_output_bytes`].

mod arguments;
mod command;
mod files;
mod output;
mod paths;
mod script;

#[cfg(test)]
mod tests;

use flotilla_sandbox::{MachineDriver, MachineHandle};
use serde_json::{json, Value};

use arguments::parse_arguments;
pub use output::cap_text;

/// The directory every path of every tool must stay within.
pub const WORKSPACE_DIR: &str = "/workspace";

/// What a tool call returns to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    pub content: String,
    /// Part of the output was left out (the content says where and how much).
    pub truncated: bool,
    /// The call did not do what was asked; the content says why.
    pub failed: bool,
}

impl ToolOutput {
    pub fn success(content: impl Into<String>) -> Self {
        ToolOutput {
            content: content.into(),
            truncated: false,
            failed: false,
        }
    }

    pub fn failure(content: impl Into<String>) -> Self {
        ToolOutput {
            content: content.into(),
            truncated: false,
            failed: true,
        }
    }

    /// Cuts the content to `max_output_bytes` (on a character boundary), marking it truncated.
    pub fn capped(mut self, max_output_bytes: usize) -> Self {
        let (content, cut) = cap_text(&self.content, max_output_bytes);
        if cut {
            self.content = content;
            self.truncated = true;
        }
        self
    }
}

/// Bounds on every tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolLimits {
    /// The most a tool result may hold; longer output is cut on a character boundary.
    pub max_output_bytes: usize,
    /// The wall-clock limit of a call that names none (file tools always use it).
    pub default_timeout_ms: u64,
    /// The highest `timeout_ms` a `run_command` call may ask for; higher requests are lowered.
    pub max_timeout_ms: u64,
}

impl Default for ToolLimits {
    fn default() -> Self {
        ToolLimits {
            max_output_bytes: 64 * 1024,
            default_timeout_ms: 120_000,
            max_timeout_ms: 600_000,
        }
    }
}

pub const RUN_COMMAND: &str = "run_command";
pub const READ_FILE: &str = "read_file";
pub const WRITE_FILE: &str = "write_file";
pub const EDIT_FILE: &str = "edit_file";
pub const LIST_DIR: &str = "list_dir";
pub const SEARCH: &str = "search";
pub const READ_TERMINAL: &str = "read_terminal";

/// Whether `name` is one of the built-in tools.
pub fn is_builtin(name: &str) -> bool {
    tool_specs().iter().any(|(builtin, _, _)| builtin == name)
}

/// The built-in tools as (name, description, JSON schema of the arguments), for the model, in
/// the order they are offered.
pub fn tool_specs() -> Vec<(String, String, Value)> {
    command_and_writing_specs()
        .into_iter()
        .chain(reading_specs())
        .map(|(name, description, schema)| (name.to_string(), description.to_string(), schema))
        .collect()
}

/// `run_command` and the tools that write files.
fn command_and_writing_specs() -> [(&'static str, &'static str, Value); 4] {
    [
        (
            RUN_COMMAND,
            "Run a shell command (sh -c) in the machine and return its exit code, stdout and stderr. \
             Runs in /workspace unless cwd is given. Long output is cut in the middle.",
            json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The shell command to run."},
                    "cwd": {"type": "string", "description": "Working directory, relative to /workspace."},
                    "timeout_ms": {"type": "integer", "minimum": 1, "description": "Wall-clock limit in milliseconds."}
                },
                "required": ["command"],
                "additionalProperties": false
            }),
        ),
        (
            READ_FILE,
            "Read a text file in the workspace; lines are numbered from 1. \
             start_line and end_line (inclusive) select a range.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path, relative to /workspace."},
                    "start_line": {"type": "integer", "minimum": 1},
                    "end_line": {"type": "integer", "minimum": 1}
                },
                "required": ["path"],
                "additionalProperties": false
            }),
        ),
        (
            WRITE_FILE,
            "Create or overwrite a file in the workspace with the given content; parent directories are created.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path, relative to /workspace."},
                    "content": {"type": "string", "description": "The whole new content of the file."}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
        ),
        (
            EDIT_FILE,
            "Replace exactly one occurrence of old_string with new_string in a file. Fails if old_string \
             occurs zero times or more than once; include enough surrounding text to make it unique.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path, relative to /workspace."},
                    "old_string": {"type": "string", "description": "The exact text to replace."},
                    "new_string": {"type": "string", "description": "The text to put in its place."}
                },
                "required": ["path", "old_string", "new_string"],
                "additionalProperties": false
            }),
        ),
    ]
}

/// The tools that only read: directories, search, terminals.
fn reading_specs() -> [(&'static str, &'static str, Value); 3] {
    [
        (
            LIST_DIR,
            "List a directory of the workspace, sorted; directories end with /.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Directory, relative to /workspace (default: the workspace)."}
                },
                "additionalProperties": false
            }),
        ),
        (
            SEARCH,
            "Search the workspace's text files for a fixed string (or an extended regular expression when \
             regex is true); returns file:line:text matches, skipping .git and binary files.",
            json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string"},
                    "path": {"type": "string", "description": "File or directory to search, relative to /workspace (default: the workspace)."},
                    "regex": {"type": "boolean", "description": "Treat pattern as an extended regular expression."}
                },
                "required": ["pattern"],
                "additionalProperties": false
            }),
        ),
        (
            READ_TERMINAL,
            "Read the last lines a terminal of the environment printed (for example a dev server).",
            json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "The terminal's name."},
                    "lines": {"type": "integer", "minimum": 1, "description": "How many lines, from the end (default 100)."}
                },
                "required": ["name"],
                "additionalProperties": false
            }),
        ),
    ]
}

/// Runs one tool call in `machine`. Never fails: a failure is a [`ToolOutput`] with `failed` set.
pub async fn run_tool(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    name: &str,
    arguments_json: &str,
    limits: &ToolLimits,
) -> ToolOutput {
    let output = match name {
        RUN_COMMAND => match parse_arguments(name, arguments_json) {
            Ok(arguments) => command::run_command(driver, machine, arguments, limits).await,
            Err(failure) => failure,
        },
        READ_FILE => match parse_arguments(name, arguments_json) {
            Ok(arguments) => files::read_file(driver, machine, arguments, limits).await,
            Err(failure) => failure,
        },
        WRITE_FILE => match parse_arguments(name, arguments_json) {
            Ok(arguments) => files::write_file(driver, machine, arguments, limits).await,
            Err(failure) => failure,
        },
        EDIT_FILE => match parse_arguments(name, arguments_json) {
            Ok(arguments) => files::edit_file(driver, machine, arguments, limits).await,
            Err(failure) => failure,
        },
        LIST_DIR => match parse_arguments(name, arguments_json) {
            Ok(arguments) => files::list_dir(driver, machine, arguments, limits).await,
            Err(failure) => failure,
        },
        SEARCH => match parse_arguments(name, arguments_json) {
            Ok(arguments) => command::search(driver, machine, arguments, limits).await,
            Err(failure) => failure,
        },
        READ_TERMINAL => match parse_arguments(name, arguments_json) {
            Ok(arguments) => command::read_terminal(driver, machine, arguments).await,
            Err(failure) => failure,
        },
        unknown => {
            let known: Vec<String> = tool_specs().into_iter().map(|(name, _, _)| name).collect();
            ToolOutput::failure(format!("unknown tool {unknown:?}; the tools are {}", known.join(", ")))
        }
    };
    output.capped(limits.max_output_bytes)
}
