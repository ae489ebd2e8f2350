//! The `MachineDriver` trait and the types every driver shares.

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::environment::{EnvironmentConfig, Terminal};
use crate::error::{Result, SandboxError};
use crate::limits::{display_bytes, MachineLimits};
use crate::pty::{PtySession, PtySize};

/// The bottom layer of a machine's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseImage {
    /// The node's own `/usr` (read-only) and a filtered copy of its `/etc`: no set-up.
    Host,
    /// A debootstrap'd Debian bookworm with git, build-essential, curl, ca-certificates, tmux.
    Debian,
}

impl BaseImage {
    pub fn name(self) -> &'static str {
        match self {
            BaseImage::Host => "host",
            BaseImage::Debian => "debian",
        }
    }
}

impl fmt::Display for BaseImage {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for BaseImage {
    type Err = SandboxError;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "host" => Ok(BaseImage::Host),
            "debian" => Ok(BaseImage::Debian),
            other => Err(SandboxError::UnknownBaseImage {
                found: other.to_string(),
            }),
        }
    }
}

/// A prepared base image, ready to be the lowest layer of machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseLayer {
    pub image: BaseImage,
    /// The root filesystem tree (for `host`, a skeleton whose `/usr` is bound from the node).
    pub rootfs: PathBuf,
    /// Host directories bound read-only at the same path in every machine (`/usr` for `host`).
    pub host_read_only_binds: Vec<PathBuf>,
    /// What changes when the image is rebuilt (an id written when it was built; for `host`,
    /// also the state of the node's packages, whose `/usr` machines see): part of the install
    /// layer's key, so a rebuilt image never stands under a layer installed on the old one.
    pub identity: String,
}

/// A read-only layer captured from a machine: `root/` is the upper layer of `/`, `workspace/`
/// the upper layer of `/workspace` (what `install` wrote there, e.g. `node_modules`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub path: PathBuf,
}

impl Layer {
    pub fn root_dir(&self) -> PathBuf {
        self.path.join("root")
    }

    pub fn workspace_dir(&self) -> PathBuf {
        self.path.join("workspace")
    }
}

/// How the caller's checkout becomes `/workspace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceMode {
    /// The checkout is a read-only lower layer (above the install layer's `workspace/`); the machine's
    /// changes go to its own upper layer, count against `disk_bytes`, and are visible on the node
    /// at `workspace_path()` while the machine exists. Many machines can share one checkout,
    /// which must not change while any of them runs (overlayfs does not allow it).
    #[default]
    Overlay,
    /// The checkout is bound read-write: changes land in it directly and outlive the machine,
    /// but are not limited by `disk_bytes` and the install layer's `workspace/` is not applied.
    Bind,
}

/// Everything needed to create one machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// A label for logs and the machine's hostname; the driver adds a unique id.
    pub name: String,
    pub base: BaseLayer,
    /// The install layer to stack on the base, if the environment has an `install`.
    pub install_layer: Option<Layer>,
    /// The checkout the caller prepared. It must be self-contained (a plain clone, not a
    /// `git worktree` whose `.git` points outside it): nothing else of the node is visible.
    pub workspace: PathBuf,
    pub workspace_mode: WorkspaceMode,
    pub env: Vec<(String, String)>,
    pub limits: MachineLimits,
    /// `None` runs as root inside the machine (which holds no capabilities).
    pub user: Option<String>,
    /// A Unix socket of the node's egress proxy, bound at [`EGRESS_SOCKET_PATH`] in the machine.
    pub egress_socket: Option<PathBuf>,
}

/// Where `MachineSpec::egress_socket` appears inside a machine.
pub const EGRESS_SOCKET_PATH: &str = "/run/flotilla/egress.sock";
/// The tmux session that holds a machine's terminals.
pub const TERMINAL_SESSION: &str = "flotilla";

impl MachineSpec {
    pub fn new(name: impl Into<String>, base: BaseLayer, workspace: impl Into<PathBuf>) -> Self {
        MachineSpec {
            name: name.into(),
            base,
            install_layer: None,
            workspace: workspace.into(),
            workspace_mode: WorkspaceMode::Overlay,
            env: Vec::new(),
            limits: MachineLimits::default(),
            user: None,
            egress_socket: None,
        }
    }
}

/// One command to run in a machine, through `sh -lc`. Processes it leaves running in the
/// background survive it if it succeeds (a daemon started on purpose) and are killed if it
/// fails, times out or is killed (debris such as a fork bomb's children).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: String,
    /// Working directory inside the machine; `/workspace` when `None`.
    pub cwd: Option<String>,
    pub env: Vec<(String, String)>,
    /// Overrides the machine's `command_timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// Overrides the machine's `max_output_bytes` (per stream).
    pub max_output_bytes: Option<u64>,
}

