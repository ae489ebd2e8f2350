//! Plugins through `AdminService` and `flotilla plugin` on one node.
//!
//! Uploads are checked by the node's plugin host: a real component (a test guest built for
//! wasm32-wasip2) is stored, anything else is refused with the host's reason. To set up many
//! versions cheaply, the other tests write the same Raft commands a validated upload writes
//! (`PutPluginChunk`, `CommitPlugin`) through the node's internal `ForwardWrite`, with the cluster
//! secret, as a node's own write reaches the leader. The member token of the admin-only checks
//! is made the same way: no API creates tokens yet.

use flotilla_proto::internal::RaftPayload;
use flotilla_proto::v1::{self, upload_plugin_request};
use flotilla_raft::network::{decode, encode, Peers};
use flotilla_raft::replica::ForwardReply;
use flotilla_raft::{ApplyResult, Command, PluginKind, Request, Response, Role, UploadId};
use flotilla_tests::{admin_client, run_cli, wait_for, AdminClient, ClusterOptions, TestCluster};

use crate::common::DEADLINE;
use sha2::{Digest as _, Sha256};
use tonic::Code;

/// Writes `command` through node 1's internal `ForwardWrite` (node 1 leads a one-node cluster).
async fn write_through_raft(cluster: &TestCluster, command: Command) -> ApplyResult {
    write_through_node(cluster, 0, command).await
}

