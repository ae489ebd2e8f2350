//! W3C trace context on the write forwarded to the leader: the leader's spans for a write
//! (its RPC, the proposal) join the trace of the call that made it on a follower. Costs
//! nothing when the node exports no traces (the span is disabled and nothing is written).

use opentelemetry::propagation::Injector;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Writes `span`'s context (`traceparent`, `tracestate`) into outgoing gRPC metadata, with the
/// propagator the node installed (none: nothing is written).
pub fn inject(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    if span.is_disabled() {
        return;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata))
    });
}

struct MetadataInjector<'metadata>(&'metadata mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(value.as_str());
        // A header name or value the propagator made that gRPC cannot carry: left out.
        if let (Ok(key), Ok(value)) = (key, value) {
            self.0.insert(key, value);
        }
    }
}
