//! The records of the replicated state: agents, nodes, events and tokens.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// Raft and cluster identity of a node.
pub type NodeId = u64;

/// An agent's id: a ULID, so ids sort by creation time.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentId(pub Ulid);

impl AgentId {
    pub fn new() -> AgentId {
        AgentId(Ulid::new())
    }

    /// The first characters of the id's random part, unique enough for branch names.
    pub fn short(&self) -> String {
        self.0.to_string()[16..].to_lowercase()
    }
}

impl Default for AgentId {
    fn default() -> Self {
        AgentId::new()
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

impl FromStr for AgentId {
    type Err = ulid::DecodeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(text).map(AgentId)
    }
}

/// A placement generation. Every (re)assignment of an agent raises its epoch; a node acts on an
/// agent only under the epoch it was given, and the state machine refuses writes under any other.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

/// A Raft term: the leadership under which a log entry was appended. A leader's judgement of
/// the cluster (who is down) names the term it was made in, and holds only in that term.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

impl fmt::Display for Term {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

/// Ordered (by variant, the order of a run) only so that it can key an index in memory; the
/// order means nothing on the wire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentStatus {
    Pending,
    Provisioning,
    Running,
    Finished,
    Failed,
    Stopped,
}

impl AgentStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, AgentStatus::Finished | AgentStatus::Failed | AgentStatus::Stopped)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Pending => "pending",
            AgentStatus::Provisioning => "provisioning",
            AgentStatus::Running => "running",
            AgentStatus::Finished => "finished",
            AgentStatus::Failed => "failed",
            AgentStatus::Stopped => "stopped",
        }
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// What a client asked for; fixed once the agent exists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct AgentSpec {
    pub name: String,
    pub prompt: String,
    pub repository: String,
    pub base_branch: String,
    pub work_branch: String,
    pub model: String,
    /// Placement is limited to this region when set.
    pub region: Option<String>,
    pub team: String,
    pub open_pull_request: bool,
    /// Hosts the machine may reach through the node's egress proxy; empty means no network.
    pub egress_allow: Vec<String>,
    /// The model is the scripted provider: replies come from a file, never from a model.
    pub scripted: bool,
    /// The user of the key that created the agent (empty for agents created before keys had
    /// users). The agent belongs to `team`; the user is shown, never used for access, except
    /// that the user's secrets reach the agent's machine.
    #[serde(default)]
    pub user: String,
}

