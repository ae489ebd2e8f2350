//! Flotilla's built-in plain git provider: a `vcs-provider` Wasm component that takes any
//! `file://`, `http(s)://`, `ssh://` or scp-like repository URL the forge providers do not
//! claim, so that an agent can work on a repository on any git server. It clones and pushes
//! but cannot open pull requests.
//!
//! Settings: `username` and `token-secret` (no default): when both are set, http(s) clones
//! carry a Basic auth header with that user and the token as the password. The decisions live
//! in [`logic`]; this file only converts to and from the WIT bindings.

mod logic;

mod bindings {
    // Generated code; its lowered import functions take many arguments.
    #![allow(clippy::too_many_arguments)]
    wit_bindgen::generate!({ world: "vcs-provider", path: "../wit" });
}

use bindings::flotilla::plugin::settings;
use bindings::flotilla::plugin::types::Header;
use bindings::flotilla::plugin::vcs::RemoteError;
// The world's `use vcs.{...}` puts the provider types at the top of the bindings.
use bindings::{
    CloneSpec, Guest, PluginError, ProviderInfo, PullRequest, PullRequestInput, RepoRef, WebhookEvent, WebhookInput,
};
use flotilla_guest_support as support;

struct Provider;

fn read_settings() -> support::Settings {
    support::Settings::read(settings::get, logic::NO_DEFAULT_TOKEN_SECRET)
}

impl Guest for Provider {
    fn info() -> ProviderInfo {
        ProviderInfo {
            name: logic::NAME.to_string(),
            display_name: logic::DISPLAY_NAME.to_string(),
            url_patterns: logic::url_patterns(),
            supports_pull_requests: false,
        }
    }

    fn match_url(url: String) -> Option<RepoRef> {
        logic::match_url(&url).map(repo_ref)
    }

    fn clone_spec(url: String) -> Result<CloneSpec, PluginError> {
        logic::clone_spec(&url, &read_settings())
            .map(clone_spec)
            .map_err(plugin_error)
    }

    fn create_pull_request(_input: PullRequestInput) -> Result<PullRequest, PluginError> {
        Err(plugin_error(logic::pull_requests_unsupported()))
    }

    fn parse_webhook(_input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
        // A plain git server sends no deliveries this provider could read.
        Ok(None)
    }
}

bindings::export!(Provider with_types_in bindings);

fn repo_ref(repository: support::RepoRef) -> RepoRef {
    RepoRef {
        host: repository.host,
        owner: repository.owner,
        name: repository.name,
        web_url: repository.web_url,
    }
}

fn clone_spec(spec: support::CloneSpec) -> CloneSpec {
    CloneSpec {
        url: spec.url,
        auth_header: spec.auth_header.map(|(name, value)| Header { name, value }),
    }
}

fn plugin_error(failure: support::Failure) -> PluginError {
    match failure {
        support::Failure::Unsupported(message) => PluginError::Unsupported(message),
        support::Failure::InvalidInput(message) => PluginError::InvalidInput(message),
        support::Failure::Remote { status, message } => PluginError::Remote(RemoteError { status, message }),
    }
}
