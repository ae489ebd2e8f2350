//! Backups of the replicated state: one file an operator keeps, and the checks a restore runs on
//! it before anything is written.
//!
//! A backup is the body of a Raft snapshot (the whole [`ClusterState`] at one applied index,
//! encoded with postcard: agents, events, checkpoints, plugins and their bytes, settings, teams,
//! key digests, sealed secrets, audit) behind a header that says what it is:
//!
//! ```text
//! magic "FLOTILLA-BACKUP\n" (16 bytes)
//! format version   u32, big-endian
//! header length    u32, big-endian (at most MAX_HEADER_BYTES)
//! header           JSON (BackupHeader: cluster id, applied index and term, creation time,
//!                  state format version, key-encryption key id, body length and SHA-256)
//! header SHA-256   32 bytes, over every byte before it
//! body             `body_bytes` bytes, hashing to `body_sha256`
//! ```
//!
//! The header has its own digest so that a flipped bit in it (an index, a length) is named as
//! such; the body's digest is in the header so that the whole file is checked in one pass.
//! [`verify_backup`] checks, in order, the magic, the format version, the header's length and
//! digest, the file's length against the header's, the body's digest, the state format, and
//! only then decodes the body: a truncated or corrupt file is refused naming the check that
//! failed and what it expected and found.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::snapshot::{encode_records, EncodedRecords, SnapshotBody};
use super::state_machine::StateReader;
use super::OpenError;
use crate::ClusterState;

pub const BACKUP_MAGIC: &[u8; 16] = b"FLOTILLA-BACKUP\n";
/// The layout above. A reader refuses any other.
pub const BACKUP_FORMAT_VERSION: u32 = 1;
/// Bound on the JSON header, so that a corrupt length cannot make a reader allocate much.
pub const MAX_HEADER_BYTES: u32 = 64 * 1024;
const DIGEST_BYTES: usize = 32;
/// Magic, format version, header length.
const PREAMBLE_BYTES: usize = 16 + 4 + 4;

/// What a backup says about itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackupHeader {
    /// The cluster it was taken from (its CA fingerprint).
    pub cluster_id: String,
    /// The applied log index the state stands for.
    pub applied_index: u64,
    pub applied_term: u64,
    pub created_at_ms: u64,
    /// [`crate::STATE_FORMAT_VERSION`] of the node that took it.
    pub state_format_version: u32,
    /// The id of the key-encryption key its secrets are sealed under, if the node held one.
    pub kek_id: Option<String>,
    pub body_bytes: u64,
    /// Lowercase hex.
    pub body_sha256: String,
    /// Counts, for people reading the header.
    pub agents: u64,
    pub plugins: u64,
    pub secrets: u64,
}

/// A backup taken from a running node: the file's first bytes and its body.
pub struct Backup {
    pub header: BackupHeader,
    /// Magic through header digest.
    pub prefix: Vec<u8>,
    pub body: Vec<u8>,
}

impl Backup {
    /// Every byte of the file, in order.
    pub fn len_bytes(&self) -> u64 {
        (self.prefix.len() + self.body.len()) as u64
    }
}

/// A backup that passed every check, decoded.
pub struct VerifiedBackup {
    pub header: BackupHeader,
    pub state: ClusterState,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot read backup {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a flotilla backup: the file starts with {found:?}, expected {expected:?}")]
    Magic { expected: String, found: String },
    #[error("truncated backup: the {part} ends at byte {expected}, the file has {found} bytes")]
    Truncated {
        part: &'static str,
        expected: u64,
        found: u64,
    },
    #[error("backup format version {found} is not supported: this binary reads version {supported}")]
    FormatVersion { found: u32, supported: u32 },
    #[error("corrupt backup: the header length is {found} bytes, at most {limit} are allowed")]
    HeaderTooLarge { found: u32, limit: u32 },
    #[error("corrupt backup: the header's SHA-256 is {found}, expected {expected}")]
    HeaderChecksum { expected: String, found: String },
    #[error("corrupt backup: the header does not parse: {message}")]
    Header { message: String },
    #[error("corrupt backup: {found} bytes follow the header, the header announces {expected}")]
    BodyLength { expected: u64, found: u64 },
    #[error("corrupt backup: the body's SHA-256 is {found}, the header says {expected}")]
    BodyChecksum { expected: String, found: String },
    #[error(
        "the backup holds state format {found}, newer than this binary's {supported}: restore it with a newer flotilla"
    )]
    StateFormat { found: u32, supported: u32 },
    #[error("corrupt backup: the body does not decode as a cluster state: {message}")]
    Body { message: String },
}

