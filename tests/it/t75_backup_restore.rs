//! Backup and restore: `flotilla admin backup FILE` against a running two-node cluster with
//! finished agents, a plugin and a team secret; `flotilla node --restore FILE --restore-kek KEK`
//! starts a new one-node cluster that holds every agent with its events, the plugin and the
//! secret (a new agent's machine gets the secret's value). Truncated and bit-flipped backups, and
//! a restore without the key, are refused with the failed check named and the data dir left
//! empty.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_proto::v1::{self, agent_event};
use flotilla_tests::{flotilla_bin, wait_for, BearerAuth, ClusterOptions, NodeProcess, NodeSpec, TestCluster};
use serde_json::json;

use crate::common::{create_from, get, status_of};
use crate::t18_agent_runs::{config_with, durable_events, request, scripted_model};
use crate::t60_secrets::cli_set_secret;

const DEADLINE: Duration = Duration::from_secs(90);

fn ended(agent: &v1::Agent) -> bool {
    matches!(
        status_of(agent),
        v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
    )
}

async fn wait_ended(endpoint: &str, token: &str, id: &str) -> v1::Agent {
    wait_for(&format!("agent {id} to end"), DEADLINE, || {
        let (endpoint, token, id) = (endpoint.to_string(), token.to_string(), id.to_string());
        async move {
            let agent = get(&mut flotilla_tests::agent_client(&endpoint, &token).await, &id).await?;
            ended(&agent).then_some(agent)
        }
    })
    .await
}

/// The output of an agent's first command.
fn command_output(events: &[v1::AgentEvent]) -> String {
    events
        .iter()
        .find_map(|event| match &event.kind {
            Some(agent_event::Kind::ToolCallFinished(finished)) => Some(finished.output.clone()),
            _ => None,
        })
        .expect("the command's output")
}

