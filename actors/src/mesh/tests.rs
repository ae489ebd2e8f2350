use std::future::Future;

use tokio::time::Instant;

use ractor::message::SerializedMessage;
use ractor::Message;

use super::watch::WatcherMessage;
use super::*;

/// ractor's process groups are global to the process, and a linked pair of meshes in
/// one process mirrors every group of the process into proxies. Tests that run at the
/// same time would see each other's watchers through those proxies, so they take
/// turns.
static ONE_TEST_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT_LIMIT_MS: u64 = 10_000;
const POLL_INTERVAL_MS: u64 = 10;
const SECRET: &str = "test-cluster-secret";

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("free port address").port()
}

async fn start_node(node_id: u64, secret: &str, buffer: usize) -> (Mesh, String) {
    let port = free_port();
    let mesh = Mesh::start(MeshConfig {
        node_id,
        listen_port: port,
        cluster_secret: secret.to_string(),
        max_live_events_per_watcher: buffer,
        listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        tls: None,
    })
    .await
    .unwrap_or_else(|error| panic!("start mesh node {node_id}: {error}"));
    (mesh, format!("127.0.0.1:{port}"))
}

async fn wait_until<Condition, Check>(what: &str, mut condition: Condition)
where
    Condition: FnMut() -> Check,
    Check: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_millis(WAIT_LIMIT_MS);
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "waited {WAIT_LIMIT_MS} ms for {what}");
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

async fn next_event(subscription: &mut Subscription, what: &str) -> Vec<u8> {
    tokio::time::timeout(Duration::from_millis(WAIT_LIMIT_MS), subscription.events.recv())
        .await
        .unwrap_or_else(|_| panic!("waited {WAIT_LIMIT_MS} ms for {what}"))
        .unwrap_or_else(|| panic!("subscription closed while waiting for {what}"))
}

#[tokio::test]
async fn local_publish_reaches_every_subscriber_of_that_agent_only() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, _) = start_node(101, SECRET, 16).await;
    let mut first = mesh.subscribe("agent-a").await.expect("subscribe first");
    let mut second = mesh.subscribe("agent-a").await.expect("subscribe second");
    let mut other = mesh.subscribe("agent-b").await.expect("subscribe other");

    mesh.publish("agent-a", b"token-1".to_vec());
    mesh.publish("agent-a", b"token-2".to_vec());
    mesh.publish("agent-b", b"marker".to_vec());

    for subscription in [&mut first, &mut second] {
        assert_eq!(next_event(subscription, "token-1").await, b"token-1");
        assert_eq!(next_event(subscription, "token-2").await, b"token-2");
    }
    // agent-b's watcher sees only its own group: its first event is its marker.
    assert_eq!(next_event(&mut other, "marker").await, b"marker");
    assert_eq!(mesh.event_dropped_count(), 0);
    mesh.shutdown().await;
}

#[tokio::test]
async fn publish_without_subscribers_does_nothing() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, _) = start_node(102, SECRET, 16).await;
    mesh.publish("nobody-watches", b"lost".to_vec());
    assert!(ractor::pg::get_members(&live_group_name("nobody-watches")).is_empty());
    assert_eq!(mesh.event_dropped_count(), 0);
    mesh.shutdown().await;
}

#[tokio::test]
async fn full_buffer_drops_and_counts_without_blocking() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, _) = start_node(103, SECRET, 2).await;
    let mut subscription = mesh.subscribe("busy").await.expect("subscribe");

    for index in 0..5u8 {
        mesh.publish("busy", vec![index]);
    }
    wait_until("three dropped events", || {
        let dropped = mesh.event_dropped_count();
        async move { dropped == 3 }
    })
    .await;

    assert_eq!(subscription.dropped_count(), 3);
    assert_eq!(next_event(&mut subscription, "event 0").await, vec![0]);
    assert_eq!(next_event(&mut subscription, "event 1").await, vec![1]);
    assert!(
        subscription.events.try_recv().is_err(),
        "only the buffer's capacity is kept"
    );

    // Room again: delivery resumes.
    mesh.publish("busy", vec![5]);
    assert_eq!(next_event(&mut subscription, "event 5").await, vec![5]);
    assert_eq!(mesh.event_dropped_count(), 3);
    mesh.shutdown().await;
}

#[tokio::test]
async fn dropping_a_subscription_leaves_the_group() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, _) = start_node(104, SECRET, 16).await;
    let group = live_group_name("leaving");
    let subscription = mesh.subscribe("leaving").await.expect("subscribe");
    assert_eq!(ractor::pg::get_members(&group).len(), 1);

    drop(subscription);
    wait_until("the watcher to leave its group", || {
        let empty = ractor::pg::get_members(&group).is_empty();
        async move { empty }
    })
    .await;
    mesh.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_subscriptions_and_refuses_new_ones() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, address) = start_node(105, SECRET, 16).await;
    let mut subscription = mesh.subscribe("ending").await.expect("subscribe");

    mesh.shutdown().await;
    let end = tokio::time::timeout(Duration::from_millis(WAIT_LIMIT_MS), subscription.events.recv())
        .await
        .expect("the subscription ends after shutdown");
    assert_eq!(end, None);
    assert!(matches!(
        mesh.subscribe("ending").await,
        Err(MeshError::ShutDown { node_id: 105 })
    ));
    assert!(matches!(
        mesh.connect(&address).await,
        Err(MeshError::ShutDown { node_id: 105 })
    ));
    // Idempotent.
    mesh.shutdown().await;
}

