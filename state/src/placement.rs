//! Placement: which node runs each pending agent. [`place`] is a pure decision over what
//! [`placement_input`] reads from the state; the scheduler actor on the leader runs it whenever
//! the state changes and writes the decisions as one `AssignAgents` command, which `apply`
//! checks again (a decision made on a stale state simply has no effect).

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
/// that fit nowhere stay pending. Node ids in `candidates` are unique (they come from the
/// state's node map).
///
/// The decision is exactly [`place_by_scanning`]'s; it is only found faster: nodes are looked
/// up by index rather than through a map, the install layer's nodes are visited directly, and
/// with more than a few agents to place each region's free nodes are kept ordered by load, so
/// a decision costs a few set operations instead of a scan of every node.
pub fn place(candidates: &[Candidate], pending: &[PendingAgent], limit: usize) -> Vec<AssignOne> {
    let limit = limit.min(free_slot_limit(candidates));
    let mut loads = Loads::new(candidates, pending.len() > LINEAR_SCAN_MAX_PENDING);
    let mut decisions = Vec::new();
    for agent in pending {
        if decisions.len() >= limit {
            break;
        }
        let region = agent.region.as_deref();
        let warm = agent
            .install_layer_nodes
            .iter()
            .filter_map(|node| loads.index_of(*node))
            .filter(|&index| loads.eligible(index, region))
            .min_by(|&a, &b| loads.key(a).cmp(&loads.key(b)));
        let Some(index) = warm.or_else(|| loads.least_loaded(region)) else {
            continue;
        };
        loads.take_slot(index);
        decisions.push(AssignOne {
            agent: agent.agent,
            node: candidates[index].node,
            epoch: agent.epoch.next(),
        });
    }
    decisions
}

/// With this many pending agents or fewer, `place` scans the nodes for each agent rather than
/// ordering them first (ordering costs more than a few scans).
const LINEAR_SCAN_MAX_PENDING: usize = 8;

/// No more agents can be placed than there are free slots.
fn free_slot_limit(candidates: &[Candidate]) -> usize {
    let free_slots: u64 = candidates
        .iter()
        .map(|candidate| u64::from(candidate.slots.saturating_sub(candidate.in_use)))
        .sum();
    usize::try_from(free_slots).unwrap_or(usize::MAX)
}

/// A node's load as `place` orders it: lowest share of slots in use first, compared without
/// floating point (a/b < c/d <=> a*d < c*b), then lowest node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LoadKey {
    in_use: u32,
    slots: u32,
    node: NodeId,
    index: usize,
}

impl Ord for LoadKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (u64::from(self.in_use) * u64::from(other.slots))
            .cmp(&(u64::from(other.in_use) * u64::from(self.slots)))
            .then(self.node.cmp(&other.node))
            .then(self.index.cmp(&other.index))
    }
}

impl PartialOrd for LoadKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The candidates' loads while `place` hands out slots.
struct Loads<'a> {
    candidates: &'a [Candidate],
    in_use: Vec<u32>,
    /// Candidate indexes sorted by node id, for looking up install layer holders.
    by_node: Vec<usize>,
    /// Free nodes ordered by load, per region (`None`: every region), built on first use;
    /// `None` when `place` scans instead.
    ordered: Option<HashMap<Option<&'a str>, BTreeSet<LoadKey>>>,
}

