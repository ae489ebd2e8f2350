//! Per-machine cgroups on v1 (memory, pids, cpu hierarchies) or v2 (one unified tree).
//!
//! Layout: `<parent>/<machine cgroup>` carries the limits; its processes live in leaves below it
//! (`init`, `terminals`, `exec-N`) so that one command's whole process tree can be killed on a
//! timeout without touching the rest of the machine. v2 forbids processes in a cgroup that has
//! controller-enabled children, and v1 does not mind, so both use the same layout.
//!
//! Machine cgroups are reused: a machine's cgroup, once every process in it is gone, goes to a
//! small pool when no limit was ever hit in it, and the next machine takes it (with its own
//! limits written again) instead of making one. Removing a memory cgroup is costly on a dense
//! host: the kernel takes it offline under the global cgroup mutex and walks every
//! superblock's reclaim lists to hand its charges up, and each machine brings several
//! superblocks (its disk, overlays, `/proc`, `/dev`), so every removal grows with the machines
//! already running and holds up every cgroup write on the host (each start's mkdir and join)
//! meanwhile. The cgroups are therefore named for no machine (`machine-<ulid>`); a machine
//! knows its own.
// Unsafe: joining a leaf runs in pre_exec with raw open/write/close (nothing that allocates), and draining a leaf sends kill(2).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, SandboxError};
use crate::limits::MachineLimits;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// How long teardown waits for killed processes to leave a cgroup before giving up on it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Emptied machine cgroups kept for the next machines; more are removed.
const MAX_POOLED_MACHINE_CGROUPS: usize = 64;
/// A released machine cgroup with more leaves than this (commands that left processes behind)
/// is removed rather than kept.
const MAX_POOLED_LEAVES: usize = 8;

/// Emptied machine cgroups ready for the next machine (see [`MachineCgroup::release`]).
type CgroupPool = Arc<Mutex<Vec<MachineCgroup>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    version: Version,
    root: PathBuf,
    parent: String,
    pool: CgroupPool,
}

fn cgroup_error(path: &Path, detail: impl Into<String>) -> SandboxError {
    SandboxError::Cgroup {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|error| cgroup_error(path, format!("could not write {value:?}: {error}")))
}

fn create_dir(path: &Path) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(cgroup_error(path, format!("could not create: {error}"))),
    }
}

impl Cgroups {
    /// Picks v2 when `/sys/fs/cgroup` is a unified hierarchy with the memory, pids and cpu
    /// controllers, else v1 when those three hierarchies are mounted.
    pub(crate) fn detect(parent: &str) -> Result<Self> {
        let root = PathBuf::from(CGROUP_ROOT);
        let unified_controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has_all = |list: &str| {
            ["memory", "pids", "cpu"]
                .iter()
                .all(|name| list.split_whitespace().any(|c| c == *name))
        };
        let cgroups = if has_all(&unified_controllers) {
            Cgroups {
                version: Version::V2,
                root,
                parent: parent.to_string(),
                pool: CgroupPool::default(),
            }
        } else if V1_CONTROLLERS
            .iter()
            .all(|controller| root.join(controller).join("cgroup.procs").exists())
        {
            Cgroups {
                version: Version::V1,
                root,
                parent: parent.to_string(),
                pool: CgroupPool::default(),
            }
        } else {
            return Err(cgroup_error(
                &root,
                "neither a cgroup v2 hierarchy with memory, pids and cpu nor cgroup v1 memory, pids and cpu hierarchies are mounted",
            ));
        };
        cgroups.prepare_parent()?;
        Ok(cgroups)
    }

    pub(crate) fn version(&self) -> Version {
        self.version
    }

    fn parent_dirs(&self) -> Vec<PathBuf> {
        match self.version {
            Version::V1 => V1_CONTROLLERS
                .iter()
                .map(|controller| self.root.join(controller).join(&self.parent))
                .collect(),
            Version::V2 => vec![self.root.join(&self.parent)],
        }
    }