/// Writes `command` through the internal `ForwardWrite` of `cluster.nodes[index]`, which must
/// lead, with that node's own certificate, as a node's own write reaches the leader.
pub(crate) async fn write_through_node(cluster: &TestCluster, index: usize, command: Command) -> ApplyResult {
    let node = &cluster.nodes[index];
    let peers = Peers::new(Some(&flotilla_tests::node_tls(&node.data_dir, node.id)));
    let mut client = peers
        .client(&node.endpoint())
        .unwrap_or_else(|error| panic!("an internal client for node {}: {error}", node.id));
    let reply = client
        .forward_write(peers.request(RaftPayload {
            data: encode(&Request::new(command)),
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|status| panic!("ForwardWrite to node {} failed: {status}", node.id))
        .into_inner();
    match decode::<ForwardReply>(&reply.data).expect("a forward reply") {
        ForwardReply::Applied { result, .. } => result,
        other => panic!("node {} did not apply the write: {other:?}", node.id),
    }
}

/// Stores a plugin version the way a validated upload does: its chunks, then the commit.
async fn seed_plugin(cluster: &TestCluster, name: &str, version: &str, kind: PluginKind, enable: bool) -> Vec<u8> {
    let bytes: Vec<u8> = format!("\0asm component {name} {version} ").repeat(40).into_bytes();
    let upload = UploadId::new();
    let chunks: Vec<&[u8]> = bytes.chunks(500).collect();
    for (index, chunk) in chunks.iter().enumerate() {
        write_through_raft(
            cluster,
            Command::PutPluginChunk {
                upload,
                index: index as u32,
                bytes: chunk.to_vec(),
            },
        )
        .await
        .expect("the chunk is staged");
    }
    let committed = write_through_raft(
        cluster,
        Command::CommitPlugin {
            upload,
            name: name.to_string(),
            version: version.to_string(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            kind,
            size_bytes: bytes.len() as u64,
            chunk_count: chunks.len() as u32,
            granted_hosts: Vec::new(),
            enable,
        },
    )
    .await
    .expect("the plugin is committed");
    assert!(matches!(committed, Response::Plugin(_)), "{committed:?}");
    bytes
}

fn plugin_ref(name: &str, version: &str) -> v1::PluginRef {
    v1::PluginRef {
        name: name.to_string(),
        version: version.to_string(),
    }
}

pub(crate) fn upload_stream(name: &str, version: &str, bytes: &[u8]) -> Vec<v1::UploadPluginRequest> {
    let header = upload_plugin_request::Kind::Header(v1::UploadPluginHeader {
        name: name.to_string(),
        version: version.to_string(),
        granted_hosts: vec!["api.github.com".to_string()],
        enable: true,
    });
    std::iter::once(header)
        .chain(
            bytes
                .chunks(64 * 1024)
                .map(|chunk| upload_plugin_request::Kind::Chunk(chunk.to_vec())),
        )
        .map(|kind| v1::UploadPluginRequest { kind: Some(kind) })
        .collect()
}

/// The uploaded plugins ListPlugins shows (the built-in providers left out).
pub(crate) async fn list(client: &mut AdminClient, name: &str) -> Vec<v1::Plugin> {
    list_all(client, name)
        .await
        .into_iter()
        .filter(|plugin| !plugin.builtin)
        .collect()
}

/// Everything ListPlugins shows, built-in providers included.
pub(crate) async fn list_all(client: &mut AdminClient, name: &str) -> Vec<v1::Plugin> {
    client
        .list_plugins(v1::ListPluginsRequest { name: name.to_string() })
        .await
        .expect("ListPlugins")
        .into_inner()
        .plugins
}

/// The status a call failed with; panics if it succeeded.
fn refusal<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>, what: &str) -> tonic::Status {
    match result {
        Err(status) => status,
        Ok(response) => panic!("{what} must fail, answered {:?}", response.into_inner()),
    }
}

fn stdout_of(output: &std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8 output")
}

fn stderr_of_failure(output: &std::process::Output, what: &str) -> String {
    assert!(
        !output.status.success(),
        "{what} must fail, printed {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json_of(output: &std::process::Output, what: &str) -> serde_json::Value {
    serde_json::from_str(&stdout_of(output, what)).unwrap_or_else(|error| panic!("{what} prints JSON: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_are_checked_at_upload_and_plugin_calls_are_for_admins_only() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let mut admin = admin_client(&endpoint, &cluster.admin_token()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    check_bytes_that_are_not_a_component_are_refused(&cluster, &mut admin, dir.path()).await;
    check_a_component_is_stored_with_the_kind_of_its_world(&cluster, &mut admin, dir.path()).await;
    check_a_member_token_is_refused_everywhere(&cluster, &endpoint).await;
    check_an_unknown_token_is_unauthenticated(&endpoint).await;
}

async fn check_bytes_that_are_not_a_component_are_refused(
    cluster: &TestCluster,
    admin: &mut AdminClient,
    dir: &std::path::Path,
) {
    // Larger than one upload message, so the node answers while the CLI is still sending.
    let file = dir.join("github.wasm");
    std::fs::write(&file, vec![0x5a; 600 * 1024]).expect("write the component");
    let file = file.display().to_string();
    let stderr = stderr_of_failure(
        &cluster.run_cli(1, &["plugin", "add", &file, "--version", "1.0.0"]),
        "plugin add of bytes that are not a component",
    );
    assert!(stderr.contains("invalid argument"), "{stderr}");
    assert!(stderr.contains("not a wasm component"), "{stderr}");

    let status = refusal(
        admin
            .upload_plugin(tokio_stream::iter(upload_stream("github", "1.0.0", b"\0asm")))
            .await,
        "UploadPlugin of a truncated module",
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(list(admin, "").await.is_empty(), "a refused upload stores nothing");
}

/// A real component is checked, compiled and stored; its world decides its kind.
async fn check_a_component_is_stored_with_the_kind_of_its_world(
    cluster: &TestCluster,
    admin: &mut AdminClient,
    dir: &std::path::Path,
) {
    let component = flotilla_tests::test_guest("well-behaved");
    let wasm = dir.join("well-behaved.wasm");
    std::fs::write(&wasm, &component).expect("write the component");
    let added = json_of(
        &cluster.run_cli(
            1,
            &[
                "--output",
                "json",
                "plugin",
                "add",
                &wasm.display().to_string(),
                "--version",
                "1.0.0",
                "--grant-host",
                "127.0.0.1:9",
            ],
        ),
        "plugin add of a component",
    );
    assert_eq!(added["name"], "well-behaved", "{added}");
    assert_eq!(added["sha256"], hex::encode(Sha256::digest(&component)), "{added}");
    assert_eq!(
        added["kind"], "PLUGIN_KIND_VCS_PROVIDER",
        "the kind comes from the component's world: {added}"
    );
    let status = refusal(
        admin
            .upload_plugin(tokio_stream::iter(upload_stream("well-behaved", "1.0.0", &component)))
            .await,
        "the same version again",
    );
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(list(admin, "").await.len(), 1);
}

/// A member token is refused everywhere, before anything is read or written.
async fn check_a_member_token_is_refused_everywhere(cluster: &TestCluster, endpoint: &str) {
    let member_token = "flt_t55_member_token";
    write_through_raft(
        cluster,
        Command::CreateToken {
            sha256_hex: hex::encode(Sha256::digest(member_token.as_bytes())),
            name: "t55-member".to_string(),
            role: Role::Member,
            team: "default".to_string(),
        },
    )
    .await
    .expect("the member token is recorded");
    let mut member = admin_client(endpoint, member_token).await;
    for (call, status) in refusals_of_every_plugin_call(&mut member).await {
        assert_eq!(status.code(), Code::PermissionDenied, "{call}: {status:?}");
        assert!(status.message().contains("t55-member"), "{call}: {status:?}");
    }
    let stderr = stderr_of_failure(
        &run_cli(endpoint, member_token, &["plugin", "list"]),
        "plugin list with a member token",
    );
    assert!(stderr.contains("permission denied"), "{stderr}");
}

/// Calls every plugin RPC with `client` and returns each call's refusal, named.
async fn refusals_of_every_plugin_call(client: &mut AdminClient) -> Vec<(&'static str, tonic::Status)> {
    vec![
        (
            "upload",
            refusal(
                client
                    .upload_plugin(tokio_stream::iter(upload_stream("github", "1.0.0", b"\0asm")))
                    .await,
                "member upload",
            ),
        ),
        (
            "list",
            refusal(
                client.list_plugins(v1::ListPluginsRequest::default()).await,
                "member list",
            ),
        ),
        (
            "enable",
            refusal(
                client.enable_plugin(plugin_ref("github", "1.0.0")).await,
                "member enable",
            ),
        ),
        (
            "disable",
            refusal(
                client.disable_plugin(plugin_ref("github", "1.0.0")).await,
                "member disable",
            ),
        ),
        (
            "remove",
            refusal(
                client.remove_plugin(plugin_ref("github", "1.0.0")).await,
                "member remove",
            ),
        ),
        (
            "grant",
            refusal(
                client
                    .grant_hosts(v1::GrantHostsRequest {
                        name: "github".to_string(),
                        version: "1.0.0".to_string(),
                        hosts: vec!["github.com".to_string()],
                    })
                    .await,
                "member grant",
            ),
        ),
    ]
}

async fn check_an_unknown_token_is_unauthenticated(endpoint: &str) {
    let mut stranger = admin_client(endpoint, "flt_not_a_token").await;
    let status = refusal(
        stranger.list_plugins(v1::ListPluginsRequest::default()).await,
        "list with an unknown token",
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_listed_enabled_disabled_granted_and_removed() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let mut admin = admin_client(&endpoint, &cluster.admin_token()).await;
    let github_1_0 = seed_plugin(&cluster, "github", "1.0.0", PluginKind::VcsProvider, true).await;
    seed_plugin(&cluster, "github", "1.10.0", PluginKind::VcsProvider, false).await;
    seed_plugin(&cluster, "github", "1.9.0", PluginKind::VcsProvider, false).await;
    seed_plugin(&cluster, "lint", "0.1.0", PluginKind::Tool, true).await;

    wait_for_the_builtin_providers_to_load(&cluster).await;
    check_plugin_listing(&cluster, &github_1_0);
    check_enabling_disables_the_other_versions_of_its_name_only(&cluster, &mut admin).await;
    check_granting_replaces_the_host_list(&cluster, &mut admin).await;
    check_only_disabled_versions_are_removed(&cluster, &mut admin).await;
    check_unknown_versions_and_bad_input_are_refused(&mut admin).await;
    check_the_plugins_left(&mut admin, &github_1_0).await;
}

/// The built-ins compile while the node starts.
async fn wait_for_the_builtin_providers_to_load(cluster: &TestCluster) {
    let endpoint = cluster.node(1).endpoint();
    let token = cluster.admin_token();
    wait_for("the built-in providers to load", DEADLINE, || {
        let (endpoint, token) = (endpoint.clone(), token.clone());
        async move {
            let mut client = flotilla_tests::admin_client(&endpoint, &token).await;
            let all = list_all(&mut client, "").await;
            all.iter()
                .filter(|plugin| plugin.builtin)
                .all(|plugin| plugin.loaded_here || plugin.name == "github")
                .then_some(())
        }
    })
    .await;
}

/// Listed by name, then in semver order, records only.
fn check_plugin_listing(cluster: &TestCluster, github_1_0: &[u8]) {
    let listed = json_of(
        &cluster.run_cli(1, &["--output", "json", "plugin", "list"]),
        "plugin list",
    );
    let (builtins, listed): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = listed
        .as_array()
        .expect("an array")
        .iter()
        .partition(|plugin| plugin["builtin"] == true);
    // The built-in providers are listed too, loaded on the answering node, plain git among them.
    let builtin_names: Vec<&str> = builtins.iter().map(|plugin| plugin["name"].as_str().unwrap()).collect();
    assert_eq!(builtin_names, ["bitbucket", "git", "gitea", "github", "gitlab"]);
    let gitlab = builtins.iter().find(|plugin| plugin["name"] == "gitlab").unwrap();
    assert_eq!(gitlab["enabled"], true, "{gitlab}");
    assert_eq!(gitlab["granted_hosts"], serde_json::json!(["gitlab.com"]), "{gitlab}");
    let order: Vec<(&str, &str, bool)> = listed
        .iter()
        .map(|plugin| {
            (
                plugin["name"].as_str().unwrap(),
                plugin["version"].as_str().unwrap(),
                plugin["enabled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            ("github", "1.0.0", true),
            ("github", "1.9.0", false),
            ("github", "1.10.0", false),
            ("lint", "0.1.0", true),
        ]
    );
    let first = &listed[0];
    assert_eq!(first["kind"], "PLUGIN_KIND_VCS_PROVIDER");
    assert_eq!(listed[3]["kind"], "PLUGIN_KIND_TOOL");
    assert_eq!(first["size_bytes"], github_1_0.len() as u64);
    assert_eq!(first["sha256"], hex::encode(Sha256::digest(github_1_0)));
    assert!(first["uploaded_at"].is_string(), "{first}");
    let table = stdout_of(
        &cluster.run_cli(1, &["plugin", "list", "--name", "lint"]),
        "plugin list --name",
    );
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("lint") && table.contains("tool") && !table.contains("github"),
        "{table}"
    );
}

async fn check_enabling_disables_the_other_versions_of_its_name_only(cluster: &TestCluster, admin: &mut AdminClient) {
    let enabled = json_of(
        &cluster.run_cli(
            1,
            &["--output", "json", "plugin", "enable", "github", "--version", "1.10.0"],
        ),
        "plugin enable",
    );
    assert_eq!(enabled["enabled"], true);
    let github: Vec<(String, bool)> = list(admin, "github")
        .await
        .into_iter()
        .map(|plugin| (plugin.version, plugin.enabled))
        .collect();
    assert_eq!(
        github,
        vec![
            ("1.0.0".to_string(), false),
            ("1.9.0".to_string(), false),
            ("1.10.0".to_string(), true)
        ]
    );
    assert!(list(admin, "lint").await[0].enabled, "other names keep their version");
    let disabled = admin
        .disable_plugin(plugin_ref("github", "1.10.0"))
        .await
        .expect("DisablePlugin")
        .into_inner();
    assert!(!disabled.enabled);
    let shown = stdout_of(
        &cluster.run_cli(1, &["plugin", "enable", "github", "--version", "1.0.0"]),
        "plugin enable (table)",
    );
    assert!(
        shown
            .lines()
            .any(|line| line.starts_with("enabled") && line.ends_with("yes")),
        "{shown}"
    );
}

/// Granting replaces the list, normalised; a bad host changes nothing.
async fn check_granting_replaces_the_host_list(cluster: &TestCluster, admin: &mut AdminClient) {
    let granted = json_of(
        &cluster.run_cli(
            1,
            &[
                "--output",
                "json",
                "plugin",
                "grant",
                "github",
                "--version",
                "1.0.0",
                "--host",
                "API.GitHub.com",
                "--host",
                "github.com",
                "--host",
                "api.github.com",
            ],
        ),
        "plugin grant",
    );
    assert_eq!(
        granted["granted_hosts"],
        serde_json::json!(["api.github.com", "github.com"])
    );
    let status = refusal(
        admin
            .grant_hosts(v1::GrantHostsRequest {
                name: "github".to_string(),
                version: "1.0.0".to_string(),
                hosts: vec!["*".to_string()],
            })
            .await,
        "granting every host",
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("hosts: "), "{status:?}");
    assert_eq!(
        list(admin, "github").await[0].granted_hosts,
        vec!["api.github.com", "github.com"]
    );
    let revoked = json_of(
        &cluster.run_cli(
            1,
            &[
                "--output",
                "json",
                "plugin",
                "grant",
                "github",
                "--version",
                "1.9.0",
                "--none",
            ],
        ),
        "plugin grant --none",
    );
    assert_eq!(revoked["granted_hosts"], serde_json::json!([]));
}

/// An enabled version is not removed; a disabled one is, with its bytes.
async fn check_only_disabled_versions_are_removed(cluster: &TestCluster, admin: &mut AdminClient) {
    let stderr = stderr_of_failure(
        &cluster.run_cli(1, &["plugin", "remove", "github", "--version", "1.0.0"]),
        "removing the enabled version",
    );
    assert!(
        stderr.contains("failed precondition") && stderr.contains("disable it before removing it"),
        "{stderr}"
    );
    let removed = stdout_of(
        &cluster.run_cli(1, &["plugin", "remove", "github", "--version", "1.9.0"]),
        "plugin remove",
    );
    assert_eq!(removed.trim(), "removed github 1.9.0");
    let removed = admin
        .remove_plugin(plugin_ref("github", "1.10.0"))
        .await
        .expect("RemovePlugin")
        .into_inner();
    assert_eq!(removed.plugin.expect("the removed record").version, "1.10.0");
}

async fn check_unknown_versions_and_bad_input_are_refused(admin: &mut AdminClient) {
    let status = refusal(
        admin.enable_plugin(plugin_ref("github", "1.9.0")).await,
        "enable a removed version",
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("plugin github 1.9.0 not found"), "{status:?}");
    let status = refusal(
        admin.remove_plugin(plugin_ref("gitlab", "1.0.0")).await,
        "remove unknown",
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    for (name, version, field) in [
        ("GitHub", "1.0.0", "name: "),
        ("github", "1.0", "version: "),
        ("", "1.0.0", "name: "),
    ] {
        let status = refusal(admin.enable_plugin(plugin_ref(name, version)).await, "a bad reference");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    let status = refusal(
        admin
            .list_plugins(v1::ListPluginsRequest {
                name: "Not A Name".to_string(),
            })
            .await,
        "list with a bad name",
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

async fn check_the_plugins_left(admin: &mut AdminClient, github_1_0: &[u8]) {
    let left: Vec<(String, String, bool)> = list(admin, "")
        .await
        .into_iter()
        .map(|plugin| (plugin.name, plugin.version, plugin.enabled))
        .collect();
    assert_eq!(
        left,
        vec![
            ("github".to_string(), "1.0.0".to_string(), true),
            ("lint".to_string(), "0.1.0".to_string(), true)
        ]
    );
    // A version that exists is refused before its bytes are checked.
    let status = refusal(
        admin
            .upload_plugin(tokio_stream::iter(upload_stream("github", "1.0.0", github_1_0)))
            .await,
        "upload of an existing version",
    );
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
}
