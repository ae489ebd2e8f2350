//! The Raft log's entries in append-only segment files of their own, outside RocksDB.
//!
//! Each entry is one frame: its payload's length (u32), a CRC-32 (u32) of the index and the
//! payload, the entry's index (u64), all little-endian, then the payload (the postcard-encoded
//! entry). A segment is named after the first index written to it (`00000000000000000042.seg`)
//! and takes appends until it holds [`SEGMENT_BYTES`]; then it is synced and the next append
//! begins a new one. An append is one `pwrite` of all its frames, readable by the replication
//! tasks at once (through the page cache); the flusher syncs it (`sync`).
//!
//! Zeros ahead of the appends: the last segment is kept written with zeros up to
//! [`ZEROED_AHEAD_BYTES`] past its last frame, so that an append overwrites blocks that already
//! exist and the file's size does not change. Its sync (`fdatasync`) then writes the data only;
//! an append that grew the file would make every sync commit the file system's journal too
//! (on this project's test machines, ext4 on a virtual disk: p50 0.09 ms against 0.16-0.22 ms
//! for an 8 KiB write and its sync). A segment is cut to its last frame before the next one is
//! begun, so only the last segment ever ends in zeros; at open a last segment whose rest is all
//! zeros is whole, and one with anything else after its last whole frame was torn.
//!
//! Why not RocksDB: every entry went through its write-ahead log, its memtable, a table at
//! every flush of the log family and the compactions after that, until a purge 100,000 entries
//! later deleted it; here an entry is written once and a purge deletes whole files.
//!
//! Crash safety:
//! - only the last segment can have a torn tail (a segment is synced before the next one is
//!   created): at open its frames are checked one by one and the file is cut at the first one
//!   that is short or fails its CRC;
//! - an earlier segment is walked by its frame headers only at open (its CRCs are checked
//!   whenever its frames are read);
//! - a truncation removes the later segments, highest first, cuts the segment it falls in and
//!   syncs it, so what is left is always a prefix of what was written;
//! - a purge only deletes files whose every entry is at or below the purged index, after the
//!   purge mark is stored; a file that survives a crash is skipped at open by that mark.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The folder in a store's directory that holds the segments.
pub(super) const SEGMENTS_DIR: &str = "raft-log";
/// A segment takes appends until it holds this many bytes.
pub(super) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// How far past its last frame the last segment is written with zeros (see the module's
/// documentation): when an append passes the zeros, this much more is written after it.
pub(super) const ZEROED_AHEAD_BYTES: u64 = 1024 * 1024;
/// The zeros are written this many at a time.
const ZEROS_BLOCK_BYTES: usize = 64 * 1024;
/// The page size the log lets go of the page cache in (the kernel rounds a range to its own
/// pages, inward, so a larger page only keeps more).
const PAGE_BYTES: u64 = 4096;
const HEADER_BYTES: usize = 16;
const SUFFIX: &str = ".seg";

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: at byte {offset}: {message}")]
    Corrupt { path: String, offset: u64, message: String },
    #[error("the log has no entry at index {0}")]
    Missing(u64),
    #[error("an append of entries {first}..={last} {problem}")]
    BadAppend { first: u64, last: u64, problem: String },
}

/// A segment file; its path is the folder's and its first index's ([`Segments::path_of`]).
struct Segment {
    file: Arc<File>,
    /// Bytes of whole frames in the file.
    len: u64,
    /// Where the zeros after `len` end (`len` itself for a segment cut to its frames). A write
    /// of zeros that failed partway may have left the file longer; those zeros are not counted.
    zeroed_to: u64,
    /// Below this the file's pages were synced and let go of from the page cache (see
    /// [`Segments::let_go_of`]).
    uncached_to: u64,
}

/// Where one entry's frame is: the segment (by its first index), the offset and the frame's
/// whole length.
#[derive(Clone, Copy, Debug)]
struct Location {
    segment: u64,
    offset: u64,
    len: u32,
}

/// The whole pages of the last segment a sync made durable and the page cache still holds:
/// `from..to`, with `to` at or below the page the frames end in.
pub(super) struct SyncedPages {
    key: u64,
    file: Arc<File>,
    from: u64,
    to: u64,
}

