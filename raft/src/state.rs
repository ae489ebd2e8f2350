//! The replicated state and the pure function that applies a command to it.
//!
//! `apply` does no I/O and reads no clock: the same log gives the same state on every node.
//! What it touched is recorded in [`Changes`], so that storage can persist exactly those records.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::{ApplyError, ApplyResult, AssignOne, Command, Request, Response, COMMAND_VERSION};
use crate::types::{
    AgentId, AgentRecord, AgentStatus, Assignment, DurableEvent, EventKind, NodeId, NodeRecord, TokenRecord,
};

/// Durable events kept per agent; older ones are trimmed (a watcher that asks for them is told so).
pub const MAX_EVENTS_PER_AGENT: usize = 4096;
/// Follow-ups kept per agent.
pub const MAX_FOLLOW_UPS_PER_AGENT: usize = 256;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub agents: BTreeMap<AgentId, AgentRecord>,
    pub events: BTreeMap<AgentId, VecDeque<DurableEvent>>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Nodes holding an install snapshot, per repository URL.
    pub repo_snapshots: BTreeMap<String, BTreeSet<NodeId>>,
    /// Highest node id handed out or registered; ids are never reused.
    pub highest_node_id: NodeId,
    /// Agents waiting for placement, oldest first (ULIDs sort by time).
    #[serde(skip)]
    pub pending: BTreeSet<AgentId>,
    /// Non-terminal agents per owning node.
    #[serde(skip)]
    pub active_by_node: BTreeMap<NodeId, BTreeSet<AgentId>>,
}

/// Keys touched by applied commands since the last drain.
#[derive(Debug, Default)]
pub struct Changes {
    pub agents: BTreeSet<AgentId>,
    pub nodes: BTreeSet<NodeId>,
    pub tokens: BTreeSet<String>,
    /// New durable events, in order.
    pub new_events: Vec<DurableEvent>,
    /// Events trimmed from the front of an agent's history: (agent, sequence).
    pub trimmed_events: Vec<(AgentId, u64)>,
    /// Cluster-wide counters changed.
    pub meta: bool,
}

impl ClusterState {
    /// Rebuilds the secondary indexes after loading records from storage or a snapshot.
    pub fn rebuild_indexes(&mut self) {
        self.pending.clear();
        self.active_by_node.clear();
        let ids: Vec<AgentId> = self.agents.keys().copied().collect();
        for id in ids {
            self.index_agent(id);
        }
    }

    fn index_agent(&mut self, id: AgentId) {
        let Some(agent) = self.agents.get(&id) else {
            return;
        };
        if agent.status == AgentStatus::Pending && agent.assignment.is_none() {
            self.pending.insert(id);
        } else {
            self.pending.remove(&id);
        }
        for set in self.active_by_node.values_mut() {
            set.remove(&id);
        }
        if let (Some(assignment), false) = (agent.assignment, agent.status.is_terminal()) {
            self.active_by_node.entry(assignment.node).or_default().insert(id);
        }
    }

    /// Agents a node owns and should be running.
    pub fn active_on(&self, node: NodeId) -> impl Iterator<Item = &AgentRecord> {
        self.active_by_node
            .get(&node)
            .into_iter()
            .flat_map(|set| set.iter())
            .filter_map(|id| self.agents.get(id))
    }

    pub fn slots_in_use(&self, node: NodeId) -> u32 {
        self.active_by_node.get(&node).map(|set| set.len() as u32).unwrap_or(0)
    }

