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
//! is only ever reached through the node's own lookup. Deciding is pure (pattern parsing,
//! [`EgressPolicy::allows`], request-head parsing) and tested without sockets; the tokio code
//! around it only moves bytes and enforces the [`EgressLimits`].

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Owner and group (the node and the machine's runtime) may connect; nobody else.
const SOCKET_MODE: u32 = 0o660;
/// Connections past `max_connections` still get a 503 so that clients see why, but only this
/// many at a time; beyond it they are closed without an answer.
const MAX_PENDING_REFUSALS: usize = 64;
/// How long a refused connection is kept open so the client can read the answer.
const REFUSAL_LINGER_TIMEOUT_MS: u64 = 1_000;
/// How much a refused client may still send (the rest of an oversized head, a body) before
/// the connection is closed; draining it avoids a reset that would discard the answer.
const MAX_REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
const REFUSAL_DRAIN_BUFFER_BYTES: usize = 4 * 1024;
const HEAD_READ_CHUNK_BYTES: usize = 4 * 1024;
const SPLICE_BUFFER_BYTES: usize = 16 * 1024;
/// Pause after a failed `accept` (typically out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;
/// The in-machine forwarder's own bound; the proxy behind it enforces the real limit.
const FORWARDER_MAX_CONNECTIONS: usize = 1024;
/// A head must at least fit a short request line such as `CONNECT host:443 HTTP/1.1`.
const MIN_REQUEST_HEAD_BYTES: usize = 64;
const MAX_HOST_NAME_BYTES: usize = 253;
const MAX_HOST_LABEL_BYTES: usize = 63;
const DEFAULT_HTTP_PORT: u16 = 80;

/// Errors at the boundary of the egress module.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid egress host pattern {pattern:?}: {reason}")]
    InvalidHostPattern { pattern: String, reason: String },
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

// ---------------------------------------------------------------------------------------------
// Hosts and patterns
// ---------------------------------------------------------------------------------------------

/// A destination host as the proxy understands it: a normalised DNS name (lowercase, no
/// trailing dot) or an IP address literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TargetHost {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for TargetHost {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetHost::Name(name) => formatter.write_str(name),
            TargetHost::Ip(IpAddr::V4(ip)) => write!(formatter, "{ip}"),
            TargetHost::Ip(IpAddr::V6(ip)) => write!(formatter, "[{ip}]"),
        }
    }
}

/// Parses a host: a dotted-quad IPv4 address, a bracketed IPv6 address, or a DNS name.
fn parse_host(text: &str) -> Result<TargetHost, String> {
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("{text:?} opens '[' but does not close it"))?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| TargetHost::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("{inner:?} is not an IPv6 address"));
    }
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Ok(TargetHost::Ip(IpAddr::V4(ip)));
    }
    parse_host_name(text).map(TargetHost::Name)
}

/// Validates and normalises a DNS name. The last label must start with a letter: resolvers
/// accept numeric shorthands such as `127.1` or `0x7f000001`, which would otherwise let an
/// address slip past patterns written for names or for the canonical address.
fn parse_host_name(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() {
        return Err("host is empty".to_owned());
    }
    if name.len() > MAX_HOST_NAME_BYTES {
        return Err(format!(
            "host name is {} bytes long, the limit is {MAX_HOST_NAME_BYTES}",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("host name {name:?} has an empty label"));
        }
        if label.len() > MAX_HOST_LABEL_BYTES {
            return Err(format!(
                "host name label {label:?} is {} bytes long, the limit is {MAX_HOST_LABEL_BYTES}",
                label.len()
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "host name {name:?} contains {bad:?}, which is not allowed in a DNS name"
            ));
        }
    }
    let last_label = name.rsplit('.').next().unwrap_or_default();
    if !last_label.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!(
            "host {name:?} is neither a dotted-quad IPv4 address nor a name whose last label starts with a letter"
        ));
    }
    Ok(name)
}

/// Splits `host[:port]`, where an IPv6 host is bracketed. The port is returned as text.
fn split_host_port(text: &str) -> Result<(&str, Option<&str>), String> {
    if text.starts_with('[') {
        let Some(close) = text.find(']') else {
            return Err(format!("{text:?} opens '[' but does not close it"));
        };
        let (host, rest) = text.split_at(close + 1);
        if rest.is_empty() {
            return Ok((host, None));
        }
        return match rest.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None => Err(format!("unexpected {rest:?} after the IPv6 address in {text:?}")),
        };
    }
    match text.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => {
            Err(format!("{text:?}: IPv6 addresses must be bracketed, as in [::1]:443"))
        }
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((text, None)),
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!("port {text:?} is not a number"));
    }
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("port {text} is not between 1 and 65535")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HostPatternKind {
    Exact(TargetHost),
    /// `*.example.com`: any name with at least one more label; not `example.com` itself.
    SubdomainsOf(String),
}

/// One allowlist entry: `example.com`, `*.example.com` (subdomains at any depth, not the apex),
/// `127.0.0.1`, `[::1]`, each optionally with `:port`. Without a port every port is allowed.
/// Names match case-insensitively and ignore a trailing dot. A wildcard never matches an IP
/// address, and an IP pattern matches only that address written canonically.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    host: HostPatternKind,
    port: Option<u16>,
}

impl HostPattern {
    /// Whether a request for `host:port` matches this pattern; an unparsable host matches nothing.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        parse_host(host).is_ok_and(|host| self.matches_target(&host, port))
    }

    fn matches_target(&self, host: &TargetHost, port: u16) -> bool {
        if self.port.is_some_and(|pattern_port| pattern_port != port) {
            return false;
        }
        match (&self.host, host) {
            (HostPatternKind::Exact(pattern_host), host) => pattern_host == host,
            (HostPatternKind::SubdomainsOf(suffix), TargetHost::Name(name)) => name
                .strip_suffix(suffix.as_str())
                .and_then(|prefix| prefix.strip_suffix('.'))
                .is_some_and(|subdomain| !subdomain.is_empty()),
            (HostPatternKind::SubdomainsOf(_), TargetHost::Ip(_)) => false,
        }
    }
}

impl FromStr for HostPattern {
    type Err = EgressError;

