//! What every state `apply` produces satisfies, and what every step between two states keeps,
//! as code. [`check_invariants`] reads one state; [`check_transition`] compares the states
//! before and after one request. Unit tests run the first after every command they apply; the
//! property tests (`state/tests/properties.rs`) run both after every step of random command
//! sequences.
//!
//! Every rule here is one `apply` keeps, derived from its code, not one it ought to keep. Two
//! rules a reader might expect are absent on purpose:
//! - a node's live agents may outnumber its slots: `apply` takes any assignment to a live,
//!   undrained node, and only placement counts slots (a node that re-registers with fewer slots
//!   keeps its agents);
//! - a finished, failed or stopped agent keeps its last assignment: its owner may still record
//!   the push it makes while winding down. What stops it from running again is that it is in
//!   no index (neither pending nor active on a node) and `AssignAgents` takes only pending,
//!   unassigned agents.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest as _, Sha256};

use crate::cluster_state::{ClusterState, MAX_EVENTS_PER_AGENT, MAX_FOLLOW_UPS_PER_AGENT};
use crate::command::{
    ApplyResult, Command, MAX_PLUGINS, MAX_PLUGIN_BYTES, MAX_PLUGIN_CHUNKS, MAX_PLUGIN_CHUNK_BYTES, MAX_STAGED_UPLOADS,
    MAX_TOTAL_PLUGIN_BYTES,
};
use crate::types::{
    validate_granted_hosts, validate_plugin_name, validate_plugin_settings, validate_plugin_version,
    validate_sha256_hex, AgentId, AgentRecord, AgentStatus, Epoch, EventKind, NodeId, PluginFieldError, PluginKey,
    UploadId,
};

