//! A loaded plugin ([`Plugin`]: its label, grants and settings around compiled, pre-linked
//! code) and the cache that lets one compiled component serve every load of the same bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use wasmtime::Engine;

use crate::bindings::tool_world::ToolPre;
use crate::bindings::vcs_world::VcsProviderPre;
use crate::grants;
use crate::state::HostState;
use crate::types::{PluginKind, PluginLabel};

/// A validated component, compiled and pre-linked, ready to instantiate.
pub(super) struct Compiled {
    pub(super) sha256: String,
    pub(super) kind: PluginKind,
    pub(super) pre: CompiledPre,
    /// The code came from the disk cache rather than the compiler.
    pub(super) from_disk: bool,
}

pub(super) enum CompiledPre {
    VcsProvider(VcsProviderPre<HostState>),
    Tool(ToolPre<HostState>),
}

pub(super) struct PluginInner {
    pub(super) label: Arc<PluginLabel>,
    pub(super) granted_hosts: Arc<[String]>,
    pub(super) settings: Arc<BTreeMap<String, String>>,
    pub(super) compiled: Arc<Compiled>,
    pub(super) engine: Engine,
}

/// A compiled, validated plugin. Cheap to clone (`Arc` inside). Calls in flight keep the version
/// they started with even if the caller swaps in a new one.
#[derive(Clone)]
pub struct Plugin {
    pub(super) inner: Arc<PluginInner>,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.label.name
    }

    pub fn version(&self) -> &str {
        &self.inner.label.version
    }

    /// Hex sha256 of the component's bytes.
    pub fn sha256(&self) -> &str {
        &self.inner.compiled.sha256
    }

    pub fn kind(&self) -> PluginKind {
        self.inner.compiled.kind
    }

    /// Hosts `http.send` may reach: `host`, `host:port`, `*.domain`, `*.domain:port`.
    pub fn granted_hosts(&self) -> &[String] {
        &self.inner.granted_hosts
    }

    /// Whether `other` is this very loaded plugin: the same component with the same grants and
    /// settings (any `with_*` makes another one).
    pub fn is_same(&self, other: &Plugin) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// `NAME@VERSION`, as errors name this plugin.
    pub fn label(&self) -> &PluginLabel {
        &self.inner.label
    }

    /// The same compiled plugin with other grants (no recompilation). Grants that do not parse
    /// (see [`crate::is_valid_grant`]) match nothing.
    pub fn with_granted_hosts(&self, hosts: Vec<String>) -> Plugin {
        warn_about_invalid_grants(&self.inner.label, &hosts);
        Plugin {
            inner: Arc::new(PluginInner {
                label: self.inner.label.clone(),
                granted_hosts: hosts.into(),
                settings: self.inner.settings.clone(),
                compiled: self.inner.compiled.clone(),
                engine: self.inner.engine.clone(),
            }),
        }
    }

    /// What the plugin reads through the `settings` import (e.g. a self-hosted forge's API base).
    /// Empty unless given with [`Plugin::with_settings`].
    pub fn settings(&self) -> &BTreeMap<String, String> {
        &self.inner.settings
    }

    /// The same compiled plugin with other settings (no recompilation). Settings are plain
    /// configuration: secrets go through [`SecretSource`], never here.
    pub fn with_settings(&self, settings: BTreeMap<String, String>) -> Plugin {
        Plugin {
            inner: Arc::new(PluginInner {
                label: self.inner.label.clone(),
                granted_hosts: self.inner.granted_hosts.clone(),
                settings: Arc::new(settings),
                compiled: self.inner.compiled.clone(),
                engine: self.inner.engine.clone(),
            }),
        }
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Plugin")
            .field("label", &*self.inner.label)
            .field("kind", &self.kind())
            .field("sha256", &self.sha256())
            .field("granted_hosts", &self.granted_hosts())
            .field("settings", &self.settings())
            .finish()
    }
}

pub(super) fn warn_about_invalid_grants(label: &PluginLabel, hosts: &[String]) {
    for host in hosts.iter().filter(|host| !grants::is_valid_grant(host)) {
        tracing::warn!(plugin = %label, grant = %host, "grant is not host, host:port or *.domain[:port]; it matches nothing");
    }
}

/// Compiled components by sha256, least recently loaded evicted first.
#[derive(Default)]
pub(super) struct ComponentCache {
    entries: HashMap<String, (Arc<Compiled>, u64)>,
    loads: u64,
}

impl ComponentCache {
    pub(super) fn get(&mut self, sha256: &str) -> Option<Arc<Compiled>> {
        self.loads += 1;
        let loads = self.loads;
        self.entries.get_mut(sha256).map(|(compiled, last_loaded)| {
            *last_loaded = loads;
            compiled.clone()
        })
    }

    pub(super) fn insert(&mut self, compiled: Arc<Compiled>, capacity: usize) {
        while self.entries.len() >= capacity.max(1) {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.loads += 1;
        self.entries.insert(compiled.sha256.clone(), (compiled, self.loads));
    }
}
