//! Replicated records to their wire form.

use flotilla_proto::v1;
use flotilla_raft::{AgentRecord, AgentStatus, Assignment, DurableEvent, EventKind, PluginKind, PluginRecord};

pub fn timestamp(at_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (at_ms / 1000) as i64,
        nanos: ((at_ms % 1000) * 1_000_000) as i32,
    }
}

pub fn status(status: AgentStatus) -> v1::AgentStatus {
    match status {
        AgentStatus::Pending => v1::AgentStatus::Pending,
        AgentStatus::Provisioning => v1::AgentStatus::Provisioning,
        AgentStatus::Running => v1::AgentStatus::Running,
        AgentStatus::Finished => v1::AgentStatus::Finished,
        AgentStatus::Failed => v1::AgentStatus::Failed,
        AgentStatus::Stopped => v1::AgentStatus::Stopped,
    }
}

pub fn status_from_wire(status: v1::AgentStatus) -> Option<AgentStatus> {
    match status {
        v1::AgentStatus::Unspecified => None,
        v1::AgentStatus::Pending => Some(AgentStatus::Pending),
        v1::AgentStatus::Provisioning => Some(AgentStatus::Provisioning),
        v1::AgentStatus::Running => Some(AgentStatus::Running),
        v1::AgentStatus::Finished => Some(AgentStatus::Finished),
        v1::AgentStatus::Failed => Some(AgentStatus::Failed),
        v1::AgentStatus::Stopped => Some(AgentStatus::Stopped),
    }
}

fn assignment(assignment: Option<Assignment>) -> Option<v1::Assignment> {
    assignment.map(|assignment| v1::Assignment {
        node_id: assignment.node,
        epoch: assignment.epoch.0,
    })
}

pub fn agent(record: &AgentRecord) -> v1::Agent {
    v1::Agent {
        id: record.id.to_string(),
        name: record.spec.name.clone(),
        prompt: record.spec.prompt.clone(),
        repository: record.spec.repository.clone(),
        base_branch: record.spec.base_branch.clone(),
        work_branch: record.spec.work_branch.clone(),
        model: record.spec.model.clone(),
        region: record.spec.region.clone().unwrap_or_default(),
        status: status(record.status) as i32,
        assignment: assignment(record.assignment),
        created_at: Some(timestamp(record.created_at_ms)),
        updated_at: Some(timestamp(record.updated_at_ms)),
        summary: record.summary.clone().unwrap_or_default(),
        error: record.error.clone().unwrap_or_default(),
        team: super::authz::owning_team(&record.spec.team).to_string(),
        user: record.spec.user.clone(),
        pending_follow_ups: record.pending_follow_ups(),
        pull_request: record.pull_request.as_ref().map(|pull_request| v1::PullRequest {
            url: pull_request.url.clone(),
            number: pull_request.number,
        }),
        head_commit: record.head_commit.clone().unwrap_or_default(),
        open_pull_request: record.spec.open_pull_request,
        last_sequence: record.last_sequence,
        egress_allow: record.spec.egress_allow.clone(),
        turns: record.turns,
        scripted: record.scripted,
        pushed_commit: record.pushed_commit.clone().unwrap_or_default(),
        summary_hidden: false,
    }
}

/// A durable event on the wire; `scripted` marks every event of a scripted agent.
pub fn event(event: &DurableEvent, scripted: bool) -> v1::AgentEvent {
    use v1::agent_event::Kind;
    let kind = match &event.kind {
        EventKind::StatusChanged {
            from,
            to,
            assignment: placed,
            reason,
        } => Kind::StatusChanged(v1::StatusChanged {
            from: status(*from) as i32,
            to: status(*to) as i32,
            assignment: assignment(*placed),
            reason: reason.clone(),
        }),
        EventKind::FollowUpAccepted { text, index } => Kind::FollowUpAccepted(v1::FollowUpAccepted {
            text: text.clone(),
            index: *index,
        }),
        EventKind::Log { text } => Kind::Log(v1::LogLine { text: text.clone() }),
        EventKind::AssistantMessage { turn, text } => Kind::AssistantMessage(v1::AssistantMessage {
            text: text.clone(),
            turn: *turn,
        }),
        EventKind::ToolCallFinished {
            call_id,
            tool,
            arguments: _,
            output,
            truncated,
            failed,
            duration_ms,
        } => Kind::ToolCallFinished(v1::ToolCallFinished {
            call_id: call_id.clone(),
            tool: tool.clone(),
            output: output.clone(),
            truncated: *truncated,
            failed: *failed,
            duration_ms: *duration_ms,
        }),
        EventKind::PullRequestOpened { url, number, provider } => Kind::PullRequestOpened(v1::PullRequestOpened {
            url: url.clone(),
            number: *number,
            provider: provider.clone(),
        }),
        EventKind::PullRequestFailed { provider, error } => Kind::PullRequestFailed(v1::PullRequestFailed {
            provider: provider.clone(),
            error: error.clone(),
        }),
        EventKind::CommitPushed { branch, commit } => Kind::CommitPushed(v1::CommitPushed {
            branch: branch.clone(),
            commit: commit.clone(),
        }),
        EventKind::PushFailed { branch, commit, error } => Kind::PushFailed(v1::PushFailed {
            branch: branch.clone(),
            commit: commit.clone(),
            error: error.clone(),
        }),
        EventKind::TurnFinished {
            turn,
            input_tokens,
            output_tokens,
            tool_calls,
            model_ms,
            tools_ms,
        } => Kind::TurnFinished(v1::TurnFinished {
            model_ms: *model_ms,
            tools_ms: *tools_ms,
            turn: *turn,
            input_tokens: *input_tokens,
            output_tokens: *output_tokens,
            tool_calls: *tool_calls,
        }),
        EventKind::Summary { text } => Kind::Summary(v1::Summary { text: text.clone() }),
        // Watchers see it as a log line; the durable history keeps its fields.
        EventKind::CommitDisplaced {
            branch,
            commit,
            restored,
            kept,
        } => Kind::Log(v1::LogLine {
            text: format!(
                "commit {commit} on {branch} was pushed by an owner that no longer held the agent; the branch is back at {}; the commit is kept on node {} as {kept}",
                restored.as_deref().unwrap_or("(no branch)"),
                event.node.unwrap_or(0)
            ),
        }),
    };
    v1::AgentEvent {
        agent_id: event.agent.to_string(),
        sequence: event.sequence,
        live: false,
        at: Some(timestamp(event.at_ms)),
        node_id: event.node.unwrap_or(0),
        scripted,
        kind: Some(kind),
    }
}

pub fn plugin_kind(kind: PluginKind) -> v1::PluginKind {
    match kind {
        PluginKind::VcsProvider => v1::PluginKind::VcsProvider,
        PluginKind::Tool => v1::PluginKind::Tool,
    }
}

/// A plugin's record on the wire; its bytes never are.
pub fn plugin(record: &PluginRecord) -> v1::Plugin {
    v1::Plugin {
        name: record.name.clone(),
        version: record.version.clone(),
        sha256: record.sha256.clone(),
        size_bytes: record.size_bytes,
        kind: plugin_kind(record.kind) as i32,
        enabled: record.enabled,
        granted_hosts: record.granted_hosts.clone(),
        uploaded_at: Some(timestamp(record.uploaded_at_ms)),
        loaded_here: false,
        load_error: String::new(),
        settings: Default::default(),
        builtin: false,
    }
}
