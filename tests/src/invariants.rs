//! Invariants over an agent's durable history, checked by the failure tests: whatever happened
//! to the nodes, the history must still make sense.

use std::collections::BTreeMap;

use flotilla_proto::v1::{self, agent_event, watch_agent_response};
use tokio_stream::StreamExt;

use crate::AgentClient;

/// Reads an agent's whole durable history (every event up to the sequence the agent record names).
pub async fn durable_history(client: &mut AgentClient, id: &str) -> Result<Vec<v1::AgentEvent>, String> {
    let mut stream = client
        .watch_agent(v1::WatchAgentRequest {
            id: id.to_string(),
            after_sequence: 0,
        })
        .await
        .map_err(|status| format!("watch {id}: {status}"))?
        .into_inner();
    let mut last_sequence = None;
    let mut events = Vec::new();
    while last_sequence.is_none_or(|last| (events.len() as u64) < last) {
        let message = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
            .await
            .map_err(|_| format!("watch {id}: no event within 30 s"))?
            .ok_or_else(|| format!("watch {id}: stream ended after {} events", events.len()))?
            .map_err(|status| format!("watch {id}: {status}"))?;
        match message.kind {
            Some(watch_agent_response::Kind::Snapshot(agent)) => last_sequence = Some(agent.last_sequence),
            Some(watch_agent_response::Kind::Event(event)) if !event.live => events.push(event),
            _ => {}
        }
    }
    Ok(events)
}

/// Checks one agent's durable history:
/// - sequences are 1, 2, 3, ... with no gap and no repeat;
/// - every assignment carries a higher epoch than any before it;
/// - every status change made by a node comes from the node that holds the current epoch;
/// - once stopped, nothing but follow-up refusals happen (no status change leaves `stopped`).
pub fn check_agent_history(id: &str, events: &[v1::AgentEvent]) -> Result<(), String> {
    let mut highest_epoch = 0;
    let mut owner: Option<(u64, u64)> = None;
    let mut stopped = false;
    let mut seen_epochs: BTreeMap<u64, u64> = BTreeMap::new();
    for (position, event) in events.iter().enumerate() {
        let expected = position as u64 + 1;
        if event.sequence != expected {
            return Err(format!(
                "agent {id}: event {position} has sequence {}, expected {expected}",
                event.sequence
            ));
        }
        let Some(agent_event::Kind::StatusChanged(change)) = &event.kind else {
            continue;
        };
        if stopped {
            return Err(format!(
                "agent {id}: status changed after it was stopped (sequence {})",
                event.sequence
            ));
        }
        let to = v1::AgentStatus::try_from(change.to).unwrap_or(v1::AgentStatus::Unspecified);
        let from = v1::AgentStatus::try_from(change.from).unwrap_or(v1::AgentStatus::Unspecified);
        // A placement: pending -> pending with an assignment and no node of its own.
        if from == v1::AgentStatus::Pending && to == v1::AgentStatus::Pending && event.node_id == 0 {
            if let Some(assignment) = &change.assignment {
                if change.reason.starts_with("assigned") {
                    if assignment.epoch <= highest_epoch {
                        return Err(format!(
                            "agent {id}: assigned under epoch {} after epoch {highest_epoch} (sequence {})",
                            assignment.epoch, event.sequence
                        ));
                    }
                    if let Some(node) = seen_epochs.insert(assignment.epoch, assignment.node_id) {
                        return Err(format!(
                            "agent {id}: epoch {} given to node {node} and to node {}",
                            assignment.epoch, assignment.node_id
                        ));
                    }
                    highest_epoch = assignment.epoch;
                    owner = Some((assignment.node_id, assignment.epoch));
                }
            }
        }
        if event.node_id != 0 {
            let assignment = change.assignment.as_ref().map(|a| (a.node_id, a.epoch));
            if assignment != owner || assignment.map(|(node, _)| node) != Some(event.node_id) {
                return Err(format!(
                    "agent {id}: node {} changed the status under {:?} while the owner was {:?} (sequence {})",
                    event.node_id, assignment, owner, event.sequence
                ));
            }
        }
        if to == v1::AgentStatus::Pending && change.reason.contains("down") {
            owner = None;
        }
        stopped = to == v1::AgentStatus::Stopped;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(
        sequence: u64,
        node: u64,
        from: v1::AgentStatus,
        to: v1::AgentStatus,
        assigned: Option<(u64, u64)>,
        reason: &str,
    ) -> v1::AgentEvent {
        v1::AgentEvent {
            sequence,
            node_id: node,
            kind: Some(agent_event::Kind::StatusChanged(v1::StatusChanged {
                from: from as i32,
                to: to as i32,
                assignment: assigned.map(|(node_id, epoch)| v1::Assignment { node_id, epoch }),
                reason: reason.to_string(),
            })),
            ..Default::default()
        }
    }

    use v1::AgentStatus::{Pending, Provisioning};

    #[test]
    fn a_clean_failover_history_passes() {
        let events = vec![
            change(1, 0, Pending, Pending, None, "created"),
            change(2, 0, Pending, Pending, Some((3, 1)), "assigned to node 3 under epoch 1"),
            change(3, 3, Pending, Provisioning, Some((3, 1)), "waiting for a machine"),
            change(4, 0, Provisioning, Pending, Some((3, 1)), "node 3 down"),
            change(5, 0, Pending, Pending, Some((1, 2)), "assigned to node 1 under epoch 2"),
            change(6, 1, Pending, Provisioning, Some((1, 2)), "waiting for a machine"),
        ];
        assert_eq!(check_agent_history("a", &events), Ok(()));
    }

    #[test]
    fn gaps_stale_owners_and_reused_epochs_are_caught() {
        let gap = vec![
            change(1, 0, Pending, Pending, None, "created"),
            change(3, 0, Pending, Pending, None, "x"),
        ];
        assert!(check_agent_history("a", &gap).unwrap_err().contains("sequence 3"));
        let stale = vec![
            change(1, 0, Pending, Pending, Some((3, 1)), "assigned to node 3 under epoch 1"),
            change(2, 0, Pending, Pending, None, "node 3 down"),
            change(3, 0, Pending, Pending, Some((1, 2)), "assigned to node 1 under epoch 2"),
            change(4, 3, Pending, Provisioning, Some((3, 1)), "late write"),
        ];
        assert!(check_agent_history("a", &stale)
            .unwrap_err()
            .contains("node 3 changed the status"));
        let reused = vec![
            change(1, 0, Pending, Pending, Some((3, 2)), "assigned to node 3 under epoch 2"),
            change(2, 0, Pending, Pending, Some((1, 2)), "assigned to node 1 under epoch 2"),
        ];
        assert!(check_agent_history("a", &reused).unwrap_err().contains("epoch 2"));
    }
}
