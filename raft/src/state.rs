//! The replicated state and the pure function that applies a command to it.
//!
//! `apply` does no I/O and reads no clock: the same log gives the same state on every node.
//! What it touched is recorded in [`Changes`], so that storage can persist exactly those records.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::command::{
    ApplyError, ApplyResult, AssignOne, Command, Request, Response, COMMAND_VERSION, MAX_CHECKPOINT_BYTES,
    MAX_EVENTS_PER_TURN, MAX_PLUGINS, MAX_PLUGIN_BYTES, MAX_PLUGIN_CHUNKS, MAX_PLUGIN_CHUNK_BYTES, MAX_STAGED_UPLOADS,
    MAX_TOTAL_PLUGIN_BYTES, STALE_UPLOAD_MS,
};
use crate::types::{
    validate_granted_hosts, validate_plugin_name, validate_plugin_settings, validate_plugin_version,
    validate_sha256_hex, AgentId, AgentRecord, AgentStatus, Assignment, Checkpoint, DurableEvent, EventKind, NodeId,
    NodeRecord, PluginKey, PluginKind, PluginRecord, PluginUpload, TokenRecord, UploadId,
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
    /// Uploaded plugin versions (records only; the bytes are in `plugin_chunks`).
    pub plugins: BTreeMap<PluginKey, PluginRecord>,
    /// The bytes of each plugin version, in chunks `0..chunk_count`.
    pub plugin_chunks: BTreeMap<(PluginKey, u32), Vec<u8>>,
    /// Uploads in progress.
    pub plugin_uploads: BTreeMap<UploadId, PluginUpload>,
    /// The chunks staged by uploads in progress.
    pub upload_chunks: BTreeMap<(UploadId, u32), Vec<u8>>,
    /// Settings by plugin name (every version of the name, built-ins included).
    #[serde(default)]
    pub plugin_settings: BTreeMap<String, BTreeMap<String, String>>,
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
    pub plugins: BTreeSet<PluginKey>,
    pub plugin_chunks: BTreeSet<(PluginKey, u32)>,
    pub plugin_uploads: BTreeSet<UploadId>,
    pub upload_chunks: BTreeSet<(UploadId, u32)>,
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

    /// The whole component of a plugin version, its chunks joined; `None` when the version is
    /// not stored.
    pub fn plugin_bytes(&self, key: &PluginKey) -> Option<Vec<u8>> {
        let record = self.plugins.get(key)?;
        let mut bytes = Vec::with_capacity(record.size_bytes as usize);
        for index in 0..record.chunk_count {
            bytes.extend_from_slice(self.plugin_chunks.get(&(key.clone(), index))?);
        }
        Some(bytes)
    }

    /// The enabled version of each plugin name that has one.
    pub fn enabled_plugins(&self) -> impl Iterator<Item = &PluginRecord> {
        self.plugins.values().filter(|record| record.enabled)
    }

    /// Bytes of every plugin version and every staged chunk, the figure bounded by
    /// [`MAX_TOTAL_PLUGIN_BYTES`].
    pub fn plugin_bytes_held(&self) -> u64 {
        let committed: u64 = self.plugins.values().map(|record| record.size_bytes).sum();
        let staged: u64 = self.upload_chunks.values().map(|chunk| chunk.len() as u64).sum();
        committed + staged
    }

    fn staged_chunks(&self, upload: UploadId) -> impl Iterator<Item = (u32, &Vec<u8>)> {
        self.upload_chunks
            .range((upload, 0)..=(upload, u32::MAX))
            .map(|((_, index), bytes)| (*index, bytes))
    }

    fn staged_bytes(&self, upload: UploadId) -> u64 {
        self.staged_chunks(upload).map(|(_, bytes)| bytes.len() as u64).sum()
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
        Command::PutPluginChunk { upload, index, bytes } => {
            put_plugin_chunk(state, changes, at_ms, *upload, *index, bytes)
        }
        Command::CommitPlugin {
            upload,
            name,
            version,
            sha256,
            kind,
            size_bytes,
            chunk_count,
            granted_hosts,
            enable,
        } => commit_plugin(
            state,
            changes,
            at_ms,
            PluginCommit {
                upload: *upload,
                key: PluginKey::new(name, version),
                sha256,
                kind: *kind,
                size_bytes: *size_bytes,
                chunk_count: *chunk_count,
                granted_hosts,
                enable: *enable,
            },
        ),
        Command::AbortUpload { upload } => {
            if !state.plugin_uploads.contains_key(upload) {
                return Err(ApplyError::UploadNotFound(*upload));
            }
            drop_upload(state, changes, *upload);
            Ok(Response::Done)
        }
        Command::SetPluginEnabled { name, version, enabled } => {
            let key = existing_plugin(state, name, version)?;
            if *enabled {
                disable_other_versions(state, changes, &key);
            }
            let record = state.plugins.get_mut(&key).expect("checked above");
            record.enabled = *enabled;
            changes.plugins.insert(key);
            Ok(Response::Plugin(Box::new(record.clone())))
        }
        Command::SetPluginSettings { name, settings } => {
            validate_plugin_name(name).map_err(ApplyError::Invalid)?;
            validate_plugin_settings(settings).map_err(ApplyError::Invalid)?;
            if settings.is_empty() {
                state.plugin_settings.remove(name);
            } else {
                state.plugin_settings.insert(name.clone(), settings.clone());
            }
            changes.meta = true;
            Ok(Response::PluginSettings(settings.clone()))
        }
        Command::RecordPullRequest {
            agent,
            node,
            epoch,
            provider,
            pull_request,
            error,
        } => {
            check_owner(state, *agent, *node, *epoch)?;
            let record = state.agents.get_mut(agent).ok_or(ApplyError::AgentNotFound(*agent))?;
            record.updated_at_ms = at_ms;
            let event = match (pull_request, error) {
                (Some(pull_request), None) => {
                    record.pull_request = Some(pull_request.clone());
                    EventKind::PullRequestOpened {
                        url: pull_request.url.clone(),
                        number: pull_request.number,
                        provider: provider.clone(),
                    }
                }
                (None, Some(error)) => EventKind::PullRequestFailed {
                    provider: provider.clone(),
                    error: error.clone(),
                },
                _ => {
                    return Err(ApplyError::Invalid(
                        "a pull request outcome is either a pull request or an error".to_string(),
                    ))
                }
            };
            push_event(state, changes, *agent, at_ms, Some(*node), event);
            changes.agents.insert(*agent);
            Ok(Response::Done)
        }
        Command::GrantPluginHosts { name, version, hosts } => {
            let key = existing_plugin(state, name, version)?;
            validate_granted_hosts(hosts).map_err(ApplyError::Invalid)?;
            let record = state.plugins.get_mut(&key).expect("checked above");
            record.granted_hosts = hosts.clone();
            changes.plugins.insert(key);
            Ok(Response::Plugin(Box::new(record.clone())))
        }
        Command::RemovePlugin { name, version } => {
            let key = existing_plugin(state, name, version)?;
            if state.plugins[&key].enabled {
                return Err(ApplyError::PluginEnabled {
                    name: name.clone(),
                    version: version.clone(),
                });
            }
            let record = state.plugins.remove(&key).expect("checked above");
            for index in 0..record.chunk_count {
                state.plugin_chunks.remove(&(key.clone(), index));
                changes.plugin_chunks.insert((key.clone(), index));
            }
            changes.plugins.insert(key);
            Ok(Response::Plugin(Box::new(record)))
        }
    }
}