impl AgentSpec {
    /// The spec with its prompt left empty and everything else copied: for an answer whose
    /// reader has the prompt already. Every field is named, so a new one is not forgotten.
    pub fn without_prompt(&self) -> AgentSpec {
        let AgentSpec {
            name,
            prompt: _,
            repository,
            base_branch,
            work_branch,
            model,
            region,
            team,
            open_pull_request,
            egress_allow,
            scripted,
            user,
        } = self;
        AgentSpec {
            name: name.clone(),
            prompt: String::new(),
            repository: repository.clone(),
            base_branch: base_branch.clone(),
            work_branch: work_branch.clone(),
            model: model.clone(),
            region: region.clone(),
            team: team.clone(),
            open_pull_request: *open_pull_request,
            egress_allow: egress_allow.clone(),
            scripted: *scripted,
            user: user.clone(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub node: NodeId,
    pub epoch: Epoch,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PullRequestRef {
    pub url: String,
    pub number: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: AgentId,
    /// Shared with the log entry that created it (and with copies of the record): cloning a
    /// record does not copy its prompt.
    pub spec: Arc<AgentSpec>,
    pub status: AgentStatus,
    /// The node that owns the agent now; `None` while it waits for placement.
    pub assignment: Option<Assignment>,
    /// The latest epoch handed out for this agent (also kept while unassigned, so the next
    /// assignment is strictly higher).
    pub epoch: Epoch,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub summary: Option<String>,
    pub error: Option<String>,
    pub follow_ups: Vec<FollowUp>,
    /// How many of `follow_ups` the agent has taken into a turn.
    pub follow_ups_delivered: u32,
    pub head_commit: Option<String>,
    pub pull_request: Option<PullRequestRef>,
    /// Sequence number of the newest durable event.
    pub last_sequence: u64,
    /// Model turns checkpointed so far, over all runs.
    pub turns: u32,
    /// The agent's model is the scripted provider (set by its first turn).
    pub scripted: bool,
    /// The last commit the origin accepted for the work branch.
    pub pushed_commit: Option<String>,
}

impl AgentRecord {
    pub fn pending_follow_ups(&self) -> u32 {
        (self.follow_ups.len() as u32).saturating_sub(self.follow_ups_delivered)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FollowUp {
    pub text: String,
    pub at_ms: u64,
}

/// An event that is part of an agent's durable history. Sequence numbers start at 1 and have
/// no gaps, so a watcher can resume exactly where it left off.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DurableEvent {
    pub agent: AgentId,
    pub sequence: u64,
    pub at_ms: u64,
    pub node: Option<NodeId>,
    pub kind: EventKind,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    StatusChanged {
        from: AgentStatus,
        to: AgentStatus,
        assignment: Option<Assignment>,
        reason: String,
    },
    FollowUpAccepted {
        text: String,
        index: u32,
    },
    Log {
        text: String,
    },
    /// The assistant's whole text of one turn.
    AssistantMessage {
        turn: u32,
        text: String,
    },
    /// One tool call of a turn, with its (capped) output.
    ToolCallFinished {
        call_id: String,
        tool: String,
        arguments: String,
        output: String,
        truncated: bool,
        failed: bool,
        duration_ms: u64,
    },
    CommitPushed {
        branch: String,
        commit: String,
    },
    /// The origin refused or could not take the branch; the commit stays on the node.
    PushFailed {
        branch: String,
        commit: String,
        error: String,
    },
    TurnFinished {
        turn: u32,
        input_tokens: u64,
        output_tokens: u64,
        tool_calls: u32,
        /// Time waiting for the model, and running the tools.
        model_ms: u64,
        tools_ms: u64,
    },
    Summary {
        text: String,
    },
    /// The repository's provider opened the pull request the agent's request asked for.
    PullRequestOpened {
        url: String,
        number: u64,
        provider: String,
    },
    /// The provider could not open the pull request; `error` is its (or the forge's) words.
    PullRequestFailed {
        provider: String,
        error: String,
    },
    /// The origin's work branch held `commit`, not the recorded commit (a fenced owner pushed
    /// it); the owner moved the branch back to `restored` (deleted it when `None`) and keeps
    /// `commit` on its node under the ref `kept`, so the work is not lost.
    CommitDisplaced {
        branch: String,
        commit: String,
        restored: Option<String>,
        kept: String,
    },
}

/// The state of an agent's conversation after its last finished turn, from which another node
/// resumes it. `data` is opaque here (the agent runtime encodes and compresses it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub turn: u32,
    pub at_ms: u64,
    pub head_commit: Option<String>,
    pub data: Vec<u8>,
}

/// What a node declares about itself when it joins.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub grpc_address: String,
    pub mesh_address: String,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub info: NodeInfo,
    pub up: bool,
    pub draining: bool,
    /// When the leader last wrote a liveness change for this node.
    pub changed_at_ms: u64,
    /// The node is stopping cleanly (`NodeStopping`): it takes no agents until it registers
    /// again on its next start. Apart from `draining`, which an admin sets and clears.
    #[serde(default)]
    pub stopping: bool,
}

impl NodeRecord {
    /// Whether placement may give this node agents: up, not drained by an admin, not stopping.
    pub fn takes_agents(&self) -> bool {
        self.up && !self.draining && !self.stopping
    }
}

/// The team every agent, key and setting without a team of its own belongs to: agents created
/// before teams existed, and agents created by the cluster-admin key. It always exists.
pub const DEFAULT_TEAM: &str = "default";
/// The team a record with `team` belongs to: an empty team is [`DEFAULT_TEAM`] (agents and keys
/// written before teams existed).
pub fn owning_team(team: &str) -> &str {
    if team.is_empty() {
        DEFAULT_TEAM
    } else {
        team
    }
}

/// Longest team and user name, in bytes.
pub const MAX_NAME_BYTES: usize = 63;
/// Most teams and most keys the cluster keeps: each is a small record read on every call.
pub const MAX_TEAMS: usize = 1000;
pub const MAX_KEYS: usize = 10_000;

/// What a key may do. Serialised by variant index: `ClusterAdmin` is index 0, which the first
/// admin token has always been written with, so that token reads back as the cluster-admin key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Manages teams, every key, nodes, membership and plugins; sees every team's agents.
    ClusterAdmin,
    /// Creates and drives its team's agents.
    Member,
    /// Reads its team's agents; writes nothing.
    Viewer,
    /// A member who also manages its team's keys (and, later, its settings and secrets).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ClusterAdmin => "cluster-admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    /// The role a key asks for by name; `None` for a name that is not a role.
    pub fn from_name(name: &str) -> Option<Role> {
        [Role::ClusterAdmin, Role::Member, Role::Viewer, Role::Admin]
            .into_iter()
            .find(|role| role.as_str() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// An API key; only its SHA-256 is replicated, never the key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub sha256_hex: String,
    /// The user the key belongs to (keys written before users existed carry their name here).
    pub name: String,
    pub role: Role,
    pub team: String,
    pub created_at_ms: u64,
    /// The key's public id, used to list and revoke it (derived from the digest; see
    /// [`key_id_of`]).
    #[serde(default)]
    pub key_id: String,
    /// When the key stops working: the creation time recorded in the log plus the asked
    /// lifetime. Judged at call time against the serving node's clock.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

impl TokenRecord {
    pub fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|expires| now_ms >= expires)
    }
}

/// The public id of the key whose SHA-256 is `sha256_hex`: a prefix of the digest. The digest of
/// a 256-bit random key reveals nothing about the key, and deriving the id keeps `apply` free
/// of randomness and every id stable across nodes.
pub fn key_id_of(sha256_hex: &str) -> String {
    format!("key_{}", &sha256_hex[..sha256_hex.len().min(20)])
}

/// A team: the unit agents, keys and settings belong to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TeamRecord {
    pub name: String,
    pub created_at_ms: u64,
}

/// Why a team or user name is refused: `None` when it is acceptable.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_string());
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!("at most {MAX_NAME_BYTES} bytes, found {}", name.len()));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.' | '@')))
    {
        return Some(format!(
            "{name:?} holds {bad:?}; use lowercase letters, digits, '-', '_', '.' and '@'"
        ));
    }
    None
}

