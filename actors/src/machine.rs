//! The machines of a node: the driver, the install-snapshot cache, the base images, and the
//! registry of running machines (one per agent this node owns) that terminal take-over uses.
//! `provision` is the path from an assigned agent to a booted machine: workspace from the
//! repository mirror, environment.json, snapshot, machine, `start`, terminals.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flotilla_raft::{AgentId, AgentRecord, Epoch};
use flotilla_sandbox::egress::{EgressLimits, EgressPolicy, EgressProxy};
use flotilla_sandbox::environment::{self, EnvironmentConfig, Terminal};
use flotilla_sandbox::snapshot::{InstallRequest, SnapshotCache};
use flotilla_sandbox::{
    boot, BaseImage, BaseLayer, BwrapConfig, BwrapDriver, BwrapMachine, ExecRequest, MachineDriver, MachineLimits,
    MachineSpec,
};
use ractor::ActorRef;

use crate::repo::{RepoError, RepoMsg, Workspace};

/// The terminal every machine has, first, for a user who attaches without naming one.
pub const SHELL_TERMINAL: &str = "shell";
/// Where, inside a machine with an egress allowlist, HTTP(S) clients find the proxy.
pub const MACHINE_PROXY_ADDRESS: &str = "127.0.0.1:3128";

#[derive(Debug, Clone)]
pub struct MachineSettings {
    pub base_image: BaseImage,
    pub limits: MachineLimits,
    pub install_timeout_ms: u64,
}

impl Default for MachineSettings {
    fn default() -> Self {
        MachineSettings {
            base_image: BaseImage::Host,
            limits: MachineLimits::default(),
            install_timeout_ms: flotilla_sandbox::snapshot::DEFAULT_INSTALL_TIMEOUT_MS,
        }
    }
}

/// A machine that runs an agent, with what take-over needs to know.
pub struct RunningMachine {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub machine: BwrapMachine,
    pub terminals: Vec<String>,
    /// Set while a user has taken over the terminal; the agent's turn loop waits.
    pub taken_over: AtomicBool,
    /// Attached viewers and controllers.
    pub attached: AtomicUsize,
    /// The machine's way out, when it has an allowlist; stops when the machine goes.
    pub egress: Option<EgressProxy>,
}

/// What provisioning reports.
pub struct Provisioned {
    pub machine: Arc<RunningMachine>,
    pub workspace: Workspace,
    pub snapshot_built: bool,
    /// The machine stands on an install snapshot (built now or earlier).
    pub snapshot_used: bool,
    pub elapsed_ms: u64,
}

