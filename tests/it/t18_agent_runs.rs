//! Agents doing the work end to end on one node: the turn loop against the scripted provider and
//! against local servers speaking the OpenAI and Anthropic streaming protocols, tools in real
//! machines, commits pushed to file:// and smart-HTTP origins, follow-ups, stop, provider faults.

use std::path::{Path, PathBuf};

use flotilla_proto::v1::{self, agent_event, watch_agent_response};
use flotilla_tests::fakes::{create_bare_repository, FakeModelServer, FakeTurn, Fault, GitHttpServer};
use flotilla_tests::{wait_for, AgentClient, ClusterOptions, TestCluster};
use serde_json::json;
use tokio_stream::StreamExt;

use crate::common::{create_from, follow_up, get, status_of, DEADLINE};
use crate::t50_machines::wait_for_status;

/// A node config with these model tables and a commit author tests can recognise.
pub(crate) fn config_with(models: &str, default_model: &str) -> String {
    format!(
        "{models}\n[agents]\ndefault_model = \"{default_model}\"\n\n[git]\nauthor_name = \"Test Agent\"\nauthor_email = \"test-agent@example.test\"\n"
    )
}

pub(crate) fn openai_model(name: &str, server: &FakeModelServer, extra: &str) -> String {
    format!(
        "[models.{name}]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake-{name}\"\n{extra}\n",
        server.openai_base_url()
    )
}

pub(crate) fn scripted_model(dir: &Path, name: &str, script: serde_json::Value) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, script.to_string()).expect("write the script");
    format!(
        "[models.{name}]\nprovider = \"scripted\"\nscript = {:?}\n",
        path.display().to_string()
    )
}

pub(crate) fn request(repository: &str, name: &str, prompt: &str) -> v1::CreateAgentRequest {
    v1::CreateAgentRequest {
        prompt: prompt.to_string(),
        repository: repository.to_string(),
        name: name.to_string(),
        ..Default::default()
    }
}

/// The `[[git.credentials]]` table for a test forge; the password is in the node's
/// environment as `FLOTILLA_TEST_GIT_PASSWORD`.
fn git_credentials(server: &GitHttpServer) -> String {
    format!(
        "\n[[git.credentials]]\nurl_prefix = \"{}\"\nusername = \"agent-user\"\npassword_env = \"FLOTILLA_TEST_GIT_PASSWORD\"\n",
        server.base_url()
    )
}

