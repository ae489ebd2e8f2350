//! One `AgentActor` per agent this node owns, under an `AgentSupervisor` that keeps the set of
//! running actors equal to what the replicated state assigns to this node under the current
//! epoch. An actor whose epoch is no longer current is stopped: a node never acts for an agent
//! under an epoch that is not its own, and the state machine refuses its writes if it tries.

use std::collections::HashMap;

use flotilla_proto::v1;
use flotilla_raft::{AgentId, AgentStatus, ApplyError, Command, Epoch, NodeId, Replica, WriteError};
use prost::Message as _;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::follow::AppliedFollower;
use crate::mesh::Mesh;

/// Restarts of one agent's actor before the agent is failed.
pub const MAX_AGENT_ACTOR_RESTARTS: u32 = 3;

/// Encodes a live (not durable) log line for watchers.
pub fn live_log_event(agent: AgentId, node: NodeId, sequence: u64, text: String) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    v1::AgentEvent {
        agent_id: agent.to_string(),
        sequence,
        live: true,
        at: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        }),
        node_id: node,
        kind: Some(v1::agent_event::Kind::Log(v1::LogLine { text })),
    }
    .encode_to_vec()
}

pub struct AgentActor;

pub enum AgentMsg {
    /// Take the agent from assignment towards a machine.
    Start,
    /// Tell every watcher where the agent stands (sent when a watcher joins).
    Announce,
}

impl ractor::Message for AgentMsg {}

pub struct AgentArgs {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub replica: Replica,
    pub mesh: Mesh,
}

pub struct AgentState {
    args: AgentArgs,
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
        Ok(AgentState { args })
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
        Ok(())
    }
}

pub struct AgentSupervisor;

pub enum AgentSupervisorMsg {
    /// Bring the running actors in line with the replicated state.
    Reconcile,
}

impl ractor::Message for AgentSupervisorMsg {}

pub struct AgentSupervisorArgs {
    pub replica: Replica,
    pub mesh: Mesh,
}

struct Running {
    epoch: Epoch,
    actor: ActorRef<AgentMsg>,
}

pub struct AgentSupervisorState {
    args: AgentSupervisorArgs,
    running: HashMap<AgentId, Running>,
    restarts: HashMap<AgentId, u32>,
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
                        tracing::info!(agent = %id, epoch = %running.epoch, "stopping agent actor: no longer owned under this epoch");
                        running.actor.stop(Some("not owned under this epoch".to_string()));
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
                        },
                        myself.get_cell(),
                    )
                    .await?;
                    tracing::info!(agent = %id, %epoch, "started agent actor");
                    state.running.insert(id, Running { epoch, actor });
                }
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
            return Ok(());
        };
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
