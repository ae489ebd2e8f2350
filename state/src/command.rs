//! Commands written through Raft and their results.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::{
    AgentId, AgentRecord, AgentSpec, AgentStatus, Epoch, EventKind, NodeId, NodeInfo, NodeRecord, PluginFieldError,
    PluginKind, PluginRecord, Role, TeamRecord, Term, TokenRecord, UploadId,
};

/// Largest checkpoint a turn may record (compressed).
pub const MAX_CHECKPOINT_BYTES: usize = 512 * 1024;
/// Most durable events one turn may record.
pub const MAX_EVENTS_PER_TURN: usize = 512;

/// Largest chunk of plugin bytes in one `PutPluginChunk`, so that a chunk fits a Raft batch
/// (`flotilla_raft::replica::MAX_BATCH_BYTES`, 1 MiB) with room to spare.
pub const MAX_PLUGIN_CHUNK_BYTES: usize = 512 * 1024;
/// Largest plugin (one version's whole component).
pub const MAX_PLUGIN_BYTES: usize = 32 * 1024 * 1024;
/// Most chunks one plugin may be split into.
pub const MAX_PLUGIN_CHUNKS: u32 = 1024;
/// Most plugin versions the cluster keeps.
pub const MAX_PLUGINS: usize = 256;
/// Most plugin bytes the cluster holds, committed and staged together. Every node keeps them
/// in memory and in every Raft snapshot, so this bounds what plugins cost a node.
pub const MAX_TOTAL_PLUGIN_BYTES: usize = 256 * 1024 * 1024;
/// Most uploads staged at once.
pub const MAX_STAGED_UPLOADS: usize = 8;
/// An upload with no chunk for this long is stale: a new upload that needs its room drops it
/// (its node died mid-upload, or never got to abort it).
pub const STALE_UPLOAD_MS: u64 = 10 * 60 * 1000;

/// The version of [`Command`] this build writes and understands.
pub const COMMAND_VERSION: u32 = 1;

/// One entry of the replicated log. The proposer stamps the time, so that applying the same
/// entry on every node gives the same state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub version: u32,
    pub at_ms: u64,
    pub command: Command,
}

impl Request {
    /// A request stamped with the proposer's clock: the one place a time enters the state.
    pub fn new(command: Command) -> Request {
        Request::at(now_ms(), command)
    }

    /// A request stamped with `at_ms`, for tests and replays that fix the time.
    pub fn at(at_ms: u64, command: Command) -> Request {
        Request {
            version: COMMAND_VERSION,
            at_ms,
            command,
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "v{} {}", self.version, self.command.name())
    }
}

