//! Flotilla's built-in Bitbucket Cloud provider: a `vcs-provider` Wasm component for
//! bitbucket.org.
//!
//! The node asks it which repository an agent's URL names (`WORKSPACE/REPO_SLUG`), how to
//! clone and push it (an https URL and a Basic auth header with an access token as the
//! password of `x-token-auth`), and to open the agent's pull request through the REST API 2.0.
//! The token never enters the component: requests carry `{{secret:NAME}}` placeholders that
//! the host fills in.
//!
//! Settings: `hosts` (extra hosts, e.g. a loopback test forge), `api-base` (default
//! `https://api.bitbucket.org/2.0`), `token-secret` (default `bitbucket-token`). The decisions
//! live in [`logic`]; this file only converts to and from the WIT bindings.

mod logic;

mod bindings {
    // Generated code; its lowered import functions take many arguments.
    #![allow(clippy::too_many_arguments)]
    wit_bindgen::generate!({ world: "vcs-provider", path: "../wit" });
}

use bindings::flotilla::plugin::types::{Header, HttpRequest};
use bindings::flotilla::plugin::vcs::RemoteError;
use bindings::flotilla::plugin::{http, settings};
// The world's `use vcs.{...}` puts the provider types at the top of the bindings.
use bindings::{
    CloneSpec, Guest, PluginError, ProviderInfo, PullRequest, PullRequestInput, RepoRef, WebhookEvent, WebhookInput,
};
use flotilla_guest_support as support;

struct Provider;

fn read_settings() -> support::Settings {
    support::Settings::read(settings::get, logic::DEFAULT_TOKEN_SECRET)
}

impl Guest for Provider {
    fn info() -> ProviderInfo {
        ProviderInfo {
            name: logic::NAME.to_string(),
            display_name: logic::DISPLAY_NAME.to_string(),
            url_patterns: logic::url_patterns(),
            supports_pull_requests: true,
        }
    }

    fn match_url(url: String) -> Option<RepoRef> {
        logic::match_url(&url, &read_settings()).map(repo_ref)
    }

    fn clone_spec(url: String) -> Result<CloneSpec, PluginError> {
        logic::clone_spec(&url, &read_settings())
            .map(clone_spec)
            .map_err(plugin_error)
    }

    fn create_pull_request(input: PullRequestInput) -> Result<PullRequest, PluginError> {
        let request =
            logic::pull_request_request(&pull_request_input(input), &read_settings()).map_err(plugin_error)?;
        let response = http::send(&http_request(request)).map_err(PluginError::Http)?;
        logic::pull_request_response(response.status, &response.body)
            .map(|created| PullRequest {
                url: created.url,
                number: created.number,
            })
            .map_err(plugin_error)
    }

    fn parse_webhook(input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
        let headers: Vec<(String, String)> = input
            .headers
            .into_iter()
            .map(|header| (header.name, header.value))
            .collect();
        logic::parse_webhook(&headers, &input.body)
            .map(|event| event.map(webhook_event))
            .map_err(plugin_error)
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

fn pull_request_input(input: PullRequestInput) -> support::PullRequestInput {
    support::PullRequestInput {
        repository_url: input.repository_url,
        head_branch: input.head_branch,
        base_branch: input.base_branch,
        title: input.title,
        body: input.body,
        draft: input.draft,
    }
}

fn http_request(request: support::HttpRequest) -> HttpRequest {
    HttpRequest {
        method: request.method,
        url: request.url,
        headers: request
            .headers
            .into_iter()
            .map(|(name, value)| Header { name, value })
            .collect(),
        body: request.body,
    }
}

fn webhook_event(event: support::WebhookEvent) -> WebhookEvent {
    WebhookEvent {
        kind: event.kind,
        repository_url: event.repository_url,
        branch: event.branch,
        pull_request_number: event.pull_request_number,
        actor: event.actor,
    }
}

fn plugin_error(failure: support::Failure) -> PluginError {
    match failure {
        support::Failure::Unsupported(message) => PluginError::Unsupported(message),
        support::Failure::InvalidInput(message) => PluginError::InvalidInput(message),
        support::Failure::Remote { status, message } => PluginError::Remote(RemoteError { status, message }),
    }
}
