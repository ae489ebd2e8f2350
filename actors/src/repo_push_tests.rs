//! Pushes through the mirror from what a machine made: real git on repositories on disk. Here
//! the test plays the machine (its git writes the bundle on the host); the machine-side
//! containment (alternates and links that lead nowhere inside a machine) is tested with real
//! machines in the integration tests.

use super::tests::{allowing, origin_with_main};
use super::*;

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
    let mut state = RepoState {
        args: RepoArgs {
            url: url.clone(),
            mirror: mirror_path(&root.join("repos"), &url),
            git: allowing(&root),
            providers: None,
        },
        cloned: false,
    };
    let workspace = state
        .prepare("main", "flotilla/push-test", &root.join("workspace"))
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

async fn push(setup: &mut Setup, source: PushSource) -> Result<String, RepoError> {
    let workspace = setup.workspace.clone();
    setup
        .state
        .push(&workspace.path, &workspace.branch, &workspace.head_commit, &source)
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