/// Runs `flotilla node --restore` on a backup that must be refused; returns its stderr.
fn refused_restore(work: &Path, backup: &Path, kek: Option<&Path>, config: &Path) -> String {
    let data_dir = work.join(format!("refused-{}", flotilla_tests::free_port()));
    std::fs::create_dir(&data_dir).unwrap();
    let mut command = Command::new(flotilla_bin());
    command
        .args(["node", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", &format!("127.0.0.1:{}", flotilla_tests::free_port())])
        .arg("--config")
        .arg(config)
        .arg("--restore")
        .arg(backup);
    if let Some(kek) = kek {
        command.arg("--restore-kek").arg(kek);
    }
    let output = command.output().expect("run flotilla node");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "a bad restore must fail: {stderr}");
    let left: Vec<PathBuf> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert!(left.is_empty(), "a refused restore wrote {left:?}: {stderr}");
    stderr
}

#[tokio::test]
async fn a_backup_of_a_running_cluster_restores_into_a_new_cluster() {
    let work = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(work.path(), "origin", &[("README.md", "a service\n")]);
    let script = json!({"turns": [
        {"text": "Reading the token.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": "echo \"token=$BACKUP_TOKEN\""}}
        ]},
        {"text": "Done."}
    ]});
    let config = config_with(&scripted_model(work.path(), "script", script), "script");
    let mut cluster = TestCluster::start(
        2,
        ClusterOptions {
            config: Some(config.clone()),
            ..Default::default()
        },
    )
    .await;
    cluster.wait_for_members_up(2).await;
    let old_token = cluster.admin_token();
    let secret_value = "restored-secret-5e1f0c2a9b";
    let output = cli_set_secret(
        &cluster.node(1).endpoint(),
        &cluster.ca_path(),
        &old_token,
        &["secret", "set", "BACKUP_TOKEN"],
        secret_value,
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut admin = flotilla_tests::admin_client(&cluster.node(1).endpoint(), &old_token).await;
    let component = flotilla_tests::test_guest("well-behaved");
    admin
        .upload_plugin(tokio_stream::iter(crate::t55_plugins::upload_stream(
            "well-behaved",
            "1.0.0",
            &component,
        )))
        .await
        .unwrap();

    let mut client = cluster.agent_client(1).await;
    let mut old_agents = Vec::new();
    for index in 0..3 {
        let agent = create_from(&mut client, request(&url, &format!("before-{index}"), "Read the token")).await;
        old_agents.push(agent.id);
    }
    let mut old_events = Vec::new();
    for id in &old_agents {
        let agent = wait_ended(&cluster.node(1).endpoint(), &old_token, id).await;
        assert_eq!(status_of(&agent), v1::AgentStatus::Finished, "{}", agent.error);
        old_events.push(durable_events(&mut client, id).await);
    }

    // The backup, through the node that joined, while the cluster runs.
    let keep = tempfile::tempdir().unwrap();
    let backup = keep.path().join("cluster.backup");
    let output = flotilla_tests::run_cli(
        &cluster.node(2).endpoint(),
        &old_token,
        &["admin", "backup", backup.to_str().unwrap()],
    );
    let printed = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        printed.contains("3 agents") && printed.contains("1 plugins") && printed.contains("1 secrets"),
        "{printed}"
    );
    println!("backup: {printed}");
    let kek = keep.path().join("old.kek");
    std::fs::copy(cluster.node(1).spec().data_dir.join("kek"), &kek).unwrap();
    let config_path = keep.path().join("node.toml");
    std::fs::write(&config_path, flotilla_tests::with_local_repositories_allowed(config)).unwrap();
    drop(cluster);

    // Corrupt and incomplete backups, and a restore without the key, write nothing.
    let bytes = std::fs::read(&backup).unwrap();
    let truncated = keep.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let stderr = refused_restore(keep.path(), &truncated, Some(&kek), &config_path);
    assert!(stderr.contains("truncated backup: the body ends at byte"), "{stderr}");
    let mut flipped = bytes.clone();
    let middle = bytes.len() * 3 / 4;
    flipped[middle] ^= 0x10;
    let flipped_path = keep.path().join("flipped.backup");
    std::fs::write(&flipped_path, &flipped).unwrap();
    let stderr = refused_restore(keep.path(), &flipped_path, Some(&kek), &config_path);
    assert!(stderr.contains("the body's SHA-256 is"), "{stderr}");
    let stderr = refused_restore(keep.path(), &backup, None, &config_path);
    assert!(
        stderr.contains("pass the old cluster's key with --restore-kek"),
        "{stderr}"
    );

    // The restore: a new cluster of one node.
    let data_dir = keep.path().join("restored");
    let mut node = NodeProcess::spawn(NodeSpec {
        id: 10,
        host: std::net::Ipv4Addr::LOCALHOST,
        netns: None,
        grpc_port: flotilla_tests::free_port(),
        data_dir: data_dir.clone(),
        region: "local".to_string(),
        slots: 8,
        join: None,
        lease_ms: None,
        extra_args: vec![
            "--restore".to_string(),
            backup.display().to_string(),
            "--restore-kek".to_string(),
            kek.display().to_string(),
        ],
        config_path,
        env: Vec::new(),
    });
    let token_path = data_dir.join("admin.token");
    wait_for("the restored node to write its admin token", DEADLINE, || {
        node.assert_running("restoring");
        let written = std::fs::read_to_string(&token_path).is_ok_and(|token| !token.trim().is_empty());
        async move { written.then_some(()) }
    })
    .await;
    flotilla_tests::trust_cluster_ca(&data_dir.join("ca.pem"));
    let new_token = std::fs::read_to_string(&token_path).unwrap().trim().to_string();
    let endpoint = node.endpoint();
    let members = wait_for("the restored cluster to list its one member up", DEADLINE, || {
        let (endpoint, token) = (endpoint.clone(), new_token.clone());
        async move {
            let cluster = flotilla_tests::try_get_cluster(&endpoint, &token).await?;
            (cluster.members.iter().any(|member| member.id == 10 && member.up)).then_some(cluster.members)
        }
    })
    .await;
    assert_eq!(members.len(), 1, "the old nodes are gone: {members:?}");

    // Every agent and its history, through the new key and through the old one.
    for token in [&new_token, &old_token] {
        let mut client = flotilla_tests::agent_client(&endpoint, token).await;
        for (id, events) in old_agents.iter().zip(&old_events) {
            let agent = get(&mut client, id).await.expect("a restored agent");
            assert_eq!(status_of(&agent), v1::AgentStatus::Finished);
            let restored = durable_events(&mut client, id).await;
            assert_eq!(
                restored.iter().map(|event| event.sequence).collect::<Vec<_>>(),
                events.iter().map(|event| event.sequence).collect::<Vec<_>>(),
                "agent {id}'s events"
            );
            assert_eq!(command_output(&restored), command_output(events));
        }
    }
    let mut admin = flotilla_tests::admin_client(&endpoint, &new_token).await;
    let plugins = crate::t55_plugins::list(&mut admin, "well-behaved").await;
    assert_eq!(plugins.len(), 1, "{plugins:?}");
    assert!(plugins[0].enabled && plugins[0].loaded_here, "{:?}", plugins[0]);
    let channel = flotilla_tests::channel(&endpoint);
    let mut secrets =
        v1::secret_service_client::SecretServiceClient::with_interceptor(channel, BearerAuth::new(&new_token));
    let listed = secrets
        .list_secrets(v1::ListSecretsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(format!("{listed:?}").contains("BACKUP_TOKEN"), "{listed:?}");

    // A new agent's machine gets the restored secret's value (the redactor names it).
    let mut client = flotilla_tests::agent_client(&endpoint, &new_token).await;
    let agent = create_from(&mut client, request(&url, "after", "Read the token")).await;
    let finished = wait_ended(&endpoint, &new_token, &agent.id).await;
    assert_eq!(status_of(&finished), v1::AgentStatus::Finished, "{}", finished.error);
    let output = command_output(&durable_events(&mut client, &agent.id).await);
    assert!(output.contains("token=[redacted:BACKUP_TOKEN]"), "{output}");
}

