use std::os::unix::fs::symlink;

use super::*;

const CURSOR_FILE: &str = ".cursor/environment.json";

fn workspace_with_cursor_dir() -> tempfile::TempDir {
    let workspace = tempfile::tempdir().unwrap();
    std::fs::create_dir(workspace.path().join(".cursor")).unwrap();
    workspace
}

fn read_error(workspace: &Path) -> String {
    match read_workspace_file(workspace, CURSOR_FILE, MAX_WORKSPACE_CONFIG_FILE_BYTES) {
        Ok(contents) => panic!("expected an error, read {contents:?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_normal_file_is_read() {
    let workspace = workspace_with_cursor_dir();
    std::fs::write(workspace.path().join(CURSOR_FILE), "{}").unwrap();
    let contents = read_workspace_file(workspace.path(), CURSOR_FILE, MAX_WORKSPACE_CONFIG_FILE_BYTES).unwrap();
    assert_eq!(contents.as_deref(), Some(&b"{}"[..]));
}

#[test]
fn an_absent_file_is_none() {
    let workspace = workspace_with_cursor_dir();
    let contents = read_workspace_file(workspace.path(), CURSOR_FILE, MAX_WORKSPACE_CONFIG_FILE_BYTES).unwrap();
    assert_eq!(contents, None);
    let contents = read_workspace_file(
        workspace.path(),
        ".flotilla/environment.json",
        MAX_WORKSPACE_CONFIG_FILE_BYTES,
    )
    .unwrap();
    assert_eq!(contents, None);
}

#[test]
fn a_symlink_to_dev_zero_is_refused_without_reading() {
    let workspace = workspace_with_cursor_dir();
    symlink("/dev/zero", workspace.path().join(CURSOR_FILE)).unwrap();
    assert_eq!(read_error(workspace.path()), ".cursor/environment.json is a symlink");
}

#[test]
fn a_symlink_to_a_host_file_is_refused() {
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("secret");
    std::fs::write(&secret, r#"{"install": "host secret"}"#).unwrap();
    let workspace = workspace_with_cursor_dir();
    symlink(&secret, workspace.path().join(CURSOR_FILE)).unwrap();
    assert_eq!(read_error(workspace.path()), ".cursor/environment.json is a symlink");
}

#[test]
fn a_symlink_inside_the_workspace_is_refused_too() {
    let workspace = workspace_with_cursor_dir();
    std::fs::write(workspace.path().join("real.json"), "{}").unwrap();
    symlink("../real.json", workspace.path().join(CURSOR_FILE)).unwrap();
    assert_eq!(read_error(workspace.path()), ".cursor/environment.json is a symlink");
}

#[test]
fn a_symlinked_directory_component_is_refused() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("environment.json"), "{}").unwrap();
    let workspace = tempfile::tempdir().unwrap();
    symlink(host.path(), workspace.path().join(".cursor")).unwrap();
    assert_eq!(
        read_error(workspace.path()),
        ".cursor/environment.json: its directory .cursor is a symlink"
    );
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let workspace = workspace_with_cursor_dir();
    let path =
        std::ffi::CString::new(workspace.path().join(CURSOR_FILE).into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    assert_eq!(
        read_error(workspace.path()),
        ".cursor/environment.json is not a regular file (found a FIFO)"
    );
}

#[test]
fn a_directory_is_refused() {
    let workspace = workspace_with_cursor_dir();
    std::fs::create_dir(workspace.path().join(CURSOR_FILE)).unwrap();
    assert_eq!(
        read_error(workspace.path()),
        ".cursor/environment.json is not a regular file (found a directory)"
    );
}

#[test]
fn a_file_over_the_limit_is_refused() {
    let workspace = workspace_with_cursor_dir();
    std::fs::write(workspace.path().join(CURSOR_FILE), vec![b' '; 2 * 1024 * 1024]).unwrap();
    assert_eq!(
        read_error(workspace.path()),
        ".cursor/environment.json is larger than 1 MiB"
    );
}

#[test]
fn a_file_of_exactly_the_limit_is_read() {
    let workspace = workspace_with_cursor_dir();
    std::fs::write(workspace.path().join(CURSOR_FILE), vec![b' '; 1024 * 1024]).unwrap();
    let contents = read_workspace_file(workspace.path(), CURSOR_FILE, MAX_WORKSPACE_CONFIG_FILE_BYTES).unwrap();
    assert_eq!(contents.map(|contents| contents.len()), Some(1024 * 1024));
}

#[test]
fn paths_that_leave_the_workspace_are_refused() {
    let workspace = workspace_with_cursor_dir();
    for path in ["../etc/passwd", "/etc/passwd", ".cursor/../../x", ""] {
        let error = read_workspace_file(workspace.path(), path, MAX_WORKSPACE_CONFIG_FILE_BYTES).unwrap_err();
        assert!(
            matches!(error, WorkspaceFileError::OutsideWorkspace { .. }),
            "{path}: {error}"
        );
    }
}

#[test]
fn a_copy_streams_the_file_into_the_destination_and_stops_past_the_limit() {
    let workspace = tempfile::tempdir().unwrap();
    std::fs::create_dir(workspace.path().join(".git")).unwrap();
    std::fs::write(workspace.path().join(".git/push.bundle"), vec![b'p'; 4096]).unwrap();
    let mut destination = tempfile::tempfile().unwrap();
    let copied = copy_workspace_file(workspace.path(), ".git/push.bundle", 4096, &mut destination).unwrap();
    assert_eq!(copied, Some(4096));
    assert_eq!(destination.metadata().unwrap().len(), 4096);

    let mut destination = Vec::new();
    let error = copy_workspace_file(workspace.path(), ".git/push.bundle", 1024, &mut destination).unwrap_err();
    assert_eq!(error.to_string(), ".git/push.bundle is larger than 1024 bytes");
    assert!(destination.len() <= 1025, "the copy stops one byte past the limit");

    symlink("/etc/passwd", workspace.path().join(".git/link.bundle")).unwrap();
    let error = copy_workspace_file(workspace.path(), ".git/link.bundle", 1024, &mut Vec::new()).unwrap_err();
    assert_eq!(error.to_string(), ".git/link.bundle is a symlink");
}

#[test]
fn limits_in_gibibytes_are_named_so() {
    let error = WorkspaceFileError::TooLarge {
        path: ".git/push.bundle".to_string(),
        max_bytes: 1024 * 1024 * 1024,
    };
    assert_eq!(error.to_string(), ".git/push.bundle is larger than 1 GiB");
}
