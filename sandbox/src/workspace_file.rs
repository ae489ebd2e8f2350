//! The one way the node reads a file out of a workspace.
//!
//! A workspace is the repository's content, and a repository is hostile: any path in it may be
//! a symlink to a host file (`/etc/shadow`, the node's keys), a path through a symlinked
//! directory (`.cursor` → `/etc`), a FIFO that blocks the reader forever, or a link to
//! `/dev/zero` that reads until the node is OOM-killed. Ordinary `std::fs` calls follow all of
//! these. [`read_workspace_file`] opens the path with `openat2` beneath the workspace and
//! refuses every symlink on the way (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS`), checks that what it opened is a regular file (`fstat` on the open
//! descriptor, so the answer is about the file read and not about whatever the path names a
//! moment later), and reads at most a bounded number of bytes through that descriptor.
// Unsafe: openat2(2) has no wrapper in std or the libc crate (a raw syscall with a zeroed
// `open_how`), and its descriptor becomes a `File` by `from_raw_fd`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path};

/// The limit for configuration files read from a workspace (environment.json).
pub const MAX_WORKSPACE_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Why a file could not be read from a workspace. `path` is the path relative to the workspace,
/// as the repository's author knows it.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceFileError {
    /// `path` itself or one of its directories (`symlink`) is a symbolic link.
    #[error("{}", describe_symlink(path, symlink))]
    Symlink { path: String, symlink: String },

    #[error("{path} is not a regular file (found {found})")]
    NotRegularFile { path: String, found: &'static str },

    #[error("{path} is larger than {}", describe_bytes(*max_bytes))]
    TooLarge { path: String, max_bytes: u64 },

    #[error("{path} is not a path inside the workspace")]
    OutsideWorkspace { path: String },

    #[error(
        "could not read {path}: this kernel has no openat2 system call (Linux 5.6 or later is \
         needed to open workspace files without following symlinks)"
    )]
    KernelLacksOpenat2 { path: String },

    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn describe_symlink(path: &str, symlink: &str) -> String {
    if path == symlink {
        format!("{path} is a symlink")
    } else {
        format!("{path}: its directory {symlink} is a symlink")
    }
}

fn describe_bytes(bytes: u64) -> String {
    const MEBIBYTE: u64 = 1024 * 1024;
    const GIBIBYTE: u64 = 1024 * MEBIBYTE;
    if bytes >= GIBIBYTE && bytes.is_multiple_of(GIBIBYTE) {
        format!("{} GiB", bytes / GIBIBYTE)
    } else if bytes >= MEBIBYTE && bytes.is_multiple_of(MEBIBYTE) {
        format!("{} MiB", bytes / MEBIBYTE)
    } else {
        format!("{bytes} bytes")
    }
}

/// Reads `relative_path` beneath `root` without following any symlink, if it is a regular file
/// of at most `max_bytes`. `Ok(None)` when the file does not exist. Blocking: call it from a
/// blocking thread, never on the async runtime.
pub fn read_workspace_file(
    root: &Path,
    relative_path: &str,
    max_bytes: u64,
) -> Result<Option<Vec<u8>>, WorkspaceFileError> {
    let mut contents = Vec::new();
    match copy_workspace_file(root, relative_path, max_bytes, &mut contents)? {
        Some(_) => Ok(Some(contents)),
        None => Ok(None),
    }
}

/// Copies `relative_path` beneath `root` into `destination` as it is read, under the same rules
/// as [`read_workspace_file`] (no symlink followed, a regular file, at most `max_bytes`), for
/// files too large to hold in memory. Answers the bytes copied, or `None` when the file does not
/// exist. On `TooLarge`, `destination` holds a prefix of the file: the caller discards it.
/// Blocking: call it from a blocking thread, never on the async runtime.
pub fn copy_workspace_file(
    root: &Path,
    relative_path: &str,
    max_bytes: u64,
    destination: &mut impl Write,
) -> Result<Option<u64>, WorkspaceFileError> {
    let shown = relative_path.to_string();
    let io_error = |action: &'static str, source: std::io::Error| WorkspaceFileError::Io {
        action,
        path: shown.clone(),
        source,
    };
    let Some(mut file) = open_workspace_file(root, relative_path)? else {
        return Ok(None);
    };
    // One byte more than allowed tells "exactly the limit" from "over it" without trusting the
    // size fstat reported (the file may grow while it is read).
    let copied = std::io::copy(&mut (&mut file).take(max_bytes.saturating_add(1)), destination)
        .map_err(|source| io_error("read", source))?;
    if copied > max_bytes {
        return Err(WorkspaceFileError::TooLarge { path: shown, max_bytes });
    }
    Ok(Some(copied))
}

/// Opens `relative_path` beneath `root` for reading, refusing symlinks, paths outside `root` and
/// anything but a regular file; `Ok(None)` when it does not exist.
fn open_workspace_file(root: &Path, relative_path: &str) -> Result<Option<File>, WorkspaceFileError> {
    let shown = relative_path.to_string();
    let io_error = |action: &'static str, source: std::io::Error| WorkspaceFileError::Io {
        action,
        path: shown.clone(),
        source,
    };
    let is_plain_relative = Path::new(relative_path)
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    if relative_path.is_empty() || !is_plain_relative {
        return Err(WorkspaceFileError::OutsideWorkspace { path: shown });
    }
    let root_directory = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)
        .map_err(|source| io_error("open the workspace for", source))?;
    let file = match open_beneath(&root_directory, relative_path) {
        Ok(file) => file,
        Err(error) => {
            return match error.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                Some(libc::ELOOP) => Err(WorkspaceFileError::Symlink {
                    symlink: first_symlink(root, relative_path).unwrap_or_else(|| shown.clone()),
                    path: shown,
                }),
                Some(libc::EXDEV) => Err(WorkspaceFileError::OutsideWorkspace { path: shown }),
                Some(libc::ENOSYS) => Err(WorkspaceFileError::KernelLacksOpenat2 { path: shown }),
                _ => Err(io_error("open", error)),
            };
        }
    };
    let metadata = file.metadata().map_err(|source| io_error("inspect", source))?;
    if !metadata.file_type().is_file() {
        return Err(WorkspaceFileError::NotRegularFile {
            path: shown,
            found: describe_file_kind(metadata.mode()),
        });
    }
    Ok(Some(file))
}

/// `openat2(root, relative_path)` for reading, refusing symlinks (magic ones too) and anything
/// that resolves outside `root`. `O_NONBLOCK` so that opening a FIFO does not wait for a
/// writer; it changes nothing for the regular files that are then read.
fn open_beneath(root: &File, relative_path: &str) -> std::io::Result<File> {
    let path = std::ffi::CString::new(relative_path)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path contains a NUL byte"))?;
    // SAFETY: open_how is plain data; zeroed is a valid value and the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is a NUL-terminated string and `how` a valid open_how that both outlive the
    // call; the size passed is the size of `how`.
    let descriptor = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if descriptor < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(descriptor as i32) })
}

/// The first component of `relative_path` under `root` that is a symlink, for the error message
/// only (the refusal itself came from the kernel).
fn first_symlink(root: &Path, relative_path: &str) -> Option<String> {
    let mut prefix = std::path::PathBuf::new();
    for component in Path::new(relative_path).components() {
        prefix.push(component);
        let metadata = std::fs::symlink_metadata(root.join(&prefix)).ok()?;
        if metadata.file_type().is_symlink() {
            return Some(prefix.display().to_string());
        }
    }
    None
}

fn describe_file_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symlink",
        _ => "a file of an unknown kind",
    }
}

#[cfg(test)]
mod tests;
