//! The machines of a node: the driver (any [`MachineDriver`], behind a trait object), the
//! install layer cache, the base images, and one [`MachineActor`] per running machine.
//! `provision` is the path from an assigned agent to a booted machine: workspace from the
//! repository mirror, environment.json, install layer, egress proxy, then the machine actor, which
//! creates the machine and runs `start` and the terminals.

mod actor;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flotilla_raft::{AgentRecord, Epoch};
use flotilla_sandbox::bwrap::ReapReport;
use flotilla_sandbox::egress::{EgressLimits, EgressPolicy, EgressProxy};
use flotilla_sandbox::environment::{self, EnvironmentConfig, Terminal};
use flotilla_sandbox::install_layer::{InstallLayerCache, InstallRequest};
use flotilla_sandbox::{
    BaseImage, BaseLayer, BwrapConfig, BwrapDriver, DiskBacking, Layer, MachineDriver, MachineLimits, MachineSpec,
    SandboxError,
};
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};

use crate::repo::{RepoError, RepoMsg, Workspace};

pub use actor::{
    find_machine_actor, machine_actor_name, release_machine, running_machine, MachineActor, MachineArgs, MachineMsg,
    RunningMachine, MACHINE_STOP_TIMEOUT,
};

/// The terminal every machine has, first, for a user who attaches without naming one.
pub const SHELL_TERMINAL: &str = "shell";
/// Machines booting at once on a node. A burst of agents past this waits for a turn rather
/// than starting every machine together: with hundreds at once on a small host each boot
/// slowed past its init deadline and failed (see docs/performance.md, "Provisioning").
pub const MAX_CONCURRENT_MACHINE_BOOTS: usize = 16;
/// Where, inside a machine with an egress allowlist, HTTP(S) clients find the proxy.
pub const MACHINE_PROXY_ADDRESS: &str = "127.0.0.1:3128";

#[derive(Debug, Clone)]
pub struct MachineSettings {
    pub base_image: BaseImage,
    pub limits: MachineLimits,
    pub install_timeout_ms: u64,
    /// What holds a machine's writable layers (and so enforces `limits.disk_bytes`).
    pub disk_backing: DiskBacking,
    /// The host ids machines run as.
    pub uid_ranges: flotilla_sandbox::uid_range::UidRangeConfig,
}

impl Default for MachineSettings {
    fn default() -> Self {
        MachineSettings {
            base_image: BaseImage::Host,
            limits: MachineLimits::default(),
            install_timeout_ms: flotilla_sandbox::install_layer::DEFAULT_INSTALL_TIMEOUT_MS,
            disk_backing: DiskBacking::default(),
            uid_ranges: flotilla_sandbox::uid_range::UidRangeConfig::default(),
        }
    }
}

/// What provisioning reports.
pub struct Provisioned {
    pub machine: Arc<RunningMachine>,
    /// The machine's actor; stopping it destroys the machine.
    pub actor: ActorRef<MachineMsg>,
    pub workspace: Workspace,
    pub install_layer_built: bool,
    /// The machine stands on an install layer (built now or earlier).
    pub install_layer_used: bool,
    pub elapsed_ms: u64,
    /// Replaces the values of the secrets the machine got (and the node's own).
    pub redactor: crate::secrets::Redactor,
    /// What the machine got, for renewing its session credentials (see
    /// [`crate::secrets::RenewableCredentials`]).
    pub secrets: Box<crate::secrets::SecretValues>,
}

pub struct MachineHost {
    driver: Arc<dyn MachineDriver>,
    install_layers: InstallLayerCache,
    settings: MachineSettings,
    bases: tokio::sync::Mutex<HashMap<BaseImage, BaseLayer>>,
    workspaces_dir: PathBuf,
    egress_dir: PathBuf,
    pub repos_dir: PathBuf,
    /// True once what an earlier life of the node left is gone; machines start only then.
    reaped: tokio::sync::watch::Receiver<bool>,
    /// [`MAX_CONCURRENT_MACHINE_BOOTS`] permits, one held by each machine while it boots.
    boots: tokio::sync::Semaphore,
}

/// What an earlier life of the node left (machines, cgroups, mounts, workspaces), to be swept
/// by [`EarlierLife::reap`] while the node already serves; the host it came with starts no
/// machine until the sweep is over.
pub struct EarlierLife {
    driver: BwrapDriver,
    workspaces_dir: PathBuf,
    reaped: tokio::sync::watch::Sender<bool>,
}

