//! Live events: publishing to an agent's process group, and the watcher actors behind each
//! [`Subscription`].

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, Message, SupervisionEvent};
use tokio::sync::mpsc;

use super::{live_group_name, Mesh, MeshError, LIVE_EVENT_VARIANT};

impl Mesh {
    /// Sends one live event of `agent_id` (an encoded `AgentEvent`) to every subscriber
    /// of that agent on any linked node. Never blocks and never fails: an event nobody
    /// listens to is dropped, and a member that cannot take it is skipped.
    pub fn publish(&self, agent_id: &str, event: Vec<u8>) {
        let group = live_group_name(agent_id);
        let mut members = ractor::pg::get_members(&group);
        let Some(last_member) = members.pop() else {
            tracing::debug!(agent_id, "live event has no subscriber");
            return;
        };
        for member in members {
            deliver_live_event(agent_id, &member, event.clone());
        }
        deliver_live_event(agent_id, &last_member, event);
    }

    /// Subscribes to the live events of `agent_id`, wherever the agent runs. Events
    /// arrive in the returned subscription's bounded buffer; dropping it leaves the group.
    pub async fn subscribe(&self, agent_id: &str) -> Result<Subscription, MeshError> {
        self.ensure_running()?;
        let (sender, events) = mpsc::channel(self.inner.max_live_events_per_watcher);
        let dropped_here = Arc::new(AtomicU64::new(0));
        let arguments = WatcherArguments {
            group: live_group_name(agent_id),
            sender,
            dropped_here: dropped_here.clone(),
            dropped_on_node: self.inner.events_dropped.clone(),
        };
        // Unnamed: any number of watchers may exist, and names are process-global.
        let (watcher, _) = Actor::spawn_linked(
            None,
            LiveEventWatcher,
            arguments,
            self.inner.watcher_supervisor.get_cell(),
        )
        .await
        .map_err(|error| MeshError::Spawn {
            what: "live event watcher",
            reason: error.to_string(),
        })?;
        Ok(Subscription {
            events,
            watcher,
            dropped_here,
            group: live_group_name(agent_id),
        })
    }

    /// Counts `count` live events a subscriber further on lost because it fell behind (a
    /// watcher sharing one subscription with others), as a full subscription buffer counts.
    pub fn record_dropped_live_events(&self, count: u64) {
        self.inner.events_dropped.fetch_add(count, Ordering::Relaxed);
        ::metrics::counter!(crate::metrics::MESH_LIVE_EVENTS_DROPPED_TOTAL).increment(count);
    }

    /// Total live events dropped on this node because a subscriber's buffer was full.
    pub fn event_dropped_count(&self) -> u64 {
        self.inner.events_dropped.load(Ordering::Relaxed)
    }
}

/// Sends one event to one group member: a local watcher, or the proxy of a watcher on
/// another node, which serialises it onto that node's link.
fn deliver_live_event(agent_id: &str, member: &ActorCell, event: Vec<u8>) {
    if let Err(error) = member.send_message(WatcherMessage::LiveEvent(event)) {
        tracing::debug!(
            agent_id,
            watcher = %member.get_id(),
            %error,
            "live event not delivered"
        );
    }
}

/// A subscription to one agent's live events. Dropping it stops its watcher actor,
/// which leaves the agent's process group.
pub struct Subscription {
    /// Encoded `AgentEvent`s in the order this node received them.
    pub events: mpsc::Receiver<Vec<u8>>,
    watcher: ActorRef<WatcherMessage>,
    dropped_here: Arc<AtomicU64>,
    group: String,
}

impl Subscription {
    /// A handle to join the agent's group again, for a subscription shared by several
    /// watchers (see [`Rejoin`]).
    pub fn rejoin_handle(&self) -> Rejoin {
        Rejoin {
            group: self.group.clone(),
            watcher: self.watcher.get_cell(),
        }
    }

