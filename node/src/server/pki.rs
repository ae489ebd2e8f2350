//! The cluster CA and node certificates. The first node of a cluster creates the CA (`ca.pem`,
//! and `ca.key` readable by the node's user only, kept only until the cluster has recorded the
//! key sealed under its key-encryption key: see [`ClusterCa::seal`]) and signs its own
//! certificate; a joining node gets its certificate from any member once, with a join token
//! (see [`super::enroll`]), and keeps it (`node.pem`, `node.key`): a restart needs no token.
//! Node certificates are valid for [`NODE_CERT_VALIDITY`]; a node renews its own at start when
//! less than [`RENEW_BEFORE`] is left.
//! A node certificate names the node's id (`node-<id>.flotilla-node`), the name every node
//! answers to (`flotilla-node`), its advertised address, and loopback, so that clients reach
//! it by IP over https.

use std::path::{Path, PathBuf};

use flotilla_raft::tls::{node_dns_name, NodeTls, NODE_SERVER_NAME};
use flotilla_raft::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";
const CA_NAME: &str = "Flotilla cluster CA";
/// How long a node certificate is valid.
pub const NODE_CERT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
/// A node renews its certificate at start when less than this is left.
pub const RENEW_BEFORE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// How long the cluster CA is valid.
const CA_VALIDITY: std::time::Duration = std::time::Duration::from_secs(20 * 365 * 24 * 3600);
/// A certificate is valid from a little before it is signed, for clocks a little behind.
const CLOCK_SKEW_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(3600);
/// Test hook: `FLOTILLA_TEST_HOOK_NODE_CERT_VALIDITY_DAYS` makes the certificates this node
/// signs valid for that many days instead of [`NODE_CERT_VALIDITY`]. Tests only.
const TEST_HOOK_VALIDITY_ENV: &str = "FLOTILLA_TEST_HOOK_NODE_CERT_VALIDITY_DAYS";

/// How long the node certificates this node signs are valid.
pub fn node_cert_validity() -> std::time::Duration {
    match std::env::var(TEST_HOOK_VALIDITY_ENV)
        .ok()
        .map(|days| days.trim().parse::<u64>())
    {
        Some(Ok(days)) => {
            tracing::warn!(
                days,
                "test hook: node certificates signed here are valid for {days} days"
            );
            std::time::Duration::from_secs(days * 24 * 3600)
        }
        Some(Err(error)) => {
            tracing::warn!(%error, "{TEST_HOOK_VALIDITY_ENV} is not a number of days; ignored");
            NODE_CERT_VALIDITY
        }
        None => NODE_CERT_VALIDITY,
    }
}

#[derive(thiserror::Error, Debug)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} exists but {missing} does not: the node's TLS files are incomplete; restore them or start from an empty data dir")]
    Incomplete { path: PathBuf, missing: PathBuf },
    #[error("{0}")]
    Sealed(String),
}

fn certificate_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Certificate { what, source }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let written = if private {
        super::write_private_file(path, contents).map_err(|error| error.to_string())
    } else {
        std::fs::write(path, contents).map_err(|error| error.to_string())
    };
    written.map_err(|reason| PkiError::Write {
        path: path.to_path_buf(),
        reason,
    })
}

/// The parameters of the CA certificate. The issuer is rebuilt from them and the stored key
/// (the same name and key identifier), so the CA certificate never needs parsing. The name
/// carries a digest of the CA's public key, so that two clusters' CAs have different names
/// and a certificate of one is told apart as of an unknown issuer, not a bad signature.
fn ca_params(key: &KeyPair) -> CertificateParams {
    use sha2::Digest as _;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    let key_digest = hex::encode(sha2::Sha256::digest(key.public_key_raw()));
    name.push(DnType::CommonName, format!("{CA_NAME} {}", &key_digest[..16]));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive number
    SerialNumber::from_slice(&bytes)
}

/// The cluster CA, held by the node that created it.
pub struct ClusterCa {
    key: KeyPair,
    pub ca_pem: String,
}

