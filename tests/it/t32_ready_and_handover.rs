//! Ready before leading, and leadership handed over on a clean stop.
//!
//! A restarting node whose start-up is slow (held back with the node's test hook) answers on
//! its listeners and votes, but never leads before it says it is ready; once ready it leads
//! when it is the only ready candidate. A leader stopped with SIGTERM hands leadership to a
//! follower within about one election, and no acknowledged agent is lost.

use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_tests::{agent_client, invariants, is_ready, try_get_cluster, wait_for, ClusterOptions, TestCluster};

use crate::common::{create, create_request, get, status_of, DEADLINE};

/// The node's test hook that holds back its readiness (milliseconds).
const READY_DELAY_HOOK: &str = "FLOTILLA_TEST_HOOK_READY_DELAY_MS";
/// Hold-back of the slow node: long enough for the others to elect a leader meanwhile
/// (lease plus election timeout, a few seconds).
const SLOW_START_MS: u64 = 20_000;
/// A leader that stops cleanly hands over in about one election (timeouts of 1 to 2 s); a
/// loaded two-core debug build stays well under this.
const HANDOVER_BOUND: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

/// The leader `endpoint` knows, if it knows one.
pub(crate) async fn leader_seen_by(endpoint: &str, token: &str) -> Option<u64> {
    let view = try_get_cluster(endpoint, token).await?;
    (view.leader_id != 0).then_some(view.leader_id)
}

/// Waits until every node of `ids` names the same leader, and returns it.
pub(crate) async fn agreed_leader(cluster: &TestCluster, ids: &[u64]) -> u64 {
    let token = cluster.admin_token();
    let endpoints: Vec<String> = ids.iter().map(|id| cluster.node(*id).endpoint()).collect();
    wait_for(&format!("nodes {ids:?} to agree on a leader"), DEADLINE, || {
        let (endpoints, token) = (endpoints.clone(), token.clone());
        async move {
            let mut leaders = Vec::new();
            for endpoint in &endpoints {
                leaders.push(leader_seen_by(endpoint, &token).await?);
            }
            leaders.windows(2).all(|pair| pair[0] == pair[1]).then(|| leaders[0])
        }
    })
    .await
}

