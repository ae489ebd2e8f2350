//! The replicated state and the pure function that applies a command to it.
//!
//! `apply` does no I/O and reads no clock: the same log gives the same state on every node.
//! What it touched is recorded in [`Changes`], so that storage can persist exactly those records.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::{
    ApplyError, ApplyResult, AssignOne, Command, Request, Response, COMMAND_VERSION, MAX_CHECKPOINT_BYTES,
    MAX_EVENTS_PER_TURN,
};
use crate::types::{
    AgentId, AgentRecord, AgentStatus, Assignment, Checkpoint, DurableEvent, EventKind, NodeId, NodeRecord, TokenRecord,
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
    /// The last checkpoint of each agent that has finished a turn.
    pub checkpoints: BTreeMap<AgentId, Checkpoint>,
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
    pub checkpoints: BTreeSet<AgentId>,
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
                turns: 0,
                scripted: spec.scripted,
                pushed_commit: None,
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
            let owner = check_owner(state, *agent, *node, *epoch)?;
            let record = state.agents.get(agent).ok_or(ApplyError::AgentNotFound(*agent))?;
            if *status == AgentStatus::Finished && record.pending_follow_ups() > 0 {
                // A follow-up arrived after the last turn began: the run goes on to take it.
                return Err(ApplyError::UndeliveredFollowUps {
                    agent: *agent,
                    pending: record.pending_follow_ups(),
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
            if let (Some(text), AgentStatus::Finished) = (summary, status) {
                push_event(
                    state,
                    changes,
                    *agent,
                    at_ms,
                    Some(*node),
                    EventKind::Summary { text: text.clone() },
                );
            }
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
        } => {
            check_owner(state, *agent, *node, *epoch)?;
            let record = state.agents.get(agent).ok_or(ApplyError::AgentNotFound(*agent))?;
            if record.status != AgentStatus::Running {
                return Err(ApplyError::InvalidState {
                    agent: *agent,
                    status: record.status,
                    wanted: "only a running agent records turns".to_string(),
                });
            }
            if *turn != record.turns + 1 {
                return Err(ApplyError::TurnOutOfOrder {
                    agent: *agent,
                    recorded: record.turns,
                    found: *turn,
                });
            }
            if *follow_ups_delivered < record.follow_ups_delivered
                || *follow_ups_delivered as usize > record.follow_ups.len()
            {
                return Err(ApplyError::Invalid(format!(
                    "{follow_ups_delivered} follow-ups delivered, but {} were before and {} exist",
                    record.follow_ups_delivered,
                    record.follow_ups.len()
                )));
            }
            if checkpoint.len() > MAX_CHECKPOINT_BYTES {
                return Err(ApplyError::TooLarge {
                    what: "checkpoint".to_string(),
                    found: checkpoint.len(),
                    limit: MAX_CHECKPOINT_BYTES,
                });
            }
            if events.len() > MAX_EVENTS_PER_TURN {
                return Err(ApplyError::TooLarge {
                    what: "events of one turn".to_string(),
                    found: events.len(),
                    limit: MAX_EVENTS_PER_TURN,
                });
            }
            let record = state.agents.get_mut(agent).expect("checked above");
            record.turns = *turn;
            record.follow_ups_delivered = *follow_ups_delivered;
            record.scripted = *scripted;
            record.updated_at_ms = at_ms;
            if head_commit.is_some() {
                record.head_commit = head_commit.clone();
            }
            for event in events {
                if let EventKind::CommitPushed { commit, .. } = event {
                    record.pushed_commit = Some(commit.clone());
                }
            }
            state.checkpoints.insert(
                *agent,
                Checkpoint {
                    turn: *turn,
                    at_ms,
                    head_commit: head_commit.clone(),
                    data: checkpoint.clone(),
                },
            );
            changes.checkpoints.insert(*agent);
            for event in events {
                push_event(state, changes, *agent, at_ms, Some(*node), event.clone());
            }
            changes.agents.insert(*agent);
            Ok(Response::Done)
        }
        Command::RecordPush {
            agent,
            node,
            epoch,
            branch,
            commit,
            error,
        } => {
            check_owner(state, *agent, *node, *epoch)?;
            let record = state.agents.get_mut(agent).ok_or(ApplyError::AgentNotFound(*agent))?;
            record.head_commit = Some(commit.clone());
            record.updated_at_ms = at_ms;
            let event = match error {
                None => {
                    record.pushed_commit = Some(commit.clone());
                    EventKind::CommitPushed {
                        branch: branch.clone(),
                        commit: commit.clone(),
                    }
                }
                Some(error) => EventKind::PushFailed {
                    branch: branch.clone(),
                    commit: commit.clone(),
                    error: error.clone(),
                },
            };
            push_event(state, changes, *agent, at_ms, Some(*node), event);
            changes.agents.insert(*agent);
            Ok(Response::Done)
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

/// The agent's assignment, if `node` owns it under `epoch`; a fenced refusal otherwise.
fn check_owner(
    state: &ClusterState,
    agent: AgentId,
    node: NodeId,
    epoch: crate::types::Epoch,
) -> Result<Option<Assignment>, ApplyError> {
    let record = state.agents.get(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    let owner = record.assignment;
    if owner != Some(Assignment { node, epoch }) {
        return Err(ApplyError::Fenced {
            agent,
            owner: owner.map(|assignment| assignment.node),
            current: owner.map(|assignment| assignment.epoch),
            found: epoch,
            node,
        });
    }
    Ok(owner)
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
            scripted: true,
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

    /// An agent assigned to `node` under epoch 1 and running there.
    fn running(state: &mut ClusterState, name: &str, node: NodeId) -> AgentId {
        let id = create(state, name);
        assert_eq!(assign(state, id, node, 1), vec![id]);
        run(state, set_status(id, node, 1, AgentStatus::Running, None)).unwrap();
        id
    }

    fn set_status(agent: AgentId, node: NodeId, epoch: u64, status: AgentStatus, summary: Option<&str>) -> Command {
        Command::SetAgentStatus {
            agent,
            node,
            epoch: Epoch(epoch),
            status,
            reason: format!("to {status}"),
            summary: summary.map(str::to_string),
            error: None,
        }
    }

    /// The fields of a `RecordTurn` a test varies; the rest are filled in by [`TurnFields::command`].
    struct TurnFields {
        agent: AgentId,
        node: NodeId,
        epoch: u64,
        turn: u32,
        follow_ups_delivered: u32,
        head_commit: Option<String>,
        checkpoint: Vec<u8>,
        events: Vec<EventKind>,
    }

    impl TurnFields {
        fn command(self) -> Command {
            Command::RecordTurn {
                agent: self.agent,
                node: self.node,
                epoch: Epoch(self.epoch),
                turn: self.turn,
                follow_ups_delivered: self.follow_ups_delivered,
                head_commit: self.head_commit,
                scripted: true,
                checkpoint: self.checkpoint,
                events: self.events,
            }
        }
    }

    /// Turn `turn` of `agent` by node 1 under epoch 1, with a small checkpoint and no events.
    fn turn_fields(agent: AgentId, turn: u32, follow_ups_delivered: u32) -> TurnFields {
        TurnFields {
            agent,
            node: 1,
            epoch: 1,
            turn,
            follow_ups_delivered,
            head_commit: None,
            checkpoint: format!("conversation after turn {turn}").into_bytes(),
            events: Vec::new(),
        }
    }

    fn turn(agent: AgentId, turn: u32, follow_ups_delivered: u32) -> Command {
        turn_fields(agent, turn, follow_ups_delivered).command()
    }

    fn follow_up(state: &mut ClusterState, agent: AgentId, text: &str) {
        run(
            state,
            Command::FollowUp {
                agent,
                text: text.into(),
            },
        )
        .unwrap();
    }

    fn stop(state: &mut ClusterState, agent: AgentId) {
        run(
            state,
            Command::StopAgent {
                agent,
                reason: "user".into(),
            },
        )
        .unwrap();
    }

    fn push(agent: AgentId, node: NodeId, epoch: u64, commit: &str, error: Option<&str>) -> Command {
        Command::RecordPush {
            agent,
            node,
            epoch: Epoch(epoch),
            branch: "flotilla/a".into(),
            commit: commit.into(),
            error: error.map(str::to_string),
        }
    }

    fn event_kinds_after(state: &ClusterState, agent: AgentId, after_sequence: u64) -> Vec<EventKind> {
        state
            .events_after(agent, after_sequence)
            .into_iter()
            .map(|event| event.kind)
            .collect()
    }

    #[test]
    fn the_owner_records_a_turn_with_its_checkpoint_and_events() {
        let mut state = with_nodes(1);
        let id = running(&mut state, "a", 1);
        follow_up(&mut state, id, "also the docs");
        let sequence_before = state.agents[&id].last_sequence;
        let events = vec![
            EventKind::AssistantMessage {
                turn: 1,
                text: "Pushing.".into(),
            },
            EventKind::ToolCallFinished {
                call_id: "call_1_1".into(),
                tool: "run_command".into(),
                arguments: r#"{"command":"git push"}"#.into(),
                output: "ok".into(),
                truncated: false,
                failed: false,
                duration_ms: 12,
            },
            EventKind::CommitPushed {
                branch: "flotilla/a".into(),
                commit: "abc123".into(),
            },
            EventKind::TurnFinished {
                turn: 1,
                input_tokens: 10,
                output_tokens: 5,
                tool_calls: 1,
                model_ms: 3,
                tools_ms: 12,
            },
        ];
        let command = TurnFields {
            head_commit: Some("abc123".into()),
            events: events.clone(),
            ..turn_fields(id, 1, 1)
        }
        .command();
        let mut changes = Changes::default();
        assert_eq!(apply(&mut state, &mut changes, &request(command)), Ok(Response::Done));

        let agent = &state.agents[&id];
        assert_eq!(agent.turns, 1);
        assert_eq!(agent.follow_ups_delivered, 1);
        assert_eq!(agent.pending_follow_ups(), 0);
        assert_eq!(agent.head_commit.as_deref(), Some("abc123"));
        assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
        assert!(agent.scripted);
        assert_eq!(agent.status, AgentStatus::Running);
        assert_eq!(
            state.checkpoints[&id],
            Checkpoint {
                turn: 1,
                at_ms: 1_000,
                head_commit: Some("abc123".into()),
                data: b"conversation after turn 1".to_vec(),
            }
        );
        assert!(
            changes.checkpoints.contains(&id),
            "the store is told to persist the checkpoint"
        );
        assert!(changes.agents.contains(&id));

        let recorded = state.events_after(id, sequence_before);
        let kinds: Vec<EventKind> = recorded.iter().map(|event| event.kind.clone()).collect();
        assert_eq!(kinds, events, "events are appended in the order given");
        let sequences: Vec<u64> = recorded.iter().map(|event| event.sequence).collect();
        let expected: Vec<u64> = (sequence_before + 1..=sequence_before + 4).collect();
        assert_eq!(sequences, expected, "consecutive sequence numbers");
        assert!(recorded.iter().all(|event| event.node == Some(1)));
        assert_eq!(state.agents[&id].last_sequence, sequence_before + 4);
        assert_eq!(changes.new_events, recorded);

        // The next turn replaces the checkpoint; a turn without a head commit keeps the agent's.
        run(&mut state, turn(id, 2, 1)).unwrap();
        let agent = &state.agents[&id];
        assert_eq!(agent.turns, 2);
        assert_eq!(agent.head_commit.as_deref(), Some("abc123"));
        assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
        assert_eq!(state.checkpoints[&id].turn, 2);
        assert_eq!(state.checkpoints[&id].data, b"conversation after turn 2".to_vec());
    }

    #[test]
    fn a_turn_from_anyone_but_the_running_owner_is_refused() {
        let mut state = with_nodes(2);
        let id = running(&mut state, "a", 1);
        let before = state.clone();
        for (node, epoch) in [(2, 1), (1, 2), (1, 0)] {
            let command = TurnFields {
                node,
                epoch,
                ..turn_fields(id, 1, 0)
            }
            .command();
            assert!(
                matches!(run(&mut state, command), Err(ApplyError::Fenced { .. })),
                "node {node} under epoch {epoch}"
            );
        }
        assert_eq!(state, before, "a fenced turn changes nothing");

        let unknown = AgentId::new();
        assert_eq!(
            run(&mut state, turn(unknown, 1, 0)),
            Err(ApplyError::AgentNotFound(unknown))
        );

        // Assigned but not yet running.
        let waiting = create(&mut state, "b");
        assign(&mut state, waiting, 1, 1);
        assert!(matches!(
            run(&mut state, turn(waiting, 1, 0)),
            Err(ApplyError::InvalidState {
                status: AgentStatus::Pending,
                ..
            })
        ));

        // Stopped while its turn ran: the owner's late turn is refused.
        stop(&mut state, id);
        let before = state.clone();
        assert!(matches!(
            run(&mut state, turn(id, 1, 0)),
            Err(ApplyError::InvalidState {
                status: AgentStatus::Stopped,
                ..
            })
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn turns_are_recorded_exactly_once_and_in_order() {
        let mut state = with_nodes(1);
        let id = running(&mut state, "a", 1);
        assert_eq!(
            run(&mut state, turn(id, 2, 0)),
            Err(ApplyError::TurnOutOfOrder {
                agent: id,
                recorded: 0,
                found: 2
            })
        );
        assert_eq!(
            run(&mut state, turn(id, 0, 0)),
            Err(ApplyError::TurnOutOfOrder {
                agent: id,
                recorded: 0,
                found: 0
            })
        );
        run(&mut state, turn(id, 1, 0)).unwrap();

        // The same turn again (a retried proposal, or a node resuming from an older checkpoint)
        // must not append its events twice or move the checkpoint back.
        let before = state.clone();
        let replay = TurnFields {
            head_commit: Some("older".into()),
            checkpoint: b"an older conversation".to_vec(),
            events: vec![EventKind::Log { text: "again".into() }],
            ..turn_fields(id, 1, 0)
        }
        .command();
        let mut changes = Changes::default();
        assert_eq!(
            apply(&mut state, &mut changes, &request(replay)),
            Err(ApplyError::TurnOutOfOrder {
                agent: id,
                recorded: 1,
                found: 1
            })
        );
        assert_eq!(state, before, "a replayed turn changes nothing");
        assert!(changes.new_events.is_empty() && changes.checkpoints.is_empty());
        assert!(matches!(
            run(&mut state, turn(id, 3, 0)),
            Err(ApplyError::TurnOutOfOrder { recorded: 1, .. })
        ));
        run(&mut state, turn(id, 2, 0)).unwrap();
        assert_eq!(state.agents[&id].turns, 2);
    }

    #[test]
    fn delivered_follow_ups_only_move_forward_within_those_that_exist() {
        let mut state = with_nodes(1);
        let id = running(&mut state, "a", 1);
        follow_up(&mut state, id, "first");
        let before = state.clone();
        assert!(matches!(run(&mut state, turn(id, 1, 2)), Err(ApplyError::Invalid(_))));
        assert_eq!(state, before);
        run(&mut state, turn(id, 1, 1)).unwrap();
        follow_up(&mut state, id, "second");
        let before = state.clone();
        let backwards = run(&mut state, turn(id, 2, 0));
        assert!(
            matches!(&backwards, Err(ApplyError::Invalid(message)) if message.contains("1 were before")),
            "{backwards:?}"
        );
        assert_eq!(state, before);
        // A turn may take in nothing new: the second follow-up waits for the next one.
        run(&mut state, turn(id, 2, 1)).unwrap();
        assert_eq!(state.agents[&id].pending_follow_ups(), 1);
        run(&mut state, turn(id, 3, 2)).unwrap();
        assert_eq!(state.agents[&id].pending_follow_ups(), 0);
    }

    #[test]
    fn oversized_turns_are_refused_and_the_limits_themselves_accepted() {
        let mut state = with_nodes(1);
        let id = running(&mut state, "a", 1);
        let before = state.clone();
        let big_checkpoint = TurnFields {
            checkpoint: vec![7; MAX_CHECKPOINT_BYTES + 1],
            ..turn_fields(id, 1, 0)
        }
        .command();
        assert_eq!(
            run(&mut state, big_checkpoint),
            Err(ApplyError::TooLarge {
                what: "checkpoint".into(),
                found: MAX_CHECKPOINT_BYTES + 1,
                limit: MAX_CHECKPOINT_BYTES
            })
        );
        let log = |count: usize| -> Vec<EventKind> {
            (0..count)
                .map(|number| EventKind::Log {
                    text: format!("line {number}"),
                })
                .collect()
        };
        let many_events = TurnFields {
            events: log(MAX_EVENTS_PER_TURN + 1),
            ..turn_fields(id, 1, 0)
        }
        .command();
        assert!(matches!(
            run(&mut state, many_events),
            Err(ApplyError::TooLarge { found, limit: MAX_EVENTS_PER_TURN, .. }) if found == MAX_EVENTS_PER_TURN + 1
        ));
        assert_eq!(state, before, "an oversized turn changes nothing");

        let at_the_limits = TurnFields {
            checkpoint: vec![7; MAX_CHECKPOINT_BYTES],
            events: log(MAX_EVENTS_PER_TURN),
            ..turn_fields(id, 1, 0)
        }
        .command();
        run(&mut state, at_the_limits).unwrap();
        assert_eq!(state.checkpoints[&id].data.len(), MAX_CHECKPOINT_BYTES);
        assert_eq!(
            state.agents[&id].last_sequence,
            before.agents[&id].last_sequence + MAX_EVENTS_PER_TURN as u64
        );
    }

    #[test]
    fn an_agent_finishes_only_after_taking_in_every_follow_up() {
        let mut state = with_nodes(1);
        let id = running(&mut state, "a", 1);
        run(&mut state, turn(id, 1, 0)).unwrap();
        // The follow-up arrives while the last turn runs, after its RecordTurn was proposed.
        follow_up(&mut state, id, "also the docs");
        let before = state.clone();
        assert_eq!(
            run(&mut state, set_status(id, 1, 1, AgentStatus::Finished, Some("did it"))),
            Err(ApplyError::UndeliveredFollowUps { agent: id, pending: 1 })
        );
        assert_eq!(state, before, "the refused finish changes nothing");
        assert_eq!(state.agents[&id].status, AgentStatus::Running);

        run(&mut state, turn(id, 2, 1)).unwrap();
        let sequence_before = state.agents[&id].last_sequence;
        run(
            &mut state,
            set_status(id, 1, 1, AgentStatus::Finished, Some("did it and the docs")),
        )
        .unwrap();
        let agent = &state.agents[&id];
        assert_eq!(agent.status, AgentStatus::Finished);
        assert_eq!(agent.summary.as_deref(), Some("did it and the docs"));
        assert_eq!(
            event_kinds_after(&state, id, sequence_before),
            vec![
                EventKind::Summary {
                    text: "did it and the docs".into()
                },
                EventKind::StatusChanged {
                    from: AgentStatus::Running,
                    to: AgentStatus::Finished,
                    assignment: Some(Assignment {
                        node: 1,
                        epoch: Epoch(1)
                    }),
                    reason: "to finished".into(),
                },
            ],
            "the summary comes before the status change"
        );
        assert!(state.active_on(1).next().is_none(), "a finished agent holds no slot");
    }

    #[test]
    fn failing_or_stopping_does_not_wait_for_follow_ups_and_no_summary_means_no_summary_event() {
        let mut state = with_nodes(1);
        let failed = running(&mut state, "a", 1);
        follow_up(&mut state, failed, "never taken in");
        run(&mut state, set_status(failed, 1, 1, AgentStatus::Failed, None)).unwrap();
        assert_eq!(state.agents[&failed].status, AgentStatus::Failed);

        let stopped = running(&mut state, "b", 1);
        follow_up(&mut state, stopped, "never taken in either");
        stop(&mut state, stopped);
        assert_eq!(state.agents[&stopped].status, AgentStatus::Stopped);

        let finished = running(&mut state, "c", 1);
        let sequence_before = state.agents[&finished].last_sequence;
        run(&mut state, set_status(finished, 1, 1, AgentStatus::Finished, None)).unwrap();
        assert!(matches!(
            event_kinds_after(&state, finished, sequence_before).as_slice(),
            [EventKind::StatusChanged {
                to: AgentStatus::Finished,
                ..
            }]
        ));
    }

    #[test]
    fn a_successful_push_records_the_pushed_commit() {
        let mut state = with_nodes(1);
        let id = running(&mut state, "a", 1);
        let sequence_before = state.agents[&id].last_sequence;
        let mut changes = Changes::default();
        let result = apply(&mut state, &mut changes, &request(push(id, 1, 1, "abc123", None)));
        assert_eq!(result, Ok(Response::Done));
        let agent = &state.agents[&id];
        assert_eq!(agent.head_commit.as_deref(), Some("abc123"));
        assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
        assert_eq!(
            event_kinds_after(&state, id, sequence_before),
            vec![EventKind::CommitPushed {
                branch: "flotilla/a".into(),
                commit: "abc123".into()
            }]
        );
        assert!(changes.agents.contains(&id));
        assert_eq!(changes.new_events.len(), 1);
    }

    #[test]
    fn a_failed_push_is_an_event_and_keeps_the_last_pushed_commit() {
        let mut state = with_nodes(1);
        let id = running(&mut state, "a", 1);
        run(&mut state, push(id, 1, 1, "abc123", None)).unwrap();
        let sequence_before = state.agents[&id].last_sequence;
        run(&mut state, push(id, 1, 1, "def456", Some("remote rejected"))).unwrap();
        let agent = &state.agents[&id];
        assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
        assert_eq!(
            event_kinds_after(&state, id, sequence_before),
            vec![EventKind::PushFailed {
                branch: "flotilla/a".into(),
                commit: "def456".into(),
                error: "remote rejected".into()
            }]
        );
    }

    #[test]
    fn a_push_is_recorded_after_a_stop_but_fenced_for_another_epoch() {
        let mut state = with_nodes(2);
        let id = running(&mut state, "a", 1);
        stop(&mut state, id);
        // The owner pushes what it had before it wound down.
        run(&mut state, push(id, 1, 1, "abc123", None)).unwrap();
        assert_eq!(state.agents[&id].status, AgentStatus::Stopped);
        assert_eq!(state.agents[&id].pushed_commit.as_deref(), Some("abc123"));
        let before = state.clone();
        assert!(matches!(
            run(&mut state, push(id, 1, 2, "def456", None)),
            Err(ApplyError::Fenced { .. })
        ));
        assert!(matches!(
            run(&mut state, push(id, 2, 1, "def456", None)),
            Err(ApplyError::Fenced { .. })
        ));
        assert_eq!(state, before);

        // After a failover the old owner's push under epoch 1 is refused.
        let moved = running(&mut state, "b", 1);
        run(&mut state, Command::NodeDown { node: 1 }).unwrap();
        assert_eq!(assign(&mut state, moved, 2, 2), vec![moved]);
        let before = state.clone();
        assert!(matches!(
            run(&mut state, push(moved, 1, 1, "stale", None)),
            Err(ApplyError::Fenced { .. })
        ));
        assert_eq!(state, before);
        run(&mut state, push(moved, 2, 2, "fresh", None)).unwrap();
        assert_eq!(state.agents[&moved].pushed_commit.as_deref(), Some("fresh"));
    }
}
