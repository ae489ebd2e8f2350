//! Pushes through the mirror from what a machine made: real git on repositories on disk. Here
//! the test plays the machine (its git writes the bundle on the host); the machine-side
//! containment (alternates and links that lead nowhere inside a machine) is tested with real
//! machines in the integration tests.

use super::tests::{allowing, origin_with_main};
use super::*;
use crate::origin_fence::{fence_id, fence_ref, Phase};
use flotilla_raft::{AgentId, Epoch};

/// The agent of these tests, as owned under `epoch`.
fn owner(epoch: u64) -> OwnerFence {
    OwnerFence {
        agent: "01J0000000000000000000PVSH".parse::<AgentId>().unwrap(),
        epoch: Epoch(epoch),
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    origin: PathBuf,
    state: RepoState,
    workspace: Workspace,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let url = origin_with_main(&root).await;
    std::fs::create_dir_all(root.join("repos")).unwrap();
    let mut state = RepoState::new(RepoArgs {
        url: url.clone(),
        mirror: mirror_path(&root.join("repos"), &url),
        git: allowing(&root),
        providers: None,
    });
    let workspace = state
        .prepare("main", "flotilla/push-test", None, &root.join("workspace"))
        .await
        .unwrap();
    Setup {
        origin: root.join("origin.git"),
        _dir: dir,
        root,
        state,
        workspace,
    }
}

/// What the machine's git does: commit a file, then bundle the branch over the base.
async fn commit_and_bundle(workspace: &Workspace, file: &str, contents: &str) -> String {
    std::fs::write(workspace.path.join(file), contents).unwrap();
    let path = Some(workspace.path.as_path());
    git(&["add", "."], path).await.unwrap();
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
    )
    .await
    .unwrap();
    git(
        &[
            "bundle",
            "create",
            "--quiet",
            push_bundle::PUSH_BUNDLE_PATH,
            &format!("refs/heads/{}", workspace.branch),
            &format!("^{}", workspace.head_commit),
        ],
        path,
    )
    .await
    .unwrap();
    git(&["rev-parse", "HEAD"], path).await.unwrap()
}

/// Pushes leased on what the origin holds (these tests are about what leaves the machine).
async fn push(setup: &mut Setup, source: PushSource) -> Result<String, RepoError> {
    let workspace = setup.workspace.clone();
    let lease = setup.state.branch_at_origin(&workspace.branch).await.unwrap();
    setup
        .state
        .push(
            owner(1),
            &workspace.path,
            &workspace.branch,
            &workspace.head_commit,
            &source,
            lease.as_deref(),
        )
        .await
}

fn push_message(result: Result<String, RepoError>) -> String {
    match result {
        Ok(commit) => panic!("expected a refused push, pushed {commit}"),
        Err(RepoError::Push { message, .. }) => message,
        Err(other) => panic!("expected a push error, found {other}"),
    }
}

async fn has_object(repository: &Path, object: &str) -> bool {
    git(&["cat-file", "-e", object], Some(repository)).await.is_ok()
}

#[tokio::test]
async fn a_bundle_from_the_machine_reaches_the_origin_and_leaves_no_copy_behind() {
    let mut setup = setup().await;
    let head = commit_and_bundle(&setup.workspace, "hello.txt", "hello\n").await;
    let pushed = push(&mut setup, PushSource::Bundle).await.unwrap();
    assert_eq!(pushed, head);
    assert_eq!(
        git(&["rev-parse", "refs/heads/flotilla/push-test"], Some(&setup.origin))
            .await
            .unwrap(),
        head
    );
    let incoming: Vec<_> = std::fs::read_dir(setup.root.join("repos"))
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(".incoming-"))
        .collect();
    assert!(
        incoming.is_empty(),
        "the node's copy of the bundle is removed: {incoming:?}"
    );
}

