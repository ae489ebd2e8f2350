//! AWS role assumption against a real local STS (moto in server mode, from the set-up's
//! `.venv`): a team secret names a role, the node assumes it with its own credentials and the
//! machine gets session credentials, the secret key and token redacted in events; with STS
//! gone, the next agent fails with the STS error within a bound instead of hanging. The
//! machine's credentials file is rewritten with a new session while the agent runs, and a
//! renewal that fails is an event while the agent goes on.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_proto::v1::{self, agent_event};
use flotilla_tests::{wait_for, ClusterOptions, TestCluster};
use serde_json::json;

use crate::common::{create_from, status_of};
use crate::t18_agent_runs::{config_with, durable_events, request, scripted_model, wait_for_agent};
use crate::t60_secrets::cli_set_secret;

/// A moto server on a loopback port, killed on drop.
struct Moto {
    child: Child,
    address: SocketAddr,
}

impl Moto {
    async fn start() -> Moto {
        let server = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
        assert!(
            server.exists(),
            "{} is missing: run scripts/setup (it installs moto[server] into .venv)",
            server.display()
        );
        let address = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &address.port().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let what = format!("moto_server to listen on {address}");
        wait_for(&what, Duration::from_secs(60), || async move {
            tokio::net::TcpStream::connect(address).await.ok().map(drop)
        })
        .await;
        Moto { child, address }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node whose own AWS credentials are fixed test values and whose STS is `moto`, and the
/// default team's role secret set; returns the cluster and its admin token.
async fn cluster_with_team_role(config: String, moto: &Moto) -> (TestCluster, String) {
    let mut cluster = TestCluster::start(
        1,
        ClusterOptions {
            config: Some(config),
            env: vec![
                ("AWS_ACCESS_KEY_ID".to_string(), "node-key-id".to_string()),
                ("AWS_SECRET_ACCESS_KEY".to_string(), "node-secret-key".to_string()),
                ("AWS_ENDPOINT_URL_STS".to_string(), format!("http://{}", moto.address)),
                ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
            ],
            ..Default::default()
        },
    )
    .await;
    cluster.wait_for_members_up(1).await;
    let token = cluster.admin_token();
    let output = cli_set_secret(
        &cluster.node(1).endpoint(),
        &cluster.ca_path(),
        &token,
        &["secret", "set", "FLOTILLA_AWS_ASSUME_IAM_ROLE_ARN"],
        "arn:aws:iam::123456789012:role/flotilla-test",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    (cluster, token)
}

async fn run_to_end(cluster: &TestCluster, url: &str, name: &str) -> v1::Agent {
    let mut client = cluster.agent_client(1).await;
    let agent = create_from(&mut client, request(url, name, "Print the AWS environment")).await;
    wait_for_agent(cluster, &agent.id, "to end", |agent| {
        matches!(
            status_of(agent),
            v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
        )
    })
    .await
}

#[tokio::test]
async fn a_team_role_gives_the_machine_session_credentials_and_a_dead_sts_fails_the_agent() {
    let mut moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let script = json!({"turns": [
        {"text": "Looking at the AWS environment.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": "env | grep ^AWS_ | sort"}}
        ]},
        {"text": "Done."}
    ]});
    let config = config_with(&scripted_model(dir.path(), "script", script), "script");
    let (cluster, token) = cluster_with_team_role(config, &moto).await;
    // The team's external ID, for the role's trust policy: shown, and the same every time.
    let shown = |args: &[&str]| {
        let output = flotilla_tests::run_cli(&cluster.node(1).endpoint(), &token, args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let team = shown(&["team", "show"]);
    let external_id = team
        .lines()
        .find_map(|line| line.strip_prefix("aws external id: "))
        .unwrap_or_else(|| panic!("no external id in {team:?}"))
        .to_string();
    assert!(
        external_id.starts_with("flotilla-") && external_id.len() == 41,
        "{external_id}"
    );
    assert_eq!(shown(&["team", "show"]), team);
    let missing = flotilla_tests::run_cli(&cluster.node(1).endpoint(), &token, &["team", "show", "nosuch"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("team nosuch not found"));

    let ended = run_to_end(&cluster, &url, "aws-reader").await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    let mut client = cluster.agent_client(1).await;
    let events = durable_events(&mut client, &ended.id).await;
    let printed = events
        .iter()
        .find_map(|event| match &event.kind {
            Some(agent_event::Kind::ToolCallFinished(finished)) => Some(finished.output.clone()),
            _ => None,
        })
        .expect("the command's output");
    let key_id = printed
        .lines()
        .find_map(|line| line.strip_prefix("AWS_ACCESS_KEY_ID="))
        .unwrap_or_else(|| panic!("no access key id in the machine: {printed}"));
    assert!(
        key_id.starts_with("ASIA") || key_id.starts_with("FSIA"),
        "the machine's key id {key_id:?} is not a session key STS issued"
    );
    assert!(
        printed.contains("AWS_SECRET_ACCESS_KEY=[redacted:AWS_SECRET_ACCESS_KEY]"),
        "{printed}"
    );
    assert!(
        printed.contains("AWS_SESSION_TOKEN=[redacted:AWS_SESSION_TOKEN]"),
        "{printed}"
    );
    assert!(
        !printed.contains("node-secret-key"),
        "the node's own key reached the machine"
    );

    // STS gone: the agent fails with the STS error, within the node's bound and the SDK's retries.
    moto.child.kill().unwrap();
    moto.child.wait().unwrap();
    let started = Instant::now();
    let failed = run_to_end(&cluster, &url, "aws-unreachable").await;
    assert_eq!(status_of(&failed), v1::AgentStatus::Failed, "{failed:?}");
    assert!(
        failed
            .error
            .contains("assuming AWS role [redacted:FLOTILLA_AWS_ASSUME_IAM_ROLE_ARN] failed"),
        "{}",
        failed.error
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "failing took {:?}",
        started.elapsed()
    );
}

/// The tool outputs of an agent's durable events, in order.
fn tool_outputs(events: &[v1::AgentEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(agent_event::Kind::ToolCallFinished(finished)) => Some(finished.output.clone()),
            _ => None,
        })
        .collect()
}

fn key_id_in_file(output: &str) -> &str {
    output
        .lines()
        .find_map(|line| line.strip_prefix("aws_access_key_id = "))
        .unwrap_or_else(|| panic!("no aws_access_key_id in the credentials file: {output}"))
}

#[tokio::test]
async fn the_machine_credentials_file_is_renewed_while_the_agent_runs_and_a_failed_renewal_is_an_event() {
    let mut moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let file = "\"$AWS_SHARED_CREDENTIALS_FILE\"";
    let script = json!({"turns": [
        {"text": "Reading the credentials file.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": format!(
                "echo \"path $AWS_SHARED_CREDENTIALS_FILE\"; echo \"env key $AWS_ACCESS_KEY_ID\"; echo \"mode $(stat -c '%a %U' {file}) user $(id -un)\"; cat {file}"
            )}}
        ]},
        // Waits (inside the machine, with a deadline) until the node has rewritten the file.
        {"text": "Waiting for new credentials.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": format!(
                "for i in $(seq 1 300); do grep -q \"aws_access_key_id = $AWS_ACCESS_KEY_ID\" {file} || break; sleep 0.1; done; cat {file}"
            )}}
        ]},
        // Runs on while the node fails to renew (its STS is gone).
        {"text": "Working a while longer.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": "sleep 8; echo worked"}}
        ]},
        {"text": "Done."}
    ]});
    let config = format!(
        "{}\n[aws]\nrenew_after_seconds = 2\n",
        config_with(&scripted_model(dir.path(), "script", script), "script")
    );
    let (cluster, _token) = cluster_with_team_role(config, &moto).await;

    let mut client = cluster.agent_client(1).await;
    let agent = create_from(&mut client, request(&url, "aws-renewal", "Use AWS for a while")).await;
    // The file was renewed (turn 2 recorded): STS goes away before the next renewal.
    wait_for_agent(&cluster, &agent.id, "turn 2 to be recorded", |agent| {
        agent.turns >= 2 || status_of(agent) != v1::AgentStatus::Running && agent.turns > 0
    })
    .await;
    moto.child.kill().unwrap();
    moto.child.wait().unwrap();
    let ended = wait_for_agent(&cluster, &agent.id, "to end", |agent| {
        matches!(
            status_of(agent),
            v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
        )
    })
    .await;
    assert_eq!(
        status_of(&ended),
        v1::AgentStatus::Finished,
        "the agent goes on with its current credentials: {}",
        ended.error
    );
    let events = durable_events(&mut client, &ended.id).await;
    let outputs = tool_outputs(&events);
    assert!(outputs.len() >= 3, "{outputs:?}");
    let first = &outputs[0];
    assert!(first.contains("path /tmp/flotilla-aws/credentials"), "{first}");
    let mode_line = first
        .lines()
        .find(|line| line.starts_with("mode "))
        .expect("the mode line");
    let fields: Vec<&str> = mode_line.split_whitespace().collect();
    assert_eq!(fields[1], "600", "the file is private: {mode_line}");
    assert_eq!(fields[2], fields[4], "the machine's user owns the file: {mode_line}");
    assert!(first.contains("[default]"), "{first}");
    // The session the machine started with (the file may already hold a later one: the first
    // renewal comes two seconds after it).
    let first_key = first
        .lines()
        .find_map(|line| line.strip_prefix("env key "))
        .unwrap_or_else(|| panic!("no key id in the environment: {first}"));
    assert!(
        first_key.starts_with("ASIA") || first_key.starts_with("FSIA"),
        "{first}"
    );
    let renewed = &outputs[1];
    let renewed_key = key_id_in_file(renewed);
    assert_ne!(renewed_key, first_key, "the file was not rewritten: {renewed}");
    for output in [first, renewed] {
        assert!(
            output.contains("aws_secret_access_key = [redacted:AWS_SECRET_ACCESS_KEY]"),
            "{output}"
        );
        assert!(
            output.contains("aws_session_token = [redacted:AWS_SESSION_TOKEN]"),
            "{output}"
        );
    }
    let failure = events
        .iter()
        .find_map(|event| match &event.kind {
            Some(agent_event::Kind::Log(log)) if log.text.contains("renewing the credentials") => {
                Some(log.text.clone())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no event tells of the failed renewal: {events:?}"));
    assert!(
        // The role's ARN is a secret's value: redacted like every other.
        failure.contains("AWS role [redacted:FLOTILLA_AWS_ASSUME_IAM_ROLE_ARN]")
            && failure.contains("the machine keeps the current ones"),
        "{failure}"
    );
    eprintln!("renewed {first_key} -> {renewed_key}; failure recorded: {failure}");
}