/// Milliseconds since the Unix epoch by this machine's clock (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AssignOne {
    pub agent: AgentId,
    pub node: NodeId,
    /// Must be exactly one more than the agent's current epoch.
    pub epoch: Epoch,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Several commands in one log entry (group commit); applied in order, each on its own.
    Batch {
        commands: Vec<Command>,
    },
    /// Hands out a node id that no node has had, for a node joining without one.
    ReserveNodeId,
    /// Adds a node or updates what it declares (a restarted node may change its addresses).
    RegisterNode {
        node: NodeId,
        info: NodeInfo,
    },
    RemoveNode {
        node: NodeId,
    },
    SetDraining {
        node: NodeId,
        draining: bool,
    },
    /// A node's lease expired, with no term named: what logs written before
    /// [`Command::NodeDownInTerm`] hold, still applied as it was. Its live agents go back to
    /// pending.
    NodeDown {
        node: NodeId,
    },
    NodeUp {
        node: NodeId,
    },
    CreateAgent {
        id: AgentId,
        spec: Arc<AgentSpec>,
    },
    /// Written by the scheduler; each assignment is checked on its own.
    AssignAgents {
        assignments: Vec<AssignOne>,
    },
    /// Written by the node that owns the agent under `epoch`; refused under any other.
    SetAgentStatus {
        agent: AgentId,
        node: NodeId,
        epoch: Epoch,
        status: AgentStatus,
        reason: String,
        summary: Option<String>,
        error: Option<String>,
    },
    StopAgent {
        agent: AgentId,
        reason: String,
    },
    FollowUp {
        agent: AgentId,
        text: String,
    },
    CreateToken {
        sha256_hex: String,
        name: String,
        role: Role,
        team: String,
    },
    /// A node holds an install layer of a repository; placement prefers such nodes.
    RecordInstallLayer {
        node: NodeId,
        repository: String,
    },
    /// A finished turn of a running agent, written by its owner: the checkpoint to resume from,
    /// the follow-ups it took in, and its durable events. `turn` must be exactly one more than
    /// the turns recorded, so a turn is never applied twice.
    RecordTurn {
        agent: AgentId,
        node: NodeId,
        epoch: Epoch,
        turn: u32,
        follow_ups_delivered: u32,
        head_commit: Option<String>,
        scripted: bool,
        checkpoint: Vec<u8>,
        events: Vec<EventKind>,
    },
    /// The result of pushing the work branch, written by the owner (also after a stop).
    RecordPush {
        agent: AgentId,
        node: NodeId,
        epoch: Epoch,
        branch: String,
        commit: String,
        error: Option<String>,
    },
    /// Stages one chunk of a plugin upload. The first chunk starts the upload; writing an index
    /// again replaces it (a retried write is harmless).
    PutPluginChunk {
        upload: UploadId,
        index: u32,
        bytes: Vec<u8>,
    },
    /// Makes the staged chunks `0..chunk_count` of `upload` a plugin, after checking that their
    /// length and SHA-256 are the ones given. `enable` also disables the name's other versions.
    CommitPlugin {
        upload: UploadId,
        name: String,
        version: String,
        sha256: String,
        kind: PluginKind,
        size_bytes: u64,
        chunk_count: u32,
        granted_hosts: Vec<String>,
        enable: bool,
    },
    /// Drops a staged upload and its chunks.
    AbortUpload {
        upload: UploadId,
    },
    /// Enabling a version disables the other versions of its name: one active version per name.
    SetPluginEnabled {
        name: String,
        version: String,
        enabled: bool,
    },
    /// Replaces the hosts a plugin may reach.
    GrantPluginHosts {
        name: String,
        version: String,
        hosts: Vec<String>,
    },
    /// Deletes a disabled plugin version and its bytes; an enabled one is refused.
    RemovePlugin {
        name: String,
        version: String,
    },
    /// Replaces the settings of every version of plugin `name` (built-in ones included, which
    /// have no record here); an empty map clears them.
    SetPluginSettings {
        name: String,
        settings: std::collections::BTreeMap<String, String>,
    },
    /// The owner of an agent records the outcome of opening its pull request: `pull_request`
    /// when the provider opened it, `error` when it could not.
    RecordPullRequest {
        agent: AgentId,
        node: NodeId,
        epoch: Epoch,
        provider: String,
        pull_request: Option<crate::types::PullRequestRef>,
        error: Option<String>,
    },
    /// The owner sets the record of its work branch at the origin (`pushed_commit`) from
    /// `recorded`, which must be the record as it stands, to `commit`. Two cases only: adopting
    /// a branch the origin held before anything was recorded (`recorded` `None`, `commit` the
    /// origin's, no `displaced`), or reporting `displaced`, a commit the origin held instead of
    /// the recorded one (a fenced owner pushed it), which the owner keeps on its node and moves
    /// back to the recorded commit (`commit` equals `recorded`). Written before the owner touches
    /// the origin, so a stale owner is refused here and leaves the branch alone.
    RecordBranch {
        agent: AgentId,
        node: NodeId,
        epoch: Epoch,
        branch: String,
        recorded: Option<String>,
        commit: Option<String>,
        displaced: Option<String>,
    },
    /// Changes nothing; refused unless `node` owns `agent` under `epoch`. An owner writes it
    /// right before it pushes, so that an owner that lost the agent while it was cut off or
    /// paused learns it through the log and leaves the origin alone.
    CheckOwner {
        agent: AgentId,
        node: NodeId,
        epoch: Epoch,
    },
    /// Written by the leader of `term` when a node's lease expires: its live agents go back to
    /// pending. Refused unless the entry carrying it was appended in `term`, so that a
    /// judgement made by a leader that has since been deposed (paused, partitioned, or
    /// forwarding to its successor) never takes effect.
    NodeDownInTerm {
        node: NodeId,
        term: Term,
    },
    /// Written by the leader of `term` when a node marked down reports again; refused like
    /// [`Command::NodeDownInTerm`] outside `term`.
    NodeUpInTerm {
        node: NodeId,
        term: Term,
    },
    /// Written by a node that stops cleanly, before its machines go: its live agents go back to
    /// pending with the reason, to be placed on other nodes under the next epoch (which fences
    /// whatever this node still writes for them), and it takes no agents until it registers
    /// again (`RegisterNode`, on its next start).
    NodeStopping {
        node: NodeId,
    },
    /// A new team; its name is unique and never reused while it exists.
    CreateTeam {
        name: String,
    },
    /// A new API key of `user` in `team` (which must exist). Only the key's digest is written;
    /// its expiry is the time of this entry plus `expires_in_ms`, so every node agrees on it.
    CreateKey {
        sha256_hex: String,
        team: String,
        user: String,
        role: Role,
        expires_in_ms: Option<u64>,
    },
    /// Removes a key: its next call is refused on every node that applied this entry.
    RevokeKey {
        key_id: String,
    },
    /// Records a single-use join token by the SHA-256 of its secret part, valid until
    /// `expires_at_ms`. Expired tokens are dropped as new ones are minted.
    CreateJoinToken {
        sha256_hex: String,
        expires_at_ms: u64,
    },
    /// Spends a join token: refused if the cluster does not hold it (never minted, or used
    /// already) or if it expired by the entry's time; either way it is gone afterwards.
    ConsumeJoinToken {
        sha256_hex: String,
    },
    /// Sets a secret: only its sealed bytes travel (see [`crate::secrets`]). `by` names the
    /// principal that wrote it.
    SetSecret {
        scope: crate::secrets::SecretScope,
        name: String,
        sealed: crate::secrets::SealedSecret,
        by: String,
    },
    RemoveSecret {
        scope: crate::secrets::SecretScope,
        name: String,
    },
    /// Sets one of a team's settings (see [`crate::settings::SETTING_NAMES`]); applies to the
    /// team's agents created after it.
    SetTeamSetting {
        team: String,
        name: String,
        value: String,
    },
    /// Removes an agent and everything the state holds of it: record, events, checkpoint. A
    /// live agent's owner sees it gone and stops its actor and machine.
    DeleteAgent {
        agent: AgentId,
    },
    /// Removes the ended agents among `agents` whose team's retention has passed at the time of
    /// this entry (at most [`crate::settings::MAX_PURGE_BATCH`]); the others are left alone, so
    /// a stale candidate list purges nothing it should not.
    PurgeEndedAgents {
        agents: Vec<AgentId>,
    },
    /// Appends audit entries (their sequence numbers are assigned here) and drops those past
    /// [`crate::audit::MAX_AUDIT_ENTRIES`] or [`crate::audit::MAX_AUDIT_AGE_MS`].
    RecordAudit {
        entries: Vec<crate::audit::AuditEntry>,
    },
    /// Replaces the limits of `team` (`None`: the cluster default every team without its own
    /// falls back to).
    SetTeamLimits {
        team: Option<String>,
        limits: crate::audit::TeamLimits,
    },
    /// Records the cluster CA: its certificate and its private key sealed under the cluster's
    /// key-encryption key (see [`crate::secrets::ClusterCaRecord`]), so that every member can
    /// sign a joining node's certificate. Set once; the same CA again changes nothing, another
    /// one is refused.
    SetClusterCa {
        record: crate::secrets::ClusterCaRecord,
    },
}