#[tokio::test]
async fn invalid_configs_and_duplicate_nodes_are_refused() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let zero_buffer = Mesh::start(MeshConfig {
        node_id: 106,
        listen_port: free_port(),
        cluster_secret: SECRET.to_string(),
        max_live_events_per_watcher: 0,
        listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        tls: None,
    })
    .await
    .expect_err("a zero buffer is refused");
    assert_eq!(
        zero_buffer.to_string(),
        "invalid mesh config: max_live_events_per_watcher must be at least 1, found 0"
    );
    let no_secret = Mesh::start(MeshConfig {
        node_id: 106,
        listen_port: free_port(),
        cluster_secret: String::new(),
        max_live_events_per_watcher: 1,
        listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        tls: None,
    })
    .await
    .expect_err("an empty secret is refused");
    assert!(matches!(no_secret, MeshError::InvalidConfig(_)));

    let (mesh, _) = start_node(106, SECRET, 16).await;
    let duplicate = Mesh::start(MeshConfig {
        node_id: 106,
        listen_port: free_port(),
        cluster_secret: SECRET.to_string(),
        max_live_events_per_watcher: 16,
        listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        tls: None,
    })
    .await
    .expect_err("a second mesh for one node id is refused");
    assert!(matches!(duplicate, MeshError::AlreadyRunning { node_id: 106 }));

    let secret_shown = format!(
        "{:?}",
        MeshConfig {
            node_id: 106,
            listen_port: 1,
            cluster_secret: SECRET.to_string(),
            max_live_events_per_watcher: 1,
            listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            tls: None,
        }
    );
    assert!(!secret_shown.contains(SECRET), "{secret_shown}");
    mesh.shutdown().await;
}

#[test]
fn watcher_message_round_trips_and_refuses_unknown_variants() {
    assert!(WatcherMessage::serializable());
    let wire = WatcherMessage::LiveEvent(b"event".to_vec())
        .serialize()
        .expect("serialize");
    assert_eq!(
        WatcherMessage::deserialize(wire).expect("deserialize"),
        WatcherMessage::LiveEvent(b"event".to_vec())
    );
    let unknown = SerializedMessage::Cast {
        variant: "something_newer".to_string(),
        args: vec![1],
        metadata: None,
    };
    assert!(WatcherMessage::deserialize(unknown).is_err());
    assert!(!WatcherSupervisorMessage::serializable());
}

#[tokio::test]
async fn connect_to_a_closed_port_names_the_address() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, _) = start_node(107, SECRET, 16).await;
    let closed = format!("127.0.0.1:{}", free_port());
    let error = mesh.connect(&closed).await.expect_err("nothing listens");
    assert!(matches!(error, MeshError::Dial { .. }), "{error:?}");
    assert!(error.to_string().contains(&closed), "{error}");

    let error = mesh
        .connect("no-port-here")
        .await
        .expect_err("an address without a port");
    assert!(error.to_string().contains("no-port-here"), "{error}");
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_node_with_another_secret_is_rejected() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, _) = start_node(108, SECRET, 16).await;
    let (stranger, stranger_address) = start_node(109, "another-secret", 16).await;

    let error = mesh
        .connect(&stranger_address)
        .await
        .expect_err("a different secret must not link");
    assert!(matches!(error, MeshError::Rejected { .. }), "{error:?}");
    assert!(error.to_string().contains(&stranger_address), "{error}");
    assert_eq!(mesh.connected_peers().await, 0);
    assert_eq!(stranger.connected_peers().await, 0);

    mesh.shutdown().await;
    stranger.shutdown().await;
}

#[tokio::test]
async fn nodes_with_the_same_secret_link_once_and_reconnect() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (first, first_address) = start_node(110, SECRET, 16).await;
    let (second, second_address) = start_node(111, SECRET, 16).await;

    first.connect(&second_address).await.expect("link");
    assert_eq!(first.connected_peers().await, 1);
    wait_until("the second node to see the link", || {
        let second = second.clone();
        async move { second.connected_peers().await == 1 }
    })
    .await;

    // Already linked: nothing changes.
    first.connect(&second_address).await.expect("link again");
    assert_eq!(first.connected_peers().await, 1);
    // Dialing back converges on a single link between the two nodes.
    second.connect(&first_address).await.expect("link back");
    for mesh in [&first, &second] {
        wait_until("a single link on each node", || {
            let mesh = mesh.clone();
            async move { mesh.connected_peers().await == 1 }
        })
        .await;
    }

    // The second node goes away and comes back on the same port.
    second.shutdown().await;
    wait_until("the first node to notice the drop", || {
        let first = first.clone();
        async move { first.connected_peers().await == 0 }
    })
    .await;
    let port: u16 = second_address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("port of the second node");
    let restarted = Mesh::start(MeshConfig {
        node_id: 111,
        listen_port: port,
        cluster_secret: SECRET.to_string(),
        max_live_events_per_watcher: 16,
        listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        tls: None,
    })
    .await
    .expect("restart the second node on its port");
    first.connect(&second_address).await.expect("reconnect after the drop");
    assert_eq!(first.connected_peers().await, 1);

    first.shutdown().await;
    restarted.shutdown().await;
}

