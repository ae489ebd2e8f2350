//! Reads that honour acknowledgement (Raft's read index).
//!
//! A node's replica may lag the cluster: a follower that has not yet applied an entry the
//! majority acknowledged would answer "not found" for an agent the client was told exists. A
//! read barrier closes that gap. The leader confirms with a quorum that it still leads and
//! names its commit index at that moment (openraft's `get_read_log_id`); the reading node then
//! waits until its own state machine has applied that index. Whatever it reads afterwards
//! includes every write acknowledged before the read began.
//!
//! The read then runs on the node the client called, not on the leader: forwarding the whole
//! request would send its answer (a page of agents, a watch stream that lasts hours) through
//! the leader, while the barrier costs one small call to the leader and one quorum round, and
//! usually no wait at all since followers apply within a heartbeat.
//!
//! Every wait is bounded by [`READ_DEADLINE_MS`]: a node cut off from a quorum, or one that
//! cannot catch up, says so ([`ReadError`]) rather than answering from a stale state.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::network::{decode, encode};
use crate::replica::{AppliedWait, ForwardError};
use crate::retry::RetryPolicy;
use crate::{NodeId, Replica};

/// How long a read barrier keeps trying (elections, a lagging state machine) before it fails.
pub const READ_DEADLINE_MS: u64 = 5_000;
/// Longest wait for one answer of the leader to a read-index request.
const READ_INDEX_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Between attempts while no leader is known or the leader moved; a change of Raft's view ends
/// a wait early.
const READ_RETRY: RetryPolicy = RetryPolicy {
    first_delay_ms: 20,
    max_delay_ms: 500,
    max_retries: None,
};

/// What a node answers to a read-index request, here or across the wire.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ReadIndexReply {
    /// This node leads, a quorum confirmed it, and a read that sees the state machine at log
    /// `index` or later sees every write acknowledged before the request.
    Index(u64),
    /// This node does not lead; `leader` is the one it knows, if any.
    NotLeader { leader: Option<NodeId> },
    /// This node leads but could not reach a quorum in time (it may no longer lead).
    NoQuorum(String),
    /// Raft stopped on this node.
    Stopped(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No leader confirmed a read index: no leader elected, or this node cannot reach one.
    #[error("cannot confirm a read with the raft leader within {deadline_ms} ms: {last_error}")]
    Unavailable { deadline_ms: u64, last_error: String },
    /// The leader named an index this node had not applied by the deadline.
    #[error("this node has applied the raft log up to index {applied}, the read needs index {needed}, and it did not catch up within {deadline_ms} ms")]
    Lagging {
        needed: u64,
        applied: u64,
        deadline_ms: u64,
    },
    #[error("raft stopped on this node: {0}")]
    Stopped(String),
}

/// What to do with a read-index answer of this node.
#[derive(Debug, PartialEq, Eq)]
enum NextStep {
    Read(u64),
    AskLeader(NodeId),
    Retry(String),
    Fail(ReadError),
}

/// The step after this node's own answer (`me` is this node's id).
fn after_local_answer(reply: ReadIndexReply, me: NodeId) -> NextStep {
    match reply {
        ReadIndexReply::Index(index) => NextStep::Read(index),
        ReadIndexReply::NotLeader { leader: Some(leader) } if leader != me => NextStep::AskLeader(leader),
        ReadIndexReply::NotLeader { .. } => NextStep::Retry("no leader elected".to_string()),
        ReadIndexReply::NoQuorum(reason) => {
            NextStep::Retry(format!("no quorum confirmed this node's leadership: {reason}"))
        }
        ReadIndexReply::Stopped(reason) => NextStep::Fail(ReadError::Stopped(reason)),
    }
}

/// The step after the leader's answer: anything but an index is tried again (the leader may
/// have moved or be stopping).
fn after_leader_answer(reply: Result<ReadIndexReply, ForwardError>, leader: NodeId) -> NextStep {
    match reply {
        Ok(ReadIndexReply::Index(index)) => NextStep::Read(index),
        Ok(ReadIndexReply::NotLeader { .. }) => NextStep::Retry(format!("node {leader} is no longer leader")),
        Ok(ReadIndexReply::NoQuorum(reason)) => NextStep::Retry(format!("leader {leader} has no quorum: {reason}")),
        Ok(ReadIndexReply::Stopped(reason)) => NextStep::Retry(format!("leader {leader} is stopping: {reason}")),
        Err(error) => NextStep::Retry(format!("asking leader {leader}: {error}")),
    }
}

