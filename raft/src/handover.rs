//! Leadership transfer: a leader that stops cleanly asks its most up-to-date ready follower to
//! campaign at once ("TimeoutNow" in the Raft thesis), so that the cluster has a new leader
//! in about one round of votes instead of after a leader lease plus an election timeout.
//!
//! The openraft in use has no transfer call of its own. The stopping leader first disables its
//! own elections for good (`Replica::declare_stopping`), then sends `TimeoutNow` to a voter;
//! that voter, if it is ready to lead and still follows this leader in this term, starts an
//! election. The old leader grants the vote (its own lease is long past; the other followers'
//! leases are not, so the old leader's vote is the one that makes the majority) and follows.

use std::time::{Duration, Instant};

use flotilla_proto::internal::TimeoutNowRequest;

use crate::replica::{Readiness, Replica};
use crate::NodeId;

/// How long a stopping leader tries to hand leadership over before it stops anyway (the
/// cluster then elects after the lease, as after a crash).
pub const HANDOVER_DEADLINE_MS: u64 = 5_000;
/// How long the leader waits for one asked follower to win before it asks again. A first
/// campaign can lose to the leader's own lease (a leader of less than a lease refuses any
/// vote); the leader it forced to step down then grants the next one at once, so asking again
/// soon beats waiting for the follower's own election timeout.
const HANDOVER_ATTEMPT_MS: u64 = 500;
/// How long the leader waits for an asked follower's log to match its own before it asks
/// anyway.
const CATCH_UP_MS: u64 = 1_000;
/// Bound of one `TimeoutNow` call.
const TIMEOUT_NOW_CALL_MS: u64 = 1_000;

/// Why a node refused to campaign on a leader's request.
#[derive(Debug, thiserror::Error)]
pub enum CampaignRefused {
    #[error("node {node} is not ready to lead: its start-up has not finished")]
    Starting { node: NodeId },
    #[error("node {node} is not ready to lead: it is stopping")]
    Stopping { node: NodeId },
    #[error("node {node} is not a voter and cannot lead")]
    NotVoter { node: NodeId },
    #[error(
        "node {node} does not follow leader {asked_by} in term {term} (it follows {leader:?} in term {current_term})"
    )]
    Stale {
        node: NodeId,
        asked_by: NodeId,
        term: u64,
        leader: Option<NodeId>,
        current_term: u64,
    },
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// What a stopping node's hand-over came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// This node was not the leader: nothing to hand over.
    NotLeader,
    /// `to` leads now, `elapsed` after the hand-over began.
    Handed { to: NodeId, elapsed: Duration },
    /// No follower took over before the deadline; the last reason.
    Failed { last_error: String },
}

impl Replica {
    /// Starts an election at once, when the leader `asked_by` of `term` asks (it is stopping).
    /// Refused unless this node is ready to lead, a voter, and follows that leader in that term.
    pub async fn campaign_on_request(&self, asked_by: NodeId, term: u64) -> Result<(), CampaignRefused> {
        let node = self.node_id();
        match self.readiness() {
            Readiness::Ready => {}
            Readiness::Starting => return Err(CampaignRefused::Starting { node }),
            Readiness::Stopping => return Err(CampaignRefused::Stopping { node }),
        }
        if !self.voter_ids().contains(&node) {
            return Err(CampaignRefused::NotVoter { node });
        }
        let (leader, current_term) = {
            let metrics = self.raft().metrics();
            let metrics = metrics.borrow();
            (metrics.current_leader, metrics.current_term)
        };
        // The asking node leads this term, or led it and stepped down for this node's campaign.
        if !(leader == Some(asked_by) || leader.is_none()) || current_term != term {
            return Err(CampaignRefused::Stale {
                node,
                asked_by,
                term,
                leader,
                current_term,
            });
        }
        tracing::info!(asked_by, term, "the stopping leader asked this node to campaign");
        self.raft()
            .trigger()
            .elect()
            .await
            .map_err(|error| CampaignRefused::Fatal(error.to_string()))
    }

