//! The scheduler actor: on the leader, whenever the state changes, it runs the pure placement
//! decision (`flotilla_state::placement`) and writes the result through Raft.

use flotilla_raft::{Command, Replica, Response};
use flotilla_state::placement::{place, placement_input, MAX_ASSIGNMENTS_PER_ENTRY};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::follow::AppliedFollower;

pub struct Scheduler;

pub enum SchedulerMsg {
    /// The state changed; place what can be placed.
    Run,
}

impl ractor::Message for SchedulerMsg {}

pub struct SchedulerArgs {
    pub replica: Replica,
}

pub struct SchedulerState {
    replica: Replica,
    /// Queues one `Run` per burst of applied changes.
    follower: AppliedFollower,
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SchedulerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let follower = AppliedFollower::start(&args.replica, myself, || SchedulerMsg::Run);
        Ok(SchedulerState {
            replica: args.replica,
            follower,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SchedulerMsg::Run => {
                state.follower.taken();
                loop {
                    let decisions = state.replica.reader().read(|cluster| {
                        let (candidates, pending) = placement_input(cluster, MAX_ASSIGNMENTS_PER_ENTRY * 4);
                        place(&candidates, &pending, MAX_ASSIGNMENTS_PER_ENTRY)
                    });
                    if decisions.is_empty() {
                        break;
                    }
                    let wanted = decisions.len();
                    // For traces: the agent when one is placed, else how many.
                    let span = tracing::info_span!(
                        target: "flotilla::trace",
                        "scheduler.assign",
                        assignments = wanted,
                        agent = tracing::field::Empty,
                    );
                    if let [only] = decisions.as_slice() {
                        span.record("agent", only.agent.to_string());
                    }
                    match tracing::Instrument::instrument(
                        state.replica.write(Command::AssignAgents { assignments: decisions }),
                        span,
                    )
                    .await
                    {
                        Ok(Response::Assigned(done)) => {
                            tracing::debug!(wanted, assigned = done.len(), "placed agents");
                            if done.len() < wanted {
                                // The state moved under us; the watcher queues another run.
                                break;
                            }
                        }
                        Ok(other) => {
                            tracing::warn!(?other, "unexpected answer to assign-agents");
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "placing agents failed; retrying on the next change");
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
