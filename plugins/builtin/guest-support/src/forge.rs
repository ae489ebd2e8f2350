//! The skeleton every forge provider shares, written once: a [`Forge`] names only what differs
//! between forges (how a URL path names a repository, the API's paths, headers and bodies, how
//! the forge says a pull request is already open and how to look that one up, where its answers
//! and webhook deliveries hold their fields), and the functions here do the rest: settings and
//! claimed hosts, clone specs with the token placeholder, the create request and the reading of
//! its answer, the idempotent create (a refused duplicate is looked up and returned), webhook
//! parsing and error mapping.
//!
//! Everything here is a plain function of strings, unit-tested natively; [`crate::forge_provider!`]
//! is the WIT glue that calls it from a component.

use serde_json::Value;

use crate::error::{refusal_with_failed_lookup, remote_failure, Failure};
use crate::http::{header, HttpRequest, HttpResponse};
use crate::json::{json_string, parse_json};
use crate::pull_requests::{created_pull_request, found_pull_request, LookupAnswer, LookupReading, PullRequestFields};
use crate::remote_url::parse_remote_url;
use crate::repository::{owner_and_name, ForgeRepository};
use crate::settings::Settings;
use crate::types::{CloneSpec, PullRequest, PullRequestInput, RepoRef, WebhookEvent};
use crate::webhook::{webhook_json, WebhookKind};

/// What a forge provider knows of its forge; the rest of a provider is this module's.
pub trait Forge {
    /// The provider's name, as `info()` gives it: "github".
    const NAME: &'static str;
    /// The provider's name for people: "GitHub", "Gitea / Forgejo".
    const DISPLAY_NAME: &'static str;
    /// The forge as error messages name it: "GitHub", "Gitea".
    const FORGE_NAME: &'static str;
    /// What an error calls a repository URL of this forge: "GitHub repository", "GitLab project".
    const REPOSITORY_NOUN: &'static str;
    /// A repository URL on the public forge, for error messages: `https://github.com/OWNER/REPO`.
    const EXAMPLE_URL: &'static str;
    /// The secret holding the token when the `token-secret` setting names none.
    const DEFAULT_TOKEN_SECRET: &'static str;
    /// The public forge's host; other instances come from the `hosts` setting.
    const PUBLIC_HOST: &'static str;

    /// The URL forms `info()` lists.
    fn url_patterns() -> Vec<String>;

    /// The owner and name a repository URL's path names on this forge, if it names one; most
    /// forges take exactly two plain segments.
    fn owner_and_name(segments: &[String]) -> Option<(String, String)> {
        owner_and_name(segments)
    }

    /// The user name sent with the token in git's HTTP Basic auth.
    fn git_user(settings: &Settings) -> &str;

    /// The REST API base for `repository` when the `api-base` setting names none.
    fn default_api_base(repository: &ForgeRepository) -> String;

    /// The repository's pull requests endpoint, after the API base: `/repos/OWNER/REPO/pulls`.
    fn pull_requests_path(repository: &ForgeRepository) -> String;

    /// The header carrying the token, given its `{{secret:NAME}}` placeholder.
    fn token_header(token_placeholder: String) -> (String, String);

    /// The API's media type, sent as `Accept`.
    const ACCEPT: &'static str = "application/json";

    /// Headers the API wants besides the token, `Accept` and `User-Agent` (an API version).
    fn extra_api_headers() -> Vec<(String, String)> {
        Vec::new()
    }

    /// The JSON body of the "create a pull request" request.
    fn create_pull_request_body(input: &PullRequestInput) -> Value;

    /// Where the forge's pull request JSON holds the page and the number.
    const PULL_REQUEST_FIELDS: PullRequestFields;

    /// The forge's own words in an error body, if it holds any.
    fn error_message(answer: &Value) -> Option<String>;

    /// Whether the forge's refusal of a create may mean that a pull request of the same head
    /// and base is already open, so that the provider looks it up.
    fn may_be_already_open(status: u16, body: &[u8]) -> bool;

    /// The URL of the lookup of the open pull request of the input's head and base, given the
    /// repository's pull requests endpoint.
    fn open_pull_request_lookup_url(
        pull_requests_url: &str,
        repository: &ForgeRepository,
        input: &PullRequestInput,
    ) -> String;

    /// What the lookup's answer holds.
    const LOOKUP_ANSWER: LookupAnswer;

