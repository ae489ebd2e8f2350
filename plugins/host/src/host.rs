//! `PluginHost`: loads components into plugins (validated, compiled once per sha256) and runs
//! each call in a fresh, bounded store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, WasmBacktrace};

use crate::bindings::tool_world::{self, Tool, ToolPre};
use crate::bindings::vcs_world::flotilla::plugin::{log as wit_log, types as wit_types, vcs as wit_vcs};
use crate::bindings::vcs_world::{self, VcsProvider, VcsProviderPre};
use crate::config::HostConfig;
use crate::disk_cache::DiskCache;
use crate::error::{CallError, HttpFailure, PluginError, PluginFailure};
use crate::placeholders::{self, PlaceholderError};
use crate::state::{HostState, MAX_CORE_INSTANCES_PER_PLUGIN, MAX_MEMORIES_PER_PLUGIN, MAX_TABLES_PER_PLUGIN};
use crate::types::{
    PluginKind, PluginLabel, ProviderInfo, PullRequest, PullRequestInput, RepoRef, ResolvedCloneSpec, ToolDescription,
    WebhookEvent, WebhookInput,
};
use crate::validate::{self, ExportProblem, ItemKind};
use crate::{grants, http};

/// Fuel burnt between two yields of a running call to the async executor: roughly 50-100 µs of
/// guest code, so a busy plugin never holds an executor thread for long, and a timed-out call is
/// dropped at its next yield.
const FUEL_YIELD_INTERVAL: u64 = 100_000;

/// Secrets a plugin's placeholders may name; the node supplies it.
pub trait SecretSource: Send + Sync + 'static {
    /// The value of secret `name` for plugin `plugin`, if that plugin may use it.
    fn secret(&self, plugin: &str, name: &str) -> Option<String>;
}

/// A `SecretSource` with no secrets (benchmarks, tools that need none).
pub struct NoSecrets;

impl SecretSource for NoSecrets {
    fn secret(&self, _plugin: &str, _name: &str) -> Option<String> {
        None
    }
}

/// What every call of a host shares.
pub(crate) struct Shared {
    pub(crate) config: HostConfig,
    pub(crate) http_client: reqwest::Client,
    pub(crate) secrets: Arc<dyn SecretSource>,
}

/// A validated component, compiled and pre-linked, ready to instantiate.
struct Compiled {
    sha256: String,
    kind: PluginKind,
    pre: CompiledPre,
    /// The code came from the disk cache rather than the compiler.
    from_disk: bool,
}

enum CompiledPre {
    VcsProvider(VcsProviderPre<HostState>),
    Tool(ToolPre<HostState>),
}

struct PluginInner {
    label: Arc<PluginLabel>,
    granted_hosts: Arc<[String]>,
    settings: Arc<BTreeMap<String, String>>,
    compiled: Arc<Compiled>,
    engine: Engine,
}

/// A compiled, validated plugin. Cheap to clone (`Arc` inside). Calls in flight keep the version
/// they started with even if the caller swaps in a new one.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
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

fn warn_about_invalid_grants(label: &PluginLabel, hosts: &[String]) {
    for host in hosts.iter().filter(|host| !grants::is_valid_grant(host)) {
        tracing::warn!(plugin = %label, grant = %host, "grant is not host, host:port or *.domain[:port]; it matches nothing");
    }
}

/// Compiled components by sha256, least recently loaded evicted first.
#[derive(Default)]
struct ComponentCache {
    entries: HashMap<String, (Arc<Compiled>, u64)>,
    loads: u64,
}

impl ComponentCache {
    fn get(&mut self, sha256: &str) -> Option<Arc<Compiled>> {
        self.loads += 1;
        let loads = self.loads;
        self.entries.get_mut(sha256).map(|(compiled, last_loaded)| {
            *last_loaded = loads;
            compiled.clone()
        })
    }

