//! Running commands inside a bubblewrap machine: each enters the machine's namespaces and drops
//! its privileges between fork and exec (see `enter`), in a leaf cgroup of its own, with a wall-clock limit and capped
//! output.

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;
use std::path::Path;

use crate::cgroup::{Leaf, MachineCgroup};
use crate::driver::{ExecOutput, ExecRequest, KilledReason};
use crate::error::{Result, SandboxError};
use crate::output_capture::{pump, take_capture, OutputCapture, MAX_OUTPUT_BYTES_CEILING};
use crate::seccomp;
use crate::vfork;

use super::enter::{spawn_in_pid_namespace, Entry};
use super::machine::BwrapMachine;
use super::{blocking, BwrapDriver, WORKSPACE_DIR};

/// After a command exits, how long its output pipes may stay open (held by a process it left
/// running in the background) before the driver stops capturing them.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Free space at or below which a failed command's machine counts as out of disk: the larger
/// of 64 KiB and a thousandth of the disk (a filesystem keeps a few blocks it never hands out).
const DISK_FULL_SLACK_MIN_BYTES: u64 = 64 * 1024;

/// Command leaves a machine keeps for its next commands; more are removed.
const MAX_IDLE_COMMAND_LEAVES: usize = 4;

/// A command leaf an earlier command of `machine` left empty and clean, if one waits.
fn take_idle_command_leaf(machine: &BwrapMachine) -> Option<String> {
    machine.idle_command_leaves.lock().expect("idle leaves lock").pop()
}

/// Keeps command leaf `name` for a later command of `machine` if fewer than
/// [`MAX_IDLE_COMMAND_LEAVES`] wait; whether it was kept.
fn keep_idle_command_leaf(machine: &BwrapMachine, name: String) -> bool {
    let mut idle = machine.idle_command_leaves.lock().expect("idle leaves lock");
    let room = idle.len() < MAX_IDLE_COMMAND_LEAVES;
    if room {
        idle.push(name);
    }
    room
}

/// The kernel's counts of limits hit, read before and after a command.
#[derive(Debug, Clone, Copy)]
struct LimitCounters {
    oom_kills: u64,
    leaf_process_limit_hits: u64,
    machine_process_limit_hits: u64,
}

impl LimitCounters {
    fn read(cgroup: &MachineCgroup, leaf: &Leaf) -> Self {
        LimitCounters {
            oom_kills: leaf.oom_kill_count(),
            leaf_process_limit_hits: leaf.process_limit_hits(),
            machine_process_limit_hits: cgroup.process_limit_hits(),
        }
    }
}

/// Which of the machine's limits a command ran into.
#[derive(Debug, Clone, Copy, Default)]
struct LimitsReached {
    out_of_memory: bool,
    process_limit: bool,
    disk_full: bool,
}

/// How a command ended, for `finish`.
struct Ended {
    leaf: Arc<Leaf>,
    /// The leaf's name when it is a command leaf the machine may run a later command in.
    reusable_leaf: Option<String>,
    status: std::process::ExitStatus,
    timed_out: bool,
    started: Instant,
    timeout_ms: u64,
    counters_before: LimitCounters,
}

