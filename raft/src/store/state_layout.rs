//! How the state machine's records sit in the `state` column family: one key per record,
//! prefixed by its kind (`a/` agents, `e/` events, `n/` nodes, `t/` tokens, `c/` checkpoints,
//! `p/` plugins, `q/` plugin chunks, `u/` uploads, `v/` staged chunks, `l/` audit entries by
//! sequence, `m/` cluster-wide values), written for the keys an applied entry touched and read back whole at open.

use openraft::{LogId, StoredMembership};
use rocksdb::{IteratorMode, WriteBatch, DB};

use super::state_machine::{Machine, StateMachineStore};
use super::{
    decode, encode, Encoder, OpenError, CF_LOG_META, CF_STATE, KEY_APPLIED, KEY_CLUSTER_CA, KEY_DEFAULT_TEAM_LIMITS,
    KEY_HIGHEST_NODE_ID, KEY_INSTALL_LAYERS, KEY_JOIN_TOKENS, KEY_MEMBERSHIP, KEY_NEXT_AUDIT_SEQUENCE,
    KEY_PKI_CLUSTER_CA, KEY_PKI_REMOVED_NODES, KEY_PLUGIN_SETTINGS, KEY_REMOVED_NODES, KEY_SECRETS, KEY_TEAMS,
    KEY_TEAM_LIMITS, KEY_TEAM_SETTINGS,
};
use crate::types::{AgentId, DurableEvent, NodeId, PluginKey, UploadId};
use crate::{Changes, ClusterState, NodeAddr};

/// What the state column family holds: the state's records (indexes not yet rebuilt), the
/// applied position and the membership.
pub(super) struct StoredState {
    pub state: ClusterState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, NodeAddr>,
}

/// Reads every record of the state column family.
pub(super) fn load_state(db: &DB) -> Result<StoredState, OpenError> {
    read_state(db, rocksdb::ReadOptions::default())
}