/// A broken invariant: which record, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvariantViolation {
    #[error("agent {found} is filed under id {key}")]
    AgentFiledUnderOtherId { key: AgentId, found: AgentId },
    #[error("agent {agent} is assigned under epoch {assignment_epoch} but its epoch is {agent_epoch}")]
    AssignmentEpochIsNotAgentEpoch {
        agent: AgentId,
        assignment_epoch: Epoch,
        agent_epoch: Epoch,
    },
    #[error("agent {agent} is assigned under epoch 0, which no assignment hands out")]
    AssignedUnderEpochZero { agent: AgentId },
    #[error("agent {agent} is {status} without an assignment; only a node that owns it moves it there")]
    StatusWithoutAssignment { agent: AgentId, status: AgentStatus },
    #[error("live agent {agent} is assigned to node {node}, which is not registered")]
    LiveAgentOnUnknownNode { agent: AgentId, node: NodeId },
    #[error("live agent {agent} is assigned to node {node}, which is down")]
    LiveAgentOnDownNode { agent: AgentId, node: NodeId },
    #[error("live agent {agent} is assigned to node {node}, which is stopping")]
    LiveAgentOnStoppingNode { agent: AgentId, node: NodeId },
    #[error("agent {agent} has {found} follow-ups; the most is {MAX_FOLLOW_UPS_PER_AGENT}")]
    TooManyFollowUps { agent: AgentId, found: usize },
    #[error("agent {agent} has taken {delivered} follow-ups into turns but received {received}")]
    FollowUpsDeliveredBeyondReceived {
        agent: AgentId,
        delivered: u32,
        received: usize,
    },
    #[error("agent {agent} is finished with {pending} follow-up(s) not taken into a turn")]
    FinishedWithPendingFollowUps { agent: AgentId, pending: u32 },
    #[error("agent {agent} has no durable events, not even its creation")]
    NoEventHistory { agent: AgentId },
    #[error("the durable events of agent {agent} include one of agent {found}")]
    EventOfOtherAgent { agent: AgentId, found: AgentId },
    #[error("the durable events of agent {agent} jump from sequence {previous} to {found}")]
    EventSequenceGap { agent: AgentId, previous: u64, found: u64 },
    #[error("agent {agent} keeps {found} durable events; the most is {MAX_EVENTS_PER_AGENT}")]
    TooManyEvents { agent: AgentId, found: usize },
    #[error("agent {agent} lost events before sequence {first} though it keeps only {kept}, below the bound")]
    EventsTrimmedBelowBound { agent: AgentId, first: u64, kept: usize },
    #[error("agent {agent} says its newest event is {last_sequence}, but the newest kept is {newest}")]
    LastSequenceIsNotNewestEvent {
        agent: AgentId,
        last_sequence: u64,
        newest: u64,
    },
    #[error("durable events are kept for agent {agent}, which does not exist")]
    EventsOfUnknownAgent { agent: AgentId },
    #[error("an event of agent {agent} names epoch {event_epoch}, above the agent's epoch {agent_epoch}")]
    EventEpochAboveAgentEpoch {
        agent: AgentId,
        event_epoch: Epoch,
        agent_epoch: Epoch,
    },
    #[error("agent {agent} had two owners under epoch {epoch}: nodes {first_node} and {second_node}")]
    TwoOwnersUnderOneEpoch {
        agent: AgentId,
        epoch: Epoch,
        first_node: NodeId,
        second_node: NodeId,
    },
    #[error("a checkpoint is kept for agent {agent}, which does not exist")]
    CheckpointOfUnknownAgent { agent: AgentId },
    #[error("agent {agent} has recorded {turns} turns but its checkpoint is of turn {checkpoint_turn:?}")]
    CheckpointIsNotOfLastTurn {
        agent: AgentId,
        turns: u32,
        checkpoint_turn: Option<u32>,
    },
    #[error("the pending index says agent {agent} is {}, its record says otherwise", if *.indexed { "pending" } else { "not pending" })]
    PendingIndexDisagrees { agent: AgentId, indexed: bool },
    #[error("the status index files agent {agent} under {indexed:?}; its record says {record:?}")]
    StatusIndexDisagrees {
        agent: AgentId,
        indexed: Vec<AgentStatus>,
        record: Option<AgentStatus>,
    },
    #[error("the search signatures disagree with the records for agent {agent}")]
    SearchSignatureDisagrees { agent: AgentId },
    #[error("the active index puts agent {agent} on nodes {indexed_nodes:?}; its record says {record_node:?}")]
    ActiveIndexDisagrees {
        agent: AgentId,
        indexed_nodes: Vec<NodeId>,
        record_node: Option<NodeId>,
    },
    #[error("node {found} is filed under id {key}")]
    NodeFiledUnderOtherId { key: NodeId, found: NodeId },
    #[error("node {node} is above the highest node id handed out, {highest}")]
    NodeIdAboveHighest { node: NodeId, highest: NodeId },
    #[error("node {node} is said to hold an install layer of {repository} but is not registered")]
    InstallLayerOnUnknownNode { repository: String, node: NodeId },
    #[error("no node holds an install layer of {repository}, yet the repository is listed")]
    EmptyInstallLayerList { repository: String },
    #[error("token {found} is filed under hash {key}")]
    TokenFiledUnderOtherHash { key: String, found: String },
    #[error("plugin {found} is filed under {key}")]
    PluginFiledUnderOtherKey { key: PluginKey, found: PluginKey },
    #[error("plugin {plugin}: {reason}")]
    InvalidPluginRecord {
        plugin: PluginKey,
        reason: PluginFieldError,
    },
    #[error("plugin {plugin} has {chunk_count} chunks; a plugin has 1 to {MAX_PLUGIN_CHUNKS}")]
    PluginChunkCountOutOfBounds { plugin: PluginKey, chunk_count: u32 },
    #[error("plugin {plugin} lacks chunk {index}")]
    PluginChunkMissing { plugin: PluginKey, index: u32 },
    #[error("chunk {index} of plugin {plugin} belongs to no plugin record")]
    PluginChunkWithoutRecord { plugin: PluginKey, index: u32 },
    #[error("plugin {plugin} says {size_bytes} bytes; its chunks hold {found_bytes}")]
    PluginSizeIsNotChunkSize {
        plugin: PluginKey,
        size_bytes: u64,
        found_bytes: u64,
    },
    #[error("the chunks of plugin {plugin} do not hash to its sha256")]
    PluginDigestMismatch { plugin: PluginKey },
    #[error("plugin {name} has two enabled versions, {first} and {second}")]
    TwoEnabledVersions {
        name: String,
        first: String,
        second: String,
    },
    #[error("the cluster keeps {found} plugin versions; the most is {MAX_PLUGINS}")]
    TooManyPlugins { found: usize },
    #[error("upload {found} is filed under id {key}")]
    UploadFiledUnderOtherId { key: UploadId, found: UploadId },
    #[error("upload {upload} is staged with no chunk")]
    UploadWithoutChunks { upload: UploadId },
    #[error("chunk {index} is staged under upload {upload}, which is not in progress")]
    StagedChunkWithoutUpload { upload: UploadId, index: u32 },
    #[error("{found} uploads are staged; the most is {MAX_STAGED_UPLOADS}")]
    TooManyUploads { found: usize },
    #[error("upload {upload} holds {found_bytes} bytes; the most is {MAX_PLUGIN_BYTES}")]
    UploadTooLarge { upload: UploadId, found_bytes: u64 },
    #[error("chunk {index} of {owner} has {found_bytes} bytes; a chunk has 1 to {MAX_PLUGIN_CHUNK_BYTES}, index below {MAX_PLUGIN_CHUNKS}")]
    ChunkOutOfBounds {
        owner: String,
        index: u32,
        found_bytes: usize,
    },
    #[error("plugins and uploads hold {found_bytes} bytes; the most is {MAX_TOTAL_PLUGIN_BYTES}")]
    TooManyPluginBytes { found_bytes: u64 },
    #[error("settings of plugin name {name:?}: {reason}")]
    InvalidPluginSettings { name: String, reason: PluginFieldError },
    #[error("plugin name {name:?} is kept with no settings")]
    EmptyPluginSettings { name: String },
    // What one step must keep (see `check_transition`).
    #[error("a refused {command} changed the state")]
    RefusalChangedState { command: &'static str },
    #[error("agent {agent} disappeared")]
    AgentDisappeared { agent: AgentId },
    #[error("the epoch of agent {agent} went from {before} down to {after}")]
    EpochWentDown {
        agent: AgentId,
        before: Epoch,
        after: Epoch,
    },
    #[error("agent {agent} was {status} and got assignment {after:?} without a follow-up")]
    EndedAgentReassigned {
        agent: AgentId,
        status: AgentStatus,
        after: Option<crate::types::Assignment>,
    },
    #[error("agent {agent} was stopped and is now {status}")]
    StoppedAgentMoved { agent: AgentId, status: AgentStatus },
    #[error("the pushed commit of agent {agent} went from {before:?} to {after:?} without a write by its owner under its epoch")]
    PushedCommitMovedByNonOwner {
        agent: AgentId,
        before: Option<String>,
        after: Option<String>,
    },
    #[error("the pushed commit of finished agent {agent} went from {before:?} to {after:?}")]
    FinishedAgentPushedCommitMoved {
        agent: AgentId,
        before: Option<String>,
        after: Option<String>,
    },
    #[error("agent {agent}: {what} went from {before} down to {after}")]
    CounterWentDown {
        agent: AgentId,
        what: &'static str,
        before: u64,
        after: u64,
    },
    #[error("node {node} was stopping and a {command} took the mark off; only its registration does")]
    StoppingMarkClearedWithoutRegistration { node: NodeId, command: &'static str },
}

/// Checks every invariant of one state; the first broken one is the error.
pub fn check_invariants(state: &ClusterState) -> Result<(), InvariantViolation> {
    for (key, agent) in &state.agents {
        check_agent(state, *key, agent)?;
        check_event_history(state, agent)?;
    }
    check_orphans(state)?;
    check_indexes(state)?;
    check_nodes_and_tokens(state)?;
    check_plugins(state)?;
    check_uploads(state)?;
    check_plugin_settings(state)
}

/// The rules of one agent record on its own and against the nodes.
fn check_agent(state: &ClusterState, key: AgentId, agent: &AgentRecord) -> Result<(), InvariantViolation> {
    let id = agent.id;
    if key != id {
        return Err(InvariantViolation::AgentFiledUnderOtherId { key, found: id });
    }
    match agent.assignment {
        Some(assignment) if assignment.epoch != agent.epoch => {
            return Err(InvariantViolation::AssignmentEpochIsNotAgentEpoch {
                agent: id,
                assignment_epoch: assignment.epoch,
                agent_epoch: agent.epoch,
            })
        }
        Some(assignment) if assignment.epoch == Epoch(0) => {
            return Err(InvariantViolation::AssignedUnderEpochZero { agent: id })
        }
        Some(assignment) if !agent.status.is_terminal() => match state.nodes.get(&assignment.node) {
            None => {
                return Err(InvariantViolation::LiveAgentOnUnknownNode {
                    agent: id,
                    node: assignment.node,
                })
            }
            Some(node) if !node.up => {
                return Err(InvariantViolation::LiveAgentOnDownNode {
                    agent: id,
                    node: assignment.node,
                })
            }
            Some(node) if node.stopping => {
                return Err(InvariantViolation::LiveAgentOnStoppingNode {
                    agent: id,
                    node: assignment.node,
                })
            }
            Some(_) => {}
        },
        Some(_) => {}
        None if !matches!(agent.status, AgentStatus::Pending | AgentStatus::Stopped) => {
            return Err(InvariantViolation::StatusWithoutAssignment {
                agent: id,
                status: agent.status,
            })
        }
        None => {}
    }
    check_follow_ups_and_turns(state, agent)
}

fn check_follow_ups_and_turns(state: &ClusterState, agent: &AgentRecord) -> Result<(), InvariantViolation> {
    let id = agent.id;
    if agent.follow_ups.len() > MAX_FOLLOW_UPS_PER_AGENT {
        return Err(InvariantViolation::TooManyFollowUps {
            agent: id,
            found: agent.follow_ups.len(),
        });
    }
    if agent.follow_ups_delivered as usize > agent.follow_ups.len() {
        return Err(InvariantViolation::FollowUpsDeliveredBeyondReceived {
            agent: id,
            delivered: agent.follow_ups_delivered,
            received: agent.follow_ups.len(),
        });
    }
    if agent.status == AgentStatus::Finished && agent.pending_follow_ups() > 0 {
        return Err(InvariantViolation::FinishedWithPendingFollowUps {
            agent: id,
            pending: agent.pending_follow_ups(),
        });
    }
    let checkpoint_turn = state.checkpoints.get(&id).map(|checkpoint| checkpoint.turn);
    let expected_turn = (agent.turns > 0).then_some(agent.turns);
    if checkpoint_turn != expected_turn {
        return Err(InvariantViolation::CheckpointIsNotOfLastTurn {
            agent: id,
            turns: agent.turns,
            checkpoint_turn,
        });
    }
    Ok(())
}

/// Sequences 1..n without gaps (the oldest trimmed only beyond the bound), ending at the
/// agent's last sequence; assignments in the history never above the agent's epoch, and one
/// node per epoch.
fn check_event_history(state: &ClusterState, agent: &AgentRecord) -> Result<(), InvariantViolation> {
    let id = agent.id;
    let events = match state.events.get(&id) {
        Some(events) if !events.is_empty() => events,
        _ => return Err(InvariantViolation::NoEventHistory { agent: id }),
    };
    if events.len() > MAX_EVENTS_PER_AGENT {
        return Err(InvariantViolation::TooManyEvents {
            agent: id,
            found: events.len(),
        });
    }
    let first = events.front().map_or(0, |event| event.sequence);
    if first != 1 && events.len() < MAX_EVENTS_PER_AGENT {
        return Err(InvariantViolation::EventsTrimmedBelowBound {
            agent: id,
            first,
            kept: events.len(),
        });
    }
    let mut previous = first.wrapping_sub(1);
    let mut owners_by_epoch: BTreeMap<Epoch, NodeId> = BTreeMap::new();
    for event in events {
        if event.agent != id {
            return Err(InvariantViolation::EventOfOtherAgent {
                agent: id,
                found: event.agent,
            });
        }
        if event.sequence != previous.wrapping_add(1) {
            return Err(InvariantViolation::EventSequenceGap {
                agent: id,
                previous,
                found: event.sequence,
            });
        }
        previous = event.sequence;
        if let EventKind::StatusChanged {
            assignment: Some(assignment),
            ..
        } = &event.kind
        {
            if assignment.epoch > agent.epoch {
                return Err(InvariantViolation::EventEpochAboveAgentEpoch {
                    agent: id,
                    event_epoch: assignment.epoch,
                    agent_epoch: agent.epoch,
                });
            }
            let first_node = *owners_by_epoch.entry(assignment.epoch).or_insert(assignment.node);
            if first_node != assignment.node {
                return Err(InvariantViolation::TwoOwnersUnderOneEpoch {
                    agent: id,
                    epoch: assignment.epoch,
                    first_node,
                    second_node: assignment.node,
                });
            }
        }
    }
    if previous != agent.last_sequence {
        return Err(InvariantViolation::LastSequenceIsNotNewestEvent {
            agent: id,
            last_sequence: agent.last_sequence,
            newest: previous,
        });
    }
    Ok(())
}

/// Events and checkpoints only of agents that exist.
fn check_orphans(state: &ClusterState) -> Result<(), InvariantViolation> {
    if let Some(agent) = state.events.keys().find(|agent| !state.agents.contains_key(agent)) {
        return Err(InvariantViolation::EventsOfUnknownAgent { agent: *agent });
    }
    if let Some(agent) = state.checkpoints.keys().find(|agent| !state.agents.contains_key(agent)) {
        return Err(InvariantViolation::CheckpointOfUnknownAgent { agent: *agent });
    }
    Ok(())
}

/// `pending` holds exactly the unassigned pending agents, and `active_by_node` puts exactly
/// the assigned live agents on their node, each on one node only (empty sets aside: an index
/// keeps the set of a node whose last agent left).
fn check_indexes(state: &ClusterState) -> Result<(), InvariantViolation> {
    for agent in state.agents.values() {
        let should_be_pending = agent.status == AgentStatus::Pending && agent.assignment.is_none();
        let indexed = state.pending.contains(&agent.id);
        if indexed != should_be_pending {
            return Err(InvariantViolation::PendingIndexDisagrees {
                agent: agent.id,
                indexed,
            });
        }
    }
    if let Some(agent) = state.pending.iter().find(|agent| !state.agents.contains_key(agent)) {
        return Err(InvariantViolation::PendingIndexDisagrees {
            agent: *agent,
            indexed: true,
        });
    }
    check_status_index(state)?;
    check_search_signatures(state)?;
    let mut indexed_nodes: BTreeMap<AgentId, Vec<NodeId>> = BTreeMap::new();
    for (node, agents) in &state.active_by_node {
        for agent in agents {
            indexed_nodes.entry(*agent).or_default().push(*node);
        }
    }
    let agent_ids: BTreeSet<AgentId> = state.agents.keys().chain(indexed_nodes.keys()).copied().collect();
    for agent in agent_ids {
        let record_node = state
            .agents
            .get(&agent)
            .filter(|record| !record.status.is_terminal())
            .and_then(|record| record.assignment)
            .map(|assignment| assignment.node);
        let indexed = indexed_nodes.remove(&agent).unwrap_or_default();
        if indexed != record_node.into_iter().collect::<Vec<_>>() {
            return Err(InvariantViolation::ActiveIndexDisagrees {
                agent,
                indexed_nodes: indexed,
                record_node,
            });
        }
    }
    Ok(())
}

/// `by_status` files every agent under its own status, once, and nothing else.
fn check_status_index(state: &ClusterState) -> Result<(), InvariantViolation> {
    let mut indexed: BTreeMap<AgentId, Vec<AgentStatus>> = BTreeMap::new();
    for (status, agents) in &state.by_status {
        for agent in agents {
            indexed.entry(*agent).or_default().push(*status);
        }
    }
    let agent_ids: BTreeSet<AgentId> = state.agents.keys().chain(indexed.keys()).copied().collect();
    for agent in agent_ids {
        let record = state.agents.get(&agent).map(|record| record.status);
        let filed = indexed.remove(&agent).unwrap_or_default();
        if filed != record.into_iter().collect::<Vec<_>>() {
            return Err(InvariantViolation::StatusIndexDisagrees {
                agent,
                indexed: filed,
                record,
            });
        }
    }
    Ok(())
}

/// Every agent has a signature cell, empty or holding the signature of its current texts, and
/// no other id has one.
fn check_search_signatures(state: &ClusterState) -> Result<(), InvariantViolation> {
    if let Some(agent) = state
        .search_signatures
        .keys()
        .find(|agent| !state.agents.contains_key(agent))
    {
        return Err(InvariantViolation::SearchSignatureDisagrees { agent: *agent });
    }
    for (agent, record) in &state.agents {
        // A cell a search filled before its record's texts changed would answer with stale
        // bits: what a cell holds must be the signature of the record as it is. (An empty
        // cell takes it when asked; checking leaves it empty.)
        let agrees = state.search_signatures.get(agent).is_some_and(|signature| {
            signature
                .taken()
                .is_none_or(|held| held == crate::search::SearchSignature::of_record(record))
        });
        if !agrees {
            return Err(InvariantViolation::SearchSignatureDisagrees { agent: *agent });
        }
    }
    Ok(())
}

fn check_nodes_and_tokens(state: &ClusterState) -> Result<(), InvariantViolation> {
    for (key, node) in &state.nodes {
        if *key != node.id {
            return Err(InvariantViolation::NodeFiledUnderOtherId {
                key: *key,
                found: node.id,
            });
        }
        if node.id > state.highest_node_id {
            return Err(InvariantViolation::NodeIdAboveHighest {
                node: node.id,
                highest: state.highest_node_id,
            });
        }
    }
    for (repository, nodes) in &state.install_layers {
        if nodes.is_empty() {
            return Err(InvariantViolation::EmptyInstallLayerList {
                repository: repository.clone(),
            });
        }
        if let Some(node) = nodes.iter().find(|node| !state.nodes.contains_key(node)) {
            return Err(InvariantViolation::InstallLayerOnUnknownNode {
                repository: repository.clone(),
                node: *node,
            });
        }
    }
    for (key, token) in &state.tokens {
        if *key != token.sha256_hex {
            return Err(InvariantViolation::TokenFiledUnderOtherHash {
                key: key.clone(),
                found: token.sha256_hex.clone(),
            });
        }
    }
    Ok(())
}

/// Each plugin version: valid fields, chunks exactly `0..chunk_count` holding `size_bytes`
/// bytes that hash to its digest; at most one enabled version per name; bounded in number.
fn check_plugins(state: &ClusterState) -> Result<(), InvariantViolation> {
    if state.plugins.len() > MAX_PLUGINS {
        return Err(InvariantViolation::TooManyPlugins {
            found: state.plugins.len(),
        });
    }
    let mut enabled_by_name: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, record) in &state.plugins {
        let plugin = record.key();
        if *key != plugin {
            return Err(InvariantViolation::PluginFiledUnderOtherKey {
                key: key.clone(),
                found: plugin,
            });
        }
        check_plugin_fields(record).map_err(|reason| InvariantViolation::InvalidPluginRecord {
            plugin: plugin.clone(),
            reason,
        })?;
        if record.enabled {
            if let Some(first) = enabled_by_name.insert(&record.name, &record.version) {
                return Err(InvariantViolation::TwoEnabledVersions {
                    name: record.name.clone(),
                    first: first.to_string(),
                    second: record.version.clone(),
                });
            }
        }
        check_plugin_chunks(state, &plugin, record.chunk_count, record.size_bytes, &record.sha256)?;
    }
    for ((plugin, index), bytes) in &state.plugin_chunks {
        let owned = state
            .plugins
            .get(plugin)
            .is_some_and(|record| *index < record.chunk_count);
        if !owned {
            return Err(InvariantViolation::PluginChunkWithoutRecord {
                plugin: plugin.clone(),
                index: *index,
            });
        }
        check_chunk_bounds(&format!("plugin {plugin}"), *index, bytes)?;
    }
    Ok(())
}

