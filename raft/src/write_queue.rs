//! Group commit without a hop: the writes a node proposes are grouped into batches (one Raft
//! entry each), at most [`MAX_BATCHES_IN_FLIGHT`] at a time.
//!
//! A write that finds a free batch slot and nobody waiting commits itself at once, in its own
//! task: an idle node adds no task switch to a write. Writes that find every slot taken wait in
//! the queue; when a batch finishes, everything that queued meanwhile (up to the batch limits)
//! leaves together as the next batch, in a task of its own. Under load batches therefore grow
//! with the load, and a lone write never waits for a batcher to wake up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::command::{Command, Response};
use crate::replica::{Replica, WriteError};

/// Writes waiting for the next batch; callers wait for room beyond this.
pub const WRITE_QUEUE_CAPACITY: usize = 8_192;
/// Most commands in one log entry.
pub const MAX_BATCH_COMMANDS: usize = 1_024;
/// Most (estimated) bytes in one log entry.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Batches proposed and not yet answered; more writes wait and join a later, larger batch.
pub const MAX_BATCHES_IN_FLIGHT: usize = 4;

pub(crate) struct PendingWrite {
    pub(crate) command: Command,
    pub(crate) reply: oneshot::Sender<Result<Response, WriteError>>,
    /// The caller's `raft.write` span: the batch that carries the write is traced under it.
    pub(crate) span: tracing::Span,
    /// Its place in the queue, given back when the write leaves in a batch.
    _room: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Slots {
    waiting: VecDeque<PendingWrite>,
    in_flight: usize,
}

/// The queue and the batch slots of one replica.
pub(crate) struct WriteQueue {
    slots: Mutex<Slots>,
    room: Arc<Semaphore>,
}

/// What [`WriteQueue::enter`] decided for a write. Lives for one call on the caller's stack, so
/// the size of the command it hands back costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Entry {
    /// A slot was free: the caller commits its write itself, holding the slot until the guard
    /// drops.
    Now(SlotGuard, Command),
    /// Every slot is taken: the answer comes through this receiver.
    Queued(oneshot::Receiver<Result<Response, WriteError>>),
}

/// A batch slot held by a commit in progress. Dropping it (also when the caller's future is
/// dropped mid-commit) frees the slot and sends whatever queued meanwhile as the next batch.
pub(crate) struct SlotGuard {
    replica: Weak<crate::replica::Inner>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.replica.upgrade() {
            finish_batch(Replica::from_inner(inner));
        }
    }
}

impl WriteQueue {
    pub(crate) fn new() -> WriteQueue {
        WriteQueue {
            slots: Mutex::new(Slots::default()),
            room: Arc::new(Semaphore::new(WRITE_QUEUE_CAPACITY)),
        }
    }

    /// Takes a slot for `command` if one is free and nobody waits, else queues it.
    pub(crate) async fn enter(
        &self,
        replica: &Replica,
        command: Command,
        span: &tracing::Span,
    ) -> Result<Entry, WriteError> {
        {
            let mut slots = self.slots.lock().expect("write queue lock poisoned");
            if slots.waiting.is_empty() && slots.in_flight < MAX_BATCHES_IN_FLIGHT {
                slots.in_flight += 1;
                return Ok(Entry::Now(replica.slot_guard(), command));
            }
        }
        // Waits for room outside the lock; the semaphore is never closed while the queue lives.
        let room = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| WriteError::Fatal("the write queue has stopped".to_string()))?;
        let (reply, answer) = oneshot::channel();
        let write = PendingWrite {
            command,
            reply,
            span: span.clone(),
            _room: room,
        };
        let mut slots = self.slots.lock().expect("write queue lock poisoned");
        if slots.waiting.is_empty() && slots.in_flight < MAX_BATCHES_IN_FLIGHT {
            // A slot freed while this write waited for room: it goes now, alone.
            slots.in_flight += 1;
            drop(slots);
            return Ok(Entry::Now(replica.slot_guard(), write.command));
        }
        slots.waiting.push_back(write);
        Ok(Entry::Queued(answer))
    }

    /// Takes the next batch off the queue, if any, and counts it in flight.
    fn next_batch(&self) -> Option<Vec<PendingWrite>> {
        let mut slots = self.slots.lock().expect("write queue lock poisoned");
        slots.in_flight = slots.in_flight.saturating_sub(1);
        if slots.waiting.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            let Some(next) = slots.waiting.pop_front() else {
                break;
            };
            bytes += next.command.approximate_bytes();
            batch.push(next);
        }
        slots.in_flight += 1;
        Some(batch)
    }
}

impl Replica {
    fn slot_guard(&self) -> SlotGuard {
        SlotGuard {
            replica: self.downgrade(),
        }
    }
}

/// Frees a finished batch's slot and sends the next batch, if writes queued, in a task of its
/// own (the task that finished answers its caller at once).
fn finish_batch(replica: Replica) {
    let Some(batch) = replica.write_queue().next_batch() else {
        return;
    };
    let guard = replica.slot_guard();
    let commit = async move {
        let _guard = guard;
        replica.commit_batch(batch).await;
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(commit);
        }
        Err(_) => {
            // No runtime (a replica dropped outside one): the queued writes' callers see their
            // answer channel close, which they report as a failed write.
            tracing::warn!("a write batch could not be sent: no async runtime");
        }
    }
}
