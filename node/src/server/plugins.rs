//! The plugins a node has loaded: every enabled version in the replicated state, compiled by
//! this node's plugin host and swapped in as the state changes, with no restart. Entries hold a
//! `Plugin` (a cheap clone); callers in the agent path (next) take a clone per call, so a call in
//! flight finishes on the version it started with while a newer one replaces it here.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use flotilla_plugins::{Plugin, PluginHost};
use flotilla_raft::{PluginKey, PluginRecord, Replica};

/// A loaded version and what it was loaded from.
#[derive(Clone)]
struct Loaded {
    key: PluginKey,
    sha256: String,
    granted_hosts: Vec<String>,
    plugin: Plugin,
}

pub struct PluginRegistry {
    host: Arc<PluginHost>,
    /// By plugin name: the one enabled version of each.
    loaded: RwLock<HashMap<String, Loaded>>,
    /// Versions this node could not load, with the reason (kept until the state changes them).
    failed: RwLock<HashMap<PluginKey, String>>,
}

impl PluginRegistry {
    /// Starts following the replicated state; loads what is enabled now, then every change.
    pub fn start(host: Arc<PluginHost>, replica: &Replica) -> Arc<PluginRegistry> {
        let registry = Arc::new(PluginRegistry {
            host,
            loaded: RwLock::new(HashMap::new()),
            failed: RwLock::new(HashMap::new()),
        });
        let follower = registry.clone();
        let replica = replica.clone();
        tokio::spawn(async move {
            let mut applied = replica.reader().applied_watch();
            loop {
                follower.reconcile(&replica).await;
                if applied.changed().await.is_err() {
                    return;
                }
            }
        });
        registry
    }

    /// Whether this node runs exactly this version (same bytes) now.
    pub fn is_loaded(&self, record: &PluginRecord) -> bool {
        self.loaded
            .read()
            .expect("plugin registry poisoned")
            .get(&record.name)
            .is_some_and(|loaded| loaded.key.version == record.version && loaded.sha256 == record.sha256)
    }

    /// Why this node could not load a version, if it could not.
    pub fn load_error(&self, record: &PluginRecord) -> Option<String> {
        let key = PluginKey {
            name: record.name.clone(),
            version: record.version.clone(),
        };
        self.failed.read().expect("plugin registry poisoned").get(&key).cloned()
    }

    async fn reconcile(&self, replica: &Replica) {
        let wanted: Vec<PluginRecord> = replica
            .reader()
            .read(|state| state.enabled_plugins().cloned().collect());
        let names: std::collections::HashSet<&str> = wanted.iter().map(|record| record.name.as_str()).collect();
        self.loaded
            .write()
            .expect("plugin registry poisoned")
            .retain(|name, _| names.contains(name.as_str()));
        for record in &wanted {
            let key = PluginKey {
                name: record.name.clone(),
                version: record.version.clone(),
            };
            let current = self
                .loaded
                .read()
                .expect("plugin registry poisoned")
                .get(&record.name)
                .cloned();
            match current {
                Some(loaded) if loaded.key == key && loaded.sha256 == record.sha256 => {
                    if loaded.granted_hosts != record.granted_hosts {
                        let plugin = loaded.plugin.with_granted_hosts(record.granted_hosts.clone());
                        self.install(key, record, plugin);
                    }
                    continue;
                }
                _ => {}
            }
            if self.failed.read().expect("plugin registry poisoned").contains_key(&key) {
                continue;
            }
            let Some(bytes) = replica.reader().read(|state| state.plugin_bytes(&key)) else {
                continue;
            };
            let host = self.host.clone();
            let (name, version, hosts) = (
                record.name.clone(),
                record.version.clone(),
                record.granted_hosts.clone(),
            );
            let started = Instant::now();
            let loaded = tokio::task::spawn_blocking(move || host.load(&name, &version, &bytes, hosts)).await;
            match loaded {
                Ok(Ok(plugin)) => {
                    tracing::info!(
                        plugin = %record.name,
                        version = %record.version,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "plugin loaded"
                    );
                    self.install(key, record, plugin);
                }
                Ok(Err(error)) => {
                    tracing::warn!(plugin = %record.name, version = %record.version, %error, "plugin could not be loaded");
                    self.failed
                        .write()
                        .expect("plugin registry poisoned")
                        .insert(key, error.to_string());
                }
                Err(error) => tracing::warn!(%error, "loading a plugin panicked"),
            }
        }
    }

    fn install(&self, key: PluginKey, record: &PluginRecord, plugin: Plugin) {
        self.loaded.write().expect("plugin registry poisoned").insert(
            record.name.clone(),
            Loaded {
                key,
                sha256: record.sha256.clone(),
                granted_hosts: record.granted_hosts.clone(),
                plugin,
            },
        );
    }
}
