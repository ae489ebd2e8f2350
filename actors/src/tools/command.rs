//! `run_command`, `search` and `read_terminal`.

use flotilla_sandbox::{ExecOutput, KilledReason, MachineDriver, MachineHandle};

use super::arguments::{ReadTerminalArguments, RunCommandArguments, SearchArguments};
use super::output::{cut_note, head_text};
use super::paths::{display_path, lexical_workspace_path};
use super::script::{run_script, unexpected_failure, ToolScript};
use super::{ToolLimits, ToolOutput, WORKSPACE_DIR};

/// Room for `run_command`'s headings and cut notes within the result's budget.
const RUN_COMMAND_FRAME_BYTES: usize = 256;
/// The most matching lines `search` shows, and the most characters of each.
pub(crate) const MAX_SEARCH_MATCHES: usize = 200;
pub(crate) const MAX_MATCH_LINE_CHARS: usize = 300;
/// What `search` reads from grep at most (per stream).
const SEARCH_CAPTURE_BYTES: u64 = 4 * 1024 * 1024;
/// Lines `read_terminal` returns when the call names no number, and at most.
pub(crate) const DEFAULT_TERMINAL_LINES: usize = 100;
pub(crate) const MAX_TERMINAL_LINES: usize = 2000;

/// The command is handed to a fresh `sh -c` from a variable, after the working directory was
/// confined; the tool's own variables are gone by then.
const RUN_COMMAND_SCRIPT: &str = r#"
confine "$FLOTILLA_CWD"
if [ ! -d "$resolved" ]; then refuse "cwd $FLOTILLA_CWD_SHOWN does not exist or is not a directory"; fi
cd -- "$resolved" || exit 1
flotilla_command=$FLOTILLA_COMMAND
unset FLOTILLA_COMMAND FLOTILLA_CWD FLOTILLA_CWD_SHOWN
exec /bin/sh -c "$flotilla_command"
"#;

const SEARCH_SCRIPT: &str = r#"
confine "$FLOTILLA_PATH"
if [ ! -e "$resolved" ]; then refuse "path $FLOTILLA_SHOWN does not exist"; fi
cd /workspace || exit 1
if [ "$FLOTILLA_REGEX" = 1 ]; then mode=-E; else mode=-F; fi
if [ "$resolved" = /workspace ]; then
    exec grep -rnHI --exclude-dir=.git "$mode" -e "$FLOTILLA_PATTERN"
fi
exec grep -rnHI --exclude-dir=.git "$mode" -e "$FLOTILLA_PATTERN" -- "${resolved#/workspace/}"
"#;

pub(crate) async fn run_command(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    arguments: RunCommandArguments,
    limits: &ToolLimits,
) -> ToolOutput {
    if arguments.command.trim().is_empty() {
        return ToolOutput::failure("command is empty");
    }
    let timeout_ms = match arguments.timeout_ms {
        Some(0) => return ToolOutput::failure("timeout_ms must be at least 1"),
        Some(asked) => asked.min(limits.max_timeout_ms),
        None => limits.default_timeout_ms,
    };
    let cwd_input = arguments.cwd.unwrap_or_else(|| ".".to_string());
    let cwd = match lexical_workspace_path("cwd", &cwd_input) {
        Ok(cwd) => cwd,
        Err(refused) => return ToolOutput::failure(refused.to_string()),
    };
    let stream_budget_bytes = limits.max_output_bytes.saturating_sub(RUN_COMMAND_FRAME_BYTES) / 2;
    let script = ToolScript {
        body: RUN_COMMAND_SCRIPT,
        env: vec![
            ("FLOTILLA_CWD", cwd.clone()),
            ("FLOTILLA_CWD_SHOWN", display_path(&cwd)),
            ("FLOTILLA_COMMAND", arguments.command),
        ],
        timeout_ms,
        max_output_bytes: stream_budget_bytes as u64,
        path_field: "cwd",
        path_input: &cwd_input,
        // A command killed for its time or memory is an answer with the output so far.
        killed_is_failure: false,
    };
    match run_script(driver, machine, script).await {
        Ok(output) => format_command_output(&output, stream_budget_bytes),
        Err(failure) => failure,
    }
}

/// "exit code N", then stdout and stderr, each with a note where the driver left bytes out.
pub(crate) fn format_command_output(output: &ExecOutput, stream_budget_bytes: usize) -> ToolOutput {
    let mut content = match output.killed_reason {
        Some(KilledReason::Timeout { limit_ms }) => {
            format!("timed out: the command was killed after {limit_ms} ms; output so far:\n")
        }
        // "out of memory: ...", "disk limit 10 GiB reached", "process limit 512 reached": the
        // reason leads, so that the agent's event says first which limit ended the command.
        Some(reason) => format!("{reason}; output so far:\n"),
        None => format!("{}\n", output.outcome()),
    };
    let both_cut = output.stdout_truncated && output.stderr_truncated;
    for (name, bytes, truncated) in [
        ("stdout", &output.stdout, output.stdout_truncated),
        ("stderr", &output.stderr, output.stderr_truncated),
    ] {
        if bytes.is_empty() {
            continue;
        }
        content.push_str(&format!("--- {name} ---\n"));
        if truncated {
            // The driver keeps the first and the last halves of the budget: the note goes between.
            let head_length = (stream_budget_bytes - stream_budget_bytes / 2).min(bytes.len());
            content.push_str(&String::from_utf8_lossy(&bytes[..head_length]));
            if !content.ends_with('\n') {
                content.push('\n');
            }
            if both_cut {
                content.push_str(&format!(
                    "[output cut: {} bytes omitted from stdout and stderr together]\n",
                    output.omitted_bytes
                ));
            } else {
                content.push_str(&cut_note(output.omitted_bytes));
                content.push('\n');
            }
            content.push_str(&String::from_utf8_lossy(&bytes[head_length..]));
        } else {
            content.push_str(&String::from_utf8_lossy(bytes));
        }
        if !content.ends_with('\n') {
            content.push('\n');
        }
    }
    if output.stdout.is_empty() && output.stderr.is_empty() {
        content.push_str("(no output)\n");
    }
    ToolOutput {
        content,
        truncated: output.stdout_truncated || output.stderr_truncated,
        failed: !output.success(),
    }
}

