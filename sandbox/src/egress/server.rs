//! Listening, admitting connections within the limits, and the [`EgressProxy`] handle.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use super::connection::{respond_and_close, serve_connection};
use super::policy::{EgressLimits, EgressPolicy};
use super::request::{error_response, ErrorStatus};
use super::EgressError;

/// Owner and group (the node and the machine's runtime) may connect; nobody else.
const SOCKET_MODE: u32 = 0o660;
/// Connections past `max_connections` still get a 503 so that clients see why, but only this
/// many at a time; beyond it they are closed without an answer.
const MAX_PENDING_REFUSALS: usize = 64;
/// Pause after a failed `accept` (typically out of file descriptors) so the loop does not spin.
pub(super) const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressStats {
    /// Requests whose host was on the allowlist (whether or not the origin then answered).
    pub allowed: u64,
    /// Requests refused by the policy (403): a host not on the allowlist, or a name whose
    /// addresses are all non-public and unlisted.
    pub refused: u64,
    /// Connections turned away before a policy decision: malformed (400), head too large (431)
    /// or too slow (408), or over `max_connections` (503).
    pub rejected: u64,
    /// Connections being served now, including those still sending their head.
    pub active: usize,
}

pub(super) struct ProxyShared {
    policy: RwLock<Arc<EgressPolicy>>,
    pub(super) limits: EgressLimits,
    connection_permits: Arc<Semaphore>,
    refusal_permits: Arc<Semaphore>,
    pub(super) allowed: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) rejected: AtomicU64,
}

impl ProxyShared {
    pub(super) fn current_policy(&self) -> Arc<EgressPolicy> {
        self.policy.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A running egress proxy. Dropping it stops accepting, closes every connection it serves,
/// and removes its Unix socket.
pub struct EgressProxy {
    shared: Arc<ProxyShared>,
    accept_task: JoinHandle<()>,
    /// Removes the socket file when the proxy is dropped, after `Drop` has aborted the task.
    unix_socket: Option<UnixSocketFile>,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("EgressProxy")
            .field("stats", &self.stats())
            .field("unix_socket", &self.unix_socket.as_ref().map(|socket| &socket.path))
            .finish_non_exhaustive()
    }
}

impl EgressProxy {
    /// Serves the proxy on a Unix socket (created at `socket_path`, mode 0660); returns a handle
    /// whose Drop stops it and removes the socket. A stale socket left by a dead proxy is
    /// replaced; one that a live proxy still serves is an error.
    pub async fn serve_unix(
        socket_path: &Path,
        policy: EgressPolicy,
        limits: EgressLimits,
    ) -> Result<EgressProxy, EgressError> {
        limits.validate()?;
        remove_stale_socket(socket_path).await?;
        let listener = UnixListener::bind(socket_path).map_err(|source| EgressError::Bind {
            address: socket_path.display().to_string(),
            source,
        })?;
        let setup_error = |source| EgressError::SocketSetup {
            path: socket_path.to_owned(),
            source,
        };
        let metadata = tokio::fs::symlink_metadata(socket_path).await.map_err(setup_error)?;
        // From here the guard removes the socket if anything below fails.
        let socket_file = UnixSocketFile {
            path: socket_path.to_owned(),
            device: metadata.dev(),
            inode: metadata.ino(),
        };
        tokio::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .await
            .map_err(setup_error)?;
        tracing::info!(socket = %socket_path.display(), "egress proxy listening on unix socket");
        Ok(EgressProxy::start(
            ProxyListener::Unix(listener),
            policy,
            limits,
            Some(socket_file),
        ))
    }

