//! Host patterns: how an egress allowlist, a plugin's granted hosts and the node's config name
//! the hosts something may reach. Parsed by one function so that every place agrees on the
//! same syntax and the same port rule.
//!
//! A pattern is `example.com`, `*.example.com` (subdomains at any depth, not the apex), an
//! address (`10.1.2.3`, `[fd00::1]`) or a network (`10.0.0.0/8`, `[fd00::/8]`), each
//! optionally followed by `:port`. Names match case-insensitively and ignore a trailing dot. A
//! wildcard never matches an IP address; an address pattern matches only that address
//! (compared as an address, so `[0::1]` and `[::1]` are the same) and a network pattern every
//! address inside it.
//!
//! The port rule, written once in [`HostPattern::matches_host`]: a pattern with `:port` admits
//! only that port; a pattern without one admits only 443 ([`PORT_WHEN_UNWRITTEN`]). Plain http
//! on port 80 must be asked for with `:80`.
//!
//! The address rule, written once in [`reachable_addresses`]: a caller that resolves an
//! allowed name keeps the public addresses it resolved to, and a non-public one (loopback,
//! link-local, private, ...; see [`address::classify`]) only when an address or network
//! pattern names it. So listing a name never opens the node's own services, a cloud metadata
//! service or the private network behind the node.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

pub mod address;

pub use address::{classify, AddressKind, EmbeddedIpv4, NonPublicAddress};

/// The port a pattern without `:port` admits.
pub const PORT_WHEN_UNWRITTEN: u16 = 443;

const MAX_HOST_NAME_BYTES: usize = 253;
const MAX_HOST_LABEL_BYTES: usize = 63;

/// Why a host, a `host:port` or a port is not valid. The egress proxy puts these messages in
/// its 400 answers, so they say what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostSyntaxError {
    #[error("{text:?} opens '[' but does not close it")]
    UnclosedBracket { text: String },
    #[error("{inner:?} is not an IPv6 address")]
    NotAnIpv6Address { inner: String },
    #[error("host is empty")]
    EmptyHost,
    #[error("host name is {length_bytes} bytes long, the limit is {MAX_HOST_NAME_BYTES}")]
    NameTooLong { length_bytes: usize },
    #[error("host name {name:?} has an empty label")]
    EmptyLabel { name: String },
    #[error("host name label {label:?} is {length_bytes} bytes long, the limit is {MAX_HOST_LABEL_BYTES}")]
    LabelTooLong { label: String, length_bytes: usize },
    #[error("host name {name:?} contains {character:?}, which is not allowed in a DNS name")]
    CharacterNotAllowed { name: String, character: char },
    #[error("host {name:?} is neither a dotted-quad IPv4 address nor a name whose last label starts with a letter")]
    NumericLastLabel { name: String },
    #[error("unexpected {rest:?} after the IPv6 address in {text:?}")]
    TextAfterIpv6Address { rest: String, text: String },
    #[error("{text:?}: IPv6 addresses must be bracketed, as in [::1]:443")]
    UnbracketedIpv6Address { text: String },
    #[error("port {text:?} is not a number")]
    PortNotANumber { text: String },
    #[error("port {text} is not between 1 and 65535")]
    PortOutOfRange { text: String },
}

/// Why a text is not a host pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternReason {
    #[error("pattern is empty")]
    Empty,
    #[error("a bare \"*\" would allow every host; list the hosts, or leave the allowlist unset")]
    BareWildcard,
    #[error("'*' is only allowed as the whole first label, as in *.example.com")]
    MisplacedWildcard,
    #[error("after \"*.\": {0}")]
    AfterWildcard(HostSyntaxError),
    #[error(
        "network address {text:?} is not a dotted-quad IPv4 address (an IPv6 network is bracketed, as in [fd00::/8])"
    )]
    NotANetworkAddress { text: String },
    #[error("prefix length {text:?} is not a number")]
    PrefixNotANumber { text: String },
    #[error("prefix length /{prefix} is longer than the {max_prefix} bits of the address")]
    PrefixTooLong { prefix: String, max_prefix: u8 },
    #[error("a /0 network would allow every address; list the networks")]
    WholeAddressSpace,
    #[error("{text} has bits set after its prefix; the network is {network}")]
    BitsAfterPrefix { text: String, network: String },
    #[error(transparent)]
    Syntax(#[from] HostSyntaxError),
}

/// A text that is not a host pattern, named with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host pattern {pattern:?}: {reason}")]
pub struct HostPatternError {
    pub pattern: String,
    pub reason: HostPatternReason,
}

/// A destination host: a normalised DNS name (lowercase, no trailing dot) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => formatter.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(formatter, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(formatter, "[{ip}]"),
        }
    }
}

impl FromStr for Host {
    type Err = HostSyntaxError;