    /// Events dropped because this subscription's buffer was full.
    pub fn dropped_count(&self) -> u64 {
        self.dropped_here.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Subscription")
            .field("watcher", &self.watcher.get_id())
            .field("dropped", &self.dropped_count())
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.watcher.stop(Some("subscription dropped".to_string()));
    }
}

impl futures::Stream for Subscription {
    type Item = Vec<u8>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        self.events.poll_recv(context)
    }
}

/// Joins a subscription's watcher to its agent's group again. The agent announces itself to
/// the group whenever a member joins (a repeated join counts), so a new watcher that shares
/// an existing subscription asks for the announcement a subscription of its own would have
/// brought; the other members receive it too, as they do when any watcher joins.
#[derive(Clone)]
pub struct Rejoin {
    group: String,
    watcher: ActorCell,
}

impl Rejoin {
    pub fn rejoin(&self) {
        ractor::pg::join(self.group.clone(), vec![self.watcher.clone()]);
    }
}

/// What a watcher receives, locally or from another node.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WatcherMessage {
    /// One encoded `AgentEvent`.
    LiveEvent(Vec<u8>),
}

// Implemented by hand rather than derived so that the wire name of the variant is fixed
// here and an unknown variant from a newer node is refused (ractor then drops it).
impl Message for WatcherMessage {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            WatcherMessage::LiveEvent(event) => Ok(SerializedMessage::Cast {
                variant: LIVE_EVENT_VARIANT.to_string(),
                args: event,
                metadata: None,
            }),
        }
    }

    fn deserialize(message: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match message {
            SerializedMessage::Cast { variant, args, .. } if variant == LIVE_EVENT_VARIANT => {
                Ok(WatcherMessage::LiveEvent(args))
            }
            _ => Err(BoxedDowncastErr),
        }
    }
}

struct WatcherArguments {
    group: String,
    sender: mpsc::Sender<Vec<u8>>,
    dropped_here: Arc<AtomicU64>,
    dropped_on_node: Arc<AtomicU64>,
}

/// Forwards a process group's live events into one subscription's bounded buffer.
struct LiveEventWatcher;

impl Actor for LiveEventWatcher {
    type Msg = WatcherMessage;
    type State = WatcherArguments;
    type Arguments = WatcherArguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        arguments: WatcherArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Leaving is automatic: ractor removes a stopping actor from all its groups.
        ractor::pg::join(arguments.group.clone(), vec![myself.get_cell()]);
        Ok(arguments)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: WatcherMessage,
        state: &mut WatcherArguments,
    ) -> Result<(), ActorProcessingErr> {
        let WatcherMessage::LiveEvent(event) = message;
        match state.sender.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let dropped = state.dropped_here.fetch_add(1, Ordering::Relaxed) + 1;
                state.dropped_on_node.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(crate::metrics::MESH_LIVE_EVENTS_DROPPED_TOTAL).increment(1);
                // Logged at powers of two so a stalled reader cannot flood the log.
                if dropped.is_power_of_two() {
                    tracing::debug!(
                        group = %state.group,
                        dropped,
                        "live event buffer full; dropping events"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                myself.stop(Some("subscription receiver dropped".to_string()));
            }
        }
        Ok(())
    }
}

/// Parent of this node's watchers, so that `shutdown` can end them all. It never
/// receives messages; a watcher's exit or failure is logged and nothing else.
pub(super) struct WatcherSupervisor;

/// Uninhabited: the watcher supervisor takes no messages. Not serializable, so it is
/// never advertised to other nodes.
#[derive(Debug)]
pub(super) enum WatcherSupervisorMessage {}

impl Message for WatcherSupervisorMessage {}

impl Actor for WatcherSupervisor {
    type Msg = WatcherSupervisorMessage;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, _arguments: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: WatcherSupervisorMessage,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match message {}
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        // The default would stop the supervisor when any one watcher exits.
        if let SupervisionEvent::ActorFailed(watcher, reason) = event {
            tracing::warn!(watcher = %watcher.get_id(), %reason, "live event watcher failed");
        }
        Ok(())
    }
}
