//! The replicated state: every record Raft has committed, in memory, with the indexes that
//! placement and the agents' owners read. What may change it is `apply` (in [`crate::apply`]);
//! what it must always satisfy is [`crate::invariants`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::audit::{AuditEntry, TeamLimits};
use crate::types::{
    AgentId, AgentRecord, AgentStatus, Checkpoint, DurableEvent, NodeId, NodeRecord, PluginKey, PluginRecord,
    PluginUpload, TeamRecord, TokenRecord, UploadId,
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
    /// Nodes holding an install layer, per repository URL.
    pub install_layers: BTreeMap<String, BTreeSet<NodeId>>,
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
    /// Teams by name ([`crate::types::DEFAULT_TEAM`] exists without a record).
    #[serde(default)]
    pub teams: BTreeMap<String, TeamRecord>,
    /// Unused join tokens: the SHA-256 of each token's secret part, and when it expires (ms).
    #[serde(default)]
    pub join_tokens: BTreeMap<String, u64>,
    /// Sealed secrets by scope and name (see [`crate::secrets`]): never a plaintext value.
    #[serde(default)]
    pub secrets: BTreeMap<(crate::secrets::SecretScope, String), crate::secrets::SecretRecord>,
    /// Settings by team name; a team without an entry has the defaults.
    #[serde(default)]
    pub team_settings: BTreeMap<String, crate::settings::TeamSettings>,
    /// The audit log, oldest first, bounded by [`crate::audit::MAX_AUDIT_ENTRIES`] and
    /// [`crate::audit::MAX_AUDIT_AGE_MS`].
    #[serde(default)]
    pub audit: VecDeque<AuditEntry>,
    /// The sequence number the next audit entry gets.
    #[serde(default)]
    pub next_audit_sequence: u64,
    /// Limits per team, set by the cluster admin.
    #[serde(default)]
    pub team_limits: BTreeMap<String, TeamLimits>,
    /// The limits of every team without its own.
    #[serde(default)]
    pub default_team_limits: TeamLimits,
    /// The cluster CA, its key sealed under the key-encryption key; `None` until the node that
    /// created the cluster recorded it.
    #[serde(default)]
    pub cluster_ca: Option<crate::secrets::ClusterCaRecord>,
    /// Nodes removed from the cluster: every certificate naming one is refused, and the id is
    /// never registered again. One small entry per removal an admin made.
    #[serde(default)]
    pub removed_nodes: BTreeSet<NodeId>,
    /// Agents waiting for placement, oldest first (ULIDs sort by time).
    #[serde(skip)]
    pub pending: BTreeSet<AgentId>,
    /// Non-terminal agents per owning node.
    #[serde(skip)]
    pub active_by_node: BTreeMap<NodeId, BTreeSet<AgentId>>,
    /// Non-terminal agents per owning team (what `max_running_agents` counts).
    #[serde(skip)]
    pub live_by_team: BTreeMap<String, BTreeSet<AgentId>>,
    /// Agents per owning team by creation time in the log (what `creates_per_minute` counts).
    #[serde(skip)]
    pub created_by_team: BTreeMap<String, BTreeSet<(u64, AgentId)>>,
    /// Every agent under its status, so that a list filtered by status walks only the agents
    /// it returns (in id order, newest last, like `agents`).
    #[serde(skip)]
    pub by_status: BTreeMap<AgentStatus, BTreeSet<AgentId>>,
    /// Every agent's search signature (see [`crate::search`]), newest last like `agents`, so a
    /// search walks fixed-size signatures and reads only the records that may match. Each is
    /// taken when a search first needs it ([`crate::search::LazySignature`]).
    #[serde(skip)]
    pub search_signatures: BTreeMap<AgentId, crate::search::LazySignature>,
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
    /// A secret was set or removed.
    pub secrets: bool,
    /// Audit entries appended (by sequence).
    pub audit_appended: Vec<u64>,
    /// Audit entries dropped from the front (by sequence).
    pub audit_trimmed: Vec<u64>,
}

/// Runs `change` on the value `team` has in `by_team`, made empty first if it has none. The
/// team's name is copied only then, for a team's first agent, not for every agent indexed.
fn change_team_entry<T: Default>(by_team: &mut BTreeMap<String, T>, team: &str, change: impl FnOnce(&mut T)) {
    match by_team.get_mut(team) {
        Some(value) => change(value),
        None => change(by_team.entry(team.to_string()).or_default()),
    }
}

impl ClusterState {
    /// Rebuilds the secondary indexes after loading records from storage or a Raft snapshot.
    pub fn rebuild_indexes(&mut self) {
        self.pending.clear();
        self.active_by_node.clear();
        self.live_by_team.clear();
        self.created_by_team.clear();
        self.by_status.clear();
        self.search_signatures.clear();
        let ids: Vec<AgentId> = self.agents.keys().copied().collect();
        for id in ids {
            self.index_agent(id);
        }
        // A node that has just loaded its state (at start, or from a snapshot) takes every
        // signature now, so that its first search does not take them for the whole history.
        for (id, signature) in &self.search_signatures {
            if let Some(record) = self.agents.get(id) {
                signature.of(record);
            }
        }
    }

