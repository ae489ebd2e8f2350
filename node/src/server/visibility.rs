//! What a team's `display_summary` setting hides. With it off, the team's members and viewers
//! (not its admins, not the cluster admin) get no summaries and no diffs through the API:
//!
//! - `Agent.summary` is empty and `Agent.summary_hidden` is true (in get, list, create, stop,
//!   follow-up and delete answers, and the record that opens a watch);
//! - `Summary` events carry [`HIDDEN`] instead of their text;
//! - the file changes the agent made are hidden: the arguments of `write_file` and `edit_file`
//!   calls (the new content; the old and new strings) and their output;
//! - `ListAgents`' search does not look into summaries.
//!
//! The prompt, the assistant's messages and other tools' output stay visible: they are the
//! conversation the member drives, not a digest of the code. The setting is read at each call,
//! so turning it off hides what every later call returns, for old agents too.

use flotilla_proto::v1;

/// What stands in for hidden text.
pub const HIDDEN: &str = "[hidden: the team's display_summary setting is off]";

/// Tools whose calls carry file changes.
const DIFF_TOOLS: &[&str] = &["write_file", "edit_file"];

/// Hides the summary of an agent record.
pub fn hide_agent(agent: &mut v1::Agent) {
    agent.summary.clear();
    agent.summary_hidden = true;
}

/// Hides the summary or the file change an event carries; other events pass unchanged.
pub fn hide_event(event: &mut v1::AgentEvent) {
    use v1::agent_event::Kind;
    match &mut event.kind {
        Some(Kind::Summary(summary)) => summary.text = HIDDEN.to_string(),
        Some(Kind::ToolCallStarted(call)) if DIFF_TOOLS.contains(&call.tool.as_str()) => {
            call.arguments = HIDDEN.to_string()
        }
        Some(Kind::ToolCallFinished(call)) if DIFF_TOOLS.contains(&call.tool.as_str()) => {
            call.output = HIDDEN.to_string()
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::agent_event::Kind;

    #[test]
    fn summaries_and_file_changes_are_hidden_and_the_rest_is_not() {
        let mut summary = v1::AgentEvent {
            kind: Some(Kind::Summary(v1::Summary { text: "secret".into() })),
            ..Default::default()
        };
        hide_event(&mut summary);
        assert!(matches!(summary.kind, Some(Kind::Summary(ref s)) if s.text == HIDDEN));
        let mut edit = v1::AgentEvent {
            kind: Some(Kind::ToolCallStarted(v1::ToolCallStarted {
                call_id: "1".into(),
                tool: "edit_file".into(),
                arguments: "{\"new_string\":\"code\"}".into(),
            })),
            ..Default::default()
        };
        hide_event(&mut edit);
        assert!(matches!(edit.kind, Some(Kind::ToolCallStarted(ref c)) if c.arguments == HIDDEN));
        let mut command = v1::AgentEvent {
            kind: Some(Kind::ToolCallFinished(v1::ToolCallFinished {
                tool: "run_command".into(),
                output: "ok".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        hide_event(&mut command);
        assert!(matches!(command.kind, Some(Kind::ToolCallFinished(ref c)) if c.output == "ok"));
        let mut agent = v1::Agent {
            summary: "done".into(),
            ..Default::default()
        };
        hide_agent(&mut agent);
        assert!(agent.summary.is_empty() && agent.summary_hidden);
    }
}