#[tokio::test]
async fn a_branch_with_nothing_new_pushes_a_commit_of_the_base_and_nothing_else() {
    let mut setup = setup().await;
    let base = setup.workspace.head_commit.clone();
    let pushed = push(&mut setup, PushSource::NothingNew { tip: base.clone() })
        .await
        .unwrap();
    assert_eq!(pushed, base);

    let stranger = commit_and_bundle(&setup.workspace, "x.txt", "x\n").await;
    let message = push_message(push(&mut setup, PushSource::NothingNew { tip: stranger.clone() }).await);
    assert!(
        message.contains("which the base") && message.contains(&stranger),
        "{message}"
    );
    let message = push_message(
        push(
            &mut setup,
            PushSource::NothingNew {
                tip: "HEAD --upload-pack=x".to_string(),
            },
        )
        .await,
    );
    assert!(message.contains("not an object id"), "{message}");
}

#[tokio::test]
async fn a_bundle_that_is_a_symlink_or_missing_is_refused() {
    let mut setup = setup().await;
    commit_and_bundle(&setup.workspace, "hello.txt", "hello\n").await;
    let bundle = setup.workspace.path.join(push_bundle::PUSH_BUNDLE_PATH);
    let elsewhere = setup.root.join("elsewhere.bundle");
    std::fs::rename(&bundle, &elsewhere).unwrap();
    let message = push_message(push(&mut setup, PushSource::Bundle).await);
    assert_eq!(message, "the machine wrote no bundle at .git/flotilla-push.bundle");
    std::os::unix::fs::symlink(&elsewhere, &bundle).unwrap();
    let message = push_message(push(&mut setup, PushSource::Bundle).await);
    assert_eq!(
        message,
        "the workspace's bundle: .git/flotilla-push.bundle is a symlink"
    );
}

#[tokio::test]
async fn a_bundle_that_names_another_repository_is_refused_and_nothing_of_it_is_fetched() {
    let mut setup = setup().await;
    // Another repository on the host, with a commit the agent must not reach.
    let secret = setup.root.join("secret");
    git(&["init", "--quiet", "-b", "main", &secret.display().to_string()], None)
        .await
        .unwrap();
    std::fs::write(secret.join("secret.txt"), "the secret\n").unwrap();
    git(&["add", "."], Some(&secret)).await.unwrap();
    git(
        &[
            "-c",
            "user.name=s",
            "-c",
            "user.email=s@example.test",
            "commit",
            "--quiet",
            "-m",
            "s",
        ],
        Some(&secret),
    )
    .await
    .unwrap();
    let secret_commit = git(&["rev-parse", "HEAD"], Some(&secret)).await.unwrap();
    // git handed a file that is not a bundle takes it as a repository path; a gitfile would
    // lead it to the other repository.
    std::fs::write(
        setup.workspace.path.join(push_bundle::PUSH_BUNDLE_PATH),
        format!("gitdir: {}\n", secret.join(".git").display()),
    )
    .unwrap();
    git(&["branch", "-f", "flotilla/push-test", &secret_commit], Some(&secret))
        .await
        .unwrap();
    let message = push_message(push(&mut setup, PushSource::Bundle).await);
    assert!(message.contains("is not a git bundle"), "{message}");
    assert!(!has_object(&setup.state.args.mirror, &secret_commit).await);
    assert!(!has_object(&setup.origin, &secret_commit).await);
}

#[tokio::test]
async fn objects_that_fail_fsck_are_refused_with_gits_words() {
    let mut setup = setup().await;
    let path = Some(setup.workspace.path.as_path());
    let tree = git(&["write-tree"], path).await.unwrap();
    let commit_text = format!(
        "tree {tree}\nparent {}\nauthor bad <a@b> not-a-date\ncommitter a <a@b> 0 +0000\n\nbad\n",
        setup.workspace.head_commit
    );
    let file = setup.root.join("commit.txt");
    std::fs::write(&file, commit_text).unwrap();
    let bad = git(
        &[
            "hash-object",
            "-t",
            "commit",
            "-w",
            "--literally",
            &file.display().to_string(),
        ],
        path,
    )
    .await
    .unwrap();
    git(&["update-ref", "refs/heads/flotilla/push-test", &bad], path)
        .await
        .unwrap();
    git(
        &[
            "bundle",
            "create",
            "--quiet",
            push_bundle::PUSH_BUNDLE_PATH,
            "refs/heads/flotilla/push-test",
            &format!("^{}", setup.workspace.head_commit),
        ],
        path,
    )
    .await
    .unwrap();
    let message = push_message(push(&mut setup, PushSource::Bundle).await);
    assert!(
        message.starts_with("cannot take the branch from the workspace's bundle:") && message.contains("bad date"),
        "{message}"
    );
    assert!(!has_object(&setup.state.args.mirror, &bad).await);
    assert!(!has_object(&setup.origin, &bad).await);
}