/// Frames of consecutive entries in one segment, to read with one `pread`.
struct Run {
    segment: u64,
    file: Arc<File>,
    offset: u64,
    len: u64,
    first: u64,
}

struct Inner {
    segments: BTreeMap<u64, Segment>,
    /// The frames of the entries kept (above the purge mark), in index order.
    locations: VecDeque<Location>,
    /// The index of `locations[0]`.
    first: u64,
}

/// The log's segment files and where each entry kept is. Appends, truncations and purges come
/// from openraft's core one at a time; reads come from the replication tasks at any time, and
/// read the files outside the lock.
pub(super) struct Segments {
    dir: PathBuf,
    /// [`SEGMENT_BYTES`], smaller in tests.
    segment_bytes: u64,
    inner: Mutex<Inner>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    File::open(dir).and_then(|file| file.sync_all()).map_err(io(dir))
}

fn crc(index_and_payload: &[u8]) -> u32 {
    crc32fast::hash(index_and_payload)
}

/// A frame's header: the payload's length, its CRC and its index.
fn header(bytes: &[u8]) -> (u32, u32, u64) {
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
    let index = u64::from_le_bytes(bytes[8..16].try_into().expect("eight bytes"));
    (word(0), word(4), index)
}

/// Appends one frame holding `encode`'s bytes to `buffer`.
pub(super) fn push_frame(buffer: &mut Vec<u8>, index: u64, encode: impl FnOnce(&mut Vec<u8>)) {
    let start = buffer.len();
    buffer.extend_from_slice(&[0; 8]);
    buffer.extend_from_slice(&index.to_le_bytes());
    encode(buffer);
    let payload = u32::try_from(buffer.len() - start - HEADER_BYTES).expect("a log entry is under 4 GiB");
    let checksum = crc(&buffer[start + 8..]);
    buffer[start..start + 4].copy_from_slice(&payload.to_le_bytes());
    buffer[start + 4..start + 8].copy_from_slice(&checksum.to_le_bytes());
}

/// How an entry is named in a decoding error.
pub(super) fn entry_key(index: u64) -> Vec<u8> {
    format!("log entry {index}").into_bytes()
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}{SUFFIX}")
}

impl Segments {
    /// Opens the segments in `dir` (created if missing), keeping the entries above `purged`.
    /// A torn tail of the last segment is cut off, and the last segment synced, so that all
    /// that is left counts as synced.
    pub(super) fn open(dir: &Path, purged: Option<u64>) -> Result<Segments, SegmentError> {
        Segments::open_with(dir, purged, SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, purged: Option<u64>, segment_bytes: u64) -> Result<Segments, SegmentError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let mut names = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io(dir))? {
            let item = item.map_err(io(dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(first) = name.strip_suffix(SUFFIX).and_then(|stem| stem.parse::<u64>().ok()) else {
                continue;
            };
            // Only names this log writes, so that a segment's path is always its first index's.
            if name != segment_name(first) {
                continue;
            }
            names.push((first, item.path()));
        }
        names.sort();
        let mut inner = Inner {
            segments: BTreeMap::new(),
            locations: VecDeque::new(),
            first: purged.map_or(0, |index| index + 1),
        };
        let count = names.len();
        for (position, (first, path)) in names.into_iter().enumerate() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            let last = position + 1 == count;
            let (len, zeroed_to) = load_frames(&file, &path, first, last, purged, &mut inner)?;
            if last {
                file.sync_all().map_err(io(&path))?;
            }
            inner.segments.insert(
                first,
                Segment {
                    file: Arc::new(file),
                    len,
                    zeroed_to,
                    uncached_to: 0,
                },
            );
        }
        Ok(Segments {
            dir: dir.to_path_buf(),
            segment_bytes,
            inner: Mutex::new(inner),
        })
    }

    fn path_of(&self, segment: u64) -> PathBuf {
        self.dir.join(segment_name(segment))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("log segments lock poisoned")
    }

    /// The index of the last entry kept, if any.
    pub(super) fn last_index(&self) -> Option<u64> {
        let inner = self.lock();
        (!inner.locations.is_empty()).then(|| inner.first + inner.locations.len() as u64 - 1)
    }

