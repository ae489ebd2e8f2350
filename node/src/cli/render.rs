//! Human-readable renderings for `--output table`: tables for lists and records, and one line
//! per event for `agent watch`.

use comfy_table::{presets, ContentArrangement, Table};
use flotilla_proto::v1::{agent_event, Agent, AgentEvent, AgentStatus, Cluster, Plugin, PluginKind, RaftRole};
use prost_types::Timestamp;

/// Longest tool argument or output excerpt shown on a watch line; the JSON output has it all.
const MAX_EXCERPT_CHARS: usize = 160;

/// `running`, `finished`, ...; `unknown(7)` for a value this client does not know.
pub(crate) fn short_status(value: i32) -> String {
    match AgentStatus::try_from(value) {
        Ok(status) => status
            .as_str_name()
            .trim_start_matches("AGENT_STATUS_")
            .to_ascii_lowercase(),
        Err(_) => format!("unknown({value})"),
    }
}

fn short_role(value: i32) -> String {
    match RaftRole::try_from(value) {
        Ok(role) => role.as_str_name().trim_start_matches("RAFT_ROLE_").to_ascii_lowercase(),
        Err(_) => format!("unknown({value})"),
    }
}

fn yes_no(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

/// RFC 3339 to the second: tables have no room for nanoseconds.
fn timestamp_to_second(timestamp: Option<&Timestamp>) -> String {
    match timestamp {
        Some(timestamp) => Timestamp {
            seconds: timestamp.seconds,
            nanos: 0,
        }
        .to_string(),
        None => "-".to_string(),
    }
}

/// `HH:MM:SS` in UTC, the clock shown on watch lines.
fn time_of_day(timestamp: Option<&Timestamp>) -> String {
    match timestamp {
        Some(timestamp) => {
            let second_of_day = timestamp.seconds.rem_euclid(86_400);
            format!(
                "{:02}:{:02}:{:02}",
                second_of_day / 3600,
                second_of_day / 60 % 60,
                second_of_day % 60
            )
        }
        None => "--:--:--".to_string(),
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

/// The first line of `text`, cut to [`MAX_EXCERPT_CHARS`], with `…` when anything was left out.
fn excerpt(text: &str) -> String {
    let first_line = text.lines().next().unwrap_or("");
    let mut shown: String = first_line.chars().take(MAX_EXCERPT_CHARS).collect();
    if shown.len() < text.trim_end().len() {
        shown.push('…');
    }
    shown
}

/// Renders with two spaces between columns and none around the edges, like `kubectl get`,
/// so that lines have no stray leading or trailing blanks for `grep` and `awk`.
fn finish_table(mut table: Table) -> String {
    let column_count = table.column_count();
    for (index, column) in table.column_iter_mut().enumerate() {
        let right_padding = if index + 1 == column_count { 0 } else { 2 };
        column.set_padding((0, right_padding));
    }
    table
        .lines()
        .map(|line| line.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    if !header.is_empty() {
        table.set_header(header.iter().copied());
    }
    table
}

pub(crate) fn agent_list(agents: &[Agent]) -> String {
    let mut table = new_table(&["ID", "NAME", "STATUS", "REPOSITORY", "NODE", "EPOCH", "CREATED"]);
    for agent in agents {
        let (node, epoch) = match &agent.assignment {
            Some(assignment) => (assignment.node_id.to_string(), assignment.epoch.to_string()),
            None => ("-".to_string(), "-".to_string()),
        };
        table.add_row(vec![
            agent.id.clone(),
            agent.name.clone(),
            short_status(agent.status),
            agent.repository.clone(),
            node,
            epoch,
            timestamp_to_second(agent.created_at.as_ref()),
        ]);
    }
    finish_table(table)
}

pub(crate) fn agent_record(agent: &Agent) -> String {
    let mut table = new_table(&[]);
    let (node, epoch) = match &agent.assignment {
        Some(assignment) => (assignment.node_id.to_string(), assignment.epoch.to_string()),
        None => ("-".to_string(), "-".to_string()),
    };
    let pull_request = match &agent.pull_request {
        Some(pull_request) => format!("#{} {}", pull_request.number, pull_request.url),
        None if agent.open_pull_request => "requested".to_string(),
        None => "-".to_string(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("id", agent.id.clone()),
        ("name", or_dash(&agent.name).to_string()),
        ("status", short_status(agent.status)),
        ("repository", agent.repository.clone()),
        ("base branch", or_dash(&agent.base_branch).to_string()),
        ("work branch", or_dash(&agent.work_branch).to_string()),
        ("model", or_dash(&agent.model).to_string()),
        ("scripted", yes_no(agent.scripted).to_string()),
        ("region", or_dash(&agent.region).to_string()),
        ("team", or_dash(&agent.team).to_string()),
        ("node", node),
        ("epoch", epoch),
        ("created", timestamp_to_second(agent.created_at.as_ref())),
        ("updated", timestamp_to_second(agent.updated_at.as_ref())),
        ("pending follow-ups", agent.pending_follow_ups.to_string()),
        ("turns", agent.turns.to_string()),
        ("head commit", or_dash(&agent.head_commit).to_string()),
        ("pushed commit", or_dash(&agent.pushed_commit).to_string()),
        ("pull request", pull_request),
        ("last sequence", agent.last_sequence.to_string()),
        ("summary", or_dash(&agent.summary).to_string()),
        ("error", or_dash(&agent.error).to_string()),
        ("prompt", agent.prompt.clone()),
    ];
    for (key, value) in rows {
        table.add_row(vec![key.to_string(), value]);
    }
    finish_table(table)
}

pub(crate) fn cluster(cluster: &Cluster) -> String {
    let mut table = new_table(&[
        "ID", "GRPC", "MESH", "REGION", "ROLE", "VOTER", "UP", "DRAINING", "SLOTS",
    ]);
    let mut members: Vec<_> = cluster.members.iter().collect();
    members.sort_by_key(|member| member.id);
    for member in members {
        table.add_row(vec![
            member.id.to_string(),
            member.grpc_address.clone(),
            or_dash(&member.mesh_address).to_string(),
            or_dash(&member.region).to_string(),
            short_role(member.role),
            yes_no(member.voter).to_string(),
            // A node stopping cleanly is still up but takes no agents.
            if member.stopping { "stopping" } else { yes_no(member.up) }.to_string(),
            yes_no(member.draining).to_string(),
            format!("{}/{}", member.slots_in_use, member.slots),
        ]);
    }
    let leader = match cluster.leader_id {
        0 => "none known".to_string(),
        leader_id => leader_id.to_string(),
    };
    let table = finish_table(table);
    format!(
        "{table}\n\nleader: {leader}\nterm: {}\nlast applied index: {}\nanswered by node: {}",
        cluster.term, cluster.last_applied_index, cluster.node_id
    )
}

/// `vcs-provider`, `tool`; `unknown(7)` for a value this client does not know.
fn short_plugin_kind(value: i32) -> String {
    match PluginKind::try_from(value) {
        Ok(kind) => kind
            .as_str_name()
            .trim_start_matches("PLUGIN_KIND_")
            .to_ascii_lowercase()
            .replace('_', "-"),
        Err(_) => format!("unknown({value})"),
    }
}

/// `1.5 MiB`, `12.0 KiB`, `512 B`.
fn size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / KIB),
        _ => format!("{:.1} MiB", bytes as f64 / KIB / KIB),
    }
}

fn hosts(hosts: &[String]) -> String {
    if hosts.is_empty() {
        "-".to_string()
    } else {
        hosts.join(",")
    }
}

pub(crate) fn plugin_list(plugins: &[Plugin]) -> String {
    let mut table = new_table(&[
        "NAME", "VERSION", "KIND", "ENABLED", "LOADED", "SIZE", "SHA256", "HOSTS", "SETTINGS", "UPLOADED",
    ]);
    for plugin in plugins {
        table.add_row(vec![
            plugin.name.clone(),
            plugin.version.clone(),
            short_plugin_kind(plugin.kind),
            yes_no(plugin.enabled).to_string(),
            if !plugin.load_error.is_empty() {
                "failed".to_string()
            } else {
                yes_no(plugin.loaded_here).to_string()
            },
            size(plugin.size_bytes),
            plugin.sha256.chars().take(12).collect(),
            hosts(&plugin.granted_hosts),
            settings(&plugin.settings),
            if plugin.builtin {
                "built in".to_string()
            } else {
                timestamp_to_second(plugin.uploaded_at.as_ref())
            },
        ]);
    }
    finish_table(table)
}

/// `key=value` pairs in key order, or "-".
fn settings(settings: &std::collections::HashMap<String, String>) -> String {
    if settings.is_empty() {
        return "-".to_string();
    }
    let sorted: std::collections::BTreeMap<&String, &String> = settings.iter().collect();
    sorted
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn plugin_record(plugin: &Plugin) -> String {
    let mut table = new_table(&[]);
    let rows: Vec<(&str, String)> = vec![
        ("name", plugin.name.clone()),
        ("version", plugin.version.clone()),
        ("kind", short_plugin_kind(plugin.kind)),
        ("enabled", yes_no(plugin.enabled).to_string()),
        (
            "size",
            format!("{} ({} bytes)", size(plugin.size_bytes), plugin.size_bytes),
        ),
        ("sha256", plugin.sha256.clone()),
        ("granted hosts", hosts(&plugin.granted_hosts)),
        ("settings", settings(&plugin.settings)),
        ("uploaded", timestamp_to_second(plugin.uploaded_at.as_ref())),
    ];
    for (key, value) in rows {
        table.add_row(vec![key.to_string(), value]);
    }
    finish_table(table)
}

/// The one-line description of the agent printed when a watch opens.
pub(crate) fn snapshot_line(agent: &Agent) -> String {
    let placement = match &agent.assignment {
        Some(assignment) => format!(" on node {} (epoch {})", assignment.node_id, assignment.epoch),
        None => String::new(),
    };
    format!(
        "agent {} {:?} {}{placement}, last sequence {}",
        agent.id,
        agent.name,
        short_status(agent.status),
        agent.last_sequence
    )
}

/// `[12] 12:00:01` for a durable event, `[~] 12:00:01` for a live one.
pub(crate) fn event_prefix(event: &AgentEvent) -> String {
    let marker = if event.live {
        "~".to_string()
    } else {
        event.sequence.to_string()
    };
    format!("[{marker}] {}", time_of_day(event.at.as_ref()))
}

/// Said once at the top of a watch of an agent driven by the scripted provider, so that nobody
/// mistakes its canned replies for a model's.
pub(crate) const SCRIPTED_NOTICE: &str = "(scripted model: replies come from a script, not a model)";

/// The frames of the progress indicator shown while a command runs, one per redraw.
const SPINNER_FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// `assistant`, or `assistant [scripted]` when the replies come from a script.
pub(crate) fn assistant_label(scripted: bool) -> &'static str {
    if scripted {
        "assistant [scripted]"
    } else {
        "assistant"
    }
}

/// Everything after the prefix. Assistant deltas are printed inline by the watch; this is the
/// text of one of them on its own.
pub(crate) fn event_body(kind: &agent_event::Kind, scripted: bool) -> String {
    use agent_event::Kind;
    match kind {
        Kind::StatusChanged(changed) => {
            // Creation and placement keep the status; say what it is rather than "x -> x".
            let mut line = if changed.from == changed.to {
                format!("status {}", short_status(changed.to))
            } else {
                format!("status {} -> {}", short_status(changed.from), short_status(changed.to))
            };
            if let Some(assignment) = &changed.assignment {
                line.push_str(&format!(" on node {} (epoch {})", assignment.node_id, assignment.epoch));
            }
            if !changed.reason.is_empty() {
                line.push_str(&format!(": {}", changed.reason));
            }
            line
        }
        Kind::FollowUpAccepted(accepted) => {
            format!("follow-up #{} accepted: {}", accepted.index, excerpt(&accepted.text))
        }
        Kind::Log(line) => format!("log {}", line.text.trim_end()),
        Kind::AssistantDelta(delta) => format!("{}: {}", assistant_label(scripted), delta.text.trim_end()),
        Kind::ToolCallStarted(started) => format!(
            "tool {} started ({}) {}",
            started.tool,
            started.call_id,
            excerpt(&started.arguments)
        ),
        Kind::ToolCallFinished(finished) => {
            let outcome = if finished.failed { "failed" } else { "finished" };
            let truncated = if finished.truncated { ", output truncated" } else { "" };
            format!(
                "tool {} {outcome} in {} ms ({}{truncated}) {}",
                finished.tool,
                finished.duration_ms,
                finished.call_id,
                excerpt(&finished.output)
            )
        }
        Kind::AssistantMessage(message) => format!(
            "{}: (turn {}) {}",
            assistant_label(scripted),
            message.turn,
            message.text.trim_end()
        ),
        Kind::TurnFinished(turn) => format!(
            "turn {} finished: {} tool call(s), {} tokens in, {} out; model {} ms, tools {} ms",
            turn.turn, turn.tool_calls, turn.input_tokens, turn.output_tokens, turn.model_ms, turn.tools_ms
        ),
        Kind::PushFailed(failed) => {
            let short_commit: String = failed.commit.chars().take(12).collect();
            format!(
                "push of {short_commit} to {} failed (the commit is kept): {}",
                failed.branch,
                failed.error.trim_end()
            )
        }
        Kind::CommitPushed(pushed) => {
            let short_commit: String = pushed.commit.chars().take(12).collect();
            format!("commit {short_commit} pushed to {}", pushed.branch)
        }
        Kind::Summary(summary) => format!("summary {}", summary.text.trim_end()),
        Kind::PullRequestOpened(opened) => format!(
            "pull request #{} opened through {}: {}",
            opened.number, opened.provider, opened.url
        ),
        Kind::PullRequestFailed(failed) => {
            format!(
                "pull request not opened ({}): {}",
                failed.provider,
                failed.error.trim_end()
            )
        }
    }
}

/// What a `run_command` call runs, for the progress line: the `command` argument, or the raw
/// arguments when they are not the expected JSON object.
pub(crate) fn command_of_arguments(arguments: &str) -> String {
    let command = serde_json::from_str::<serde_json::Value>(arguments)
        .ok()
        .and_then(|value| value.get("command")?.as_str().map(str::to_string));
    match command {
        Some(command) => command,
        None => arguments.to_string(),
    }
}

/// `⠋ run_command: make test (12 s)`, no wider than `max_chars` characters: the command is cut
/// (with `…`) so that the line never wraps, since a wrapped line cannot be redrawn in place.
pub(crate) fn progress_line(
    frame_index: usize,
    tool: &str,
    command: &str,
    elapsed: std::time::Duration,
    max_chars: usize,
) -> String {
    let frame = SPINNER_FRAMES[frame_index % SPINNER_FRAMES.len()];
    let before = format!("{frame} {tool}: ");
    let after = format!(" ({} s)", elapsed.as_secs());
    let first_line = command.lines().next().unwrap_or("").trim();
    let room = max_chars.saturating_sub(before.chars().count() + after.chars().count());
    let command_chars = first_line.chars().count();
    let shown: String = if command_chars <= room && first_line.len() == command.trim().len() {
        first_line.to_string()
    } else {
        let kept: String = first_line.chars().take(room.saturating_sub(1)).collect();
        format!("{kept}…")
    };
    let line = format!("{before}{shown}{after}");
    // A terminal too narrow for even the frame and the seconds gets what fits.
    line.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::{Assignment, StatusChanged};

    #[test]
    fn status_change_line_reads_like_the_documentation() {
        let event = AgentEvent {
            sequence: 4,
            at: Some(Timestamp {
                seconds: 43_201,
                nanos: 0,
            }),
            kind: Some(agent_event::Kind::StatusChanged(StatusChanged {
                from: AgentStatus::Pending as i32,
                to: AgentStatus::Provisioning as i32,
                assignment: Some(Assignment { node_id: 2, epoch: 1 }),
                reason: String::new(),
            })),
            ..Default::default()
        };
        let line = format!(
            "{} {}",
            event_prefix(&event),
            event_body(event.kind.as_ref().unwrap(), false)
        );
        assert_eq!(line, "[4] 12:00:01 status pending -> provisioning on node 2 (epoch 1)");
    }

    #[test]
    fn progress_line_shows_the_command_and_the_seconds_and_never_wraps() {
        let elapsed = std::time::Duration::from_millis(12_900);
        assert_eq!(
            progress_line(0, "run_command", "make test", elapsed, 80),
            "⠋ run_command: make test (12 s)"
        );
        assert_eq!(
            progress_line(11, "run_command", "make test", elapsed, 80),
            "⠙ run_command: make test (12 s)"
        );
        let cut = progress_line(0, "run_command", "cargo test --workspace --all-features", elapsed, 33);
        assert_eq!(cut, "⠋ run_command: cargo test… (12 s)");
        assert_eq!(cut.chars().count(), 33);
        assert_eq!(
            progress_line(0, "run_command", "set -e\nmake", elapsed, 80),
            "⠋ run_command: set -e… (12 s)"
        );
        assert_eq!(progress_line(0, "run_command", "make", elapsed, 5).chars().count(), 5);
    }

    #[test]
    fn the_command_is_taken_from_the_arguments() {
        assert_eq!(command_of_arguments(r#"{"command":"make test"}"#), "make test");
        assert_eq!(command_of_arguments("not json"), "not json");
    }

    #[test]
    fn assistant_lines_say_when_the_replies_are_scripted() {
        let kind = agent_event::Kind::AssistantMessage(flotilla_proto::v1::AssistantMessage {
            text: "Done.\n".into(),
            turn: 2,
        });
        assert_eq!(event_body(&kind, false), "assistant: (turn 2) Done.");
        assert_eq!(event_body(&kind, true), "assistant [scripted]: (turn 2) Done.");
    }

    #[test]
    fn agent_record_shows_turns_the_pushed_commit_and_whether_it_is_scripted() {
        let record = agent_record(&Agent {
            status: AgentStatus::Finished as i32,
            work_branch: "flotilla/x".into(),
            head_commit: "abc".into(),
            turns: 4,
            scripted: true,
            ..Default::default()
        });
        let rows: Vec<Vec<&str>> = record
            .lines()
            .map(|line| line.splitn(2, "  ").map(str::trim).collect())
            .collect();
        for expected in [
            vec!["status", "finished"],
            vec!["work branch", "flotilla/x"],
            vec!["head commit", "abc"],
            vec!["pushed commit", "-"],
            vec!["turns", "4"],
            vec!["scripted", "yes"],
        ] {
            assert!(rows.contains(&expected), "{expected:?} in:\n{record}");
        }
    }

    #[test]
    fn plugins_show_kind_size_short_digest_and_hosts() {
        let plugin = Plugin {
            name: "github".into(),
            version: "1.2.0".into(),
            sha256: "0123456789abcdef".repeat(4),
            size_bytes: 1_572_864,
            kind: PluginKind::VcsProvider as i32,
            enabled: true,
            granted_hosts: vec!["api.github.com".into(), "github.com".into()],
            ..Default::default()
        };
        let list = plugin_list(std::slice::from_ref(&plugin));
        let row: Vec<&str> = list.lines().nth(1).expect("a row").split_whitespace().collect();
        assert_eq!(
            row,
            vec![
                "github",
                "1.2.0",
                "vcs-provider",
                "yes",
                "no",
                "1.5",
                "MiB",
                "0123456789ab",
                "api.github.com,github.com",
                "-",
                "-"
            ]
        );
        let builtin = plugin_list(&[Plugin {
            builtin: true,
            loaded_here: true,
            settings: [("api-base".to_string(), "https://ghe.example.com".to_string())].into(),
            ..plugin.clone()
        }]);
        let row: Vec<&str> = builtin.lines().nth(1).expect("a row").split_whitespace().collect();
        assert_eq!(row[4], "yes", "{builtin}");
        assert!(row.contains(&"api-base=https://ghe.example.com"), "{builtin}");
        assert!(builtin.contains("built in"), "{builtin}");
        let record = plugin_record(&Plugin {
            granted_hosts: Vec::new(),
            ..plugin
        });
        assert!(record.contains("1.5 MiB (1572864 bytes)"), "{record}");
        assert!(
            record
                .lines()
                .any(|line| line.starts_with("granted hosts") && line.ends_with('-')),
            "{record}"
        );
        assert_eq!(size(512), "512 B");
        assert_eq!(size(12 * 1024), "12.0 KiB");
    }

    #[test]
    fn live_events_are_marked_with_a_tilde() {
        let event = AgentEvent {
            sequence: 4,
            live: true,
            ..Default::default()
        };
        assert_eq!(event_prefix(&event), "[~] --:--:--");
    }
}
