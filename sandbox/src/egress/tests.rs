use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::connection::{read_request_head, HeadRead};
use super::request::{parse_request_head, MalformedRequest, RequestKind};
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

// The pattern syntax and the port rule are tested with `flotilla_state::host_pattern`; here,
// how the policy uses them.

#[test]
fn bad_host_patterns_are_refused_with_an_error_naming_them() {
    let error = EgressPolicy::from_patterns(["example.com", "bad pattern"]).expect_err("second pattern is bad");
    let message = error.to_string();
    assert!(
        message.starts_with("invalid egress host pattern \"bad pattern\": "),
        "{message}"
    );
    for bad_pattern in ["", "*", "127.1", "example.com:0"] {
        let error = EgressPolicy::from_patterns([bad_pattern]).expect_err(bad_pattern);
        assert!(error.to_string().contains(&format!("{bad_pattern:?}")), "{error}");
    }
}

#[test]
fn a_pattern_without_a_port_allows_443_only() {
    let allowlist = policy(&["example.com", "plain.example.com:80", "*.example.org:8443"]);
    assert!(allowlist.allows("example.com", 443));
    assert!(!allowlist.allows("example.com", 80));
    assert!(!allowlist.allows("example.com", 22));
    assert!(allowlist.allows("plain.example.com", 80));
    assert!(!allowlist.allows("plain.example.com", 443));
    assert!(allowlist.allows("api.example.org", 8443));
    assert!(!allowlist.allows("api.example.org", 443));
    assert!(!allowlist.allows("example.org", 8443));
}

#[test]
fn addresses_match_only_exact_address_or_network_patterns() {
    let allowlist = policy(&["127.0.0.1:8080", "[::1]", "*.example.com", "10.0.0.0/8:8443"]);
    assert!(allowlist.allows("127.0.0.1", 8080));
    assert!(!allowlist.allows("127.0.0.1", 8081));
    assert!(!allowlist.allows("127.0.0.2", 8080));
    assert!(allowlist.allows("[::1]", 443));
    assert!(allowlist.allows("[0::1]", 443));
    assert!(!allowlist.allows("[::1]", 1));
    assert!(allowlist.allows("10.200.0.1", 8443));
    assert!(!allowlist.allows("10.200.0.1", 443));
    assert!(!allowlist.allows("11.0.0.1", 8443));
    // Numeric shorthands a resolver would accept are not hosts at all.
    assert!(!allowlist.allows("127.1", 8080));
    assert!(!allowlist.allows("2130706433", 8080));
    assert!(!allowlist.allows("0x7f.example.com.0x1", 8080));
    // An IPv4-mapped IPv6 address is not the IPv4 address listed.
    assert!(!allowlist.allows("[::ffff:127.0.0.1]", 8080));
    assert!(!EgressPolicy::default().allows("example.com", 443));
}

fn addresses(texts: &[&str]) -> Vec<IpAddr> {
    texts.iter().map(|text| text.parse().expect("test address")).collect()
}