    /// Writes `frames` (whole frames from [`push_frame`], for the entries `first..=last`) after
    /// the last entry kept. Not synced.
    pub(super) fn append(&self, first: u64, last: u64, frames: &[u8]) -> Result<(), SegmentError> {
        let bad = |problem: String| SegmentError::BadAppend { first, last, problem };
        // Where each frame starts within `frames`, checked before anything is written.
        let mut starts = Vec::with_capacity(last.saturating_sub(first) as usize + 1);
        let mut offset = 0usize;
        while offset < frames.len() {
            let (payload, _, index) = header(&frames[offset..]);
            let expected = first + starts.len() as u64;
            if index != expected {
                return Err(bad(format!("holds index {index} where {expected} belongs")));
            }
            starts.push((offset as u64, HEADER_BYTES as u32 + payload));
            offset += HEADER_BYTES + payload as usize;
        }
        if starts.len() as u64 != last - first + 1 || offset != frames.len() {
            return Err(bad(format!("holds {} whole frames", starts.len())));
        }
        let mut inner = self.lock();
        let next = inner.first + inner.locations.len() as u64;
        if !inner.locations.is_empty() && first != next {
            return Err(bad(format!("does not follow the log's last entry ({})", next - 1)));
        }
        if inner.locations.is_empty() {
            inner.first = first;
        }
        let full = match inner.segments.last_key_value() {
            Some((_, segment)) => segment.len >= self.segment_bytes,
            None => true,
        };
        if full {
            if let Some(mut last) = inner.segments.last_entry() {
                let path = self.path_of(*last.key());
                let segment = last.get_mut();
                // Cut to its frames (only the last segment ends in zeros), then synced. Always
                // cut: zeros that failed partway are not counted in `zeroed_to`.
                segment.file.set_len(segment.len).map_err(io(&path))?;
                segment.zeroed_to = segment.len;
                segment.file.sync_data().map_err(io(&path))?;
            }
            let path = self.path_of(first);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io(&path))?;
            sync_dir(&self.dir)?;
            inner.segments.insert(
                first,
                Segment {
                    file: Arc::new(file),
                    len: 0,
                    zeroed_to: 0,
                    uncached_to: 0,
                },
            );
        }
        let (&key, segment) = inner.segments.last_key_value().expect("a segment was just made");
        let start = segment.len;
        segment
            .file
            .write_all_at(frames, start)
            .map_err(io(&self.path_of(key)))?;
        let end = start + frames.len() as u64;
        let zeroed_to = if end > segment.zeroed_to {
            write_zeros(&segment.file, &self.path_of(key), end)
        } else {
            segment.zeroed_to
        };
        let segment = inner.segments.get_mut(&key).expect("the segment just written");
        segment.len = end;
        segment.zeroed_to = zeroed_to;
        inner.locations.extend(starts.into_iter().map(|(offset, len)| Location {
            segment: key,
            offset: start + offset,
            len,
        }));
        Ok(())
    }

    /// Syncs what was written to the last segment (an earlier one was synced when the next one
    /// was begun), and answers the whole pages that sync made durable for [`Segments::let_go_of`]
    /// (none when the log is empty). Dropping the answer keeps them cached.
    pub(super) fn sync(&self) -> Result<Option<SyncedPages>, SegmentError> {
        let last = self
            .lock()
            .segments
            .last_key_value()
            .map(|(&key, segment)| (key, segment.file.clone(), segment.len, segment.uncached_to));
        let Some((key, file, written, uncached_to)) = last else {
            return Ok(None);
        };
        file.sync_data().map_err(io(&self.path_of(key)))?;
        Ok(Some(SyncedPages {
            key,
            file,
            from: uncached_to,
            to: written / PAGE_BYTES * PAGE_BYTES,
        }))
    }

    /// Lets the page cache go of pages a sync made durable, once the sync's callers were told.
    ///
    /// Nothing reads them back in the usual course: a leader's replication takes new entries
    /// from the recent ones kept in memory, and a follower never reads its log. Kept, they would
    /// grow the page cache by every byte of the log; let go of, they are the first pages reused
    /// by the node's next allocations. The page the last frame ends in stays (the next append
    /// writes into it, and a partial write into an uncached page would read it from the disk
    /// first), and so do the zeros ahead. A read of an older entry (a follower far behind)
    /// reads the disk. The advice is best effort: where it fails, the pages just stay.
    pub(super) fn let_go_of(&self, synced: SyncedPages) {
        let Some(len) = std::num::NonZeroU64::new(synced.to.saturating_sub(synced.from)) else {
            return;
        };
        let _ = rustix::fs::fadvise(&*synced.file, synced.from, Some(len), rustix::fs::Advice::DontNeed);
        if let Some(segment) = self.lock().segments.get_mut(&synced.key) {
            segment.uncached_to = segment.uncached_to.max(synced.to).min(segment.len);
        }
    }

    /// The payloads of the kept entries in `start..end` (clamped to what is kept), each with its
    /// index, read outside the lock and checked against their CRCs.
    pub(super) fn read(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, SegmentError> {
        // Contiguous runs of frames, one per segment.
        let runs = {
            let inner = self.lock();
            let kept_end = inner.first + inner.locations.len() as u64;
            let (start, end) = (start.max(inner.first), end.min(kept_end));
            let mut runs: Vec<Run> = Vec::new();
            for index in start..end {
                let location = inner.locations[(index - inner.first) as usize];
                match runs.last_mut() {
                    Some(run) if run.segment == location.segment => run.len += u64::from(location.len),
                    _ => {
                        let segment = &inner.segments[&location.segment];
                        runs.push(Run {
                            segment: location.segment,
                            file: segment.file.clone(),
                            offset: location.offset,
                            len: u64::from(location.len),
                            first: index,
                        });
                    }
                }
            }
            runs
        };
        let mut entries = Vec::new();
        for Run {
            segment,
            file,
            offset,
            len,
            first,
        } in runs
        {
            let mut bytes = vec![0; len as usize];
            file.read_exact_at(&mut bytes, offset)
                .map_err(io(&self.path_of(segment)))?;
            let mut at = 0usize;
            let mut expected = first;
            while at < bytes.len() {
                let frame = check_frame(&bytes[at..])
                    .filter(|(index, _)| *index == expected)
                    .ok_or_else(|| SegmentError::Corrupt {
                        path: self.path_of(segment).display().to_string(),
                        offset: offset + at as u64,
                        message: format!("the frame of index {expected} is damaged"),
                    })?;
                entries.push((expected, frame.1.to_vec()));
                at += HEADER_BYTES + frame.1.len();
                expected += 1;
            }
        }
        Ok(entries)
    }

    /// Removes the entries from `index` on: later segments are deleted (highest first) and the
    /// one it falls in is cut and synced.
    pub(super) fn truncate(&self, index: u64) -> Result<(), SegmentError> {
        let mut inner = self.lock();
        let kept_end = inner.first + inner.locations.len() as u64;
        if index >= kept_end {
            return Ok(());
        }
        let (segment, offset) = match index.checked_sub(inner.first) {
            Some(position) => {
                let location = inner.locations[position as usize];
                (location.segment, location.offset)
            }
            // Below the kept entries: every kept entry goes, from the first one's frame.
            None => {
                let location = inner.locations[0];
                (location.segment, location.offset)
            }
        };
        let later: Vec<u64> = inner.segments.range(segment + 1..).map(|(key, _)| *key).collect();
        for key in later.into_iter().rev() {
            inner.segments.remove(&key);
            self.remove(key)?;
        }
        let cut = inner.segments.get_mut(&segment).expect("a location's segment is open");
        let path = self.path_of(segment);
        // Cut, not zeroed: the frames after the cut must not be read again. The zeros ahead come
        // back with the next appends.
        cut.file.set_len(offset).map_err(io(&path))?;
        cut.file.sync_all().map_err(io(&path))?;
        cut.len = offset;
        cut.zeroed_to = offset;
        cut.uncached_to = cut.uncached_to.min(offset);
        sync_dir(&self.dir)?;
        let keep = index.saturating_sub(inner.first) as usize;
        inner.locations.truncate(keep);
        Ok(())
    }

    /// Forgets the entries up to `index` and deletes the segments that hold nothing above it
    /// (never the last one, which takes the next appends).
    pub(super) fn purge(&self, index: u64) -> Result<(), SegmentError> {
        let mut inner = self.lock();
        if index >= inner.first {
            let gone = ((index - inner.first + 1) as usize).min(inner.locations.len());
            inner.locations.drain(..gone);
            inner.first = index + 1;
        }
        let keys: Vec<u64> = inner.segments.keys().copied().collect();
        for pair in keys.windows(2) {
            // Every frame of a segment is below the next segment's first index.
            if pair[1] <= index + 1 {
                inner.segments.remove(&pair[0]);
                self.remove(pair[0])?;
            }
        }
        Ok(())
    }

    /// Deletes every segment (a store whose log is being moved here again).
    pub(super) fn clear(&self) -> Result<(), SegmentError> {
        let mut inner = self.lock();
        for key in std::mem::take(&mut inner.segments).into_keys() {
            self.remove(key)?;
        }
        inner.locations.clear();
        sync_dir(&self.dir)
    }

    /// Deletes the file of segment `key` (already out of the map).
    fn remove(&self, key: u64) -> Result<(), SegmentError> {
        let path = self.path_of(key);
        std::fs::remove_file(&path).map_err(io(&path))
    }

    #[cfg(test)]
    pub(super) fn files(&self) -> Vec<PathBuf> {
        self.lock().segments.keys().map(|key| self.path_of(*key)).collect()
    }

    /// Each segment's file with the length of its whole frames.
    #[cfg(test)]
    fn frame_lengths(&self) -> Vec<(PathBuf, u64)> {
        let inner = self.lock();
        inner
            .segments
            .iter()
            .map(|(key, segment)| (self.path_of(*key), segment.len))
            .collect()
    }
}

