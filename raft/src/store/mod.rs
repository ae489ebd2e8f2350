//! openraft storage: the log in segment files of its own (`segments`), and the state machine,
//! the vote and the log's marks in RocksDB (separate column families).
//!
//! Log entries are written to their segment at once (readable for replication) and made
//! durable by a sync of it before anything depends on them, so no client is answered before its
//! entry is on disk: a follower's append is synced in place before openraft hears it is
//! flushed; a leader's own proposals are synced by a flusher thread while they travel, and
//! every proposal written while a sync runs is covered by the next one (group commit).
//!
//! The state machine keeps the whole [`ClusterState`](crate::ClusterState) in memory for reads
//! and writes every record an entry touched to RocksDB in the same batch as the applied log id
//! (without RocksDB's write-ahead log: the Raft log is the state's, and the state's records are
//! flushed to tables before any log is purged).
//!
//! - `log_store`: openraft's log (entries, vote, committed and purged marks);
//! - `segments`: the log's entries in append-only files, framed with checksums;
//! - `recent`: the newest entries in memory, for the replication tasks;
//! - `flusher`: the thread that syncs the log for groups of a leader's proposals;
//! - `state_machine`: the in-memory state, applying committed entries with
//!   [`flotilla_state::apply`], and the readers the node serves from;
//! - `state_layout`: how the state's records are keyed in the state column family, written and
//!   loaded;
//! - `snapshot`: building, storing and installing snapshots of the whole state;
//! - `backup`: a snapshot's body as an operator's file (header, digests), checked before a
//!   restore writes it into a new store;
//! - `format`: the state format version stamped in a data dir.

// openraft's storage traits return `StorageError` by value; the helpers here return what the
// traits return.
#![allow(clippy::result_large_err)]

pub mod backup;
mod durability;
mod flusher;
pub mod format;
mod log_store;
mod recent;
mod segments;
mod snapshot;
mod state_layout;
mod state_machine;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use openraft::{AnyError, StorageError};
use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use serde::{Deserialize, Serialize};

use crate::NodeId;

pub use durability::Durability;
pub use flusher::MAX_APPENDS_AWAITING_SYNC;
pub use log_store::LogStore;
pub use recent::RecentEntries;
pub use state_machine::{Machine, StateMachineStore, StateReader};

/// What the page cache holds of a file, for tests of what the store lets go of.
#[cfg(test)]
mod page_cache {
    use std::path::Path;

    /// Bytes of `path` in the page cache, by `fincore` (util-linux-extra).
    pub(super) fn cached_bytes(path: &Path) -> u64 {
        let output = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore runs (Debian package util-linux-extra, installed by scripts/setup)");
        assert!(
            output.status.success(),
            "fincore: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a byte count")
    }

    /// Whether `path` is on tmpfs, which keeps every page in memory whatever the advice.
    pub(super) fn on_tmpfs(path: &Path) -> bool {
        // TMPFS_MAGIC, compared as whatever integer type `f_type` has here.
        rustix::fs::statfs(path)
            .map(|stat| stat.f_type == 0x0102_1994)
            .unwrap_or(false)
    }
}

const CF_LOG: &str = "log";
const CF_LOG_META: &str = "log_meta";
const CF_STATE: &str = "state";
const CF_SNAPSHOT: &str = "snapshot";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_APPLIED: &[u8] = b"m/applied";
const KEY_MEMBERSHIP: &[u8] = b"m/membership";
const KEY_HIGHEST_NODE_ID: &[u8] = b"m/highest_node_id";
/// `ClusterState::install_layers`. The key keeps the bytes it had when install layers were
/// called repo snapshots: it is on disk in every node's state column family, and a new name would
/// make a restarted node forget which nodes hold a layer.
const KEY_INSTALL_LAYERS: &[u8] = b"m/repo_snapshots";
const KEY_PLUGIN_SETTINGS: &[u8] = b"m/plugin_settings";
/// Teams: a small map, kept whole under one key like the other cluster-wide values.
const KEY_TEAMS: &[u8] = b"m/teams";
const KEY_JOIN_TOKENS: &[u8] = b"m/join_tokens";
/// `ClusterState::secrets`, sealed, in one record (the cluster keeps at most a few thousand).
const KEY_SECRETS: &[u8] = b"m/secrets";
/// Team settings, by team: small, kept whole under one key.
const KEY_TEAM_SETTINGS: &[u8] = b"m/team_settings";
const KEY_TEAM_LIMITS: &[u8] = b"m/team_limits";
const KEY_DEFAULT_TEAM_LIMITS: &[u8] = b"m/default_team_limits";
const KEY_NEXT_AUDIT_SEQUENCE: &[u8] = b"m/next_audit_sequence";
/// The cluster CA: its certificate and its key sealed under the key-encryption key.
const KEY_CLUSTER_CA: &[u8] = b"m/cluster_ca";
const KEY_REMOVED_NODES: &[u8] = b"m/removed_nodes";
/// Copies of the cluster CA and the removed nodes in the `log_meta` family, written through
/// RocksDB's write-ahead log whenever the state's copies change: a node reads them before its
/// replica opens (to renew its certificate), when a state written without that log may still
/// have to be rebuilt from the Raft log after a crash.
const KEY_PKI_CLUSTER_CA: &[u8] = b"pki/cluster_ca";
const KEY_PKI_REMOVED_NODES: &[u8] = b"pki/removed_nodes";
const KEY_SNAPSHOT: &[u8] = b"current";