    /// Creates the parent (it may be nested, `flotilla/<node>`), with the controllers enabled
    /// at every level on v2.
    fn prepare_parent(&self) -> Result<()> {
        let hierarchies: Vec<PathBuf> = match self.version {
            Version::V1 => V1_CONTROLLERS
                .iter()
                .map(|controller| self.root.join(controller))
                .collect(),
            Version::V2 => vec![self.root.clone()],
        };
        for hierarchy in hierarchies {
            let mut dir = hierarchy;
            if self.version == Version::V2 {
                enable_v2_controllers(&dir)?;
            }
            for component in Path::new(&self.parent).components() {
                dir.push(component);
                create_dir(&dir)?;
                if self.version == Version::V2 {
                    enable_v2_controllers(&dir)?;
                }
            }
        }
        Ok(())
    }

    /// Names of every machine cgroup under the parent, in any hierarchy.
    pub(crate) fn machine_names(&self) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        for dir in self.parent_dirs() {
            for name in child_dirs(&dir) {
                names.insert(name);
            }
        }
        names.into_iter().collect()
    }

    /// Kills the processes of every machine cgroup under the parent and removes them all: what
    /// an earlier life of the node left behind. Blocking (it waits for the cgroups to drain).
    /// Emptied cgroups waiting in the pool are removed too, and not counted.
    pub(crate) fn reap_all(&self) -> Vec<String> {
        let pooled: Vec<MachineCgroup> = std::mem::take(&mut *self.pool.lock().expect("cgroup pool lock"));
        for cgroup in &pooled {
            cgroup.remove();
        }
        let names = self.machine_names();
        for name in &names {
            tracing::info!(cgroup = %name, "removing a machine cgroup left by a previous run");
            self.machine(name).remove();
        }
        names
    }

    /// Removes the node's own parent cgroup in every hierarchy, once [`Cgroups::reap_all`] has
    /// emptied it: what a clean stop does last, so that a host whose nodes come and go (tests,
    /// nodes moved to new data dirs) does not collect one empty parent per node. The shared
    /// `flotilla` directory above stays: another node may be making its own parent in it.
    pub(crate) fn remove_parent(&self) {
        for dir in self.parent_dirs() {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(cgroup = %dir.display(), %error, "could not remove the node's cgroup parent")
                }
            }
        }
    }

    /// The names of the emptied cgroups waiting in the pool.
    pub(crate) fn pooled_names(&self) -> Vec<String> {
        let pool = self.pool.lock().expect("cgroup pool lock");
        pool.iter().map(|cgroup| cgroup.name.clone()).collect()
    }

    /// The machine cgroup `name` under the parent (paths only; nothing is created). It is
    /// removed, never pooled, when released.
    pub(crate) fn machine(&self, name: &str) -> MachineCgroup {
        MachineCgroup {
            version: self.version,
            name: name.to_string(),
            dirs: self.parent_dirs().into_iter().map(|dir| dir.join(name)).collect(),
            pool: None,
        }
    }

    /// A cgroup for a new machine, with `limits`: one from the pool when there is one, else a
    /// new one.
    pub(crate) fn create_machine(&self, limits: &MachineLimits) -> Result<MachineCgroup> {
        let pooled = self.pool.lock().expect("cgroup pool lock").pop();
        if let Some(mut machine) = pooled {
            match machine.apply_limits(limits) {
                Ok(()) => {
                    machine.pool = Some(self.pool.clone());
                    return Ok(machine);
                }
                Err(error) => {
                    tracing::debug!(cgroup = %machine.name, %error, "a pooled machine cgroup took no new limits; removing it");
                    machine.remove();
                }
            }
        }
        let name = format!("machine-{}", ulid::Ulid::new().to_string().to_lowercase());
        let mut machine = self.machine(&name);
        // A clean stop removed the parent (see `remove_parent`); a driver used again makes it anew.
        if self.parent_dirs().iter().any(|dir| !dir.is_dir()) {
            self.prepare_parent()?;
        }
        for dir in &machine.dirs {
            create_dir(dir)?;
        }
        let result = machine.apply_limits(limits);
        if result.is_err() {
            machine.remove();
        }
        machine.pool = Some(self.pool.clone());
        result.map(|()| machine)
    }
}