/// A data dir stamped with a newer state format is refused at start, naming both versions.
#[tokio::test]
async fn a_data_dir_of_a_newer_state_format_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("node");
    std::fs::create_dir(&data_dir).unwrap();
    let newer = flotilla_raft::STATE_FORMAT_VERSION + 1;
    std::fs::write(data_dir.join("state-format"), format!("{newer}\n")).unwrap();
    let config = work.path().join("node.toml");
    std::fs::write(&config, flotilla_tests::hold_config(work.path())).unwrap();
    let output = Command::new(flotilla_bin())
        .args(["node", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", &format!("127.0.0.1:{}", flotilla_tests::free_port())])
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run flotilla node");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let wanted = format!(
        "holds state format {newer}, newer than this binary's {}",
        flotilla_raft::STATE_FORMAT_VERSION
    );
    assert!(stderr.contains(&wanted), "{stderr}");
}

/// A node refuses to join a cluster whose state format is newer than its own, naming both.
#[tokio::test]
async fn a_node_refuses_to_join_a_cluster_of_a_newer_state_format() {
    let newer = flotilla_raft::STATE_FORMAT_VERSION + 1;
    let cluster = TestCluster::start(
        1,
        ClusterOptions {
            env: vec![("FLOTILLA_TEST_HOOK_STATE_FORMAT_VERSION".to_string(), newer.to_string())],
            ..Default::default()
        },
    )
    .await;
    let token = cluster.mint_join_token();
    let config_path = cluster.dir.path().join("older.toml");
    std::fs::write(&config_path, flotilla_tests::hold_config(cluster.dir.path())).unwrap();
    let mut node = NodeProcess::spawn(NodeSpec {
        id: 2,
        host: std::net::Ipv4Addr::LOCALHOST,
        netns: None,
        grpc_port: flotilla_tests::free_port(),
        data_dir: cluster.dir.path().join("older"),
        region: "local".to_string(),
        slots: 8,
        join: Some(cluster.node(1).endpoint()),
        lease_ms: None,
        extra_args: Vec::new(),
        config_path,
        env: vec![(flotilla_tests::JOIN_TOKEN_ENV.to_string(), token)],
    });
    node.wait_exit(DEADLINE);
    let log = node.log_tail(20);
    let wanted = format!(
        "reads state format {}, older than this cluster's {newer}",
        flotilla_raft::STATE_FORMAT_VERSION
    );
    assert!(log.contains(&wanted), "{log}");
    let members = flotilla_tests::try_get_cluster(&cluster.node(1).endpoint(), &cluster.admin_token())
        .await
        .expect("the cluster answers");
    assert_eq!(
        members.members.len(),
        1,
        "the older node is not a member: {:?}",
        members.members
    );
}