impl Command {
    /// A cheap upper estimate of the command's encoded size, for bounding batches.
    pub fn approximate_bytes(&self) -> usize {
        const FIXED_BYTES: usize = 128;
        FIXED_BYTES
            + match self {
                Command::CreateAgent { spec, .. } => {
                    spec.name.len()
                        + spec.prompt.len()
                        + spec.repository.len()
                        + spec.base_branch.len()
                        + spec.work_branch.len()
                        + spec.model.len()
                        + spec.team.len()
                        + spec.region.as_ref().map_or(0, String::len)
                }
                Command::FollowUp { text, .. } => text.len(),
                Command::SetAgentStatus {
                    reason, summary, error, ..
                } => reason.len() + summary.as_ref().map_or(0, String::len) + error.as_ref().map_or(0, String::len),
                Command::StopAgent { reason, .. } => reason.len(),
                Command::AssignAgents { assignments } => assignments.len() * 48,
                Command::RecordTurn { checkpoint, events, .. } => {
                    checkpoint.len() + events.iter().map(event_bytes).sum::<usize>()
                }
                Command::RecordPush { branch, error, .. } => branch.len() + error.as_ref().map_or(0, String::len),
                Command::Batch { commands } => commands.iter().map(Command::approximate_bytes).sum(),
                Command::PutPluginChunk { bytes, .. } => bytes.len(),
                Command::CommitPlugin {
                    name,
                    version,
                    sha256,
                    granted_hosts,
                    ..
                } => name.len() + version.len() + sha256.len() + granted_hosts.iter().map(String::len).sum::<usize>(),
                Command::SetPluginEnabled { name, version, .. } | Command::RemovePlugin { name, version } => {
                    name.len() + version.len()
                }
                Command::GrantPluginHosts { name, version, hosts } => {
                    name.len() + version.len() + hosts.iter().map(String::len).sum::<usize>()
                }
                Command::SetPluginSettings { name, settings } => {
                    name.len()
                        + settings
                            .iter()
                            .map(|(key, value)| key.len() + value.len() + 8)
                            .sum::<usize>()
                }
                Command::RecordPullRequest {
                    provider,
                    pull_request,
                    error,
                    ..
                } => {
                    provider.len()
                        + pull_request.as_ref().map_or(0, |pull_request| pull_request.url.len())
                        + error.as_ref().map_or(0, String::len)
                }
                Command::RecordBranch {
                    branch,
                    recorded,
                    commit,
                    displaced,
                    ..
                } => {
                    branch.len()
                        + [recorded, commit, displaced]
                            .iter()
                            .map(|text| text.as_ref().map_or(0, String::len))
                            .sum::<usize>()
                }
                Command::SetSecret { name, sealed, by, .. } => {
                    name.len()
                        + sealed.ciphertext.len()
                        + sealed.wrapped_key.len()
                        + sealed.kek_id.len()
                        + by.len()
                        + 64
                }
                Command::SetTeamSetting { team, name, value } => team.len() + name.len() + value.len(),
                Command::PurgeEndedAgents { agents } => agents.len() * 24,
                Command::RecordAudit { entries } => entries.len() * 160,
                Command::SetClusterCa { record } => {
                    record.ca_pem.len() + record.sealed_key.ciphertext.len() + record.sealed_key.wrapped_key.len()
                }
                _ => 0,
            }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Batch { .. } => "batch",
            Command::ReserveNodeId => "reserve-node-id",
            Command::RegisterNode { .. } => "register-node",
            Command::RemoveNode { .. } => "remove-node",
            Command::SetDraining { .. } => "set-draining",
            Command::NodeDown { .. } => "node-down",
            Command::NodeUp { .. } => "node-up",
            Command::CreateAgent { .. } => "create-agent",
            Command::AssignAgents { .. } => "assign-agents",
            Command::SetAgentStatus { .. } => "set-agent-status",
            Command::StopAgent { .. } => "stop-agent",
            Command::FollowUp { .. } => "follow-up",
            Command::CreateToken { .. } => "create-token",
            Command::CreateJoinToken { .. } => "create-join-token",
            Command::ConsumeJoinToken { .. } => "consume-join-token",
            Command::RecordInstallLayer { .. } => "record-install-layer",
            Command::RecordTurn { .. } => "record-turn",
            Command::RecordPush { .. } => "record-push",
            Command::PutPluginChunk { .. } => "put-plugin-chunk",
            Command::CommitPlugin { .. } => "commit-plugin",
            Command::AbortUpload { .. } => "abort-upload",
            Command::SetPluginEnabled { .. } => "set-plugin-enabled",
            Command::GrantPluginHosts { .. } => "grant-plugin-hosts",
            Command::RemovePlugin { .. } => "remove-plugin",
            Command::SetPluginSettings { .. } => "set-plugin-settings",
            Command::RecordPullRequest { .. } => "record-pull-request",
            Command::RecordBranch { .. } => "record-branch",
            Command::CheckOwner { .. } => "check-owner",
            Command::NodeDownInTerm { .. } => "node-down-in-term",
            Command::NodeUpInTerm { .. } => "node-up-in-term",
            Command::NodeStopping { .. } => "node-stopping",
            Command::CreateTeam { .. } => "create-team",
            Command::CreateKey { .. } => "create-key",
            Command::RevokeKey { .. } => "revoke-key",
            Command::SetSecret { .. } => "set-secret",
            Command::RemoveSecret { .. } => "remove-secret",
            Command::SetTeamSetting { .. } => "set-team-setting",
            Command::DeleteAgent { .. } => "delete-agent",
            Command::PurgeEndedAgents { .. } => "purge-ended-agents",
            Command::RecordAudit { .. } => "record-audit",
            Command::SetTeamLimits { .. } => "set-team-limits",
            Command::SetClusterCa { .. } => "set-cluster-ca",
        }
    }
}

