//! The log flusher: a thread that syncs RocksDB's write-ahead log and only then tells openraft
//! that the appends it holds are flushed. Appends that arrive while a sync runs wait for the
//! next one, so one fsync covers a group of appends (group commit).

use std::sync::mpsc::SyncSender;

use openraft::storage::LogFlushed;
use rocksdb::DB;

use super::OpenError;
use crate::TypeConfig;

/// Appends waiting for the flusher's next sync; `append` waits for room beyond this.
pub const MAX_APPENDS_AWAITING_SYNC: usize = 4096;

/// Starts the thread that syncs the WAL for groups of appends and then acknowledges them. It
/// holds the database weakly, so the database closes as soon as its stores are dropped.
pub(super) fn spawn_flusher(db: std::sync::Weak<DB>) -> Result<SyncSender<LogFlushed<TypeConfig>>, OpenError> {
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
