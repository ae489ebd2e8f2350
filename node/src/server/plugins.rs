//! The plugins a node has loaded: every enabled version in the replicated state and the built-in
//! providers embedded in the binary, compiled by this node's plugin host and swapped in as the
//! state changes, with no restart. Entries hold a `Plugin` (a cheap clone); every call takes a
//! clone, so a call in flight finishes on the version it started with while a newer one
//! replaces it here.
//!
//! Repository URLs are matched against the VCS providers in a fixed order: uploaded providers
//! (by name), then the built-ins (GitHub, GitLab, Bitbucket, Gitea, plain git last, since it
//! claims any git URL). An uploaded plugin named like a built-in takes the built-in's place.
//! Settings are kept by plugin name in the replicated state and given to every version.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use flotilla_builtin_plugins::Builtin;
use flotilla_plugins::{Plugin, PluginHost, PluginKind};
use flotilla_raft::{PluginKey, PluginRecord, Replica};

/// How long a caller waits for the node's first load of its plugins (built-ins compile at start).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The loaded (enabled, uploaded) plugins of `kind`, ordered by name.
fn of_kind_by_name(loaded: &HashMap<String, Loaded>, kind: PluginKind) -> Vec<Plugin> {
    let mut of_kind: Vec<&Loaded> = loaded.values().filter(|loaded| loaded.plugin.kind() == kind).collect();
    of_kind.sort_by(|left, right| left.key.name.cmp(&right.key.name));
    of_kind.iter().map(|loaded| loaded.plugin.clone()).collect()
}

/// A loaded version and what it was loaded from.
#[derive(Clone)]
struct Loaded {
    key: PluginKey,
    sha256: String,
    granted_hosts: Vec<String>,
    settings: BTreeMap<String, String>,
    plugin: Plugin,
}

/// A built-in provider: compiled once, given the current settings (and the grants they imply).
#[derive(Clone)]
struct LoadedBuiltin {
    base: Plugin,
    /// The settings `plugin` has; `None` until the first reconcile gives them.
    settings: Option<BTreeMap<String, String>>,
    plugin: Plugin,
}

/// A plugin as the registry lists it, for `ListPlugins`.
pub struct BuiltinListing {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size_bytes: u64,
    /// Hidden by an uploaded, enabled plugin of the same name.
    pub shadowed: bool,
    pub granted_hosts: Vec<String>,
    pub load_error: Option<String>,
}

/// The node has not finished loading its plugins (built-ins still compiling, say).
#[derive(Debug, thiserror::Error)]
#[error("the node's plugins are not loaded after {timeout_s} s")]
pub struct PluginsNotReady {
    pub timeout_s: u64,
}

pub struct PluginRegistry {
    host: Arc<PluginHost>,
    /// The built-ins this node offers, in match order.
    builtins: Vec<&'static Builtin>,
    /// By plugin name: the one enabled version of each uploaded plugin.
    loaded: RwLock<HashMap<String, Loaded>>,
    loaded_builtins: RwLock<HashMap<&'static str, LoadedBuiltin>>,
    /// Versions this node could not load, with the reason (kept until the state changes them).
    failed: RwLock<HashMap<PluginKey, String>>,
    /// True once the first reconcile (built-ins included) is done.
    ready: tokio::sync::watch::Sender<bool>,
}

/// Hosts a built-in provider may reach: its forge's public API, and the hosts its settings name
/// (`api-base`, `hosts`), which only an admin can set.
pub fn builtin_grants(name: &str, settings: &BTreeMap<String, String>) -> Vec<String> {
    let public: &[&str] = match name {
        "github" => &["api.github.com"],
        "gitlab" => &["gitlab.com"],
        "bitbucket" => &["api.bitbucket.org"],
        "gitea" => &["codeberg.org"],
        _ => &[],
    };
    let mut grants: Vec<String> = public.iter().map(|host| host.to_string()).collect();
    if let Some(grant) = settings.get("api-base").and_then(|base| grant_for_url(base.trim())) {
        grants.push(grant);
    }
    if let Some(hosts) = settings.get("hosts") {
        for host in hosts.split(',').map(str::trim).filter(|host| !host.is_empty()) {
            let grant = match host.contains("://") {
                true => grant_for_url(host),
                false => Some(host.trim_end_matches('/').to_ascii_lowercase()),
            };
            grants.extend(grant);
        }
    }
    grants.retain(|grant| flotilla_plugins::is_valid_grant(grant));
    grants.sort();
    grants.dedup();
    grants
}

