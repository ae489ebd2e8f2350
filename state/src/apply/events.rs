//! An agent's durable history: events numbered 1, 2, 3… without gaps, of which the newest
//! [`MAX_EVENTS_PER_AGENT`] are kept.

use std::collections::VecDeque;

use crate::cluster_state::{Changes, ClusterState, MAX_EVENTS_PER_AGENT};
use crate::types::{AgentId, DurableEvent, EventKind, NodeId};

/// Appends an event to an agent's history under the next sequence number, trimming the oldest
/// beyond the bound. Does nothing for an unknown agent.
pub(crate) fn push_event(
    state: &mut ClusterState,
    changes: &mut Changes,
    agent: AgentId,
    at_ms: u64,
    node: Option<NodeId>,
    kind: EventKind,
) {
    let Some(record) = state.agents.get_mut(&agent) else {
        return;
    };
    record.last_sequence += 1;
    let event = DurableEvent {
        agent,
        sequence: record.last_sequence,
        at_ms,
        node,
        kind,
    };
    // A new agent's history starts with room for its first event only: most agents in a
    // queue have one event, and the default first growth would hold room for four (640 bytes
    // where 160 are used, on every node). A second event grows it the usual way.
    let events = state.events.entry(agent).or_insert_with(|| VecDeque::with_capacity(1));
    events.push_back(event.clone());
    while events.len() > MAX_EVENTS_PER_AGENT {
        if let Some(trimmed) = events.pop_front() {
            changes.trimmed_events.push((agent, trimmed.sequence));
        }
    }
    changes.agents.insert(agent);
    changes.new_events.push(event);
}
