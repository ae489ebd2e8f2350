//! The node's gRPC listener speaks TLS only: every accepted connection goes through a rustls
//! handshake before tonic sees it, so a plaintext client gets no answer but a closed
//! connection. Clients present no certificate (they send a bearer token); nodes present theirs,
//! and the internal service refuses any call without one.

use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::NodeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tonic::{Request, Status};

use super::coalesce::CoalescedWrites;

/// TLS handshakes in progress at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 256;
/// Handshaken connections waiting for the server to take them.
const MAX_READY_CONNECTIONS: usize = 64;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

pub type TlsIncoming =
    tokio_stream::wrappers::ReceiverStream<Result<CoalescedWrites<TlsStream<TcpStream>>, std::io::Error>>;

/// The connections of `listener`, each after a successful TLS handshake with `config`, with
/// their writes coalesced (see [`CoalescedWrites`]). The
/// task that accepts them ends when the returned stream is dropped (after its next accept).
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> (TlsIncoming, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = mpsc::channel(MAX_READY_CONNECTIONS);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let task = tokio::spawn(async move {
        while !sender.is_closed() {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            // Without it a small Raft message waits for the peer's delayed ACK (about 40 ms).
            let _ = stream.set_nodelay(true);
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_HANDSHAKES, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let (acceptor, sender) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(connection)) => {
                        let _ = sender.send(Ok(CoalescedWrites::new(connection))).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(receiver), task)
}

/// The client certificate of an internal call, verified against the CA by the handshake.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub rustls::pki_types::CertificateDer<'static>);

/// Refuses an internal call whose connection presented no certificate signed by the cluster
/// CA (the handshake already refused one signed by anything else) or one of a node the
/// cluster removed, and keeps the certificate for the checks that need the caller's id. The
/// removal is checked at every call, not at the handshake only: a connection opened before
/// the removal is refused from the next call on.
#[derive(Clone)]
pub struct RequireNodeCertificate {
    pub check: flotilla_raft::tls::CertificateCheck,
}

impl tonic::service::Interceptor for RequireNodeCertificate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certificate = request
            .peer_certs()
            .and_then(|certificates| certificates.first().cloned())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "internal calls need a node certificate signed by the cluster CA; this connection presented none",
                )
            })?;
        (self.check)(&certificate).map_err(Status::unauthenticated)?;
        request.extensions_mut().insert(PeerCertificate(certificate));
        Ok(request)
    }
}

/// Refuses the certificates of nodes the cluster removed (`ClusterState::removed_nodes`), as
/// this node's replica has applied it. Costs one read of the state when no node was ever
/// removed, a certificate parse otherwise.
pub fn refuse_removed_nodes(replica: &flotilla_raft::Replica) -> flotilla_raft::tls::CertificateCheck {
    let reader = replica.reader().clone();
    Arc::new(move |certificate: &rustls::pki_types::CertificateDer<'_>| {
        if reader.read(|state| state.removed_nodes.is_empty()) {
            return Ok(());
        }
        let named = flotilla_raft::tls::certificate_node_ids(certificate);
        match reader.read(|state| named.into_iter().find(|node| state.removed_nodes.contains(node))) {
            Some(node) => Err(format!(
                "node {node} was removed from the cluster; its certificate is no longer accepted"
            )),
            None => Ok(()),
        }
    })
}

/// Whether the caller's certificate names node `node_id`.
pub fn peer_is<T>(request: &Request<T>, node_id: NodeId) -> bool {
    request
        .extensions()
        .get::<PeerCertificate>()
        .is_some_and(|certificate| flotilla_raft::tls::names_node(&certificate.0, node_id))
}
