//! Transport security between nodes: every node holds a certificate signed by the cluster CA
//! that names it (`node-<id>.flotilla-node`, and the shared name `flotilla-node`), and every
//! connection between nodes is mutual TLS checked against that CA. This module turns a node's
//! PEM files into the rustls and tonic configurations that the gRPC server, the peers' clients
//! and the actor mesh use; minting the CA and the certificates is the node's business.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::NodeId;

/// The name every node certificate carries, which nodes ask for (SNI) and check when they
/// call each other: a server presenting a certificate without it is not a node.
pub const NODE_SERVER_NAME: &str = "flotilla-node";

/// The name that ties a certificate to one node id.
pub fn node_dns_name(node_id: NodeId) -> String {
    format!("node-{node_id}.{NODE_SERVER_NAME}")
}

/// SHA-256 of a certificate's DER, in hex: how a join token names the cluster CA.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The crypto provider of every TLS configuration here (the one rustls uses in this build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    #[error("{what}: no PEM {kind} found: {reason}")]
    Pem {
        what: String,
        kind: &'static str,
        reason: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot build the client-certificate check: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A node's TLS material: the cluster CA and the node's own certificate and key, as PEM.
#[derive(Clone)]
pub struct NodeTls {
    pub node_id: NodeId,
    pub ca_pem: String,
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NodeTls")
            .field("node_id", &self.node_id)
            .field("private_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

pub fn parse_certificate(what: &str, pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|error| TlsError::Pem {
        what: what.to_string(),
        kind: "certificate",
        reason: error.to_string(),
    })
}

pub fn parse_certificates(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::Pem {
            what: what.to_string(),
            kind: "certificate",
            reason: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            kind: "certificate",
            reason: "the file holds none".to_string(),
        });
    }
    Ok(certificates)
}

pub fn parse_private_key(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|error| TlsError::Pem {
        what: what.to_string(),
        kind: "private key",
        reason: error.to_string(),
    })
}

/// A certificate chain and key ready to present: the leaf first, then the CA (which a joining
/// node checks against the fingerprint in its token).
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    Ok(Arc::new(CertifiedKey::from_der(chain, key.clone_key(), &provider())?))
}

impl NodeTls {
    pub fn ca(&self) -> Result<CertificateDer<'static>, TlsError> {
        parse_certificate("the cluster CA", &self.ca_pem)
    }

    pub fn ca_fingerprint(&self) -> Result<String, TlsError> {
        Ok(fingerprint(&self.ca()?))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca()?)?;
        Ok(Arc::new(roots))
    }

    /// The node's chain (its certificate, then the CA) and its key.
    pub fn chain_and_key(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = vec![
            parse_certificate("the node certificate", &self.certificate_pem)?,
            self.ca()?,
        ];
        Ok((chain, parse_private_key("the node key", &self.private_key_pem)?))
    }

    /// For dialing another node (the mesh): the CA is the only root, and this node presents
    /// its own certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let (chain, key) = self.chain_and_key()?;
        Ok(rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)?)
    }

    /// For a listener only nodes may use (the mesh): a client without a certificate signed by
    /// the cluster CA fails the handshake, and so does one that `check` refuses (a removed
    /// node's).
    pub fn mutual_server_config(&self, check: CertificateCheck) -> Result<rustls::ServerConfig, TlsError> {
        let (chain, key) = self.chain_and_key()?;
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider()).build()?;
        Ok(rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(CheckedClientVerifier { inner, check }))
            .with_single_cert(chain, key)?)
    }

    /// For the gRPC listener, which serves clients (no certificate: they send a bearer token)
    /// and nodes (a certificate signed by the CA, which the internal service requires). A
    /// client certificate, when sent, must chain to the CA. Nodes ask for [`NODE_SERVER_NAME`]
    /// and get the node certificate; other clients get `public` when the operator supplied one.
    pub fn grpc_server_config(&self, public: Option<Arc<CertifiedKey>>) -> Result<rustls::ServerConfig, TlsError> {
        let (chain, key) = self.chain_and_key()?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .allow_unauthenticated()
            .build()?;
        let node = certified_key(chain, &key)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ByServerName { node, public }));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// For tonic channels to other nodes' gRPC service.
    pub fn tonic_client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                format!("{}\n{}", self.certificate_pem.trim_end(), self.ca_pem.trim_end()),
                &self.private_key_pem,
            ))
            .domain_name(NODE_SERVER_NAME)
    }
}