    /// A dotted-quad IPv4 address, a bracketed IPv6 address, or a DNS name.
    fn from_str(text: &str) -> Result<Host, HostSyntaxError> {
        if let Some(inner) = text.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| HostSyntaxError::UnclosedBracket { text: text.to_owned() })?;
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| HostSyntaxError::NotAnIpv6Address {
                    inner: inner.to_owned(),
                });
        }
        if let Ok(ip) = text.parse::<Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(ip)));
        }
        parse_host_name(text).map(Host::Name)
    }
}

/// Validates and normalises a DNS name. The last label must start with a letter: resolvers
/// accept numeric shorthands such as `127.1` or `0x7f000001`, which would otherwise let an
/// address slip past patterns written for names or for the canonical address.
fn parse_host_name(text: &str) -> Result<String, HostSyntaxError> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() {
        return Err(HostSyntaxError::EmptyHost);
    }
    if name.len() > MAX_HOST_NAME_BYTES {
        return Err(HostSyntaxError::NameTooLong {
            length_bytes: name.len(),
        });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostSyntaxError::EmptyLabel { name });
        }
        if label.len() > MAX_HOST_LABEL_BYTES {
            return Err(HostSyntaxError::LabelTooLong {
                label: label.to_owned(),
                length_bytes: label.len(),
            });
        }
        if let Some(character) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(HostSyntaxError::CharacterNotAllowed { name, character });
        }
    }
    let last_label = name.rsplit('.').next().unwrap_or_default();
    if !last_label.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(HostSyntaxError::NumericLastLabel { name });
    }
    Ok(name)
}

/// Splits `host[:port]`, where an IPv6 host is bracketed. The port is returned as text.
pub fn split_host_port(text: &str) -> Result<(&str, Option<&str>), HostSyntaxError> {
    if text.starts_with('[') {
        let Some(close) = text.find(']') else {
            return Err(HostSyntaxError::UnclosedBracket { text: text.to_owned() });
        };
        let (host, rest) = text.split_at(close + 1);
        if rest.is_empty() {
            return Ok((host, None));
        }
        return match rest.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None => Err(HostSyntaxError::TextAfterIpv6Address {
                rest: rest.to_owned(),
                text: text.to_owned(),
            }),
        };
    }
    match text.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err(HostSyntaxError::UnbracketedIpv6Address { text: text.to_owned() }),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((text, None)),
    }
}

/// A TCP port written in decimal, 1 to 65535.
pub fn parse_port(text: &str) -> Result<u16, HostSyntaxError> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(HostSyntaxError::PortNotANumber { text: text.to_owned() });
    }
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(HostSyntaxError::PortOutOfRange { text: text.to_owned() }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PatternHost {
    Exact(Host),
    /// `*.example.com`: any name with at least one more label; not `example.com` itself.
    SubdomainsOf(String),
    /// `10.0.0.0/8`, `[fd00::/8]`: every address inside.
    Network(IpNet),
}

/// One allowlist entry or plugin grant; see the module documentation for the syntax and the
/// port rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    host: PatternHost,
    port: Option<u16>,
}

impl HostPattern {
    /// The port written in the pattern, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Whether `host:port` matches; an unparsable host matches nothing.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        host.parse().is_ok_and(|host| self.matches_host(&host, port))
    }

    /// The one port rule: the pattern admits its written port, or else only
    /// [`PORT_WHEN_UNWRITTEN`].
    pub fn matches_host(&self, host: &Host, port: u16) -> bool {
        if self.port.unwrap_or(PORT_WHEN_UNWRITTEN) != port {
            return false;
        }
        match (&self.host, host) {
            (PatternHost::Exact(pattern_host), host) => pattern_host == host,
            (PatternHost::SubdomainsOf(suffix), Host::Name(name)) => name
                .strip_suffix(suffix.as_str())
                .and_then(|prefix| prefix.strip_suffix('.'))
                .is_some_and(|subdomain| !subdomain.is_empty()),
            (PatternHost::Network(network), Host::Ip(ip)) => network.contains(ip),
            (PatternHost::SubdomainsOf(_) | PatternHost::Network(_), _) => false,
        }
    }
}

impl FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(text: &str) -> Result<Self, HostPatternError> {
        parse_pattern(text.trim()).map_err(|reason| HostPatternError {
            pattern: text.to_owned(),
            reason,
        })
    }
}

fn parse_pattern(trimmed: &str) -> Result<HostPattern, HostPatternReason> {
    if trimmed.is_empty() {
        return Err(HostPatternReason::Empty);
    }
    let (host_text, port_text) = split_host_port(trimmed)?;
    let port = port_text.map(parse_port).transpose()?;
    let host = if host_text == "*" {
        return Err(HostPatternReason::BareWildcard);
    } else if host_text.contains('/') {
        PatternHost::Network(parse_network(host_text)?)
    } else if let Some(suffix) = host_text.strip_prefix("*.") {
        PatternHost::SubdomainsOf(parse_host_name(suffix).map_err(HostPatternReason::AfterWildcard)?)
    } else if host_text.contains('*') {
        return Err(HostPatternReason::MisplacedWildcard);
    } else {
        PatternHost::Exact(host_text.parse()?)
    };
    Ok(HostPattern { host, port })
}

