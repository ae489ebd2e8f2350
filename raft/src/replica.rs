//! The node's handle on the replicated state: open it, read it, write commands to it (wherever
//! the leader is), change its membership, and serve the Raft messages peers send.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::internal::RaftPayload;
use openraft::error::{ClientWriteError, InstallSnapshotError, RaftError};
use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use openraft::storage::RaftLogStorage;
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy, Vote};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::command::{ApplyError, Command, Request, Response};
use crate::forward_stream::Forwarded;
use crate::network::{decode, encode, NetworkFactory, Peers};
use crate::retry::RetryPolicy;
use crate::store::{self, StateReader};
use crate::write_queue::{Entry, PendingWrite, WriteQueue};
use crate::{ApplyResult, NodeAddr, NodeId, Raft, TypeConfig};

/// How long a write keeps trying (leader elections, forwarding) before it gives up.
pub const WRITE_DEADLINE_MS: u64 = 10_000;
/// Longest a forwarded write waits for the leader's answer before it is tried again.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Between attempts of a write while no leader is known or the leader moved: 20 ms doubling to
/// 500 ms, until [`WRITE_DEADLINE_MS`]. A change of Raft's view ends a wait early.
const WRITE_RETRY: RetryPolicy = RetryPolicy {
    first_delay_ms: 20,
    max_delay_ms: 500,
    max_retries: None,
};
pub use crate::write_queue::{MAX_BATCHES_IN_FLIGHT, MAX_BATCH_BYTES, MAX_BATCH_COMMANDS, WRITE_QUEUE_CAPACITY};
/// Log entries per replication message (each at most `MAX_BATCH_BYTES`).
pub const MAX_ENTRIES_PER_APPEND: u64 = 32;

/// How often a leader sends an empty append to a follower it has nothing else for, by default.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 250;

/// Log entries between two snapshots, by default: etcd's default `--snapshot-count`. A snapshot
/// reads, encodes and writes the whole state (about 150 MB for 120,000 agents with 1 KB
/// prompts), so its cost grows with the state, not with the entries since the last one; at
/// 20,000 a three-node cluster under 256 clients used 405 µs of CPU per write once the state had
/// grown, 130 µs at 100,000 (docs/performance.md, "Snapshots off the state's lock"). The log it
/// lets grow is on disk; a start re-applies only what the state had not flushed to a table (after
/// a crash, at most a memtable of records; after a clean stop, nothing).
pub const DEFAULT_SNAPSHOT_AFTER_LOGS: u64 = 100_000;
/// The least election timeout by default (see [`election_timeout_max_ms`]).
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 1_000;

/// The longest election timeout for a least one of `min_ms`: a follower campaigns after a
/// random time between the two.
pub fn election_timeout_max_ms(min_ms: u64) -> u64 {
    2 * min_ms
}

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// The node's certificate for calling other nodes; `None` for a replica that never does.
    pub tls: Option<crate::tls::NodeTls>,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_after_logs: u64,
    /// Entries kept behind a snapshot, for followers that lag a little.
    pub logs_kept_after_snapshot: u64,
    /// The state format this node reads and writes ([`crate::STATE_FORMAT_VERSION`]; a test may
    /// claim another).
    pub state_format_version: u32,
}

impl ReplicaConfig {
    pub fn new(node_id: NodeId, data_dir: PathBuf, tls: Option<crate::tls::NodeTls>) -> ReplicaConfig {
        ReplicaConfig {
            node_id,
            data_dir,
            tls,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: election_timeout_max_ms(DEFAULT_ELECTION_TIMEOUT_MIN_MS),
            snapshot_after_logs: DEFAULT_SNAPSHOT_AFTER_LOGS,
            logs_kept_after_snapshot: 2_000,
            state_format_version: crate::STATE_FORMAT_VERSION,
        }
    }

