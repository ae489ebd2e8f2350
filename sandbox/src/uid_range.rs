//! The host user ids a machine runs as.
//!
//! A machine's uid 0 must not be the host's uid 0, nor the node's own uid: each machine takes a
//! range of 65,536 host ids that no other machine on the host holds while it lives, and its
//! user namespace maps its ids 0..65,536 onto that range. A range is claimed with an exclusive
//! open-file-description lock on its byte of one file, `ranges`, in a directory shared by every
//! node on the host, so nodes that share a host (tests, benchmarks, a small cluster on one box)
//! never hand out the same range twice, and a node killed with SIGKILL gives its ranges back when
//! the kernel closes its file. One descriptor serves all of a node's ranges: every descriptor
//! the node holds is copied into each process it forks and closed again at its exec, so a
//! descriptor per machine made every machine start slower with each machine running.
//!
//! Files that must look like the machine's own (its base image, install layer and checkout) are
//! shown to it through idmapped mounts of that user namespace (`mounts::idmapped_bind`), so
//! nothing on disk is re-owned per machine; what a machine writes is owned on the host by its
//! range; a captured layer is shifted back to the ids the machine saw (`shift_owners_down`), so
//! one layer serves machines of any range.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, SandboxError};

/// Ids in one machine's range: a whole 16-bit space, as distributions expect (`nobody` is 65534).
pub const IDS_PER_RANGE: u32 = 65_536;
/// The id a file owned by an id outside the machine's range shows as inside it (the kernel's
/// default overflow id).
pub const OVERFLOW_ID: u32 = 65_534;

/// Where machines' ranges come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidRangeConfig {
    /// The first host id of range 0. Far above the ids distributions give people and services
    /// (and above the usual `/etc/subuid` allocations from 100,000), so a machine's files never
    /// belong to a host account.
    pub first_host_id: u32,
    /// How many ranges there are: the most machines the host runs at once.
    pub ranges: u32,
    /// The directory of lock files, one per range, shared by every node on the host.
    pub lock_dir: PathBuf,
}

impl Default for UidRangeConfig {
    fn default() -> Self {
        UidRangeConfig {
            first_host_id: 1_000_000_000,
            ranges: 16_384,
            lock_dir: PathBuf::from("/run/flotilla/uid-ranges"),
        }
    }
}

impl UidRangeConfig {
    pub fn validate(&self) -> Result<()> {
        let last = u64::from(self.first_host_id) + u64::from(self.ranges) * u64::from(IDS_PER_RANGE);
        if self.ranges == 0 || self.first_host_id == 0 || last > u64::from(u32::MAX) {
            return Err(SandboxError::InvalidSpec {
                detail: format!(
                    "machine uid ranges: {} ranges of {IDS_PER_RANGE} from host id {} do not fit in 1..{}",
                    self.ranges,
                    self.first_host_id,
                    u32::MAX
                ),
            });
        }
        Ok(())
    }
}

/// Where the next claim starts looking: just past the range this process claimed last. A hint
/// only (the ranges' locks decide), it keeps a claim from probing every range already taken,
/// one open and lock each, which grew with the machines running.
static NEXT_CLAIM: AtomicU32 = AtomicU32::new(0);

/// The file in the lock directory whose bytes are the ranges' locks.
const RANGE_LOCK_FILE: &str = "ranges";

/// The range lock file of one lock directory, open once in this process.
#[derive(Debug)]
struct RangeLocks {
    file: File,
    /// Ranges this process holds. Locks taken through one open file never conflict with each
    /// other, so the kernel would let this process take a range twice: this set does not.
    held: Mutex<HashSet<u32>>,
}

/// Every lock directory's file this process opened (one per directory; few directories).
static RANGE_LOCKS: Mutex<Vec<(PathBuf, Arc<RangeLocks>)>> = Mutex::new(Vec::new());

impl RangeLocks {
    /// The range lock file of `lock_dir`, opened on first use.
    fn of(lock_dir: &Path) -> Result<Arc<RangeLocks>> {
        let mut opened = RANGE_LOCKS.lock().expect("range locks lock");
        if let Some((_, locks)) = opened.iter().find(|(dir, _)| dir == lock_dir) {
            return Ok(locks.clone());
        }
        std::fs::create_dir_all(lock_dir).map_err(|error| SandboxError::io("create", lock_dir, error))?;
        let path = lock_dir.join(RANGE_LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|error| SandboxError::io("open", &path, error))?;
        let locks = Arc::new(RangeLocks {
            file,
            held: Mutex::new(HashSet::new()),
        });
        opened.push((lock_dir.to_path_buf(), locks.clone()));
        Ok(locks)
    }

