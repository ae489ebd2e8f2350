//! The `MachineActor`: one per machine, owning its lifecycle. `pre_start` creates the machine,
//! starts its egress forwarder and boots it (`start`, then the terminals); a machine that fails
//! there is destroyed before the error is returned. `post_stop` destroys it and removes its
//! workspace. A machine actor that dies without `post_stop` (its handler panicked, or it was
//! killed with its supervisor) still destroys its machine: its state's `Drop` does it.
//!
//! The actor is registered under [`machine_actor_name`] (`machine/<agent>/<epoch>`): that is the
//! node's registry of running machines, where terminal attach finds them. The epoch is part of
//! the name so that a machine of an agent's old epoch that is still being torn down never stands
//! in the way of the next epoch's machine on the same node.
//!
//! Commands of the turn loop do not pass through the mailbox: the actor hands out the
//! [`RunningMachine`] (driver and handle), and a command that runs for ten minutes must neither
//! block the actor nor queue a take-over or a stop behind it. [`MachineMsg::Exec`] is there for
//! callers that hold only the actor; it too runs off the handler.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::{AgentId, Epoch};
use flotilla_sandbox::egress::EgressProxy;
use flotilla_sandbox::environment::EnvironmentConfig;
use flotilla_sandbox::{
    boot, ExecOutput, ExecRequest, MachineDriver, MachineHandle, MachineSpec, PtySession, PtySize, SandboxError,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort};

use super::{ProvisionError, MACHINE_PROXY_ADDRESS};

/// How long a stop waits for a machine actor to destroy its machine.
pub const MACHINE_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A machine that runs an agent, as the turn loop and terminal attach share it. Made and owned
/// by the agent's [`MachineActor`]; once the actor has stopped, the machine is destroyed and
/// every command on it fails.
pub struct RunningMachine {
    pub agent: AgentId,
    pub epoch: Epoch,
    driver: Arc<dyn MachineDriver>,
    handle: MachineHandle,
    /// The terminals' names, the shell first.
    pub terminals: Vec<String>,
    /// Set while a user has taken over the terminal; the agent's turn loop waits.
    taken_over: AtomicBool,
    /// Attached viewers and controllers.
    attached: AtomicUsize,
}

impl RunningMachine {
    pub fn driver(&self) -> &dyn MachineDriver {
        self.driver.as_ref()
    }

    pub fn handle(&self) -> &MachineHandle {
        &self.handle
    }

    /// The machine's `/workspace` as the node sees it (pushes fetch from here).
    pub fn workspace_path(&self) -> &Path {
        self.handle.workspace_path()
    }

    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, SandboxError> {
        self.driver.exec(&self.handle, request).await
    }

    /// Whether a user holds the terminal (the turn loop waits between turns while so).
    pub fn is_taken_over(&self) -> bool {
        self.taken_over.load(Ordering::Acquire)
    }

    /// Takes the terminal over for one user; false when another user holds it.
    pub fn try_take_over(&self) -> bool {
        self.taken_over
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Hands the terminal back to the agent.
    pub fn hand_back(&self) {
        self.taken_over.store(false, Ordering::Release);
    }

    /// Counts a client attached (`true`) or detached (`false`); answers how many are attached.
    pub fn count_attached(&self, attached: bool) -> usize {
        if attached {
            self.attached.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.attached.fetch_sub(1, Ordering::AcqRel) - 1
        }
    }

    /// A pseudo-terminal attached to a terminal of the machine (read-only for a viewer).
    pub async fn open_pty(
        &self,
        terminal: Option<&str>,
        read_only: bool,
        size: PtySize,
    ) -> Result<PtySession, SandboxError> {
        self.driver.open_pty(&self.handle, terminal, read_only, size).await
    }
}

/// The registry name of the machine actor of `agent` under `epoch`.
pub fn machine_actor_name(agent: AgentId, epoch: Epoch) -> String {
    format!("machine/{agent}/{epoch}")
}

/// The machine actor of `agent` under `epoch` on this node, once its machine has booted.
pub fn find_machine_actor(agent: AgentId, epoch: Epoch) -> Option<ActorRef<MachineMsg>> {
    let cell = ractor::registry::where_is(machine_actor_name(agent, epoch))?;
    // A machine still booting (in `pre_start`) is not there yet for attach.
    (cell.get_status() == ActorStatus::Running).then(|| cell.into())
}

/// The running machine of `agent` under `epoch` on this node, if it has booted.
pub async fn running_machine(agent: AgentId, epoch: Epoch) -> Option<Arc<RunningMachine>> {
    let actor = find_machine_actor(agent, epoch)?;
    ractor::call!(actor, MachineMsg::Running).ok()
}

/// Stops the machine actor of `agent` under `epoch`, if there is one, and waits until its
/// machine is destroyed (or the actor is gone, when it was killed).
pub async fn release_machine(agent: AgentId, epoch: Epoch) {
    let Some(cell) = ractor::registry::where_is(machine_actor_name(agent, epoch)) else {
        return;
    };
    let stopped = cell
        .stop_and_wait(Some("released".to_string()), Some(MACHINE_STOP_TIMEOUT))
        .await;
    if let Err(error) = stopped {
        tracing::warn!(%agent, %epoch, %error, "the machine actor did not stop in time");
    }
}

pub struct MachineActor;

pub enum MachineMsg {
    /// The running machine, to share (the turn loop, terminal attach).
    Running(RpcReplyPort<Arc<RunningMachine>>),
    /// Runs a command in the machine, off the actor; the reply comes when the command ends.
    Exec {
        request: ExecRequest,
        reply: RpcReplyPort<Result<ExecOutput, SandboxError>>,
    },
}

impl ractor::Message for MachineMsg {}

/// Everything a machine actor needs to create and boot its machine.
pub struct MachineArgs {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub driver: Arc<dyn MachineDriver>,
    pub spec: MachineSpec,
    /// The environment with the shell terminal first: what every boot runs.
    pub boot: EnvironmentConfig,
    /// The machine's way out, when it has an allowlist: its socket is in `spec`, so it is
    /// started before the machine, and it stops when the machine goes.
    pub egress: Option<EgressProxy>,
    /// The workspace checkout, removed with the machine.
    pub workspace_dir: PathBuf,
}

pub struct MachineState {
    running: Arc<RunningMachine>,
    workspace_dir: PathBuf,
    /// Held only to be dropped with the machine.
    _egress: Option<EgressProxy>,
    destroyed: bool,
    /// Counts the machine as running until the actor's state goes.
    _running_gauge: crate::metrics::RunningMachineGauge,
}

impl MachineState {
    async fn destroy(&mut self) {
        if std::mem::replace(&mut self.destroyed, true) {
            return;
        }
        if let Err(error) = self.running.driver.destroy(&self.running.handle).await {
            tracing::warn!(agent = %self.running.agent, %error, "destroying a machine failed");
        }
        let _ = tokio::fs::remove_dir_all(&self.workspace_dir).await;
    }
}

impl Drop for MachineState {
    /// The actor ended without `post_stop` (a panic, or killed with its supervisor): destroy
    /// the machine all the same, on a task since destroying waits on the driver.
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        let running = self.running.clone();
        let workspace_dir = std::mem::take(&mut self.workspace_dir);
        let destroy = async move {
            if let Err(error) = running.driver.destroy(&running.handle).await {
                tracing::warn!(agent = %running.agent, %error, "destroying an abandoned machine failed");
            }
            let _ = tokio::fs::remove_dir_all(workspace_dir).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(destroy);
            }
            // No runtime left (the node is shutting down): the handle's own drop tears the
            // machine down when its last clone goes.
            Err(_) => tracing::warn!(agent = %self.running.agent, "machine left to its handle's drop"),
        }
    }
}