/// Every durable event of an agent that has ended (the watch closes at the end).
pub(crate) async fn durable_events(client: &mut AgentClient, id: &str) -> Vec<v1::AgentEvent> {
    let mut stream = client
        .watch_agent(v1::WatchAgentRequest {
            id: id.to_string(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    let collect = async {
        while let Some(response) = stream.next().await {
            if let Some(watch_agent_response::Kind::Event(event)) = response.expect("watch stream").kind {
                if !event.live {
                    events.push(event);
                }
            }
        }
    };
    tokio::time::timeout(DEADLINE, collect)
        .await
        .expect("the watch of an ended agent closes");
    events
}

pub(crate) fn turns_finished(events: &[v1::AgentEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(agent_event::Kind::TurnFinished(turn)) => Some(turn.turn),
            _ => None,
        })
        .collect()
}

/// `git show BRANCH:FILE` in a bare repository.
pub(crate) fn show(origin: &Path, branch: &str, file: &str) -> Option<String> {
    let output = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(origin)
        .args(["show", &format!("{branch}:{file}")])
        .output()
        .expect("run git");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn git(origin: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(origin)
        .args(args)
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The fence of an agent's first owner (epoch 1).
fn first_owner_fence(agent: &str) -> flotilla_actors::origin_fence::OwnerFence {
    flotilla_actors::origin_fence::OwnerFence {
        agent: agent.parse().expect("an agent id"),
        epoch: flotilla_raft::Epoch(1),
    }
}

/// The two values the fence of `fence`'s owner takes, in a repository of SHA-1 objects.
fn epoch_one_fences(fence: &flotilla_actors::origin_fence::OwnerFence) -> [String; 2] {
    use flotilla_actors::origin_fence::{fence_id, ObjectFormat, Phase};
    [Phase::Tick, Phase::Tock].map(|phase| fence_id(ObjectFormat::Sha1, *fence, phase))
}

fn origin_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("file://").expect("a file:// URL"))
}

async fn client_and_cluster(config: String, env: Vec<(String, String)>) -> (TestCluster, AgentClient) {
    let cluster = TestCluster::start(
        1,
        ClusterOptions {
            config: Some(config),
            env,
            ..Default::default()
        },
    )
    .await;
    let client = cluster.agent_client(1).await;
    (cluster, client)
}

/// Polls node 1 until the agent satisfies `wanted`, and returns it.
pub(crate) async fn wait_for_agent(
    cluster: &TestCluster,
    id: &str,
    what: &str,
    wanted: impl Fn(&v1::Agent) -> bool + Clone,
) -> v1::Agent {
    let endpoint = cluster.node(1).endpoint();
    let token = cluster.admin_token();
    wait_for(&format!("agent {id}: {what}"), DEADLINE, move || {
        let (endpoint, token, id, wanted) = (endpoint.clone(), token.clone(), id.to_string(), wanted.clone());
        async move {
            let agent = get(&mut flotilla_tests::agent_client(&endpoint, &token).await, &id).await?;
            wanted(&agent).then_some(agent)
        }
    })
    .await
}

async fn wait_until_ended(cluster: &TestCluster, id: &str) -> v1::Agent {
    wait_for_agent(cluster, id, "to end", |agent| {
        matches!(
            status_of(agent),
            v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
        )
    })
    .await
}

#[tokio::test]
async fn a_scripted_agent_works_in_its_machine_and_pushes_its_branch() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let script = json!({"turns": [
        {"text": "Writing the file.", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "hello.txt", "content": "hello from the agent\n"}},
            {"name": "run_command", "arguments": {"command": "cat hello.txt; exit 3"}},
            {"name": "read_file", "arguments": {"path": "../../etc/passwd"}}
        ]},
        {"text": "", "tool_calls": [
            {"name": "edit_file", "arguments": {"path": "hello.txt", "old_string": "hello", "new_string": "greetings"}},
            {"name": "edit_file", "arguments": {"path": "hello.txt", "old_string": "no such text", "new_string": "x"}}
        ]},
        {"text": "Wrote hello.txt and greeted."}
    ]});
    let config = config_with(&scripted_model(dir.path(), "script", script), "script");
    let (cluster, mut client) = client_and_cluster(config, Vec::new()).await;
    let agent = create_from(&mut client, request(&url, "greeter", "Write a greeting")).await;
    assert!(agent.scripted, "an agent on the scripted provider says so");
    let ended = wait_until_ended(&cluster, &agent.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    assert_eq!(ended.summary, "Wrote hello.txt and greeted.");
    assert_eq!(ended.turns, 3);

    let origin = origin_path(&url);
    let branch = &ended.work_branch;
    assert_eq!(
        show(&origin, branch, "hello.txt").as_deref(),
        Some("greetings from the agent\n")
    );
    assert_eq!(git(&origin, &["rev-parse", branch]), ended.pushed_commit);
    assert_eq!(ended.head_commit, ended.pushed_commit);
    // The agent's first owner took no fence at its start: its first push created it, at epoch 1.
    let fence = first_owner_fence(&agent.id);
    let fence_at_origin = git(&origin, &["rev-parse", &fence.ref_name()]);
    assert!(
        epoch_one_fences(&fence).contains(&fence_at_origin),
        "the origin's fence {fence_at_origin} is not the first owner's"
    );
    let log = git(&origin, &["log", "--format=%an <%ae>|%s", &format!("main..{branch}")]);
    let commits: Vec<&str> = log.lines().collect();
    assert_eq!(commits.len(), 2, "one commit per turn that changed files: {log}");
    assert!(commits
        .iter()
        .all(|line| line.starts_with("Test Agent <test-agent@example.test>|greeter: turn ")));

    let events = durable_events(&mut client, &agent.id).await;
    assert!(
        events.iter().all(|event| event.scripted),
        "every event says it is scripted"
    );
    assert_eq!(turns_finished(&events), vec![1, 2, 3]);
    let sequences: Vec<u64> = events.iter().map(|event| event.sequence).collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>(), "no gaps");
    let finished: Vec<&v1::ToolCallFinished> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(agent_event::Kind::ToolCallFinished(finished)) => Some(finished),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 5);
    assert!(finished[1].output.contains("hello from the agent"), "{:?}", finished[1]);
    assert!(finished[1].output.contains("exit code 3"), "{:?}", finished[1]);
    assert!(finished[2].failed && finished[2].output.contains("outside /workspace"));
    assert!(!finished[3].failed);
    assert!(
        finished[4].failed && finished[4].output.contains("not found"),
        "{:?}",
        finished[4]
    );
    let pushes = events
        .iter()
        .filter(|event| matches!(event.kind, Some(agent_event::Kind::CommitPushed(_))))
        .count();
    assert_eq!(pushes, 2);
    let summary_at = events
        .iter()
        .position(|event| matches!(event.kind, Some(agent_event::Kind::Summary(_))))
        .expect("a summary event");
    assert!(matches!(
        &events[summary_at + 1].kind,
        Some(agent_event::Kind::StatusChanged(changed)) if changed.to == v1::AgentStatus::Finished as i32
    ));
}

