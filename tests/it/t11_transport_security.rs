//! Transport security: every port speaks TLS only, nodes call each other with certificates of
//! the cluster CA, and a node joins once with a single-use, expiring token whose CA fingerprint
//! it checks the server against.

use std::time::Duration;

use flotilla_proto::internal::internal_client::InternalClient;
use flotilla_proto::internal::RaftPayload;
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::GetClusterRequest;
use flotilla_raft::network::Peers;
use flotilla_tests::{free_port, wait_for, ClusterOptions, NodeProcess, TestCluster, JOIN_TOKEN_ENV};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

/// A node process joining `cluster` through node 1 as node `id`, with `token` if given.
fn spawn_joiner(cluster: &TestCluster, id: u64, token: Option<&str>) -> NodeProcess {
    spawn_joiner_through(cluster, 1, id, token)
}

/// A node process joining `cluster` through node `through` as node `id`.
fn spawn_joiner_through(cluster: &TestCluster, through: u64, id: u64, token: Option<&str>) -> NodeProcess {
    let mut spec = cluster.node(through).spec().clone();
    spec.id = id;
    spec.grpc_port = free_port();
    spec.data_dir = cluster.dir.path().join(format!("joiner{id}"));
    spec.join = Some(cluster.node(through).endpoint());
    spec.env.retain(|(name, _)| name != JOIN_TOKEN_ENV);
    if let Some(token) = token {
        spec.env.push((JOIN_TOKEN_ENV.to_string(), token.to_string()));
    }
    NodeProcess::spawn(spec)
}

/// Waits for `node` to exit and returns the end of its log.
async fn refused(node: &mut NodeProcess) -> String {
    wait_for("the joining node to give up", DEADLINE, || {
        let exited = !node.is_running();
        async move { exited.then_some(()) }
    })
    .await;
    node.log_tail(40)
}