/// Reads every record of the state column family as `options` see it (a RocksDB snapshot, for
/// a view as of one applied batch).
pub(super) fn read_state(db: &DB, mut options: rocksdb::ReadOptions) -> Result<StoredState, OpenError> {
    let cf = db.cf_handle(CF_STATE).expect("column family created at open");
    let mut state = ClusterState::default();
    let mut last_applied = None;
    let mut membership = StoredMembership::default();
    // Every record is read once here and kept in memory after: filling the block cache with
    // them would only hold up to its size in memory for blocks read again only by a restart.
    options.fill_cache(false);
    for item in db.iterator_cf_opt(cf, options, IteratorMode::Start) {
        let (key, value) = item.map_err(|error| OpenError::Database {
            dir: db.path().display().to_string(),
            message: error.to_string(),
        })?;
        match key.first() {
            Some(b'a') => {
                let record: crate::types::AgentRecord = decode(&key, &value)?;
                state.agents.insert(record.id, record);
            }
            Some(b'e') => {
                let event: DurableEvent = decode(&key, &value)?;
                state.events.entry(event.agent).or_default().push_back(event);
            }
            Some(b'n') => {
                let record: crate::types::NodeRecord = decode(&key, &value)?;
                state.nodes.insert(record.id, record);
            }
            Some(b't') => {
                let record: crate::types::TokenRecord = decode(&key, &value)?;
                state.tokens.insert(record.sha256_hex.clone(), record);
            }
            Some(b'c') if key.len() == 18 => {
                let checkpoint: crate::types::Checkpoint = decode(&key, &value)?;
                let mut id = [0u8; 16];
                id.copy_from_slice(&key[2..]);
                state
                    .checkpoints
                    .insert(AgentId(ulid::Ulid::from_bytes(id)), checkpoint);
            }
            Some(b'p') => {
                let record: crate::types::PluginRecord = decode(&key, &value)?;
                state.plugins.insert(record.key(), record);
            }
            Some(b'q') => {
                let (plugin, index) = parse_plugin_chunk_key(&key)?;
                state.plugin_chunks.insert((plugin, index), value.to_vec());
            }
            Some(b'l') => {
                // Keys sort by big-endian sequence, so entries load oldest first.
                let entry: crate::AuditEntry = decode(&key, &value)?;
                state.audit.push_back(entry);
            }
            Some(b'u') => {
                let record: crate::types::PluginUpload = decode(&key, &value)?;
                state.plugin_uploads.insert(record.id, record);
            }
            Some(b'v') if key.len() == 22 => {
                let mut id = [0u8; 16];
                id.copy_from_slice(&key[2..18]);
                let index = u32::from_be_bytes(key[18..22].try_into().expect("four bytes"));
                state
                    .upload_chunks
                    .insert((UploadId(ulid::Ulid::from_bytes(id)), index), value.to_vec());
            }
            _ if key.as_ref() == KEY_APPLIED => last_applied = decode(&key, &value)?,
            _ if key.as_ref() == KEY_MEMBERSHIP => membership = decode(&key, &value)?,
            _ if key.as_ref() == KEY_HIGHEST_NODE_ID => state.highest_node_id = decode(&key, &value)?,
            _ if key.as_ref() == KEY_INSTALL_LAYERS => state.install_layers = decode(&key, &value)?,
            _ if key.as_ref() == KEY_PLUGIN_SETTINGS => state.plugin_settings = decode(&key, &value)?,
            _ if key.as_ref() == KEY_TEAMS => state.teams = decode(&key, &value)?,
            _ if key.as_ref() == KEY_JOIN_TOKENS => state.join_tokens = decode(&key, &value)?,
            _ if key.as_ref() == KEY_SECRETS => state.secrets = decode(&key, &value)?,
            _ if key.as_ref() == KEY_TEAM_SETTINGS => state.team_settings = decode(&key, &value)?,
            _ if key.as_ref() == KEY_TEAM_LIMITS => state.team_limits = decode(&key, &value)?,
            _ if key.as_ref() == KEY_DEFAULT_TEAM_LIMITS => state.default_team_limits = decode(&key, &value)?,
            _ if key.as_ref() == KEY_NEXT_AUDIT_SEQUENCE => state.next_audit_sequence = decode(&key, &value)?,
            _ if key.as_ref() == KEY_CLUSTER_CA => state.cluster_ca = decode(&key, &value)?,
            _ if key.as_ref() == KEY_REMOVED_NODES => state.removed_nodes = decode(&key, &value)?,
            _ => {}
        }
    }
    Ok(StoredState {
        state,
        last_applied,
        membership,
    })
}