impl ExecRequest {
    pub fn new(command: impl Into<String>) -> Self {
        ExecRequest {
            command: command.into(),
            cwd: None,
            env: Vec::new(),
            timeout_ms: None,
            max_output_bytes: None,
        }
    }

    pub fn with_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }

    pub fn with_max_output_bytes(mut self, max_output_bytes: u64) -> Self {
        self.max_output_bytes = Some(max_output_bytes);
        self
    }

    pub fn with_cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Why a command ended badly that is the machine's limits' doing, not the command's own: the
/// driver killed it (time), the kernel did (memory), or a limit stopped it (disk, processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KilledReason {
    /// The wall-clock limit passed; every process the command started was killed.
    Timeout { limit_ms: u64 },
    /// The machine's memory limit was reached and the kernel killed a process of the command.
    OutOfMemory { limit_bytes: u64 },
    /// The machine's disk (its writable layers) was full when the command failed.
    DiskFull { limit_bytes: u64 },
    /// A process of the command could not fork past the machine's process limit; what the
    /// command left running was killed.
    ProcessLimit { limit: u64 },
}

impl fmt::Display for KilledReason {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        match self {
            KilledReason::Timeout { limit_ms } => write!(formatter, "killed after the time limit of {limit_ms} ms"),
            KilledReason::OutOfMemory { limit_bytes } => write!(
                formatter,
                "out of memory: killed at the machine's memory limit of {}",
                display_bytes(*limit_bytes)
            ),
            KilledReason::DiskFull { limit_bytes } => {
                write!(formatter, "disk limit {} reached", display_bytes(*limit_bytes))
            }
            KilledReason::ProcessLimit { limit } => write!(formatter, "process limit {limit} reached"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when the command was ended by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// At most the output limit: the first half and the last half of the budget when truncated.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Bytes left out of stdout and stderr together.
    pub omitted_bytes: u64,
    pub timed_out: bool,
    pub killed_reason: Option<KilledReason>,
    pub duration_ms: u64,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.killed_reason.is_none()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// "exit code 2", "signal 9", or the kill reason: for error messages.
    pub fn outcome(&self) -> String {
        if let Some(reason) = self.killed_reason {
            return reason.to_string();
        }
        match (self.exit_code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "no exit status".to_string(),
        }
    }

    /// The last `count` lines of stdout followed by stderr, for error messages.
    pub fn last_lines(&self, count: usize) -> String {
        let mut combined = self.stdout_text();
        if !self.stderr.is_empty() {
            if !combined.is_empty() && !combined.ends_with('\n') {
                combined.push('\n');
            }
            combined.push_str(&self.stderr_text());
        }
        last_lines(&combined, count)
    }
}

pub(crate) fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].join("\n")
}

/// A machine made by some driver, as the rest of the node holds it: its id, its workspace as
/// the node sees it, and the driver's own machine behind an opaque pointer. Only the driver that
/// made a handle can use it (each driver downcasts to its own machine type and refuses others
/// with [`SandboxError::ForeignMachine`]); this keeps [`MachineDriver`] object-safe, so that the
/// actors hold an `Arc<dyn MachineDriver>` and never name a concrete driver.
///
/// Clones share one machine. Dropping the last clone tears the machine down the way the driver's
/// own machine type does on drop; call [`MachineDriver::destroy`] to do it at a known moment.
#[derive(Clone)]
pub struct MachineHandle {
    id: Arc<str>,
    workspace_path: Arc<Path>,
    machine: Arc<dyn Any + Send + Sync>,
}

