//! The purge of ended agents past their team's retention. Only the leader looks: every
//! [`PURGE_CHECK_INTERVAL`] it lists the ended agents whose retention has passed by its clock and
//! proposes `PurgeEndedAgents` for at most [`flotilla_raft::MAX_PURGE_BATCH`] of them at a time.
//! The state machine judges each again against the time of the entry itself (stamped by the
//! leader when it proposed), so every node removes the same agents whatever its own clock says,
//! and a candidate list gone stale (an agent followed up meanwhile) purges nothing it should not.

use std::time::Duration;

use flotilla_raft::{AgentId, Command, Replica, Response, MAX_PURGE_BATCH};

/// How often the leader looks for agents to purge.
pub const PURGE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Most purge entries written in one look, so a large backlog is spread over several looks
/// instead of filling the log at once.
pub const MAX_PURGE_BATCHES_PER_CHECK: usize = 16;

/// Runs the purge loop for as long as the node runs; it acts only while this node leads.
pub fn spawn_purger(replica: Replica) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(PURGE_CHECK_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if replica.is_leader() {
                purge_once(&replica).await;
            }
        }
    })
}

/// The ended agents due for purging at `now_ms`, oldest first, at most `limit`.
fn candidates(replica: &Replica, now_ms: u64, limit: usize) -> Vec<AgentId> {
    replica.reader().read(|state| {
        state
            .agents
            .values()
            .filter(|agent| {
                agent.status.is_terminal()
                    && state
                        .settings_of(&agent.spec.team)
                        .purge_due(agent.updated_at_ms, now_ms)
            })
            .map(|agent| agent.id)
            .take(limit)
            .collect()
    })
}

async fn purge_once(replica: &Replica) {
    for _ in 0..MAX_PURGE_BATCHES_PER_CHECK {
        let batch = candidates(replica, flotilla_raft::command::now_ms(), MAX_PURGE_BATCH);
        if batch.is_empty() {
            return;
        }
        let asked = batch.len();
        match replica.write(Command::PurgeEndedAgents { agents: batch }).await {
            Ok(Response::Purged(purged)) => {
                if !purged.is_empty() {
                    tracing::info!(count = purged.len(), "purged ended agents past their team's retention");
                }
                // Fewer purged than asked: the rest were not due by the entry's time yet.
                if purged.len() < asked {
                    return;
                }
            }
            Ok(other) => {
                tracing::warn!(answer = ?other, "unexpected answer to purge-ended-agents");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "could not purge ended agents; trying again at the next check");
                return;
            }
        }
    }
}