    fn insert(&mut self, compiled: Arc<Compiled>, capacity: usize) {
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

/// Loads and runs plugins. One per node; calls from many tasks at once are fine.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    shared: Arc<Shared>,
    cache: Mutex<ComponentCache>,
    /// Compiled code kept across restarts, when the config names a directory for it.
    disk_cache: Option<DiskCache>,
    compile_count: AtomicU64,
    disk_load_count: AtomicU64,
    /// One permit per instance that may exist at once (the pool's size with pooling).
    instance_slots: Semaphore,
}

/// One export call, with its arguments in binding types.
enum Call {
    Info,
    MatchUrl(String),
    CloneSpec(String),
    CreatePullRequest(wit_vcs::PullRequestInput),
    ParseWebhook(wit_vcs::WebhookInput),
    Describe,
    Invoke(String),
}

impl Call {
    fn function(&self) -> &'static str {
        match self {
            Call::Info => "info",
            Call::MatchUrl(_) => "match-url",
            Call::CloneSpec(_) => "clone-spec",
            Call::CreatePullRequest(_) => "create-pull-request",
            Call::ParseWebhook(_) => "parse-webhook",
            Call::Describe => "describe",
            Call::Invoke(_) => "invoke",
        }
    }

    fn kind(&self) -> PluginKind {
        match self {
            Call::Describe | Call::Invoke(_) => PluginKind::Tool,
            _ => PluginKind::VcsProvider,
        }
    }
}

/// One export's answer, in binding types.
enum Answer {
    Info(wit_vcs::ProviderInfo),
    MatchUrl(Option<wit_vcs::RepoRef>),
    CloneSpec(Result<wit_vcs::CloneSpec, wit_vcs::PluginError>),
    CreatePullRequest(Result<wit_vcs::PullRequest, wit_vcs::PluginError>),
    ParseWebhook(Result<Option<wit_vcs::WebhookEvent>, wit_vcs::PluginError>),
    Describe(tool_world::flotilla::plugin::tool_types::ToolDescription),
    Invoke(Result<String, String>),
}

fn header_bytes(header: &wit_types::Header) -> usize {
    header.name.len() + header.value.len()
}

fn http_error_bytes(error: &wit_types::HttpError) -> usize {
    use wit_types::HttpError::*;
    match error {
        HostNotGranted(text) | UnknownSecret(text) | InvalidRequest(text) | Transport(text) => text.len(),
        TooLarge(_) | Timeout => 0,
    }
}

fn plugin_error_bytes(error: &wit_vcs::PluginError) -> usize {
    use wit_vcs::PluginError::*;
    match error {
        Unsupported(text) | InvalidInput(text) => text.len(),
        Http(error) => http_error_bytes(error),
        Remote(remote) => remote.message.len(),
    }
}

fn result_bytes<T>(result: &Result<T, wit_vcs::PluginError>, ok_bytes: impl Fn(&T) -> usize) -> usize {
    match result {
        Ok(value) => ok_bytes(value),
        Err(error) => plugin_error_bytes(error),
    }
}

impl Answer {
    /// Bytes of the strings and lists in the answer: what `max_output_bytes` bounds.
    fn output_bytes(&self) -> usize {
        match self {
            Answer::Info(info) => {
                info.name.len() + info.display_name.len() + info.url_patterns.iter().map(String::len).sum::<usize>()
            }
            Answer::MatchUrl(repo) => repo.as_ref().map_or(0, |repo| {
                repo.host.len() + repo.owner.len() + repo.name.len() + repo.web_url.len()
            }),
            Answer::CloneSpec(result) => result_bytes(result, |spec| {
                spec.url.len() + spec.auth_header.as_ref().map_or(0, header_bytes)
            }),
            Answer::CreatePullRequest(result) => result_bytes(result, |pull_request| pull_request.url.len()),
            Answer::ParseWebhook(result) => result_bytes(result, |event| {
                event.as_ref().map_or(0, |event| {
                    event.kind.len()
                        + event.repository_url.len()
                        + event.branch.as_ref().map_or(0, String::len)
                        + event.actor.as_ref().map_or(0, String::len)
                })
            }),
            Answer::Describe(description) => {
                description.name.len() + description.description.len() + description.parameters_schema.len()
            }
            Answer::Invoke(Ok(text) | Err(text)) => text.len(),
        }
    }
}