fn event_bytes(event: &EventKind) -> usize {
    64 + match event {
        EventKind::StatusChanged { reason, .. } => reason.len(),
        EventKind::FollowUpAccepted { text, .. }
        | EventKind::Log { text }
        | EventKind::AssistantMessage { text, .. }
        | EventKind::Summary { text } => text.len(),
        EventKind::ToolCallFinished {
            call_id,
            tool,
            arguments,
            output,
            ..
        } => call_id.len() + tool.len() + arguments.len() + output.len(),
        EventKind::CommitPushed { branch, commit } => branch.len() + commit.len(),
        EventKind::PushFailed { branch, commit, error } => branch.len() + commit.len() + error.len(),
        EventKind::TurnFinished { .. } => 0,
        EventKind::PullRequestOpened { url, provider, .. } => url.len() + provider.len(),
        EventKind::PullRequestFailed { provider, error } => provider.len() + error.len(),
        EventKind::CommitDisplaced {
            branch,
            commit,
            restored,
            kept,
        } => branch.len() + commit.len() + restored.as_ref().map_or(0, String::len) + kept.len(),
    }
}

impl From<PluginFieldError> for ApplyError {
    fn from(error: PluginFieldError) -> ApplyError {
        ApplyError::Invalid(error.to_string())
    }
}