#[tokio::test]
async fn a_link_the_peer_opened_counts_when_its_node_id_is_known() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (first, first_address) = start_node(114, SECRET, 16).await;
    let (second, second_address) = start_node(115, SECRET, 16).await;

    first.connect_node(115, &second_address).await.expect("link");
    wait_until("the second node to see the link", || {
        let second = second.clone();
        async move { second.connected_peers().await == 1 }
    })
    .await;
    let dials_before = second.dials_started();
    // The second node never dialed the first; knowing its id, it finds the inbound link.
    for _ in 0..3 {
        second.connect_node(114, &first_address).await.expect("already linked");
    }
    assert_eq!(second.dials_started(), dials_before, "no second session was dialed");
    assert_eq!(second.connected_peers().await, 1);
    assert_eq!(first.connected_peers().await, 1);
    // Without the id it cannot tell, and dials (the handshake keeps one session).
    second.connect(&first_address).await.expect("link back");
    assert_eq!(second.dials_started(), dials_before + 1);

    first.shutdown().await;
    second.shutdown().await;
}

/// Two meshes in one process share one set of process groups, so a linked pair
/// does not model two nodes. What it does show: the watcher is advertised to the
/// peer as a remotable actor, the group is mirrored through remote proxies, and an
/// event sent through a proxy is serialised, crosses the TCP link, and reaches the
/// watcher.
#[tokio::test]
async fn events_through_remote_proxies_cross_the_link() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (first, _) = start_node(112, SECRET, 64).await;
    let (second, second_address) = start_node(113, SECRET, 64).await;
    let mut subscription = first.subscribe("remote").await.expect("subscribe");
    first.connect(&second_address).await.expect("link");

    let group = live_group_name("remote");
    wait_until("remote proxies of the watcher", || {
        let proxies = ractor::pg::get_members(&group)
            .iter()
            .filter(|member| !member.get_id().is_local())
            .count();
        async move { proxies > 0 }
    })
    .await;
    let proxies: Vec<_> = ractor::pg::get_members(&group)
        .into_iter()
        .filter(|member| !member.get_id().is_local())
        .collect();
    for proxy in &proxies {
        proxy
            .send_message(WatcherMessage::LiveEvent(b"over-the-wire".to_vec()))
            .expect("send through a proxy");
    }
    for _ in &proxies {
        assert_eq!(
            next_event(&mut subscription, "an event through a proxy").await,
            b"over-the-wire"
        );
    }
    eprintln!(
        "group members after linking two in-process nodes: {} ({} remote proxies)",
        ractor::pg::get_members(&group).len(),
        proxies.len()
    );

    first.shutdown().await;
    second.shutdown().await;
}

/// Counts the joins it is told of in the groups it monitors (as an agent actor monitors its
/// live group to announce itself).
struct JoinCounter;

impl ractor::Actor for JoinCounter {
    type Msg = ();
    type State = Arc<AtomicU64>;
    type Arguments = (String, Arc<AtomicU64>);

    async fn pre_start(
        &self,
        myself: ractor::ActorRef<()>,
        (group, joins): (String, Arc<AtomicU64>),
    ) -> Result<Arc<AtomicU64>, ractor::ActorProcessingErr> {
        ractor::pg::monitor(group, myself.get_cell());
        Ok(joins)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ractor::ActorRef<()>,
        event: ractor::SupervisionEvent,
        joins: &mut Arc<AtomicU64>,
    ) -> Result<(), ractor::ActorProcessingErr> {
        if let ractor::SupervisionEvent::ProcessGroupChanged(ractor::pg::GroupChangeMessage::Join(..)) = event {
            joins.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_rejoin_tells_the_groups_monitors_of_a_join_again() {
    let _turn = ONE_TEST_AT_A_TIME.lock().await;
    let (mesh, _) = start_node(120, SECRET, 16).await;
    let group = live_group_name("announced");
    let joins = Arc::new(AtomicU64::new(0));
    let (counter, _) = ractor::Actor::spawn(None, JoinCounter, (group.clone(), joins.clone()))
        .await
        .expect("spawn the join counter");
    let subscription = mesh.subscribe("announced").await.expect("subscribe");
    wait_until("the first join", || {
        let joins = joins.clone();
        async move { joins.load(Ordering::SeqCst) == 1 }
    })
    .await;
    subscription.rejoin_handle().rejoin();
    wait_until("the join again", || {
        let joins = joins.clone();
        async move { joins.load(Ordering::SeqCst) == 2 }
    })
    .await;
    assert_eq!(ractor::pg::get_members(&group).len(), 1, "still one member");
    counter.stop(None);
    drop(subscription);
    mesh.shutdown().await;
}
