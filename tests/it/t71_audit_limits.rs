//! The audit log and per-team limits on one node: creates, follow-ups, stops, key creation and
//! revocation (and a viewer's refused stop) recorded with who, team, method, target and result;
//! a team's admin reading its own team's entries only; no prompt or follow-up text in the log;
//! the (N+1)th live agent and the creates past the per-minute limit refused with
//! RESOURCE_EXHAUSTED naming the limit.

use flotilla_proto::v1;
use flotilla_tests::{agent_client, run_cli, wait_for, ClusterOptions, TestCluster};
use tonic::Code;

use crate::common::{cli, cli_key, create, create_request, follow_up, DEADLINE};

const PROMPT_TEXT: &str = "prompt-text-that-must-never-be-audited";
const FOLLOW_UP_TEXT: &str = "follow-up-text-that-must-never-be-audited";

fn key_id(endpoint: &str, key: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&cli(endpoint, key, &["key", "info", "--output", "json"])).expect("key info is JSON");
    info[0]["id"].as_str().expect("an id").to_string()
}

fn audit_list(endpoint: &str, key: &str, extra: &[&str]) -> (String, Vec<serde_json::Value>) {
    let mut args = vec!["audit", "list", "--json"];
    args.extend_from_slice(extra);
    let stdout = cli(endpoint, key, &args);
    let entries = serde_json::from_str::<Vec<serde_json::Value>>(&stdout).expect("audit list --json is a JSON array");
    (stdout, entries)
}