fn engine_error(message: impl std::fmt::Display) -> PluginError {
    PluginError::Engine {
        message: message.to_string(),
    }
}

/// A component binary starts with `\0asm`, then a version and a layer: layer 1 is a component,
/// layer 0 a core module.
fn check_component_header(plugin: &PluginLabel, bytes: &[u8]) -> Result<(), PluginError> {
    let not_a_component = |reason: &str| PluginError::NotAComponent {
        plugin: plugin.clone(),
        reason: reason.to_string(),
    };
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(not_a_component("the bytes are not wasm (no \\0asm header)"));
    }
    match bytes[6..8] {
        [1, 0] => Ok(()),
        [0, 0] => Err(not_a_component(
            "it is a core wasm module; build a component (e.g. cargo build --target wasm32-wasip2 with wit-bindgen)",
        )),
        _ => Err(not_a_component("unknown wasm binary layer")),
    }
}

fn item_kind(item: &wasmtime::component::types::ComponentItem) -> ItemKind {
    use wasmtime::component::types::ComponentItem;
    match item {
        ComponentItem::ComponentInstance(_) => ItemKind::Instance,
        ComponentItem::ComponentFunc(_) => ItemKind::Function,
        ComponentItem::Type(_) | ComponentItem::Resource(_) => ItemKind::Type,
        _ => ItemKind::Other,
    }
}

