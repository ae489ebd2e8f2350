//! One call into a plugin as data: the export called with its arguments ([`Call`]), its answer
//! ([`Answer`], whose size `max_output_bytes` bounds), running it on an instance, and the
//! plugin's own errors as the host's types.

use wasmtime::Store;

use super::plugin::Plugin;
use crate::bindings::tool_world::{self, Tool};
use crate::bindings::vcs_world::flotilla::plugin::{types as wit_types, vcs as wit_vcs};
use crate::bindings::vcs_world::VcsProvider;
use crate::error::{CallError, HttpFailure, PluginFailure};
use crate::state::HostState;
use crate::types::PluginKind;

/// One export call, with its arguments in binding types.
pub(super) enum Call {
    Info,
    MatchUrl(String),
    CloneSpec(String),
    CreatePullRequest(wit_vcs::PullRequestInput),
    ParseWebhook(wit_vcs::WebhookInput),
    Describe,
    Invoke(String),
}

impl Call {
    pub(super) fn function(&self) -> &'static str {
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

    pub(super) fn kind(&self) -> PluginKind {
        match self {
            Call::Describe | Call::Invoke(_) => PluginKind::Tool,
            _ => PluginKind::VcsProvider,
        }
    }
}

/// One export's answer, in binding types.
pub(super) enum Answer {
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
    pub(super) fn output_bytes(&self) -> usize {
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
pub(super) fn plugin_error(plugin: &Plugin, function: &'static str, error: wit_vcs::PluginError) -> CallError {
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

pub(super) async fn call_vcs_provider(
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

pub(super) async fn call_tool(bindings: &Tool, store: &mut Store<HostState>, call: Call) -> wasmtime::Result<Answer> {
    Ok(match call {
        Call::Describe => Answer::Describe(bindings.call_describe(&mut *store).await?),
        Call::Invoke(arguments) => Answer::Invoke(bindings.call_invoke(&mut *store, &arguments).await?),
        _ => unreachable!("kind checked before the call"),
    })
}
