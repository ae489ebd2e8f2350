//! Envelope encryption of replicated secrets. Each value is encrypted under a random data key
//! (XChaCha20-Poly1305, random 192-bit nonce); the data key is encrypted ("wrapped") under the
//! cluster's key-encryption key (KEK), which never leaves the nodes' data dirs. Both
//! encryptions take as associated data the secret's scope and name, so a sealed value moved to
//! another name or team does not open.

use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use flotilla_raft::{SealedSecret, SecretScope};
use sha2::{Digest, Sha256};

/// The KEK's file in a node's data dir (hex, mode 0600).
pub const KEK_FILE: &str = "kek";
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("secret {name} ({scope}) was sealed under key-encryption key {sealed}, but this node holds {held}: the node's {KEK_FILE} file is not the cluster's")]
    WrongKek {
        scope: String,
        name: String,
        sealed: String,
        held: String,
    },
    #[error("secret {name} ({scope}) does not open: its sealed bytes were altered or belong to another name or scope")]
    Refused { scope: String, name: String },
    #[error("secret {name} ({scope}) is not valid UTF-8 text")]
    NotText { scope: String, name: String },
    #[error("key-encryption key file {path}: {reason}")]
    KekFile { path: String, reason: String },
}

/// The cluster's key-encryption key.
#[derive(Clone)]
pub struct Kek {
    key: [u8; KEY_BYTES],
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Kek").field("id", &self.id).finish()
    }
}

impl Kek {
    pub fn generate() -> Kek {
        Kek::from_bytes(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    pub fn from_bytes(key: [u8; KEY_BYTES]) -> Kek {
        let digest = Sha256::new_with_prefix(b"flotilla-kek-id\0")
            .chain_update(key)
            .finalize();
        Kek {
            key,
            id: hex::encode(&digest[..8]),
        }
    }

    pub fn from_hex(text: &str) -> Option<Kek> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(Kek::from_bytes(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.key)
    }

    /// A short public name of the key (not the key): sealed values record it, so that a node
    /// holding another key says so instead of failing to open.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads `DATA_DIR/kek`; `None` when there is none. Blocking: call off the async threads.
    pub fn load(data_dir: &Path) -> Result<Option<Kek>, EnvelopeError> {
        let path = data_dir.join(KEK_FILE);
        let failed = |reason: String| EnvelopeError::KekFile {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Kek::from_hex(&text)
                .map(Some)
                .ok_or_else(|| failed("does not hold 32 bytes in hex".to_string())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(failed(error.to_string())),
        }
    }

    /// Writes the key to `DATA_DIR/kek`, owner-only, through a temporary file and a rename.
    /// Blocking: call off the async threads.
    pub fn store(&self, data_dir: &Path) -> Result<(), EnvelopeError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(KEK_FILE);
        let temporary = data_dir.join(format!("{KEK_FILE}.tmp"));
        let failed = |error: std::io::Error| EnvelopeError::KekFile {
            path: path.display().to_string(),
            reason: error.to_string(),
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(failed)?;
        file.write_all(self.to_hex().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(failed)?;
        std::fs::rename(&temporary, &path).map_err(failed)
    }

    /// Seals `value` as secret `name` of `scope`.
    pub fn seal(&self, scope: &SecretScope, name: &str, value: &[u8]) -> SealedSecret {
        let data = associated_data(scope, name);
        let data_key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let ciphertext = encrypt(&XChaCha20Poly1305::new(&data_key), value, &data);
        let wrapped_key = encrypt(&self.cipher(), data_key.as_slice(), &wrap_data(&data));
        SealedSecret {
            kek_id: self.id.clone(),
            wrapped_key,
            ciphertext,
        }
    }

    /// Opens secret `name` of `scope`: refused when the bytes were altered, or sealed for
    /// another scope or name, or under another key.
    pub fn open(&self, scope: &SecretScope, name: &str, sealed: &SealedSecret) -> Result<String, EnvelopeError> {
        if sealed.kek_id != self.id {
            return Err(EnvelopeError::WrongKek {
                scope: scope.to_string(),
                name: name.to_string(),
                sealed: sealed.kek_id.clone(),
                held: self.id.clone(),
            });
        }
        let refused = || EnvelopeError::Refused {
            scope: scope.to_string(),
            name: name.to_string(),
        };
        let data = associated_data(scope, name);
        let data_key = decrypt(&self.cipher(), &sealed.wrapped_key, &wrap_data(&data)).ok_or_else(refused)?;
        let data_key: [u8; KEY_BYTES] = data_key.try_into().map_err(|_| refused())?;
        let value =
            decrypt(&XChaCha20Poly1305::new(&data_key.into()), &sealed.ciphertext, &data).ok_or_else(refused)?;
        String::from_utf8(value).map_err(|_| EnvelopeError::NotText {
            scope: scope.to_string(),
            name: name.to_string(),
        })
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.key.into())
    }
}

/// What binds a sealed value to its place: a version tag, the scope and the name, encoded
/// with lengths so that no two places share it.
fn associated_data(scope: &SecretScope, name: &str) -> Vec<u8> {
    postcard::to_allocvec(&("flotilla-secret-v1", scope, name)).expect("encoding a scope and a name cannot fail")
}

/// The wrapped key's associated data differs from the value's, so neither can stand in for the other.
fn wrap_data(data: &[u8]) -> Vec<u8> {
    [b"wrap\0".as_slice(), data].concat()
}

fn encrypt(cipher: &XChaCha20Poly1305, plaintext: &[u8], data: &[u8]) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: data,
            },
        )
        .expect("encryption in memory does not fail");
    [nonce.as_slice(), &sealed].concat()
}