/// `10.0.0.0/8` or `[fd00::/8]`: a dotted-quad or bracketed IPv6 address, then a prefix length
/// from 1 to the address's width, with no bits set after the prefix (so what is written is
/// what is matched).
fn parse_network(text: &str) -> Result<IpNet, HostPatternReason> {
    let bracketed = text.strip_prefix('[');
    let inner = match bracketed {
        Some(inner) => inner
            .strip_suffix(']')
            .ok_or_else(|| HostSyntaxError::UnclosedBracket { text: text.to_owned() })?,
        None => text,
    };
    let (address_text, prefix_text) = inner
        .split_once('/')
        .ok_or_else(|| HostPatternReason::NotANetworkAddress { text: text.to_owned() })?;
    let address = match bracketed {
        Some(_) => address_text
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| HostSyntaxError::NotAnIpv6Address {
                inner: address_text.to_owned(),
            })?,
        None => {
            address_text
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| HostPatternReason::NotANetworkAddress {
                    text: address_text.to_owned(),
                })?
        }
    };
    let max_prefix: u8 = if address.is_ipv4() { 32 } else { 128 };
    if prefix_text.is_empty() || !prefix_text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(HostPatternReason::PrefixNotANumber {
            text: prefix_text.to_owned(),
        });
    }
    // Digits too many for a u8 are certainly too long a prefix.
    let prefix = prefix_text.parse::<u8>().unwrap_or(u8::MAX);
    if prefix > max_prefix {
        return Err(HostPatternReason::PrefixTooLong {
            prefix: prefix_text.to_owned(),
            max_prefix,
        });
    }
    if prefix == 0 {
        return Err(HostPatternReason::WholeAddressSpace);
    }
    let network = IpNet::new(address, prefix).map_err(|_| HostPatternReason::PrefixTooLong {
        prefix: prefix_text.to_owned(),
        max_prefix,
    })?;
    if network.network() != address {
        return Err(HostPatternReason::BitsAfterPrefix {
            text: text.to_owned(),
            network: display_network(&network.trunc()),
        });
    }
    Ok(network)
}

fn display_network(network: &IpNet) -> String {
    match network {
        IpNet::V4(network) => network.to_string(),
        IpNet::V6(network) => format!("[{network}]"),
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PatternHost::Exact(host) => write!(formatter, "{host}")?,
            PatternHost::SubdomainsOf(suffix) => write!(formatter, "*.{suffix}")?,
            PatternHost::Network(network) => formatter.write_str(&display_network(network))?,
        }
        match self.port {
            Some(port) => write!(formatter, ":{port}"),
            None => Ok(()),
        }
    }
}

/// Why a name may not be reached through any address it resolved to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressRefusal {
    #[error("{name} resolves to no addresses")]
    NoAddresses { name: String },
    #[error(
        "{name} resolves to {address}, {why}; list the address or its network to allow it{}",
        others_note(*.others_refused)
    )]
    NotPublic {
        name: String,
        /// The first refused address, written as a pattern would name it.
        address: Host,
        why: NonPublicAddress,
        /// How many more addresses were refused.
        others_refused: usize,
    },
}

fn others_note(others_refused: usize) -> String {
    match others_refused {
        0 => String::new(),
        1 => " (1 more address was refused too)".to_owned(),
        count => format!(" ({count} more addresses were refused too)"),
    }
}

/// The address rule: of the addresses `name` resolved to, those that may be connected to on
/// `port`, in the resolver's order without repeats. A public address is kept (the name was
/// allowed); a non-public one only when one of `patterns` names it or its network for `port`.
/// The caller must connect to exactly these addresses, not resolve the name again: a second
/// answer could differ (DNS rebinding).
pub fn reachable_addresses(
    patterns: &[HostPattern],
    name: &str,
    port: u16,
    resolved: &[IpAddr],
) -> Result<Vec<IpAddr>, AddressRefusal> {
    let mut reachable: Vec<IpAddr> = Vec::new();
    let mut refused: Vec<(IpAddr, NonPublicAddress)> = Vec::new();
    for &ip in resolved {
        if reachable.contains(&ip) || refused.iter().any(|(refused_ip, _)| *refused_ip == ip) {
            continue;
        }
        match classify(ip) {
            None => reachable.push(ip),
            Some(_) if patterns.iter().any(|pattern| pattern.matches_host(&Host::Ip(ip), port)) => reachable.push(ip),
            Some(why) => refused.push((ip, why)),
        }
    }
    if !reachable.is_empty() {
        return Ok(reachable);
    }
    match refused.first() {
        None => Err(AddressRefusal::NoAddresses { name: name.to_owned() }),
        Some(&(ip, why)) => Err(AddressRefusal::NotPublic {
            name: name.to_owned(),
            address: Host::Ip(ip),
            why,
            others_refused: refused.len() - 1,
        }),
    }
}

#[cfg(test)]
mod tests;
