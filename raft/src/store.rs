//! openraft storage on RocksDB: the log store and the state machine are separate
//! implementations over one database (separate column families), so that a log flush and a
//! state-machine write share one write-ahead log.
//!
//! Log entries are written to RocksDB at once (readable for replication) and made durable by a
//! flusher thread that syncs the write-ahead log and only then tells openraft they are flushed,
//! so no client is answered before its entry is on disk. Every append that arrives while a sync
//! runs is covered by the next one: one fsync per group of appends (group commit).
//!
//! The state machine keeps the whole [`ClusterState`] in memory for reads and writes every
//! record an entry touched to RocksDB in the same batch as the applied log id (unsynced: the log
//! is the durable source, and the WAL is synced before any log is purged).

// openraft's storage traits return `StorageError` by value; the helpers here return what the
// traits return.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::command::ApplyResult;
use crate::state::{apply, Changes, ClusterState};
use crate::types::{AgentId, DurableEvent, NodeId, PluginKey, UploadId};
use crate::TypeConfig;

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
const KEY_REPO_SNAPSHOTS: &[u8] = b"m/repo_snapshots";
const KEY_PLUGIN_SETTINGS: &[u8] = b"m/plugin_settings";
const KEY_SNAPSHOT: &[u8] = b"current";

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

/// Opens (or creates) the node's database and loads the state machine into memory.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let families = [CF_LOG, CF_LOG_META, CF_STATE, CF_SNAPSHOT]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors(&options, dir, families).map_err(|error| {
        let message = error.to_string();
        if message.contains("lock") {
            OpenError::InUse {
                dir: dir.display().to_string(),
                message,
            }
        } else {
            OpenError::Database {
                dir: dir.display().to_string(),
                message,
            }
        }
    })?;
    let db = Arc::new(db);
    let machine = StateMachineStore::load(db.clone())?;
    let flusher = spawn_flusher(Arc::downgrade(&db))?;
    Ok((LogStore { db, flusher }, machine))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("serialising to memory cannot fail")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, OpenError> {
    postcard::from_bytes(bytes).map_err(|error| OpenError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        message: error.to_string(),
    })
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn any(error: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&error)
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: std::sync::mpsc::SyncSender<LogFlushed<TypeConfig>>,
}

/// Appends waiting for the flusher's next sync; `append` waits for room beyond this.
pub const MAX_APPENDS_AWAITING_SYNC: usize = 4096;

/// Starts the thread that syncs the WAL for groups of appends and then acknowledges them. It
/// holds the database weakly, so the database closes as soon as its stores are dropped.
fn spawn_flusher(db: std::sync::Weak<DB>) -> Result<std::sync::mpsc::SyncSender<LogFlushed<TypeConfig>>, OpenError> {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<LogFlushed<TypeConfig>>(MAX_APPENDS_AWAITING_SYNC);
    std::thread::Builder::new()
        .name("raft-log-flusher".to_string())
        .spawn(move || {
            while let Ok(first) = receiver.recv() {
                let mut group = vec![first];
                group.extend(receiver.try_iter());
                let synced = match db.upgrade() {
                    Some(db) => db.flush_wal(true).map_err(|error| error.to_string()),
                    None => Err("the log database is closed".to_string()),
                };
                for callback in group {
                    callback.log_io_completed(synced.clone().map_err(std::io::Error::other));
                }
            }
        })
        .map_err(|error| OpenError::Database {
            dir: String::new(),
            message: format!("cannot start the log flusher thread: {error}"),
        })?;
    Ok(sender)
}

