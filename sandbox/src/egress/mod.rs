//! Allowlisting egress proxy for sandboxed machines.
//!
//! A sandboxed machine has no network of its own. When its agent or team has an egress
//! allowlist, the node runs an [`EgressProxy`] on a Unix socket that is bind-mounted into the
//! machine, and [`forward_tcp_to_unix`] runs inside the machine so that ordinary
//! `HTTP_PROXY`/`HTTPS_PROXY` clients can reach it over loopback TCP. The proxy speaks just
//! enough HTTP/1.1 for that: `CONNECT host:port` tunnels (HTTPS and anything else over TLS)
//! and absolute-URI requests such as `GET http://host/path`, forwarded once with
//! `Connection: close`.
//!
//! The proxy resolves names itself, so a machine never needs a resolver and an allowed name
//! is only ever reached through the node's own lookup. Of the addresses a name resolves to it
//! keeps the public ones and a non-public one (loopback, link-local, private, ...) only when
//! the allowlist names that address or its network, and it connects to exactly the addresses
//! it kept (no second lookup a changed DNS answer could redirect). Deciding is pure (pattern
//! parsing, [`EgressPolicy::allows`], [`EgressPolicy::reachable_addresses`], request-head
//! parsing) and tested without sockets; the tokio code around it only resolves, moves bytes
//! and enforces the [`EgressLimits`].
//!
//! The module is laid out in the order a request meets it: `policy` (the allowlist and the
//! limits), `server` (listening and admitting connections), `request` (parsing a request head
//! and the proxy's own answers), `connection` (serving one admitted connection) and
//! `forwarder` (the in-machine TCP-to-Unix side).

use std::io;
use std::path::PathBuf;

pub use flotilla_state::host_pattern::{HostPattern, HostPatternError};

mod connection;
mod forwarder;
mod policy;
mod request;
mod server;
#[cfg(test)]
mod tests;

pub use forwarder::{forward_tcp_listener_to_unix, forward_tcp_to_unix};
pub use policy::{EgressLimits, EgressPolicy};
pub use server::{EgressProxy, EgressStats};

/// Errors at the boundary of the egress module.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid egress host pattern {:?}: {}", .0.pattern, .0.reason)]
    InvalidHostPattern(#[from] HostPatternError),
    #[error("invalid egress limits: {0}")]
    InvalidLimits(String),
    #[error("egress proxy could not listen on {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("egress socket {} is already served by a running proxy", .path.display())]
    SocketInUse { path: PathBuf },
    #[error("egress socket path {} exists and is not a socket", .path.display())]
    NotASocket { path: PathBuf },
    #[error("could not prepare egress socket {}: {source}", .path.display())]
    SocketSetup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
