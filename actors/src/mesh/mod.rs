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
//! Links are mutual TLS (ractor_cluster's `IncomingEncryptionMode::Tls` on the listening side,
//! `client_connect_enc` on the dialing side): both ends present a certificate signed by the
//! cluster CA, and a dialed server must carry the name every node certificate has. The cookie
//! handshake of ractor_cluster still runs inside the TLS session; it authenticates nothing
//! the certificates did not. The listener binds the node's own listen address, not every
//! interface.
//!
//! ractor's process groups and actor registries are global to the process, so one
//! process is one mesh node: two [`Mesh`] values in one process share their groups and
//! are not two independent nodes (a linked pair delivers every event twice: once
//! locally, once back over the link). End-to-end delivery between nodes belongs in the
//! integration suite, which runs real `flotilla` processes; the unit tests (`tests.rs`) cover
//! one node, the handshake, and the wire path through a remote proxy.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorRef, SpawnErr};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NodeServer, NodeServerMessage};
use tokio::sync::broadcast;

mod link;
#[cfg(test)]
mod tests;
mod watch;

use link::{SessionEvent, SessionEventForwarder, SessionSummary, NODE_HOST_PREFIX, NODE_NAME_PREFIX};
pub use watch::{Rejoin, Subscription};
use watch::{WatcherSupervisor, WatcherSupervisorMessage};

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
    /// TCP port the mesh listens on.
    pub listen_port: u16,
    /// Address the mesh listens on: the node's own, not every interface unless configured.
    pub listen_ip: IpAddr,
    /// Shared by every node of the cluster: the handshake cookie. A node with another
    /// secret cannot link.
    pub cluster_secret: String,
    /// Capacity of each subscriber's buffer; events beyond it are dropped and counted.
    pub max_live_events_per_watcher: usize,
    /// Mutual TLS for every link. `None` (plain TCP) only in the mesh's own unit tests; a node
    /// always sets it.
    pub tls: Option<MeshTls>,
}

/// The dialing end of TLS links (rustls' connector shows nothing worth printing).
#[derive(Clone)]
struct Connector(tokio_rustls::TlsConnector);

impl fmt::Debug for Connector {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Connector(tls)")
    }
}

/// The TLS ends of mesh links: both check the peer's certificate against the cluster CA.
#[derive(Clone)]
pub struct MeshTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
}

impl fmt::Debug for MeshConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("MeshConfig")
            .field("node_id", &self.node_id)
            .field("listen_port", &self.listen_port)
            .field("cluster_secret", &"<redacted>")
            .field("max_live_events_per_watcher", &self.max_live_events_per_watcher)
            .field("tls", &self.tls.is_some())
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
         (another cluster's certificate or cookie, or this node's own address)"
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
    /// How this node dials its peers: over TLS when set.
    connector: Option<Connector>,
    events_dropped: Arc<AtomicU64>,
    /// Sessions this node has dialed since it started.
    dials: AtomicU64,
    shut_down: AtomicBool,
}

impl Mesh {
    /// Starts this node's mesh server on `listen_ip:listen_port`, named `flotilla-<node_id>`,
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
            config
                .tls
                .as_ref()
                .map(|tls| ractor_cluster::IncomingEncryptionMode::Tls(tls.acceptor.clone())),
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(config.listen_ip);

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
                connector: config.tls.map(|tls| Connector(tls.connector)),
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
}
