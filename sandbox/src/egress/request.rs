//! HTTP/1.1 as the proxy speaks it: parsing a request head into a [`ProxyRequest`], rewriting
//! an absolute-URI request for the origin, and the proxy's own short answers. Pure: tested
//! without sockets.

use std::fmt;

use flotilla_state::host_pattern::{parse_port, split_host_port, Host, HostSyntaxError};

const DEFAULT_HTTP_PORT: u16 = 80;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) host: Host,
    pub(super) port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum RequestKind {
    /// `CONNECT`: answer 200 and splice.
    Tunnel,
    /// Absolute-URI request: send `origin_head` (origin-form, hop-by-hop headers removed,
    /// `Connection: close`) and then splice, so any body passes through untouched.
    Forward { origin_head: Vec<u8> },
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct ProxyRequest {
    pub(super) method: String,
    pub(super) target: Target,
    pub(super) kind: RequestKind,
}

/// Why a request head was refused with 400; the text goes into the response body.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct MalformedRequest(pub(super) String);

impl From<HostSyntaxError> for MalformedRequest {
    fn from(error: HostSyntaxError) -> Self {
        MalformedRequest(error.to_string())
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
pub(super) fn parse_request_head(head: &[u8]) -> Result<ProxyRequest, MalformedRequest> {
    let text = std::str::from_utf8(head).map_err(|_| MalformedRequest("request head is not UTF-8".to_owned()))?;
    let text = text
        .strip_suffix("\r\n\r\n")
        .ok_or_else(|| MalformedRequest("request head does not end with an empty line".to_owned()))?;
    let mut lines = text.split("\r\n");
    let request_line = parse_request_line(lines.next().unwrap_or_default())?;
    let headers = parse_headers(lines)?;
    if request_line.method == "CONNECT" {
        return parse_connect_request(&request_line);
    }
    parse_absolute_uri_request(&request_line, &headers)
}

/// `METHOD target HTTP/1.x`, split and checked.
struct RequestLine<'head> {
    method: &'head str,
    request_target: &'head str,
    version: &'head str,
}

fn parse_request_line(request_line: &str) -> Result<RequestLine<'_>, MalformedRequest> {
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
    Ok(RequestLine {
        method,
        request_target,
        version,
    })
}

/// Header lines as `(name, value)`, the value trimmed of surrounding blanks.
fn parse_headers<'head>(
    lines: impl Iterator<Item = &'head str>,
) -> Result<Vec<(&'head str, &'head str)>, MalformedRequest> {
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
    Ok(headers)
}

fn parse_connect_request(request_line: &RequestLine<'_>) -> Result<ProxyRequest, MalformedRequest> {
    let request_target = request_line.request_target;
    let (host_text, port_text) = split_host_port(request_target)?;
    let port_text =
        port_text.ok_or_else(|| MalformedRequest(format!("CONNECT target {request_target:?} has no port")))?;
    let target = Target {
        host: host_text.parse()?,
        port: parse_port(port_text)?,
    };
    Ok(ProxyRequest {
        method: request_line.method.to_owned(),
        target,
        kind: RequestKind::Tunnel,
    })
}

/// `GET http://host[:port]/path`: the target from the URI, and the head to send the origin.
fn parse_absolute_uri_request(
    request_line: &RequestLine<'_>,
    headers: &[(&str, &str)],
) -> Result<ProxyRequest, MalformedRequest> {
    let request_target = request_line.request_target;
    let after_scheme = strip_http_scheme(request_target)?;
    let authority_end = after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
    let (authority, path_and_query) = after_scheme.split_at(authority_end);
    if authority.contains('@') {
        return Err(MalformedRequest(format!(
            "request target {request_target:?} carries user information, which is not supported"
        )));
    }
    let (host_text, port_text) = split_host_port(authority)?;
    let host: Host = host_text.parse()?;
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
    check_body_framing(headers)?;
    let origin_head = build_origin_head(
        request_line.method,
        &origin_target,
        request_line.version,
        &host_header,
        headers,
    );
    Ok(ProxyRequest {
        method: request_line.method.to_owned(),
        target: Target { host, port },
        kind: RequestKind::Forward { origin_head },
    })
}

/// The request target after `http://`, or why it is not an absolute http URI.
fn strip_http_scheme(request_target: &str) -> Result<&str, MalformedRequest> {
    strip_prefix_ignore_ascii_case(request_target, "http://").ok_or_else(|| {
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
    })
}

/// Refuses heads whose body length is ambiguous: the origin and the proxy could read the body
/// differently, and the rest would pass as a second, unchecked request.
fn check_body_framing(headers: &[(&str, &str)]) -> Result<(), MalformedRequest> {
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
    Ok(())
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
pub(super) enum ErrorStatus {
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

pub(super) fn error_response(status: ErrorStatus, body: &str) -> Vec<u8> {
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        status.status_line(),
        body.len()
    )
    .into_bytes()
}

pub(super) const TUNNEL_ESTABLISHED_RESPONSE: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";
