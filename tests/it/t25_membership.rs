//! Membership through `ClusterService`: a fourth node joins as a learner, is promoted to voter,
//! and a node is removed (its agents go back to placement).

use flotilla_proto::v1;
use flotilla_tests::{wait_for, ClusterOptions, TestCluster};

use crate::common::{create, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_is_promoted_and_a_node_is_removed() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    cluster.spawn_joining_node();
    let view = cluster.wait_for_members_up(4).await;
    let fourth = view
        .members
        .iter()
        .find(|member| member.id == 4)
        .expect("node 4 joined");
    assert!(!fourth.voter, "beyond three voters a node joins as a learner");
    assert_eq!(fourth.role, v1::RaftRole::Learner as i32);

    // Promotion through a node that is not necessarily the leader (it forwards).
    let mut admin = cluster.cluster_client(2).await;
    admin
        .add_node(v1::AddNodeRequest {
            node_id: 4,
            voter: true,
        })
        .await
        .expect("add-node");
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    wait_for("node 4 to be a voter", DEADLINE, || {
        let (endpoint, token) = (endpoint.clone(), token.clone());
        async move {
            let view = flotilla_tests::try_get_cluster(&endpoint, &token).await?;
            view.members
                .iter()
                .any(|member| member.id == 4 && member.voter)
                .then_some(())
        }
    })
    .await;

    let mut agents = cluster.agent_client(1).await;
    for index in 0..4 {
        create(&mut agents, &format!("m-{index}"), "Membership").await;
    }
    let removed = cluster.run_cli(1, &["cluster", "remove-node", "4"]);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    wait_for(
        "node 4 to leave and its agents to be placed elsewhere",
        DEADLINE,
        || {
            let (endpoint, token) = (endpoint.clone(), token.clone());
            async move {
                let view = flotilla_tests::try_get_cluster(&endpoint, &token).await?;
                if view.members.iter().any(|member| member.id == 4) {
                    return None;
                }
                let mut client = flotilla_tests::agent_client(&endpoint, &token).await;
                let agents = client
                    .list_agents(v1::ListAgentsRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .agents;
                agents
                    .iter()
                    .all(|agent| {
                        agent.status == v1::AgentStatus::Running as i32
                            && agent
                                .assignment
                                .as_ref()
                                .is_some_and(|assignment| assignment.node_id != 4)
                    })
                    .then_some(())
            }
        },
    )
    .await;

    let mut unknown = cluster.cluster_client(1).await;
    let status = unknown
        .remove_node(v1::RemoveNodeRequest { node_id: 42 })
        .await
        .expect_err("unknown node");
    assert_eq!(status.code(), tonic::Code::NotFound);
}
