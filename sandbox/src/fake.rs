//! A machine driver for tests that cannot be root: no namespaces, no mounts, no cgroups.
//!
//! A fake machine is a directory: `root/` stands for its root upper layer (it holds `HOME` and
//! `TMPDIR`), `workspace/` is a copy of the checkout (the overlay's upper view: the checkout
//! itself never changes) or, in [`WorkspaceMode::Bind`], the checkout itself. Commands run on
//! the node as the node's user with `sh -c`, in a process group of their own, with the request's
//! environment, working directory, wall-clock limit and output limit honoured as the bubblewrap
//! driver honours them (the same head-and-tail capture; a command that fails or times out has
//! its process group killed, one that succeeds may leave daemons behind until `destroy`).
//! Memory, process and disk limits are not enforced, and nothing is isolated: **never use it to
//! run code you do not trust**. It is compiled only for tests and behind the `fake` feature.
//!
//! The tools and the turn loop address the machine as `/workspace`. The fake maps that path, so
//! that their scripts run unchanged: in a command, its working directory and its environment
//! values, `/workspace` (as a whole path component) becomes the machine's workspace directory;
//! in the output, the workspace directory becomes `/workspace` again.
//!
//! Terminals are child processes (`sh -c COMMAND` in the workspace) writing to a log file each;
//! `read_terminal` reads the log's last lines. Attaching runs `tail -f` on the log for a viewer
//! and an interactive `sh` in the workspace for a take-over.

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::driver::{
    last_lines, BaseImage, BaseLayer, ExecOutput, ExecRequest, KilledReason, Layer, MachineDriver, MachineHandle,
    MachineSpec, WorkspaceMode,
};
use crate::environment::Terminal;
use crate::error::{Result, SandboxError};
use crate::limits::MachineLimits;
use crate::output_capture::{pump, take_capture, OutputCapture, MAX_OUTPUT_BYTES_CEILING};
use crate::pty::{PtySession, PtySize};

const DRIVER_NAME: &str = "fake";
/// The path the tools use for the workspace inside a machine.
const MACHINE_WORKSPACE: &str = "/workspace";
/// How long output pipes may outlive a command (held by a background process it left).
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Lines of a terminal's log a viewer sees when it attaches.
const ATTACH_BACKLOG_LINES: usize = 200;

/// Makes fake machines under `root`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FakeDriver {
    root: PathBuf,
}

/// One fake machine. Dropping it kills its processes and removes its directory, as `destroy`.
pub struct FakeMachine {
    id: String,
    dir: PathBuf,
    /// The canonical path of the machine's `/workspace` on the node.
    workspace: PathBuf,
    /// Whether `workspace` is the caller's checkout (bound), which destroy must leave in place.
    workspace_is_checkout: bool,
    base_env: Vec<(String, String)>,
    limits: MachineLimits,
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    /// Why the machine stopped running commands, once it has.
    stopped: Option<String>,
    /// Process groups of every command and terminal, killed when the machine stops.
    process_groups: Vec<i32>,
    terminals: Vec<FakeTerminal>,
}

struct FakeTerminal {
    name: String,
    log: PathBuf,
    process: std::process::Child,
}