impl Replica {
    /// Waits until this node's state holds every write the cluster acknowledged before the
    /// call, within [`READ_DEADLINE_MS`]. Returns the index the state was brought to.
    pub async fn read_barrier(&self) -> Result<u64, ReadError> {
        self.read_barrier_within(Duration::from_millis(READ_DEADLINE_MS)).await
    }

    /// [`Replica::read_barrier`] with another bound.
    pub async fn read_barrier_within(&self, within: Duration) -> Result<u64, ReadError> {
        let deadline = Instant::now() + within;
        let deadline_ms = within.as_millis() as u64;
        let needed = self.read_index(deadline, deadline_ms).await?;
        match self.wait_applied(needed, deadline).await {
            AppliedWait::Reached => Ok(needed),
            AppliedWait::Closed => Err(ReadError::Stopped(
                "this node is stopping and no longer catches up".to_string(),
            )),
            AppliedWait::TimedOut => Err(ReadError::Lagging {
                needed,
                applied: self.reader().last_applied_index(),
                deadline_ms,
            }),
        }
    }

    /// The leader's read index: asked here when this node leads, else of the leader, again
    /// through elections until `deadline`.
    async fn read_index(&self, deadline: Instant, deadline_ms: u64) -> Result<u64, ReadError> {
        let mut delays = READ_RETRY.delays();
        loop {
            let step = match after_local_answer(self.read_index_here().await, self.node_id()) {
                NextStep::AskLeader(leader) => {
                    let answer = tokio::time::timeout_at(deadline, self.ask_leader_for_read_index(leader)).await;
                    match answer {
                        Ok(reply) => after_leader_answer(reply, leader),
                        Err(_) => NextStep::Retry(format!("leader {leader} did not answer in time")),
                    }
                }
                other => other,
            };
            let last_error = match step {
                NextStep::Read(index) => return Ok(index),
                NextStep::Fail(error) => return Err(error),
                NextStep::Retry(reason) => reason,
                // The leader's answer never names another node to ask; try again if it did.
                NextStep::AskLeader(leader) => format!("asking leader {leader} led to no index"),
            };
            let delay = delays.next().unwrap_or(Duration::from_millis(READ_RETRY.max_delay_ms));
            if Instant::now() + delay > deadline {
                return Err(ReadError::Unavailable {
                    deadline_ms,
                    last_error,
                });
            }
            let mut metrics = self.raft().metrics();
            let _ = tokio::time::timeout(delay, metrics.changed()).await;
        }
    }

    /// This node's answer to a read-index request: an index only if it leads and a quorum
    /// confirms it (one round of heartbeats).
    pub async fn read_index_here(&self) -> ReadIndexReply {
        match self.raft().get_read_log_id().await {
            Ok((read_log_id, _applied)) => ReadIndexReply::Index(read_log_id.map(|log_id| log_id.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => ReadIndexReply::NotLeader {
                leader: forward.leader_id,
            },
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(error))) => {
                ReadIndexReply::NoQuorum(error.to_string())
            }
            Err(RaftError::Fatal(error)) => ReadIndexReply::Stopped(error.to_string()),
        }
    }

    async fn ask_leader_for_read_index(&self, leader: NodeId) -> Result<ReadIndexReply, ForwardError> {
        let address = self
            .member_address(leader)
            .ok_or(ForwardError::NoLeaderAddress { leader })?;
        let mut client = self
            .peers()
            .client(&address.grpc)
            .map_err(|source| ForwardError::Connect {
                leader,
                address: address.grpc.clone(),
                source,
            })?;
        let mut request = self.peers().request(flotilla_proto::internal::RaftPayload {
            data: Vec::new(),
            ..Default::default()
        });
        request.set_timeout(READ_INDEX_CALL_TIMEOUT);
        let reply = client
            .read_index(request)
            .await
            .map_err(|status| ForwardError::Refused {
                leader,
                code: status.code(),
                message: status.message().to_string(),
            })?;
        decode(&reply.into_inner().data).map_err(|source| ForwardError::Decode { leader, source })
    }