    /// Whether a pull request the lookup returned is still open; forges whose lookup only
    /// returns open ones need not say.
    fn is_still_open(_pull_request: &Value) -> bool {
        true
    }

    /// The headers that name a delivery's event, the first present one winning.
    const WEBHOOK_EVENT_HEADERS: &'static [&'static str];

    /// The kind of event the event header names; `None` for events the node does not follow.
    fn webhook_kind(event: &str) -> Option<WebhookKind>;

    /// JSON pointer of the repository's page in a delivery: `/repository/html_url`.
    const WEBHOOK_REPOSITORY_URL_POINTER: &'static str;

    /// The branch, pull request and actor of a delivery of `kind`; `None` when the delivery
    /// turns out not to concern a pull request (a comment on an issue).
    fn webhook_details(kind: WebhookKind, payload: &Value) -> Option<WebhookDetails>;
}

/// What a delivery says beyond its kind and repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookDetails {
    pub branch: Option<String>,
    pub pull_request_number: Option<u64>,
    pub actor: Option<String>,
}

/// Why creating a pull request failed: the provider's own failure, or the host's refusal or
/// failure to send a request (`HttpError`, passed on to the node as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateFailure<HttpError> {
    Failure(Failure),
    Http(HttpError),
}

impl<HttpError> From<Failure> for CreateFailure<HttpError> {
    fn from(failure: Failure) -> Self {
        CreateFailure::Failure(failure)
    }
}

/// The settings of forge `F`, read through `get` (the WIT `settings.get`).
pub fn read_settings<F: Forge>(get: impl Fn(&str) -> Option<String>) -> Settings {
    Settings::read(get, F::DEFAULT_TOKEN_SECRET)
}

/// The repository `url` names on one of the hosts `F` claims.
pub fn repository<F: Forge>(url: &str, settings: &Settings) -> Option<ForgeRepository> {
    let parsed = parse_remote_url(url)?;
    if !parsed.host_is_one_of(&settings.claimed_hosts(&[F::PUBLIC_HOST])) {
        return None;
    }
    let (owner, name) = F::owner_and_name(&parsed.segments)?;
    Some(ForgeRepository {
        url: parsed,
        owner,
        name,
    })
}

fn required_repository<F: Forge>(url: &str, settings: &Settings) -> Result<ForgeRepository, Failure> {
    repository::<F>(url, settings).ok_or_else(|| {
        Failure::InvalidInput(format!(
            "{url:?} is not a {} URL ({}, or a host in the `hosts` setting)",
            F::REPOSITORY_NOUN,
            F::EXAMPLE_URL
        ))
    })
}

pub fn match_url<F: Forge>(url: &str, settings: &Settings) -> Option<RepoRef> {
    repository::<F>(url, settings).map(ForgeRepository::repo_ref)
}

/// The https clone URL and a Basic auth header with the token as the password.
pub fn clone_spec<F: Forge>(url: &str, settings: &Settings) -> Result<CloneSpec, Failure> {
    let repository = required_repository::<F>(url, settings)?;
    Ok(CloneSpec {
        url: repository.clone_url(),
        auth_header: Some((
            "Authorization".to_string(),
            format!("Basic {}", settings.basic_placeholder(F::git_user(settings))?),
        )),
    })
}

/// The `api-base` setting, or the forge's own API base for the repository.
fn api_base<F: Forge>(repository: &ForgeRepository, settings: &Settings) -> String {
    match &settings.api_base {
        Some(api_base) => api_base.clone(),
        None => F::default_api_base(repository),
    }
}

/// The repository the input names and its pull requests endpoint.
fn pull_requests_url<F: Forge>(
    input: &PullRequestInput,
    settings: &Settings,
) -> Result<(ForgeRepository, String), Failure> {
    let repository = required_repository::<F>(&input.repository_url, settings)?;
    let url = format!(
        "{}{}",
        api_base::<F>(&repository, settings),
        F::pull_requests_path(&repository)
    );
    Ok((repository, url))
}

fn api_headers<F: Forge>(settings: &Settings) -> Result<Vec<(String, String)>, Failure> {
    let mut headers = vec![
        F::token_header(settings.token_placeholder()?),
        ("Accept".to_string(), F::ACCEPT.to_string()),
    ];
    headers.extend(F::extra_api_headers());
    headers.push(("User-Agent".to_string(), "flotilla".to_string()));
    Ok(headers)
}