    fn from_str(text: &str) -> Result<Self, EgressError> {
        let invalid = |reason: String| EgressError::InvalidHostPattern {
            pattern: text.to_owned(),
            reason,
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(invalid("pattern is empty".to_owned()));
        }
        let (host_text, port_text) = split_host_port(trimmed).map_err(invalid)?;
        let port = port_text.map(parse_port).transpose().map_err(invalid)?;
        let host = if host_text == "*" {
            return Err(invalid(
                "a bare \"*\" would allow every host; list the hosts, or leave the allowlist unset".to_owned(),
            ));
        } else if let Some(suffix) = host_text.strip_prefix("*.") {
            HostPatternKind::SubdomainsOf(
                parse_host_name(suffix).map_err(|reason| invalid(format!("after \"*.\": {reason}")))?,
            )
        } else if host_text.contains('*') {
            return Err(invalid(
                "'*' is only allowed as the whole first label, as in *.example.com".to_owned(),
            ));
        } else {
            HostPatternKind::Exact(parse_host(host_text).map_err(invalid)?)
        };
        Ok(HostPattern { host, port })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPatternKind::Exact(host) => write!(formatter, "{host}")?,
            HostPatternKind::SubdomainsOf(suffix) => write!(formatter, "*.{suffix}")?,
        }
        match self.port {
            Some(port) => write!(formatter, ":{port}"),
            None => Ok(()),
        }
    }
}

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

    /// Whether `host:port` is on the allowlist; an unparsable host is never allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        parse_host(host).is_ok_and(|host| self.allows_target(&host, port))
    }

    fn allows_target(&self, host: &TargetHost, port: u16) -> bool {
        self.allowed_hosts
            .iter()
            .any(|pattern| pattern.matches_target(host, port))
    }
}

// ---------------------------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: TargetHost,
    port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RequestKind {
    /// `CONNECT`: answer 200 and splice.
    Tunnel,
    /// Absolute-URI request: send `origin_head` (origin-form, hop-by-hop headers removed,
    /// `Connection: close`) and then splice, so any body passes through untouched.
    Forward { origin_head: Vec<u8> },
}

#[derive(Debug, PartialEq, Eq)]
struct ProxyRequest {
    method: String,
    target: Target,
    kind: RequestKind,
}

/// Why a request head was refused with 400; the text goes into the response body.
#[derive(Debug, PartialEq, Eq)]
struct MalformedRequest(String);

impl From<String> for MalformedRequest {
    fn from(reason: String) -> Self {
        MalformedRequest(reason)
    }
}

/// Headers that describe one hop and are not passed to the origin. `Host` is replaced by the
/// authority of the request URI, as RFC 9112 asks of a proxy.
const HOP_BY_HOP_HEADERS: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "host",
];

fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Parses a complete request head (request line and headers, ending with the empty line).
fn parse_request_head(head: &[u8]) -> Result<ProxyRequest, MalformedRequest> {
    let text = std::str::from_utf8(head).map_err(|_| MalformedRequest("request head is not UTF-8".to_owned()))?;
    let text = text
        .strip_suffix("\r\n\r\n")
        .ok_or_else(|| MalformedRequest("request head does not end with an empty line".to_owned()))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, request_target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(request_target), Some(version), None) => (method, request_target, version),
        _ => {
            return Err(MalformedRequest(format!(
                "request line {request_line:?} is not \"METHOD target HTTP/1.1\""
            )))
        }
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(MalformedRequest(format!("method {method:?} is not a valid token")));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(MalformedRequest(format!(
            "HTTP version {version:?} is not supported, expected HTTP/1.1"
        )));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(MalformedRequest(
                "obsolete header line folding is not supported".to_owned(),
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| MalformedRequest(format!("header line {line:?} has no ':'")))?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(MalformedRequest(format!("header name {name:?} is not a valid token")));
        }
        if value.bytes().any(|byte| byte == b'\r' || byte == b'\n' || byte == 0) {
            return Err(MalformedRequest(format!(
                "header {name:?} contains a control character"
            )));
        }
        headers.push((name, value.trim_matches([' ', '\t'])));
    }

    if method == "CONNECT" {
        let (host_text, port_text) = split_host_port(request_target)?;
        let port_text =
            port_text.ok_or_else(|| MalformedRequest(format!("CONNECT target {request_target:?} has no port")))?;
        let target = Target {
            host: parse_host(host_text)?,
            port: parse_port(port_text)?,
        };
        return Ok(ProxyRequest {
            method: method.to_owned(),
            target,
            kind: RequestKind::Tunnel,
        });
    }

    let after_scheme = strip_prefix_ignore_ascii_case(request_target, "http://").ok_or_else(|| {
        if strip_prefix_ignore_ascii_case(request_target, "https://").is_some() {
            MalformedRequest(format!(
                "request target {request_target:?} is https; use CONNECT to tunnel TLS through this proxy"
            ))
        } else if request_target.starts_with('/') {
            MalformedRequest(format!(
                "request target {request_target:?} is not an absolute URI; this is an egress proxy, \
                 send \"GET http://host/path\" or CONNECT"
            ))
        } else {
            MalformedRequest(format!(
                "request target {request_target:?} is not an absolute http:// URI"
            ))
        }
    })?;
    let authority_end = after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
    let (authority, path_and_query) = after_scheme.split_at(authority_end);
    if authority.contains('@') {
        return Err(MalformedRequest(format!(
            "request target {request_target:?} carries user information, which is not supported"
        )));
    }
    let (host_text, port_text) = split_host_port(authority)?;
    let host = parse_host(host_text)?;
    let port = port_text.map(parse_port).transpose()?.unwrap_or(DEFAULT_HTTP_PORT);
    let path_and_query = path_and_query.split('#').next().unwrap_or_default();
    if path_and_query.bytes().any(|byte| byte <= b' ' || byte == 0x7f) {
        return Err(MalformedRequest(format!(
            "request target {request_target:?} contains a control character"
        )));
    }
    let origin_target = match path_and_query {
        "" => "/".to_owned(),
        query if query.starts_with('?') => format!("/{query}"),
        path => path.to_owned(),
    };
    let host_header = match port_text {
        Some(_) => format!("{host}:{port}"),
        None => host.to_string(),
    };

    let has_transfer_encoding = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding"));
    let content_lengths: Vec<&str> = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| *value)
        .collect();
    if has_transfer_encoding && !content_lengths.is_empty() {
        return Err(MalformedRequest(
            "request has both Transfer-Encoding and Content-Length".to_owned(),
        ));
    }
    if content_lengths.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err(MalformedRequest(
            "request has conflicting Content-Length headers".to_owned(),
        ));
    }

    let origin_head = build_origin_head(method, &origin_target, version, &host_header, &headers);
    Ok(ProxyRequest {
        method: method.to_owned(),
        target: Target { host, port },
        kind: RequestKind::Forward { origin_head },
    })
}

fn strip_prefix_ignore_ascii_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