    /// Stops this node from ever campaigning again and, if it leads, hands leadership to a
    /// follower: the most up-to-date voters first, each given one election's time, until
    /// [`HANDOVER_DEADLINE_MS`].
    pub async fn hand_over_leadership(&self) -> Handover {
        self.declare_stopping();
        if !self.is_leader() {
            return Handover::NotLeader;
        }
        let started = Instant::now();
        let deadline = started + Duration::from_millis(HANDOVER_DEADLINE_MS);
        self.hold_writes(true);
        let handover = self.hand_over_until(started, deadline).await;
        // Handed over: held writes now go to the new leader. Not handed over: this node still
        // leads, and takes writes again while it stops.
        self.hold_writes(false);
        handover
    }

    async fn hand_over_until(&self, started: Instant, deadline: Instant) -> Handover {
        let mut last_error = "no other voter".to_string();
        while Instant::now() < deadline {
            let candidates = self.handover_candidates();
            if candidates.is_empty() {
                break;
            }
            for candidate in candidates {
                if let Some(to) = self.other_leader() {
                    return Handover::Handed {
                        to,
                        elapsed: started.elapsed(),
                    };
                }
                if Instant::now() >= deadline {
                    break;
                }
                let caught_up_by = deadline.min(Instant::now() + Duration::from_millis(CATCH_UP_MS));
                self.wait_no_write_in_flight(caught_up_by).await;
                let caught_up = self.wait_caught_up(candidate, caught_up_by).await;
                let asked = self.ask_to_campaign(candidate).await;
                tracing::info!(
                    candidate,
                    caught_up,
                    answer = ?asked,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "asked a follower to take over leadership"
                );
                match asked {
                    Ok(()) => {
                        let until = deadline.min(Instant::now() + Duration::from_millis(HANDOVER_ATTEMPT_MS));
                        if let Some(to) = self.wait_for_other_leader(until).await {
                            return Handover::Handed {
                                to,
                                elapsed: started.elapsed(),
                            };
                        }
                        last_error = format!("node {candidate} campaigned but did not win in time");
                    }
                    Err(error) => last_error = format!("node {candidate}: {error}"),
                }
            }
            // Every candidate refused (not ready yet, or a term moved): try again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match self.other_leader() {
            Some(to) => Handover::Handed {
                to,
                elapsed: started.elapsed(),
            },
            None => Handover::Failed { last_error },
        }
    }