#[tokio::test]
async fn a_bundle_over_the_limit_is_refused_without_a_copy_left() {
    let setup = setup().await;
    std::fs::write(
        setup.workspace.path.join(push_bundle::PUSH_BUNDLE_PATH),
        vec![b'#'; 8192],
    )
    .unwrap();
    let incoming = setup.root.join("repos");
    let error = push_bundle::copy_bundle(&setup.workspace.path, &incoming, 4096)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the workspace's bundle: .git/flotilla-push.bundle is larger than 4096 bytes"
    );
    let left = std::fs::read_dir(&incoming)
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(".incoming-"))
        .count();
    assert_eq!(left, 0, "the partial copy is removed");
}

/// A push leased on `lease`, as an owner that believes the record is `lease` makes it.
async fn push_leased(setup: &mut Setup, lease: Option<&str>) -> Result<String, RepoError> {
    push_as(setup, owner(1), lease).await
}

/// A push of the owner `fence`, leased on `lease`.
async fn push_as(setup: &mut Setup, fence: OwnerFence, lease: Option<&str>) -> Result<String, RepoError> {
    let workspace = setup.workspace.clone();
    setup
        .state
        .push(
            fence,
            &workspace.path,
            &workspace.branch,
            &workspace.head_commit,
            &PushSource::Bundle,
            lease,
        )
        .await
}

