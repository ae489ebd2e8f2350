//! Recording mutating calls in the audit log. The [`super::auth::Authenticated`] wrapper sees
//! every public call: for the methods [`mutates`] names it records the caller, the method, the
//! target a handler named with [`note_target`], and the gRPC code the call was answered with.
//! Entries go to an [`AuditRecorder`], which writes them through Raft in batches, one
//! `RecordAudit` at a time, so the log costs one extra log entry per Raft round-trip rather than
//! one per call (see `docs/architecture.md`, "Audit log").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_raft::audit::{MAX_AUDIT_ENTRIES_PER_COMMAND, MAX_AUDIT_FIELD_BYTES};
use flotilla_raft::{AuditEntry, Command, Replica};
use tonic::codegen::http;
use tonic::Request;

use super::authz::{permission_of, Permission, Principal};

/// Entries waiting to be written on one node. A full queue holds the calls that would add to
/// it until the writer catches up: calls are slowed, never left out of the log.
pub const AUDIT_QUEUE_ENTRIES: usize = 4096;
/// How long the writer gathers entries after the first of a batch before writing them: what
/// keeps the audit to a few commands per second under load rather than one per call.
pub const AUDIT_BATCH_DELAY: Duration = Duration::from_millis(50);
/// Waits between attempts at writing a batch the cluster did not take (no quorum).
const AUDIT_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Whether a call of `path` changes something and so is audited: a method whose permission
/// allows writing, except the reads among them (`Get…`, `List…`, `Watch…`, `Search…`: the
/// admin and cluster-admin reads share their writes' permission).
pub fn mutates(path: &str) -> bool {
    let Some(permission) = permission_of(path) else {
        return false;
    };
    if matches!(permission, Permission::AnyKey | Permission::ReadAgents) {
        return false;
    }
    let method = path.rsplit('/').next().unwrap_or_default();
    !["Get", "List", "Watch", "Search"]
        .iter()
        .any(|read| method.starts_with(read))
}

/// What a handler says it acted on, for the wrapper to record.
#[derive(Clone, Default)]
pub struct AuditNote {
    inner: Arc<Mutex<NoteFields>>,
}

#[derive(Clone, Default)]
struct NoteFields {
    target: String,
    target_team: String,
}

impl AuditNote {
    /// Names the call's target: an id, never a prompt, a text or a secret. `target_team` is the
    /// team the target belongs to, given only once the caller is known to see it (so an entry
    /// never reveals another team's id to a team admin reading the log).
    pub fn set(&self, target: impl Into<String>, target_team: Option<&str>) {
        let mut fields = self.inner.lock().expect("audit note lock poisoned");
        fields.target = target.into();
        if let Some(team) = target_team {
            fields.target_team = team.to_string();
        }
    }

    fn take(&self) -> NoteFields {
        self.inner.lock().expect("audit note lock poisoned").clone()
    }
}

/// The note of an audited call (a fresh, unrecorded one for a call the wrapper did not audit).
pub fn note_of<T>(request: &Request<T>) -> AuditNote {
    request.extensions().get::<AuditNote>().cloned().unwrap_or_default()
}

/// Names the target of the call `request` belongs to; see [`AuditNote::set`].
pub fn note_target<T>(request: &Request<T>, target: impl Into<String>, target_team: Option<&str>) {
    note_of(request).set(target, target_team);
}

