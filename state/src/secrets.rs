//! Replicated secrets: only sealed bytes (a value encrypted under a data key, the data key
//! wrapped under the cluster's key-encryption key) ever enter the log, the store or a snapshot.
//! Sealing and opening happen on the nodes (`flotilla_actors::secrets`); this crate only keeps
//! the records and bounds them.

use serde::{Deserialize, Serialize};

/// Longest secret name; names are environment variable names.
pub const MAX_SECRET_NAME_BYTES: usize = 128;
/// Largest secret value (before sealing).
pub const MAX_SECRET_VALUE_BYTES: usize = 32 * 1024;
/// Largest sealed part (ciphertext or wrapped key), with room for nonces and tags.
pub const MAX_SEALED_BYTES: usize = MAX_SECRET_VALUE_BYTES + 256;
/// Most secrets the cluster keeps, all scopes together.
pub const MAX_SECRETS: usize = 4096;

/// Who a secret belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretScope {
    /// The node-level secrets every node may use (model keys, git credentials, plugin tokens).
    Cluster,
    /// Every machine of the team's agents gets it.
    Team { team: String },
    /// The machines of one user's agents in a team get it.
    User { team: String, user: String },
}

impl std::fmt::Display for SecretScope {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretScope::Cluster => write!(formatter, "cluster"),
            SecretScope::Team { team } => write!(formatter, "team:{team}"),
            SecretScope::User { team, user } => write!(formatter, "user:{team}/{user}"),
        }
    }
}

/// A value sealed by envelope encryption: `ciphertext` under a random data key, the data key
/// in `wrapped_key` under the key-encryption key named by `kek_id`. Both carry their nonce
/// first; both are bound to the scope and the name by their associated data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SealedSecret {
    pub kek_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretRecord {
    pub scope: SecretScope,
    pub name: String,
    pub sealed: SealedSecret,
    pub updated_at_ms: u64,
    /// The principal that wrote it.
    pub updated_by: String,
}

/// A team or user secret's name must be an environment variable name (it becomes one in
/// machines); a cluster secret's is a plain word as node settings name it (`github-token`).
pub fn validate_secret_name(scope: &SecretScope, name: &str) -> Result<(), String> {
    if *scope == SecretScope::Cluster {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name.len() <= MAX_SECRET_NAME_BYTES
            && name
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || matches!(character, '_' | '-' | '.'));
        return if plain {
            Ok(())
        } else {
            Err(format!(
                "cluster secret name {name:?} must be letters, digits, `_`, `-` or `.`, not starting with `.`, at most {MAX_SECRET_NAME_BYTES} bytes"
            ))
        };
    }
    let mut characters = name.chars();
    let first_ok = characters
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
    if !first_ok
        || !name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || character == '_')
    {
        return Err(format!(
            "secret name {name:?} must be an environment variable name: a letter or `_`, then letters, digits or `_`"
        ));
    }
    if name.len() > MAX_SECRET_NAME_BYTES {
        return Err(format!(
            "secret name is {} bytes; the most is {MAX_SECRET_NAME_BYTES}",
            name.len()
        ));
    }
    Ok(())
}

/// A scope's team and user must be non-empty when present.
pub fn validate_secret_scope(scope: &SecretScope) -> Result<(), String> {
    match scope {
        SecretScope::Cluster => Ok(()),
        SecretScope::Team { team } if team.is_empty() => Err("a team secret needs a team".to_string()),
        SecretScope::User { team, user } if team.is_empty() || user.is_empty() => {
            Err("a user secret needs a team and a user".to_string())
        }
        _ => Ok(()),
    }
}

pub fn validate_sealed(sealed: &SealedSecret) -> Result<(), String> {
    for (what, bytes) in [("ciphertext", &sealed.ciphertext), ("wrapped key", &sealed.wrapped_key)] {
        if bytes.is_empty() || bytes.len() > MAX_SEALED_BYTES {
            return Err(format!(
                "sealed {what} is {} bytes; it must be between 1 and {MAX_SEALED_BYTES}",
                bytes.len()
            ));
        }
    }
    if sealed.kek_id.is_empty() || sealed.kek_id.len() > 64 {
        return Err("the sealed secret names no key-encryption key".to_string());
    }
    Ok(())
}

/// Largest CA certificate the cluster records (PEM).
pub const MAX_CA_PEM_BYTES: usize = 16 * 1024;
/// The name the CA key is sealed under (cluster scope): a cluster secret's name cannot start
/// with `.`, so no secret an admin sets can be opened as the CA key or the other way round.
pub const CLUSTER_CA_KEY_NAME: &str = ".cluster-ca.key";

/// The cluster CA as the cluster keeps it: the certificate in the clear, the private key (PEM)
/// sealed under the key-encryption key like a secret of the cluster scope named
/// [`CLUSTER_CA_KEY_NAME`]. Every member holds the key-encryption key, so every member can sign.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterCaRecord {
    pub ca_pem: String,
    pub sealed_key: SealedSecret,
}

pub fn validate_cluster_ca(record: &ClusterCaRecord) -> Result<(), String> {
    if record.ca_pem.is_empty() || record.ca_pem.len() > MAX_CA_PEM_BYTES {
        return Err(format!(
            "the CA certificate is {} bytes; it must be between 1 and {MAX_CA_PEM_BYTES}",
            record.ca_pem.len()
        ));
    }
    validate_sealed(&record.sealed_key)
}
