use std::os::unix::fs::MetadataExt;

use super::*;

fn config(lock_dir: &Path) -> UidRangeConfig {
    UidRangeConfig {
        first_host_id: 2_000_000_000,
        ranges: 3,
        lock_dir: lock_dir.to_path_buf(),
    }
}

#[test]
fn ranges_are_held_until_dropped_and_run_out_with_a_clear_error() {
    let locks = tempfile::tempdir().unwrap();
    let config = config(locks.path());
    // Claims start past the last one claimed in this process, so which range comes first
    // depends on earlier claims; together they are all three.
    let first = UidRange::claim(&config).unwrap();
    let second = UidRange::claim(&config).unwrap();
    let third = UidRange::claim(&config).unwrap();
    let mut indices = [first.index(), second.index(), third.index()];
    indices.sort_unstable();
    assert_eq!(indices, [0, 1, 2]);
    for range in [&first, &second, &third] {
        assert_eq!(range.first_host_id(), 2_000_000_000 + range.index() * IDS_PER_RANGE);
    }
    let error = UidRange::claim(&config).unwrap_err().to_string();
    assert!(error.contains("more than 3 machines at once"), "{error}");
    let freed = second.index();
    drop(second);
    assert_eq!(UidRange::claim(&config).unwrap().index(), freed);
    drop((first, third));
}

#[test]
fn ids_convert_both_ways_within_the_range_only() {
    let locks = tempfile::tempdir().unwrap();
    let range = UidRange::claim(&config(locks.path())).unwrap();
    assert_eq!(range.host_id(0), 2_000_000_000);
    assert_eq!(range.host_id(1000), 2_000_001_000);
    assert_eq!(range.machine_id(2_000_001_000), Some(1000));
    assert_eq!(range.machine_id(0), None);
    assert_eq!(range.machine_id(2_000_000_000 + IDS_PER_RANGE), None);
}

#[test]
fn a_range_that_does_not_fit_is_refused() {
    let locks = tempfile::tempdir().unwrap();
    let mut config = config(locks.path());
    config.ranges = 40_000;
    assert!(UidRange::claim(&config).is_err());
    config.ranges = 1;
    config.first_host_id = 0;
    assert!(UidRange::claim(&config).is_err());
}

#[test]
fn a_user_namespace_maps_the_range() {
    let locks = tempfile::tempdir().unwrap();
    let range = UidRange::claim(&config(locks.path())).unwrap();
    // The namespace's maps, read from a process that joins it, are the range's.
    let namespace = range.user_namespace().unwrap();
    let path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&namespace)
    );
    let output = std::process::Command::new("nsenter")
        .arg(format!("--user={path}"))
        .args(["cat", "/proc/self/uid_map"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let map: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(map, ["0", "2000000000", "65536"]);
}

#[test]
fn a_captured_layer_is_shifted_back_to_the_ids_the_machine_saw() {
    let locks = tempfile::tempdir().unwrap();
    let range = UidRange::claim(&config(locks.path())).unwrap();
    let layer = tempfile::tempdir().unwrap();
    let file = layer.path().join("made-by-user");
    let node_file = layer.path().join("made-by-the-node");
    std::fs::write(&file, "x").unwrap();
    std::fs::write(&node_file, "x").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", layer.path().join("link")).unwrap();
    std::os::unix::fs::lchown(&file, Some(range.host_id(1000)), Some(range.host_id(100))).unwrap();
    std::os::unix::fs::lchown(
        layer.path().join("link"),
        Some(range.host_id(0)),
        Some(range.host_id(0)),
    )
    .unwrap();
    std::os::unix::fs::lchown(layer.path(), Some(range.host_id(0)), Some(range.host_id(0))).unwrap();

    shift_owners_down(layer.path(), &range).unwrap();

    let owner = |path: &Path| {
        let metadata = std::fs::symlink_metadata(path).unwrap();
        (metadata.uid(), metadata.gid())
    };
    assert_eq!(owner(&file), (1000, 100));
    assert_eq!(
        owner(&node_file),
        (OVERFLOW_ID, OVERFLOW_ID),
        "host root is nobody to the machine"
    );
    assert_eq!(owner(&layer.path().join("link")), (0, 0));
    assert_eq!(owner(layer.path()), (0, 0));
    assert_eq!(
        owner(Path::new("/etc/passwd")),
        (0, 0),
        "the link's target is untouched"
    );
}

#[test]
fn a_range_another_process_holds_is_skipped_and_comes_back_when_that_process_dies() {
    use std::io::BufRead;
    let locks = tempfile::tempdir().unwrap();
    let config = config(locks.path());
    let lock_file = locks.path().join(RANGE_LOCK_FILE);
    std::fs::write(&lock_file, "").unwrap();
    // Another process (a node of its own) holds ranges 0 and 1: a POSIX lock on their bytes,
    // which conflicts with the open-file-description locks claims take.
    let holder_script = "import fcntl, sys\n\
        f = open(sys.argv[1], 'r+')\n\
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 2, 0, 0)\n\
        print('held', flush=True)\n\
        sys.stdin.read()\n";
    let mut holder = std::process::Command::new("python3")
        .args(["-c", holder_script])
        .arg(&lock_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held", "the holder took no lock");

    let only = UidRange::claim(&config).unwrap();
    assert_eq!(only.index(), 2, "ranges 0 and 1 are another process's");
    let error = UidRange::claim(&config).unwrap_err().to_string();
    assert!(error.contains("more than 3 machines at once"), "{error}");

    // A holder killed with SIGKILL gives its ranges back.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let mut freed = [UidRange::claim(&config).unwrap(), UidRange::claim(&config).unwrap()].map(|range| range.index());
    freed.sort_unstable();
    assert_eq!(freed, [0, 1]);
    drop(only);
}