#[test]
fn a_listed_name_resolving_to_a_non_public_address_is_refused_unless_the_address_is_listed() {
    let allowlist = policy(&["metadata.example", "internal.example:8443"]);
    for (resolved, why) in [
        ("169.254.169.254", "169.254.169.254, a link-local address"),
        ("10.0.0.5", "10.0.0.5, a private address"),
        ("127.0.0.1", "127.0.0.1, a loopback address"),
        ("fd00::1", "[fd00::1], a private address"),
        (
            "::ffff:10.0.0.5",
            "[::ffff:10.0.0.5], an IPv4-mapped form of 10.0.0.5, a private address",
        ),
    ] {
        let refusal = allowlist
            .reachable_addresses("metadata.example", 443, &addresses(&[resolved]))
            .expect_err(resolved);
        assert_eq!(
            refusal.to_string(),
            format!("metadata.example resolves to {why}; list the address or its network to allow it")
        );
    }
    let with_network = policy(&["internal.example:8443", "10.0.0.0/8:8443", "[fd00::1]:8443"]);
    let resolved = addresses(&["10.0.0.5", "169.254.169.254", "fd00::1", "fd00::2"]);
    assert_eq!(
        with_network.reachable_addresses("internal.example", 8443, &resolved),
        Ok(addresses(&["10.0.0.5", "fd00::1"]))
    );
    // The listed network is listed for 8443 only.
    assert!(with_network
        .reachable_addresses("internal.example", 443, &resolved)
        .is_err());
    // A public answer needs nothing more than the name.
    assert_eq!(
        allowlist.reachable_addresses("metadata.example", 443, &addresses(&["93.184.216.34", "10.0.0.5"])),
        Ok(addresses(&["93.184.216.34"]))
    );
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
    let (proxy, proxy_address) = EgressProxy::serve_tcp(loopback_any_port(), policy(&["example.com"]), test_limits())
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

// --- the address rule on loopback ---

#[tokio::test]
async fn a_listed_name_that_resolves_to_loopback_is_refused_with_the_address_and_why() {
    let origin = TestOrigin::start().await;
    let by_name = format!("localhost:{}", origin.port());
    let (proxy, proxy_address) = EgressProxy::serve_tcp(loopback_any_port(), policy(&[&by_name]), test_limits())
        .await
        .expect("serve proxy");
    let (_, head) = open_tunnel(proxy_address, &by_name).await;
    assert_status(&head, "403 Forbidden");
    let mut client = connect(proxy_address).await;
    send(&mut client, &format!("CONNECT {by_name} HTTP/1.1\r\n\r\n")).await;
    let response = read_all(&mut client).await;
    assert_status(&response, "403 Forbidden");
    assert!(
        response.contains(&format!("egress to {by_name} refused: localhost resolves to ")),
        "{response:?}"
    );
    assert!(
        response.contains(", a loopback address; list the address or its network to allow it"),
        "{response:?}"
    );
    let mut forward_client = connect(proxy_address).await;
    send(&mut forward_client, &format!("GET http://{by_name}/ HTTP/1.1\r\n\r\n")).await;
    assert_status(&read_all(&mut forward_client).await, "403 Forbidden");
    assert_eq!(origin.accept_count(), 0, "a refused address is never connected to");
    let stats = proxy.stats();
    assert_eq!((stats.allowed, stats.refused), (0, 3));
}

#[tokio::test]
async fn a_listed_name_reaches_loopback_when_the_address_or_its_network_is_listed() {
    let origin = TestOrigin::start().await;
    let by_name = format!("localhost:{}", origin.port());
    for address_pattern in [origin.allow_pattern(), format!("127.0.0.0/8:{}", origin.port())] {
        let (proxy, proxy_address) = EgressProxy::serve_tcp(
            loopback_any_port(),
            policy(&[&by_name, &address_pattern]),
            test_limits(),
        )
        .await
        .expect("serve proxy");
        let (tunnel, head) = open_tunnel(proxy_address, &by_name).await;
        assert_status(&head, "200 Connection Established");
        assert!(request_through_tunnel(tunnel).await.ends_with(ORIGIN_BODY));
        let mut client = connect(proxy_address).await;
        send(&mut client, &format!("GET http://{by_name}/plain HTTP/1.1\r\n\r\n")).await;
        assert!(read_all(&mut client).await.ends_with(ORIGIN_BODY), "{address_pattern}");
        assert_eq!(proxy.stats().allowed, 2, "{address_pattern}");
    }
    assert_eq!(origin.accept_count(), 4);
}

#[tokio::test]
async fn a_listed_network_admits_an_address_inside_it() {
    let origin = TestOrigin::start().await;
    let (_proxy, proxy_address) = EgressProxy::serve_tcp(
        loopback_any_port(),
        policy(&[&format!("127.0.0.0/8:{}", origin.port())]),
        test_limits(),
    )
    .await
    .expect("serve proxy");
    let (tunnel, head) = open_tunnel(proxy_address, &origin.allow_pattern()).await;
    assert_status(&head, "200 Connection Established");
    assert!(request_through_tunnel(tunnel).await.ends_with(ORIGIN_BODY));
    assert_eq!(origin.accept_count(), 1);
}

#[tokio::test]
async fn non_public_addresses_not_listed_are_refused_and_named() {
    let origin = TestOrigin::start().await;
    let (proxy, proxy_address) =
        EgressProxy::serve_tcp(loopback_any_port(), policy(&[&origin.allow_pattern()]), test_limits())
            .await
            .expect("serve proxy");
    let mapped = format!("[::ffff:127.0.0.1]:{}", origin.port());
    for (target, why) in [
        (mapped.as_str(), "an IPv4-mapped form of 127.0.0.1, a loopback address"),
        ("169.254.169.254:80", "a link-local address"),
        ("10.0.0.5:443", "a private address"),
        ("100.64.0.1:443", "a shared (carrier-grade NAT) address"),
    ] {
        let mut client = connect(proxy_address).await;
        send(&mut client, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
        let response = read_all(&mut client).await;
        assert_status(&response, "403 Forbidden");
        assert!(response.contains("is not on the allowlist"), "{response:?}");
        assert!(response.contains(why), "{target}: {response:?}");
    }
    assert_eq!(origin.accept_count(), 0);
    assert_eq!(proxy.stats().refused, 4);
}

#[tokio::test]
async fn a_pattern_without_a_port_opens_443_and_nothing_else() {
    let origin = TestOrigin::start().await;
    let (proxy, proxy_address) = EgressProxy::serve_tcp(loopback_any_port(), policy(&[LOOPBACK]), test_limits())
        .await
        .expect("serve proxy");
    for refused_target in [format!("{LOOPBACK}:80"), origin.allow_pattern()] {
        let (_, head) = open_tunnel(proxy_address, &refused_target).await;
        assert_status(&head, "403 Forbidden");
    }
    assert_eq!(origin.accept_count(), 0);
    // Port 443 on loopback is allowed: whatever answers there (most likely nothing: 502), the
    // policy let the request through.
    let (_, head) = open_tunnel(proxy_address, &format!("{LOOPBACK}:443")).await;
    assert!(!head.starts_with("HTTP/1.1 403"), "{head:?}");
    let stats = proxy.stats();
    assert_eq!((stats.allowed, stats.refused), (1, 2));
}
