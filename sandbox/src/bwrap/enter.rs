//! Entering a running machine for a command: the node's own child joins the machine's
//! namespaces, root and directory, takes the machine user's ids and drops its privileges between
//! fork and exec, and then execs the command itself. One program launch per command.
//!
//! The steps are those `nsenter --target=<init> --user --mount --pid --ipc --uts --net --cgroup
//! --root [--wd] [--setuid --setgid] -- setpriv [--inh-caps=-all --ambient-caps=-all
//! --bounding-set=-all] --no-new-privs` took (util-linux 2.38), in the same order, without the
//! two helper programs and nsenter's extra fork:
//!
//! 1. The child is born in the machine's PID namespace: the thread that forks it joins that
//!    namespace for its children just before the fork and the node's own right after (a process
//!    cannot join a PID namespace itself, only its children can, which is why nsenter forked
//!    once more).
//! 2. `setns` by the init's pidfd into its user, mount, IPC, UTS, network, cgroup and PID
//!    namespaces at once: the kernel enters the user namespace first, which gives the child
//!    every capability in it (and none outside), the ones the other namespaces take.
//! 3. `fchdir` to the init's root (opened from `/proc/<init>/root` beforehand) and `chroot(".")`;
//!    then `fchdir` to the init's directory (`/workspace`) when the command runs there, else
//!    `chdir("/")` (nsenter kept the node's directory until the shell changed it).
//! 4. `setgroups(0, NULL)`, `setresgid(gid)`, `setresuid(uid)`: the machine user's ids (0 for
//!    root), no supplementary group. A change to a non-zero uid clears the permitted, effective
//!    and ambient capabilities (the kernel's rule without `SECBIT_KEEP_CAPS`).
//! 5. For the machine's root only (uid 0 keeps its capabilities across the id change): the
//!    bounding set is emptied (`PR_CAPBSET_DROP` up to the last capability the kernel knows),
//!    the inheritable set cleared (`capset`) and the ambient set cleared
//!    (`PR_CAP_AMBIENT_CLEAR_ALL`), so that the exec leaves root with no capability.
//! 6. `PR_SET_NO_NEW_PRIVS`: no setuid bit or file capability grants anything afterwards.
//!
//! The caller installs the machine's system-call filter last (see `exec`), after all of the
//! above: the filter needs no exception for this path.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// The namespaces a command joins: all of the init's but its time namespace (nsenter was not
/// asked for it, and bubblewrap makes none).
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWPID;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// More capabilities than any kernel knows: the bounding-set loop stops at EINVAL well before.
const CAPABILITY_CEILING: libc::c_ulong = 64;

#[repr(C)]
struct CapabilityHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapabilityData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Whether the process behind `pidfd` still runs (has not been reaped or become a zombie is
/// not told apart: a zombie's `/proc` entries cannot be opened either).
pub(super) fn check_alive(pidfd: &OwnedFd) -> io::Result<()> {
    crate::vfork::pidfd_send_signal(pidfd, 0)
}

fn open_directory(path: &str) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(file.into())
}

/// Who enters, and the descriptors it enters through, opened by the node before the fork (all
/// close-on-exec: the command inherits none of them).
pub(super) struct Entry {
    init: OwnedFd,
    root: OwnedFd,
    /// The init's directory, when the command runs there; else the command starts in `/`.
    directory: Option<OwnedFd>,
    uid: u32,
    gid: u32,
}

impl Entry {
    /// Opens the init's root (and directory) through `/proc`, which names the init only while
    /// it runs: checked through its pidfd after the opens. Blocking (procfs).
    pub(super) fn open(init: &OwnedFd, init_pid: i32, uid: u32, gid: u32, in_init_directory: bool) -> io::Result<Self> {
        let root = open_directory(&format!("/proc/{init_pid}/root"))?;
        let directory = if in_init_directory {
            Some(open_directory(&format!("/proc/{init_pid}/cwd"))?)
        } else {
            None
        };
        check_alive(init)?;
        Ok(Entry {
            init: init.try_clone()?,
            root,
            directory,
            uid,
            gid,
        })
    }