/// A staged plugin upload: a ULID chosen by the node that received the upload, under which its
/// chunks wait in the replicated state until the upload is committed or aborted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UploadId(pub Ulid);

impl UploadId {
    pub fn new() -> UploadId {
        UploadId(Ulid::new())
    }
}

impl Default for UploadId {
    fn default() -> Self {
        UploadId::new()
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

impl FromStr for UploadId {
    type Err = ulid::DecodeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(text).map(UploadId)
    }
}

/// Which WIT world a plugin's component implements (see `plugins/wit`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PluginKind {
    VcsProvider,
    Tool,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::VcsProvider => "vcs-provider",
            PluginKind::Tool => "tool",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One version of one plugin: what identifies a plugin record and its chunks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PluginKey {
    pub name: String,
    pub version: String,
}

impl PluginKey {
    pub fn new(name: &str, version: &str) -> PluginKey {
        PluginKey {
            name: name.to_string(),
            version: version.to_string(),
        }
    }
}

impl fmt::Display for PluginKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} {}", self.name, self.version)
    }
}

/// An uploaded plugin version. Its bytes live apart, in `ClusterState::plugin_chunks`, so that
/// listing plugins never copies them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PluginRecord {
    pub name: String,
    pub version: String,
    /// SHA-256 of the whole component, lowercase hex.
    pub sha256: String,
    pub size_bytes: u64,
    pub kind: PluginKind,
    /// At most one version of a name is enabled at a time.
    pub enabled: bool,
    /// Hosts the plugin may reach through the host's `http.send`.
    pub granted_hosts: Vec<String>,
    pub uploaded_at_ms: u64,
    /// The bytes are chunks `0..chunk_count` under this plugin's key.
    pub chunk_count: u32,
}

