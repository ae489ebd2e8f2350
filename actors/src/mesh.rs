//! The node mesh: live traffic between Flotilla nodes over ractor_cluster.
//!
//! Raft carries everything durable; the mesh carries what is only worth having while it
//! is fresh: the token stream, tool calls and command output of a running agent. An agent
//! publishes each live event to the process group `agent-live/<agent_id>`; a `Watch` on
//! any node subscribes by joining that group with a small local watcher actor, and
//! ractor_cluster keeps the group's membership in step across every linked node.
//!
//! Live events are best effort by design. A subscriber that falls behind loses events
//! (counted, never blocking the publisher), and a watcher that joins while a node link is
//! still synchronising may miss the first few; clients rebuild the durable history from
//! the replicated state and use the mesh only for what happens next.
//!
//! Nodes authenticate each other with ractor_cluster's challenge handshake, keyed by the
//! cluster secret: a node started with another secret cannot link. The link is plain TCP
//! for now. ractor_cluster also accepts TLS (`IncomingEncryptionMode::Tls` on the server
//! and `client_connect_enc` on the dialing side); wiring the node's certificates into
//! both is the next step, and is what the design asks for between nodes.
//!
//! ractor's process groups and actor registries are global to the process, so one
//! process is one mesh node: two [`Mesh`] values in one process share their groups and
//! are not two independent nodes (a linked pair delivers every event twice: once
//! locally, once back over the link). End-to-end delivery between nodes belongs in the
//! integration suite, which runs real `flotilla` processes; the unit tests below cover
//! one node, the handshake, and the wire path through a remote proxy.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, Message, SpawnErr, SupervisionEvent};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{ClientConnectErr, NodeEventSubscription, NodeServer, NodeServerMessage};
use tokio::sync::{broadcast, mpsc};

/// How long dialing a peer's TCP port may take before `connect` gives up.
const DIAL_TIMEOUT_MS: u64 = 5_000;
/// How long the cookie handshake and the process-group synchronisation of a new link may
/// take before `connect` gives up.
const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// After our own session to a peer closes, how long `connect` looks for another session
/// to the same node (a simultaneous dial from the peer may have won the election).
const ELECTION_GRACE_MS: u64 = 500;
/// How often `connect` looks at the session table during that grace period.
const ELECTION_POLL_INTERVAL_MS: u64 = 20;
/// Timeout of a query to the local node server actor.
const NODE_SERVER_CALL_TIMEOUT_MS: u64 = 1_000;
/// How long `shutdown` waits for watchers and the node server to stop.
const SHUTDOWN_TIMEOUT_MS: u64 = 5_000;
/// Session events buffered for `connect` calls waiting on a handshake. A waiter that
/// lags behind re-reads the session table instead, so this bound loses nothing.
const SESSION_EVENT_BUFFER: usize = 64;
/// Key of the mesh's subscription to its node server's session events.
const SESSION_EVENT_SUBSCRIPTION_ID: &str = "flotilla-mesh";
/// Wire name of the one message variant a watcher accepts from other nodes.
const LIVE_EVENT_VARIANT: &str = "live_event";

/// The name of the process group that carries one agent's live events.
pub fn live_group_name(agent_id: &str) -> String {
    format!("agent-live/{agent_id}")
}

/// How a node joins the mesh.
#[derive(Clone)]
pub struct MeshConfig {
    /// This node's id; it names the node in the mesh (`flotilla-<node_id>`).
    pub node_id: u64,
    /// TCP port the mesh listens on, on every IPv4 interface.
    pub listen_port: u16,
    /// Shared by every node of the cluster: the handshake cookie. A node with another
    /// secret cannot link.
    pub cluster_secret: String,
    /// Capacity of each subscriber's buffer; events beyond it are dropped and counted.
    pub max_live_events_per_watcher: usize,
}

