//! Property tests of `apply`: random sequences of commands, applied one by one to a fresh
//! state, with every invariant checked after every step.
//!
//! A sequence is generated as [`Step`]s, not as commands: a step says "a status write from the
//! owner" or "a turn one too far", and is turned into a command against the state it meets, so
//! that most commands are ones a real node would write (and some are stale, fenced or out of
//! order, as after a failover). Shrinking removes and simplifies steps, so a failure is reported
//! as a short sequence of steps. To reproduce one, run the test again: proptest replays the
//! seeds it saved in `state/tests/properties.proptest-regressions` before new cases (commit the
//! line it adds); more cases run with `PROPTEST_CASES=N`.

use std::collections::BTreeMap;

use flotilla_state::command::STALE_UPLOAD_MS;
use flotilla_state::invariants::{check_invariants, check_transition};
use flotilla_state::placement::{place, placement_input};
use flotilla_state::{
    apply_in_term, AgentId, AgentSpec, AgentStatus, ApplyError, ApplyResult, AssignOne, Changes, ClusterState, Command,
    Epoch, EventKind, NodeId, NodeInfo, PluginKind, PullRequestRef, Request, Role, Term, UploadId,
    MAX_FOLLOW_UPS_PER_AGENT,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sha2::{Digest as _, Sha256};
use ulid::Ulid;

// The listing indexes checked against a scan of the records, in a module of their own.
mod listing_indexes;
use listing_indexes::check_listing_indexes;

/// Cases per property when `PROPTEST_CASES` does not say: a few seconds in a debug build.
const CASES: u32 = 1024;
/// Longest generated sequence.
const MAX_STEPS: usize = 60;
/// Agents, nodes, uploads and plugin versions a sequence chooses among: few, so that commands
/// meet each other's records.
const AGENTS: u8 = 4;
const NODES: u64 = 4;
const UPLOADS: u8 = 3;
const PLUGIN_VERSIONS: [&str; 3] = ["1.0.0", "1.0.1", "2.0.0-rc.1"];

/// Which node and epoch a write that only an owner may make claims.
#[derive(Clone, Copy, Debug)]
enum Writer {
    /// The agent's current owner under its current epoch.
    Owner,
    /// The owner's node, under the epoch before (a node that missed a failover).
    StaleEpoch,
    /// Another node, under the current epoch.
    OtherNode,
}

/// The epoch an assignment names, relative to the agent's.
#[derive(Clone, Copy, Debug)]
enum EpochChoice {
    Next,
    Current,
    AfterNext,
}

/// The term a leader's judgement names, relative to the term of the entry that carries it.
#[derive(Clone, Copy, Debug)]
enum TermChoice {
    /// The entry's own term: the leader that appended it judged.
    Current,
    /// The term before: a deposed leader's judgement, handed on to its successor.
    Previous,
    /// A term the log has not reached.
    Next,
}

impl TermChoice {
    fn resolve(self, entry: Term) -> Term {
        match self {
            TermChoice::Current => entry,
            TermChoice::Previous => Term(entry.0.saturating_sub(1)),
            TermChoice::Next => Term(entry.0 + 1),
        }
    }
}

/// How many follow-ups a turn says it has taken in.
#[derive(Clone, Copy, Debug)]
enum Delivered {
    AsBefore,
    All,
    OneMoreThanExist,
}

/// What a `RecordBranch` says of the work branch at the origin.
#[derive(Clone, Copy, Debug)]
enum BranchChoice {
    /// A commit a fenced owner pushed was displaced; the record stays.
    Displaced,
    /// The origin held a branch before anything was recorded.
    Adopted,
    /// Written against a record that is no longer the agent's.
    AgainstOlder,
}

/// One step of a generated sequence; turned into a command by [`Step::command`].
#[derive(Clone, Debug)]
enum Step {
    CreateAgent {
        agent: u8,
    },
    Assign {
        agent: u8,
        node: NodeId,
        epoch: EpochChoice,
    },
    /// What the scheduler would write: `place` over `placement_input`.
    Schedule,
    SetStatus {
        agent: u8,
        writer: Writer,
        status: AgentStatus,
        summary: bool,
    },
    /// The agent's next step along a run: created, placed by the scheduler, then its owner
    /// writes provisioning, running, a turn (the right one, taking in every follow-up) and
    /// finished after two turns.
    Progress {
        agent: u8,
    },
    RecordTurn {
        agent: u8,
        writer: Writer,
        turn_offset: i8,
        delivered: Delivered,
        events: usize,
    },
    RecordPush {
        agent: u8,
        writer: Writer,
        failed: bool,
    },
    RecordPullRequest {
        agent: u8,
        writer: Writer,
        opened: bool,
        failed: bool,
    },
    RecordBranch {
        agent: u8,
        writer: Writer,
        choice: BranchChoice,
    },
    CheckOwner {
        agent: u8,
        writer: Writer,
    },
    FollowUp {
        agent: u8,
    },
    Stop {
        agent: u8,
    },
    RegisterNode {
        node: NodeId,
        slots: u32,
    },
    NodeDown {
        node: NodeId,
    },
    /// A heartbeat after a missed lease brings a node back up; heartbeats themselves are not
    /// replicated.
    NodeUp {
        node: NodeId,
    },
    /// A node stopping cleanly hands its agents back.
    NodeStopping {
        node: NodeId,
    },
    /// A leader's judgement of a node (`NodeDownInTerm` or `NodeUpInTerm`) naming `term`.
    Judge {
        node: NodeId,
        down: bool,
        term: TermChoice,
    },
    /// A new leader is elected: later entries are appended in the next term.
    Elect,
    SetDraining {
        node: NodeId,
        draining: bool,
    },
    RemoveNode {
        node: NodeId,
    },
    ReserveNodeId,
    RecordInstallLayer {
        node: NodeId,
    },
    CreateToken {
        name: u8,
    },
    /// A chunk at `index`, or after the chunks staged when `None`.
    PutChunk {
        upload: u8,
        index: Option<u32>,
        length: usize,
    },
    CommitPlugin {
        upload: u8,
        version: usize,
        honest: bool,
        enable: bool,
    },
    AbortUpload {
        upload: u8,
    },
    SetPluginEnabled {
        version: usize,
        enabled: bool,
    },
    GrantPluginHosts {
        version: usize,
        hosts: usize,
    },
    RemovePlugin {
        version: usize,
    },
    SetPluginSettings {
        entries: usize,
    },
    /// Several steps in one log entry.
    Batch {
        steps: Vec<Step>,
    },
    /// Time passes before the next step (enough, at most, for staged uploads to go stale).
    Wait {
        elapsed_ms: u64,
    },
}

fn agent_id(index: u8) -> AgentId {
    AgentId(Ulid::from_parts(1_000, u128::from(index)))
}

fn upload_id(index: u8) -> UploadId {
    UploadId(Ulid::from_parts(2_000, u128::from(index)))
}

fn spec(agent: u8) -> AgentSpec {
    AgentSpec {
        name: format!("agent-{agent}"),
        prompt: "do it".to_string(),
        repository: format!("https://example.com/repo-{}.git", agent % 2),
        base_branch: "main".to_string(),
        work_branch: format!("flotilla/agent-{agent}"),
        model: "scripted".to_string(),
        region: None,
        team: "default".to_string(),
        open_pull_request: true,
        egress_allow: Vec::new(),
        scripted: true,
        user: String::new(),
    }
}

/// A commit for the next push of `agent`, new at every event, so that pushes move the record.
fn pushed_commit(state: &ClusterState, agent: AgentId) -> String {
    let sequence = state.agents.get(&agent).map_or(0, |record| record.last_sequence);
    format!("pushed-{sequence}")
}

/// The node and epoch `writer` claims for `agent` in `state`.
fn claim(state: &ClusterState, agent: AgentId, writer: Writer) -> (NodeId, Epoch) {
    let record = state.agents.get(&agent);
    let epoch = record.map_or(Epoch(0), |record| record.epoch);
    let node = record
        .and_then(|record| record.assignment)
        .map_or(1, |assignment| assignment.node);
    match writer {
        Writer::Owner => (node, epoch),
        Writer::StaleEpoch => (node, Epoch(epoch.0.saturating_sub(1))),
        Writer::OtherNode => (node % NODES + 1, epoch),
    }
}

/// The bytes staged under `upload`, in chunk order.
fn staged_bytes(state: &ClusterState, upload: UploadId) -> (u32, Vec<u8>) {
    let chunks: Vec<&Vec<u8>> = state
        .upload_chunks
        .range((upload, 0)..=(upload, u32::MAX))
        .map(|(_, bytes)| bytes)
        .collect();
    (chunks.len() as u32, chunks.into_iter().flatten().copied().collect())
}

impl Step {
    /// The command this step stands for in `state`, in an entry appended in `term`; `None` for
    /// a wait or an election.
    fn command_in_term(&self, state: &ClusterState, term: Term) -> Option<Command> {
        match self {
            Step::Judge {
                node,
                down: true,
                term: choice,
            } => Some(Command::NodeDownInTerm {
                node: *node,
                term: choice.resolve(term),
            }),
            Step::Judge { node, term: choice, .. } => Some(Command::NodeUpInTerm {
                node: *node,
                term: choice.resolve(term),
            }),
            Step::Batch { steps } => Some(Command::Batch {
                commands: batch_commands(state, steps, term),
            }),
            _ => self.command(state),
        }
    }

    /// The command this step stands for in `state`, for a step that names no term; `None` for a
    /// wait or an election.
    fn command(&self, state: &ClusterState) -> Option<Command> {
        let command = match self {
            Step::Wait { .. } | Step::Elect => return None,
            Step::Batch { .. } | Step::Judge { .. } => unreachable!("resolved by command_in_term"),
            Step::CreateAgent { agent } => Command::CreateAgent {
                id: agent_id(*agent),
                spec: spec(*agent).into(),
            },
            Step::Assign { agent, node, epoch } => {
                let current = state
                    .agents
                    .get(&agent_id(*agent))
                    .map_or(Epoch(0), |record| record.epoch);
                let epoch = match epoch {
                    EpochChoice::Next => current.next(),
                    EpochChoice::Current => current,
                    EpochChoice::AfterNext => current.next().next(),
                };
                Command::AssignAgents {
                    assignments: vec![AssignOne {
                        agent: agent_id(*agent),
                        node: *node,
                        epoch,
                    }],
                }
            }
            Step::Schedule => {
                let (candidates, pending) = placement_input(state, 64);
                Command::AssignAgents {
                    assignments: place(&candidates, &pending, 64),
                }
            }
            Step::RecordTurn {
                agent,
                writer,
                turn_offset,
                delivered,
                events,
            } => turn_command(state, *agent, *writer, *turn_offset, *delivered, *events),
            Step::Progress { agent } => progress_command(state, *agent),
            _ => return Some(self.agent_or_cluster_command(state)),
        };
        Some(command)
    }

    fn agent_or_cluster_command(&self, state: &ClusterState) -> Command {
        match self {
            Step::SetStatus {
                agent,
                writer,
                status,
                summary,
            } => {
                let (node, epoch) = claim(state, agent_id(*agent), *writer);
                Command::SetAgentStatus {
                    agent: agent_id(*agent),
                    node,
                    epoch,
                    status: *status,
                    reason: format!("to {status}"),
                    summary: summary.then(|| "did it".to_string()),
                    error: (*status == AgentStatus::Failed).then(|| "broke".to_string()),
                }
            }
            Step::RecordPush { agent, writer, failed } => {
                let (node, epoch) = claim(state, agent_id(*agent), *writer);
                Command::RecordPush {
                    agent: agent_id(*agent),
                    node,
                    epoch,
                    branch: "flotilla/agent".to_string(),
                    commit: pushed_commit(state, agent_id(*agent)),
                    error: failed.then(|| "rejected".to_string()),
                }
            }
            Step::CheckOwner { agent, writer } => {
                let (node, epoch) = claim(state, agent_id(*agent), *writer);
                Command::CheckOwner {
                    agent: agent_id(*agent),
                    node,
                    epoch,
                }
            }
            Step::RecordBranch { agent, writer, choice } => {
                let (node, epoch) = claim(state, agent_id(*agent), *writer);
                let recorded = state
                    .agents
                    .get(&agent_id(*agent))
                    .and_then(|record| record.pushed_commit.clone());
                let (recorded, commit, displaced) = match choice {
                    BranchChoice::Displaced => (recorded.clone(), recorded, Some("fenced".to_string())),
                    BranchChoice::Adopted => (None, Some("theirs".to_string()), None),
                    BranchChoice::AgainstOlder => (
                        Some("older".to_string()),
                        Some("older".to_string()),
                        Some("fenced".to_string()),
                    ),
                };
                Command::RecordBranch {
                    agent: agent_id(*agent),
                    node,
                    epoch,
                    branch: "flotilla/agent".to_string(),
                    recorded,
                    commit,
                    displaced,
                }
            }
            Step::RecordPullRequest {
                agent,
                writer,
                opened,
                failed,
            } => {
                let (node, epoch) = claim(state, agent_id(*agent), *writer);
                Command::RecordPullRequest {
                    agent: agent_id(*agent),
                    node,
                    epoch,
                    provider: "github".to_string(),
                    pull_request: opened.then(|| PullRequestRef {
                        url: "https://example.com/pull/1".to_string(),
                        number: 1,
                    }),
                    error: failed.then(|| "422".to_string()),
                }
            }
            Step::FollowUp { agent } => Command::FollowUp {
                agent: agent_id(*agent),
                text: "and more".to_string(),
            },
            Step::Stop { agent } => Command::StopAgent {
                agent: agent_id(*agent),
                reason: "user".to_string(),
            },
            _ => self.node_or_plugin_command(state),
        }
    }

    fn node_or_plugin_command(&self, state: &ClusterState) -> Command {
        match self {
            Step::RegisterNode { node, slots } => Command::RegisterNode {
                node: *node,
                info: NodeInfo {
                    region: "local".to_string(),
                    slots: *slots,
                    ..Default::default()
                },
            },
            Step::NodeDown { node } => Command::NodeDown { node: *node },
            Step::NodeUp { node } => Command::NodeUp { node: *node },
            Step::NodeStopping { node } => Command::NodeStopping { node: *node },
            Step::SetDraining { node, draining } => Command::SetDraining {
                node: *node,
                draining: *draining,
            },
            Step::RemoveNode { node } => Command::RemoveNode { node: *node },
            Step::ReserveNodeId => Command::ReserveNodeId,
            Step::RecordInstallLayer { node } => Command::RecordInstallLayer {
                node: *node,
                repository: "https://example.com/repo-0.git".to_string(),
            },
            Step::CreateToken { name } => Command::CreateToken {
                sha256_hex: format!("{name:064x}"),
                name: format!("token-{name}"),
                role: Role::Member,
                team: "default".to_string(),
            },
            _ => self.plugin_command(state),
        }
    }

    fn plugin_command(&self, state: &ClusterState) -> Command {
        let plugin = |version: &usize| ("tool".to_string(), PLUGIN_VERSIONS[*version].to_string());
        match self {
            Step::PutChunk { upload, index, length } => {
                let index = index.unwrap_or_else(|| staged_bytes(state, upload_id(*upload)).0);
                Command::PutPluginChunk {
                    upload: upload_id(*upload),
                    index,
                    bytes: vec![*upload * 16 + index as u8; *length],
                }
            }
            Step::CommitPlugin {
                upload,
                version,
                honest,
                enable,
            } => {
                let (chunk_count, bytes) = staged_bytes(state, upload_id(*upload));
                let hashed: &[u8] = if *honest { &bytes } else { b"other bytes" };
                let (name, version) = plugin(version);
                Command::CommitPlugin {
                    upload: upload_id(*upload),
                    name,
                    version,
                    sha256: hex::encode(Sha256::digest(hashed)),
                    kind: PluginKind::Tool,
                    size_bytes: bytes.len() as u64,
                    chunk_count,
                    granted_hosts: vec!["example.com".to_string()],
                    enable: *enable,
                }
            }
            Step::AbortUpload { upload } => Command::AbortUpload {
                upload: upload_id(*upload),
            },
            Step::SetPluginEnabled { version, enabled } => {
                let (name, version) = plugin(version);
                Command::SetPluginEnabled {
                    name,
                    version,
                    enabled: *enabled,
                }
            }
            Step::GrantPluginHosts { version, hosts } => {
                let (name, version) = plugin(version);
                Command::GrantPluginHosts {
                    name,
                    version,
                    hosts: (0..*hosts).map(|host| format!("h{host}.example.com")).collect(),
                }
            }
            Step::RemovePlugin { version } => {
                let (name, version) = plugin(version);
                Command::RemovePlugin { name, version }
            }
            Step::SetPluginSettings { entries } => Command::SetPluginSettings {
                name: "tool".to_string(),
                settings: (0..*entries)
                    .map(|entry| (format!("key.{entry}"), "value".to_string()))
                    .collect(),
            },
            other => unreachable!("{other:?} is turned into a command elsewhere"),
        }
    }
}

/// A finished turn of `agent` as `writer` would record it, `turn_offset` away from the next
/// turn, with `events` log lines and a push.
fn turn_command(
    state: &ClusterState,
    agent: u8,
    writer: Writer,
    turn_offset: i8,
    delivered: Delivered,
    events: usize,
) -> Command {
    let id = agent_id(agent);
    let (node, epoch) = claim(state, id, writer);
    let record = state.agents.get(&id);
    let turns = record.map_or(0, |record| record.turns);
    let turn = (i64::from(turns) + 1 + i64::from(turn_offset)).max(0) as u32;
    let follow_ups_delivered = match (delivered, record) {
        (_, None) => 0,
        (Delivered::AsBefore, Some(record)) => record.follow_ups_delivered,
        (Delivered::All, Some(record)) => record.follow_ups.len() as u32,
        (Delivered::OneMoreThanExist, Some(record)) => record.follow_ups.len() as u32 + 1,
    };
    let mut turn_events: Vec<EventKind> = (0..events)
        .map(|line| EventKind::Log {
            text: format!("line {line}"),
        })
        .collect();
    turn_events.push(EventKind::CommitPushed {
        branch: "flotilla/agent".to_string(),
        commit: format!("commit-{turn}"),
    });
    Command::RecordTurn {
        agent: id,
        node,
        epoch,
        turn,
        follow_ups_delivered,
        head_commit: Some(format!("commit-{turn}")),
        scripted: true,
        checkpoint: format!("after turn {turn}").into_bytes(),
        events: turn_events,
    }
}

/// The next command along a run of `agent`.
fn progress_command(state: &ClusterState, agent: u8) -> Command {
    let Some(record) = state.agents.get(&agent_id(agent)) else {
        return Step::CreateAgent { agent }
            .command(state)
            .expect("a creation is a command");
    };
    if record.assignment.is_none() {
        return Step::Schedule.command(state).expect("a placement is a command");
    }
    let (status, turns) = (record.status, record.turns);
    let next_status = |status| Step::SetStatus {
        agent,
        writer: Writer::Owner,
        status,
        summary: true,
    };
    let step = match status {
        AgentStatus::Pending => next_status(AgentStatus::Provisioning),
        AgentStatus::Provisioning => next_status(AgentStatus::Running),
        AgentStatus::Running if turns >= 2 => next_status(AgentStatus::Finished),
        _ => Step::RecordTurn {
            agent,
            writer: Writer::Owner,
            turn_offset: 0,
            delivered: Delivered::All,
            events: 2,
        },
    };
    step.command(state).expect("a status write or a turn is a command")
}

/// The commands of a batch's steps, each resolved against the state the ones before it leave.
fn batch_commands(state: &ClusterState, steps: &[Step], term: Term) -> Vec<Command> {
    let mut scratch = state.clone();
    let mut commands = Vec::new();
    for step in steps {
        if let Some(command) = step.command_in_term(&scratch, term) {
            let _ = apply_in_term(
                &mut scratch,
                &mut Changes::default(),
                term,
                &Request::at(0, command.clone()),
            );
            commands.push(command);
        }
    }
    commands
}

fn agent() -> impl Strategy<Value = u8> {
    0..AGENTS
}

fn node() -> impl Strategy<Value = NodeId> {
    1..=NODES
}

fn writer() -> impl Strategy<Value = Writer> {
    prop_oneof![6 => Just(Writer::Owner), 1 => Just(Writer::StaleEpoch), 1 => Just(Writer::OtherNode)]
}

fn branch_choice() -> impl Strategy<Value = BranchChoice> {
    prop_oneof![3 => Just(BranchChoice::Displaced), 2 => Just(BranchChoice::Adopted), 1 => Just(BranchChoice::AgainstOlder)]
}

fn status() -> impl Strategy<Value = AgentStatus> {
    prop_oneof![
        1 => Just(AgentStatus::Provisioning),
        3 => Just(AgentStatus::Running),
        2 => Just(AgentStatus::Finished),
        1 => Just(AgentStatus::Failed),
        1 => Just(AgentStatus::Pending),
        1 => Just(AgentStatus::Stopped),
    ]
}

fn agent_step() -> impl Strategy<Value = Step> {
    let epoch =
        prop_oneof![6 => Just(EpochChoice::Next), 1 => Just(EpochChoice::Current), 1 => Just(EpochChoice::AfterNext)];
    let delivered = prop_oneof![
        1 => Just(Delivered::AsBefore),
        3 => Just(Delivered::All),
        1 => Just(Delivered::OneMoreThanExist)
    ];
    let events = prop_oneof![8 => 0..3usize, 1 => Just(flotilla_state::command::MAX_EVENTS_PER_TURN)];
    prop_oneof![
        3 => agent().prop_map(|agent| Step::CreateAgent { agent }),
        14 => agent().prop_map(|agent| Step::Progress { agent }),
        2 => (agent(), node(), epoch).prop_map(|(agent, node, epoch)| Step::Assign { agent, node, epoch }),
        3 => Just(Step::Schedule),
        5 => (agent(), writer(), status(), any::<bool>())
            .prop_map(|(agent, writer, status, summary)| Step::SetStatus { agent, writer, status, summary }),
        5 => (agent(), writer(), -1i8..=1, delivered, events).prop_map(
            |(agent, writer, turn_offset, delivered, events)| Step::RecordTurn { agent, writer, turn_offset, delivered, events }
        ),
        1 => (agent(), writer(), any::<bool>()).prop_map(|(agent, writer, failed)| Step::RecordPush { agent, writer, failed }),
        1 => (agent(), writer(), any::<bool>(), any::<bool>()).prop_map(
            |(agent, writer, opened, failed)| Step::RecordPullRequest { agent, writer, opened, failed }
        ),
        2 => (agent(), writer(), branch_choice()).prop_map(|(agent, writer, choice)| Step::RecordBranch { agent, writer, choice }),
        1 => (agent(), writer()).prop_map(|(agent, writer)| Step::CheckOwner { agent, writer }),
        3 => agent().prop_map(|agent| Step::FollowUp { agent }),
        1 => agent().prop_map(|agent| Step::Stop { agent }),
    ]
}

fn node_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (node(), 0..4u32).prop_map(|(node, slots)| Step::RegisterNode { node, slots }),
        2 => node().prop_map(|node| Step::NodeDown { node }),
        2 => node().prop_map(|node| Step::NodeUp { node }),
        2 => node().prop_map(|node| Step::NodeStopping { node }),
        3 => (node(), any::<bool>(), term_choice()).prop_map(|(node, down, term)| Step::Judge { node, down, term }),
        1 => Just(Step::Elect),
        1 => (node(), any::<bool>()).prop_map(|(node, draining)| Step::SetDraining { node, draining }),
        1 => node().prop_map(|node| Step::RemoveNode { node }),
        1 => Just(Step::ReserveNodeId),
        1 => node().prop_map(|node| Step::RecordInstallLayer { node }),
        1 => (0..3u8).prop_map(|name| Step::CreateToken { name }),
    ]
}

