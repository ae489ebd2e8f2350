//! openraft's log: entries in segment files of their own (`segments`), and the vote, committed
//! and purged marks in RocksDB's `log_meta` family. Appends are written unsynced (so they are
//! readable for replication at once) and handed to the flusher, which reports them flushed once
//! the segment is synced.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};

use super::recent::RecentEntries;
use super::segments::{push_frame, SegmentError, Segments};
use serde::{Deserialize, Serialize};

use super::flusher::SyncRequest;
use super::{any, decode, encode, OpenError, StorageResult, CF_LOG, CF_LOG_META, KEY_COMMITTED, KEY_PURGED, KEY_VOTE};
use crate::{NodeId, TypeConfig};

/// The key of the log entry at `index` in the `log` column family, where stores from before the
/// segment files kept their entries: big-endian, so that keys sort by index.
pub(super) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

#[derive(Clone)]
pub struct LogStore {
    pub(super) db: Arc<DB>,
    pub(super) segments: Arc<Segments>,
    recent: Arc<RecentEntries>,
    flusher: SyncSender<SyncRequest>,
    durability: Arc<super::Durability>,
}

/// An entry, and where its encoding lies in the frames built for it.
pub(super) type PlacedEntry = (Entry<TypeConfig>, std::ops::Range<usize>);

fn decode_entry(index: u64, payload: &[u8]) -> Result<Entry<TypeConfig>, OpenError> {
    decode(&super::segments::entry_key(index), payload)
}

/// The purge mark stored in `log_meta`.
pub(super) fn purged_mark(db: &DB) -> Result<Option<LogId<NodeId>>, OpenError> {
    let cf = db.cf_handle(CF_LOG_META).expect("column family created at open");
    match db.get_cf(cf, KEY_PURGED).map_err(|error| OpenError::Database {
        dir: db.path().display().to_string(),
        message: error.to_string(),
    })? {
        Some(bytes) => decode::<LogId<NodeId>>(KEY_PURGED, &bytes).map(Some),
        None => Ok(None),
    }
}

/// The id of the last entry in the log, or of the last purged one when none is left.
pub(super) fn last_log_id(db: &DB, segments: &Segments) -> Result<Option<LogId<NodeId>>, String> {
    if let Some(last) = segments.last_index() {
        let read = segments.read(last, last + 1).map_err(|error| error.to_string())?;
        let (index, payload) = read.first().ok_or_else(|| SegmentError::Missing(last).to_string())?;
        return decode_entry(*index, payload)
            .map(|entry| Some(entry.log_id))
            .map_err(|error| error.to_string());
    }
    purged_mark(db).map_err(|error| error.to_string())
}

/// Moves the entries a store from before the segment files kept in RocksDB's `log` family into
/// `segments`, synced, and then deletes them there. A move cut short by a crash is begun again:
/// the family is emptied only once the segments hold everything.
pub(super) fn move_entries_out_of_rocksdb(db: &DB, segments: &Segments) -> Result<u64, OpenError> {
    let failed = |message: String| OpenError::Database {
        dir: db.path().display().to_string(),
        message,
    };
    let cf = db.cf_handle(CF_LOG).expect("column family created at open");
    if db.iterator_cf(cf, IteratorMode::Start).next().is_none() {
        return Ok(0);
    }
    segments
        .clear()
        .map_err(|error| failed(format!("clearing the log segments to move the log again: {error}")))?;
    let mut moved = 0u64;
    let mut frames = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let write = |frames: &mut Vec<u8>, run: &mut Option<(u64, u64)>| -> Result<(), OpenError> {
        if let Some((first, last)) = run.take() {
            segments
                .append(first, last, frames)
                .map_err(|error| failed(format!("moving the log into segments: {error}")))?;
        }
        frames.clear();
        Ok(())
    };
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (key, value) = item.map_err(|error| failed(error.to_string()))?;
        let index = u64::from_be_bytes(
            key.as_ref()
                .try_into()
                .map_err(|_| failed(format!("a log key of {} bytes", key.len())))?,
        );
        // Checked here, so that what is moved is known to read back.
        let _entry: Entry<TypeConfig> = decode(&key, &value)?;
        push_frame(&mut frames, index, |buffer| buffer.extend_from_slice(&value));
        run = Some(match run {
            Some((first, _)) => (first, index),
            None => (index, index),
        });
        moved += 1;
        if frames.len() >= 4 * 1024 * 1024 {
            write(&mut frames, &mut run)?;
        }
    }
    write(&mut frames, &mut run)?;
    segments
        .sync()
        .map_err(|error| failed(format!("syncing the moved log: {error}")))?;
    let mut options = WriteOptions::default();
    options.set_sync(true);
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(cf, log_key(0), log_key(u64::MAX));
    batch.delete_cf(cf, log_key(u64::MAX));
    db.write_opt(batch, &options)
        .map_err(|error| failed(error.to_string()))?;
    db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
    Ok(moved)
}

impl LogStore {
    pub(super) fn new(
        db: Arc<DB>,
        segments: Arc<Segments>,
        flusher: SyncSender<SyncRequest>,
        durability: Arc<super::Durability>,
    ) -> LogStore {
        LogStore {
            db,
            segments,
            recent: Arc::new(RecentEntries::new(super::recent::MAX_RECENT_BYTES)),
            flusher,
            durability,
        }
    }