impl fmt::Debug for MeshConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("MeshConfig")
            .field("node_id", &self.node_id)
            .field("listen_port", &self.listen_port)
            .field("cluster_secret", &"<redacted>")
            .field("max_live_events_per_watcher", &self.max_live_events_per_watcher)
            .finish()
    }
}

/// Why a mesh operation failed.
#[derive(thiserror::Error, Debug)]
pub enum MeshError {
    #[error("invalid mesh config: {0}")]
    InvalidConfig(String),
    #[error("a mesh for node {node_id} is already running in this process")]
    AlreadyRunning { node_id: u64 },
    #[error("cannot start the mesh listener on port {port}: {reason}")]
    Listen { port: u16, reason: String },
    #[error("cannot start the mesh {what}: {reason}")]
    Spawn { what: &'static str, reason: String },
    #[error("cannot resolve mesh address {address:?}: {source}")]
    Resolve {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mesh address {address:?} resolved to no socket address")]
    NoSocketAddress { address: String },
    #[error("cannot connect to the mesh at {address}: {source}")]
    Dial {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to the mesh at {address} took longer than {timeout_ms} ms")]
    DialTimeout { address: String, timeout_ms: u64 },
    #[error(
        "the node at {address} closed the mesh session during the handshake \
         (a different cluster secret, or this node's own address)"
    )]
    Rejected { address: String },
    #[error("the mesh handshake with {address} did not finish within {timeout_ms} ms")]
    HandshakeTimeout { address: String, timeout_ms: u64 },
    #[error("the mesh node server of node {node_id} did not answer: {reason}")]
    NodeServerUnavailable { node_id: u64, reason: String },
    #[error("the mesh of node {node_id} is shut down")]
    ShutDown { node_id: u64 },
}

/// This node's member of the mesh. Cheap to clone: every clone is the same node.
#[derive(Clone, Debug)]
pub struct Mesh {
    inner: Arc<MeshInner>,
}

#[derive(Debug)]
struct MeshInner {
    node_id: u64,
    node_server: ActorRef<NodeServerMessage>,
    watcher_supervisor: ActorRef<WatcherSupervisorMessage>,
    session_events: broadcast::Sender<SessionEvent>,
    /// Which node answered at each address we dialed, so that a link the peer opened
    /// towards us (whose socket address we cannot recognise) also counts as connected.
    peer_names_by_address: Mutex<HashMap<String, String>>,
    /// One lock per address being connected: concurrent calls for one address would
    /// take each other's sessions for their own, while a slow or dead address must not
    /// hold up links to the others. Only addresses with a call in flight are kept.
    connect_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    max_live_events_per_watcher: usize,
    events_dropped: Arc<AtomicU64>,
    /// Sessions this node has dialed since it started.
    dials: AtomicU64,
    shut_down: AtomicBool,
}

impl Mesh {
    /// Starts this node's mesh server on `0.0.0.0:listen_port`, named `flotilla-<node_id>`,
    /// with the cluster secret as its handshake cookie.
    pub async fn start(config: MeshConfig) -> Result<Mesh, MeshError> {
        if config.max_live_events_per_watcher == 0 {
            return Err(MeshError::InvalidConfig(
                "max_live_events_per_watcher must be at least 1, found 0".to_string(),
            ));
        }
        if config.cluster_secret.is_empty() {
            return Err(MeshError::InvalidConfig("cluster_secret must not be empty".to_string()));
        }
        let node_id = config.node_id;

        // ractor_cluster calls a node `<name>@<host>` and advertises `<host>:<port>`; the
        // advertised address serves only transitive dialing (off here: membership comes
        // from Raft, which dials every node itself) and self-connection detection, which
        // compares it. Deriving the host from the node id keeps two nodes that listen on
        // the same port on different machines from taking each other for themselves.
        let node_server = NodeServer::new(
            config.listen_port,
            config.cluster_secret,
            format!("{NODE_NAME_PREFIX}{node_id}"),
            format!("{NODE_HOST_PREFIX}{node_id}"),
            None,
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(IpAddr::V4(Ipv4Addr::UNSPECIFIED));

        // Registered names are global to the process, hence the node id in each.
        let (node_server, _) = Actor::spawn(Some(format!("flotilla-{node_id}-mesh-server")), node_server, ())
            .await
            .map_err(|error| match error {
                SpawnErr::ActorAlreadyRegistered(_) => MeshError::AlreadyRunning { node_id },
                other => MeshError::Listen {
                    port: config.listen_port,
                    reason: other.to_string(),
                },
            })?;

        let (session_events, _) = broadcast::channel(SESSION_EVENT_BUFFER);
        let subscribed = node_server.cast(NodeServerMessage::SubscribeToEvents {
            id: SESSION_EVENT_SUBSCRIPTION_ID.to_string(),
            subscription: Box::new(SessionEventForwarder {
                events: session_events.clone(),
            }),
        });
        if let Err(error) = subscribed {
            node_server.kill();
            return Err(MeshError::Spawn {
                what: "session event subscription",
                reason: error.to_string(),
            });
        }

        let watcher_supervisor =
            match Actor::spawn(Some(format!("flotilla-{node_id}-mesh-watchers")), WatcherSupervisor, ()).await {
                Ok((watcher_supervisor, _)) => watcher_supervisor,
                Err(error) => {
                    node_server.kill();
                    return Err(match error {
                        SpawnErr::ActorAlreadyRegistered(_) => MeshError::AlreadyRunning { node_id },
                        other => MeshError::Spawn {
                            what: "watcher supervisor",
                            reason: other.to_string(),
                        },
                    });
                }
            };

        tracing::info!(node_id, listen_port = config.listen_port, "mesh node server started");
        Ok(Mesh {
            inner: Arc::new(MeshInner {
                node_id,
                node_server,
                watcher_supervisor,
                session_events,
                peer_names_by_address: Mutex::new(HashMap::new()),
                connect_locks: Mutex::new(HashMap::new()),
                max_live_events_per_watcher: config.max_live_events_per_watcher,
                events_dropped: Arc::new(AtomicU64::new(0)),
                dials: AtomicU64::new(0),
                shut_down: AtomicBool::new(false),
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// Links this node to the mesh node listening at `address` (`host:port`) and returns
    /// once the handshake and the process-group synchronisation are done.
    ///
    /// Idempotent: returns at once when a link to that node is up, whichever side opened
    /// it, and dials again when an earlier link dropped. The mesh does not redial on its
    /// own: the node calls this for every member it knows of, on membership changes and
    /// periodically, which also restores links after a network fault.
    pub async fn connect(&self, address: &str) -> Result<(), MeshError> {
        self.link(address, None).await
    }

    /// Links this node to node `node_id`, whose mesh listens at `address`. Unlike
    /// [`Mesh::connect`], a link that node opened to us counts even if we never dialed it:
    /// without the peer's id, an inbound session cannot be told apart, and dialing a node
    /// that is already linked only opens a second session that the handshake refuses.
    pub async fn connect_node(&self, node_id: u64, address: &str) -> Result<(), MeshError> {
        self.link(address, Some(mesh_name(node_id))).await
    }

    async fn link(&self, address: &str, peer_name: Option<String>) -> Result<(), MeshError> {
        let address_lock = self.connect_lock(address);
        let _one_call_per_address = address_lock.lock().await;
        self.ensure_running()?;

        let resolved: HashSet<SocketAddr> = tokio::net::lookup_host(address)
            .await
            .map_err(|source| MeshError::Resolve {
                address: address.to_string(),
                source,
            })?
            .collect();
        if resolved.is_empty() {
            return Err(MeshError::NoSocketAddress {
                address: address.to_string(),
            });
        }

        let known_peer_name = peer_name.or_else(|| self.known_peer_name(address));
        let sessions = self.sessions().await?;
        if let Some(session) = linked_session(&sessions, &resolved, known_peer_name.as_deref()) {
            tracing::debug!(address, peer_name = ?session.peer_name, "mesh link already up");
            return Ok(());
        }

        // Subscribe before dialing so that the outcome of this session cannot be missed.
        let mut session_events = self.inner.session_events.subscribe();
        let socket_addresses: Vec<SocketAddr> = resolved.iter().copied().collect();
        self.inner.dials.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(crate::metrics::MESH_DIALS_TOTAL).increment(1);
        let dialed = tokio::time::timeout(
            Duration::from_millis(DIAL_TIMEOUT_MS),
            ractor_cluster::client_connect(&self.inner.node_server, socket_addresses.as_slice()),
        )
        .await;
        match dialed {
            Err(_) => {
                return Err(MeshError::DialTimeout {
                    address: address.to_string(),
                    timeout_ms: DIAL_TIMEOUT_MS,
                })
            }
            Ok(Err(ClientConnectErr::Socket(source) | ClientConnectErr::Encryption(source))) => {
                return Err(MeshError::Dial {
                    address: address.to_string(),
                    source,
                })
            }
            Ok(Err(ClientConnectErr::Messaging(_))) => {
                return Err(MeshError::ShutDown {
                    node_id: self.inner.node_id,
                })
            }
            Ok(Ok(())) => {}
        }

        let deadline = tokio::time::Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
        loop {
            let event = match tokio::time::timeout_at(deadline, session_events.recv()).await {
                Err(_) => {
                    return Err(MeshError::HandshakeTimeout {
                        address: address.to_string(),
                        timeout_ms: HANDSHAKE_TIMEOUT_MS,
                    })
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(MeshError::ShutDown {
                        node_id: self.inner.node_id,
                    })
                }
                Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    tracing::debug!(address, missed, "mesh session events lagged; rereading");
                    let sessions = self.sessions().await?;
                    if let Some(session) = linked_session(&sessions, &resolved, None) {
                        if let Some(peer_name) = session.peer_name.clone() {
                            self.remember_peer_name(address, peer_name);
                        }
                        return Ok(());
                    }
                    continue;
                }
                Ok(Ok(event)) => event,
            };
            match event {
                SessionEvent::Ready(session) if session.is_our_dial_to(&resolved) => {
                    if let Some(peer_name) = session.peer_name {
                        self.remember_peer_name(address, peer_name);
                    }
                    tracing::info!(address, "mesh link up");
                    return Ok(());
                }
                SessionEvent::Disconnected(session) if session.is_our_dial_to(&resolved) => {
                    // Our session may have lost the election against a link the peer
                    // opened at the same moment; that is success, not rejection.
                    if let Some(peer_name) = session.peer_name {
                        if self.wait_for_session_named(&peer_name).await? {
                            self.remember_peer_name(address, peer_name);
                            return Ok(());
                        }
                    }
                    return Err(MeshError::Rejected {
                        address: address.to_string(),
                    });
                }
                SessionEvent::Ready(_) | SessionEvent::Disconnected(_) => {}
            }
        }
    }

    /// Sessions this node has dialed since it started (a steady count means its links hold).
    pub fn dials_started(&self) -> u64 {
        self.inner.dials.load(Ordering::Relaxed)
    }

    /// Number of peer nodes this node currently has an authenticated link with.
    pub async fn connected_peers(&self) -> usize {
        match self.sessions().await {
            Ok(sessions) => sessions
                .iter()
                .filter_map(|session| session.peer_name.clone())
                .collect::<HashSet<_>>()
                .len(),
            Err(error) => {
                tracing::debug!(%error, "cannot count mesh peers");
                0
            }
        }
    }

    /// Sends one live event of `agent_id` (an encoded `AgentEvent`) to every subscriber
    /// of that agent on any linked node. Never blocks and never fails: an event nobody
    /// listens to is dropped, and a member that cannot take it is skipped.
    pub fn publish(&self, agent_id: &str, event: Vec<u8>) {
        let group = live_group_name(agent_id);
        let mut members = ractor::pg::get_members(&group);
        let Some(last_member) = members.pop() else {
            tracing::debug!(agent_id, "live event has no subscriber");
            return;
        };
        for member in members {
            deliver_live_event(agent_id, &member, event.clone());
        }
        deliver_live_event(agent_id, &last_member, event);
    }

    /// Subscribes to the live events of `agent_id`, wherever the agent runs. Events
    /// arrive in the returned subscription's bounded buffer; dropping it leaves the group.
    pub async fn subscribe(&self, agent_id: &str) -> Result<Subscription, MeshError> {
        self.ensure_running()?;
        let (sender, events) = mpsc::channel(self.inner.max_live_events_per_watcher);
        let dropped_here = Arc::new(AtomicU64::new(0));
        let arguments = WatcherArguments {
            group: live_group_name(agent_id),
            sender,
            dropped_here: dropped_here.clone(),
            dropped_on_node: self.inner.events_dropped.clone(),
        };
        // Unnamed: any number of watchers may exist, and names are process-global.
        let (watcher, _) = Actor::spawn_linked(
            None,
            LiveEventWatcher,
            arguments,
            self.inner.watcher_supervisor.get_cell(),
        )
        .await
        .map_err(|error| MeshError::Spawn {
            what: "live event watcher",
            reason: error.to_string(),
        })?;
        Ok(Subscription {
            events,
            watcher,
            dropped_here,
        })
    }

    /// Total live events dropped on this node because a subscriber's buffer was full.
    pub fn event_dropped_count(&self) -> u64 {
        self.inner.events_dropped.load(Ordering::Relaxed)
    }

    /// Ends every subscription on this node (their streams finish) and closes every link.
    pub async fn shutdown(&self) {
        if self.inner.shut_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let timeout = Some(Duration::from_millis(SHUTDOWN_TIMEOUT_MS));
        let watcher_supervisor = self.inner.watcher_supervisor.get_cell();
        watcher_supervisor
            .stop_children_and_wait(Some("mesh shutdown".to_string()), timeout)
            .await;
        if let Err(error) = watcher_supervisor
            .stop_and_wait(Some("mesh shutdown".to_string()), timeout)
            .await
        {
            tracing::debug!(%error, "mesh watcher supervisor did not stop cleanly");
        }
        // Killed rather than stopped: the listener actor waits inside `accept` and would
        // only see a stop request after the next incoming connection. Killing the server
        // kills its listener, sessions and remote actor proxies with it.
        if let Err(error) = self.inner.node_server.kill_and_wait(timeout).await {
            tracing::debug!(%error, "mesh node server did not stop cleanly");
        }
        tracing::info!(node_id = self.inner.node_id, "mesh shut down");
    }

    fn ensure_running(&self) -> Result<(), MeshError> {
        if self.inner.shut_down.load(Ordering::SeqCst) {
            Err(MeshError::ShutDown {
                node_id: self.inner.node_id,
            })
        } else {
            Ok(())
        }
    }

    /// Authenticated sessions of the local node server.
    async fn sessions(&self) -> Result<Vec<SessionSummary>, MeshError> {
        let sessions = ractor::call_t!(
            self.inner.node_server,
            NodeServerMessage::GetSessions,
            NODE_SERVER_CALL_TIMEOUT_MS
        )
        .map_err(|error| MeshError::NodeServerUnavailable {
            node_id: self.inner.node_id,
            reason: error.to_string(),
        })?;
        Ok(sessions.into_values().map(SessionSummary::from).collect())
    }

    /// Whether an authenticated session to the node named `peer_name` exists or appears
    /// within the election grace period.
    async fn wait_for_session_named(&self, peer_name: &str) -> Result<bool, MeshError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ELECTION_GRACE_MS);
        loop {
            let sessions = self.sessions().await?;
            if sessions
                .iter()
                .any(|session| session.peer_name.as_deref() == Some(peer_name))
            {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(ELECTION_POLL_INTERVAL_MS)).await;
        }
    }

    fn connect_lock(&self, address: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .connect_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // An entry only the map holds has no call in flight.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(address.to_string()).or_default().clone()
    }

    fn known_peer_name(&self, address: &str) -> Option<String> {
        self.inner
            .peer_names_by_address
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(address)
            .cloned()
    }

    fn remember_peer_name(&self, address: &str, peer_name: String) {
        self.inner
            .peer_names_by_address
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address.to_string(), peer_name);
    }
}

/// Sends one event to one group member: a local watcher, or the proxy of a watcher on
/// another node, which serialises it onto that node's link.
fn deliver_live_event(agent_id: &str, member: &ActorCell, event: Vec<u8>) {
    if let Err(error) = member.send_message(WatcherMessage::LiveEvent(event)) {
        tracing::debug!(
            agent_id,
            watcher = %member.get_id(),
            %error,
            "live event not delivered"
        );
    }
}

const NODE_NAME_PREFIX: &str = "flotilla-";
const NODE_HOST_PREFIX: &str = "node-";

/// The name node `node_id` goes by in its sessions: `<name>@<host>`, as ractor_cluster forms it
/// from the name and host given to `NodeServer::new` in [`Mesh::start`].
fn mesh_name(node_id: u64) -> String {
    format!("{NODE_NAME_PREFIX}{node_id}@{NODE_HOST_PREFIX}{node_id}")
}

/// An authenticated session that links us to the node at `resolved`: a session we
/// dialed to one of those socket addresses, or any session to the node that answered
/// there before.
fn linked_session<'a>(
    sessions: &'a [SessionSummary],
    resolved: &HashSet<SocketAddr>,
    known_peer_name: Option<&str>,
) -> Option<&'a SessionSummary> {
    sessions.iter().find(|session| {
        session.is_our_dial_to(resolved)
            || (known_peer_name.is_some() && session.peer_name.as_deref() == known_peer_name)
    })
}

/// A subscription to one agent's live events. Dropping it stops its watcher actor,
/// which leaves the agent's process group.
pub struct Subscription {
    /// Encoded `AgentEvent`s in the order this node received them.
    pub events: mpsc::Receiver<Vec<u8>>,
    watcher: ActorRef<WatcherMessage>,
    dropped_here: Arc<AtomicU64>,
}

impl Subscription {
    /// Events dropped because this subscription's buffer was full.
    pub fn dropped_count(&self) -> u64 {
        self.dropped_here.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Subscription")
            .field("watcher", &self.watcher.get_id())
            .field("dropped", &self.dropped_count())
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.watcher.stop(Some("subscription dropped".to_string()));
    }
}

impl futures::Stream for Subscription {
    type Item = Vec<u8>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        self.events.poll_recv(context)
    }
}

