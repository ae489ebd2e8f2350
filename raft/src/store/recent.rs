//! The log's newest entries, kept in memory as they were appended, so that the replication
//! tasks (two reads of every entry on a leader of three) clone them instead of reading their
//! frames back from the segment, checking and decoding them. Bounded by the entries' encoded
//! size; an older entry is read from its segment as before.
//!
//! While it holds anything, its last entry is the log's last: every append, truncation and purge
//! of the log store updates it after the segments.

use std::collections::VecDeque;
use std::sync::Mutex;

use openraft::Entry;

use crate::TypeConfig;

/// Encoded bytes of entries kept at most (a leader's replication reads the newest ones, a
/// round trip or two behind its appends).
pub(super) const MAX_RECENT_BYTES: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct Recent {
    /// Entries with their encoded sizes, in index order from `first`.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    first: u64,
    bytes: usize,
}

pub(super) struct RecentEntries {
    limit: usize,
    inner: Mutex<Recent>,
}

impl RecentEntries {
    pub(super) fn new(limit: usize) -> RecentEntries {
        RecentEntries {
            limit,
            inner: Mutex::new(Recent::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.inner.lock().expect("recent entries lock poisoned")
    }

    /// Entries just written after the log's last (each with its encoded size); the oldest
    /// beyond the limit are dropped.
    pub(super) fn appended(&self, entries: Vec<(Entry<TypeConfig>, usize)>) {
        let Some((head, _)) = entries.first() else {
            return;
        };
        let first = head.log_id.index;
        let mut recent = self.lock();
        if recent.entries.is_empty() || recent.first + recent.entries.len() as u64 != first {
            recent.entries.clear();
            recent.bytes = 0;
            recent.first = first;
        }
        for (entry, size) in entries {
            recent.bytes += size;
            recent.entries.push_back((entry, size));
        }
        while recent.bytes > self.limit && recent.entries.len() > 1 {
            let (_, size) = recent.entries.pop_front().expect("more than one entry");
            recent.bytes -= size;
            recent.first += 1;
        }
    }

    /// Clones of the entries in `start..end`, when the first of them is held (the rest up to
    /// the log's end then are too); `None` sends the read to the segments.
    pub(super) fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let recent = self.lock();
        if recent.entries.is_empty() || start < recent.first {
            return None;
        }
        let from = (start - recent.first) as usize;
        let to = (end.saturating_sub(recent.first) as usize).min(recent.entries.len());
        Some(
            recent
                .entries
                .range(from.min(to)..to)
                .map(|(entry, _)| entry.clone())
                .collect(),
        )
    }

    /// The log lost its entries from `index` on.
    pub(super) fn truncate(&self, index: u64) {
        let mut recent = self.lock();
        while recent.first + recent.entries.len() as u64 > index {
            match recent.entries.pop_back() {
                Some((_, size)) => recent.bytes -= size,
                None => break,
            }
        }
    }

    /// The log forgot its entries up to `index`.
    pub(super) fn purge(&self, index: u64) {
        let mut recent = self.lock();
        while recent.first <= index {
            match recent.entries.pop_front() {
                Some((_, size)) => {
                    recent.bytes -= size;
                    recent.first += 1;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;

    fn entry(index: u64) -> (Entry<TypeConfig>, usize) {
        (
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Blank,
            },
            100,
        )
    }

    fn indexes(entries: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<u64>> {
        entries.map(|entries| entries.iter().map(|entry| entry.log_id.index).collect())
    }

    #[test]
    fn holds_the_newest_entries_within_its_limit_and_follows_the_log() {
        let recent = RecentEntries::new(1000);
        assert_eq!(indexes(recent.get(1, 5)), None, "nothing held yet");
        recent.appended((1..=5).map(entry).collect());
        assert_eq!(indexes(recent.get(2, 4)), Some(vec![2, 3]));
        assert_eq!(indexes(recent.get(4, 100)), Some(vec![4, 5]), "up to the log's end");
        assert_eq!(indexes(recent.get(6, 100)), Some(vec![]), "past the log's end");
        recent.appended((6..=15).map(entry).collect());
        // 1,500 bytes appended against a 1,000-byte limit: the five oldest are dropped.
        assert_eq!(indexes(recent.get(5, 7)), None);
        assert_eq!(indexes(recent.get(6, 8)), Some(vec![6, 7]));

        recent.truncate(12);
        assert_eq!(indexes(recent.get(10, 100)), Some(vec![10, 11]));
        recent.appended((12..=13).map(entry).collect());
        assert_eq!(indexes(recent.get(11, 100)), Some(vec![11, 12, 13]));

        recent.purge(8);
        assert_eq!(indexes(recent.get(8, 100)), None);
        assert_eq!(indexes(recent.get(9, 10)), Some(vec![9]));

        // An append that does not follow what is held (after a purge past the end) starts over.
        recent.appended((40..=41).map(entry).collect());
        assert_eq!(indexes(recent.get(13, 100)), None);
        assert_eq!(indexes(recent.get(40, 100)), Some(vec![40, 41]));
        recent.purge(100);
        assert_eq!(indexes(recent.get(40, 100)), None);
    }
}
