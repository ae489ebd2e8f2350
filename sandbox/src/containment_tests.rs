//! Resource hogs on real machines end with the limit they ran into, while a second machine on
//! the same driver keeps working; and a driver started on the root of an earlier life removes
//! every machine, process, cgroup and mount that life left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::bwrap::{cgroup_parent_for, BwrapConfig, BwrapDriver};
use crate::driver::{ExecRequest, KilledReason, MachineDriver, MachineHandle};
use crate::limits::MIB;
use crate::machine_tests::{bwrap_machine, cgroup_exists, harness, wait_for, Harness};

/// A second machine on the same driver still runs commands: the hog stayed inside its own.
async fn assert_bystander_works(harness: &Harness, bystander: &MachineHandle) {
    assert_eq!(harness.run_ok(bystander, "echo alive").await, "alive\n");
}

#[tokio::test]
async fn a_fork_bomb_ends_with_the_process_limit_and_the_machine_recovers() {
    let harness = harness().await;
    let workspace = harness.workspace("bomb");
    let mut spec = harness.spec("bomb", &workspace);
    spec.limits.max_processes = 64;
    let bomb = harness.driver.create(spec).await.unwrap();
    let bystander = harness.machine("bystander").await;
    // The classic shape: every call forks two more into the background and returns, so the
    // shell that started it could exit 0 while the bomb goes on.
    let request = ExecRequest::new("bomb() { bomb | bomb & }; bomb; sleep 2").with_timeout_ms(30_000);
    let (bombed, bystander_output) = tokio::join!(
        harness.driver.exec(&bomb, request),
        harness.driver.exec(&bystander, ExecRequest::new("echo alive"))
    );
    let bombed = bombed.unwrap();
    assert_eq!(
        bombed.killed_reason,
        Some(KilledReason::ProcessLimit { limit: 64 }),
        "{bombed:?}"
    );
    assert!(
        bombed.outcome().contains("process limit 64 reached"),
        "{}",
        bombed.outcome()
    );
    assert_eq!(bystander_output.unwrap().stdout_text(), "alive\n");
    // The bomb's processes are gone: the machine runs commands again.
    let count = harness.run_ok(&bomb, "ls -d /proc/[0-9]* | wc -l").await;
    assert!(
        count.trim().parse::<u32>().unwrap() < 10,
        "bomb processes survived: {count}"
    );
    assert_bystander_works(&harness, &bystander).await;
    harness.driver.destroy(&bomb).await.unwrap();
    harness.driver.destroy(&bystander).await.unwrap();
}

#[tokio::test]
async fn a_memory_hog_ends_out_of_memory_and_the_others_go_on() {
    let harness = harness().await;
    let workspace = harness.workspace("hog");
    let mut spec = harness.spec("hog", &workspace);
    spec.limits.memory_bytes = 64 * MIB;
    let hog = harness.driver.create(spec).await.unwrap();
    let bystander = harness.machine("bystander").await;
    // `tail -n 1` keeps the whole (newline-free) last line in memory.
    let output = harness
        .run(&hog, "head -c 1000000000 /dev/zero | tail -n 1 >/dev/null")
        .await;
    assert_eq!(
        output.killed_reason,
        Some(KilledReason::OutOfMemory { limit_bytes: 64 * MIB }),
        "{output:?}"
    );
    assert!(output.outcome().starts_with("out of memory"), "{}", output.outcome());
    assert!(output.outcome().contains("64 MiB"), "{}", output.outcome());
    assert_eq!(harness.run_ok(&hog, "echo still-here").await, "still-here\n");
    assert_bystander_works(&harness, &bystander).await;
    harness.driver.destroy(&hog).await.unwrap();
    harness.driver.destroy(&bystander).await.unwrap();
}

#[tokio::test]
async fn a_disk_filler_ends_at_the_disk_limit_with_its_size() {
    let harness = harness().await;
    let workspace = harness.workspace("filler");
    let mut spec = harness.spec("filler", &workspace);
    spec.limits.disk_bytes = 16 * MIB;
    let filler = harness.driver.create(spec).await.unwrap();
    let bystander = harness.machine("bystander").await;
    for target in ["/tmp/fill", "/workspace/fill"] {
        let output = harness
            .run(&filler, &format!("dd if=/dev/zero of={target} bs=1M count=64"))
            .await;
        assert_eq!(
            output.killed_reason,
            Some(KilledReason::DiskFull { limit_bytes: 16 * MIB }),
            "filling {target}: {output:?}"
        );
        assert_eq!(output.outcome(), "disk limit 16 MiB reached");
        assert!(output.stderr_text().contains("No space left on device"));
        assert_bystander_works(&harness, &bystander).await;
        // A command that fails for its own reasons on a full disk still says the disk is full;
        // once space is freed, commands work and fail on their own terms again.
        harness.run_ok(&filler, &format!("rm {target} && echo freed")).await;
        let own_failure = harness.run(&filler, "exit 3").await;
        assert_eq!(own_failure.killed_reason, None, "{own_failure:?}");
        assert_eq!(own_failure.exit_code, Some(3));
    }
    harness.driver.destroy(&filler).await.unwrap();
    harness.driver.destroy(&bystander).await.unwrap();
}