/// The gRPC code a response carries in its headers (a refusal); OK when it has none, as a
/// successful unary or streaming call's status comes in the trailers.
pub fn response_code(response: &http::Response<tonic::body::Body>) -> i32 {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// Takes audit entries and writes them through Raft in batches.
#[derive(Clone)]
pub struct AuditRecorder {
    node: u64,
    queue: tokio::sync::mpsc::Sender<AuditEntry>,
}

impl AuditRecorder {
    /// Starts the writer task of this node.
    pub fn start(replica: Replica) -> AuditRecorder {
        let (queue, queued) = tokio::sync::mpsc::channel(AUDIT_QUEUE_ENTRIES);
        let node = replica.node_id();
        tokio::spawn(write_batches(replica, queued));
        AuditRecorder { node, queue }
    }

    /// Queues the entry of one call; waits while the queue is full.
    pub async fn record(&self, principal: &Principal, path: &str, note: &AuditNote, code: i32) {
        let fields = note.take();
        let target_team = if fields.target_team == principal.team {
            String::new()
        } else {
            fields.target_team
        };
        let entry = AuditEntry {
            sequence: 0,
            at_ms: flotilla_raft::command::now_ms(),
            node: self.node,
            key_id: bounded(&principal.key_id),
            user: bounded(&principal.user),
            team: bounded(&principal.team),
            target_team: bounded(&target_team),
            method: bounded(path.trim_start_matches("/flotilla.v1.")),
            target: bounded(&fields.target),
            code,
        };
        if self.queue.send(entry).await.is_err() {
            tracing::error!(method = path, "the audit writer has stopped; an audit entry is lost");
        }
    }
}

/// `text` cut to [`MAX_AUDIT_FIELD_BYTES`] on a character boundary.
fn bounded(text: &str) -> String {
    let mut end = text.len().min(MAX_AUDIT_FIELD_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Writes what queued within [`AUDIT_BATCH_DELAY`] of a batch's first entry (and while the
/// previous batch was in flight) as one `RecordAudit`; retries a
/// batch the cluster did not take until it does (an entry may then be written twice, never
/// lost while the node runs).
async fn write_batches(replica: Replica, mut queued: tokio::sync::mpsc::Receiver<AuditEntry>) {
    while let Some(first) = queued.recv().await {
        let mut entries = vec![first];
        let deadline = tokio::time::Instant::now() + AUDIT_BATCH_DELAY;
        while entries.len() < MAX_AUDIT_ENTRIES_PER_COMMAND {
            match tokio::time::timeout_at(deadline, queued.recv()).await {
                Ok(Some(entry)) => entries.push(entry),
                Ok(None) | Err(_) => break,
            }
        }
        loop {
            match replica
                .write(Command::RecordAudit {
                    entries: entries.clone(),
                })
                .await
            {
                Ok(_) => break,
                Err(flotilla_raft::WriteError::Refused(error)) => {
                    tracing::error!(%error, count = entries.len(), "the cluster refused audit entries; they are lost");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, count = entries.len(), "audit entries not written yet; retrying");
                    tokio::time::sleep(AUDIT_RETRY_DELAY).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_audited_and_reads_are_not() {
        for path in [
            "/flotilla.v1.AgentService/CreateAgent",
            "/flotilla.v1.AgentService/SendFollowUp",
            "/flotilla.v1.AgentService/StopAgent",
            "/flotilla.v1.AgentService/Attach",
            "/flotilla.v1.AccessService/CreateKey",
            "/flotilla.v1.AccessService/RevokeKey",
            "/flotilla.v1.AccessService/CreateTeam",
            "/flotilla.v1.ClusterService/DrainNode",
            "/flotilla.v1.AdminService/UploadPlugin",
            "/flotilla.v1.LimitsService/SetTeamLimits",
        ] {
            assert!(mutates(path), "{path} should be audited");
        }
        for path in [
            "/flotilla.v1.AgentService/GetAgent",
            "/flotilla.v1.AgentService/ListAgents",
            "/flotilla.v1.AgentService/WatchAgent",
            "/flotilla.v1.AccessService/ListKeys",
            "/flotilla.v1.AccessService/GetKeyInfo",
            "/flotilla.v1.ClusterService/GetCluster",
            "/flotilla.v1.AdminService/ListPlugins",
            "/flotilla.v1.AuditService/ListAuditEvents",
            "/flotilla.v1.LimitsService/GetTeamLimits",
            "/flotilla.v1.AgentService/NoSuchMethod",
        ] {
            assert!(!mutates(path), "{path} should not be audited");
        }
    }

    #[test]
    fn fields_are_cut_on_a_character_boundary() {
        let long = "é".repeat(100);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_AUDIT_FIELD_BYTES);
        assert_eq!(cut.len(), MAX_AUDIT_FIELD_BYTES);
    }
}
