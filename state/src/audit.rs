//! The audit log and per-team limits: the records the state keeps of who changed what, and the
//! limits the state machine holds each team to. Both are judged in `apply` from the log's own
//! time, so every node answers a create the same way and keeps the same entries.

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Most audit entries the cluster keeps; the oldest go first.
pub const MAX_AUDIT_ENTRIES: usize = 100_000;
/// Audit entries older than this (by the time of the entry that records newer ones) go.
pub const MAX_AUDIT_AGE_MS: u64 = 30 * 24 * 3600 * 1000;
/// Most entries one `RecordAudit` command carries.
pub const MAX_AUDIT_ENTRIES_PER_COMMAND: usize = 512;
/// Longest text field of an audit entry (method, key id, user, team, target), in bytes.
pub const MAX_AUDIT_FIELD_BYTES: usize = 128;
/// The window of the creates-per-minute limit.
pub const CREATE_WINDOW_MS: u64 = 60_000;

/// One mutating call: who made it, through which node, on what, and how it ended. It names the
/// target by id only, never a prompt, a follow-up's text or a secret value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Assigned by `apply`, increasing; what a page token resumes after.
    pub sequence: u64,
    /// When the serving node answered the call, by its clock.
    pub at_ms: u64,
    /// The node that served the call.
    pub node: NodeId,
    pub key_id: String,
    pub user: String,
    /// The caller's team.
    pub team: String,
    /// The team the call acted on, when it is not the caller's (the cluster-admin key acting on
    /// a team's agent or key); empty otherwise.
    pub target_team: String,
    /// `Service/Method`, e.g. `AgentService/CreateAgent`.
    pub method: String,
    /// The id the call acted on (the new agent's id for a create); empty when there is none.
    pub target: String,
    /// The gRPC status code the call was answered with (0 is OK).
    pub code: i32,
}

impl AuditEntry {
    /// Whether the entry concerns `team`: made by one of its keys, or acting on its records.
    pub fn concerns_team(&self, team: &str) -> bool {
        self.team == team || self.target_team == team
    }

    /// The first field over [`MAX_AUDIT_FIELD_BYTES`], with its length.
    pub fn oversized_field(&self) -> Option<(&'static str, usize)> {
        [
            ("key_id", &self.key_id),
            ("user", &self.user),
            ("team", &self.team),
            ("target_team", &self.target_team),
            ("method", &self.method),
            ("target", &self.target),
        ]
        .into_iter()
        .find(|(_, value)| value.len() > MAX_AUDIT_FIELD_BYTES)
        .map(|(name, value)| (name, value.len()))
    }
}

/// Limits a team is held to; `None` means no limit of its own (the cluster default applies).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TeamLimits {
    /// Most agents of the team not yet in a terminal status (pending, provisioning, running…).
    pub max_running_agents: Option<u32>,
    /// Most agents the team may create within any [`CREATE_WINDOW_MS`] of log time.
    pub creates_per_minute: Option<u32>,
}

impl TeamLimits {
    /// Each limit from `self` where set, else from `fallback`.
    pub fn or(self, fallback: TeamLimits) -> TeamLimits {
        TeamLimits {
            max_running_agents: self.max_running_agents.or(fallback.max_running_agents),
            creates_per_minute: self.creates_per_minute.or(fallback.creates_per_minute),
        }
    }
}