/// The error chain in one line.
fn error_chain(error: &wasmtime::Error) -> String {
    error.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

fn plugin_failure(error: wit_vcs::PluginError) -> PluginFailure {
    match error {
        wit_vcs::PluginError::Unsupported(message) => PluginFailure::Unsupported(message),
        wit_vcs::PluginError::InvalidInput(message) => PluginFailure::InvalidInput(message),
        wit_vcs::PluginError::Http(error) => PluginFailure::Http(http_failure(error)),
        wit_vcs::PluginError::Remote(remote) => PluginFailure::Remote {
            status: remote.status,
            message: remote.message,
        },
    }
}

fn http_failure(error: wit_types::HttpError) -> HttpFailure {
    match error {
        wit_types::HttpError::HostNotGranted(host) => HttpFailure::HostNotGranted(host),
        wit_types::HttpError::UnknownSecret(name) => HttpFailure::UnknownSecret(name),
        wit_types::HttpError::InvalidRequest(message) => HttpFailure::InvalidRequest(message),
        wit_types::HttpError::Transport(message) => HttpFailure::Transport(message),
        wit_types::HttpError::TooLarge(limit) => HttpFailure::TooLarge(limit),
        wit_types::HttpError::Timeout => HttpFailure::Timeout,
    }
}

/// A plugin's own error as the call's error; a refused host is named as such.
fn plugin_error(plugin: &Plugin, function: &'static str, error: wit_vcs::PluginError) -> CallError {
    match plugin_failure(error) {
        PluginFailure::Http(HttpFailure::HostNotGranted(host)) => CallError::HostNotGranted {
            plugin: plugin.label().clone(),
            function,
            host,
        },
        failure => CallError::Plugin {
            plugin: plugin.label().clone(),
            function,
            failure,
        },
    }
}

impl PluginHost {
    pub fn new(config: HostConfig, secrets: Arc<dyn SecretSource>) -> Result<PluginHost, PluginError> {
        let mut engine_config = wasmtime::Config::new();
        engine_config.wasm_component_model(true);
        engine_config.consume_fuel(true);
        if config.pooling {
            let slots = config.max_instances.max(1);
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(slots);
            pool.total_core_instances(slots.saturating_mul(MAX_CORE_INSTANCES_PER_PLUGIN as u32));
            pool.total_memories(slots.saturating_mul(MAX_MEMORIES_PER_PLUGIN as u32));
            pool.total_tables(slots.saturating_mul(MAX_TABLES_PER_PLUGIN as u32));
            pool.total_stacks(slots);
            pool.max_core_instances_per_component(MAX_CORE_INSTANCES_PER_PLUGIN as u32);
            pool.max_memories_per_component(MAX_MEMORIES_PER_PLUGIN as u32);
            pool.max_tables_per_component(MAX_TABLES_PER_PLUGIN as u32);
            pool.max_memory_size(config.memory_limit_bytes);
            engine_config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&engine_config).map_err(|error| engine_error(error_chain(&error)))?;

        let mut linker = Linker::<HostState>::new(&engine);
        add_sandboxed_wasi(&mut linker).map_err(|error| engine_error(error_chain(&error)))?;
        add_plugin_interfaces(&mut linker).map_err(|error| engine_error(error_chain(&error)))?;

        let http_client = http::build_client(&config).map_err(engine_error)?;
        let instance_slots = Semaphore::new(config.max_instances.max(1) as usize);
        let disk_cache = config
            .compiled_cache_dir
            .as_deref()
            .and_then(|dir| match DiskCache::open(dir, config.max_compiled_files, &engine) {
                Ok(cache) => Some(cache),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "no compiled plugin cache on disk; every start compiles");
                    None
                }
            });
        Ok(PluginHost {
            engine,
            linker,
            shared: Arc::new(Shared {
                config,
                http_client,
                secrets,
            }),
            cache: Mutex::new(ComponentCache::default()),
            disk_cache,
            compile_count: AtomicU64::new(0),
            disk_load_count: AtomicU64::new(0),
            instance_slots,
        })
    }

    pub fn config(&self) -> &HostConfig {
        &self.shared.config
    }

    /// Components compiled so far (a load served from the cache does not count).
    pub fn compile_count(&self) -> u64 {
        self.compile_count.load(Ordering::Relaxed)
    }

    /// Components whose compiled code came from the disk cache instead of the compiler.
    pub fn disk_load_count(&self) -> u64 {
        self.disk_load_count.load(Ordering::Relaxed)
    }

    /// Validates that `bytes` is a component targeting exactly one of the worlds `vcs-provider`
    /// and `tool`, importing only what the host offers, compiles it (once per sha256: loading the
    /// same bytes again, under any name or version, reuses the compiled code) and returns it as a
    /// plugin. Compiling takes from tens of milliseconds to seconds: call this from
    /// `spawn_blocking`, not from an async task.
    pub fn load(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        granted_hosts: Vec<String>,
    ) -> Result<Plugin, PluginError> {
        let label = PluginLabel {
            name: name.to_string(),
            version: version.to_string(),
        };
        let max_component_bytes = self.shared.config.max_component_bytes;
        if bytes.len() > max_component_bytes {
            return Err(PluginError::TooLarge {
                plugin: label,
                size_bytes: bytes.len(),
                max_component_bytes,
            });
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&sha256);
        let from_memory = cached.is_some();
        let compiled = match cached {
            Some(compiled) => compiled,
            None => {
                let compiled = Arc::new(self.compile(&label, bytes, sha256)?);
                self.cache
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(compiled.clone(), self.shared.config.max_cached_components);
                compiled
            }
        };
        warn_about_invalid_grants(&label, &granted_hosts);
        let code = match (from_memory, compiled.from_disk) {
            (true, _) => "cached in memory",
            (false, true) => "read from disk",
            (false, false) => "compiled",
        };
        tracing::info!(plugin = %label, kind = %compiled.kind, sha256 = %compiled.sha256, code, "plugin loaded");
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                label: Arc::new(label),
                granted_hosts: granted_hosts.into(),
                settings: Arc::default(),
                compiled,
                engine: self.engine.clone(),
            }),
        })
    }

    fn compile(&self, label: &PluginLabel, bytes: &[u8], sha256: String) -> Result<Compiled, PluginError> {
        check_component_header(label, bytes)?;
        let from_disk = self
            .disk_cache
            .as_ref()
            .and_then(|cache| cache.load(&self.engine, &sha256));
        let (component, compiled_here) = match from_disk {
            Some(component) => {
                self.disk_load_count.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(crate::metrics::PLUGIN_DISK_LOADS_TOTAL).increment(1);
                (component, false)
            }
            None => {
                let component = Component::new(&self.engine, bytes).map_err(|error| PluginError::Compile {
                    plugin: label.clone(),
                    message: error_chain(&error),
                })?;
                self.compile_count.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(crate::metrics::PLUGIN_COMPILES_TOTAL).increment(1);
                (component, true)
            }
        };

        let component_type = component.component_type();
        let imports: Vec<(&str, ItemKind)> = component_type
            .imports(&self.engine)
            .map(|(name, item)| (name, item_kind(&item.ty)))
            .collect();
        validate::check_imports_offered(imports.iter().copied()).map_err(|import| PluginError::ImportNotOffered {
            plugin: label.clone(),
            import,
            offered: validate::OFFERED_IMPORTS,
        })?;
        let exports = component_type
            .exports(&self.engine)
            .map(|(name, item)| (name, item_kind(&item.ty)));
        let kind = validate::world_of_exports(exports).map_err(|problem| match problem {
            ExportProblem::NoWorld { found } => PluginError::NoWorld {
                plugin: label.clone(),
                found,
            },
            ExportProblem::BothWorlds => PluginError::BothWorlds { plugin: label.clone() },
            ExportProblem::Mismatch { world, problem } => PluginError::ExportsMismatch {
                plugin: label.clone(),
                world,
                problem,
            },
        })?;
        validate::check_imports_in_world(kind, imports.iter().copied()).map_err(|import| {
            PluginError::ImportNotInWorld {
                plugin: label.clone(),
                import,
                world: kind,
            }
        })?;

        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|error| PluginError::Link {
                plugin: label.clone(),
                message: error_chain(&error),
            })?;
        let mismatch = |error: wasmtime::Error| PluginError::ExportsMismatch {
            plugin: label.clone(),
            world: kind,
            problem: error_chain(&error),
        };
        let pre = match kind {
            PluginKind::VcsProvider => CompiledPre::VcsProvider(VcsProviderPre::new(instance_pre).map_err(mismatch)?),
            PluginKind::Tool => CompiledPre::Tool(ToolPre::new(instance_pre).map_err(mismatch)?),
        };
        // Only code that passed every check above is kept (a load from disk runs them again).
        if let (true, Some(cache)) = (compiled_here, &self.disk_cache) {
            cache.store(&sha256, &component);
        }
        Ok(Compiled {
            sha256,
            kind,
            pre,
            from_disk: !compiled_here,
        })
    }

    fn new_store(&self, plugin: &Plugin) -> Result<Store<HostState>, wasmtime::Error> {
        let state = HostState::new(
            self.shared.clone(),
            plugin.inner.label.clone(),
            plugin.inner.granted_hosts.clone(),
            plugin.inner.settings.clone(),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_fuel(self.shared.config.fuel_per_call)?;
        store.fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL))?;
        Ok(store)
    }

    /// What a wasmtime error inside a call means, given what the store saw.
    fn classify(
        &self,
        plugin: &Plugin,
        function: &'static str,
        error: wasmtime::Error,
        state: &HostState,
    ) -> CallError {
        let label = plugin.label().clone();
        if state.limiter.memory_limit_hit {
            return CallError::MemoryLimit {
                plugin: label,
                function,
                memory_limit_bytes: self.shared.config.memory_limit_bytes,
            };
        }
        if error.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            return CallError::OutOfFuel {
                plugin: label,
                function,
                fuel_per_call: self.shared.config.fuel_per_call,
            };
        }
        // The trap itself (not wasmtime's multi-line context), where it happened, and what the
        // plugin said last (a Rust panic message).
        let mut message = match error.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => error.root_cause().to_string(),
        };
        let frame = error.downcast_ref::<WasmBacktrace>().and_then(|backtrace| {
            backtrace
                .frames()
                .iter()
                .find_map(|frame| frame.func_name().map(str::to_string))
        });
        if let Some(function_name) = frame {
            message.push_str(" in ");
            message.push_str(&function_name);
        }
        let output = state.captured_output.text();
        if !output.is_empty() {
            message.push_str("; the plugin's last output: ");
            message.push_str(&output);
        }
        CallError::Trap {
            plugin: label,
            function,
            message,
        }
    }

    /// Runs one call in a fresh store: instantiate (from the compiled, pre-linked component),
    /// call, drop. Bounded by fuel, memory, `call_timeout` and `max_output_bytes`.
    async fn call(&self, plugin: &Plugin, call: Call) -> Result<Answer, CallError> {
        let function = call.function();
        if !Engine::same(&plugin.inner.engine, &self.engine) {
            return Err(CallError::ForeignPlugin {
                plugin: plugin.label().clone(),
                function,
            });
        }
        if plugin.kind() != call.kind() {
            return Err(CallError::WrongKind {
                plugin: plugin.label().clone(),
                function,
                kind: plugin.kind(),
            });
        }
        let config = &self.shared.config;
        let run = async {
            // Declared before the store so that the store (and its pool slot) goes first.
            let _slot = self
                .instance_slots
                .acquire()
                .await
                .expect("the instance semaphore is never closed");
            let mut store = self.new_store(plugin).map_err(|error| CallError::Instantiate {
                plugin: plugin.label().clone(),
                function,
                message: error_chain(&error),
            })?;
            let instantiate_error = |store: &Store<HostState>, error: wasmtime::Error| {
                if store.data().limiter.memory_limit_hit || error.downcast_ref::<Trap>().is_some() {
                    self.classify(plugin, function, error, store.data())
                } else {
                    CallError::Instantiate {
                        plugin: plugin.label().clone(),
                        function,
                        message: error_chain(&error),
                    }
                }
            };
            let outcome = match &plugin.inner.compiled.pre {
                CompiledPre::VcsProvider(pre) => match pre.instantiate_async(&mut store).await {
                    Ok(bindings) => call_vcs_provider(&bindings, &mut store, call).await,
                    Err(error) => return Err(instantiate_error(&store, error)),
                },
                CompiledPre::Tool(pre) => match pre.instantiate_async(&mut store).await {
                    Ok(bindings) => call_tool(&bindings, &mut store, call).await,
                    Err(error) => return Err(instantiate_error(&store, error)),
                },
            };
            outcome.map_err(|error| self.classify(plugin, function, error, store.data()))
        };
        let answer = tokio::time::timeout(config.call_timeout, run)
            .await
            .map_err(|_| CallError::Timeout {
                plugin: plugin.label().clone(),
                function,
                timeout: config.call_timeout,
            })??;
        let output_bytes = answer.output_bytes();
        if output_bytes > config.max_output_bytes {
            return Err(CallError::OutputTooLarge {
                plugin: plugin.label().clone(),
                function,
                output_bytes,
                max_output_bytes: config.max_output_bytes,
            });
        }
        Ok(answer)
    }

    pub async fn info(&self, plugin: &Plugin) -> Result<ProviderInfo, CallError> {
        match self.call(plugin, Call::Info).await? {
            Answer::Info(info) => Ok(ProviderInfo {
                name: info.name,
                display_name: info.display_name,
                url_patterns: info.url_patterns,
                supports_pull_requests: info.supports_pull_requests,
            }),
            _ => unreachable!("info answers info"),
        }
    }

    /// The repository `url` names, if it is this provider's.
    pub async fn match_url(&self, plugin: &Plugin, url: &str) -> Result<Option<RepoRef>, CallError> {
        match self.call(plugin, Call::MatchUrl(url.to_string())).await? {
            Answer::MatchUrl(repo) => Ok(repo.map(|repo| RepoRef {
                host: repo.host,
                owner: repo.owner,
                name: repo.name,
                web_url: repo.web_url,
            })),
            _ => unreachable!("match-url answers match-url"),
        }
    }

    /// How git clones and pushes `url`. The host fills the auth header's placeholders
    /// (`{{secret:NAME}}`, and `{{basic:USER:secret:NAME}}` meaning base64("USER:" + value)) with
    /// the plugin's secrets; the returned header is for git only.
    pub async fn clone_spec(&self, plugin: &Plugin, url: &str) -> Result<ResolvedCloneSpec, CallError> {
        const FUNCTION: &str = "clone-spec";
        let spec = match self.call(plugin, Call::CloneSpec(url.to_string())).await? {
            Answer::CloneSpec(result) => result.map_err(|error| plugin_error(plugin, FUNCTION, error))?,
            _ => unreachable!("clone-spec answers clone-spec"),
        };
        let invalid = |message: String| CallError::InvalidOutput {
            plugin: plugin.label().clone(),
            function: FUNCTION,
            message,
        };
        grants::check_clone_url(url, &spec.url, spec.auth_header.is_some()).map_err(invalid)?;
        let auth_header = match spec.auth_header {
            None => None,
            Some(header) => {
                if reqwest::header::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                    return Err(invalid(format!(
                        "auth header name {:?} is not a valid header name",
                        header.name
                    )));
                }
                let secrets = &self.shared.secrets;
                let value =
                    placeholders::fill(&header.value, |name| secrets.secret(plugin.name(), name)).map_err(|error| {
                        match error {
                            PlaceholderError::UnknownSecret(secret) => CallError::UnknownSecret {
                                plugin: plugin.label().clone(),
                                function: FUNCTION,
                                secret,
                            },
                            PlaceholderError::Malformed(problem) => invalid(format!("auth header: {problem}")),
                        }
                    })?;
                if reqwest::header::HeaderValue::from_str(&value).is_err() {
                    return Err(invalid(
                        "auth header value (after placeholders) is not a valid header value".to_string(),
                    ));
                }
                Some((header.name, value))
            }
        };
        Ok(ResolvedCloneSpec {
            url: spec.url,
            auth_header,
        })
    }

    pub async fn create_pull_request(
        &self,
        plugin: &Plugin,
        input: PullRequestInput,
    ) -> Result<PullRequest, CallError> {
        let input = wit_vcs::PullRequestInput {
            repository_url: input.repository_url,
            head_branch: input.head_branch,
            base_branch: input.base_branch,
            title: input.title,
            body: input.body,
            draft: input.draft,
        };
        match self.call(plugin, Call::CreatePullRequest(input)).await? {
            Answer::CreatePullRequest(result) => result
                .map(|pull_request| PullRequest {
                    url: pull_request.url,
                    number: pull_request.number,
                })
                .map_err(|error| plugin_error(plugin, "create-pull-request", error)),
            _ => unreachable!("create-pull-request answers create-pull-request"),
        }
    }

    /// The event a webhook delivery describes; `None` for deliveries the provider ignores.
    pub async fn parse_webhook(&self, plugin: &Plugin, input: WebhookInput) -> Result<Option<WebhookEvent>, CallError> {
        let input = wit_vcs::WebhookInput {
            headers: input
                .headers
                .into_iter()
                .map(|(name, value)| wit_types::Header { name, value })
                .collect(),
            body: input.body,
        };
        match self.call(plugin, Call::ParseWebhook(input)).await? {
            Answer::ParseWebhook(result) => result
                .map(|event| {
                    event.map(|event| WebhookEvent {
                        kind: event.kind,
                        repository_url: event.repository_url,
                        branch: event.branch,
                        pull_request_number: event.pull_request_number,
                        actor: event.actor,
                    })
                })
                .map_err(|error| plugin_error(plugin, "parse-webhook", error)),
            _ => unreachable!("parse-webhook answers parse-webhook"),
        }
    }

    pub async fn describe(&self, plugin: &Plugin) -> Result<ToolDescription, CallError> {
        match self.call(plugin, Call::Describe).await? {
            Answer::Describe(description) => Ok(ToolDescription {
                name: description.name,
                description: description.description,
                parameters_schema: description.parameters_schema,
            }),
            _ => unreachable!("describe answers describe"),
        }
    }

    /// The tool's result for the model (`Ok`) or its error message for the model (`Err`); the
    /// outer error is the call's failure.
    pub async fn invoke(&self, plugin: &Plugin, arguments_json: &str) -> Result<Result<String, String>, CallError> {
        match self.call(plugin, Call::Invoke(arguments_json.to_string())).await? {
            Answer::Invoke(result) => Ok(result),
            _ => unreachable!("invoke answers invoke"),
        }
    }
}