    /// Takes range `index` if no process (this one included) holds it.
    fn try_take(&self, index: u32) -> io::Result<bool> {
        let mut held = self.held.lock().expect("held ranges lock");
        if held.contains(&index) {
            return Ok(false);
        }
        let taken = byte_lock(&self.file, index, libc::F_WRLCK)?;
        if taken {
            held.insert(index);
        }
        Ok(taken)
    }

    fn give_back(&self, index: u32) {
        let mut held = self.held.lock().expect("held ranges lock");
        if let Err(error) = byte_lock(&self.file, index, libc::F_UNLCK) {
            tracing::warn!(range = index, %error, "could not release a machine uid range lock");
        }
        held.remove(&index);
    }
}

/// Sets (`F_WRLCK`) or clears (`F_UNLCK`) the open-file-description lock on byte `index` of
/// `file` without waiting; `false` when another holds it.
// Unsafe: fcntl(2) with F_OFD_SETLK has no safe wrapper in std.
#[allow(unsafe_code)]
fn byte_lock(file: &File, index: u32, kind: libc::c_int) -> io::Result<bool> {
    // SAFETY: an all-zero `flock` is a valid value; every field the call reads is set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = libc::off_t::from(index);
    lock.l_len = 1;
    // SAFETY: fcntl on a descriptor the caller owns, with a pointer to a live `flock`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(error),
    }
}

/// Whether range `index` under `lock_dir` is free: nobody (this process included, through
/// another open of the file) holds its byte lock.
#[cfg(test)]
pub(crate) fn range_is_free(lock_dir: &Path, index: u32) -> io::Result<bool> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(lock_dir.join(RANGE_LOCK_FILE))?;
    let free = byte_lock(&file, index, libc::F_WRLCK)?;
    if free {
        byte_lock(&file, index, libc::F_UNLCK)?;
    }
    Ok(free)
}

/// A range held by one machine; dropping it gives the range back.
#[derive(Debug)]
pub struct UidRange {
    index: u32,
    first_host_id: u32,
    /// Holds the range's byte lock.
    locks: Arc<RangeLocks>,
}

impl Drop for UidRange {
    fn drop(&mut self) {
        self.locks.give_back(self.index);
    }
}

