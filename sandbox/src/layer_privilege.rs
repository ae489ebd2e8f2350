//! Captured install layers carry no privilege.
//!
//! An install layer is what a repository's `install` command left on disk, so its content is
//! the repository's to choose. It is kept on the node and stacked under later machines, so
//! anything in it that grants privilege outside the machine that made it must go: setuid and
//! setgid bits on files, file capabilities (the `security.capability` xattr), device nodes,
//! FIFOs and sockets. [`drop_layer_privilege`] walks a captured tree after the copy (the
//! machine's processes are stopped by then, so nothing changes under the walk), never follows a
//! symlink, and removes those. Overlay whiteouts (character devices numbered 0:0) stay: they
//! record files the install deleted from the base image and open no device.
// Unsafe: lremovexattr(2), to drop a file capability without following a symlink, is a libc
// call with no safe wrapper in std.
#![allow(unsafe_code)]

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, SandboxError};

const SETUID_AND_SETGID_BITS: u32 = 0o6000;

/// What [`drop_layer_privilege`] took out of a layer, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DroppedPrivilege {
    /// Regular files whose setuid or setgid bit was cleared.
    pub setuid_or_setgid_files: usize,
    /// Regular files whose `security.capability` xattr was removed.
    pub capability_files: usize,
    /// Device nodes, FIFOs and sockets removed.
    pub special_files: usize,
}

impl DroppedPrivilege {
    pub fn is_empty(&self) -> bool {
        *self == DroppedPrivilege::default()
    }
}

/// Walks `layer_root` without following symlinks and removes every privilege in it (see the
/// module documentation). Blocking.
pub fn drop_layer_privilege(layer_root: &Path) -> Result<DroppedPrivilege> {
    let mut dropped = DroppedPrivilege::default();
    // An explicit stack: a layer may nest deeper than the thread's stack would allow recursion.
    let mut directories: Vec<PathBuf> = vec![layer_root.to_path_buf()];
    while let Some(directory) = directories.pop() {
        let entries = std::fs::read_dir(&directory).map_err(|error| SandboxError::io("list", &directory, error))?;
        for entry in entries {
            let path = entry
                .map_err(|error| SandboxError::io("list", &directory, error))?
                .path();
            let metadata =
                std::fs::symlink_metadata(&path).map_err(|error| SandboxError::io("inspect", &path, error))?;
            let file_type = metadata.file_type();
            if file_type.is_dir() {
                // A setgid directory only passes its group on to new files; it grants nothing.
                directories.push(path);
            } else if file_type.is_file() {
                drop_file_privilege(&path, &metadata, &mut dropped)?;
            } else if is_overlay_whiteout(&metadata) {
                continue;
            } else if file_type.is_char_device()
                || file_type.is_block_device()
                || file_type.is_fifo()
                || file_type.is_socket()
            {
                std::fs::remove_file(&path).map_err(|error| SandboxError::io("remove", &path, error))?;
                dropped.special_files += 1;
            }
            // Symlinks are left as they are: they are resolved inside a later machine, never here.
        }
    }
    Ok(dropped)
}

/// [`drop_layer_privilege`] for a layer just captured, saying in the log what it dropped.
pub(crate) fn drop_captured_layer_privilege(layer_root: &Path) -> Result<DroppedPrivilege> {
    let dropped = drop_layer_privilege(layer_root)?;
    if !dropped.is_empty() {
        tracing::info!(
            layer = %layer_root.display(),
            setuid_or_setgid_files = dropped.setuid_or_setgid_files,
            capability_files = dropped.capability_files,
            special_files = dropped.special_files,
            "dropped privilege from a captured install layer"
        );
    }
    Ok(dropped)
}

fn is_overlay_whiteout(metadata: &std::fs::Metadata) -> bool {
    metadata.file_type().is_char_device() && metadata.rdev() == 0
}

fn drop_file_privilege(path: &Path, metadata: &std::fs::Metadata, dropped: &mut DroppedPrivilege) -> Result<()> {
    let mode = metadata.permissions().mode();
    if mode & SETUID_AND_SETGID_BITS != 0 {
        // The path is a regular file (checked without following links) and the machine that
        // wrote it is stopped, so this chmod cannot be redirected through a symlink.
        let permissions = std::fs::Permissions::from_mode(mode & !SETUID_AND_SETGID_BITS & 0o7777);
        std::fs::set_permissions(path, permissions).map_err(|error| SandboxError::io("chmod", path, error))?;
        dropped.setuid_or_setgid_files += 1;
    }
    if remove_capability_xattr(path)? {
        dropped.capability_files += 1;
    }
    Ok(())
}

/// Removes `security.capability` from `path` (not following a symlink); `false` when it had none
/// or the filesystem keeps no such xattrs.
fn remove_capability_xattr(path: &Path) -> Result<bool> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        SandboxError::io(
            "remove the capabilities of",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path contains a NUL byte"),
        )
    })?;
    // SAFETY: both arguments are NUL-terminated strings that outlive the call.
    let removed = unsafe { libc::lremovexattr(c_path.as_ptr(), c"security.capability".as_ptr()) };
    if removed == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(SandboxError::io("remove the capabilities of", path, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setuid_bits_and_special_files_are_dropped_and_whiteouts_kept() {
        let layer = tempfile::tempdir().unwrap();
        let nested = layer.path().join("root/opt");
        std::fs::create_dir_all(&nested).unwrap();
        let setuid = nested.join("x");
        std::fs::write(&setuid, "binary").unwrap();
        std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o6755)).unwrap();
        std::fs::write(nested.join("plain"), "plain").unwrap();
        std::os::unix::fs::symlink("/usr/bin/passwd", nested.join("link")).unwrap();
        let fifo = std::ffi::CString::new(nested.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: `fifo` is a NUL-terminated string that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

        let dropped = drop_layer_privilege(layer.path()).unwrap();

        assert_eq!(dropped.setuid_or_setgid_files, 1);
        assert_eq!(dropped.special_files, 1);
        let mode = std::fs::metadata(&setuid).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert!(!nested.join("fifo").exists());
        assert!(std::fs::symlink_metadata(nested.join("link"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(nested.join("plain")).unwrap(), "plain");
    }

    #[test]
    fn a_clean_layer_reports_nothing_dropped() {
        let layer = tempfile::tempdir().unwrap();
        std::fs::write(layer.path().join("file"), "x").unwrap();
        assert!(drop_layer_privilege(layer.path()).unwrap().is_empty());
    }
}
