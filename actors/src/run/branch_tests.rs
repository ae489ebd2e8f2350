//! The window between an owner's `CheckOwner` and its push, with a real single-node Replica on
//! RocksDB, real repository actors (one mirror per owner's node) and a bare origin on disk. The
//! test plays the machine: host git commits and bundles the branch, as git in a machine does.

use std::path::Path;
use std::time::Duration;

use flotilla_raft::command::AssignOne;
use flotilla_raft::{AgentSpec, NodeAddr, NodeInfo, ReplicaConfig};
use ractor::Actor;

use super::*;
use crate::push_bundle::{PushSource, PUSH_BUNDLE_PATH};
use crate::repo::{mirror_path, GitSettings, RepoActor, RepoArgs, Workspace};
use crate::run::RunOutcome;

const DEADLINE: Duration = Duration::from_secs(60);
const BRANCH: &str = "flotilla/window";

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

/// A bare origin with one commit on `main`, as a `file://` URL.
fn origin(dir: &Path) -> String {
    let (origin, seed) = (dir.join("origin.git"), dir.join("seed"));
    std::fs::create_dir_all(&seed).unwrap();
    git(
        &["init", "--quiet", "--bare", "-b", "main", &origin.display().to_string()],
        dir,
    );
    git(&["init", "--quiet", "-b", "main"], &seed);
    std::fs::write(seed.join("README.md"), "window\n").unwrap();
    git(&["add", "."], &seed);
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.test",
            "commit",
            "--quiet",
            "-m",
            "seed",
        ],
        &seed,
    );
    git(&["push", "--quiet", &origin.display().to_string(), "main"], &seed);
    format!("file://{}", origin.display())
}

/// What git in the machine does before a push: commit a file and bundle the branch.
fn commit_and_bundle(workspace: &Workspace, file: &str) -> String {
    let path = workspace.path.as_path();
    std::fs::write(path.join(file), format!("{file}\n")).unwrap();
    git(&["add", "."], path);
    git(
        &[
            "-c",
            "user.name=a",
            "-c",
            "user.email=a@example.test",
            "commit",
            "--quiet",
            "-m",
            file,
        ],
        path,
    );
    let branch = format!("refs/heads/{}", workspace.branch);
    let base = format!("^{}", workspace.head_commit);
    git(&["bundle", "create", "--quiet", PUSH_BUNDLE_PATH, &branch, &base], path);
    git(&["rev-parse", "HEAD"], path)
}

async fn push_as(
    repo: &ActorRef<RepoMsg>,
    fence: OwnerFence,
    workspace: &Workspace,
    lease: Option<String>,
) -> Result<String, RepoError> {
    ractor::call!(repo, |reply| RepoMsg::Push {
        fence,
        workspace: workspace.path.clone(),
        branch: workspace.branch.clone(),
        base: workspace.head_commit.clone(),
        source: PushSource::Bundle,
        lease,
        reply,
    })
    .expect("the repository actor answers")
}

fn expect_ok(result: Result<(), BranchTrouble>, what: &str) {
    match result {
        Ok(()) => {}
        Err(BranchTrouble::Ended(outcome)) => panic!("{what}: the run ended {outcome:?}"),
        Err(BranchTrouble::Origin(error)) => panic!("{what}: {error}"),
    }
}

async fn write(replica: &Replica, command: Command) {
    replica.write(command).await.expect("the write is applied");
}

/// A replica that knows nodes 1 and 2 and an agent assigned to node 1 under epoch 1, a
/// repository actor with its own mirror for each node, and the agent's workspace on node 1.
struct Window {
    dir: tempfile::TempDir,
    origin_path: std::path::PathBuf,
    replica: Replica,
    agent: AgentId,
    repos: Vec<ActorRef<RepoMsg>>,
    workspace: Workspace,
}

fn assign(agent: AgentId, node: u64, epoch: u64) -> Command {
    Command::AssignAgents {
        assignments: vec![AssignOne {
            agent,
            node,
            epoch: Epoch(epoch),
        }],
    }
}