impl FakeDriver {
    /// A driver keeping its machines, images and install layers under `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        // The same names as the bubblewrap driver's (install layers in `snapshots`).
        for dir in ["images", "machines", "snapshots"] {
            create_dir(&root.join(dir))?;
        }
        Ok(FakeDriver { root })
    }

    /// Where install layers live, for the install layer cache.
    pub fn install_layers_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The fake machine behind a handle this driver made.
    pub fn machine<'a>(&self, handle: &'a MachineHandle) -> Result<&'a FakeMachine> {
        handle.machine_of::<FakeMachine>(DRIVER_NAME)
    }

    fn create_blocking(&self, spec: MachineSpec) -> Result<FakeMachine> {
        spec.limits.validate()?;
        if !spec.workspace.is_dir() {
            return Err(SandboxError::InvalidSpec {
                detail: format!("workspace {} is not a directory", spec.workspace.display()),
            });
        }
        let label: String = spec
            .name
            .chars()
            .map(|character| {
                if character.is_ascii_alphanumeric() {
                    character
                } else {
                    '-'
                }
            })
            .take(24)
            .collect();
        let id = format!("{label}-{}", ulid::Ulid::new().to_string().to_lowercase());
        let dir = self.root.join("machines").join(&id);
        let root_upper = dir.join("root");
        create_dir(&root_upper.join("home"))?;
        create_dir(&root_upper.join("tmp"))?;
        let install_layer = spec.install_layer.as_ref();
        if let Some(layer) = install_layer.filter(|layer| layer.root_dir().is_dir()) {
            copy_tree(&layer.root_dir(), &root_upper)?;
        }
        let (workspace, workspace_is_checkout) = match spec.workspace_mode {
            WorkspaceMode::Overlay => {
                let copy = dir.join("workspace");
                create_dir(&copy)?;
                // The checkout lies above the install layer's `workspace/`, as in the overlay.
                if let Some(layer) = install_layer.filter(|layer| layer.workspace_dir().is_dir()) {
                    copy_tree(&layer.workspace_dir(), &copy)?;
                }
                copy_tree(&spec.workspace, &copy)?;
                (copy, false)
            }
            WorkspaceMode::Bind => (spec.workspace.clone(), true),
        };
        let workspace = workspace
            .canonicalize()
            .map_err(|error| SandboxError::io("resolve", &workspace, error))?;
        let mut base_env = vec![
            (
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_string()),
            ),
            ("HOME".to_string(), root_upper.join("home").display().to_string()),
            ("TMPDIR".to_string(), root_upper.join("tmp").display().to_string()),
            ("SHELL".to_string(), "/bin/sh".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("TERM".to_string(), "xterm-256color".to_string()),
            ("FLOTILLA_MACHINE".to_string(), id.clone()),
        ];
        base_env.extend(spec.env.iter().cloned());
        Ok(FakeMachine {
            id,
            dir,
            workspace,
            workspace_is_checkout,
            base_env,
            limits: spec.limits,
            state: Mutex::new(FakeState::default()),
        })
    }
}

impl FakeMachine {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The machine's directory on the node.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The machine's `/workspace` on the node.
    pub fn workspace_path(&self) -> &Path {
        &self.workspace
    }

    /// `text` with every `/workspace` path component of the machine mapped to the workspace
    /// directory on the node.
    pub fn to_node_paths(&self, text: &str) -> String {
        map_workspace_paths(text, &self.workspace.display().to_string())
    }

    fn to_machine_paths(&self, bytes: Vec<u8>) -> Vec<u8> {
        let node_path = self.workspace.display().to_string();
        match String::from_utf8(bytes) {
            Ok(text) if text.contains(&node_path) => text.replace(&node_path, MACHINE_WORKSPACE).into_bytes(),
            Ok(text) => text.into_bytes(),
            Err(error) => error.into_bytes(),
        }
    }