/// An agent that changes nothing pushes nothing: its run leaves no branch and no fence at the
/// origin (the first owner of an agent takes its fence only with its first push).
#[tokio::test]
async fn an_agent_that_changes_nothing_leaves_no_ref_at_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let script = json!({"turns": [
        {"text": "", "tool_calls": [
            {"name": "read_file", "arguments": {"path": "README.md"}}
        ]},
        {"text": "The README describes a service; nothing to change."}
    ]});
    let config = config_with(&scripted_model(dir.path(), "script", script), "script");
    let (cluster, mut client) = client_and_cluster(config, Vec::new()).await;
    let agent = create_from(&mut client, request(&url, "reader", "Read the README")).await;
    let ended = wait_until_ended(&cluster, &agent.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    assert_eq!(ended.turns, 2);
    assert!(ended.pushed_commit.is_empty(), "{}", ended.pushed_commit);
    let origin = origin_path(&url);
    let refs = git(&origin, &["for-each-ref", "--format=%(refname)"]);
    assert_eq!(refs, "refs/heads/main", "the origin holds only its own branch");
    let fence = first_owner_fence(&agent.id);
    assert!(!refs.contains(&fence.ref_name()));
}

/// A work branch the origin already holds is adopted: the run reads the origin, records the
/// branch and builds on it, and its push follows the branch's commit.
#[tokio::test]
async fn an_agent_given_a_branch_the_origin_holds_builds_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let origin = origin_path(&url);
    let tree = git(&origin, &["rev-parse", "main^{tree}"]);
    let output = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&origin)
        .args(["commit-tree", &tree, "-p", "main", "-m", "the user's own commit"])
        .env("GIT_AUTHOR_NAME", "A User")
        .env("GIT_AUTHOR_EMAIL", "user@example.test")
        .env("GIT_COMMITTER_NAME", "A User")
        .env("GIT_COMMITTER_EMAIL", "user@example.test")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let users = String::from_utf8_lossy(&output.stdout).trim().to_string();
    git(&origin, &["update-ref", "refs/heads/feature/existing", &users]);

    let script = json!({"turns": [
        {"text": "", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "more.txt", "content": "more\n"}}
        ]},
        {"text": "Added more.txt."}
    ]});
    let config = config_with(&scripted_model(dir.path(), "script", script), "script");
    let (cluster, mut client) = client_and_cluster(config, Vec::new()).await;
    let mut asked = request(&url, "builder", "Add a file");
    asked.work_branch = "feature/existing".to_string();
    let agent = create_from(&mut client, asked).await;
    let ended = wait_until_ended(&cluster, &agent.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    assert_eq!(git(&origin, &["rev-parse", "feature/existing"]), ended.pushed_commit);
    assert_eq!(
        git(&origin, &["rev-parse", &format!("{}^", ended.pushed_commit)]),
        users,
        "the agent's commit follows the user's"
    );
    assert_eq!(show(&origin, "feature/existing", "more.txt").as_deref(), Some("more\n"));
}