impl EarlierLife {
    /// Kills and removes everything the earlier life left, then lets the host start machines.
    /// Blocking (it waits for killed processes and cgroup drains): call it off the runtime.
    pub fn reap(self) -> ReapReport {
        let report = self.driver.reap_blocking();
        remove_workspaces(&self.workspaces_dir);
        self.reaped.send_replace(true);
        report
    }
}

fn remove_workspaces(workspaces_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(workspaces_dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Repository(#[from] RepoError),
    #[error(transparent)]
    Environment(#[from] flotilla_sandbox::EnvironmentError),
    #[error("{0}")]
    Machine(#[from] SandboxError),
    #[error("agent {agent} is not in the replicated state")]
    NotInState { agent: flotilla_raft::AgentId },
    #[error("the agent's secrets could not be opened: {0}")]
    Secrets(String),
    #[error("no repository actor: {0}")]
    NoRepositoryActor(String),
    #[error("the repository actor did not answer: {0}")]
    RepositoryActor(String),
    #[error("the machine actor did not start: {0}")]
    MachineActor(String),
    #[error("egress proxy: {0}")]
    Egress(String),
    #[error("egress proxy: the egress forwarder did not start: {detail}")]
    EgressForwarder { detail: String },
    #[error(
        "the clean-up of the machines an earlier run of the node left did not finish; no machine starts on this node"
    )]
    EarlierLifeNotReaped,
    /// Credentials made for the run from the secrets (an AWS role's session) failed.
    #[error("{0}")]
    RunCredentials(String),
}

impl MachineHost {
    /// Opens the machine root under `data_dir/machines` with the bubblewrap driver, killing and
    /// removing the machines, cgroups and mounts a previous run of the node left behind.
    /// Blocking (the reaping waits for killed processes): call it off the async runtime.
    pub fn open(data_dir: &Path, settings: MachineSettings) -> Result<MachineHost, SandboxError> {
        let mut config = BwrapConfig::new(data_dir.join("machines"));
        config.disk = settings.disk_backing;
        config.uid_ranges = settings.uid_ranges.clone();
        let driver = BwrapDriver::new(config)?;
        let install_layers_dir = driver.install_layers_dir();
        MachineHost::with_driver(Arc::new(driver), &install_layers_dir, data_dir, settings)
    }

    /// Like [`MachineHost::open`], but what an earlier run left is swept later by the returned
    /// [`EarlierLife`] (the sweep can take seconds per machine); until then `provision` waits.
    /// Quick: directories and cgroup checks only.
    pub fn open_unreaped(
        data_dir: &Path,
        settings: MachineSettings,
    ) -> Result<(MachineHost, EarlierLife), SandboxError> {
        let mut config = BwrapConfig::new(data_dir.join("machines"));
        config.disk = settings.disk_backing;
        let driver = BwrapDriver::new_unreaped(config)?;
        let install_layers_dir = driver.install_layers_dir();
        let (reaped, reaped_watch) = tokio::sync::watch::channel(false);
        let mut host = MachineHost::unswept(Arc::new(driver.clone()), &install_layers_dir, data_dir, settings)?;
        host.reaped = reaped_watch;
        let earlier_life = EarlierLife {
            driver,
            workspaces_dir: host.workspaces_dir.clone(),
            reaped,
        };
        Ok((host, earlier_life))
    }

    /// A host on any driver: workspaces, repository mirrors and egress sockets go under
    /// `data_dir`, install layers under `install_layers_dir`.
    pub fn with_driver(
        driver: Arc<dyn MachineDriver>,
        install_layers_dir: &Path,
        data_dir: &Path,
        settings: MachineSettings,
    ) -> Result<MachineHost, SandboxError> {
        let host = MachineHost::unswept(driver, install_layers_dir, data_dir, settings)?;
        // Workspaces of machines that no longer exist.
        remove_workspaces(&host.workspaces_dir);
        Ok(host)
    }

    fn unswept(
        driver: Arc<dyn MachineDriver>,
        install_layers_dir: &Path,
        data_dir: &Path,
        settings: MachineSettings,
    ) -> Result<MachineHost, SandboxError> {
        let install_layers = InstallLayerCache::new(driver.clone(), install_layers_dir)?;
        let workspaces_dir = data_dir.join("workspaces");
        let repos_dir = data_dir.join("repos");
        let egress_dir = data_dir.join("egress");
        for dir in [&workspaces_dir, &repos_dir, &egress_dir] {
            std::fs::create_dir_all(dir).map_err(|error| SandboxError::io("create a directory", dir, error))?;
        }
        Ok(MachineHost {
            driver,
            install_layers,
            settings,
            bases: tokio::sync::Mutex::new(HashMap::new()),
            workspaces_dir,
            egress_dir,
            repos_dir,
            reaped: tokio::sync::watch::channel(true).1,
            boots: tokio::sync::Semaphore::new(MAX_CONCURRENT_MACHINE_BOOTS),
        })
    }

    /// Waits until what an earlier life of the node left is gone (at once for a host opened
    /// with the sweep done).
    async fn wait_reaped(&self) -> Result<(), ProvisionError> {
        let mut reaped = self.reaped.clone();
        reaped
            .wait_for(|reaped| *reaped)
            .await
            .map(|_| ())
            .map_err(|_| ProvisionError::EarlierLifeNotReaped)
    }

    /// Destroys every machine of the node, those whose actors have not gone yet included: what
    /// a node does last on a clean stop, so that it leaves no process, cgroup or mount.
    pub async fn shutdown(&self) {
        match self.driver.destroy_all().await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "machines destroyed on shutdown"),
            Err(error) => tracing::warn!(%error, "destroying the machines on shutdown failed"),
        }
        let workspaces_dir = self.workspaces_dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(entries) = std::fs::read_dir(&workspaces_dir) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        })
        .await;
    }

    pub fn driver(&self) -> &Arc<dyn MachineDriver> {
        &self.driver
    }

    pub fn settings(&self) -> &MachineSettings {
        &self.settings
    }

    async fn base(&self) -> Result<BaseLayer, SandboxError> {
        let mut bases = self.bases.lock().await;
        if let Some(base) = bases.get(&self.settings.base_image) {
            return Ok(base.clone());
        }
        let base = self.driver.prepare_base(self.settings.base_image).await?;
        bases.insert(self.settings.base_image, base.clone());
        Ok(base)
    }

    /// Builds and boots the machine of an agent under a [`MachineActor`] linked to `supervisor`
    /// (none: unsupervised, for benchmarks). Nothing is registered for attach until it has
    /// booted; a machine that fails to boot is destroyed before the error is returned.
    #[tracing::instrument(target = "flotilla::trace", name = "machine.start", level = "info", skip_all, fields(agent = %agent.id, epoch = %epoch))]
    pub async fn provision(
        &self,
        repo: &ActorRef<RepoMsg>,
        agent: &AgentRecord,
        epoch: Epoch,
        supervisor: Option<ActorCell>,
        secrets: &crate::secrets::SecretValues,
    ) -> Result<Provisioned, ProvisionError> {
        let started = Instant::now();
        // The sweep of an earlier life would take this machine for one of its own.
        self.wait_reaped().await?;
        // A path of its own per attempt: an earlier attempt's machine may still be going.
        let path = self
            .workspaces_dir
            .join(format!("{}-{}-{}", agent.id, epoch, ulid::Ulid::new()));
        let workspace = prepare_workspace(repo, agent, &path).await?;
        tracing::debug!(agent = %agent.id, %epoch, elapsed_ms = started.elapsed().as_millis() as u64, "workspace prepared");
        let prepared = async {
            let config = load_environment(&workspace.path).await?;
            let base = self.base().await?;
            let (install_layer, install_layer_built) = self.install_layer(agent, &config, &base, &workspace).await?;
            let mut spec = self.machine_spec(agent, base, &workspace, install_layer, &config);
            let egress = self.start_egress(agent, epoch, &mut spec).await?;
            add_secrets(&mut spec.env, secrets);
            Ok::<_, ProvisionError>((config, spec, egress, install_layer_built))
        }
        .await;
        let (config, spec, egress, install_layer_built) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                let _ = tokio::fs::remove_dir_all(&path).await;
                return Err(error);
            }
        };
        let install_layer_used = spec.install_layer.is_some();
        let args = MachineArgs {
            agent: agent.id,
            epoch,
            driver: self.driver.clone(),
            spec,
            boot: with_shell_terminal(config),
            egress,
            workspace_dir: path,
        };
        let actor = {
            // The semaphore is never closed; a closed one would only mean no bound.
            let _boot = self.boots.acquire().await.ok();
            spawn_machine_actor(args, supervisor).await?
        };
        let machine = ractor::call!(actor, MachineMsg::Running)
            .map_err(|error| ProvisionError::MachineActor(error.to_string()))?;
        crate::metrics::record_machine_started(started.elapsed(), install_layer_used.then_some(install_layer_built));
        Ok(Provisioned {
            machine,
            actor,
            workspace,
            install_layer_built,
            install_layer_used,
            elapsed_ms: started.elapsed().as_millis() as u64,
            redactor: secrets.redactor(),
            secrets: Box::new(secrets.clone()),
        })
    }

    /// The install layer the machine stands on (built now when no one has yet), and whether
    /// this call built it.
    async fn install_layer(
        &self,
        agent: &AgentRecord,
        config: &EnvironmentConfig,
        base: &BaseLayer,
        workspace: &Workspace,
    ) -> Result<(Option<Layer>, bool), ProvisionError> {
        if config.install.is_none() {
            return Ok((None, false));
        }
        // Keyed on the tree the node read in its own mirror: another branch's files (another
        // lockfile) never get this layer.
        let mut request = InstallRequest::new(
            &agent.spec.repository,
            &workspace.tree,
            config.clone(),
            base.clone(),
            &workspace.path,
        );
        request.limits.command_timeout_ms = self.settings.install_timeout_ms;
        let install_layer = self.install_layers.get_or_build(&request).await?;
        Ok((install_layer.layer, install_layer.built))
    }

    fn machine_spec(
        &self,
        agent: &AgentRecord,
        base: BaseLayer,
        workspace: &Workspace,
        install_layer: Option<Layer>,
        config: &EnvironmentConfig,
    ) -> MachineSpec {
        let mut spec = MachineSpec::new(agent.id.short(), base, &workspace.path);
        spec.install_layer = install_layer;
        spec.limits = self.settings.limits;
        spec.user = config.user.clone();
        spec.env = vec![
            ("FLOTILLA_AGENT_ID".to_string(), agent.id.to_string()),
            ("FLOTILLA_BRANCH".to_string(), agent.spec.work_branch.clone()),
        ];
        spec
    }

    /// Starts the agent's egress proxy when it has an allowlist, and points the machine at it.
    async fn start_egress(
        &self,
        agent: &AgentRecord,
        epoch: Epoch,
        spec: &mut MachineSpec,
    ) -> Result<Option<EgressProxy>, ProvisionError> {
        if agent.spec.egress_allow.is_empty() {
            return Ok(None);
        }
        let policy = EgressPolicy::from_patterns(&agent.spec.egress_allow)
            .map_err(|error| ProvisionError::Egress(error.to_string()))?;
        let socket = self
            .egress_dir
            .join(format!("{}-{}-{}.sock", agent.id, epoch, ulid::Ulid::new()));
        let proxy = EgressProxy::serve_unix(&socket, policy, EgressLimits::default())
            .await
            .map_err(|error| ProvisionError::Egress(error.to_string()))?;
        spec.egress_socket = Some(socket);
        let proxy_url = format!("http://{MACHINE_PROXY_ADDRESS}");
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"] {
            spec.env.push((name.to_string(), proxy_url.clone()));
        }
        Ok(Some(proxy))
    }
}

