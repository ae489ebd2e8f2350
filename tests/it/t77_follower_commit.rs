//! Followers learn of a commit as soon as the leader has synced it, not a heartbeat later.
//!
//! A leader sends its own entries to the followers while it syncs them, and tells no follower
//! of a commit beyond what it has synced itself. When the followers acknowledge an entry before
//! the leader's own sync is done (a leader with the slower disk, made so here with the node's
//! test hook), the commit the leader would announce at once is held back; the announcement
//! then waits for that sync. With a heartbeat of ten seconds, a follower that had to wait for
//! the next heartbeat would lag by seconds; each follower here applies every write within
//! [`WITHOUT_A_HEARTBEAT`], and a write through a follower is answered (after that follower
//! applied it: read-your-writes) just as fast. The writes (teams) start nothing that writes
//! again, so no later entry carries the commit along.

use std::time::{Duration, Instant};

use flotilla_tests::{hold_config, try_get_cluster, wait_for, ClusterOptions, TestCluster};

use crate::t32_ready_and_handover::agreed_leader;

/// The node's test hook that slows down the leader's syncs of its own entries (milliseconds).
const OWN_SYNC_DELAY_HOOK: &str = "FLOTILLA_TEST_HOOK_OWN_SYNC_DELAY_MS";
const OWN_SYNC_DELAY_MS: u64 = 40;
const HEARTBEAT_MS: u64 = 10_000;
/// A follower that waited for a heartbeat would take up to [`HEARTBEAT_MS`]; one told at the
/// leader's sync takes [`OWN_SYNC_DELAY_MS`] and a loopback round trip.
const WITHOUT_A_HEARTBEAT: Duration = Duration::from_secs(3);
const WRITES: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_apply_a_commit_once_the_leader_synced_it_without_waiting_for_a_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[node]\nraft_heartbeat_ms = {HEARTBEAT_MS}\nraft_election_timeout_ms = {}\n\n{}",
        3 * HEARTBEAT_MS,
        hold_config(dir.path())
    );
    let cluster = TestCluster::start(
        3,
        ClusterOptions {
            config: Some(config),
            env: vec![(OWN_SYNC_DELAY_HOOK.to_string(), OWN_SYNC_DELAY_MS.to_string())],
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let leader = agreed_leader(&cluster, &[1, 2, 3]).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let leader_endpoint = cluster.node(leader).endpoint();

    for write in 0..WRITES {
        // Alternately through the leader and through a follower (which forwards it).
        let through = if write % 2 == 0 {
            leader
        } else {
            followers[write / 2 % 2]
        };
        let started = Instant::now();
        let output =
            tokio::task::block_in_place(|| cluster.run_cli(through, &["team", "create", &format!("team-{write}")]));
        let answered = started.elapsed();
        assert!(
            output.status.success(),
            "team create through node {through}: {output:?}"
        );
        let applied = try_get_cluster(&leader_endpoint, &token)
            .await
            .expect("the leader answers")
            .last_applied_index;
        for follower in &followers {
            let endpoint = cluster.node(*follower).endpoint();
            wait_for(
                &format!(
                    "follower {follower} to apply index {applied} (write {write} through node {through}) without waiting for a {HEARTBEAT_MS} ms heartbeat"
                ),
                WITHOUT_A_HEARTBEAT,
                || {
                    let (endpoint, token) = (endpoint.clone(), token.clone());
                    async move {
                        let view = try_get_cluster(&endpoint, &token).await?;
                        (view.last_applied_index >= applied).then_some(())
                    }
                },
            )
            .await;
        }
        assert!(
            answered < WITHOUT_A_HEARTBEAT,
            "write {write} through node {through} was answered after {answered:?}: its node waited for a heartbeat to apply it"
        );
    }
}