fn term_choice() -> impl Strategy<Value = TermChoice> {
    prop_oneof![3 => Just(TermChoice::Current), 2 => Just(TermChoice::Previous), 1 => Just(TermChoice::Next)]
}

fn plugin_step() -> impl Strategy<Value = Step> {
    let version = 0..PLUGIN_VERSIONS.len();
    prop_oneof![
        4 => (0..UPLOADS, prop::option::weighted(0.3, 0..3u32), 0..6usize)
            .prop_map(|(upload, index, length)| Step::PutChunk { upload, index, length }),
        3 => (0..UPLOADS, version.clone(), prop::bool::weighted(0.8), any::<bool>()).prop_map(
            |(upload, version, honest, enable)| Step::CommitPlugin { upload, version, honest, enable }
        ),
        1 => (0..UPLOADS).prop_map(|upload| Step::AbortUpload { upload }),
        1 => (version.clone(), any::<bool>()).prop_map(|(version, enabled)| Step::SetPluginEnabled { version, enabled }),
        1 => (version.clone(), 0..3usize).prop_map(|(version, hosts)| Step::GrantPluginHosts { version, hosts }),
        1 => version.prop_map(|version| Step::RemovePlugin { version }),
        1 => (0..3usize).prop_map(|entries| Step::SetPluginSettings { entries }),
    ]
}

