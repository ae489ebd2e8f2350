//! An exclusive `flock` that does not wait: how a node holds its data dir and a machine its
//! uid range, released by the kernel when the holder's file is closed (or the process dies).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Takes an exclusive `flock` on `file` if no one holds one; `false` if someone does.
// Unsafe: flock(2); std's File::try_lock needs a newer Rust than rust-version.
#[allow(unsafe_code)]
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor the caller owns; no memory is shared with the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(error)
    }
}
