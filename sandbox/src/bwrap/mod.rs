//! The bubblewrap driver.
//!
//! A machine is one long-lived bubblewrap process (new mount, PID, IPC, UTS, network and cgroup
//! namespaces inside a user namespace the node made, whose ids map onto a host id range of the
//! machine's own, see `uid_range`; all capabilities dropped; `--die-with-parent`) whose command
//! is an init that only waits. Its root is an overlay the driver mounts beforehand — bubblewrap
//! 0.8 has no `--overlay` — in a mount namespace of the machine's own, where bubblewrap starts, so
//! that the node's mount table does not grow with its machines; with the install layer and the base image as lower layers and the
//! machine's upper layer on a size-limited filesystem; `/workspace` is a second overlay with the
//! caller's checkout as its lower layer. Commands enter the running machine's namespaces, root
//! and ids from the node's own child between fork and exec ([`enter`]: one program launch per
//! command); terminal attaches, which their caller spawns, go through `nsenter` and `setpriv` to
//! the same end state. All share one process tree, one loopback network and one set of files.
//! Every process of a machine sits in its cgroup (memory, pids, cpu), each command in a leaf of
//! its own so that a timeout kills the command's whole tree and nothing else.
//!
//! The module follows a machine's life: [`config`] (what the driver is given), [`create`]
//! (layers, cgroup, the bubblewrap command, waiting for the init), [`machine`] (the running
//! machine and what it holds), [`enter`] (how a process joins it), [`exec`] (commands inside
//! it), [`terminals`] (tmux and attach), [`capture`] (an install layer) and [`cleanup`]
//! (destroy, and what a previous run of the node left).

mod capture;
mod cleanup;
mod config;
mod create;
mod enter;
mod exec;
mod machine;
mod terminals;

#[cfg(test)]
mod enter_tests;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::cgroup::Cgroups;
use crate::driver::{BaseImage, BaseLayer, ExecOutput, ExecRequest, Layer, MachineDriver, MachineHandle, MachineSpec};
use crate::environment::Terminal;
use crate::error::{Result, SandboxError};
use crate::image;
use crate::pty::{PtySession, PtySize};

pub use cleanup::ReapReport;
pub use config::{cgroup_parent_for, BwrapConfig, DiskBacking};
pub use machine::BwrapMachine;

/// The driver's name in errors about handles it did not make.
const DRIVER_NAME: &str = "bwrap";
const WORKSPACE_DIR: &str = "/workspace";
/// The file in a machine's directory that names its cgroup.
const CGROUP_NAME_FILE: &str = "cgroup";

/// Cheap to clone: clones share the debootstrap lock.
#[derive(Clone)]
pub struct BwrapDriver {
    config: BwrapConfig,
    cgroups: Cgroups,
    debian_lock: Arc<tokio::sync::Mutex<()>>,
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|error| SandboxError::io("create", path, error))
}

fn check_program(path: &Path, hint: &str) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(SandboxError::MissingTool {
            tool: path.display().to_string(),
            hint: hint.to_string(),
        })
    }
}

/// A `spawn_blocking` whose panic or cancellation becomes an error naming `what`.
async fn blocking<T: Send + 'static>(what: &str, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| SandboxError::HostCommand {
            program: what.to_string(),
            detail: error.to_string(),
        })?
}

impl BwrapDriver {
    /// Checks the tools, detects cgroups, creates the directories and tears down whatever a
    /// previous run of the node left under `root` and its cgroup parent (processes, mounts,
    /// cgroups, directories). Blocking: it can wait seconds for killed processes to go.
    pub fn new(config: BwrapConfig) -> Result<Self> {
        let driver = BwrapDriver::new_unreaped(config)?;
        let reaped = driver.reap_blocking();
        if reaped != cleanup::ReapReport::default() {
            tracing::info!(?reaped, "removed what a previous run of the node left");
        }
        Ok(driver)
    }

