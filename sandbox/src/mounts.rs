//! Thin wrappers over mount(2) and umount2(2) for the driver's layer mounts. They are made by the
//! node (the driver runs as root) in the machine's own mount namespace (see `mount_namespace`),
//! so bubblewrap only binds finished trees and the node's mount table stays as it was.
// Unsafe: mount(2) and umount2(2) have no safe wrapper in std.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, SandboxError};

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SandboxError::InvalidSpec {
        detail: format!("path {} contains a NUL byte", path.display()),
    })
}

fn c_text(text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| SandboxError::InvalidSpec {
        detail: format!("{text:?} contains a NUL byte"),
    })
}

fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, options: &str) -> Result<()> {
    let (source_c, target_c, fstype_c, options_c) =
        (c_text(source)?, c_path(target)?, c_text(fstype)?, c_text(options)?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            options_c.as_ptr().cast(),
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        return Err(SandboxError::Mount {
            target: target.to_path_buf(),
            detail: format!("{fstype} with options {options:?}: {error}"),
        });
    }
    Ok(())
}

/// A size-limited tmpfs: the disk of a machine's writable layers. Its pages are charged to the
/// memory cgroup of the process that writes them, so it is bounded twice.
pub(crate) fn mount_tmpfs(target: &Path, size_bytes: u64, max_inodes: u64) -> Result<()> {
    let options = format!("size={size_bytes},nr_inodes={max_inodes},mode=0755");
    mount("tmpfs", target, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, &options)
}

/// An ext4 image attached through a loop device (`mount -o loop` does the attaching).
pub(crate) fn mount_ext4_image(image: &Path, target: &Path) -> Result<()> {
    let output = std::process::Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(image)
        .arg(target)
        .output()
        .map_err(|error| SandboxError::io("run mount for", image, error))?;
    if !output.status.success() {
        return Err(SandboxError::Mount {
            target: target.to_path_buf(),
            detail: format!(
                "ext4 image {}: {}",
                image.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Escapes the characters overlayfs's option parser treats specially.
fn escape_overlay_path(path: &Path) -> Result<String> {
    let text = path.to_str().ok_or_else(|| SandboxError::InvalidSpec {
        detail: format!("path {} is not UTF-8", path.display()),
    })?;
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, ',' | ':' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    Ok(escaped)
}

/// Overlay with `lowers` from top to bottom.
pub(crate) fn mount_overlay(target: &Path, lowers: &[PathBuf], upper: &Path, work: &Path) -> Result<()> {
    let mut lower_option = String::new();
    for (index, lower) in lowers.iter().enumerate() {
        if index > 0 {
            lower_option.push(':');
        }
        lower_option.push_str(&escape_overlay_path(lower)?);
    }
    let options = format!(
        "lowerdir={lower_option},upperdir={},workdir={}",
        escape_overlay_path(upper)?,
        escape_overlay_path(work)?
    );
    mount("overlay", target, "overlay", libc::MS_NOSUID | libc::MS_NODEV, &options)
}

/// Mounts a copy of the tree at `source` on `target` with its owners shifted through the user
/// namespace `user_namespace`: a file owned by id N on disk shows as the host id that N maps to
/// there. A machine sees files the node made (owned by host root) as its own this way, with
/// nothing on disk re-owned. Needs Linux 5.12 and a filesystem that supports idmapped mounts.
pub(crate) fn idmapped_bind(source: &Path, target: &Path, user_namespace: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let source_c = c_path(source)?;
    let target_c = c_path(target)?;
    let failed = |step: &str| {
        SandboxError::Mount {
        target: target.to_path_buf(),
        detail: format!(
            "idmapped bind of {} ({step}): {} (idmapped mounts need Linux 5.12 or later and a filesystem that supports them)",
            source.display(),
            io::Error::last_os_error()
        ),
    }
    };
    // SAFETY: a valid NUL-terminated path; the call returns a new descriptor or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(failed("open_tree"));
    }
    // SAFETY: open_tree returned a descriptor this process now owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attributes = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: user_namespace.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: the descriptor is open, the path is an empty C string and the attribute struct
    // is valid for the size passed.
    let set = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attributes as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if set != 0 {
        return Err(failed("mount_setattr"));
    }
    // SAFETY: as above; target is a valid NUL-terminated path.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if moved != 0 {
        return Err(failed("move_mount"));
    }
    Ok(())
}

/// Every mount point strictly beneath `dir` (from /proc/self/mountinfo), latest mounted
/// first: the order to unmount them in.
pub(crate) fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|encoded| PathBuf::from(decode_mountinfo_path(encoded)))
        .filter(|point| point != dir && point.starts_with(dir))
        .collect();
    points.reverse();
    points.dedup();
    points
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn decode_mountinfo_path(encoded: &str) -> String {
    let bytes = encoded.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes
            .get(index + 1..index + 4)
            .filter(|digits| bytes[index] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit)));
        match escape {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                decoded.push(value as u8);
                index += 4;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Unmounts `target`; a target that is not mounted (or gone) is fine. A busy one is detached.
pub(crate) fn unmount(target: &Path) -> Result<()> {
    let target_c = c_path(target)?;
    // SAFETY: a valid NUL-terminated path.
    let result = unsafe { libc::umount2(target_c.as_ptr(), libc::UMOUNT_NOFOLLOW) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        Some(libc::EBUSY) => {
            // SAFETY: as above.
            let detached = unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
            if detached == 0 {
                Ok(())
            } else {
                Err(SandboxError::Mount {
                    target: target.to_path_buf(),
                    detail: format!("unmount: {}", io::Error::last_os_error()),
                })
            }
        }
        _ => Err(SandboxError::Mount {
            target: target.to_path_buf(),
            detail: format!("unmount: {error}"),
        }),
    }
}

/// Free space left on the filesystem at `path`, for an unprivileged writer: (bytes, inodes).
// Unsafe: statvfs(2) has no safe wrapper in std.
pub(crate) fn free_space(path: &Path) -> io::Result<(u64, u64)> {
    let path_c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out pointer.
    let result = unsafe { libc::statvfs(path_c.as_ptr(), &mut stats) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok((stats.f_bavail as u64 * stats.f_frsize as u64, stats.f_favail as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_decoded() {
        assert_eq!(decode_mountinfo_path("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(decode_mountinfo_path("/plain\\x"), "/plain\\x");
    }

    #[test]
    fn overlay_paths_are_escaped() {
        assert_eq!(escape_overlay_path(Path::new("/a,b:c\\d")).unwrap(), "/a\\,b\\:c\\\\d");
        assert_eq!(escape_overlay_path(Path::new("/plain/path")).unwrap(), "/plain/path");
    }
}
