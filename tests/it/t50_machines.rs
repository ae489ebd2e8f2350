//! Agents in real machines: a repository with an environment.json becomes a booted bubblewrap
//! machine (install once into an install layer, start on every boot, terminals in tmux), a user
//! attaches to it as a person would, and bad set-ups fail the agent with a clear message.

use flotilla_proto::v1::{self, attach_request, attach_response};
use flotilla_tests::{agent_client, wait_for, AgentClient, ClusterOptions, TestCluster};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::common::{bare_repository, get, status_of, DEADLINE};

const PROBE: &str = r#"{"name": "probe", "command": "echo installs=$(wc -l < /var/tmp/install-runs) starts=$(wc -l < /var/tmp/start-runs); exec sleep 1000000"}"#;

fn environment(install: &str) -> String {
    format!(
        r#"{{
  "install": "{install}",
  "start": "echo boot >> /var/tmp/start-runs",
  "terminals": [{PROBE}, {{"name": "web", "command": "while true; do echo serving; sleep 1; done"}}]
}}"#
    )
}

/// A repository whose `.cursor/environment.json` is a symlink to `target` (a hostile
/// repository: the node must refuse it rather than read through it).
fn repository_with_symlinked_environment(dir: &std::path::Path, name: &str, target: &str) -> String {
    let url = bare_repository(dir, name, &[("README.md", "symlinked environment\n")]);
    let clone = dir.join(format!("{name}-clone"));
    let git = |args: &[&str], cwd: &std::path::Path| {
        let output = std::process::Command::new("git")
            .args(["-c", "user.name=flotilla-test", "-c", "user.email=test@example.test"])
            .args(args)
            .current_dir(cwd)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    git(&["clone", "--quiet", &url, &clone.display().to_string()], dir);
    std::fs::create_dir_all(clone.join(".cursor")).unwrap();
    std::os::unix::fs::symlink(target, clone.join(".cursor/environment.json")).unwrap();
    git(&["add", "--all"], &clone);
    git(&["commit", "--quiet", "-m", "a symlinked environment.json"], &clone);
    git(&["push", "--quiet", "origin", "main"], &clone);
    url
}

async fn create_on(client: &mut AgentClient, repository: &str, name: &str) -> v1::Agent {
    crate::common::create_from(
        client,
        v1::CreateAgentRequest {
            prompt: "Work in a machine".to_string(),
            repository: repository.to_string(),
            name: name.to_string(),
            ..Default::default()
        },
    )
    .await
}

pub(crate) async fn wait_for_status(endpoint: &str, token: &str, id: &str, wanted: v1::AgentStatus) -> v1::Agent {
    let (endpoint, token, id) = (endpoint.to_string(), token.to_string(), id.to_string());
    wait_for(&format!("agent {id} to be {wanted:?}"), DEADLINE, move || {
        let (endpoint, token, id) = (endpoint.clone(), token.clone(), id.clone());
        async move {
            let agent = get(&mut agent_client(&endpoint, &token).await, &id).await?;
            // Waiting for anything but failure, a failure ends the wait at once with its error.
            if wanted != v1::AgentStatus::Failed {
                assert_ne!(
                    status_of(&agent),
                    v1::AgentStatus::Failed,
                    "agent {id} failed: {}",
                    agent.error
                );
            }
            (status_of(&agent) == wanted).then_some(agent)
        }
    })
    .await
}

/// An open attach: requests go in, output and notices come out.
pub(crate) struct Attached {
    pub(crate) requests: mpsc::Sender<v1::AttachRequest>,
    responses: tonic::Streaming<v1::AttachResponse>,
    screen: String,
}

impl Attached {
    pub(crate) async fn open(
        client: &mut AgentClient,
        id: &str,
        terminal: &str,
        takeover: bool,
    ) -> Result<Attached, tonic::Status> {
        let (requests, outbound) = mpsc::channel(16);
        requests
            .send(v1::AttachRequest {
                kind: Some(attach_request::Kind::Open(v1::AttachOpen {
                    agent_id: id.to_string(),
                    terminal: terminal.to_string(),
                    takeover,
                    size: Some(v1::TerminalSize { rows: 30, cols: 100 }),
                })),
            })
            .await
            .expect("queue open");
        let responses = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(Attached {
            requests,
            responses,
            screen: String::new(),
        })
    }

    pub(crate) async fn type_text(&self, text: &str) {
        self.requests
            .send(v1::AttachRequest {
                kind: Some(attach_request::Kind::Input(text.as_bytes().to_vec())),
            })
            .await
            .expect("send input");
    }

    /// Reads output until `wanted` has appeared on the screen.
    pub(crate) async fn read_until(&mut self, wanted: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.screen.contains(wanted) {
            let message = tokio::time::timeout_at(deadline, self.responses.next())
                .await
                .unwrap_or_else(|_| panic!("{wanted:?} did not appear; the screen so far:\n{}", self.screen))
                .expect("attach stream open")
                .expect("attach stream healthy");
            match message.kind {
                Some(attach_response::Kind::Output(bytes)) => self.screen.push_str(&String::from_utf8_lossy(&bytes)),
                Some(attach_response::Kind::Notice(text)) => {
                    self.screen.push_str(&format!("\n[notice] {text}\n"));
                }
                None => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_machines_that_share_one_install_layer() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let repository = bare_repository(
        cluster.dir.path(),
        "service",
        &[
            (
                ".flotilla/environment.json",
                &environment("echo run >> /var/tmp/install-runs"),
            ),
            ("README.md", "a service\n"),
        ],
    );
    let mut client = agent_client(&endpoint, &token).await;
    let first = create_on(&mut client, &repository, "first").await;
    let second = create_on(&mut client, &repository, "second").await;
    for agent in [&first, &second] {
        let running = wait_for_status(&endpoint, &token, &agent.id, v1::AgentStatus::Running).await;
        assert!(running.error.is_empty(), "{}", running.error);
        // Install ran once (in the install layer both machines stand on); start ran at this boot.
        let mut probe = Attached::open(&mut client, &agent.id, "probe", false)
            .await
            .expect("attach probe");
        probe.read_until("installs=1 starts=1").await;
    }
    // Install layers live in `machines/snapshots` (the directory kept its name on disk).
    let install_layers = std::fs::read_dir(cluster.nodes[0].data_dir.join("machines/snapshots"))
        .expect("install layer dir")
        .filter_map(Result::ok)
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(
        install_layers, 1,
        "one install layer for one repository and environment"
    );

    // Stopping an agent destroys its machine.
    client
        .stop_agent(v1::StopAgentRequest {
            id: first.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("stop");
    let machines_dir = cluster.nodes[0].data_dir.join("machines/machines");
    wait_for("the stopped agent's machine to be destroyed", DEADLINE, || {
        let count = std::fs::read_dir(&machines_dir)
            .map(|entries| entries.count())
            .unwrap_or(0);
        async move { (count == 1).then_some(()) }
    })
    .await;
    let (code, _) = match Attached::open(&mut client, &first.id, "", false).await {
        Err(status) => (status.code(), status.message().to_string()),
        Ok(_) => panic!("attaching to a stopped agent must fail"),
    };
    assert_eq!(code, tonic::Code::FailedPrecondition);
}

/// Runs git in `cwd` isolated from the user's and the system's configuration.
fn run_git(args: &[&str], cwd: &std::path::Path) {
    let output = std::process::Command::new("git")
        .args(["-c", "user.name=flotilla-test", "-c", "user.email=test@example.test"])
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Two branches with different lockfiles: an agent on each gets an install layer built from its
/// own branch's files, never the other's, although repository and environment are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_with_different_files_never_share_an_install_layer() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let probe = r#"{"name": "probe", "command": "echo installed=$(cat /var/tmp/installed-lock) checkout=$(cat /workspace/lock.txt); exec sleep 1000000"}"#;
    let environment =
        format!(r#"{{"install": "cp /workspace/lock.txt /var/tmp/installed-lock", "terminals": [{probe}]}}"#);
    let repository = bare_repository(
        cluster.dir.path(),
        "locked",
        &[(".flotilla/environment.json", &environment), ("lock.txt", "lock-main")],
    );
    let clone = cluster.dir.path().join("locked-clone");
    run_git(
        &["clone", "--quiet", &repository, &clone.display().to_string()],
        cluster.dir.path(),
    );
    run_git(&["checkout", "--quiet", "-b", "poisoned"], &clone);
    std::fs::write(clone.join("lock.txt"), "lock-poisoned").unwrap();
    run_git(&["commit", "--quiet", "--all", "-m", "another lockfile"], &clone);
    run_git(&["push", "--quiet", "origin", "poisoned"], &clone);

    let mut client = agent_client(&endpoint, &token).await;
    let mut agents = Vec::new();
    for branch in ["poisoned", "main"] {
        let agent = crate::common::create_from(
            &mut client,
            v1::CreateAgentRequest {
                prompt: "Work in a machine".to_string(),
                repository: repository.clone(),
                name: format!("on-{branch}"),
                base_branch: branch.to_string(),
                ..Default::default()
            },
        )
        .await;
        // One after the other: the second must find the first's layer if the key let it.
        wait_for_status(&endpoint, &token, &agent.id, v1::AgentStatus::Running).await;
        agents.push((branch, agent));
    }
    for (branch, agent) in &agents {
        let mut probe = Attached::open(&mut client, &agent.id, "probe", false)
            .await
            .expect("attach probe");
        probe
            .read_until(&format!("installed=lock-{branch} checkout=lock-{branch}"))
            .await;
    }
    let install_layers = std::fs::read_dir(cluster.nodes[0].data_dir.join("machines/snapshots"))
        .expect("install layer dir")
        .filter_map(Result::ok)
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(install_layers, 2, "one install layer per tree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_takes_over_a_terminal_and_viewers_watch() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    // The reference docs' shape, read from .cursor/environment.json.
    let repository = bare_repository(
        cluster.dir.path(),
        "web",
        &[(
            ".cursor/environment.json",
            r#"{"snapshot": "POPULATED_FROM_SETTINGS", "install": "true", "terminals": [{"name": "Run Next.js", "command": "echo next-dev-ready; exec sleep 1000000"}]}"#,
        )],
    );
    let mut client = agent_client(&endpoint, &token).await;
    let agent = create_on(&mut client, &repository, "takeover").await;
    wait_for_status(&endpoint, &token, &agent.id, v1::AgentStatus::Running).await;

    let mut terminal = Attached::open(&mut client, &agent.id, "Run Next.js", false)
        .await
        .expect("attach");
    terminal.read_until("next-dev-ready").await;

    let mut viewer = Attached::open(&mut client, &agent.id, "", false).await.expect("viewer");
    let mut controller = Attached::open(&mut client, &agent.id, "", true)
        .await
        .expect("take over");
    controller.read_until("take-over").await;
    let (code, _) = match Attached::open(&mut client, &agent.id, "", true).await {
        Err(status) => (status.code(), status.message().to_string()),
        Ok(mut second) => {
            // The refusal may arrive as the stream's first item.
            let first = second.responses.next().await.expect("an answer");
            let status = first.expect_err("a second take-over is refused");
            (status.code(), status.message().to_string())
        }
    };
    assert_eq!(code, tonic::Code::FailedPrecondition);

    controller.type_text("echo hel''lo-$((6*7))\r").await;
    controller.read_until("hello-42").await;
    viewer.read_until("hello-42").await;
    viewer.type_text("echo should-not-run\r").await;
    viewer.read_until("input ignored").await;

    let (code, message) = match Attached::open(&mut client, &agent.id, "no-such-terminal", false).await {
        Err(status) => (status.code(), status.message().to_string()),
        Ok(mut attached) => {
            let status = attached
                .responses
                .next()
                .await
                .expect("an answer")
                .expect_err("refused");
            (status.code(), status.message().to_string())
        }
    };
    assert_eq!(code, tonic::Code::NotFound, "{message}");
    assert!(
        message.contains("Run Next.js"),
        "the error lists the terminals: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_set_ups_fail_the_agent_with_a_clear_message() {
    let cluster = TestCluster::start(
        1,
        ClusterOptions {
            extra_args: vec!["--install-timeout-ms".to_string(), "3000".to_string()],
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let mut client = agent_client(&endpoint, &token).await;
    let dir = cluster.dir.path();

    let endless = bare_repository(
        dir,
        "endless",
        &[(
            ".flotilla/environment.json",
            r#"{"install": "echo installing; sleep 100000"}"#,
        )],
    );
    let missing = format!("file://{}/no-such-repository.git", dir.display());
    let stranger = bare_repository(
        dir,
        "stranger",
        &[(
            ".flotilla/environment.json",
            r#"{"user": "no-such-user", "install": "true"}"#,
        )],
    );
    let malformed = bare_repository(
        dir,
        "malformed",
        &[(
            ".flotilla/environment.json",
            "{\n  \"install\": \"true\",\n  \"terminals\": \"npm run dev\"\n}\n",
        )],
    );
    let symlinked = repository_with_symlinked_environment(dir, "symlinked", "/dev/zero");
    let cases = [
        (symlinked, ".cursor/environment.json", "is a symlink"),
        (endless, "install", "installing"),
        (missing.clone(), missing.as_str(), "cannot clone"),
        (stranger, "no-such-user", "does not exist"),
        (malformed, ".flotilla/environment.json line 3", "terminals"),
    ];
    let mut created = Vec::new();
    for (repository, _, _) in &cases {
        created.push(create_on(&mut client, repository, "bad").await);
    }
    for ((_, first, second), agent) in cases.iter().zip(&created) {
        let failed = wait_for_status(&endpoint, &token, &agent.id, v1::AgentStatus::Failed).await;
        assert!(
            failed.error.contains(first) && failed.error.contains(second),
            "the error of {} should mention {first:?} and {second:?}: {}",
            agent.repository,
            failed.error
        );
    }
}

/// A loopback HTTP server that answers every request with 200 and counts connections.
async fn counting_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
            });
        }
    });
    (port, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_goes_only_to_allowed_hosts_through_the_node_proxy() {
    let (allowed_port, allowed_hits) = counting_server().await;
    let (other_port, other_hits) = counting_server().await;
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let probe = format!(
        "curl -s -m 5 -o /dev/null -w 'allowed=%{{http_code}} ' http://127.0.0.1:{allowed_port}/; \
         curl -s -m 5 -o /dev/null -w 'other=%{{http_code}} ' http://127.0.0.1:{other_port}/; \
         curl -s -m 5 -o /dev/null -w 'by-name=%{{http_code}} ' http://localhost:{other_port}/; \
         curl -s -m 2 --noproxy '*' -o /dev/null -w 'direct=%{{http_code}} done' http://127.0.0.1:{allowed_port}/; \
         exec sleep 1000000"
    );
    let environment = serde_json::json!({ "terminals": [{ "name": "probe", "command": probe }] }).to_string();
    let repository = bare_repository(
        cluster.dir.path(),
        "egress",
        &[(".flotilla/environment.json", environment.as_str())],
    );
    let mut client = agent_client(&endpoint, &token).await;
    let agent = crate::common::create_from(
        &mut client,
        v1::CreateAgentRequest {
            prompt: "Reach one host".to_string(),
            repository: repository.clone(),
            // `localhost` is listed but resolves to loopback, whose address for this port is not.
            egress_allow: vec![format!("127.0.0.1:{allowed_port}"), format!("localhost:{other_port}")],
            ..Default::default()
        },
    )
    .await;
    wait_for_status(&endpoint, &token, &agent.id, v1::AgentStatus::Running).await;
    let mut terminal = Attached::open(&mut client, &agent.id, "probe", false)
        .await
        .expect("attach");
    terminal.read_until("done").await;
    assert!(terminal.screen.contains("allowed=200"), "{}", terminal.screen);
    assert!(terminal.screen.contains("other=403"), "{}", terminal.screen);
    assert!(
        terminal.screen.contains("by-name=403"),
        "a listed name resolving to an unlisted loopback address is refused: {}",
        terminal.screen
    );
    assert!(
        terminal.screen.contains("direct=000"),
        "no route but the proxy: {}",
        terminal.screen
    );
    assert_eq!(allowed_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        other_hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "refused hosts are never contacted"
    );

    let refused = client
        .create_agent(v1::CreateAgentRequest {
            prompt: "Bad pattern".to_string(),
            repository,
            egress_allow: vec!["http://not a host".to_string()],
            ..Default::default()
        })
        .await
        .expect_err("a malformed host pattern is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

/// Runs tmux on the host with a socket of its own, as a person's terminal would.
fn host_tmux(socket: &str, args: &[&str]) -> String {
    let output = std::process::Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .output()
        .expect("run tmux");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_takes_over_with_the_cli_in_a_terminal() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let mut client = agent_client(&endpoint, &token).await;
    let agent = create_on(&mut client, &crate::common::sample_repository(), "by-hand").await;
    wait_for_status(&endpoint, &token, &agent.id, v1::AgentStatus::Running).await;

    let socket = format!("flotilla-test-{}", std::process::id());
    let command = format!(
        "FLOTILLA_TOKEN={token} FLOTILLA_CA_CERT={} {} --endpoint {endpoint} agent attach {} --takeover",
        cluster.ca_path().display(),
        flotilla_tests::flotilla_bin().display(),
        agent.id
    );
    host_tmux(
        &socket,
        &["new-session", "-d", "-s", "person", "-x", "120", "-y", "30", &command],
    );
    let screen = |socket: String| async move {
        let text = host_tmux(&socket, &["capture-pane", "-p", "-t", "person"]);
        Some(text)
    };
    // The machine's tmux redraws the whole screen; its status line names the session's windows.
    wait_for("the attach to show the machine's shell", DEADLINE, || {
        let socket = socket.clone();
        async move { screen(socket).await.filter(|text| text.contains("0:shell")).map(|_| ()) }
    })
    .await;
    host_tmux(
        &socket,
        &["send-keys", "-t", "person", "echo hel''lo-$((6*7))", "Enter"],
    );
    wait_for("hello-42 on the person's screen", DEADLINE, || {
        let socket = socket.clone();
        async move {
            screen(socket)
                .await
                .filter(|text| text.contains("hello-42"))
                .map(|_| ())
        }
    })
    .await;
    // Ctrl-] detaches; the CLI exits and the take-over is released.
    host_tmux(&socket, &["send-keys", "-t", "person", "C-]"]);
    wait_for("the CLI to exit after Ctrl-]", DEADLINE, || {
        let socket = socket.clone();
        async move {
            let sessions = host_tmux(&socket, &["list-sessions"]);
            (!sessions.contains("person")).then_some(())
        }
    })
    .await;
    host_tmux(&socket, &["kill-server"]);
    let mut again = Attached::open(&mut client, &agent.id, "", true)
        .await
        .expect("take over again");
    again.read_until("take-over").await;
}
