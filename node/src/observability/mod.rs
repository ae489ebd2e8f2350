//! What a node tells its operator besides its API: Prometheus metrics (`--metrics-listen`),
//! the RPC metrics and trace layer of its gRPC server, the log format (`--log-format`) and
//! OpenTelemetry traces (`--otlp-endpoint`). See
//! "Observability" in docs/architecture.md.

pub mod log_filter;
pub mod metrics;
pub mod rpc;
pub mod traces;

/// How the node writes its log lines on standard error.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the spans around the event (an agent's
    /// id, team and epoch on every line of its work): for log shippers.
    Json,
}
