//! The crate's two error types: [`PluginError`] when loading a component, [`CallError`] when a
//! call into a loaded plugin fails. Both name the plugin and version.

use std::fmt;
use std::time::Duration;

use crate::types::{PluginKind, PluginLabel};

/// Why a component could not be loaded as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin host: could not set up the wasm engine: {message}")]
    Engine { message: String },

    #[error("plugin {plugin}: component is {size_bytes} bytes, more than the limit of {max_component_bytes}")]
    TooLarge {
        plugin: PluginLabel,
        size_bytes: usize,
        max_component_bytes: usize,
    },

    #[error("plugin {plugin}: not a wasm component: {reason}")]
    NotAComponent { plugin: PluginLabel, reason: String },

    #[error("plugin {plugin}: component does not compile: {message}")]
    Compile { plugin: PluginLabel, message: String },

    /// The component imports something no plugin is offered.
    #[error("plugin {plugin}: imports `{import}`, which the host does not offer (it offers {offered})")]
    ImportNotOffered {
        plugin: PluginLabel,
        import: String,
        offered: &'static str,
    },

    /// The component imports an interface of the other world.
    #[error("plugin {plugin}: imports `{import}`, which world {world} does not offer")]
    ImportNotInWorld {
        plugin: PluginLabel,
        import: String,
        world: PluginKind,
    },

    #[error(
        "plugin {plugin}: exports neither world vcs-provider (info, match-url, clone-spec, create-pull-request, \
         parse-webhook) nor world tool (describe, invoke); found exports: [{found}]"
    )]
    NoWorld { plugin: PluginLabel, found: String },

    #[error("plugin {plugin}: exports functions of both worlds vcs-provider and tool; a plugin targets one")]
    BothWorlds { plugin: PluginLabel },

    #[error("plugin {plugin}: exports do not match world {world}: {problem}")]
    ExportsMismatch {
        plugin: PluginLabel,
        world: PluginKind,
        problem: String,
    },

    /// The imports passed the host's list but wasmtime could not link them (e.g. a function of an
    /// offered interface with another signature, or a WASI version the host does not know).
    #[error("plugin {plugin}: imports do not link against the host: {message}")]
    Link { plugin: PluginLabel, message: String },
}

/// An `http.send` refusal or failure, as the plugin saw it (mirrors the WIT `http-error`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpFailure {
    HostNotGranted(String),
    UnknownSecret(String),
    InvalidRequest(String),
    Transport(String),
    TooLarge(u64),
    Timeout,
}

impl fmt::Display for HttpFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpFailure::HostNotGranted(host) => write!(formatter, "host {host} is not granted to this plugin"),
            HttpFailure::UnknownSecret(name) => write!(formatter, "unknown secret {name}"),
            HttpFailure::InvalidRequest(message) => write!(formatter, "invalid request: {message}"),
            HttpFailure::Transport(message) => write!(formatter, "transport: {message}"),
            HttpFailure::TooLarge(limit) => write!(formatter, "response body larger than {limit} bytes"),
            HttpFailure::Timeout => formatter.write_str("timed out"),
        }
    }
}

/// A VCS provider's own `plugin-error`, as it returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginFailure {
    /// The provider cannot do that (e.g. pull requests on plain git).
    Unsupported(String),
    InvalidInput(String),
    Http(HttpFailure),
    /// The forge answered with an error; `message` is its own words.
    Remote {
        status: u16,
        message: String,
    },
}

impl fmt::Display for PluginFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginFailure::Unsupported(message) => write!(formatter, "unsupported: {message}"),
            PluginFailure::InvalidInput(message) => write!(formatter, "invalid input: {message}"),
            PluginFailure::Http(failure) => write!(formatter, "http: {failure}"),
            PluginFailure::Remote { status, message } => write!(formatter, "the forge answered {status}: {message}"),
        }
    }
}

/// Why one call into a plugin failed. Only that call failed: the host, the plugin's other calls
/// and other plugins go on.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("plugin {plugin}: cannot call {function}: it is a {kind} plugin")]
    WrongKind {
        plugin: PluginLabel,
        function: &'static str,
        kind: PluginKind,
    },

    #[error("plugin {plugin}: {function} was loaded by another plugin host")]
    ForeignPlugin {
        plugin: PluginLabel,
        function: &'static str,
    },

    /// The CPU bound: the call burnt its fuel.
    #[error("plugin {plugin}: {function} ran out of fuel (cpu bound of {fuel_per_call} units per call)")]
    OutOfFuel {
        plugin: PluginLabel,
        function: &'static str,
        fuel_per_call: u64,
    },

    #[error("plugin {plugin}: {function} did not finish within {timeout:?}")]
    Timeout {
        plugin: PluginLabel,
        function: &'static str,
        timeout: Duration,
    },

    #[error("plugin {plugin}: {function} reached the memory limit of {memory_limit_bytes} bytes")]
    MemoryLimit {
        plugin: PluginLabel,
        function: &'static str,
        memory_limit_bytes: usize,
    },

    /// The plugin trapped (a panic, an unreachable, a bad memory access...). `message` holds
    /// wasmtime's words and the tail of what the plugin wrote to stderr (a Rust panic message).
    #[error("plugin {plugin}: {function} trapped: {message}")]
    Trap {
        plugin: PluginLabel,
        function: &'static str,
        message: String,
    },

    /// The plugin tried a host it was not granted and gave up with that error.
    #[error("plugin {plugin}: {function} failed: host {host} is not granted to this plugin")]
    HostNotGranted {
        plugin: PluginLabel,
        function: &'static str,
        host: String,
    },

    #[error("plugin {plugin}: {function} returned {output_bytes} bytes, more than the limit of {max_output_bytes}")]
    OutputTooLarge {
        plugin: PluginLabel,
        function: &'static str,
        output_bytes: usize,
        max_output_bytes: usize,
    },

    /// The plugin's own error (`plugin-error`).
    #[error("plugin {plugin}: {function} failed: {failure}")]
    Plugin {
        plugin: PluginLabel,
        function: &'static str,
        failure: PluginFailure,
    },

    /// A placeholder in what the plugin returned names a secret it may not use.
    #[error("plugin {plugin}: {function} names unknown secret {secret}")]
    UnknownSecret {
        plugin: PluginLabel,
        function: &'static str,
        secret: String,
    },

    /// The plugin answered, but with something the host cannot use.
    #[error("plugin {plugin}: {function} returned an invalid answer: {message}")]
    InvalidOutput {
        plugin: PluginLabel,
        function: &'static str,
        message: String,
    },

    #[error("plugin {plugin}: could not instantiate for {function}: {message}")]
    Instantiate {
        plugin: PluginLabel,
        function: &'static str,
        message: String,
    },
}

impl CallError {
    /// The plugin version whose call failed.
    pub fn plugin(&self) -> &PluginLabel {
        match self {
            CallError::WrongKind { plugin, .. }
            | CallError::ForeignPlugin { plugin, .. }
            | CallError::OutOfFuel { plugin, .. }
            | CallError::Timeout { plugin, .. }
            | CallError::MemoryLimit { plugin, .. }
            | CallError::Trap { plugin, .. }
            | CallError::HostNotGranted { plugin, .. }
            | CallError::OutputTooLarge { plugin, .. }
            | CallError::Plugin { plugin, .. }
            | CallError::UnknownSecret { plugin, .. }
            | CallError::InvalidOutput { plugin, .. }
            | CallError::Instantiate { plugin, .. } => plugin,
        }
    }
}