/// The "create a pull request" request.
pub fn pull_request_request<F: Forge>(input: &PullRequestInput, settings: &Settings) -> Result<HttpRequest, Failure> {
    let (_, url) = pull_requests_url::<F>(input, settings)?;
    let headers = api_headers::<F>(settings)?;
    Ok(HttpRequest::post_json(
        url,
        headers,
        &F::create_pull_request_body(input),
    ))
}

/// The pull request a create opened, or the forge's refusal in its own words.
pub fn pull_request_response<F: Forge>(status: u16, body: &[u8]) -> Result<PullRequest, Failure> {
    if (200..300).contains(&status) {
        return created_pull_request(status, body, F::PULL_REQUEST_FIELDS);
    }
    Err(remote_failure(
        status,
        parse_json(body).and_then(|value| F::error_message(&value)),
        body,
    ))
}

/// The lookup of the open pull request of the input's head and base.
pub fn open_pull_request_request<F: Forge>(
    input: &PullRequestInput,
    settings: &Settings,
) -> Result<HttpRequest, Failure> {
    let (repository, url) = pull_requests_url::<F>(input, settings)?;
    let url = F::open_pull_request_lookup_url(&url, &repository, input);
    Ok(HttpRequest::get(url, api_headers::<F>(settings)?))
}

/// The open pull request the lookup found, if any.
pub fn open_pull_request_response<F: Forge>(status: u16, body: &[u8]) -> Result<Option<PullRequest>, Failure> {
    let reading = LookupReading {
        answer: F::LOOKUP_ANSWER,
        fields: F::PULL_REQUEST_FIELDS,
        is_still_open: F::is_still_open,
        error_message: F::error_message,
    };
    found_pull_request(status, body, reading)
}

/// Opens the pull request, sending requests through `send`. Idempotent: when the forge refuses
/// the create because an open pull request of the same head and base exists, that one is
/// looked up and returned. An owner that died between the forge's answer and recording it
/// leaves the next owner to ask again, and the agent then records the pull request the first
/// attempt opened.
pub fn create_pull_request<F: Forge, HttpError>(
    input: &PullRequestInput,
    settings: &Settings,
    mut send: impl FnMut(HttpRequest) -> Result<HttpResponse, HttpError>,
) -> Result<PullRequest, CreateFailure<HttpError>> {
    let request = pull_request_request::<F>(input, settings)?;
    let response = send(request).map_err(CreateFailure::Http)?;
    let refused = match pull_request_response::<F>(response.status, &response.body) {
        Ok(created) => return Ok(created),
        Err(refused) if F::may_be_already_open(response.status, &response.body) => refused,
        Err(failure) => return Err(failure.into()),
    };
    // An open pull request of this head and base may exist: an earlier attempt opened it.
    let lookup = open_pull_request_request::<F>(input, settings)?;
    let found = send(lookup).map_err(CreateFailure::Http)?;
    match open_pull_request_response::<F>(found.status, &found.body) {
        Ok(Some(existing)) => Ok(existing),
        // Not ours after all (another base, or closed meanwhile): the forge's refusal stands.
        Ok(None) => Err(refused.into()),
        Err(failure) => Err(refusal_with_failed_lookup(refused, failure).into()),
    }
}

/// The event a delivery describes; `None` for deliveries of events the node does not follow.
pub fn parse_webhook<F: Forge>(headers: &[(String, String)], body: &[u8]) -> Result<Option<WebhookEvent>, Failure> {
    let Some(event) = F::WEBHOOK_EVENT_HEADERS.iter().find_map(|name| header(headers, name)) else {
        return Ok(None);
    };
    let Some(kind) = F::webhook_kind(event.trim()) else {
        return Ok(None);
    };
    let payload = webhook_json(F::FORGE_NAME, body)?;
    let pointer = F::WEBHOOK_REPOSITORY_URL_POINTER;
    let repository_url = json_string(&payload, pointer).ok_or_else(|| {
        Failure::InvalidInput(format!(
            "{} webhook body has no {}",
            F::FORGE_NAME,
            pointer.trim_start_matches('/').replace('/', ".")
        ))
    })?;
    Ok(F::webhook_details(kind, &payload).map(|details| WebhookEvent {
        kind: kind.to_string(),
        repository_url,
        branch: details.branch,
        pull_request_number: details.pull_request_number,
        actor: details.actor,
    }))
}

#[cfg(test)]
mod tests;