    fn ensure_running(&self) -> Result<()> {
        match &self.state.lock().expect("fake machine state").stopped {
            Some(reason) => Err(SandboxError::MachineStopped {
                machine: self.id.clone(),
                detail: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Kills every process the machine started; its files stay.
    fn stop(&self, reason: &str) {
        let mut state = self.state.lock().expect("fake machine state");
        for group in state.process_groups.drain(..) {
            kill_process_group(group);
        }
        for terminal in &mut state.terminals {
            let _ = terminal.process.kill();
            let _ = terminal.process.wait();
        }
        state.stopped.get_or_insert_with(|| reason.to_string());
    }

    fn remove_files(&self) -> Result<()> {
        if self.workspace_is_checkout {
            // Only the machine's own directory goes; the bound checkout is the caller's.
            let root = self.dir.join("root");
            if root.exists() {
                std::fs::remove_dir_all(&root).map_err(|error| SandboxError::io("remove", &root, error))?;
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(SandboxError::io("remove", &self.dir, error)),
        }
    }

    fn terminal_log(&self, name: Option<&str>) -> Result<PathBuf> {
        let state = self.state.lock().expect("fake machine state");
        let found = match name {
            None => state.terminals.first(),
            Some(name) => state.terminals.iter().find(|terminal| terminal.name == name),
        };
        found
            .map(|terminal| terminal.log.clone())
            .ok_or_else(|| SandboxError::UnknownTerminal {
                machine: self.id.clone(),
                terminal: name.unwrap_or("(any)").to_string(),
            })
    }

    /// A `sh -c` of `command` in `cwd` (a node path) with the machine's environment, in a
    /// process group of its own.
    fn shell(&self, command: &str, cwd: &Path, env: &[(String, String)]) -> tokio::process::Command {
        let mut shell = tokio::process::Command::new("/bin/sh");
        shell.arg("-c").arg(command).current_dir(cwd).env_clear();
        for (key, value) in self.base_env.iter().chain(env) {
            shell.env(key, self.to_node_paths(value));
        }
        shell.process_group(0);
        shell
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput> {
        self.ensure_running()?;
        let started = Instant::now();
        let cwd = PathBuf::from(self.to_node_paths(request.cwd.as_deref().unwrap_or(MACHINE_WORKSPACE)));
        let mut command = self.shell(&self.to_node_paths(&request.command), &cwd, &request.env);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|error| SandboxError::io("start", "/bin/sh", error))?;
        let group = child.id().map(|pid| pid as i32);
        if let Some(group) = group {
            self.state
                .lock()
                .expect("fake machine state")
                .process_groups
                .push(group);
        }
        let limit = request
            .max_output_bytes
            .unwrap_or(self.limits.max_output_bytes)
            .min(MAX_OUTPUT_BYTES_CEILING) as usize;
        let captures = (
            Arc::new(Mutex::new(OutputCapture::new(limit))),
            Arc::new(Mutex::new(OutputCapture::new(limit))),
        );
        let mut pumps = (
            tokio::spawn(pump(child.stdout.take().expect("stdout is piped"), captures.0.clone())),
            tokio::spawn(pump(child.stderr.take().expect("stderr is piped"), captures.1.clone())),
        );
        let timeout_ms = request.timeout_ms.unwrap_or(self.limits.command_timeout_ms);
        let (status, timed_out) = match tokio::time::timeout(Duration::from_millis(timeout_ms), child.wait()).await {
            Ok(status) => (
                status.map_err(|error| SandboxError::io("wait for", "/bin/sh", error))?,
                false,
            ),
            Err(_) => {
                if let Some(group) = group {
                    kill_process_group(group);
                }
                let status = child
                    .wait()
                    .await
                    .map_err(|error| SandboxError::io("wait for", "/bin/sh", error))?;
                (status, true)
            }
        };
        if !status.success() || timed_out {
            // What a failed command left running is debris, as in the real driver.
            if let Some(group) = group {
                kill_process_group(group);
            }
        }
        let _ = tokio::time::timeout(OUTPUT_DRAIN_GRACE, async {
            let _ = (&mut pumps.0).await;
            let _ = (&mut pumps.1).await;
        })
        .await;
        Ok(self.output(status, timed_out, timeout_ms, started, &captures))
    }

    fn output(
        &self,
        status: std::process::ExitStatus,
        timed_out: bool,
        timeout_ms: u64,
        started: Instant,
        captures: &(Arc<Mutex<OutputCapture>>, Arc<Mutex<OutputCapture>>),
    ) -> ExecOutput {
        use std::os::unix::process::ExitStatusExt;
        let (stdout, stdout_truncated, stdout_omitted) = take_capture(&captures.0);
        let (stderr, stderr_truncated, stderr_omitted) = take_capture(&captures.1);
        ExecOutput {
            exit_code: status.code(),
            signal: status.signal(),
            stdout: self.to_machine_paths(stdout),
            stderr: self.to_machine_paths(stderr),
            stdout_truncated,
            stderr_truncated,
            omitted_bytes: stdout_omitted + stderr_omitted,
            timed_out,
            killed_reason: timed_out.then_some(KilledReason::Timeout { limit_ms: timeout_ms }),
            duration_ms: started.elapsed().as_millis() as u64,
        }
    }

    fn start_terminals(&self, terminals: &[Terminal]) -> Result<()> {
        self.ensure_running()?;
        let mut names = std::collections::BTreeSet::new();
        if let Some(duplicate) = terminals.iter().find(|terminal| !names.insert(terminal.name.as_str())) {
            return Err(SandboxError::InvalidSpec {
                detail: format!("two terminals are named {:?}", duplicate.name),
            });
        }
        let mut state = self.state.lock().expect("fake machine state");
        if !state.terminals.is_empty() {
            return Err(SandboxError::InvalidSpec {
                detail: format!("machine {} already has its terminals", self.id),
            });
        }
        let logs = self.dir.join("terminals");
        create_dir(&logs)?;
        for (index, terminal) in terminals.iter().enumerate() {
            let log = logs.join(format!("{index}.log"));
            let file = std::fs::File::create(&log).map_err(|error| SandboxError::io("create", &log, error))?;
            let output = file
                .try_clone()
                .map_err(|error| SandboxError::io("duplicate", &log, error))?;
            let mut command = std::process::Command::new("/bin/sh");
            command.arg("-c").arg(self.to_node_paths(&terminal.command));
            command.current_dir(&self.workspace).env_clear();
            for (key, value) in &self.base_env {
                command.env(key, self.to_node_paths(value));
            }
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            command.stdin(Stdio::null()).stdout(output).stderr(file);
            let process = command
                .spawn()
                .map_err(|error| SandboxError::io("start", "/bin/sh", error))?;
            state.process_groups.push(process.id() as i32);
            state.terminals.push(FakeTerminal {
                name: terminal.name.clone(),
                log,
                process,
            });
        }
        Ok(())
    }

    fn read_terminal(&self, name: &str, max_lines: usize) -> Result<String> {
        let log = self.terminal_log(Some(name))?;
        let bytes = std::fs::read(&log).map_err(|error| SandboxError::io("read", &log, error))?;
        let text = String::from_utf8_lossy(&self.to_machine_paths(bytes)).into_owned();
        Ok(last_lines(&text, max_lines.max(1)))
    }

    fn attach_command(&self, terminal: Option<&str>, read_only: bool) -> Result<std::process::Command> {
        self.ensure_running()?;
        let log = self.terminal_log(terminal)?;
        let mut command = std::process::Command::new("/bin/sh");
        if read_only {
            command
                .arg("-c")
                .arg(r#"exec tail -n "$1" -f -- "$2""#)
                .arg("flotilla-attach")
                .arg(ATTACH_BACKLOG_LINES.to_string())
                .arg(log);
        } else {
            command.arg("-i");
        }
        command.current_dir(&self.workspace).env_clear();
        for (key, value) in &self.base_env {
            command.env(key, self.to_node_paths(value));
        }
        Ok(command)
    }

    fn capture_layer(&self, checkout_dest: &Path) -> Result<Layer> {
        {
            let state = self.state.lock().expect("fake machine state");
            if state.stopped.as_deref() == Some("destroyed") {
                return Err(SandboxError::MachineStopped {
                    machine: self.id.clone(),
                    detail: "destroyed".into(),
                });
            }
        }
        self.stop("its layer was captured");
        create_dir(checkout_dest)?;
        copy_tree(&self.dir.join("root"), &checkout_dest.join("root"))?;
        create_dir(&checkout_dest.join("workspace"))?;
        copy_tree(&self.workspace, &checkout_dest.join("workspace"))?;
        crate::layer_privilege::drop_captured_layer_privilege(checkout_dest)?;
        Ok(Layer {
            path: checkout_dest.to_path_buf(),
        })
    }
}

impl Drop for FakeMachine {
    fn drop(&mut self) {
        self.stop("destroyed");
        let _ = self.remove_files();
    }
}

#[async_trait]
impl MachineDriver for FakeDriver {
    async fn prepare_base(&self, image: BaseImage) -> Result<BaseLayer> {
        let rootfs = self.root.join("images").join(image.name());
        create_dir(&rootfs)?;
        Ok(BaseLayer {
            image,
            rootfs,
            host_read_only_binds: Vec::new(),
            identity: format!("fake/{}", image.name()),
        })
    }

    async fn create(&self, spec: MachineSpec) -> Result<MachineHandle> {
        let driver = self.clone();
        let machine = blocking(move || driver.create_blocking(spec)).await?;
        let id = machine.id.clone();
        let workspace = machine.workspace.clone();
        Ok(MachineHandle::new(id, workspace, machine))
    }

    async fn exec(&self, machine: &MachineHandle, request: ExecRequest) -> Result<ExecOutput> {
        self.machine(machine)?.exec(request).await
    }

    async fn capture_layer(&self, machine: &MachineHandle, dest: &Path) -> Result<Layer> {
        if dest.exists() {
            return Err(SandboxError::InvalidSpec {
                detail: format!("layer destination {} already exists", dest.display()),
            });
        }
        let handle = machine.clone();
        let dest = dest.to_path_buf();
        blocking(move || handle.machine_of::<FakeMachine>(DRIVER_NAME)?.capture_layer(&dest)).await
    }

    async fn destroy(&self, machine: &MachineHandle) -> Result<()> {
        let fake = self.machine(machine)?;
        fake.stop("destroyed");
        {
            let mut state = fake.state.lock().expect("fake machine state");
            state.stopped = Some("destroyed".to_string());
        }
        let handle = machine.clone();
        blocking(move || handle.machine_of::<FakeMachine>(DRIVER_NAME)?.remove_files()).await
    }

    /// Removes every fake machine's directory; the processes of a machine whose handle is still
    /// held die with its last handle (the fake keeps no registry of its machines).
    async fn destroy_all(&self) -> Result<usize> {
        let machines = self.root.join("machines");
        blocking(move || {
            let Ok(entries) = std::fs::read_dir(&machines) else {
                return Ok(0);
            };
            let mut removed = 0;
            for entry in entries.flatten() {
                std::fs::remove_dir_all(entry.path())
                    .map_err(|error| SandboxError::io("remove", entry.path(), error))?;
                removed += 1;
            }
            Ok(removed)
        })
        .await
    }

    async fn start_terminals(&self, machine: &MachineHandle, terminals: &[Terminal]) -> Result<()> {
        self.machine(machine)?.start_terminals(terminals)
    }

    async fn read_terminal(&self, machine: &MachineHandle, name: &str, max_lines: usize) -> Result<String> {
        self.machine(machine)?.read_terminal(name, max_lines)
    }

    async fn open_pty(
        &self,
        machine: &MachineHandle,
        terminal: Option<&str>,
        read_only: bool,
        size: PtySize,
    ) -> Result<PtySession> {
        let command = self.machine(machine)?.attach_command(terminal, read_only)?;
        PtySession::spawn(command, size)
    }
}

/// Replaces `/workspace` where it stands as a whole path (at the start of the text or after a
/// character that cannot be part of a longer path, and followed by the end, `/`, or such a
/// character) with `node_path`.
fn map_workspace_paths(text: &str, node_path: &str) -> String {
    let is_path_character =
        |character: char| character.is_ascii_alphanumeric() || matches!(character, '_' | '-' | '.' | '/' | '+');
    let mut mapped = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find(MACHINE_WORKSPACE) {
        let before = rest[..found].chars().next_back().or_else(|| mapped.chars().next_back());
        let after = rest[found + MACHINE_WORKSPACE.len()..].chars().next();
        let starts_path = !before.is_some_and(is_path_character);
        let ends_path = after.is_none_or(|character| character == '/' || !is_path_character(character));
        mapped.push_str(&rest[..found]);
        if starts_path && ends_path {
            mapped.push_str(node_path);
        } else {
            mapped.push_str(MACHINE_WORKSPACE);
        }
        rest = &rest[found + MACHINE_WORKSPACE.len()..];
    }
    mapped.push_str(rest);
    mapped
}

// Unsafe: kill(2) on a process group; std only kills single children.
#[allow(unsafe_code)]
fn kill_process_group(group: i32) {
    // SAFETY: kill has no memory preconditions; a group that is gone answers ESRCH.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|error| SandboxError::io("create", path, error))
}

/// Copies the contents of `from` into `to` (created if missing), keeping modes and links.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    create_dir(to)?;
    let output = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .map_err(|error| SandboxError::io("run cp for", from, error))?;
    if !output.status.success() {
        return Err(SandboxError::HostCommand {
            program: "cp -a".to_string(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| SandboxError::HostCommand {
            program: "fake machine work".to_string(),
            detail: error.to_string(),
        })?
}
