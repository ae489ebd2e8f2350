//! Live events (an agent's log lines as they happen) shared by the watch streams of one agent.
//!
//! A live subscription is an actor in the agent's process group (mesh::Subscription). One per
//! stream would cost every stream an actor, its mailboxes and a group entry, and every live
//! event one delivery per stream. The hub keeps one subscription per watched agent and hands
//! its events, behind an `Arc`, to that agent's streams through a broadcast of
//! [`LIVE_EVENTS_PER_AGENT`] events.
//!
//! A stream sees what a subscription of its own would have shown. Its receiver exists before
//! anything is asked of the agent, so nothing sent after it subscribed is missed. The agent
//! announces itself whenever a member joins its group: a stream that shares an existing
//! subscription joins that subscription's actor again ([`flotilla_actors::mesh::Rejoin`]), so
//! it gets the announcement too (the agent's other watchers see one more, as they did
//! whenever any watcher joined). A stream that falls more than the buffer behind loses the
//! oldest events, counted as dropped live events exactly as a full buffer of its own counted
//! them; live events are best-effort, the durable ones are caught up from the state. When the
//! subscription ends (the node is stopping) every stream sees its end. The subscription lives
//! while a stream holds it: the last one gone stops it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use flotilla_actors::mesh::{Mesh, MeshError, Rejoin, Subscription};
use flotilla_raft::AgentId;
use tokio::sync::{broadcast, oneshot};

/// Live events buffered per watched agent for its slowest stream (the buffer a stream had of
/// its own before).
pub const LIVE_EVENTS_PER_AGENT: usize = super::LIVE_EVENTS_PER_WATCHER;

type Routes = Arc<Mutex<HashMap<AgentId, Weak<AgentLive>>>>;

/// One subscription per watched agent; cheap to clone.
#[derive(Clone)]
pub struct LiveHub {
    mesh: Mesh,
    routes: Routes,
}

/// The shared part of one agent's live subscription.
struct AgentLive {
    agent: AgentId,
    /// Never read: new streams' receivers are made from it.
    template: broadcast::Receiver<Arc<Vec<u8>>>,
    rejoin: Rejoin,
    /// Dropped with the last stream, which ends the forwarding task and the subscription.
    _stop: oneshot::Sender<()>,
    routes: Routes,
}

impl Drop for AgentLive {
    fn drop(&mut self) {
        let mut routes = lock(&self.routes);
        if routes.get(&self.agent).is_some_and(|live| live.strong_count() == 0) {
            routes.remove(&self.agent);
        }
    }
}

/// One stream's view of its agent's live events.
pub struct LiveEvents {
    events: broadcast::Receiver<Arc<Vec<u8>>>,
    mesh: Mesh,
    _shared: Arc<AgentLive>,
}

