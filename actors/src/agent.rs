//! One `AgentActor` per agent this node owns, under an `AgentSupervisor` that keeps the set of
//! running actors equal to what the replicated state assigns to this node under the current
//! epoch. An actor whose epoch is no longer current is stopped: a node never acts for an agent
//! under an epoch that is not its own, and the state machine refuses its writes if it tries.

use std::collections::HashMap;
use std::sync::Arc;

use flotilla_proto::v1;
use flotilla_raft::{AgentId, AgentStatus, ApplyError, Command, Epoch, NodeId, Replica, WriteError};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::follow::AppliedFollower;
use crate::machine::{MachineHost, Provisioned, RunningMachine};
use crate::mesh::Mesh;
use crate::repo::{RepoMsg, Repos, Workspace};
use crate::run::{AgentRuntime, RunContext, RunOutcome, StopContext};

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
    Provisioned(Result<(Provisioned, ActorRef<RepoMsg>), String>),
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

pub struct AgentState {
    args: AgentArgs,
    /// Provisioning runs off the actor so that it keeps answering while a machine boots.
    provisioning: Option<tokio::task::JoinHandle<()>>,
    machine: Option<Arc<RunningMachine>>,
    /// The turn loop, off the actor so that a stop or an announce is handled at once.
    run: Option<tokio::task::JoinHandle<()>>,
    repo: Option<ActorRef<RepoMsg>>,
    workspace: Option<Workspace>,
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
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(&self, myself: ActorRef<AgentMsg>, args: AgentArgs) -> Result<AgentState, ActorProcessingErr> {
        ractor::pg::monitor(crate::mesh::live_group_name(&args.agent.to_string()), myself.get_cell());
        myself.cast(AgentMsg::Start)?;
        Ok(AgentState {
            args,
            provisioning: None,
            machine: None,
            run: None,
            repo: None,
            workspace: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        message: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentMsg::Start => {
                let status = state
                    .args
                    .replica
                    .reader()
                    .read(|cluster| cluster.agents.get(&state.args.agent).map(|agent| agent.status));
                if status == Some(AgentStatus::Pending) {
                    let result = state
                        .args
                        .replica
                        .write(Command::SetAgentStatus {
                            agent: state.args.agent,
                            node: state.args.replica.node_id(),
                            epoch: state.args.epoch,
                            status: AgentStatus::Provisioning,
                            reason: "waiting for a machine".to_string(),
                            summary: None,
                            error: None,
                        })
                        .await;
                    match result {
                        Ok(_) => {}
                        Err(WriteError::Refused(ApplyError::Fenced { .. } | ApplyError::InvalidState { .. })) => {
                            // Another epoch owns the agent now, or it ended: this copy has nothing to do.
                            myself.stop(Some("superseded".to_string()));
                            return Ok(());
                        }
                        Err(error) => return Err(Box::new(error)),
                    }
                }
                state.announce(format!(
                    "node {} holds agent under epoch {}; provisioning",
                    state.args.replica.node_id(),
                    state.args.epoch
                ));
                tracing::info!(agent = %state.args.agent, epoch = %state.args.epoch, "provisioning a machine");
                state.provisioning = Some(spawn_provisioning(&state.args, myself.clone()));
            }
            AgentMsg::Provisioned(Ok((provisioned, repo))) => {
                state.provisioning = None;
                let machine = provisioned.machine.clone();
                state.machine = Some(machine.clone());
                state.repo = Some(repo.clone());
                state.workspace = Some(provisioned.workspace.clone());
                if provisioned.snapshot_used {
                    record_snapshot(&state.args).await;
                }
                let reason = format!(
                    "machine ready in {} ms on node {}",
                    provisioned.elapsed_ms,
                    state.args.replica.node_id()
                );
                tracing::info!(agent = %state.args.agent, epoch = %state.args.epoch, elapsed_ms = provisioned.elapsed_ms, "machine ready");
                match set_status(&state.args, AgentStatus::Running, reason.clone(), None).await {
                    Ok(()) => state.announce(reason),
                    Err(WriteError::Refused(ApplyError::Fenced { .. } | ApplyError::InvalidState { .. })) => {
                        myself.stop(Some("superseded".to_string()));
                        return Ok(());
                    }
                    Err(error) => return Err(Box::new(error)),
                }
                let context = RunContext {
                    agent: state.args.agent,
                    epoch: state.args.epoch,
                    replica: state.args.replica.clone(),
                    mesh: state.args.mesh.clone(),
                    driver: state.args.machines.driver.clone(),
                    machine,
                    repo,
                    workspace: provisioned.workspace,
                    runtime: state.args.runtime.clone(),
                    observer: None,
                };
                let actor = myself.clone();
                state.run = Some(tokio::spawn(async move {
                    let outcome = crate::run::run(context).await;
                    let _ = actor.cast(AgentMsg::RunEnded(outcome));
                }));
            }
            AgentMsg::RunEnded(outcome) => {
                state.run = None;
                match outcome {
                    RunOutcome::Ended(status) => {
                        tracing::info!(agent = %state.args.agent, %status, "agent run ended");
                    }
                    RunOutcome::Superseded => {
                        tracing::info!(agent = %state.args.agent, epoch = %state.args.epoch, "agent run ended: the agent ended or moved to another epoch");
                        myself.stop(Some("superseded".to_string()))
                    }
                    RunOutcome::Unavailable(error) => {
                        // Fail the actor: its supervisor restarts it, and the new run resumes
                        // from the last checkpoint.
                        return Err(format!("agent run could not write its progress: {error}").into());
                    }
                }
            }
            AgentMsg::StopRequested => {
                if let Some(task) = state.provisioning.take() {
                    task.abort();
                }
                if let Some(task) = state.run.take() {
                    task.abort();
                    let _ = task.await;
                }
                if let (Some(machine), Some(repo), Some(workspace)) =
                    (state.machine.clone(), state.repo.clone(), state.workspace.clone())
                {
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
                        driver: state.args.machines.driver.clone(),
                        machine,
                        repo,
                        workspace,
                        git: state.args.runtime.git.clone(),
                    })
                    .await;
                }
                myself.stop(Some("stopped".to_string()));
            }
            AgentMsg::Provisioned(Err(error)) => {
                state.provisioning = None;
                tracing::warn!(agent = %state.args.agent, %error, "provisioning failed");
                match set_status(
                    &state.args,
                    AgentStatus::Failed,
                    "provisioning failed".to_string(),
                    Some(error),
                )
                .await
                {
                    Ok(()) | Err(WriteError::Refused(_)) => {}
                    Err(error) => return Err(Box::new(error)),
                }
            }
            AgentMsg::Announce => {
                let status = state
                    .args
                    .replica
                    .reader()
                    .read(|cluster| cluster.agents.get(&state.args.agent).map(|agent| agent.status));
                let status = status
                    .map(|status| status.to_string())
                    .unwrap_or_else(|| "unknown".to_string());
                state.announce(format!(
                    "node {} runs this agent under epoch {}; status {}",
                    state.args.replica.node_id(),
                    state.args.epoch,
                    status
                ));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<AgentMsg>,
        message: SupervisionEvent,
        _state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ProcessGroupChanged(ractor::pg::GroupChangeMessage::Join(..)) = message {
            myself.cast(AgentMsg::Announce)?;
        }
        Ok(())
    }

    async fn post_stop(&self, myself: ActorRef<AgentMsg>, state: &mut AgentState) -> Result<(), ActorProcessingErr> {
        ractor::pg::demonitor(
            crate::mesh::live_group_name(&state.args.agent.to_string()),
            myself.get_id(),
        );
        if let Some(task) = state.provisioning.take() {
            task.abort();
        }
        if let Some(task) = state.run.take() {
            task.abort();
        }
        state.machine = None;
        state.args.machines.release(state.args.agent).await;
        Ok(())
    }
}

async fn set_status(
    args: &AgentArgs,
    status: AgentStatus,
    reason: String,
    error: Option<String>,
) -> Result<(), WriteError> {
    args.replica
        .write(Command::SetAgentStatus {
            agent: args.agent,
            node: args.replica.node_id(),
            epoch: args.epoch,
            status,
            reason,
            summary: None,
            error,
        })
        .await
        .map(|_| ())
}

/// Tells the scheduler that this node holds an install snapshot of the agent's repository.
async fn record_snapshot(args: &AgentArgs) {
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
            .repo_snapshots
            .get(&repository)
            .is_some_and(|nodes| nodes.contains(&node))
    });
    if !known {
        if let Err(error) = args.replica.write(Command::RecordSnapshot { node, repository }).await {
            tracing::warn!(%error, "recording a snapshot failed; placement will not prefer this node");
        }
    }
}

