//! Repository URLs on a real node: local repositories only under `[repos] allow_local` (after
//! resolving links, by whole path components), and no transport that runs a program.

use flotilla_proto::v1;
use flotilla_tests::{agent_client, hold_config, wait_for, ClusterOptions, TestCluster};
use tonic::Code;

use crate::common::{bare_repository, create_request, get, status_of, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_repositories_are_taken_only_under_the_configured_directories() {
    let scratch = tempfile::Builder::new()
        .prefix("flotilla-it-repo-policy-")
        .tempdir()
        .unwrap();
    let root = scratch.path().canonicalize().unwrap();
    let allowed = root.join("git");
    let sibling = root.join("gitx");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&sibling).unwrap();
    let inside = bare_repository(&allowed, "sample", &[("README.md", "allowed\n")]);
    let beside = bare_repository(&sibling, "sample", &[("README.md", "a sibling directory\n")]);
    let outside = bare_repository(&root, "secret", &[("README.md", "outside\n")]);
    std::os::unix::fs::symlink(root.join("secret.git"), allowed.join("link.git")).unwrap();
    let pwned = root.join("pwned");

    let cluster_dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[repos]\nallow_local = [{:?}]\n",
        hold_config(cluster_dir.path()),
        allowed.display().to_string()
    );
    let cluster = TestCluster::start(
        1,
        ClusterOptions {
            config: Some(config),
            ..ClusterOptions::default()
        },
    )
    .await;
    let mut client = agent_client(&cluster.nodes[0].endpoint(), &cluster.admin_token()).await;

    let link = format!("file://{}/link.git", allowed.display());
    let helper = format!("ext::sh -c touch% {}", pwned.display());
    let refused: Vec<(&str, String, Code, String)> = vec![
        (
            "outside the allowed directory",
            outside.clone(),
            Code::PermissionDenied,
            format!(
                "{} is not under a directory of the node's [repos] allow_local",
                root.join("secret.git").display()
            ),
        ),
        (
            "a sibling whose name starts with the allowed one",
            beside.clone(),
            Code::PermissionDenied,
            "[repos] allow_local".to_string(),
        ),
        (
            "a link inside the allowed directory to a repository outside",
            link.clone(),
            Code::PermissionDenied,
            format!("{} is not under a directory", root.join("secret.git").display()),
        ),
        (
            "\"..\" out of the allowed directory",
            format!("file://{}/../secret.git", allowed.display()),
            Code::PermissionDenied,
            "[repos] allow_local".to_string(),
        ),
        (
            "the ext:: transport",
            helper.clone(),
            Code::InvalidArgument,
            "git's \"ext::\" transport runs a helper program on the node".to_string(),
        ),
        (
            "a relative path",
            "../secret.git".to_string(),
            Code::InvalidArgument,
            "relative".to_string(),
        ),
    ];
    for (what, repository, expected, fragment) in refused {
        let status = client
            .create_agent(v1::CreateAgentRequest {
                repository: repository.clone(),
                ..create_request(what, "go")
            })
            .await
            .expect_err(what);
        assert_eq!(status.code(), expected, "{what}: {}", status.message());
        assert!(
            status.message().contains(&fragment),
            "{what}: {:?} should mention {fragment:?}",
            status.message()
        );
        assert!(
            status.message().contains(&format!("{repository:?}")),
            "{what}: the message names the URL: {}",
            status.message()
        );
    }
    assert!(!pwned.exists(), "the ext:: command never ran");
    let listed = client
        .list_agents(v1::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(listed.is_empty(), "refused creates made no agent: {listed:?}");

    // A repository under the allowed directory is taken, cloned and booted.
    let agent = client
        .create_agent(v1::CreateAgentRequest {
            repository: inside.clone(),
            ..create_request("allowed", "go")
        })
        .await
        .expect("a repository under allow_local is accepted")
        .into_inner()
        .agent
        .unwrap();
    let endpoint = cluster.nodes[0].endpoint();
    let token = cluster.admin_token();
    wait_for("the allowed agent to run", DEADLINE, || {
        let (endpoint, token, id) = (endpoint.clone(), token.clone(), agent.id.clone());
        async move {
            let mut client = agent_client(&endpoint, &token).await;
            let found = get(&mut client, &id).await?;
            match status_of(&found) {
                v1::AgentStatus::Running => Some(()),
                v1::AgentStatus::Failed => panic!("the allowed agent failed: {found:?}"),
                _ => None,
            }
        }
    })
    .await;
}