#[tokio::test]
async fn an_openai_agent_pushes_over_smart_http_and_its_keys_stay_out_of_the_machine() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("forge")).unwrap();
    let git_server = GitHttpServer::start(dir.path().join("forge"), "agent-user", "git-pass-5150").await;
    create_bare_repository(
        git_server.project_root(),
        "svc",
        &[
            ("README.md", "svc\n"),
            ("AGENTS.md", "Always run `make check` first.\n"),
        ],
    );
    let model = FakeModelServer::start().await;
    model.require_api_key("sk-test-7731");
    model.set_script(vec![
        FakeTurn::tool_call("write_file", json!({"path": "notes.md", "content": "# Notes\n"})),
        FakeTurn::tool_call(
            "run_command",
            json!({"command": "env; git config --list --show-origin; cat /proc/1/environ | tr '\\0' '\\n'"}),
        ),
        FakeTurn::text("Added notes.md."),
    ]);
    let models = openai_model("gpt", &model, "api_key_env = \"FLOTILLA_TEST_OPENAI_KEY\"");
    let config = format!("{}{}", config_with(&models, "gpt"), git_credentials(&git_server));
    let env = vec![
        ("FLOTILLA_TEST_OPENAI_KEY".to_string(), "sk-test-7731".to_string()),
        ("FLOTILLA_TEST_GIT_PASSWORD".to_string(), "git-pass-5150".to_string()),
    ];
    let (cluster, mut client) = client_and_cluster(config, env).await;
    let url = git_server.repository_url("svc");
    let agent = create_from(&mut client, request(&url, "notes", "Add a notes file")).await;
    assert!(!agent.scripted);
    let ended = wait_until_ended(&cluster, &agent.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    let origin = git_server.repository_path("svc");
    assert_eq!(
        show(&origin, &ended.work_branch, "notes.md").as_deref(),
        Some("# Notes\n")
    );
    assert_eq!(git(&origin, &["rev-parse", &ended.work_branch]), ended.pushed_commit);

    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    let first = &requests[0];
    assert_eq!(first.body["model"], "fake-gpt");
    assert_eq!(first.body["stream"], true);
    let system = first.body["messages"][0]["content"].as_str().unwrap_or_default();
    assert!(
        system.contains("Always run `make check` first."),
        "AGENTS.md is in the prompt: {system}"
    );
    assert!(system.contains(&ended.work_branch), "{system}");
    assert_eq!(first.body["messages"][1]["content"], "Add a notes file");
    let tool_names: Vec<&str> = first.body["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|tool| tool["function"]["name"].as_str())
        .collect();
    for name in [
        "run_command",
        "read_file",
        "write_file",
        "edit_file",
        "list_dir",
        "search",
        "read_terminal",
    ] {
        assert!(tool_names.contains(&name), "{name} missing from {tool_names:?}");
    }
    // The third request carries what `env` and git printed inside the machine.
    let third = requests[2].body.to_string();
    assert!(
        third.contains("FLOTILLA_AGENT_ID"),
        "the command output reached the model"
    );
    assert!(
        !third.contains("sk-test-7731"),
        "the model key never enters the machine"
    );
    assert!(
        !third.contains("git-pass-5150"),
        "the git password never enters the machine"
    );
    assert!(!third.contains(&git_server.authorization()), "nor the git header");
    let events = durable_events(&mut client, &agent.id).await;
    assert!(events.iter().all(|event| !event.scripted));
    let usage: Vec<u64> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(agent_event::Kind::TurnFinished(turn)) => Some(turn.input_tokens),
            _ => None,
        })
        .collect();
    assert_eq!(usage, vec![100, 100, 100], "token usage comes from the stream");
}

