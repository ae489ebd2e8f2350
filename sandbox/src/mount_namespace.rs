//! A mount namespace of the process's own, for every process that mounts machine layers (a
//! node, `flotilla image build`, the machine and turn benchmarks).
// Unsafe: unshare(2) and mount(2) have no safe wrapper in std.
#![allow(unsafe_code)]

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
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