fn check_plugin_fields(record: &crate::types::PluginRecord) -> Result<(), PluginFieldError> {
    validate_plugin_name(&record.name)?;
    validate_plugin_version(&record.version)?;
    validate_sha256_hex(&record.sha256)?;
    validate_granted_hosts(&record.granted_hosts)
}

fn check_plugin_chunks(
    state: &ClusterState,
    plugin: &PluginKey,
    chunk_count: u32,
    size_bytes: u64,
    sha256: &str,
) -> Result<(), InvariantViolation> {
    if chunk_count == 0 || chunk_count > MAX_PLUGIN_CHUNKS {
        return Err(InvariantViolation::PluginChunkCountOutOfBounds {
            plugin: plugin.clone(),
            chunk_count,
        });
    }
    let mut hasher = Sha256::new();
    let mut found_bytes = 0u64;
    for index in 0..chunk_count {
        let bytes = state.plugin_chunks.get(&(plugin.clone(), index)).ok_or_else(|| {
            InvariantViolation::PluginChunkMissing {
                plugin: plugin.clone(),
                index,
            }
        })?;
        hasher.update(bytes);
        found_bytes += bytes.len() as u64;
    }
    if found_bytes != size_bytes {
        return Err(InvariantViolation::PluginSizeIsNotChunkSize {
            plugin: plugin.clone(),
            size_bytes,
            found_bytes,
        });
    }
    if hex::encode(hasher.finalize()) != sha256 {
        return Err(InvariantViolation::PluginDigestMismatch { plugin: plugin.clone() });
    }
    Ok(())
}