impl LiveEvents {
    /// The next encoded `AgentEvent`; `None` once the subscription ended. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Arc<Vec<u8>>> {
        loop {
            match self.events.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => self.mesh.record_dropped_live_events(missed),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<AgentId, Weak<AgentLive>>> {
    routes.lock().expect("live hub lock poisoned")
}

impl LiveHub {
    pub fn new(mesh: Mesh) -> LiveHub {
        LiveHub {
            mesh,
            routes: Routes::default(),
        }
    }

    /// The live events of `agent` from now on, starting with its announcement when it runs.
    pub async fn subscribe(&self, agent: AgentId) -> Result<LiveEvents, MeshError> {
        if let Some(shared) = lock(&self.routes).get(&agent).and_then(Weak::upgrade) {
            return Ok(self.join(shared));
        }
        let subscription = self.mesh.subscribe(&agent.to_string()).await?;
        let (sender, template) = broadcast::channel(LIVE_EVENTS_PER_AGENT);
        let (stop, stopped) = oneshot::channel();
        let shared = Arc::new(AgentLive {
            agent,
            template,
            rejoin: subscription.rejoin_handle(),
            _stop: stop,
            routes: self.routes.clone(),
        });
        let events = shared.template.resubscribe();
        {
            let mut routes = lock(&self.routes);
            if let Some(other) = routes.get(&agent).and_then(Weak::upgrade) {
                // Another stream of the same agent subscribed meanwhile: share its
                // subscription; this one stops (its actor leaves the group).
                drop(routes);
                drop(shared);
                return Ok(self.join(other));
            }
            routes.insert(agent, Arc::downgrade(&shared));
        }
        tokio::spawn(forward(subscription, sender, stopped));
        Ok(LiveEvents {
            events,
            mesh: self.mesh.clone(),
            _shared: shared,
        })
    }

    /// A new stream on an existing subscription: its receiver first, then the join that
    /// makes the agent announce itself.
    fn join(&self, shared: Arc<AgentLive>) -> LiveEvents {
        let events = shared.template.resubscribe();
        shared.rejoin.rejoin();
        LiveEvents {
            events,
            mesh: self.mesh.clone(),
            _shared: shared,
        }
    }

    #[cfg(test)]
    fn watched(&self) -> usize {
        lock(&self.routes).len()
    }
}

/// Moves the subscription's events into the agent's broadcast until the last stream is gone
/// or the subscription ends. Never waits on a stream: a send to a broadcast does not block.
async fn forward(
    mut subscription: Subscription,
    sender: broadcast::Sender<Arc<Vec<u8>>>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            received = subscription.events.recv() => match received {
                // Fails only when no stream holds a receiver, and then `stop` follows.
                Some(event) => { let _ = sender.send(Arc::new(event)); }
                None => return,
            },
            _ = &mut stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flotilla_actors::mesh::{live_group_name, MeshConfig};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    async fn mesh() -> Mesh {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        Mesh::start(MeshConfig {
            node_id: 1,
            listen_port: port,
            cluster_secret: "live-hub-test".to_string(),
            max_live_events_per_watcher: 16,
            listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            tls: None,
        })
        .await
        .expect("start a mesh")
    }

    async fn next(events: &mut LiveEvents) -> Vec<u8> {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("an event within the deadline")
            .expect("the subscription is open")
            .to_vec()
    }

    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "waited {WAIT:?} for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn the_streams_of_one_agent_share_one_subscription_that_ends_with_the_last() {
        let mesh = mesh().await;
        let hub = LiveHub::new(mesh.clone());
        let agent = AgentId::new();
        let group = live_group_name(&agent.to_string());
        let mut first = hub.subscribe(agent).await.expect("subscribe");
        let mut second = hub.subscribe(agent).await.expect("subscribe again");
        assert_eq!(hub.watched(), 1);
        assert_eq!(
            ractor::pg::get_members(&group).len(),
            1,
            "one actor in the agent's group"
        );
        mesh.publish(&agent.to_string(), b"line".to_vec());
        assert_eq!(next(&mut first).await, b"line");
        assert_eq!(next(&mut second).await, b"line");
        drop(first);
        mesh.publish(&agent.to_string(), b"more".to_vec());
        assert_eq!(next(&mut second).await, b"more");
        drop(second);
        assert_eq!(hub.watched(), 0);
        wait_until("the shared subscription to leave the group", || {
            ractor::pg::get_members(&group).is_empty()
        })
        .await;
        mesh.shutdown().await;
    }

    #[tokio::test]
    async fn a_stream_that_falls_behind_loses_the_oldest_events_and_they_are_counted() {
        let mesh = mesh().await;
        let hub = LiveHub::new(mesh.clone());
        let agent = AgentId::new();
        let mut slow = hub.subscribe(agent).await.expect("subscribe");
        let mut keeping_up = hub.subscribe(agent).await.expect("subscribe again");
        let total = LIVE_EVENTS_PER_AGENT + 3;
        // In steps the mesh's own buffer (16) takes, read as they come by one stream only.
        for step in 0..total.div_ceil(8) {
            for index in step * 8..((step + 1) * 8).min(total) {
                mesh.publish(&agent.to_string(), index.to_string().into_bytes());
            }
            for index in step * 8..((step + 1) * 8).min(total) {
                assert_eq!(next(&mut keeping_up).await, index.to_string().into_bytes());
            }
        }
        // The slow stream gets the newest buffer-full, after counting what it lost.
        assert_eq!(next(&mut slow).await, 3.to_string().into_bytes());
        assert_eq!(mesh.event_dropped_count(), 3);
        mesh.shutdown().await;
    }
}
