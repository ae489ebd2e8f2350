//! Host patterns: how an egress allowlist, a plugin's granted hosts and the node's config name
//! the hosts something may reach. Parsed by one function so that every place agrees on the
//! same syntax and the same port rule.
//!
//! A pattern is `example.com`, `*.example.com` (subdomains at any depth, not the apex),
//! `127.0.0.1` or `[::1]`, each optionally followed by `:port`. Names match case-insensitively
//! and ignore a trailing dot. A wildcard never matches an IP address, and an IP pattern matches
//! only that address (compared as an address, so `[0::1]` and `[::1]` are the same).
//!
//! The port rule, written once in [`HostPattern::matches_host_on_default_port`]: a pattern with
//! `:port` admits only that port; a pattern without one admits the caller's default port when
//! the caller has one, and every port when it has none. The egress proxy has no default (an
//! allowlisted host is reachable on any port); a plugin's `http.send` passes the default port
//! of the URL's scheme, so a grant without a port admits only 443 for https and 80 for http.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

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

    /// Whether `host:port` matches, a pattern without a port admitting every port (the egress
    /// proxy's reading). An unparsable host matches nothing.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        host.parse()
            .is_ok_and(|host| self.matches_host_on_default_port(&host, port, None))
    }

    /// [`HostPattern::matches`] for a host already parsed.
    pub fn matches_host(&self, host: &Host, port: u16) -> bool {
        self.matches_host_on_default_port(host, port, None)
    }

    /// The one port rule: the pattern admits its written port, or else `default_port`, or with
    /// neither every port.
    pub fn matches_host_on_default_port(&self, host: &Host, port: u16, default_port: Option<u16>) -> bool {
        if self
            .port
            .or(default_port)
            .is_some_and(|admitted_port| admitted_port != port)
        {
            return false;
        }
        match (&self.host, host) {
            (PatternHost::Exact(pattern_host), host) => pattern_host == host,
            (PatternHost::SubdomainsOf(suffix), Host::Name(name)) => name
                .strip_suffix(suffix.as_str())
                .and_then(|prefix| prefix.strip_suffix('.'))
                .is_some_and(|subdomain| !subdomain.is_empty()),
            (PatternHost::SubdomainsOf(_), Host::Ip(_)) => false,
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
    } else if let Some(suffix) = host_text.strip_prefix("*.") {
        PatternHost::SubdomainsOf(parse_host_name(suffix).map_err(HostPatternReason::AfterWildcard)?)
    } else if host_text.contains('*') {
        return Err(HostPatternReason::MisplacedWildcard);
    } else {
        PatternHost::Exact(host_text.parse()?)
    };
    Ok(HostPattern { host, port })
}

impl fmt::Display for HostPattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PatternHost::Exact(host) => write!(formatter, "{host}")?,
            PatternHost::SubdomainsOf(suffix) => write!(formatter, "*.{suffix}")?,
        }
        match self.port {
            Some(port) => write!(formatter, ":{port}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