    /// Like [`BwrapDriver::new`] without the sweep of an earlier life: for a node that reaps
    /// in the background ([`BwrapDriver::reap_blocking`]) and starts no machine before it is
    /// done (the sweep would take the new machines for old ones).
    // Unsafe: geteuid(2), to refuse early without root; std has no safe wrapper.
    #[allow(unsafe_code)]
    pub fn new_unreaped(config: BwrapConfig) -> Result<Self> {
        check_program(
            &config.bwrap_program,
            "apt-get install bubblewrap, or run scripts/setup",
        )?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Unsupported {
                what: "running without root (layer mounts and cgroups need it)".to_string(),
            });
        }
        let cgroups = Cgroups::detect(&config.cgroup_parent)?;
        // `snapshots` holds the install layers; it keeps its old name so that a node's existing
        // layers are found after an upgrade.
        for dir in ["images", "machines", "snapshots"] {
            create_dir(&config.root.join(dir))?;
        }
        Ok(BwrapDriver {
            config,
            cgroups,
            debian_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The emptied machine cgroups kept for the next machines.
    pub fn pooled_cgroup_names(&self) -> Vec<String> {
        self.cgroups.pooled_names()
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    /// Where install layers live, for the install layer cache.
    pub fn install_layers_dir(&self) -> PathBuf {
        self.config.root.join("snapshots")
    }

    fn machines_dir(&self) -> PathBuf {
        self.config.root.join("machines")
    }

    pub fn cgroup_version(&self) -> &'static str {
        match self.cgroups.version() {
            crate::cgroup::Version::V1 => "v1",
            crate::cgroup::Version::V2 => "v2",
        }
    }

    /// The bubblewrap machine behind a handle this driver made.
    pub fn machine<'a>(&self, handle: &'a MachineHandle) -> Result<&'a BwrapMachine> {
        handle.machine_of::<BwrapMachine>(DRIVER_NAME)
    }
}

#[async_trait]
impl MachineDriver for BwrapDriver {
    async fn prepare_base(&self, image: BaseImage) -> Result<BaseLayer> {
        let root = self.config.root.clone();
        match image {
            BaseImage::Host => tokio::task::spawn_blocking(move || image::prepare_host(&root))
                .await
                .map_err(|error| SandboxError::ImageNotPrepared {
                    image: "host".into(),
                    detail: error.to_string(),
                })?,
            BaseImage::Debian => {
                let _guard = self.debian_lock.lock().await;
                image::prepare_debian(&root).await
            }
        }
    }

    async fn create(&self, spec: MachineSpec) -> Result<MachineHandle> {
        let machine = self.create_machine(spec).await?;
        let id = machine.id().to_string();
        let workspace_path = machine.workspace_path().to_path_buf();
        Ok(MachineHandle::new(id, workspace_path, machine))
    }

    async fn exec(&self, machine: &MachineHandle, request: ExecRequest) -> Result<ExecOutput> {
        self.exec_in(self.machine(machine)?, request).await
    }

    async fn capture_layer(&self, machine: &MachineHandle, dest: &Path) -> Result<Layer> {
        capture::capture_layer(self.machine(machine)?, dest).await
    }

    async fn destroy(&self, machine: &MachineHandle) -> Result<()> {
        cleanup::destroy(self.machine(machine)?).await
    }

    async fn destroy_all(&self) -> Result<usize> {
        let reaped = self.reap_all().await?;
        let cgroups = self.cgroups.clone();
        blocking("remove the node's cgroup parent", move || {
            cgroups.remove_parent();
            Ok(())
        })
        .await?;
        Ok(reaped.machine_dirs + reaped.orphan_cgroups)
    }

    async fn start_terminals(&self, machine: &MachineHandle, terminals: &[Terminal]) -> Result<()> {
        self.start_terminals_in(self.machine(machine)?, terminals).await
    }

    async fn read_terminal(&self, machine: &MachineHandle, name: &str, max_lines: usize) -> Result<String> {
        self.read_terminal_in(self.machine(machine)?, name, max_lines).await
    }

    async fn open_pty(
        &self,
        machine: &MachineHandle,
        terminal: Option<&str>,
        read_only: bool,
        size: PtySize,
    ) -> Result<PtySession> {
        self.open_pty_in(self.machine(machine)?, terminal, read_only, size)
            .await
    }
}