impl StateReader {
    /// Encodes the whole state at one applied index, read from the state's records through a
    /// RocksDB snapshot (no lock on the in-memory state, so applies and the answers that wait
    /// for them go on while a large state encodes). An applied batch is written before its
    /// index is published, so a caller that passed a read barrier first has every
    /// acknowledged write in it.
    pub fn take_backup(&self, cluster_id: &str, kek_id: Option<String>, now_ms: u64) -> Result<Backup, OpenError> {
        let view = self.db.snapshot();
        let EncodedRecords {
            data: body,
            last_applied: applied,
            agents,
            plugins,
            secrets,
            ..
        } = encode_records(&self.db, &view)?;
        drop(view);
        let header = BackupHeader {
            cluster_id: cluster_id.to_string(),
            applied_index: applied.map_or(0, |log_id| log_id.index),
            applied_term: applied.map_or(0, |log_id| log_id.leader_id.term),
            created_at_ms: now_ms,
            state_format_version: crate::STATE_FORMAT_VERSION,
            kek_id,
            body_bytes: body.len() as u64,
            body_sha256: hex::encode(Sha256::digest(&body)),
            agents,
            plugins,
            secrets,
        };
        let prefix = encode_prefix(&header);
        Ok(Backup { header, prefix, body })
    }
}

/// Magic, version, header length, header and its digest.
fn encode_prefix(header: &BackupHeader) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("a header serialises to JSON");
    let mut prefix = Vec::with_capacity(PREAMBLE_BYTES + json.len() + DIGEST_BYTES);
    prefix.extend_from_slice(BACKUP_MAGIC);
    prefix.extend_from_slice(&BACKUP_FORMAT_VERSION.to_be_bytes());
    prefix.extend_from_slice(&(json.len() as u32).to_be_bytes());
    prefix.extend_from_slice(&json);
    let digest = Sha256::digest(&prefix);
    prefix.extend_from_slice(&digest);
    prefix
}

/// Reads and checks a backup file (blocking: call it off the async runtime).
pub fn read_backup(path: &Path) -> Result<VerifiedBackup, BackupError> {
    let bytes = std::fs::read(path).map_err(|source| BackupError::Io {
        path: path.display().to_string(),
        source,
    })?;
    verify_backup(&bytes)
}

fn need(bytes: &[u8], part: &'static str, end: usize) -> Result<(), BackupError> {
    if bytes.len() < end {
        return Err(BackupError::Truncated {
            part,
            expected: end as u64,
            found: bytes.len() as u64,
        });
    }
    Ok(())
}

