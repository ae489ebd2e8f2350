//! Team settings, delete, retention and privacy mode on one node, with real machines and real
//! git: a team's defaults (model, repository, and a base branch read from a bare origin whose
//! HEAD is not `main`) shape its new agents; a model outside its allow-list is refused; with
//! summary display off a member sees no summary and no file changes while the admin does; a
//! deleted agent answers NOT_FOUND (after a restart too) and its watcher is told; an ended agent
//! is purged once a short retention passes; a privacy-mode agent's prompt, model text and tool
//! output never reach the node's log.

use std::path::Path;
use std::process::Command;

use flotilla_proto::v1::{self, agent_event, watch_agent_response};
use flotilla_tests::{agent_client, run_cli, wait_for, AgentClient, ClusterOptions, TestCluster};
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{cli, create_from, get, status_of, DEADLINE};
use crate::t18_agent_runs::{config_with, request, scripted_model};

/// What stands in for hidden text (`node/src/server/visibility.rs`).
const HIDDEN: &str = "[hidden: the team's display_summary setting is off]";

/// A key made through the CLI (its secret is stdout's last line).
fn key(endpoint: &str, root: &str, team: &str, user: &str, role: &str) -> String {
    let stdout = cli(
        endpoint,
        root,
        &["key", "create", "--team", team, "--user", user, "--role", role],
    );
    stdout.lines().last().expect("a last line").trim().to_string()
}

/// A bare origin whose only branch, and HEAD, is `trunk`.
fn origin_with_head_trunk(dir: &Path) -> String {
    let url = crate::common::bare_repository(dir, "trunk-origin", &[("README.md", "trunk\n")]);
    let origin = url.strip_prefix("file://").expect("a file URL").to_string();
    for args in [
        vec!["branch", "-m", "main", "trunk"],
        vec!["symbolic-ref", "HEAD", "refs/heads/trunk"],
    ] {
        let status = Command::new("git")
            .args(["--git-dir", &origin])
            .args(&args)
            .status()
            .expect("git runs");
        assert!(status.success(), "git {args:?} in {origin}");
    }
    url
}

async fn start(config: String, env: Vec<(String, String)>) -> TestCluster {
    TestCluster::start(
        1,
        ClusterOptions {
            config: Some(config),
            env,
            ..Default::default()
        },
    )
    .await
}

async fn wait_until_ended(client: &mut AgentClient, id: &str) -> v1::Agent {
    let what = format!("agent {id} to end");
    wait_for(&what, DEADLINE, || {
        let mut client = client.clone();
        async move {
            let agent = get(&mut client, id).await?;
            matches!(
                status_of(&agent),
                v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
            )
            .then_some(agent)
        }
    })
    .await
}

/// Every durable event of an ended agent, as `client` is shown them.
async fn durable_events(client: &mut AgentClient, id: &str) -> Vec<v1::AgentEvent> {
    crate::t18_agent_runs::durable_events(client, id).await
}

