//! The RPC metrics layer of the node's gRPC server: every call counted by method and gRPC
//! status code, and its duration recorded, from the request's arrival to the status the server
//! sends (for a streaming call, the stream's whole life). The same layer opens the call's
//! trace span (`rpc`, exported with `--otlp-endpoint`), which continues the caller's trace when
//! the request carries a W3C `traceparent`, and ends with the call's status.
//!
//! The status of a gRPC call travels in the `grpc-status` header of a trailers-only answer
//! (an error before any message) or in the trailers after the last message, so the layer
//! wraps the response body and records when it sees either. A body dropped before its
//! trailers (the client went away) counts as `CANCELLED`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use prost::Message as _;

/// Every call counted, by `method` (its full gRPC path) and `code` (its status, as gRPC names it).
pub const RPC_REQUESTS_TOTAL: &str = "flotilla_rpc_requests_total";
/// How long each call took, by `method` and `code`.
pub const RPC_DURATION_SECONDS: &str = "flotilla_rpc_duration_seconds";
/// The `method` label of a path no service of the node serves: the label set stays bounded
/// whatever paths clients send.
pub const UNKNOWN_METHOD: &str = "unknown";

/// Calls that get no trace span: Raft's own traffic and liveness, many a second and part of
/// no client's call (a write forwarded to the leader is traced).
const UNTRACED_METHODS: &[&str] = &[
    "/flotilla.internal.v1.Internal/AppendEntries",
    "/flotilla.internal.v1.Internal/AppendStream",
    "/flotilla.internal.v1.Internal/Vote",
    "/flotilla.internal.v1.Internal/InstallSnapshot",
    "/flotilla.internal.v1.Internal/Heartbeat",
    "/flotilla.internal.v1.Internal/ReadIndex",
    "/flotilla.internal.v1.Internal/TimeoutNow",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Method paths served besides those of the node's own descriptors.
const STANDARD_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The method paths the node serves, from its encoded descriptors: the only values of the
/// `method` label besides [`UNKNOWN_METHOD`].
pub fn known_methods(encoded_descriptor_set: &[u8]) -> Result<HashSet<String>, prost::DecodeError> {
    let descriptors = prost_types::FileDescriptorSet::decode(encoded_descriptor_set)?;
    let mut methods: HashSet<String> = STANDARD_METHODS.iter().map(|path| path.to_string()).collect();
    for file in &descriptors.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                methods.insert(format!("/{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    Ok(methods)
}

/// One `method` label's series. The handles of its `OK` series are looked up in the metrics
/// registry once, at its first call, and kept: a call that succeeds then records without
/// building labels or hashing them (a busy node answers thousands of creates a second).
struct MethodMetrics {
    method: String,
    ok: OnceLock<(::metrics::Counter, ::metrics::Histogram)>,
}

impl MethodMetrics {
    fn new(method: String) -> Arc<MethodMetrics> {
        Arc::new(MethodMetrics {
            method,
            ok: OnceLock::new(),
        })
    }

    fn handles(&self, code: &'static str) -> (::metrics::Counter, ::metrics::Histogram) {
        let labels = [("method", self.method.clone()), ("code", code.to_string())];
        (
            ::metrics::counter!(RPC_REQUESTS_TOTAL, &labels),
            ::metrics::histogram!(RPC_DURATION_SECONDS, &labels),
        )
    }

    fn record(&self, code: &'static str, seconds: f64) {
        let looked_up;
        let (counter, histogram) = if code == "OK" {
            self.ok.get_or_init(|| self.handles(code))
        } else {
            looked_up = self.handles(code);
            &looked_up
        };
        counter.increment(1);
        histogram.record(seconds);
    }
}

/// The series of every known method, and of [`UNKNOWN_METHOD`].
struct Methods {
    known: HashMap<String, Arc<MethodMetrics>>,
    unknown: Arc<MethodMetrics>,
}

/// Adds [`RpcMetrics`] around the server's routes.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    methods: Arc<Methods>,
}

impl RpcMetricsLayer {
    pub fn new(known_methods: HashSet<String>) -> RpcMetricsLayer {
        let known = known_methods
            .into_iter()
            .map(|method| (method.clone(), MethodMetrics::new(method)))
            .collect();
        RpcMetricsLayer {
            methods: Arc::new(Methods {
                known,
                unknown: MethodMetrics::new(UNKNOWN_METHOD.to_string()),
            }),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            methods: self.methods.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    methods: Arc<Methods>,
}

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    ResponseBody: Body + Unpin,
{
    type Response = http::Response<MeasuredBody<ResponseBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let path = request.uri().path();
        let (known, method) = match self.methods.known.get(path) {
            Some(method) => (true, method.clone()),
            None => (false, self.methods.unknown.clone()),
        };
        let span = if known && !UNTRACED_METHODS.contains(&path) {
            call_span(path, request.headers())
        } else {
            tracing::Span::none()
        };
        let mut call = CallRecord {
            method,
            started: Instant::now(),
            recorded: false,
            span: span.clone(),
        };
        let answer = span.in_scope(|| self.inner.call(request));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let response = answer.await?;
                // A trailers-only answer (an error before any message) has its status in the headers.
                if let Some(code) = grpc_status(response.headers()) {
                    call.record(code);
                }
                let (parts, body) = response.into_parts();
                Ok(http::Response::from_parts(parts, MeasuredBody { inner: body, call }))
            },
            span,
        ))
    }
}