/// Panics if `node` is leader in its own view or in `watcher`'s.
async fn assert_not_leader(node: u64, node_endpoint: &str, watcher_endpoint: &str, token: &str, why: &str) {
    for endpoint in [node_endpoint, watcher_endpoint] {
        if let Some(view) = try_get_cluster(endpoint, token).await {
            let led = view.leader_id == node
                || view.members.iter().any(|member| {
                    member.id == node && member.role == v1::RaftRole::Leader as i32 && view.node_id == node
                });
            assert!(!led, "node {node} leads ({endpoint} says so) {why}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_not_ready_votes_but_does_not_lead() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let first_leader = agreed_leader(&cluster, &[1, 2, 3]).await;
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != first_leader).collect();
    let (slow, other) = (followers[0], followers[1]);
    let (slow_endpoint, other_endpoint) = (cluster.node(slow).endpoint(), cluster.node(other).endpoint());

    cluster
        .node_mut(slow)
        .set_env(READY_DELAY_HOOK, &SLOW_START_MS.to_string());
    cluster.node_mut(slow).restart();
    let restarted = Instant::now();
    wait_for("the slow node to answer, not ready", DEADLINE, || {
        let endpoint = slow_endpoint.clone();
        async move { (is_ready(&endpoint).await == Some(false)).then_some(()) }
    })
    .await;
    // The only other ready node can lead only with the slow node's vote (two of three).
    cluster.node_mut(first_leader).kill9();

    let mut other_led_after = None;
    let ready_after = loop {
        cluster.node_mut(slow).assert_running("held back from readiness");
        if is_ready(&slow_endpoint).await == Some(true) {
            break restarted.elapsed();
        }
        assert_not_leader(slow, &slow_endpoint, &other_endpoint, &token, "before it is ready").await;
        if other_led_after.is_none() && leader_seen_by(&other_endpoint, &token).await == Some(other) {
            other_led_after = Some(restarted.elapsed());
        }
        assert!(restarted.elapsed() < DEADLINE, "the slow node never became ready");
        tokio::time::sleep(POLL).await;
    };
    let other_led_after =
        other_led_after.unwrap_or_else(|| panic!("node {other} did not lead while node {slow} was not ready"));
    assert!(
        ready_after >= Duration::from_millis(SLOW_START_MS),
        "ready {ready_after:?} after the restart, before the hook's {SLOW_START_MS} ms"
    );
    eprintln!(
        "node {other} led {other_led_after:?} after node {slow}'s restart (with its vote); \
         node {slow} was ready {ready_after:?} after its restart ({SLOW_START_MS} ms held back)"
    );

    // Now the slow node is ready and the only ready candidate: the first leader comes back
    // held back for longer than the test, and the node that leads is killed.
    cluster.node_mut(first_leader).set_env(READY_DELAY_HOOK, "600000");
    cluster.node_mut(first_leader).restart();
    let first_endpoint = cluster.node(first_leader).endpoint();
    wait_for("the first leader to answer, not ready", DEADLINE, || {
        let endpoint = first_endpoint.clone();
        async move { (is_ready(&endpoint).await == Some(false)).then_some(()) }
    })
    .await;
    cluster.node_mut(other).kill9();
    let killed = Instant::now();
    loop {
        cluster.node_mut(slow).assert_running("the only ready candidate");
        assert_not_leader(
            first_leader,
            &first_endpoint,
            &slow_endpoint,
            &token,
            "before it is ready",
        )
        .await;
        if leader_seen_by(&slow_endpoint, &token).await == Some(slow)
            && leader_seen_by(&first_endpoint, &token).await == Some(slow)
        {
            break;
        }
        assert!(
            killed.elapsed() < DEADLINE,
            "node {slow}, ready and the only ready candidate, did not lead"
        );
        tokio::time::sleep(POLL).await;
    }
    eprintln!(
        "node {slow} led {:?} after the leader's kill, with node {first_leader}'s vote",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopping_cleanly_hands_over_and_loses_nothing() {
    let mut cluster = TestCluster::start(
        3,
        ClusterOptions {
            lease_ms: Some(2_000),
            slots: 8,
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let leader = agreed_leader(&cluster, &[1, 2, 3]).await;
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let entry = cluster.node(others[0]).endpoint();
    let mut client = agent_client(&entry, &token).await;
    let mut acknowledged = Vec::new();
    for index in 0..6 {
        acknowledged.push(create(&mut client, &format!("before-{index}"), "Hold").await.id);
    }
    let placed = wait_for_running(&entry, &token, &acknowledged).await;

    // Creates through a follower go on while the leader stops; every acknowledged one must stay.
    let writer = {
        let (entry, token) = (entry.clone(), token.clone());
        tokio::spawn(async move {
            let mut client = agent_client(&entry, &token).await;
            let mut acknowledged = Vec::new();
            for index in 0..5 {
                let request = create_request(&format!("during-{index}"), "Hold");
                if let Ok(reply) = client.create_agent(request).await {
                    acknowledged.extend(reply.into_inner().agent.map(|agent| agent.id));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            acknowledged
        })
    };
    cluster.node_mut(leader).begin_terminate();
    let stopped = Instant::now();
    let endpoints: Vec<String> = others.iter().map(|id| cluster.node(*id).endpoint()).collect();
    let new_leader = wait_for("the other nodes to agree on a new leader", DEADLINE, || {
        let (endpoints, token) = (endpoints.clone(), token.clone());
        async move {
            let first = leader_seen_by(&endpoints[0], &token).await?;
            let second = leader_seen_by(&endpoints[1], &token).await?;
            (first == second && first != leader).then_some(first)
        }
    })
    .await;
    let handover = stopped.elapsed();
    eprintln!("leader {leader} stopped with SIGTERM; node {new_leader} led {handover:?} later");
    tokio::task::block_in_place(|| cluster.node_mut(leader).wait_exit(DEADLINE));
    assert!(
        handover <= HANDOVER_BOUND,
        "a new leader took {handover:?} after a clean stop of the leader, more than {HANDOVER_BOUND:?}"
    );

    let during = writer.await.expect("the writer task");
    assert!(
        !during.is_empty(),
        "no create was acknowledged while the leader stopped"
    );
    // The agents of the nodes that stayed kept running where they were.
    let stayed: Vec<String> = placed
        .iter()
        .filter(|(_, node)| *node != leader)
        .map(|(id, _)| id.clone())
        .collect();
    let after = wait_for_running(&entry, &token, &stayed).await;
    assert!(
        placed
            .iter()
            .filter(|(_, node)| *node != leader)
            .all(|placement| after.contains(placement)),
        "agents of the nodes that stayed moved: before {placed:?}, after {after:?}"
    );
    let mut client = agent_client(&cluster.node(new_leader).endpoint(), &token).await;
    for id in acknowledged.iter().chain(&during) {
        let agent = get(&mut client, id)
            .await
            .unwrap_or_else(|| panic!("acknowledged agent {id} is lost"));
        eprintln!(
            "agent {id}: {:?} on node {:?}",
            status_of(&agent),
            agent.assignment.as_ref().map(|assignment| assignment.node_id)
        );
        let history = invariants::durable_history(&mut client, id).await.expect("history");
        invariants::check_agent_history(id, &history).unwrap_or_else(|violation| panic!("{violation}"));
    }

    // Restart-to-ready of a node with nothing held back.
    cluster.node_mut(leader).restart();
    let restarted = Instant::now();
    let endpoint = cluster.node(leader).endpoint();
    wait_for("the restarted node to be ready", DEADLINE, || {
        let endpoint = endpoint.clone();
        async move { (is_ready(&endpoint).await == Some(true)).then_some(()) }
    })
    .await;
    eprintln!("node {leader} was ready {:?} after its restart", restarted.elapsed());
}

/// Waits until every agent of `ids` runs, and returns each one's node; the failure names each
/// agent's last seen status and node.
async fn wait_for_running(endpoint: &str, token: &str, ids: &[String]) -> Vec<(String, u64)> {
    let started = Instant::now();
    let mut client = agent_client(endpoint, token).await;
    loop {
        let mut seen = Vec::new();
        for id in ids {
            let agent = get(&mut client, id).await;
            let status = agent.as_ref().map(status_of);
            let node = agent
                .and_then(|agent| agent.assignment)
                .map(|assignment| assignment.node_id);
            seen.push((id.clone(), status, node));
        }
        let running: Vec<(String, u64)> = seen
            .iter()
            .filter(|(_, status, _)| *status == Some(v1::AgentStatus::Running))
            .filter_map(|(id, _, node)| node.map(|node| (id.clone(), node)))
            .collect();
        if running.len() == ids.len() {
            return running;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the agents did not all run within {DEADLINE:?}: {seen:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
