//! Three nodes in network namespaces of their own (two in region "east", one in "west"): a slow
//! link between the regions slows the writes that cross it and marks no node down; a leader cut
//! off from the others is replaced, cannot acknowledge a write while cut off (and applies it at most once later), is marked down by
//! its successor, and after the partition heals follows the new term and serves what the
//! majority acknowledged.

use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_tests::netlab::LinkFaults;
use flotilla_tests::{try_get_cluster, wait_for, ClusterOptions, TestCluster};

use crate::common::{create, get, DEADLINE};

const LEASE_MS: u64 = 2_000;
const WAN_DELAY: Duration = Duration::from_millis(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_links_and_a_cut_off_leader() {
    let mut cluster = TestCluster::start(
        3,
        ClusterOptions {
            regions: vec!["east".into(), "east".into(), "west".into()],
            lease_ms: Some(LEASE_MS),
            network_lab: true,
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let lab = cluster.lab.as_ref().expect("the cluster runs in a lab");
    let (leader, term) = leader_and_term(&cluster, &token, &[]).await;
    assert_ne!(leader, 3, "the west node never campaigned before the east ones were up");

    // A write through the west node is forwarded to the leader in the east and answered back:
    // it crosses the slow link at least twice.
    lab.set_link(
        "east",
        "west",
        LinkFaults {
            delay: WAN_DELAY,
            loss_per_mille: 0,
            jitter: Duration::ZERO,
        },
    );
    let mut west = cluster.agent_client(3).await;
    let started = Instant::now();
    let slow = create(&mut west, "across-the-wan", "Hold on").await;
    let took = started.elapsed();
    assert!(
        took >= WAN_DELAY * 2,
        "a create through the west node took {took:?}, less than two crossings of a {WAN_DELAY:?} link"
    );
    lab.clear_links();
    all_members_up(&cluster, &token, 1).await;
    let view = try_get_cluster(&cluster.node(leader).endpoint(), &token)
        .await
        .expect("the leader answers");
    assert_eq!(
        view.term, term,
        "a link slower than a heartbeat but far under the lease caused an election"
    );

    // Cut the leader off. The other two elect a successor, which judges the old leader down.
    let lab = cluster.lab.as_ref().expect("the cluster runs in a lab");
    lab.partition(&[leader]).expect("cut the leader off");
    let (successor, new_term) = leader_and_term(&cluster, &token, &[leader]).await;
    assert!(new_term > term, "the successor leads a later term");
    let successor_endpoint = cluster.node(successor).endpoint();
    wait_for_mark(&successor_endpoint, &token, leader, false).await;
    let mut majority = cluster.agent_client(successor).await;
    let acknowledged = create(&mut majority, "while-cut-off", "Hold on").await;
    // The cut-off leader cannot acknowledge a write: it has no majority.
    let mut minority = cluster.agent_client(leader).await;
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        minority.create_agent(crate::common::create_request("on-the-wrong-side", "Hold on")),
    )
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "the cut-off leader acknowledged a create: {refused:?}"
    );

    // Healed: the old leader follows the new term and serves what the majority acknowledged.
    cluster
        .lab
        .as_ref()
        .expect("the cluster runs in a lab")
        .heal()
        .expect("heal the partition");
    all_members_up(&cluster, &token, successor).await;
    let old_endpoint = cluster.node(leader).endpoint();
    wait_for("the old leader to follow the new term", DEADLINE, || {
        let (endpoint, token) = (old_endpoint.clone(), token.clone());
        async move {
            let view = try_get_cluster(&endpoint, &token).await?;
            (view.term >= new_term && view.leader_id != leader && view.leader_id != 0).then_some(())
        }
    })
    .await;
    let mut healed = cluster.agent_client(leader).await;
    for agent in [&slow, &acknowledged] {
        let seen = get(&mut healed, &agent.id).await;
        assert!(
            seen.is_some(),
            "the healed node does not serve acknowledged agent {}",
            agent.id
        );
    }
    let listed = healed
        .list_agents(v1::ListAgentsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list through the healed node")
        .into_inner();
    // The call timed out, so its outcome is unknown to the caller: the node may still carry it
    // out once it can reach a leader. It must not be applied twice.
    let copies = listed
        .agents
        .iter()
        .filter(|agent| agent.name == "on-the-wrong-side")
        .count();
    assert!(
        copies <= 1,
        "the create sent to the cut-off leader was applied {copies} times"
    );
    for node in cluster.nodes.iter_mut() {
        node.assert_running("checking the healed cluster");
    }
}

/// The leader and term seen by any node outside `not`, once one of them knows a leader outside it.
async fn leader_and_term(cluster: &TestCluster, token: &str, not: &[u64]) -> (u64, u64) {
    let endpoints: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|node| !not.contains(&node.id))
        .map(|node| node.endpoint())
        .collect();
    let not = not.to_vec();
    wait_for("a leader known to the reachable nodes", DEADLINE, || {
        let (endpoints, token, not) = (endpoints.clone(), token.to_string(), not.clone());
        async move {
            for endpoint in &endpoints {
                let view = try_get_cluster(endpoint, &token).await?;
                if view.leader_id != 0 && !not.contains(&view.leader_id) {
                    return Some((view.leader_id, view.term));
                }
            }
            None
        }
    })
    .await
}

async fn wait_for_mark(endpoint: &str, token: &str, node: u64, up: bool) {
    let what = format!("node {node} marked {}", if up { "up" } else { "down" });
    wait_for(&what, DEADLINE, || {
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

async fn all_members_up(cluster: &TestCluster, token: &str, through: u64) {
    let endpoint = cluster.node(through).endpoint();
    wait_for("every member up", DEADLINE, || {
        let (endpoint, token) = (endpoint.clone(), token.to_string());
        async move {
            let view = try_get_cluster(&endpoint, &token).await?;
            (view.members.len() == 3 && view.members.iter().all(|member| member.up)).then_some(())
        }
    })
    .await
}