impl<'a> Loads<'a> {
    fn new(candidates: &'a [Candidate], ordered: bool) -> Loads<'a> {
        // The state's node map gives them in order already; sorting is only for other callers.
        let mut by_node: Vec<usize> = (0..candidates.len()).collect();
        if !candidates.is_sorted_by_key(|candidate| candidate.node) {
            by_node.sort_unstable_by_key(|&index| candidates[index].node);
        }
        Loads {
            candidates,
            in_use: candidates.iter().map(|candidate| candidate.in_use).collect(),
            by_node,
            ordered: ordered.then(HashMap::new),
        }
    }

    fn index_of(&self, node: NodeId) -> Option<usize> {
        self.by_node
            .binary_search_by_key(&node, |&index| self.candidates[index].node)
            .ok()
            .map(|position| self.by_node[position])
    }

    fn key(&self, index: usize) -> LoadKey {
        LoadKey {
            in_use: self.in_use[index],
            slots: self.candidates[index].slots,
            node: self.candidates[index].node,
            index,
        }
    }

    fn eligible(&self, index: usize, region: Option<&str>) -> bool {
        self.in_use[index] < self.candidates[index].slots
            && region.is_none_or(|region| region == self.candidates[index].region)
    }

    /// The eligible node with the lowest load in `region`.
    fn least_loaded(&mut self, region: Option<&'a str>) -> Option<usize> {
        let Some(ordered) = self.ordered.as_mut() else {
            return (0..self.candidates.len())
                .filter(|&index| self.eligible(index, region))
                .min_by(|&a, &b| self.key(a).cmp(&self.key(b)));
        };
        let candidates = self.candidates;
        let in_use = &self.in_use;
        let set = ordered.entry(region).or_insert_with(|| {
            (0..candidates.len())
                .filter(|&index| {
                    in_use[index] < candidates[index].slots
                        && region.is_none_or(|region| region == candidates[index].region)
                })
                .map(|index| LoadKey {
                    in_use: in_use[index],
                    slots: candidates[index].slots,
                    node: candidates[index].node,
                    index,
                })
                .collect()
        });
        set.first().map(|key| key.index)
    }

    /// One more slot of the node at `index` is in use.
    fn take_slot(&mut self, index: usize) {
        let before = self.key(index);
        self.in_use[index] += 1;
        let after = self.key(index);
        let free = after.in_use < after.slots;
        let region = self.candidates[index].region.as_str();
        if let Some(ordered) = self.ordered.as_mut() {
            for key in [None, Some(region)] {
                if let Some(set) = ordered.get_mut(&key) {
                    set.remove(&before);
                    if free {
                        set.insert(after);
                    }
                }
            }
        }
    }
}

/// The straightforward form of [`place`]: a scan of every node for each agent. Kept as the
/// reference that `place` must agree with (see the tests).
pub fn place_by_scanning(candidates: &[Candidate], pending: &[PendingAgent], limit: usize) -> Vec<AssignOne> {
    let mut load: BTreeMap<NodeId, (u32, u32)> = candidates
        .iter()
        .map(|candidate| (candidate.node, (candidate.in_use, candidate.slots)))
        .collect();
    let limit = limit.min(free_slot_limit(candidates));
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
    use proptest::prelude::*;

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

    fn arbitrary_candidates() -> impl Strategy<Value = Vec<Candidate>> {
        // Unique node ids in any order, some full, some over their slots, some with none.
        proptest::sample::subsequence((1..=60u64).collect::<Vec<_>>(), 0..=40)
            .prop_shuffle()
            .prop_flat_map(|nodes| {
                let count = nodes.len();
                (
                    Just(nodes),
                    proptest::collection::vec((0..3usize, 0..6u32, 0..8u32), count),
                )
            })
            .prop_map(|(nodes, loads)| {
                nodes
                    .into_iter()
                    .zip(loads)
                    .map(|(node, (region, slots, in_use))| candidate(node, ["a", "b", "c"][region], slots, in_use))
                    .collect()
            })
    }

    fn arbitrary_pending() -> impl Strategy<Value = Vec<PendingAgent>> {
        proptest::collection::vec(
            (
                proptest::option::of(0..4usize),
                0..5u64,
                proptest::collection::vec(1..=70u64, 0..6),
            ),
            0..60,
        )
        .prop_map(|agents| {
            agents
                .into_iter()
                .map(|(region, epoch, install_layer_nodes)| PendingAgent {
                    agent: AgentId::new(),
                    region: region.map(|region| ["a", "b", "c", "d"][region].to_string()),
                    epoch: Epoch(epoch),
                    install_layer_nodes,
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// The fast placement decides exactly what a scan of every node decides, with few
        /// agents (the scanning path) and many (the ordered path).
        #[test]
        fn place_agrees_with_the_scan(
            candidates in arbitrary_candidates(),
            pending in arbitrary_pending(),
            limit in 0..80usize,
        ) {
            prop_assert_eq!(
                place(&candidates, &pending, limit),
                place_by_scanning(&candidates, &pending, limit)
            );
        }
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