fn single_step() -> impl Strategy<Value = Step> {
    let wait = prop_oneof![Just(1_000u64), Just(STALE_UPLOAD_MS)].prop_map(|elapsed_ms| Step::Wait { elapsed_ms });
    prop_oneof![6 => agent_step(), 3 => node_step(), 3 => plugin_step(), 1 => wait]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => single_step(),
        1 => prop::collection::vec(single_step(), 1..4).prop_map(|steps| Step::Batch { steps }),
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 1..MAX_STEPS)
}

/// A state and the clock its requests are stamped with, stepped by [`World::run`].
struct World {
    state: ClusterState,
    at_ms: u64,
    /// The term of the leader that appends the next entry.
    term: Term,
    /// The node each agent was ever assigned to under each epoch, over the whole run (the
    /// state's own history is trimmed).
    owners: BTreeMap<(AgentId, Epoch), NodeId>,
}

impl World {
    /// A fresh state with nodes 1 and 2 registered, so that most sequences get agents placed.
    fn new() -> World {
        let mut world = World {
            state: ClusterState::default(),
            at_ms: 1_000,
            term: Term(1),
            owners: BTreeMap::new(),
        };
        for node in 1..=2 {
            world
                .run(&Step::RegisterNode { node, slots: 2 })
                .expect("registering a node keeps the invariants");
        }
        world
    }

