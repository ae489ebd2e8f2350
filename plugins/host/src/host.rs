//! `PluginHost`: loads components into plugins (validated, compiled once per sha256) and runs
//! each call in a fresh, bounded store. The loaded plugin and the compiled-code cache are in
//! [`plugin`], one call as data in [`call`], what instances link against in [`linking`].

mod call;
mod linking;
mod plugin;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, WasmBacktrace};

use crate::bindings::tool_world::ToolPre;
use crate::bindings::vcs_world::flotilla::plugin::{types as wit_types, vcs as wit_vcs};
use crate::bindings::vcs_world::VcsProviderPre;
use crate::config::HostConfig;
use crate::disk_cache::DiskCache;
use crate::error::{CallError, PluginError};
use crate::placeholders::{self, PlaceholderError};
use crate::state::{HostState, MAX_CORE_INSTANCES_PER_PLUGIN, MAX_MEMORIES_PER_PLUGIN, MAX_TABLES_PER_PLUGIN};
use crate::types::{
    PluginKind, PluginLabel, ProviderInfo, PullRequest, PullRequestInput, RepoRef, ResolvedCloneSpec, ToolDescription,
    WebhookEvent, WebhookInput,
};
use crate::validate::{self, ItemKind, ValidationError};
use crate::{grants, http};
use call::{call_tool, call_vcs_provider, plugin_error, Answer, Call};
use linking::{add_plugin_interfaces, add_sandboxed_wasi};
pub use plugin::Plugin;
use plugin::{warn_about_invalid_grants, Compiled, CompiledPre, ComponentCache, PluginInner};

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

/// A component that is not a plugin, as the error of loading it as `plugin`.
fn validation_error(plugin: &PluginLabel, error: ValidationError) -> PluginError {
    let plugin = plugin.clone();
    match error {
        ValidationError::ImportNotOffered { import } => PluginError::ImportNotOffered {
            plugin,
            import,
            offered: validate::OFFERED_IMPORTS,
        },
        ValidationError::ImportNotInWorld { import, world } => PluginError::ImportNotInWorld { plugin, import, world },
        ValidationError::NoWorld { found } => PluginError::NoWorld { plugin, found },
        ValidationError::BothWorlds => PluginError::BothWorlds { plugin },
        ValidationError::ExportsMismatch { world, mismatch } => PluginError::ExportsMismatch {
            plugin,
            world,
            problem: mismatch.to_string(),
        },
    }
}

/// The error chain in one line.
fn error_chain(error: &wasmtime::Error) -> String {
    error.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
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

        let http_client = http::build_client(config.http_timeout, None).map_err(engine_error)?;
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

        let kind = self
            .world_of_component(&component)
            .map_err(|error| validation_error(label, error))?;

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

    /// The world `component` targets, if its imports and exports make it a plugin of that world.
    fn world_of_component(&self, component: &Component) -> Result<PluginKind, ValidationError> {
        let component_type = component.component_type();
        let imports: Vec<(&str, ItemKind)> = component_type
            .imports(&self.engine)
            .map(|(name, item)| (name, item_kind(&item.ty)))
            .collect();
        validate::check_imports_offered(imports.iter().copied())?;
        let exports = component_type
            .exports(&self.engine)
            .map(|(name, item)| (name, item_kind(&item.ty)));
        let kind = validate::world_of_exports(exports)?;
        validate::check_imports_in_world(kind, imports.iter().copied())?;
        Ok(kind)
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

    /// Runs one call (see [`Self::call_unmeasured`]) and counts it.
    async fn call(&self, plugin: &Plugin, call: Call) -> Result<Answer, CallError> {
        let function = call.function();
        let result = self.call_unmeasured(plugin, call).await;
        crate::metrics::record_call(&plugin.label().name, function, result.is_ok());
        result
    }

    /// Runs one call in a fresh store: instantiate (from the compiled, pre-linked component),
    /// call, drop. Bounded by fuel, memory, `call_timeout` and `max_output_bytes`.
    async fn call_unmeasured(&self, plugin: &Plugin, call: Call) -> Result<Answer, CallError> {
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
            if let Ok(remaining) = store.get_fuel() {
                crate::metrics::record_fuel(
                    &plugin.label().name,
                    function,
                    config.fuel_per_call.saturating_sub(remaining),
                );
            }
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
        grants::check_clone_url(url, &spec.url, spec.auth_header.is_some())
            .map_err(|refused| invalid(refused.to_string()))?;
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
