//! Group commit without a hop: the writes a node proposes are grouped into batches (one Raft
//! entry each), at most [`MAX_BATCHES_IN_FLIGHT`] at a time.
//!
//! A write that finds a free batch slot and nobody waiting commits itself at once, in its own
//! task: an idle node adds no task switch to a write. Writes that find every slot taken wait in
//! the queue; when a batch finishes, everything that queued meanwhile (up to the batch limits)
//! leaves together as the next batch, in a task of its own. Under load batches therefore grow
//! with the load, and a lone write never waits for a batcher to wake up.
//!
//! Under load a batch slot is held briefly after a large batch (see [`HOLD_AFTER_BATCH`]): the
//! writers a batch answers come back within a round trip, and without the hold the first of them
//! would find the slot free and take a whole entry for itself, with the rest queued behind it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::command::Command;
use crate::replica::{Applied, Replica, WriteError};

/// Writes waiting for the next batch; callers wait for room beyond this.
pub const WRITE_QUEUE_CAPACITY: usize = 8_192;
/// Most commands in one log entry.
pub const MAX_BATCH_COMMANDS: usize = 1_024;
/// Most (estimated) bytes in one log entry.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Batches proposed and not yet answered; more writes wait and join a later, larger batch.
///
/// One: openraft 0.9 sends a follower one append at a time, so a second batch in flight
/// leaves no sooner than the first one's acknowledgement either way, and waiting for the
/// first one's answer instead costs only its apply. What it saves is entries: with one batch
/// in flight the same writes make fewer, larger entries, so fewer appends, syncs, messages and
/// applies, which on a busy node is CPU for other writes (`make bench-compare`, three nodes:
/// about 10 % more writes a second at 64 and 256 clients than with four; one node 5-25 %;
/// docs/performance.md, "One batch in flight"). Replication that pipelines appends would
/// make more than one worth measuring again.
pub const MAX_BATCHES_IN_FLIGHT: usize = 1;
/// A batch of at least this many writes is followed by a hold: its slot is not freed until
/// [`HOLD_SHARE_PERCENT`] of its size has queued again, or [`HOLD_FOR`] has passed. A node
/// that carries fewer concurrent writes than this never holds, so a lone writer never waits.
///
/// Without the hold, the first write to arrive after a large batch finds the slot free and
/// nobody queued, and goes alone: an entry, an append to each follower, three syncs and an
/// apply for one write, while the rest of the returning writers queue behind it. With 64
/// clients on three nodes more than a fifth of the leader's entries carried one to three writes
/// (docs/performance.md, "A held slot after a large batch").
pub const HOLD_AFTER_BATCH: usize = 8;
/// The share (percent) of the last batch's size that ends a hold once queued.
pub const HOLD_SHARE_PERCENT: usize = 75;
/// The longest hold. tokio's timers tick in milliseconds, so a hold that runs out lasts one to
/// two: it runs out only when the load has just fallen away.
pub const HOLD_FOR: Duration = Duration::from_millis(1);

pub(crate) struct PendingWrite {
    pub(crate) command: Command,
    pub(crate) reply: oneshot::Sender<Result<Applied, WriteError>>,
    /// The caller's `raft.write` span: the batch that carries the write is traced under it.
    pub(crate) span: tracing::Span,
    /// Its place in the queue, given back when the write leaves in a batch.
    _room: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Slots {
    waiting: VecDeque<PendingWrite>,
    in_flight: usize,
    /// Writes in the batch that took a slot last.
    last_batch: usize,
    /// A finished batch's slot held for the writes that come back (see [`HOLD_AFTER_BATCH`]).
    hold: Option<Hold>,
}

/// A held slot: counted in flight until the hold ends.
struct Hold {
    /// Queued writes that end the hold.
    wanted: usize,
    /// Wakes the task that ends the hold; taken when `wanted` is reached.
    wake: Option<oneshot::Sender<()>>,
}

/// What a finished batch's slot does next.
enum Finished {
    /// Held: a task waits on this for the returning writes, or for [`HOLD_FOR`].
    Held(oneshot::Receiver<()>),
    /// Freed, and these batches took slots (each counted in flight).
    Next(Vec<Vec<PendingWrite>>),
}

impl Slots {
    /// Takes a batch slot for a write that goes now: only when one is free and nobody waits
    /// (a write never overtakes queued ones).
    fn take_free_slot(&mut self) -> bool {
        let free = self.waiting.is_empty() && self.in_flight < MAX_BATCHES_IN_FLIGHT;
        if free {
            self.in_flight += 1;
            self.last_batch = 1;
        }
        free
    }

