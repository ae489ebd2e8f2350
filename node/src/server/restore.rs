//! `flotilla node --restore FILE [--restore-kek KEK]`: a new cluster from a backup.
//!
//! The restored cluster is a new cluster, as an etcd snapshot restore makes one: this node
//! creates a new CA (nodes and clients of the old cluster do not talk to it by accident; clients
//! trust the new `ca.pem`), takes the next node id after the old cluster's highest (ids are never
//! reused), and initialises a one-voter Raft whose first entry is its own membership. The state
//! is the backup's: agents and their events and checkpoints, plugins and their bytes, settings,
//! teams and key digests (the old keys keep working), sealed secrets and the audit log. The old
//! cluster's nodes are removed from it, which sends their live agents back to pending: the new
//! cluster places them and they resume from their last checkpoint.
//!
//! Secrets stay sealed under the old cluster's key-encryption key, which the backup does not
//! hold (a backup file that leaks leaks no secret value, as a Vault snapshot needs its unseal
//! keys): the operator passes the old `DATA_DIR/kek` with `--restore-kek`, and it becomes the new
//! cluster's key. A backup with no secrets needs none, and the node makes a new key.
//!
//! Everything is checked before the data dir is touched: the data dir is empty, the file passes
//! every check of `flotilla_raft::store::backup`, and the key opens the backup's secrets (by id).
//! A refused restore writes nothing.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use flotilla_actors::secrets::Kek;
use flotilla_raft::store::backup::{read_backup, BackupHeader};
use flotilla_raft::{ClusterState, Command, NodeId, Request};

use crate::config::NodeConfig;

/// A backup that passed every check, with what this node will be in the new cluster.
pub struct PreparedRestore {
    pub file: PathBuf,
    pub header: BackupHeader,
    pub state: ClusterState,
    pub kek: Option<Kek>,
    pub node_id: NodeId,
}

/// Checks the data dir, the backup and the key, writing nothing.
pub async fn prepare(config: &NodeConfig) -> anyhow::Result<Option<PreparedRestore>> {
    let Some((file, kek_file)) = config.restore.clone() else {
        return Ok(None);
    };
    if let Some(join) = &config.join {
        bail!("--restore starts a new cluster and cannot join one (join = {join})");
    }
    let data_dir = config.data_dir.clone();
    let id = config.id;
    tokio::task::spawn_blocking(move || prepare_blocking(&file, kek_file.as_deref(), &data_dir, id))
        .await
        .map_err(|error| anyhow!("checking the backup failed: {error}"))?
        .map(Some)
}

fn prepare_blocking(
    file: &Path,
    kek_file: Option<&Path>,
    data_dir: &Path,
    id: Option<NodeId>,
) -> anyhow::Result<PreparedRestore> {
    refuse_non_empty(data_dir)?;
    let verified = read_backup(file).with_context(|| {
        format!(
            "refusing to restore {}; nothing was written to {}",
            file.display(),
            data_dir.display()
        )
    })?;
    let mut state = verified.state;
    let kek = restore_kek(&verified.header, &state, kek_file)?;
    let highest = state.highest_node_id;
    let node_id = match id {
        Some(id) if id <= highest => bail!(
            "--id {id} was used by the backed-up cluster (its ids go up to {highest}, and ids are never reused): pass an id above {highest}, or none"
        ),
        Some(id) => id,
        None => highest + 1,
    };
    remove_old_nodes(&mut state);
    // The restored cluster makes a CA of its own (see above), which its first node hands to the
    // cluster once it leads; the old cluster's CA record would name a CA this node does not hold.
    state.cluster_ca = None;
    Ok(PreparedRestore {
        file: file.to_path_buf(),
        header: verified.header,
        state,
        kek,
        node_id,
    })
}

fn refuse_non_empty(data_dir: &Path) -> anyhow::Result<()> {
    let mut entries = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => bail!("cannot read data dir {}: {error}", data_dir.display()),
    };
    if let Some(entry) = entries.next() {
        let entry = entry.with_context(|| format!("cannot read data dir {}", data_dir.display()))?;
        bail!(
            "--restore needs an empty data dir, and {} holds {:?} (a restored node started again is started without --restore)",
            data_dir.display(),
            entry.file_name()
        );
    }
    Ok(())
}

/// The key the backup's secrets are sealed under, checked by id against every secret.
fn restore_kek(header: &BackupHeader, state: &ClusterState, kek_file: Option<&Path>) -> anyhow::Result<Option<Kek>> {
    let sealed_under: std::collections::BTreeSet<&str> = state
        .secrets
        .values()
        .map(|record| record.sealed.kek_id.as_str())
        .collect();
    let Some(kek_file) = kek_file else {
        if state.secrets.is_empty() {
            return Ok(None);
        }
        bail!(
            "the backup holds {} secrets sealed under key-encryption key {}: pass the old cluster's key with --restore-kek (DATA_DIR/kek of any of its nodes)",
            state.secrets.len(),
            sealed_under.into_iter().collect::<Vec<_>>().join(", ")
        );
    };
    let text = std::fs::read_to_string(kek_file)
        .with_context(|| format!("cannot read --restore-kek {}", kek_file.display()))?;
    let kek = Kek::from_hex(&text).ok_or_else(|| {
        anyhow!(
            "--restore-kek {} does not hold a key-encryption key (64 hex digits)",
            kek_file.display()
        )
    })?;
    if let Some(expected) = header.kek_id.as_deref() {
        if expected != kek.id() {
            bail!(
                "--restore-kek {} is key {}, but the backup was taken under key {expected}",
                kek_file.display(),
                kek.id()
            );
        }
    }
    if let Some(other) = sealed_under.iter().find(|id| **id != kek.id()) {
        bail!(
            "--restore-kek {} is key {}, but the backup holds secrets sealed under key {other}",
            kek_file.display(),
            kek.id()
        );
    }
    Ok(Some(kek))
}

/// The old cluster's nodes leave the restored state: their live agents go back to pending, to
/// be placed on the new cluster's nodes.
fn remove_old_nodes(state: &mut ClusterState) {
    let now = flotilla_raft::command::now_ms();
    let old: Vec<NodeId> = state.nodes.keys().copied().collect();
    for node in old {
        let mut changes = flotilla_raft::Changes::default();
        if let Err(error) = flotilla_raft::apply(state, &mut changes, &Request::at(now, Command::RemoveNode { node })) {
            tracing::warn!(node, %error, "could not remove an old node from the restored state");
        }
    }
}

/// Writes the checked backup into the (locked, still empty) data dir: the key, then the store.
pub async fn write(restore: PreparedRestore, data_dir: &Path) -> anyhow::Result<()> {
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(kek) = &restore.kek {
            kek.store(&data_dir)?;
        }
        let header = restore.header;
        flotilla_raft::store::backup::restore_state(&data_dir.join("raft"), restore.state)
            .with_context(|| format!("cannot write the restored state into {}", data_dir.display()))?;
        tracing::info!(
            file = %restore.file.display(),
            from_cluster = %header.cluster_id,
            applied_index = header.applied_index,
            agents = header.agents,
            plugins = header.plugins,
            secrets = header.secrets,
            node = restore.node_id,
            "restored the backup; starting a new cluster from it"
        );
        Ok(())
    })
    .await
    .map_err(|error| anyhow!("restoring the backup failed: {error}"))?
}
