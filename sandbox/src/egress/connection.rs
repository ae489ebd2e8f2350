//! Serving one admitted connection: read its head, decide, connect to the origin, splice.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_state::host_pattern::{classify, AddressRefusal, Host};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::policy::EgressLimits;
use super::request::{
    error_response, parse_request_head, ErrorStatus, MalformedRequest, ProxyRequest, RequestKind, Target,
    TUNNEL_ESTABLISHED_RESPONSE,
};
use super::server::{ClientStream, ProxyShared};

/// How long a refused connection is kept open so the client can read the answer.
const REFUSAL_LINGER_TIMEOUT_MS: u64 = 1_000;
/// How much a refused client may still send (the rest of an oversized head, a body) before
/// the connection is closed; draining it avoids a reset that would discard the answer.
const MAX_REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
const REFUSAL_DRAIN_BUFFER_BYTES: usize = 4 * 1024;
const HEAD_READ_CHUNK_BYTES: usize = 4 * 1024;
const SPLICE_BUFFER_BYTES: usize = 16 * 1024;
/// Addresses of one name the proxy considers; a resolver answer longer than this is cut.
const MAX_RESOLVED_ADDRESSES: usize = 32;

/// One connection the proxy serves, with what its log lines and counters need.
struct Connection {
    client_label: String,
    shared: Arc<ProxyShared>,
}

pub(super) async fn serve_connection(
    mut client: Box<dyn ClientStream>,
    client_label: String,
    shared: Arc<ProxyShared>,
    _permit: OwnedSemaphorePermit,
) {
    let connection = Connection { client_label, shared };
    let limits = connection.shared.limits;
    let Some((buffer, head_length)) = connection.read_head(&mut client).await else {
        return;
    };
    let request = match parse_request_head(&buffer[..head_length]) {
        Ok(request) => request,
        Err(MalformedRequest(reason)) => {
            connection.reject(&reason);
            let body = format!("malformed proxy request: {reason}");
            respond_and_close(client, &error_response(ErrorStatus::BadRequest, &body)).await;
            return;
        }
    };
    // Resolving and connecting share one budget.
    let deadline = Instant::now() + Duration::from_millis(limits.connect_timeout_ms);
    let target = &request.target;
    let origin = match connection.admit(&request, deadline).await {
        Ok(addresses) => connect_to_origin(&addresses, deadline).await,
        Err(refusal) => Err(refusal),
    };
    let origin = match origin {
        Ok(origin) => origin,
        Err(failure) => {
            let (status, body) = failure.answer(target, &limits);
            if !matches!(failure, OriginFailure::Refused(_)) {
                tracing::info!(
                    client = %connection.client_label,
                    host = %target.host,
                    port = target.port,
                    reason = %body,
                    "egress origin unreachable"
                );
            }
            respond_and_close(client, &error_response(status, &body)).await;
            return;
        }
    };
    let early_bytes = &buffer[head_length..];
    let outcome = match relay(client, origin, &request.kind, early_bytes, &limits).await {
        Ok(()) => "finished".to_owned(),
        Err(error) => error.to_string(),
    };
    tracing::debug!(
        client = %connection.client_label,
        host = %target.host,
        port = target.port,
        outcome,
        "egress connection ended"
    );
}

impl Connection {
    fn reject(&self, reason: &str) {
        self.shared.rejected.fetch_add(1, Ordering::Relaxed);
        crate::metrics::record_egress_connection(crate::metrics::EgressOutcome::Rejected);
        tracing::info!(client = %self.client_label, verdict = "rejected", reason, "egress request rejected");
    }