    /// Queues a write, waking a hold whose wanted number of writes it completes.
    fn queue(&mut self, write: PendingWrite) {
        self.waiting.push_back(write);
        if let Some(hold) = &mut self.hold {
            if self.waiting.len() >= hold.wanted {
                if let Some(wake) = hold.wake.take() {
                    let _ = wake.send(());
                }
            }
        }
    }

    /// A batch finished: holds its slot if the batch was large and few writes have queued
    /// since, else frees it and hands out the next batches.
    fn finish(&mut self) -> Finished {
        if self.last_batch >= HOLD_AFTER_BATCH {
            let wanted = (self.last_batch * HOLD_SHARE_PERCENT / 100).max(1);
            if self.waiting.len() < wanted {
                let (wake, woken) = oneshot::channel();
                self.hold = Some(Hold {
                    wanted,
                    wake: Some(wake),
                });
                return Finished::Held(woken);
            }
        }
        Finished::Next(self.release())
    }

    /// Frees a finished batch's slot and drops every queued write, for a queue that can send
    /// nothing any more; answers how many were dropped.
    fn abandon(&mut self) -> usize {
        self.hold = None;
        self.in_flight = self.in_flight.saturating_sub(1);
        let dropped = self.waiting.len();
        self.waiting.clear();
        dropped
    }

    /// Frees a finished (or held) batch's slot and takes batches off the queue for every free
    /// slot (each counted in flight), so that a backlog larger than one batch never waits for
    /// slots that are free.
    fn release(&mut self) -> Vec<Vec<PendingWrite>> {
        self.hold = None;
        self.in_flight = self.in_flight.saturating_sub(1);
        let mut batches = Vec::new();
        while !self.waiting.is_empty() && self.in_flight < MAX_BATCHES_IN_FLIGHT {
            let mut bytes = 0;
            let mut batch = Vec::new();
            while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
                let Some(next) = self.waiting.pop_front() else {
                    break;
                };
                bytes += next.command.approximate_bytes();
                batch.push(next);
            }
            self.in_flight += 1;
            self.last_batch = batch.len();
            batches.push(batch);
        }
        batches
    }
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
    Queued(oneshot::Receiver<Result<Applied, WriteError>>),
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
        if self.lock().take_free_slot() {
            return Ok(Entry::Now(replica.slot_guard(), command));
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
        let mut slots = self.lock();
        if slots.take_free_slot() {
            // A slot freed while this write waited for room: it goes now, alone.
            drop(slots);
            return Ok(Entry::Now(replica.slot_guard(), write.command));
        }
        slots.queue(write);
        Ok(Entry::Queued(answer))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().expect("write queue lock poisoned")
    }
}

impl Replica {
    fn slot_guard(&self) -> SlotGuard {
        SlotGuard {
            replica: self.downgrade(),
        }
    }
}

/// A finished batch's slot: held for the writes that come back (see [`HOLD_AFTER_BATCH`]), or
/// freed, with what queued meanwhile sent as the next batch.
fn finish_batch(replica: Replica) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime (a replica dropped outside one): nothing could send what queued, nor end
        // a hold. The slot is freed and the queued writes dropped: their callers see their
        // answer channel close, which they report as a failed write.
        let dropped = replica.write_queue().lock().abandon();
        if dropped > 0 {
            tracing::warn!(dropped, "queued writes could not be sent: no async runtime");
        }
        return;
    };
    let finished = replica.write_queue().lock().finish();
    match finished {
        Finished::Next(batches) => send_batches(&runtime, &replica, batches),
        Finished::Held(woken) => {
            let weak = replica.downgrade();
            let handle = runtime.clone();
            runtime.spawn(async move {
                let _ = tokio::time::timeout(HOLD_FOR, woken).await;
                // A replica gone meanwhile dropped its queue, and with it the queued writes'
                // answer channels.
                if let Some(inner) = weak.upgrade() {
                    let replica = Replica::from_inner(inner);
                    let batches = replica.write_queue().lock().release();
                    send_batches(&handle, &replica, batches);
                }
            });
        }
    }
}