/// Picks the certificate by the name the client asked for: nodes ask for theirs.
#[derive(Debug)]
struct ByServerName {
    node: Arc<CertifiedKey>,
    public: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asks_for_node = client_hello
            .server_name()
            .is_some_and(|name| name == NODE_SERVER_NAME || name.ends_with(&format!(".{NODE_SERVER_NAME}")));
        match (&self.public, asks_for_node) {
            (Some(public), false) => Some(public.clone()),
            _ => Some(self.node.clone()),
        }
    }
}

/// A check of a client certificate the CA signed, beyond the signature: `Err` says why it is
/// refused (its node was removed from the cluster).
pub type CertificateCheck = Arc<dyn Fn(&CertificateDer<'_>) -> Result<(), String> + Send + Sync>;

/// The CA's verification, then `check`.
struct CheckedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    check: CertificateCheck,
}

impl std::fmt::Debug for CheckedClientVerifier {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CheckedClientVerifier")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for CheckedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        (self.check)(end_entity).map_err(rustls::Error::General)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, certificate, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The node ids a certificate names (`node-<id>.flotilla-node` among its DNS names); a node
/// certificate names one. Empty for a certificate that cannot be read.
pub fn certificate_node_ids(certificate: &CertificateDer<'_>) -> Vec<NodeId> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(names)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    let suffix = format!(".{NODE_SERVER_NAME}");
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => dns
                .strip_prefix("node-")
                .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                .and_then(|id| id.parse().ok()),
            _ => None,
        })
        .collect()
}

/// When the certificate in `pem` stops being valid, in seconds since the Unix epoch.
pub fn certificate_not_after(what: &str, pem: &str) -> Result<i64, TlsError> {
    let der = parse_certificate(what, pem)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|error| TlsError::Pem {
        what: what.to_string(),
        kind: "certificate",
        reason: error.to_string(),
    })?;
    Ok(parsed.validity().not_after.timestamp())
}

/// Whether `certificate` is valid for the IP address `ip`.
pub fn names_ip(certificate: &CertificateDer<'_>, ip: std::net::IpAddr) -> bool {
    let name = ServerName::IpAddress(ip.into());
    webpki::EndEntityCert::try_from(certificate)
        .and_then(|certificate| certificate.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// Whether `certificate` (DER, already verified against the CA by the handshake) names node
/// `node_id`.
pub fn names_node(certificate: &CertificateDer<'_>, node_id: NodeId) -> bool {
    let Ok(name) = ServerName::try_from(node_dns_name(node_id)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(certificate)
        .and_then(|certificate| certificate.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// The first contact of a joining node, before it trusts any CA: accepts the server only if it
/// presents, after its own certificate, a CA certificate with the fingerprint the join token
/// carries, and its certificate is valid under that CA for [`NODE_SERVER_NAME`]. The CA found
/// is kept for the calls that follow. No trust on first use: a server without the CA's key
/// cannot pass.
#[derive(Debug)]
pub struct PinnedCa {
    fingerprint: String,
    found: std::sync::Mutex<Option<CertificateDer<'static>>>,
}

impl PinnedCa {
    pub fn new(fingerprint: &str) -> PinnedCa {
        PinnedCa {
            fingerprint: fingerprint.to_ascii_lowercase(),
            found: std::sync::Mutex::new(None),
        }
    }

    pub fn found(&self) -> Option<CertificateDer<'static>> {
        self.found.lock().expect("pinned CA lock poisoned").clone()
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|certificate| fingerprint(certificate) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server does not present the cluster CA named by the join token (sha256 {})",
                    self.fingerprint
                ))
            })?
            .clone()
            .into_owned();
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|error| rustls::Error::General(error.to_string()))?;
        let verified = verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().expect("pinned CA lock poisoned") = Some(ca);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