impl StateMachineStore {
    /// Writes into `batch` every record `changes` names, as it is in `machine` (deleting those
    /// that are gone), and the applied position.
    pub(super) fn persist_changes(&self, batch: &mut WriteBatch, machine: &Machine, changes: &Changes) {
        let cf = self.cf(CF_STATE);
        let mut encoder = Encoder::new();
        for id in &changes.agents {
            let key = agent_key(*id);
            match machine.state.agents.get(id) {
                Some(record) => batch.put_cf(cf, key, encoder.encode(record)),
                None => batch.delete_cf(cf, key),
            }
        }
        for event in &changes.new_events {
            batch.put_cf(cf, event_key(event.agent, event.sequence), encoder.encode(event));
        }
        for (agent, sequence) in &changes.trimmed_events {
            batch.delete_cf(cf, event_key(*agent, *sequence));
        }
        for id in &changes.checkpoints {
            let key = checkpoint_key(*id);
            match machine.state.checkpoints.get(id) {
                Some(checkpoint) => batch.put_cf(cf, key, encoder.encode(checkpoint)),
                None => batch.delete_cf(cf, key),
            }
        }
        for id in &changes.nodes {
            let key = node_key(*id);
            match machine.state.nodes.get(id) {
                Some(record) => batch.put_cf(cf, key, encoder.encode(record)),
                None => batch.delete_cf(cf, key),
            }
        }
        for hash in &changes.tokens {
            let key = [b"t/".as_slice(), hash.as_bytes()].concat();
            match machine.state.tokens.get(hash) {
                Some(record) => batch.put_cf(cf, key, encoder.encode(record)),
                None => batch.delete_cf(cf, key),
            }
        }
        // Chunks are stored raw, not postcard-encoded: they are bytes already, and up to half a
        // MiB each.
        for key in &changes.plugins {
            let stored_key = plugin_key(key);
            match machine.state.plugins.get(key) {
                Some(record) => batch.put_cf(cf, stored_key, encoder.encode(record)),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        for (key, index) in &changes.plugin_chunks {
            let stored_key = plugin_chunk_key(key, *index);
            match machine.state.plugin_chunks.get(&(key.clone(), *index)) {
                Some(bytes) => batch.put_cf(cf, stored_key, bytes),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        for id in &changes.plugin_uploads {
            let stored_key = upload_key(*id);
            match machine.state.plugin_uploads.get(id) {
                Some(record) => batch.put_cf(cf, stored_key, encoder.encode(record)),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        for (id, index) in &changes.upload_chunks {
            let stored_key = upload_chunk_key(*id, *index);
            match machine.state.upload_chunks.get(&(*id, *index)) {
                Some(bytes) => batch.put_cf(cf, stored_key, bytes),
                None => batch.delete_cf(cf, stored_key),
            }
        }
        if changes.meta {
            batch.put_cf(cf, KEY_HIGHEST_NODE_ID, encoder.encode(&machine.state.highest_node_id));
            batch.put_cf(cf, KEY_INSTALL_LAYERS, encoder.encode(&machine.state.install_layers));
            batch.put_cf(cf, KEY_PLUGIN_SETTINGS, encoder.encode(&machine.state.plugin_settings));
            batch.put_cf(cf, KEY_TEAMS, encoder.encode(&machine.state.teams));
            batch.put_cf(cf, KEY_JOIN_TOKENS, encoder.encode(&machine.state.join_tokens));
            batch.put_cf(cf, KEY_TEAM_SETTINGS, encoder.encode(&machine.state.team_settings));
            batch.put_cf(cf, KEY_TEAM_LIMITS, encoder.encode(&machine.state.team_limits));
            batch.put_cf(
                cf,
                KEY_DEFAULT_TEAM_LIMITS,
                encoder.encode(&machine.state.default_team_limits),
            );
            // The CA key is sealed: never in the clear here.
            batch.put_cf(cf, KEY_CLUSTER_CA, encoder.encode(&machine.state.cluster_ca));
            batch.put_cf(cf, KEY_REMOVED_NODES, encoder.encode(&machine.state.removed_nodes));
        }
        // Sealed bytes only: a value is never in the clear here (see `flotilla_state::secrets`).
        if changes.secrets {
            batch.put_cf(cf, KEY_SECRETS, encoder.encode(&machine.state.secrets));
        }
        self.persist_audit(batch, machine, changes, &mut encoder);
        batch.put_cf(cf, KEY_APPLIED, encoder.encode(&machine.last_applied));
        batch.put_cf(cf, KEY_MEMBERSHIP, encoder.encode(&machine.membership));
    }
}

impl StateMachineStore {
    /// Puts into `batch` the copies of the cluster CA and the removed nodes that a node reads
    /// before its replica opens (see `KEY_PKI_CLUSTER_CA`). `batch` must be written through
    /// RocksDB's write-ahead log, and before the state records it mirrors.
    pub(super) fn persist_pki_copies(&self, batch: &mut WriteBatch, machine: &Machine) {
        let cf = self.cf(CF_LOG_META);
        batch.put_cf(cf, KEY_PKI_CLUSTER_CA, encode(&machine.state.cluster_ca));
        batch.put_cf(cf, KEY_PKI_REMOVED_NODES, encode(&machine.state.removed_nodes));
    }

    /// The audit entries an applied entry appended and dropped, and the next sequence.
    fn persist_audit(&self, batch: &mut WriteBatch, machine: &Machine, changes: &Changes, encoder: &mut Encoder) {
        if changes.audit_appended.is_empty() && changes.audit_trimmed.is_empty() && !changes.meta {
            return;
        }
        let cf = self.cf(CF_STATE);
        for sequence in &changes.audit_trimmed {
            batch.delete_cf(cf, audit_key(*sequence));
        }
        // Entries appended and trimmed by the same batch are gone from the state: nothing to put.
        let first_kept = machine.state.audit.front().map_or(u64::MAX, |entry| entry.sequence);
        for sequence in changes
            .audit_appended
            .iter()
            .filter(|sequence| **sequence >= first_kept)
        {
            let index = (sequence - first_kept) as usize;
            if let Some(entry) = machine.state.audit.get(index) {
                batch.put_cf(cf, audit_key(*sequence), encoder.encode(entry));
            }
        }
        batch.put_cf(
            cf,
            KEY_NEXT_AUDIT_SEQUENCE,
            encoder.encode(&machine.state.next_audit_sequence),
        );
    }
}

pub(super) fn audit_key(sequence: u64) -> Vec<u8> {
    [b"l/".as_slice(), &sequence.to_be_bytes()].concat()
}

pub(super) fn agent_key(id: AgentId) -> Vec<u8> {
    [b"a/".as_slice(), &id.0.to_bytes()].concat()
}

pub(super) fn checkpoint_key(id: AgentId) -> Vec<u8> {
    [b"c/".as_slice(), &id.0.to_bytes()].concat()
}

pub(super) fn event_key(agent: AgentId, sequence: u64) -> Vec<u8> {
    [b"e/".as_slice(), &agent.0.to_bytes(), &sequence.to_be_bytes()].concat()
}

pub(super) fn node_key(id: NodeId) -> Vec<u8> {
    [b"n/".as_slice(), &id.to_be_bytes()].concat()
}

// Plugin names and versions never hold a NUL (names are lowercase letters, digits and dashes;
// versions are semver), so NUL separates them in keys.
pub(super) fn plugin_key(key: &PluginKey) -> Vec<u8> {
    [b"p/".as_slice(), key.name.as_bytes(), &[0], key.version.as_bytes()].concat()
}

pub(super) fn plugin_chunk_key(key: &PluginKey, index: u32) -> Vec<u8> {
    [
        b"q/".as_slice(),
        key.name.as_bytes(),
        &[0],
        key.version.as_bytes(),
        &[0],
        &index.to_be_bytes(),
    ]
    .concat()
}

pub(super) fn parse_plugin_chunk_key(key: &[u8]) -> Result<(PluginKey, u32), OpenError> {
    let malformed = || OpenError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        message: "not a plugin chunk key (q/NAME\\0VERSION\\0INDEX)".to_string(),
    };
    let body = key.strip_prefix(b"q/").ok_or_else(malformed)?;
    if body.len() < 5 || body[body.len() - 5] != 0 {
        return Err(malformed());
    }
    let (identity, index) = body.split_at(body.len() - 5);
    let index = u32::from_be_bytes(index[1..].try_into().map_err(|_| malformed())?);
    let separator = identity.iter().position(|byte| *byte == 0).ok_or_else(malformed)?;
    let name = std::str::from_utf8(&identity[..separator]).map_err(|_| malformed())?;
    let version = std::str::from_utf8(&identity[separator + 1..]).map_err(|_| malformed())?;
    Ok((PluginKey::new(name, version), index))
}

pub(super) fn upload_key(id: UploadId) -> Vec<u8> {
    [b"u/".as_slice(), &id.0.to_bytes()].concat()
}

pub(super) fn upload_chunk_key(id: UploadId, index: u32) -> Vec<u8> {
    [b"v/".as_slice(), &id.0.to_bytes(), &index.to_be_bytes()].concat()
}
