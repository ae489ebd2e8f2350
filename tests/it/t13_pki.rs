//! The cluster CA as the cluster holds it: any member enrolls a joining node (the CA key is
//! replicated sealed under the key-encryption key, and in no file in the clear), a removed
//! node's certificate is refused on the internal service and the mesh, and node certificates
//! expire and are renewed at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_proto::internal::{JoinRequest, RaftPayload};
use flotilla_raft::network::Peers;
use flotilla_tests::{free_port, wait_for, ClusterOptions, NodeProcess, TestCluster, JOIN_TOKEN_ENV};
use tokio::io::AsyncReadExt;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);
const VALIDITY_HOOK_ENV: &str = "FLOTILLA_TEST_HOOK_NODE_CERT_VALIDITY_DAYS";
const DAY_S: i64 = 24 * 3600;

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|window| window == needle)) {
            found.push(path);
        }
    }
    found
}

fn mint_through(cluster: &TestCluster, id: u64) -> String {
    let output = cluster.run_cli(id, &["cluster", "join-token", "--expires", "10m"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .expect("a token")
        .trim()
        .to_string()
}

fn not_after_s(data_dir: &Path) -> i64 {
    let pem = std::fs::read_to_string(data_dir.join("node.pem")).unwrap();
    flotilla_raft::tls::certificate_not_after("node.pem", &pem).unwrap()
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_any_member_while_the_first_is_down() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    // The first node handed the CA key to the cluster: no data dir holds a private key in the
    // clear but each node's own node.key (0600).
    let with_keys = files_containing(cluster.dir.path(), b"PRIVATE KEY");
    assert!(!with_keys.is_empty());
    for path in &with_keys {
        assert!(path.ends_with("node.key"), "{} holds a private key", path.display());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{} is private", path.display());
    }

    cluster.node_mut(1).terminate();
    let token = mint_through(&cluster, 2);
    let mut spec = cluster.node(2).spec().clone();
    spec.id = 4;
    spec.grpc_port = free_port();
    spec.data_dir = cluster.dir.path().join("node4");
    spec.join = Some(cluster.node(2).endpoint());
    spec.env.retain(|(name, _)| name != JOIN_TOKEN_ENV);
    spec.env.push((JOIN_TOKEN_ENV.to_string(), token));
    let mut joiner = NodeProcess::spawn(spec);
    let (endpoint, admin) = (cluster.node(2).endpoint(), cluster.admin_token());
    wait_for("node 4 to join through node 2 while node 1 is down", DEADLINE, || {
        joiner.assert_running("joining through node 2");
        let (endpoint, admin) = (endpoint.clone(), admin.clone());
        async move {
            let view = flotilla_tests::try_get_cluster(&endpoint, &admin).await?;
            view.members
                .iter()
                .any(|member| member.id == 4 && member.up)
                .then_some(())
        }
    })
    .await;
    let pem = std::fs::read_to_string(cluster.dir.path().join("node4/node.pem")).unwrap();
    let certificate = flotilla_raft::tls::parse_certificate("node.pem", &pem).unwrap();
    assert_eq!(flotilla_raft::tls::certificate_node_ids(&certificate), vec![4]);
}

/// Connects to a mesh port with `tls` and reads: `Err` when the handshake was refused.
async fn mesh_read(host: std::net::Ipv4Addr, port: u16, tls: &flotilla_raft::tls::NodeTls) -> Result<(), String> {
    let config = std::sync::Arc::new(tls.client_config().unwrap());
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|error| error.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(flotilla_raft::tls::NODE_SERVER_NAME).unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|error| error.to_string())?;
    // TLS 1.3: the server judges the client's certificate after the client's side of the
    // handshake is done, so a refusal shows as an alert on the first read.
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await {
        Err(_) | Ok(Ok(1..)) => Ok(()),
        Ok(Ok(_)) => Err("closed".to_string()),
        Ok(Err(error)) => Err(error.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_nodes_certificate_is_refused() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    let stolen = flotilla_tests::node_tls(&cluster.node(3).data_dir, 3);
    let peers = Peers::new(Some(&stolen));
    let node2 = cluster.node(2).endpoint();
    let (host, mesh_port) = (cluster.node(2).host, cluster.node(2).mesh_port());
    peers
        .client(&node2)
        .unwrap()
        .read_index(RaftPayload {
            data: Vec::new(),
            ..Default::default()
        })
        .await
        .expect("a member's certificate is accepted");
    mesh_read(host, mesh_port, &stolen)
        .await
        .expect("a member's certificate links to the mesh");

    let removed = cluster.run_cli(1, &["cluster", "remove-node", "3"]);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    cluster.node_mut(3).kill9();
    let status = wait_for("node 2 to refuse node 3's certificate", DEADLINE, || {
        let peers = peers.clone();
        let node2 = node2.clone();
        async move {
            let answer = peers
                .client(&node2)
                .unwrap()
                .read_index(RaftPayload {
                    data: Vec::new(),
                    ..Default::default()
                })
                .await;
            answer.err().filter(|status| status.code() == Code::Unauthenticated)
        }
    })
    .await;
    assert!(status.message().contains("node 3 was removed"), "{status}");
    let mut client = peers.client(&node2).unwrap();
    let forwarded = client
        .forward_write(RaftPayload {
            data: vec![1, 2, 3],
            ..Default::default()
        })
        .await
        .expect_err("a removed node cannot forward a write");
    assert_eq!(forwarded.code(), Code::Unauthenticated, "{forwarded}");
    let snapshot = client
        .install_snapshot(RaftPayload {
            data: vec![1, 2, 3],
            ..Default::default()
        })
        .await
        .expect_err("a removed node cannot install a snapshot");
    assert_eq!(snapshot.code(), Code::Unauthenticated, "{snapshot}");
    let join = client
        .join(JoinRequest {
            node_id: 3,
            grpc_address: "127.0.0.1:1".to_string(),
            mesh_address: "127.0.0.1:2".to_string(),
            region: "local".to_string(),
            slots: 1,
            labels: Default::default(),
            ..Default::default()
        })
        .await
        .expect_err("a removed node cannot join again");
    assert_eq!(join.code(), Code::Unauthenticated, "{join}");
    // A fresh connection is refused the same way (the check runs at every call).
    let fresh = Peers::new(Some(&stolen))
        .client(&node2)
        .unwrap()
        .read_index(RaftPayload {
            data: Vec::new(),
            ..Default::default()
        })
        .await
        .expect_err("refused on a new connection too");
    assert_eq!(fresh.code(), Code::Unauthenticated, "{fresh}");
    // The mesh has no calls to refuse: its handshake refuses the certificate.
    let mesh = mesh_read(host, mesh_port, &stolen)
        .await
        .expect_err("the mesh accepted a removed node's certificate");
    // rustls answers a verifier's refusal with a handshake_failure alert.
    assert!(mesh.contains("HandshakeFailure"), "{mesh}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_end_is_renewed_at_start() {
    let options = ClusterOptions {
        env: vec![(VALIDITY_HOOK_ENV.to_string(), "10".to_string())],
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(2, options).await;
    let data_dir = cluster.node(2).data_dir.clone();
    let before = std::fs::read_to_string(data_dir.join("node.pem")).unwrap();
    let left = not_after_s(&data_dir) - now_s();
    assert!(
        (9 * DAY_S..=10 * DAY_S).contains(&left),
        "node 2's certificate has {left} s left"
    );

    // Node 2 signs its renewal with the CA key the cluster recorded, from its own copy of the
    // state: it must have applied that record before it stops. Node 1 removes `ca.key` once the
    // record is applied there; a write through node 2 after that answers only once node 2 has
    // applied up to it (read-your-writes), so the record is in node 2's state too.
    let ca_key = cluster.node(1).data_dir.join("ca.key");
    wait_for("node 1 to hand the CA key to the cluster", DEADLINE, || {
        let gone = !ca_key.exists();
        async move { gone.then_some(()) }
    })
    .await;
    let written = cluster.run_cli(2, &["cluster", "join-token", "--expires", "10m"]);
    assert!(
        written.status.success(),
        "a write through node 2 failed: {}",
        String::from_utf8_lossy(&written.stderr)
    );

    let node = cluster.node_mut(2);
    node.remove_env(VALIDITY_HOOK_ENV);
    node.remove_env(JOIN_TOKEN_ENV);
    node.terminate();
    node.restart();
    let (endpoint, admin) = (cluster.node(2).endpoint(), cluster.admin_token());
    wait_for("node 2 to serve again", DEADLINE, || {
        let (endpoint, admin) = (endpoint.clone(), admin.clone());
        async move {
            let view = flotilla_tests::try_get_cluster(&endpoint, &admin).await?;
            (view.node_id == 2 && view.leader_id != 0).then_some(())
        }
    })
    .await;
    cluster.wait_for_members_up(2).await;
    let after = std::fs::read_to_string(data_dir.join("node.pem")).unwrap();
    assert_ne!(before, after, "node 2 renewed its certificate");
    let left = not_after_s(&data_dir) - now_s();
    assert!(
        (364 * DAY_S..=366 * DAY_S).contains(&left),
        "a renewed certificate is valid for a year; {left} s left"
    );
    assert!(
        cluster
            .node(2)
            .log_tail(400)
            .contains("renewed this node's certificate"),
        "{}",
        cluster.node(2).log_tail(40)
    );
}