async fn origin_branch(setup: &Setup) -> String {
    git(&["rev-parse", "refs/heads/flotilla/push-test"], Some(&setup.origin))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_push_leased_on_a_stale_record_is_refused_and_leaves_the_branch() {
    let mut setup = setup().await;
    let first = commit_and_bundle(&setup.workspace, "a.txt", "a\n").await;
    assert_eq!(
        push_leased(&mut setup, None).await.unwrap(),
        first,
        "nothing recorded: the branch is new"
    );
    // The current owner moves the branch on from the record.
    let second = commit_and_bundle(&setup.workspace, "b.txt", "b\n").await;
    assert_eq!(push_leased(&mut setup, Some(&first)).await.unwrap(), second);

    // An owner that still believes the record is `first` (or that nothing was recorded).
    let stale = commit_and_bundle(&setup.workspace, "c.txt", "c\n").await;
    for lease in [Some(first.as_str()), None] {
        let error = push_leased(&mut setup, lease).await.unwrap_err();
        assert_eq!(
            error,
            RepoError::LeaseLost {
                url: setup.state.args.url.clone(),
                branch: "flotilla/push-test".to_string(),
                expected: lease.map(str::to_string),
                found: Some(second.clone()),
            }
        );
        let text = error.to_string();
        assert!(text.contains(&second) && text.contains("refused"), "{text}");
        assert_eq!(origin_branch(&setup).await, second, "the branch is untouched");
    }
    assert!(
        !has_object(&setup.origin, &stale).await,
        "nothing of the stale push reached the origin"
    );
    assert_eq!(
        setup.state.branch_at_origin("flotilla/push-test").await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(setup.state.branch_at_origin("flotilla/none").await.unwrap(), None);
}

#[tokio::test]
async fn restoring_keeps_the_displaced_commit_and_moves_the_branch_back_to_the_record() {
    let mut setup = setup().await;
    let recorded = commit_and_bundle(&setup.workspace, "a.txt", "a\n").await;
    push_leased(&mut setup, None).await.unwrap();
    // A fenced owner pushed over the record.
    let displaced = commit_and_bundle(&setup.workspace, "fenced.txt", "fenced\n").await;
    push_leased(&mut setup, Some(&recorded)).await.unwrap();
    assert_eq!(origin_branch(&setup).await, displaced);

    // Leased on a commit the origin does not hold: nothing moves.
    let kept = "refs/flotilla/displaced/agent/test".to_string();
    let error = setup
        .state
        .restore(
            owner(1),
            "flotilla/push-test",
            Some(&recorded),
            Some((&recorded, &kept)),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RepoError::Restore { .. }), "{error}");
    assert_eq!(origin_branch(&setup).await, displaced);

    setup
        .state
        .restore(
            owner(1),
            "flotilla/push-test",
            Some(&recorded),
            Some((&displaced, &kept)),
        )
        .await
        .unwrap();
    assert_eq!(origin_branch(&setup).await, recorded, "the record wins");
    let mirror = setup.state.args.mirror.clone();
    assert_eq!(
        git(&["rev-parse", &kept], Some(&mirror)).await.unwrap(),
        displaced,
        "kept"
    );
    assert_eq!(
        git(&["rev-parse", "refs/heads/flotilla/push-test"], Some(&mirror))
            .await
            .unwrap(),
        recorded
    );
    // A later fetch keeps it too.
    setup.state.refresh().await.unwrap();
    assert_eq!(git(&["rev-parse", &kept], Some(&mirror)).await.unwrap(), displaced);

    // With nothing recorded, the branch a fenced owner made is deleted.
    setup
        .state
        .restore(
            owner(1),
            "flotilla/push-test",
            None,
            Some((&recorded, "refs/flotilla/displaced/agent/first")),
        )
        .await
        .unwrap();
    assert_eq!(setup.state.branch_at_origin("flotilla/push-test").await.unwrap(), None);
}

#[tokio::test]
async fn a_workspace_starts_from_the_recorded_commit_whatever_the_origin_holds() {
    let mut setup = setup().await;
    let recorded = commit_and_bundle(&setup.workspace, "a.txt", "a\n").await;
    push_leased(&mut setup, None).await.unwrap();
    let displaced = commit_and_bundle(&setup.workspace, "fenced.txt", "fenced\n").await;
    push_leased(&mut setup, Some(&recorded)).await.unwrap();
    let root = setup.root.clone();
    let workspace = setup
        .state
        .prepare("main", "flotilla/push-test", Some(&recorded), &root.join("next"))
        .await
        .unwrap();
    assert!(workspace.resumed);
    assert_eq!(workspace.head_commit, recorded);
    assert!(!workspace.path.join("fenced.txt").exists());
    assert_eq!(
        git(&["branch", "--show-current"], Some(&workspace.path)).await.unwrap(),
        "flotilla/push-test"
    );
    // Nothing recorded: the origin's branch is taken as it is.
    let adopted = setup
        .state
        .prepare("main", "flotilla/push-test", None, &root.join("adopted"))
        .await
        .unwrap();
    assert_eq!(adopted.head_commit, displaced);
    let missing = "0123456789012345678901234567890123456789";
    let error = setup
        .state
        .prepare("main", "flotilla/push-test", Some(missing), &root.join("missing"))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("neither at the origin nor in this node's mirror"),
        "{error}"
    );
}

async fn origin_fence(setup: &Setup) -> Option<String> {
    git(
        &["rev-parse", "--verify", "--quiet", &fence_ref(owner(1).agent)],
        Some(&setup.origin),
    )
    .await
    .ok()
}