/// Why the state machine refused a command. A refused command changes nothing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("command version {found} is not supported (this node understands {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("agent {0} not found")]
    AgentNotFound(AgentId),
    #[error("agent {0} already exists")]
    AgentExists(AgentId),
    #[error("node {0} not found")]
    NodeNotFound(NodeId),
    #[error("agent {agent} is {status}: {wanted}")]
    InvalidState {
        agent: AgentId,
        status: AgentStatus,
        wanted: String,
    },
    #[error("agent {agent} is owned under epoch {current:?} on node {owner:?}; write under epoch {found} from node {node} refused")]
    Fenced {
        agent: AgentId,
        owner: Option<NodeId>,
        current: Option<Epoch>,
        found: Epoch,
        node: NodeId,
    },
    #[error("a batch cannot contain another batch")]
    NestedBatch,
    #[error("agent {agent} has {limit} follow-ups already, the most it keeps")]
    TooManyFollowUps { agent: AgentId, limit: usize },
    #[error("agent {agent} has recorded {recorded} turns; turn {found} is out of order")]
    TurnOutOfOrder { agent: AgentId, recorded: u32, found: u32 },
    #[error("agent {agent} has {pending} follow-up(s) not yet taken into a turn")]
    UndeliveredFollowUps { agent: AgentId, pending: u32 },
    #[error("{what} is {found} bytes; the most is {limit}")]
    TooLarge { what: String, found: usize, limit: usize },
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("plugin {name} {version} not found")]
    PluginNotFound { name: String, version: String },
    #[error("plugin {name} {version} already exists; upload it under a new version")]
    PluginExists { name: String, version: String },
    #[error("plugin {name} {version} is enabled; disable it before removing it")]
    PluginEnabled { name: String, version: String },
    #[error("plugin upload {0} is not staged (never started, committed, aborted, or dropped as stale)")]
    UploadNotFound(UploadId),
    #[error("{limit} plugin uploads are in progress, the most at once; wait for one to finish or abort a stale one")]
    TooManyUploads { limit: usize },
    #[error("the cluster holds {limit} plugin versions, the most it keeps; remove one first")]
    TooManyPlugins { limit: usize },
    #[error("agent {agent} has its work branch recorded at {recorded:?}; a write expecting {expected:?} is refused")]
    BranchRecordMoved {
        agent: AgentId,
        recorded: Option<String>,
        expected: Option<String>,
    },
    #[error("{command} of node {node} was judged by the leader of term {judged}, but the entry is in term {entry}: a judgement holds only in its own term")]
    StaleTerm {
        command: String,
        node: NodeId,
        judged: Term,
        entry: Term,
    },
    #[error("team {0} already exists")]
    TeamExists(String),
    #[error("team {0} not found")]
    TeamNotFound(String),
    #[error("key {0} not found")]
    KeyNotFound(String),
    #[error("a key with this digest already exists")]
    KeyExists,
    #[error("the cluster holds {limit} {what}, the most it keeps")]
    TooMany { what: String, limit: usize },
    #[error("the join token is not known to the cluster: it was never minted, or it was used already (a token admits one node)")]
    JoinTokenUnknown,
    #[error("the join token expired at {expired_at_ms} ms since the epoch; mint a new one with `flotilla cluster join-token`")]
    JoinTokenExpired { expired_at_ms: u64 },
    #[error("the cluster holds {limit} unused join tokens, the most it keeps; use or let some expire first")]
    TooManyJoinTokens { limit: usize },
    #[error("secret {name} ({scope}) not found")]
    SecretNotFound { scope: String, name: String },
    /// A team's limit (`max_running_agents`, `creates_per_minute`) refused the command.
    #[error("team {team} is at its limit {limit} = {value}: {detail}")]
    LimitReached {
        team: String,
        limit: String,
        value: u32,
        detail: String,
    },
    /// A removed node's id stays removed: its certificates are refused (see
    /// `ClusterState::removed_nodes`), so it cannot come back under the same id.
    #[error("node {0} was removed from the cluster; its id is not used again (join without --id to get a new one)")]
    NodeRemoved(NodeId),
    #[error("the cluster CA is set already; another CA is refused")]
    ClusterCaSet,
}