/// Reads what the command ran into and kills its debris (blocking: cgroupfs and statvfs).
///
/// What a failed command left running is debris (a fork bomb's children, a half started
/// server) and is killed so that the machine stays usable; a command that succeeds may leave
/// daemons behind on purpose (`start`, `nohup server &`). A command whose forks ran into the
/// process limit is debris whatever its status (`:(){ :|:& };:` exits 0 and leaves the bomb),
/// and so is every other command leaf whose forks did.
fn check_limits(
    cgroup: &MachineCgroup,
    leaf: &Leaf,
    disk: &Path,
    disk_bytes: u64,
    before: LimitCounters,
    failed: bool,
) -> LimitsReached {
    let after = LimitCounters::read(cgroup, leaf);
    let leaf_hit = after.leaf_process_limit_hits > before.leaf_process_limit_hits;
    // v2 kernels may count only where the limit is, at the machine: that is this command's
    // doing only as far as it failed.
    let machine_hit = after.machine_process_limit_hits > before.machine_process_limit_hits;
    let process_limit = leaf_hit || (machine_hit && failed);
    if failed || process_limit {
        leaf.kill_all();
    }
    if process_limit {
        cgroup.kill_process_limit_hogs();
    }
    let disk_full = failed && {
        let slack = DISK_FULL_SLACK_MIN_BYTES.max(disk_bytes / 1000);
        match crate::mounts::free_space(disk) {
            Ok((free_bytes, free_inodes)) => free_bytes <= slack || free_inodes == 0,
            Err(error) => {
                tracing::debug!(disk = %disk.display(), %error, "could not read a machine's free disk space");
                false
            }
        }
    };
    LimitsReached {
        out_of_memory: after.oom_kills > before.oom_kills,
        process_limit,
        disk_full,
    }
}

/// Starts `argv` inside `machine` in `cwd`, with `env` over the machine's variables, in `leaf` (see `enter` for how it enters), from a
/// child that shares the node's memory instead of a copy of it (see `vfork`). The calling thread
/// waits while the child takes its steps, and joining a cgroup can wait for an RCU grace period
/// (tens of milliseconds at worst): the start runs on the blocking pool, not on a runtime worker.
/// Its output is piped, or, with `terminal` (a pseudo-terminal's slave side), it runs on that
/// terminal as its controlling one.
pub(super) async fn spawn_entered(
    machine: &BwrapMachine,
    argv: &[String],
    cwd: &str,
    command_env: &[(String, String)],
    leaf: &Leaf,
    terminal: Option<OwnedFd>,
) -> Result<vfork::Child> {
    let (argv, in_init_directory) = machine.command_argv(cwd, argv);
    // The command's variables over the machine's, as `Command::env` would set them.
    let mut env: Vec<(String, String)> = Vec::new();
    for (key, value) in machine.base_env.iter().chain(command_env.iter()) {
        match env.iter_mut().find(|(existing, _)| existing == key) {
            Some(entry) => entry.1 = value.clone(),
            None => env.push((key.clone(), value.clone())),
        }
    }
    let spawn = vfork::Spawn::new(&argv[0], &argv, &env)
        .map_err(|error| SandboxError::io("start a command in", &machine.dir, error))?;
    let spawn = match &terminal {
        Some(slave) => spawn.terminal(slave),
        None => spawn.stdout(vfork::Output::Piped).stderr(vfork::Output::Piped),
    };
    let procs_files: Vec<CString> = leaf.procs_files();
    let filter = seccomp::machine_filter()?;
    let (init_pid, uid, gid) = (machine.init_pid, machine.uid, machine.gid);
    let init = machine
        .open_init_pidfd()
        .map_err(|error| SandboxError::io("enter", &machine.dir, error))?;
    let dir = machine.dir.clone();
    blocking("start a command in a machine", move || {
        // Opening the init's root and directory reads procfs entries of a live process.
        let entry = Entry::open(&init, init_pid, uid, gid, in_init_directory)
            .map_err(|error| SandboxError::io("enter", &dir, error))?;
        // Open until the start has returned: the child takes it as its standard descriptors.
        let _terminal = terminal;
        let mut steps = || {
            // A session of its own: no controlling terminal of the node's to reach (one on a
            // terminal leads its session already).
            // SAFETY: setsid is a plain system call.
            #[allow(unsafe_code)]
            unsafe {
                libc::setsid();
            }
            // While still host root in the node's mount namespace: the leaf's files are out of
            // reach from inside the machine.
            Leaf::join_current_process(&procs_files)?;
            entry.enter()?;
            // Last, once the process holds nothing: no step above runs filtered.
            filter.install_in_this_process()
        };
        spawn_in_pid_namespace(&init, || spawn.start(&mut steps))
            .map_err(|error| SandboxError::io("start a command in", &dir, error))
    })
    .await
}