    /// Applies one step and checks everything a step must keep.
    fn run(&mut self, step: &Step) -> Result<Option<ApplyResult>, TestCaseError> {
        self.at_ms += 1;
        if let Step::Wait { elapsed_ms } = step {
            self.at_ms += elapsed_ms;
            return Ok(None);
        }
        if let Step::Elect = step {
            self.term = Term(self.term.0 + 1);
            return Ok(None);
        }
        let Some(command) = step.command_in_term(&self.state, self.term) else {
            return Ok(None);
        };
        let before = self.state.clone();
        let request = Request::at(self.at_ms, command.clone());
        let result = apply_in_term(&mut self.state, &mut Changes::default(), self.term, &request);
        if let Err(violation) = check_invariants(&self.state) {
            return Err(TestCaseError::fail(format!(
                "{command:?} answered {result:?} and left: {violation}"
            )));
        }
        check_listing_indexes(&self.state)?;
        if let Err(violation) = check_transition(&before, &command, &result, &self.state) {
            return Err(TestCaseError::fail(format!(
                "{command:?} answered {result:?}: {violation}"
            )));
        }
        if let Command::Batch { commands } = &command {
            self.check_batch_is_its_commands_in_order(before, commands, &result)?;
            if let Ok(flotilla_state::Response::Batch(results)) = &result {
                for (command, result) in commands.iter().zip(results) {
                    self.check_judgement(command, result, false)?;
                }
            }
        } else {
            self.check_judgement(&command, &result, true)?;
            self.check_stopping(&command, &result)?;
        }
        self.check_one_owner_per_epoch()?;
        Ok(Some(result))
    }

