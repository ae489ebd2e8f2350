//! Connecting to a node, authenticating every call, and turning failures into the one-line
//! messages the command line prints.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use flotilla_proto::v1::admin_service_client::AdminServiceClient;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// How long establishing the TCP + HTTP/2 connection may take before the node counts as unreachable.
pub(crate) const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Deadline for one unary call. Creates wait for a Raft commit, so this is generous.
pub(crate) const UNARY_CALL_TIMEOUT_MS: u64 = 30_000;

/// Adds `authorization: Bearer <token>` to every request. Without a token nothing is added and
/// the server answers UNAUTHENTICATED where it requires one.
#[derive(Clone, Debug)]
pub(crate) struct BearerToken {
    header_value: Option<MetadataValue<Ascii>>,
}

impl BearerToken {
    pub(crate) fn new(token: Option<&str>) -> Result<Self, CliError> {
        let header_value = match token.map(str::trim).filter(|token| !token.is_empty()) {
            None => None,
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                CliError::Usage(
                    "the token must be printable ASCII without line breaks, found other characters".to_string(),
                )
            })?),
        };
        Ok(Self { header_value })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.header_value {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub(crate) type AuthenticatedChannel = InterceptedService<Channel, BearerToken>;
pub(crate) type AgentClient = AgentServiceClient<AuthenticatedChannel>;
pub(crate) type ClusterClient = ClusterServiceClient<AuthenticatedChannel>;
pub(crate) type AdminClient = AdminServiceClient<AuthenticatedChannel>;

/// Every way a client command can fail, each printed as one `error: ...` line.
#[derive(Debug)]
pub(crate) enum CliError {
    /// No connection could be made to the node.
    Unreachable { endpoint: String, detail: String },
    /// The node answered with a gRPC status.
    Rpc(Status),
    /// The command line was well formed for clap but unusable (a bad endpoint URL or token).
    Usage(String),
    /// Standard output went away, for instance a closed pipe.
    Output(std::io::Error),
}

impl fmt::Display for CliError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Unreachable { endpoint, detail } => {
                write!(formatter, "cannot reach {endpoint}: {detail}")
            }
            CliError::Rpc(status) if status.message().is_empty() => {
                write!(formatter, "{}", code_in_words(status.code()))
            }
            CliError::Rpc(status) => write!(formatter, "{}: {}", code_in_words(status.code()), status.message()),
            CliError::Usage(message) => formatter.write_str(message),
            CliError::Output(error) => {
                write!(formatter, "cannot write to standard output: {error}")
            }
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        CliError::Output(error)
    }
}

impl CliError {
    /// Classifies a failed call. A status generated locally by the transport (it carries a
    /// source error) means the node could not be reached; a status the server sent has none.
    pub(crate) fn from_status(endpoint: &str, status: Status) -> Self {
        if status.code() == Code::Unavailable && status.source().is_some() {
            return CliError::Unreachable {
                endpoint: endpoint.to_string(),
                detail: status.message().to_string(),
            };
        }
        CliError::Rpc(status)
    }
}

/// The lowercase words for a gRPC code, as printed after `error:`.
pub(crate) fn code_in_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// An error and its sources joined with `: `, because transport errors put the useful part
/// ("Connection refused") several sources deep.
pub(crate) fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Environment variable naming the cluster CA certificate the CLI trusts.
pub(crate) const CA_CERT_ENV: &str = "FLOTILLA_CA_CERT";

pub(crate) fn endpoint_for(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Endpoint, CliError> {
    if url.starts_with("http://") {
        return Err(CliError::Usage(format!(
            "endpoint {url:?} is plaintext, which nodes refuse: use https:// (and --ca-cert or {CA_CERT_ENV} with the cluster CA, DATA_DIR/ca.pem of the first node)"
        )));
    }
    if !url.starts_with("https://") {
        return Err(CliError::Usage(format!(
            "endpoint {url:?} must be a URL starting with https://"
        )));
    }
    let ca_cert = ca_cert.ok_or_else(|| {
        CliError::Usage(format!(
            "an https endpoint needs the certificate to check the node against: pass --ca-cert or set {CA_CERT_ENV} (the cluster CA is DATA_DIR/ca.pem of the first node)"
        ))
    })?;
    let ca_pem = std::fs::read_to_string(ca_cert)
        .map_err(|error| CliError::Usage(format!("cannot read the CA certificate {}: {error}", ca_cert.display())))?;
    if !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(CliError::Usage(format!(
            "{} holds no PEM certificate (expected the cluster's ca.pem)",
            ca_cert.display()
        )));
    }
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    Endpoint::from_shared(url.to_string())
        .and_then(|endpoint| endpoint.tls_config(tls))
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
                .tcp_nodelay(true)
        })
        .map_err(|error| CliError::Usage(format!("endpoint {url:?} is not a valid URL: {}", error_chain(&error))))
}

/// Connects eagerly so that an unreachable node (or one whose certificate the CA did not
/// sign) is reported as such before any call is made. The channel reconnects by itself
/// afterwards.
pub(crate) async fn connect(args: &super::ClientArgs) -> Result<Channel, CliError> {
    let url = args.endpoint.as_str();
    endpoint_for(url, args.ca_cert.as_deref())?
        .connect()
        .await
        .map_err(|error| CliError::Unreachable {
            endpoint: url.to_string(),
            // The outer error only says "transport error"; the causes say what happened.
            detail: error.source().map(error_chain).unwrap_or_else(|| error.to_string()),
        })
}

pub(crate) fn agent_client(channel: Channel, token: BearerToken) -> AgentClient {
    AgentServiceClient::with_interceptor(channel, token)
}

pub(crate) fn cluster_client(channel: Channel, token: BearerToken) -> ClusterClient {
    ClusterServiceClient::with_interceptor(channel, token)
}

pub(crate) fn admin_client(channel: Channel, token: BearerToken) -> AdminClient {
    AdminServiceClient::with_interceptor(channel, token)
}

/// Runs one unary call under [`UNARY_CALL_TIMEOUT_MS`] and classifies its failure.
pub(crate) async fn unary<T>(
    endpoint: &str,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, CliError> {
    call_within(endpoint, UNARY_CALL_TIMEOUT_MS, call).await
}

/// Runs one call under `deadline_ms` and classifies its failure.
pub(crate) async fn call_within<T>(
    endpoint: &str,
    deadline_ms: u64,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, CliError> {
    match tokio::time::timeout(Duration::from_millis(deadline_ms), call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(CliError::from_status(endpoint, status)),
        Err(_elapsed) => Err(CliError::Rpc(Status::deadline_exceeded(format!(
            "no answer from {endpoint} within {deadline_ms} ms"
        )))),
    }
}
