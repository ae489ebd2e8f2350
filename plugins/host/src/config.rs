//! The host's limits. Every bound a plugin can press against has a name here.

use std::path::PathBuf;
use std::time::Duration;

/// Limits and switches of a [`crate::PluginHost`]; every call of every plugin runs inside them.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Wasmtime fuel a call may burn (about one unit per Wasm instruction): the CPU bound.
    pub fuel_per_call: u64,
    /// Linear memory one plugin instance may hold, all its memories together.
    pub memory_limit_bytes: usize,
    /// Wall clock of one call, from waiting for an instance slot to the plugin's answer, host
    /// calls (`http.send`) included.
    pub call_timeout: Duration,
    /// Strings and lists a plugin returns from one call, added up.
    pub max_output_bytes: usize,
    /// Body of one response that `http.send` hands a plugin.
    pub max_http_response_bytes: usize,
    /// One `http.send`, from connecting to the last byte of the body.
    pub http_timeout: Duration,
    /// One `log` line; longer lines are cut (at a character boundary) and marked.
    pub max_log_line_bytes: usize,
    /// Wasmtime's pooling instance allocator: memories and instances are reserved up front and
    /// reused, which makes instantiation (one per call) several times cheaper.
    pub pooling: bool,
    /// Calls running at once, over all plugins of this host (and, with pooling, the pool's size).
    /// Further calls wait for a slot, within their `call_timeout`.
    pub max_instances: u32,
    /// Size of a component `load` accepts.
    pub max_component_bytes: usize,
    /// Compiled components kept by sha256 (least recently loaded evicted first). A `Plugin`
    /// keeps its own compiled code alive whether or not it is still cached.
    pub max_cached_components: usize,
    /// Where compiled code is kept across restarts (created owner-only; it must be this node's
    /// alone, since loading compiled code skips wasmtime's validation of it). `None` compiles
    /// every component at every start.
    pub compiled_cache_dir: Option<PathBuf>,
    /// Files of compiled code kept in `compiled_cache_dir`; the least recently written go first.
    pub max_compiled_files: usize,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            fuel_per_call: 2_000_000_000,
            memory_limit_bytes: 64 << 20,
            call_timeout: Duration::from_secs(10),
            max_output_bytes: 1 << 20,
            max_http_response_bytes: 8 << 20,
            http_timeout: Duration::from_secs(8),
            max_log_line_bytes: 4096,
            pooling: true,
            max_instances: 64,
            max_component_bytes: 32 << 20,
            max_cached_components: 64,
            compiled_cache_dir: None,
            max_compiled_files: 512,
        }
    }
}
