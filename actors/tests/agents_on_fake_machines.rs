//! Agents through the whole actor tree of one node, without root: a real single-node Replica on
//! RocksDB, the real mesh, scheduler and supervisors, the scripted model, an origin that is a
//! bare git repository in a temp dir, and machines from the fake driver (directories and host
//! processes: no namespaces, mounts or cgroups). Each test runs its own node under its own node
//! id, since the mesh registers process-wide names that carry it.
// An integration-test crate: its helpers fail the test by panicking, as its tests do, and
// clippy's allow-unwrap-in-tests covers only `#[test]` functions and `#[cfg(test)]` items.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_actors::liveness::LivenessTable;
use flotilla_actors::machine::{
    find_machine_actor, machine_actor_name, running_machine, MachineHost, MachineSettings, RunningMachine,
};
use flotilla_actors::mesh::{Mesh, MeshConfig};
use flotilla_actors::model::{ModelProvider, ScriptedProvider};
use flotilla_actors::run::AgentRuntime;
use flotilla_actors::supervisor::{NodeSupervisor, NodeSupervisorArgs};
use flotilla_proto::v1;
use flotilla_raft::{
    AgentId, AgentRecord, AgentSpec, AgentStatus, Command, Epoch, NodeAddr, NodeInfo, Replica, ReplicaConfig,
};
use flotilla_sandbox::fake::{FakeDriver, FakeMachine};
use futures::StreamExt as _;
use prost::Message as _;
use ractor::{Actor, ActorRef};

/// Deadline for anything a healthy node does in seconds; generous because tests share two cores.
const DEADLINE: Duration = Duration::from_secs(60);
const MODEL: &str = "scripted";

