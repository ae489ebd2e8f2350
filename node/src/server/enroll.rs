//! Join tokens and the enrollment of a new node. A token is `fjt1.<ca>.<secret>`: `<ca>` is
//! the SHA-256 of the cluster CA certificate, so the joining node checks the server it first
//! contacts against it (as kubeadm's discovery hash does: no trust on first use); `<secret>` is
//! spent through Raft on use (only its digest is replicated, with an expiry). Any member
//! answers `Enroll` with a certificate for the node and its key, over that verified TLS
//! connection, signed with the cluster CA key it opens from the replicated state with the
//! cluster's key-encryption key; the node keeps them and uses them for every call from then on.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::internal::enrollment_client::EnrollmentClient;
use flotilla_proto::internal::enrollment_server::Enrollment;
use flotilla_proto::internal::{EnrollRequest, EnrollResponse};
use flotilla_raft::tls::{NodeTls, PinnedCa, NODE_SERVER_NAME};
use flotilla_raft::{Command, Replica};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::pki::ClusterCa;
use super::write_status;

const TOKEN_PREFIX: &str = "fjt1";
/// Join tokens last an hour unless asked otherwise, and at most a week.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// A join token's parts.
#[derive(Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: String,
    pub secret: String,
}

impl JoinToken {
    pub fn mint(ca_fingerprint: &str) -> JoinToken {
        JoinToken {
            ca_fingerprint: ca_fingerprint.to_string(),
            secret: hex::encode(rand::random::<[u8; 32]>()),
        }
    }

    pub fn parse(token: &str) -> Result<JoinToken, String> {
        let parts: Vec<&str> = token.trim().split('.').collect();
        let is_hex =
            |part: &str, length: usize| part.len() == length && part.bytes().all(|byte| byte.is_ascii_hexdigit());
        match parts.as_slice() {
            [TOKEN_PREFIX, ca, secret] if is_hex(ca, 64) && is_hex(secret, 64) => Ok(JoinToken {
                ca_fingerprint: ca.to_ascii_lowercase(),
                secret: secret.to_ascii_lowercase(),
            }),
            _ => Err(format!(
                "a join token is `{TOKEN_PREFIX}.<64 hex digits>.<64 hex digits>` as `flotilla cluster join-token` prints it; found {} characters that are not",
                token.trim().len()
            )),
        }
    }

    /// What the cluster replicates: never the secret itself.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{TOKEN_PREFIX}.{}.{}", self.ca_fingerprint, self.secret)
    }
}

/// `flotilla.internal.v1.Enrollment`, served without a client certificate: the token is the
/// credential. Every member that has applied the cluster CA record and holds the
/// key-encryption key can issue certificates.
pub struct EnrollmentApi {
    pub replica: Replica,
    pub kek: super::secrets::NodeKek,
    pub ca_fingerprint: String,
}

impl EnrollmentApi {
    /// The cluster CA with its key, opened from the replicated record.
    fn signing_ca(&self) -> Result<ClusterCa, Status> {
        let me = self.replica.node_id();
        let record = self
            .replica
            .reader()
            .read(|state| state.cluster_ca.clone())
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "node {me} has not received the cluster CA key yet (the first node records it once it leads); try again shortly or join through another member"
                ))
            })?;
        let kek = self.kek.get().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {me} holds no key-encryption key (DATA_DIR/kek), so it cannot open the cluster CA key; join through another member"
            ))
        })?;
        ClusterCa::open_replicated(&record, kek).map_err(|error| Status::internal(format!("node {me}: {error}")))
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentApi {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let body = request.into_inner();
        let token = JoinToken::parse(&body.token).map_err(Status::invalid_argument)?;
        if token.ca_fingerprint != self.ca_fingerprint {
            return Err(Status::unauthenticated(
                "the join token names another cluster's CA; mint one on a member of this cluster",
            ));
        }
        let ca = self.signing_ca()?;
        if body.node_id != 0
            && self
                .replica
                .reader()
                .read(|state| state.removed_nodes.contains(&body.node_id))
        {
            return Err(Status::failed_precondition(
                flotilla_raft::ApplyError::NodeRemoved(body.node_id).to_string(),
            ));
        }
        let host = body
            .grpc_address
            .parse::<std::net::SocketAddr>()
            .map(|address| address.ip().to_string())
            .or_else(|_| {
                body.grpc_address
                    .rsplit_once(':')
                    .map(|(host, _)| host.to_string())
                    .ok_or(())
            })
            .map_err(|_| {
                Status::invalid_argument(format!("grpc_address must be HOST:PORT, found {:?}", body.grpc_address))
            })?;
        self.replica
            .write(Command::ConsumeJoinToken {
                sha256_hex: token.digest(),
            })
            .await
            .map_err(write_status)?;
        let node_id = match body.node_id {
            0 => match self.replica.write(Command::ReserveNodeId).await.map_err(write_status)? {
                flotilla_raft::Response::NodeId(id) => id,
                other => {
                    return Err(Status::internal(format!(
                        "unexpected answer to reserve-node-id: {other:?}"
                    )))
                }
            },
            id => id,
        };
        let issued = tokio::task::spawn_blocking(move || ca.issue(node_id, &host))
            .await
            .map_err(|error| Status::internal(format!("issuing a certificate failed: {error}")))?
            .map_err(|error| Status::internal(error.to_string()))?;
        tracing::info!(node = node_id, "issued a node certificate for a join token");
        Ok(Response::new(EnrollResponse {
            node_id,
            certificate_pem: issued.certificate_pem,
            private_key_pem: issued.private_key_pem,
            ca_pem: issued.ca_pem,
        }))
    }
}