/// The secrets as environment variables. The machine's own variables (`FLOTILLA_*`, the
/// proxy) win over a secret of the same name, and of two secrets of one name the later (the
/// user's) wins.
fn add_secrets(env: &mut Vec<(String, String)>, secrets: &crate::secrets::SecretValues) {
    let own = env.len();
    for (name, value) in secrets.values.iter().rev() {
        if env.iter().any(|(present, _)| present == name) {
            continue;
        }
        env.push((name.clone(), value.clone()));
    }
    // Secrets in the order given (team, then user), after the machine's own.
    env[own..].reverse();
    for (name, value) in &secrets.plain {
        if !env.iter().any(|(present, _)| present == name) {
            env.push((name.clone(), value.clone()));
        }
    }
}

async fn prepare_workspace(
    repo: &ActorRef<RepoMsg>,
    agent: &AgentRecord,
    path: &Path,
) -> Result<Workspace, ProvisionError> {
    let workspace = ractor::call!(repo, |reply| RepoMsg::PrepareWorkspace {
        base_branch: agent.spec.base_branch.clone(),
        work_branch: agent.spec.work_branch.clone(),
        recorded: agent.pushed_commit.clone(),
        path: path.to_path_buf(),
        requested_at: std::time::Instant::now(),
        reply,
    })
    .map_err(|error| ProvisionError::RepositoryActor(error.to_string()))??;
    Ok(workspace)
}