impl ClusterCa {
    /// Creates a new CA in `data_dir` (`ca.pem`, `ca.key` with mode 0600).
    pub fn create(data_dir: &Path) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate().map_err(certificate_error("cannot generate the CA key"))?;
        let mut params = ca_params(&key);
        params.serial_number = Some(random_serial());
        (params.not_before, params.not_after) = validity(CA_VALIDITY);
        let certificate = params
            .self_signed(&key)
            .map_err(certificate_error("cannot sign the CA certificate"))?;
        write(&data_dir.join(CA_KEY_FILE), &key.serialize_pem(), true)?;
        write(&data_dir.join(CA_CERT_FILE), &certificate.pem(), false)?;
        tracing::info!(path = %data_dir.join(CA_CERT_FILE).display(), "created the cluster CA");
        Ok(ClusterCa {
            key,
            ca_pem: certificate.pem(),
        })
    }

    /// The CA this data dir holds the key of, if any.
    pub fn load(data_dir: &Path) -> Result<Option<ClusterCa>, PkiError> {
        let key_path = data_dir.join(CA_KEY_FILE);
        if !key_path.exists() {
            return Ok(None);
        }
        let key = KeyPair::from_pem(&read(&key_path)?)
            .map_err(certificate_error(format!("{} holds no usable key", key_path.display())))?;
        let cert_path = data_dir.join(CA_CERT_FILE);
        if !cert_path.exists() {
            return Err(PkiError::Incomplete {
                path: key_path,
                missing: cert_path,
            });
        }
        Ok(Some(ClusterCa {
            key,
            ca_pem: read(&cert_path)?,
        }))
    }

    /// The CA the cluster recorded, its key opened with the cluster's key-encryption key.
    pub fn open_replicated(
        record: &flotilla_raft::secrets::ClusterCaRecord,
        kek: &flotilla_actors::secrets::Kek,
    ) -> Result<ClusterCa, PkiError> {
        let key_pem = kek
            .open(
                &flotilla_raft::SecretScope::Cluster,
                flotilla_raft::secrets::CLUSTER_CA_KEY_NAME,
                &record.sealed_key,
            )
            .map_err(|error| PkiError::Sealed(format!("cannot open the cluster CA key: {error}")))?;
        let key = KeyPair::from_pem(&key_pem).map_err(certificate_error("the recorded CA key is not a usable key"))?;
        Ok(ClusterCa {
            key,
            ca_pem: record.ca_pem.clone(),
        })
    }

    /// The CA as the cluster records it: the key sealed under `kek`, never in the clear.
    pub fn seal(&self, kek: &flotilla_actors::secrets::Kek) -> flotilla_raft::secrets::ClusterCaRecord {
        flotilla_raft::secrets::ClusterCaRecord {
            ca_pem: self.ca_pem.clone(),
            sealed_key: kek.seal(
                &flotilla_raft::SecretScope::Cluster,
                flotilla_raft::secrets::CLUSTER_CA_KEY_NAME,
                self.key.serialize_pem().as_bytes(),
            ),
        }
    }

    /// Removes `DATA_DIR/ca.key` once the cluster holds the key sealed: from then on the key
    /// is nowhere in the clear.
    pub fn remove_key_file(data_dir: &Path) -> Result<(), PkiError> {
        let path = data_dir.join(CA_KEY_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(PkiError::Write {
                path,
                reason: error.to_string(),
            }),
        }
    }

    /// A certificate and new key for node `node_id`, reachable at `host` (the IP or name it
    /// advertises), valid as both a server and a client for [`node_cert_validity`].
    pub fn issue(&self, node_id: NodeId, host: &str) -> Result<NodeTls, PkiError> {
        let mut names = vec![
            NODE_SERVER_NAME.to_string(),
            node_dns_name(node_id),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !host.is_empty() && !names.iter().any(|name| name == host) {
            names.push(host.to_string());
        }
        let mut params = CertificateParams::new(names)
            .map_err(certificate_error(format!("cannot name node {node_id} at {host:?}")))?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, node_dns_name(node_id));
        params.distinguished_name = subject;
        params.serial_number = Some(random_serial());
        (params.not_before, params.not_after) = validity(node_cert_validity());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let node_key = KeyPair::generate().map_err(certificate_error("cannot generate a node key"))?;
        let issuer = Issuer::new(ca_params(&self.key), &self.key);
        let certificate = params.signed_by(&node_key, &issuer).map_err(certificate_error(format!(
            "cannot sign the certificate of node {node_id}"
        )))?;
        Ok(NodeTls {
            node_id,
            ca_pem: self.ca_pem.clone(),
            certificate_pem: certificate.pem(),
            private_key_pem: node_key.serialize_pem(),
        })
    }
}