impl LogStore {
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        let bytes = self
            .db
            .get_cf(self.cf(CF_LOG_META), key)
            .map_err(|error| StorageIOError::read(any(error)))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => decode(key, &bytes)
                .map(Some)
                .map_err(|error| StorageIOError::read(any(error)).into()),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> StorageResult<()> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_LOG_META), key, encode(value), &options)
            .map_err(|error| StorageIOError::write(any(error)).into())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => index + 1,
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        let iterator = self
            .db
            .iterator_cf(self.cf(CF_LOG), IteratorMode::From(&log_key(start), Direction::Forward));
        for item in iterator {
            let (key, value) = item.map_err(|error| StorageIOError::read_logs(any(error)))?;
            let index = u64::from_be_bytes(key.as_ref().try_into().expect("log keys are 8 bytes"));
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> =
                decode(&key, &value).map_err(|error| StorageIOError::read_log_at_index(index, any(error)))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta(KEY_PURGED)?;
        let mut iterator = self.db.iterator_cf(self.cf(CF_LOG), IteratorMode::End);
        let last_log_id = match iterator.next() {
            Some(item) => {
                let (key, value) = item.map_err(|error| StorageIOError::read_logs(any(error)))?;
                let entry: Entry<TypeConfig> =
                    decode(&key, &value).map_err(|error| StorageIOError::read_logs(any(error)))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(KEY_VOTE, vote)
            .map_err(|error| StorageIOError::write_vote(any(error)).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not synced: a lost committed marker only means re-applying from the state machine's own
        // applied id, which the log still holds.
        self.db
            .put_cf(self.cf(CF_LOG_META), KEY_COMMITTED, encode(&committed))
            .map_err(|error| StorageIOError::write(any(error)).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_LOG);
        for entry in entries {
            batch.put_cf(cf, log_key(entry.log_id.index), encode(&entry));
        }
        // Written unsynced (and so readable for replication at once); the flusher syncs the WAL
        // and only then reports the entries flushed.
        self.db
            .write(batch)
            .map_err(|error| StorageIOError::write_logs(any(error)))?;
        let flusher = self.flusher.clone();
        tokio::task::block_in_place(|| flusher.send(callback))
            .map_err(|_| StorageIOError::write_logs(AnyError::error("the log flusher thread has stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG), log_key(log_id.index), log_key(u64::MAX));
        self.db
            .write_opt(batch, &options)
            .map_err(|error| StorageIOError::write_logs(any(error)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // State-machine writes are unsynced; make them durable before the log that could
        // replay them goes away.
        self.db
            .flush_wal(true)
            .map_err(|error| StorageIOError::write(any(error)))?;
        self.put_meta(KEY_PURGED, &log_id)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG), log_key(0), log_key(log_id.index + 1));
        self.db
            .write(batch)
            .map_err(|error| StorageIOError::write_logs(any(error)).into())
    }
}

/// What a snapshot carries: the whole state and the log position it stands for.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, crate::NodeAddr>,
    state: ClusterState,
}

/// [`SnapshotBody`] borrowed from the machine; it encodes to the same bytes.
#[derive(Serialize)]
struct SnapshotBodyRef<'a> {
    last_applied: &'a Option<LogId<NodeId>>,
    membership: &'a StoredMembership<NodeId, crate::NodeAddr>,
    state: &'a ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, crate::NodeAddr>,
    data: Vec<u8>,
}

/// The in-memory state plus its applied position, shared with readers.
pub struct Machine {
    pub state: ClusterState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, crate::NodeAddr>,
}

/// Read access to the state machine for services and actors.
#[derive(Clone)]
pub struct StateReader {
    machine: Arc<RwLock<Machine>>,
    applied: watch::Receiver<u64>,
    events: broadcast::Sender<DurableEvent>,
}

impl StateReader {
    /// Runs `read` against the current state; keep it short (it holds a read lock).
    pub fn read<T>(&self, read: impl FnOnce(&ClusterState) -> T) -> T {
        let machine = self.machine.read().expect("state lock poisoned");
        read(&machine.state)
    }

    pub fn last_applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Changes whenever entries are applied.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Every durable event as it is applied (bounded; a receiver that lags re-reads the state).
    pub fn subscribe_events(&self) -> broadcast::Receiver<DurableEvent> {
        self.events.subscribe()
    }

    pub fn agent_events_after(&self, agent: AgentId, after: u64) -> Vec<DurableEvent> {
        self.read(|state| state.events_after(agent, after))
    }
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    machine: Arc<RwLock<Machine>>,
    applied_sender: Arc<watch::Sender<u64>>,
    events: broadcast::Sender<DurableEvent>,
    snapshot_sequence: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachineStore {
    fn load(db: Arc<DB>) -> Result<StateMachineStore, OpenError> {
        let cf = db.cf_handle(CF_STATE).expect("column family created at open");
        let mut state = ClusterState::default();
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        for item in db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = item.map_err(|error| OpenError::Database {
                dir: db.path().display().to_string(),
                message: error.to_string(),
            })?;
            match key.first() {
                Some(b'a') => {
                    let record: crate::types::AgentRecord = decode(&key, &value)?;
                    state.agents.insert(record.id, record);
                }
                Some(b'e') => {
                    let event: DurableEvent = decode(&key, &value)?;
                    state.events.entry(event.agent).or_default().push_back(event);
                }
                Some(b'n') => {
                    let record: crate::types::NodeRecord = decode(&key, &value)?;
                    state.nodes.insert(record.id, record);
                }
                Some(b't') => {
                    let record: crate::types::TokenRecord = decode(&key, &value)?;
                    state.tokens.insert(record.sha256_hex.clone(), record);
                }
                Some(b'c') if key.len() == 18 => {
                    let checkpoint: crate::types::Checkpoint = decode(&key, &value)?;
                    let mut id = [0u8; 16];
                    id.copy_from_slice(&key[2..]);
                    state
                        .checkpoints
                        .insert(AgentId(ulid::Ulid::from_bytes(id)), checkpoint);
                }
                Some(b'p') => {
                    let record: crate::types::PluginRecord = decode(&key, &value)?;
                    state.plugins.insert(record.key(), record);
                }
                Some(b'q') => {
                    let (plugin, index) = parse_plugin_chunk_key(&key)?;
                    state.plugin_chunks.insert((plugin, index), value.to_vec());
                }
                Some(b'u') => {
                    let record: crate::types::PluginUpload = decode(&key, &value)?;
                    state.plugin_uploads.insert(record.id, record);
                }
                Some(b'v') if key.len() == 22 => {
                    let mut id = [0u8; 16];
                    id.copy_from_slice(&key[2..18]);
                    let index = u32::from_be_bytes(key[18..22].try_into().expect("four bytes"));
                    state
                        .upload_chunks
                        .insert((UploadId(ulid::Ulid::from_bytes(id)), index), value.to_vec());
                }
                _ if key.as_ref() == KEY_APPLIED => last_applied = decode(&key, &value)?,
                _ if key.as_ref() == KEY_MEMBERSHIP => membership = decode(&key, &value)?,
                _ if key.as_ref() == KEY_HIGHEST_NODE_ID => state.highest_node_id = decode(&key, &value)?,
                _ if key.as_ref() == KEY_REPO_SNAPSHOTS => state.repo_snapshots = decode(&key, &value)?,
                _ if key.as_ref() == KEY_PLUGIN_SETTINGS => state.plugin_settings = decode(&key, &value)?,
                _ => {}
            }
        }
        state.rebuild_indexes();
        let applied_index = last_applied.map(|log_id: LogId<NodeId>| log_id.index).unwrap_or(0);
        let (applied_sender, _) = watch::channel(applied_index);
        let (events, _) = broadcast::channel(EVENT_BROADCAST_CAPACITY);
        Ok(StateMachineStore {
            db,
            machine: Arc::new(RwLock::new(Machine {
                state,
                last_applied,
                membership,
            })),
            applied_sender: Arc::new(applied_sender),
            events,
            snapshot_sequence: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            machine: self.machine.clone(),
            applied: self.applied_sender.subscribe(),
            events: self.events.clone(),
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn stored_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        let bytes = self
            .db
            .get_cf(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT)
            .map_err(|error| StorageIOError::read_snapshot(None, any(error)))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => decode(KEY_SNAPSHOT, &bytes)
                .map(Some)
                .map_err(|error| StorageIOError::read_snapshot(None, any(error)).into()),
        }
    }

    fn persist_changes(&self, batch: &mut WriteBatch, machine: &Machine, changes: &Changes) {
        let cf = self.cf(CF_STATE);
        for id in &changes.agents {
            let key = agent_key(*id);
            match machine.state.agents.get(id) {
                Some(record) => batch.put_cf(cf, key, encode(record)),
                None => batch.delete_cf(cf, key),
            }
        }
        for event in &changes.new_events {
            batch.put_cf(cf, event_key(event.agent, event.sequence), encode(event));
        }
        for (agent, sequence) in &changes.trimmed_events {
            batch.delete_cf(cf, event_key(*agent, *sequence));
        }
        for id in &changes.checkpoints {
            let key = checkpoint_key(*id);
            match machine.state.checkpoints.get(id) {
                Some(checkpoint) => batch.put_cf(cf, key, encode(checkpoint)),
                None => batch.delete_cf(cf, key),
            }
        }
        for id in &changes.nodes {
            let key = node_key(*id);
            match machine.state.nodes.get(id) {
                Some(record) => batch.put_cf(cf, key, encode(record)),
                None => batch.delete_cf(cf, key),
            }
        }
        for hash in &changes.tokens {
            let key = [b"t/".as_slice(), hash.as_bytes()].concat();
            match machine.state.tokens.get(hash) {
                Some(record) => batch.put_cf(cf, key, encode(record)),
                None => batch.delete_cf(cf, key),
            }
        }
        // Chunks are stored raw, not postcard-encoded: they are bytes already, and up to half a
        // MiB each.
        for key in &changes.plugins {
            let stored_key = plugin_key(key);
            match machine.state.plugins.get(key) {
                Some(record) => batch.put_cf(cf, stored_key, encode(record)),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        for (key, index) in &changes.plugin_chunks {
            let stored_key = plugin_chunk_key(key, *index);
            match machine.state.plugin_chunks.get(&(key.clone(), *index)) {
                Some(bytes) => batch.put_cf(cf, stored_key, bytes),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        for id in &changes.plugin_uploads {
            let stored_key = upload_key(*id);
            match machine.state.plugin_uploads.get(id) {
                Some(record) => batch.put_cf(cf, stored_key, encode(record)),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        for (id, index) in &changes.upload_chunks {
            let stored_key = upload_chunk_key(*id, *index);
            match machine.state.upload_chunks.get(&(*id, *index)) {
                Some(bytes) => batch.put_cf(cf, stored_key, bytes),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        if changes.meta {
            batch.put_cf(cf, KEY_HIGHEST_NODE_ID, encode(&machine.state.highest_node_id));
            batch.put_cf(cf, KEY_REPO_SNAPSHOTS, encode(&machine.state.repo_snapshots));
            batch.put_cf(cf, KEY_PLUGIN_SETTINGS, encode(&machine.state.plugin_settings));
        }
        batch.put_cf(cf, KEY_APPLIED, encode(&machine.last_applied));
        batch.put_cf(cf, KEY_MEMBERSHIP, encode(&machine.membership));
    }

    /// Replaces the whole state (snapshot install) in one batch.
    fn replace_state(&self, body: SnapshotBody) -> StorageResult<()> {
        let mut machine = self.machine.write().expect("state lock poisoned");
        let mut state = body.state;
        state.rebuild_indexes();
        *machine = Machine {
            state,
            last_applied: body.last_applied,
            membership: body.membership,
        };
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_STATE);
        batch.delete_range_cf(cf, [0u8].as_slice(), [0xffu8; 16].as_slice());
        let mut changes = Changes::default();
        changes.agents.extend(machine.state.agents.keys().copied());
        changes.nodes.extend(machine.state.nodes.keys().copied());
        changes.tokens.extend(machine.state.tokens.keys().cloned());
        changes.checkpoints.extend(machine.state.checkpoints.keys().copied());
        changes.plugins.extend(machine.state.plugins.keys().cloned());
        changes
            .plugin_chunks
            .extend(machine.state.plugin_chunks.keys().cloned());
        changes
            .plugin_uploads
            .extend(machine.state.plugin_uploads.keys().copied());
        changes
            .upload_chunks
            .extend(machine.state.upload_chunks.keys().copied());
        changes
            .new_events
            .extend(machine.state.events.values().flatten().cloned());
        changes.meta = true;
        self.persist_changes(&mut batch, &machine, &changes);
        self.db
            .write(batch)
            .map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        self.db
            .flush_wal(true)
            .map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        let index = machine.last_applied.map(|log_id| log_id.index).unwrap_or(0);
        drop(machine);
        self.applied_sender.send_replace(index);
        Ok(())
    }
}

fn agent_key(id: AgentId) -> Vec<u8> {
    [b"a/".as_slice(), &id.0.to_bytes()].concat()
}

fn checkpoint_key(id: AgentId) -> Vec<u8> {
    [b"c/".as_slice(), &id.0.to_bytes()].concat()
}

fn event_key(agent: AgentId, sequence: u64) -> Vec<u8> {
    [b"e/".as_slice(), &agent.0.to_bytes(), &sequence.to_be_bytes()].concat()
}

fn node_key(id: NodeId) -> Vec<u8> {
    [b"n/".as_slice(), &id.to_be_bytes()].concat()
}

// Plugin names and versions never hold a NUL (names are lowercase letters, digits and dashes;
// versions are semver), so NUL separates them in keys.
fn plugin_key(key: &PluginKey) -> Vec<u8> {
    [b"p/".as_slice(), key.name.as_bytes(), &[0], key.version.as_bytes()].concat()
}

fn plugin_chunk_key(key: &PluginKey, index: u32) -> Vec<u8> {
    [
        b"q/".as_slice(),
        key.name.as_bytes(),
        &[0],
        key.version.as_bytes(),
        &[0],
        &index.to_be_bytes(),
    ]
    .concat()
}

fn parse_plugin_chunk_key(key: &[u8]) -> Result<(PluginKey, u32), OpenError> {
    let malformed = || OpenError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        message: "not a plugin chunk key (q/NAME\\0VERSION\\0INDEX)".to_string(),
    };
    let body = key.strip_prefix(b"q/").ok_or_else(malformed)?;
    if body.len() < 5 || body[body.len() - 5] != 0 {
        return Err(malformed());
    }
    let (identity, index) = body.split_at(body.len() - 5);
    let index = u32::from_be_bytes(index[1..].try_into().map_err(|_| malformed())?);
    let separator = identity.iter().position(|byte| *byte == 0).ok_or_else(malformed)?;
    let name = std::str::from_utf8(&identity[..separator]).map_err(|_| malformed())?;
    let version = std::str::from_utf8(&identity[separator + 1..]).map_err(|_| malformed())?;
    Ok((PluginKey::new(name, version), index))
}

fn upload_key(id: UploadId) -> Vec<u8> {
    [b"u/".as_slice(), &id.0.to_bytes()].concat()
}

fn upload_chunk_key(id: UploadId, index: u32) -> Vec<u8> {
    [b"v/".as_slice(), &id.0.to_bytes(), &index.to_be_bytes()].concat()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (data, last_applied, membership) = {
            let machine = self.machine.read().expect("state lock poisoned");
            // Encoded from a borrow: cloning the state first would copy every plugin's bytes.
            let body = SnapshotBodyRef {
                last_applied: &machine.last_applied,
                membership: &machine.membership,
                state: &machine.state,
            };
            (encode(&body), machine.last_applied, machine.membership.clone())
        };
        let sequence = self
            .snapshot_sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::record_snapshot_built(data.len());
        let snapshot_id = match last_applied {
            Some(log_id) => format!("{}-{}-{}", log_id.leader_id.term, log_id.index, sequence),
            None => format!("empty-{sequence}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT, encode(&stored), &options)
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), any(error)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, crate::NodeAddr>)> {
        let machine = self.machine.read().expect("state lock poisoned");
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut changes = Changes::default();
        let mut batch = WriteBatch::default();
        let index = {
            let mut machine = self.machine.write().expect("state lock poisoned");
            for entry in entries {
                machine.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(Ok(crate::command::Response::Done)),
                    EntryPayload::Normal(request) => {
                        let result = apply(&mut machine.state, &mut changes, &request);
                        results.push(result);
                    }
                    EntryPayload::Membership(membership) => {
                        machine.membership = StoredMembership::new(Some(entry.log_id), membership);
                        results.push(Ok(crate::command::Response::Done));
                    }
                }
            }
            self.persist_changes(&mut batch, &machine, &changes);
            machine.last_applied.map(|log_id| log_id.index).unwrap_or(0)
        };
        let db = self.db.clone();
        tokio::task::block_in_place(|| db.write(batch))
            .map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        for event in changes.new_events {
            // No receivers is normal.
            let _ = self.events.send(event);
        }
        self.applied_sender.send_replace(index);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, crate::NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = postcard::from_bytes(&data)
            .map_err(|error| StorageIOError::read_snapshot(Some(meta.signature()), any(error)))?;
        self.replace_state(body)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT, encode(&stored), &options)
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), any(error)))?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.stored_snapshot()?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, Membership};

    use super::*;
    use crate::command::{AssignOne, Command, Request, Response, COMMAND_VERSION};
    use crate::types::{AgentId, AgentSpec, AgentStatus, Checkpoint, Epoch, EventKind, NodeInfo};

    fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request {
                version: COMMAND_VERSION,
                at_ms: 1_000 + index,
                command,
            }),
        }
    }

    fn membership_entry(index: u64) -> Entry<TypeConfig> {
        let mut nodes = std::collections::BTreeMap::new();
        nodes.insert(1, crate::NodeAddr::default());
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Membership(Membership::new(vec![[1].into_iter().collect()], nodes)),
        }
    }

    fn create(id: AgentId) -> Command {
        Command::CreateAgent {
            id,
            spec: AgentSpec {
                name: "n".into(),
                prompt: "p".into(),
                repository: "https://example.com/r.git".into(),
                ..Default::default()
            },
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applied_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = [AgentId::new(), AgentId::new()];
        let expected = {
            let (_, mut machine) = open(dir.path()).unwrap();
            let results = machine
                .apply(vec![
                    membership_entry(1),
                    entry(
                        2,
                        Command::RegisterNode {
                            node: 1,
                            info: NodeInfo {
                                slots: 2,
                                ..Default::default()
                            },
                        },
                    ),
                    entry(3, create(ids[0])),
                    entry(4, create(ids[1])),
                    entry(
                        5,
                        Command::StopAgent {
                            agent: ids[0],
                            reason: "r".into(),
                        },
                    ),
                    entry(
                        6,
                        Command::StopAgent {
                            agent: ids[0],
                            reason: "again".into(),
                        },
                    ),
                ])
                .await
                .unwrap();
            assert_eq!(results.len(), 6);
            assert!(matches!(results[2], Ok(Response::Agent(_))));
            assert!(results[5].is_err(), "stopping twice is refused");
            assert_eq!(machine.reader().last_applied_index(), 6);
            machine.reader().read(|state| state.clone())
        };
        let (_, mut reopened) = open(dir.path()).unwrap();
        let (applied, membership) = reopened.applied_state().await.unwrap();
        assert_eq!(applied.map(|log_id| log_id.index), Some(6));
        assert!(membership.membership().voter_ids().any(|id| id == 1));
        let state = reopened.reader().read(|state| state.clone());
        assert_eq!(state, expected);
        assert_eq!(state.events_after(ids[0], 0).len(), 2);
        assert!(state.pending.contains(&ids[1]), "indexes are rebuilt on load");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_installs_the_same_state_elsewhere() {
        let source_dir = tempfile::tempdir().unwrap();
        let target_dir = tempfile::tempdir().unwrap();
        let (_, mut source) = open(source_dir.path()).unwrap();
        source
            .apply(vec![membership_entry(1), entry(2, create(AgentId::new()))])
            .await
            .unwrap();
        let snapshot = source.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|log_id| log_id.index), Some(2));

        let (_, mut target) = open(target_dir.path()).unwrap();
        target.apply(vec![entry(1, create(AgentId::new()))]).await.unwrap();
        target
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        let expected = source.reader().read(|state| state.clone());
        assert_eq!(target.reader().read(|state| state.clone()), expected);
        let held = target
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot is held");
        assert_eq!(held.meta.last_log_id.map(|log_id| log_id.index), Some(2));
        drop(target);
        let (_, reopened) = open(target_dir.path()).unwrap();
        assert_eq!(
            reopened.reader().read(|state| state.clone()),
            expected,
            "the installed state is what is on disk"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_entries_round_trip_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path()).unwrap();
        let entries: Vec<Entry<TypeConfig>> = (1..=5).map(|index| entry(index, create(AgentId::new()))).collect();
        let mut batch = WriteBatch::default();
        for entry in &entries {
            batch.put_cf(log.cf(CF_LOG), log_key(entry.log_id.index), encode(entry));
        }
        log.db.write(batch).unwrap();
        assert_eq!(log.try_get_log_entries(2..4).await.unwrap(), entries[1..3].to_vec());
        log.purge(entries[2].log_id).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(entries[2].log_id));
        assert_eq!(state.last_log_id, Some(entries[4].log_id));
        assert_eq!(log.try_get_log_entries(0..10).await.unwrap(), entries[3..].to_vec());
        log.truncate(entries[4].log_id).await.unwrap();
        assert_eq!(log.try_get_log_entries(0..10).await.unwrap(), entries[3..4].to_vec());
        assert_eq!(
            log.get_log_state().await.unwrap().last_purged_log_id,
            Some(entries[2].log_id),
            "a truncate keeps the purge mark"
        );
    }

    /// Entries from `first_index` on that register node 1, run agent `id` there under epoch 1
    /// and record its first turn with `checkpoint`.
    fn first_turn_entries(first_index: u64, id: AgentId, checkpoint: &[u8]) -> Vec<Entry<TypeConfig>> {
        let commands = vec![
            Command::RegisterNode {
                node: 1,
                info: NodeInfo {
                    slots: 2,
                    ..Default::default()
                },
            },
            create(id),
            Command::AssignAgents {
                assignments: vec![AssignOne {
                    agent: id,
                    node: 1,
                    epoch: Epoch(1),
                }],
            },
            Command::SetAgentStatus {
                agent: id,
                node: 1,
                epoch: Epoch(1),
                status: AgentStatus::Running,
                reason: "started".into(),
                summary: None,
                error: None,
            },
            Command::RecordTurn {
                agent: id,
                node: 1,
                epoch: Epoch(1),
                turn: 1,
                follow_ups_delivered: 0,
                head_commit: Some("abc123".into()),
                scripted: true,
                checkpoint: checkpoint.to_vec(),
                events: vec![EventKind::TurnFinished {
                    turn: 1,
                    input_tokens: 1,
                    output_tokens: 1,
                    tool_calls: 0,
                    model_ms: 1,
                    tools_ms: 0,
                }],
            },
        ];
        commands
            .into_iter()
            .zip(first_index..)
            .map(|(command, index)| entry(index, command))
            .collect()
    }

    async fn apply_all(machine: &mut StateMachineStore, entries: Vec<Entry<TypeConfig>>) {
        let results = machine.apply(entries).await.unwrap();
        for result in results {
            let took_effect = match &result {
                Ok(Response::Assigned(ids)) => !ids.is_empty(),
                other => other.is_ok(),
            };
            assert!(took_effect, "every entry of the test takes effect: {result:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recorded_checkpoint_survives_a_reopen_and_is_replaced_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let id = AgentId::new();
        {
            let (_, mut machine) = open(dir.path()).unwrap();
            let mut entries = vec![membership_entry(1)];
            entries.extend(first_turn_entries(2, id, b"conversation after turn 1"));
            apply_all(&mut machine, entries).await;
        }
        let (_, mut reopened) = open(dir.path()).unwrap();
        let checkpoint = reopened.reader().read(|state| state.checkpoints.get(&id).cloned());
        assert_eq!(
            checkpoint,
            Some(Checkpoint {
                turn: 1,
                at_ms: 1_006,
                head_commit: Some("abc123".into()),
                data: b"conversation after turn 1".to_vec(),
            })
        );
        let agent = reopened.reader().read(|state| state.agents[&id].clone());
        assert_eq!(agent.turns, 1);

        let second = Command::RecordTurn {
            agent: id,
            node: 1,
            epoch: Epoch(1),
            turn: 2,
            follow_ups_delivered: 0,
            head_commit: None,
            scripted: true,
            checkpoint: b"conversation after turn 2".to_vec(),
            events: Vec::new(),
        };
        apply_all(&mut reopened, vec![entry(7, second)]).await;
        let expected = reopened.reader().read(|state| state.clone());
        drop(reopened);
        let (_, again) = open(dir.path()).unwrap();
        let state = again.reader().read(|state| state.clone());
        assert_eq!(state.checkpoints.len(), 1, "one checkpoint per agent is kept");
        assert_eq!(state.checkpoints[&id].turn, 2);
        assert_eq!(state, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_travels_in_a_snapshot_and_replaces_the_receivers() {
        let source_dir = tempfile::tempdir().unwrap();
        let target_dir = tempfile::tempdir().unwrap();
        let id = AgentId::new();
        let (_, mut source) = open(source_dir.path()).unwrap();
        let mut entries = vec![membership_entry(1)];
        entries.extend(first_turn_entries(2, id, b"from the source"));
        apply_all(&mut source, entries).await;
        let snapshot = source.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let expected = source.reader().read(|state| state.clone());
        assert!(expected.checkpoints.contains_key(&id));

        // The receiver has a checkpoint of its own, for an agent the snapshot does not know.
        let stale = AgentId::new();
        let (_, mut target) = open(target_dir.path()).unwrap();
        apply_all(&mut target, first_turn_entries(1, stale, b"stale")).await;
        target
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(target.reader().read(|state| state.clone()), expected);
        drop(target);
        let (_, reopened) = open(target_dir.path()).unwrap();
        let state = reopened.reader().read(|state| state.clone());
        assert_eq!(state.checkpoints[&id].data, b"from the source".to_vec());
        assert!(
            !state.checkpoints.contains_key(&stale),
            "the receiver's own checkpoint is gone from disk"
        );
        assert_eq!(state, expected, "the installed state is what is on disk");
    }

    /// Entries from `first_index` on that stage `bytes` under `upload` in chunks of `chunk_bytes`
    /// and, when `commit` holds a name and version, commit them as that plugin.
    fn plugin_entries(
        first_index: u64,
        upload: UploadId,
        bytes: &[u8],
        chunk_bytes: usize,
        commit: Option<(&str, &str, bool)>,
    ) -> Vec<Entry<TypeConfig>> {
        use sha2::Digest as _;
        let mut commands: Vec<Command> = bytes
            .chunks(chunk_bytes)
            .enumerate()
            .map(|(index, chunk)| Command::PutPluginChunk {
                upload,
                index: index as u32,
                bytes: chunk.to_vec(),
            })
            .collect();
        if let Some((name, version, enable)) = commit {
            commands.push(Command::CommitPlugin {
                upload,
                name: name.into(),
                version: version.into(),
                sha256: hex::encode(sha2::Sha256::digest(bytes)),
                kind: crate::types::PluginKind::Tool,
                size_bytes: bytes.len() as u64,
                chunk_count: commands.len() as u32,
                granted_hosts: vec!["example.com".into()],
                enable,
            });
        }
        commands
            .into_iter()
            .zip(first_index..)
            .map(|(command, index)| entry(index, command))
            .collect()
    }

    /// Keys under `prefix` in the state column family.
    fn stored_keys(machine: &StateMachineStore, prefix: &[u8]) -> usize {
        machine
            .db
            .prefix_iterator_cf(machine.cf(CF_STATE), prefix)
            .map(|item| item.unwrap().0)
            .take_while(|key| key.starts_with(prefix))
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_bytes_and_staged_uploads_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let kept: Vec<u8> = (0..10_000u32).map(|value| (value % 251) as u8).collect();
        let removed = b"a version that is removed again".to_vec();
        let staged = b"an upload still in progress".to_vec();
        let staged_upload = UploadId::new();
        let expected = {
            let (_, mut machine) = open(dir.path()).unwrap();
            let mut entries = vec![membership_entry(1)];
            entries.extend(plugin_entries(
                2,
                UploadId::new(),
                &kept,
                3_000,
                Some(("fmt", "1.0.0", true)),
            ));
            let next = 2 + entries.len() as u64 - 1;
            entries.extend(plugin_entries(
                next,
                UploadId::new(),
                &removed,
                8,
                Some(("fmt", "0.9.0", false)),
            ));
            let next = 2 + entries.len() as u64 - 1;
            entries.push(entry(
                next,
                Command::RemovePlugin {
                    name: "fmt".into(),
                    version: "0.9.0".into(),
                },
            ));
            entries.extend(plugin_entries(next + 1, staged_upload, &staged, 10, None));
            apply_all(&mut machine, entries).await;
            assert_eq!(
                stored_keys(&machine, b"q/"),
                4,
                "the removed version's chunks are deleted"
            );
            assert_eq!(stored_keys(&machine, b"p/"), 1);
            machine.reader().read(|state| state.clone())
        };
        let (_, reopened) = open(dir.path()).unwrap();
        let state = reopened.reader().read(|state| state.clone());
        assert_eq!(state, expected);
        assert_eq!(state.plugin_bytes(&PluginKey::new("fmt", "1.0.0")), Some(kept));
        assert_eq!(state.plugins[&PluginKey::new("fmt", "1.0.0")].chunk_count, 4);
        assert!(state.enabled_plugins().any(|record| record.version == "1.0.0"));
        assert!(!state.plugins.contains_key(&PluginKey::new("fmt", "0.9.0")));
        assert!(state.plugin_uploads.contains_key(&staged_upload));
        let staged_back: Vec<u8> = state.upload_chunks.values().flatten().copied().collect();
        assert_eq!(staged_back, staged);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_bytes_travel_in_a_snapshot_and_replace_the_receivers() {
        let source_dir = tempfile::tempdir().unwrap();
        let target_dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..5_000u32).map(|value| (value % 13) as u8).collect();
        let (_, mut source) = open(source_dir.path()).unwrap();
        let mut entries = vec![membership_entry(1)];
        entries.extend(plugin_entries(
            2,
            UploadId::new(),
            &bytes,
            1_024,
            Some(("lint", "2.1.0", true)),
        ));
        let next = 2 + entries.len() as u64 - 1;
        entries.extend(plugin_entries(next, UploadId::new(), b"half an upload", 4, None));
        apply_all(&mut source, entries).await;
        let snapshot = source.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let expected = source.reader().read(|state| state.clone());
        assert_eq!(expected.plugin_chunks.len(), 5);
        assert_eq!(expected.upload_chunks.len(), 4);

        // The receiver holds a plugin and an upload of its own that the snapshot does not know.
        let (_, mut target) = open(target_dir.path()).unwrap();
        let mut own = plugin_entries(
            1,
            UploadId::new(),
            b"the receiver's own plugin",
            5,
            Some(("own", "0.1.0", true)),
        );
        let next = 1 + own.len() as u64;
        own.extend(plugin_entries(next, UploadId::new(), b"its own upload", 3, None));
        apply_all(&mut target, own).await;
        target
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(target.reader().read(|state| state.clone()), expected);
        drop(target);
        let (_, reopened) = open(target_dir.path()).unwrap();
        let state = reopened.reader().read(|state| state.clone());
        assert_eq!(state, expected, "the installed state is what is on disk");
        assert_eq!(state.plugin_bytes(&PluginKey::new("lint", "2.1.0")), Some(bytes));
        assert!(!state.plugins.contains_key(&PluginKey::new("own", "0.1.0")));
        assert_eq!(
            stored_keys(&reopened, b"q/"),
            5,
            "the receiver's own chunks are gone from disk"
        );
        assert_eq!(stored_keys(&reopened, b"v/"), 4);
    }
}
