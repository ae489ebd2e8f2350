//! A VCS provider the binary has never heard of ("skiff", a test guest) is added to a running
//! three-node cluster: before it, a repository of that forge is refused at create time; after
//! it, agents clone and push through its clone spec and open pull requests through its REST
//! API, on whichever node runs them, with no restart. A new version replaces it while a pull
//! request call is in flight: that call finishes on the old version, the next agent gets the new.

use flotilla_proto::v1::{self, agent_event};
use flotilla_tests::fakes::{create_bare_repository, GitHttpServer, SkiffForge};
use flotilla_tests::{wait_for, ClusterOptions, TestCluster};
use serde_json::json;
use tonic::Code;

use crate::common::{create_from, status_of, DEADLINE};
use crate::t18_agent_runs::{config_with, durable_events, request, scripted_model, show, wait_for_agent};
use crate::t56_plugins_everywhere::wait_everywhere;

const TOKEN: &str = "skiff-secret-token";

async fn run_to_the_end(
    cluster: &TestCluster,
    client: &mut flotilla_tests::AgentClient,
    repository: &str,
    name: &str,
) -> v1::Agent {
    let mut create = request(repository, name, &format!("Add the {name} note"));
    create.open_pull_request = true;
    let agent = create_from(client, create).await;
    wait_for_agent(cluster, &agent.id, "to end", ended).await
}

fn ended(agent: &v1::Agent) -> bool {
    matches!(
        status_of(agent),
        v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
    )
}

/// A Skiff forge on loopback: its git smart-HTTP server (Basic auth, user `skiff`) with one
/// repository, `acme/widgets`, and its REST API.
pub(crate) struct SkiffWorld {
    pub(crate) git: GitHttpServer,
    pub(crate) forge: SkiffForge,
    /// The bare repository on disk.
    pub(crate) origin: std::path::PathBuf,
    /// Its URL, as agents are created with.
    pub(crate) repository: String,
}

impl SkiffWorld {
    pub(crate) async fn start(dir: &std::path::Path) -> SkiffWorld {
        std::fs::create_dir_all(dir.join("forge")).unwrap();
        let git = GitHttpServer::start(dir.join("forge"), "skiff", TOKEN).await;
        create_bare_repository(git.project_root(), "acme/widgets", &[("README.md", "widgets\n")]);
        let forge = SkiffForge::start(TOKEN).await;
        forge.add_repository("acme/widgets");
        SkiffWorld {
            origin: git.repository_path("acme/widgets"),
            repository: format!("{}/acme/widgets", git.base_url()),
            git,
            forge,
        }
    }

    /// Writes the forge token as the `skiff-token` secret of every node.
    pub(crate) fn give_token_to(&self, cluster: &TestCluster) {
        for node in &cluster.nodes {
            let secrets = node.spec().data_dir.join("secrets");
            std::fs::create_dir_all(&secrets).unwrap();
            std::fs::write(secrets.join("skiff-token"), TOKEN).unwrap();
        }
    }

    /// Sets the `skiff` plugin's hosts and API base through `node`'s CLI.
    pub(crate) fn configure(&self, cluster: &TestCluster, node: u64) {
        let configured = cluster.run_cli(
            node,
            &[
                "plugin",
                "configure",
                "skiff",
                &format!("hosts={}", self.git.address()),
                &format!("api-base={}", self.forge.api_base()),
            ],
        );
        assert!(
            configured.status.success(),
            "{}",
            String::from_utf8_lossy(&configured.stderr)
        );
    }
}

/// A node config with the scripted model `script` and no built-in providers: only an uploaded
/// plugin can claim a repository.
pub(crate) fn skiff_config(dir: &std::path::Path, script: serde_json::Value) -> String {
    format!(
        "{}\n[plugins]\nbuiltins = []\n",
        config_with(&scripted_model(dir, "script", script), "script")
    )
}

pub(crate) fn add_plugin(cluster: &TestCluster, node: u64, file: &std::path::Path, version: &str, grant: &str) {
    let output = cluster.run_cli(
        node,
        &[
            "plugin",
            "add",
            &file.display().to_string(),
            "--name",
            "skiff",
            "--version",
            version,
            "--grant-host",
            grant,
        ],
    );
    assert!(
        output.status.success(),
        "plugin add {version}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_added_while_the_cluster_runs_pushes_and_opens_pull_requests() {
    let dir = tempfile::tempdir().unwrap();
    let skiff = SkiffWorld::start(dir.path()).await;

    let script = json!({"turns": [
        {"text": "Writing the note.", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "NOTE.md", "content": "noted\n"}},
            {"name": "echo", "arguments": {"text": "from the model"}}
        ]},
        {"text": "Added NOTE.md."}
    ]});
    let cluster = TestCluster::start(
        3,
        ClusterOptions {
            config: Some(skiff_config(dir.path(), script)),
            ..Default::default()
        },
    )
    .await;
    skiff.give_token_to(&cluster);
    let mut client = cluster.agent_client(2).await;

    check_a_repository_no_provider_claims_is_refused(&mut client, &skiff.repository).await;
    add_the_skiff_provider_and_the_echo_tool(&cluster, &skiff, dir.path()).await;
    check_an_agent_pushes_opens_a_pull_request_and_calls_the_tool(&cluster, &mut client, &skiff).await;
    check_a_new_version_replaces_the_plugin_while_a_call_is_in_flight(&cluster, &mut client, &skiff, dir.path()).await;
}