fn spawn_provisioning(args: &AgentArgs, myself: ActorRef<AgentMsg>) -> tokio::task::JoinHandle<()> {
    let agent = args.agent;
    let epoch = args.epoch;
    let record = args.replica.reader().read(|state| state.agents.get(&agent).cloned());
    let machines = args.machines.clone();
    let supervisor = args.supervisor.clone();
    tokio::spawn(async move {
        let result = async {
            let record = record.ok_or_else(|| format!("agent {agent} is not in the replicated state"))?;
            let repo = ractor::call!(supervisor, |reply| AgentSupervisorMsg::RepoFor {
                url: record.spec.repository.clone(),
                reply
            })
            .map_err(|error| format!("no repository actor: {error}"))?;
            machines
                .provision(&repo, &record, epoch)
                .await
                .map(|provisioned| (provisioned, repo))
                .map_err(|error| error.to_string())
        }
        .await;
        let booted = result.is_ok();
        if myself.cast(AgentMsg::Provisioned(result)).is_err() && booted {
            // The actor ended while the machine booted: nobody owns this machine.
            machines.release(agent).await;
        }
    })
}

pub struct AgentSupervisor;

pub enum AgentSupervisorMsg {
    /// Bring the running actors in line with the replicated state.
    Reconcile,
    /// The repository actor for a URL (started on first use, supervised here).
    RepoFor {
        url: String,
        reply: ractor::RpcReplyPort<ActorRef<RepoMsg>>,
    },
}

