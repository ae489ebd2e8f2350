//! Snapshots: the whole state and its log position, encoded with postcard. A built or installed
//! snapshot is kept (synced) in the `snapshot` column family, so a lagging follower can be sent
//! it; installing one replaces every record of the state column family in one batch.

use std::io::Cursor;
use std::sync::atomic::Ordering;

use openraft::{LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership};
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::state_layout::read_state;
use super::state_machine::{Machine, StateMachineStore};
use super::{any, decode, encode, OpenError, StorageResult, CF_SNAPSHOT, CF_STATE, KEY_SNAPSHOT};
use crate::types::NodeId;
use crate::{Changes, ClusterState, NodeAddr, TypeConfig};

/// What a snapshot carries: the whole state and the log position it stands for.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotBody {
    pub(super) last_applied: Option<LogId<NodeId>>,
    pub(super) membership: StoredMembership<NodeId, NodeAddr>,
    pub(super) state: ClusterState,
}

/// [`SnapshotBody`] borrowed from the machine; it encodes to the same bytes.
#[derive(Serialize)]
pub(super) struct SnapshotBodyRef<'a> {
    pub(super) last_applied: &'a Option<LogId<NodeId>>,
    pub(super) membership: &'a StoredMembership<NodeId, NodeAddr>,
    pub(super) state: &'a ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeAddr>,
    data: Vec<u8>,
}

/// [`StoredSnapshot`] borrowed; it encodes to the same bytes (a slice and a `Vec` of bytes are
/// both a length and the bytes), so a built snapshot is stored without another copy of its data.
#[derive(Serialize)]
struct StoredSnapshotRef<'a> {
    meta: &'a SnapshotMeta<NodeId, NodeAddr>,
    data: &'a [u8],
}