/// Writes [`ZEROED_AHEAD_BYTES`] of zeros from `from` (the end of the segment's frames) and
/// answers where the file's zeros end. Best effort: zeros only spare later syncs the journal,
/// so a failure (a full disk) leaves the file ending at its frames, and the next append that
/// passes the end tries again.
fn write_zeros(file: &File, path: &Path, from: u64) -> u64 {
    // One static block written over and over: no fresh buffer to fault in and clear each time.
    static ZEROS: [u8; ZEROS_BLOCK_BYTES] = [0; ZEROS_BLOCK_BYTES];
    let mut at = from;
    while at < from + ZEROED_AHEAD_BYTES {
        if let Err(error) = file.write_all_at(&ZEROS, at) {
            tracing::debug!(path = %path.display(), %error, "no zeros written ahead of the log's appends");
            // What was written reads as zeros, and the next append writes over it.
            return from;
        }
        at += ZEROS_BLOCK_BYTES as u64;
    }
    at
}

/// The index and payload of the whole, undamaged frame at the start of `bytes`.
fn check_frame(bytes: &[u8]) -> Option<(u64, &[u8])> {
    if bytes.len() < HEADER_BYTES {
        return None;
    }
    let (payload, checksum, index) = header(bytes);
    let end = HEADER_BYTES.checked_add(payload as usize)?;
    if bytes.len() < end || crc(&bytes[8..end]) != checksum {
        return None;
    }
    Some((index, &bytes[HEADER_BYTES..end]))
}