#[tokio::test]
async fn an_anthropic_agent_runs_to_a_pushed_branch() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let model = FakeModelServer::start().await;
    model.require_api_key("sk-ant-test-42");
    model.set_script(vec![
        FakeTurn::tool_call(
            "write_file",
            json!({"path": "src/lib.rs", "content": "pub fn two() -> u8 { 2 }\n"}),
        )
        .with_tool_call("list_dir", json!({"path": "src"})),
        FakeTurn::text("Added two()."),
    ]);
    let models = format!(
        "[models.claude]\nprovider = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"fake-claude\"\napi_key_env = \"FLOTILLA_TEST_ANTHROPIC_KEY\"\n",
        model.anthropic_base_url()
    );
    let env = vec![("FLOTILLA_TEST_ANTHROPIC_KEY".to_string(), "sk-ant-test-42".to_string())];
    let (cluster, mut client) = client_and_cluster(config_with(&models, "claude"), env).await;
    let agent = create_from(&mut client, request(&url, "two", "Add two()")).await;
    let ended = wait_until_ended(&cluster, &agent.id).await;
    assert_eq!(status_of(&ended), v1::AgentStatus::Finished, "error: {}", ended.error);
    assert_eq!(ended.summary, "Added two().");
    assert_eq!(
        show(&origin_path(&url), &ended.work_branch, "src/lib.rs").as_deref(),
        Some("pub fn two() -> u8 { 2 }\n")
    );
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|request| request.path == "/v1/messages"));
    assert_eq!(requests[0].body["model"], "fake-claude");
    // The tool results go back as tool_result blocks of one user message.
    let second = requests[1].body.to_string();
    assert!(second.contains("tool_result"), "{second}");
    assert!(
        second.contains("lib.rs"),
        "the list_dir output reached the model: {second}"
    );
}

#[tokio::test]
async fn provider_faults_are_retried_or_fail_the_agent_with_the_providers_words() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let servers: Vec<FakeModelServer> = futures::future::join_all((0..4).map(|_| FakeModelServer::start())).await;
    for server in &servers {
        server.set_script(vec![FakeTurn::text("Nothing to change.")]);
    }
    servers[0].push_fault(Fault::openai_status(
        429,
        "rate_limit_exceeded",
        Some("rate_limit_exceeded"),
        "Slow down",
    ));
    servers[1].push_fault(Fault::openai_status(
        400,
        "invalid_request_error",
        Some("context_length_exceeded"),
        "This model's maximum context length is 10 tokens",
    ));
    servers[2].push_fault(Fault::Hang);
    servers[3].push_fault(Fault::MalformedSse);
    let limits = "timeout_ms = 1500\nstream_idle_timeout_ms = 1000\nmax_retries = 2";
    let models: String = ["flaky", "rejecting", "hanging", "garbled"]
        .iter()
        .zip(&servers)
        .map(|(name, server)| openai_model(name, server, limits))
        .collect();
    let (cluster, mut client) = client_and_cluster(config_with(&models, "flaky"), Vec::new()).await;
    let mut ids = Vec::new();
    for name in ["flaky", "rejecting", "hanging", "garbled"] {
        let mut create = request(&url, name, "Look around");
        create.model = name.to_string();
        ids.push(create_from(&mut client, create).await.id);
    }
    let mut ended = Vec::new();
    for id in &ids {
        ended.push(wait_until_ended(&cluster, id).await);
    }
    assert_eq!(
        status_of(&ended[0]),
        v1::AgentStatus::Finished,
        "a 429 is retried: {}",
        ended[0].error
    );
    assert_eq!(servers[0].request_count(), 2);
    for (agent, expected) in ended[1..].iter().zip([
        "rejected the request (http 400): This model's maximum context length is 10 tokens",
        "timed out",
        "malformed model response",
    ]) {
        assert_eq!(status_of(agent), v1::AgentStatus::Failed, "{}", agent.name);
        assert!(agent.error.contains(expected), "{}: {}", agent.name, agent.error);
    }
    assert_eq!(servers[1].request_count(), 1, "a 400 is not retried");
}