    /// Serves a read-index request from another node (the request carries nothing).
    pub async fn handle_read_index(&self) -> Vec<u8> {
        encode(&self.read_index_here().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, NodeAddr, ReplicaConfig};

    #[test]
    fn a_follower_asks_the_leader_it_knows_and_retries_while_none_is_known() {
        assert_eq!(after_local_answer(ReadIndexReply::Index(7), 1), NextStep::Read(7));
        assert_eq!(
            after_local_answer(ReadIndexReply::NotLeader { leader: Some(2) }, 1),
            NextStep::AskLeader(2)
        );
        // A node that names itself as leader but is not leading yet: wait, do not call itself.
        assert!(matches!(
            after_local_answer(ReadIndexReply::NotLeader { leader: Some(1) }, 1),
            NextStep::Retry(_)
        ));
        assert!(matches!(
            after_local_answer(ReadIndexReply::NotLeader { leader: None }, 1),
            NextStep::Retry(_)
        ));
        assert!(matches!(
            after_local_answer(ReadIndexReply::NoQuorum("1 of 3".to_string()), 1),
            NextStep::Retry(reason) if reason.contains("1 of 3")
        ));
        assert!(matches!(
            after_local_answer(ReadIndexReply::Stopped("shut down".to_string()), 1),
            NextStep::Fail(ReadError::Stopped(_))
        ));
    }

    #[test]
    fn only_an_index_from_the_leader_ends_the_search() {
        assert_eq!(after_leader_answer(Ok(ReadIndexReply::Index(9)), 2), NextStep::Read(9));
        for reply in [
            Ok(ReadIndexReply::NotLeader { leader: Some(3) }),
            Ok(ReadIndexReply::NoQuorum("none".to_string())),
            Ok(ReadIndexReply::Stopped("stopping".to_string())),
            Err(ForwardError::NoLeaderAddress { leader: 2 }),
        ] {
            assert!(
                matches!(after_leader_answer(reply, 2), NextStep::Retry(reason) if reason.contains('2')),
                "a failed answer names the leader and is tried again"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_barrier_on_a_lone_leader_covers_its_writes_and_one_without_a_cluster_fails_in_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let replica = Replica::open(ReplicaConfig::new(1, dir.path().join("lone"), None))
            .await
            .expect("open");
        // Not a member of any cluster yet: no leader can be found, and the wait is bounded.
        let started = std::time::Instant::now();
        let error = replica
            .read_barrier_within(Duration::from_millis(300))
            .await
            .expect_err("no leader");
        assert!(
            matches!(error, ReadError::Unavailable { deadline_ms: 300, .. }),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "gave up after {:?}",
            started.elapsed()
        );

        replica.bootstrap(NodeAddr::default()).await.expect("bootstrap");
        replica.wait_for_leader(Duration::from_secs(10)).await.expect("leader");
        replica
            .write(Command::ReserveNodeId)
            .await
            .expect("a write on the lone leader");
        let written = replica.reader().last_applied_index();
        let index = replica.read_barrier().await.expect("a barrier on the leader");
        assert!(
            index >= written,
            "the barrier's index {index} covers the write at {written}"
        );
        assert!(replica.reader().last_applied_index() >= index);
        replica.shutdown().await;
    }

    /// A node whose server stops taking calls cannot be replicated to any more: a call waiting
    /// for it to apply an index (a forwarded write's, a read's) ends then, not at its deadline,
    /// and so does every wait begun afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_for_this_nodes_apply_end_when_it_stops_taking_calls() {
        let dir = tempfile::tempdir().expect("temp dir");
        let replica = crate::replica::lone_leader(dir.path()).await;
        let beyond = replica.reader().last_applied_index() + 1_000;
        let deadline = Instant::now() + Duration::from_secs(600);
        let waiting = {
            let replica = replica.clone();
            tokio::spawn(async move { replica.wait_applied(beyond, deadline).await })
        };
        let applied = replica.reader().last_applied_index();
        assert_eq!(
            replica
                .wait_applied(applied, Instant::now() + Duration::from_secs(10))
                .await,
            AppliedWait::Reached,
            "an index already applied is reached"
        );
        assert_eq!(
            replica
                .wait_applied(beyond, Instant::now() + Duration::from_millis(50))
                .await,
            AppliedWait::TimedOut
        );
        assert!(!waiting.is_finished(), "the long wait ends only when the node closes");
        replica.close_waits();
        let ended = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the wait ended when the node closed its waits")
            .expect("task");
        assert_eq!(ended, AppliedWait::Closed);
        assert_eq!(
            replica.wait_applied(beyond, deadline).await,
            AppliedWait::Closed,
            "a wait begun after the close ends at once"
        );
        replica.shutdown().await;
    }
}