/// Reads a segment's frames into `inner.locations` and answers the length of its whole frames
/// and the file's size after the load. The last segment is read whole and checked frame by
/// frame: zeros after its last whole frame are kept (the zeros ahead of the appends), anything
/// else there is a torn write and is cut off. An earlier one is walked by its headers, and a
/// damaged one is an error.
fn load_frames(
    file: &File,
    path: &Path,
    key: u64,
    last: bool,
    purged: Option<u64>,
    inner: &mut Inner,
) -> Result<(u64, u64), SegmentError> {
    let size = file.metadata().map_err(io(path))?.len();
    let corrupt = |offset: u64, message: String| SegmentError::Corrupt {
        path: path.display().to_string(),
        offset,
        message,
    };
    let keep = |index: u64, offset: u64, len: u32, inner: &mut Inner| -> Result<(), SegmentError> {
        if purged.is_some_and(|purged| index <= purged) {
            return Ok(());
        }
        let next = inner.first + inner.locations.len() as u64;
        if inner.locations.is_empty() {
            inner.first = index;
        } else if index != next {
            return Err(corrupt(offset, format!("index {index} follows index {}", next - 1)));
        }
        inner.locations.push_back(Location {
            segment: key,
            offset,
            len,
        });
        Ok(())
    };
    if last {
        let mut bytes = vec![0; size as usize];
        file.read_exact_at(&mut bytes, 0).map_err(io(path))?;
        let mut at = 0usize;
        let mut file_size = size;
        while at < bytes.len() {
            let Some((index, payload)) = check_frame(&bytes[at..]) else {
                if bytes[at..].iter().all(|byte| *byte == 0) {
                    // The zeros ahead of the appends: the segment ends at its last frame.
                    break;
                }
                tracing::warn!(
                    path = %path.display(),
                    offset = at,
                    dropped_bytes = bytes.len() - at,
                    "the log's last segment ends in a partly written frame (a crash during an unsynced write); it is cut there"
                );
                file.set_len(at as u64).map_err(io(path))?;
                file_size = at as u64;
                break;
            };
            let len = (HEADER_BYTES + payload.len()) as u32;
            keep(index, at as u64, len, inner)?;
            at += len as usize;
        }
        return Ok((at as u64, file_size));
    }
    let mut at = 0u64;
    let mut head = [0u8; HEADER_BYTES];
    while at < size {
        if size - at < HEADER_BYTES as u64 {
            return Err(corrupt(
                at,
                "a frame header is cut short in a closed segment".to_string(),
            ));
        }
        file.read_exact_at(&mut head, at).map_err(io(path))?;
        let (payload, _, index) = header(&head);
        let len = HEADER_BYTES as u64 + u64::from(payload);
        if at + len > size {
            return Err(corrupt(
                at,
                format!("the frame of index {index} runs past the end of a closed segment"),
            ));
        }
        keep(index, at, len as u32, inner)?;
        at += len;
    }
    Ok((size, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(index: u64) -> Vec<u8> {
        format!("entry {index} ").repeat(1 + (index % 7) as usize).into_bytes()
    }

    /// Appends `first..=last`, `per_append` entries at a time.
    fn append(segments: &Segments, first: u64, last: u64, per_append: u64) {
        let mut at = first;
        while at <= last {
            let end = (at + per_append - 1).min(last);
            let mut frames = Vec::new();
            for index in at..=end {
                push_frame(&mut frames, index, |buffer| buffer.extend_from_slice(&payload(index)));
            }
            segments.append(at, end, &frames).unwrap();
            at = end + 1;
        }
    }

    fn assert_holds(segments: &Segments, first: u64, last: u64) {
        let read = segments.read(0, u64::MAX).unwrap();
        let expected: Vec<(u64, Vec<u8>)> = (first..=last).map(|index| (index, payload(index))).collect();
        assert_eq!(read, expected);
        assert_eq!(segments.last_index(), Some(last));
    }

    #[test]
    fn entries_roll_over_segments_and_read_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open_with(dir.path(), None, 1024).unwrap();
        append(&segments, 1, 300, 7);
        assert!(segments.files().len() > 5, "{:?}", segments.files());
        assert_holds(&segments, 1, 300);
        assert_eq!(
            segments.read(100, 103).unwrap(),
            (100..103).map(|index| (index, payload(index))).collect::<Vec<_>>()
        );
        segments.sync().unwrap();
        drop(segments);
        let segments = Segments::open_with(dir.path(), None, 1024).unwrap();
        assert_holds(&segments, 1, 300);
        append(&segments, 301, 320, 3);
        assert_holds(&segments, 1, 320);
    }

    #[test]
    fn a_torn_tail_of_the_last_segment_is_cut_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open_with(dir.path(), None, 1 << 20).unwrap();
        append(&segments, 1, 50, 5);
        let (path, whole) = segments.frame_lengths().pop().unwrap();
        drop(segments);
        assert!(
            std::fs::metadata(&path).unwrap().len() > whole,
            "zeros follow the frames"
        );
        // A frame of index 51 written in part over the zeros: its header and a few bytes of its
        // payload.
        let mut torn = Vec::new();
        push_frame(&mut torn, 51, |buffer| buffer.extend_from_slice(&payload(51)));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&torn[..torn.len() - 3], whole).unwrap();
        drop(file);

        let segments = Segments::open_with(dir.path(), None, 1 << 20).unwrap();
        assert_holds(&segments, 1, 50);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            whole,
            "the torn frame, and the zeros after it, are cut off"
        );
        append(&segments, 51, 60, 4);
        drop(segments);
        let segments = Segments::open_with(dir.path(), None, 1 << 20).unwrap();
        assert_holds(&segments, 1, 60);
    }

    #[test]
    fn a_sync_lets_the_page_cache_go_of_the_whole_pages_it_synced_and_reads_and_appends_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open_with(dir.path(), None, SEGMENT_BYTES).unwrap();
        // About 3 MB of frames, well beyond the 1 MiB of zeros ahead.
        append(&segments, 1, 50_000, 500);
        let (key, len) = {
            let inner = segments.lock();
            let (&key, segment) = inner.segments.last_key_value().unwrap();
            assert_eq!(segment.uncached_to, 0, "nothing let go of before a sync");
            (key, segment.len)
        };
        assert!(len > 2 * ZEROED_AHEAD_BYTES, "{len} bytes of frames");
        let path = segments.path_of(key);
        // tmpfs keeps everything in memory whatever the advice; elsewhere the page cache holds
        // what was written until the sync lets it go.
        let measured = !super::super::page_cache::on_tmpfs(dir.path());
        if measured {
            assert!(
                super::super::page_cache::cached_bytes(&path) >= len,
                "written pages are cached before the sync"
            );
        }
        let synced = segments.sync().unwrap().expect("a segment to sync");
        segments.let_go_of(synced);
        let (uncached_to, zeroed_to) = {
            let inner = segments.lock();
            (inner.segments[&key].uncached_to, inner.segments[&key].zeroed_to)
        };
        assert_eq!(uncached_to, len / PAGE_BYTES * PAGE_BYTES, "every whole synced page");
        if measured {
            // What stays: the page the frames end in, the zeros ahead, and at most the rest of
            // a large folio the kernel keeps whole across the boundary.
            let cached = super::super::page_cache::cached_bytes(&path);
            let kept = zeroed_to - uncached_to + 256 * 1024;
            assert!(
                cached <= kept,
                "{cached} bytes cached, at most {kept} expected (frames end at {len})"
            );
        }
        // Appends write into the page the frames end in, and everything reads back, from the
        // disk where the page cache let go.
        append(&segments, 50_001, 50_100, 7);
        segments.sync().unwrap();
        assert_holds(&segments, 1, 50_100);
        // A cut below what was let go of brings the mark back with it.
        segments.truncate(100).unwrap();
        {
            let inner = segments.lock();
            assert!(inner.segments[&key].uncached_to <= inner.segments[&key].len);
        }
        append(&segments, 100, 150, 3);
        segments.sync().unwrap();
        assert_holds(&segments, 1, 150);
        drop(segments);
        let segments = Segments::open(dir.path(), None).unwrap();
        assert_holds(&segments, 1, 150);
    }

    #[test]
    fn appends_write_over_zeros_written_ahead_and_only_the_last_segment_keeps_any() {
        let dir = tempfile::tempdir().unwrap();
        let size = |path: &Path| std::fs::metadata(path).unwrap().len();
        let segments = Segments::open_with(dir.path(), None, 4096).unwrap();
        append(&segments, 1, 5, 5);
        let (path, frames) = segments.frame_lengths().pop().unwrap();
        assert_eq!(size(&path), frames + ZEROED_AHEAD_BYTES);
        append(&segments, 6, 10, 1);
        assert_eq!(
            size(&path),
            frames + ZEROED_AHEAD_BYTES,
            "appends over the zeros keep the size"
        );
        segments.sync().unwrap();
        drop(segments);

        // A clean reopen finds the frames whole and keeps the zeros: nothing is cut.
        let segments = Segments::open_with(dir.path(), None, 4096).unwrap();
        assert_holds(&segments, 1, 10);
        assert_eq!(size(&path), frames + ZEROED_AHEAD_BYTES);
        append(&segments, 11, 200, 6);
        assert_holds(&segments, 1, 200);
        let lengths = segments.frame_lengths();
        assert!(lengths.len() >= 3, "{lengths:?}");
        let (last, closed) = lengths.split_last().unwrap();
        for (path, frames) in closed {
            assert_eq!(size(path), *frames, "{} is cut to its frames", path.display());
        }
        assert!(size(&last.0) > last.1, "the last segment has zeros ahead");
        drop(segments);
        let segments = Segments::open_with(dir.path(), None, 4096).unwrap();
        assert_holds(&segments, 1, 200);
        append(&segments, 201, 210, 4);
        assert_holds(&segments, 1, 210);
    }

    #[test]
    fn a_frame_failing_its_checksum_ends_the_last_segment_and_is_an_error_in_a_closed_one() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open_with(dir.path(), None, 2048).unwrap();
        append(&segments, 1, 200, 10);
        let files = segments.files();
        assert!(files.len() >= 3);
        // A flipped byte inside the first frame's payload, in the first (closed) segment.
        let flip = |path: &Path, at: u64| {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, at).unwrap();
            file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
        };
        flip(&files[0], HEADER_BYTES as u64 + 2);
        let message = segments.read(1, 3).unwrap_err().to_string();
        assert!(
            message.contains(&files[0].display().to_string()) && message.contains("index 1 is damaged"),
            "{message}"
        );
        // Reads that do not touch it are unaffected.
        assert_eq!(segments.read(2, 3).unwrap(), vec![(2, payload(2))]);

        // In the last segment, the same damage is where a crash's unsynced tail ends.
        let last = files.last().unwrap();
        let (first_of_last, _) = last.file_name().unwrap().to_str().unwrap().split_once('.').unwrap();
        let first_of_last: u64 = first_of_last.parse().unwrap();
        flip(last, HEADER_BYTES as u64 + 1);
        drop(segments);
        let segments = Segments::open_with(dir.path(), None, 2048).unwrap();
        assert_eq!(segments.last_index(), Some(first_of_last - 1));
        assert_eq!(std::fs::metadata(last).unwrap().len(), 0);

        // A closed segment whose frame runs past its end stops the open, naming the file.
        let file = std::fs::OpenOptions::new().write(true).open(&files[1]).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len - 5).unwrap();
        drop(segments);
        let message = Segments::open_with(dir.path(), None, 2048)
            .err()
            .expect("a cut closed segment is refused")
            .to_string();
        assert!(
            message.contains(&files[1].display().to_string()) && message.contains("runs past the end"),
            "{message}"
        );
    }

    #[test]
    fn a_truncation_removes_later_segments_and_holds_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open_with(dir.path(), None, 1024).unwrap();
        append(&segments, 1, 300, 5);
        let before = segments.files().len();
        segments.truncate(120).unwrap();
        assert_holds(&segments, 1, 119);
        assert!(segments.files().len() < before);
        // The log goes on from the cut, as openraft's next append after a conflict does.
        append(&segments, 120, 130, 5);
        assert_holds(&segments, 1, 130);
        drop(segments);
        let segments = Segments::open_with(dir.path(), None, 1024).unwrap();
        assert_holds(&segments, 1, 130);
        segments.truncate(1).unwrap();
        assert_eq!(segments.read(0, u64::MAX).unwrap(), vec![]);
        assert_eq!(segments.last_index(), None);
        append(&segments, 1, 3, 3);
        assert_holds(&segments, 1, 3);
    }

    #[test]
    fn a_purge_deletes_only_segments_wholly_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open_with(dir.path(), None, 1024).unwrap();
        append(&segments, 1, 300, 5);
        let before = segments.files();
        segments.purge(150).unwrap();
        assert_holds(&segments, 151, 300);
        let after = segments.files();
        assert!(after.len() < before.len());
        // The first segment left holds entry 151: it was named after an index at or below it.
        let first_left: u64 = after[0].file_name().unwrap().to_str().unwrap()[..20].parse().unwrap();
        assert!(first_left <= 151, "{after:?}");
        drop(segments);
        let segments = Segments::open_with(dir.path(), Some(150), 1024).unwrap();
        assert_holds(&segments, 151, 300);

        // A purge past the end (after a snapshot is installed) leaves nothing to read, and the
        // log goes on after it, also across a reopen.
        segments.purge(1000).unwrap();
        assert_eq!(segments.last_index(), None);
        append(&segments, 1001, 1010, 4);
        assert_holds(&segments, 1001, 1010);
        drop(segments);
        let segments = Segments::open_with(dir.path(), Some(1000), 1024).unwrap();
        assert_holds(&segments, 1001, 1010);
    }
}