#[tokio::test]
async fn every_push_moves_the_fence_and_a_later_owner_s_fence_refuses_an_older_owner_whole() {
    let mut setup = setup().await;
    let format = ObjectFormat::Sha1;
    let first = commit_and_bundle(&setup.workspace, "a.txt", "a\n").await;
    push_as(&mut setup, owner(1), None).await.unwrap();
    assert_eq!(
        origin_fence(&setup).await,
        Some(fence_id(format, owner(1), Phase::Tick)),
        "the first push takes the fence"
    );
    let second = commit_and_bundle(&setup.workspace, "b.txt", "b\n").await;
    push_as(&mut setup, owner(1), Some(&first)).await.unwrap();
    assert_eq!(
        origin_fence(&setup).await,
        Some(fence_id(format, owner(1), Phase::Tock)),
        "each push moves the fence to the epoch's other value"
    );

    // A new owner takes the fence; the older owner, leased on the right commit, is refused.
    setup.state.take_fence(owner(2)).await.unwrap();
    assert_eq!(
        origin_fence(&setup).await,
        Some(fence_id(format, owner(2), Phase::Tick))
    );
    let stale = commit_and_bundle(&setup.workspace, "c.txt", "c\n").await;
    let error = push_as(&mut setup, owner(1), Some(&second)).await.unwrap_err();
    assert!(matches!(&error, RepoError::Fenced { epoch: 1, .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("a later owner holds the agent"), "{text}");
    assert_eq!(origin_branch(&setup).await, second, "the branch did not move");
    assert!(
        !has_object(&setup.origin, &stale).await,
        "nothing of the stale push reached the origin"
    );
    // Nor can the older owner take the fence back, or move the branch through a restore.
    let error = setup.state.take_fence(owner(1)).await.unwrap_err();
    assert!(matches!(error, RepoError::Fenced { .. }), "{error}");
    let error = setup
        .state
        .restore(
            owner(1),
            "flotilla/push-test",
            Some(&first),
            Some((&second, "refs/flotilla/displaced/t/x")),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RepoError::Fenced { .. }), "{error}");
    assert_eq!(origin_branch(&setup).await, second, "the branch did not move");

    // The new owner pushes, and taking its own fence again changes nothing.
    assert_eq!(push_as(&mut setup, owner(2), Some(&second)).await.unwrap(), stale);
    setup.state.take_fence(owner(2)).await.unwrap();
    assert_eq!(
        origin_fence(&setup).await,
        Some(fence_id(format, owner(2), Phase::Tock))
    );
}

#[tokio::test]
async fn a_push_whose_mirror_is_behind_on_its_own_fence_reads_the_origin_and_goes_through() {
    let mut setup = setup().await;
    let first = commit_and_bundle(&setup.workspace, "a.txt", "a\n").await;
    push_as(&mut setup, owner(3), None).await.unwrap();
    // The node forgets (or never saw) the fence: a node restarted, or another node held it.
    setup.state.forget_fences().await;
    let second = commit_and_bundle(&setup.workspace, "b.txt", "b\n").await;
    assert_eq!(push_as(&mut setup, owner(3), Some(&first)).await.unwrap(), second);
    // The node knows a stale value of its own epoch: the push tries once more.
    setup
        .state
        .remember_fence(
            &fence_ref(owner(3).agent),
            Some(&fence_id(ObjectFormat::Sha1, owner(3), Phase::Tock)),
        )
        .await;
    let third = commit_and_bundle(&setup.workspace, "c.txt", "c\n").await;
    assert_eq!(push_as(&mut setup, owner(3), Some(&second)).await.unwrap(), third);
}

/// A fence is taken from what the node knows, without reading the origin first; when the
/// node knows nothing (a node restarted, or another node held the agent), the lease on
/// "no fence" fails and the origin is read: an earlier owner's fence is still taken, a later
/// owner's still refuses.
#[tokio::test]
async fn taking_a_fence_the_mirror_does_not_know_reads_the_origin() {
    let mut setup = setup().await;
    let format = ObjectFormat::Sha1;
    setup.state.take_fence(owner(1)).await.unwrap();
    assert_eq!(
        origin_fence(&setup).await,
        Some(fence_id(format, owner(1), Phase::Tick)),
        "a fence nobody held is taken on the node's word"
    );
    setup.state.forget_fences().await;
    setup.state.take_fence(owner(2)).await.unwrap();
    assert_eq!(
        origin_fence(&setup).await,
        Some(fence_id(format, owner(2), Phase::Tick)),
        "an earlier owner's fence the mirror did not know is taken after reading the origin"
    );
    setup.state.forget_fences().await;
    let error = setup.state.take_fence(owner(1)).await.unwrap_err();
    assert!(matches!(error, RepoError::Fenced { .. }), "{error}");
    assert_eq!(
        origin_fence(&setup).await,
        Some(fence_id(format, owner(2), Phase::Tick)),
        "a later owner's fence stays"
    );
}

#[tokio::test]
async fn the_origin_compares_the_fence_under_the_same_lock_as_the_branch() {
    let mut setup = setup().await;
    let first = commit_and_bundle(&setup.workspace, "a.txt", "a\n").await;
    push_as(&mut setup, owner(1), None).await.unwrap();
    // The successor takes the fence while the older owner's push is in flight: after the pack
    // is received and before the refs are updated (a pre-receive hook of the origin does it).
    let successor = fence_id(ObjectFormat::Sha1, owner(2), Phase::Tick);
    let text = crate::origin_fence::fence_commit(ObjectFormat::Sha1, owner(2), Phase::Tick);
    std::fs::write(setup.root.join("fence-commit"), text).unwrap();
    let fence_path = setup.root.join("fence-commit").display().to_string();
    git(&["hash-object", "-t", "commit", "-w", &fence_path], Some(&setup.origin))
        .await
        .unwrap();
    let hook = setup.origin.join("hooks").join("pre-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncat >/dev/null\nenv -u GIT_QUARANTINE_PATH git update-ref {} {successor}\n",
            fence_ref(owner(1).agent)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    commit_and_bundle(&setup.workspace, "b.txt", "b\n").await;
    let error = push_as(&mut setup, owner(1), Some(&first)).await.unwrap_err();
    assert!(matches!(&error, RepoError::Fenced { .. }), "{error}");
    assert_eq!(origin_branch(&setup).await, first, "the branch did not move");
}

/// What a node knows of the fences starts from its mirror's (a new mirror holds the origin's),
/// and from then on follows the fences it moves, in memory: the mirror's refs are not written.
#[tokio::test]
async fn a_node_starts_from_its_mirror_s_fences_and_keeps_its_own_moves_in_memory() {
    let setup = setup().await;
    let format = ObjectFormat::Sha1;
    let mirror = setup.state.args.mirror.clone();
    let earlier = fence_id(format, owner(1), Phase::Tick);
    // The fence commit, as any node writes it before pushing it.
    let text = crate::origin_fence::fence_commit(format, owner(1), Phase::Tick);
    let written = fence::git_stdin(&["hash-object", "-t", "commit", "-w", "--stdin"], &mirror, &text)
        .await
        .unwrap();
    assert_eq!(written, earlier);
    git(&["update-ref", &fence_ref(owner(1).agent), &earlier], Some(&mirror))
        .await
        .unwrap();
    let restarted = setup.state.detached();
    *restarted.fences.lock().await = None;
    assert_eq!(
        restarted.known_fence(&fence_ref(owner(1).agent)).await,
        Some(earlier.clone()),
        "read from the mirror"
    );
    assert_eq!(
        restarted.known_fence(&fence_ref(AgentId::new())).await,
        None,
        "another agent"
    );
    restarted
        .remember_fence(&fence_ref(owner(1).agent), Some("moved"))
        .await;
    assert_eq!(
        restarted.known_fence(&fence_ref(owner(1).agent)).await.as_deref(),
        Some("moved")
    );
    let in_mirror = git(&["rev-parse", &fence_ref(owner(1).agent)], Some(&mirror))
        .await
        .unwrap();
    assert_eq!(in_mirror, earlier, "the mirror's ref is left as it was");
}

/// What a node knows of the fences is bounded: past the limit, the fences moved longest ago are
/// forgotten first (each costs its next move a read of the origin).
#[tokio::test]
async fn the_fences_a_node_knows_are_bounded_and_the_oldest_go_first() {
    let setup = setup().await;
    setup.state.forget_fences().await;
    let name = |index: usize| format!("refs/flotilla/fence/{index:05}");
    for index in 0..=fence::MAX_KNOWN_FENCES {
        setup.state.remember_fence(&name(index), Some("id")).await;
    }
    let known = setup.state.fences.lock().await.as_ref().map(|fences| fences.len());
    assert!(known.is_some_and(|known| known <= fence::MAX_KNOWN_FENCES), "{known:?}");
    assert_eq!(setup.state.known_fence(&name(0)).await, None, "the oldest is forgotten");
    assert_eq!(
        setup.state.known_fence(&name(fence::MAX_KNOWN_FENCES)).await.as_deref(),
        Some("id"),
        "the newest is kept"
    );
}