fn build_origin_head(
    method: &str,
    origin_target: &str,
    version: &str,
    host_header: &str,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    // Headers named in `Connection` are hop-by-hop too, but the framing headers are kept
    // whatever it says: dropping them would let the body be read as a second request.
    let connection_options: Vec<String> = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(|option| option.trim().to_ascii_lowercase())
        .filter(|option| option != "content-length" && option != "transfer-encoding")
        .collect();
    let mut head = format!("{method} {origin_target} {version}\r\nHost: {host_header}\r\n");
    for (name, value) in headers {
        let lowercase_name = name.to_ascii_lowercase();
        if HOP_BY_HOP_HEADERS.contains(&lowercase_name.as_str()) || connection_options.contains(&lowercase_name) {
            continue;
        }
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    head.into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorStatus {
    BadRequest,
    Forbidden,
    RequestTimeout,
    HeadTooLarge,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
}

impl ErrorStatus {
    fn status_line(self) -> &'static str {
        match self {
            ErrorStatus::BadRequest => "400 Bad Request",
            ErrorStatus::Forbidden => "403 Forbidden",
            ErrorStatus::RequestTimeout => "408 Request Timeout",
            ErrorStatus::HeadTooLarge => "431 Request Header Fields Too Large",
            ErrorStatus::BadGateway => "502 Bad Gateway",
            ErrorStatus::ServiceUnavailable => "503 Service Unavailable",
            ErrorStatus::GatewayTimeout => "504 Gateway Timeout",
        }
    }
}

fn error_response(status: ErrorStatus, body: &str) -> Vec<u8> {
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        status.status_line(),
        body.len()
    )
    .into_bytes()
}

const TUNNEL_ESTABLISHED_RESPONSE: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

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
    fn validate(&self) -> Result<(), EgressError> {
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

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressStats {
    /// Requests whose host was on the allowlist (whether or not the origin then answered).
    pub allowed: u64,
    /// Requests refused because their host was not on the allowlist (403).
    pub refused: u64,
    /// Connections turned away before a policy decision: malformed (400), head too large (431)
    /// or too slow (408), or over `max_connections` (503).
    pub rejected: u64,
    /// Connections being served now, including those still sending their head.
    pub active: usize,
}

struct ProxyShared {
    policy: RwLock<Arc<EgressPolicy>>,
    limits: EgressLimits,
    connection_permits: Arc<Semaphore>,
    refusal_permits: Arc<Semaphore>,
    allowed: AtomicU64,
    refused: AtomicU64,
    rejected: AtomicU64,
}

impl ProxyShared {
    fn current_policy(&self) -> Arc<EgressPolicy> {
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

trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
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

async fn serve_connection(
    mut client: Box<dyn ClientStream>,
    client_label: String,
    shared: Arc<ProxyShared>,
    _permit: OwnedSemaphorePermit,
) {
    let limits = shared.limits;
    let head_deadline = Instant::now() + Duration::from_millis(limits.idle_timeout_ms);
    let reject = |reason: &str| {
        shared.rejected.fetch_add(1, Ordering::Relaxed);
        crate::metrics::record_egress_connection(crate::metrics::EgressOutcome::Rejected);
        tracing::info!(client = %client_label, verdict = "rejected", reason, "egress request rejected");
    };
    let (buffer, head_length) = match read_request_head(&mut client, limits.max_request_head_bytes, head_deadline).await
    {
        Ok(HeadRead::Complete { buffer, head_length }) => (buffer, head_length),
        Ok(HeadRead::TooLarge) => {
            reject("request head too large");
            let body = format!(
                "request head is larger than the limit of {} bytes",
                limits.max_request_head_bytes
            );
            respond_and_close(client, &error_response(ErrorStatus::HeadTooLarge, &body)).await;
            return;
        }
        Ok(HeadRead::TimedOut) => {
            reject("request head not received in time");
            let body = format!("request head was not received within {} ms", limits.idle_timeout_ms);
            respond_and_close(client, &error_response(ErrorStatus::RequestTimeout, &body)).await;
            return;
        }
        Ok(HeadRead::ClosedEarly) => {
            tracing::debug!(client = %client_label, "egress client closed before sending a request head");
            return;
        }
        Err(error) => {
            tracing::debug!(client = %client_label, %error, "egress client failed while sending a request head");
            return;
        }
    };
    let request = match parse_request_head(&buffer[..head_length]) {
        Ok(request) => request,
        Err(MalformedRequest(reason)) => {
            reject(&reason);
            let body = format!("malformed proxy request: {reason}");
            respond_and_close(client, &error_response(ErrorStatus::BadRequest, &body)).await;
            return;
        }
    };
    let early_bytes = &buffer[head_length..];
    let target = &request.target;

    if !shared.current_policy().allows_target(&target.host, target.port) {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        crate::metrics::record_egress_connection(crate::metrics::EgressOutcome::Refused);
        tracing::info!(
            client = %client_label,
            method = %request.method,
            host = %target.host,
            port = target.port,
            verdict = "refused",
            "egress request refused: host not on the allowlist"
        );
        let body = format!(
            "egress to {target} refused: {} is not on the allowlist of this machine",
            target.host
        );
        respond_and_close(client, &error_response(ErrorStatus::Forbidden, &body)).await;
        return;
    }
    shared.allowed.fetch_add(1, Ordering::Relaxed);
    crate::metrics::record_egress_connection(crate::metrics::EgressOutcome::Allowed);
    tracing::info!(
        client = %client_label,
        method = %request.method,
        host = %target.host,
        port = target.port,
        verdict = "allowed",
        "egress request allowed"
    );

    let connect_timeout = Duration::from_millis(limits.connect_timeout_ms);
    let mut origin = match connect_to_origin(target, connect_timeout).await {
        Ok(origin) => origin,
        Err(failure) => {
            let (status, body) = match &failure {
                OriginFailure::Unresolvable(error) => (
                    ErrorStatus::BadGateway,
                    format!("egress to {target} failed: could not resolve {}: {error}", target.host),
                ),
                OriginFailure::NoAddresses => (
                    ErrorStatus::BadGateway,
                    format!("egress to {target} failed: {} resolved to no addresses", target.host),
                ),
                OriginFailure::Unreachable(error) => (
                    ErrorStatus::BadGateway,
                    format!("egress to {target} failed: could not connect: {error}"),
                ),
                OriginFailure::TimedOut => (
                    ErrorStatus::GatewayTimeout,
                    format!(
                        "egress to {target} failed: no connection within {} ms",
                        limits.connect_timeout_ms
                    ),
                ),
            };
            tracing::info!(
                client = %client_label,
                host = %target.host,
                port = target.port,
                reason = %body,
                "egress origin unreachable"
            );
            respond_and_close(client, &error_response(status, &body)).await;
            return;
        }
    };

    let opening = async {
        match &request.kind {
            RequestKind::Tunnel => client.write_all(TUNNEL_ESTABLISHED_RESPONSE).await?,
            RequestKind::Forward { origin_head } => origin.write_all(origin_head).await?,
        }
        // Bytes the client sent right behind its head (a TLS ClientHello, a request body).
        origin.write_all(early_bytes).await
    };
    let result = match tokio::time::timeout(Duration::from_millis(limits.idle_timeout_ms), opening).await {
        Ok(Ok(())) => {
            let end = match request.kind {
                RequestKind::Tunnel => SpliceEnd::BothSidesFinished,
                RequestKind::Forward { .. } => SpliceEnd::OriginFinished,
            };
            splice_until_idle(client, origin, end, Duration::from_millis(limits.idle_timeout_ms)).await
        }
        Ok(Err(error)) => Err(error),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "idle while opening the connection",
        )),
    };
    let outcome = match result {
        Ok(()) => "finished".to_owned(),
        Err(error) => error.to_string(),
    };
    tracing::debug!(
        client = %client_label,
        host = %target.host,
        port = target.port,
        outcome,
        "egress connection ended"
    );
}

enum HeadRead {
    /// `buffer[..head_length]` is the head including its empty line; anything after it is the
    /// start of the body or tunnel data.
    Complete {
        buffer: Vec<u8>,
        head_length: usize,
    },
    TooLarge,
    TimedOut,
    ClosedEarly,
}

async fn read_request_head<R>(reader: &mut R, max_head_bytes: usize, deadline: Instant) -> io::Result<HeadRead>
where
    R: AsyncRead + Unpin + ?Sized,
{
    const TERMINATOR: &[u8] = b"\r\n\r\n";
    let mut buffer = Vec::with_capacity(max_head_bytes.min(HEAD_READ_CHUNK_BYTES));
    loop {
        let room = max_head_bytes - buffer.len();
        if room == 0 {
            return Ok(HeadRead::TooLarge);
        }
        let start = buffer.len();
        buffer.resize(start + room.min(HEAD_READ_CHUNK_BYTES), 0);
        let read = match tokio::time::timeout_at(deadline, reader.read(&mut buffer[start..])).await {
            Ok(read) => read?,
            Err(_) => return Ok(HeadRead::TimedOut),
        };
        buffer.truncate(start + read);
        if read == 0 {
            return Ok(HeadRead::ClosedEarly);
        }
        let search_from = start.saturating_sub(TERMINATOR.len() - 1);
        if let Some(position) = buffer[search_from..]
            .windows(TERMINATOR.len())
            .position(|window| window == TERMINATOR)
        {
            let head_length = search_from + position + TERMINATOR.len();
            return Ok(HeadRead::Complete { buffer, head_length });
        }
    }
}

/// Writes an error response, half-closes, and drains what the client still sends (bounded in
/// bytes and time) so that closing does not reset the connection before the client has read
/// the answer.
async fn respond_and_close<S>(mut client: S, response: &[u8])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let linger = async {
        client.write_all(response).await?;
        client.shutdown().await?;
        let mut sink = vec![0u8; REFUSAL_DRAIN_BUFFER_BYTES];
        let mut drained_bytes = 0;
        while drained_bytes < MAX_REFUSAL_DRAIN_BYTES {
            let read = client.read(&mut sink).await?;
            if read == 0 {
                break;
            }
            drained_bytes += read;
        }
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_LINGER_TIMEOUT_MS), linger).await;
}