async fn window() -> Window {
    let dir = tempfile::tempdir().unwrap();
    let url = origin(dir.path());
    let origin_path = dir.path().join("origin.git");
    let replica = Replica::open(ReplicaConfig::new(1, dir.path().join("raft"), None))
        .await
        .unwrap();
    let address = NodeAddr {
        grpc: "127.0.0.1:1".to_string(),
        mesh: "127.0.0.1:2".to_string(),
    };
    replica.bootstrap(address).await.unwrap();
    replica.wait_for_leader(DEADLINE).await.unwrap();
    for node in [1, 2] {
        let info = NodeInfo {
            grpc_address: format!("127.0.0.1:{node}"),
            mesh_address: format!("127.0.0.1:{node}"),
            region: "local".to_string(),
            labels: Default::default(),
            slots: 1,
        };
        write(&replica, Command::RegisterNode { node, info }).await;
    }
    let agent = AgentId::new();
    let spec = AgentSpec {
        name: "window".to_string(),
        repository: url.clone(),
        base_branch: "main".to_string(),
        work_branch: BRANCH.to_string(),
        ..Default::default()
    };
    write(
        &replica,
        Command::CreateAgent {
            id: agent,
            spec: spec.into(),
        },
    )
    .await;
    write(&replica, assign(agent, 1, 1)).await;

    // Each owner's node has its own mirror of the origin.
    let settings = GitSettings {
        repositories: crate::repo_url::RepositoryPolicy::new(vec![dir.path().to_path_buf()]),
        ..GitSettings::default()
    };
    let mut repos = Vec::new();
    for node in ["node-1", "node-2"] {
        let repos_dir = dir.path().join(node);
        std::fs::create_dir_all(&repos_dir).unwrap();
        let args = RepoArgs {
            url: url.clone(),
            mirror: mirror_path(&repos_dir, &url),
            git: settings.clone(),
            providers: None,
        };
        repos.push(Actor::spawn(None, RepoActor, args).await.unwrap().0);
    }
    let workspace = ractor::call!(repos[0], |reply| RepoMsg::PrepareWorkspace {
        base_branch: "main".to_string(),
        work_branch: BRANCH.to_string(),
        recorded: None,
        path: dir.path().join("workspace"),
        requested_at: std::time::Instant::now(),
        reply,
    })
    .unwrap()
    .unwrap();
    Window {
        dir,
        origin_path,
        replica,
        agent,
        repos,
        workspace,
    }
}

