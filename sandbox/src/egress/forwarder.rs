//! The in-machine side of the proxy: plain TCP on loopback, forwarded to the Unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::connection::respond_and_close;
use super::request::{error_response, ErrorStatus};
use super::server::ACCEPT_ERROR_BACKOFF_MS;
use super::EgressError;

/// The in-machine forwarder's own bound; the proxy behind it enforces the real limit.
const FORWARDER_MAX_CONNECTIONS: usize = 1024;

/// The in-machine side: accept TCP on `listen` and forward each connection to the Unix socket
/// (used as the machine's HTTP(S)_PROXY). Runs until the future is dropped; returns only if it
/// cannot listen.
pub async fn forward_tcp_to_unix(listen: SocketAddr, socket_path: PathBuf) -> Result<(), EgressError> {
    let listener = TcpListener::bind(listen).await.map_err(|source| EgressError::Bind {
        address: listen.to_string(),
        source,
    })?;
    forward_tcp_listener_to_unix(listener, socket_path).await
}

/// [`forward_tcp_to_unix`] on a listener the caller has already bound (to learn a port chosen
/// by the system, for instance).
pub async fn forward_tcp_listener_to_unix(listener: TcpListener, socket_path: PathBuf) -> Result<(), EgressError> {
    let permits = Arc::new(Semaphore::new(FORWARDER_MAX_CONNECTIONS));
    let mut forwarding_tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp_client, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        forwarding_tasks.spawn(forward_one(tcp_client, socket_path.clone(), permit));
                    }
                    Err(_) => {
                        tracing::warn!(
                            client = %peer,
                            max_connections = FORWARDER_MAX_CONNECTIONS,
                            "egress forwarder at its connection limit; closing connection"
                        );
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "egress forwarder could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                }
            },
            Some(finished) = forwarding_tasks.join_next(), if !forwarding_tasks.is_empty() => {
                if let Err(error) = finished {
                    if error.is_panic() {
                        tracing::error!(%error, "egress forwarder task panicked");
                    }
                }
            }
        }
    }
}

async fn forward_one(mut tcp_client: TcpStream, socket_path: PathBuf, _permit: OwnedSemaphorePermit) {
    let _ = tcp_client.set_nodelay(true);
    let mut proxy = match UnixStream::connect(&socket_path).await {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::warn!(socket = %socket_path.display(), %error, "egress proxy socket unreachable");
            let body = format!(
                "egress proxy unavailable: could not connect to {}: {error}",
                socket_path.display()
            );
            respond_and_close(tcp_client, &error_response(ErrorStatus::BadGateway, &body)).await;
            return;
        }
    };
    if let Err(error) = tokio::io::copy_bidirectional(&mut tcp_client, &mut proxy).await {
        tracing::debug!(%error, "egress forwarder connection ended");
    }
}
