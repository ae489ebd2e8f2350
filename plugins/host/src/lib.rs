//! Runs Flotilla's plugins: VCS providers (GitHub, GitLab, a company's own forge...) and agent
//! tools, shipped as WebAssembly components that an admin uploads to a running cluster. Each node
//! loads the replicated bytes into a [`PluginHost`], which validates them against the WIT worlds
//! in `plugins/wit` (`vcs-provider`, `tool`), compiles them once per sha256, and runs every call in
//! a fresh wasmtime store bounded in fuel (CPU), memory, wall-clock time and output size. A
//! misbehaving plugin fails only its own call, with a [`CallError`] saying why.
//!
//! In the path of an agent: the node asks the provider plugin which repository a URL names
//! (`match_url`) and how git reaches it (`clone_spec`, whose auth header's secret placeholders the
//! host fills in), and later asks it to open the pull request (`create_pull_request`). Tool
//! plugins are offered to the model in the turn loop (`describe`, `invoke`).
//!
//! A plugin's only way out is `http.send` to the hosts an admin granted it, with `{{secret:NAME}}`
//! placeholders in header values filled in by the host, so a plugin never holds a token. WASI is
//! linked only as far as a `wasm32-wasip2` guest's standard library needs it, with nothing behind
//! it: no files, no environment, no sockets.

mod address_guard;
mod bindings;
mod config;
mod disk_cache;
mod error;
mod grants;
mod host;
mod http;
pub mod metrics;
mod placeholders;
mod state;
mod types;
mod validate;

pub use config::HostConfig;
pub use error::{CallError, HttpFailure, PluginError, PluginFailure};
pub use grants::is_valid_grant;
pub use host::{NoSecrets, Plugin, PluginHost, SecretSource};
pub use types::{
    PluginKind, PluginLabel, ProviderInfo, PullRequest, PullRequestInput, RepoRef, ResolvedCloneSpec, ToolDescription,
    WebhookEvent, WebhookInput,
};
