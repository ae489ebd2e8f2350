//! Traces (`--otlp-endpoint URL`): the node's `tracing` spans become OpenTelemetry spans and go
//! to an OTLP/gRPC collector, so one trace follows a call from the public RPC through the Raft
//! write (and its forward to the leader) to the agent actor and its machine.
//!
//! Only spans are exported, never log events: an event may carry text the log redactor would
//! have masked, while the spans the node opens carry ids and names only. The spans that exist
//! for traces alone use the target [`TRACE_TARGET`] and stay out of the log lines, so logs
//! read the same with or without a collector.
//!
//! A collector that is slow or gone never holds the node up: spans queue in a bounded buffer
//! ([`MAX_QUEUED_SPANS`]) that a background thread drains; when it is full new spans are
//! dropped. Shutdown flushes what is queued.

use std::time::Duration;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// The target of the spans that exist for traces only (the RPC, the Raft write, the
/// provisioning of a machine): the log lines leave them out. Crates below the node spell it
/// as the same literal.
pub const TRACE_TARGET: &str = "flotilla::trace";
/// Spans waiting for export; past this, new spans are dropped (a collector that is down costs
/// at most this much memory).
pub const MAX_QUEUED_SPANS: usize = 4096;
/// Spans per export call.
pub const MAX_EXPORT_BATCH_SPANS: usize = 512;
/// How long queued spans wait before an export, unless a full batch is ready sooner.
pub const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// How long one export may take before it is abandoned (its spans are lost).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("cannot set up the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// The exporting side of traces; [`Traces::shutdown`] flushes it.
pub struct Traces {
    provider: SdkTracerProvider,
}

/// Who this node is, on every span it exports.
pub struct TraceIdentity {
    /// `service.instance.id`: the address other nodes reach this one at.
    pub instance: String,
    pub region: String,
}

/// Builds the exporter and the `tracing` layer that feeds it. Needs a tokio runtime: the gRPC
/// channel's worker is spawned on it.
pub fn start<S>(
    endpoint: &url::Url,
    identity: TraceIdentity,
) -> Result<
    (
        Traces,
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    ),
    TracesError,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.as_str())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|error| TracesError::Exporter {
            endpoint: endpoint.to_string(),
            message: error.to_string(),
        })?;
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(MAX_QUEUED_SPANS)
        .with_max_export_batch_size(MAX_EXPORT_BATCH_SPANS)
        .with_scheduled_delay(EXPORT_DELAY)
        .build();
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batches).build();
    let resource = Resource::builder()
        .with_service_name("flotilla")
        .with_attributes([
            KeyValue::new("service.instance.id", identity.instance),
            KeyValue::new("flotilla.region", identity.region),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("flotilla");
    // W3C trace context in and out of gRPC metadata (the RPC layer, the forward to the leader).
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok((Traces { provider }, layer))
}

/// The spans exported: the node's own, at info and above. Libraries' spans (openraft's,
/// tonic's) and every event stay out.
pub fn exported(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.is_span() && metadata.target().starts_with("flotilla") && *metadata.level() <= tracing::Level::INFO
}

/// [`exported`] as a per-layer filter, with its level hint: without one, the node's most
/// verbose level would be "anything" and every disabled macro would call into the subscriber.
pub fn exported_filter() -> tracing_subscriber::filter::FilterFn<fn(&tracing::Metadata<'_>) -> bool> {
    tracing_subscriber::filter::filter_fn(exported as fn(&tracing::Metadata<'_>) -> bool)
        .with_max_level_hint(tracing::level_filters::LevelFilter::INFO)
}

/// The spans the log lines show: all but those for traces only.
pub fn logged(metadata: &tracing::Metadata<'_>) -> bool {
    !(metadata.is_span() && metadata.target() == TRACE_TARGET)
}

impl Traces {
    /// Exports what is queued and stops the exporter. Blocks (up to the export timeout): call
    /// it off the async runtime's workers.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("warning: flushing traces at shutdown: {error}");
        }
    }
}

/// Reads a W3C `traceparent` from a request's headers.
pub struct HeaderExtractor<'headers>(pub &'headers http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}