async fn call_vcs_provider(
    bindings: &VcsProvider,
    store: &mut Store<HostState>,
    call: Call,
) -> wasmtime::Result<Answer> {
    Ok(match call {
        Call::Info => Answer::Info(bindings.call_info(&mut *store).await?),
        Call::MatchUrl(url) => Answer::MatchUrl(bindings.call_match_url(&mut *store, &url).await?),
        Call::CloneSpec(url) => Answer::CloneSpec(bindings.call_clone_spec(&mut *store, &url).await?),
        Call::CreatePullRequest(input) => {
            Answer::CreatePullRequest(bindings.call_create_pull_request(&mut *store, &input).await?)
        }
        Call::ParseWebhook(input) => Answer::ParseWebhook(bindings.call_parse_webhook(&mut *store, &input).await?),
        Call::Describe | Call::Invoke(_) => unreachable!("kind checked before the call"),
    })
}

async fn call_tool(bindings: &Tool, store: &mut Store<HostState>, call: Call) -> wasmtime::Result<Answer> {
    Ok(match call {
        Call::Describe => Answer::Describe(bindings.call_describe(&mut *store).await?),
        Call::Invoke(arguments) => Answer::Invoke(bindings.call_invoke(&mut *store, &arguments).await?),
        _ => unreachable!("kind checked before the call"),
    })
}