/// RocksDB's write-ahead log files a node keeps at most, in bytes, before RocksDB flushes the
/// families that hold the oldest one (what a start after a crash reads back).
const MAX_TOTAL_WAL_BYTES: u64 = 256 * 1024 * 1024;

/// How many applied events a lagging watcher may fall behind before it re-reads from the state.
pub const EVENT_BROADCAST_CAPACITY: usize = 4096;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data dir {dir} is in use by another flotilla process (rocksdb: {message})")]
    InUse { dir: String, message: String },
    #[error("cannot open the database in {dir}: {message}")]
    Database { dir: String, message: String },
    #[error("cannot decode stored record {key}: {message}")]
    Decode { key: String, message: String },
}

/// Records at least this large (an agent's record with its prompt) are kept in blob files.
const MIN_BLOB_BYTES: u64 = 512;

/// The state family keeps its large values in blob files (RocksDB's integrated BlobDB): a
/// compaction then rewrites keys and blob references, not every agent's prompt again at each
/// level. Without it compactions of a state of 100,000+ agents took a fifth of the members'
/// CPU under load (docs/performance.md, "Prompts out of the state's compactions"). Blobs of
/// records that changed since are reclaimed as compactions reach the oldest blob files. Reads
/// need no option: a database written with blob files opens as it is.
fn state_family_options() -> Options {
    let mut options = Options::default();
    options.set_enable_blob_files(true);
    options.set_min_blob_size(MIN_BLOB_BYTES);
    options.set_enable_blob_gc(true);
    options
}

/// Whether files in `dir` take direct (`O_DIRECT`) writes: some file systems refuse them at
/// open (tmpfs before Linux 6.6), others only at the first write, so the probe writes one
/// aligned block.
fn takes_direct_writes(dir: &Path) -> bool {
    /// A buffer aligned as direct I/O needs (the logical block size, 4096 at most here).
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    use rustix::fs::{Mode, OFlags};
    let path = dir.join("DIRECT_IO_PROBE");
    let written = (|| -> std::io::Result<()> {
        let flags = OFlags::CREATE | OFlags::WRONLY | OFlags::TRUNC | OFlags::DIRECT | OFlags::CLOEXEC;
        let file = rustix::fs::open(&path, flags, Mode::from_raw_mode(0o600))?;
        let block = Box::new(Block([0; 4096]));
        rustix::io::write(&file, &block.0)?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    if let Err(error) = &written {
        tracing::info!(dir = %dir.display(), %error, "the state's tables are written through the page cache: no direct writes here");
    }
    written.is_ok()
}

/// Opens (or creates) the node's database and loads the state machine into memory.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    let failed = |message: String| OpenError::Database {
        dir: dir.display().to_string(),
        message,
    };
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Tables and blob files written by flushes and compactions bypass the page cache: nothing
    // reads them back in the usual course (the state is in memory; compactions read their
    // inputs once), and through the cache every byte of state written would grow it, as pages
    // the node's own memory then cannot reuse (docs/performance.md, "The page cache let go
    // of"). Only where the file system takes direct writes.
    std::fs::create_dir_all(dir).map_err(|error| failed(error.to_string()))?;
    options.set_use_direct_io_for_flush_and_compaction(takes_direct_writes(dir));
    // What RocksDB's write-ahead log still takes (the vote and the purge mark, written synced;
    // the cluster-wide copies, synced; the committed mark, not) stays in its buffer until a
    // synced write or a full buffer writes it: a committed mark costs no write(2). A lost
    // committed mark is found again from the synced log after a crash. Applied state records
    // skip this log altogether (see `write_without_stalling`), and the Raft log's entries are
    // in segment files of their own.
    options.set_manual_wal_flush(true);
    // A WAL file is kept until every family's records in it are in tables; past this size
    // RocksDB flushes the families holding the oldest file (a bound on what a start after a
    // crash reads back, should a family's writes ever go through the WAL in bulk again).
    options.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
    let families = [CF_LOG, CF_LOG_META, CF_STATE, CF_SNAPSHOT].into_iter().map(|name| {
        let options = if name == CF_STATE {
            state_family_options()
        } else {
            Options::default()
        };
        ColumnFamilyDescriptor::new(name, options)
    });
    let db = DB::open_cf_descriptors(&options, dir, families).map_err(|error| {
        let message = error.to_string();
        if message.contains("lock") {
            OpenError::InUse {
                dir: dir.display().to_string(),
                message,
            }
        } else {
            failed(message)
        }
    })?;
    let db = Arc::new(db);
    let purged = log_store::purged_mark(&db)?;
    // Whatever the segments hold from an earlier run is synced as they open, so that it all
    // counts as synced.
    let segments = Arc::new(
        segments::Segments::open(&dir.join(segments::SEGMENTS_DIR), purged.map(|log_id| log_id.index))
            .map_err(|error| failed(format!("opening the log: {error}")))?,
    );
    let moved = log_store::move_entries_out_of_rocksdb(&db, &segments)?;
    if moved > 0 {
        tracing::info!(
            entries = moved,
            "moved the Raft log out of RocksDB's log family into segment files"
        );
    }
    let durability = Arc::new(Durability::new(log_store::last_log_id(&db, &segments).map_err(failed)?));
    let machine = StateMachineStore::load(db.clone(), durability.clone())?;
    let flusher = flusher::spawn_flusher(Arc::downgrade(&segments), durability.clone())?;
    Ok((LogStore::new(db, segments, flusher, durability), machine))
}

