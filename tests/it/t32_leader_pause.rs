//! Liveness is judged by the leader, for its term: a leader stopped (SIGSTOP) past the lease and
//! resumed marks no healthy node down, while a follower really killed is still marked down and
//! its agents reassigned within the lease plus a second; a killed leader's agents move one lease
//! after its successor's election.

use std::time::{Duration, Instant};

use flotilla_tests::{try_get_cluster, wait_for, TestCluster};

use crate::common::DEADLINE;
use crate::t30_failover::{check_every_agent_history, placements, three_nodes_running_six_agents, Placements};

const LEASE_MS: u64 = 2_000;
/// How long after a kill -9 the dead node's agents must be reassigned, beyond the lease.
const REASSIGN_SLACK: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_marks_no_healthy_node_down_and_a_killed_follower_is_replaced() {
    let (mut cluster, token, _, before) = three_nodes_running_six_agents(LEASE_MS, "steady", "Stay on your node").await;
    let (old_leader, old_term) = leader_and_term(&cluster, &token, None).await;

    // Stop the leader until its successor has judged it down: it stays stopped for the
    // election plus a whole lease, and hears nothing meanwhile.
    cluster.node_mut(old_leader).freeze();
    let (new_leader, new_term) = leader_and_term(&cluster, &token, Some(old_leader)).await;
    assert!(new_term > old_term, "the successor leads a later term");
    let reader = cluster.node(new_leader).endpoint();
    wait_for_mark(&reader, &token, old_leader, false, "the stopped leader marked down").await;
    cluster.node_mut(old_leader).thaw();

    // The resumed node catches up with its successor's term and is marked up again.
    wait_for_mark(&reader, &token, old_leader, true, "the resumed node marked up again").await;
    wait_for_caught_up(&cluster, &token, old_leader, new_leader, new_term).await;
    // A stale judgement would have been written around the resume; watch one more lease.
    let healthy: Placements = before
        .into_iter()
        .filter(|(_, (node, _, _))| *node != old_leader)
        .collect();
    watch_healthy_agents_stay(&reader, &token, &healthy, Duration::from_millis(LEASE_MS)).await;
    check_no_healthy_node_was_down(&reader, &token, old_leader).await;
    check_every_agent_history(&reader, &token, &healthy).await;

    // A real death of a follower is still judged, within the lease plus a second.
    let victim = (1..=3)
        .find(|id| *id != old_leader && *id != new_leader)
        .expect("a third node");
    let moved: Vec<String> = healthy
        .iter()
        .filter(|(_, (node, _, _))| *node == victim)
        .map(|(id, _)| id.clone())
        .collect();
    cluster.node_mut(victim).kill9();
    let killed_at = Instant::now();
    wait_for_reassigned(&reader, &token, victim, &moved).await;
    let reassigned = killed_at.elapsed();
    wait_for_mark(&reader, &token, victim, false, "the killed follower marked down").await;
    eprintln!(
        "agents of node {victim} reassigned {reassigned:?} after kill -9 (lease {LEASE_MS} ms); \
         paused leader {old_leader} (term {old_term}) marked no healthy node down"
    );
    assert!(
        reassigned <= Duration::from_millis(LEASE_MS) + REASSIGN_SLACK,
        "reassignment took {reassigned:?}, more than the lease ({LEASE_MS} ms) plus {REASSIGN_SLACK:?}"
    );
}

/// The leader's own death: its successor waits one lease after its election (it has received
/// nothing from anyone before), then judges the dead leader down and its agents move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leaders_agents_are_reassigned_a_lease_after_the_election() {
    let (mut cluster, token, _, before) = three_nodes_running_six_agents(LEASE_MS, "leader", "Stay on your node").await;
    let (leader, _) = leader_and_term(&cluster, &token, None).await;
    let moved: Vec<String> = before
        .iter()
        .filter(|(_, (node, _, _))| *node == leader)
        .map(|(id, _)| id.clone())
        .collect();
    cluster.node_mut(leader).kill9();
    let killed_at = Instant::now();
    let (successor, _) = leader_and_term(&cluster, &token, Some(leader)).await;
    let elected = killed_at.elapsed();
    let reader = cluster.node(successor).endpoint();
    wait_for_reassigned(&reader, &token, leader, &moved).await;
    let reassigned = killed_at.elapsed();
    eprintln!(
        "agents of the killed leader {leader} reassigned {reassigned:?} after kill -9; successor {successor} \
         seen elected after {elected:?} (lease {LEASE_MS} ms)"
    );
    let lease = Duration::from_millis(LEASE_MS);
    assert!(
        reassigned >= lease,
        "a new leader judged the dead one down {reassigned:?} after the kill, within its grace of a lease"
    );
    assert!(
        reassigned <= elected + lease + REASSIGN_SLACK,
        "reassignment took {reassigned:?}: more than the election ({elected:?}) plus the lease plus {REASSIGN_SLACK:?}"
    );
}

