//! `read_file`, `write_file`, `edit_file` and `list_dir`.

use base64::Engine;
use flotilla_sandbox::{MachineDriver, MachineHandle};

use super::arguments::{EditFileArguments, ListDirArguments, ReadFileArguments, WriteFileArguments};
use super::output::head_text;
use super::paths::{display_path, lexical_workspace_path};
use super::script::{run_script, unexpected_failure, ToolScript};
use super::{ToolLimits, ToolOutput};

/// The largest file `write_file` writes and `edit_file` edits; bigger files are for `run_command`.
pub(crate) const MAX_WRITE_FILE_BYTES: usize = 16 * 1024 * 1024;
/// The most entries `list_dir` shows.
pub(crate) const MAX_LIST_ENTRIES: usize = 1000;
/// Bytes of content per environment variable: Linux refuses a single variable over 128 KiB.
const WRITE_CHUNK_BYTES: usize = 48 * 1024;
/// Chunks per command, so that one command's environment stays far below the kernel's limit.
const WRITE_CHUNKS_PER_COMMAND: usize = 16;
/// What `list_dir` reads from `find` at most (per stream).
const LIST_CAPTURE_BYTES: u64 = 4 * 1024 * 1024;

const READ_FILE_SCRIPT: &str = r#"
confine "$FLOTILLA_PATH"
if [ ! -e "$resolved" ]; then refuse "$FLOTILLA_SHOWN does not exist"; fi
if [ -d "$resolved" ]; then refuse "$FLOTILLA_SHOWN is a directory; use list_dir"; fi
awk -v first="$FLOTILLA_FIRST_LINE" -v last="$FLOTILLA_LAST_LINE" '
    NR >= first + 0 && (last + 0 == 0 || NR <= last + 0) { printf "%6d\t%s\n", NR, $0 }
    END { printf "%d\n", NR > "/dev/stderr" }
' < "$resolved"
"#;

const WRITE_FILE_SCRIPT: &str = r#"
confine "$FLOTILLA_PATH"
if [ -d "$resolved" ]; then refuse "$FLOTILLA_SHOWN is a directory"; fi
partial="$resolved.flotilla-partial-$FLOTILLA_WRITE_ID"
if [ "$FLOTILLA_FIRST_PART" = 1 ]; then
    mkdir -p -- "$(dirname -- "$resolved")" || exit 1
    : > "$partial" || exit 1
fi
part=0
while [ "$part" -lt "$FLOTILLA_CHUNKS" ]; do
    printenv "FLOTILLA_CHUNK_$part" | base64 -d >> "$partial" || { rm -f -- "$partial"; exit 1; }
    part=$((part + 1))
done
if [ "$FLOTILLA_LAST_PART" = 1 ]; then
    # Written in place rather than renamed, so the file keeps its mode and hard links.
    cat -- "$partial" > "$resolved" || { rm -f -- "$partial"; exit 1; }
    rm -f -- "$partial"
fi
"#;

const REMOVE_PARTIAL_SCRIPT: &str = r#"
confine "$FLOTILLA_PATH"
rm -f -- "$resolved.flotilla-partial-$FLOTILLA_WRITE_ID"
"#;

const READ_WHOLE_FILE_SCRIPT: &str = r#"
confine "$FLOTILLA_PATH"
if [ ! -e "$resolved" ]; then refuse "$FLOTILLA_SHOWN does not exist"; fi
if [ ! -f "$resolved" ]; then refuse "$FLOTILLA_SHOWN is not a regular file"; fi
size=$(wc -c < "$resolved") || exit 1
if [ "$size" -gt "$FLOTILLA_MAX_BYTES" ]; then
    refuse "$FLOTILLA_SHOWN is $size bytes, more than the $FLOTILLA_MAX_BYTES bytes edit_file handles; use run_command"
fi
cat -- "$resolved"
"#;

const LIST_DIR_SCRIPT: &str = r#"
confine "$FLOTILLA_PATH"
if [ ! -e "$resolved" ]; then refuse "$FLOTILLA_SHOWN does not exist"; fi
if [ ! -d "$resolved" ]; then refuse "$FLOTILLA_SHOWN is not a directory; use read_file"; fi
find "$resolved" -mindepth 1 -maxdepth 1 -printf '%y %P\0'
"#;