pub struct MachineHost {
    pub driver: Arc<BwrapDriver>,
    snapshots: SnapshotCache<BwrapDriver>,
    settings: MachineSettings,
    bases: tokio::sync::Mutex<HashMap<BaseImage, BaseLayer>>,
    workspaces_dir: PathBuf,
    egress_dir: PathBuf,
    pub repos_dir: PathBuf,
    running: Mutex<HashMap<AgentId, Arc<RunningMachine>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Repository(#[from] RepoError),
    #[error(transparent)]
    Environment(#[from] flotilla_sandbox::EnvironmentError),
    #[error("{0}")]
    Machine(#[from] flotilla_sandbox::SandboxError),
    #[error("the repository actor did not answer: {0}")]
    Actor(String),
    #[error("egress proxy: {0}")]
    Egress(String),
}

impl MachineHost {
    /// Opens the machine root under `data_dir/machines` (removing machines a previous run of
    /// the node left behind).
    pub fn open(data_dir: &Path, settings: MachineSettings) -> Result<MachineHost, flotilla_sandbox::SandboxError> {
        let root = data_dir.join("machines");
        let driver = Arc::new(BwrapDriver::new(BwrapConfig::new(&root))?);
        let snapshots = SnapshotCache::new(driver.clone(), driver.snapshots_dir())?;
        let workspaces_dir = data_dir.join("workspaces");
        let repos_dir = data_dir.join("repos");
        let egress_dir = data_dir.join("egress");
        for dir in [&workspaces_dir, &repos_dir, &egress_dir] {
            std::fs::create_dir_all(dir).map_err(|error| {
                flotilla_sandbox::SandboxError::io("create a directory", dir.display().to_string(), error)
            })?;
        }
        // Workspaces of machines that no longer exist.
        if let Ok(entries) = std::fs::read_dir(&workspaces_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(MachineHost {
            driver,
            snapshots,
            settings,
            bases: tokio::sync::Mutex::new(HashMap::new()),
            workspaces_dir,
            egress_dir,
            repos_dir,
            running: Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &MachineSettings {
        &self.settings
    }

    async fn base(&self) -> Result<BaseLayer, flotilla_sandbox::SandboxError> {
        let mut bases = self.bases.lock().await;
        if let Some(base) = bases.get(&self.settings.base_image) {
            return Ok(base.clone());
        }
        let base = self.driver.prepare_base(self.settings.base_image).await?;
        bases.insert(self.settings.base_image, base.clone());
        Ok(base)
    }

    pub fn running(&self, agent: AgentId) -> Option<Arc<RunningMachine>> {
        self.running
            .lock()
            .expect("machine registry poisoned")
            .get(&agent)
            .cloned()
    }

    pub fn running_count(&self) -> usize {
        self.running.lock().expect("machine registry poisoned").len()
    }

    /// Builds and boots the machine of an agent. Nothing is registered until it has booted; a
    /// machine that fails to boot is destroyed before the error is returned.
    pub async fn provision(
        &self,
        repo: &ActorRef<RepoMsg>,
        agent: &AgentRecord,
        epoch: Epoch,
    ) -> Result<Provisioned, ProvisionError> {
        let started = Instant::now();
        let path = self.workspaces_dir.join(format!("{}-{}", agent.id, epoch));
        let workspace = ractor::call!(repo, |reply| RepoMsg::PrepareWorkspace {
            base_branch: agent.spec.base_branch.clone(),
            work_branch: agent.spec.work_branch.clone(),
            path: path.clone(),
            reply,
        })
        .map_err(|error| ProvisionError::Actor(error.to_string()))??;
        tracing::debug!(agent = %agent.id, %epoch, elapsed_ms = started.elapsed().as_millis() as u64, "workspace prepared");
        let config = environment::load(&workspace.path)?
            .map(|(_, config)| config)
            .unwrap_or_else(EnvironmentConfig::default);
        let base = self.base().await?;
        let mut snapshot_built = false;
        let snapshot = if config.install.is_some() {
            let mut request =
                InstallRequest::new(&agent.spec.repository, config.clone(), base.clone(), &workspace.path);
            request.limits.command_timeout_ms = self.settings.install_timeout_ms;
            let snapshot = self.snapshots.get_or_build(&request).await?;
            snapshot_built = snapshot.built;
            snapshot.layer
        } else {
            None
        };
        let snapshot_used = snapshot.is_some();
        let mut spec = MachineSpec::new(agent.id.short(), base, &workspace.path);
        spec.snapshot = snapshot;
        spec.limits = self.settings.limits;
        spec.user = config.user.clone();
        spec.env = vec![
            ("FLOTILLA_AGENT_ID".to_string(), agent.id.to_string()),
            ("FLOTILLA_BRANCH".to_string(), agent.spec.work_branch.clone()),
        ];
        let egress = if agent.spec.egress_allow.is_empty() {
            None
        } else {
            let policy = EgressPolicy::from_patterns(&agent.spec.egress_allow)
                .map_err(|error| ProvisionError::Egress(error.to_string()))?;
            let socket = self.egress_dir.join(format!("{}-{}.sock", agent.id, epoch));
            let proxy = EgressProxy::serve_unix(&socket, policy, EgressLimits::default())
                .await
                .map_err(|error| ProvisionError::Egress(error.to_string()))?;
            spec.egress_socket = Some(socket);
            let proxy_url = format!("http://{MACHINE_PROXY_ADDRESS}");
            for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"] {
                spec.env.push((name.to_string(), proxy_url.clone()));
            }
            Some(proxy)
        };
        let machine = self.driver.create(spec).await?;
        tracing::debug!(agent = %agent.id, %epoch, elapsed_ms = started.elapsed().as_millis() as u64, "machine created");
        if egress.is_some() {
            // The machine has only a loopback interface; a forwarder inside it carries the
            // proxy port to the node's socket. Its daemon outlives this command on purpose.
            let forwarder = format!(
                "nohup socat TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:{} >/dev/null 2>&1 &",
                MACHINE_PROXY_ADDRESS.rsplit(':').next().unwrap_or("3128"),
                flotilla_sandbox::EGRESS_SOCKET_PATH
            );
            let output = self.driver.exec(&machine, ExecRequest::new(forwarder)).await;
            let failed = match output {
                Ok(output) if output.success() => None,
                Ok(output) => Some(format!("the egress forwarder did not start: {}", output.last_lines(5))),
                Err(error) => Some(format!("the egress forwarder did not start: {error}")),
            };
            if let Some(message) = failed {
                let _ = self.driver.destroy(&machine).await;
                return Err(ProvisionError::Egress(message));
            }
        }
        let mut boot_config = config.clone();
        if !boot_config
            .terminals
            .iter()
            .any(|terminal| terminal.name == SHELL_TERMINAL)
        {
            let mut shell = Terminal::new(SHELL_TERMINAL, "exec bash -l 2>/dev/null || exec sh -l");
            shell.description = Some("an interactive shell in /workspace".to_string());
            boot_config.terminals.insert(0, shell);
        }
        if let Err(error) = boot(self.driver.as_ref(), &machine, &boot_config).await {
            let _ = self.driver.destroy(&machine).await;
            return Err(error.into());
        }
        let running = Arc::new(RunningMachine {
            agent: agent.id,
            epoch,
            machine,
            terminals: boot_config
                .terminals
                .iter()
                .map(|terminal| terminal.name.clone())
                .collect(),
            taken_over: AtomicBool::new(false),
            attached: AtomicUsize::new(0),
            egress,
        });
        self.running
            .lock()
            .expect("machine registry poisoned")
            .insert(agent.id, running.clone());
        Ok(Provisioned {
            machine: running,
            workspace,
            snapshot_built,
            snapshot_used,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Destroys an agent's machine and its workspace, if this node runs one.
    pub async fn release(&self, agent: AgentId) {
        let running = self.running.lock().expect("machine registry poisoned").remove(&agent);
        if let Some(running) = running {
            if let Err(error) = self.driver.destroy(&running.machine).await {
                tracing::warn!(%agent, %error, "destroying a machine failed");
            }
            let workspace = self.workspaces_dir.join(format!("{}-{}", agent, running.epoch));
            let _ = tokio::fs::remove_dir_all(workspace).await;
        }
    }

    pub fn taken_over(&self, agent: AgentId) -> bool {
        self.running(agent)
            .map(|running| running.taken_over.load(Ordering::Acquire))
            .unwrap_or(false)
    }
}
