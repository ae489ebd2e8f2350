//! Mount namespaces: one of the process's own for every process that mounts machine layers (a
//! node, `flotilla image build`, the machine and turn benchmarks), and one per machine, where that
//! machine's layers are mounted, so that the node's own mount table does not grow with the
//! machines it runs.
// Unsafe: unshare(2), setns(2) and mount(2) have no safe wrapper in std.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd};

use crate::error::{Result, SandboxError};

/// Moves this process into a mount namespace of its own with private propagation, so that
/// every layer it mounts for its machines lives and dies with it: a process killed with SIGKILL
/// leaves no mount behind on the host. Must be called before any thread starts (the kernel
/// refuses afterwards), so before the async runtime is built. Needs root.
pub fn enter_private_mount_namespace() -> Result<(), std::io::Error> {
    // SAFETY: called while the process is single-threaded; both calls only change this
    // process's own namespace membership and mount propagation.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    make_mounts_private()
}

/// Makes every mount of the caller's mount namespace private: nothing mounted there propagates
/// anywhere else, and nothing mounted elsewhere propagates in.
fn make_mounts_private() -> Result<(), std::io::Error> {
    let root = c"/";
    // SAFETY: a valid NUL-terminated path and null pointers where mount(2) accepts them; the
    // call only changes the propagation of the caller's own mounts.
    let result = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `work` on a thread of its own inside a new mount namespace, a private copy of the
/// caller's, and hands back that namespace (as a descriptor, which keeps it alive) with what
/// `work` returned. Everything `work` mounts lands in the new namespace alone.
///
/// Why: bubblewrap copies the whole mount table of the namespace it starts in when it makes a
/// machine's own, and the kernel copies, walks and tears down every entry; mounts made in the
/// node's namespace would make every machine start (and every exit) cost more with each machine
/// already running. In a namespace per machine, a start sees the node's few mounts and its own.
/// A thread of its own because unsharing changes the calling thread for good, and the pool
/// threads that call this serve other work afterwards.
pub(crate) fn run_in_new_mount_namespace<T: Send>(work: impl FnOnce() -> Result<T> + Send) -> Result<(OwnedFd, T)> {
    let failed = |step: &str, error: std::io::Error| SandboxError::HostCommand {
        program: "a machine's mount namespace".to_string(),
        detail: format!("{step}: {error}"),
    };
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("flotilla-machine-mounts".into())
            .spawn_scoped(scope, || {
                // SAFETY: unshare only changes this thread's own fs context and mount namespace
                // (CLONE_FS because the thread shares them with the process until then).
                if unsafe { libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) } != 0 {
                    return Err(failed("unshare", std::io::Error::last_os_error()));
                }
                // The copy keeps the propagation of the namespace it came from: a test process
                // in the host's namespace would see the machine's mounts appear otherwise.
                make_mounts_private().map_err(|error| failed("make its mounts private", error))?;
                let namespace = c"/proc/thread-self/ns/mnt";
                // SAFETY: a valid NUL-terminated path; a negative result is handled.
                let fd = unsafe { libc::open(namespace.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(failed("open", std::io::Error::last_os_error()));
                }
                // SAFETY: open returned a descriptor this thread now owns.
                let namespace = unsafe { OwnedFd::from_raw_fd(fd) };
                Ok((namespace, work()?))
            })
            .map_err(|error| failed("start its thread", error))?;
        thread.join().map_err(|_| SandboxError::HostCommand {
            program: "a machine's mount namespace".to_string(),
            detail: "the thread mounting the machine's layers panicked".to_string(),
        })?
    })
}