impl PluginRecord {
    pub fn key(&self) -> PluginKey {
        PluginKey::new(&self.name, &self.version)
    }
}

/// An upload in progress: its chunks are staged under its id until a commit moves them to a
/// plugin or an abort (or a newer upload, once this one is stale) drops them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PluginUpload {
    pub id: UploadId,
    pub started_at_ms: u64,
    pub last_chunk_at_ms: u64,
}

/// Longest plugin name.
pub const MAX_PLUGIN_NAME_CHARS: usize = 64;
/// Longest plugin version.
pub const MAX_PLUGIN_VERSION_CHARS: usize = 64;
/// Most hosts granted to one plugin.
pub const MAX_GRANTED_HOSTS: usize = 64;
/// Longest granted host (a DNS name's limit).
pub const MAX_GRANTED_HOST_CHARS: usize = 253;

/// Why a plugin name, version, setting, granted host or digest is refused. The messages say
/// what was wanted and what was found; the state machine passes them on as
/// [`crate::ApplyError::Invalid`], and the node and the CLI show them as they are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PluginFieldError {
    #[error("plugin name {name:?} is not valid: use 1 to {MAX_PLUGIN_NAME_CHARS} lowercase letters, digits and dashes, like \"github\"")]
    InvalidName { name: String },
    #[error("plugin version is required: {PLUGIN_VERSION_WANTED}")]
    MissingVersion,
    #[error("plugin version is {found_chars} characters; the most is {MAX_PLUGIN_VERSION_CHARS}")]
    VersionTooLong { found_chars: usize },
    #[error("plugin version {version:?} is not valid ({reason}): {PLUGIN_VERSION_WANTED}")]
    InvalidVersion { version: String, reason: String },
    #[error("plugin version {version:?} has build metadata (+{build}), which is not allowed: {PLUGIN_VERSION_WANTED}")]
    VersionHasBuildMetadata { version: String, build: String },
    #[error("settings: at most {MAX_PLUGIN_SETTINGS}, found {found}")]
    TooManySettings { found: usize },
    #[error("setting key {key:?}: 1 to {MAX_PLUGIN_SETTING_KEY_CHARS} of a-z, 0-9, '-', '_' and '.'")]
    InvalidSettingKey { key: String },
    #[error("setting {key}: at most {MAX_PLUGIN_SETTING_VALUE_BYTES} bytes, found {found_bytes}")]
    SettingValueTooLong { key: String, found_bytes: usize },
    #[error("setting {key}: the value contains control characters")]
    SettingValueHasControlCharacters { key: String },
    #[error("granted hosts: at most {MAX_GRANTED_HOSTS}, found {found}")]
    TooManyGrantedHosts { found: usize },
    #[error("granted host {host:?}: 1 to {MAX_GRANTED_HOST_CHARS} characters, found {found_chars}")]
    GrantedHostLength { host: String, found_chars: usize },
    #[error("granted host {host:?} contains white space or control characters")]
    GrantedHostHasSpace { host: String },
    #[error("sha256 {digest:?} is not 64 lowercase hex digits")]
    InvalidSha256 { digest: String },
}

/// How a plugin version must be written, for the refusals that name it.
const PLUGIN_VERSION_WANTED: &str = "use MAJOR.MINOR.PATCH, like \"1.2.0\" or \"1.2.0-rc.1\"";

/// A plugin name: 1 to 64 lowercase letters, digits and dashes.
pub fn validate_plugin_name(name: &str) -> Result<(), PluginFieldError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_PLUGIN_NAME_CHARS
        && name
            .chars()
            .all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-');
    if valid {
        Ok(())
    } else {
        Err(PluginFieldError::InvalidName { name: name.to_string() })
    }
}

