//! Keeps the node's log redaction (`crate::log_redact`) equal to the secret values this node
//! knows: every replicated secret it can open (cluster, team and user scopes), its node-level
//! secret files (`DATA_DIR/secrets/NAME`), and the session credentials it made for machines (kept by `crate::log_redact` itself).
//! It follows the applied index: a secret set or removed through Raft is redacted (or no
//! longer) as soon as this node applies the change.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use super::secrets::NodeSecretStore;

/// Fingerprint of the replicated secrets: changes whenever one is set or removed (each seal
/// wraps a fresh data key under a fresh nonce).
fn fingerprint(store: &NodeSecretStore) -> u64 {
    store.replica.reader().read(|state| {
        let mut hasher = DefaultHasher::new();
        state.secrets.len().hash(&mut hasher);
        for record in state.secrets.values() {
            record.scope.hash(&mut hasher);
            record.name.hash(&mut hasher);
            record.sealed.wrapped_key.hash(&mut hasher);
        }
        hasher.finish()
    })
}

/// Every replicated secret this node can open, by name.
fn replicated_values(store: &NodeSecretStore) -> Vec<(String, String)> {
    let records: Vec<_> = store
        .replica
        .reader()
        .read(|state| state.secrets.values().cloned().collect());
    let Some(kek) = store.kek.get() else {
        return Vec::new();
    };
    records
        .into_iter()
        .filter_map(|record| {
            let value = kek.open(&record.scope, &record.name, &record.sealed).ok()?;
            Some((record.name, value))
        })
        .collect()
}

/// The node-level secret files. Blocking: reads a directory.
fn secret_files(data_dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("secrets")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            let value = super::runtime::read_secret(data_dir, &name)?;
            Some((name, value))
        })
        .collect()
}

/// Recomputes the redacted set now.
pub fn refresh(store: &NodeSecretStore) {
    let mut values = replicated_values(store);
    values.extend(store.secret_files());
    values.extend(store.used_values());
    crate::log_redact::set_known_values(&values);
}

/// Follows the applied index for as long as the node runs.
pub fn follow(store: Arc<NodeSecretStore>) {
    tokio::spawn(async move {
        let data_dir = store.data_dir.clone();
        let files = tokio::task::spawn_blocking(move || secret_files(&data_dir))
            .await
            .unwrap_or_default();
        store.set_secret_files(files);
        let mut applied = store.replica.reader().applied_watch();
        let mut seen = None;
        loop {
            let now = fingerprint(&store);
            if seen != Some(now) {
                refresh(&store);
                seen = Some(now);
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    });
}