/// The plugin's own interfaces: `http`, `log`, `settings`, and the type-only `types`, `vcs`,
/// `tool-types`.
fn add_plugin_interfaces(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    vcs_world::flotilla::plugin::types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    vcs_world::flotilla::plugin::http::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    wit_log::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    vcs_world::flotilla::plugin::settings::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    vcs_world::flotilla::plugin::vcs::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    tool_world::flotilla::plugin::tool_types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    Ok(())
}

/// WASI 0.2 for a `wasm32-wasip2` guest's standard library, minus `wasi:sockets`: the same
/// interfaces as `wasmtime_wasi::p2::add_to_linker_async` otherwise. What they can reach is
/// decided by the empty `WasiCtx` of each call (see `HostState::new`).
fn add_sandboxed_wasi(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
    use wasmtime_wasi::random::WasiRandom;
    use wasmtime_wasi::WasiView;

    struct HasTable;
    impl wasmtime::component::HasData for HasTable {
        type Data<'a> = &'a mut ResourceTable;
    }
    fn table(state: &mut HostState) -> &mut ResourceTable {
        state.ctx().table
    }
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<HostState, HasTable>(linker, table)?;
    wasmtime_wasi_io::bindings::wasi::io::poll::add_to_linker::<HostState, HasTable>(linker, table)?;
    wasmtime_wasi_io::bindings::wasi::io::streams::add_to_linker::<HostState, HasTable>(linker, table)?;

    let l = linker;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    filesystem::types::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
    filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
    random::random::add_to_linker::<HostState, WasiRandom>(l, |state| state.ctx().ctx.random())?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(l, |state| state.ctx().ctx.random())?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, |state| state.ctx().ctx.random())?;
    cli::exit::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::environment::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    Ok(())
}