fn check_chunk_bounds(owner: &str, index: u32, bytes: &[u8]) -> Result<(), InvariantViolation> {
    if bytes.is_empty() || bytes.len() > MAX_PLUGIN_CHUNK_BYTES || index >= MAX_PLUGIN_CHUNKS {
        return Err(InvariantViolation::ChunkOutOfBounds {
            owner: owner.to_string(),
            index,
            found_bytes: bytes.len(),
        });
    }
    Ok(())
}

/// Staged uploads: bounded in number and size, each with at least one chunk, every staged
/// chunk under an upload in progress; plugins and uploads together within the cluster's bound.
fn check_uploads(state: &ClusterState) -> Result<(), InvariantViolation> {
    if state.plugin_uploads.len() > MAX_STAGED_UPLOADS {
        return Err(InvariantViolation::TooManyUploads {
            found: state.plugin_uploads.len(),
        });
    }
    for (key, upload) in &state.plugin_uploads {
        if *key != upload.id {
            return Err(InvariantViolation::UploadFiledUnderOtherId {
                key: *key,
                found: upload.id,
            });
        }
        if state.staged_chunks(upload.id).next().is_none() {
            return Err(InvariantViolation::UploadWithoutChunks { upload: upload.id });
        }
        let found_bytes = state.staged_bytes(upload.id);
        if found_bytes > MAX_PLUGIN_BYTES as u64 {
            return Err(InvariantViolation::UploadTooLarge {
                upload: upload.id,
                found_bytes,
            });
        }
    }
    for ((upload, index), bytes) in &state.upload_chunks {
        if !state.plugin_uploads.contains_key(upload) {
            return Err(InvariantViolation::StagedChunkWithoutUpload {
                upload: *upload,
                index: *index,
            });
        }
        check_chunk_bounds(&format!("upload {upload}"), *index, bytes)?;
    }
    let held = state.plugin_bytes_held();
    if held > MAX_TOTAL_PLUGIN_BYTES as u64 {
        return Err(InvariantViolation::TooManyPluginBytes { found_bytes: held });
    }
    Ok(())
}