/// The leader and term as a live node sees them, once a leader other than `not` is known.
async fn leader_and_term(cluster: &TestCluster, token: &str, not: Option<u64>) -> (u64, u64) {
    let endpoints: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|node| Some(node.id) != not)
        .map(|node| node.endpoint())
        .collect();
    wait_for("a leader known to the live nodes", DEADLINE, || {
        let (endpoints, token) = (endpoints.clone(), token.to_string());
        async move {
            for endpoint in &endpoints {
                let view = try_get_cluster(endpoint, &token).await?;
                if view.leader_id != 0 && Some(view.leader_id) != not {
                    return Some((view.leader_id, view.term));
                }
            }
            None
        }
    })
    .await
}

async fn wait_for_mark(endpoint: &str, token: &str, node: u64, up: bool, what: &str) {
    wait_for(what, DEADLINE, || {
        let (endpoint, token) = (endpoint.to_string(), token.to_string());
        async move {
            let view = try_get_cluster(&endpoint, &token).await?;
            view.members
                .iter()
                .any(|member| member.id == node && member.up == up)
                .then_some(())
        }
    })
    .await
}

/// Waits until `node` answers with the successor's term and has applied what the leader had.
async fn wait_for_caught_up(cluster: &TestCluster, token: &str, node: u64, leader: u64, term: u64) {
    let (resumed, leading) = (cluster.node(node).endpoint(), cluster.node(leader).endpoint());
    wait_for("the resumed node caught up with its successor", DEADLINE, || {
        let (resumed, leading, token) = (resumed.clone(), leading.clone(), token.to_string());
        async move {
            let target = try_get_cluster(&leading, &token).await?.last_applied_index;
            let view = try_get_cluster(&resumed, &token).await?;
            (view.leader_id == leader && view.term == term && view.last_applied_index >= target).then_some(())
        }
    })
    .await
}

/// For `window`, every agent of a healthy node stays on it, running, under its first epoch:
/// a node-down of its node would have sent it back to placement under a higher epoch.
async fn watch_healthy_agents_stay(endpoint: &str, token: &str, healthy: &Placements, window: Duration) {
    let started = Instant::now();
    let mut polls = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < window {
        polls.tick().await;
        let Some(now) = placements(endpoint, token).await else {
            continue;
        };
        for (id, placed) in healthy {
            assert_eq!(
                now.get(id),
                Some(placed),
                "agent {id} of a healthy node moved after the leader's pause (node, epoch, status)"
            );
        }
    }
}

/// Every member but the stopped one is up now (that none was down meanwhile is what the epochs
/// of their agents show).
async fn check_no_healthy_node_was_down(endpoint: &str, token: &str, paused: u64) {
    let view = try_get_cluster(endpoint, token).await.expect("cluster view");
    for member in view.members.iter().filter(|member| member.id != paused) {
        assert!(member.up, "healthy node {} is marked down: {view:?}", member.id);
    }
}

/// Waits until every agent of `moved` is assigned to a node other than `victim` under a higher
/// epoch (running is not awaited: that is the new owner's start-up, not liveness).
async fn wait_for_reassigned(endpoint: &str, token: &str, victim: u64, moved: &[String]) {
    assert!(!moved.is_empty(), "the victim held agents");
    wait_for("the killed follower's agents reassigned", DEADLINE, || {
        let (endpoint, token, moved) = (endpoint.to_string(), token.to_string(), moved.to_vec());
        async move {
            let placed = placements(&endpoint, &token).await?;
            moved
                .iter()
                .all(|id| {
                    let (node, epoch, _) = placed[id];
                    node != victim && epoch >= 2
                })
                .then_some(())
        }
    })
    .await;
}