    /// Same on a TCP listener (for tests and for hosts that prefer it); returns the bound address.
    pub async fn serve_tcp(
        listen: SocketAddr,
        policy: EgressPolicy,
        limits: EgressLimits,
    ) -> Result<(EgressProxy, SocketAddr), EgressError> {
        limits.validate()?;
        let bind_error = |source| EgressError::Bind {
            address: listen.to_string(),
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
        let local_address = listener.local_addr().map_err(bind_error)?;
        tracing::info!(address = %local_address, "egress proxy listening on tcp");
        Ok((
            EgressProxy::start(ProxyListener::Tcp(listener), policy, limits, None),
            local_address,
        ))
    }

    fn start(
        listener: ProxyListener,
        policy: EgressPolicy,
        limits: EgressLimits,
        unix_socket: Option<UnixSocketFile>,
    ) -> EgressProxy {
        let shared = Arc::new(ProxyShared {
            policy: RwLock::new(Arc::new(policy)),
            limits,
            connection_permits: Arc::new(Semaphore::new(limits.max_connections)),
            refusal_permits: Arc::new(Semaphore::new(MAX_PENDING_REFUSALS)),
            allowed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        EgressProxy {
            shared,
            accept_task,
            unix_socket,
        }
    }

    pub fn stats(&self) -> EgressStats {
        EgressStats {
            allowed: self.shared.allowed.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
            rejected: self.shared.rejected.load(Ordering::Relaxed),
            active: self.shared.limits.max_connections - self.shared.connection_permits.available_permits(),
        }
    }

    /// Replaces the policy atomically. Requests decided after the call use the new policy;
    /// tunnels and forwards already established are left alone.
    pub fn set_policy(&self, policy: EgressPolicy) {
        tracing::info!(allowed_hosts = policy.allowed_hosts.len(), "egress policy replaced");
        *self.shared.policy.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        // The accept task owns the listener and the JoinSet of connection tasks, so aborting it
        // closes the listener and aborts every connection.
        self.accept_task.abort();
    }
}

/// The socket file a proxy created, removed on drop only if it is still the same file (a
/// later proxy may have replaced it at the same path).
struct UnixSocketFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let still_ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|metadata| metadata.dev() == self.device && metadata.ino() == self.inode);
        if still_ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), %error, "could not remove egress socket");
            }
        }
    }
}

async fn remove_stale_socket(path: &Path) -> Result<(), EgressError> {
    let setup_error = |source| EgressError::SocketSetup {
        path: path.to_owned(),
        source,
    };
    let metadata = match tokio::fs::symlink_metadata(path).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(setup_error(error)),
    };
    if !metadata.file_type().is_socket() {
        return Err(EgressError::NotASocket { path: path.to_owned() });
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(EgressError::SocketInUse { path: path.to_owned() }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "replacing stale egress socket");
            tokio::fs::remove_file(path).await.map_err(setup_error)
        }
        Err(error) => Err(setup_error(error)),
    }
}

pub(super) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

enum ProxyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl ProxyListener {
    /// Returns the client stream and a label for logs.
    async fn accept(&self) -> io::Result<(Box<dyn ClientStream>, String)> {
        match self {
            ProxyListener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                // Tunnels carry interactive protocols (TLS handshakes, git); do not batch them.
                let _ = stream.set_nodelay(true);
                Ok((Box::new(stream), peer.to_string()))
            }
            ProxyListener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok((Box::new(stream), "unix socket".to_owned()))
            }
        }
    }
}

async fn accept_loop(listener: ProxyListener, shared: Arc<ProxyShared>) {
    let mut connection_tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, client_label)) => match shared.connection_permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        connection_tasks.spawn(serve_connection(client, client_label, shared.clone(), permit));
                    }
                    Err(_) => {
                        shared.rejected.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::record_egress_connection(crate::metrics::EgressOutcome::Rejected);
                        tracing::info!(
                            client = %client_label,
                            verdict = "rejected",
                            max_connections = shared.limits.max_connections,
                            "egress connection over the connection limit"
                        );
                        if let Ok(refusal_permit) = shared.refusal_permits.clone().try_acquire_owned() {
                            let response = error_response(
                                ErrorStatus::ServiceUnavailable,
                                &format!(
                                    "egress proxy is serving its limit of {} connections; try again later",
                                    shared.limits.max_connections
                                ),
                            );
                            connection_tasks.spawn(async move {
                                respond_and_close(client, &response).await;
                                drop(refusal_permit);
                            });
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "egress proxy could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                }
            },
            Some(finished) = connection_tasks.join_next(), if !connection_tasks.is_empty() => {
                if let Err(error) = finished {
                    if error.is_panic() {
                        tracing::error!(%error, "egress connection task panicked");
                    }
                }
            }
        }
    }
}
