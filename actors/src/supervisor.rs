//! The root of a node's actor tree. It always runs the `AgentSupervisor`; while this node is the
//! Raft leader it also runs the `Scheduler` and the `LivenessMonitor`. It reports this node's
//! liveness to the leader and keeps the actor mesh linked to every known node.

use std::time::Duration;

use flotilla_proto::internal::HeartbeatRequest;
use flotilla_raft::Replica;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::agent::{AgentSupervisor, AgentSupervisorArgs, AgentSupervisorMsg};
use crate::liveness::{LivenessArgs, LivenessMonitor, LivenessMsg, LivenessTable};
use crate::mesh::Mesh;
use crate::scheduler::{Scheduler, SchedulerArgs, SchedulerMsg};

/// Restarts of a leader-only child within one leadership before the node supervisor gives up.
pub const MAX_CHILD_RESTARTS: u32 = 10;

pub struct NodeSupervisor;

pub enum NodeMsg {
    LeadershipChanged(bool),
    /// Report liveness to the leader and link the mesh to known nodes.
    Tick,
}

impl ractor::Message for NodeMsg {}

#[derive(Clone)]
pub struct NodeSupervisorArgs {
    pub replica: Replica,
    pub mesh: Mesh,
    pub machines: std::sync::Arc<crate::machine::MachineHost>,
    pub runtime: std::sync::Arc<crate::run::AgentRuntime>,
    pub liveness: LivenessTable,
    pub lease: Duration,
}

