//! Waking an actor when the replicated state changes, without flooding its mailbox.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use flotilla_raft::Replica;
use ractor::ActorRef;

/// Sends `message()` to `actor` after every applied change, but never queues more than one:
/// the actor calls [`AppliedFollower::taken`] when it handles the message, and changes that
/// arrive before then are covered by the message already queued.
pub struct AppliedFollower {
    queued: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl AppliedFollower {
    pub fn start<M: ractor::Message>(
        replica: &Replica,
        actor: ActorRef<M>,
        message: impl Fn() -> M + Send + 'static,
    ) -> AppliedFollower {
        let queued = Arc::new(AtomicBool::new(false));
        let mut applied = replica.reader().applied_watch();
        let task_queued = queued.clone();
        let task = tokio::spawn(async move {
            loop {
                if !task_queued.swap(true, Ordering::AcqRel) && actor.cast(message()).is_err() {
                    return;
                }
                if applied.changed().await.is_err() {
                    return;
                }
            }
        });
        AppliedFollower { queued, task }
    }

    /// The queued message is being handled; the next change queues another.
    pub fn taken(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

impl Drop for AppliedFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}