/// What a node's own stored state says about the cluster CA and removed nodes, read without
/// opening the store for writing: a node renews its certificate with it before its replica
/// opens. `(None, empty)` when the store does not exist yet.
pub fn read_stored_pki(
    dir: &Path,
) -> Result<
    (
        Option<flotilla_state::secrets::ClusterCaRecord>,
        std::collections::BTreeSet<NodeId>,
    ),
    OpenError,
> {
    if !dir.join("CURRENT").exists() {
        return Ok((None, Default::default()));
    }
    let families = [CF_LOG, CF_LOG_META, CF_STATE, CF_SNAPSHOT];
    let db =
        DB::open_cf_for_read_only(&Options::default(), dir, families, false).map_err(|error| OpenError::Database {
            dir: dir.display().to_string(),
            message: error.to_string(),
        })?;
    let family = |name: &str| {
        db.cf_handle(name).ok_or_else(|| OpenError::Database {
            dir: dir.display().to_string(),
            message: format!("no {name} column family"),
        })
    };
    let read = |cf, key: &[u8]| {
        db.get_cf(cf, key).map_err(|error| OpenError::Database {
            dir: dir.display().to_string(),
            message: error.to_string(),
        })
    };
    // The copies written through RocksDB's log; a store written before they existed has only
    // the state's own records, which were written through it then.
    let (cf, ca_key, removed_key) = match read(family(CF_LOG_META)?, KEY_PKI_CLUSTER_CA)? {
        Some(_) => (family(CF_LOG_META)?, KEY_PKI_CLUSTER_CA, KEY_PKI_REMOVED_NODES),
        None => (family(CF_STATE)?, KEY_CLUSTER_CA, KEY_REMOVED_NODES),
    };
    let ca = match read(cf, ca_key)? {
        Some(bytes) => decode(ca_key, &bytes)?,
        None => None,
    };
    let removed = match read(cf, removed_key)? {
        Some(bytes) => decode(removed_key, &bytes)?,
        None => Default::default(),
    };
    Ok((ca, removed))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("serialising to memory cannot fail")
}

/// Serialises values one after another into one buffer it keeps, for callers that copy each
/// encoding away at once (a RocksDB write batch does). A record encoded into a fresh `Vec` grows
/// it from empty, about ten reallocations for a 1 KB agent record; here a batch of records costs
/// the buffer's growth to the largest of them, once.
struct Encoder {
    buffer: Vec<u8>,
}

impl Encoder {
    /// Room for an agent record with a prompt of a few KB before the first growth.
    const INITIAL_BYTES: usize = 4096;

    fn new() -> Self {
        Self {
            buffer: Vec::with_capacity(Self::INITIAL_BYTES),
        }
    }

    /// `value`'s postcard encoding, the same bytes `encode` gives, valid until the next call.
    fn encode<T: Serialize>(&mut self, value: &T) -> &[u8] {
        self.buffer.clear();
        let flavor = Appending {
            buffer: &mut self.buffer,
        };
        postcard::serialize_with_flavor::<T, _, ()>(value, flavor).expect("serialising to memory cannot fail");
        &self.buffer
    }
}

/// A postcard output that appends to a borrowed `Vec`.
struct Appending<'a> {
    buffer: &'a mut Vec<u8>,
}

impl postcard::ser_flavors::Flavor for Appending<'_> {
    type Output = ();

    #[inline(always)]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.buffer.extend_from_slice(data);
        Ok(())
    }

    #[inline(always)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.buffer.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, OpenError> {
    postcard::from_bytes(bytes).map_err(|error| OpenError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        message: error.to_string(),
    })
}

fn any(error: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&error)
}