    /// A batch gives the state and the answers of its commands applied one by one.
    fn check_batch_is_its_commands_in_order(
        &self,
        mut one_by_one: ClusterState,
        commands: &[Command],
        result: &ApplyResult,
    ) -> Result<(), TestCaseError> {
        let results: Vec<ApplyResult> = commands
            .iter()
            .map(|command| {
                apply_in_term(
                    &mut one_by_one,
                    &mut Changes::default(),
                    self.term,
                    &Request::at(self.at_ms, command.clone()),
                )
            })
            .collect();
        prop_assert_eq!(result, &Ok(flotilla_state::Response::Batch(results)));
        prop_assert!(
            one_by_one == self.state,
            "a batch differs from its commands applied one by one"
        );
        Ok(())
    }

    /// A leader's judgement takes effect only in its own term: outside it, it is refused as
    /// stale; in it, a node judged down is down and owns no live agent (the invariants already
    /// hold the state unchanged after a refusal). `alone`: the command was the whole entry, so
    /// the state shows its effect (a batch's later commands may undo it).
    fn check_judgement(&self, command: &Command, result: &ApplyResult, alone: bool) -> Result<(), TestCaseError> {
        let (node, judged, down) = match command {
            Command::NodeDownInTerm { node, term } => (*node, *term, true),
            Command::NodeUpInTerm { node, term } => (*node, *term, false),
            _ => return Ok(()),
        };
        if judged != self.term {
            prop_assert!(
                matches!(result, Err(ApplyError::StaleTerm { .. })),
                "{:?} judged in term {} was applied in term {}: {:?}",
                command,
                judged,
                self.term,
                result
            );
            return Ok(());
        }
        if result.is_err() || !alone {
            prop_assert!(
                result.is_ok() || matches!(result, Err(ApplyError::NodeNotFound(_))),
                "{:?} in its own term refused: {:?}",
                command,
                result
            );
            return Ok(());
        }
        prop_assert_eq!(
            self.state.nodes[&node].up,
            !down,
            "{:?} left the node's mark wrong",
            command
        );
        if down {
            prop_assert_eq!(
                self.state.active_on(node).count(),
                0,
                "a node judged down still owns live agents"
            );
        }
        Ok(())
    }

