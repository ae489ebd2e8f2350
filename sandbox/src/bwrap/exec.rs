//! Running commands inside a bubblewrap machine: each enters the machine's namespaces with
//! `nsenter` and `setpriv`, in a leaf cgroup of its own, with a wall-clock limit and capped
//! output.

use std::ffi::CString;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup::Leaf;
use crate::driver::{ExecOutput, ExecRequest, KilledReason};
use crate::error::{Result, SandboxError};
use crate::output_capture::{pump, take_capture, OutputCapture, MAX_OUTPUT_BYTES_CEILING};
use crate::seccomp;

use super::machine::BwrapMachine;
use super::{BwrapDriver, WORKSPACE_DIR};

/// After a command exits, how long its output pipes may stay open (held by a process it left
/// running in the background) before the driver stops capturing them.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(200);

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

    // Unsafe: pre_exec, to start a session, join the command's leaf cgroup and install the
    // system-call filter before it execs.
    #[allow(unsafe_code)]
    async fn run(&self, machine: &BwrapMachine, invocation: Invocation) -> Result<ExecOutput> {
        machine.ensure_running()?;
        let started = Instant::now();
        let leaf_name = match invocation.leaf_name {
            Some(name) => name.to_string(),
            None => format!("exec-{}", machine.exec_counter.fetch_add(1, Ordering::Relaxed)),
        };
        let leaf = machine.cgroup.leaf(&leaf_name)?;
        let oom_kills_before = leaf.oom_kill_count();
        let argv = machine.enter_argv(&invocation.cwd, &invocation.argv);
        let mut command = tokio::process::Command::new(&argv[0]);
        command.args(&argv[1..]);
        command.env_clear();
        for (key, value) in machine.base_env.iter().chain(invocation.env.iter()) {
            command.env(key, value);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let procs_files: Vec<CString> = leaf.procs_files();
        let filter = seccomp::machine_filter()?;
        // SAFETY: setsid, the leaf join and the filter's installation only make
        // async-signal-safe calls.
        unsafe {
            command.pre_exec(move || {
                // A session of its own: no controlling terminal of the node's to reach.
                libc::setsid();
                Leaf::join_current_process(&procs_files)?;
                // Last, so that nsenter, setpriv and the command all run filtered.
                filter.install_in_this_process()
            });
        }
        let mut child = command
            .spawn()
            .map_err(|error| SandboxError::io("start", &machine.nsenter_program, error))?;
        let limit = invocation.max_output_bytes.min(MAX_OUTPUT_BYTES_CEILING) as usize;
        let stdout_capture = Arc::new(Mutex::new(OutputCapture::new(limit)));
        let stderr_capture = Arc::new(Mutex::new(OutputCapture::new(limit)));
        let stdout_pump = tokio::spawn(pump(
            child.stdout.take().expect("stdout is piped"),
            stdout_capture.clone(),
        ));
        let stderr_pump = tokio::spawn(pump(
            child.stderr.take().expect("stderr is piped"),
            stderr_capture.clone(),
        ));

        let timeout = Duration::from_millis(invocation.timeout_ms);
        let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => (
                status.map_err(|error| SandboxError::io("wait for", &machine.nsenter_program, error))?,
                false,
            ),
            Err(_) => {
                let leaf = Arc::new(leaf);
                let killer = leaf.clone();
                let _ = tokio::task::spawn_blocking(move || killer.kill_all()).await;
                let _ = child.start_kill();
                let status = child
                    .wait()
                    .await
                    .map_err(|error| SandboxError::io("wait for", &machine.nsenter_program, error))?;
                let leaf = Arc::try_unwrap(leaf).ok();
                return self
                    .finish(
                        machine,
                        leaf,
                        status,
                        true,
                        started,
                        invocation.timeout_ms,
                        oom_kills_before,
                        (stdout_pump, stderr_pump),
                        (stdout_capture, stderr_capture),
                    )
                    .await;
            }
        };
        self.finish(
            machine,
            Some(leaf),
            status,
            timed_out,
            started,
            invocation.timeout_ms,
            oom_kills_before,
            (stdout_pump, stderr_pump),
            (stdout_capture, stderr_capture),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        machine: &BwrapMachine,
        leaf: Option<Leaf>,
        status: std::process::ExitStatus,
        timed_out: bool,
        started: Instant,
        timeout_ms: u64,
        oom_kills_before: u64,
        pumps: (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>),
        captures: (Arc<Mutex<OutputCapture>>, Arc<Mutex<OutputCapture>>),
    ) -> Result<ExecOutput> {
        use std::os::unix::process::ExitStatusExt;
        let (mut stdout_pump, mut stderr_pump) = pumps;
        let oom_killed = leaf
            .as_ref()
            .is_some_and(|leaf| leaf.oom_kill_count() > oom_kills_before);
        let leaf = leaf.map(Arc::new);
        if !status.success() || timed_out {
            // What a failed command left running is debris (a fork bomb's children, a half
            // started server): kill it so the machine stays usable. A command that succeeds may
            // leave daemons behind on purpose (`start`, `nohup server &`).
            if let Some(leaf) = leaf.clone() {
                tokio::task::spawn_blocking(move || leaf.kill_all()).await.ok();
            }
        }
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
        if let Some(leaf) = leaf {
            // A process the command left running keeps its leaf (and is killed on destroy).
            tokio::task::spawn_blocking(move || leaf.remove_if_empty()).await.ok();
        }
        let (stdout, stdout_truncated, stdout_omitted) = take_capture(&captures.0);
        let (stderr, stderr_truncated, stderr_omitted) = take_capture(&captures.1);
        let killed_reason = if timed_out {
            Some(KilledReason::Timeout { limit_ms: timeout_ms })
        } else if oom_killed && !status.success() {
            Some(KilledReason::OutOfMemory {
                limit_bytes: machine.limits.memory_bytes,
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
