//! The state machine: the whole [`ClusterState`] in memory behind a lock, applied to by
//! openraft with [`flotilla_state::apply_in_term`] for each committed entry (in the entry's term), and read by the node's
//! services and actors through [`StateReader`]s. Each applied group of entries is written to
//! the state column family in one batch with its applied position, without RocksDB's write-ahead
//! log: the Raft log is the state's write-ahead log (see [`write_without_stalling`]).

use std::io::Cursor;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use flotilla_state::apply_in_term;
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, Snapshot, SnapshotMeta, StorageIOError, StoredMembership,
};
use rocksdb::{WriteBatch, DB};
use tokio::sync::{broadcast, watch};

use super::state_layout::{load_state, StoredState};
use super::{any, OpenError, StorageResult, EVENT_BROADCAST_CAPACITY};
use crate::types::{AgentId, DurableEvent, NodeId, Term};
use crate::{ApplyResult, Changes, ClusterState, NodeAddr, Response, TypeConfig};

/// The in-memory state plus its applied position, shared with readers.
pub struct Machine {
    pub state: ClusterState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, NodeAddr>,
}

/// Read access to the state machine for services and actors.
#[derive(Clone)]
pub struct StateReader {
    pub(super) machine: Arc<RwLock<Machine>>,
    /// The database the state is kept in: a backup reads its records through a RocksDB
    /// snapshot rather than the in-memory state under its lock.
    pub(super) db: Arc<DB>,
    applied: watch::Receiver<u64>,
    events: broadcast::Sender<DurableEvent>,
}

impl StateReader {
    /// Runs `read` against the current state; keep it short (it holds a read lock).
    pub fn read<T>(&self, read: impl FnOnce(&ClusterState) -> T) -> T {
        let machine = self.machine.read().expect("state lock poisoned");
        read(&machine.state)
    }

    pub fn last_applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Changes whenever entries are applied.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Flushes the state's records to a table (blocking), so that the next start has nothing
    /// to re-apply from the Raft log: for a clean stop, once nothing applies any more.
    pub(crate) fn flush_state(&self) -> Result<(), rocksdb::Error> {
        flush_state(&self.db)
    }

    /// Every durable event as it is applied (bounded; a receiver that lags re-reads the state).
    pub fn subscribe_events(&self) -> broadcast::Receiver<DurableEvent> {
        self.events.subscribe()
    }

    pub fn agent_events_after(&self, agent: AgentId, after: u64) -> Vec<DurableEvent> {
        self.read(|state| state.events_after(agent, after))
    }

    /// At most `limit` events of `agent` after `after`, oldest first.
    pub fn agent_events_after_bounded(&self, agent: AgentId, after: u64, limit: usize) -> Vec<DurableEvent> {
        self.read(|state| state.events_after_bounded(agent, after, limit))
    }
}

#[derive(Clone)]
pub struct StateMachineStore {
    pub(super) db: Arc<DB>,
    pub(super) machine: Arc<RwLock<Machine>>,
    pub(super) applied_sender: Arc<watch::Sender<u64>>,
    events: broadcast::Sender<DurableEvent>,
    pub(super) snapshot_sequence: Arc<AtomicU64>,
    /// How far the log is synced: an entry is applied only once it is (see `Durability`).
    durability: Arc<super::Durability>,
}