/// The workspace's environment.json, or the defaults when it has none. Read on a blocking
/// thread: the file is the repository's, and even read safely (no symlink followed, at most
/// 1 MiB) it is file I/O that must not stall the actors' runtime.
async fn load_environment(workspace: &Path) -> Result<EnvironmentConfig, ProvisionError> {
    let workspace = workspace.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || environment::load(&workspace))
        .await
        .map_err(|error| SandboxError::HostCommand {
            program: "environment.json read".to_string(),
            detail: error.to_string(),
        })??;
    Ok(loaded.map(|(_, config)| config).unwrap_or_default())
}

/// The environment's terminals with the interactive shell first (unless it names its own).
fn with_shell_terminal(mut config: EnvironmentConfig) -> EnvironmentConfig {
    if !config.terminals.iter().any(|terminal| terminal.name == SHELL_TERMINAL) {
        let mut shell = Terminal::new(SHELL_TERMINAL, "exec bash -l 2>/dev/null || exec sh -l");
        shell.description = Some("an interactive shell in /workspace".to_string());
        // The command starts a login shell: the one around it need not read the profile too.
        shell.login = false;
        // Alone, it starts when a user or the agent first looks at it.
        shell.on_demand = true;
        config.terminals.insert(0, shell);
    }
    config
}