/// Creates the machine, starts the egress forwarder and boots it; destroys it on any failure.
async fn create_and_boot(args: &MachineArgs) -> Result<MachineHandle, ProvisionError> {
    let machine = args.driver.create(args.spec.clone()).await?;
    tracing::debug!(agent = %args.agent, epoch = %args.epoch, machine = machine.id(), "machine created");
    let booted = async {
        if args.egress.is_some() {
            start_egress_forwarder(args.driver.as_ref(), &machine).await?;
        }
        boot(args.driver.as_ref(), &machine, &args.boot).await?;
        Ok::<(), ProvisionError>(())
    }
    .await;
    if let Err(error) = booted {
        let _ = args.driver.destroy(&machine).await;
        return Err(error);
    }
    Ok(machine)
}

/// The machine has only a loopback interface; a forwarder inside it carries the proxy port to
/// the node's socket. Its daemon outlives this command on purpose.
async fn start_egress_forwarder(driver: &dyn MachineDriver, machine: &MachineHandle) -> Result<(), ProvisionError> {
    let forwarder = format!(
        "nohup socat TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:{} >/dev/null 2>&1 &",
        MACHINE_PROXY_ADDRESS.rsplit(':').next().unwrap_or("3128"),
        flotilla_sandbox::EGRESS_SOCKET_PATH
    );
    match driver.exec(machine, ExecRequest::new(forwarder)).await {
        Ok(output) if output.success() => Ok(()),
        Ok(output) => Err(ProvisionError::EgressForwarder {
            detail: output.last_lines(5),
        }),
        Err(error) => Err(ProvisionError::EgressForwarder {
            detail: error.to_string(),
        }),
    }
}

impl Actor for MachineActor {
    type Msg = MachineMsg;
    type State = MachineState;
    type Arguments = MachineArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<MachineMsg>,
        args: MachineArgs,
    ) -> Result<MachineState, ActorProcessingErr> {
        let handle = match create_and_boot(&args).await {
            Ok(handle) => handle,
            Err(error) => {
                let _ = tokio::fs::remove_dir_all(&args.workspace_dir).await;
                return Err(Box::new(error));
            }
        };
        let running = Arc::new(RunningMachine {
            agent: args.agent,
            epoch: args.epoch,
            driver: args.driver,
            handle,
            terminals: args
                .boot
                .terminals
                .iter()
                .map(|terminal| terminal.name.clone())
                .collect(),
            taken_over: AtomicBool::new(false),
            attached: AtomicUsize::new(0),
        });
        Ok(MachineState {
            running,
            workspace_dir: args.workspace_dir,
            _egress: args.egress,
            destroyed: false,
            _running_gauge: crate::metrics::RunningMachineGauge::start(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MachineMsg>,
        message: MachineMsg,
        state: &mut MachineState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MachineMsg::Running(reply) => {
                let _ = reply.send(state.running.clone());
            }
            MachineMsg::Exec { request, reply } => {
                let running = state.running.clone();
                tokio::spawn(async move {
                    let _ = reply.send(running.exec(request).await);
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<MachineMsg>,
        state: &mut MachineState,
    ) -> Result<(), ActorProcessingErr> {
        state.destroy().await;
        Ok(())
    }
}
