//! A revoked or expired key is refused on every node within a second: a key made through node
//! 1 works through node 3; once `key revoke` through node 2 has returned, every node answers
//! the key UNAUTHENTICATED within a second, and a key with a two-second lifetime is refused on
//! every node within a second of its expiry.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_proto::v1;
use flotilla_proto::v1::access_service_client::AccessServiceClient;
use flotilla_tests::{BearerAuth, ClusterOptions, TestCluster};
use tonic::Code;

use crate::common::{cli, cli_key};

type AccessClient =
    AccessServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>>;

/// The bound: refused on its next call on every node within a second.
const REFUSAL_BOUND: Duration = Duration::from_secs(1);
/// Between two calls of one poll: the latencies below are measured to this grain.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
const SHORT_LIFETIME_SECONDS: u64 = 2;
/// An expiry is judged against each node's clock to the millisecond, the test's to the
/// nanosecond: a refusal this much before the expiry is rounding, not a bug.
const EARLY_SLACK: Duration = Duration::from_millis(5);

fn access_client(endpoint: &str, key: &str) -> AccessClient {
    AccessServiceClient::with_interceptor(flotilla_tests::channel(endpoint), BearerAuth::new(key))
}

/// Polls every node until it refuses the key UNAUTHENTICATED; answers, per node, when it first
/// did, measured from `since` (which may lie ahead: an expiry). Fails when a node still accepts
/// the key `REFUSAL_BOUND` after `since`, refuses it before, or answers anything else.
async fn refused_everywhere(clients: &[(u64, AccessClient)], since: Instant, what: &str) -> Vec<(u64, Duration)> {
    let polls = clients.iter().map(|(node, client)| {
        let mut client = client.clone();
        let node = *node;
        async move {
            loop {
                let answer = client.get_key_info(v1::GetKeyInfoRequest {}).await;
                let now = Instant::now();
                let at = now.saturating_duration_since(since);
                match answer {
                    Err(status) if status.code() == Code::Unauthenticated => {
                        assert!(
                            now + EARLY_SLACK >= since,
                            "{what}: node {node} refused the key {:?} too early",
                            since - now
                        );
                        return (node, at);
                    }
                    Err(status) => panic!("{what}: node {node} answered {status:?}, not UNAUTHENTICATED"),
                    Ok(_) => assert!(
                        at < REFUSAL_BOUND,
                        "{what}: node {node} still accepted the key {at:?} later"
                    ),
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    });
    futures::future::join_all(polls).await
}

fn unix_seconds(at: &prost_types::Timestamp) -> f64 {
    at.seconds as f64 + f64::from(at.nanos) / 1e9
}

fn now_unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_keys_are_refused_on_every_node_within_a_second() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    cluster.wait_for_members_up(3).await;
    let root = cluster.admin_token();
    let endpoints: Vec<String> = cluster.nodes.iter().map(|node| node.endpoint()).collect();
    cli(&endpoints[0], &root, &["team", "create", "red"]);
    let member = cli_key(&endpoints[0], &root, "red", "rita", "member");

    let clients: Vec<(u64, AccessClient)> = cluster
        .nodes
        .iter()
        .map(|node| (node.id, access_client(&node.endpoint(), &member)))
        .collect();
    // Made through node 1, used through node 3 (then every node).
    let info = clients[2]
        .1
        .clone()
        .get_key_info(v1::GetKeyInfoRequest {})
        .await
        .expect("a key made through node 1 works through node 3")
        .into_inner();
    assert_eq!((info.team.as_str(), info.user.as_str()), ("red", "rita"), "{info:?}");
    for (node, client) in &clients {
        client
            .clone()
            .get_key_info(v1::GetKeyInfoRequest {})
            .await
            .unwrap_or_else(|status| panic!("node {node} refused the new key: {status:?}"));
    }

    cli(&endpoints[1], &root, &["key", "revoke", &info.id]);
    let revoked = Instant::now();
    let latencies = refused_everywhere(&clients, revoked, "revoked through node 2").await;
    for (node, latency) in &latencies {
        eprintln!("revoked key refused by node {node} {latency:?} after the revoke returned");
    }

    // A key with a short lifetime: works on every node, then is refused on every node.
    let short = access_client(&endpoints[0], &root)
        .create_key(v1::CreateKeyRequest {
            team: "red".to_string(),
            user: "tmp".to_string(),
            role: "viewer".to_string(),
            expires_in_seconds: SHORT_LIFETIME_SECONDS,
        })
        .await
        .expect("a short-lived key")
        .into_inner();
    let expires_at = short.key.as_ref().and_then(|key| key.expires_at).expect("an expiry");
    let short_clients: Vec<(u64, AccessClient)> = cluster
        .nodes
        .iter()
        .map(|node| (node.id, access_client(&node.endpoint(), &short.secret)))
        .collect();
    for (node, client) in &short_clients {
        client
            .clone()
            .get_key_info(v1::GetKeyInfoRequest {})
            .await
            .unwrap_or_else(|status| panic!("node {node} refused the short key before its expiry: {status:?}"));
    }
    let until_expiry = unix_seconds(&expires_at) - now_unix_seconds();
    assert!(until_expiry > 0.0, "the key expired before every node was asked");
    // Until the expiry every node accepts it; the poll measures from the expiry.
    let expiry = Instant::now() + Duration::from_secs_f64(until_expiry);
    let latencies = refused_everywhere(&short_clients, expiry, "expired").await;
    for (node, latency) in &latencies {
        eprintln!("expired key refused by node {node} {latency:?} after its expiry");
    }
}