impl ractor::Message for AgentSupervisorMsg {}

pub struct AgentSupervisorArgs {
    pub replica: Replica,
    pub mesh: Mesh,
    pub machines: Arc<MachineHost>,
    pub runtime: Arc<AgentRuntime>,
}

struct Running {
    epoch: Epoch,
    actor: ActorRef<AgentMsg>,
}

pub struct AgentSupervisorState {
    args: AgentSupervisorArgs,
    running: HashMap<AgentId, Running>,
    restarts: HashMap<AgentId, u32>,
    repos: Repos,
    /// Queues one `Reconcile` per burst of applied changes.
    follower: AppliedFollower,
}

impl Actor for AgentSupervisor {
    type Msg = AgentSupervisorMsg;
    type State = AgentSupervisorState;
    type Arguments = AgentSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentSupervisorMsg>,
        args: AgentSupervisorArgs,
    ) -> Result<AgentSupervisorState, ActorProcessingErr> {
        let follower = AppliedFollower::start(&args.replica, myself, || AgentSupervisorMsg::Reconcile);
        Ok(AgentSupervisorState {
            args,
            running: HashMap::new(),
            restarts: HashMap::new(),
            repos: Repos::default(),
            follower,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentSupervisorMsg>,
        message: AgentSupervisorMsg,
        state: &mut AgentSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentSupervisorMsg::Reconcile => {
                state.follower.taken();
                let me = state.args.replica.node_id();
                let desired: HashMap<AgentId, Epoch> = state.args.replica.reader().read(|cluster| {
                    cluster
                        .active_on(me)
                        .filter_map(|agent| agent.assignment.map(|assignment| (agent.id, assignment.epoch)))
                        .collect()
                });
                let stale: Vec<AgentId> = state
                    .running
                    .iter()
                    .filter(|(id, running)| desired.get(id) != Some(&running.epoch))
                    .map(|(id, _)| *id)
                    .collect();
                for id in stale {
                    if let Some(running) = state.running.remove(&id) {
                        let stopped_here = state.args.replica.reader().read(|cluster| {
                            cluster.agents.get(&id).is_some_and(|agent| {
                                agent.status == AgentStatus::Stopped
                                    && agent.assignment.is_some_and(|assignment| {
                                        assignment.node == me && assignment.epoch == running.epoch
                                    })
                            })
                        });
                        if stopped_here {
                            tracing::info!(agent = %id, "agent stopped: pushing its work, then ending its actor");
                            let _ = running.actor.cast(AgentMsg::StopRequested);
                        } else {
                            tracing::info!(agent = %id, epoch = %running.epoch, "stopping agent actor: no longer owned under this epoch");
                            running.actor.stop(Some("not owned under this epoch".to_string()));
                        }
                    }
                }
                for (id, epoch) in desired {
                    if state.running.contains_key(&id) {
                        continue;
                    }
                    let (actor, _) = Actor::spawn_linked(
                        None,
                        AgentActor,
                        AgentArgs {
                            agent: id,
                            epoch,
                            replica: state.args.replica.clone(),
                            mesh: state.args.mesh.clone(),
                            machines: state.args.machines.clone(),
                            supervisor: myself.clone(),
                            runtime: state.args.runtime.clone(),
                        },
                        myself.get_cell(),
                    )
                    .await?;
                    tracing::info!(agent = %id, %epoch, "started agent actor");
                    state.running.insert(id, Running { epoch, actor });
                }
            }
            AgentSupervisorMsg::RepoFor { url, reply } => {
                let repos_dir = state.args.machines.repos_dir.clone();
                let actor = state
                    .repos
                    .actor_for(
                        &url,
                        &repos_dir,
                        &state.args.runtime.git,
                        state.args.runtime.providers.clone(),
                        myself.get_cell(),
                    )
                    .await?;
                let _ = reply.send(actor);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<AgentSupervisorMsg>,
        message: SupervisionEvent,
        state: &mut AgentSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match message {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, error) => (cell, Some(error.to_string())),
            _ => return Ok(()),
        };
        let Some(id) = state
            .running
            .iter()
            .find(|(_, running)| running.actor.get_id() == cell.get_id())
            .map(|(id, _)| *id)
        else {
            return Ok(());
        };
        let running = state.running.remove(&id).expect("found above");
        let Some(failure) = failure else {
            // An actor ends on its own when its agent ended or moved to another epoch. If this
            // node still owns the agent under the same epoch, the actor read a state that did
            // not show that yet: start it again (counted like a failure, so it cannot spin).
            let me = state.args.replica.node_id();
            let still_owned = state.args.replica.reader().read(|cluster| {
                cluster
                    .active_on(me)
                    .any(|agent| agent.id == id && agent.assignment.is_some_and(|a| a.epoch == running.epoch))
            });
            if still_owned {
                let count = state.restarts.entry(id).or_insert(0);
                *count += 1;
                if *count <= MAX_AGENT_ACTOR_RESTARTS {
                    tracing::warn!(agent = %id, epoch = %running.epoch, "agent actor ended while this node still owns the agent; starting it again");
                    myself.cast(AgentSupervisorMsg::Reconcile)?;
                } else {
                    tracing::warn!(agent = %id, epoch = %running.epoch, "agent actor keeps ending while this node owns the agent; leaving it stopped");
                }
            }
            return Ok(());
        };
        // A failed actor may not have cleaned up after itself.
        state.args.machines.release(id).await;
        let count = state.restarts.entry(id).or_insert(0);
        *count += 1;
        tracing::warn!(agent = %id, restarts = *count, %failure, "agent actor failed");
        if *count > MAX_AGENT_ACTOR_RESTARTS {
            let result = state
                .args
                .replica
                .write(Command::SetAgentStatus {
                    agent: id,
                    node: state.args.replica.node_id(),
                    epoch: running.epoch,
                    status: AgentStatus::Failed,
                    reason: "agent actor kept failing".to_string(),
                    summary: None,
                    error: Some(format!("agent actor failed {count} times; last error: {failure}")),
                })
                .await;
            if let Err(error) = result {
                tracing::warn!(agent = %id, %error, "could not record the agent's failure");
            }
        } else {
            // The next reconcile starts it again.
            myself.cast(AgentSupervisorMsg::Reconcile)?;
        }
        Ok(())
    }
}