    /// Durable events of an agent after `after_sequence`, oldest first.
    pub fn events_after(&self, agent: AgentId, after_sequence: u64) -> Vec<DurableEvent> {
        self.events
            .get(&agent)
            .map(|events| {
                events
                    .iter()
                    .filter(|event| event.sequence > after_sequence)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The oldest durable sequence still retained for an agent.
    pub fn first_retained_sequence(&self, agent: AgentId) -> Option<u64> {
        self.events
            .get(&agent)
            .and_then(|events| events.front())
            .map(|event| event.sequence)
    }
}

/// Applies one log entry. A refused command leaves the state exactly as it was.
pub fn apply(state: &mut ClusterState, changes: &mut Changes, request: &Request) -> ApplyResult {
    if request.version != COMMAND_VERSION {
        return Err(ApplyError::UnsupportedVersion {
            found: request.version,
            supported: COMMAND_VERSION,
        });
    }
    match &request.command {
        Command::Batch { commands } => Ok(Response::Batch(
            commands
                .iter()
                .map(|command| apply_command(state, changes, request.at_ms, command))
                .collect(),
        )),
        command => apply_command(state, changes, request.at_ms, command),
    }
}

/// Applies one command; each command of a batch succeeds or is refused on its own.
fn apply_command(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, command: &Command) -> ApplyResult {
    match command {
        Command::Batch { .. } => Err(ApplyError::NestedBatch),
        Command::ReserveNodeId => {
            let highest = state
                .nodes
                .keys()
                .max()
                .copied()
                .unwrap_or(0)
                .max(state.highest_node_id);
            state.highest_node_id = highest + 1;
            changes.meta = true;
            Ok(Response::NodeId(state.highest_node_id))
        }
        Command::RegisterNode { node, info } => {
            if *node > state.highest_node_id {
                state.highest_node_id = *node;
                changes.meta = true;
            }
            let record = state.nodes.entry(*node).or_insert_with(|| NodeRecord {
                id: *node,
                info: info.clone(),
                up: true,
                draining: false,
                changed_at_ms: at_ms,
            });
            record.info = info.clone();
            let record = record.clone();
            changes.nodes.insert(*node);
            Ok(Response::Node(record))
        }
        Command::RemoveNode { node } => {
            if state.nodes.remove(node).is_none() {
                return Err(ApplyError::NodeNotFound(*node));
            }
            for nodes in state.repo_snapshots.values_mut() {
                nodes.remove(node);
            }
            state.repo_snapshots.retain(|_, nodes| !nodes.is_empty());
            changes.meta = true;
            changes.nodes.insert(*node);
            let requeued = requeue_agents_of(state, changes, *node, at_ms, &format!("node {node} removed"));
            Ok(Response::Requeued(requeued))
        }
        Command::SetDraining { node, draining } => {
            let record = state.nodes.get_mut(node).ok_or(ApplyError::NodeNotFound(*node))?;
            record.draining = *draining;
            let record = record.clone();
            changes.nodes.insert(*node);
            Ok(Response::Node(record))
        }
        Command::NodeDown { node } => {
            let record = state.nodes.get_mut(node).ok_or(ApplyError::NodeNotFound(*node))?;
            if record.up {
                record.up = false;
                record.changed_at_ms = at_ms;
                changes.nodes.insert(*node);
            }
            let requeued = requeue_agents_of(state, changes, *node, at_ms, &format!("node {node} down"));
            Ok(Response::Requeued(requeued))
        }
        Command::NodeUp { node } => {
            let record = state.nodes.get_mut(node).ok_or(ApplyError::NodeNotFound(*node))?;
            if !record.up {
                record.up = true;
                record.changed_at_ms = at_ms;
                changes.nodes.insert(*node);
            }
            Ok(Response::Node(record.clone()))
        }
        Command::CreateAgent { id, spec } => {
            if state.agents.contains_key(id) {
                return Err(ApplyError::AgentExists(*id));
            }
            let record = AgentRecord {
                id: *id,
                spec: spec.clone(),
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
            };
            state.agents.insert(*id, record);
            push_event(
                state,
                changes,
                *id,
                at_ms,
                None,
                EventKind::StatusChanged {
                    from: AgentStatus::Pending,
                    to: AgentStatus::Pending,
                    assignment: None,
                    reason: "created".to_string(),
                },
            );
            finish_agent_change(state, changes, *id)
        }
        Command::AssignAgents { assignments } => {
            let mut assigned = Vec::new();
            for one in assignments {
                if assign_one(state, changes, one, at_ms) {
                    assigned.push(one.agent);
                }
            }
            Ok(Response::Assigned(assigned))
        }
        Command::SetAgentStatus {
            agent,
            node,
            epoch,
            status,
            reason,
            summary,
            error,
        } => {
            let record = state.agents.get(agent).ok_or(ApplyError::AgentNotFound(*agent))?;
            let owner = record.assignment;
            if owner
                != Some(Assignment {
                    node: *node,
                    epoch: *epoch,
                })
            {
                return Err(ApplyError::Fenced {
                    agent: *agent,
                    owner: owner.map(|assignment| assignment.node),
                    current: owner.map(|assignment| assignment.epoch),
                    found: *epoch,
                    node: *node,
                });
            }
            if record.status.is_terminal() {
                return Err(ApplyError::InvalidState {
                    agent: *agent,
                    status: record.status,
                    wanted: format!("cannot move to {status}"),
                });
            }
            let from = record.status;
            let record = state.agents.get_mut(agent).expect("checked above");
            record.status = *status;
            record.updated_at_ms = at_ms;
            if summary.is_some() {
                record.summary = summary.clone();
            }
            if error.is_some() {
                record.error = error.clone();
            }
            if from != *status {
                push_event(
                    state,
                    changes,
                    *agent,
                    at_ms,
                    Some(*node),
                    EventKind::StatusChanged {
                        from,
                        to: *status,
                        assignment: owner,
                        reason: reason.clone(),
                    },
                );
            }
            finish_agent_change(state, changes, *agent)
        }
        Command::StopAgent { agent, reason } => {
            let record = state.agents.get_mut(agent).ok_or(ApplyError::AgentNotFound(*agent))?;
            if record.status.is_terminal() {
                return Err(ApplyError::InvalidState {
                    agent: *agent,
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
                *agent,
                at_ms,
                None,
                EventKind::StatusChanged {
                    from,
                    to: AgentStatus::Stopped,
                    assignment,
                    reason: reason.clone(),
                },
            );
            finish_agent_change(state, changes, *agent)
        }
        Command::FollowUp { agent, text } => {
            let record = state.agents.get_mut(agent).ok_or(ApplyError::AgentNotFound(*agent))?;
            if record.status == AgentStatus::Stopped {
                return Err(ApplyError::InvalidState {
                    agent: *agent,
                    status: record.status,
                    wanted: "a stopped agent takes no follow-ups".to_string(),
                });
            }
            if record.follow_ups.len() >= MAX_FOLLOW_UPS_PER_AGENT {
                return Err(ApplyError::TooManyFollowUps {
                    agent: *agent,
                    limit: MAX_FOLLOW_UPS_PER_AGENT,
                });
            }
            record.follow_ups.push(crate::types::FollowUp {
                text: text.clone(),
                at_ms,
            });
            let index = record.follow_ups.len() as u32;
            record.updated_at_ms = at_ms;
            let restart = matches!(record.status, AgentStatus::Finished | AgentStatus::Failed);
            let from = record.status;
            if restart {
                // A follow-up to an agent that has ended starts a new run on the same branch.
                record.status = AgentStatus::Pending;
                record.assignment = None;
                record.error = None;
            }
            push_event(
                state,
                changes,
                *agent,
                at_ms,
                None,
                EventKind::FollowUpAccepted {
                    text: text.clone(),
                    index,
                },
            );
            if restart {
                push_event(
                    state,
                    changes,
                    *agent,
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
            match finish_agent_change(state, changes, *agent)? {
                Response::Agent(agent) => Ok(Response::FollowUp { agent, index }),
                other => Ok(other),
            }
        }
        Command::RecordSnapshot { node, repository } => {
            if !state.nodes.contains_key(node) {
                return Err(ApplyError::NodeNotFound(*node));
            }
            state
                .repo_snapshots
                .entry(repository.clone())
                .or_default()
                .insert(*node);
            changes.meta = true;
            Ok(Response::Done)
        }
        Command::CreateToken {
            sha256_hex,
            name,
            role,
            team,
        } => {
            state.tokens.insert(
                sha256_hex.clone(),
                TokenRecord {
                    sha256_hex: sha256_hex.clone(),
                    name: name.clone(),
                    role: *role,
                    team: team.clone(),
                    created_at_ms: at_ms,
                },
            );
            changes.tokens.insert(sha256_hex.clone());
            Ok(Response::Done)
        }
    }
}

fn assign_one(state: &mut ClusterState, changes: &mut Changes, one: &AssignOne, at_ms: u64) -> bool {
    let node_ok = state
        .nodes
        .get(&one.node)
        .map(|node| node.up && !node.draining)
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

fn requeue_agents_of(
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

fn finish_agent_change(state: &mut ClusterState, changes: &mut Changes, id: AgentId) -> ApplyResult {
    changes.agents.insert(id);
    state.index_agent(id);
    let record = state.agents.get(&id).ok_or(ApplyError::AgentNotFound(id))?;
    Ok(Response::Agent(Box::new(record.clone())))
}

fn push_event(
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
    let events = state.events.entry(agent).or_default();
    events.push_back(event.clone());
    while events.len() > MAX_EVENTS_PER_AGENT {
        if let Some(trimmed) = events.pop_front() {
            changes.trimmed_events.push((agent, trimmed.sequence));
        }
    }
    changes.agents.insert(agent);
    changes.new_events.push(event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AgentSpec, Epoch, NodeInfo};

    fn request(command: Command) -> Request {
        Request {
            version: COMMAND_VERSION,
            at_ms: 1_000,
            command,
        }
    }

    fn run(state: &mut ClusterState, command: Command) -> ApplyResult {
        apply(state, &mut Changes::default(), &request(command))
    }

    fn spec(name: &str) -> AgentSpec {
        AgentSpec {
            name: name.to_string(),
            prompt: "do it".to_string(),
            repository: "https://example.com/r.git".to_string(),
            base_branch: "main".to_string(),
            work_branch: format!("flotilla/{name}"),
            model: "scripted".to_string(),
            region: None,
            team: "default".to_string(),
            open_pull_request: false,
            egress_allow: Vec::new(),
        }
    }

    fn with_nodes(count: u64) -> ClusterState {
        let mut state = ClusterState::default();
        for node in 1..=count {
            run(
                &mut state,
                Command::RegisterNode {
                    node,
                    info: NodeInfo {
                        slots: 4,
                        region: "local".into(),
                        ..Default::default()
                    },
                },
            )
            .unwrap();
        }
        state
    }

    fn create(state: &mut ClusterState, name: &str) -> AgentId {
        let id = AgentId::new();
        run(state, Command::CreateAgent { id, spec: spec(name) }).unwrap();
        id
    }

    fn assign(state: &mut ClusterState, agent: AgentId, node: NodeId, epoch: u64) -> Vec<AgentId> {
        match run(
            state,
            Command::AssignAgents {
                assignments: vec![AssignOne {
                    agent,
                    node,
                    epoch: Epoch(epoch),
                }],
            },
        )
        .unwrap()
        {
            Response::Assigned(ids) => ids,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn create_makes_a_pending_agent_with_a_first_event() {
        let mut state = with_nodes(1);
        let id = create(&mut state, "a");
        let agent = &state.agents[&id];
        assert_eq!(agent.status, AgentStatus::Pending);
        assert_eq!(agent.last_sequence, 1);
        assert!(state.pending.contains(&id));
        assert_eq!(state.events_after(id, 0).len(), 1);
        assert_eq!(
            run(&mut state, Command::CreateAgent { id, spec: spec("a") }),
            Err(ApplyError::AgentExists(id))
        );
    }

    #[test]
    fn assignment_needs_the_next_epoch_and_a_live_node() {
        let mut state = with_nodes(2);
        let id = create(&mut state, "a");
        assert!(assign(&mut state, id, 1, 2).is_empty(), "epoch must be current + 1");
        assert!(assign(&mut state, id, 9, 1).is_empty(), "unknown node");
        assert_eq!(assign(&mut state, id, 1, 1), vec![id]);
        assert!(assign(&mut state, id, 2, 2).is_empty(), "already assigned");
        assert!(!state.pending.contains(&id));
        assert_eq!(state.slots_in_use(1), 1);
        run(
            &mut state,
            Command::SetDraining {
                node: 2,
                draining: true,
            },
        )
        .unwrap();
        let other = create(&mut state, "b");
        assert!(
            assign(&mut state, other, 2, 1).is_empty(),
            "draining node takes nothing"
        );
    }

    #[test]
    fn status_writes_are_fenced_by_epoch_and_node() {
        let mut state = with_nodes(2);
        let id = create(&mut state, "a");
        assign(&mut state, id, 1, 1);
        let write = |node, epoch| Command::SetAgentStatus {
            agent: id,
            node,
            epoch: Epoch(epoch),
            status: AgentStatus::Provisioning,
            reason: "start".into(),
            summary: None,
            error: None,
        };
        let before = state.clone();
        assert!(matches!(run(&mut state, write(2, 1)), Err(ApplyError::Fenced { .. })));
        assert!(matches!(run(&mut state, write(1, 2)), Err(ApplyError::Fenced { .. })));
        assert_eq!(state, before, "a refused command changes nothing");
        run(&mut state, write(1, 1)).unwrap();
        assert_eq!(state.agents[&id].status, AgentStatus::Provisioning);
    }

    #[test]
    fn node_down_requeues_its_agents_and_the_next_epoch_is_higher() {
        let mut state = with_nodes(2);
        let id = create(&mut state, "a");
        assign(&mut state, id, 1, 1);
        let requeued = run(&mut state, Command::NodeDown { node: 1 }).unwrap();
        assert_eq!(requeued, Response::Requeued(vec![id]));
        assert_eq!(state.agents[&id].status, AgentStatus::Pending);
        assert!(state.pending.contains(&id));
        assert!(!state.nodes[&1].up);
        assert!(assign(&mut state, id, 1, 2).is_empty(), "a down node takes nothing");
        assert_eq!(assign(&mut state, id, 2, 2), vec![id]);
        // The old owner's writes under epoch 1 are refused.
        let stale = run(
            &mut state,
            Command::SetAgentStatus {
                agent: id,
                node: 1,
                epoch: Epoch(1),
                status: AgentStatus::Running,
                reason: "stale".into(),
                summary: None,
                error: None,
            },
        );
        assert!(matches!(stale, Err(ApplyError::Fenced { .. })));
    }

    #[test]
    fn stop_and_follow_up_rules() {
        let mut state = with_nodes(1);
        let id = create(&mut state, "a");
        match run(
            &mut state,
            Command::FollowUp {
                agent: id,
                text: "more".into(),
            },
        )
        .unwrap()
        {
            Response::FollowUp { index, agent } => {
                assert_eq!(index, 1);
                assert_eq!(agent.pending_follow_ups(), 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        run(
            &mut state,
            Command::StopAgent {
                agent: id,
                reason: "user".into(),
            },
        )
        .unwrap();
        assert_eq!(state.agents[&id].status, AgentStatus::Stopped);
        assert!(!state.pending.contains(&id));
        assert!(matches!(
            run(
                &mut state,
                Command::FollowUp {
                    agent: id,
                    text: "x".into()
                }
            ),
            Err(ApplyError::InvalidState { .. })
        ));
        assert!(matches!(
            run(
                &mut state,
                Command::StopAgent {
                    agent: id,
                    reason: "again".into()
                }
            ),
            Err(ApplyError::InvalidState { .. })
        ));
    }

    #[test]
    fn follow_up_to_a_finished_agent_starts_a_new_run() {
        let mut state = with_nodes(1);
        let id = create(&mut state, "a");
        assign(&mut state, id, 1, 1);
        run(
            &mut state,
            Command::SetAgentStatus {
                agent: id,
                node: 1,
                epoch: Epoch(1),
                status: AgentStatus::Finished,
                reason: "done".into(),
                summary: Some("did it".into()),
                error: None,
            },
        )
        .unwrap();
        run(
            &mut state,
            Command::FollowUp {
                agent: id,
                text: "and more".into(),
            },
        )
        .unwrap();
        let agent = &state.agents[&id];
        assert_eq!(agent.status, AgentStatus::Pending);
        assert!(agent.assignment.is_none());
        assert_eq!(agent.epoch, Epoch(1));
        assert!(state.pending.contains(&id));
    }

    #[test]
    fn a_batch_applies_each_command_on_its_own() {
        let mut state = with_nodes(1);
        let id = AgentId::new();
        let result = run(
            &mut state,
            Command::Batch {
                commands: vec![
                    Command::CreateAgent { id, spec: spec("a") },
                    Command::CreateAgent { id, spec: spec("a") },
                    Command::StopAgent {
                        agent: id,
                        reason: "r".into(),
                    },
                    Command::Batch { commands: vec![] },
                ],
            },
        )
        .unwrap();
        let Response::Batch(results) = result else {
            panic!("a batch answers with a batch");
        };
        assert!(matches!(results[0], Ok(Response::Agent(_))));
        assert_eq!(results[1], Err(ApplyError::AgentExists(id)));
        assert!(matches!(results[2], Ok(Response::Agent(_))));
        assert_eq!(results[3], Err(ApplyError::NestedBatch));
        assert_eq!(state.agents[&id].status, AgentStatus::Stopped);
    }

    #[test]
    fn reserved_node_ids_are_unique() {
        let mut state = with_nodes(2);
        assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(3)));
        assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(4)));
        run(
            &mut state,
            Command::RegisterNode {
                node: 9,
                info: NodeInfo::default(),
            },
        )
        .unwrap();
        assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(10)));
    }

    #[test]
    fn unknown_versions_are_refused_without_change() {
        let mut state = with_nodes(1);
        let before = state.clone();
        let result = apply(
            &mut state,
            &mut Changes::default(),
            &Request {
                version: 99,
                at_ms: 0,
                command: Command::NodeDown { node: 1 },
            },
        );
        assert_eq!(
            result,
            Err(ApplyError::UnsupportedVersion {
                found: 99,
                supported: COMMAND_VERSION
            })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn event_sequences_have_no_gaps_and_history_is_bounded() {
        let mut state = with_nodes(1);
        let id = create(&mut state, "a");
        let mut changes = Changes::default();
        for _ in 0..(MAX_EVENTS_PER_AGENT + 10) {
            push_event(
                &mut state,
                &mut changes,
                id,
                0,
                None,
                EventKind::Log { text: "x".into() },
            );
        }
        let events = state.events_after(id, 0);
        assert_eq!(events.len(), MAX_EVENTS_PER_AGENT);
        for pair in events.windows(2) {
            assert_eq!(pair[1].sequence, pair[0].sequence + 1);
        }
        assert_eq!(state.first_retained_sequence(id), Some(12));
        assert_eq!(changes.trimmed_events.len(), 11);
    }

    #[test]
    fn indexes_rebuild_to_the_same_sets() {
        let mut state = with_nodes(2);
        let a = create(&mut state, "a");
        let b = create(&mut state, "b");
        assign(&mut state, a, 2, 1);
        let (pending, active) = (state.pending.clone(), state.active_by_node.clone());
        state.rebuild_indexes();
        assert_eq!(state.pending, pending);
        assert_eq!(state.active_by_node.get(&2), active.get(&2));
        assert!(state.pending.contains(&b));
    }
}
