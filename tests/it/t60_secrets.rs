//! Secrets end to end on two nodes: a team secret set through the CLI on the node that joined
//! (it got the cluster's key-encryption key in its `Join` answer) and a user secret set through
//! the API reach the agent's machine as environment variables; every event shows
//! `[redacted:NAME]` instead of the values, and no file the cluster wrote (data dirs, logs,
//! RocksDB, Raft log) holds a value.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use flotilla_proto::v1::secret_service_client::SecretServiceClient;
use flotilla_proto::v1::{self, agent_event};
use flotilla_tests::{flotilla_bin, BearerAuth, ClusterOptions, TestCluster};
use serde_json::json;

use crate::common::{create_from, status_of};
use crate::t18_agent_runs::{config_with, durable_events, request, scripted_model, wait_for_agent};

/// A value no file holds by chance.
fn unique(label: &str) -> String {
    {
        use rand::RngCore;
        let mut bytes = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut bytes);
        format!(
            "{label}-{}",
            bytes.iter().map(|byte| format!("{byte:02x}")).collect::<String>()
        )
    }
}

/// Files under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_symlink() {
            continue;
        }
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|entry| entry.path()));
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|window| window == needle.as_bytes()) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

pub(crate) fn cli_set_secret(
    endpoint: &str,
    ca: &std::path::Path,
    token: &str,
    args: &[&str],
    value: &str,
) -> std::process::Output {
    let mut child = Command::new(flotilla_bin())
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env("FLOTILLA_TOKEN", token)
        .env("FLOTILLA_CA_CERT", ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CLI");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{value}\n").as_bytes())
        .expect("write the value");
    child.wait_with_output().expect("the CLI ends")
}

#[tokio::test]
async fn team_and_user_secrets_reach_the_machine_and_nothing_else() {
    let team_value = unique("team-secret");
    let user_value = unique("user-secret");
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let script = json!({"turns": [
        {"text": "Looking at the environment.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": "echo \"team=$TEAM_TOKEN user=$USER_TOKEN\"; env | grep _TOKEN= | sort"}}
        ]},
        {"text": format!("Done; the user token was {user_value}.")}
    ]});
    let config = config_with(&scripted_model(dir.path(), "script", script), "script");
    let mut cluster = TestCluster::start(
        2,
        ClusterOptions {
            config: Some(config),
            ..Default::default()
        },
    )
    .await;
    cluster.wait_for_members_up(2).await;
    let token = cluster.admin_token();
    let kek_1 = std::fs::read_to_string(cluster.node(1).spec().data_dir.join("kek")).unwrap();
    let kek_2 = std::fs::read_to_string(cluster.node(2).spec().data_dir.join("kek")).unwrap();
    assert_eq!(kek_1, kek_2, "the joined node holds the cluster's key-encryption key");

    // The team secret through the CLI, on the node that joined; the value comes on stdin.
    let output = cli_set_secret(
        &cluster.node(2).endpoint(),
        &cluster.ca_path(),
        &token,
        &["secret", "set", "TEAM_TOKEN"],
        &team_value,
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The user secret through the API, on the other node.
    let channel = flotilla_tests::channel(&cluster.node(1).endpoint());
    let mut secrets = SecretServiceClient::with_interceptor(channel, BearerAuth::new(&token));
    secrets
        .set_secret(v1::SetSecretRequest {
            name: "USER_TOKEN".to_string(),
            value: user_value.clone().into_bytes(),
            scope: v1::SecretScopeKind::User as i32,
            team: String::new(),
        })
        .await
        .unwrap();
    let refused = secrets
        .set_secret(v1::SetSecretRequest {
            name: "bad name".to_string(),
            value: b"whatever-value".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");

    let listed = flotilla_tests::run_cli(&cluster.node(1).endpoint(), &token, &["secret", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed.contains("TEAM_TOKEN") && listed.contains("USER_TOKEN"),
        "{listed}"
    );
    assert!(
        !listed.contains(&team_value) && !listed.contains(&user_value),
        "{listed}"
    );

    let mut client = cluster.agent_client(1).await;
    let agent = create_from(&mut client, request(&url, "env-reader", "Print the environment")).await;
    let ended = wait_for_agent(&cluster, &agent.id, "to end", |agent| {
        matches!(
            status_of(agent),
            v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
        )
    })
    .await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    assert!(ended.summary.contains("[redacted:USER_TOKEN]"), "{}", ended.summary);

    let events = durable_events(&mut client, &agent.id).await;
    let output = events
        .iter()
        .find_map(|event| match &event.kind {
            Some(agent_event::Kind::ToolCallFinished(finished)) => Some(finished.output.clone()),
            _ => None,
        })
        .expect("the command's output");
    // The machine saw both values: the redactor found them in what it printed.
    assert!(
        output.contains("team=[redacted:TEAM_TOKEN] user=[redacted:USER_TOKEN]"),
        "{output}"
    );
    assert!(output.contains("TEAM_TOKEN=[redacted:TEAM_TOKEN]"), "{output}");
    let shown = format!("{events:?}");
    for value in [&team_value, &user_value] {
        assert!(!shown.contains(value.as_str()), "an event holds a secret value");
    }

    // Nothing the cluster wrote holds a value: data dirs (RocksDB, Raft log, snapshots) and logs.
    let cluster_dir = cluster.node(1).spec().data_dir.parent().unwrap().to_path_buf();
    for value in [&team_value, &user_value] {
        let holding = files_holding(&cluster_dir, value);
        assert!(holding.is_empty(), "files holding a secret value: {holding:?}");
    }
}
