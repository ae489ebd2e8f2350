//! The log flusher: a thread that syncs the log's last segment under a leader's own
//! proposals, which are reported written at once (see [`super::Durability`]) and synced while
//! they travel to the followers. Proposals written while a sync runs wait for the next one, so
//! one fsync covers a group of them (group commit).
//!
//! A follower's appends are synced on the append's own task instead (`LogStore::append`):
//! openraft 0.9's core waits for each append's flush before it takes its next message, so they
//! never group, and handing each to this thread and back cost two thread wake-ups per append.

use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use super::segments::{Segments, SyncedPages};
use super::OpenError;

/// Proposals waiting for the flusher's next sync; `append` waits for room beyond this.
pub const MAX_APPENDS_AWAITING_SYNC: usize = 4096;

/// Test hook: `FLOTILLA_TEST_HOOK_OWN_SYNC_DELAY_MS` makes every sync of a leader's own
/// proposals take that much longer, as a slow disk on the leader alone would, so that tests
/// can see what followers learn while the leader's sync is still under way.
pub const TEST_HOOK_OWN_SYNC_DELAY_ENV: &str = "FLOTILLA_TEST_HOOK_OWN_SYNC_DELAY_MS";

fn own_sync_delay() -> Option<std::time::Duration> {
    let value = std::env::var(TEST_HOOK_OWN_SYNC_DELAY_ENV).ok()?;
    match value.trim().parse::<u64>() {
        Ok(ms) => {
            tracing::warn!(delay_ms = ms, "test hook: the leader's own syncs are slowed down");
            Some(std::time::Duration::from_millis(ms))
        }
        Err(error) => {
            tracing::warn!(%error, "{TEST_HOOK_OWN_SYNC_DELAY_ENV} is not a number of milliseconds; ignored");
            None
        }
    }
}

/// A sync of a leader's own proposal, already reported written.
pub(super) struct SyncRequest;

/// Syncs the log's last segment, records how long that took and tells `durability` what it
/// covered: everything written before it began (or that the log stopped, on a failure).
/// Answers the pages the sync made durable, for the caller to let go of from the page cache
/// once whoever waits for the sync has been told (`Segments::let_go_of`).
pub(super) fn sync_log(segments: &Segments, durability: &super::Durability) -> Result<Option<SyncedPages>, String> {
    // Read before the sync: everything written up to here is in the segment it syncs, or in
    // an earlier one, synced before the next one was begun.
    let upto = durability.written_mark();
    let started = std::time::Instant::now();
    let synced = segments.sync().map_err(|error| error.to_string());
    crate::metrics::record_log_sync(started.elapsed());
    match &synced {
        Ok(_) => durability.synced(upto),
        Err(error) => durability.sync_failed(format!("syncing the log: {error}")),
    }
    synced
}

/// Starts the thread that syncs the log for groups of a leader's own proposals. It holds the
/// segments weakly, so their files close as soon as the log store is dropped.
pub(super) fn spawn_flusher(
    segments: std::sync::Weak<Segments>,
    durability: Arc<super::Durability>,
) -> Result<SyncSender<SyncRequest>, OpenError> {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<SyncRequest>(MAX_APPENDS_AWAITING_SYNC);
    let own_sync_delay = own_sync_delay();
    std::thread::Builder::new()
        .name("raft-log-flusher".to_string())
        .spawn(move || {
            while let Ok(SyncRequest) = receiver.recv() {
                // Everything queued meanwhile is covered by this one sync.
                receiver.try_iter().for_each(drop);
                if let Some(delay) = own_sync_delay {
                    std::thread::sleep(delay);
                }
                match segments.upgrade() {
                    Some(segments) => {
                        if let Ok(Some(pages)) = sync_log(&segments, &durability) {
                            segments.let_go_of(pages);
                        }
                    }
                    None => durability.sync_failed("syncing the log: the log is closed".to_string()),
                }
            }
        })
        .map_err(|error| OpenError::Database {
            dir: String::new(),
            message: format!("cannot start the log flusher thread: {error}"),
        })?;
    Ok(sender)
}
