//! What the owner of a running agent records of its run: finished turns (with the checkpoint to
//! resume from and the turn's durable events), pushes of the work branch, and the outcome of
//! opening a pull request. Every write is fenced: only the node that owns the agent under the
//! current epoch may make it.

use super::{check_owner, not_in_family, push_event};
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Response, MAX_CHECKPOINT_BYTES, MAX_EVENTS_PER_TURN};
use crate::types::{AgentId, AgentStatus, Checkpoint, Epoch, EventKind, NodeId, PullRequestRef};

/// Routes an owner's record of its run to its rule.
pub(super) fn apply_turn_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::RecordTurn {
            agent,
            node,
            epoch,
            turn,
            follow_ups_delivered,
            head_commit,
            scripted,
            checkpoint,
            events,
        } => record_turn(
            state,
            changes,
            at_ms,
            OwnerWrite::new(*agent, *node, *epoch),
            TurnRecord {
                turn: *turn,
                follow_ups_delivered: *follow_ups_delivered,
                head_commit: head_commit.as_deref(),
                scripted: *scripted,
                checkpoint,
                events,
            },
        ),
        Command::RecordPush {
            agent,
            node,
            epoch,
            branch,
            commit,
            error,
        } => {
            let owner = OwnerWrite::new(*agent, *node, *epoch);
            record_push(state, changes, at_ms, owner, branch, commit, error.as_deref())
        }
        Command::RecordPullRequest {
            agent,
            node,
            epoch,
            provider,
            pull_request,
            error,
        } => {
            let owner = OwnerWrite::new(*agent, *node, *epoch);
            record_pull_request(
                state,
                changes,
                at_ms,
                owner,
                provider,
                pull_request.as_ref(),
                error.as_deref(),
            )
        }
        Command::RecordBranch {
            agent,
            node,
            epoch,
            branch,
            recorded,
            commit,
            displaced,
        } => {
            let owner = OwnerWrite::new(*agent, *node, *epoch);
            let change = BranchChange {
                branch,
                recorded: recorded.as_deref(),
                commit: commit.as_deref(),
                displaced: displaced.as_deref(),
            };
            record_branch(state, changes, at_ms, owner, change)
        }
        Command::CheckOwner { agent, node, epoch } => {
            // Nothing changes: the answer is whether the writer still owns the agent.
            check_owner(state, *agent, *node, *epoch)?;
            Ok(Response::Done)
        }
        other => not_in_family("turn", other),
    }
}

/// Who writes an owner-only command: the agent, and the node and epoch it claims to own it under.
#[derive(Clone, Copy)]
struct OwnerWrite {
    agent: AgentId,
    node: NodeId,
    epoch: Epoch,
}

impl OwnerWrite {
    fn new(agent: AgentId, node: NodeId, epoch: Epoch) -> OwnerWrite {
        OwnerWrite { agent, node, epoch }
    }
}

/// The fields of a `RecordTurn` besides its writer, borrowed.
struct TurnRecord<'a> {
    turn: u32,
    follow_ups_delivered: u32,
    head_commit: Option<&'a str>,
    scripted: bool,
    checkpoint: &'a [u8],
    events: &'a [EventKind],
}

/// Records a finished turn. `turn` must be exactly one more than the turns recorded, so that a
/// retried or replayed turn is refused rather than applied twice; delivered follow-ups only move
/// forward, within those that exist.
fn record_turn(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    owner: OwnerWrite,
    turn: TurnRecord<'_>,
) -> ApplyResult {
    let OwnerWrite { agent, node, epoch } = owner;
    check_owner(state, agent, node, epoch)?;
    check_turn(state, agent, &turn)?;
    let record = state.agents.get_mut(&agent).expect("checked by check_owner");
    record.turns = turn.turn;
    record.follow_ups_delivered = turn.follow_ups_delivered;
    record.scripted = turn.scripted;
    record.updated_at_ms = at_ms;
    if let Some(head_commit) = turn.head_commit {
        record.head_commit = Some(head_commit.to_string());
    }
    for event in turn.events {
        if let EventKind::CommitPushed { commit, .. } = event {
            record.pushed_commit = Some(commit.clone());
        }
    }
    state.checkpoints.insert(
        agent,
        Checkpoint {
            turn: turn.turn,
            at_ms,
            head_commit: turn.head_commit.map(str::to_string),
            data: turn.checkpoint.to_vec(),
        },
    );
    changes.checkpoints.insert(agent);
    for event in turn.events {
        push_event(state, changes, agent, at_ms, Some(node), event.clone());
    }
    changes.agents.insert(agent);
    Ok(Response::Done)
}