/// Whether `pid` is gone or a zombie (killed, not yet reaped by its parent).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// A process put by hand into a cgroup `name` under the driver's parent, in every hierarchy:
/// what a machine of a crashed node looks like from the host.
fn orphan_cgroup_with_process(root: &Path, name: &str) -> (Child, Vec<PathBuf>) {
    let parent = cgroup_parent_for(root);
    let dirs: Vec<PathBuf> = ["memory", "pids", "cpu", ""]
        .iter()
        .map(|hierarchy| Path::new("/sys/fs/cgroup").join(hierarchy).join(&parent))
        .filter(|dir| dir.is_dir())
        .map(|dir| dir.join(name).join("exec-0"))
        .collect();
    assert!(
        !dirs.is_empty(),
        "the driver's cgroup parent {parent} is in no hierarchy"
    );
    let child = Command::new("sleep").arg("1000").spawn().unwrap();
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    }
    (child, dirs)
}

#[tokio::test]
async fn a_new_driver_reaps_what_an_earlier_life_left() {
    let harness = harness().await;
    let root = harness.driver.root().to_path_buf();
    // An earlier life that died without tearing down: a running machine with a background
    // process, whose handle is never dropped...
    let machine = harness.machine("earlier-life").await;
    harness.run_ok(&machine, "sleep 1000 >/dev/null 2>&1 &").await;
    let machine_cgroup = bwrap_machine(&machine).cgroup_name().to_string();
    let machine_dir = bwrap_machine(&machine).dir().to_path_buf();
    let init_pid = bwrap_machine(&machine).init_pid() as u32;
    std::mem::forget(machine);
    // ...a cgroup with a live process and no machine directory, and a directory with no cgroup.
    let (mut orphan, orphan_dirs) = orphan_cgroup_with_process(&root, "orphan-machine");
    let stray_dir = harness.machines_dir().join("stray-machine");
    std::fs::create_dir_all(stray_dir.join("disk")).unwrap();
    std::fs::write(stray_dir.join("disk/left.txt"), "left").unwrap();

    let reborn = tokio::task::spawn_blocking({
        let root = root.clone();
        move || BwrapDriver::new(BwrapConfig::new(root))
    })
    .await
    .unwrap()
    .expect("a driver on the earlier life's root");

    wait_for("the orphan cgroup's process to be killed", || {
        let exited = orphan.try_wait().unwrap().is_some();
        async move { exited.then_some(()) }
    })
    .await;
    assert!(is_dead(init_pid), "the earlier machine's init {init_pid} survived");
    for dir in &orphan_dirs {
        assert!(!dir.parent().unwrap().exists(), "{} is left", dir.display());
    }
    assert!(
        !cgroup_exists(&reborn, &machine_cgroup),
        "the earlier machine's cgroup is left"
    );
    assert!(
        !machine_dir.exists() && !stray_dir.exists(),
        "a machine directory is left"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(harness.machines_dir().to_str().unwrap()),
        "a machine mount is left"
    );
    // The reborn driver works on the same root.
    let workspace = harness.workspace("after");
    let spec = harness.spec("after", &workspace);
    let after = reborn.create(spec).await.unwrap();
    let output = reborn.exec(&after, ExecRequest::new("echo reborn")).await.unwrap();
    assert_eq!(output.stdout_text(), "reborn\n");
    reborn.destroy(&after).await.unwrap();
}

#[tokio::test]
async fn destroy_all_leaves_no_machine_behind() {
    let harness = harness().await;
    let first = harness.machine("first").await;
    let second = harness.machine("second").await;
    harness.run_ok(&first, "sleep 1000 >/dev/null 2>&1 &").await;
    let cgroups = [
        bwrap_machine(&first).cgroup_name().to_string(),
        bwrap_machine(&second).cgroup_name().to_string(),
    ];
    let removed = harness.driver.destroy_all().await.unwrap();
    assert_eq!(removed, 2);
    for cgroup in &cgroups {
        assert!(!cgroup_exists(&harness.driver, cgroup), "{cgroup} is left");
    }
    assert_eq!(std::fs::read_dir(harness.machines_dir()).unwrap().count(), 0);
    // The handles still held fail cleanly and tear down nothing twice.
    assert!(harness.driver.exec(&first, ExecRequest::new("true")).await.is_err());
    harness.driver.destroy(&first).await.unwrap();
    drop(second);
}