    /// A node that stops is marked stopping, owns no live agent, and is not given one (the
    /// invariants hold that for every later state until it registers again).
    fn check_stopping(&self, command: &Command, result: &ApplyResult) -> Result<(), TestCaseError> {
        let Command::NodeStopping { node } = command else {
            return Ok(());
        };
        if !self.state.nodes.contains_key(node) {
            prop_assert_eq!(result, &Err(ApplyError::NodeNotFound(*node)));
            return Ok(());
        }
        prop_assert!(
            result.is_ok(),
            "{:?} of a registered node refused: {:?}",
            command,
            result
        );
        prop_assert!(self.state.nodes[node].stopping, "{:?} left the node unmarked", command);
        prop_assert_eq!(
            self.state.active_on(*node).count(),
            0,
            "a stopping node still owns live agents"
        );
        Ok(())
    }

    fn check_one_owner_per_epoch(&mut self) -> Result<(), TestCaseError> {
        for record in self.state.agents.values() {
            if let Some(assignment) = record.assignment {
                let owner = *self
                    .owners
                    .entry((record.id, assignment.epoch))
                    .or_insert(assignment.node);
                prop_assert_eq!(
                    owner,
                    assignment.node,
                    "agent {} had two owners under epoch {}",
                    record.id,
                    assignment.epoch
                );
            }
        }
        Ok(())
    }
}