/// How a process is started inside a machine.
pub(super) struct Invocation {
    pub(super) argv: Vec<String>,
    pub(super) cwd: String,
    pub(super) env: Vec<(String, String)>,
    pub(super) timeout_ms: u64,
    pub(super) max_output_bytes: u64,
    /// The leaf cgroup; `None` makes a fresh `exec-N` leaf for this process alone.
    pub(super) leaf_name: Option<&'static str>,
}

impl BwrapDriver {
    /// Runs a request through `sh -lc` in the machine.
    pub(super) async fn exec_in(&self, machine: &BwrapMachine, request: ExecRequest) -> Result<ExecOutput> {
        let invocation = Invocation {
            argv: vec!["/bin/sh".to_string(), "-lc".to_string(), request.command],
            cwd: request.cwd.unwrap_or_else(|| WORKSPACE_DIR.to_string()),
            env: request.env,
            timeout_ms: request.timeout_ms.unwrap_or(machine.limits.command_timeout_ms),
            max_output_bytes: request.max_output_bytes.unwrap_or(machine.limits.max_output_bytes),
            leaf_name: None,
        };
        self.run(machine, invocation).await
    }

    async fn run(&self, machine: &BwrapMachine, invocation: Invocation) -> Result<ExecOutput> {
        machine.ensure_running()?;
        let started = Instant::now();
        let leaf_name = match invocation.leaf_name {
            Some(name) => name.to_string(),
            None => take_idle_command_leaf(machine)
                .unwrap_or_else(|| format!("exec-{}", machine.exec_counter.fetch_add(1, Ordering::Relaxed))),
        };
        let reusable_leaf = invocation.leaf_name.is_none().then(|| leaf_name.clone());
        // Making the leaf and reading its counters are cgroupfs writes and reads: off the runtime.
        let cgroup = machine.cgroup.clone();
        let (leaf, counters_before) = blocking("command cgroup set-up", move || {
            let leaf = cgroup.leaf(&leaf_name)?;
            let counters = LimitCounters::read(&cgroup, &leaf);
            Ok((Arc::new(leaf), counters))
        })
        .await?;
        let mut child = spawn_entered(machine, &invocation.argv, &invocation.cwd, &invocation.env, &leaf, None).await?;
        let limit = invocation.max_output_bytes.min(MAX_OUTPUT_BYTES_CEILING) as usize;
        let stdout_capture = Arc::new(Mutex::new(OutputCapture::new(limit)));
        let stderr_capture = Arc::new(Mutex::new(OutputCapture::new(limit)));
        let reader = |fd: Option<std::os::fd::OwnedFd>| {
            vfork::async_reader(fd.expect("the command's output is piped"))
                .map_err(|error| SandboxError::io("read the output of a command in", &machine.dir, error))
        };
        let stdout_pump = tokio::spawn(pump(reader(child.stdout.take())?, stdout_capture.clone()));
        let stderr_pump = tokio::spawn(pump(reader(child.stderr.take())?, stderr_capture.clone()));

        let timeout = Duration::from_millis(invocation.timeout_ms);
        let timed_out = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => {
                let status = status.map_err(|error| SandboxError::io("wait for a command in", &machine.dir, error))?;
                return self
                    .finish(
                        machine,
                        Ended {
                            leaf,
                            reusable_leaf,
                            status,
                            timed_out: false,
                            started,
                            timeout_ms: invocation.timeout_ms,
                            counters_before,
                        },
                        (stdout_pump, stderr_pump),
                        (stdout_capture, stderr_capture),
                    )
                    .await;
            }
            Err(_) => true,
        };
        let killer = leaf.clone();
        let _ = tokio::task::spawn_blocking(move || killer.kill_all()).await;
        let _ = child.start_kill();
        let status = child
            .wait()
            .await
            .map_err(|error| SandboxError::io("wait for a command in", &machine.dir, error))?;
        self.finish(
            machine,
            Ended {
                leaf,
                reusable_leaf,
                status,
                timed_out,
                started,
                timeout_ms: invocation.timeout_ms,
                counters_before,
            },
            (stdout_pump, stderr_pump),
            (stdout_capture, stderr_capture),
        )
        .await
    }

    async fn finish(
        &self,
        machine: &BwrapMachine,
        ended: Ended,
        pumps: (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>),
        captures: (Arc<Mutex<OutputCapture>>, Arc<Mutex<OutputCapture>>),
    ) -> Result<ExecOutput> {
        use std::os::unix::process::ExitStatusExt;
        let (mut stdout_pump, mut stderr_pump) = pumps;
        let Ended {
            leaf,
            reusable_leaf,
            status,
            timed_out,
            started,
            timeout_ms,
            counters_before,
        } = ended;
        let limits_reached = {
            let (cgroup, leaf, disk) = (machine.cgroup.clone(), leaf.clone(), machine.disk_view.clone());
            let disk_bytes = machine.limits.disk_bytes;
            let failed = !status.success() || timed_out;
            blocking("command cgroup check", move || {
                Ok(check_limits(&cgroup, &leaf, &disk, disk_bytes, counters_before, failed))
            })
            .await?
        };
        let drained = tokio::time::timeout(OUTPUT_DRAIN_GRACE, async {
            let _ = (&mut stdout_pump).await;
            let _ = (&mut stderr_pump).await;
        })
        .await;
        if drained.is_err() {
            // A background process still holds the pipes. The pumps go on reading into the
            // empty captures left below (which keep nothing) until it exits, so that it does not
            // die of SIGPIPE on its next write.
            tracing::debug!(machine = %machine.id, "output pipes outlived the command");
        }
        // A process the command left running keeps its leaf (and is killed on destroy). An empty
        // command leaf where no limit was hit serves a later command; any other empty leaf goes.
        let clean = match reusable_leaf {
            Some(_) => {
                let leaf = leaf.clone();
                tokio::task::spawn_blocking(move || leaf.is_empty_and_clean())
                    .await
                    .unwrap_or(false)
            }
            None => false,
        };
        let kept = clean && reusable_leaf.is_some_and(|name| keep_idle_command_leaf(machine, name));
        if !kept {
            tokio::task::spawn_blocking(move || leaf.remove_if_empty()).await.ok();
        }
        let (stdout, stdout_truncated, stdout_omitted) = take_capture(&captures.0);
        let (stderr, stderr_truncated, stderr_omitted) = take_capture(&captures.1);
        let killed_reason = if timed_out {
            Some(KilledReason::Timeout { limit_ms: timeout_ms })
        } else if limits_reached.out_of_memory && !status.success() {
            Some(KilledReason::OutOfMemory {
                limit_bytes: machine.limits.memory_bytes,
            })
        } else if limits_reached.process_limit {
            Some(KilledReason::ProcessLimit {
                limit: machine.limits.max_processes,
            })
        } else if limits_reached.disk_full && !status.success() {
            Some(KilledReason::DiskFull {
                limit_bytes: machine.limits.disk_bytes,
            })
        } else {
            None
        };
        Ok(ExecOutput {
            exit_code: status.code(),
            signal: status.signal(),
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            omitted_bytes: stdout_omitted + stderr_omitted,
            timed_out,
            killed_reason,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Runs an argv (no shell) inside the machine and fails unless it exits 0.
    pub(super) async fn run_checked(
        &self,
        machine: &BwrapMachine,
        argv: Vec<String>,
        leaf_name: Option<&'static str>,
    ) -> Result<ExecOutput> {
        let program = argv.first().cloned().unwrap_or_default();
        let output = self
            .run(
                machine,
                Invocation {
                    argv,
                    cwd: WORKSPACE_DIR.to_string(),
                    env: Vec::new(),
                    timeout_ms: machine.limits.command_timeout_ms.min(60_000),
                    max_output_bytes: machine.limits.max_output_bytes,
                    leaf_name,
                },
            )
            .await?;
        if !output.success() {
            return Err(SandboxError::MachineCommand {
                machine: machine.id.clone(),
                program,
                detail: format!("{}: {}", output.outcome(), output.last_lines(5)),
            });
        }
        Ok(output)
    }
}
