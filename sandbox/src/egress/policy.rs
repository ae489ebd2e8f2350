//! What a machine may reach and how much its clients may make the proxy hold. Pure: tested
//! without sockets.

use std::net::IpAddr;

use flotilla_state::host_pattern::{reachable_addresses, AddressRefusal, Host};
use tokio::sync::Semaphore;

use super::{EgressError, HostPattern};

/// A head must at least fit a short request line such as `CONNECT host:443 HTTP/1.1`.
const MIN_REQUEST_HEAD_BYTES: usize = 64;

/// The hosts a machine may reach. The empty policy (the default) refuses everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allowed_hosts: Vec<HostPattern>,
}

impl EgressPolicy {
    /// Parses every pattern; the error names the first bad one.
    pub fn from_patterns<I, S>(patterns: I) -> Result<Self, EgressError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let allowed_hosts = patterns
            .into_iter()
            .map(|pattern| pattern.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(EgressPolicy { allowed_hosts })
    }

    /// Whether `host:port` is on the allowlist; an unparsable host is never allowed. For a
    /// name this is the first of two checks: the addresses it resolves to must then pass
    /// [`EgressPolicy::reachable_addresses`].
    pub fn allows(&self, host: &str, port: u16) -> bool {
        host.parse().is_ok_and(|host| self.allows_host(&host, port))
    }

    /// [`EgressPolicy::allows`] for a host already parsed (from a request head).
    pub(super) fn allows_host(&self, host: &Host, port: u16) -> bool {
        self.allowed_hosts
            .iter()
            .any(|pattern| pattern.matches_host(host, port))
    }

    /// Of the addresses an allowed `name` resolved to, those the proxy may connect to on
    /// `port`: the public ones, and a non-public one only when the allowlist names it or its
    /// network (the address rule of [`flotilla_state::host_pattern`]).
    pub fn reachable_addresses(
        &self,
        name: &str,
        port: u16,
        resolved: &[IpAddr],
    ) -> Result<Vec<IpAddr>, AddressRefusal> {
        reachable_addresses(&self.allowed_hosts, name, port, resolved)
    }
}

/// Bounds on what clients of the proxy can make it hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressLimits {
    /// Connections served at once, counting those still sending their head; more get 503.
    pub max_connections: usize,
    /// Resolving the host and connecting to it, together; past it the client gets 504.
    pub connect_timeout_ms: u64,
    /// A tunnel or forwarded request with no bytes either way for this long is closed. Also
    /// bounds the time a client may take to send its whole request head (then 408).
    pub idle_timeout_ms: u64,
    /// Request line plus headers; a longer head gets 431.
    pub max_request_head_bytes: usize,
}

impl Default for EgressLimits {
    fn default() -> Self {
        EgressLimits {
            max_connections: 256,
            connect_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_request_head_bytes: 64 * 1024,
        }
    }
}

impl EgressLimits {
    pub(super) fn validate(&self) -> Result<(), EgressError> {
        if self.max_connections == 0 || self.max_connections > Semaphore::MAX_PERMITS {
            return Err(EgressError::InvalidLimits(format!(
                "max_connections must be between 1 and {}, found {}",
                Semaphore::MAX_PERMITS,
                self.max_connections
            )));
        }
        if self.connect_timeout_ms == 0 {
            return Err(EgressError::InvalidLimits(
                "connect_timeout_ms must be above 0, found 0".to_owned(),
            ));
        }
        if self.idle_timeout_ms == 0 {
            return Err(EgressError::InvalidLimits(
                "idle_timeout_ms must be above 0, found 0".to_owned(),
            ));
        }
        if self.max_request_head_bytes < MIN_REQUEST_HEAD_BYTES {
            return Err(EgressError::InvalidLimits(format!(
                "max_request_head_bytes must be at least {MIN_REQUEST_HEAD_BYTES}, found {}",
                self.max_request_head_bytes
            )));
        }
        Ok(())
    }
}