fn check_plugin_settings(state: &ClusterState) -> Result<(), InvariantViolation> {
    for (name, settings) in &state.plugin_settings {
        if settings.is_empty() {
            return Err(InvariantViolation::EmptyPluginSettings { name: name.clone() });
        }
        validate_plugin_name(name)
            .and_then(|()| validate_plugin_settings(settings))
            .map_err(|reason| InvariantViolation::InvalidPluginSettings {
                name: name.clone(),
                reason,
            })?;
    }
    Ok(())
}

/// Checks what one applied request must keep between the state `before` and the state
/// `after`: a refused request changes nothing; no agent disappears but by a delete or a purge
/// naming it; an agent's epoch, event
/// sequence, turns and follow-ups never go down; a stopped agent stays stopped; and an agent
/// that had ended (finished, failed or stopped) gets no new assignment unless the request
/// carried a follow-up for it.
pub fn check_transition(
    before: &ClusterState,
    command: &Command,
    result: &ApplyResult,
    after: &ClusterState,
) -> Result<(), InvariantViolation> {
    if result.is_err() && before != after {
        return Err(InvariantViolation::RefusalChangedState {
            command: command.name(),
        });
    }
    let followed_up = agents_followed_up(command);
    let removed = agents_removable(command);
    for (id, old) in &before.agents {
        let Some(new) = after.agents.get(id) else {
            if removed.contains(id) {
                continue;
            }
            return Err(InvariantViolation::AgentDisappeared { agent: *id });
        };
        if new.epoch < old.epoch {
            return Err(InvariantViolation::EpochWentDown {
                agent: *id,
                before: old.epoch,
                after: new.epoch,
            });
        }
        if old.status == AgentStatus::Stopped && new.status != AgentStatus::Stopped {
            return Err(InvariantViolation::StoppedAgentMoved {
                agent: *id,
                status: new.status,
            });
        }
        if old.status.is_terminal() && new.assignment != old.assignment && !followed_up.contains(id) {
            return Err(InvariantViolation::EndedAgentReassigned {
                agent: *id,
                status: old.status,
                after: new.assignment,
            });
        }
        check_counters(*id, old, new)?;
        check_pushed_commit(*id, old, new, command)?;
    }
    check_stopping_marks(before, command, after)
}