/// Sends batches that took slots, each in a task of its own (the task that finished a batch
/// answers its caller at once).
fn send_batches(runtime: &tokio::runtime::Handle, replica: &Replica, batches: Vec<Vec<PendingWrite>>) {
    for batch in batches {
        let (replica, guard) = (replica.clone(), replica.slot_guard());
        runtime.spawn(async move {
            let _guard = guard;
            replica.commit_batch(batch).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::command::Response;

    /// A queued write for the slot tests, and the receiver its answer would come on.
    fn pending(room: &Arc<Semaphore>) -> PendingWrite {
        let (reply, _answer) = oneshot::channel();
        PendingWrite {
            command: Command::ReserveNodeId,
            reply,
            span: tracing::Span::none(),
            _room: room.clone().try_acquire_owned().expect("room"),
        }
    }

    fn next(finished: Finished) -> Vec<Vec<PendingWrite>> {
        match finished {
            Finished::Next(batches) => batches,
            Finished::Held(_) => panic!("the slot was held"),
        }
    }

    /// The slot a large batch finishes with stays taken (a lone write does not get it) until
    /// three quarters of that batch's size have queued again; then they leave as one batch.
    #[test]
    fn a_large_batch_holds_its_slot_until_three_quarters_of_it_queue_again() {
        let room = Arc::new(Semaphore::new(64));
        let mut slots = Slots::default();
        assert!(slots.take_free_slot(), "an idle queue gives a lone write the slot");
        for _ in 0..12 {
            slots.queue(pending(&room));
        }
        let batches = next(slots.finish());
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), vec![12]);
        assert_eq!(slots.in_flight, 1);

        let Finished::Held(mut woken) = slots.finish() else {
            panic!("a batch of 12 finishing with nobody queued did not hold its slot");
        };
        assert_eq!(slots.in_flight, 1, "a held slot is still taken");
        assert!(!slots.take_free_slot(), "a lone write took a held slot");
        for queued in 1..9 {
            slots.queue(pending(&room));
            assert!(woken.try_recv().is_err(), "woken with {queued} of 9 writes queued");
        }
        slots.queue(pending(&room));
        assert!(
            woken.try_recv().is_ok(),
            "nine queued writes (three quarters of 12) did not end the hold"
        );
        let batches = slots.release();
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), vec![9]);
        assert_eq!(slots.in_flight, 1);
    }

    /// Batches below the threshold, and large ones that find enough writes queued, free their
    /// slot at once; a hold that ends with nobody queued frees it too.
    #[test]
    fn small_batches_and_busy_queues_never_hold() {
        let room = Arc::new(Semaphore::new(64));
        let mut slots = Slots::default();
        assert!(slots.take_free_slot());
        for _ in 0..HOLD_AFTER_BATCH - 1 {
            slots.queue(pending(&room));
        }
        assert_eq!(next(slots.finish())[0].len(), HOLD_AFTER_BATCH - 1);
        assert!(next(slots.finish()).is_empty(), "a batch of 7 held its slot");
        assert_eq!(slots.in_flight, 0);

        assert!(slots.take_free_slot());
        for _ in 0..20 {
            slots.queue(pending(&room));
        }
        assert_eq!(next(slots.finish())[0].len(), 20);
        for _ in 0..15 {
            slots.queue(pending(&room));
        }
        assert_eq!(
            next(slots.finish())[0].len(),
            15,
            "15 queued after a batch of 20 must leave at once"
        );
        // 15 is a large batch too: finishing with nobody queued holds, and the hold's end frees
        // the slot for the next lone write.
        let Finished::Held(_) = slots.finish() else {
            panic!("a batch of 15 finishing with nobody queued did not hold its slot");
        };
        assert!(slots.release().is_empty());
        assert_eq!(slots.in_flight, 0);
        assert!(slots.take_free_slot(), "the slot stayed taken after its hold ended");
    }

    /// A hold that no returning write ends runs out by itself: a burst large enough to hold the
    /// slot after its batch, then a lone write, which is answered, and the queue ends idle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_that_no_write_ends_runs_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let replica = crate::replica::lone_leader(dir.path()).await;
        let burst = futures::future::join_all((0..40).map(|_| replica.write(Command::ReserveNodeId))).await;
        for answer in burst {
            answer.expect("a write of the burst");
        }
        let last_batch = replica.write_queue().lock().last_batch;
        assert!(
            last_batch >= HOLD_AFTER_BATCH,
            "the burst's last batch had {last_batch} writes: too few to hold the slot"
        );
        let lone = tokio::time::timeout(Duration::from_secs(10), replica.write(Command::ReserveNodeId)).await;
        lone.expect("a lone write after a held slot was not answered")
            .expect("the lone write");
        wait_idle(&replica).await;
        replica.shutdown().await;
    }

    fn idle(replica: &Replica) -> bool {
        let slots = replica.write_queue().slots.lock().expect("lock");
        slots.in_flight == 0 && slots.waiting.is_empty()
    }

    /// Waits (within 10 s, or fails) until no batch is in flight or held and nobody queues.
    async fn wait_idle(replica: &Replica) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !idle(replica) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the write queue never went idle"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Thousands of concurrent writes, some of whose callers give up mid-write: every write that
    /// is waited for is answered once and applied, far fewer log entries than writes are used
    /// (the queue groups them), and the queue ends idle (no slot leaked by a dropped caller).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_answered_once_and_leave_the_queue_idle() {
        let dir = tempfile::tempdir().expect("temp dir");
        let replica = crate::replica::lone_leader(dir.path()).await;
        let before = replica.reader().last_applied_index();
        const WRITES: usize = 3_000;
        let mut tasks = tokio::task::JoinSet::new();
        for number in 0..WRITES {
            let replica = replica.clone();
            tasks.spawn(async move {
                let write = replica.write(Command::ReserveNodeId);
                if number % 10 == 0 {
                    // This caller gives up at once: its future is dropped wherever it is.
                    let _ = tokio::time::timeout(Duration::from_micros(1), write).await;
                    return None;
                }
                match write.await.expect("write") {
                    Response::NodeId(id) => Some(id),
                    other => panic!("unexpected answer {other:?}"),
                }
            });
        }
        let mut ids = BTreeSet::new();
        let mut answered = 0;
        while let Some(joined) = tasks.join_next().await {
            if let Some(id) = joined.expect("task") {
                answered += 1;
                assert!(ids.insert(id), "node id {id} was handed out twice");
            }
        }
        assert_eq!(answered, WRITES - WRITES / 10);
        let entries = replica.reader().last_applied_index() - before;
        assert!(
            entries < answered as u64 / 2,
            "{answered} writes took {entries} log entries: they were not grouped"
        );
        wait_idle(&replica).await;
        // And it still takes writes.
        replica
            .write(Command::ReserveNodeId)
            .await
            .expect("a write after the burst");
        replica.shutdown().await;
    }

    /// Followers' batches forwarded to a leader join its queue: they share log entries with its
    /// own writes and with each other, instead of taking an entry each. Every forwarded command
    /// gets its own answer in order, and the index the follower waits for covers them all. A
    /// request of another command version is proposed as it came.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_batches_share_entries_with_the_leaders_writes() {
        use crate::command::Request;
        use crate::network::{decode, encode};
        use crate::replica::ForwardReply;

        let dir = tempfile::tempdir().expect("temp dir");
        let replica = crate::replica::lone_leader(dir.path()).await;
        let before = replica.reader().last_applied_index();
        const FORWARDED: usize = 200;
        const PER_BATCH: usize = 5;
        const LOCAL: usize = 1_000;
        let mut forwarded = tokio::task::JoinSet::new();
        for _ in 0..FORWARDED {
            let replica = replica.clone();
            forwarded.spawn(async move {
                let commands = vec![Command::ReserveNodeId; PER_BATCH];
                let payload = encode(&Request::new(Command::Batch { commands }));
                let answer = replica.handle_forward(&payload, true).await.expect("decodable");
                decode::<ForwardReply>(&answer).expect("a forward reply")
            });
        }
        let mut local = tokio::task::JoinSet::new();
        for _ in 0..LOCAL {
            let replica = replica.clone();
            local.spawn(async move { replica.write(Command::ReserveNodeId).await.expect("write") });
        }
        let mut ids = BTreeSet::new();
        while let Some(joined) = forwarded.join_next().await {
            let ForwardReply::Applied { result, index } = joined.expect("task") else {
                panic!("a forwarded batch was not applied");
            };
            assert!(index > before && index <= replica.reader().last_applied_index());
            let Ok(Response::Batch(results)) = result else {
                panic!("a forwarded batch was answered with {result:?}");
            };
            assert_eq!(results.len(), PER_BATCH);
            for result in results {
                let Ok(Response::NodeId(id)) = result else {
                    panic!("a forwarded command was answered with {result:?}");
                };
                assert!(ids.insert(id), "node id {id} was handed out twice");
            }
        }
        while let Some(joined) = local.join_next().await {
            let Response::NodeId(id) = joined.expect("task") else {
                panic!("unexpected answer");
            };
            assert!(ids.insert(id), "node id {id} was handed out twice");
        }
        assert_eq!(ids.len(), FORWARDED * PER_BATCH + LOCAL);
        let entries = replica.reader().last_applied_index() - before;
        assert!(
            entries < FORWARDED as u64,
            "{FORWARDED} forwarded batches and {LOCAL} writes took {entries} log entries: the batches were not merged"
        );

        // Another command version is proposed as it came: one entry, answered as a whole.
        let mut other_version = Request::new(Command::ReserveNodeId);
        other_version.version += 1;
        let answer = replica
            .handle_forward(&encode(&other_version), false)
            .await
            .expect("decodable");
        let applied_before = replica.reader().last_applied_index();
        match decode::<ForwardReply>(&answer).expect("a forward reply") {
            ForwardReply::Applied { index, .. } => assert_eq!(index, applied_before),
            other => panic!("unexpected answer {other:?}"),
        }
        replica.shutdown().await;
    }
}
