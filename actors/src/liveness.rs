//! Node liveness. Every node reports to the leader every quarter lease; the leader's monitor
//! marks a node down through Raft once it has been silent for a whole lease (which sends its
//! agents back to placement under a higher epoch) and up again when it reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_raft::{Command, NodeId, Replica};
use ractor::{Actor, ActorProcessingErr, ActorRef};

/// When each node last reported, as seen by this node (meaningful on the leader only).
#[derive(Clone, Default)]
pub struct LivenessTable {
    last_seen: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

impl LivenessTable {
    pub fn report(&self, node: NodeId) {
        self.last_seen
            .lock()
            .expect("liveness lock poisoned")
            .insert(node, Instant::now());
    }

    fn last_seen(&self, node: NodeId) -> Option<Instant> {
        self.last_seen
            .lock()
            .expect("liveness lock poisoned")
            .get(&node)
            .copied()
    }

    /// A new leader does not know who was silent before it: everyone starts with a full lease.
    fn reset(&self, nodes: impl Iterator<Item = NodeId>) {
        let now = Instant::now();
        let mut table = self.last_seen.lock().expect("liveness lock poisoned");
        table.clear();
        table.extend(nodes.map(|node| (node, now)));
    }
}

/// What the monitor should write, given who is marked up and when each was last seen.
pub fn liveness_changes(
    marked: &[(NodeId, bool)],
    last_seen: impl Fn(NodeId) -> Option<Instant>,
    now: Instant,
    lease: Duration,
) -> Vec<Command> {
    let mut commands = Vec::new();
    for (node, up) in marked {
        let fresh = last_seen(*node).is_some_and(|seen| now.saturating_duration_since(seen) < lease);
        match (up, fresh) {
            (true, false) => commands.push(Command::NodeDown { node: *node }),
            (false, true) => commands.push(Command::NodeUp { node: *node }),
            _ => {}
        }
    }
    commands
}

pub struct LivenessMonitor;

pub enum LivenessMsg {
    Check,
}

impl ractor::Message for LivenessMsg {}

pub struct LivenessArgs {
    pub replica: Replica,
    pub table: LivenessTable,
    pub lease: Duration,
}

pub struct LivenessState {
    args: LivenessArgs,
    ticker: tokio::task::JoinHandle<()>,
}

impl Actor for LivenessMonitor {
    type Msg = LivenessMsg;
    type State = LivenessState;
    type Arguments = LivenessArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LivenessMsg>,
        args: LivenessArgs,
    ) -> Result<LivenessState, ActorProcessingErr> {
        let nodes: Vec<NodeId> = args
            .replica
            .reader()
            .read(|state| state.nodes.keys().copied().collect());
        args.table.reset(nodes.into_iter());
        let ticker = ractor::time::send_interval(args.lease / 8, myself.get_cell(), || LivenessMsg::Check);
        Ok(LivenessState { args, ticker })
    }

    async fn handle(
        &self,
        _myself: ActorRef<LivenessMsg>,
        message: LivenessMsg,
        state: &mut LivenessState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LivenessMsg::Check => {
                let me = state.args.replica.node_id();
                state.args.table.report(me);
                let marked: Vec<(NodeId, bool)> = state
                    .args
                    .replica
                    .reader()
                    .read(|cluster| cluster.nodes.values().map(|node| (node.id, node.up)).collect());
                let table = state.args.table.clone();
                let commands =
                    liveness_changes(&marked, |node| table.last_seen(node), Instant::now(), state.args.lease);
                for command in commands {
                    tracing::info!(command = command.name(), ?command, "liveness change");
                    if let Err(error) = state.args.replica.write(command).await {
                        tracing::warn!(%error, "writing a liveness change failed; retrying on the next check");
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<LivenessMsg>,
        state: &mut LivenessState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_nodes_go_down_and_reporting_nodes_come_back() {
        let now = Instant::now();
        let lease = Duration::from_secs(3);
        let seen = |node: NodeId| match node {
            1 => Some(now),
            2 => Some(now - Duration::from_secs(4)),
            3 => Some(now - Duration::from_secs(1)),
            _ => None,
        };
        let commands = liveness_changes(&[(1, true), (2, true), (3, false), (4, true)], seen, now, lease);
        assert_eq!(
            commands,
            vec![
                Command::NodeDown { node: 2 },
                Command::NodeUp { node: 3 },
                Command::NodeDown { node: 4 },
            ]
        );
    }
}