/// Why a node could not enroll.
#[derive(thiserror::Error, Debug)]
pub enum EnrollError {
    #[error("{0}")]
    Token(String),
    #[error("invalid join address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot reach {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("{address} is not a member of the cluster the join token names: {reason}")]
    WrongServer { address: String, reason: String },
    #[error("{address} refused the join token: {message}")]
    Refused { address: String, message: String },
}

/// `host:port` of a join address given as `host:port` or a URL.
fn host_port(address: &str) -> &str {
    address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address)
        .trim_end_matches('/')
}

/// Asks the CA holder at `address` for this node's certificate with `token`. The server is
/// checked against the CA fingerprint in the token before the token is sent.
pub async fn enroll(address: &str, token: &str, node_id: u64, grpc_address: &str) -> Result<NodeTls, EnrollError> {
    let parsed = JoinToken::parse(token).map_err(EnrollError::Token)?;
    let target = host_port(address).to_string();
    let ca_pem = discover_ca(&target, &parsed.ca_fingerprint).await?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
        .domain_name(NODE_SERVER_NAME);
    let address_error = |error: tonic::transport::Error| EnrollError::Address {
        address: address.to_string(),
        reason: error.to_string(),
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{target}"))
        .map_err(address_error)?
        .tls_config(tls)
        .map_err(address_error)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|error| EnrollError::Unreachable {
            address: target.clone(),
            reason: format!("{error}: {}", error.source_chain()),
        })?;
    let reply = call_enroll(channel, &target, &parsed, node_id, grpc_address).await?;
    Ok(NodeTls {
        node_id: reply.node_id,
        ca_pem: reply.ca_pem,
        certificate_pem: reply.certificate_pem,
        private_key_pem: reply.private_key_pem,
    })
}

/// Calls `Enroll`, again while the member answers `UNAVAILABLE` (it has not applied the CA
/// record yet, or knows no leader to spend the token through), until [`ENROLL_TIMEOUT`].
async fn call_enroll(
    channel: tonic::transport::Channel,
    target: &str,
    token: &JoinToken,
    node_id: u64,
    grpc_address: &str,
) -> Result<EnrollResponse, EnrollError> {
    let deadline = tokio::time::Instant::now() + ENROLL_TIMEOUT;
    let mut pause = Duration::from_millis(100);
    loop {
        let mut request = Request::new(EnrollRequest {
            token: token.to_string(),
            node_id,
            grpc_address: grpc_address.to_string(),
        });
        request.set_timeout(ENROLL_TIMEOUT);
        match EnrollmentClient::new(channel.clone()).enroll(request).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status)
                if status.code() == tonic::Code::Unavailable && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::info!(%status, "enrollment not answered yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(status) => {
                return Err(EnrollError::Refused {
                    address: target.to_string(),
                    message: status.message().to_string(),
                })
            }
        }
    }
}

trait SourceChain {
    fn source_chain(&self) -> String;
}

impl<E: std::error::Error> SourceChain for E {
    fn source_chain(&self) -> String {
        let mut chain = Vec::new();
        let mut source = self.source();
        while let Some(error) = source {
            chain.push(error.to_string());
            source = error.source();
        }
        chain.join(": ")
    }
}

/// One TLS handshake with `target`, accepted only if the server proves it holds a certificate
/// of the CA with `fingerprint`; returns that CA as PEM.
async fn discover_ca(target: &str, fingerprint: &str) -> Result<String, EnrollError> {
    let pinned = Arc::new(PinnedCa::new(fingerprint));
    let config = rustls::ClientConfig::builder_with_provider(flotilla_raft::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| EnrollError::Token(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(pinned.clone())
        .with_no_client_auth();
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| EnrollError::Unreachable {
            address: target.to_string(),
            reason: "no connection within 5 s".to_string(),
        })?
        .map_err(|error| EnrollError::Unreachable {
            address: target.to_string(),
            reason: error.to_string(),
        })?;
    let server_name =
        rustls::pki_types::ServerName::try_from(NODE_SERVER_NAME).expect("the node server name is a valid DNS name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, stream))
        .await
        .map_err(|_| EnrollError::Unreachable {
            address: target.to_string(),
            reason: "the TLS handshake did not finish within 10 s".to_string(),
        })?
        .map_err(|error| EnrollError::WrongServer {
            address: target.to_string(),
            reason: error.to_string(),
        })?;
    let ca = pinned.found().ok_or_else(|| EnrollError::WrongServer {
        address: target.to_string(),
        reason: "the handshake presented no CA certificate".to_string(),
    })?;
    Ok(pem_of(&ca))
}

fn pem_of(certificate: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(certificate);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_token_reads_back_and_bad_ones_are_named() {
        let token = JoinToken::mint(&"ab".repeat(32));
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        assert_ne!(token.digest(), token.secret);
        let error = JoinToken::parse("fjt1.abc.def").unwrap_err();
        assert!(error.contains("join token is `fjt1."), "{error}");
        assert!(JoinToken::parse("").is_err());
    }
}