/// The grant for a URL's host and port. A grant without a port admits 443 only, so any other
/// port (http's 80 too) is written out.
fn grant_for_url(text: &str) -> Option<String> {
    let url = url::Url::parse(text).ok()?;
    let (host, port) = (url.host_str()?, url.port_or_known_default()?);
    Some(match port {
        flotilla_state::host_pattern::PORT_WHEN_UNWRITTEN => host.to_string(),
        port => format!("{host}:{port}"),
    })
}

impl PluginRegistry {
    /// Starts following the replicated state; loads the built-ins and what is enabled now,
    /// then every change.
    pub fn start(host: Arc<PluginHost>, replica: &Replica, builtins: Vec<&'static Builtin>) -> Arc<PluginRegistry> {
        let (ready, _) = tokio::sync::watch::channel(false);
        let registry = Arc::new(PluginRegistry {
            host,
            builtins,
            loaded: RwLock::new(HashMap::new()),
            loaded_builtins: RwLock::new(HashMap::new()),
            failed: RwLock::new(HashMap::new()),
            ready,
        });
        let follower = registry.clone();
        let replica = replica.clone();
        tokio::spawn(async move {
            let mut applied = replica.reader().applied_watch();
            follower.load_builtins().await;
            loop {
                follower.reconcile(&replica).await;
                follower.ready.send_replace(true);
                if applied.changed().await.is_err() {
                    return;
                }
            }
        });
        registry
    }

    pub fn host(&self) -> &Arc<PluginHost> {
        &self.host
    }

