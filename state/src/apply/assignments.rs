//! Assignments: which node owns an agent, under which epoch. An assignment takes an unassigned
//! pending agent to a live node under exactly the next epoch, so a stale or repeated placement
//! decision has no effect; an agent whose node goes down or away goes back to pending, and its
//! next assignment is under a higher epoch, which fences the old owner's writes.

use super::push_event;
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyResult, AssignOne, Response};
use crate::types::{AgentId, AgentStatus, Assignment, EventKind, NodeId};

/// Applies each assignment on its own; answers with the agents it assigned.
pub(super) fn assign_agents(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    assignments: &[AssignOne],
) -> ApplyResult {
    let mut assigned = Vec::new();
    for one in assignments {
        if assign_one(state, changes, one, at_ms) {
            assigned.push(one.agent);
        }
    }
    Ok(Response::Assigned(assigned))
}

fn assign_one(state: &mut ClusterState, changes: &mut Changes, one: &AssignOne, at_ms: u64) -> bool {
    let node_ok = state
        .nodes
        .get(&one.node)
        .map(|node| node.takes_agents())
        .unwrap_or(false);
    let Some(record) = state.agents.get_mut(&one.agent) else {
        return false;
    };
    if !node_ok
        || record.status != AgentStatus::Pending
        || record.assignment.is_some()
        || one.epoch != record.epoch.next()
    {
        return false;
    }
    let assignment = Assignment {
        node: one.node,
        epoch: one.epoch,
    };
    record.assignment = Some(assignment);
    record.epoch = one.epoch;
    record.updated_at_ms = at_ms;
    push_event(
        state,
        changes,
        one.agent,
        at_ms,
        None,
        EventKind::StatusChanged {
            from: AgentStatus::Pending,
            to: AgentStatus::Pending,
            assignment: Some(assignment),
            reason: format!("assigned to node {} under epoch {}", one.node, one.epoch),
        },
    );
    changes.agents.insert(one.agent);
    state.index_agent(one.agent);
    true
}

/// Sends every live agent a node owns back to pending, unassigned (the node went down, was
/// removed, or is stopping). Answers with the agents it re-queued.
pub(super) fn requeue_agents_of(
    state: &mut ClusterState,
    changes: &mut Changes,
    node: NodeId,
    at_ms: u64,
    reason: &str,
) -> Vec<AgentId> {
    let ids: Vec<AgentId> = state
        .active_by_node
        .get(&node)
        .map(|set| set.iter().copied().collect())
        .unwrap_or_default();
    for id in &ids {
        let Some(record) = state.agents.get_mut(id) else {
            continue;
        };
        let from = record.status;
        let previous = record.assignment;
        record.status = AgentStatus::Pending;
        record.assignment = None;
        record.updated_at_ms = at_ms;
        push_event(
            state,
            changes,
            *id,
            at_ms,
            None,
            EventKind::StatusChanged {
                from,
                to: AgentStatus::Pending,
                assignment: previous,
                reason: reason.to_string(),
            },
        );
        changes.agents.insert(*id);
        state.index_agent(*id);
    }
    ids
}