pub struct NodeSupervisorState {
    args: NodeSupervisorArgs,
    agents: ActorRef<AgentSupervisorMsg>,
    scheduler: Option<ActorRef<SchedulerMsg>>,
    liveness: Option<ActorRef<LivenessMsg>>,
    leader: bool,
    restarts: u32,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NodeSupervisorState {
    async fn start_leader_children(&mut self, myself: &ActorRef<NodeMsg>) -> Result<(), ActorProcessingErr> {
        if self.scheduler.is_none() {
            let (scheduler, _) = Actor::spawn_linked(
                None,
                Scheduler,
                SchedulerArgs {
                    replica: self.args.replica.clone(),
                },
                myself.get_cell(),
            )
            .await?;
            self.scheduler = Some(scheduler);
        }
        if self.liveness.is_none() {
            let (liveness, _) = Actor::spawn_linked(
                None,
                LivenessMonitor,
                LivenessArgs {
                    replica: self.args.replica.clone(),
                    table: self.args.liveness.clone(),
                    lease: self.args.lease,
                },
                myself.get_cell(),
            )
            .await?;
            self.liveness = Some(liveness);
        }
        Ok(())
    }

    fn stop_leader_children(&mut self) {
        if let Some(scheduler) = self.scheduler.take() {
            scheduler.stop(Some("no longer leader".to_string()));
        }
        if let Some(liveness) = self.liveness.take() {
            liveness.stop(Some("no longer leader".to_string()));
        }
    }

    fn is_child(&self, cell: &ActorCell) -> Option<&'static str> {
        let id = cell.get_id();
        if self.agents.get_id() == id {
            Some("agent supervisor")
        } else if self.scheduler.as_ref().is_some_and(|actor| actor.get_id() == id) {
            Some("scheduler")
        } else if self.liveness.as_ref().is_some_and(|actor| actor.get_id() == id) {
            Some("liveness monitor")
        } else {
            None
        }
    }
}

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeSupervisorState;
    type Arguments = NodeSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        args: NodeSupervisorArgs,
    ) -> Result<NodeSupervisorState, ActorProcessingErr> {
        let (agents, _) = Actor::spawn_linked(
            None,
            AgentSupervisor,
            AgentSupervisorArgs {
                replica: args.replica.clone(),
                mesh: args.mesh.clone(),
                machines: args.machines.clone(),
                runtime: args.runtime.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        let mut metrics = args.replica.raft().metrics();
        let me = args.replica.node_id();
        let leadership_ref = myself.clone();
        let leadership = tokio::spawn(async move {
            let mut was_leader = None;
            loop {
                let is_leader = {
                    let metrics = metrics.borrow();
                    metrics.current_leader == Some(me) && metrics.state == openraft::ServerState::Leader
                };
                if was_leader != Some(is_leader) {
                    was_leader = Some(is_leader);
                    if leadership_ref.cast(NodeMsg::LeadershipChanged(is_leader)).is_err() {
                        return;
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
        let ticker = ractor::time::send_interval(args.lease / 4, myself.get_cell(), || NodeMsg::Tick);
        Ok(NodeSupervisorState {
            args,
            agents,
            scheduler: None,
            liveness: None,
            leader: false,
            restarts: 0,
            tasks: vec![leadership, ticker],
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        message: NodeMsg,
        state: &mut NodeSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            NodeMsg::LeadershipChanged(leader) => {
                state.leader = leader;
                state.restarts = 0;
                if leader {
                    tracing::info!("became leader: starting scheduler and liveness monitor");
                    state.start_leader_children(&myself).await?;
                } else {
                    state.stop_leader_children();
                }
            }
            NodeMsg::Tick => {
                let replica = state.args.replica.clone();
                let mesh = state.args.mesh.clone();
                let liveness = state.args.liveness.clone();
                let timeout = state.args.lease / 2;
                // Network calls run on their own task so the supervisor's mailbox keeps moving.
                tokio::spawn(async move {
                    report_liveness(&replica, &liveness, timeout).await;
                    link_mesh(&replica, &mesh).await;
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<NodeMsg>,
        message: SupervisionEvent,
        state: &mut NodeSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match &message {
            SupervisionEvent::ActorFailed(cell, error) => (cell.clone(), error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell.clone(), reason.clone().unwrap_or_default()),
            _ => return Ok(()),
        };
        let Some(child) = state.is_child(&cell) else {
            return Ok(());
        };
        let failed = matches!(message, SupervisionEvent::ActorFailed(..));
        if !failed && child != "agent supervisor" {
            // A leader-only child stopped on purpose.
            return Ok(());
        }
        state.restarts += 1;
        tracing::error!(child, %reason, restarts = state.restarts, "child actor ended; restarting it");
        if state.restarts > MAX_CHILD_RESTARTS {
            return Err(format!("{child} failed {} times; giving up", state.restarts).into());
        }
        match child {
            "agent supervisor" => {
                let (agents, _) = Actor::spawn_linked(
                    None,
                    AgentSupervisor,
                    AgentSupervisorArgs {
                        replica: state.args.replica.clone(),
                        mesh: state.args.mesh.clone(),
                        machines: state.args.machines.clone(),
                        runtime: state.args.runtime.clone(),
                    },
                    myself.get_cell(),
                )
                .await?;
                state.agents = agents;
            }
            "scheduler" => {
                state.scheduler = None;
                if state.leader {
                    state.start_leader_children(&myself).await?;
                }
            }
            _ => {
                state.liveness = None;
                if state.leader {
                    state.start_leader_children(&myself).await?;
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<NodeMsg>,
        state: &mut NodeSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for task in &state.tasks {
            task.abort();
        }
        Ok(())
    }
}

async fn report_liveness(replica: &Replica, liveness: &LivenessTable, timeout: Duration) {
    let me = replica.node_id();
    let Some(leader) = replica.current_leader() else {
        return;
    };
    if leader == me {
        liveness.report(me);
        return;
    }
    let Some(address) = replica.member_address(leader) else {
        return;
    };
    let Ok(mut client) = replica.peers().client(&address.grpc) else {
        return;
    };
    let mut request = replica.peers().request(HeartbeatRequest { node_id: me });
    request.set_timeout(timeout);
    if let Err(status) = client.heartbeat(request).await {
        tracing::debug!(leader, %status, "liveness report to the leader failed");
    }
}

async fn link_mesh(replica: &Replica, mesh: &Mesh) {
    let me = replica.node_id();
    let addresses: Vec<(u64, String)> = replica.reader().read(|state| {
        state
            .nodes
            .values()
            .filter(|node| node.id != me && node.up && !node.info.mesh_address.is_empty())
            .map(|node| (node.id, node.info.mesh_address.clone()))
            .collect()
    });
    for (node, address) in addresses {
        if let Err(error) = mesh.connect_node(node, &address).await {
            tracing::debug!(node, %address, %error, "mesh link failed; retrying on the next tick");
        }
    }
}