#[derive(Debug)]
enum OriginFailure {
    Unresolvable(io::Error),
    NoAddresses,
    Unreachable(io::Error),
    TimedOut,
}

/// Resolves the host with the node's resolver and tries each address in turn, all within
/// `connect_timeout`.
async fn connect_to_origin(target: &Target, connect_timeout: Duration) -> Result<TcpStream, OriginFailure> {
    let attempt = async {
        let addresses: Vec<SocketAddr> = match &target.host {
            TargetHost::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            TargetHost::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(OriginFailure::Unresolvable)?
                .collect(),
        };
        let mut last_error = None;
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.map_or(OriginFailure::NoAddresses, OriginFailure::Unreachable))
    };
    tokio::time::timeout(connect_timeout, attempt)
        .await
        .unwrap_or(Err(OriginFailure::TimedOut))
}

/// When a spliced connection is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpliceEnd {
    /// Tunnels: both sides have finished; each end-of-stream is passed on as a half-close.
    BothSidesFinished,
    /// Forwards: the origin has sent its whole answer (it was asked for `Connection: close`);
    /// nothing the client sends after that can matter, so its slot is freed at once.
    OriginFinished,
}

/// Copies both ways until `end`; gives up when neither side has sent anything for `idle_timeout`.
async fn splice_until_idle<A, B>(client: A, origin: B, end: SpliceEnd, idle_timeout: Duration) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_reader, mut client_writer) = tokio::io::split(client);
    let (mut origin_reader, mut origin_writer) = tokio::io::split(origin);
    let started = Instant::now();
    let last_activity_ms = AtomicU64::new(0);
    let upstream = copy_recording_activity(&mut client_reader, &mut origin_writer, &last_activity_ms, started);
    let downstream = copy_recording_activity(&mut origin_reader, &mut client_writer, &last_activity_ms, started);
    let watchdog = async {
        loop {
            let idle_deadline =
                started + Duration::from_millis(last_activity_ms.load(Ordering::Relaxed)) + idle_timeout;
            if Instant::now() >= idle_deadline {
                return;
            }
            tokio::time::sleep_until(idle_deadline).await;
        }
    };
    let copied = async {
        match end {
            SpliceEnd::BothSidesFinished => tokio::try_join!(upstream, downstream).map(|_| ()),
            SpliceEnd::OriginFinished => {
                let upstream_then_wait = async {
                    upstream.await?;
                    std::future::pending().await
                };
                tokio::select! {
                    failed = upstream_then_wait => failed,
                    finished = downstream => finished,
                }
            }
        }
    };
    tokio::select! {
        copied = copied => copied,
        () = watchdog => Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle")),
    }
}

