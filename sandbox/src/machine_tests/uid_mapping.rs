//! A machine's ids are an unprivileged host range of its own (issue: no host root).

use std::os::unix::fs::MetadataExt;

use super::*;
use crate::uid_range::{UidRangeConfig, IDS_PER_RANGE};

/// The first host id of the machine's range, from its own `/proc/self/uid_map` (and the gid map,
/// which must be the same).
async fn first_host_id(harness: &Harness, machine: &MachineHandle) -> u32 {
    let maps = harness
        .run_ok(machine, "cat /proc/self/uid_map /proc/self/gid_map")
        .await;
    let fields: Vec<&str> = maps.split_whitespace().collect();
    assert_eq!(fields.len(), 6, "one line each: {maps:?}");
    assert_eq!(fields[..3], fields[3..], "uid and gid maps differ: {maps:?}");
    assert_eq!(fields[0], "0");
    assert_eq!(fields[2], IDS_PER_RANGE.to_string());
    fields[1].parse().expect("a host id")
}

#[tokio::test]
async fn each_machine_runs_as_a_host_id_range_of_its_own() {
    let harness = harness().await;
    let first = harness.machine("first").await;
    let second = harness.machine("second").await;
    let first_id = first_host_id(&harness, &first).await;
    let second_id = first_host_id(&harness, &second).await;
    let config = UidRangeConfig::default();
    for id in [first_id, second_id] {
        assert!(id >= config.first_host_id, "machine root is host id {id}");
        assert_eq!((id - config.first_host_id) % IDS_PER_RANGE, 0);
    }
    assert_ne!(first_id, second_id, "two live machines share a range");
    // Seen from the host, the machine's init runs as the range's first id, not as root.
    let init_pid = bwrap_machine(&first).init_pid();
    let status = std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap();
    let uid_line = status.lines().find(|line| line.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>(),
        vec![first_id.to_string(); 4],
        "{uid_line}"
    );

    // What the machine writes belongs to its range on the host, as root and as another user.
    harness
        .run_ok(&first, "echo x > /workspace/by-root; echo y > /tmp/by-root")
        .await;
    let workspace = first.workspace_path().to_path_buf();
    let owner = |path: &Path| {
        let metadata = std::fs::symlink_metadata(path).expect("file on the host");
        (metadata.uid(), metadata.gid())
    };
    assert_eq!(owner(&workspace.join("by-root")), (first_id, first_id));
    let root_upper = bwrap_machine(&first).disk_path().join("root-upper");
    assert_eq!(owner(&root_upper.join("tmp/by-root")), (first_id, first_id));
    // The checkout the node made shows as the machine's own, and the workspace is writable.
    let inside = harness
        .run_ok(
            &first,
            "stat -c '%u %g' /workspace /workspace/first-only.txt /etc/passwd /",
        )
        .await;
    assert_eq!(inside, "0 0\n0 0\n0 0\n0 0\n");
    harness.driver.destroy(&first).await.unwrap();
    harness.driver.destroy(&second).await.unwrap();
}

#[tokio::test]
async fn a_named_users_files_belong_to_its_id_in_the_range() {
    let harness = harness().await;
    let workspace = harness.workspace("named");
    let mut spec = harness.spec("named", &workspace);
    spec.user = Some("nobody".to_string());
    let machine = harness.driver.create(spec).await.unwrap();
    let first_id = first_host_id(&harness, &machine).await;
    let inside = harness
        .run_ok(
            &machine,
            "id -u; stat -c '%U' /workspace/named-only.txt; touch /workspace/mine",
        )
        .await;
    assert_eq!(inside, "65534\nnobody\n");
    let metadata = std::fs::symlink_metadata(machine.workspace_path().join("mine")).unwrap();
    assert_eq!(metadata.uid(), first_id + 65_534);
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn the_machines_root_is_no_one_on_the_host() {
    let harness = harness().await;
    let machine = harness.machine("noroot").await;
    // Host files bound in stay the host's: they show as the overflow id and cannot be changed
    // (the bind is read-only too, but ownership alone refuses a write through another path).
    let owners = harness.run_ok(&machine, "stat -c '%u' /usr /usr/bin/env").await;
    assert_eq!(owners, "65534\n65534\n");
    let refused = harness
        .run(
            &machine,
            "touch /usr/bin/planted || echo refused; echo x > /proc/sys/kernel/core_pattern || echo refused",
        )
        .await;
    assert_eq!(
        refused.stdout_text(),
        "refused\nrefused\n",
        "{:?}",
        refused.last_lines(5)
    );
    assert_ne!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap().trim(),
        "x"
    );
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn a_captured_layer_keeps_the_ids_the_machine_saw_and_a_range_is_given_back() {
    let harness = harness().await;
    let workspace = harness.workspace("shifted");
    let mut spec = harness.spec("shifted", &workspace);
    spec.user = Some("nobody".to_string());
    let machine = harness.driver.create(spec).await.unwrap();
    let first_id = first_host_id(&harness, &machine).await;
    harness
        .run_ok(
            &machine,
            "mkdir /tmp/tool && echo x > /tmp/tool/file && echo w > /workspace/made",
        )
        .await;
    let layer_dir = harness.scratch.path().join("layer");
    let layer = harness.driver.capture_layer(&machine, &layer_dir).await.unwrap();
    let owner = |path: PathBuf| {
        let metadata = std::fs::symlink_metadata(path).unwrap();
        (metadata.uid(), metadata.gid())
    };
    // Owned by host ids first_id + 65534 in the machine's disk; the layer keeps 65534.
    assert_eq!(owner(layer.path.join("root/tmp/tool/file")), (65_534, 65_534));
    assert_eq!(owner(layer.path.join("root/tmp/tool")), (65_534, 65_534));
    assert_eq!(
        owner(layer.path.join("root")),
        (0, 0),
        "the machine root's own directory"
    );
    assert_eq!(owner(layer.path.join("workspace/made")), (65_534, 65_534));
    harness.driver.destroy(&machine).await.unwrap();

    // Destroyed, the machine's range is free again.
    let config = UidRangeConfig::default();
    let index = (first_id - config.first_host_id) / IDS_PER_RANGE;
    assert!(
        crate::uid_range::range_is_free(&config.lock_dir, index).unwrap(),
        "the range is given back at destroy"
    );
}
