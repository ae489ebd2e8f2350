//! Durable events routed to watch streams by agent.
//!
//! The state machine broadcasts every applied event to every subscriber. A watch stream wants
//! one agent's, so if each stream subscribed to that broadcast, every event would wake and be
//! cloned into every open stream, and 10,000 streams would cost 10,000 wake-ups per event
//! whatever agent it was for. The hub is the broadcast's one subscriber on the API side: it
//! forwards each event, shared behind an `Arc`, to a small broadcast of its agent's, which only
//! that agent's watchers hold.
//!
//! Gaps are never hidden. A watcher that falls more than [`AGENT_EVENT_BUFFER`] events behind
//! its agent's broadcast sees `Lagged` and catches up from the state, as it did from the global
//! broadcast. If the hub itself lags behind the state machine, it drops every agent's broadcast:
//! each watcher then sees its channel close, subscribes again and catches up from the state
//! (subscribing before reading, so nothing applied in between is missed). The hub also looks
//! for deleted agents (a deletion produces no event) once per [`DELETE_CHECK`] for all
//! watchers at once, and closes their channels the same way; the watcher then finds its agent
//! gone and ends the stream with NOT_FOUND.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_raft::store::StateReader;
use flotilla_raft::{AgentId, DurableEvent};
use tokio::sync::broadcast;

/// Events buffered per watched agent for its slowest watcher before that watcher catches up
/// from the state instead.
pub const AGENT_EVENT_BUFFER: usize = 64;
/// How often the hub looks for watched agents that were deleted.
pub const DELETE_CHECK: Duration = Duration::from_secs(1);

pub type AgentEvents = broadcast::Receiver<Arc<DurableEvent>>;

#[derive(Default)]
struct Routes {
    by_agent: HashMap<AgentId, broadcast::Sender<Arc<DurableEvent>>>,
    /// Set when the state machine's broadcast closed (the node is stopping).
    stopped: bool,
}

/// Routes durable events to the watchers of their agent; cheap to clone.
#[derive(Clone)]
pub struct WatchHub {
    routes: Arc<Mutex<Routes>>,
}

impl WatchHub {
    /// Subscribes to the state machine's events and starts routing them; the task ends when
    /// that broadcast closes.
    pub fn start(reader: StateReader) -> WatchHub {
        let hub = WatchHub {
            routes: Arc::new(Mutex::new(Routes::default())),
        };
        let events = reader.subscribe_events();
        tokio::spawn(hub.clone().route(reader, events));
        hub
    }

    /// The events of `agent` applied from now on; `None` once the node is stopping. A closed
    /// channel means "catch up from the state and subscribe again".
    pub fn subscribe(&self, agent: AgentId) -> Option<AgentSubscription> {
        let mut routes = self.lock();
        if routes.stopped {
            return None;
        }
        let receiver = routes
            .by_agent
            .entry(agent)
            .or_insert_with(|| broadcast::channel(AGENT_EVENT_BUFFER).0)
            .subscribe();
        Some(AgentSubscription {
            events: Some(receiver),
            agent,
            hub: self.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().expect("watch hub lock poisoned")
    }

    async fn route(self, reader: StateReader, mut events: broadcast::Receiver<DurableEvent>) {
        let mut delete_check = tokio::time::interval(DELETE_CHECK);
        delete_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = events.recv() => match received {
                    Ok(event) => self.forward(event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "watch hub fell behind the applied events; every watcher catches up from the state");
                        self.lock().by_agent.clear();
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let mut routes = self.lock();
                        routes.stopped = true;
                        routes.by_agent.clear();
                        return;
                    }
                },
                _ = delete_check.tick() => self.close_deleted(&reader),
            }
        }
    }

    fn forward(&self, event: DurableEvent) {
        let mut routes = self.lock();
        let agent = event.agent;
        if let Some(sender) = routes.by_agent.get(&agent) {
            // Fails only when every receiver is gone, which their guards normally tidy.
            if sender.send(Arc::new(event)).is_err() {
                routes.by_agent.remove(&agent);
            }
        }
    }

    /// Closes the channels of watched agents the state no longer holds.
    fn close_deleted(&self, reader: &StateReader) {
        let watched: Vec<AgentId> = self.lock().by_agent.keys().copied().collect();
        if watched.is_empty() {
            return;
        }
        let deleted: Vec<AgentId> = reader.read(|state| {
            watched
                .into_iter()
                .filter(|agent| !state.agents.contains_key(agent))
                .collect()
        });
        if deleted.is_empty() {
            return;
        }
        let mut routes = self.lock();
        for agent in deleted {
            routes.by_agent.remove(&agent);
        }
    }
}

/// One watcher's subscription to one agent's events. Dropping it removes the agent's channel
/// once no watcher holds it, so the hub holds channels only for agents being watched.
pub struct AgentSubscription {
    events: Option<AgentEvents>,
    agent: AgentId,
    hub: WatchHub,
}

impl AgentSubscription {
    pub fn events(&mut self) -> &mut AgentEvents {
        self.events.as_mut().expect("present until dropped")
    }
}

impl Drop for AgentSubscription {
    fn drop(&mut self) {
        // The receiver goes first, so that the count below no longer includes it.
        drop(self.events.take());
        let mut routes = self.hub.lock();
        if routes
            .by_agent
            .get(&self.agent)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            routes.by_agent.remove(&self.agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(agent: AgentId, sequence: u64) -> DurableEvent {
        DurableEvent {
            agent,
            sequence,
            at_ms: 0,
            node: None,
            kind: flotilla_raft::EventKind::FollowUpAccepted {
                text: "go on".to_string(),
                index: 0,
            },
        }
    }

    fn hub() -> WatchHub {
        WatchHub {
            routes: Arc::new(Mutex::new(Routes::default())),
        }
    }

    #[test]
    fn events_reach_only_their_agents_watchers() {
        let hub = hub();
        let (first, second) = (AgentId::new(), AgentId::new());
        let mut watching_first = hub.subscribe(first).unwrap();
        let mut watching_second = hub.subscribe(second).unwrap();
        hub.forward(event(first, 1));
        assert_eq!(watching_first.events().try_recv().unwrap().sequence, 1);
        assert!(matches!(
            watching_second.events().try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }

    #[test]
    fn a_channel_lives_as_long_as_a_watcher_holds_it() {
        let hub = hub();
        let agent = AgentId::new();
        let first = hub.subscribe(agent).unwrap();
        let second = hub.subscribe(agent).unwrap();
        drop(first);
        assert_eq!(hub.lock().by_agent.len(), 1);
        drop(second);
        assert!(hub.lock().by_agent.is_empty());
        // An event for an agent nobody watches is dropped without creating a channel.
        hub.forward(event(agent, 2));
        assert!(hub.lock().by_agent.is_empty());
    }

    #[test]
    fn a_watcher_too_far_behind_is_told_it_lagged() {
        let hub = hub();
        let agent = AgentId::new();
        let mut watching = hub.subscribe(agent).unwrap();
        for sequence in 1..=(AGENT_EVENT_BUFFER as u64 + 1) {
            hub.forward(event(agent, sequence));
        }
        assert!(matches!(
            watching.events().try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(1))
        ));
    }

    #[test]
    fn dropping_the_routes_closes_every_watchers_channel() {
        let hub = hub();
        let mut watching = hub.subscribe(AgentId::new()).unwrap();
        hub.lock().by_agent.clear();
        assert!(matches!(
            watching.events().try_recv(),
            Err(broadcast::error::TryRecvError::Closed)
        ));
    }
}