fn has_entry(entries: &[serde_json::Value], key_id: &str, method: &str, target: &str, result: &str) -> bool {
    entries.iter().any(|entry| {
        entry["key_id"] == key_id && entry["method"] == method && entry["target"] == target && entry["result"] == result
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_are_audited_without_their_texts_and_teams_read_their_own() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let root = cluster.admin_token();
    cli(&endpoint, &root, &["team", "create", "red"]);
    cli(&endpoint, &root, &["team", "create", "blue"]);
    let red_admin = cli_key(&endpoint, &root, "red", "ana", "admin");
    let red_member = cli_key(&endpoint, &red_admin, "red", "rita", "member");
    let red_viewer = cli_key(&endpoint, &red_admin, "red", "vic", "viewer");
    let blue_admin = cli_key(&endpoint, &root, "blue", "bob", "admin");
    let (red_admin_id, red_member_id, red_viewer_id) = (
        key_id(&endpoint, &red_admin),
        key_id(&endpoint, &red_member),
        key_id(&endpoint, &red_viewer),
    );

    let mut member = agent_client(&endpoint, &red_member).await;
    let agent = create(&mut member, "audited", PROMPT_TEXT).await;
    follow_up(&mut member, &agent.id, FOLLOW_UP_TEXT).await;
    let refused = agent_client(&endpoint, &red_viewer)
        .await
        .stop_agent(v1::StopAgentRequest {
            id: agent.id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("a viewer may not stop");
    assert_eq!(refused.code(), Code::PermissionDenied);
    member
        .stop_agent(v1::StopAgentRequest {
            id: agent.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("the member stops its agent");
    let temporary = cli_key(&endpoint, &red_admin, "red", "tim", "viewer");
    let temporary_id = key_id(&endpoint, &temporary);
    cli(&endpoint, &red_admin, &["key", "revoke", &temporary_id]);

    // Entries are written in batches after the calls answer: wait for the last one.
    let (red_output, red_entries) = wait_for("the red admin's revocation in the audit log", DEADLINE, || {
        let (output, entries) = audit_list(&endpoint, &red_admin, &[]);
        let done = has_entry(&entries, &red_admin_id, "AccessService/RevokeKey", &temporary_id, "OK");
        async move { done.then_some((output, entries)) }
    })
    .await;
    for (key, method, target, result) in [
        (&red_member_id, "AgentService/CreateAgent", &agent.id, "OK"),
        (&red_member_id, "AgentService/SendFollowUp", &agent.id, "OK"),
        (&red_member_id, "AgentService/StopAgent", &agent.id, "OK"),
        (&red_admin_id, "AccessService/CreateKey", &temporary_id, "OK"),
        (
            &red_viewer_id,
            "AgentService/StopAgent",
            &String::new(),
            "PERMISSION_DENIED",
        ),
    ] {
        assert!(
            has_entry(&red_entries, key, method, target, result),
            "no entry {key} {method} {target} {result} in\n{red_output}"
        );
    }
    let create_entry = red_entries
        .iter()
        .find(|entry| entry["method"] == "AgentService/CreateAgent")
        .expect("the create entry");
    assert_eq!(create_entry["user"], "rita", "{create_entry}");
    assert_eq!(create_entry["team"], "red", "{create_entry}");
    assert_eq!(create_entry["node"], 1, "{create_entry}");
    assert!(
        create_entry["at"].as_str().is_some_and(|at| !at.is_empty()),
        "{create_entry}"
    );
    // Reads are not audited.
    assert!(
        !red_entries
            .iter()
            .any(|entry| entry["method"] == "AccessService/GetKeyInfo"),
        "{red_output}"
    );

    let (everything, all_entries) = audit_list(&endpoint, &root, &["--since", "1h"]);
    assert!(all_entries.len() >= red_entries.len(), "{everything}");
    for text in [PROMPT_TEXT, FOLLOW_UP_TEXT] {
        assert!(
            !everything.contains(text),
            "the audit log holds {text:?}:\n{everything}"
        );
        assert!(
            !red_output.contains(text),
            "the audit log holds {text:?}:\n{red_output}"
        );
    }
    let table = cli(&endpoint, &root, &["audit", "list"]);
    assert!(
        table.contains("AgentService/CreateAgent") && table.contains(&agent.id),
        "{table}"
    );

    // Another team's admin reads its own team's entries only; a member reads none.
    let (blue_output, blue_entries) = audit_list(&endpoint, &blue_admin, &[]);
    assert!(
        blue_entries
            .iter()
            .all(|entry| entry["team"] == "blue" || entry["target_team"] == "blue"),
        "{blue_output}"
    );
    assert!(!blue_output.contains(&agent.id), "{blue_output}");
    let cross = run_cli(&endpoint, &blue_admin, &["audit", "list", "--team", "red"]);
    assert!(!cross.status.success(), "{cross:?}");
    assert!(
        String::from_utf8_lossy(&cross.stderr).contains("permission denied"),
        "{cross:?}"
    );
    let by_member = run_cli(&endpoint, &red_member, &["audit", "list"]);
    assert!(!by_member.status.success(), "{by_member:?}");
    assert!(
        String::from_utf8_lossy(&by_member.stderr).contains("permission denied"),
        "{by_member:?}"
    );
}

async fn refused_create(client: &mut flotilla_tests::AgentClient, name: &str) -> tonic::Status {
    client
        .create_agent(create_request(name, "one too many"))
        .await
        .expect_err("over the limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_past_a_teams_limits_are_refused_naming_the_limit() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let root = cluster.admin_token();
    cli(&endpoint, &root, &["team", "create", "red"]);
    cli(&endpoint, &root, &["team", "create", "blue"]);
    let red = cli_key(&endpoint, &root, "red", "rita", "member");
    let blue = cli_key(&endpoint, &root, "blue", "bob", "member");

    let refused = run_cli(
        &endpoint,
        &red,
        &["limits", "set", "--team", "red", "--max-running-agents", "1"],
    );
    assert!(!refused.status.success(), "a member may not set limits: {refused:?}");
    cli(
        &endpoint,
        &root,
        &["limits", "set", "--team", "red", "--max-running-agents", "2"],
    );
    let shown = cli(&endpoint, &red, &["limits", "get"]);
    assert!(shown.contains("max_running_agents  2"), "{shown}");

    let mut red_client = agent_client(&endpoint, &red).await;
    let first = create(&mut red_client, "r1", "red one").await;
    create(&mut red_client, "r2", "red two").await;
    let status = refused_create(&mut red_client, "r3").await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("max_running_agents = 2"),
        "the refusal names the limit: {}",
        status.message()
    );
    // Blue has no limit of its own.
    create(&mut agent_client(&endpoint, &blue).await, "b0", "blue zero").await;
    // A stopped agent frees its place.
    red_client
        .stop_agent(v1::StopAgentRequest {
            id: first.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("stop");
    create(&mut red_client, "r3", "red three").await;

    // The cluster default applies to every team without its own limit: blue made one create
    // above, within the minute.
    cli(
        &endpoint,
        &root,
        &["limits", "set", "--default", "--creates-per-minute", "3"],
    );
    let mut blue_client = agent_client(&endpoint, &blue).await;
    create(&mut blue_client, "b1", "blue one").await;
    create(&mut blue_client, "b2", "blue two").await;
    let status = refused_create(&mut blue_client, "b3").await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("creates_per_minute = 3"),
        "the refusal names the limit: {}",
        status.message()
    );
    let shown = cli(&endpoint, &blue, &["limits", "get", "--output", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
    assert_eq!(shown["creates_per_minute"], 0, "{shown}");
    assert_eq!(shown["effective_creates_per_minute"], 3, "{shown}");
}