async fn member_count(cluster: &TestCluster) -> usize {
    cluster
        .cluster_client(1)
        .await
        .get_cluster(GetClusterRequest {})
        .await
        .expect("get cluster")
        .into_inner()
        .members
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_on_every_port() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let node = cluster.node(1);
    let plaintext = format!("http://{}:{}", node.host, node.grpc_port);
    let channel = tonic::transport::Endpoint::from_shared(plaintext.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let public = ClusterServiceClient::new(channel.clone())
        .get_cluster(GetClusterRequest {})
        .await
        .expect_err("a plaintext call to the public service is refused");
    // Refused by the transport (the TLS listener answers the HTTP/2 preface with an alert),
    // not answered by any service.
    assert!(std::error::Error::source(&public).is_some(), "{public:?}");
    let internal = InternalClient::new(channel)
        .read_index(RaftPayload {
            data: Vec::new(),
            ..Default::default()
        })
        .await
        .expect_err("a plaintext call to the internal service is refused");
    assert!(std::error::Error::source(&internal).is_some(), "{internal:?}");

    // The mesh: a plaintext peer's first bytes end the connection (no TLS handshake).
    let mut mesh = tokio::net::TcpStream::connect((node.host, node.mesh_port()))
        .await
        .expect("the mesh port accepts TCP");
    mesh.write_all(&[0, 0, 0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
        .await
        .expect("write");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(DEADLINE, mesh.read_to_end(&mut reply)).await;
    match read {
        Ok(Ok(_)) | Ok(Err(_)) => {}
        Err(_) => panic!("the mesh kept a plaintext connection open"),
    }
    assert!(
        !reply.starts_with(&[0, 0]),
        "the mesh answered plaintext with a frame: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_call_without_a_node_certificate_is_refused() {
    // What an eavesdropper could capture is a TLS session; the only credential left is the
    // caller's certificate, which a recorded request does not carry. A client that trusts the
    // CA but has no node certificate stands for one replaying a request.
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let ca = std::fs::read_to_string(cluster.ca_path()).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(cluster.node(1).endpoint())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS without a client certificate connects (clients have none)");
    let status = InternalClient::new(channel)
        .forward_write(RaftPayload {
            data: vec![1, 2, 3],
            ..Default::default()
        })
        .await
        .expect_err("an internal call without a node certificate is refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("node certificate"), "{status}");

    // With the node's own certificate the same service answers (the payload is junk).
    let node = cluster.node(1);
    let peers = Peers::new(Some(&flotilla_tests::node_tls(&node.data_dir, node.id)));
    let answered = peers
        .client(&node.endpoint())
        .unwrap()
        .forward_write(RaftPayload {
            data: vec![1, 2, 3],
            ..Default::default()
        })
        .await
        .expect_err("junk is not a command");
    assert_eq!(answered.code(), Code::InvalidArgument, "{answered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_ca_is_refused_by_the_cli_and_by_a_node() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let other = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.node(1).endpoint();

    let output = std::process::Command::new(flotilla_tests::flotilla_bin())
        .args(["cluster", "status", "--endpoint", &endpoint, "--ca-cert"])
        .arg(other.ca_path())
        .env("FLOTILLA_TOKEN", cluster.admin_token())
        .output()
        .unwrap();
    assert!(!output.status.success(), "the CLI trusted a node of another CA");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach") && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
    // With the right CA the same command works.
    let output = cluster.run_cli(1, &["cluster", "status"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // The other cluster's node certificate gets no internal call through.
    let stranger = other.node(1);
    let peers = Peers::new(Some(&flotilla_tests::node_tls(&stranger.data_dir, 1)));
    let status = peers
        .client(&endpoint)
        .unwrap()
        .read_index(RaftPayload {
            data: Vec::new(),
            ..Default::default()
        })
        .await
        .expect_err("a node of another CA is refused");
    assert_eq!(status.code(), Code::Unavailable, "{status}");

    // A join token naming another CA: the joining node refuses the server before it sends it.
    let token = cluster.mint_join_token();
    let mut parts: Vec<&str> = token.split('.').collect();
    let zeros = "0".repeat(64);
    parts[1] = &zeros;
    let mut joiner = spawn_joiner(&cluster, 2, Some(&parts.join(".")));
    let log = refused(&mut joiner).await;
    assert!(
        log.contains("does not present the cluster CA named by the join token"),
        "{log}"
    );
    assert_eq!(member_count(&cluster).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_needs_a_token_that_is_neither_used_nor_expired() {
    let mut cluster = TestCluster::start(1, ClusterOptions::default()).await;

    let mut no_token = spawn_joiner(&cluster, 2, None);
    let log = refused(&mut no_token).await;
    assert!(log.contains("joining a cluster needs a join token"), "{log}");

    let token = cluster.mint_join_token();
    let first = spawn_joiner(&cluster, 3, Some(&token));
    cluster.nodes.push(first);
    cluster.wait_for_members_up(2).await;
    let mut second = spawn_joiner(&cluster, 4, Some(&token));
    let log = refused(&mut second).await;
    assert!(log.contains("used already"), "{log}");

    let output = cluster.run_cli(1, &["cluster", "join-token", "--expires", "1s", "--output", "json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let minted: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let expires_at = minted["expires_at"].as_i64().expect("expires_at");
    wait_for("the token to expire", DEADLINE, || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        async move { (now > expires_at).then_some(()) }
    })
    .await;
    let mut late = spawn_joiner(&cluster, 5, minted["token"].as_str());
    let log = refused(&mut late).await;
    assert!(log.contains("join token expired"), "{log}");
    assert_eq!(member_count(&cluster).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_without_a_token() {
    let mut cluster = TestCluster::start(2, ClusterOptions::default()).await;
    let data_dir = cluster.node(2).data_dir.clone();
    for name in ["ca.pem", "node.pem", "node.key"] {
        assert!(data_dir.join(name).exists(), "node 2 keeps {name}");
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(data_dir.join("node.key")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the node key is private");
    for id in [1, 2] {
        assert!(
            !cluster.node(id).data_dir.join("ca.key").exists(),
            "node {id} keeps no plaintext CA key: the cluster holds it sealed"
        );
    }

    let node = cluster.node_mut(2);
    node.remove_env(JOIN_TOKEN_ENV);
    node.terminate();
    node.restart();
    wait_for("node 2 to serve again", DEADLINE, || {
        let endpoint = cluster.node(2).endpoint();
        let token = cluster.admin_token();
        async move {
            let cluster = flotilla_tests::try_get_cluster(&endpoint, &token).await?;
            (cluster.node_id == 2 && cluster.leader_id != 0).then_some(())
        }
    })
    .await;
    cluster.wait_for_members_up(2).await;
    assert!(cluster.node_mut(2).is_running());
}