    /// How far the log is synced, and which appends are the leader's own.
    pub fn durability(&self) -> Arc<super::Durability> {
        self.durability.clone()
    }

    /// The newest entries with their encodings: what appends to followers copy, and where a
    /// follower leaves the encodings of the entries it receives.
    pub fn recent_entries(&self) -> Arc<RecentEntries> {
        self.recent.clone()
    }

    /// The frames of `entries`, and each entry with where its encoding lies in them. An entry a
    /// follower has just received is written as it came (see `RecentEntries::received`);
    /// anything else is encoded here.
    pub(super) fn frames_of(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> (Vec<u8>, Vec<PlacedEntry>) {
        let mut frames = Vec::new();
        let mut placed = Vec::new();
        for entry in entries {
            let received = self.recent.take_received(&entry.log_id);
            let mut start = 0;
            push_frame(&mut frames, entry.log_id.index, |buffer| {
                start = buffer.len();
                match received {
                    Some(encoded) => buffer.extend_from_slice(&encoded),
                    None => {
                        let taken = std::mem::take(buffer);
                        *buffer = postcard::to_extend(&entry, taken).expect("serialising to memory cannot fail");
                    }
                }
            });
            placed.push((entry, start..frames.len()));
        }
        (frames, placed)
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
        let end = match range.end_bound() {
            Bound::Included(index) => index.saturating_add(1),
            Bound::Excluded(index) => *index,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.recent.get(start, end) {
            return Ok(entries);
        }
        let read = self
            .segments
            .read(start, end)
            .map_err(|error| StorageIOError::read_logs(any(error)))?;
        read.into_iter()
            .map(|(index, payload)| {
                decode_entry(index, &payload)
                    .map_err(|error| StorageIOError::read_log_at_index(index, any(error)).into())
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta(KEY_PURGED)?;
        let last_log_id =
            last_log_id(&self.db, &self.segments).map_err(|error| StorageIOError::read_logs(AnyError::error(error)))?;
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
        let committed = self.meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten();
        // The mark is in RocksDB's log and the entries in the segments, so after a power loss the
        // mark may name an entry whose unsynced write was lost (a leader saves its commit index
        // up to one sync ahead of its own). Every entry left at or below the mark is committed
        // (a commit index never passes the entries this log shares with the leader's, and a
        // truncation never reaches a committed entry), so the mark is cut back to the log's end.
        let last =
            last_log_id(&self.db, &self.segments).map_err(|error| StorageIOError::read_logs(AnyError::error(error)))?;
        Ok(match (committed, last) {
            (Some(committed), Some(last)) if committed.index > last.index => {
                tracing::warn!(
                    committed = committed.index,
                    last = last.index,
                    "the stored commit index is past the log's end (its last writes were lost); it is cut back to the end"
                );
                Some(last)
            }
            (Some(_), None) => None,
            _ => committed,
        })
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (frames, placed) = self.frames_of(entries);
        let (Some((first, _)), Some((last, _))) = (placed.first(), placed.last()) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let (first, last) = (first.log_id, last.log_id);
        let own_proposal = self
            .durability
            .own_proposal(placed.iter().map(|(entry, _)| &entry.log_id));
        // Written unsynced, and so readable for replication at once.
        self.segments
            .append(first.index, last.index, &frames)
            .map_err(|error| StorageIOError::write_logs(any(error)))?;
        let frames = bytes::Bytes::from(frames);
        self.recent.appended(
            placed
                .into_iter()
                .map(|(entry, encoded)| (entry, frames.slice(encoded)))
                .collect(),
        );
        self.durability.written(last);
        if own_proposal {
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
        match super::flusher::sync_log(&self.segments, &self.durability) {
            Ok(pages) => {
                callback.log_io_completed(Ok(()));
                if let Some(pages) = pages {
                    self.segments.let_go_of(pages);
                }
            }
            Err(error) => callback.log_io_completed(Err(std::io::Error::other(error))),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Synced: what is left was synced before, or is synced by the cut.
        self.segments
            .truncate(log_id.index)
            .map_err(|error| StorageIOError::write_logs(any(error)))?;
        self.recent.truncate(log_id.index);
        let last =
            last_log_id(&self.db, &self.segments).map_err(|error| StorageIOError::read_logs(AnyError::error(error)))?;
        self.durability.truncated(last);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // The state's records are written without RocksDB's log: those the purged entries
        // could replay must be in a table first. The snapshot that allows this purge flushed
        // them as it was built, so this flush has only what was applied since.
        super::state_machine::off_the_worker(|| super::state_machine::flush_state(&self.db))
            .map_err(|error| StorageIOError::write(any(error)))?;
        // Synced, and so after everything RocksDB's log held (the cluster-wide copies in
        // `log_meta`); the segments go only once the mark is on disk.
        self.put_meta(KEY_PURGED, &log_id)?;
        self.recent.purge(log_id.index);
        self.segments
            .purge(log_id.index)
            .map_err(|error| StorageIOError::write_logs(any(error)).into())
    }
}