/// Refuses a turn of an agent that is not running, out of order, or over the bounds.
fn check_turn(state: &ClusterState, agent: AgentId, turn: &TurnRecord<'_>) -> Result<(), ApplyError> {
    let record = state.agents.get(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    if record.status != AgentStatus::Running {
        return Err(ApplyError::InvalidState {
            agent,
            status: record.status,
            wanted: "only a running agent records turns".to_string(),
        });
    }
    if turn.turn != record.turns + 1 {
        return Err(ApplyError::TurnOutOfOrder {
            agent,
            recorded: record.turns,
            found: turn.turn,
        });
    }
    let follow_ups_delivered = turn.follow_ups_delivered;
    if follow_ups_delivered < record.follow_ups_delivered || follow_ups_delivered as usize > record.follow_ups.len() {
        return Err(ApplyError::Invalid(format!(
            "{follow_ups_delivered} follow-ups delivered, but {} were before and {} exist",
            record.follow_ups_delivered,
            record.follow_ups.len()
        )));
    }
    if turn.checkpoint.len() > MAX_CHECKPOINT_BYTES {
        return Err(ApplyError::TooLarge {
            what: "checkpoint".to_string(),
            found: turn.checkpoint.len(),
            limit: MAX_CHECKPOINT_BYTES,
        });
    }
    if turn.events.len() > MAX_EVENTS_PER_TURN {
        return Err(ApplyError::TooLarge {
            what: "events of one turn".to_string(),
            found: turn.events.len(),
            limit: MAX_EVENTS_PER_TURN,
        });
    }
    Ok(())
}

/// Records the result of pushing the work branch; also accepted after a stop, from the owner
/// that pushes what it had before it wound down.
fn record_push(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    owner: OwnerWrite,
    branch: &str,
    commit: &str,
    error: Option<&str>,
) -> ApplyResult {
    let OwnerWrite { agent, node, epoch } = owner;
    check_owner(state, agent, node, epoch)?;
    check_branch_open(state, agent)?;
    let record = state.agents.get_mut(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    record.head_commit = Some(commit.to_string());
    record.updated_at_ms = at_ms;
    let event = match error {
        None => {
            record.pushed_commit = Some(commit.to_string());
            EventKind::CommitPushed {
                branch: branch.to_string(),
                commit: commit.to_string(),
            }
        }
        Some(error) => EventKind::PushFailed {
            branch: branch.to_string(),
            commit: commit.to_string(),
            error: error.to_string(),
        },
    };
    push_event(state, changes, agent, at_ms, Some(node), event);
    changes.agents.insert(agent);
    Ok(Response::Done)
}

/// Refuses to move the work branch's record of a finished agent: its `pushed_commit` is what the
/// origin held when it finished, checked then, and stays so (a follow-up sets it pending first).
fn check_branch_open(state: &ClusterState, agent: AgentId) -> Result<(), ApplyError> {
    let record = state.agents.get(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    if record.status == AgentStatus::Finished {
        return Err(ApplyError::InvalidState {
            agent,
            status: record.status,
            wanted: "a finished agent's pushed commit is settled".to_string(),
        });
    }
    Ok(())
}

/// The fields of a `RecordBranch` besides its writer, borrowed.
struct BranchChange<'a> {
    branch: &'a str,
    recorded: Option<&'a str>,
    commit: Option<&'a str>,
    displaced: Option<&'a str>,
}

/// Where a node keeps a commit it displaced from an agent's work branch, in its mirror of the
/// repository.
pub fn displaced_ref(agent: AgentId, commit: &str) -> String {
    format!("refs/flotilla/displaced/{agent}/{commit}")
}

/// Records the work branch at the origin: adopts a branch that was there before anything was
/// recorded, or reports a displaced commit while the record stays. `recorded` must be the
/// record as it stands, so a write made against an older record is refused.
fn record_branch(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    owner: OwnerWrite,
    change: BranchChange<'_>,
) -> ApplyResult {
    let OwnerWrite { agent, node, epoch } = owner;
    check_owner(state, agent, node, epoch)?;
    check_branch_open(state, agent)?;
    let record = state.agents.get(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    if record.pushed_commit.as_deref() != change.recorded {
        return Err(ApplyError::BranchRecordMoved {
            agent,
            recorded: record.pushed_commit.clone(),
            expected: change.recorded.map(str::to_string),
        });
    }
    let event = match (change.displaced, change.recorded, change.commit) {
        (Some(displaced), recorded, commit) if commit == recorded && Some(displaced) != recorded => {
            EventKind::CommitDisplaced {
                branch: change.branch.to_string(),
                commit: displaced.to_string(),
                restored: recorded.map(str::to_string),
                kept: displaced_ref(agent, displaced),
            }
        }
        (None, None, Some(commit)) => EventKind::Log {
            text: format!(
                "the work branch {} was at {commit} at the origin before anything was recorded; the agent builds on it",
                change.branch
            ),
        },
        _ => {
            return Err(ApplyError::Invalid(
                "a branch record either adopts the origin's branch when nothing is recorded, or reports a displaced commit and keeps the record".to_string(),
            ))
        }
    };
    let record = state.agents.get_mut(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    record.pushed_commit = change.commit.map(str::to_string);
    record.updated_at_ms = at_ms;
    push_event(state, changes, agent, at_ms, Some(node), event);
    changes.agents.insert(agent);
    Ok(Response::Done)
}

/// Records the outcome of opening the agent's pull request: the pull request, or why the
/// provider could not open it (exactly one of the two).
fn record_pull_request(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    owner: OwnerWrite,
    provider: &str,
    pull_request: Option<&PullRequestRef>,
    error: Option<&str>,
) -> ApplyResult {
    let OwnerWrite { agent, node, epoch } = owner;
    check_owner(state, agent, node, epoch)?;
    // The outcome is checked before anything changes: a refused command leaves the record as
    // it was.
    let event = match (pull_request, error) {
        (Some(pull_request), None) => EventKind::PullRequestOpened {
            url: pull_request.url.clone(),
            number: pull_request.number,
            provider: provider.to_string(),
        },
        (None, Some(error)) => EventKind::PullRequestFailed {
            provider: provider.to_string(),
            error: error.to_string(),
        },
        _ => {
            return Err(ApplyError::Invalid(
                "a pull request outcome is either a pull request or an error".to_string(),
            ))
        }
    };
    let record = state.agents.get_mut(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    record.updated_at_ms = at_ms;
    if let Some(pull_request) = pull_request {
        record.pull_request = Some(pull_request.clone());
    }
    push_event(state, changes, agent, at_ms, Some(node), event);
    changes.agents.insert(agent);
    Ok(Response::Done)
}