/// What a watcher receives, locally or from another node.
#[derive(Debug, PartialEq, Eq)]
enum WatcherMessage {
    /// One encoded `AgentEvent`.
    LiveEvent(Vec<u8>),
}

// Implemented by hand rather than derived so that the wire name of the variant is fixed
// here and an unknown variant from a newer node is refused (ractor then drops it).
impl Message for WatcherMessage {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            WatcherMessage::LiveEvent(event) => Ok(SerializedMessage::Cast {
                variant: LIVE_EVENT_VARIANT.to_string(),
                args: event,
                metadata: None,
            }),
        }
    }

    fn deserialize(message: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match message {
            SerializedMessage::Cast { variant, args, .. } if variant == LIVE_EVENT_VARIANT => {
                Ok(WatcherMessage::LiveEvent(args))
            }
            _ => Err(BoxedDowncastErr),
        }
    }
}

struct WatcherArguments {
    group: String,
    sender: mpsc::Sender<Vec<u8>>,
    dropped_here: Arc<AtomicU64>,
    dropped_on_node: Arc<AtomicU64>,
}

/// Forwards a process group's live events into one subscription's bounded buffer.
struct LiveEventWatcher;

impl Actor for LiveEventWatcher {
    type Msg = WatcherMessage;
    type State = WatcherArguments;
    type Arguments = WatcherArguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        arguments: WatcherArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Leaving is automatic: ractor removes a stopping actor from all its groups.
        ractor::pg::join(arguments.group.clone(), vec![myself.get_cell()]);
        Ok(arguments)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: WatcherMessage,
        state: &mut WatcherArguments,
    ) -> Result<(), ActorProcessingErr> {
        let WatcherMessage::LiveEvent(event) = message;
        match state.sender.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let dropped = state.dropped_here.fetch_add(1, Ordering::Relaxed) + 1;
                state.dropped_on_node.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(crate::metrics::MESH_LIVE_EVENTS_DROPPED_TOTAL).increment(1);
                // Logged at powers of two so a stalled reader cannot flood the log.
                if dropped.is_power_of_two() {
                    tracing::debug!(
                        group = %state.group,
                        dropped,
                        "live event buffer full; dropping events"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                myself.stop(Some("subscription receiver dropped".to_string()));
            }
        }
        Ok(())
    }
}

