//! The bench's gRPC client: a connection to a node and a bearer token on every call. The bench
//! is a client of the public API like any other; the `flotilla` command line keeps its own
//! client (`node/src/cli/client.rs`) because the node is a binary crate the bench cannot link.

use std::error::Error as StdError;
use std::time::Duration;

use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::{Cluster, GetClusterRequest};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// How long establishing the TCP + HTTP/2 connection may take before the node counts as unreachable.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Deadline for one unary call other than the measured creates. Creates wait for a Raft commit,
/// so this is generous.
const UNARY_CALL_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint {endpoint:?} must be a URL starting with https:// (nodes refuse plaintext)")]
    NotAUrl { endpoint: String },
    #[error(
        "endpoint {endpoint:?}: no cluster CA to check it against; pass --ca-cert (DATA_DIR/ca.pem of the first node)"
    )]
    NoCa { endpoint: String },
    #[error("endpoint {endpoint:?} is not a valid URL: {detail}")]
    InvalidUrl { endpoint: String, detail: String },
    #[error("the token must be printable ASCII without line breaks, found other characters")]
    InvalidToken,
    #[error("cannot reach {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("{endpoint} answered {code:?}: {message}")]
    Rpc {
        endpoint: String,
        code: tonic::Code,
        message: String,
    },
    #[error("no answer from {endpoint} within {deadline_ms} ms")]
    Timeout { endpoint: String, deadline_ms: u64 },
}

impl ClientError {
    /// Classifies a failed call. A status generated locally by the transport (it carries a
    /// source error) means the node could not be reached; a status the server sent has none.
    pub fn from_status(endpoint: &str, status: Status) -> Self {
        if status.code() == tonic::Code::Unavailable && status.source().is_some() {
            return ClientError::Unreachable {
                endpoint: endpoint.to_string(),
                detail: status.message().to_string(),
            };
        }
        ClientError::Rpc {
            endpoint: endpoint.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every request; without a token nothing is added.
#[derive(Clone, Debug)]
pub struct BearerToken {
    header_value: Option<MetadataValue<Ascii>>,
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let header_value = match token.map(str::trim).filter(|token| !token.is_empty()) {
            None => None,
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| ClientError::InvalidToken)?,
            ),
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

pub type AuthenticatedChannel = InterceptedService<Channel, BearerToken>;
pub type AgentClient = AgentServiceClient<AuthenticatedChannel>;
pub type ClusterClient = ClusterServiceClient<AuthenticatedChannel>;

/// An error and its sources joined with `: `, because transport errors put the useful part
/// ("Connection refused") several sources deep.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
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

/// The cluster CA (PEM) that [`connect`] checks nodes against: a started cluster's, or the one
/// given with `--ca-cert`.
static TRUSTED_CA: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub fn trust_ca(ca_pem: String) {
    *TRUSTED_CA.lock().expect("trusted CA poisoned") = Some(ca_pem);
}

/// Connects eagerly so that an unreachable node is reported as such before any call is made.
/// The channel reconnects by itself afterwards. Nodes speak TLS only: `https://` URLs, checked
/// against the CA given to [`trust_ca`].
pub async fn connect(url: &str) -> Result<Channel, ClientError> {
    if !url.starts_with("https://") {
        return Err(ClientError::NotAUrl {
            endpoint: url.to_string(),
        });
    }
    let ca_pem = TRUSTED_CA
        .lock()
        .expect("trusted CA poisoned")
        .clone()
        .ok_or_else(|| ClientError::NoCa {
            endpoint: url.to_string(),
        })?;
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    let endpoint = Endpoint::from_shared(url.to_string())
        .and_then(|endpoint| endpoint.tls_config(tls))
        .map_err(|error| ClientError::InvalidUrl {
            endpoint: url.to_string(),
            detail: error_chain(&error),
        })?
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .tcp_nodelay(true);
    endpoint.connect().await.map_err(|error| ClientError::Unreachable {
        endpoint: url.to_string(),
        // The outer error only says "transport error"; the causes say what happened.
        detail: error.source().map(error_chain).unwrap_or_else(|| error.to_string()),
    })
}

pub fn agent_client(channel: Channel, token: BearerToken) -> AgentClient {
    AgentServiceClient::with_interceptor(channel, token)
}

pub fn cluster_client(channel: Channel, token: BearerToken) -> ClusterClient {
    ClusterServiceClient::with_interceptor(channel, token)
}

/// Runs one unary call under [`UNARY_CALL_TIMEOUT_MS`] and classifies its failure.
pub async fn unary<T>(
    endpoint: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(Duration::from_millis(UNARY_CALL_TIMEOUT_MS), call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(ClientError::from_status(endpoint, status)),
        Err(_elapsed) => Err(ClientError::Timeout {
            endpoint: endpoint.to_string(),
            deadline_ms: UNARY_CALL_TIMEOUT_MS,
        }),
    }
}

pub async fn get_cluster(endpoint: &str, token: &BearerToken) -> Result<Cluster, ClientError> {
    let mut client = cluster_client(connect(endpoint).await?, token.clone());
    unary(endpoint, client.get_cluster(GetClusterRequest {})).await
}