impl Window {
    fn owner(&self, node: usize, epoch: u64) -> BranchOwner<'_> {
        BranchOwner {
            agent: self.agent,
            epoch: Epoch(epoch),
            replica: &self.replica,
            repo: &self.repos[node - 1],
        }
    }

    /// The agent's node 1 is judged down and the agent goes to node 2 under epoch 2.
    async fn reassign_to_node_2(&self) {
        write(&self.replica, Command::NodeDown { node: 1 }).await;
        write(&self.replica, assign(self.agent, 2, 2)).await;
    }

    /// Whether the origin has `reference` (a ref, or an object id) and its object.
    fn origin_has(&self, reference: &str) -> bool {
        std::process::Command::new("git")
            .args(["rev-parse", "--verify", "--quiet", &format!("{reference}^{{object}}")])
            .current_dir(&self.origin_path)
            .output()
            .unwrap()
            .status
            .success()
    }

    /// The first owner (node 1, epoch 1), displaced, commits `file` and pushes it leased on
    /// `lease`: the origin refuses it on the fence, the branch stays at `branch_before` (or
    /// absent) and the commit does not reach the origin. Answers the refusal.
    async fn stale_push_is_refused(&self, file: &str, lease: Option<String>, branch_before: Option<&str>) -> RepoError {
        let old = self.owner(1, 1);
        let stale = commit_and_bundle(&self.workspace, file);
        let refused = push_as(old.repo, old.fence(), &self.workspace, lease)
            .await
            .unwrap_err();
        assert!(matches!(refused, RepoError::Fenced { epoch: 1, .. }), "{refused}");
        let branch = format!("refs/heads/{BRANCH}");
        match branch_before {
            Some(commit) => assert_eq!(
                git(&["rev-parse", &branch], &self.origin_path),
                commit,
                "the branch did not move"
            ),
            None => assert!(!self.origin_has(&branch), "no branch was created"),
        }
        assert!(!self.origin_has(&stale), "the stale commit is not at the origin");
        refused
    }

    async fn stop(self) {
        for repo in &self.repos {
            repo.stop(None);
        }
        self.replica.shutdown().await;
        drop(self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_displaced_after_its_check_is_refused_by_the_origin_and_the_branch_does_not_move() {
    let window = window().await;
    let (workspace, origin_path) = (&window.workspace, &window.origin_path);
    let old = window.owner(1, 1);
    expect_ok(take_fence(&old).await, "the first owner takes the fence");
    let first = commit_and_bundle(workspace, "one.txt");
    assert_eq!(push_as(old.repo, old.fence(), workspace, None).await.unwrap(), first);

    // The owner passes its check, then is paused: its node is judged down, the agent goes to
    // node 2 under epoch 2, and the new owner takes the fence before pushing anything.
    expect_ok(check_owner(&old).await, "the owner still holds the agent");
    window.reassign_to_node_2().await;
    let new = window.owner(2, 2);
    expect_ok(take_fence(&new).await, "the new owner takes the fence");

    // The old owner wakes up and pushes, leased on the right commit.
    assert_eq!(git(&["rev-parse", BRANCH], origin_path), first);
    let refused = window
        .stale_push_is_refused("two.txt", Some(first.clone()), Some(&first))
        .await;
    // The run ends as superseded: the log confirms it lost the agent; the agent is not failed.
    match origin_trouble(&old, refused).await {
        BranchTrouble::Ended(outcome) => assert_eq!(outcome, RunOutcome::Superseded),
        BranchTrouble::Origin(error) => panic!("expected a superseded run, found {error}"),
    }
    let record = window
        .replica
        .reader()
        .read(|state| state.agents.get(&window.agent).cloned())
        .unwrap();
    assert!(!record.status.is_terminal(), "{}", record.status);
    window.stop().await;
}

/// A run of the first owner takes no fence before its first push (nobody held the agent
/// before it): that push creates the fence with the branch, and a later owner's fence still
/// makes the origin refuse the first owner's pushes, whether it had pushed before or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_owner_that_never_took_the_fence_is_refused_once_a_later_owner_took_it() {
    let window = window().await;
    let (workspace, origin_path) = (&window.workspace, &window.origin_path);
    let old = window.owner(1, 1);
    assert!(!old.fence().succeeds_an_owner(), "epoch 1 is the agent's first owner");
    let fence_ref = old.fence().ref_name();
    assert!(!window.origin_has(&fence_ref), "no fence before the first push");

    // The first push creates the fence at the first owner's epoch, with the branch.
    let first = commit_and_bundle(workspace, "one.txt");
    assert_eq!(push_as(old.repo, old.fence(), workspace, None).await.unwrap(), first);
    let fence_at_origin = git(&["rev-parse", &fence_ref], origin_path);
    let format = crate::origin_fence::ObjectFormat::Sha1;
    let epoch_one = [crate::origin_fence::Phase::Tick, crate::origin_fence::Phase::Tock]
        .map(|phase| crate::origin_fence::fence_id(format, old.fence(), phase));
    assert!(
        epoch_one.contains(&fence_at_origin),
        "{fence_at_origin} is not an epoch-1 fence"
    );

    // The agent goes to node 2, whose run takes the fence first (epoch 2 succeeds an owner).
    window.reassign_to_node_2().await;
    let new = window.owner(2, 2);
    assert!(new.fence().succeeds_an_owner());
    expect_ok(take_fence(&new).await, "the new owner takes the fence");
    window
        .stale_push_is_refused("two.txt", Some(first.clone()), Some(&first))
        .await;
    window.stop().await;
}

/// The same when the first owner had pushed nothing yet: its first push, leased on the fence
/// being absent, is refused, and the branch is not created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_owner_s_first_push_is_refused_after_a_later_owner_took_the_fence() {
    let window = window().await;
    window.reassign_to_node_2().await;
    expect_ok(take_fence(&window.owner(2, 2)).await, "the new owner takes the fence");
    window.stale_push_is_refused("one.txt", None, None).await;
    window.stop().await;
}