#[tokio::test]
async fn team_settings_shape_new_agents_and_hide_summaries_from_members() {
    let dir = tempfile::tempdir().unwrap();
    let writer = json!({"turns": [
        {"text": "Writing.", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "notes.txt", "content": "the secret sauce\n"}}
        ]},
        {"text": "Wrote notes.txt with the sauce."}
    ]});
    let models = format!(
        "{}{}",
        scripted_model(dir.path(), "writer", writer),
        scripted_model(dir.path(), "other", json!({"turns": [{"text": "hi"}]}))
    );
    let cluster = start(config_with(&models, "other"), Vec::new()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let root = cluster.admin_token();
    cli(&endpoint, &root, &["team", "create", "red"]);
    let admin = key(&endpoint, &root, "red", "ana", "admin");
    let member = key(&endpoint, &admin, "red", "rita", "member");
    let url = origin_with_head_trunk(dir.path());

    // Defaults: as the admin sets them, through the CLI.
    let defaults = cli(&endpoint, &admin, &["settings", "get"]);
    assert!(defaults.contains("privacy_mode         on"), "{defaults}");
    assert!(defaults.contains("retention            604800s"), "{defaults}");
    cli(&endpoint, &admin, &["settings", "set", "default_model", "writer"]);
    cli(&endpoint, &admin, &["settings", "set", "default_repository", &url]);
    let refused = run_cli(&endpoint, &member, &["settings", "set", "default_model", "other"]);
    assert!(!refused.status.success(), "a member changed a setting");
    let refused = run_cli(&endpoint, &admin, &["settings", "set", "default_model", "gpt-9"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("\"gpt-9\" is not offered"),
        "{refused:?}"
    );
    let listed = cli(&endpoint, &member, &["models", "list"]);
    assert!(listed.contains("writer") && listed.contains("default"), "{listed}");

    // A member's request that names nothing takes the team's defaults and the origin's HEAD.
    let mut members = agent_client(&endpoint, &member).await;
    let blank = v1::CreateAgentRequest {
        prompt: "Write the notes".to_string(),
        ..Default::default()
    };
    let agent = create_from(&mut members, blank).await;
    assert_eq!(agent.repository, url);
    assert_eq!(agent.model, "writer");
    assert_eq!(agent.base_branch, "trunk", "the origin's HEAD, not main");
    let ended = wait_until_ended(&mut members, &agent.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    assert_eq!(ended.summary, "Wrote notes.txt with the sauce.");

    // A model outside the allow-list is refused, naming it.
    cli(&endpoint, &admin, &["settings", "set", "allowed_models", "other"]);
    let mut asked = request(&url, "x", "do it");
    asked.model = "writer".to_string();
    let status = members.create_agent(asked).await.expect_err("a model not allowed");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"writer\" is not allowed for team red"),
        "{status:?}"
    );
    let listed = cli(&endpoint, &member, &["models", "list"]);
    assert!(listed.contains("not allowed"), "{listed}");

    // Summary display off: the member sees neither summary nor file change; the admin does.
    cli(&endpoint, &admin, &["settings", "set", "display_summary", "off"]);
    let seen = get(&mut members, &agent.id).await.expect("the member's get");
    assert!(seen.summary.is_empty() && seen.summary_hidden, "{seen:?}");
    let found = members
        .list_agents(v1::ListAgentsRequest {
            search: "sauce".to_string(),
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner()
        .agents;
    assert!(found.is_empty(), "a hidden summary was searched: {found:?}");
    let events = durable_events(&mut members, &agent.id).await;
    let summary = events
        .iter()
        .find_map(|event| match &event.kind {
            Some(agent_event::Kind::Summary(summary)) => Some(summary.text.clone()),
            _ => None,
        })
        .expect("a summary event");
    assert_eq!(summary, HIDDEN);
    let write = events
        .iter()
        .find_map(|event| match &event.kind {
            Some(agent_event::Kind::ToolCallFinished(call)) if call.tool == "write_file" => Some(call.output.clone()),
            _ => None,
        })
        .expect("the write_file call");
    assert_eq!(write, HIDDEN);
    let mut admins = agent_client(&endpoint, &admin).await;
    let seen = get(&mut admins, &agent.id).await.expect("the admin's get");
    assert_eq!(seen.summary, "Wrote notes.txt with the sauce.");
    assert!(!seen.summary_hidden);
}

#[tokio::test]
async fn a_deleted_agent_is_gone_and_ended_agents_are_purged_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let models = format!(
        "{}\n{}",
        flotilla_tests::hold_config(dir.path()),
        scripted_model(dir.path(), "quick", json!({"turns": [{"text": "done"}]}))
    );
    let mut cluster = start(models, Vec::new()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let root = cluster.admin_token();
    let mut client = cluster.agent_client(1).await;
    let url = crate::common::sample_repository();

    // A running agent, watched, then deleted through the CLI.
    let running = create_from(&mut client, request(&url, "held", "hold the machine")).await;
    crate::t50_machines::wait_for_status(&endpoint, &root, &running.id, v1::AgentStatus::Running).await;
    let mut watch = client
        .watch_agent(v1::WatchAgentRequest {
            id: running.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let deleted = cli(&endpoint, &root, &["agent", "delete", &running.id]);
    assert!(deleted.contains("deleted"), "{deleted}");
    let end = tokio::time::timeout(DEADLINE, async {
        while let Some(message) = watch.next().await {
            match message {
                Ok(v1::WatchAgentResponse {
                    kind: Some(watch_agent_response::Kind::Event(_) | watch_agent_response::Kind::Snapshot(_)),
                }) => continue,
                Ok(_) => continue,
                Err(status) => return Some(status),
            }
        }
        None
    })
    .await
    .expect("the watch of a deleted agent ends");
    let end = end.expect("the watch ends with a status, not silently");
    assert_eq!(end.code(), Code::NotFound, "{end:?}");
    assert!(end.message().contains("was deleted"), "{end:?}");
    for _ in 0..2 {
        let status = client
            .get_agent(v1::GetAgentRequest { id: running.id.clone() })
            .await
            .expect_err("a deleted agent");
        assert_eq!(status.code(), Code::NotFound);
        let again = run_cli(&endpoint, &root, &["agent", "delete", &running.id]);
        assert!(!again.status.success(), "deleting twice: {again:?}");
        // The deletion is durable: a restarted node does not bring the agent back.
        cluster.nodes[0].restart();
        client = wait_for("the node to serve again", DEADLINE, || {
            let endpoint = endpoint.clone();
            let root = root.clone();
            async move {
                let mut client = agent_client(&endpoint, &root).await;
                client.list_agents(v1::ListAgentsRequest::default()).await.ok()?;
                Some(client)
            }
        })
        .await;
    }

    // A short retention purges an ended agent.
    cli(&endpoint, &root, &["settings", "set", "retention", "3s"]);
    let mut quick = request(&url, "quick", "answer and end");
    quick.model = "quick".to_string();
    let quick = create_from(&mut client, quick).await;
    let ended = wait_until_ended(&mut client, &quick.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    let what = format!("agent {} to be purged after a 3 s retention", quick.id);
    wait_for(&what, DEADLINE, || {
        let mut client = client.clone();
        let id = quick.id.clone();
        async move {
            let status = client.get_agent(v1::GetAgentRequest { id }).await.err()?;
            (status.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    let log = std::fs::read_to_string(cluster.nodes[0].log_path()).expect("the node's log");
    assert!(log.contains("purged ended agents"), "the purge is logged");
}

#[tokio::test]
async fn privacy_mode_keeps_prompts_model_text_and_tool_output_out_of_node_logs() {
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    let canary = format!("canary{nanos}x{}", std::process::id());
    let script = json!({"turns": [
        {"text": format!("Model text {canary}-model."), "tool_calls": [
            {"name": "run_command", "arguments": {"command": format!("echo {canary}-tool; exit 3")}},
            {"name": "write_file", "arguments": {"path": "c.txt", "content": format!("{canary}-file\n")}}
        ]},
        {"text": format!("Summary {canary}-summary.")}
    ]});
    let config = config_with(&scripted_model(dir.path(), "canary", script), "canary");
    // The node's own crates at debug: what an operator turns on to look closer.
    let log_level = "info,flotilla=debug,flotilla_actors=debug,flotilla_raft=debug,flotilla_state=debug,flotilla_sandbox=debug,flotilla_plugins=debug";
    let cluster = start(config, vec![("RUST_LOG".to_string(), log_level.to_string())]).await;
    let mut client = cluster.agent_client(1).await;
    let url = crate::common::sample_repository();
    let prompt = format!("Do the {canary}-prompt work");
    let agent = create_from(&mut client, request(&url, "private", &prompt)).await;
    let ended = wait_until_ended(&mut client, &agent.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    // The API still shows them while the agent is kept: the point is the log.
    assert_eq!(ended.prompt, prompt);
    assert!(ended.summary.contains(&canary), "{ended:?}");
    let log = std::fs::read_to_string(cluster.nodes[0].log_path()).expect("the node's log");
    assert!(log.contains(&agent.id), "the log covers the agent's run");
    let leaks: Vec<&str> = log
        .lines()
        .filter(|line| line.to_lowercase().contains(&canary))
        .collect();
    assert!(leaks.is_empty(), "the node's log holds the agent's content: {leaks:#?}");
}
