//! Three nodes: writes on followers (read back at once on the same follower), reads anywhere, leader loss, and a restarted node that
//! catches up from a snapshot because the log it missed was purged.

use std::collections::BTreeMap;

use flotilla_proto::v1;
use flotilla_tests::{agent_client, cluster_client, invariants, wait_for, AgentClient, ClusterOptions, TestCluster};

use crate::common::{create, get, identity, DEADLINE};

async fn cluster_view(endpoint: &str, token: &str) -> Option<v1::Cluster> {
    let mut client = cluster_client(endpoint, token).await;
    client
        .get_cluster(v1::GetClusterRequest {})
        .await
        .ok()
        .map(|reply| reply.into_inner())
}

/// Each acknowledged agent's id, with the fields [`identity`] says must never change.
type AcknowledgedAgents = BTreeMap<String, (String, String, String, String, String, String, String, String)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_keeps_every_acknowledged_agent_and_a_restarted_node_catches_up_by_snapshot() {
    let options = ClusterOptions {
        extra_args: vec![
            "--snapshot-after-logs".to_string(),
            "20".to_string(),
            "--logs-kept-after-snapshot".to_string(),
            "0".to_string(),
        ],
        ..Default::default()
    };
    let mut cluster = TestCluster::start(3, options).await;
    let token = cluster.admin_token();
    let (leader, followers) = check_three_voters_and_find_the_leader(&cluster, &token).await;
    let mut acknowledged = create_on_a_follower_and_read_on_the_other(&cluster, &token, &followers).await;

    // kill -9 the leader; the other two elect a new one and keep every agent.
    let leader_index = (0..3)
        .find(|index| cluster.nodes[*index].id == leader)
        .expect("leader is a node");
    let last_log_of_killed = cluster_view(&cluster.nodes[leader_index].endpoint(), &token)
        .await
        .expect("view")
        .last_log_index;
    cluster.nodes[leader_index].kill9();
    let survivor = cluster.nodes[followers[0]].endpoint();
    let new_leader = wait_for_a_new_leader(&survivor, &token, leader).await;
    assert_ne!(new_leader, leader);
    let mut survivor_client = agent_client(&survivor, &token).await;
    check_every_agent_is_readable(
        &mut survivor_client,
        &acknowledged,
        "acknowledged agent survives leader loss",
    )
    .await;

    // Enough writes while it is down that the leader snapshots and purges past its log.
    for index in 0..40 {
        let agent = create(
            &mut survivor_client,
            &format!("during-{index}"),
            "Created while a node is down",
        )
        .await;
        acknowledged.insert(agent.id.clone(), identity(&agent));
    }
    let new_leader_index = (0..3)
        .find(|index| cluster.nodes[*index].id == new_leader)
        .expect("new leader");
    let new_leader_endpoint = cluster.nodes[new_leader_index].endpoint();
    wait_for_the_leader_to_purge_past(&new_leader_endpoint, &token, last_log_of_killed).await;

    cluster.nodes[leader_index].restart();
    let restarted = cluster.nodes[leader_index].endpoint();
    check_the_restarted_node_catches_up_by_snapshot(&restarted, &new_leader_endpoint, &token, last_log_of_killed).await;
    check_the_restarted_node_holds_every_agent(&restarted, &token, &acknowledged).await;
}

/// Checks the cluster has three voters; returns the leader's id and the followers' indexes.
async fn check_three_voters_and_find_the_leader(cluster: &TestCluster, token: &str) -> (u64, Vec<usize>) {
    let view = cluster_view(&cluster.nodes[0].endpoint(), token)
        .await
        .expect("cluster view");
    assert_eq!(view.members.len(), 3);
    assert_eq!(
        view.members.iter().filter(|member| member.voter).count(),
        3,
        "three voters"
    );
    let leader = view.leader_id;
    let followers: Vec<usize> = (0..3).filter(|index| cluster.nodes[*index].id != leader).collect();
    (leader, followers)
}

