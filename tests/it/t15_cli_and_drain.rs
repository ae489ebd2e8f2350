//! The command-line client against a real node, and draining a node.

use std::os::unix::fs::PermissionsExt as _;

use flotilla_proto::v1;
use flotilla_tests::{agent_client, wait_for, ClusterOptions, TestCluster};

use crate::common::{create, get, sample_repository, status_of, DEADLINE};

fn stdout_of(output: &std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_gets_and_stops_agents() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let mode = std::fs::metadata(cluster.nodes[0].data_dir.join("admin.token"))
        .expect("admin token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the admin token is private to its owner");

    let repository = sample_repository();
    let id = stdout_of(
        &cluster.run_cli(
            1,
            &[
                "agent",
                "create",
                "--repo",
                &repository,
                "--prompt",
                "Add a CLI test",
                "--name",
                "cli-made",
            ],
        ),
        "agent create",
    )
    .trim()
    .to_string();
    assert_eq!(id.len(), 26, "create prints the id alone: {id:?}");

    let listed = stdout_of(
        &cluster.run_cli(1, &["--output", "json", "agent", "list"]),
        "agent list",
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("list prints JSON");
    let first = &listed.as_array().expect("an array")[0];
    assert_eq!(first["id"], id.as_str());
    assert_eq!(first["name"], "cli-made");
    assert_eq!(first["repository"], repository.as_str());
    assert!(
        first.get("work_branch").is_some(),
        "snake_case proto field names: {first}"
    );

    let table = stdout_of(
        &cluster.run_cli(1, &["agent", "list", "--search", "cli"]),
        "agent list --search",
    );
    assert!(table.contains(&id), "{table}");
    let none = stdout_of(
        &cluster.run_cli(1, &["agent", "list", "--search", "no-such-text"]),
        "empty search",
    );
    assert!(!none.contains(&id), "{none}");

    let fetched = stdout_of(
        &cluster.run_cli(1, &["--output", "json", "agent", "get", &id]),
        "agent get",
    );
    let fetched: serde_json::Value = serde_json::from_str(&fetched).expect("get prints JSON");
    assert_eq!(fetched["prompt"], "Add a CLI test");

    stdout_of(&cluster.run_cli(1, &["agent", "stop", &id]), "agent stop");
    let watched = stdout_of(&cluster.run_cli(1, &["agent", "watch", &id]), "agent watch");
    assert!(
        watched.contains("stopped"),
        "watch of a stopped agent replays to the end: {watched}"
    );

    let refused = cluster.run_cli(1, &["agent", "followup", &id, "more please"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("stopped"), "{stderr}");
    let unknown = cluster.run_cli(1, &["agent", "get", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not found"));

    let status = stdout_of(&cluster.run_cli(1, &["cluster", "status"]), "cluster status");
    assert!(status.contains("leader"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_takes_no_new_agents_until_the_drain_is_lifted() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let mut client = agent_client(&endpoint, &token).await;
    stdout_of(&cluster.run_cli(1, &["cluster", "drain", "1"]), "cluster drain");
    let mut cluster_client = flotilla_tests::cluster_client(&endpoint, &token).await;
    let view = cluster_client
        .get_cluster(v1::GetClusterRequest {})
        .await
        .expect("cluster")
        .into_inner();
    assert!(view.members[0].draining);

    let agent = create(&mut client, "waits", "Wait for a node").await;
    // The scheduler skips draining nodes and the state machine refuses assignments to them
    // (unit-tested in raft); here the agents must still be unplaced once the drain is lifted.
    let other = create(&mut client, "also-waits", "Also wait").await;
    for id in [&agent.id, &other.id] {
        let found = get(&mut client, id).await.expect("exists");
        assert_eq!(status_of(&found), v1::AgentStatus::Pending);
        assert!(found.assignment.is_none(), "a draining node takes nothing");
    }

    stdout_of(
        &cluster.run_cli(1, &["cluster", "drain", "1", "--undo"]),
        "cluster drain --undo",
    );
    wait_for(
        "the waiting agent to be placed after the drain is lifted",
        DEADLINE,
        || {
            let endpoint = endpoint.clone();
            let token = token.clone();
            let id = agent.id.clone();
            async move {
                let found = get(&mut agent_client(&endpoint, &token).await, &id).await?;
                // A failure ends the wait at once with the agent's own error.
                assert_ne!(
                    status_of(&found),
                    v1::AgentStatus::Failed,
                    "agent failed: {}",
                    found.error
                );
                (status_of(&found) == v1::AgentStatus::Running).then_some(())
            }
        },
    )
    .await;

    let (code, message) = match cluster_client
        .drain_node(v1::DrainNodeRequest {
            node_id: 9,
            drain: true,
        })
        .await
    {
        Err(status) => (status.code(), status.message().to_string()),
        Ok(_) => panic!("draining an unknown node must fail"),
    };
    assert_eq!(code, tonic::Code::NotFound, "{message}");
}

#[test]
fn env_check_prints_the_plan_or_names_the_line_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good");
    std::fs::create_dir_all(good.join(".cursor")).expect("dirs");
    std::fs::write(
        good.join(".cursor/environment.json"),
        r#"{"snapshot": "POPULATED_FROM_SETTINGS", "install": "npm install", "terminals": [{"name": "Run Next.js", "command": "npm run dev"}]}"#,
    )
    .expect("write");
    let output = std::process::Command::new(flotilla_tests::flotilla_bin())
        .args(["env", "check"])
        .arg(&good)
        .output()
        .expect("run env check");
    let plan = stdout_of(&output, "env check");
    assert!(plan.contains(".cursor/environment.json"), "{plan}");
    assert!(plan.contains("npm install") && plan.contains("Run Next.js"), "{plan}");

    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join(".flotilla")).expect("dirs");
    std::fs::write(
        bad.join(".flotilla/environment.json"),
        "{\n  \"install\": \"x\",\n  \"terminals\": \"npm\"\n}\n",
    )
    .expect("write");
    let output = std::process::Command::new(flotilla_tests::flotilla_bin())
        .args(["env", "check"])
        .arg(&bad)
        .output()
        .expect("run env check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(".flotilla/environment.json line 3 column")
            && stderr.contains("\"terminals\" must be an array"),
        "{stderr}"
    );
}
