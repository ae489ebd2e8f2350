//! Where a plugin's request may connect: the address rule of the host patterns
//! ([`flotilla_state::host_pattern::reachable_addresses`]) applied to `http.send`. A granted
//! name reaches public addresses; a loopback, link-local, private or other non-public address
//! only when a grant names that address or its network. So granting `forge.example` never lets
//! a DNS answer point the plugin at the node's own services or a cloud metadata service.
//!
//! The host resolves a granted name itself before the request and decides on the answer. When
//! every address it keeps is public, the request goes through the shared client, whose resolver
//! ([`PublicOnlyResolver`]) drops non-public addresses from the answer it gets then: a second,
//! different answer (DNS rebinding) can only lead to a public address, which the name's grant
//! allowed anyway. When a grant admitted a non-public address, the request goes through a
//! client built for it that connects to exactly the addresses checked.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use flotilla_state::host_pattern::{classify, reachable_addresses, AddressRefusal, HostPattern};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::time::Instant;
use url::{Host, Url};

use crate::bindings::vcs_world::flotilla::plugin::types::HttpError;
use crate::grants;

/// Addresses of one name the host considers; a longer answer is cut.
const MAX_RESOLVED_ADDRESSES: usize = 32;

/// How a checked request reaches its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Through the shared client: an address in the URL, or a name whose addresses are all
    /// public.
    Shared,
    /// To exactly these addresses of `name`, some non-public and granted.
    Pinned { name: String, addresses: Vec<SocketAddr> },
}

/// Resolves the URL's host, if it is a name, by `deadline` and applies the address rule.
pub(crate) async fn route(grants: &[String], url: &Url, deadline: Instant) -> Result<Route, HttpError> {
    let (Some(Host::Domain(name)), Some(port)) = (url.host(), url.port_or_known_default()) else {
        // An address in the URL matched a grant that names it (a name grant never matches one).
        return Ok(Route::Shared);
    };
    let resolved: Vec<IpAddr> = match tokio::time::timeout_at(deadline, tokio::net::lookup_host((name, port))).await {
        Ok(Ok(addresses)) => addresses
            .map(|address| address.ip())
            .take(MAX_RESOLVED_ADDRESSES)
            .collect(),
        Ok(Err(error)) => return Err(HttpError::Transport(format!("could not resolve {name}: {error}"))),
        Err(_) => return Err(HttpError::Timeout),
    };
    let patterns: Vec<HostPattern> = grants.iter().filter_map(|grant| grant.parse().ok()).collect();
    match reachable_addresses(&patterns, name, port, &resolved) {
        Ok(reachable) if reachable.iter().all(|ip| classify(*ip).is_none()) => Ok(Route::Shared),
        Ok(reachable) => Ok(Route::Pinned {
            name: name.to_owned(),
            addresses: reachable.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(),
        }),
        Err(AddressRefusal::NoAddresses { .. }) => {
            Err(HttpError::Transport(format!("{name} resolved to no addresses")))
        }
        Err(refusal) => Err(HttpError::HostNotGranted(format!(
            "{} ({refusal})",
            grants::authority(url)
        ))),
    }
}

/// The shared client's resolver: the system's answer without its non-public addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublicOnlyResolver {
    pub(crate) timeout: Duration,
}

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let timeout = self.timeout;
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let answer = tokio::time::timeout(timeout, tokio::net::lookup_host((name.as_str(), 0)))
                .await
                .map_err(|_| format!("resolving {name} took longer than {} ms", timeout.as_millis()))??;
            let public: Vec<SocketAddr> = answer
                .filter(|address| classify(address.ip()).is_none())
                .take(MAX_RESOLVED_ADDRESSES)
                .collect();
            if public.is_empty() {
                return Err(format!("{name} resolves to no public address").into());
            }
            let addresses: Addrs = Box::new(public.into_iter());
            Ok(addresses)
        })
    }
}