struct TestNode {
    replica: Replica,
    mesh: Mesh,
    supervisor: ActorRef<flotilla_actors::supervisor::NodeMsg>,
    /// The origin every agent pushes to, as a `file://` URL, and its path.
    origin_url: String,
    origin: PathBuf,
    // Last, so that it is removed after everything that uses it.
    scratch: tempfile::TempDir,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn git(args: &[&str], cwd: &Path) -> String {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A bare origin with one commit on `main`.
fn origin_repository(dir: &Path) -> PathBuf {
    let seed = dir.join("seed");
    let origin = dir.join("origin.git");
    std::fs::create_dir_all(&seed).unwrap();
    git(
        &["init", "--quiet", "--bare", "-b", "main", &origin.display().to_string()],
        dir,
    );
    git(&["init", "--quiet", "-b", "main"], &seed);
    std::fs::write(seed.join("README.md"), "a repository for agent tests\n").unwrap();
    git(&["add", "."], &seed);
    git(
        &[
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.test",
            "commit",
            "--quiet",
            "-m",
            "seed",
        ],
        &seed,
    );
    git(&["push", "--quiet", &origin.display().to_string(), "main"], &seed);
    origin
}

/// A scripted turn: its text, its tool calls as (name, arguments), and how long it takes.
fn turn(text: &str, tool_calls: &[(&str, serde_json::Value)], delay_ms: u64) -> serde_json::Value {
    let calls: Vec<serde_json::Value> = tool_calls
        .iter()
        .map(|(name, arguments)| serde_json::json!({"name": name, "arguments": arguments}))
        .collect();
    serde_json::json!({"text": text, "tool_calls": calls, "delay_ms": delay_ms})
}

impl TestNode {
    async fn start(node_id: u64, script: Vec<serde_json::Value>) -> TestNode {
        let scratch = tempfile::Builder::new()
            .prefix("flotilla-actors-test")
            .tempdir()
            .unwrap();
        let origin = origin_repository(scratch.path());
        let secret = format!("actor-test-secret-{node_id}");
        let data_dir = scratch.path().join("node");
        let replica = Replica::open(ReplicaConfig::new(node_id, data_dir.clone(), None))
            .await
            .expect("open the replica");
        let (grpc_port, mesh_port) = (free_port(), free_port());
        let address = |port: u16| format!("127.0.0.1:{port}");
        replica
            .bootstrap(NodeAddr {
                grpc: address(grpc_port),
                mesh: address(mesh_port),
            })
            .await
            .expect("bootstrap");
        replica.wait_for_leader(DEADLINE).await.expect("a leader");
        replica
            .write(Command::RegisterNode {
                node: node_id,
                info: NodeInfo {
                    grpc_address: address(grpc_port),
                    mesh_address: address(mesh_port),
                    region: "local".to_string(),
                    labels: Default::default(),
                    slots: 8,
                },
            })
            .await
            .expect("register the node");
        let mesh = Mesh::start(MeshConfig {
            node_id,
            listen_port: mesh_port,
            cluster_secret: secret,
            max_live_events_per_watcher: 4096,
            listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            tls: None,
        })
        .await
        .expect("mesh");
        let driver = FakeDriver::new(data_dir.join("machines")).unwrap();
        let install_layers_dir = driver.install_layers_dir();
        let machines = MachineHost::with_driver(
            Arc::new(driver),
            &install_layers_dir,
            &data_dir,
            MachineSettings::default(),
        )
        .expect("machine host");
        let provider = ScriptedProvider::from_json(&serde_json::json!({ "turns": script }).to_string()).unwrap();
        let mut runtime = AgentRuntime::default();
        // The origin is a local repository: the node's policy must list its directory.
        runtime.git.repositories = flotilla_actors::repo_url::RepositoryPolicy::new(vec![scratch.path().to_path_buf()]);
        runtime
            .models
            .insert(MODEL.to_string(), Arc::new(provider) as Arc<dyn ModelProvider>);
        let (supervisor, _) = Actor::spawn(
            None,
            NodeSupervisor,
            NodeSupervisorArgs {
                replica: replica.clone(),
                mesh: mesh.clone(),
                machines: Arc::new(machines),
                runtime: Arc::new(runtime),
                liveness: LivenessTable::default(),
                lease: Duration::from_secs(2),
            },
        )
        .await
        .expect("node supervisor");
        TestNode {
            replica,
            mesh,
            supervisor,
            origin_url: format!("file://{}", origin.display()),
            origin,
            scratch,
        }
    }

    async fn create_agent(&self, name: &str) -> AgentId {
        let id = AgentId::new();
        self.replica
            .write(Command::CreateAgent {
                id,
                spec: std::sync::Arc::new(AgentSpec {
                    name: name.to_string(),
                    prompt: format!("Task of {name}."),
                    repository: self.origin_url.clone(),
                    base_branch: "main".to_string(),
                    work_branch: format!("flotilla/{name}"),
                    model: MODEL.to_string(),
                    team: "default".to_string(),
                    scripted: true,
                    user: String::new(),
                    ..Default::default()
                }),
            })
            .await
            .expect("create the agent");
        id
    }

    fn agent(&self, id: AgentId) -> AgentRecord {
        self.replica
            .reader()
            .read(|state| state.agents.get(&id).cloned())
            .expect("the agent exists")
    }

    /// Waits until the agent satisfies `condition`, failing with what was awaited and the agent.
    async fn wait_for_agent(&self, id: AgentId, what: &str, condition: impl Fn(&AgentRecord) -> bool) -> AgentRecord {
        poll_until(
            || Some(self.agent(id)).filter(|agent| condition(agent)),
            || {
                let agent = self.agent(id);
                format!(
                    "timed out waiting for {what}; the agent is {} (error {:?})",
                    agent.status, agent.error
                )
            },
        )
        .await
    }

    /// The running machine of the agent under its current epoch, once it has booted.
    async fn wait_for_machine(&self, id: AgentId) -> Arc<RunningMachine> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(epoch) = self.agent(id).assignment.map(|assignment| assignment.epoch) {
                if let Some(machine) = running_machine(id, epoch).await {
                    return machine;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for the machine of {id}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The content of `path` on `branch` of the origin.
    fn origin_file(&self, branch: &str, path: &str) -> String {
        git(&["show", &format!("{branch}:{path}")], &self.origin)
    }

    async fn stop(self) {
        self.supervisor
            .stop_and_wait(Some("test over".to_string()), Some(DEADLINE))
            .await
            .expect("the node supervisor stops");
        self.mesh.shutdown().await;
        self.replica.shutdown().await;
        drop(self.scratch);
    }
}

/// Waits until the registry no longer holds the machine actor and its directory is gone.
async fn wait_for_machine_gone(agent: AgentId, epoch: Epoch, machine_dir: &Path) {
    poll_until(
        || {
            let gone = ractor::registry::where_is(machine_actor_name(agent, epoch)).is_none() && !machine_dir.exists();
            gone.then_some(())
        },
        || format!("timed out waiting for the machine of {agent} under {epoch} to be destroyed"),
    )
    .await
}

/// Polls `probe` every 20 ms until it answers, failing with `failure()` past [`DEADLINE`].
async fn poll_until<T>(mut probe: impl FnMut() -> Option<T>, failure: impl Fn() -> String) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(answer) = probe() {
            return answer;
        }
        assert!(Instant::now() < deadline, "{}", failure());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn machine_dir(machine: &RunningMachine) -> PathBuf {
    machine
        .handle()
        .downcast_ref::<FakeMachine>()
        .expect("a fake machine")
        .dir()
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_finishes_then_finishes_a_follow_up_on_a_fresh_machine() {
    let script = vec![
        turn(
            "Writing the greeting.",
            &[
                (
                    "write_file",
                    serde_json::json!({"path": "hello.txt", "content": "hello\n"}),
                ),
                (
                    "run_command",
                    serde_json::json!({"command": "cat /workspace/hello.txt && pwd"}),
                ),
            ],
            0,
        ),
        turn("Done: hello.txt says hello.", &[], 0),
        turn(
            "Following up.",
            &[(
                "edit_file",
                serde_json::json!({"path": "hello.txt", "old_string": "hello", "new_string": "hello again"}),
            )],
            0,
        ),
        turn("Done again.", &[], 0),
    ];
    let node = TestNode::start(41, script).await;
    let id = node.create_agent("greeter").await;
    let machine = node.wait_for_machine(id).await;
    let first_dir = machine_dir(&machine);
    drop(machine);
    let finished = node
        .wait_for_agent(id, "FINISHED", |agent| agent.status == AgentStatus::Finished)
        .await;
    assert_eq!(finished.turns, 2);
    assert_eq!(finished.summary.as_deref(), Some("Done: hello.txt says hello."));
    assert_eq!(node.origin_file("flotilla/greeter", "hello.txt"), "hello");
    let events = node.replica.reader().agent_events_after(id, 0);
    let command_output = events
        .iter()
        .find_map(|event| match &event.kind {
            flotilla_raft::EventKind::ToolCallFinished { tool, output, .. } if tool == "run_command" => {
                Some(output.clone())
            }
            _ => None,
        })
        .expect("the command ran");
    assert!(command_output.contains("hello\n/workspace"), "{command_output}");
    let epoch = finished.assignment.expect("assigned").epoch;
    // A finished agent's actor ends, and its machine with it.
    wait_for_machine_gone(id, epoch, &first_dir).await;

    node.replica
        .write(Command::FollowUp {
            agent: id,
            text: "Say it again.".to_string(),
        })
        .await
        .expect("follow-up");
    let again = node
        .wait_for_agent(id, "FINISHED after the follow-up", |agent| {
            agent.status == AgentStatus::Finished && agent.turns == 4
        })
        .await;
    assert!(again.assignment.expect("assigned").epoch > epoch);
    assert_eq!(again.summary.as_deref(), Some("Done again."));
    assert_eq!(node.origin_file("flotilla/greeter", "hello.txt"), "hello again");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_pushes_its_work_and_its_machine_is_destroyed() {
    // The model thinks for a minute: the stop comes while the run waits for it.
    let script = vec![turn("Thinking hard.", &[], 60_000), turn("Never reached.", &[], 0)];
    let node = TestNode::start(42, script).await;
    let id = node.create_agent("stopper").await;
    let machine = node.wait_for_machine(id).await;
    node.wait_for_agent(id, "RUNNING", |agent| agent.status == AgentStatus::Running)
        .await;
    let dir = machine_dir(&machine);
    let epoch = machine.epoch;
    // Work the turn loop has not committed yet, as a user at the terminal would leave it.
    let wrote = machine
        .exec(flotilla_sandbox::ExecRequest::new("echo work in progress > wip.txt"))
        .await
        .unwrap();
    assert!(wrote.success(), "{wrote:?}");
    drop(machine);

    node.replica
        .write(Command::StopAgent {
            agent: id,
            reason: "test".to_string(),
        })
        .await
        .expect("stop");
    wait_for_machine_gone(id, epoch, &dir).await;
    let stopped = node.agent(id);
    assert_eq!(stopped.status, AgentStatus::Stopped);
    assert_eq!(node.origin_file("flotilla/stopper", "wip.txt"), "work in progress");
    assert!(stopped.pushed_commit.is_some(), "the final push is recorded");
    node.stop().await;
}

/// Waits for a live log line of the agent that contains `needle`.
async fn wait_for_live_log(subscription: &mut flotilla_actors::mesh::Subscription, needle: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let bytes = tokio::time::timeout(left, subscription.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for a live log saying {needle:?}"))
            .expect("the subscription stays open");
        let event = v1::AgentEvent::decode(bytes.as_slice()).expect("an agent event");
        if let Some(v1::agent_event::Kind::Log(line)) = event.kind {
            if line.text.contains(needle) {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_loop_waits_while_a_user_has_taken_over() {
    let script = vec![
        turn(
            "Writing.",
            &[("write_file", serde_json::json!({"path": "a.txt", "content": "a\n"}))],
            500,
        ),
        turn("Done.", &[], 0),
    ];
    let node = TestNode::start(43, script).await;
    let id = node.create_agent("taken").await;
    let mut live = node.mesh.subscribe(&id.to_string()).await.expect("subscribe");
    let machine = node.wait_for_machine(id).await;
    assert!(machine.try_take_over(), "the first take-over is granted");
    assert!(!machine.try_take_over(), "a second take-over is refused");
    wait_for_live_log(&mut live, "paused: a user has taken over the terminal").await;
    let paused = node.agent(id);
    assert_eq!(paused.status, AgentStatus::Running);
    assert!(
        paused.turns < 2,
        "the run went on while taken over: {} turns",
        paused.turns
    );

    // A read-only viewer can watch the shell meanwhile.
    let viewer = machine
        .open_pty(None, true, flotilla_sandbox::PtySize::default())
        .await
        .expect("a viewer attaches");
    drop(viewer);

    machine.hand_back();
    wait_for_live_log(&mut live, "resumed: the terminal was handed back").await;
    let finished = node
        .wait_for_agent(id, "FINISHED", |agent| agent.status == AgentStatus::Finished)
        .await;
    assert_eq!(finished.turns, 2);
    assert_eq!(node.origin_file("flotilla/taken", "a.txt"), "a");
    drop(machine);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_machine_fails_its_agent_actor_which_starts_again_on_a_fresh_machine() {
    let script = vec![
        turn(
            "Writing.",
            &[("write_file", serde_json::json!({"path": "b.txt", "content": "b\n"}))],
            0,
        ),
        turn("Done.", &[], 0),
    ];
    let node = TestNode::start(44, script).await;
    let id = node.create_agent("phoenix").await;
    let mut live = node.mesh.subscribe(&id.to_string()).await.expect("subscribe");
    let first = node.wait_for_machine(id).await;
    // Held by a user, the run waits between turns: the machine dies while nothing else moves.
    assert!(first.try_take_over());
    wait_for_live_log(&mut live, "paused: a user has taken over the terminal").await;
    let first_dir = machine_dir(&first);
    let epoch = first.epoch;
    drop(first);
    find_machine_actor(id, epoch)
        .expect("the machine actor is registered")
        .kill();

    let finished = node
        .wait_for_agent(id, "FINISHED on a fresh machine", |agent| {
            agent.status == AgentStatus::Finished
        })
        .await;
    assert_eq!(
        finished.assignment.expect("assigned").epoch,
        epoch,
        "the same epoch goes on"
    );
    assert_eq!(finished.turns, 2);
    assert_eq!(node.origin_file("flotilla/phoenix", "b.txt"), "b");
    // The killed machine was destroyed all the same.
    poll_until(
        || (!first_dir.exists()).then_some(()),
        || "the killed machine's directory is left".to_string(),
    )
    .await;
    node.stop().await;
}

/// A command that plays an owner that lost the agent yet still pushes: from a clone of its own,
/// it puts a commit on the origin's `branch` over what is there. Fake machines are host
/// processes, so the command reaches the origin the workspace was cloned for.
fn fenced_owner_push(branch: &str, file: &str) -> serde_json::Value {
    let script = format!(
        "set -e\n\
         url=$(git remote get-url origin)\n\
         scratch=$(mktemp -d)\n\
         git clone --quiet --branch {branch} \"$url\" \"$scratch/clone\"\n\
         cd \"$scratch/clone\"\n\
         echo fenced > {file}\n\
         git add {file}\n\
         git -c user.name=fenced -c user.email=fenced@example.test commit --quiet -m 'a fenced owner pushes'\n\
         git push --quiet origin HEAD:refs/heads/{branch}\n\
         git rev-parse HEAD\n\
         rm -rf \"$scratch\"\n"
    );
    serde_json::json!({ "command": script })
}

/// The commits the agent's events report displaced.
fn displaced_commits(node: &TestNode, id: AgentId) -> Vec<String> {
    node.replica
        .reader()
        .agent_events_after(id, 0)
        .into_iter()
        .filter_map(|event| match event.kind {
            flotilla_raft::EventKind::CommitDisplaced { commit, kept, .. } => {
                assert_eq!(kept, format!("refs/flotilla/displaced/{id}/{commit}"));
                Some(commit)
            }
            _ => None,
        })
        .collect()
}

/// Where the node keeps the displaced `commit` of agent `id`, if it does: its mirror's ref.
fn kept_in_mirror(node: &TestNode, id: AgentId, commit: &str) -> bool {
    let repos = node.scratch.path().join("node").join("repos");
    let mirror = flotilla_actors::repo::mirror_path(&repos, &node.origin_url);
    let output = std::process::Command::new("git")
        .args(["rev-parse", &format!("refs/flotilla/displaced/{id}/{commit}")])
        .current_dir(&mirror)
        .output()
        .expect("run git");
    String::from_utf8_lossy(&output.stdout).trim() == commit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_of_a_fenced_owner_are_displaced_reported_and_kept_and_the_agent_finishes_on_its_record() {
    let branch = "flotilla/fenced";
    let script = vec![
        turn(
            "Writing a.",
            &[("write_file", serde_json::json!({"path": "a.txt", "content": "a\n"}))],
            0,
        ),
        // A fenced owner pushes, then this owner's own push finds its lease lost.
        turn(
            "Writing b.",
            &[
                ("run_command", fenced_owner_push(branch, "one.txt")),
                ("write_file", serde_json::json!({"path": "b.txt", "content": "b\n"})),
            ],
            0,
        ),
        // A fenced owner pushes after this owner's last push: the finish finds it.
        turn("Checking.", &[("run_command", fenced_owner_push(branch, "two.txt"))], 0),
        turn("Done.", &[], 0),
    ];
    let node = TestNode::start(45, script).await;
    let id = node.create_agent("fenced").await;
    let finished = node
        .wait_for_agent(id, "FINISHED", |agent| agent.status.is_terminal())
        .await;
    assert_eq!(finished.status, AgentStatus::Finished, "error {:?}", finished.error);
    let pushed = finished.pushed_commit.clone().expect("a pushed commit");
    assert_eq!(
        git(&["rev-parse", branch], &node.origin),
        pushed,
        "the origin is at the record"
    );
    assert_eq!(node.origin_file(branch, "b.txt"), "b");
    for fenced_file in ["one.txt", "two.txt"] {
        let listed = git(&["ls-tree", "--name-only", branch], &node.origin);
        assert!(!listed.lines().any(|name| name == fenced_file), "{listed}");
    }
    let displaced = displaced_commits(&node, id);
    assert_eq!(
        displaced.len(),
        2,
        "both pushes of the fenced owner are reported: {displaced:?}"
    );
    for commit in &displaced {
        assert!(kept_in_mirror(&node, id, commit), "{commit} is kept in the mirror");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_does_not_finish_while_the_origin_disagrees_with_its_record() {
    let branch = "flotilla/refused";
    // After a fenced owner's push, the origin refuses every push: the branch cannot be moved
    // back to the record.
    let refuse_pushes = "set -e\n\
         origin=$(git remote get-url origin | sed 's|^file://||')\n\
         printf '#!/bin/sh\\necho closed for pushes >&2\\nexit 1\\n' > \"$origin/hooks/pre-receive\"\n\
         chmod +x \"$origin/hooks/pre-receive\"\n";
    let script = vec![
        turn(
            "Writing a.",
            &[("write_file", serde_json::json!({"path": "a.txt", "content": "a\n"}))],
            0,
        ),
        turn(
            "Checking.",
            &[
                ("run_command", fenced_owner_push(branch, "one.txt")),
                ("run_command", serde_json::json!({ "command": refuse_pushes })),
            ],
            0,
        ),
        turn("Done.", &[], 0),
    ];
    let node = TestNode::start(46, script).await;
    let id = node.create_agent("refused").await;
    let ended = node
        .wait_for_agent(id, "an end", |agent| agent.status.is_terminal())
        .await;
    assert_eq!(ended.status, AgentStatus::Failed, "never FINISHED off its record");
    let error = ended.error.clone().unwrap_or_default();
    assert!(
        error.contains("cannot move the branch") && error.contains("closed for pushes"),
        "{error}"
    );
    let at_origin = git(&["rev-parse", branch], &node.origin);
    assert_ne!(Some(at_origin.clone()), ended.pushed_commit);
    assert_eq!(displaced_commits(&node, id), vec![at_origin]);
    let events = node.replica.reader().agent_events_after(id, 0);
    assert!(events.iter().any(|event| matches!(&event.kind,
        flotilla_raft::EventKind::StatusChanged { reason, .. } if reason == "the work branch at the origin is not the recorded commit")));
    node.stop().await;
}