fn config() -> ProptestConfig {
    let mut config = ProptestConfig {
        // Failing seeds are kept beside this file, in `properties.proptest-regressions`.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = CASES;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    /// Every state a sequence reaches satisfies the invariants, and every step keeps what a
    /// step must keep (see `check_transition`), batches included.
    #[test]
    fn every_step_keeps_the_invariants(steps in steps()) {
        let mut world = World::new();
        for step in &steps {
            world.run(step)?;
        }
    }

    /// The same sequence applied to two fresh states gives equal states and equal answers.
    #[test]
    fn apply_is_deterministic(steps in steps()) {
        let mut first = World::new();
        let mut second = World::new();
        for step in &steps {
            let first_result = first.run(step)?;
            let second_result = second.run(step)?;
            prop_assert_eq!(first_result, second_result);
        }
        prop_assert!(first.state == second.state, "two fresh states diverged");
    }

}

/// Follow-ups stay within their bound however many arrive (too many for a random sequence to
/// reach), each step checked like the random ones.
#[test]
fn follow_ups_stay_bounded() {
    let mut world = World::new();
    world.run(&Step::CreateAgent { agent: 0 }).unwrap();
    for _ in 0..MAX_FOLLOW_UPS_PER_AGENT + 3 {
        world.run(&Step::FollowUp { agent: 0 }).unwrap();
    }
    assert_eq!(
        world.state.agents[&agent_id(0)].follow_ups.len(),
        MAX_FOLLOW_UPS_PER_AGENT
    );
}