pub(crate) async fn search(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    arguments: SearchArguments,
    limits: &ToolLimits,
) -> ToolOutput {
    if arguments.pattern.is_empty() {
        return ToolOutput::failure("pattern is empty");
    }
    if arguments.pattern.contains('\n') {
        return ToolOutput::failure("pattern contains a newline; search matches one line at a time");
    }
    let input = arguments.path.unwrap_or_else(|| WORKSPACE_DIR.to_string());
    let absolute = match lexical_workspace_path("path", &input) {
        Ok(absolute) => absolute,
        Err(refused) => return ToolOutput::failure(refused.to_string()),
    };
    let regex = arguments.regex.unwrap_or(false);
    let script = ToolScript {
        body: SEARCH_SCRIPT,
        env: vec![
            ("FLOTILLA_PATH", absolute.clone()),
            ("FLOTILLA_SHOWN", display_path(&absolute)),
            ("FLOTILLA_REGEX", u8::from(regex).to_string()),
            ("FLOTILLA_PATTERN", arguments.pattern.clone()),
        ],
        timeout_ms: limits.default_timeout_ms,
        max_output_bytes: SEARCH_CAPTURE_BYTES,
        path_field: "path",
        path_input: &input,
        killed_is_failure: true,
    };
    let output = match run_script(driver, machine, script).await {
        Ok(output) => output,
        Err(failure) => return failure,
    };
    let kind = if regex { "regular expression" } else { "text" };
    match output.exit_code {
        Some(1) if output.stdout.is_empty() => {
            return ToolOutput::success(format!("no matches for {kind} {:?}", arguments.pattern))
        }
        Some(0) => {}
        Some(2) if !output.stdout.is_empty() => {}
        _ => {
            return unexpected_failure(&format!("searching for {kind} {:?}", arguments.pattern), &output);
        }
    }
    // When the capture was cut, only its first half is a clean run of lines.
    let head_length = if output.stdout_truncated {
        (SEARCH_CAPTURE_BYTES - SEARCH_CAPTURE_BYTES / 2) as usize
    } else {
        output.stdout.len()
    };
    let (matches_text, _) = head_text(&output.stdout, head_length);
    let mut lines: Vec<&str> = matches_text.lines().collect();
    if output.stdout_truncated {
        lines.pop();
    }
    let found = lines.len();
    let mut content = String::new();
    for line in lines.iter().take(MAX_SEARCH_MATCHES) {
        match line.char_indices().nth(MAX_MATCH_LINE_CHARS) {
            Some((cut_at, _)) => {
                content.push_str(&line[..cut_at]);
                content.push_str(" [line cut]");
            }
            None => content.push_str(line),
        }
        content.push('\n');
    }
    let mut result = ToolOutput::success(content);
    if output.stdout_truncated {
        result.truncated = true;
        result.content.push_str(&format!(
            "[more than {found} matching lines; showing {}; narrow the pattern or the path]\n",
            found.min(MAX_SEARCH_MATCHES)
        ));
    } else if found > MAX_SEARCH_MATCHES {
        result.truncated = true;
        result.content.push_str(&format!(
            "[{found} matching lines; showing the first {MAX_SEARCH_MATCHES}; narrow the pattern or the path]\n"
        ));
    }
    if output.exit_code == Some(2) {
        result.content.push_str(&format!(
            "[some files could not be searched: {}]\n",
            output.stderr_text().lines().next().unwrap_or_default()
        ));
    }
    result
}

pub(crate) async fn read_terminal(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    arguments: ReadTerminalArguments,
) -> ToolOutput {
    if arguments.name.is_empty() {
        return ToolOutput::failure("name is empty; give the terminal's name");
    }
    let lines = match arguments.lines {
        Some(0) => return ToolOutput::failure("lines must be at least 1"),
        Some(lines) => lines.min(MAX_TERMINAL_LINES),
        None => DEFAULT_TERMINAL_LINES,
    };
    match driver.read_terminal(machine, &arguments.name, lines).await {
        Ok(text) if text.trim().is_empty() => {
            ToolOutput::success(format!("(terminal {:?} shows nothing yet)", arguments.name))
        }
        Ok(text) => ToolOutput::success(text),
        Err(error) => ToolOutput::failure(format!("could not read terminal {:?}: {error}", arguments.name)),
    }
}
