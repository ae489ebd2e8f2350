//! Links between nodes: dialing a peer, waiting for ractor_cluster's handshake, and telling
//! whether a link to a node is already up (whichever side opened it).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{ClientConnectErr, NodeEventSubscription};
use tokio::sync::broadcast;

use super::{Mesh, MeshError, DIAL_TIMEOUT_MS, ELECTION_GRACE_MS, ELECTION_POLL_INTERVAL_MS, HANDSHAKE_TIMEOUT_MS};

impl Mesh {
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

        let resolved = resolve(address).await?;
        let known_peer_name = peer_name.or_else(|| self.known_peer_name(address));
        let sessions = self.sessions().await?;
        if let Some(session) = linked_session(&sessions, &resolved, known_peer_name.as_deref()) {
            tracing::debug!(address, peer_name = ?session.peer_name, "mesh link already up");
            return Ok(());
        }

        // Subscribe before dialing so that the outcome of this session cannot be missed.
        let session_events = self.inner.session_events.subscribe();
        self.dial(address, &resolved).await?;
        self.await_handshake(address, &resolved, session_events).await
    }

    /// Opens a session to one of `resolved`; the handshake then runs on its own.
    async fn dial(&self, address: &str, resolved: &HashSet<SocketAddr>) -> Result<(), MeshError> {
        let socket_addresses: Vec<SocketAddr> = resolved.iter().copied().collect();
        self.inner.dials.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(crate::metrics::MESH_DIALS_TOTAL).increment(1);
        let connecting = async {
            match &self.inner.connector {
                Some(connector) => {
                    let server_name =
                        tokio_rustls::rustls::pki_types::ServerName::try_from(flotilla_raft::tls::NODE_SERVER_NAME)
                            .expect("the node server name is a valid DNS name");
                    ractor_cluster::client_connect_enc(
                        &self.inner.node_server,
                        socket_addresses.as_slice(),
                        connector.0.clone(),
                        server_name,
                    )
                    .await
                }
                None => ractor_cluster::client_connect(&self.inner.node_server, socket_addresses.as_slice()).await,
            }
        };
        let dialed = tokio::time::timeout(Duration::from_millis(DIAL_TIMEOUT_MS), connecting).await;
        match dialed {
            Err(_) => Err(MeshError::DialTimeout {
                address: address.to_string(),
                timeout_ms: DIAL_TIMEOUT_MS,
            }),
            Ok(Err(ClientConnectErr::Socket(source) | ClientConnectErr::Encryption(source))) => Err(MeshError::Dial {
                address: address.to_string(),
                source,
            }),
            Ok(Err(ClientConnectErr::Messaging(_))) => Err(MeshError::ShutDown {
                node_id: self.inner.node_id,
            }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Waits for the session just dialed to `resolved` to become ready, or to be refused.
    async fn await_handshake(
        &self,
        address: &str,
        resolved: &HashSet<SocketAddr>,
        mut session_events: broadcast::Receiver<SessionEvent>,
    ) -> Result<(), MeshError> {
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
                    if self.linked_after_lag(address, resolved).await? {
                        return Ok(());
                    }
                    continue;
                }
                Ok(Ok(event)) => event,
            };
            match event {
                SessionEvent::Ready(session) if session.is_our_dial_to(resolved) => {
                    if let Some(peer_name) = session.peer_name {
                        self.remember_peer_name(address, peer_name);
                    }
                    tracing::info!(address, "mesh link up");
                    return Ok(());
                }
                SessionEvent::Disconnected(session) if session.is_our_dial_to(resolved) => {
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

    /// After missing session events: whether the session table already shows the link.
    async fn linked_after_lag(&self, address: &str, resolved: &HashSet<SocketAddr>) -> Result<bool, MeshError> {
        let sessions = self.sessions().await?;
        let Some(session) = linked_session(&sessions, resolved, None) else {
            return Ok(false);
        };
        if let Some(peer_name) = session.peer_name.clone() {
            self.remember_peer_name(address, peer_name);
        }
        Ok(true)
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

/// The socket addresses `address` (`host:port`) resolves to; at least one.
async fn resolve(address: &str) -> Result<HashSet<SocketAddr>, MeshError> {
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
    Ok(resolved)
}

pub(super) const NODE_NAME_PREFIX: &str = "flotilla-";
pub(super) const NODE_HOST_PREFIX: &str = "node-";

/// The name node `node_id` goes by in its sessions: `<name>@<host>`, as ractor_cluster forms it
/// from the name and host given to `NodeServer::new` in [`Mesh::start`].
pub(super) fn mesh_name(node_id: u64) -> String {
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

/// The parts of a node server session the mesh looks at.
#[derive(Clone, Debug)]
pub(super) struct SessionSummary {
    peer_addr: Option<SocketAddr>,
    pub(super) peer_name: Option<String>,
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
pub(super) enum SessionEvent {
    /// Authenticated, elected and synchronised: groups of both nodes are known.
    Ready(SessionSummary),
    Disconnected(SessionSummary),
}

/// Relays the node server's session events to `connect` calls waiting on a handshake.
pub(super) struct SessionEventForwarder {
    pub(super) events: broadcast::Sender<SessionEvent>,
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