/// The names of the directories directly under `dir` (none when it cannot be read).
fn child_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false))
        .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
        .collect()
}

/// The `max` counter of a `pids.events` file (0 when absent).
fn read_max_counter(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(name, _)| *name == "max")
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

fn enable_v2_controllers(dir: &Path) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&path).unwrap_or_default();
    for controller in ["memory", "pids", "cpu"] {
        if !enabled.split_whitespace().any(|name| name == controller) {
            write_file(&path, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub(crate) struct MachineCgroup {
    version: Version,
    /// The directory name under the parent, the same in every hierarchy.
    name: String,
    /// v1: the machine's directory in the memory, pids and cpu hierarchies (in that order);
    /// v2: its one directory.
    dirs: Vec<PathBuf>,
    /// Where [`MachineCgroup::release`] puts it back; `None`: it is removed.
    pool: Option<CgroupPool>,
}

impl MachineCgroup {
    fn apply_limits(&self, limits: &MachineLimits) -> Result<()> {
        match self.version {
            Version::V1 => {
                let (memory, pids, cpu) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
                let memory_limit = memory.join("memory.limit_in_bytes");
                // Without swap accounting this file is absent; with it, swap must not widen the
                // limit. The kernel keeps memory ≤ memory+swap at every step, so a pooled cgroup
                // whose limits go up takes the memory+swap limit first.
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                let raising = std::fs::read_to_string(&memory_limit)
                    .ok()
                    .and_then(|current| current.trim().parse::<u64>().ok())
                    .is_some_and(|current| limits.memory_bytes > current);
                let value = limits.memory_bytes.to_string();
                if memsw.exists() && raising {
                    write_file(&memsw, &value)?;
                    write_file(&memory_limit, &value)?;
                } else {
                    write_file(&memory_limit, &value)?;
                    if memsw.exists() {
                        write_file(&memsw, &value)?;
                    }
                }
                write_file(&pids.join("pids.max"), &limits.max_processes.to_string())?;
                write_file(&cpu.join("cpu.shares"), &limits.cpu_weight.to_string())?;
            }
            Version::V2 => {
                let dir = &self.dirs[0];
                write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                write_file(&dir.join("pids.max"), &limits.max_processes.to_string())?;
                write_file(&dir.join("cpu.weight"), &limits.cpu_weight_v2().to_string())?;
                enable_v2_controllers(dir)?;
            }
        }
        Ok(())
    }

    /// A leaf cgroup for a group of processes of this machine.
    pub(crate) fn leaf(&self, name: &str) -> Result<Leaf> {
        let dirs: Vec<PathBuf> = self.dirs.iter().map(|dir| dir.join(name)).collect();
        for dir in &dirs {
            create_dir(dir)?;
        }
        let procs_files = dirs
            .iter()
            .map(|dir| {
                CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).expect("cgroup paths have no NUL byte")
            })
            .collect();
        Ok(Leaf {
            version: self.version,
            dirs,
            procs_files,
        })
    }

    /// The machine's leaves, by name, in any of its hierarchies (a start cut short on v1 can
    /// leave a leaf in one hierarchy only).
    fn leaves(&self) -> Vec<Leaf> {
        let mut names = std::collections::BTreeSet::new();
        for dir in &self.dirs {
            names.extend(child_dirs(dir));
        }
        names
            .into_iter()
            .map(|name| Leaf {
                version: self.version,
                dirs: self.dirs.iter().map(|dir| dir.join(&name)).collect(),
                procs_files: Vec::new(),
            })
            .collect()
    }

    /// Kills every process of the machine, its whole tree at once where the kernel can
    /// (`cgroup.kill` on v2), else leaf by leaf; the cgroups stay.
    pub(crate) fn kill_processes(&self) {
        if self.version == Version::V2 {
            let kill_file = self.dirs[0].join("cgroup.kill");
            if kill_file.exists() {
                if let Err(error) = std::fs::write(&kill_file, "1") {
                    tracing::warn!(cgroup = %kill_file.display(), %error, "cgroup.kill failed; killing leaf by leaf");
                }
            }
        }
        for leaf in self.leaves() {
            leaf.kill_all();
        }
    }

    /// How often a fork in the machine was refused by its process limit, as counted at the
    /// machine's own cgroup: v2 kernels count there (hierarchically); v1 counts only in the
    /// forking process's leaf, so this is 0 on v1.
    pub(crate) fn process_limit_hits(&self) -> u64 {
        match self.version {
            Version::V1 => 0,
            Version::V2 => read_max_counter(&self.dirs[0].join("pids.events")),
        }
    }

    /// Kills the processes of every command leaf whose forks ran into the process limit: a
    /// fork bomb left in the background by an earlier command keeps the machine at its limit
    /// until it is gone. The init and terminal leaves are left alone.
    pub(crate) fn kill_process_limit_hogs(&self) -> usize {
        let mut killed = 0;
        for leaf in self.leaves() {
            let is_command_leaf = leaf
                .dirs
                .first()
                .and_then(|dir| dir.file_name())
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("exec-"));
            if is_command_leaf && leaf.process_limit_hits() > 0 && !leaf.is_empty() {
                leaf.kill_all();
                killed += 1;
            }
        }
        killed
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Ends a machine's use of its cgroup: kills every process in it, then keeps it for the
    /// next machine when it is clean (every leaf empty, no memory or process limit ever hit in
    /// it, few leaves) and the pool has room, else removes it. A reused cgroup then shows the
    /// next machine nothing of this one but the page cache still charged to it, which the
    /// kernel reclaims as it would any cache. Best effort, like [`MachineCgroup::remove`].
    pub(crate) fn release(&self) {
        let Some(pool) = &self.pool else {
            return self.remove();
        };
        self.kill_processes();
        let leaves = self.leaves();
        let clean = leaves.len() <= MAX_POOLED_LEAVES
            && self.process_limit_hits() == 0
            && leaves.iter().all(Leaf::is_empty_and_clean);
        if clean {
            self.reset_peaks();
            let mut pool = pool.lock().expect("cgroup pool lock");
            if pool.len() < MAX_POOLED_MACHINE_CGROUPS {
                let mut pooled = self.clone();
                pooled.pool = None;
                pool.push(pooled);
                return;
            }
        }
        self.remove();
    }

    /// v1 keeps the highest usage and the count of charges refused by the limit until told to
    /// forget them; a pooled cgroup forgets them (v2 has no such reset before recent kernels, and
    /// nothing here reads its peaks).
    fn reset_peaks(&self) {
        if self.version == Version::V1 {
            for file in ["memory.max_usage_in_bytes", "memory.failcnt"] {
                let path = self.dirs[0].join(file);
                if let Err(error) = std::fs::write(&path, "0") {
                    tracing::debug!(file = %path.display(), %error, "could not reset a pooled cgroup's counter");
                }
            }
        }
    }

    /// Kills every process of the machine and removes its cgroups. Best effort: what cannot be
    /// removed is logged, never fatal, so teardown always goes on to the mounts.
    pub(crate) fn remove(&self) {
        self.kill_processes();
        for leaf in self.leaves() {
            leaf.kill_all();
            leaf.remove();
        }
        for dir in &self.dirs {
            remove_dir_waiting(dir);
        }
    }
}

fn remove_dir_waiting(dir: &Path) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return,
            Err(error) if Instant::now() >= deadline => {
                tracing::warn!(cgroup = %dir.display(), %error, "could not remove a machine cgroup");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// A leaf cgroup: processes are put in it before they exec, and killed together.
#[derive(Debug)]
pub(crate) struct Leaf {
    version: Version,
    dirs: Vec<PathBuf>,
    procs_files: Vec<CString>,
}

impl Leaf {
    /// Moves the calling process into this leaf; for `pre_exec`, so it allocates nothing.
    pub(crate) fn join_current_process(procs_files: &[CString]) -> io::Result<()> {
        // SAFETY: getpid is async-signal-safe.
        let pid = unsafe { libc::getpid() };
        let mut digits = [0u8; 20];
        let mut length = 0;
        let mut value = pid as u32;
        loop {
            digits[length] = b'0' + (value % 10) as u8;
            length += 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        digits[..length].reverse();
        for file in procs_files {
            // SAFETY: open/write/close on a valid path and buffer; all async-signal-safe.
            unsafe {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, digits.as_ptr().cast(), length);
                let error = io::Error::last_os_error();
                libc::close(fd);
                if written < 0 {
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// The kernel's count of this leaf's processes it killed for the machine's memory limit
    /// (v1 counts an OOM kill only in the victim's own cgroup, so it is read per leaf).
    pub(crate) fn oom_kill_count(&self) -> u64 {
        let file = match self.version {
            Version::V1 => self.dirs[0].join("memory.oom_control"),
            Version::V2 => self.dirs[0].join("memory.events"),
        };
        let text = std::fs::read_to_string(file).unwrap_or_default();
        text.lines()
            .filter_map(|line| line.split_once(' '))
            .find(|(name, _)| *name == "oom_kill")
            .and_then(|(_, value)| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// How often a fork of this leaf's processes was refused by the machine's process limit
    /// (`pids.events`, and `pids.events.local` where the kernel has it).
    pub(crate) fn process_limit_hits(&self) -> u64 {
        let dir = match self.version {
            Version::V1 => &self.dirs[1],
            Version::V2 => &self.dirs[0],
        };
        read_max_counter(&dir.join("pids.events")) + read_max_counter(&dir.join("pids.events.local"))
    }

    pub(crate) fn procs_files(&self) -> Vec<CString> {
        self.procs_files.clone()
    }

    fn pids(&self) -> Vec<i32> {
        // v1: a process is in all three hierarchies, unless a start was cut short between the
        // joins; every hierarchy is read so that none is missed.
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .flat_map(|dir| {
                std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|line| line.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pids().is_empty()
    }

    /// Whether the leaf holds no process and none of its processes ever ran into the memory or
    /// the process limit: as good as a new one.
    pub(crate) fn is_empty_and_clean(&self) -> bool {
        self.is_empty() && self.oom_kill_count() == 0 && self.process_limit_hits() == 0
    }

    /// SIGKILLs every process in the leaf until it is empty (a fork bomb refills it, but the
    /// pids limit bounds how much), or the drain deadline passes.
    pub(crate) fn kill_all(&self) {
        if self.version == Version::V2 {
            let kill_file = self.dirs[0].join("cgroup.kill");
            if kill_file.exists() && std::fs::write(&kill_file, "1").is_ok() {
                self.wait_empty();
                return;
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() >= deadline {
                return;
            }
            for pid in pids {
                // SAFETY: sending a signal has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_empty(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Removes the leaf if it is empty; returns whether it is gone.
    pub(crate) fn remove_if_empty(&self) -> bool {
        if !self.is_empty() {
            return false;
        }
        self.dirs.iter().all(|dir| std::fs::remove_dir(dir).is_ok())
    }

    fn remove(&self) {
        for dir in &self.dirs {
            remove_dir_waiting(dir);
        }
    }
}