    /// Waits until the node has loaded its plugins once (at start, while built-ins compile).
    pub async fn wait_ready(&self) -> Result<(), PluginsNotReady> {
        let mut ready = self.ready.subscribe();
        let loaded = tokio::time::timeout(READY_TIMEOUT, async { ready.wait_for(|ready| *ready).await.is_ok() }).await;
        match loaded {
            Ok(true) => Ok(()),
            _ => Err(PluginsNotReady {
                timeout_s: READY_TIMEOUT.as_secs(),
            }),
        }
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

    /// The VCS providers in match order: uploaded ones by name, then the built-ins that no
    /// uploaded plugin replaces.
    pub fn providers(&self) -> Vec<Plugin> {
        let loaded = self.loaded.read().expect("plugin registry poisoned");
        let mut providers = of_kind_by_name(&loaded, PluginKind::VcsProvider);
        let builtins = self.loaded_builtins.read().expect("plugin registry poisoned");
        for builtin in &self.builtins {
            if loaded.contains_key(builtin.name) {
                continue;
            }
            if let Some(entry) = builtins.get(builtin.name) {
                providers.push(entry.plugin.clone());
            }
        }
        providers
    }

    /// The enabled tool plugins, by name.
    pub fn tools(&self) -> Vec<Plugin> {
        of_kind_by_name(&self.loaded.read().expect("plugin registry poisoned"), PluginKind::Tool)
    }

    /// The built-ins this node offers, as `ListPlugins` shows them.
    pub fn builtin_listings(&self) -> Vec<BuiltinListing> {
        let loaded = self.loaded.read().expect("plugin registry poisoned");
        let builtins = self.loaded_builtins.read().expect("plugin registry poisoned");
        let failed = self.failed.read().expect("plugin registry poisoned");
        self.builtins
            .iter()
            .map(|builtin| {
                let entry = builtins.get(builtin.name);
                BuiltinListing {
                    name: builtin.name.to_string(),
                    version: builtin.version.to_string(),
                    sha256: entry.map(|entry| entry.base.sha256().to_string()).unwrap_or_default(),
                    size_bytes: builtin.bytes.len() as u64,
                    shadowed: loaded.contains_key(builtin.name),
                    granted_hosts: entry
                        .map(|entry| entry.plugin.granted_hosts().to_vec())
                        .unwrap_or_default(),
                    load_error: failed.get(&PluginKey::new(builtin.name, builtin.version)).cloned(),
                }
            })
            .collect()
    }

    /// Whether this node has built-in `name` loaded (and not replaced by an upload).
    pub fn builtin_active(&self, name: &str) -> bool {
        !self.loaded.read().expect("plugin registry poisoned").contains_key(name)
            && self
                .loaded_builtins
                .read()
                .expect("plugin registry poisoned")
                .contains_key(name)
    }

    async fn load_builtins(&self) {
        for builtin in &self.builtins {
            let host = self.host.clone();
            let builtin: &'static Builtin = builtin;
            let started = Instant::now();
            let loaded = tokio::task::spawn_blocking(move || {
                host.load(builtin.name, builtin.version, builtin.bytes, Vec::new())
            })
            .await;
            match loaded {
                Ok(Ok(plugin)) => {
                    tracing::info!(
                        plugin = builtin.name,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "built-in plugin loaded"
                    );
                    self.loaded_builtins.write().expect("plugin registry poisoned").insert(
                        builtin.name,
                        LoadedBuiltin {
                            base: plugin.clone(),
                            settings: None,
                            plugin,
                        },
                    );
                }
                Ok(Err(error)) => {
                    tracing::error!(plugin = builtin.name, %error, "a built-in plugin could not be loaded");
                    self.failed
                        .write()
                        .expect("plugin registry poisoned")
                        .insert(PluginKey::new(builtin.name, builtin.version), error.to_string());
                }
                Err(error) => tracing::error!(%error, "loading a built-in plugin panicked"),
            }
        }
    }

    async fn reconcile(&self, replica: &Replica) {
        let (wanted, settings): (Vec<PluginRecord>, BTreeMap<String, BTreeMap<String, String>>) =
            replica.reader().read(|state| {
                (
                    state.enabled_plugins().cloned().collect(),
                    state.plugin_settings.clone(),
                )
            });
        let settings_of = |name: &str| settings.get(name).cloned().unwrap_or_default();
        {
            let mut builtins = self.loaded_builtins.write().expect("plugin registry poisoned");
            for (name, entry) in builtins.iter_mut() {
                let wanted_settings = settings_of(name);
                if entry.settings.as_ref() != Some(&wanted_settings) {
                    entry.plugin = entry
                        .base
                        .with_settings(wanted_settings.clone())
                        .with_granted_hosts(builtin_grants(name, &wanted_settings));
                    entry.settings = Some(wanted_settings);
                }
            }
        }
        let names: HashSet<&str> = wanted.iter().map(|record| record.name.as_str()).collect();
        self.loaded
            .write()
            .expect("plugin registry poisoned")
            .retain(|name, _| names.contains(name.as_str()));
        for record in &wanted {
            let key = PluginKey {
                name: record.name.clone(),
                version: record.version.clone(),
            };
            let wanted_settings = settings_of(&record.name);
            let current = self
                .loaded
                .read()
                .expect("plugin registry poisoned")
                .get(&record.name)
                .cloned();
            match current {
                Some(loaded) if loaded.key == key && loaded.sha256 == record.sha256 => {
                    if loaded.granted_hosts != record.granted_hosts || loaded.settings != wanted_settings {
                        self.install(key, record, &loaded.plugin, wanted_settings);
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
            let (name, version) = (record.name.clone(), record.version.clone());
            let started = Instant::now();
            let loaded = tokio::task::spawn_blocking(move || host.load(&name, &version, &bytes, Vec::new())).await;
            match loaded {
                Ok(Ok(plugin)) => {
                    tracing::info!(
                        plugin = %record.name,
                        version = %record.version,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "plugin loaded"
                    );
                    self.install(key, record, &plugin, wanted_settings);
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

    fn install(&self, key: PluginKey, record: &PluginRecord, plugin: &Plugin, settings: BTreeMap<String, String>) {
        let plugin = plugin
            .with_settings(settings.clone())
            .with_granted_hosts(record.granted_hosts.clone());
        self.loaded.write().expect("plugin registry poisoned").insert(
            record.name.clone(),
            Loaded {
                key,
                sha256: record.sha256.clone(),
                granted_hosts: record.granted_hosts.clone(),
                settings,
                plugin,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn builtins_reach_their_forge_and_the_hosts_their_settings_name() {
        assert_eq!(builtin_grants("github", &settings(&[])), ["api.github.com"]);
        assert_eq!(builtin_grants("git", &settings(&[])), Vec::<String>::new());
        assert_eq!(
            builtin_grants(
                "gitea",
                &settings(&[
                    ("api-base", "http://127.0.0.1:3000/api/v1/"),
                    (
                        "hosts",
                        "https://Git.Example.com/, 127.0.0.1:3000, http://plain.example.com/"
                    ),
                ])
            ),
            [
                "127.0.0.1:3000",
                "codeberg.org",
                "git.example.com",
                "plain.example.com:80"
            ]
        );
        // Plain http is on port 80, which a grant must name.
        assert_eq!(
            builtin_grants("gitea", &settings(&[("api-base", "http://forge.example.com/api/v1")])),
            ["codeberg.org", "forge.example.com:80"]
        );
        // A setting that names no host grants nothing.
        assert_eq!(
            builtin_grants("gitlab", &settings(&[("api-base", "not a url"), ("hosts", " , ")])),
            ["gitlab.com"]
        );
    }
}
