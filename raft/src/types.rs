//! The records of the replicated state: agents, nodes, events and tokens.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

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

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    pub spec: AgentSpec,
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
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Member,
}

/// An API token; only its SHA-256 is replicated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub sha256_hex: String,
    pub name: String,
    pub role: Role,
    pub team: String,
    pub created_at_ms: u64,
}