    /// The other voters, those whose log matches the most of this leader's first: they can
    /// win a vote (a voter refuses a candidate with a shorter log).
    fn handover_candidates(&self) -> Vec<NodeId> {
        let me = self.node_id();
        let voters = self.voter_ids();
        let matched: std::collections::BTreeMap<NodeId, u64> = {
            let metrics = self.raft().metrics();
            let metrics = metrics.borrow();
            metrics
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .map(|(node, log_id)| (*node, log_id.map(|log_id| log_id.index).unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut candidates: Vec<NodeId> = voters.into_iter().filter(|node| *node != me).collect();
        candidates.sort_by_key(|node| std::cmp::Reverse(matched.get(node).copied().unwrap_or(0)));
        candidates
    }

    async fn ask_to_campaign(&self, candidate: NodeId) -> Result<(), String> {
        let term = self.raft().metrics().borrow().current_term;
        let address = self
            .member_address(candidate)
            .ok_or_else(|| format!("node {candidate} has no known address"))?;
        let mut client = self
            .peers()
            .client(&address.grpc)
            .map_err(|error| format!("cannot connect to {}: {error}", address.grpc))?;
        let mut request = self.peers().request(TimeoutNowRequest {
            leader_id: self.node_id(),
            term,
        });
        request.set_timeout(Duration::from_millis(TIMEOUT_NOW_CALL_MS));
        client
            .timeout_now(request)
            .await
            .map(|_| ())
            .map_err(|status| status.message().to_string())
    }

    /// A leader other than this node, if this node knows one.
    fn other_leader(&self) -> Option<NodeId> {
        let me = self.node_id();
        let leader = self.raft().metrics().borrow().current_leader;
        leader.filter(|leader| *leader != me)
    }

    /// Waits (polling, bounded by `until`) until the writes proposed before the hold are
    /// answered: after that this leader's log grows no more.
    async fn wait_no_write_in_flight(&self, until: Instant) {
        while self.writes_in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `candidate` holds this leader's whole log (true), or `until` (false).
    async fn wait_caught_up(&self, candidate: NodeId, until: Instant) -> bool {
        let mut metrics = self.raft().metrics();
        loop {
            let (leading, caught_up) = {
                let metrics = metrics.borrow();
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(&candidate).copied().flatten())
                    .map(|log_id| log_id.index);
                (
                    metrics.replication.is_some(),
                    matched.is_some() && matched >= metrics.last_log_index,
                )
            };
            // No longer leading: nothing more to replicate, and no progress to wait for.
            if caught_up || !leading {
                return caught_up;
            }
            let Some(remaining) = until.checked_duration_since(Instant::now()) else {
                return false;
            };
            if !matches!(tokio::time::timeout(remaining, metrics.changed()).await, Ok(Ok(()))) {
                return false;
            }
        }
    }

    async fn wait_for_other_leader(&self, until: Instant) -> Option<NodeId> {
        let mut metrics = self.raft().metrics();
        loop {
            if let Some(leader) = self.other_leader() {
                return Some(leader);
            }
            let remaining = until.checked_duration_since(Instant::now())?;
            // Past the time, or Raft stopped: no leader to report.
            if !matches!(tokio::time::timeout(remaining, metrics.changed()).await, Ok(Ok(()))) {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::ServerState;

    use super::CampaignRefused;
    use crate::replica::{Readiness, Replica, ReplicaConfig};
    use crate::NodeAddr;

    /// Opens the replica, waiting (bounded) for an earlier one's tasks to let go of the store.
    async fn open(dir: &std::path::Path) -> Replica {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Replica::open(ReplicaConfig::new(1, dir.to_path_buf(), None)).await {
                Ok(replica) => return replica,
                Err(error) if std::time::Instant::now() < deadline => {
                    eprintln!("store not free yet: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot open the replica: {error}"),
            }
        }
    }

    fn state(replica: &Replica) -> ServerState {
        replica.raft().metrics().borrow().state
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_leader_follows_until_it_is_ready_then_leads() {
        let dir = tempfile::tempdir().unwrap();
        let replica = open(dir.path()).await;
        replica.declare_ready();
        replica.bootstrap(NodeAddr::default()).await.unwrap();
        assert_eq!(replica.wait_for_leader(Duration::from_secs(10)).await, Some(1));
        replica.shutdown().await;
        drop(replica);

        // Its stored vote is its own committed one: openraft alone would lead again at once.
        let replica = open(dir.path()).await;
        assert_eq!(replica.readiness(), Readiness::Starting);
        replica
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(|metrics| metrics.current_term >= 1, "the stored vote loaded")
            .await
            .unwrap();
        assert_ne!(state(&replica), ServerState::Leader, "led again before it was ready");
        assert!(matches!(
            replica.campaign_on_request(2, 1).await,
            Err(CampaignRefused::Starting { node: 1 })
        ));
        replica.declare_ready();
        assert_eq!(replica.wait_for_leader(Duration::from_secs(10)).await, Some(1));
        assert!(replica.is_leader());

        // A stopping node does not campaign again, whoever asks.
        assert_eq!(
            replica.hand_over_leadership().await,
            super::Handover::Failed {
                last_error: "no other voter".to_string()
            }
        );
        assert!(matches!(
            replica.campaign_on_request(1, 2).await,
            Err(CampaignRefused::Stopping { node: 1 })
        ));
        replica.shutdown().await;
    }
}
