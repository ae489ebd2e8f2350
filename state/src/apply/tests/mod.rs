//! Unit tests of `apply`, one file per command family like the rules themselves. Every
//! command a test applies through [`run`] or [`run_at`] is followed by a check of the state's
//! invariants.

mod agents;
mod assignments;
mod audit;
mod branches;
mod nodes;
mod plugins;
mod retention;
mod turns;

use std::collections::BTreeSet;

use sha2::{Digest as _, Sha256};

use super::{apply, push_event};
use crate::cluster_state::{Changes, ClusterState, MAX_EVENTS_PER_AGENT};
use crate::command::{
    ApplyError, ApplyResult, AssignOne, Command, Request, Response, COMMAND_VERSION, MAX_CHECKPOINT_BYTES,
    MAX_EVENTS_PER_TURN, MAX_PLUGINS, MAX_PLUGIN_BYTES, MAX_PLUGIN_CHUNKS, MAX_PLUGIN_CHUNK_BYTES, MAX_STAGED_UPLOADS,
    STALE_UPLOAD_MS,
};
use crate::invariants::check_invariants;
use crate::types::{
    AgentId, AgentSpec, AgentStatus, Assignment, Checkpoint, Epoch, EventKind, NodeId, NodeInfo, PluginKey, PluginKind,
    PluginRecord, PullRequestRef, Term, UploadId,
};

fn request(command: Command) -> Request {
    Request {
        version: COMMAND_VERSION,
        at_ms: 1_000,
        command,
    }
}

/// Applies `command` at 1 000 ms and checks the invariants of the state it leaves.
fn run(state: &mut ClusterState, command: Command) -> ApplyResult {
    run_at(state, 1_000, command)
}

/// Applies `command` at `at_ms` and checks the invariants of the state it leaves.
fn run_at(state: &mut ClusterState, at_ms: u64, command: Command) -> ApplyResult {
    let result = apply(
        state,
        &mut Changes::default(),
        &Request {
            version: COMMAND_VERSION,
            at_ms,
            command,
        },
    );
    if let Err(violation) = check_invariants(state) {
        panic!("after {result:?}: {violation}");
    }
    result
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
        user: String::new(),
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
    run(
        state,
        Command::CreateAgent {
            id,
            spec: spec(name).into(),
        },
    )
    .unwrap();
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
fn a_batch_applies_each_command_on_its_own() {
    let mut state = with_nodes(1);
    let id = AgentId::new();
    let result = run(
        &mut state,
        Command::Batch {
            commands: vec![
                Command::CreateAgent {
                    id,
                    spec: spec("a").into(),
                },
                Command::CreateAgent {
                    id,
                    spec: spec("a").into(),
                },
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