/// The trace span of one call, named as OpenTelemetry names gRPC server spans
/// (`package.Service/Method`), under the caller's trace when the request carries one.
fn call_span(path: &str, headers: &http::HeaderMap) -> tracing::Span {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        target: "flotilla::trace",
        "rpc",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        // Set by the handler of a call about one agent (CreateAgent).
        agent = tracing::field::Empty,
    );
    if !span.is_disabled() {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let caller = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&super::traces::HeaderExtractor(headers))
        });
        // A request without a trace context leaves the span a root.
        let _ = span.set_parent(caller);
    }
    span
}

/// One call being measured; recorded once, when its status is known (or on drop).
struct CallRecord {
    method: Arc<MethodMetrics>,
    started: Instant,
    recorded: bool,
    /// The call's trace span (disabled when it has none), ended when the call is recorded.
    span: tracing::Span,
}

impl CallRecord {
    fn record(&mut self, code: &'static str) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.method.record(code, self.started.elapsed().as_secs_f64());
        let span = std::mem::replace(&mut self.span, tracing::Span::none());
        if !span.is_disabled() {
            span.record("rpc.grpc.status_code", code);
            if code != "OK" {
                span.record("otel.status_code", "ERROR");
            }
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // The body went before its trailers: the client cancelled or the connection broke.
        self.record("CANCELLED");
    }
}

/// A response body that records its call's status when the trailers pass through.
pub struct MeasuredBody<B> {
    inner: B,
    call: CallRecord,
}

impl<B: Body + Unpin> Body for MeasuredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.call.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.call.record("INTERNAL"),
            // Ended without a status: not a well-formed gRPC answer.
            Poll::Ready(None) => self.call.record("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The status code a `grpc-status` header holds, by its gRPC name.
fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    Some(code_name(tonic::Code::from_bytes(value.as_bytes())))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_known_methods_are_the_services_of_the_descriptors_and_the_standard_ones() {
        let methods = known_methods(flotilla_proto::FILE_DESCRIPTOR_SET).unwrap();
        assert!(methods.contains("/flotilla.v1.AgentService/CreateAgent"));
        assert!(methods.contains("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        for (path, _) in crate::server::authz::METHOD_PERMISSIONS {
            assert!(methods.contains(*path), "{path} is served and so labelled");
        }
        assert!(!methods.contains("/flotilla.v1.AgentService/NoSuchMethod"));
    }

    #[test]
    fn every_untraced_method_is_one_the_node_serves() {
        let methods = known_methods(flotilla_proto::FILE_DESCRIPTOR_SET).unwrap();
        for path in UNTRACED_METHODS {
            assert!(
                methods.contains(*path),
                "{path} is not a served method, so nothing leaves it untraced"
            );
        }
    }

    #[test]
    fn a_status_header_is_named_as_grpc_names_it() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&headers), Some("NOT_FOUND"));
        headers.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(grpc_status(&headers), Some("OK"));
    }
}
