//! Team limits judged by the state machine hold across nodes: creates spread over three nodes
//! share one per-minute window and one count of live agents, and each node refuses the one past
//! the limit with RESOURCE_EXHAUSTED naming it; audit entries name the node that served the call.

use flotilla_proto::v1;
use flotilla_tests::{agent_client, wait_for, ClusterOptions, TestCluster};
use tonic::Code;

use crate::common::{cli, create_request, DEADLINE};

async fn create_through(endpoint: &str, key: &str, name: &str) -> Result<v1::Agent, tonic::Status> {
    agent_client(endpoint, key)
        .await
        .create_agent(create_request(name, "spread over nodes"))
        .await
        .map(|reply| reply.into_inner().agent.expect("the agent"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_spread_over_nodes_share_the_teams_limits() {
    let cluster = TestCluster::start(3, ClusterOptions::default()).await;
    let root = cluster.admin_token();
    let endpoints: Vec<String> = cluster.nodes.iter().map(|node| node.endpoint()).collect();
    cli(&endpoints[0], &root, &["team", "create", "red"]);
    cli(&endpoints[0], &root, &["team", "create", "blue"]);
    let key_of = |team: &str| {
        let stdout = cli(
            &endpoints[0],
            &root,
            &["key", "create", "--team", team, "--user", "u", "--role", "admin"],
        );
        stdout.lines().last().expect("a key").trim().to_string()
    };
    let (red, blue) = (key_of("red"), key_of("blue"));
    cli(
        &endpoints[1],
        &root,
        &["limits", "set", "--team", "red", "--creates-per-minute", "3"],
    );
    cli(
        &endpoints[2],
        &root,
        &["limits", "set", "--team", "blue", "--max-running-agents", "2"],
    );

    // One create through each node fills red's minute; the fourth, through any node, is refused.
    for (index, endpoint) in endpoints.iter().enumerate() {
        create_through(endpoint, &red, &format!("red-{index}"))
            .await
            .unwrap_or_else(|status| panic!("create {index} through node {}: {status}", index + 1));
    }
    for endpoint in &endpoints {
        let refused = create_through(endpoint, &red, "red-over")
            .await
            .expect_err("over the minute");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
        assert!(
            refused.message().contains("creates_per_minute = 3"),
            "{}",
            refused.message()
        );
    }
    // Blue: two live agents through two nodes, the third refused through the other.
    create_through(&endpoints[0], &blue, "blue-0").await.expect("first");
    create_through(&endpoints[1], &blue, "blue-1").await.expect("second");
    let refused = create_through(&endpoints[2], &blue, "blue-2")
        .await
        .expect_err("over the live limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("max_running_agents = 2"),
        "{}",
        refused.message()
    );

    // The red admin's log holds its creates, each with the node that served it.
    let entries: Vec<serde_json::Value> = wait_for("red's refused creates in the audit log", DEADLINE, || {
        let stdout = cli(&endpoints[2], &red, &["audit", "list", "--json"]);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("JSON");
        let refused = entries
            .iter()
            .filter(|entry| entry["method"] == "AgentService/CreateAgent" && entry["result"] == "RESOURCE_EXHAUSTED")
            .count();
        async move { (refused == 3).then_some(entries) }
    })
    .await;
    let mut served_by: Vec<u64> = entries
        .iter()
        .filter(|entry| entry["method"] == "AgentService/CreateAgent" && entry["result"] == "OK")
        .map(|entry| entry["node"].as_u64().expect("a node"))
        .collect();
    served_by.sort();
    let mut node_ids: Vec<u64> = cluster.nodes.iter().map(|node| node.id).collect();
    node_ids.sort();
    assert_eq!(served_by, node_ids, "{entries:?}");
}