async fn copy_recording_activity<R, W>(
    reader: &mut R,
    writer: &mut W,
    last_activity_ms: &AtomicU64,
    started: Instant,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; SPLICE_BUFFER_BYTES];
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buffer[..read]).await?;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity_ms.fetch_max(elapsed_ms, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// The in-machine forwarder
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// Bound on every wait and every client read in these tests, so a failure reports instead of hanging.
    const TEST_DEADLINE: Duration = Duration::from_secs(10);
    const WAIT_POLL_INTERVAL_MS: u64 = 5;
    const ORIGIN_BODY: &str = "hello from origin";
    const LOOPBACK: &str = "127.0.0.1";

    fn loopback_any_port() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    fn test_limits() -> EgressLimits {
        EgressLimits {
            max_connections: 16,
            connect_timeout_ms: 5_000,
            idle_timeout_ms: 10_000,
            max_request_head_bytes: 8 * 1024,
        }
    }

    fn policy(patterns: &[&str]) -> EgressPolicy {
        EgressPolicy::from_patterns(patterns).expect("test patterns are valid")
    }

    fn pattern(text: &str) -> HostPattern {
        text.parse()
            .unwrap_or_else(|error| panic!("pattern {text:?} should parse: {error}"))
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + TEST_DEADLINE;
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "timed out after {TEST_DEADLINE:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(WAIT_POLL_INTERVAL_MS)).await;
        }
    }

    /// A loopback HTTP server that answers every request with a fixed response, counts the
    /// connections it accepts and records each request head it receives.
    struct TestOrigin {
        address: SocketAddr,
        accepts: Arc<AtomicUsize>,
        received_heads: Arc<Mutex<Vec<String>>>,
        task: JoinHandle<()>,
    }

    impl Drop for TestOrigin {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestOrigin {
        async fn start() -> TestOrigin {
            let listener = TcpListener::bind(loopback_any_port()).await.expect("bind test origin");
            let address = listener.local_addr().expect("test origin address");
            let accepts = Arc::new(AtomicUsize::new(0));
            let received_heads = Arc::new(Mutex::new(Vec::new()));
            let task = tokio::spawn({
                let accepts = accepts.clone();
                let received_heads = received_heads.clone();
                async move {
                    let mut handlers = JoinSet::new();
                    loop {
                        let Ok((mut stream, _)) = listener.accept().await else {
                            return;
                        };
                        accepts.fetch_add(1, Ordering::SeqCst);
                        let received_heads = received_heads.clone();
                        handlers.spawn(async move {
                            let deadline = Instant::now() + TEST_DEADLINE;
                            let Ok(HeadRead::Complete { buffer, head_length }) =
                                read_request_head(&mut stream, 64 * 1024, deadline).await
                            else {
                                return;
                            };
                            let head = String::from_utf8_lossy(&buffer[..head_length]).into_owned();
                            received_heads.lock().expect("origin heads lock").push(head);
                            let response = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ORIGIN_BODY}",
                                ORIGIN_BODY.len()
                            );
                            let _ = stream.write_all(response.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        });
                    }
                }
            });
            TestOrigin {
                address,
                accepts,
                received_heads,
                task,
            }
        }

        fn port(&self) -> u16 {
            self.address.port()
        }

        fn allow_pattern(&self) -> String {
            format!("{LOOPBACK}:{}", self.port())
        }

        fn accept_count(&self) -> usize {
            self.accepts.load(Ordering::SeqCst)
        }

        fn received_heads(&self) -> Vec<String> {
            self.received_heads.lock().expect("origin heads lock").clone()
        }
    }

    async fn connect(address: SocketAddr) -> TcpStream {
        tokio::time::timeout(TEST_DEADLINE, TcpStream::connect(address))
            .await
            .expect("connect within the deadline")
            .expect("connect")
    }

    async fn send(stream: &mut TcpStream, bytes: &str) {
        tokio::time::timeout(TEST_DEADLINE, stream.write_all(bytes.as_bytes()))
            .await
            .expect("write within the deadline")
            .expect("write");
    }

    async fn read_all(stream: &mut TcpStream) -> String {
        let mut received = Vec::new();
        tokio::time::timeout(TEST_DEADLINE, stream.read_to_end(&mut received))
            .await
            .expect("peer closes within the deadline")
            .expect("read");
        String::from_utf8_lossy(&received).into_owned()
    }

    /// Reads exactly one response head, leaving whatever follows (tunnel data) unread.
    async fn read_response_head(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let read = async {
            while !head.ends_with(b"\r\n\r\n") {
                let byte = stream
                    .read_u8()
                    .await
                    .expect("response head before the connection closed");
                head.push(byte);
            }
        };
        tokio::time::timeout(TEST_DEADLINE, read)
            .await
            .expect("response head within the deadline");
        String::from_utf8_lossy(&head).into_owned()
    }

    /// Opens a CONNECT tunnel to `target` and returns the stream after the proxy's answer head.
    async fn open_tunnel(proxy: SocketAddr, target: &str) -> (TcpStream, String) {
        let mut stream = connect(proxy).await;
        send(
            &mut stream,
            &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        )
        .await;
        let head = read_response_head(&mut stream).await;
        (stream, head)
    }

    /// Sends a request through an established tunnel and returns the origin's whole answer.
    async fn request_through_tunnel(mut tunnel: TcpStream) -> String {
        send(&mut tunnel, "GET /through-tunnel HTTP/1.1\r\nHost: origin\r\n\r\n").await;
        read_all(&mut tunnel).await
    }

    fn assert_status(response: &str, status_line: &str) {
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status_line}\r\n")),
            "expected {status_line}, got {response:?}"
        );
    }

    // --- patterns and policy ---

    #[test]
    fn host_patterns_parse_names_wildcards_addresses_and_ports() {
        assert_eq!(pattern("example.com").to_string(), "example.com");
        assert_eq!(pattern("Example.COM.").to_string(), "example.com");
        assert_eq!(pattern("*.example.com").to_string(), "*.example.com");
        assert_eq!(pattern("*.example.com:443").to_string(), "*.example.com:443");
        assert_eq!(pattern("127.0.0.1:8080").to_string(), "127.0.0.1:8080");
        assert_eq!(pattern("[::1]:443").to_string(), "[::1]:443");
        assert_eq!(pattern("[0:0::1]").to_string(), "[::1]");
        assert_eq!(pattern(" registry.npmjs.org ").to_string(), "registry.npmjs.org");
    }

    #[test]
    fn bad_host_patterns_are_refused_with_an_error_naming_them() {
        let bad_patterns = [
            "",
            "*",
            "*:443",
            "foo*.example.com",
            "example.*.com",
            "*.*.example.com",
            "example.com:0",
            "example.com:65536",
            "example.com:http",
            "example.com:",
            "exa mple.com",
            "example..com",
            "http://example.com",
            "example.com/path",
            "::1",
            "[::1",
            "[not-ipv6]:80",
            "127.1",
            "0x7f000001",
            "*.0.1",
            "ex@mple.com",
        ];
        for bad_pattern in bad_patterns {
            let error = bad_pattern
                .parse::<HostPattern>()
                .expect_err(&format!("pattern {bad_pattern:?} should be refused"));
            let message = error.to_string();
            assert!(
                message.contains(&format!("{bad_pattern:?}")),
                "error for {bad_pattern:?} should name it: {message}"
            );
        }
        let error = EgressPolicy::from_patterns(["example.com", "bad pattern"]).expect_err("second pattern is bad");
        assert!(error.to_string().contains("\"bad pattern\""), "{error}");
    }

    #[test]
    fn wildcard_matches_subdomains_at_any_depth_but_not_the_apex() {
        let wildcard = pattern("*.example.com");
        assert!(wildcard.matches("api.example.com", 443));
        assert!(wildcard.matches("a.b.example.com", 80));
        assert!(wildcard.matches("API.Example.Com.", 443));
        assert!(!wildcard.matches("example.com", 443));
        assert!(!wildcard.matches("badexample.com", 443));
        assert!(!wildcard.matches("example.com.evil.org", 443));
        assert!(!wildcard.matches("example.org", 443));
    }

    #[test]
    fn a_port_in_the_pattern_restricts_the_port_and_its_absence_allows_any() {
        let with_port = pattern("example.com:443");
        assert!(with_port.matches("example.com", 443));
        assert!(!with_port.matches("example.com", 22));
        let without_port = pattern("example.com");
        assert!(without_port.matches("example.com", 443));
        assert!(without_port.matches("example.com", 22));
        let wildcard_with_port = pattern("*.example.com:8443");
        assert!(wildcard_with_port.matches("api.example.com", 8443));
        assert!(!wildcard_with_port.matches("api.example.com", 443));
    }

    #[test]
    fn addresses_match_only_exact_address_patterns() {
        let allowlist = policy(&["127.0.0.1:8080", "[::1]", "*.example.com"]);
        assert!(allowlist.allows("127.0.0.1", 8080));
        assert!(!allowlist.allows("127.0.0.1", 8081));
        assert!(!allowlist.allows("127.0.0.2", 8080));
        assert!(allowlist.allows("[::1]", 1));
        assert!(allowlist.allows("[0::1]", 1));
        // Numeric shorthands a resolver would accept are not hosts at all.
        assert!(!allowlist.allows("127.1", 8080));
        assert!(!allowlist.allows("2130706433", 8080));
        assert!(!allowlist.allows("0x7f.example.com.0x1", 8080));
        assert!(!EgressPolicy::default().allows("example.com", 443));
    }

    // --- request heads ---

    #[test]
    fn connect_heads_parse_to_tunnels() {
        let request = parse_request_head(b"CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .expect("valid CONNECT");
        assert_eq!(request.kind, RequestKind::Tunnel);
        assert_eq!(request.target.to_string(), "example.com:443");
        let ipv6 = parse_request_head(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").expect("valid CONNECT to IPv6");
        assert_eq!(ipv6.target.to_string(), "[::1]:8443");
    }

    #[test]
    fn absolute_uri_heads_are_rewritten_for_the_origin() {
        let head = "GET http://Example.com:8080/path?q=1#fragment HTTP/1.1\r\n\
                    Host: wrong.example\r\n\
                    User-Agent: test\r\n\
                    Proxy-Connection: keep-alive\r\n\
                    Proxy-Authorization: Basic secret\r\n\
                    Connection: keep-alive, X-Hop\r\n\
                    X-Hop: dropped\r\n\
                    Accept: */*\r\n\r\n";
        let request = parse_request_head(head.as_bytes()).expect("valid absolute-URI request");
        assert_eq!(request.method, "GET");
        assert_eq!(request.target.to_string(), "example.com:8080");
        let RequestKind::Forward { origin_head } = request.kind else {
            panic!("expected a forward, got {:?}", request.kind)
        };
        assert_eq!(
            String::from_utf8(origin_head).expect("utf-8 head"),
            "GET /path?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: test\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n"
        );

        let default_port = parse_request_head(b"POST http://example.com?x HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            .expect("valid request without path");
        assert_eq!(default_port.target.to_string(), "example.com:80");
        let RequestKind::Forward { origin_head } = default_port.kind else {
            panic!("expected a forward")
        };
        assert_eq!(
            String::from_utf8(origin_head).expect("utf-8 head"),
            "POST /?x HTTP/1.0\r\nHost: example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn malformed_heads_are_refused_with_a_reason() {
        let cases: [(&str, &str); 14] = [
            ("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "not an absolute URI"),
            ("GET https://example.com/ HTTP/1.1\r\n\r\n", "use CONNECT"),
            ("GET ftp://example.com/ HTTP/1.1\r\n\r\n", "not an absolute http:// URI"),
            ("GET http://user@example.com/ HTTP/1.1\r\n\r\n", "user information"),
            ("CONNECT example.com HTTP/1.1\r\n\r\n", "has no port"),
            ("CONNECT example.com:0 HTTP/1.1\r\n\r\n", "between 1 and 65535"),
            ("CONNECT 127.1:80 HTTP/1.1\r\n\r\n", "neither a dotted-quad"),
            ("GET http://example.com/ HTTP/2.0\r\n\r\n", "HTTP version"),
            ("GET  http://example.com/ HTTP/1.1\r\n\r\n", "request line"),
            (
                "GET http://example.com/ HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
                "folding",
            ),
            ("GET http://example.com/ HTTP/1.1\r\nX-A 1\r\n\r\n", "has no ':'"),
            (
                "GET http://example.com/ HTTP/1.1\r\nBad Name: 1\r\n\r\n",
                "not a valid token",
            ),
            (
                "POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both Transfer-Encoding and Content-Length",
            ),
            (
                "POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                "conflicting Content-Length",
            ),
        ];
        for (head, expected_reason) in cases {
            let MalformedRequest(reason) =
                parse_request_head(head.as_bytes()).expect_err(&format!("head {head:?} should be refused"));
            assert!(
                reason.contains(expected_reason),
                "head {head:?}: reason {reason:?} should mention {expected_reason:?}"
            );
        }
    }

    #[test]
    fn limits_are_validated() {
        let invalid_limits = [
            EgressLimits {
                max_connections: 0,
                ..test_limits()
            },
            EgressLimits {
                connect_timeout_ms: 0,
                ..test_limits()
            },
            EgressLimits {
                idle_timeout_ms: 0,
                ..test_limits()
            },
            EgressLimits {
                max_request_head_bytes: 10,
                ..test_limits()
            },
        ];
        for limits in invalid_limits {
            assert!(limits.validate().is_err(), "{limits:?} should be refused");
        }
        EgressLimits::default().validate().expect("default limits are valid");
    }

    // --- the proxy on loopback ---

    #[tokio::test]
    async fn allowed_connect_tunnels_to_the_origin() {
        let origin = TestOrigin::start().await;
        let (proxy, proxy_address) =
            EgressProxy::serve_tcp(loopback_any_port(), policy(&[&origin.allow_pattern()]), test_limits())
                .await
                .expect("serve proxy");
        let (tunnel, head) = open_tunnel(proxy_address, &origin.allow_pattern()).await;
        assert_status(&head, "200 Connection Established");
        let response = request_through_tunnel(tunnel).await;
        assert_status(&response, "200 OK");
        assert!(response.ends_with(ORIGIN_BODY), "{response:?}");
        assert_eq!(origin.accept_count(), 1);
        assert!(origin.received_heads()[0].starts_with("GET /through-tunnel HTTP/1.1\r\n"));
        let stats = proxy.stats();
        assert_eq!((stats.allowed, stats.refused, stats.rejected), (1, 0, 0));
    }

    #[tokio::test]
    async fn connect_to_a_host_not_on_the_allowlist_gets_403_and_no_connection() {
        let allowed_origin = TestOrigin::start().await;
        let unlisted_origin = TestOrigin::start().await;
        let (proxy, proxy_address) = EgressProxy::serve_tcp(
            loopback_any_port(),
            policy(&[&allowed_origin.allow_pattern()]),
            test_limits(),
        )
        .await
        .expect("serve proxy");
        let unlisted_target = unlisted_origin.allow_pattern();
        let mut client = connect(proxy_address).await;
        send(&mut client, &format!("CONNECT {unlisted_target} HTTP/1.1\r\n\r\n")).await;
        let response = read_all(&mut client).await;
        assert_status(&response, "403 Forbidden");
        assert!(response.contains(&unlisted_target), "{response:?}");
        assert!(response.contains("is not on the allowlist"), "{response:?}");
        assert_eq!(
            unlisted_origin.accept_count(),
            0,
            "the proxy must not connect to a refused host"
        );
        assert_eq!(proxy.stats().refused, 1);
        assert_eq!(proxy.stats().allowed, 0);
    }

    #[tokio::test]
    async fn allowed_absolute_uri_request_is_forwarded_with_connection_close() {
        let origin = TestOrigin::start().await;
        let (proxy, proxy_address) =
            EgressProxy::serve_tcp(loopback_any_port(), policy(&[&origin.allow_pattern()]), test_limits())
                .await
                .expect("serve proxy");
        let authority = origin.allow_pattern();
        let mut client = connect(proxy_address).await;
        send(
            &mut client,
            &format!(
                "GET http://{authority}/hello?x=1 HTTP/1.1\r\nHost: {authority}\r\nProxy-Connection: keep-alive\r\n\r\n"
            ),
        )
        .await;
        let response = read_response_head(&mut client).await;
        assert_status(&response, "200 OK");
        let mut body = vec![0u8; ORIGIN_BODY.len()];
        tokio::time::timeout(TEST_DEADLINE, client.read_exact(&mut body))
            .await
            .expect("body within the deadline")
            .expect("read body");
        assert_eq!(body, ORIGIN_BODY.as_bytes());
        // The client keeps its side open; the proxy frees the slot once the origin has answered.
        wait_until("the forwarded connection to be released", || proxy.stats().active == 0).await;
        assert_eq!(read_all(&mut client).await, "");
        let received = origin.received_heads();
        assert_eq!(received.len(), 1);
        assert_eq!(
            received[0],
            format!("GET /hello?x=1 HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
        );
        assert_eq!(proxy.stats().allowed, 1);
    }

    #[tokio::test]
    async fn refused_absolute_uri_request_gets_403_and_no_connection() {
        let allowed_origin = TestOrigin::start().await;
        let unlisted_origin = TestOrigin::start().await;
        let (proxy, proxy_address) = EgressProxy::serve_tcp(
            loopback_any_port(),
            policy(&[&allowed_origin.allow_pattern()]),
            test_limits(),
        )
        .await
        .expect("serve proxy");
        let mut client = connect(proxy_address).await;
        send(
            &mut client,
            &format!("GET http://{}/ HTTP/1.1\r\n\r\n", unlisted_origin.allow_pattern()),
        )
        .await;
        let response = read_all(&mut client).await;
        assert_status(&response, "403 Forbidden");
        assert!(response.contains(&unlisted_origin.allow_pattern()), "{response:?}");
        assert_eq!(unlisted_origin.accept_count(), 0);
        assert_eq!(proxy.stats().refused, 1);
    }

    #[tokio::test]
    async fn malformed_request_gets_400() {
        let (proxy, proxy_address) =
            EgressProxy::serve_tcp(loopback_any_port(), policy(&["example.com"]), test_limits())
                .await
                .expect("serve proxy");
        let mut client = connect(proxy_address).await;
        send(&mut client, "GET /not-absolute HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
        let response = read_all(&mut client).await;
        assert_status(&response, "400 Bad Request");
        assert!(response.contains("not an absolute URI"), "{response:?}");
        assert_eq!(proxy.stats().rejected, 1);
    }

    #[tokio::test]
    async fn unreachable_allowed_origin_gets_502() {
        // A loopback port that was free a moment ago, so nothing accepts on it.
        let closed_port = {
            let listener = TcpListener::bind(loopback_any_port()).await.expect("bind");
            listener.local_addr().expect("address").port()
        };
        let target = format!("{LOOPBACK}:{closed_port}");
        let (_proxy, proxy_address) = EgressProxy::serve_tcp(loopback_any_port(), policy(&[&target]), test_limits())
            .await
            .expect("serve proxy");
        let mut client = connect(proxy_address).await;
        send(&mut client, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
        let response = read_all(&mut client).await;
        assert_status(&response, "502 Bad Gateway");
        assert!(response.contains("could not connect"), "{response:?}");
    }

    #[tokio::test]
    async fn connections_over_the_limit_get_503() {
        let origin = TestOrigin::start().await;
        let limits = EgressLimits {
            max_connections: 1,
            ..test_limits()
        };
        let (proxy, proxy_address) =
            EgressProxy::serve_tcp(loopback_any_port(), policy(&[&origin.allow_pattern()]), limits)
                .await
                .expect("serve proxy");
        // The first client holds the only slot while it has not sent its head.
        let holder = connect(proxy_address).await;
        wait_until("the first connection to occupy the only slot", || {
            proxy.stats().active == 1
        })
        .await;

        let mut extra = connect(proxy_address).await;
        let response = read_all(&mut extra).await;
        assert_status(&response, "503 Service Unavailable");
        assert!(response.contains("limit of 1 connections"), "{response:?}");
        assert_eq!(proxy.stats().rejected, 1);

        drop(holder);
        wait_until("the slot to be released", || proxy.stats().active == 0).await;
        let (tunnel, head) = open_tunnel(proxy_address, &origin.allow_pattern()).await;
        assert_status(&head, "200 Connection Established");
        assert!(request_through_tunnel(tunnel).await.ends_with(ORIGIN_BODY));
    }

    #[tokio::test]
    async fn request_head_over_the_limit_gets_431() {
        let origin = TestOrigin::start().await;
        let limits = EgressLimits {
            max_request_head_bytes: 256,
            ..test_limits()
        };
        let (proxy, proxy_address) =
            EgressProxy::serve_tcp(loopback_any_port(), policy(&[&origin.allow_pattern()]), limits)
                .await
                .expect("serve proxy");
        let mut client = connect(proxy_address).await;
        let padding = "a".repeat(2_000);
        send(
            &mut client,
            &format!(
                "GET http://{}/ HTTP/1.1\r\nX-Padding: {padding}\r\n\r\n",
                origin.allow_pattern()
            ),
        )
        .await;
        let response = read_all(&mut client).await;
        assert_status(&response, "431 Request Header Fields Too Large");
        assert!(response.contains("256 bytes"), "{response:?}");
        assert_eq!(origin.accept_count(), 0);
        assert_eq!(proxy.stats().rejected, 1);
    }

    #[tokio::test]
    async fn slow_request_head_gets_408_and_idle_tunnel_is_closed() {
        let origin = TestOrigin::start().await;
        let limits = EgressLimits {
            idle_timeout_ms: 200,
            ..test_limits()
        };
        let (_proxy, proxy_address) =
            EgressProxy::serve_tcp(loopback_any_port(), policy(&[&origin.allow_pattern()]), limits)
                .await
                .expect("serve proxy");
        let mut silent_client = connect(proxy_address).await;
        send(&mut silent_client, "CONNECT ").await;
        assert_status(&read_all(&mut silent_client).await, "408 Request Timeout");

        let (mut idle_tunnel, head) = open_tunnel(proxy_address, &origin.allow_pattern()).await;
        assert_status(&head, "200 Connection Established");
        assert_eq!(
            read_all(&mut idle_tunnel).await,
            "",
            "an idle tunnel is closed without data"
        );
    }

    #[tokio::test]
    async fn policy_swap_applies_to_new_connections_only() {
        let first_origin = TestOrigin::start().await;
        let second_origin = TestOrigin::start().await;
        let (proxy, proxy_address) = EgressProxy::serve_tcp(
            loopback_any_port(),
            policy(&[&first_origin.allow_pattern()]),
            test_limits(),
        )
        .await
        .expect("serve proxy");

        let (established_tunnel, head) = open_tunnel(proxy_address, &first_origin.allow_pattern()).await;
        assert_status(&head, "200 Connection Established");
        let (_, head) = open_tunnel(proxy_address, &second_origin.allow_pattern()).await;
        assert_status(&head, "403 Forbidden");

        proxy.set_policy(policy(&[&second_origin.allow_pattern()]));

        let (new_tunnel, head) = open_tunnel(proxy_address, &second_origin.allow_pattern()).await;
        assert_status(&head, "200 Connection Established");
        assert!(request_through_tunnel(new_tunnel).await.ends_with(ORIGIN_BODY));
        let (_, head) = open_tunnel(proxy_address, &first_origin.allow_pattern()).await;
        assert_status(&head, "403 Forbidden");
        // The tunnel opened under the old policy keeps working.
        assert!(request_through_tunnel(established_tunnel).await.ends_with(ORIGIN_BODY));
        assert_eq!(first_origin.accept_count(), 1);
        assert_eq!(second_origin.accept_count(), 1);
        let stats = proxy.stats();
        assert_eq!((stats.allowed, stats.refused), (2, 2));
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_tunnels() {
        let origin = TestOrigin::start().await;
        let (proxy, proxy_address) =
            EgressProxy::serve_tcp(loopback_any_port(), policy(&[&origin.allow_pattern()]), test_limits())
                .await
                .expect("serve proxy");
        let (mut tunnel, head) = open_tunnel(proxy_address, &origin.allow_pattern()).await;
        assert_status(&head, "200 Connection Established");
        drop(proxy);
        assert_eq!(read_all(&mut tunnel).await, "");
    }

    #[tokio::test]
    async fn forwarder_and_unix_socket_proxy_reach_the_origin_end_to_end() {
        let origin = TestOrigin::start().await;
        let socket_directory = tempfile::tempdir().expect("temporary directory");
        let socket_path = socket_directory.path().join("egress.sock");
        let proxy = EgressProxy::serve_unix(&socket_path, policy(&[&origin.allow_pattern()]), test_limits())
            .await
            .expect("serve proxy on unix socket");
        let mode = std::fs::metadata(&socket_path)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);

        let forwarder_listener = TcpListener::bind(loopback_any_port()).await.expect("bind forwarder");
        let forwarder_address = forwarder_listener.local_addr().expect("forwarder address");
        let forwarder = tokio::spawn(forward_tcp_listener_to_unix(forwarder_listener, socket_path.clone()));

        let (tunnel, head) = open_tunnel(forwarder_address, &origin.allow_pattern()).await;
        assert_status(&head, "200 Connection Established");
        assert!(request_through_tunnel(tunnel).await.ends_with(ORIGIN_BODY));

        let mut client = connect(forwarder_address).await;
        send(
            &mut client,
            &format!("GET http://{}/plain HTTP/1.1\r\n\r\n", origin.allow_pattern()),
        )
        .await;
        assert!(read_all(&mut client).await.ends_with(ORIGIN_BODY));

        let mut refused_client = connect(forwarder_address).await;
        send(&mut refused_client, "CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n").await;
        assert_status(&read_all(&mut refused_client).await, "403 Forbidden");
        assert_eq!(origin.accept_count(), 2);
        let stats = proxy.stats();
        assert_eq!((stats.allowed, stats.refused), (2, 1));

        drop(proxy);
        assert!(!socket_path.exists(), "dropping the proxy removes its socket");
        let mut orphaned_client = connect(forwarder_address).await;
        send(
            &mut orphaned_client,
            &format!("CONNECT {} HTTP/1.1\r\n\r\n", origin.allow_pattern()),
        )
        .await;
        let response = read_all(&mut orphaned_client).await;
        assert_status(&response, "502 Bad Gateway");
        assert!(response.contains("egress proxy unavailable"), "{response:?}");
        forwarder.abort();
    }

    #[tokio::test]
    async fn serve_unix_replaces_a_stale_socket_but_not_a_live_one() {
        let socket_directory = tempfile::tempdir().expect("temporary directory");
        let socket_path = socket_directory.path().join("egress.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket_path).expect("bind stale socket"));
        assert!(socket_path.exists());
        let proxy = EgressProxy::serve_unix(&socket_path, EgressPolicy::default(), test_limits())
            .await
            .expect("a stale socket is replaced");
        let error = EgressProxy::serve_unix(&socket_path, EgressPolicy::default(), test_limits())
            .await
            .expect_err("a live socket is not replaced");
        assert!(matches!(error, EgressError::SocketInUse { .. }), "{error}");
        drop(proxy);

        let regular_file = socket_directory.path().join("not-a-socket");
        std::fs::write(&regular_file, b"").expect("write file");
        let error = EgressProxy::serve_unix(&regular_file, EgressPolicy::default(), test_limits())
            .await
            .expect_err("a regular file is not replaced");
        assert!(matches!(error, EgressError::NotASocket { .. }), "{error}");
    }
}
