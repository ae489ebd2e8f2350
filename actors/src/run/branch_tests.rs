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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_displaced_after_its_check_is_refused_by_the_origin_and_the_branch_does_not_move() {
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
    write(&replica, Command::CreateAgent { id: agent, spec }).await;
    let assign = |node, epoch| Command::AssignAgents {
        assignments: vec![AssignOne {
            agent,
            node,
            epoch: Epoch(epoch),
        }],
    };
    write(&replica, assign(1, 1)).await;

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
    let old = BranchOwner {
        agent,
        epoch: Epoch(1),
        replica: &replica,
        repo: &repos[0],
    };
    expect_ok(take_fence(&old).await, "the first owner takes the fence");
    let first = commit_and_bundle(&workspace, "one.txt");
    assert_eq!(push_as(&repos[0], old.fence(), &workspace, None).await.unwrap(), first);

    // The owner passes its check, then is paused: its node is judged down, the agent goes to
    // node 2 under epoch 2, and the new owner takes the fence before pushing anything.
    expect_ok(check_owner(&old).await, "the owner still holds the agent");
    write(&replica, Command::NodeDown { node: 1 }).await;
    write(&replica, assign(2, 2)).await;
    let new = BranchOwner {
        agent,
        epoch: Epoch(2),
        replica: &replica,
        repo: &repos[1],
    };
    expect_ok(take_fence(&new).await, "the new owner takes the fence");

    // The old owner wakes up and pushes, leased on the right commit.
    let before = git(&["rev-parse", BRANCH], &origin_path);
    assert_eq!(before, first);
    let stale = commit_and_bundle(&workspace, "two.txt");
    let refused = push_as(&repos[0], old.fence(), &workspace, Some(first.clone()))
        .await
        .unwrap_err();
    assert!(matches!(refused, RepoError::Fenced { epoch: 1, .. }), "{refused}");
    assert_eq!(
        git(&["rev-parse", BRANCH], &origin_path),
        before,
        "the branch did not move"
    );
    let stale_at_origin = std::process::Command::new("git")
        .args(["cat-file", "-e", &stale])
        .current_dir(&origin_path)
        .status()
        .unwrap();
    assert!(!stale_at_origin.success(), "the stale commit is not at the origin");
    // The run ends as superseded: the log confirms it lost the agent; the agent is not failed.
    match origin_trouble(&old, refused).await {
        BranchTrouble::Ended(outcome) => assert_eq!(outcome, RunOutcome::Superseded),
        BranchTrouble::Origin(error) => panic!("expected a superseded run, found {error}"),
    }
    let record = replica
        .reader()
        .read(|state| state.agents.get(&agent).cloned())
        .unwrap();
    assert!(!record.status.is_terminal(), "{}", record.status);
    for repo in repos {
        repo.stop(None);
    }
    replica.shutdown().await;
}
