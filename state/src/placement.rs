//! Placement: which node runs each pending agent. [`place`] is a pure decision over what
//! [`placement_input`] reads from the state; the scheduler actor on the leader runs it whenever
//! the state changes and writes the decisions as one `AssignAgents` command, which `apply`
//! checks again (a decision made on a stale state simply has no effect).

use std::collections::BTreeMap;

use crate::cluster_state::ClusterState;
use crate::command::AssignOne;
use crate::types::{AgentId, Epoch, NodeId};

/// Most assignments written in one Raft entry.
pub const MAX_ASSIGNMENTS_PER_ENTRY: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    pub region: String,
    pub slots: u32,
    pub in_use: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingAgent {
    pub agent: AgentId,
    pub region: Option<String>,
    pub epoch: Epoch,
    /// Nodes that already hold an install layer of the agent's repository.
    pub install_layer_nodes: Vec<NodeId>,
}

/// Places pending agents, oldest first. Each goes to an eligible node (region, free slot) that
/// already holds its repository's install layer if there is one, else to any eligible node;
/// among those, the lowest share of slots in use wins (ties go to the lower node id). Agents
/// that fit nowhere stay pending.
pub fn place(candidates: &[Candidate], pending: &[PendingAgent], limit: usize) -> Vec<AssignOne> {
    let mut load: BTreeMap<NodeId, (u32, u32)> = candidates
        .iter()
        .map(|candidate| (candidate.node, (candidate.in_use, candidate.slots)))
        .collect();
    let free_slots: u64 = candidates
        .iter()
        .map(|candidate| u64::from(candidate.slots.saturating_sub(candidate.in_use)))
        .sum();
    let limit = limit.min(usize::try_from(free_slots).unwrap_or(usize::MAX));
    let mut decisions = Vec::new();
    for agent in pending {
        if decisions.len() >= limit {
            break;
        }
        let best = candidates
            .iter()
            .filter(|candidate| agent.region.as_ref().is_none_or(|region| *region == candidate.region))
            .filter_map(|candidate| {
                let (in_use, slots) = load[&candidate.node];
                let cold = !agent.install_layer_nodes.contains(&candidate.node);
                (in_use < slots).then_some((cold, candidate.node, in_use, slots))
            })
            // Warm nodes first; then compare in_use/slots without floating point:
            // a/b < c/d  <=>  a*d < c*b.
            .min_by(|(cold_a, node_a, used_a, slots_a), (cold_b, node_b, used_b, slots_b)| {
                cold_a
                    .cmp(cold_b)
                    .then((u64::from(*used_a) * u64::from(*slots_b)).cmp(&(u64::from(*used_b) * u64::from(*slots_a))))
                    .then(node_a.cmp(node_b))
            })
            .map(|(_, node, in_use, slots)| (node, in_use, slots));
        if let Some((node, _, _)) = best {
            load.get_mut(&node).expect("candidate is in the load map").0 += 1;
            decisions.push(AssignOne {
                agent: agent.agent,
                node,
                epoch: agent.epoch.next(),
            });
        }
    }
    decisions
}

/// Reads what `place` needs from the replicated state.
pub fn placement_input(state: &ClusterState, max_pending: usize) -> (Vec<Candidate>, Vec<PendingAgent>) {
    let candidates: Vec<Candidate> = state
        .nodes
        .values()
        .filter(|node| node.takes_agents())
        .map(|node| Candidate {
            node: node.id,
            region: node.info.region.clone(),
            slots: node.info.slots,
            in_use: state.slots_in_use(node.id),
        })
        .collect();
    if candidates.iter().all(|candidate| candidate.in_use >= candidate.slots) {
        // Every slot is taken: nothing to place, and no reason to read the queue.
        return (candidates, Vec::new());
    }
    let pending = state
        .pending
        .iter()
        .take(max_pending)
        .filter_map(|id| state.agents.get(id))
        .map(|agent| PendingAgent {
            agent: agent.id,
            region: agent.spec.region.clone(),
            epoch: agent.epoch,
            install_layer_nodes: state
                .install_layers
                .get(&agent.spec.repository)
                .map(|nodes| nodes.iter().copied().collect())
                .unwrap_or_default(),
        })
        .collect();
    (candidates, pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(node: NodeId, region: &str, slots: u32, in_use: u32) -> Candidate {
        Candidate {
            node,
            region: region.to_string(),
            slots,
            in_use,
        }
    }

    fn pending(count: usize, region: Option<&str>) -> Vec<PendingAgent> {
        (0..count)
            .map(|_| PendingAgent {
                agent: AgentId::new(),
                region: region.map(str::to_string),
                epoch: Epoch(0),
                install_layer_nodes: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn spreads_load_across_nodes() {
        let nodes = [
            candidate(1, "eu", 4, 0),
            candidate(2, "eu", 4, 0),
            candidate(3, "eu", 4, 2),
        ];
        let decisions = place(&nodes, &pending(6, None), 100);
        let mut per_node = BTreeMap::new();
        for decision in &decisions {
            *per_node.entry(decision.node).or_insert(0) += 1;
            assert_eq!(decision.epoch, Epoch(1));
        }
        assert_eq!(decisions.len(), 6);
        // Node 3 starts half full: the empty nodes fill up to its level and past it in turn.
        assert_eq!(per_node.get(&1), Some(&3));
        assert_eq!(per_node.get(&2), Some(&3));
        assert_eq!(per_node.get(&3), None);
        let more = place(&nodes, &pending(12, None), 100);
        assert_eq!(more.len(), 10, "4 + 4 + 2 free slots in all; two agents stay pending");
        let on_three = more.iter().filter(|decision| decision.node == 3).count();
        assert_eq!(on_three, 2, "node 3 fills its two free slots too");
    }

    #[test]
    fn respects_regions_and_free_slots() {
        let nodes = [candidate(1, "eu", 1, 0), candidate(2, "us", 2, 2)];
        let decisions = place(&nodes, &pending(3, Some("eu")), 100);
        assert_eq!(decisions.len(), 1, "one free slot in eu");
        assert_eq!(decisions[0].node, 1);
        assert!(place(&nodes, &pending(1, Some("us")), 100).is_empty(), "us is full");
        assert!(place(&nodes, &pending(1, Some("ap")), 100).is_empty(), "no node in ap");
    }

    #[test]
    fn prefers_nodes_that_hold_the_install_layer() {
        let nodes = [
            candidate(1, "eu", 4, 0),
            candidate(2, "eu", 4, 3),
            candidate(3, "eu", 4, 4),
        ];
        let mut agents = pending(3, None);
        for agent in &mut agents {
            agent.install_layer_nodes = vec![2, 3];
        }
        let decisions = place(&nodes, &agents, 100);
        let chosen: Vec<NodeId> = decisions.iter().map(|decision| decision.node).collect();
        // Node 2 holds the install layer and has one free slot; node 3 holds it but is full.
        assert_eq!(chosen, vec![2, 1, 1]);
    }

    #[test]
    fn uses_the_next_epoch_and_the_limit() {
        let nodes = [candidate(1, "eu", 100, 0)];
        let mut agents = pending(5, None);
        agents[0].epoch = Epoch(7);
        let decisions = place(&nodes, &agents, 3);
        assert_eq!(decisions.len(), 3);
        assert_eq!(decisions[0].epoch, Epoch(8));
    }
}