    /// The head and whatever followed it in the same reads, or `None` once the client has been
    /// answered (head too large or too slow) or has gone.
    async fn read_head(&self, client: &mut Box<dyn ClientStream>) -> Option<(Vec<u8>, usize)> {
        let limits = self.shared.limits;
        let head_deadline = Instant::now() + Duration::from_millis(limits.idle_timeout_ms);
        let (status, body) = match read_request_head(client, limits.max_request_head_bytes, head_deadline).await {
            Ok(HeadRead::Complete { buffer, head_length }) => return Some((buffer, head_length)),
            Ok(HeadRead::TooLarge) => {
                self.reject("request head too large");
                let body = format!(
                    "request head is larger than the limit of {} bytes",
                    limits.max_request_head_bytes
                );
                (ErrorStatus::HeadTooLarge, body)
            }
            Ok(HeadRead::TimedOut) => {
                self.reject("request head not received in time");
                let body = format!("request head was not received within {} ms", limits.idle_timeout_ms);
                (ErrorStatus::RequestTimeout, body)
            }
            Ok(HeadRead::ClosedEarly) => {
                tracing::debug!(client = %self.client_label, "egress client closed before sending a request head");
                return None;
            }
            Err(error) => {
                tracing::debug!(client = %self.client_label, %error, "egress client failed while sending a request head");
                return None;
            }
        };
        respond_and_close(client, &error_response(status, &body)).await;
        None
    }

    /// The addresses the request may be connected to under the current policy: the listed
    /// address itself, or the addresses a listed name resolves to that pass the address rule.
    /// Counts and logs the verdict; a name that cannot be resolved counts as allowed (the
    /// policy allowed it, the origin failed).
    async fn admit(&self, request: &ProxyRequest, deadline: Instant) -> Result<Vec<SocketAddr>, OriginFailure> {
        let target = &request.target;
        let policy = self.shared.current_policy();
        if !policy.allows_host(&target.host, target.port) {
            self.record_verdict(request, Err("host not on the allowlist"));
            return Err(OriginFailure::Refused(not_on_allowlist(target)));
        }
        let name = match &target.host {
            Host::Ip(ip) => {
                self.record_verdict(request, Ok(()));
                return Ok(vec![SocketAddr::new(*ip, target.port)]);
            }
            Host::Name(name) => name,
        };
        let resolved = match resolve(name, target.port, deadline).await {
            Ok(resolved) => resolved,
            Err(failure) => {
                self.record_verdict(request, Ok(()));
                return Err(failure);
            }
        };
        match policy.reachable_addresses(name, target.port, &resolved) {
            Ok(reachable) => {
                self.record_verdict(request, Ok(()));
                Ok(reachable
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, target.port))
                    .collect())
            }
            Err(AddressRefusal::NoAddresses { .. }) => {
                self.record_verdict(request, Ok(()));
                Err(OriginFailure::NoAddresses)
            }
            Err(refusal) => {
                let reason = refusal.to_string();
                self.record_verdict(request, Err(&reason));
                Err(OriginFailure::Refused(reason))
            }
        }
    }

    /// Counts and logs whether the policy allowed the request (`Err` holds why not).
    fn record_verdict(&self, request: &ProxyRequest, verdict: Result<(), &str>) {
        let target = &request.target;
        let (counter, outcome) = match verdict {
            Ok(()) => (&self.shared.allowed, crate::metrics::EgressOutcome::Allowed),
            Err(_) => (&self.shared.refused, crate::metrics::EgressOutcome::Refused),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        crate::metrics::record_egress_connection(outcome);
        match verdict {
            Ok(()) => tracing::info!(
                client = %self.client_label,
                method = %request.method,
                host = %target.host,
                port = target.port,
                verdict = "allowed",
                "egress request allowed"
            ),
            Err(reason) => tracing::info!(
                client = %self.client_label,
                method = %request.method,
                host = %target.host,
                port = target.port,
                verdict = "refused",
                reason,
                "egress request refused"
            ),
        }
    }
}

