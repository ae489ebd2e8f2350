//! Commits leave a real machine without the node trusting its `.git`: a workspace whose
//! alternates and refs point at another repository on the host, and whose config and hooks
//! name commands that would leave marker files on the host, still pushes only the agent's own
//! commits, and nothing of that other repository or those commands reaches the host or the
//! origin. A commit that needs the other repository's objects cannot leave the machine at all.

use std::path::{Path, PathBuf};

use flotilla_proto::v1;
use flotilla_tests::fakes::create_bare_repository;
use flotilla_tests::{ClusterOptions, TestCluster};
use serde_json::json;

use crate::common::{create_from, status_of};
use crate::t18_agent_runs::{config_with, git, request, scripted_model, show, wait_for_agent};

/// The marker files a command of the workspace's config or hooks would leave, if it ran on the
/// host, and the config and hooks that name them.
struct Markers {
    dir: PathBuf,
    hooks: PathBuf,
    include: PathBuf,
}

impl Markers {
    fn new(root: &Path) -> Markers {
        let markers = Markers {
            dir: root.join("markers"),
            hooks: root.join("host-hooks"),
            include: root.join("host-include.config"),
        };
        std::fs::create_dir_all(&markers.dir).unwrap();
        std::fs::create_dir_all(&markers.hooks).unwrap();
        for hook in [
            "pre-push",
            "post-checkout",
            "reference-transaction",
            "pre-commit",
            "post-commit",
        ] {
            let path = markers.hooks.join(hook);
            std::fs::write(
                &path,
                format!("#!/bin/sh\ntouch {}/host-hook-{hook}\n", markers.dir.display()),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        std::fs::write(
            &markers.include,
            format!(
                "[core]\n\tfsmonitor = touch {}/include-fsmonitor\n",
                markers.dir.display()
            ),
        )
        .unwrap();
        markers
    }

    fn left(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// What the agent runs in its machine to point its workspace at the other repository and at
/// commands on the host.
fn hostile_workspace_commands(secret: &Path, markers: &Markers) -> String {
    let marker = |name: &str| format!("{}/{name}", markers.dir.display());
    format!(
        "echo {objects} >> .git/objects/info/alternates\n\
         ln -s {secret}/refs/heads/main .git/refs/heads/stolen\n\
         git config core.fsmonitor 'touch {fsmonitor}'\n\
         git config core.hooksPath {hooks}\n\
         git config include.path {include}\n\
         git config core.sshCommand 'touch {ssh}'\n\
         git config remote.origin.url 'ext::sh -c touch% {ext}'\n\
         git config url.'ext::sh -c touch% {instead}'.insteadOf file://\n\
         for hook in pre-push post-checkout reference-transaction; do \
           printf '#!/bin/sh\\ntouch {workspace_hook}-%s\\n' $hook > .git/hooks/$hook; chmod +x .git/hooks/$hook; \
         done\n\
         true\n",
        objects = secret.join("objects").display(),
        secret = secret.display(),
        fsmonitor = marker("fsmonitor"),
        hooks = markers.hooks.display(),
        include = markers.include.display(),
        ssh = marker("ssh"),
        ext = marker("ext"),
        instead = marker("insteadof"),
        workspace_hook = marker("workspace-hook"),
    )
}

fn has_object(repository: &Path, object: &str) -> bool {
    std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repository)
        .args(["cat-file", "-e", object])
        .status()
        .expect("run git")
        .success()
}

/// The node's mirrors of repositories.
fn mirrors(cluster: &TestCluster) -> Vec<PathBuf> {
    std::fs::read_dir(cluster.node(1).data_dir.join("repos"))
        .expect("the node's repository dir")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "git"))
        .collect()
}

#[tokio::test]
async fn a_workspace_pointing_at_another_host_repository_pushes_only_its_own_commits() {
    let dir = tempfile::tempdir().unwrap();
    let secret = create_bare_repository(
        dir.path(),
        "secret",
        &[("secret.txt", "the other repository's secret\n")],
    );
    let secret_blob = git(&secret, &["rev-parse", "main:secret.txt"]);
    let secret_commit = git(&secret, &["rev-parse", "main"]);
    let url = crate::common::bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let origin = PathBuf::from(url.strip_prefix("file://").unwrap());
    let markers = Markers::new(dir.path());

    // One agent points its workspace at the other repository and at host commands, then works
    // as usual: its own commit must be pushed, and nothing else.
    let hostile = json!({"turns": [
        {"text": "", "tool_calls": [
            {"name": "run_command", "arguments": {"command": hostile_workspace_commands(&secret, &markers)}},
            {"name": "write_file", "arguments": {"path": "hello.txt", "content": "hello from the agent\n"}}
        ]},
        {"text": "Wrote hello.txt."}
    ]});
    // Another makes a commit whose tree names the other repository's blob: inside its machine
    // the alternates lead nowhere, so the commit cannot leave the machine.
    let leak = format!(
        "echo {objects} >> .git/objects/info/alternates\n\
         tree=$(printf '100644 blob {secret_blob}\\tleak.txt\\n' | git mktree --missing)\n\
         commit=$(git -c user.name=a -c user.email=a@example.test commit-tree -p HEAD -m leak $tree)\n\
         git update-ref HEAD $commit && echo crafted $commit\n",
        objects = secret.join("objects").display(),
    );
    let leaking = json!({"turns": [
        {"text": "", "tool_calls": [
            {"name": "run_command", "arguments": {"command": leak}},
            {"name": "write_file", "arguments": {"path": "more.txt", "content": "more\n"}}
        ]},
        {"text": "Leaked, or so it hoped."}
    ]});
    let models = format!(
        "{}{}",
        scripted_model(dir.path(), "hostile", hostile),
        scripted_model(dir.path(), "leaking", leaking)
    );
    let cluster = TestCluster::start(
        1,
        ClusterOptions {
            config: Some(config_with(&models, "hostile")),
            ..Default::default()
        },
    )
    .await;
    let mut client = cluster.agent_client(1).await;
    let hostile = create_from(&mut client, request(&url, "hostile", "Work")).await;
    let mut leaking_request = request(&url, "leaking", "Work");
    leaking_request.model = "leaking".to_string();
    let leaking = create_from(&mut client, leaking_request).await;
    let ended = |agent: &v1::Agent| {
        matches!(
            status_of(agent),
            v1::AgentStatus::Finished | v1::AgentStatus::Failed | v1::AgentStatus::Stopped
        )
    };
    let hostile = wait_for_agent(&cluster, &hostile.id, "to end", ended).await;
    let leaking = wait_for_agent(&cluster, &leaking.id, "to end", ended).await;

    assert_eq!(
        status_of(&hostile),
        v1::AgentStatus::Finished,
        "error: {}",
        hostile.error
    );
    let branch = &hostile.work_branch;
    assert_eq!(git(&origin, &["rev-parse", branch]), hostile.pushed_commit);
    assert_eq!(
        show(&origin, branch, "hello.txt").as_deref(),
        Some("hello from the agent\n")
    );

    assert_eq!(status_of(&leaking), v1::AgentStatus::Failed, "{leaking:?}");
    assert!(
        leaking.error.contains("could not bundle the branch in the machine")
            && leaking.error.contains(&secret_blob[..7]),
        "the push fails with git's words about the missing object: {}",
        leaking.error
    );
    assert!(leaking.pushed_commit.is_empty());

    for repository in std::iter::once(origin.clone()).chain(mirrors(&cluster)) {
        let shown = repository.display();
        assert!(
            !has_object(&repository, &secret_blob),
            "the secret blob reached {shown}"
        );
        assert!(
            !has_object(&repository, &secret_commit),
            "the secret commit reached {shown}"
        );
    }
    let origin_refs = git(&origin, &["for-each-ref", "--format=%(refname)"]);
    assert!(!origin_refs.contains("stolen"), "{origin_refs}");
    assert_eq!(
        markers.left(),
        Vec::<String>::new(),
        "no command of the workspace ran on the host"
    );
}