impl StateMachineStore {
    pub(super) fn load(db: Arc<DB>, durability: Arc<super::Durability>) -> Result<StateMachineStore, OpenError> {
        let StoredState {
            mut state,
            last_applied,
            membership,
        } = load_state(&db)?;
        state.rebuild_indexes();
        let applied_index = last_applied.map(|log_id: LogId<NodeId>| log_id.index).unwrap_or(0);
        let (applied_sender, _) = watch::channel(applied_index);
        let (events, _) = broadcast::channel(EVENT_BROADCAST_CAPACITY);
        Ok(StateMachineStore {
            db,
            machine: Arc::new(RwLock::new(Machine {
                state,
                last_applied,
                membership,
            })),
            applied_sender: Arc::new(applied_sender),
            events,
            snapshot_sequence: Arc::new(AtomicU64::new(0)),
            durability,
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            machine: self.machine.clone(),
            db: self.db.clone(),
            applied: self.applied_sender.subscribe(),
            events: self.events.clone(),
        }
    }

    pub(super) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeAddr>)> {
        let machine = self.machine.read().expect("state lock poisoned");
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            // A leader's own entries may be committed before its own sync of them ends; what
            // is applied (and so answered) must be on disk here too.
            self.durability
                .wait_synced(last.log_id.index)
                .await
                .map_err(|error| StorageIOError::write_state_machine(AnyError::error(error)))?;
        }
        let mut results = Vec::new();
        let mut changes = Changes::default();
        let mut batch = WriteBatch::default();
        let mut pki_copies = WriteBatch::default();
        let index = {
            let mut machine = self.machine.write().expect("state lock poisoned");
            for entry in entries {
                machine.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(Ok(Response::Done)),
                    EntryPayload::Normal(request) => {
                        // The entry's own term: a leader's judgement holds only in its term.
                        let term = Term(entry.log_id.leader_id.term);
                        let result = apply_in_term(&mut machine.state, &mut changes, term, &request);
                        results.push(result);
                    }
                    EntryPayload::Membership(membership) => {
                        machine.membership = StoredMembership::new(Some(entry.log_id), membership);
                        results.push(Ok(Response::Done));
                    }
                }
            }
            self.persist_changes(&mut batch, &machine, &changes);
            if changes.meta {
                self.persist_pki_copies(&mut pki_copies, &machine);
            }
            machine.last_applied.map(|log_id| log_id.index).unwrap_or(0)
        };
        if !pki_copies.is_empty() {
            // Synced: nothing else syncs RocksDB's log on its own, and a node reads these
            // before its replica opens. Cluster-wide values change rarely (admin calls).
            let mut synced = rocksdb::WriteOptions::default();
            synced.set_sync(true);
            self.db
                .write_opt(pki_copies, &synced)
                .map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        }
        write_without_stalling(&self.db, batch).map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        for event in changes.new_events {
            // No receivers is normal.
            let _ = self.events.send(event);
        }
        self.applied_sender.send_replace(index);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        self.install_snapshot_data(meta, snapshot.into_inner())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        self.current_snapshot()
    }
}

/// Writes an applied group's records, without RocksDB's write-ahead log. The Raft log is the
/// state's write-ahead log: it holds every applied entry, synced before it is applied, and a
/// start re-applies the committed entries after the state's applied position (openraft's
/// initial state). What a crash loses is then the state column family's memtable, which the
/// start rebuilds; writing the records to RocksDB's log as well would write each of them (a
/// create's prompt is most of a write) twice on every node. The log that could replay records
/// not yet flushed to a table is never purged: a snapshot flushes the state first, and so does
/// `purge` (see `flush_state`); a clean stop flushes it too, so that a start replays nothing.
///
/// Done in place on the runtime worker, which is a memtable insert, unless RocksDB would have
/// to stall the write (compaction behind): then it is written again from a blocking section,
/// so that a stall never holds the worker.
fn write_without_stalling(db: &DB, batch: WriteBatch) -> Result<(), rocksdb::Error> {
    let again = WriteBatch::from_data(batch.data());
    let mut no_log = rocksdb::WriteOptions::default();
    no_log.disable_wal(true);
    let mut no_stall = rocksdb::WriteOptions::default();
    no_stall.disable_wal(true);
    no_stall.set_no_slowdown(true);
    match db.write_opt(batch, &no_stall) {
        Err(error) if error.kind() == rocksdb::ErrorKind::Incomplete => off_the_worker(|| db.write_opt(again, &no_log)),
        other => other,
    }
}

/// Flushes the state column family's memtable to a table (blocking), so that every record
/// written so far is on disk without the Raft log: done before any log is purged and at a
/// clean stop.
pub(super) fn flush_state(db: &DB) -> Result<(), rocksdb::Error> {
    let cf = db.cf_handle(super::CF_STATE).expect("column family created at open");
    let mut wait = rocksdb::FlushOptions::default();
    wait.set_wait(true);
    db.flush_cf_opt(cf, &wait)
}

/// Runs blocking `work` in a blocking section where the runtime has other workers to take this
/// one's tasks meanwhile; in place on a single-threaded runtime (tests), which has none.
pub(super) fn off_the_worker<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