fn existing_plugin(state: &ClusterState, name: &str, version: &str) -> Result<PluginKey, ApplyError> {
    let key = PluginKey::new(name, version);
    if state.plugins.contains_key(&key) {
        Ok(key)
    } else {
        Err(ApplyError::PluginNotFound {
            name: name.to_string(),
            version: version.to_string(),
        })
    }
}

fn disable_other_versions(state: &mut ClusterState, changes: &mut Changes, key: &PluginKey) {
    for (other, record) in state.plugins.iter_mut() {
        if other.name == key.name && other.version != key.version && record.enabled {
            record.enabled = false;
            changes.plugins.insert(other.clone());
        }
    }
}

fn drop_upload(state: &mut ClusterState, changes: &mut Changes, upload: UploadId) {
    state.plugin_uploads.remove(&upload);
    changes.plugin_uploads.insert(upload);
    let indexes: Vec<u32> = state.staged_chunks(upload).map(|(index, _)| index).collect();
    for index in indexes {
        state.upload_chunks.remove(&(upload, index));
        changes.upload_chunks.insert((upload, index));
    }
}

fn put_plugin_chunk(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    upload: UploadId,
    index: u32,
    bytes: &[u8],
) -> ApplyResult {
    if bytes.is_empty() {
        return Err(ApplyError::Invalid(format!("upload {upload}: chunk {index} is empty")));
    }
    if bytes.len() > MAX_PLUGIN_CHUNK_BYTES {
        return Err(ApplyError::TooLarge {
            what: format!("upload {upload}: chunk {index}"),
            found: bytes.len(),
            limit: MAX_PLUGIN_CHUNK_BYTES,
        });
    }
    if index >= MAX_PLUGIN_CHUNKS {
        return Err(ApplyError::Invalid(format!(
            "upload {upload}: chunk index {index} is past the {MAX_PLUGIN_CHUNKS} chunks a plugin may have"
        )));
    }
    // A new upload drops the stale ones, but only once it is sure to be accepted: a refused
    // command changes nothing.
    let starting = !state.plugin_uploads.contains_key(&upload);
    let stale: Vec<UploadId> = if starting {
        state
            .plugin_uploads
            .values()
            .filter(|staged| staged.last_chunk_at_ms.saturating_add(STALE_UPLOAD_MS) <= at_ms)
            .map(|staged| staged.id)
            .collect()
    } else {
        Vec::new()
    };
    if starting && state.plugin_uploads.len() - stale.len() >= MAX_STAGED_UPLOADS {
        return Err(ApplyError::TooManyUploads {
            limit: MAX_STAGED_UPLOADS,
        });
    }
    let replaced = state
        .upload_chunks
        .get(&(upload, index))
        .map_or(0, |previous| previous.len() as u64);
    let upload_bytes = state.staged_bytes(upload) - replaced + bytes.len() as u64;
    if upload_bytes > MAX_PLUGIN_BYTES as u64 {
        return Err(ApplyError::TooLarge {
            what: format!("upload {upload}"),
            found: upload_bytes as usize,
            limit: MAX_PLUGIN_BYTES,
        });
    }
    let freed: u64 = stale.iter().map(|staged| state.staged_bytes(*staged)).sum();
    let held = state.plugin_bytes_held() - freed - replaced + bytes.len() as u64;
    if held > MAX_TOTAL_PLUGIN_BYTES as u64 {
        return Err(ApplyError::TooLarge {
            what: "the plugins and uploads of the cluster".to_string(),
            found: held as usize,
            limit: MAX_TOTAL_PLUGIN_BYTES,
        });
    }
    for staged in stale {
        drop_upload(state, changes, staged);
    }
    let record = state.plugin_uploads.entry(upload).or_insert_with(|| PluginUpload {
        id: upload,
        started_at_ms: at_ms,
        last_chunk_at_ms: at_ms,
    });
    record.last_chunk_at_ms = at_ms;
    changes.plugin_uploads.insert(upload);
    state.upload_chunks.insert((upload, index), bytes.to_vec());
    changes.upload_chunks.insert((upload, index));
    Ok(Response::Done)
}