async fn check_a_repository_no_provider_claims_is_refused(client: &mut flotilla_tests::AgentClient, repository: &str) {
    let mut create = request(repository, "early", "Too early");
    create.open_pull_request = true;
    let refused = client
        .create_agent(create)
        .await
        .expect_err("no provider claims the repository yet");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no VCS provider plugin is enabled"),
        "{}",
        refused.message()
    );
}

/// The admin configures and uploads the provider through node 3; every node loads it.
async fn add_the_skiff_provider_and_the_echo_tool(cluster: &TestCluster, skiff: &SkiffWorld, dir: &std::path::Path) {
    skiff.configure(cluster, 3);
    let v1_file = dir.join("skiff-1.wasm");
    std::fs::write(&v1_file, flotilla_tests::test_guest("skiff")).unwrap();
    add_plugin(cluster, 3, &v1_file, "1.0.0", &skiff.forge.host());
    wait_everywhere(cluster, "skiff", "1.0.0", true).await;
    // A tool plugin joins the agents' tool list.
    let tool_file = dir.join("echo.wasm");
    std::fs::write(&tool_file, flotilla_tests::test_guest("echo-tool")).unwrap();
    let added = cluster.run_cli(
        2,
        &["plugin", "add", &tool_file.display().to_string(), "--version", "0.1.0"],
    );
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    wait_everywhere(cluster, "echo", "0.1.0", true).await;
}

async fn check_an_agent_pushes_opens_a_pull_request_and_calls_the_tool(
    cluster: &TestCluster,
    client: &mut flotilla_tests::AgentClient,
    skiff: &SkiffWorld,
) {
    let (forge, origin, repository) = (&skiff.forge, &skiff.origin, &skiff.repository);
    let first = run_to_the_end(cluster, client, repository, "first").await;
    assert_eq!(status_of(&first), v1::AgentStatus::Finished, "error: {}", first.error);
    assert_eq!(show(origin, &first.work_branch, "NOTE.md").as_deref(), Some("noted\n"));
    let opened = forge.pull_requests();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].head, first.work_branch);
    assert_eq!(opened[0].base, "main");
    assert_eq!(opened[0].opened_by.as_deref(), Some("skiff 1"));
    let recorded = first.pull_request.clone().expect("the pull request is on the agent");
    assert_eq!((recorded.url.as_str(), recorded.number), (opened[0].url.as_str(), 1));
    let requests = forge.requests();
    assert_eq!(
        requests[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str()),
        "the host filled in the secret"
    );
    let events = durable_events(client, &first.id).await;
    assert!(
        events.iter().any(|event| matches!(
            &event.kind,
            Some(agent_event::Kind::PullRequestOpened(pr)) if pr.url == recorded.url && pr.provider == "skiff"
        )),
        "a pull-request-opened event: {events:?}"
    );
    let echoed = events.iter().find_map(|event| match &event.kind {
        Some(agent_event::Kind::ToolCallFinished(call)) if call.tool == "echo" => Some(call.clone()),
        _ => None,
    });
    let echoed = echoed.expect("the echo tool plugin was called");
    assert!(!echoed.failed, "{echoed:?}");
    assert!(echoed.output.contains("from the model"), "{echoed:?}");
    let shown = cluster.run_cli(1, &["agent", "get", &first.id]);
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(
        shown.contains(&recorded.url),
        "agent get shows the pull request: {shown}"
    );
}

/// A new version replaces the plugin while a pull request call waits on the forge.
async fn check_a_new_version_replaces_the_plugin_while_a_call_is_in_flight(
    cluster: &TestCluster,
    client: &mut flotilla_tests::AgentClient,
    skiff: &SkiffWorld,
    dir: &std::path::Path,
) {
    let (forge, repository) = (&skiff.forge, &skiff.repository);
    forge.hold_pull_requests(true);
    let mut create = request(repository, "second", "Add the second note");
    create.open_pull_request = true;
    let second = create_from(client, create).await;
    wait_for("the second pull request to reach the forge", DEADLINE, || async {
        (forge.pending_pull_requests() == 1).then_some(())
    })
    .await;
    let v2_file = dir.join("skiff-2.wasm");
    std::fs::write(&v2_file, flotilla_tests::test_guest("skiff-v2")).unwrap();
    add_plugin(cluster, 1, &v2_file, "1.1.0", &forge.host());
    wait_everywhere(cluster, "skiff", "1.1.0", true).await;
    forge.hold_pull_requests(false);
    let second = wait_for_agent(cluster, &second.id, "to end", ended).await;
    assert_eq!(status_of(&second), v1::AgentStatus::Finished, "error: {}", second.error);
    let third = run_to_the_end(cluster, client, repository, "third").await;
    assert_eq!(status_of(&third), v1::AgentStatus::Finished, "error: {}", third.error);
    let by_head = |head: &str| {
        forge
            .pull_requests()
            .into_iter()
            .find(|pull_request| pull_request.head == head)
            .unwrap_or_else(|| panic!("no pull request from {head}"))
    };
    assert_eq!(
        by_head(&second.work_branch).opened_by.as_deref(),
        Some("skiff 1"),
        "the call in flight finished on the version it started with"
    );
    assert_eq!(by_head(&third.work_branch).opened_by.as_deref(), Some("skiff 2"));
    assert_eq!(third.pull_request.map(|pull_request| pull_request.number), Some(3));
}