/// What an applied command answers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Done,
    Agent(Box<AgentRecord>),
    FollowUp {
        agent: Box<AgentRecord>,
        index: u32,
    },
    /// Assignments that took effect; the others were stale.
    Assigned(Vec<AgentId>),
    Node(NodeRecord),
    NodeId(NodeId),
    Batch(Vec<ApplyResult>),
    /// The agents a node-down sent back to pending.
    Requeued(Vec<AgentId>),
    /// A plugin version as it is after the command (as it was, for a removal).
    Plugin(Box<PluginRecord>),
    /// A plugin name's settings as they are after the command.
    PluginSettings(std::collections::BTreeMap<String, String>),
    /// A team as it is after the command.
    Team(TeamRecord),
    /// A key as it is after the command (as it was, for a revocation).
    Key(Box<TokenRecord>),
    /// A team's settings as they are after the command.
    TeamSettings(Box<crate::settings::TeamSettings>),
    /// The agents a purge removed.
    Purged(Vec<AgentId>),
    /// The sequence numbers the audit entries of a `RecordAudit` were given.
    Audited {
        first: u64,
        count: u64,
    },
    /// A team's limits as set (`team` `None`: the cluster default).
    TeamLimits {
        team: Option<String>,
        limits: crate::audit::TeamLimits,
    },
}

/// `C::R` of the Raft type config: a refusal is a normal, replicated outcome.
pub type ApplyResult = Result<Response, ApplyError>;
