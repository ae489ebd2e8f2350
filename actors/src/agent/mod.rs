//! One `AgentActor` per agent this node owns, under an [`AgentSupervisor`] that keeps the set of
//! running actors equal to what the replicated state assigns to this node under the current
//! epoch. An actor whose epoch is no longer current is stopped: a node never acts for an agent
//! under an epoch that is not its own, and the state machine refuses its writes if it tries.
//!
//! The agent actor supervises the [`MachineActor`](crate::machine::MachineActor) of its machine.
//! Its machine dying under it (the machine actor failed, or ended without being asked) fails the
//! agent actor with the reason; the `AgentSupervisor` then starts it again, and the new actor
//! provisions a fresh machine and resumes from the last checkpoint (see "The machine actor" in
//! docs/architecture.md).

mod credentials;
mod supervisor;

use std::sync::Arc;

use flotilla_proto::v1;
use flotilla_raft::{AgentId, AgentStatus, ApplyError, Command, Epoch, NodeId, Replica, WriteError};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::Instrument as _;

use crate::machine::{MachineHost, MachineMsg, ProvisionError, Provisioned, RunningMachine, MACHINE_STOP_TIMEOUT};
use crate::mesh::Mesh;
use crate::repo::{RepoMsg, Workspace};
use crate::run::{AgentRuntime, RunContext, RunOutcome, StopContext};

pub use supervisor::{AgentSupervisor, AgentSupervisorArgs, AgentSupervisorMsg, AgentSupervisorState};

/// Restarts of one agent's actor before the agent is failed.
pub const MAX_AGENT_ACTOR_RESTARTS: u32 = 3;

/// Encodes a live (not durable) log line for watchers.
pub fn live_log_event(agent: AgentId, node: NodeId, sequence: u64, text: String) -> Vec<u8> {
    crate::run::live_event(
        agent,
        node,
        sequence,
        false,
        v1::agent_event::Kind::Log(v1::LogLine { text }),
    )
}

pub struct AgentActor;

pub enum AgentMsg {
    /// Take the agent from assignment towards a machine.
    Start,
    /// Tell every watcher where the agent stands (sent when a watcher joins).
    Announce,
    /// The provisioning task finished.
    Provisioned(Result<(Provisioned, ActorRef<RepoMsg>), ProvisionError>),
    /// The turn loop ended.
    RunEnded(RunOutcome),
    /// The agent was stopped: push what the workspace holds, then end.
    StopRequested,
}

impl ractor::Message for AgentMsg {}

pub struct AgentArgs {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub replica: Replica,
    pub mesh: Mesh,
    pub machines: Arc<MachineHost>,
    pub supervisor: ActorRef<AgentSupervisorMsg>,
    pub runtime: Arc<AgentRuntime>,
}