    /// Sets the heartbeat and the least election timeout (the longest follows from it).
    pub fn set_timing(&mut self, heartbeat_interval_ms: u64, election_timeout_min_ms: u64) {
        self.heartbeat_interval_ms = heartbeat_interval_ms;
        self.election_timeout_min_ms = election_timeout_min_ms;
        self.election_timeout_max_ms = election_timeout_max_ms(election_timeout_min_ms);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Open(#[from] store::OpenError),
    #[error(transparent)]
    Format(#[from] store::format::FormatError),
    #[error("invalid raft configuration: {0}")]
    Config(String),
    #[error("raft failed to start: {0}")]
    Start(String),
    #[error("membership change failed: {0}")]
    Membership(String),
    #[error("cannot read or write this node's raft vote on start: {0}")]
    Vote(String),
    /// This node stopped being the leader during the change; ask the leader.
    #[error("this node is not the raft leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
}

fn membership_error(error: RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>) -> ReplicaError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => ReplicaError::NotLeader {
            leader: forward.leader_id,
        },
        other => ReplicaError::Membership(other.to_string()),
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum WriteError {
    /// The state machine refused the command; nothing changed.
    #[error(transparent)]
    Refused(#[from] ApplyError),
    /// No leader answered before the deadline; the write may or may not have been applied.
    #[error("no raft leader accepted the write within {deadline_ms} ms: {last_error}")]
    Unavailable { deadline_ms: u64, last_error: String },
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// Why a write could not be forwarded to the leader (the write is then retried until the
/// deadline).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("leader {leader} has no known address")]
    NoLeaderAddress { leader: NodeId },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        leader: NodeId,
        address: String,
        source: crate::network::PeerError,
    },
    #[error("{code}: {message}")]
    Refused {
        leader: NodeId,
        code: tonic::Code,
        message: String,
    },
    #[error("undecodable answer: {source}")]
    Decode { leader: NodeId, source: postcard::Error },
}

/// A Raft message or forwarded write from a peer that does not decode as what its call carries.
#[derive(Debug, thiserror::Error)]
#[error("undecodable {what}: {source}")]
pub struct UndecodablePayload {
    /// What the call carries: `append-entries`, `vote`, `install-snapshot`, `forwarded write`.
    pub what: &'static str,
    pub source: postcard::Error,
}

fn decode_payload<T: for<'de> Deserialize<'de>>(what: &'static str, payload: &[u8]) -> Result<T, UndecodablePayload> {
    decode(payload).map_err(|source| UndecodablePayload { what, source })
}

/// A command's answer and the log index it was applied at.
pub(crate) struct Applied {
    pub(crate) result: ApplyResult,
    pub(crate) index: u64,
}

impl Applied {
    /// The answer as a write's caller sees it: a refusal is an error.
    fn into_response(self) -> Result<Response, WriteError> {
        self.result.map_err(WriteError::Refused)
    }
}

/// How a write that failed on the leader is told to the follower that forwarded it: a refusal
/// keeps its reason; no leader within the deadline lets the follower go on retrying until its
/// own; a stopped Raft fails the forwarded write as a whole. (Some commands of a forwarded
/// batch may have been applied then, as with any write that fails late.)
fn forward_failure(error: WriteError) -> ForwardReply {
    match error {
        WriteError::Refused(refused) => ForwardReply::Applied {
            result: Err(refused),
            index: 0,
        },
        WriteError::Unavailable { .. } => ForwardReply::NotLeader { leader: None },
        WriteError::Fatal(error) => ForwardReply::Failed(error),
    }
}

/// What a forwarded write answers across the wire.
#[derive(Serialize, Deserialize, Debug)]
pub enum ForwardReply {
    /// Applied on the leader at log `index`; the forwarding node waits until its own state
    /// machine has applied that index before it answers its caller.
    Applied {
        result: ApplyResult,
        index: u64,
    },
    NotLeader {
        leader: Option<NodeId>,
    },
    Failed(String),
}

#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    node_id: NodeId,
    raft: Raft,
    reader: StateReader,
    peers: Peers,
    writes: WriteQueue,
    readiness: tokio::sync::watch::Sender<Readiness>,
    /// Set while a stopping leader hands over: it proposes nothing new, so that the follower it
    /// asks to campaign holds its whole log (a voter refuses a candidate with a shorter one).
    holding_writes: std::sync::atomic::AtomicBool,
    /// Writes proposed on this node and not answered yet (a hand-over waits for them).
    writes_in_flight: std::sync::atomic::AtomicUsize,
    /// Set once this node's server stops taking calls: from then on the leader cannot reach it
    /// to replicate, so no call waits any longer for this node to apply what it needs.
    closing: tokio::sync::watch::Sender<bool>,
    /// The state format this node reads and writes.
    state_format_version: u32,
    /// The log's newest entries with their encodings; where a received append leaves its
    /// entries' bytes for the log to write.
    recent_entries: Arc<crate::store::RecentEntries>,
}

/// How a wait for this node's own apply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AppliedWait {
    Reached,
    TimedOut,
    /// The node stopped, or stops taking calls.
    Closed,
}

/// Whether this node may lead. A node campaigns (on its own election timeout, or when a
/// stopping leader asks it to) only while it is `Ready`; it votes for others in every state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Start-up work the leader role needs is not done (listeners, plugin registry...).
    Starting,
    Ready,
    /// Shutting down: it hands leadership over and never takes it again.
    Stopping,
}

