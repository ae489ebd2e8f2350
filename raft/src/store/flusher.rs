//! The log flusher: a thread that syncs RocksDB's write-ahead log and only then tells openraft
//! that the appends it holds are flushed. Appends that arrive while a sync runs wait for the
//! next one, so one fsync covers a group of appends (group commit).
//!
//! openraft's core waits for each append's flush before it takes its next message, so appends
//! never queue here on their own: each proposal the core receives while a sync runs becomes an
//! entry and a sync of its own afterwards. [`LogActivity`] tells the write queue when the log
//! is between a write and its flush, so that the writes a leader proposes meanwhile wait and go
//! as one entry once the sync is done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use openraft::storage::LogFlushed;
use rocksdb::DB;

use super::OpenError;
use crate::TypeConfig;

/// Appends waiting for the flusher's next sync; `append` waits for room beyond this.
pub const MAX_APPENDS_AWAITING_SYNC: usize = 4096;

/// Whether the log has appends written and not yet flushed, and a wake-up for whoever waits for
/// it to have none.
#[derive(Default)]
pub struct LogActivity {
    /// Appends handed to the flusher and not yet reported flushed.
    unflushed: AtomicUsize,
    /// Set by a waiter before it looks again; the flush that leaves nothing unflushed clears it
    /// and wakes [`Self::idle`].
    awaited: AtomicBool,
    idle: tokio::sync::Notify,
}

impl LogActivity {
    /// No append is between its write and its flush.
    pub fn is_idle(&self) -> bool {
        self.unflushed.load(Ordering::SeqCst) == 0
    }

    /// [`Self::is_idle`], and if not, arranges for [`Self::wait_idle`] to wake when it is. (The
    /// flag is set before the second look, so a flush between the two either shows in the
    /// second look or sees the flag.)
    pub fn is_idle_or_awaited(&self) -> bool {
        if self.is_idle() {
            return true;
        }
        self.awaited.store(true, Ordering::SeqCst);
        self.is_idle()
    }

    /// Waits for the next wake-up arranged by [`Self::is_idle_or_awaited`] (or [`Self::wake`]).
    pub async fn wait_idle(&self) {
        self.idle.notified().await
    }

    /// Wakes the waiter at once (a replica closing).
    pub fn wake(&self) {
        self.idle.notify_one();
    }

    pub(crate) fn appended(&self) {
        self.unflushed.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn flushed(&self, appends: usize) {
        let before = self.unflushed.fetch_sub(appends, Ordering::SeqCst);
        if before == appends && self.awaited.swap(false, Ordering::SeqCst) {
            self.idle.notify_one();
        }
    }
}

/// Starts the thread that syncs the WAL for groups of appends and then acknowledges them. It
/// holds the database weakly, so the database closes as soon as its stores are dropped.
pub(super) fn spawn_flusher(
    db: std::sync::Weak<DB>,
    activity: Arc<LogActivity>,
) -> Result<SyncSender<LogFlushed<TypeConfig>>, OpenError> {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<LogFlushed<TypeConfig>>(MAX_APPENDS_AWAITING_SYNC);
    std::thread::Builder::new()
        .name("raft-log-flusher".to_string())
        .spawn(move || {
            while let Ok(first) = receiver.recv() {
                let mut group = vec![first];
                group.extend(receiver.try_iter());
                let sync_started = std::time::Instant::now();
                let synced = match db.upgrade() {
                    Some(db) => db.flush_wal(true).map_err(|error| error.to_string()),
                    None => Err("the log database is closed".to_string()),
                };
                crate::metrics::record_log_sync(sync_started.elapsed());
                let appends = group.len();
                for callback in group {
                    callback.log_io_completed(synced.clone().map_err(std::io::Error::other));
                }
                activity.flushed(appends);
            }
        })
        .map_err(|error| OpenError::Database {
            dir: String::new(),
            message: format!("cannot start the log flusher thread: {error}"),
        })?;
    Ok(sender)
}
