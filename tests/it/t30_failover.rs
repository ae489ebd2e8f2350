//! Node loss: the agents of a killed node move to live nodes under a higher epoch within the
//! lease plus a stated bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_tests::{agent_client, invariants, wait_for, ClusterOptions, TestCluster};

use crate::common::{create, DEADLINE};

const LEASE_MS: u64 = 2_000;
/// Detection runs every lease/8 and the reassignment is two Raft writes; on a loaded two-core
/// debug build that has stayed well under this.
const REASSIGN_BOUND: Duration = Duration::from_secs(4);

/// Each agent's id, with its assigned node, epoch and status.
pub(crate) type Placements = BTreeMap<String, (u64, u64, i32)>;

pub(crate) async fn placements(endpoint: &str, token: &str) -> Option<Placements> {
    let mut client = agent_client(endpoint, token).await;
    let agents = client
        .list_agents(v1::ListAgentsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner()
        .agents;
    Some(
        agents
            .into_iter()
            .map(|agent| {
                let assignment = agent.assignment.unwrap_or_default();
                (agent.id, (assignment.node_id, assignment.epoch, agent.status))
            })
            .collect(),
    )
}

/// Three nodes with a lease of `lease_ms` and four slots each, and six agents created through
/// node 1 (named `<name>-<n>`) running two per node: the cluster, its admin token, node 1's
/// endpoint and where each agent runs.
pub(crate) async fn three_nodes_running_six_agents(
    lease_ms: u64,
    name: &str,
    prompt: &str,
) -> (TestCluster, String, String, Placements) {
    let cluster = TestCluster::start(
        3,
        ClusterOptions {
            lease_ms: Some(lease_ms),
            slots: 4,
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let mut client = agent_client(&endpoint, &token).await;
    for index in 0..6 {
        create(&mut client, &format!("{name}-{index}"), prompt).await;
    }
    let placements = wait_for_six_agents_running_two_per_node(&endpoint, &token).await;
    (cluster, token, endpoint, placements)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_a_killed_node_are_reassigned_with_a_higher_epoch() {
    let (mut cluster, token, endpoint, before) =
        three_nodes_running_six_agents(LEASE_MS, "spread", "Spread over the nodes").await;

    // Kill node 3 (a follower or the leader, whichever; node 1 answers the reads).
    let victim = cluster.nodes[2].id;
    let moved: Vec<String> = before
        .iter()
        .filter(|(_, (node, _, _))| *node == victim)
        .map(|(id, _)| id.clone())
        .collect();
    cluster.nodes[2].kill9();
    let killed_at = Instant::now();
    let after = wait_for_the_moved_agents_to_run_under_epoch_2(&endpoint, &token, victim, &moved).await;
    let elapsed = killed_at.elapsed();
    assert!(
        elapsed <= Duration::from_millis(LEASE_MS) + REASSIGN_BOUND,
        "reassignment took {elapsed:?}, more than the lease ({LEASE_MS} ms) plus {REASSIGN_BOUND:?}"
    );
    eprintln!("agents of node {victim} reassigned {elapsed:?} after kill -9 (lease {LEASE_MS} ms)");
    // Agents on live nodes kept their epoch.
    for (id, (node, epoch, _)) in &before {
        if *node != victim {
            assert_eq!(after[id], (*node, *epoch, v1::AgentStatus::Running as i32));
        }
    }
    check_the_killed_node_is_marked_down(&endpoint, &token, victim).await;
    check_every_agent_history(&endpoint, &token, &before).await;
}

/// Six agents over three nodes with four slots each: the least-loaded rule puts two on each.
pub(crate) async fn wait_for_six_agents_running_two_per_node(endpoint: &str, token: &str) -> Placements {
    let before = {
        let endpoint = endpoint.to_string();
        let token = token.to_string();
        wait_for("six agents running, two per node", DEADLINE, move || {
            let endpoint = endpoint.clone();
            let token = token.clone();
            async move {
                let placed = placements(&endpoint, &token).await?;
                let running = placed
                    .values()
                    .filter(|(_, _, status)| *status == v1::AgentStatus::Running as i32)
                    .count();
                (running == 6).then_some(placed)
            }
        })
        .await
    };
    let mut per_node = BTreeMap::new();
    for (node, epoch, _) in before.values() {
        assert_eq!(*epoch, 1);
        *per_node.entry(*node).or_insert(0) += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{per_node:?}"
    );
    before
}

/// Waits until every agent of `moved` runs on a node other than `victim` under epoch 2, and
/// returns the placements then.
async fn wait_for_the_moved_agents_to_run_under_epoch_2(
    endpoint: &str,
    token: &str,
    victim: u64,
    moved: &[String],
) -> Placements {
    let endpoint = endpoint.to_string();
    let token = token.to_string();
    let moved = moved.to_vec();
    wait_for(
        "the killed node's agents running on live nodes under epoch 2",
        DEADLINE,
        move || {
            let endpoint = endpoint.clone();
            let token = token.clone();
            let moved = moved.clone();
            async move {
                let placed = placements(&endpoint, &token).await?;
                moved
                    .iter()
                    .all(|id| {
                        let (node, epoch, status) = placed[id];
                        node != victim && epoch == 2 && status == v1::AgentStatus::Running as i32
                    })
                    .then_some(placed)
            }
        },
    )
    .await
}

async fn check_the_killed_node_is_marked_down(endpoint: &str, token: &str, victim: u64) {
    let mut cluster_client = flotilla_tests::cluster_client(endpoint, token).await;
    let view = cluster_client
        .get_cluster(v1::GetClusterRequest {})
        .await
        .expect("cluster")
        .into_inner();
    let victim_member = view
        .members
        .iter()
        .find(|member| member.id == victim)
        .expect("still a member");
    assert!(!victim_member.up, "the killed node is marked down");
}

/// Every agent's history holds up: no gap, epochs only rise, only the owner writes.
pub(crate) async fn check_every_agent_history(endpoint: &str, token: &str, placements: &Placements) {
    let mut client = agent_client(endpoint, token).await;
    for id in placements.keys() {
        let history = invariants::durable_history(&mut client, id).await.expect("history");
        invariants::check_agent_history(id, &history).unwrap_or_else(|violation| panic!("{violation}"));
    }
}