fn decrypt(cipher: &XChaCha20Poly1305, sealed: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_BYTES {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_BYTES);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad: data })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team(name: &str) -> SecretScope {
        SecretScope::Team { team: name.to_string() }
    }

    #[test]
    fn a_sealed_value_opens_under_its_own_scope_and_name() {
        let kek = Kek::generate();
        let sealed = kek.seal(&team("red"), "API_TOKEN", b"s3cr3t-value");
        assert_eq!(kek.open(&team("red"), "API_TOKEN", &sealed).unwrap(), "s3cr3t-value");
        let text = format!("{sealed:?}");
        assert!(!text.contains("s3cr3t"), "the sealed form shows the value: {text}");
    }

    #[test]
    fn a_sealed_value_moved_to_another_name_or_scope_is_refused() {
        let kek = Kek::generate();
        let sealed = kek.seal(&team("red"), "API_TOKEN", b"s3cr3t-value");
        for (scope, name) in [
            (team("blue"), "API_TOKEN"),
            (team("red"), "OTHER"),
            (SecretScope::Cluster, "API_TOKEN"),
            (
                SecretScope::User {
                    team: "red".to_string(),
                    user: "API_TOKEN".to_string(),
                },
                "API_TOKEN",
            ),
        ] {
            assert!(
                matches!(kek.open(&scope, name, &sealed), Err(EnvelopeError::Refused { .. })),
                "opened as {scope} {name}"
            );
        }
    }

    #[test]
    fn tampered_bytes_and_another_key_are_refused() {
        let kek = Kek::generate();
        let sealed = kek.seal(&team("red"), "API_TOKEN", b"s3cr3t-value");
        for flip in [0, NONCE_BYTES, sealed.ciphertext.len() - 1] {
            let mut tampered = sealed.clone();
            tampered.ciphertext[flip] ^= 1;
            assert!(matches!(
                kek.open(&team("red"), "API_TOKEN", &tampered),
                Err(EnvelopeError::Refused { .. })
            ));
        }
        let mut tampered = sealed.clone();
        tampered.wrapped_key[NONCE_BYTES + 1] ^= 1;
        assert!(kek.open(&team("red"), "API_TOKEN", &tampered).is_err());
        let other = Kek::generate();
        let error = other.open(&team("red"), "API_TOKEN", &sealed).unwrap_err();
        assert!(matches!(error, EnvelopeError::WrongKek { .. }), "{error}");
        // Even with the id forged, another key does not open it.
        let mut forged = sealed.clone();
        forged.kek_id = other.id().to_string();
        assert!(matches!(
            other.open(&team("red"), "API_TOKEN", &forged),
            Err(EnvelopeError::Refused { .. })
        ));
    }

    #[test]
    fn the_key_file_round_trips_and_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(Kek::load(dir.path()).unwrap().is_none());
        let kek = Kek::generate();
        kek.store(dir.path()).unwrap();
        let loaded = Kek::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.id(), kek.id());
        let mode = std::fs::metadata(dir.path().join(KEK_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