/// A stopping node takes agents again only once it registers (on its next start): no other
/// command, a node reporting up included, takes the mark off.
fn check_stopping_marks(
    before: &ClusterState,
    command: &Command,
    after: &ClusterState,
) -> Result<(), InvariantViolation> {
    let registered = nodes_registered(command);
    for (id, old) in &before.nodes {
        let cleared = old.stopping && after.nodes.get(id).is_some_and(|new| !new.stopping);
        if cleared && !registered.contains(id) {
            return Err(InvariantViolation::StoppingMarkClearedWithoutRegistration {
                node: *id,
                command: command.name(),
            });
        }
    }
    Ok(())
}

/// The nodes a request registers, batches included.
fn nodes_registered(command: &Command) -> BTreeSet<NodeId> {
    match command {
        Command::RegisterNode { node, .. } => BTreeSet::from([*node]),
        Command::Batch { commands } => commands.iter().flat_map(nodes_registered).collect(),
        _ => BTreeSet::new(),
    }
}

/// The record of the work branch moves only by a write of the agent's owner under its current
/// epoch (before or after the request: a batch may assign and then record), and never while
/// the agent is finished: that is what lets the origin fence pushes on it.
fn check_pushed_commit(
    agent: AgentId,
    old: &AgentRecord,
    new: &AgentRecord,
    command: &Command,
) -> Result<(), InvariantViolation> {
    if old.pushed_commit == new.pushed_commit {
        return Ok(());
    }
    let (before, after) = (old.pushed_commit.clone(), new.pushed_commit.clone());
    if old.status == AgentStatus::Finished {
        return Err(InvariantViolation::FinishedAgentPushedCommitMoved { agent, before, after });
    }
    let owners = [old.assignment, new.assignment];
    let by_owner = branch_writers(command, agent)
        .into_iter()
        .any(|writer| owners.contains(&Some(writer)));
    if !by_owner {
        return Err(InvariantViolation::PushedCommitMovedByNonOwner { agent, before, after });
    }
    Ok(())
}