pub(crate) async fn read_file(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    arguments: ReadFileArguments,
    limits: &ToolLimits,
) -> ToolOutput {
    let absolute = match lexical_workspace_path("path", &arguments.path) {
        Ok(absolute) => absolute,
        Err(refused) => return ToolOutput::failure(refused.to_string()),
    };
    let first_line = arguments.start_line.unwrap_or(1);
    if first_line == 0 {
        return ToolOutput::failure("start_line must be at least 1 (lines are numbered from 1)");
    }
    if let Some(last_line) = arguments.end_line {
        if last_line < first_line {
            return ToolOutput::failure(format!("end_line {last_line} is before start_line {first_line}"));
        }
    }
    let shown = display_path(&absolute);
    let script = ToolScript {
        body: READ_FILE_SCRIPT,
        env: vec![
            ("FLOTILLA_PATH", absolute.clone()),
            ("FLOTILLA_SHOWN", shown.clone()),
            ("FLOTILLA_FIRST_LINE", first_line.to_string()),
            // 0 stands for "to the end" inside the script only.
            ("FLOTILLA_LAST_LINE", arguments.end_line.unwrap_or(0).to_string()),
        ],
        timeout_ms: limits.default_timeout_ms,
        // The driver keeps the first half of this, which is more than the result may hold.
        max_output_bytes: (limits.max_output_bytes as u64).saturating_mul(4),
        path_field: "path",
        path_input: &arguments.path,
        killed_is_failure: true,
    };
    let output = match run_script(driver, machine, script).await {
        Ok(output) => output,
        Err(failure) => return failure,
    };
    if !output.success() {
        return unexpected_failure(&format!("reading {shown}"), &output);
    }
    let total_lines: Option<u64> = output.stderr_text().trim().parse().ok();
    if output.stdout.is_empty() {
        return match total_lines {
            Some(0) => ToolOutput::success(format!("({shown} is empty)")),
            Some(total) => ToolOutput::failure(format!(
                "{shown} has {total} lines; start_line {first_line} is past the end"
            )),
            None => ToolOutput::success(format!("({shown}: no lines in that range)")),
        };
    }
    let budget = limits.max_output_bytes.saturating_sub(160);
    let (mut text, cut) = head_text(&output.stdout, budget);
    if cut {
        // Only whole lines, so that the model can read on from the next one.
        match text.rfind('\n') {
            Some(end) => text.truncate(end + 1),
            None => text.clear(),
        }
    }
    let last_shown = text
        .lines()
        .last()
        .and_then(|line| line.split('\t').next())
        .and_then(|number| number.trim().parse::<u64>().ok());
    let mut result = ToolOutput::success(text);
    match (last_shown, total_lines) {
        (Some(last_shown), Some(total)) if cut => {
            result.truncated = true;
            result.content.push_str(&format!(
                "[output cut after line {last_shown} of {total}; read on with start_line {}]",
                last_shown + 1
            ));
        }
        (None, _) if cut => {
            result.truncated = true;
            result.content.push_str(&format!(
                "[line {first_line} alone is longer than the {} bytes a result may hold; use run_command]",
                limits.max_output_bytes
            ));
        }
        (Some(last_shown), Some(total)) if first_line > 1 || last_shown < total => {
            result
                .content
                .push_str(&format!("[lines {first_line}-{last_shown} of {total}]"));
        }
        _ => {}
    }
    result
}

pub(crate) async fn write_file(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    arguments: WriteFileArguments,
    limits: &ToolLimits,
) -> ToolOutput {
    let absolute = match lexical_workspace_path("path", &arguments.path) {
        Ok(absolute) => absolute,
        Err(refused) => return ToolOutput::failure(refused.to_string()),
    };
    if arguments.content.len() > MAX_WRITE_FILE_BYTES {
        return ToolOutput::failure(format!(
            "content is {} bytes, more than the {MAX_WRITE_FILE_BYTES} bytes write_file takes",
            arguments.content.len()
        ));
    }
    match write_bytes(
        driver,
        machine,
        &absolute,
        &arguments.path,
        arguments.content.as_bytes(),
        limits,
    )
    .await
    {
        Ok(()) => ToolOutput::success(format!(
            "wrote {} bytes to {}",
            arguments.content.len(),
            display_path(&absolute)
        )),
        Err(failure) => failure,
    }
}