/// Parent of this node's watchers, so that `shutdown` can end them all. It never
/// receives messages; a watcher's exit or failure is logged and nothing else.
struct WatcherSupervisor;

/// Uninhabited: the watcher supervisor takes no messages. Not serializable, so it is
/// never advertised to other nodes.
#[derive(Debug)]
enum WatcherSupervisorMessage {}

impl Message for WatcherSupervisorMessage {}

impl Actor for WatcherSupervisor {
    type Msg = WatcherSupervisorMessage;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, _arguments: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: WatcherSupervisorMessage,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match message {}
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        // The default would stop the supervisor when any one watcher exits.
        if let SupervisionEvent::ActorFailed(watcher, reason) = event {
            tracing::warn!(watcher = %watcher.get_id(), %reason, "live event watcher failed");
        }
        Ok(())
    }
}

/// The parts of a node server session the mesh looks at.
#[derive(Clone, Debug)]
struct SessionSummary {
    peer_addr: Option<SocketAddr>,
    peer_name: Option<String>,
    is_server: bool,
}

impl SessionSummary {
    /// Whether this is a session this node dialed to one of `resolved`.
    fn is_our_dial_to(&self, resolved: &HashSet<SocketAddr>) -> bool {
        !self.is_server && self.peer_addr.is_some_and(|peer_addr| resolved.contains(&peer_addr))
    }
}

impl From<NodeServerSessionInformation> for SessionSummary {
    fn from(session: NodeServerSessionInformation) -> Self {
        SessionSummary {
            peer_addr: session.peer_addr.parse().ok(),
            peer_name: session.peer_name.map(|name| name.name),
            is_server: session.is_server,
        }
    }
}

#[derive(Clone, Debug)]
enum SessionEvent {
    /// Authenticated, elected and synchronised: groups of both nodes are known.
    Ready(SessionSummary),
    Disconnected(SessionSummary),
}

/// Relays the node server's session events to `connect` calls waiting on a handshake.
struct SessionEventForwarder {
    events: broadcast::Sender<SessionEvent>,
}

impl NodeEventSubscription for SessionEventForwarder {
    fn node_session_opened(&self, _session: NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, _session: NodeServerSessionInformation) {}

    fn node_session_ready(&self, session: NodeServerSessionInformation) {
        // No receiver means no `connect` is waiting; nothing is lost.
        let _ = self.events.send(SessionEvent::Ready(session.into()));
    }

    fn node_session_disconnected(&self, session: NodeServerSessionInformation) {
        let _ = self.events.send(SessionEvent::Disconnected(session.into()));
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::time::Instant;

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
}
