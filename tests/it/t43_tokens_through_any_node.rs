//! A bearer token is accepted through any node as soon as the cluster acknowledged it: one
//! created through the leader and used at once through a follower that had not heard of it yet
//! (paused meanwhile) is found after a read barrier; a token the cluster does not know is
//! refused UNAUTHENTICATED within a bound.

use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_raft::{Command, Role};
use flotilla_tests::{cluster_client, ClusterOptions, TestCluster};
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::t42_reads_through_any_node::leader_and_followers;
use crate::t55_plugins::write_through_node;

/// Tokens made and used at once, each through a follower paused while it was made.
const TOKENS: usize = 3;
/// An unknown token costs at most the node's lookup bound (3 s) and a call.
const UNKNOWN_TOKEN_BOUND: Duration = Duration::from_secs(4);

fn create_token(token: &str, name: &str) -> Command {
    Command::CreateToken {
        sha256_hex: hex::encode(Sha256::digest(token.as_bytes())),
        name: name.to_string(),
        // GetCluster, which the test calls, needs the cluster-admin role.
        role: Role::ClusterAdmin,
        team: "default".to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_accepted_through_a_lagging_node_at_once_and_an_unknown_one_is_refused() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    let admin = cluster.admin_token();
    let (leader, [_, lagging]) = leader_and_followers(&cluster, &admin).await;
    let lagging_endpoint = cluster.nodes[lagging].endpoint();
    let through = format!("node {} (just resumed)", cluster.nodes[lagging].id);
    for index in 0..TOKENS {
        let token = format!("flt_t43_token_{index}");
        let mut client = cluster_client(&lagging_endpoint, &token).await;
        cluster.nodes[lagging].freeze();
        let written = write_through_node(&cluster, leader, create_token(&token, &format!("t43-{index}"))).await;
        cluster.nodes[lagging].thaw();
        written.expect("the token is recorded");
        let answered = Instant::now();
        let view = client
            .get_cluster(v1::GetClusterRequest {})
            .await
            .unwrap_or_else(|status| panic!("token {index}, acknowledged, refused through {through}: {status}"));
        eprintln!(
            "token {index} accepted through {through} {:?} after it resumed",
            answered.elapsed()
        );
        assert_eq!(view.into_inner().node_id, cluster.nodes[lagging].id);
    }

    for (index, node) in cluster.nodes.iter().enumerate() {
        let mut client = cluster_client(&node.endpoint(), "flt_t43_never_made").await;
        let asked = Instant::now();
        let status = client
            .get_cluster(v1::GetClusterRequest {})
            .await
            .expect_err("an unknown token is refused");
        let elapsed = asked.elapsed();
        assert_eq!(status.code(), Code::Unauthenticated, "node {}: {status:?}", index + 1);
        assert!(status.message().contains("unknown or revoked key"), "{status:?}");
        assert!(
            elapsed < UNKNOWN_TOKEN_BOUND,
            "an unknown token took {elapsed:?} through node {}",
            index + 1
        );
        eprintln!("unknown token refused through node {} in {elapsed:?}", index + 1);
    }
}