/// Writes `content` to `absolute` in as many commands as its size needs (usually one).
async fn write_bytes(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    absolute: &str,
    path_input: &str,
    content: &[u8],
    limits: &ToolLimits,
) -> Result<(), ToolOutput> {
    let engine = base64::engine::general_purpose::STANDARD;
    let write_id = ulid::Ulid::new().to_string();
    let chunks: Vec<&[u8]> = content.chunks(WRITE_CHUNK_BYTES).collect();
    // An empty file is one command with no chunk.
    let parts: Vec<&[&[u8]]> = if chunks.is_empty() {
        vec![&[]]
    } else {
        chunks.chunks(WRITE_CHUNKS_PER_COMMAND).collect()
    };
    let part_count = parts.len();
    for (index, part) in parts.into_iter().enumerate() {
        let mut env = vec![
            ("FLOTILLA_PATH", absolute.to_string()),
            ("FLOTILLA_SHOWN", display_path(absolute)),
            ("FLOTILLA_WRITE_ID", write_id.clone()),
            ("FLOTILLA_FIRST_PART", u8::from(index == 0).to_string()),
            ("FLOTILLA_LAST_PART", u8::from(index + 1 == part_count).to_string()),
            ("FLOTILLA_CHUNKS", part.len().to_string()),
        ];
        for (chunk_index, chunk) in part.iter().enumerate() {
            env.push((CHUNK_VARIABLES[chunk_index], engine.encode(chunk)));
        }
        let script = ToolScript {
            body: WRITE_FILE_SCRIPT,
            env,
            timeout_ms: limits.default_timeout_ms,
            max_output_bytes: limits.max_output_bytes as u64,
            path_field: "path",
            path_input,
            killed_is_failure: true,
        };
        let outcome = match run_script(driver, machine, script).await {
            Ok(output) if output.success() => Ok(()),
            Ok(output) => Err(unexpected_failure(
                &format!("writing {}", display_path(absolute)),
                &output,
            )),
            Err(failure) => Err(failure),
        };
        if let Err(failure) = outcome {
            if index > 0 {
                remove_partial(driver, machine, absolute, &write_id, limits).await;
            }
            return Err(failure);
        }
    }
    Ok(())
}

const CHUNK_VARIABLES: [&str; WRITE_CHUNKS_PER_COMMAND] = [
    "FLOTILLA_CHUNK_0",
    "FLOTILLA_CHUNK_1",
    "FLOTILLA_CHUNK_2",
    "FLOTILLA_CHUNK_3",
    "FLOTILLA_CHUNK_4",
    "FLOTILLA_CHUNK_5",
    "FLOTILLA_CHUNK_6",
    "FLOTILLA_CHUNK_7",
    "FLOTILLA_CHUNK_8",
    "FLOTILLA_CHUNK_9",
    "FLOTILLA_CHUNK_10",
    "FLOTILLA_CHUNK_11",
    "FLOTILLA_CHUNK_12",
    "FLOTILLA_CHUNK_13",
    "FLOTILLA_CHUNK_14",
    "FLOTILLA_CHUNK_15",
];

/// Best effort: a write that failed half-way should not leave its partial file in the workspace.
async fn remove_partial(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    absolute: &str,
    write_id: &str,
    limits: &ToolLimits,
) {
    let script = ToolScript {
        body: REMOVE_PARTIAL_SCRIPT,
        env: vec![
            ("FLOTILLA_PATH", absolute.to_string()),
            ("FLOTILLA_WRITE_ID", write_id.to_string()),
        ],
        timeout_ms: limits.default_timeout_ms,
        max_output_bytes: 4096,
        path_field: "path",
        path_input: absolute,
        killed_is_failure: true,
    };
    if let Err(failure) = run_script(driver, machine, script).await {
        // The failure's text is tool output, which privacy mode keeps out of node logs.
        tracing::warn!(
            path = absolute,
            output_bytes = failure.content.len(),
            "could not remove a partial write"
        );
    }
}

pub(crate) async fn edit_file(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    arguments: EditFileArguments,
    limits: &ToolLimits,
) -> ToolOutput {
    let absolute = match lexical_workspace_path("path", &arguments.path) {
        Ok(absolute) => absolute,
        Err(refused) => return ToolOutput::failure(refused.to_string()),
    };
    if arguments.old_string.is_empty() {
        return ToolOutput::failure(
            "old_string is empty; give the exact text to replace (use write_file to create a file)",
        );
    }
    let shown = display_path(&absolute);
    let script = ToolScript {
        body: READ_WHOLE_FILE_SCRIPT,
        env: vec![
            ("FLOTILLA_PATH", absolute.clone()),
            ("FLOTILLA_SHOWN", shown.clone()),
            ("FLOTILLA_MAX_BYTES", MAX_WRITE_FILE_BYTES.to_string()),
        ],
        timeout_ms: limits.default_timeout_ms,
        max_output_bytes: MAX_WRITE_FILE_BYTES as u64 + 1,
        path_field: "path",
        path_input: &arguments.path,
        killed_is_failure: true,
    };
    let output = match run_script(driver, machine, script).await {
        Ok(output) => output,
        Err(failure) => return failure,
    };
    if !output.success() {
        return unexpected_failure(&format!("reading {shown}"), &output);
    }
    if output.stdout_truncated {
        return ToolOutput::failure(format!("{shown} grew while it was being read; try again"));
    }
    let Ok(content) = String::from_utf8(output.stdout) else {
        return ToolOutput::failure(format!("{shown} is not UTF-8 text; edit it with run_command"));
    };
    let edited = match replace_once(&content, &arguments.old_string, &arguments.new_string) {
        Ok(edited) => edited,
        Err(Occurrences::None) => {
            return ToolOutput::failure(format!(
                "old_string was not found in {shown}; it must match the file exactly, whitespace included"
            ))
        }
        Err(Occurrences::Many(count)) => {
            return ToolOutput::failure(format!(
                "old_string occurs {count} times in {shown}; include more surrounding text so that it occurs once"
            ))
        }
    };
    if edited.content.len() > MAX_WRITE_FILE_BYTES {
        return ToolOutput::failure(format!(
            "the edited {shown} would be {} bytes, more than the {MAX_WRITE_FILE_BYTES} bytes edit_file writes",
            edited.content.len()
        ));
    }
    match write_bytes(
        driver,
        machine,
        &absolute,
        &arguments.path,
        edited.content.as_bytes(),
        limits,
    )
    .await
    {
        Ok(()) => ToolOutput::success(format!("replaced 1 occurrence in {shown} at line {}", edited.line)),
        Err(failure) => failure,
    }
}