impl UidRange {
    /// Claims a free range: the first free one from just past the last claimed, round the ring.
    pub fn claim(config: &UidRangeConfig) -> Result<UidRange> {
        config.validate()?;
        let locks = RangeLocks::of(&config.lock_dir)?;
        let start = NEXT_CLAIM.load(Ordering::Relaxed) % config.ranges;
        for offset in 0..config.ranges {
            let index = (start + offset) % config.ranges;
            let taken = locks
                .try_take(index)
                .map_err(|error| SandboxError::io("lock a byte of", config.lock_dir.join(RANGE_LOCK_FILE), error))?;
            if taken {
                NEXT_CLAIM.store(index.wrapping_add(1), Ordering::Relaxed);
                return Ok(UidRange {
                    index,
                    first_host_id: config.first_host_id + index * IDS_PER_RANGE,
                    locks,
                });
            }
        }
        Err(SandboxError::Unsupported {
            what: format!(
                "more than {} machines at once on this host (every machine uid range in {} is taken)",
                config.ranges,
                config.lock_dir.display()
            ),
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The host id of the machine's id 0.
    pub fn first_host_id(&self) -> u32 {
        self.first_host_id
    }

    /// The host id of the machine's `id`.
    pub fn host_id(&self, id: u32) -> u32 {
        self.first_host_id + id.min(IDS_PER_RANGE - 1)
    }

    /// The machine's id for a host id, if the host id is in the range.
    pub fn machine_id(&self, host_id: u32) -> Option<u32> {
        host_id.checked_sub(self.first_host_id).filter(|id| *id < IDS_PER_RANGE)
    }

    /// A user namespace mapping the machine's ids 0.. onto the whole range.
    pub fn user_namespace(&self) -> Result<OwnedFd> {
        let map = format!("0 {} {IDS_PER_RANGE}\n", self.first_host_id);
        new_user_namespace(&map, &map)
    }

    /// A user namespace in which id 0 is the machine's `uid`/`gid` and nothing else is mapped:
    /// through an idmapped mount of it, files the node made (owned by host root) belong to the
    /// machine's user.
    pub fn user_namespace_owned_by(&self, uid: u32, gid: u32) -> Result<OwnedFd> {
        let uid_map = format!("0 {} 1\n", self.host_id(uid));
        let gid_map = format!("0 {} 1\n", self.host_id(gid));
        new_user_namespace(&uid_map, &gid_map)
    }
}

/// A new user namespace with the given maps, held by the returned descriptor.
///
/// A user namespace needs a process in it: a child is cloned straight into a new one, while the
/// node writes its maps (as host root the node may map any host ids) and opens
/// `/proc/<child>/ns/user`; then the node kills the child, and the descriptor keeps the
/// namespace alive. The child shares the node's memory (`CLONE_VM`) on a small stack of its
/// own, so that nothing of the node is copied: a fork copies the page tables of the whole node,
/// a cost that grows with it, twice per machine start. It runs no libc code (its thread-local
/// state would be the calling thread's) and starts with every signal blocked: it only sleeps
/// until killed.
// Unsafe: clone(2) (through `vfork::clone_with_signals_blocked`), kill(2) and waitpid(2): std
// has no way to make a user namespace.
#[allow(unsafe_code)]
fn new_user_namespace(uid_map: &str, gid_map: &str) -> Result<OwnedFd> {
    let mut stack = vec![0u8; HELPER_STACK_BYTES];
    // SAFETY: the child runs only `sleep_until_killed` on `stack`, which outlives it (it is
    // reaped below before the stack is dropped), and touches no other memory.
    let cloned = unsafe {
        crate::vfork::clone_with_signals_blocked(
            sleep_until_killed,
            &mut stack,
            libc::CLONE_VM | libc::CLONE_NEWUSER | libc::SIGCHLD,
            std::ptr::null_mut(),
        )
    };
    let child = cloned.map_err(|clone_error| match clone_error.raw_os_error() {
        Some(libc::EPERM | libc::ENOSPC | libc::EUSERS | libc::EINVAL) => SandboxError::Unsupported {
            what: format!(
                "creating a user namespace (clone(CLONE_NEWUSER) failed: {clone_error}; are user \
                 namespaces disabled by user.max_user_namespaces or a security module?)"
            ),
        },
        _ => SandboxError::io("clone for", "a machine user namespace", clone_error),
    })?;
    let result = map_child_namespace(child, uid_map, gid_map);
    let mut status = 0;
    // SAFETY: `child` is this process's child, not yet reaped; status is a valid pointer.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, &mut status, 0);
    }
    drop(stack);
    result
}

/// The stack of the child that holds a new user namespace: it makes one system call.
const HELPER_STACK_BYTES: usize = 64 * 1024;

/// The child's whole life: the raw `pause` system call (no libc, no errno), until SIGKILL.
extern "C" fn sleep_until_killed(_: *mut libc::c_void) -> libc::c_int {
    loop {
        rustix::event::pause();
    }
}

fn map_child_namespace(child: libc::pid_t, uid_map: &str, gid_map: &str) -> Result<OwnedFd> {
    let proc_dir = PathBuf::from(format!("/proc/{child}"));
    write_map(&proc_dir.join("uid_map"), uid_map)?;
    write_map(&proc_dir.join("gid_map"), gid_map)?;
    let namespace_path = proc_dir.join("ns/user");
    let namespace = File::open(&namespace_path).map_err(|error| SandboxError::io("open", &namespace_path, error))?;
    Ok(OwnedFd::from(namespace))
}

fn write_map(path: &Path, map: &str) -> Result<()> {
    std::fs::write(path, map).map_err(|error| SandboxError::io("write", path, error))
}

/// Re-owns everything under `root` (never following a symlink) from the host ids of `range` to
/// the ids the machine saw: a captured layer must not keep a range that another machine will
/// hold later. Ids outside the range (files the node made as host root, say) become the
/// overflow id, which is how the machine saw them. Returns how many entries changed owner.
pub fn shift_owners_down(root: &Path, range: &UidRange) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut changed = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path).map_err(|error| SandboxError::io("inspect", &path, error))?;
        let machine_uid = range.machine_id(metadata.uid()).unwrap_or(OVERFLOW_ID);
        let machine_gid = range.machine_id(metadata.gid()).unwrap_or(OVERFLOW_ID);
        if (machine_uid, machine_gid) != (metadata.uid(), metadata.gid()) {
            std::os::unix::fs::lchown(&path, Some(machine_uid), Some(machine_gid))
                .map_err(|error| SandboxError::io("change the owner of", &path, error))?;
            changed += 1;
        }
        if metadata.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|error| SandboxError::io("read", &path, error))?;
            for entry in entries {
                let entry = entry.map_err(|error| SandboxError::io("read", &path, error))?;
                pending.push(entry.path());
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests;