/// From a little before now to `length` after now.
fn validity(length: std::time::Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - CLOCK_SKEW_ALLOWANCE, now + length)
}

/// Seconds until the node's certificate expires (negative once it has).
pub fn seconds_left(tls: &NodeTls) -> Result<i64, PkiError> {
    let not_after = flotilla_raft::tls::certificate_not_after("the node certificate", &tls.certificate_pem)
        .map_err(|error| PkiError::Sealed(error.to_string()))?;
    Ok(not_after - time::OffsetDateTime::now_utc().unix_timestamp())
}

/// Why the node's certificate must be renewed at start, if it must: less than
/// [`RENEW_BEFORE`] left, or it does not name the IP the node now advertises.
pub fn renewal_reason(tls: &NodeTls, host: &str) -> Result<Option<String>, PkiError> {
    let left_s = seconds_left(tls)?;
    if left_s < RENEW_BEFORE.as_secs() as i64 {
        return Ok(Some(if left_s <= 0 {
            format!("it expired {} s ago", -left_s)
        } else {
            format!("it expires in {} days", left_s / (24 * 3600))
        }));
    }
    let names_host = match host.parse::<std::net::IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => {
            let (chain, _) = tls
                .chain_and_key()
                .map_err(|error| PkiError::Sealed(error.to_string()))?;
            flotilla_raft::tls::names_ip(&chain[0], ip)
        }
        _ => true,
    };
    Ok((!names_host).then(|| format!("it does not name the advertised address {host}")))
}

/// The node's TLS files, if it has them all.
pub fn load_node_tls(data_dir: &Path, node_id: NodeId) -> Result<Option<NodeTls>, PkiError> {
    let paths = [CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE].map(|name| data_dir.join(name));
    let present: Vec<&PathBuf> = paths.iter().filter(|path| path.exists()).collect();
    if present.is_empty() {
        return Ok(None);
    }
    if let Some(missing) = paths.iter().find(|path| !path.exists()) {
        // ca.pem alone is what a CA holder has before it signed its own certificate.
        if present.len() > 1 || !present[0].ends_with(CA_CERT_FILE) {
            return Err(PkiError::Incomplete {
                path: present[0].clone(),
                missing: missing.clone(),
            });
        }
        return Ok(None);
    }
    Ok(Some(NodeTls {
        node_id,
        ca_pem: read(&paths[0])?,
        certificate_pem: read(&paths[1])?,
        private_key_pem: read(&paths[2])?,
    }))
}

/// Keeps the node's TLS files: the CA certificate, its own certificate and (mode 0600) key.
pub fn save_node_tls(data_dir: &Path, tls: &NodeTls) -> Result<(), PkiError> {
    write(&data_dir.join(NODE_KEY_FILE), &tls.private_key_pem, true)?;
    write(&data_dir.join(NODE_CERT_FILE), &tls.certificate_pem, false)?;
    write(&data_dir.join(CA_CERT_FILE), &tls.ca_pem, false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_names_its_node_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(dir.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
        let node = ca.issue(7, "10.1.2.3").unwrap();
        let (chain, _key) = node.chain_and_key().unwrap();
        assert!(flotilla_raft::tls::names_node(&chain[0], 7));
        assert!(!flotilla_raft::tls::names_node(&chain[0], 8));
        // Reloaded from its files, the CA signs certificates that the same CA accepts.
        let reloaded = ClusterCa::load(dir.path()).unwrap().unwrap();
        let other = reloaded.issue(8, "10.1.2.4").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(node.ca().unwrap()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            flotilla_raft::tls::provider(),
        )
        .build()
        .unwrap();
        let (other_chain, _) = other.chain_and_key().unwrap();
        verifier
            .verify_client_cert(&other_chain[0], &[], rustls::pki_types::UnixTime::now())
            .expect("a certificate of the reloaded CA is valid under the CA");
        let stranger = ClusterCa::create(tempfile::tempdir().unwrap().path())
            .unwrap()
            .issue(9, "10.1.2.5")
            .unwrap();
        let (stranger_chain, _) = stranger.chain_and_key().unwrap();
        assert!(verifier
            .verify_client_cert(&stranger_chain[0], &[], rustls::pki_types::UnixTime::now())
            .is_err());
    }
}
