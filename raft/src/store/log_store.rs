//! openraft's log on RocksDB: entries in the `log` column family under their big-endian index,
//! and the vote, committed and purged marks in `log_meta`. Appends are written unsynced (so
//! they are readable for replication at once) and handed to the flusher, which reports them
//! flushed once the write-ahead log is synced.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::flusher::SyncRequest;
use super::{any, decode, encode, StorageResult, CF_LOG, CF_LOG_META, KEY_COMMITTED, KEY_PURGED, KEY_VOTE};
use crate::{NodeId, TypeConfig};

/// The key of the log entry at `index`: big-endian, so that keys sort by index.
pub(super) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

#[derive(Clone)]
pub struct LogStore {
    pub(super) db: Arc<DB>,
    flusher: SyncSender<SyncRequest>,
    durability: Arc<super::Durability>,
}

/// The id of the last entry in the log, or of the last purged one when none is left.
pub(super) fn last_log_id(db: &DB) -> Result<Option<LogId<NodeId>>, String> {
    let cf = |name| db.cf_handle(name).expect("column family created at open");
    if let Some(item) = db.iterator_cf(cf(CF_LOG), IteratorMode::End).next() {
        let (key, value) = item.map_err(|error| error.to_string())?;
        let entry: Entry<TypeConfig> = decode(&key, &value).map_err(|error| error.to_string())?;
        return Ok(Some(entry.log_id));
    }
    match db
        .get_cf(cf(CF_LOG_META), KEY_PURGED)
        .map_err(|error| error.to_string())?
    {
        Some(bytes) => decode::<LogId<NodeId>>(KEY_PURGED, &bytes)
            .map(Some)
            .map_err(|error| error.to_string()),
        None => Ok(None),
    }
}

impl LogStore {
    pub(super) fn new(db: Arc<DB>, flusher: SyncSender<SyncRequest>, durability: Arc<super::Durability>) -> LogStore {
        LogStore {
            db,
            flusher,
            durability,
        }
    }

    /// How far the log is synced, and which appends are the leader's own.
    pub fn durability(&self) -> Arc<super::Durability> {
        self.durability.clone()
    }

    /// Hands a request to the flusher: a push onto a bounded channel, done in place while there
    /// is room (the usual case: no thread hand-off on the runtime worker), and from a blocking
    /// section only when the flusher is a full queue behind.
    fn to_flusher(&self, request: SyncRequest) -> StorageResult<()> {
        let stopped = || StorageIOError::write_logs(AnyError::error("the log flusher thread has stopped"));
        match self.flusher.try_send(request) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(request)) => {
                let flusher = self.flusher.clone();
                tokio::task::block_in_place(|| flusher.send(request)).map_err(|_| stopped().into())
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(stopped().into()),
        }
    }

    pub(super) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
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
        let last_log_id = last_log_id(&self.db).map_err(|error| StorageIOError::read_logs(AnyError::error(error)))?;
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
            .map_err(|error| StorageIOError::write_vote(any(error)))?;
        self.durability.vote_saved(vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        if let Some(committed) = committed {
            crate::metrics::record_committed(committed.index);
        }
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
        let mut ids = Vec::new();
        for entry in entries {
            batch.put_cf(cf, log_key(entry.log_id.index), encode(&entry));
            ids.push(entry.log_id);
        }
        let Some(last) = ids.last().copied() else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        // Written unsynced, and so readable for replication at once.
        self.db
            .write(batch)
            .map_err(|error| StorageIOError::write_logs(any(error)))?;
        self.durability.written(last);
        if self.durability.own_proposal(ids.iter()) {
            // The leader's own proposal: reported at once, so that openraft sends it to the
            // followers while the flusher syncs it (see `Durability` for what waits for the
            // sync instead).
            callback.log_io_completed(Ok(()));
            return self.to_flusher(SyncRequest);
        }
        // Anything else (a follower's append) is reported only after a sync. openraft's core
        // waits for it before it takes its next message, so such appends never group, and the
        // sync runs here, on the core's task: handing it to the flusher thread and back cost two
        // thread wake-ups per append (A/B in docs/performance.md, "A follower syncs its own
        // appends"). The core would wait for the sync either way; what else was queued on this
        // runtime worker is taken by the others meanwhile.
        let synced = super::flusher::sync_log(&self.db, &self.durability);
        callback.log_io_completed(synced.map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG), log_key(log_id.index), log_key(u64::MAX));
        self.db
            .write_opt(batch, &options)
            .map_err(|error| StorageIOError::write_logs(any(error)))?;
        // The synced write synced everything before it too.
        let last = last_log_id(&self.db).map_err(|error| StorageIOError::read_logs(AnyError::error(error)))?;
        self.durability.truncated(last);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // What went through RocksDB's log unsynced is synced before the log that could replay
        // it goes away.
        self.db
            .flush_wal(true)
            .map_err(|error| StorageIOError::write(any(error)))?;
        // The state's records are written without RocksDB's log: those the purged entries
        // could replay must be in a table first. The snapshot that allows this purge flushed
        // them as it was built, so this flush has only what was applied since.
        super::state_machine::off_the_worker(|| super::state_machine::flush_state(&self.db))
            .map_err(|error| StorageIOError::write(any(error)))?;
        self.put_meta(KEY_PURGED, &log_id)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG), log_key(0), log_key(log_id.index + 1));
        self.db
            .write(batch)
            .map_err(|error| StorageIOError::write_logs(any(error)).into())
    }
}