impl MachineHandle {
    /// Wraps a driver's machine. `workspace_path` is the machine's `/workspace` as seen from the
    /// node (read it, or run git in it, while the machine exists).
    pub fn new<M: Any + Send + Sync>(id: impl Into<Arc<str>>, workspace_path: impl Into<PathBuf>, machine: M) -> Self {
        MachineHandle {
            id: id.into(),
            workspace_path: Arc::from(workspace_path.into().into_boxed_path()),
            machine: Arc::new(machine),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The machine's `/workspace` as seen from the node.
    pub fn workspace_path(&self) -> &Path {
        &self.workspace_path
    }

    /// The driver's own machine, if this handle holds an `M`.
    pub fn downcast_ref<M: Any>(&self) -> Option<&M> {
        self.machine.downcast_ref::<M>()
    }

    /// The driver's own machine, or [`SandboxError::ForeignMachine`] naming `driver`.
    pub fn machine_of<M: Any>(&self, driver: &'static str) -> Result<&M> {
        self.downcast_ref::<M>().ok_or_else(|| SandboxError::ForeignMachine {
            machine: self.id.to_string(),
            driver,
        })
    }
}

impl fmt::Debug for MachineHandle {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter
            .debug_struct("MachineHandle")
            .field("id", &self.id)
            .field("workspace_path", &self.workspace_path)
            .finish_non_exhaustive()
    }
}

/// Creates, runs and tears down machines. A machine is a set of processes sharing one set of
/// namespaces, one filesystem (base → install layer → per-machine upper) and one cgroup. The trait is
/// object-safe: machines are [`MachineHandle`]s.
#[async_trait]
pub trait MachineDriver: Send + Sync + 'static {
    /// Makes a base image usable (idempotent; `host` is cheap, `debian` runs debootstrap once).
    async fn prepare_base(&self, image: BaseImage) -> Result<BaseLayer>;

    async fn create(&self, spec: MachineSpec) -> Result<MachineHandle>;

    async fn exec(&self, machine: &MachineHandle, request: ExecRequest) -> Result<ExecOutput>;

    /// Stops the machine's processes (only disk state is kept) and copies its upper layers to
    /// `dest`, which must not exist, as a read-only [`Layer`]. The machine cannot run commands
    /// afterwards; `destroy` still has to be called.
    async fn capture_layer(&self, machine: &MachineHandle, dest: &Path) -> Result<Layer>;

    /// Kills every process, unmounts the layers, removes the cgroup and the per-machine files.
    /// Idempotent.
    async fn destroy(&self, machine: &MachineHandle) -> Result<()>;

    /// Kills and removes every machine of this driver, those a handle still holds included:
    /// for a node that stops and must leave none behind. Answers how many were removed.
    async fn destroy_all(&self) -> Result<usize>;

    /// Starts the tmux session [`TERMINAL_SESSION`] with one window per terminal.
    async fn start_terminals(&self, machine: &MachineHandle, terminals: &[Terminal]) -> Result<()>;

    /// The last `max_lines` lines a terminal printed (its scrollback and screen).
    async fn read_terminal(&self, machine: &MachineHandle, name: &str, max_lines: usize) -> Result<String>;

    /// Attaches to the machine's tmux session (at `terminal`'s window, or the first; a viewer
    /// `read_only`) through a new pseudo-terminal whose bytes a gRPC stream can pump, with
    /// resize.
    async fn open_pty(
        &self,
        machine: &MachineHandle,
        terminal: Option<&str>,
        read_only: bool,
        size: PtySize,
    ) -> Result<PtySession>;
}

/// What booting a machine did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootReport {
    pub start: Option<ExecOutput>,
    pub terminals_started: usize,
}

/// Runs an environment's `start` command, then its terminals: what happens on every boot.
pub async fn boot(
    driver: &dyn MachineDriver,
    machine: &MachineHandle,
    config: &EnvironmentConfig,
) -> Result<BootReport> {
    let start = match &config.start {
        Some(start) => {
            let output = driver
                .exec(machine, ExecRequest::new(format!("exec 2>&1\n{start}")))
                .await?;
            if !output.success() {
                return Err(SandboxError::StartFailed {
                    outcome: output.outcome(),
                    last_lines: output.last_lines(20),
                });
            }
            Some(output)
        }
        None => None,
    };
    if !config.terminals.is_empty() {
        driver.start_terminals(machine, &config.terminals).await?;
    }
    Ok(BootReport {
        start,
        terminals_started: config.terminals.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_image_names_round_trip() {
        for image in [BaseImage::Host, BaseImage::Debian] {
            assert_eq!(image.name().parse::<BaseImage>().unwrap(), image);
        }
        let error = "alpine".parse::<BaseImage>().unwrap_err().to_string();
        assert!(error.contains("\"alpine\""), "{error}");
    }

    #[test]
    fn last_lines_takes_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn outcome_prefers_the_kill_reason() {
        let output = ExecOutput {
            exit_code: None,
            signal: Some(9),
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            omitted_bytes: 0,
            timed_out: true,
            killed_reason: Some(KilledReason::Timeout { limit_ms: 5 }),
            duration_ms: 5,
        };
        assert_eq!(output.outcome(), "killed after the time limit of 5 ms");
        assert!(!output.success());
    }
}