/// Why an exact replacement could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Occurrences {
    None,
    Many(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Edited {
    pub content: String,
    /// The line (from 1) where the replaced text began.
    pub line: usize,
}

/// Replaces the single occurrence of `old` in `content` (occurrences counted without overlap).
pub(crate) fn replace_once(content: &str, old: &str, new: &str) -> Result<Edited, Occurrences> {
    let mut matches = content.match_indices(old);
    let Some((start, _)) = matches.next() else {
        return Err(Occurrences::None);
    };
    let others = matches.count();
    if others > 0 {
        return Err(Occurrences::Many(others + 1));
    }
    let mut edited = String::with_capacity(content.len() - old.len() + new.len());
    edited.push_str(&content[..start]);
    edited.push_str(new);
    edited.push_str(&content[start + old.len()..]);
    Ok(Edited {
        content: edited,
        line: content[..start].matches('\n').count() + 1,
    })
}

pub(crate) async fn list_dir(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    arguments: ListDirArguments,
    limits: &ToolLimits,
) -> ToolOutput {
    let input = arguments.path.unwrap_or_else(|| ".".to_string());
    let absolute = match lexical_workspace_path("path", &input) {
        Ok(absolute) => absolute,
        Err(refused) => return ToolOutput::failure(refused.to_string()),
    };
    let shown = display_path(&absolute);
    let script = ToolScript {
        body: LIST_DIR_SCRIPT,
        env: vec![("FLOTILLA_PATH", absolute.clone()), ("FLOTILLA_SHOWN", shown.clone())],
        timeout_ms: limits.default_timeout_ms,
        max_output_bytes: LIST_CAPTURE_BYTES,
        path_field: "path",
        path_input: &input,
        killed_is_failure: true,
    };
    let output = match run_script(driver, machine, script).await {
        Ok(output) => output,
        Err(failure) => return failure,
    };
    if !output.success() {
        return unexpected_failure(&format!("listing {shown}"), &output);
    }
    let listing = String::from_utf8_lossy(&output.stdout);
    let mut records: Vec<&str> = listing.split('\0').collect();
    // The last record is empty (every record ends with NUL) or, when the capture was cut, partial.
    records.pop();
    let mut entries: Vec<String> = records
        .into_iter()
        .filter_map(|record| record.split_once(' '))
        .map(|(kind, name)| {
            if kind == "d" {
                format!("{name}/")
            } else {
                name.to_string()
            }
        })
        .collect();
    if entries.is_empty() && !output.stdout_truncated {
        return ToolOutput::success(format!("({shown} is empty)"));
    }
    entries.sort();
    let found = entries.len();
    entries.truncate(MAX_LIST_ENTRIES);
    let mut content = entries.join("\n");
    content.push('\n');
    let mut result = ToolOutput::success(content);
    if output.stdout_truncated {
        result.truncated = true;
        result
            .content
            .push_str("[listing cut: the directory has too many entries to list them all]");
    } else if found > MAX_LIST_ENTRIES {
        result.truncated = true;
        result.content.push_str(&format!(
            "[{} more entries not shown; list a subdirectory or use search]",
            found - MAX_LIST_ENTRIES
        ));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_once_replaces_a_single_occurrence() {
        let edited = replace_once("a\nb\nc\n", "b\n", "B\n").unwrap();
        assert_eq!(edited.content, "a\nB\nc\n");
        assert_eq!(edited.line, 2);
    }

    #[test]
    fn replace_once_counts_what_it_cannot_replace() {
        assert_eq!(replace_once("abc", "x", "y"), Err(Occurrences::None));
        assert_eq!(replace_once("x x x", "x", "y"), Err(Occurrences::Many(3)));
        assert_eq!(replace_once("aaaa", "aa", "b"), Err(Occurrences::Many(2)));
    }
}