/// The node and epoch of every write in `command` that may move `agent`'s pushed commit.
fn branch_writers(command: &Command, agent: AgentId) -> Vec<crate::types::Assignment> {
    match command {
        Command::Batch { commands } => commands
            .iter()
            .flat_map(|command| branch_writers(command, agent))
            .collect(),
        Command::RecordTurn {
            agent: written,
            node,
            epoch,
            ..
        }
        | Command::RecordPush {
            agent: written,
            node,
            epoch,
            ..
        }
        | Command::RecordBranch {
            agent: written,
            node,
            epoch,
            ..
        } if *written == agent => vec![crate::types::Assignment {
            node: *node,
            epoch: *epoch,
        }],
        _ => Vec::new(),
    }
}

fn check_counters(agent: AgentId, old: &AgentRecord, new: &AgentRecord) -> Result<(), InvariantViolation> {
    let counters = [
        ("the last event sequence", old.last_sequence, new.last_sequence),
        ("the turns recorded", u64::from(old.turns), u64::from(new.turns)),
        (
            "the follow-ups received",
            old.follow_ups.len() as u64,
            new.follow_ups.len() as u64,
        ),
        (
            "the follow-ups delivered",
            u64::from(old.follow_ups_delivered),
            u64::from(new.follow_ups_delivered),
        ),
    ];
    for (what, before, after) in counters {
        if after < before {
            return Err(InvariantViolation::CounterWentDown {
                agent,
                what,
                before,
                after,
            });
        }
    }
    Ok(())
}

/// The agents a request sends a follow-up to, batches included.
/// The agents a request may remove: the one it deletes, those a purge names (batches included).
fn agents_removable(command: &Command) -> BTreeSet<AgentId> {
    match command {
        Command::DeleteAgent { agent } => BTreeSet::from([*agent]),
        Command::PurgeEndedAgents { agents } => agents.iter().copied().collect(),
        Command::Batch { commands } => commands.iter().flat_map(agents_removable).collect(),
        _ => BTreeSet::new(),
    }
}

fn agents_followed_up(command: &Command) -> BTreeSet<AgentId> {
    match command {
        Command::FollowUp { agent, .. } => BTreeSet::from([*agent]),
        Command::Batch { commands } => commands.iter().flat_map(agents_followed_up).collect(),
        _ => BTreeSet::new(),
    }
}