impl StateMachineStore {
    fn stored_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        let bytes = self
            .db
            .get_cf(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT)
            .map_err(|error| StorageIOError::read_snapshot(None, any(error)))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => decode(KEY_SNAPSHOT, &bytes)
                .map(Some)
                .map_err(|error| StorageIOError::read_snapshot(None, any(error)).into()),
        }
    }

    /// The snapshot last built or installed, if any.
    pub(super) fn current_snapshot(&self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.stored_snapshot()?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }

    /// Installs a snapshot received from the leader: its state replaces this node's, and it
    /// becomes the snapshot this node holds.
    pub(super) fn install_snapshot_data(
        &self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        data: Vec<u8>,
    ) -> StorageResult<()> {
        let body: SnapshotBody = postcard::from_bytes(&data)
            .map_err(|error| StorageIOError::read_snapshot(Some(meta.signature()), any(error)))?;
        self.replace_state(body)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT, encode(&stored), &options)
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), any(error)))?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    /// Replaces the whole state (snapshot install) in one batch.
    pub(super) fn replace_state(&self, body: SnapshotBody) -> StorageResult<()> {
        let mut machine = self.machine.write().expect("state lock poisoned");
        let mut state = body.state;
        state.rebuild_indexes();
        *machine = Machine {
            state,
            last_applied: body.last_applied,
            membership: body.membership,
        };
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_STATE);
        batch.delete_range_cf(cf, [0u8].as_slice(), [0xffu8; 16].as_slice());
        let mut changes = Changes::default();
        changes.agents.extend(machine.state.agents.keys().copied());
        changes.nodes.extend(machine.state.nodes.keys().copied());
        changes.tokens.extend(machine.state.tokens.keys().cloned());
        changes.checkpoints.extend(machine.state.checkpoints.keys().copied());
        changes.plugins.extend(machine.state.plugins.keys().cloned());
        changes
            .plugin_chunks
            .extend(machine.state.plugin_chunks.keys().cloned());
        changes
            .plugin_uploads
            .extend(machine.state.plugin_uploads.keys().copied());
        changes
            .upload_chunks
            .extend(machine.state.upload_chunks.keys().copied());
        changes
            .new_events
            .extend(machine.state.events.values().flatten().cloned());
        changes
            .audit_appended
            .extend(machine.state.audit.iter().map(|entry| entry.sequence));
        changes.meta = true;
        changes.secrets = true;
        self.persist_changes(&mut batch, &machine, &changes);
        self.persist_pki_copies(&mut batch, &machine);
        // Written through RocksDB's write-ahead log, unlike an apply's records: the batch
        // replaces the whole state, so replayed over an older table it still gives this state.
        self.db
            .write(batch)
            .map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        self.db
            .flush_wal(true)
            .map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        let index = machine.last_applied.map(|log_id| log_id.index).unwrap_or(0);
        drop(machine);
        self.applied_sender.send_replace(index);
        Ok(())
    }

    /// Builds a snapshot from the state column family, on a blocking thread, rather than from
    /// the in-memory state: encoding a large state (120,000 agents with 1 KB prompts is about
    /// 150 MB) under the state's lock held up every apply, and so every answer, for as long as
    /// the encoding ran, and its runtime worker with it (`make bench-compare` saw a p99 of 1.8 s
    /// at 256 clients). Every applied batch writes its records together with the applied log id
    /// and the membership, so a RocksDB snapshot of the column family is the state as of one
    /// applied batch, consistent without any lock; records load exactly as a restart loads
    /// them, and the indexes (which a snapshot does not carry) are not rebuilt.
    fn snapshot_from_records(&self) -> StorageResult<Snapshot<TypeConfig>> {
        let view = self.db.snapshot();
        // The log this snapshot stands for may be purged once it is built: the records it
        // could replay go to a table first (see `write_without_stalling`). Flushed after the
        // view is taken, so the table holds at least what the view does.
        super::state_machine::flush_state(&self.db).map_err(|error| StorageIOError::write_state_machine(any(error)))?;
        let EncodedRecords {
            data,
            last_applied,
            membership,
            ..
        } = encode_records(&self.db, &view).map_err(|error| StorageIOError::read_state_machine(any(error)))?;
        drop(view);
        let sequence = self.snapshot_sequence.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(log_id) => format!("{}-{}-{}", log_id.leader_id.term, log_id.index, sequence),
            None => format!("empty-{sequence}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshotRef {
            meta: &meta,
            data: &data,
        };
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT, encode(&stored), &options)
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), any(error)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let store = self.clone();
        let snapshot = tokio::task::spawn_blocking(move || store.snapshot_from_records())
            .await
            .map_err(|error| StorageIOError::write_snapshot(None, any(error)))??;
        // Recorded here rather than on the blocking thread: in the caller's context, as every
        // other metric of the store.
        crate::metrics::record_snapshot_built(snapshot.snapshot.get_ref().len());
        Ok(snapshot)
    }
}

/// The state's records as `view` (a RocksDB snapshot) sees them, encoded as a snapshot's body,
/// with what the body says about itself.
pub(super) struct EncodedRecords {
    pub(super) data: Vec<u8>,
    pub(super) last_applied: Option<LogId<NodeId>>,
    pub(super) membership: StoredMembership<NodeId, NodeAddr>,
    pub(super) agents: u64,
    pub(super) plugins: u64,
    pub(super) secrets: u64,
}

/// Reads every record of the state column family through `view` and encodes them as a
/// snapshot's body: no lock on the in-memory state is taken, so applies go on meanwhile.
pub(super) fn encode_records(db: &DB, view: &rocksdb::Snapshot<'_>) -> Result<EncodedRecords, OpenError> {
    let mut options = rocksdb::ReadOptions::default();
    options.set_snapshot(view);
    let stored = read_state(db, options)?;
    let body = SnapshotBodyRef {
        last_applied: &stored.last_applied,
        membership: &stored.membership,
        state: &stored.state,
    };
    Ok(EncodedRecords {
        data: encode(&body),
        agents: stored.state.agents.len() as u64,
        plugins: stored.state.plugins.len() as u64,
        secrets: stored.state.secrets.len() as u64,
        last_applied: stored.last_applied,
        membership: stored.membership,
    })
}