/// Why a host is not on the allowlist, naming the kind of address when it is a non-public one.
fn not_on_allowlist(target: &Target) -> String {
    let kind = match &target.host {
        Host::Ip(ip) => classify(*ip).map(|why| format!(" ({} is {why})", target.host)),
        Host::Name(_) => None,
    };
    format!(
        "{} is not on the allowlist of this machine{}",
        target.host,
        kind.unwrap_or_default()
    )
}

/// Opens the exchange (200 for a tunnel, the rewritten head for a forward, then any bytes the
/// client sent right behind its head: a TLS ClientHello, a request body) and splices until the
/// exchange ends or goes idle.
async fn relay<C>(
    mut client: C,
    mut origin: TcpStream,
    kind: &RequestKind,
    early_bytes: &[u8],
    limits: &EgressLimits,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let idle_timeout = Duration::from_millis(limits.idle_timeout_ms);
    let opening = async {
        match kind {
            RequestKind::Tunnel => client.write_all(TUNNEL_ESTABLISHED_RESPONSE).await?,
            RequestKind::Forward { origin_head } => origin.write_all(origin_head).await?,
        }
        origin.write_all(early_bytes).await
    };
    match tokio::time::timeout(idle_timeout, opening).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle while opening the connection",
            ))
        }
    }
    let end = match kind {
        RequestKind::Tunnel => SpliceEnd::BothSidesFinished,
        RequestKind::Forward { .. } => SpliceEnd::OriginFinished,
    };
    splice_until_idle(client, origin, end, idle_timeout).await
}

pub(super) enum HeadRead {
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

pub(super) async fn read_request_head<R>(
    reader: &mut R,
    max_head_bytes: usize,
    deadline: Instant,
) -> io::Result<HeadRead>
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
pub(super) async fn respond_and_close<S>(mut client: S, response: &[u8])
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
    /// The policy refused the request; the text says why.
    Refused(String),
    Unresolvable(io::Error),
    NoAddresses,
    Unreachable(io::Error),
    TimedOut,
}

impl OriginFailure {
    /// The status and body the client is answered with.
    fn answer(&self, target: &Target, limits: &EgressLimits) -> (ErrorStatus, String) {
        match self {
            OriginFailure::Refused(reason) => (ErrorStatus::Forbidden, format!("egress to {target} refused: {reason}")),
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
        }
    }
}

/// Resolves `name` with the node's resolver (on a blocking thread, so the runtime's workers
/// never wait for it) by `deadline`; keeps at most [`MAX_RESOLVED_ADDRESSES`].
async fn resolve(name: &str, port: u16, deadline: Instant) -> Result<Vec<IpAddr>, OriginFailure> {
    match tokio::time::timeout_at(deadline, tokio::net::lookup_host((name, port))).await {
        Ok(Ok(addresses)) => Ok(addresses
            .map(|address| address.ip())
            .take(MAX_RESOLVED_ADDRESSES)
            .collect()),
        Ok(Err(error)) => Err(OriginFailure::Unresolvable(error)),
        Err(_) => Err(OriginFailure::TimedOut),
    }
}

/// Tries each address in turn, by `deadline`. These are the addresses the policy checked: the
/// name is not resolved again, so a second DNS answer cannot redirect the connection.
async fn connect_to_origin(addresses: &[SocketAddr], deadline: Instant) -> Result<TcpStream, OriginFailure> {
    let attempt = async {
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
    tokio::time::timeout_at(deadline, attempt)
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
    let upstream = copy_recording_activity(
        &mut client_reader,
        &mut origin_writer,
        &last_activity_ms,
        started,
        crate::metrics::EgressDirection::Upstream,
    );
    let downstream = copy_recording_activity(
        &mut origin_reader,
        &mut client_writer,
        &last_activity_ms,
        started,
        crate::metrics::EgressDirection::Downstream,
    );
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
    direction: crate::metrics::EgressDirection,
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
        crate::metrics::record_egress_bytes(direction, read);
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity_ms.fetch_max(elapsed_ms, Ordering::Relaxed);
    }
}
