//! Agent commands: create an agent, its owner's status writes, stop, and follow-ups (which
//! re-queue an agent that has ended).

use std::sync::Arc;

use super::{check_owner, finish_agent_change, not_in_family, push_event};
use crate::cluster_state::{Changes, ClusterState, MAX_FOLLOW_UPS_PER_AGENT};
use crate::command::{ApplyError, ApplyResult, Command, Response};
use crate::types::{AgentId, AgentRecord, AgentSpec, AgentStatus, Epoch, EventKind, FollowUp, NodeId};

/// Routes an agent command to its rule.
pub(super) fn apply_agent_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::CreateAgent { id, spec } => create_agent(state, changes, at_ms, *id, spec),
        Command::SetAgentStatus {
            agent,
            node,
            epoch,
            status,
            reason,
            summary,
            error,
        } => set_agent_status(
            state,
            changes,
            at_ms,
            StatusWrite {
                agent: *agent,
                node: *node,
                epoch: *epoch,
                status: *status,
                reason,
                summary: summary.as_deref(),
                error: error.as_deref(),
            },
        ),
        Command::StopAgent { agent, reason } => stop_agent(state, changes, at_ms, *agent, reason),
        Command::FollowUp { agent, text } => follow_up(state, changes, at_ms, *agent, text),
        other => not_in_family("agent", other),
    }
}

fn create_agent(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    id: AgentId,
    spec: &Arc<AgentSpec>,
) -> ApplyResult {
    if state.agents.contains_key(&id) {
        return Err(ApplyError::AgentExists(id));
    }
    super::audit::check_create_limits(state, &spec.team, at_ms)?;
    let record = AgentRecord {
        id,
        // Shared with the log entry that carries it: the prompt is not copied.
        spec: Arc::clone(spec),
        status: AgentStatus::Pending,
        assignment: None,
        epoch: Default::default(),
        created_at_ms: at_ms,
        updated_at_ms: at_ms,
        summary: None,
        error: None,
        follow_ups: Vec::new(),
        follow_ups_delivered: 0,
        head_commit: None,
        pull_request: None,
        last_sequence: 0,
        turns: 0,
        scripted: spec.scripted,
        pushed_commit: None,
    };
    state.agents.insert(id, record);
    push_event(
        state,
        changes,
        id,
        at_ms,
        None,
        EventKind::StatusChanged {
            from: AgentStatus::Pending,
            to: AgentStatus::Pending,
            assignment: None,
            reason: "created".to_string(),
        },
    );
    finish_agent_change(state, changes, id)
}

/// The fields of a `SetAgentStatus`, borrowed.
struct StatusWrite<'a> {
    agent: AgentId,
    node: NodeId,
    epoch: Epoch,
    status: AgentStatus,
    reason: &'a str,
    summary: Option<&'a str>,
    error: Option<&'a str>,
}

/// The owner moves its agent on. A terminal agent stays as it is; an agent finishes only once
/// it has taken every follow-up into a turn.
fn set_agent_status(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    write: StatusWrite<'_>,
) -> ApplyResult {
    let StatusWrite {
        agent,
        node,
        epoch,
        status,
        reason,
        summary,
        error,
    } = write;
    let owner = check_owner(state, agent, node, epoch)?;
    let record = state.agents.get(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    if status == AgentStatus::Finished && record.pending_follow_ups() > 0 {
        // A follow-up arrived after the last turn began: the run goes on to take it.
        return Err(ApplyError::UndeliveredFollowUps {
            agent,
            pending: record.pending_follow_ups(),
        });
    }
    if record.status.is_terminal() {
        return Err(ApplyError::InvalidState {
            agent,
            status: record.status,
            wanted: format!("cannot move to {status}"),
        });
    }
    let from = record.status;
    if let (Some(text), AgentStatus::Finished) = (summary, status) {
        push_event(
            state,
            changes,
            agent,
            at_ms,
            Some(node),
            EventKind::Summary { text: text.to_string() },
        );
    }
    let record = state.agents.get_mut(&agent).expect("checked above");
    record.status = status;
    record.updated_at_ms = at_ms;
    if let Some(summary) = summary {
        record.summary = Some(summary.to_string());
    }
    if let Some(error) = error {
        record.error = Some(error.to_string());
    }
    if from != status {
        push_event(
            state,
            changes,
            agent,
            at_ms,
            Some(node),
            EventKind::StatusChanged {
                from,
                to: status,
                assignment: owner,
                reason: reason.to_string(),
            },
        );
    }
    finish_agent_change(state, changes, agent)
}

/// Stops a live agent for good. Its assignment stays, so that its owner can still record the
/// push it makes while winding down; a stopped agent never runs again.
fn stop_agent(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    agent: AgentId,
    reason: &str,
) -> ApplyResult {
    let record = state.agents.get_mut(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    if record.status.is_terminal() {
        return Err(ApplyError::InvalidState {
            agent,
            status: record.status,
            wanted: "only a pending, provisioning or running agent can be stopped".to_string(),
        });
    }
    let from = record.status;
    record.status = AgentStatus::Stopped;
    record.updated_at_ms = at_ms;
    let assignment = record.assignment;
    push_event(
        state,
        changes,
        agent,
        at_ms,
        None,
        EventKind::StatusChanged {
            from,
            to: AgentStatus::Stopped,
            assignment,
            reason: reason.to_string(),
        },
    );
    finish_agent_change(state, changes, agent)
}

/// Queues a follow-up. A follow-up to a finished or failed agent starts a new run: the agent
/// goes back to pending, unassigned, and keeps its epoch so the next assignment is higher.
fn follow_up(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, agent: AgentId, text: &str) -> ApplyResult {
    let record = state.agents.get(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    if matches!(record.status, AgentStatus::Finished | AgentStatus::Failed) {
        // Re-queueing an ended agent makes it live again: it counts against the running limit.
        let team = crate::types::owning_team(&record.spec.team);
        super::audit::check_running_limit(state, team, state.limits_of(team))?;
    }
    let record = state.agents.get_mut(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    if record.status == AgentStatus::Stopped {
        return Err(ApplyError::InvalidState {
            agent,
            status: record.status,
            wanted: "a stopped agent takes no follow-ups".to_string(),
        });
    }
    if record.follow_ups.len() >= MAX_FOLLOW_UPS_PER_AGENT {
        return Err(ApplyError::TooManyFollowUps {
            agent,
            limit: MAX_FOLLOW_UPS_PER_AGENT,
        });
    }
    record.follow_ups.push(FollowUp {
        text: text.to_string(),
        at_ms,
    });
    let index = record.follow_ups.len() as u32;
    record.updated_at_ms = at_ms;
    let restart = matches!(record.status, AgentStatus::Finished | AgentStatus::Failed);
    let from = record.status;
    if restart {
        record.status = AgentStatus::Pending;
        record.assignment = None;
        record.error = None;
    }
    push_event(
        state,
        changes,
        agent,
        at_ms,
        None,
        EventKind::FollowUpAccepted {
            text: text.to_string(),
            index,
        },
    );
    if restart {
        push_event(
            state,
            changes,
            agent,
            at_ms,
            None,
            EventKind::StatusChanged {
                from,
                to: AgentStatus::Pending,
                assignment: None,
                reason: "follow-up starts a new run".to_string(),
            },
        );
    }
    match finish_agent_change(state, changes, agent)? {
        Response::Agent(agent) => Ok(Response::FollowUp { agent, index }),
        other => Ok(other),
    }
}
