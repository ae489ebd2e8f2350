//! Running a tool's shell script in the machine. Scripts are constants of this module's callers;
//! every value that comes from the model reaches them as an environment variable and is only
//! expanded inside double quotes, so no argument can become shell code.

use flotilla_sandbox::{ExecOutput, ExecRequest, MachineDriver, MachineHandle};

use super::paths::outside_message;
use super::ToolOutput;

/// Exit status of a script that refused a path (`confine`) or an argument (`refuse`); the reason
/// is on stderr after [`REFUSAL_MARKER`].
const REFUSAL_EXIT_CODE: i32 = 90;
const REFUSAL_MARKER: &str = "flotilla-tool-refused:";
const OUTSIDE_MARKER: &str = "flotilla-tool-outside:";

/// Shell functions every script starts with. `confine` resolves a path (already absolute) with
/// `realpath -m`, which follows every symbolic link that exists, and refuses a result outside
/// the workspace; it leaves the resolved path in `$resolved`.
const PRELUDE: &str = r#"
set -u
refuse() {
    printf 'flotilla-tool-refused:%s\n' "$1" >&2
    exit 90
}
confine() {
    resolved=$(realpath -m -- "$1") || refuse "could not resolve $1"
    case "$resolved" in
        /workspace|/workspace/*) ;;
        *)
            printf 'flotilla-tool-outside:%s\n' "$resolved" >&2
            exit 90
            ;;
    esac
}
"#;

/// One script to run for a tool.
pub(crate) struct ToolScript<'a> {
    /// Shell code written in this crate, never containing a value from the model.
    pub body: &'static str,
    /// The values the script reads, as environment variables.
    pub env: Vec<(&'static str, String)>,
    pub timeout_ms: u64,
    /// Per stream; the driver keeps the first and last halves of a longer stream.
    pub max_output_bytes: u64,
    /// The argument a refused path came from and what the model wrote, for the message.
    pub path_field: &'a str,
    pub path_input: &'a str,
    /// Whether a command the driver killed (time or memory limit) is a failure of the tool, or
    /// an answer for the caller to describe.
    pub killed_is_failure: bool,
}

/// Runs `script`. `Err` is the tool's answer already: the machine failed to run it, or the
/// script refused a path or an argument. Any other exit status is for the caller to judge.
pub(crate) async fn run_script(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    script: ToolScript<'_>,
) -> Result<ExecOutput, ToolOutput> {
    let mut request = ExecRequest::new(format!("{PRELUDE}\n{}", script.body))
        .with_timeout_ms(script.timeout_ms)
        .with_max_output_bytes(script.max_output_bytes.max(1));
    for (key, value) in script.env {
        request = request.with_env(key, value);
    }
    let output = driver
        .exec(machine, request)
        .await
        .map_err(|error| ToolOutput::failure(format!("the machine could not run the tool: {error}")))?;
    if let (Some(reason), true) = (output.killed_reason, script.killed_is_failure) {
        return Err(ToolOutput::failure(format!("the tool was {reason}")));
    }
    if output.exit_code == Some(REFUSAL_EXIT_CODE) {
        let stderr = output.stderr_text();
        for line in stderr.lines() {
            if let Some(resolved) = line.strip_prefix(OUTSIDE_MARKER) {
                return Err(ToolOutput::failure(format!(
                    "{} through a symbolic link",
                    outside_message(script.path_field, script.path_input, resolved)
                )));
            }
            if let Some(reason) = line.strip_prefix(REFUSAL_MARKER) {
                return Err(ToolOutput::failure(reason.to_string()));
            }
        }
    }
    Ok(output)
}

/// A failed answer for a script that ended badly in a way its caller did not expect.
pub(crate) fn unexpected_failure(what: &str, output: &ExecOutput) -> ToolOutput {
    let detail = output.last_lines(20);
    if detail.is_empty() {
        ToolOutput::failure(format!("{what} failed with {}", output.outcome()))
    } else {
        ToolOutput::failure(format!("{what} failed with {}: {detail}", output.outcome()))
    }
}