    pub(crate) fn index_agent(&mut self, id: AgentId) {
        for set in self.by_status.values_mut() {
            set.remove(&id);
        }
        // No empty sets kept: a state rebuilt from its records has none, and the two compare
        // equal (a snapshot install is checked that way).
        self.by_status.retain(|_, set| !set.is_empty());
        let Some(agent) = self.agents.get(&id) else {
            for set in self.live_by_team.values_mut() {
                set.remove(&id);
            }
            self.search_signatures.remove(&id);
            return;
        };
        self.by_status.entry(agent.status).or_default().insert(id);
        // A cell for the signature of the record's current texts, taken by the first search
        // that needs it. Name and prompt never change and a summary is only ever set, never
        // cleared, so an agent without a summary keeps its cell (and the signature a search
        // may have taken) through status changes. An agent with a summary gets an empty cell,
        // since the summary may just have been set.
        if agent.summary.is_some() || !self.search_signatures.contains_key(&id) {
            self.search_signatures
                .insert(id, crate::search::LazySignature::default());
        }
        let team = crate::types::owning_team(&agent.spec.team);
        let created = (agent.created_at_ms, id);
        change_team_entry(&mut self.created_by_team, team, |set| {
            set.insert(created);
        });
        if agent.status.is_terminal() {
            if let Some(set) = self.live_by_team.get_mut(team) {
                set.remove(&id);
            }
            // An ended agent's history rarely grows again: give back the room a growing queue
            // keeps (a queue of two or three events holds room for four), which on a node with
            // a long history of ended agents is most of their events' memory.
            if let Some(events) = self.events.get_mut(&id) {
                events.shrink_to_fit();
            }
        } else {
            change_team_entry(&mut self.live_by_team, team, |set| {
                set.insert(id);
            });
        }
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

    /// Agents with one of `statuses`, newest first, those before `before` only (all when
    /// `None`): the ids of the status index merged in descending order, so a filtered list
    /// walks only the agents it may return.
    pub fn ids_with_status_before<'a>(
        &'a self,
        statuses: &[AgentStatus],
        before: Option<AgentId>,
    ) -> impl Iterator<Item = AgentId> + 'a {
        let mut wanted: Vec<AgentStatus> = statuses.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut ranges: Vec<std::iter::Peekable<_>> = wanted
            .iter()
            .filter_map(|status| self.by_status.get(status))
            .map(|set| {
                let range = match before {
                    Some(before) => set.range(..before),
                    None => set.range(..),
                };
                range.rev().copied().peekable()
            })
            .collect();
        std::iter::from_fn(move || {
            // The largest head of the ranges is the next id; each id is in one range only.
            let (index, _) = ranges
                .iter_mut()
                .enumerate()
                .filter_map(|(index, range)| range.peek().map(|id| (index, *id)))
                .max_by_key(|(_, id)| *id)?;
            ranges[index].next()
        })
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

    /// At most `limit` durable events of an agent after `after_sequence`, oldest first: what a
    /// watcher replays in one step, so one read copies a bounded part of a long history.
    pub fn events_after_bounded(&self, agent: AgentId, after_sequence: u64, limit: usize) -> Vec<DurableEvent> {
        let Some(events) = self.events.get(&agent) else {
            return Vec::new();
        };
        let start = events.partition_point(|event| event.sequence <= after_sequence);
        events.range(start..).take(limit).cloned().collect()
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
    /// [`crate::command::MAX_TOTAL_PLUGIN_BYTES`].
    pub fn plugin_bytes_held(&self) -> u64 {
        let committed: u64 = self.plugins.values().map(|record| record.size_bytes).sum();
        let staged: u64 = self.upload_chunks.values().map(|chunk| chunk.len() as u64).sum();
        committed + staged
    }

    pub(crate) fn staged_chunks(&self, upload: UploadId) -> impl Iterator<Item = (u32, &Vec<u8>)> {
        self.upload_chunks
            .range((upload, 0)..=(upload, u32::MAX))
            .map(|((_, index), bytes)| (*index, bytes))
    }

    pub(crate) fn staged_bytes(&self, upload: UploadId) -> u64 {
        self.staged_chunks(upload).map(|(_, bytes)| bytes.len() as u64).sum()
    }

    /// The settings of `team` (the defaults when it has set none; an empty team is the default
    /// team).
    pub fn settings_of(&self, team: &str) -> crate::settings::TeamSettings {
        let team = if team.is_empty() {
            crate::types::DEFAULT_TEAM
        } else {
            team
        };
        self.team_settings.get(team).cloned().unwrap_or_default()
    }

    /// The limits `team` is held to: its own where set, else the cluster default.
    pub fn limits_of(&self, team: &str) -> TeamLimits {
        self.team_limits
            .get(team)
            .copied()
            .unwrap_or_default()
            .or(self.default_team_limits)
    }

    /// The oldest durable sequence still retained for an agent.
    pub fn first_retained_sequence(&self, agent: AgentId) -> Option<u64> {
        self.events
            .get(&agent)
            .and_then(|events| events.front())
            .map(|event| event.sequence)
    }
}
