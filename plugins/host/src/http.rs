//! The `http.send` import: a plugin's only way out. Every request is checked against the hosts an
//! admin granted the plugin, secret placeholders in header values are filled in here (never in
//! the URL or body), redirects are not followed (a redirect could lead to an ungranted host), and
//! the response body is capped.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use crate::address_guard::{self, PublicOnlyResolver, Route};
use crate::bindings::vcs_world::flotilla::plugin::http as wit_http;
use crate::bindings::vcs_world::flotilla::plugin::types::{Header, HttpError, HttpRequest, HttpResponse};
use crate::grants;
use crate::placeholders::{self, PlaceholderError};
use crate::state::HostState;

/// Requests one call may send (a pull request takes two or three).
const MAX_HTTP_REQUESTS_PER_CALL: u32 = 32;

const ALLOWED_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

/// Headers the HTTP client owns: a plugin setting them could misdirect or desynchronise a request.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
];

/// The client plugin requests go through: the shared one (`pinned` none), or one that reaches
/// `name` only at the addresses the address rule checked (see [`address_guard`]).
pub(crate) fn build_client(
    http_timeout: Duration,
    pinned: Option<(&str, &[SocketAddr])>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // Requests go where the URL says; a proxy from the node's environment would be a second
        // path out that grants do not describe.
        .no_proxy()
        .dns_resolver(PublicOnlyResolver { timeout: http_timeout })
        .connect_timeout(http_timeout)
        .user_agent(concat!("flotilla-plugin-host/", env!("CARGO_PKG_VERSION")));
    if let Some((name, addresses)) = pinned {
        builder = builder.resolve_to_addrs(name, addresses);
    }
    builder.build()
}

/// A client for one request to granted non-public addresses; built off the runtime's workers
/// (building one may read the system's certificates).
async fn pinned_client(
    http_timeout: Duration,
    name: String,
    addresses: Vec<SocketAddr>,
) -> Result<reqwest::Client, HttpError> {
    tokio::task::spawn_blocking(move || {
        build_client(http_timeout, Some((&name, &addresses)))
            .map_err(|error| HttpError::Transport(format!("could not prepare a client for {name}: {error}")))
    })
    .await
    .unwrap_or_else(|error| Err(HttpError::Transport(format!("could not prepare a client: {error}"))))
}

fn invalid(message: impl Into<String>) -> HttpError {
    HttpError::InvalidRequest(message.into())
}

/// Everything about a request that can be decided before touching the network.
struct CheckedRequest {
    method: reqwest::Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
}

fn check_request(state: &HostState, request: HttpRequest) -> Result<CheckedRequest, HttpError> {
    let method_name = request.method.to_ascii_uppercase();
    if !ALLOWED_METHODS.contains(&method_name.as_str()) {
        return Err(invalid(format!(
            "method {:?} is not one of {}",
            request.method,
            ALLOWED_METHODS.join(", ")
        )));
    }
    let method = reqwest::Method::from_bytes(method_name.as_bytes()).map_err(|_| invalid("bad method"))?;
    let url = Url::parse(&request.url).map_err(|error| invalid(format!("url {:?}: {error}", request.url)))?;
    match url.scheme() {
        "https" => {}
        "http" if grants::is_loopback(&url) => {}
        "http" => {
            return Err(invalid(format!(
                "url {}: plain http is only for loopback hosts",
                request.url
            )))
        }
        scheme => return Err(invalid(format!("url {}: scheme {scheme} is not http(s)", request.url))),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("credentials in the url; use a {{secret:NAME}} header instead"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("url {}: no host", request.url)));
    }
    if !grants::is_granted(&state.granted_hosts, &url) {
        return Err(HttpError::HostNotGranted(grants::authority(&url)));
    }

    let plugin_name = state.plugin.name.as_str();
    let secrets = &state.shared.secrets;
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for Header { name, value } in request.headers {
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("header name {name:?} is not a valid header name")))?;
        if RESERVED_HEADERS.contains(&header_name.as_str()) {
            return Err(invalid(format!("header {name} is set by the host")));
        }
        let filled =
            placeholders::fill(&value, |secret| secrets.secret(plugin_name, secret)).map_err(|error| match error {
                PlaceholderError::UnknownSecret(secret) => HttpError::UnknownSecret(secret),
                PlaceholderError::Malformed(problem) => invalid(format!("header {name}: {problem}")),
            })?;
        let has_secret = filled != value;
        // The message must not quote the value: it may hold a secret now.
        let mut header_value = HeaderValue::from_str(&filled).map_err(|_| {
            invalid(format!(
                "header {name}: the value (after placeholders) is not a valid header value"
            ))
        })?;
        header_value.set_sensitive(has_secret);
        headers.append(header_name, header_value);
    }
    Ok(CheckedRequest {
        method,
        url,
        headers,
        body: request.body,
    })
}

fn transport_error(error: &reqwest::Error) -> HttpError {
    if error.is_timeout() {
        return HttpError::Timeout;
    }
    // The chain names the cause (refused, reset, certificate...); the URL in it holds no secret.
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    HttpError::Transport(message)
}

async fn send_checked(
    client: &reqwest::Client,
    request: CheckedRequest,
    max_response_bytes: usize,
) -> Result<HttpResponse, HttpError> {
    let mut builder = client.request(request.method, request.url).headers(request.headers);
    if let Some(body) = request.body {
        builder = builder.body(body);
    }
    let mut response = builder.send().await.map_err(|error| transport_error(&error))?;
    let too_large = HttpError::TooLarge(max_response_bytes as u64);
    if response
        .content_length()
        .is_some_and(|length| length > max_response_bytes as u64)
    {
        return Err(too_large);
    }
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_string(),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        })
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|error| transport_error(&error))? {
        if body.len() + chunk.len() > max_response_bytes {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(HttpResponse { status, headers, body })
}

impl wit_http::Host for HostState {
    async fn send(&mut self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.http_requests_sent = self.http_requests_sent.saturating_add(1);
        if self.http_requests_sent > MAX_HTTP_REQUESTS_PER_CALL {
            return Err(invalid(format!(
                "more than {MAX_HTTP_REQUESTS_PER_CALL} requests in one call"
            )));
        }
        let method = request.method.clone();
        let checked = match check_request(self, request) {
            Ok(checked) => checked,
            Err(error) => {
                tracing::warn!(plugin = %self.plugin, %method, "plugin http request refused: {error:?}");
                return Err(error);
            }
        };
        let authority = grants::authority(&checked.url);
        let started = Instant::now();
        let config = &self.shared.config;
        let deadline = tokio::time::Instant::now() + config.http_timeout;
        let granted_hosts = self.granted_hosts.clone();
        let shared_client = &self.shared.http_client;
        let exchange = async {
            // Resolving the host counts against the same timeout as the exchange.
            let client = match address_guard::route(&granted_hosts, &checked.url, deadline).await? {
                Route::Shared => shared_client.clone(),
                Route::Pinned { name, addresses } => pinned_client(config.http_timeout, name, addresses).await?,
            };
            send_checked(&client, checked, config.max_http_response_bytes).await
        };
        let outcome = tokio::time::timeout_at(deadline, exchange)
            .await
            .unwrap_or(Err(HttpError::Timeout));
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &outcome {
            Ok(response) => {
                tracing::debug!(plugin = %self.plugin, %method, %authority, status = response.status, elapsed_ms, "plugin http request")
            }
            Err(error) => {
                tracing::info!(plugin = %self.plugin, %method, %authority, elapsed_ms, "plugin http request failed: {error:?}")
            }
        }
        outcome
    }
}