#[tokio::test]
async fn follow_ups_reach_a_running_agent_in_order_and_restart_a_finished_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let model = FakeModelServer::start().await;
    model.set_script(vec![
        FakeTurn::tool_call("write_file", json!({"path": "a.txt", "content": "A\n"})),
        FakeTurn::tool_call("run_command", json!({"command": "cat a.txt"})),
        FakeTurn::tool_call("write_file", json!({"path": "b.txt", "content": "B\n"})),
        FakeTurn::text("a and b are written."),
        FakeTurn::tool_call("write_file", json!({"path": "c.txt", "content": "C\n"})),
        FakeTurn::text("c is written too."),
        FakeTurn::tool_call("run_command", json!({"command": "cat a.txt b.txt c.txt"}))
            .with_tool_call("write_file", json!({"path": "d.txt", "content": "D\n"})),
        FakeTurn::text("d is written."),
    ]);
    let (cluster, mut client) =
        client_and_cluster(config_with(&openai_model("gpt", &model, ""), "gpt"), Vec::new()).await;
    let gate_1 = model.hold_turn(1);
    let gate_3 = model.hold_turn(3);
    let agent = create_from(&mut client, request(&url, "letters", "Write a.txt")).await;

    // While turn 1 is with the model, a follow-up arrives: it goes into turn 2.
    assert!(model.wait_for_turn_request(1, DEADLINE).await, "turn 1 was asked for");
    let accepted = follow_up(&mut client, &agent.id, "Also write b.txt").await;
    assert_eq!(accepted.index, 1);
    assert_eq!(accepted.agent.expect("agent").pending_follow_ups, 1);
    gate_1.release();

    // The last answer of the run is held while another follow-up arrives: the agent does not
    // finish with a follow-up unanswered, it takes it into turn 4.
    assert!(model.wait_for_turn_request(3, DEADLINE).await, "turn 3 was asked for");
    follow_up(&mut client, &agent.id, "And c.txt").await;
    gate_3.release();
    let first_run = wait_until_ended(&cluster, &agent.id).await;
    assert_eq!(status_of(&first_run), v1::AgentStatus::Finished, "{}", first_run.error);
    assert_eq!(first_run.summary, "c is written too.");
    assert_eq!(first_run.pending_follow_ups, 0);

    let requests = model.requests();
    let last_user = |turn: usize| -> String {
        let request = requests
            .iter()
            .find(|request| request.turn_index == Some(turn))
            .unwrap_or_else(|| panic!("no request for turn {turn}"));
        request.body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .rev()
            .find(|message| message["role"] == "user")
            .map(|message| message["content"].to_string())
            .unwrap_or_default()
    };
    assert!(!last_user(1).contains("b.txt"), "turn 1 was sent before the follow-up");
    assert!(last_user(2).contains("Also write b.txt"));
    assert!(last_user(4).contains("And c.txt"));

    // A follow-up to the finished agent starts a new run on the same branch, in a fresh machine,
    // with the conversation so far.
    follow_up(&mut client, &agent.id, "One more: d.txt").await;
    let second_run = wait_for_agent(&cluster, &agent.id, "the second run to finish", |agent| {
        status_of(agent) == v1::AgentStatus::Finished && agent.summary == "d is written."
    })
    .await;
    assert_eq!(second_run.assignment.expect("assigned").epoch, 2);
    assert_eq!(second_run.turns, 8);
    let requests = model.requests();
    let turn_7 = requests
        .iter()
        .find(|request| request.turn_index == Some(7))
        .expect("turn 7");
    let body = turn_7.body.to_string();
    assert!(
        body.contains("A\\nB\\nC"),
        "the new machine has the pushed files: {body}"
    );
    assert!(
        body.contains("Write a.txt"),
        "the conversation goes on from the checkpoint"
    );
    let origin = origin_path(&url);
    for (file, content) in [("a.txt", "A\n"), ("b.txt", "B\n"), ("c.txt", "C\n"), ("d.txt", "D\n")] {
        assert_eq!(show(&origin, &second_run.work_branch, file).as_deref(), Some(content));
    }
    let events = durable_events(&mut client, &agent.id).await;
    assert_eq!(turns_finished(&events), (1..=8).collect::<Vec<u32>>());
    let accepted: Vec<u32> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(agent_event::Kind::FollowUpAccepted(accepted)) => Some(accepted.index),
            _ => None,
        })
        .collect();
    assert_eq!(accepted, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_stop_mid_command_ends_the_command_and_pushes_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let script = json!({"turns": [
        {"text": "Starting a long job.", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "partial.txt", "content": "half done\n"}},
            {"name": "run_command", "arguments": {"command": "sleep 301", "timeout_ms": 400000}}
        ]},
        {"text": "Never reached."}
    ]});
    let config = config_with(&scripted_model(dir.path(), "script", script), "script");
    let (cluster, mut client) = client_and_cluster(config, Vec::new()).await;
    let agent = create_from(&mut client, request(&url, "long", "Run the long job")).await;
    // The command runs once its process exists (after write_file, which comes first).
    let running_command = || {
        std::process::Command::new("pgrep")
            .args(["-f", "sleep 301"])
            .output()
            .expect("pgrep")
            .status
            .success()
    };
    wait_for("the long command to start", DEADLINE, || async {
        running_command().then_some(())
    })
    .await;
    client
        .stop_agent(v1::StopAgentRequest {
            id: agent.id.clone(),
            reason: "enough".to_string(),
        })
        .await
        .expect("stop");
    let stopped = wait_for_agent(&cluster, &agent.id, "the stopped agent's work to be pushed", |agent| {
        !agent.pushed_commit.is_empty()
    })
    .await;
    assert_eq!(status_of(&stopped), v1::AgentStatus::Stopped);
    let origin = origin_path(&url);
    assert_eq!(
        show(&origin, &stopped.work_branch, "partial.txt").as_deref(),
        Some("half done\n")
    );
    wait_for("the long command to be gone", DEADLINE, || async {
        (!running_command()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_rejected_push_fails_the_agent_clearly_and_keeps_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("forge")).unwrap();
    let git_server = GitHttpServer::start(dir.path().join("forge"), "agent-user", "pw-1").await;
    create_bare_repository(git_server.project_root(), "locked", &[("README.md", "locked\n")]);
    git_server.reject_pushes(true);
    let script = json!({"turns": [
        {"text": "", "tool_calls": [{"name": "write_file", "arguments": {"path": "x.txt", "content": "x\n"}}]},
        {"text": "Wrote x."}
    ]});
    let config = format!(
        "{}{}",
        config_with(&scripted_model(dir.path(), "script", script), "script"),
        git_credentials(&git_server)
    );
    let env = vec![("FLOTILLA_TEST_GIT_PASSWORD".to_string(), "pw-1".to_string())];
    let (cluster, mut client) = client_and_cluster(config, env).await;
    let agent = create_from(
        &mut client,
        request(&git_server.repository_url("locked"), "locked", "Write x"),
    )
    .await;
    let failed = wait_for_status(
        &cluster.node(1).endpoint(),
        &cluster.admin_token(),
        &agent.id,
        v1::AgentStatus::Failed,
    )
    .await;
    assert!(failed.error.contains("403"), "{}", failed.error);
    assert!(failed.error.contains("is kept in the mirror"), "{}", failed.error);
    assert!(failed.pushed_commit.is_empty());
    assert_eq!(failed.head_commit.len(), 40);
    assert_eq!(failed.summary, "Wrote x.");
    let events = durable_events(&mut client, &agent.id).await;
    assert!(events.iter().any(
        |event| matches!(&event.kind, Some(agent_event::Kind::PushFailed(failed)) if failed.branch == agent.work_branch)
    ));
    // The commit is still on the node.
    let mirrors = cluster.node(1).data_dir.join("repos");
    let mirror = std::fs::read_dir(&mirrors)
        .expect("mirrors")
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|extension| extension == "git"))
        .expect("a mirror");
    let kept = git(
        &mirror,
        &["rev-parse", &format!("refs/flotilla/kept/{}", agent.work_branch)],
    );
    assert_eq!(kept, failed.head_commit);
    assert_eq!(git_server.pushes_accepted(), 0);
}