/// Spawns the machine actor under its registry name, waiting (bounded) for an earlier actor of
/// the same agent and epoch that is still going away, and answers its boot failure as it was.
async fn spawn_machine_actor(
    args: MachineArgs,
    supervisor: Option<ActorCell>,
) -> Result<ActorRef<MachineMsg>, ProvisionError> {
    let name = machine_actor_name(args.agent, args.epoch);
    if let Some(earlier) = ractor::registry::where_is(name.clone()) {
        // A machine of a failed earlier attempt of this epoch: it is being destroyed.
        let _ = earlier.wait(Some(MACHINE_STOP_TIMEOUT)).await;
    }
    let spawned = match supervisor {
        Some(supervisor) => Actor::spawn_linked(Some(name), MachineActor, args, supervisor).await,
        None => Actor::spawn(Some(name), MachineActor, args).await,
    };
    match spawned {
        Ok((actor, _)) => Ok(actor),
        Err(SpawnErr::StartupFailed(error)) => match error.downcast::<ProvisionError>() {
            Ok(error) => Err(*error),
            Err(error) => Err(ProvisionError::MachineActor(error.to_string())),
        },
        Err(error) => Err(ProvisionError::MachineActor(error.to_string())),
    }
}

#[cfg(test)]
mod earlier_life_tests {
    use super::{MachineHost, MachineSettings, ProvisionError};

    /// Machines of this host wait for the sweep of what an earlier life left, which removes a
    /// machine directory and a workspace of that life.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn machines_wait_for_the_sweep_of_an_earlier_life() {
        let data_dir = tempfile::tempdir().unwrap();
        let old_machine = data_dir.path().join("machines/machines/old-machine");
        let old_workspace = data_dir.path().join("workspaces/old-workspace");
        std::fs::create_dir_all(&old_machine).unwrap();
        std::fs::create_dir_all(&old_workspace).unwrap();
        let (host, earlier_life) = MachineHost::open_unreaped(data_dir.path(), MachineSettings::default())
            .expect("a host (bubblewrap, root and cgroups are needed)");
        assert!(old_machine.exists() && old_workspace.exists(), "opening swept at once");
        let mut waiting = Box::pin(host.wait_reaped());
        assert!(
            futures::FutureExt::now_or_never(&mut waiting).is_none(),
            "machines may start before the sweep"
        );
        let report = tokio::task::spawn_blocking(move || earlier_life.reap()).await.unwrap();
        assert_eq!(report.machine_dirs, 1, "{report:?}");
        waiting.await.expect("the sweep is over");
        assert!(!old_machine.exists() && !old_workspace.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sweep_that_never_ends_refuses_machines() {
        let data_dir = tempfile::tempdir().unwrap();
        let (host, earlier_life) = MachineHost::open_unreaped(data_dir.path(), MachineSettings::default())
            .expect("a host (bubblewrap, root and cgroups are needed)");
        drop(earlier_life);
        assert!(matches!(
            host.wait_reaped().await,
            Err(ProvisionError::EarlierLifeNotReaped)
        ));
    }
}