/// Checks a whole backup and decodes it; see the module docs for the order of the checks.
pub fn verify_backup(bytes: &[u8]) -> Result<VerifiedBackup, BackupError> {
    need(bytes, "magic", BACKUP_MAGIC.len())?;
    if &bytes[..BACKUP_MAGIC.len()] != BACKUP_MAGIC {
        return Err(BackupError::Magic {
            expected: String::from_utf8_lossy(BACKUP_MAGIC).into_owned(),
            found: String::from_utf8_lossy(&bytes[..BACKUP_MAGIC.len()]).into_owned(),
        });
    }
    need(bytes, "preamble", PREAMBLE_BYTES)?;
    let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
    let version = word(16);
    if version != BACKUP_FORMAT_VERSION {
        return Err(BackupError::FormatVersion {
            found: version,
            supported: BACKUP_FORMAT_VERSION,
        });
    }
    let header_len = word(20);
    if header_len > MAX_HEADER_BYTES {
        return Err(BackupError::HeaderTooLarge {
            found: header_len,
            limit: MAX_HEADER_BYTES,
        });
    }
    let header_end = PREAMBLE_BYTES + header_len as usize;
    need(bytes, "header", header_end + DIGEST_BYTES)?;
    let expected = hex::encode(&bytes[header_end..header_end + DIGEST_BYTES]);
    let found = hex::encode(Sha256::digest(&bytes[..header_end]));
    if expected != found {
        return Err(BackupError::HeaderChecksum { expected, found });
    }
    let header: BackupHeader =
        serde_json::from_slice(&bytes[PREAMBLE_BYTES..header_end]).map_err(|error| BackupError::Header {
            message: error.to_string(),
        })?;
    let body = &bytes[header_end + DIGEST_BYTES..];
    if (body.len() as u64) < header.body_bytes {
        return Err(BackupError::Truncated {
            part: "body",
            expected: (header_end + DIGEST_BYTES) as u64 + header.body_bytes,
            found: bytes.len() as u64,
        });
    }
    if body.len() as u64 != header.body_bytes {
        return Err(BackupError::BodyLength {
            expected: header.body_bytes,
            found: body.len() as u64,
        });
    }
    let found = hex::encode(Sha256::digest(body));
    if found != header.body_sha256 {
        return Err(BackupError::BodyChecksum {
            expected: header.body_sha256.clone(),
            found,
        });
    }
    if header.state_format_version > crate::STATE_FORMAT_VERSION {
        return Err(BackupError::StateFormat {
            found: header.state_format_version,
            supported: crate::STATE_FORMAT_VERSION,
        });
    }
    let decoded: SnapshotBody = postcard::from_bytes(body).map_err(|error| BackupError::Body {
        message: error.to_string(),
    })?;
    let mut state = decoded.state;
    state.rebuild_indexes();
    Ok(VerifiedBackup { header, state })
}

/// Writes a restored state into a new, empty store at `dir` as its only records, with no applied
/// position and no membership: the node then initialises a new cluster of its own over it (its
/// first log entry is the new membership), so nothing of the old cluster's log is replayed.
pub fn restore_state(dir: &Path, state: ClusterState) -> Result<(), super::OpenError> {
    let (log, machine) = super::open(dir)?;
    let body = SnapshotBody {
        last_applied: None,
        membership: Default::default(),
        state,
    };
    machine
        .replace_state(body)
        .map_err(|error| super::OpenError::Database {
            dir: dir.display().to_string(),
            message: error.to_string(),
        })?;
    drop(log);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_log, machine) = super::super::open(dir.path()).expect("open");
        let backup = machine
            .reader()
            .take_backup("cluster-a", Some("kek1".to_string()), 42)
            .expect("reads the state");
        [backup.prefix, backup.body].concat()
    }

    #[test]
    fn a_backup_verifies_and_names_what_it_holds() {
        let bytes = sample();
        let verified = verify_backup(&bytes).expect("verifies");
        assert_eq!(verified.header.cluster_id, "cluster-a");
        assert_eq!(verified.header.created_at_ms, 42);
        assert_eq!(verified.header.kek_id.as_deref(), Some("kek1"));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for length in 0..bytes.len() {
            let error = verify_backup(&bytes[..length]).err().expect("refused");
            assert!(
                matches!(error, BackupError::Truncated { .. }),
                "cut at {length}: {error}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = sample();
        for index in 0..bytes.len() {
            for bit in [0u8, 3, 7] {
                let mut corrupt = bytes.clone();
                corrupt[index] ^= 1 << bit;
                assert!(verify_backup(&corrupt).is_err(), "byte {index} bit {bit} passed");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = sample();
        bytes.push(0);
        let error = verify_backup(&bytes).err().expect("refused");
        assert!(matches!(error, BackupError::BodyLength { .. }), "{error}");
    }
}