#[tokio::test]
async fn an_agent_without_a_declared_model_is_refused_at_create() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        &scripted_model(dir.path(), "only", json!({"turns": [{"text": "hi"}]})),
        "only",
    );
    let (_cluster, mut client) = client_and_cluster(config, Vec::new()).await;
    let mut create = request(&crate::common::sample_repository(), "x", "do it");
    create.model = "gpt-9".to_string();
    let status = client.create_agent(create).await.expect_err("an undeclared model");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("\"gpt-9\" is not declared"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("only"), "{}", status.message());
}

/// Reads a watch stream until a live log line containing `wanted` arrives, and returns the
/// events seen on the way (that one included).
async fn read_until_live_log(
    stream: &mut tonic::Streaming<v1::WatchAgentResponse>,
    wanted: &str,
) -> Vec<v1::AgentEvent> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let response = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no live log {wanted:?} within {DEADLINE:?}; events seen: {seen:#?}"))
            .unwrap_or_else(|| panic!("the watch ended before a live log {wanted:?}; events seen: {seen:#?}"))
            .expect("watch stream healthy");
        let Some(watch_agent_response::Kind::Event(event)) = response.kind else {
            continue;
        };
        let found =
            event.live && matches!(&event.kind, Some(agent_event::Kind::Log(line)) if line.text.contains(wanted));
        seen.push(event);
        if found {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_pauses_the_agent_between_turns_and_a_release_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let model = FakeModelServer::start().await;
    model.set_script(vec![
        FakeTurn::tool_call("run_command", json!({"command": "echo one > one.txt"})),
        FakeTurn::tool_call("write_file", json!({"path": "two.txt", "content": "two\n"})),
        FakeTurn::text("done"),
    ]);
    let (cluster, mut client) =
        client_and_cluster(config_with(&openai_model("gpt", &model, ""), "gpt"), Vec::new()).await;
    let gate_1 = model.hold_turn(1);
    let agent = create_from(&mut client, request(&url, "handover", "Write two files")).await;
    // The live subscription is in place once WatchAgent answers; live events are not replayed,
    // so the watch opens before anything could pause the agent.
    let mut watch = client
        .watch_agent(v1::WatchAgentRequest {
            id: agent.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();

    // Turn 0 is done and turn 1 is with the model when the user takes the terminal over.
    assert!(model.wait_for_turn_request(1, DEADLINE).await, "turn 1 was asked for");
    let mut controller = crate::t50_machines::Attached::open(&mut client, &agent.id, "", true)
        .await
        .expect("take over");
    controller.read_until("take-over").await;

    // The turn in flight is not interrupted; the next one waits for the terminal.
    gate_1.release();
    let before_pause = read_until_live_log(&mut watch, "paused: a user has taken over the terminal").await;
    assert_eq!(
        model.turn_request_count(2),
        0,
        "the model is not called while a user holds the terminal"
    );
    let paused = get(&mut client, &agent.id).await.expect("the agent");
    assert_eq!(status_of(&paused), v1::AgentStatus::Running, "{}", paused.error);
    assert_eq!(paused.turns, 2, "turn 1 finished before the pause");
    assert!(
        !before_pause.iter().any(|event| matches!(
            &event.kind,
            Some(agent_event::Kind::TurnFinished(finished)) if finished.turn > 2
        )),
        "no turn after the second finished before the pause: {before_pause:#?}"
    );

    // Handing the terminal back lets the agent go on to its last turn.
    controller
        .requests
        .send(v1::AttachRequest {
            kind: Some(v1::attach_request::Kind::Release(true)),
        })
        .await
        .expect("send release");
    read_until_live_log(&mut watch, "resumed: the terminal was handed back").await;
    let finished = wait_for_status(
        &cluster.node(1).endpoint(),
        &cluster.admin_token(),
        &agent.id,
        v1::AgentStatus::Finished,
    )
    .await;
    assert_eq!(finished.summary, "done");
    assert_eq!(finished.turns, 3);
    assert_eq!(
        model.turn_request_count(2),
        1,
        "turn 2 was asked for once, after the release"
    );
    let events = durable_events(&mut client, &agent.id).await;
    assert_eq!(turns_finished(&events), vec![1, 2, 3]);
    drop(controller);
}