/// A plugin version: semantic versioning `MAJOR.MINOR.PATCH`, with an optional pre-release
/// (`1.0.0-rc.1`). Build metadata is refused: two versions that differ only in it would be the
/// same version to semver, yet two records here.
pub fn validate_plugin_version(version: &str) -> Result<(), PluginFieldError> {
    if version.is_empty() {
        return Err(PluginFieldError::MissingVersion);
    }
    if version.len() > MAX_PLUGIN_VERSION_CHARS {
        return Err(PluginFieldError::VersionTooLong {
            found_chars: version.len(),
        });
    }
    let parsed = semver::Version::parse(version).map_err(|error| PluginFieldError::InvalidVersion {
        version: version.to_string(),
        reason: error.to_string(),
    })?;
    if !parsed.build.is_empty() {
        return Err(PluginFieldError::VersionHasBuildMetadata {
            version: version.to_string(),
            build: parsed.build.to_string(),
        });
    }
    Ok(())
}

/// Most settings one plugin name may have.
pub const MAX_PLUGIN_SETTINGS: usize = 64;
/// Longest setting key (lowercase letters, digits, `-`, `_` and `.`).
pub const MAX_PLUGIN_SETTING_KEY_CHARS: usize = 64;
/// Longest setting value.
pub const MAX_PLUGIN_SETTING_VALUE_BYTES: usize = 4096;

/// The bounds and syntax of one plugin name's settings.
pub fn validate_plugin_settings(settings: &BTreeMap<String, String>) -> Result<(), PluginFieldError> {
    if settings.len() > MAX_PLUGIN_SETTINGS {
        return Err(PluginFieldError::TooManySettings { found: settings.len() });
    }
    for (key, value) in settings {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_PLUGIN_SETTING_KEY_CHARS
            && key
                .chars()
                .all(|character| matches!(character, 'a'..='z' | '0'..='9' | '-' | '_' | '.'));
        if !key_ok {
            return Err(PluginFieldError::InvalidSettingKey { key: key.clone() });
        }
        if value.len() > MAX_PLUGIN_SETTING_VALUE_BYTES {
            return Err(PluginFieldError::SettingValueTooLong {
                key: key.clone(),
                found_bytes: value.len(),
            });
        }
        if value.chars().any(char::is_control) {
            return Err(PluginFieldError::SettingValueHasControlCharacters { key: key.clone() });
        }
    }
    Ok(())
}

/// The bounds of a granted-host list; the host syntax itself is checked where the hosts are
/// used (the node checks them as egress host patterns before writing).
pub fn validate_granted_hosts(hosts: &[String]) -> Result<(), PluginFieldError> {
    if hosts.len() > MAX_GRANTED_HOSTS {
        return Err(PluginFieldError::TooManyGrantedHosts { found: hosts.len() });
    }
    for host in hosts {
        if host.is_empty() || host.len() > MAX_GRANTED_HOST_CHARS {
            return Err(PluginFieldError::GrantedHostLength {
                host: host.clone(),
                found_chars: host.len(),
            });
        }
        if host
            .chars()
            .any(|character| character.is_whitespace() || character.is_control())
        {
            return Err(PluginFieldError::GrantedHostHasSpace { host: host.clone() });
        }
    }
    Ok(())
}

/// A SHA-256 digest as lowercase hex.
pub fn validate_sha256_hex(digest: &str) -> Result<(), PluginFieldError> {
    if digest.len() == 64
        && digest
            .chars()
            .all(|character| character.is_ascii_digit() || ('a'..='f').contains(&character))
    {
        Ok(())
    } else {
        Err(PluginFieldError::InvalidSha256 {
            digest: digest.to_string(),
        })
    }
}

/// Semver precedence of two plugin versions (`1.10.0` after `1.9.0`, `1.0.0-rc.1` before
/// `1.0.0`); a version that does not parse sorts after those that do, by its text.
pub fn plugin_version_order(left: &str, right: &str) -> std::cmp::Ordering {
    match (semver::Version::parse(left), semver::Version::parse(right)) {
        (Ok(left), Ok(right)) => left.cmp(&right),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => left.cmp(right),
    }
}
