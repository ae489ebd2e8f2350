//! The log's newest entries, kept in memory as they were appended, so that the replication
//! tasks (two reads of every entry on a leader of three) clone them instead of reading their
//! frames back from the segment, checking and decoding them. Each is kept with its encoding, the
//! bytes its frame holds, so that an append to a follower copies those bytes rather than
//! encoding the entry again for every follower. Bounded by the entries' encoded size; an older
//! entry is read from its segment as before.
//!
//! While it holds anything, its last entry is the log's last: every append, truncation and purge
//! of the log store updates it after the segments.
//!
//! It also holds, on a follower, the encodings of the entries of the last append received, as
//! they came off the wire, so that the log store writes those bytes into its frames rather than
//! encoding the entries it has just decoded from them.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use openraft::{Entry, LogId};

use crate::{NodeId, TypeConfig};

/// Encoded bytes of entries kept at most (a leader's replication reads the newest ones, a
/// round trip or two behind its appends).
pub(super) const MAX_RECENT_BYTES: usize = 8 * 1024 * 1024;

/// Encoded bytes of a received append's entries kept at most, for the log store to write.
const MAX_RECEIVED_BYTES: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct Recent {
    /// Entries with their encodings, in index order from `first`.
    entries: VecDeque<(Entry<TypeConfig>, Bytes)>,
    first: u64,
    bytes: usize,
}

pub struct RecentEntries {
    limit: usize,
    inner: Mutex<Recent>,
    /// The last received append's entries, by log id, in index order.
    received: Mutex<VecDeque<(LogId<NodeId>, Bytes)>>,
}

impl RecentEntries {
    pub(crate) fn new(limit: usize) -> RecentEntries {
        RecentEntries {
            limit,
            inner: Mutex::new(Recent::default()),
            received: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.inner.lock().expect("recent entries lock poisoned")
    }

    /// Entries just written after the log's last, each with its encoding; the oldest beyond the
    /// limit are dropped.
    pub(crate) fn appended(&self, entries: Vec<(Entry<TypeConfig>, Bytes)>) {
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
        for (entry, encoded) in entries {
            recent.bytes += encoded.len();
            recent.entries.push_back((entry, encoded));
        }
        while recent.bytes > self.limit && recent.entries.len() > 1 {
            let (_, encoded) = recent.entries.pop_front().expect("more than one entry");
            recent.bytes -= encoded.len();
            recent.first += 1;
        }
    }

    /// The encoding of the entry `log_id` names, while it is held.
    pub(crate) fn encoded(&self, log_id: &LogId<NodeId>) -> Option<Bytes> {
        let recent = self.lock();
        let at = usize::try_from(log_id.index.checked_sub(recent.first)?).ok()?;
        let (entry, encoded) = recent.entries.get(at)?;
        (entry.log_id == *log_id).then(|| encoded.clone())
    }

    /// The encodings of a received append's entries, in index order, in place of the previous
    /// append's (none kept beyond [`MAX_RECEIVED_BYTES`]).
    pub(crate) fn received(&self, entries: VecDeque<(LogId<NodeId>, Bytes)>) {
        let bytes: usize = entries.iter().map(|(_, encoded)| encoded.len()).sum();
        let mut received = self.received.lock().expect("received entries lock poisoned");
        *received = if bytes <= MAX_RECEIVED_BYTES {
            entries
        } else {
            VecDeque::new()
        };
    }

    /// The received encoding of the entry `log_id` names, taken, with every received one
    /// before it dropped. The same log id names the same entry (Raft's log matching), so these
    /// bytes are that entry's encoding whichever append brought them.
    pub(super) fn take_received(&self, log_id: &LogId<NodeId>) -> Option<Bytes> {
        let mut received = self.received.lock().expect("received entries lock poisoned");
        while let Some((front, _)) = received.front() {
            if front.index > log_id.index {
                return None;
            }
            let (front, encoded) = received.pop_front().expect("a front entry");
            if front == *log_id {
                return Some(encoded);
            }
        }
        None
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
    pub(crate) fn truncate(&self, index: u64) {
        let mut recent = self.lock();
        while recent.first + recent.entries.len() as u64 > index {
            match recent.entries.pop_back() {
                Some((_, encoded)) => recent.bytes -= encoded.len(),
                None => break,
            }
        }
    }

    /// The log forgot its entries up to `index`.
    pub(super) fn purge(&self, index: u64) {
        let mut recent = self.lock();
        while recent.first <= index {
            match recent.entries.pop_front() {
                Some((_, encoded)) => {
                    recent.bytes -= encoded.len();
                    recent.first += 1;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> (Entry<TypeConfig>, Bytes) {
        (
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Blank,
            },
            Bytes::from(vec![index as u8; 100]),
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

    #[test]
    fn gives_an_entrys_encoding_only_for_its_own_log_id() {
        let recent = RecentEntries::new(1000);
        recent.appended((1..=3).map(entry).collect());
        let id = |term, index| LogId::new(CommittedLeaderId::new(term, 1), index);
        assert_eq!(recent.encoded(&id(1, 2)), Some(Bytes::from(vec![2u8; 100])));
        assert_eq!(recent.encoded(&id(2, 2)), None, "another term's entry at that index");
        assert_eq!(recent.encoded(&id(1, 4)), None, "past the end");
        assert_eq!(recent.encoded(&id(1, 0)), None, "before the first held");
        recent.truncate(2);
        assert_eq!(recent.encoded(&id(1, 2)), None, "cut off");
    }

    #[test]
    fn hands_out_a_received_encoding_once_and_drops_the_ones_before_it() {
        let recent = RecentEntries::new(1000);
        let id = |term, index| LogId::new(CommittedLeaderId::new(term, 1), index);
        let encoded = |index: u64| Bytes::from(vec![index as u8; 10]);
        recent.received((5..=8).map(|index| (id(1, index), encoded(index))).collect());
        assert_eq!(recent.take_received(&id(1, 4)), None, "before the first received");
        assert_eq!(recent.take_received(&id(1, 6)), Some(encoded(6)), "5 is passed over");
        assert_eq!(recent.take_received(&id(1, 6)), None, "taken once");
        assert_eq!(recent.take_received(&id(2, 7)), None, "same index, another term");
        assert_eq!(recent.take_received(&id(1, 8)), Some(encoded(8)));
        // A later append replaces what an earlier one left.
        recent.received((9..=9).map(|index| (id(1, index), encoded(index))).collect());
        recent.received((10..=10).map(|index| (id(1, index), encoded(index))).collect());
        assert_eq!(recent.take_received(&id(1, 9)), None);
        assert_eq!(recent.take_received(&id(1, 10)), Some(encoded(10)));
        // Beyond the limit nothing is kept.
        let big = Bytes::from(vec![0u8; MAX_RECEIVED_BYTES + 1]);
        recent.received([(id(1, 11), big)].into_iter().collect());
        assert_eq!(recent.take_received(&id(1, 11)), None);
    }
}
