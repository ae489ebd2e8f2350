//! The `AgentSupervisor`: keeps one `AgentActor` per agent the replicated state assigns to this
//! node under the current epoch, and one `RepoActor` per repository. An agent actor that fails is
//! started again up to [`MAX_AGENT_ACTOR_RESTARTS`] times, then its agent is `FAILED` with the
//! last error; one that ends on its own while this node still owns the agent under the same
//! epoch is started again too (counted against the same bound).

use std::collections::HashMap;
use std::sync::Arc;

use flotilla_raft::{AgentId, AgentStatus, Command, Epoch, Replica};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::follow::AppliedFollower;
use crate::machine::{release_machine, MachineHost};
use crate::mesh::Mesh;
use crate::repo::{RepoMsg, Repos};
use crate::run::AgentRuntime;

use super::{AgentActor, AgentArgs, AgentMsg, MAX_AGENT_ACTOR_RESTARTS};

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
        // A failed actor stops its machine before it fails; one that panicked may not have.
        release_machine(id, running.epoch).await;
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
                    error: Some(
                        state
                            .args
                            .runtime
                            .known_redactor()
                            .redact(&format!("agent actor failed {count} times; last error: {failure}"))
                            .into_owned(),
                    ),
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