/// Create on a follower (forwarded to the leader), read on the other follower.
async fn create_on_a_follower_and_read_on_the_other(
    cluster: &TestCluster,
    token: &str,
    followers: &[usize],
) -> AcknowledgedAgents {
    let mut on_follower = agent_client(&cluster.nodes[followers[0]].endpoint(), token).await;
    let mut acknowledged = BTreeMap::new();
    for index in 0..10 {
        let agent = create(&mut on_follower, &format!("before-{index}"), "Created on a follower").await;
        // Read-your-writes: the follower that answered the create already shows the agent.
        let read_back = get(&mut on_follower, &agent.id).await;
        assert_eq!(
            read_back.as_ref().map(identity),
            Some(identity(&agent)),
            "the follower that acknowledged agent {} shows it at once",
            agent.id
        );
        acknowledged.insert(agent.id.clone(), identity(&agent));
    }
    let other_endpoint = cluster.nodes[followers[1]].endpoint();
    for (id, expected) in &acknowledged {
        let endpoint = other_endpoint.clone();
        let token = token.to_string();
        let id = id.clone();
        let found = wait_for("the agent to reach the other follower", DEADLINE, move || {
            let endpoint = endpoint.clone();
            let token = token.clone();
            let id = id.clone();
            async move { get(&mut agent_client(&endpoint, &token).await, &id).await }
        })
        .await;
        assert_eq!(&identity(&found), expected);
    }
    acknowledged
}

/// Waits until `survivor` sees a leader other than `old_leader`, and returns its id.
async fn wait_for_a_new_leader(survivor: &str, token: &str, old_leader: u64) -> u64 {
    let survivor = survivor.to_string();
    let token = token.to_string();
    wait_for("a new leader", DEADLINE, move || {
        let survivor = survivor.clone();
        let token = token.clone();
        async move {
            let view = cluster_view(&survivor, &token).await?;
            (view.leader_id != 0 && view.leader_id != old_leader).then_some(view.leader_id)
        }
    })
    .await
}

/// Reads every acknowledged agent through `client`; `what` says why each must be there.
async fn check_every_agent_is_readable(client: &mut AgentClient, acknowledged: &AcknowledgedAgents, what: &str) {
    for (id, expected) in acknowledged {
        let found = get(client, id).await.expect(what);
        assert_eq!(&identity(&found), expected);
    }
}

async fn wait_for_the_leader_to_purge_past(leader_endpoint: &str, token: &str, last_log_of_killed: u64) {
    let endpoint = leader_endpoint.to_string();
    let token = token.to_string();
    wait_for("the leader to purge past the killed node's log", DEADLINE, move || {
        let endpoint = endpoint.clone();
        let token = token.clone();
        async move {
            let view = cluster_view(&endpoint, &token).await?;
            (view.purged_index > last_log_of_killed).then_some(())
        }
    })
    .await;
}

async fn check_the_restarted_node_catches_up_by_snapshot(
    restarted: &str,
    leader_endpoint: &str,
    token: &str,
    last_log_of_killed: u64,
) {
    let leader_applied = cluster_view(leader_endpoint, token)
        .await
        .expect("view")
        .last_applied_index;
    let caught_up = {
        let restarted = restarted.to_string();
        let token = token.to_string();
        wait_for("the restarted node to catch up", DEADLINE, move || {
            let restarted = restarted.clone();
            let token = token.clone();
            async move {
                let view = cluster_view(&restarted, &token).await?;
                (view.last_applied_index >= leader_applied).then_some(view)
            }
        })
        .await
    };
    assert!(
        caught_up.snapshot_index > last_log_of_killed,
        "the restarted node must have installed a snapshot past index {last_log_of_killed}, holds {}",
        caught_up.snapshot_index
    );
}

/// Every acknowledged agent, and nothing else, is on the restarted node, with a history that
/// keeps the invariants.
async fn check_the_restarted_node_holds_every_agent(restarted: &str, token: &str, acknowledged: &AcknowledgedAgents) {
    let mut restarted_client = agent_client(restarted, token).await;
    check_every_agent_is_readable(&mut restarted_client, acknowledged, "every agent on the restarted node").await;
    let listed = restarted_client
        .list_agents(v1::ListAgentsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(listed.len(), acknowledged.len());
    for id in acknowledged.keys() {
        let history = invariants::durable_history(&mut restarted_client, id)
            .await
            .expect("history");
        invariants::check_agent_history(id, &history).unwrap_or_else(|violation| panic!("{violation}"));
    }
}
