//! A node's machines live no longer than the node: after a SIGKILL, the restarted node kills and
//! removes every process, cgroup and directory of the old machines; after a SIGTERM, the node
//! destroys its machines before it exits and leaves none.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use flotilla_proto::v1;
use flotilla_tests::{agent_client, wait_for, ClusterOptions, TestCluster};

use crate::common::{create, wait_for_a_leader, DEADLINE};
use crate::t50_machines::wait_for_status;

/// The node's machine cgroup parent in every hierarchy that has it (v1: memory, pids, cpu;
/// v2: the unified tree).
fn cgroup_parents(data_dir: &Path) -> Vec<PathBuf> {
    let parent = flotilla_sandbox::bwrap::cgroup_parent_for(&data_dir.join("machines"));
    let parents: Vec<PathBuf> = ["memory", "pids", "cpu", ""]
        .iter()
        .map(|hierarchy| Path::new("/sys/fs/cgroup").join(hierarchy).join(&parent))
        .filter(|dir| dir.join("cgroup.procs").exists())
        .collect();
    assert!(
        !parents.is_empty(),
        "no cgroup hierarchy has the node's machine parent {parent} (cgroup v1 memory/pids/cpu or v2 needed)"
    );
    parents
}

/// The machine cgroups under the node's parent.
fn machine_cgroups(data_dir: &Path) -> BTreeSet<String> {
    cgroup_parents(data_dir)
        .iter()
        .flat_map(|parent| std::fs::read_dir(parent).into_iter().flatten().flatten())
        .filter(|entry| entry.path().is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every process in the cgroups of the given machines.
fn machine_processes(data_dir: &Path, machines: &BTreeSet<String>) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for parent in cgroup_parents(data_dir) {
        for machine in machines {
            let mut stack = vec![parent.join(machine)];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for entry in entries.flatten() {
                    if entry.path().is_dir() {
                        stack.push(entry.path());
                    }
                }
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                pids.extend(procs.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
            }
        }
    }
    pids
}

/// The kernel's flag of a task that is on its way out (`PF_EXITING`): killed, its memory gone.
const PF_EXITING: u64 = 0x4;

/// Whether `pid` runs: not a zombie, and not killed and exiting (a pid namespace's init lingers
/// in exit until the namespace's last zombie is reaped).
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("X");
    let flags: u64 = fields.get(6).and_then(|flags| flags.parse().ok()).unwrap_or(0);
    !matches!(state, "Z" | "X") && flags & PF_EXITING == 0
}

/// Waits (bounded) until none of `pids` runs; fails naming the survivors.
async fn wait_until_dead(what: &str, pids: &BTreeSet<u32>) {
    let pids = pids.clone();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let survivors: Vec<String> = pids
            .iter()
            .copied()
            .filter(|pid| is_alive(*pid))
            .map(describe)
            .collect();
        if survivors.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} survived: {survivors:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// What a process is, for failure messages.
fn describe(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    format!(
        "{pid}: {} [{}] in {}",
        String::from_utf8_lossy(&cmdline).replace('\0', " "),
        stat.trim(),
        cgroup.replace('\n', "; ")
    )
}

fn machine_dirs(data_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data_dir.join("machines/machines"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether the data dir's lock file can be locked now (it is unlocked at once after).
// Unsafe: flock(2), to probe the node's data dir lock; std's File::try_lock needs a newer Rust.
#[allow(unsafe_code)]
fn lock_is_free(data_dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(data_dir.join("flotilla.lock")) else {
        return true;
    };
    // SAFETY: flock on a descriptor this function owns; no memory is shared with the call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Waits until nothing holds the killed node's data dir lock: a child it was forking when it
/// died can hold the descriptor until it execs.
async fn wait_for_lock_released(data_dir: &Path) {
    let data_dir = data_dir.to_path_buf();
    wait_for("the killed node's data dir lock to be released", DEADLINE, move || {
        let free = lock_is_free(&data_dir);
        async move { free.then_some(()) }
    })
    .await;
}

/// Waits until the node runs a machine with a process in it; answers its cgroups and processes.
async fn wait_for_busy_machine(data_dir: &Path) -> (BTreeSet<String>, BTreeSet<u32>) {
    let data_dir = data_dir.to_path_buf();
    wait_for("a machine with processes in its cgroup", DEADLINE, move || {
        let machines = machine_cgroups(&data_dir);
        let processes = machine_processes(&data_dir, &machines);
        async move { (!machines.is_empty() && !processes.is_empty()).then_some((machines, processes)) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restarted_reaps_its_machines_and_a_stopped_one_leaves_none() {
    let mut cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let endpoint = cluster.nodes[0].endpoint();
    let data_dir = cluster.nodes[0].data_dir.clone();
    let mut client = agent_client(&endpoint, &token).await;
    // The hold model runs `sleep 590` in the machine: a busy process for as long as the test.
    let agent = create(&mut client, "held", "Hold the machine").await;
    wait_for_status(&endpoint, &token, &agent.id, v1::AgentStatus::Running).await;
    let (old_machines, old_processes) = wait_for_busy_machine(&data_dir).await;

    // A power loss: nothing of the node runs its teardown.
    cluster.nodes[0].kill9();
    wait_for_lock_released(&data_dir).await;
    cluster.nodes[0].restart();
    let (dir, old) = (data_dir.clone(), old_machines.clone());
    wait_for("the restarted node to reap the old machines", DEADLINE, move || {
        let cgroups_left: Vec<String> = machine_cgroups(&dir).intersection(&old).cloned().collect();
        let dirs_left: Vec<String> = machine_dirs(&dir).intersection(&old).cloned().collect();
        async move { (cgroups_left.is_empty() && dirs_left.is_empty()).then_some(()) }
    })
    .await;
    wait_until_dead("processes of the old machines after a restart", &old_processes).await;
    cluster.nodes[0].assert_running("reaping");

    // A machine on the restarted node (the held agent's again, or a new agent's); a SIGTERM
    // destroys it.
    wait_for_a_leader("the restarted node to know a leader", &endpoint, &token).await;
    let mut client = agent_client(&endpoint, &token).await;
    let again = create(&mut client, "held-again", "Hold the machine").await;
    wait_for_status(&endpoint, &token, &again.id, v1::AgentStatus::Running).await;
    let (new_machines, new_processes) = wait_for_busy_machine(&data_dir).await;
    assert!(
        new_machines.is_disjoint(&old_machines),
        "{new_machines:?} {old_machines:?}"
    );
    let parents = cgroup_parents(&data_dir);
    cluster.nodes[0].terminate();
    let parents_left: Vec<&PathBuf> = parents.iter().filter(|parent| parent.exists()).collect();
    assert!(
        parents_left.is_empty(),
        "a stopped node left its cgroup parent (and any machine cgroup in it): {parents_left:?}"
    );
    assert_eq!(
        machine_dirs(&data_dir),
        BTreeSet::new(),
        "a stopped node left machine directories"
    );
    wait_until_dead("processes of a stopped node's machines", &new_processes).await;
}