/// Why an agent actor fails (and its supervisor starts it again).
#[derive(Debug, thiserror::Error)]
pub enum AgentActorError {
    #[error("agent run could not write its progress: {0}")]
    RunUnavailable(String),
    #[error("the machine of agent {agent} failed: {reason}")]
    MachineFailed { agent: AgentId, reason: String },
    #[error("the machine of agent {agent} ended unasked: {reason}")]
    MachineEnded { agent: AgentId, reason: String },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The agent's machine once provisioned, with what the run and the final push need.
struct Machine {
    running: Arc<RunningMachine>,
    actor: ActorRef<MachineMsg>,
    repo: ActorRef<RepoMsg>,
    workspace: Workspace,
}

pub struct AgentState {
    args: AgentArgs,
    /// Provisioning runs off the actor so that it keeps answering while a machine boots.
    provisioning: Option<tokio::task::JoinHandle<()>>,
    machine: Option<Machine>,
    /// The turn loop, off the actor so that a stop or an announce is handled at once.
    run: Option<tokio::task::JoinHandle<()>>,
    /// Around everything this actor and its tasks do, so that every log line of the agent's
    /// work carries its id, team and epoch (`--log-format json` shows them as fields).
    span: tracing::Span,
    /// Renews the machine's session credentials while it lives.
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl AgentState {
    fn announce(&self, text: String) {
        let sequence = self
            .args
            .replica
            .reader()
            .read(|state| state.agents.get(&self.args.agent).map(|agent| agent.last_sequence))
            .unwrap_or(0);
        self.args.mesh.publish(
            &self.args.agent.to_string(),
            live_log_event(self.args.agent, self.args.replica.node_id(), sequence, text),
        );
    }

    fn status(&self) -> Option<AgentStatus> {
        self.args
            .replica
            .reader()
            .read(|cluster| cluster.agents.get(&self.args.agent).map(|agent| agent.status))
    }

    /// Ends the actor's work: aborts provisioning and the turn loop, then stops the machine actor
    /// and waits until the machine is destroyed. Every way out of the actor goes through here
    /// (a failing handler too), so no turn loop outlives its actor and no machine its agent.
    async fn wind_down(&mut self) {
        if let Some(task) = self.provisioning.take() {
            task.abort();
        }
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
        if let Some(task) = self.run.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(machine) = self.machine.take() {
            let stopped = machine
                .actor
                .stop_and_wait(Some("agent actor ended".to_string()), Some(MACHINE_STOP_TIMEOUT))
                .await;
            if let Err(error) = stopped {
                tracing::warn!(agent = %self.args.agent, %error, "the machine actor did not stop in time");
            }
        }
    }

    async fn set_status(&self, status: AgentStatus, reason: String, error: Option<String>) -> Result<(), WriteError> {
        // A provisioning error can quote an install command's output or a machine's: every
        // value this node knows is redacted before it is recorded (and answered over gRPC).
        let redactor = self.args.runtime.known_redactor();
        let reason = redactor.redact(&reason).into_owned();
        let error = error.map(|error| redactor.redact(&error).into_owned());
        self.args
            .replica
            .write(Command::SetAgentStatus {
                agent: self.args.agent,
                node: self.args.replica.node_id(),
                epoch: self.args.epoch,
                status,
                reason,
                summary: None,
                error,
            })
            .await
            .map(|_| ())
    }
}

/// Whether a refused write means that this copy of the agent has nothing more to do: another
/// epoch owns the agent now, or it ended.
fn superseded(error: &WriteError) -> bool {
    matches!(
        error,
        WriteError::Refused(ApplyError::Fenced { .. } | ApplyError::InvalidState { .. })
    )
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(&self, myself: ActorRef<AgentMsg>, args: AgentArgs) -> Result<AgentState, ActorProcessingErr> {
        ractor::pg::monitor(crate::mesh::live_group_name(&args.agent.to_string()), myself.get_cell());
        myself.cast(AgentMsg::Start)?;
        let team = args
            .replica
            .reader()
            .read(|state| state.agents.get(&args.agent).map(|agent| agent.spec.team.clone()))
            .unwrap_or_default();
        let span = tracing::info_span!("agent", agent = %args.agent, team = %team, epoch = %args.epoch);
        Ok(AgentState {
            args,
            provisioning: None,
            machine: None,
            run: None,
            span,
            renewal: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        message: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        self.handle_in_span(myself, message, state).instrument(span).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<AgentMsg>,
        message: SupervisionEvent,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        supervision_event(myself, message, state).instrument(span).await
    }

    async fn post_stop(&self, myself: ActorRef<AgentMsg>, state: &mut AgentState) -> Result<(), ActorProcessingErr> {
        ractor::pg::demonitor(
            crate::mesh::live_group_name(&state.args.agent.to_string()),
            myself.get_id(),
        );
        let span = state.span.clone();
        state.wind_down().instrument(span).await;
        Ok(())
    }
}

impl AgentActor {
    async fn handle_in_span(
        &self,
        myself: ActorRef<AgentMsg>,
        message: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        let handled = match message {
            AgentMsg::Start => start(&myself, state).await,
            AgentMsg::Provisioned(Ok((provisioned, repo))) => machine_ready(&myself, state, provisioned, repo).await,
            AgentMsg::Provisioned(Err(error)) => provisioning_failed(state, error).await,
            AgentMsg::RunEnded(outcome) => run_ended(&myself, state, outcome),
            AgentMsg::StopRequested => {
                stop_requested(state).await;
                myself.stop(Some("stopped".to_string()));
                Ok(())
            }
            AgentMsg::Announce => {
                let status = state
                    .status()
                    .map(|status| status.to_string())
                    .unwrap_or_else(|| "unknown".to_string());
                state.announce(format!(
                    "node {} runs this agent under epoch {}; status {}",
                    state.args.replica.node_id(),
                    state.args.epoch,
                    status
                ));
                Ok(())
            }
        };
        if let Err(error) = handled {
            // The actor fails: `post_stop` will not run, so wind down here.
            state.wind_down().await;
            return Err(Box::new(error));
        }
        Ok(())
    }
}

/// A supervision event: a watcher joined, or the agent's machine died under it.
async fn supervision_event(
    myself: ActorRef<AgentMsg>,
    message: SupervisionEvent,
    state: &mut AgentState,
) -> Result<(), ActorProcessingErr> {
    let machine_id = state.machine.as_ref().map(|machine| machine.actor.get_id());
    let failure = match message {
        SupervisionEvent::ProcessGroupChanged(ractor::pg::GroupChangeMessage::Join(..)) => {
            myself.cast(AgentMsg::Announce)?;
            return Ok(());
        }
        SupervisionEvent::ActorFailed(cell, error) if Some(cell.get_id()) == machine_id => {
            AgentActorError::MachineFailed {
                agent: state.args.agent,
                reason: error.to_string(),
            }
        }
        SupervisionEvent::ActorTerminated(cell, _, reason) if Some(cell.get_id()) == machine_id => {
            AgentActorError::MachineEnded {
                agent: state.args.agent,
                reason: reason.unwrap_or_else(|| "no reason given".to_string()),
            }
        }
        _ => return Ok(()),
    };
    // The machine is gone under the run: fail, so that the supervisor starts this agent
    // again on a fresh machine from its last checkpoint.
    tracing::warn!(agent = %state.args.agent, error = %failure, "the agent's machine died");
    state.wind_down().await;
    Err(Box::new(failure))
}

/// Moves a pending agent to `PROVISIONING` and starts provisioning its machine.
async fn start(myself: &ActorRef<AgentMsg>, state: &mut AgentState) -> Result<(), AgentActorError> {
    if state.status() == Some(AgentStatus::Pending) {
        let result = state
            .set_status(AgentStatus::Provisioning, "waiting for a machine".to_string(), None)
            .await;
        match result {
            Ok(()) => {}
            Err(error) if superseded(&error) => {
                myself.stop(Some("superseded".to_string()));
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        }
    }
    state.announce(format!(
        "node {} holds agent under epoch {}; provisioning",
        state.args.replica.node_id(),
        state.args.epoch
    ));
    tracing::info!(agent = %state.args.agent, epoch = %state.args.epoch, "provisioning a machine");
    state.provisioning = Some(spawn_provisioning(&state.args, myself.clone(), state.span.clone()));
    Ok(())
}

/// The machine is up: the agent is `RUNNING` and its turn loop starts.
async fn machine_ready(
    myself: &ActorRef<AgentMsg>,
    state: &mut AgentState,
    provisioned: Provisioned,
    repo: ActorRef<RepoMsg>,
) -> Result<(), AgentActorError> {
    state.provisioning = None;
    state.machine = Some(Machine {
        running: provisioned.machine.clone(),
        actor: provisioned.actor.clone(),
        repo: repo.clone(),
        workspace: provisioned.workspace.clone(),
    });
    if provisioned.install_layer_used {
        record_install_layer(&state.args).await;
    }
    let reason = format!(
        "machine ready in {} ms on node {}",
        provisioned.elapsed_ms,
        state.args.replica.node_id()
    );
    tracing::info!(agent = %state.args.agent, epoch = %state.args.epoch, elapsed_ms = provisioned.elapsed_ms, "machine ready");
    match state.set_status(AgentStatus::Running, reason.clone(), None).await {
        Ok(()) => state.announce(reason),
        Err(error) if superseded(&error) => {
            myself.stop(Some("superseded".to_string()));
            return Ok(());
        }
        Err(error) => return Err(error.into()),
    }
    let redactor = crate::secrets::SharedRedactor::from(provisioned.redactor);
    let notes = crate::run::RunNotes::default();
    if let Some(renewable) = provisioned.secrets.renewable.clone() {
        let renewal = credentials::Renewal {
            agent: state.args.agent,
            node: state.args.replica.node_id(),
            replica: state.args.replica.clone(),
            mesh: state.args.mesh.clone(),
            machine: provisioned.machine.clone(),
            secrets: (*provisioned.secrets).clone(),
            redactor: redactor.clone(),
            notes: notes.clone(),
        };
        // The file is there before the first command runs; renewals follow on a task of their own.
        renewal.write_initial(&renewable).await;
        state.renewal = Some(tokio::spawn(renewal.run(renewable)));
    }
    let context = RunContext {
        agent: state.args.agent,
        epoch: state.args.epoch,
        replica: state.args.replica.clone(),
        mesh: state.args.mesh.clone(),
        machine: provisioned.machine,
        repo,
        workspace: provisioned.workspace,
        runtime: state.args.runtime.clone(),
        observer: None,
        redactor,
        notes,
    };
    let actor = myself.clone();
    state.run = Some(tokio::spawn(
        async move {
            let outcome = crate::run::run(context).await;
            let _ = actor.cast(AgentMsg::RunEnded(outcome));
        }
        .instrument(state.span.clone()),
    ));
    Ok(())
}

async fn provisioning_failed(state: &mut AgentState, error: ProvisionError) -> Result<(), AgentActorError> {
    state.provisioning = None;
    tracing::warn!(agent = %state.args.agent, %error, "provisioning failed");
    let failed = state
        .set_status(
            AgentStatus::Failed,
            "provisioning failed".to_string(),
            Some(error.to_string()),
        )
        .await;
    match failed {
        Ok(()) | Err(WriteError::Refused(_)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn run_ended(myself: &ActorRef<AgentMsg>, state: &mut AgentState, outcome: RunOutcome) -> Result<(), AgentActorError> {
    state.run = None;
    match outcome {
        RunOutcome::Ended(status) => {
            tracing::info!(agent = %state.args.agent, %status, "agent run ended");
            Ok(())
        }
        RunOutcome::Superseded => {
            tracing::info!(agent = %state.args.agent, epoch = %state.args.epoch, "agent run ended: the agent ended or moved to another epoch");
            myself.stop(Some("superseded".to_string()));
            Ok(())
        }
        // Fail the actor: its supervisor restarts it, and the new run resumes from the last
        // checkpoint.
        RunOutcome::Unavailable(error) => Err(AgentActorError::RunUnavailable(error)),
    }
}

/// The agent was stopped: ends the turn loop, then commits and pushes what the workspace holds.
async fn stop_requested(state: &mut AgentState) {
    if let Some(task) = state.provisioning.take() {
        task.abort();
    }
    if let Some(task) = state.run.take() {
        task.abort();
        let _ = task.await;
    }
    let Some(machine) = &state.machine else {
        return;
    };
    let name = state
        .args
        .replica
        .reader()
        .read(|cluster| {
            cluster
                .agents
                .get(&state.args.agent)
                .map(|agent| agent.spec.name.clone())
        })
        .unwrap_or_default();
    crate::run::push_on_stop(&StopContext {
        agent: state.args.agent,
        epoch: state.args.epoch,
        name,
        replica: state.args.replica.clone(),
        machine: machine.running.clone(),
        repo: machine.repo.clone(),
        workspace: machine.workspace.clone(),
        git: state.args.runtime.git.clone(),
    })
    .await;
}

/// Tells the scheduler that this node holds an install layer of the agent's repository.
async fn record_install_layer(args: &AgentArgs) {
    let node = args.replica.node_id();
    let repository = args
        .replica
        .reader()
        .read(|state| state.agents.get(&args.agent).map(|agent| agent.spec.repository.clone()));
    let Some(repository) = repository else {
        return;
    };
    let known = args.replica.reader().read(|state| {
        state
            .install_layers
            .get(&repository)
            .is_some_and(|nodes| nodes.contains(&node))
    });
    if !known {
        if let Err(error) = args
            .replica
            .write(Command::RecordInstallLayer { node, repository })
            .await
        {
            tracing::warn!(%error, "recording an install layer failed; placement will not prefer this node");
        }
    }
}

/// Provisions the agent's machine on a task of its own, under a machine actor that this agent
/// actor supervises, and reports back with [`AgentMsg::Provisioned`].
fn spawn_provisioning(
    args: &AgentArgs,
    myself: ActorRef<AgentMsg>,
    span: tracing::Span,
) -> tokio::task::JoinHandle<()> {
    let agent = args.agent;
    let epoch = args.epoch;
    let record = args.replica.reader().read(|state| state.agents.get(&agent).cloned());
    let machines = args.machines.clone();
    let supervisor = args.supervisor.clone();
    let secret_source = args.runtime.secrets.clone();
    // For traces only (the log lines keep the agent's span): secrets, repository and machine.
    let provision_span = tracing::info_span!(target: "flotilla::trace", parent: &span, "agent.provision", agent = %agent, epoch = %epoch);
    tokio::spawn(
        async move {
            let result = async {
                let record = record.ok_or(ProvisionError::NotInState { agent })?;
                let secrets = match &secret_source {
                    Some(source) => {
                        let mut secrets = source.for_agent(&record).map_err(ProvisionError::Secrets)?;
                        secrets.also_redacted = source.node_values();
                        let extra = source
                            .run_credentials(&record, &secrets)
                            .await
                            .map_err(ProvisionError::RunCredentials)?;
                        secrets.values.extend(extra.values);
                        secrets.plain.extend(extra.plain);
                        secrets.renewable = extra.renewable;
                        secrets
                    }
                    None => crate::secrets::SecretValues::default(),
                };
                let repo = ractor::call!(supervisor, |reply| AgentSupervisorMsg::RepoFor {
                    url: record.spec.repository.clone(),
                    reply
                })
                .map_err(|error| ProvisionError::NoRepositoryActor(error.to_string()))?;
                let provisioned = machines
                    .provision(&repo, &record, epoch, Some(myself.get_cell()), &secrets)
                    .await?;
                Ok((provisioned, repo))
            }
            .instrument(provision_span)
            .await;
            let machine_actor = result.as_ref().ok().map(|(provisioned, _)| provisioned.actor.clone());
            if myself.cast(AgentMsg::Provisioned(result)).is_err() {
                if let Some(actor) = machine_actor {
                    // The actor ended while the machine booted: nobody owns this machine.
                    let _ = actor
                        .stop_and_wait(Some("agent actor gone".to_string()), Some(MACHINE_STOP_TIMEOUT))
                        .await;
                }
            }
        }
        .instrument(span),
    )
}