    /// Steps 2 to 6 of the module's list, in the child between fork and exec: only
    /// async-signal-safe system calls, on descriptors and values prepared before the fork.
    // Unsafe: setns, chroot, setgroups, setresgid, setresuid, prctl and capset have no safe
    // wrapper in std.
    #[allow(unsafe_code)]
    pub(super) fn enter(&self) -> io::Result<()> {
        // SAFETY: plain system calls on descriptors this value owns and on constant strings; no
        // allocation, no lock.
        unsafe {
            check(libc::setns(self.init.as_raw_fd(), NAMESPACES))?;
            check(libc::fchdir(self.root.as_raw_fd()))?;
            check(libc::chroot(c".".as_ptr()))?;
            match &self.directory {
                Some(directory) => check(libc::fchdir(directory.as_raw_fd()))?,
                None => check(libc::chdir(c"/".as_ptr()))?,
            }
        }
        // Raw system calls: the child may share the node's memory (see `vfork`).
        crate::vfork::set_ids(self.uid, self.gid)?;
        if self.uid == 0 {
            drop_all_capabilities()?;
        }
        // SAFETY: a prctl with constant arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
    }
}

/// Empties the bounding, inheritable and ambient sets of the calling process (the permitted and
/// effective sets of root go at exec: nothing is left to grant them). Async-signal-safe.
// Unsafe: prctl and the capget/capset system calls have no safe wrapper.
#[allow(unsafe_code)]
fn drop_all_capabilities() -> io::Result<()> {
    for capability in 0..CAPABILITY_CEILING {
        // SAFETY: a prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) } != 0 {
            let error = io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if error.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(error);
        }
    }
    let mut header = CapabilityHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapabilityData::default(); 2];
    // SAFETY: the header and the two-element array are the layout capget and capset take for
    // version 3, and live for the calls.
    unsafe {
        crate::vfork::check_long(libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapabilityHeader,
            data.as_mut_ptr(),
        ))?;
        for half in &mut data {
            half.inheritable = 0;
        }
        crate::vfork::check_long(libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapabilityHeader,
            data.as_ptr(),
        ))?;
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ))
    }
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The PID namespace the node runs in, to come back to after a spawn.
static NODE_PID_NAMESPACE: OnceLock<OwnedFd> = OnceLock::new();

fn node_pid_namespace() -> io::Result<&'static OwnedFd> {
    if let Some(namespace) = NODE_PID_NAMESPACE.get() {
        return Ok(namespace);
    }
    let namespace: OwnedFd = std::fs::File::open("/proc/thread-self/ns/pid")?.into();
    Ok(NODE_PID_NAMESPACE.get_or_init(|| namespace))
}

/// Spawns `command` with the PID namespace of the process behind `init` as the one its child
/// is born in (step 1 of the module's list): the calling thread joins that namespace for its
/// children, forks, and comes back to the node's at once. Nothing else runs on the thread in
/// between; should the way back fail, the node aborts rather than fork anything more into a
/// machine. On the calling thread, without a hop to another, because every wake-up of another
/// thread costs a scheduler round on a loaded node.
// Unsafe: setns has no safe wrapper in std.
#[allow(unsafe_code)]
pub(super) fn spawn_in_pid_namespace<T>(init: &OwnedFd, spawn: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let node = node_pid_namespace()?;
    // SAFETY: changes only the PID namespace this thread's next children are born in.
    check(unsafe { libc::setns(init.as_raw_fd(), libc::CLONE_NEWPID) })?;
    let spawned = spawn();
    // SAFETY: as above, back to the namespace the thread's children were born in before.
    if unsafe { libc::setns(node.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        let error = io::Error::last_os_error();
        tracing::error!(%error, "a thread could not leave a machine's PID namespace; aborting");
        std::process::abort();
    }
    spawned
}