/// A leader this node was in an earlier run is not resumed: openraft restores a node whose
/// stored vote is its own committed one as leader at once, before the node can serve. The vote
/// stays this node's own for that term (never a second vote in one term) but uncommitted, so
/// the node starts as a follower and leads again only by winning an election once ready.
async fn forget_own_leadership(log: &mut store::LogStore, me: NodeId) -> Result<(), ReplicaError> {
    let vote = log
        .read_vote()
        .await
        .map_err(|error| ReplicaError::Vote(error.to_string()))?;
    let Some(vote) = vote else {
        return Ok(());
    };
    if !vote.is_committed() || vote.leader_id().voted_for() != Some(me) {
        return Ok(());
    }
    let uncommitted = Vote::new(vote.leader_id().get_term(), me);
    log.save_vote(&uncommitted)
        .await
        .map_err(|error| ReplicaError::Vote(error.to_string()))?;
    tracing::info!(
        term = vote.leader_id().get_term(),
        "this node led before it stopped; it follows until it is ready and elected"
    );
    Ok(())
}

impl Replica {
    pub async fn open(config: ReplicaConfig) -> Result<Replica, ReplicaError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|error| {
            ReplicaError::Open(store::OpenError::Database {
                dir: config.data_dir.display().to_string(),
                message: error.to_string(),
            })
        })?;
        store::format::check_and_stamp(&config.data_dir, config.state_format_version)?;
        let (mut log, machine) = store::open(&config.data_dir.join("raft"))?;
        let durability = log.durability();
        durability.set_node(config.node_id);
        let recent_entries = log.recent_entries();
        forget_own_leadership(&mut log, config.node_id).await?;
        let raft_config = Config {
            cluster_name: "flotilla".to_string(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_logs),
            max_in_snapshot_log_to_keep: config.logs_kept_after_snapshot,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            max_payload_entries: MAX_ENTRIES_PER_APPEND,
            // No campaign before the node is ready to lead: see `Replica::declare_ready`.
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|error| ReplicaError::Config(error.to_string()))?;
        let peers = Peers::new(config.tls.as_ref());
        let reader = machine.reader();
        let loaded = reader.last_applied_index();
        let started = std::time::Instant::now();
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            NetworkFactory::new(peers.clone(), durability, recent_entries.clone()),
            log,
            machine,
        )
        .await
        .map_err(|error| ReplicaError::Start(error.to_string()))?;
        // openraft re-applies the committed entries after the stored state's applied position
        // before it returns: after a crash, what was applied since the state's last flush.
        let reapplied = reader.last_applied_index().saturating_sub(loaded);
        if reapplied > 0 {
            tracing::info!(
                entries = reapplied,
                from_index = loaded + 1,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "re-applied committed log entries the stored state did not hold yet"
            );
        }
        let inner = Arc::new(Inner {
            node_id: config.node_id,
            raft,
            reader,
            peers,
            writes: WriteQueue::new(),
            readiness: tokio::sync::watch::channel(Readiness::Starting).0,
            holding_writes: std::sync::atomic::AtomicBool::new(false),
            writes_in_flight: std::sync::atomic::AtomicUsize::new(0),
            closing: tokio::sync::watch::channel(false).0,
            state_format_version: config.state_format_version,
            recent_entries,
        });
        Ok(Replica { inner })
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Replica {
        Replica { inner }
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn write_queue(&self) -> &WriteQueue {
        &self.inner.writes
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The state format this node reads and writes (stamped in its data dir at open).
    pub fn state_format_version(&self) -> u32 {
        self.inner.state_format_version
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn reader(&self) -> &StateReader {
        &self.inner.reader
    }

    pub fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    pub fn readiness(&self) -> Readiness {
        *self.inner.readiness.borrow()
    }

    /// Lets this node campaign: called once what the leader role needs is up (both listeners
    /// bound, the start-up work done). Until then it only follows and votes.
    pub fn declare_ready(&self) {
        let changed = self.inner.readiness.send_if_modified(|readiness| {
            let starting = *readiness == Readiness::Starting;
            if starting {
                *readiness = Readiness::Ready;
            }
            starting
        });
        if changed {
            self.inner.raft.runtime_config().elect(true);
        }
    }

    /// Stops this node from campaigning again, for good: the first step of a clean stop.
    pub fn declare_stopping(&self) {
        self.inner.readiness.send_replace(Readiness::Stopping);
        self.inner.raft.runtime_config().elect(false);
    }

    pub fn current_leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.inner.raft.metrics();
        let leader = {
            let metrics = metrics.borrow();
            metrics.state == ServerState::Leader && metrics.current_leader == Some(self.inner.node_id)
        };
        leader
    }

    /// The address of a member, from the current membership.
    pub fn member_address(&self, node: NodeId) -> Option<NodeAddr> {
        let metrics = self.inner.raft.metrics();
        let address = metrics
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .find(|(id, _)| **id == node)
            .map(|(_, address)| address.clone());
        address
    }

    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        let metrics = self.inner.raft.metrics();
        let voters = metrics.borrow().membership_config.membership().voter_ids().collect();
        voters
    }

    pub fn member_ids(&self) -> BTreeSet<NodeId> {
        let metrics = self.inner.raft.metrics();
        let members = metrics
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        members
    }

    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
    }

    /// Makes this node a one-member cluster. Called once, by the first node.
    pub async fn bootstrap(&self, address: NodeAddr) -> Result<(), ReplicaError> {
        let mut members = std::collections::BTreeMap::new();
        members.insert(self.inner.node_id, address);
        self.inner
            .raft
            .initialize(members)
            .await
            .map_err(|error| ReplicaError::Start(error.to_string()))
    }

    /// Waits until some node is leader, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut metrics = self.inner.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(leader) = metrics.borrow().current_leader {
                return Some(leader);
            }
            if tokio::time::timeout_at(deadline, metrics.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// Writes a command through Raft and returns the state machine's answer once it is
    /// committed and applied. Concurrent writes are grouped into one log entry (group commit:
    /// one append and one fsync for the whole group). A follower forwards the group to the
    /// leader. Retries through elections until [`WRITE_DEADLINE_MS`].
    ///
    /// A write answers only once this node's own state shows it (read-your-writes): a caller
    /// that writes and then reads the replica never sees the state from before its write.
    pub async fn write(&self, command: Command) -> Result<Response, WriteError> {
        self.write_applied(command).await.and_then(Applied::into_response)
    }

    /// [`Self::write`], answering with the log index the command was applied at.
    async fn write_applied(&self, command: Command) -> Result<Applied, WriteError> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(target: "flotilla::trace", "raft.write", command = command.name(), outcome = tracing::field::Empty);
        let result = match self.inner.writes.enter(self, command, &span).await {
            Ok(Entry::Now(_slot, command)) => {
                // A free slot: this write is its own batch, committed in this task. The slot is
                // freed (and whatever queued meanwhile sent) when `_slot` drops.
                let commit = tracing::info_span!(target: "flotilla::trace", parent: &span, "raft.commit", commands = 1);
                self.commit_request(Request::new(command)).instrument(commit).await
            }
            Ok(Entry::Queued(answer)) => answer
                .await
                .map_err(|_| WriteError::Fatal("a queued write was dropped unanswered".to_string()))
                .and_then(|result| result),
            Err(error) => Err(error),
        };
        let outcome = match &result {
            Ok(Applied { result: Ok(_), .. }) => "applied",
            Ok(Applied { result: Err(_), .. }) | Err(WriteError::Refused(_)) => "refused",
            Err(_) => "failed",
        };
        span.record("outcome", outcome);
        crate::metrics::record_write(outcome, started.elapsed());
        result
    }

    pub(crate) async fn commit_batch(&self, batch: Vec<PendingWrite>) {
        // Traced under the first write's span; the others' spans are linked to it.
        let span = match batch.first() {
            Some(first) => {
                tracing::info_span!(target: "flotilla::trace", parent: &first.span, "raft.commit", commands = batch.len())
            }
            None => return,
        };
        for write in batch.iter().skip(1) {
            span.follows_from(&write.span);
        }
        self.commit_batch_in_span(batch).instrument(span).await
    }

    async fn commit_batch_in_span(&self, mut batch: Vec<PendingWrite>) {
        if batch.len() == 1 {
            let write = batch.pop().expect("one write");
            let result = self.commit_request(Request::new(write.command)).await;
            let _ = write.reply.send(result);
            return;
        }
        let (commands, replies): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|write| (write.command, write.reply)).unzip();
        let count = commands.len();
        match self.commit_request(Request::new(Command::Batch { commands })).await {
            Ok(Applied {
                result: Ok(Response::Batch(results)),
                index,
            }) if results.len() == count => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(Applied { result, index }));
                }
            }
            Ok(Applied {
                result: Err(refused), ..
            }) => {
                for reply in replies {
                    let _ = reply.send(Err(WriteError::Refused(refused.clone())));
                }
            }
            Ok(Applied { result: Ok(other), .. }) => {
                let error = WriteError::Fatal(format!("a batch of {count} was answered with {other:?}"));
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }

    pub async fn write_request(&self, request: Request) -> Result<Response, WriteError> {
        self.commit_request(request).await.and_then(Applied::into_response)
    }

    /// [`Self::write_request`], answering with the log index the request was applied at.
    async fn commit_request(&self, request: Request) -> Result<Applied, WriteError> {
        // Shared, not copied: a retry proposes the same request again, and the log entry that
        // carries it is read for each follower.
        let request = Arc::new(request);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(WRITE_DEADLINE_MS);
        let mut delays = WRITE_RETRY.delays();
        let mut last_error;
        loop {
            // A node that knows another leader forwards at once, without asking its own Raft
            // core first (which would only answer "forward to the leader"); a stale view costs
            // one refused forward and a retry.
            let known_other = self.current_leader().filter(|leader| *leader != self.inner.node_id);
            let leader = match known_other {
                Some(leader) => Some(leader),
                None => match self.write_local(request.clone()).await {
                    ForwardReply::Applied { result, index } => return Ok(Applied { result, index }),
                    ForwardReply::Failed(error) => return Err(WriteError::Fatal(error)),
                    ForwardReply::NotLeader { leader } => leader,
                },
            };
            if let Some(leader) = leader.filter(|leader| *leader != self.inner.node_id) {
                match self.forward(leader, &request).await {
                    Ok(ForwardReply::Applied { mut result, index }) => {
                        crate::forwarded_prompts::restore(&request.command, &mut result);
                        self.wait_applied_here(index, deadline).await;
                        return Ok(Applied { result, index });
                    }
                    Ok(ForwardReply::Failed(error)) => return Err(WriteError::Fatal(error)),
                    Ok(ForwardReply::NotLeader { .. }) => last_error = format!("node {leader} is no longer leader"),
                    Err(error) => last_error = format!("forwarding to leader {leader}: {error}"),
                }
            } else {
                last_error = "no leader elected".to_string();
            }
            // The policy never runs out (no retry count); the deadline ends the loop.
            let delay = delays.next().unwrap_or(Duration::from_millis(WRITE_RETRY.max_delay_ms));
            if tokio::time::Instant::now() + delay > deadline {
                return Err(WriteError::Unavailable {
                    deadline_ms: WRITE_DEADLINE_MS,
                    last_error,
                });
            }
            // Waits for the delay or the next change of Raft's view (a leader elected), which
            // comes first, while an election settles.
            let mut metrics = self.inner.raft.metrics();
            let _ = tokio::time::timeout(delay, metrics.changed()).await;
        }
    }

    /// Waits until this node's state machine has applied `index` (a write the leader applied
    /// reaches the followers one heartbeat later at most). Past `deadline` it gives up with a
    /// warning: the write stands, only this node's view of it lags.
    #[tracing::instrument(
        target = "flotilla::trace",
        name = "raft.wait_applied",
        level = "info",
        skip(self, deadline)
    )]
    async fn wait_applied_here(&self, index: u64, deadline: tokio::time::Instant) {
        if !matches!(self.wait_applied(index, deadline).await, AppliedWait::Reached) {
            tracing::warn!(
                index,
                applied = self.inner.reader.last_applied_index(),
                "a forwarded write is not applied on this node yet; reads here may not show it"
            );
        }
    }

    /// Waits until this node has applied `index`, until `deadline`, or until the node closes
    /// (see [`Self::close_waits`]), whichever comes first.
    pub(crate) async fn wait_applied(&self, index: u64, deadline: tokio::time::Instant) -> AppliedWait {
        let mut applied = self.inner.reader.applied_watch();
        let mut closing = self.inner.closing.subscribe();
        tokio::select! {
            reached = tokio::time::timeout_at(deadline, applied.wait_for(|applied| *applied >= index)) => match reached {
                Ok(Ok(_)) => AppliedWait::Reached,
                Ok(Err(_)) => AppliedWait::Closed,
                Err(_) => AppliedWait::TimedOut,
            },
            _ = closing.wait_for(|closing| *closing) => AppliedWait::Closed,
        }
    }

    /// Ends every wait for this node's own apply, now and later: called as the node's server
    /// stops taking calls, since the leader can no longer reach it to replicate what the calls
    /// still open wait for. A forwarded write is answered as it stands (it is committed), and
    /// a read that needed more answers that the node is stopping.
    pub fn close_waits(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Holds (or lets go) the writes proposed on this node: held writes answer "not leader,
    /// none known", and their callers retry until the new leader is known.
    pub(crate) fn hold_writes(&self, hold: bool) {
        self.inner
            .holding_writes
            .store(hold, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes proposed on this node and not answered yet.
    pub(crate) fn writes_in_flight(&self) -> usize {
        self.inner.writes_in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tries the write on this node only.
    pub async fn write_local(&self, request: impl Into<Arc<Request>>) -> ForwardReply {
        use std::sync::atomic::Ordering;
        let request = request.into();
        // Counted before the hold is checked: a hand-over that sets the hold and then sees no
        // write in flight knows that nothing more gets proposed here.
        self.inner.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        let reply = if self.inner.holding_writes.load(Ordering::SeqCst) {
            ForwardReply::NotLeader { leader: None }
        } else {
            self.propose(request).await
        };
        self.inner.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
        reply
    }

    /// Proposes on this node's Raft; answers once the entry is committed and applied here.
    #[tracing::instrument(target = "flotilla::trace", name = "raft.propose", level = "info", skip_all)]
    async fn propose(&self, request: Arc<Request>) -> ForwardReply {
        match self.inner.raft.client_write(request).await {
            Ok(response) => ForwardReply::Applied {
                result: response.data,
                index: response.log_id.index,
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => ForwardReply::NotLeader {
                leader: forward.leader_id,
            },
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
                ForwardReply::Failed(error.to_string())
            }
            Err(RaftError::Fatal(error)) => ForwardReply::Failed(error.to_string()),
        }
    }

    #[tracing::instrument(
        target = "flotilla::trace",
        name = "raft.forward",
        level = "info",
        skip(self, request)
    )]
    async fn forward(&self, leader: NodeId, request: &Request) -> Result<ForwardReply, ForwardError> {
        let address = self
            .member_address(leader)
            .ok_or(ForwardError::NoLeaderAddress { leader })?;
        let mut client = self
            .inner
            .peers
            .client(&address.grpc)
            .map_err(|source| ForwardError::Connect {
                leader,
                address: address.grpc.clone(),
                source,
            })?;
        // A traced write goes as a unary call: its trace context rides in the call's metadata,
        // which a stream's messages do not have.
        if tracing::Span::current().is_disabled() {
            let streamed = self
                .inner
                .peers
                .forwards()
                .forward(&address.grpc, client.clone(), encode(request), FORWARD_TIMEOUT)
                .await;
            match streamed {
                Ok(Forwarded::Answered(reply)) => {
                    return decode(&reply).map_err(|source| ForwardError::Decode { leader, source })
                }
                Ok(Forwarded::Unsupported) => {}
                Err(status) => {
                    return Err(ForwardError::Refused {
                        leader,
                        code: status.code(),
                        message: status.message().to_string(),
                    })
                }
            }
        }
        let mut grpc_request = self.inner.peers.request(RaftPayload {
            data: encode(request),
            id: 0,
            restores_prompts: true,
        });
        grpc_request.set_timeout(FORWARD_TIMEOUT);
        // The leader's spans for this write join the caller's trace.
        crate::trace_context::inject(&tracing::Span::current(), grpc_request.metadata_mut());
        let reply = client
            .forward_write(grpc_request)
            .await
            .map_err(|status| ForwardError::Refused {
                leader,
                code: status.code(),
                message: status.message().to_string(),
            })?;
        decode(&reply.into_inner().data).map_err(|source| ForwardError::Decode { leader, source })
    }

    /// Serves a forwarded write from a follower. When the follower restores prompts, the
    /// records of the agents it created go back without their prompts: the follower has them in
    /// its own request, and they were the largest part of the answer.
    pub async fn handle_forward(&self, payload: &[u8], restores_prompts: bool) -> Result<Vec<u8>, UndecodablePayload> {
        let request: Request = decode_payload("forwarded write", payload)?;
        let creates = restores_prompts.then(|| crate::forwarded_prompts::creates(&request.command));
        let mut reply = self.serve_forwarded(request).await;
        if let (Some(creates), ForwardReply::Applied { result, .. }) = (creates, &mut reply) {
            crate::forwarded_prompts::leave_out(&creates, result);
        }
        Ok(encode(&reply))
    }

    /// A leader's forwarded writes join its own write queue, so that they share log entries with
    /// its own writes and with other followers' (one append, one fsync and one apply for all):
    /// without this every follower's batch was an entry of its own. Anything else (not the
    /// leader, writes held for a hand-over, a request of another command version) is proposed
    /// as it came, and answered as before.
    async fn serve_forwarded(&self, request: Request) -> ForwardReply {
        let leading = self.is_leader() && !self.inner.holding_writes.load(std::sync::atomic::Ordering::SeqCst);
        if !leading || request.version != flotilla_state::command::COMMAND_VERSION {
            return self.write_local(request).await;
        }
        let Request { command, .. } = request;
        let Command::Batch { commands } = command else {
            return match self.write_applied(command).await {
                Ok(Applied { result, index }) => ForwardReply::Applied { result, index },
                Err(error) => forward_failure(error),
            };
        };
        let answers = futures::future::join_all(commands.into_iter().map(|command| self.write_applied(command))).await;
        let mut results = Vec::with_capacity(answers.len());
        let mut highest = 0;
        for answer in answers {
            match answer {
                Ok(Applied { result, index }) => {
                    highest = highest.max(index);
                    results.push(result);
                }
                Err(WriteError::Refused(refused)) => results.push(Err(refused)),
                Err(error) => return forward_failure(error),
            }
        }
        ForwardReply::Applied {
            result: Ok(Response::Batch(results)),
            index: highest,
        }
    }

    /// Takes the payload whole: the entries' bytes the log writes are slices of it.
    pub async fn handle_append(&self, payload: Vec<u8>) -> Result<Vec<u8>, UndecodablePayload> {
        let decoded = crate::append_encoding::decode_append(payload.into()).map_err(|source| UndecodablePayload {
            what: "append-entries",
            source,
        })?;
        // The entries' bytes as they came, for the log to write (see `RecentEntries::received`).
        self.inner.recent_entries.received(decoded.encodings);
        Ok(encode(&self.inner.raft.append_entries(decoded.request).await))
    }

    pub async fn handle_vote(&self, payload: &[u8]) -> Result<Vec<u8>, UndecodablePayload> {
        let request: VoteRequest<NodeId> = decode_payload("vote", payload)?;
        Ok(encode(&self.inner.raft.vote(request).await))
    }

    pub async fn handle_install_snapshot(&self, payload: &[u8]) -> Result<Vec<u8>, UndecodablePayload> {
        let request: InstallSnapshotRequest<TypeConfig> = decode_payload("install-snapshot", payload)?;
        let result: Result<_, RaftError<NodeId, InstallSnapshotError>> =
            self.inner.raft.install_snapshot(request).await;
        Ok(encode(&result))
    }

    /// Adds a node as a learner (waiting until it has caught up), and as a voter while the
    /// cluster has fewer than `max_voters`. Leader only.
    pub async fn add_member(
        &self,
        node: NodeId,
        address: NodeAddr,
        voter: bool,
        max_voters: usize,
    ) -> Result<bool, ReplicaError> {
        let members = self.member_ids();
        if !members.contains(&node) {
            self.inner
                .raft
                .add_learner(node, address.clone(), true)
                .await
                .map_err(membership_error)?;
        } else if self.member_address(node).as_ref() != Some(&address) {
            // A member that restarted on new addresses: update its node record in the membership.
            let mut nodes = std::collections::BTreeMap::new();
            nodes.insert(node, address.clone());
            self.inner
                .raft
                .change_membership(ChangeMembers::SetNodes(nodes), false)
                .await
                .map_err(membership_error)?;
        }
        let voters = self.voter_ids();
        let make_voter = voter || voters.len() < max_voters;
        if make_voter && !voters.contains(&node) {
            let mut add = BTreeSet::new();
            add.insert(node);
            self.inner
                .raft
                .change_membership(ChangeMembers::AddVoterIds(add), false)
                .await
                .map_err(membership_error)?;
            return Ok(true);
        }
        Ok(voters.contains(&node))
    }

    /// Removes a node from the Raft membership (voter or learner). Leader only.
    pub async fn remove_member(&self, node: NodeId) -> Result<(), ReplicaError> {
        let mut ids = BTreeSet::new();
        ids.insert(node);
        if self.voter_ids().contains(&node) {
            self.inner
                .raft
                .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
                .await
                .map_err(membership_error)?;
        }
        if self.member_ids().contains(&node) {
            self.inner
                .raft
                .change_membership(ChangeMembers::RemoveNodes(ids), false)
                .await
                .map_err(membership_error)?;
        }
        Ok(())
    }

    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
        // Applied records are written without RocksDB's log (the Raft log replays them): a
        // clean stop puts them in a table, so that the next start re-applies nothing.
        let reader = self.inner.reader.clone();
        match tokio::task::spawn_blocking(move || reader.flush_state()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not flush the state at stop; the next start re-applies it from the log")
            }
            Err(error) => tracing::warn!(%error, "the state's flush at stop did not finish"),
        }
    }
}

/// A one-member cluster in `dir` that has elected itself, for tests.
#[cfg(test)]
pub(crate) async fn lone_leader(dir: &std::path::Path) -> Replica {
    let replica = Replica::open(ReplicaConfig::new(1, dir.join("lone"), None))
        .await
        .expect("open");
    replica.bootstrap(NodeAddr::default()).await.expect("bootstrap");
    replica.wait_for_leader(Duration::from_secs(10)).await.expect("leader");
    replica
}
