//! Machine cgroups and command leaves are reused when nothing was left in them and no limit
//! was hit in them, and removed otherwise.

use super::*;

/// Machine cgroup `name`'s directory in every hierarchy that has it (v1 memory, pids or cpu, or
/// v2).
fn cgroup_dirs(driver: &BwrapDriver, name: &str) -> Vec<PathBuf> {
    let parent = crate::bwrap::cgroup_parent_for(driver.root());
    ["memory", "pids", "cpu", ""]
        .iter()
        .map(|hierarchy| Path::new("/sys/fs/cgroup").join(hierarchy).join(&parent).join(name))
        .filter(|dir| dir.exists())
        .collect()
}

/// Whether machine cgroup `name` is in any hierarchy.
pub(crate) fn cgroup_exists(driver: &BwrapDriver, name: &str) -> bool {
    !cgroup_dirs(driver, name).is_empty()
}

/// Every process in machine cgroup `name` and its leaves, in any hierarchy.
fn cgroup_processes(driver: &BwrapDriver, name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = cgroup_dirs(driver, name);
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            }
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        pids.extend(procs.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    }
    pids
}

/// The names of the leaves under machine cgroup `name`, from its first hierarchy.
fn cgroup_leaves(driver: &BwrapDriver, name: &str) -> std::collections::BTreeSet<String> {
    let dirs = cgroup_dirs(driver, name);
    let Some(dir) = dirs.first() else {
        return Default::default();
    };
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether a destroyed machine's cgroup `name` is gone, or waits in the driver's pool with no
/// process in it.
pub(crate) fn cgroup_released(driver: &BwrapDriver, name: &str) -> bool {
    !cgroup_exists(driver, name)
        || (driver.pooled_cgroup_names().iter().any(|pooled| pooled == name)
            && cgroup_processes(driver, name).is_empty())
}

/// The machine's memory limit as its cgroup holds it (v1 `memory.limit_in_bytes`, v2 `memory.max`).
fn memory_limit(driver: &BwrapDriver, name: &str) -> u64 {
    let dirs = cgroup_dirs(driver, name);
    let text = dirs
        .iter()
        .find_map(|dir| {
            std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(dir.join("memory.max")))
                .ok()
        })
        .expect("a memory limit file");
    text.trim().parse().expect("a memory limit in bytes")
}

#[tokio::test]
async fn a_clean_machine_cgroup_serves_the_next_machine_with_that_machines_limits() {
    let harness = harness().await;
    let first = harness.machine("first").await;
    harness.run_ok(&first, "echo first").await;
    let cgroup = bwrap_machine(&first).cgroup_name().to_string();
    assert!(
        !cgroup.contains(first.id()),
        "cgroups are named for no machine: {cgroup}"
    );
    harness.driver.destroy(&first).await.unwrap();
    assert_eq!(harness.driver.pooled_cgroup_names(), vec![cgroup.clone()]);
    assert!(cgroup_processes(&harness.driver, &cgroup).is_empty());

    // The next machine takes it, with its own (higher, then lower) memory limit.
    for memory_bytes in [512 * MIB, 96 * MIB] {
        let workspace = harness.workspace("next");
        let mut spec = harness.spec("next", &workspace);
        spec.limits.memory_bytes = memory_bytes;
        let next = harness.driver.create(spec).await.unwrap();
        assert_eq!(bwrap_machine(&next).cgroup_name(), cgroup);
        assert!(harness.driver.pooled_cgroup_names().is_empty());
        assert_eq!(memory_limit(&harness.driver, &cgroup), memory_bytes);
        assert_eq!(harness.run_ok(&next, "echo next").await, "next\n");
        harness.driver.destroy(&next).await.unwrap();
    }
}

/// The limit events counted anywhere in machine cgroup `name` (its own directories and its
/// leaves): forks refused by the process limit and processes killed for the memory limit.
fn limit_events(driver: &BwrapDriver, name: &str) -> u64 {
    let count = |text: String, key: &str| -> u64 {
        text.lines()
            .filter_map(|line| line.split_once(' '))
            .filter(|(field, _)| *field == key)
            .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
            .sum()
    };
    let mut events = 0;
    let mut stack = cgroup_dirs(driver, name);
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            }
        }
        for (file, key) in [
            ("pids.events", "max"),
            ("pids.events.local", "max"),
            ("memory.oom_control", "oom_kill"),
            ("memory.events", "oom_kill"),
        ] {
            events += count(std::fs::read_to_string(dir.join(file)).unwrap_or_default(), key);
        }
    }
    events
}

#[tokio::test]
async fn a_machine_cgroup_where_the_process_limit_was_hit_is_never_handed_on_with_its_counts() {
    let harness = harness().await;
    let workspace = harness.workspace("crowded");
    let mut spec = harness.spec("crowded", &workspace);
    spec.limits.max_processes = 16;
    let crowded = harness.driver.create(spec).await.unwrap();
    let cgroup = bwrap_machine(&crowded).cgroup_name().to_string();
    // A background process keeps the first leaf busy (and so out of reuse) until the end.
    harness.run_ok(&crowded, "sleep 1000 >/dev/null 2>&1 &").await;
    let output = harness
        .run(&crowded, "for i in $(seq 40); do sleep 100 & done 2>/dev/null")
        .await;
    assert!(
        matches!(output.killed_reason, Some(KilledReason::ProcessLimit { .. })),
        "forks past the limit should be refused: {output:?}"
    );
    harness.driver.destroy(&crowded).await.unwrap();
    // Whatever of it is kept for the next machine counts nothing of this one (v1 counts a
    // refused fork in the forking command's leaf, which goes; v2 also at the machine, which
    // then goes whole).
    if cgroup_exists(&harness.driver, &cgroup) {
        assert_eq!(harness.driver.pooled_cgroup_names(), vec![cgroup.clone()]);
        assert!(cgroup_processes(&harness.driver, &cgroup).is_empty());
        assert_eq!(
            limit_events(&harness.driver, &cgroup),
            0,
            "{cgroup} is kept with its counts"
        );
    }
    let next = harness.machine("after-crowded").await;
    assert_eq!(harness.run_ok(&next, "echo next").await, "next\n");
    assert_eq!(limit_events(&harness.driver, bwrap_machine(&next).cgroup_name()), 0);
    harness.driver.destroy(&next).await.unwrap();
}

#[tokio::test]
async fn commands_run_in_the_leaf_an_earlier_clean_command_left() {
    let harness = harness().await;
    let machine = harness.machine("leaves").await;
    let cgroup = bwrap_machine(&machine).cgroup_name().to_string();
    for round in 0..5 {
        assert_eq!(
            harness.run_ok(&machine, &format!("echo {round}")).await,
            format!("{round}\n")
        );
    }
    let leaves = cgroup_leaves(&harness.driver, &cgroup);
    assert_eq!(
        leaves,
        ["exec-0", "init"].iter().map(|name| name.to_string()).collect(),
        "one command leaf serves commands one after the other"
    );
    // A command that leaves a process behind keeps its leaf; the next one gets a new leaf.
    harness.run_ok(&machine, "sleep 1000 >/dev/null 2>&1 &").await;
    harness.run_ok(&machine, "true").await;
    let leaves = cgroup_leaves(&harness.driver, &cgroup);
    assert_eq!(leaves.len(), 3, "{leaves:?}");
    harness.driver.destroy(&machine).await.unwrap();
    assert!(cgroup_released(&harness.driver, &cgroup));
}