/// The fields of a `CommitPlugin`, borrowed.
struct PluginCommit<'a> {
    upload: UploadId,
    key: PluginKey,
    sha256: &'a str,
    kind: PluginKind,
    size_bytes: u64,
    chunk_count: u32,
    granted_hosts: &'a [String],
    enable: bool,
}

fn commit_plugin(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, commit: PluginCommit<'_>) -> ApplyResult {
    let PluginCommit {
        upload,
        key,
        sha256,
        kind,
        size_bytes,
        chunk_count,
        granted_hosts,
        enable,
    } = commit;
    validate_plugin_name(&key.name).map_err(ApplyError::Invalid)?;
    validate_plugin_version(&key.version).map_err(ApplyError::Invalid)?;
    validate_sha256_hex(sha256).map_err(ApplyError::Invalid)?;
    validate_granted_hosts(granted_hosts).map_err(ApplyError::Invalid)?;
    if state.plugins.contains_key(&key) {
        return Err(ApplyError::PluginExists {
            name: key.name,
            version: key.version,
        });
    }
    if state.plugins.len() >= MAX_PLUGINS {
        return Err(ApplyError::TooManyPlugins { limit: MAX_PLUGINS });
    }
    if size_bytes > MAX_PLUGIN_BYTES as u64 {
        return Err(ApplyError::TooLarge {
            what: format!("plugin {key}"),
            found: size_bytes as usize,
            limit: MAX_PLUGIN_BYTES,
        });
    }
    if !state.plugin_uploads.contains_key(&upload) {
        return Err(ApplyError::UploadNotFound(upload));
    }
    if chunk_count == 0 {
        return Err(ApplyError::Invalid(format!(
            "plugin {key}: a plugin has at least one chunk"
        )));
    }
    // Chunk indexes are unique and sorted, so `chunk_count` of them, the last being
    // `chunk_count - 1`, are exactly `0..chunk_count`.
    let staged: Vec<u32> = state.staged_chunks(upload).map(|(index, _)| index).collect();
    if staged.len() != chunk_count as usize || staged.last() != Some(&(chunk_count - 1)) {
        let missing = (0..chunk_count).find(|index| !staged.contains(index));
        return Err(ApplyError::Invalid(match missing {
            Some(index) => format!("upload {upload}: chunk {index} of {chunk_count} is missing"),
            None => format!(
                "upload {upload} holds {} chunks; the commit says {chunk_count}",
                staged.len()
            ),
        }));
    }
    // Hashing in apply is deterministic, so every node checks the bytes it holds itself.
    let mut hasher = Sha256::new();
    let mut found_bytes = 0u64;
    for (_, bytes) in state.staged_chunks(upload) {
        hasher.update(bytes);
        found_bytes += bytes.len() as u64;
    }
    if found_bytes != size_bytes {
        return Err(ApplyError::Invalid(format!(
            "upload {upload} holds {found_bytes} bytes; the commit says {size_bytes}"
        )));
    }
    let found_sha256 = hex::encode(hasher.finalize());
    if found_sha256 != sha256 {
        return Err(ApplyError::Invalid(format!(
            "upload {upload} has sha256 {found_sha256}; the commit says {sha256}"
        )));
    }
    for index in 0..chunk_count {
        let bytes = state
            .upload_chunks
            .remove(&(upload, index))
            .expect("every chunk was checked above");
        changes.upload_chunks.insert((upload, index));
        state.plugin_chunks.insert((key.clone(), index), bytes);
        changes.plugin_chunks.insert((key.clone(), index));
    }
    state.plugin_uploads.remove(&upload);
    changes.plugin_uploads.insert(upload);
    if enable {
        disable_other_versions(state, changes, &key);
    }
    let record = PluginRecord {
        name: key.name.clone(),
        version: key.version.clone(),
        sha256: sha256.to_string(),
        size_bytes,
        kind,
        enabled: enable,
        granted_hosts: granted_hosts.to_vec(),
        uploaded_at_ms: at_ms,
        chunk_count,
    };
    state.plugins.insert(key.clone(), record.clone());
    changes.plugins.insert(key);
    Ok(Response::Plugin(Box::new(record)))
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
    use crate::types::{AgentSpec, Epoch, NodeInfo, PullRequestRef};

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

    // ----- plugins -----

    fn run_at(state: &mut ClusterState, at_ms: u64, command: Command) -> ApplyResult {
        apply(
            state,
            &mut Changes::default(),
            &Request {
                version: COMMAND_VERSION,
                at_ms,
                command,
            },
        )
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// `bytes` split into chunks of `chunk_bytes`, staged under `upload` at `at_ms`.
    fn stage(state: &mut ClusterState, at_ms: u64, upload: UploadId, bytes: &[u8], chunk_bytes: usize) -> u32 {
        let chunks: Vec<&[u8]> = bytes.chunks(chunk_bytes).collect();
        for (index, chunk) in chunks.iter().enumerate() {
            run_at(
                state,
                at_ms,
                Command::PutPluginChunk {
                    upload,
                    index: index as u32,
                    bytes: chunk.to_vec(),
                },
            )
            .unwrap();
        }
        chunks.len() as u32
    }

    fn commit(upload: UploadId, name: &str, version: &str, bytes: &[u8], chunk_count: u32, enable: bool) -> Command {
        Command::CommitPlugin {
            upload,
            name: name.to_string(),
            version: version.to_string(),
            sha256: sha256_hex(bytes),
            kind: PluginKind::VcsProvider,
            size_bytes: bytes.len() as u64,
            chunk_count,
            granted_hosts: vec!["api.github.com".to_string()],
            enable,
        }
    }

    /// Uploads and commits a plugin whose bytes say its name and version.
    fn add_plugin(state: &mut ClusterState, name: &str, version: &str, enable: bool) -> PluginRecord {
        let bytes = format!("component of {name} {version}").into_bytes();
        let upload = UploadId::new();
        let chunk_count = stage(state, 1_000, upload, &bytes, 7);
        match run(state, commit(upload, name, version, &bytes, chunk_count, enable)).unwrap() {
            Response::Plugin(record) => *record,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn enabled_versions(state: &ClusterState, name: &str) -> Vec<String> {
        state
            .enabled_plugins()
            .filter(|record| record.name == name)
            .map(|record| record.version.clone())
            .collect()
    }

    #[test]
    fn a_commit_moves_the_staged_chunks_to_the_plugin() {
        let mut state = ClusterState::default();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1_000).collect();
        let upload = UploadId::new();
        let chunk_count = stage(&mut state, 1_000, upload, &bytes, 300);
        assert_eq!(chunk_count, 4);
        assert_eq!(state.plugin_uploads[&upload].started_at_ms, 1_000);
        assert_eq!(state.plugin_bytes_held(), 1_000);

        let mut changes = Changes::default();
        let result = apply(
            &mut state,
            &mut changes,
            &Request {
                version: COMMAND_VERSION,
                at_ms: 2_000,
                command: commit(upload, "github", "1.0.0", &bytes, chunk_count, true),
            },
        )
        .unwrap();
        let Response::Plugin(record) = result else {
            panic!("a commit answers with the plugin");
        };
        assert_eq!(
            *record,
            PluginRecord {
                name: "github".into(),
                version: "1.0.0".into(),
                sha256: sha256_hex(&bytes),
                size_bytes: 1_000,
                kind: PluginKind::VcsProvider,
                enabled: true,
                granted_hosts: vec!["api.github.com".into()],
                uploaded_at_ms: 2_000,
                chunk_count: 4,
            }
        );
        let key = PluginKey::new("github", "1.0.0");
        assert_eq!(state.plugin_bytes(&key), Some(bytes));
        assert!(state.plugin_uploads.is_empty() && state.upload_chunks.is_empty());
        assert_eq!(state.plugin_bytes_held(), 1_000, "moved, not copied");
        assert_eq!(changes.plugins, BTreeSet::from([key.clone()]));
        assert_eq!(changes.plugin_chunks.len(), 4);
        assert_eq!(changes.upload_chunks.len(), 4);
        assert_eq!(changes.plugin_uploads, BTreeSet::from([upload]));
    }

    #[test]
    fn a_commit_that_does_not_match_its_chunks_is_refused_without_change() {
        let mut state = ClusterState::default();
        let bytes = b"0123456789abcdef".to_vec();
        let upload = UploadId::new();
        stage(&mut state, 1_000, upload, &bytes, 4);
        // Chunk 2 of 4 never arrives.
        let gap = UploadId::new();
        for index in [0, 1, 3] {
            run(
                &mut state,
                Command::PutPluginChunk {
                    upload: gap,
                    index,
                    bytes: b"abcd".to_vec(),
                },
            )
            .unwrap();
        }
        let before = state.clone();
        let refusals = [
            (
                commit(gap, "github", "1.0.0", b"abcdabcdabcdabcd", 4, false),
                "chunk 2 of 4 is missing",
            ),
            (
                commit(upload, "github", "1.0.0", &bytes, 3, false),
                "holds 4 chunks; the commit says 3",
            ),
            (
                commit(upload, "github", "1.0.0", &bytes, 5, false),
                "chunk 4 of 5 is missing",
            ),
            (
                commit(upload, "github", "1.0.0", &bytes, 0, false),
                "at least one chunk",
            ),
            (
                commit(upload, "github", "1.0.0", b"0123456789abcdeX", 4, false),
                "has sha256",
            ),
            (
                commit(upload, "github", "1.0.0", &bytes[..15], 4, false),
                "holds 16 bytes; the commit says 15",
            ),
            (
                commit(upload, "GitHub", "1.0.0", &bytes, 4, false),
                "plugin name \"GitHub\" is not valid",
            ),
            (
                commit(upload, "github", "1.0", &bytes, 4, false),
                "plugin version \"1.0\" is not valid",
            ),
            (
                commit(upload, "github", "1.0.0+build", &bytes, 4, false),
                "build metadata",
            ),
        ];
        for (command, expected) in refusals {
            let refusal = run(&mut state, command).expect_err(expected);
            assert!(
                matches!(&refusal, ApplyError::Invalid(message) if message.contains(expected)),
                "{expected:?} in {refusal}"
            );
            assert_eq!(state, before, "a refused commit ({expected}) changes nothing");
        }
        let mut bad_digest = commit(upload, "github", "1.0.0", &bytes, 4, false);
        if let Command::CommitPlugin { sha256, .. } = &mut bad_digest {
            *sha256 = sha256.to_uppercase();
        }
        assert!(matches!(run(&mut state, bad_digest), Err(ApplyError::Invalid(_))));
        let unknown = UploadId::new();
        assert_eq!(
            run(&mut state, commit(unknown, "github", "1.0.0", &bytes, 4, false)),
            Err(ApplyError::UploadNotFound(unknown))
        );
        assert_eq!(state, before);
        run(&mut state, commit(upload, "github", "1.0.0", &bytes, 4, false)).unwrap();
    }

    #[test]
    fn a_second_upload_of_a_version_is_refused_with_plugin_exists() {
        let mut state = ClusterState::default();
        add_plugin(&mut state, "github", "1.0.0", false);
        let bytes = b"another build".to_vec();
        let upload = UploadId::new();
        let chunk_count = stage(&mut state, 1_000, upload, &bytes, 100);
        let before = state.clone();
        assert_eq!(
            run(&mut state, commit(upload, "github", "1.0.0", &bytes, chunk_count, true)),
            Err(ApplyError::PluginExists {
                name: "github".into(),
                version: "1.0.0".into()
            })
        );
        assert_eq!(state, before, "the upload stays staged for its node to abort");
        run(&mut state, commit(upload, "github", "1.0.1", &bytes, chunk_count, true)).unwrap();
    }

    #[test]
    fn chunks_are_bounded_in_size_index_and_per_upload_total() {
        let mut state = ClusterState::default();
        let upload = UploadId::new();
        let chunk = |index: u32, bytes: Vec<u8>| Command::PutPluginChunk { upload, index, bytes };
        let before = state.clone();
        assert!(matches!(
            run(&mut state, chunk(0, Vec::new())),
            Err(ApplyError::Invalid(_))
        ));
        assert!(matches!(
            run(&mut state, chunk(0, vec![0; MAX_PLUGIN_CHUNK_BYTES + 1])),
            Err(ApplyError::TooLarge {
                limit: MAX_PLUGIN_CHUNK_BYTES,
                ..
            })
        ));
        assert!(matches!(
            run(&mut state, chunk(MAX_PLUGIN_CHUNKS, vec![1])),
            Err(ApplyError::Invalid(message)) if message.contains("past the 1024 chunks")
        ));
        assert_eq!(state, before);

        let full_chunks = (MAX_PLUGIN_BYTES / MAX_PLUGIN_CHUNK_BYTES) as u32;
        for index in 0..full_chunks {
            run(&mut state, chunk(index, vec![7; MAX_PLUGIN_CHUNK_BYTES])).unwrap();
        }
        assert_eq!(state.staged_bytes(upload), MAX_PLUGIN_BYTES as u64);
        // Writing a chunk again replaces it, so a retried write does not count twice.
        run(&mut state, chunk(0, vec![8; MAX_PLUGIN_CHUNK_BYTES])).unwrap();
        assert_eq!(state.staged_bytes(upload), MAX_PLUGIN_BYTES as u64);
        let before = state.clone();
        assert!(matches!(
            run(&mut state, chunk(full_chunks, vec![1])),
            Err(ApplyError::TooLarge { limit: MAX_PLUGIN_BYTES, found, .. }) if found == MAX_PLUGIN_BYTES + 1
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn staged_uploads_are_bounded_and_stale_ones_make_room() {
        let mut state = ClusterState::default();
        let start_ms = 1_000;
        let put = |upload| Command::PutPluginChunk {
            upload,
            index: 0,
            bytes: b"x".to_vec(),
        };
        let early: Vec<UploadId> = (0..MAX_STAGED_UPLOADS / 2).map(|_| UploadId::new()).collect();
        let late: Vec<UploadId> = (0..MAX_STAGED_UPLOADS / 2).map(|_| UploadId::new()).collect();
        for upload in &early {
            run_at(&mut state, start_ms, put(*upload)).unwrap();
        }
        for upload in &late {
            run_at(&mut state, start_ms + STALE_UPLOAD_MS / 2, put(*upload)).unwrap();
        }
        // An upload in progress may go on at its limit.
        run_at(
            &mut state,
            start_ms + 1,
            Command::PutPluginChunk {
                upload: early[0],
                index: 1,
                bytes: b"y".to_vec(),
            },
        )
        .unwrap();

        let newcomer = UploadId::new();
        let before = state.clone();
        assert_eq!(
            run_at(&mut state, start_ms + STALE_UPLOAD_MS - 1, put(newcomer)),
            Err(ApplyError::TooManyUploads {
                limit: MAX_STAGED_UPLOADS
            }),
            "no upload is stale yet"
        );
        assert_eq!(state, before);

        // Now the early uploads have been idle for the stale period, except early[0], which
        // wrote a chunk 1 ms later.
        let mut changes = Changes::default();
        apply(
            &mut state,
            &mut changes,
            &Request {
                version: COMMAND_VERSION,
                at_ms: start_ms + STALE_UPLOAD_MS,
                command: put(newcomer),
            },
        )
        .unwrap();
        let staged: BTreeSet<UploadId> = state.plugin_uploads.keys().copied().collect();
        let expected: BTreeSet<UploadId> = late.iter().copied().chain([early[0], newcomer]).collect();
        assert_eq!(staged, expected, "the stale uploads made room and the others stay");
        assert!(state.upload_chunks.keys().all(|(upload, _)| expected.contains(upload)));
        assert_eq!(state.staged_bytes(early[0]), 2);
        let dropped: BTreeSet<UploadId> = early[1..].iter().copied().collect();
        assert!(changes.plugin_uploads.is_superset(&dropped));
        assert!(changes.upload_chunks.contains(&(early[1], 0)));
    }

    #[test]
    fn abort_drops_the_upload_and_only_its_chunks() {
        let mut state = ClusterState::default();
        let (aborted, kept) = (UploadId::new(), UploadId::new());
        stage(&mut state, 1_000, aborted, b"abcdef", 2);
        stage(&mut state, 1_000, kept, b"ghijkl", 2);
        run(&mut state, Command::AbortUpload { upload: aborted }).unwrap();
        assert_eq!(state.plugin_uploads.keys().collect::<Vec<_>>(), vec![&kept]);
        assert_eq!(state.upload_chunks.len(), 3);
        assert_eq!(state.staged_bytes(kept), 6);
        let before = state.clone();
        assert_eq!(
            run(&mut state, Command::AbortUpload { upload: aborted }),
            Err(ApplyError::UploadNotFound(aborted))
        );
        assert_eq!(state, before);
    }

    #[test]
    fn enabling_a_version_disables_the_other_versions_of_its_name() {
        let mut state = ClusterState::default();
        add_plugin(&mut state, "github", "1.0.0", true);
        add_plugin(&mut state, "jira", "0.1.0", true);
        assert_eq!(enabled_versions(&state, "github"), vec!["1.0.0"]);
        // A commit with `enable` takes over from the enabled version.
        add_plugin(&mut state, "github", "1.1.0", true);
        assert_eq!(enabled_versions(&state, "github"), vec!["1.1.0"]);
        add_plugin(&mut state, "github", "2.0.0-rc.1", false);
        assert_eq!(enabled_versions(&state, "github"), vec!["1.1.0"]);

        let set = |version: &str, enabled| Command::SetPluginEnabled {
            name: "github".into(),
            version: version.into(),
            enabled,
        };
        let mut changes = Changes::default();
        let result = apply(&mut state, &mut changes, &request(set("1.0.0", true))).unwrap();
        assert!(matches!(result, Response::Plugin(record) if record.enabled && record.version == "1.0.0"));
        assert_eq!(enabled_versions(&state, "github"), vec!["1.0.0"]);
        assert_eq!(
            changes.plugins,
            BTreeSet::from([PluginKey::new("github", "1.0.0"), PluginKey::new("github", "1.1.0")])
        );
        assert_eq!(
            enabled_versions(&state, "jira"),
            vec!["0.1.0"],
            "other names are left alone"
        );
        run(&mut state, set("1.0.0", true)).unwrap();
        assert_eq!(
            enabled_versions(&state, "github"),
            vec!["1.0.0"],
            "enabling twice is harmless"
        );

        run(&mut state, set("1.0.0", false)).unwrap();
        assert!(enabled_versions(&state, "github").is_empty());

        let before = state.clone();
        assert_eq!(
            run(&mut state, set("3.0.0", true)),
            Err(ApplyError::PluginNotFound {
                name: "github".into(),
                version: "3.0.0".into()
            })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn plugin_settings_are_kept_by_name_within_bounds() {
        let mut state = ClusterState::default();
        let set = |pairs: &[(&str, &str)]| Command::SetPluginSettings {
            name: "github".into(),
            settings: pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        };
        // A name with no uploaded version (a built-in) may have settings.
        let result = run(&mut state, set(&[("api-base", "https://ghe.example.com/api/v3")])).unwrap();
        assert!(matches!(result, Response::PluginSettings(settings) if settings.len() == 1));
        assert_eq!(
            state.plugin_settings["github"]["api-base"],
            "https://ghe.example.com/api/v3"
        );
        let before = state.clone();
        for (pairs, expected) in [
            (vec![("API", "x")], "setting key"),
            (vec![("", "x")], "setting key"),
            (vec![("hosts", "a\nb")], "control characters"),
        ] {
            let refusal = run(&mut state, set(&pairs)).expect_err(expected);
            assert!(
                matches!(&refusal, ApplyError::Invalid(message) if message.contains(expected)),
                "{expected:?} in {refusal}"
            );
        }
        let long = "x".repeat(crate::types::MAX_PLUGIN_SETTING_VALUE_BYTES + 1);
        assert!(run(&mut state, set(&[("hosts", long.as_str())])).is_err());
        assert_eq!(state, before);
        // An empty map clears them.
        run(&mut state, set(&[])).unwrap();
        assert!(!state.plugin_settings.contains_key("github"));
    }

    #[test]
    fn the_owner_records_a_pull_request_or_why_it_could_not_open_one() {
        let mut state = with_nodes(2);
        let id = running(&mut state, "a", 1);
        let record = |node: NodeId, epoch: u64, pull_request: Option<PullRequestRef>, error: Option<&str>| {
            Command::RecordPullRequest {
                agent: id,
                node,
                epoch: Epoch(epoch),
                provider: "github".into(),
                pull_request,
                error: error.map(str::to_string),
            }
        };
        let opened = PullRequestRef {
            url: "https://github.com/acme/widgets/pull/7".into(),
            number: 7,
        };
        let before = state.clone();
        assert!(matches!(
            run(&mut state, record(2, 1, Some(opened.clone()), None)),
            Err(ApplyError::Fenced { .. })
        ));
        assert!(matches!(
            run(&mut state, record(1, 1, Some(opened.clone()), Some("both"))),
            Err(ApplyError::Invalid(_))
        ));
        assert_eq!(state, before);

        let sequence_before = state.agents[&id].last_sequence;
        run(&mut state, record(1, 1, None, Some("422 Validation Failed"))).unwrap();
        assert_eq!(state.agents[&id].pull_request, None);
        run(&mut state, record(1, 1, Some(opened.clone()), None)).unwrap();
        assert_eq!(state.agents[&id].pull_request, Some(opened));
        assert_eq!(
            event_kinds_after(&state, id, sequence_before),
            vec![
                EventKind::PullRequestFailed {
                    provider: "github".into(),
                    error: "422 Validation Failed".into()
                },
                EventKind::PullRequestOpened {
                    url: "https://github.com/acme/widgets/pull/7".into(),
                    number: 7,
                    provider: "github".into()
                }
            ]
        );
    }

    #[test]
    fn granting_hosts_replaces_the_list_within_bounds() {
        let mut state = ClusterState::default();
        add_plugin(&mut state, "github", "1.0.0", false);
        let grant = |hosts: Vec<String>| Command::GrantPluginHosts {
            name: "github".into(),
            version: "1.0.0".into(),
            hosts,
        };
        let hosts = vec!["github.example.com".to_string(), "*.githubusercontent.com".to_string()];
        let result = run(&mut state, grant(hosts.clone())).unwrap();
        assert!(matches!(result, Response::Plugin(record) if record.granted_hosts == hosts));
        assert_eq!(state.plugins[&PluginKey::new("github", "1.0.0")].granted_hosts, hosts);

        let before = state.clone();
        let too_many: Vec<String> = (0..=crate::types::MAX_GRANTED_HOSTS)
            .map(|index| format!("h{index}.example.com"))
            .collect();
        for (hosts, expected) in [
            (too_many, "at most 64"),
            (vec!["a".repeat(254)], "1 to 253 characters"),
            (vec![String::new()], "1 to 253 characters"),
            (vec!["a b".to_string()], "white space"),
        ] {
            let refusal = run(&mut state, grant(hosts)).expect_err(expected);
            assert!(
                matches!(&refusal, ApplyError::Invalid(message) if message.contains(expected)),
                "{expected:?} in {refusal}"
            );
        }
        assert!(matches!(
            run(
                &mut state,
                Command::GrantPluginHosts {
                    name: "gitlab".into(),
                    version: "1.0.0".into(),
                    hosts: Vec::new(),
                }
            ),
            Err(ApplyError::PluginNotFound { .. })
        ));
        assert_eq!(state, before);
        run(&mut state, grant(Vec::new())).unwrap();
        assert!(state.plugins[&PluginKey::new("github", "1.0.0")]
            .granted_hosts
            .is_empty());
    }

    #[test]
    fn removing_deletes_a_disabled_version_and_its_bytes_but_refuses_an_enabled_one() {
        let mut state = ClusterState::default();
        let enabled = add_plugin(&mut state, "github", "1.1.0", true);
        let disabled = add_plugin(&mut state, "github", "1.0.0", false);
        assert!(disabled.chunk_count > 1);
        let remove = |record: &PluginRecord| Command::RemovePlugin {
            name: record.name.clone(),
            version: record.version.clone(),
        };
        let before = state.clone();
        assert_eq!(
            run(&mut state, remove(&enabled)),
            Err(ApplyError::PluginEnabled {
                name: "github".into(),
                version: "1.1.0".into()
            })
        );
        assert_eq!(state, before);

        let mut changes = Changes::default();
        let result = apply(&mut state, &mut changes, &request(remove(&disabled))).unwrap();
        assert_eq!(result, Response::Plugin(Box::new(disabled.clone())));
        assert!(!state.plugins.contains_key(&disabled.key()));
        assert!(state.plugin_chunks.keys().all(|(key, _)| *key == enabled.key()));
        assert_eq!(changes.plugin_chunks.len(), disabled.chunk_count as usize);
        assert_eq!(state.plugin_bytes_held(), enabled.size_bytes);
        let before = state.clone();
        assert!(matches!(
            run(&mut state, remove(&disabled)),
            Err(ApplyError::PluginNotFound { .. })
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn the_number_of_plugin_versions_is_bounded() {
        let mut state = ClusterState::default();
        for patch in 0..MAX_PLUGINS {
            add_plugin(&mut state, "tool", &format!("1.0.{patch}"), false);
        }
        let upload = UploadId::new();
        let bytes = b"one too many".to_vec();
        let chunk_count = stage(&mut state, 1_000, upload, &bytes, 100);
        let before = state.clone();
        assert_eq!(
            run(&mut state, commit(upload, "tool", "2.0.0", &bytes, chunk_count, false)),
            Err(ApplyError::TooManyPlugins { limit: MAX_PLUGINS })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn plugin_names_and_versions() {
        use crate::types::{validate_plugin_name, validate_plugin_version};
        for good in ["github", "a", "gitea-forgejo", "tool2", &"x".repeat(64)] {
            assert_eq!(validate_plugin_name(good), Ok(()), "{good}");
        }
        for bad in ["", "GitHub", "git_hub", "git hub", "tool.v2", &"x".repeat(65)] {
            assert!(validate_plugin_name(bad).is_err(), "{bad:?}");
        }
        for good in ["0.1.0", "1.2.3", "10.20.30", "1.0.0-rc.1", "1.0.0-alpha-2"] {
            assert_eq!(validate_plugin_version(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1",
            "1.0",
            "v1.0.0",
            "01.0.0",
            "1.0.0+build.5",
            "1.0.0 ",
            &format!("1.0.0-{}", "a".repeat(60)),
        ] {
            assert!(validate_plugin_version(bad).is_err(), "{bad:?}");
        }
        let mut versions = vec!["1.10.0", "1.9.0", "1.0.0", "1.0.0-rc.1"];
        versions.sort_by(|left, right| crate::types::plugin_version_order(left, right));
        assert_eq!(versions, vec!["1.0.0-rc.1", "1.0.0", "1.9.0", "1.10.0"]);
    }
}
