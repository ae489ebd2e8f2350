//! Pure helpers shared by Flotilla's built-in VCS-provider plugins (GitHub, GitLab, Bitbucket,
//! Gitea/Forgejo and plain git).
//!
//! A provider plugin is a Wasm component that the node asks which repository a URL names, how
//! to clone it and how to open a pull request on it. Everything a provider decides without
//! talking to the forge lives here or in the provider's own `logic.rs`, as plain functions of
//! strings: repository URL parsing ([`RemoteUrl`]), the admin's settings ([`Settings`]),
//! secret placeholders, and reading a forge's error bodies. None of it depends on
//! `wit-bindgen`, so it is unit-tested natively; a plugin's `lib.rs` only converts between
//! these types and the generated WIT bindings ([`forge_provider!`] is that glue for the forges).

use serde_json::Value;

/// The settings key of the extra hosts a provider claims besides its public forge
/// (self-hosted instances, loopback test forges): comma-separated `host` or `host:port`.
pub const HOSTS_SETTING: &str = "hosts";
/// The settings key of the forge's REST API base URL, overriding the one derived from the host.
pub const API_BASE_SETTING: &str = "api-base";
/// The settings key naming the secret that holds the forge token.
pub const TOKEN_SECRET_SETTING: &str = "token-secret";
/// The settings key of the user name sent with the token in HTTP Basic auth, where the
/// provider lets the admin choose it.
pub const USERNAME_SETTING: &str = "username";

/// Longest forge message passed on in an error, in characters; a proxy's HTML error page
/// must not fill the node's log or the user's terminal.
pub const MAX_REMOTE_MESSAGE_CHARS: usize = 1000;

// ---------------------------------------------------------------- plain types

/// A repository as a provider names it (mirrors the WIT `repo-ref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub host: String,
    pub owner: String,
    pub name: String,
    pub web_url: String,
}

/// How the node clones and pushes a repository (mirrors the WIT `clone-spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSpec {
    pub url: String,
    /// `(name, value)`; the value holds secret placeholders that the host fills in.
    pub auth_header: Option<(String, String)>,
}

/// One request to the forge's API, before the host fills in placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl HttpRequest {
    /// A `POST` of `body` as JSON with `headers` (the content type is added here).
    pub fn post_json(url: String, mut headers: Vec<(String, String)>, body: &Value) -> HttpRequest {
        headers.push(("Content-Type".to_string(), "application/json".to_string()));
        HttpRequest {
            method: "POST".to_string(),
            url,
            headers,
            body: Some(body.to_string().into_bytes()),
        }
    }

    /// A `GET` of `url` with `headers` and no body.
    pub fn get(url: String, headers: Vec<(String, String)>) -> HttpRequest {
        HttpRequest {
            method: "GET".to_string(),
            url,
            headers,
            body: None,
        }
    }

    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// `?key=value&...` with every key and value percent-encoded (RFC 3986 unreserved characters
/// are kept as they are).
pub fn query_string(pairs: &[(&str, &str)]) -> String {
    let joined: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{}={}", encode_path_component(key), encode_path_component(value)))
        .collect();
    format!("?{}", joined.join("&"))
}

/// What the node asks a provider to open (mirrors the WIT `pull-request-input`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestInput {
    pub repository_url: String,
    pub head_branch: String,
    pub base_branch: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
}

/// A pull request the forge opened (mirrors the WIT `pull-request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub url: String,
    pub number: u64,
}

/// What a webhook delivery describes (mirrors the WIT `webhook-event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// "push", "pull-request" or "comment".
    pub kind: String,
    pub repository_url: String,
    pub branch: Option<String>,
    pub pull_request_number: Option<u64>,
    pub actor: Option<String>,
}

/// Why a provider call failed, before the HTTP transport is involved or after the forge
/// answered (mirrors the WIT `plugin-error` without its `http` case, which the glue passes on
/// from the host as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Unsupported(String),
    InvalidInput(String),
    Remote { status: u16, message: String },
}

// ---------------------------------------------------------------- repository URLs

/// How a repository URL reaches its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Https,
    Http,
    /// `ssh://` URLs and scp-like `user@host:path` ones.
    Ssh,
    File,
}

/// A repository URL taken apart: `https://github.com/acme/widgets.git`,
/// `git@github.com:acme/widgets.git`, `ssh://git@host:2222/acme/widgets`, `file:///srv/x.git`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    pub scheme: Scheme,
    /// Lowercase host with `:port` when the URL names a port other than the scheme's default
    /// (for ssh, the ssh port). Empty for `file:///path`.
    pub host: String,
    /// The path's non-empty segments; the last one without a trailing `.git`.
    pub segments: Vec<String>,
}

/// Takes a repository URL apart, or `None` if it is not one: unknown schemes (`git://`,
/// `ftp://`), local paths without `file://`, a missing host, `.`/`..` segments, spaces.
/// User info, query and fragment are dropped; default ports (443, 80, 22) are dropped.
pub fn parse_remote_url(url: &str) -> Option<RemoteUrl> {
    let url = url.trim();
    if url.is_empty()
        || url
            .chars()
            .any(|character| character.is_whitespace() || character.is_control())
    {
        return None;
    }
    if url.contains('\\') {
        return None;
    }
    let (scheme, host, path) = match url.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = match scheme.to_ascii_lowercase().as_str() {
                "https" => Scheme::Https,
                "http" => Scheme::Http,
                "ssh" | "git+ssh" | "ssh+git" => Scheme::Ssh,
                "file" => Scheme::File,
                _ => return None,
            };
            let rest = cut_query_and_fragment(rest);
            let (authority, path) = match rest.find('/') {
                Some(slash) => (&rest[..slash], &rest[slash..]),
                None => (rest, ""),
            };
            let host = match authority.rsplit_once('@') {
                Some((_user_info, host)) => host,
                None => authority,
            };
            let host = normalise_host(host, scheme)?;
            if host.is_empty() && scheme != Scheme::File {
                return None;
            }
            (scheme, host, path)
        }
        None => {
            // scp-like `[user@]host:path`: a colon before any slash, and not a Windows drive.
            let colon = url.find(':')?;
            let before_colon = &url[..colon];
            if before_colon.contains('/') || before_colon.len() < 2 && !before_colon.contains('@') {
                return None;
            }
            let host = match before_colon.rsplit_once('@') {
                Some((_user, host)) => host,
                None => before_colon,
            };
            let host = normalise_host(host, Scheme::Ssh)?;
            if host.is_empty() || host.contains(':') {
                return None;
            }
            (Scheme::Ssh, host, &url[colon + 1..])
        }
    };
    let mut segments: Vec<String> = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(str::to_string)
        .collect();
    if segments.iter().any(|segment| segment == "." || segment == "..") {
        return None;
    }
    if let Some(last) = segments.last_mut() {
        if let Some(stripped) = last.strip_suffix(".git") {
            if stripped.is_empty() {
                return None;
            }
            *last = stripped.to_string();
        }
    }
    Some(RemoteUrl { scheme, host, segments })
}

fn cut_query_and_fragment(rest: &str) -> &str {
    match rest.find(['?', '#']) {
        Some(position) => &rest[..position],
        None => rest,
    }
}

/// Lowercases `host`, checks its port is a number and drops the scheme's default port.
fn normalise_host(host: &str, scheme: Scheme) -> Option<String> {
    let host = host.to_ascii_lowercase();
    let (name, port) = split_host_port(&host);
    let name_is_valid = if name.starts_with('[') {
        name.ends_with(']') && name.len() > 2
    } else {
        name.bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_'))
    };
    if !name_is_valid {
        return None;
    }
    match port {
        None => Some(host),
        Some(port) => {
            if port.is_empty() || !port.bytes().all(|byte| byte.is_ascii_digit()) {
                return None;
            }
            let default_port = match scheme {
                Scheme::Https => "443",
                Scheme::Http => "80",
                Scheme::Ssh => "22",
                Scheme::File => "",
            };
            if port == default_port {
                Some(name.to_string())
            } else {
                Some(host)
            }
        }
    }
}

/// `("host", Some("8080"))` for `host:8080`, `("[::1]", Some("8080"))` for `[::1]:8080`.
pub fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => match host[end + 1..].strip_prefix(':') {
                Some(port) => (&host[..=end], Some(port)),
                None => (host, None),
            },
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    }
}

/// Whether `host` (with or without a port) is the local machine: the only hosts a forge may
/// be reached on over plain `http://`.
pub fn is_loopback_host(host: &str) -> bool {
    let (name, _port) = split_host_port(host);
    name == "localhost" || name == "[::1]" || name.starts_with("127.")
}

impl RemoteUrl {
    /// The host the forge's web and API answer on: the URL's host, without the ssh port for
    /// ssh URLs (that port is sshd's, not the web server's).
    pub fn web_host(&self) -> String {
        match self.scheme {
            Scheme::Ssh => split_host_port(&self.host).0.to_string(),
            _ => self.host.clone(),
        }
    }

    /// `http` for a forge on loopback reached over `http://`, `https` everywhere else.
    pub fn web_scheme(&self) -> &'static str {
        if self.scheme == Scheme::Http && is_loopback_host(&self.host) {
            "http"
        } else {
            "https"
        }
    }

    /// `https://HOST` (or `http://127.0.0.1:PORT` for a loopback forge).
    pub fn web_origin(&self) -> String {
        format!("{}://{}", self.web_scheme(), self.web_host())
    }

    /// Whether this URL's host is one of `claimed_hosts` (lowercase `host` or `host:port`).
    /// An ssh URL matches on the host name alone, since its port is sshd's.
    pub fn host_is_one_of(&self, claimed_hosts: &[String]) -> bool {
        claimed_hosts.iter().any(|claimed| match self.scheme {
            Scheme::Ssh => split_host_port(claimed).0 == split_host_port(&self.host).0,
            _ => *claimed == self.host,
        })
    }
}

/// A repository named by a claimed host and exactly two plain path segments: GitHub's and
/// Gitea's OWNER/REPO, Bitbucket's WORKSPACE/REPO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoPartRepository {
    pub url: RemoteUrl,
    pub owner: String,
    pub name: String,
}

impl TwoPartRepository {
    /// The repository `url` names, if its host is one of `claimed_hosts`.
    pub fn parse(url: &str, claimed_hosts: &[String]) -> Option<TwoPartRepository> {
        let parsed = parse_remote_url(url)?;
        if !parsed.host_is_one_of(claimed_hosts) {
            return None;
        }
        let [owner, name] = parsed.segments.as_slice() else {
            return None;
        };
        if !is_plain_name(owner) || !is_plain_name(name) {
            return None;
        }
        let (owner, name) = (owner.clone(), name.clone());
        Some(TwoPartRepository {
            url: parsed,
            owner,
            name,
        })
    }

    /// The repository's page: `{origin}/{owner}/{name}`.
    pub fn web_url(&self) -> String {
        format!("{}/{}/{}", self.url.web_origin(), self.owner, self.name)
    }

    /// The URL git clones and pushes: the page with `.git`.
    pub fn clone_url(&self) -> String {
        format!("{}.git", self.web_url())
    }

    pub fn repo_ref(self) -> RepoRef {
        RepoRef {
            host: self.url.web_host(),
            web_url: self.web_url(),
            owner: self.owner,
            name: self.name,
        }
    }
}

/// Whether `segment` is a plausible owner or repository name on a forge: ASCII letters,
/// digits, `-`, `_` and `.`, not starting with a dot.
pub fn is_plain_name(segment: &str) -> bool {
    !segment.is_empty()
        && !segment.starts_with('.')
        && segment
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so that `group/sub/project`
/// becomes one path segment `group%2Fsub%2Fproject`.
pub fn encode_path_component(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

// ---------------------------------------------------------------- settings

/// The settings a built-in provider reads, from the admin's plain-string settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// From `hosts`: lowercase `host` or `host:port`, schemes and slashes removed.
    pub extra_hosts: Vec<String>,
    /// From `api-base`, without a trailing slash.
    pub api_base: Option<String>,
    /// From `token-secret`, or the provider's default.
    pub token_secret: String,
    /// From `username`.
    pub username: Option<String>,
}

impl Settings {
    /// Reads the settings through `get` (the WIT `settings.get`).
    pub fn read(get: impl Fn(&str) -> Option<String>, default_token_secret: &str) -> Settings {
        let non_empty = |key: &str| {
            get(key)
                .map(|value| value.trim().to_string())
                .filter(|value| !value.is_empty())
        };
        let extra_hosts = non_empty(HOSTS_SETTING)
            .map(|hosts| {
                hosts
                    .split(',')
                    .filter_map(|host| {
                        let host = host.trim();
                        let host = host.split_once("://").map_or(host, |(_scheme, rest)| rest);
                        let host = host.trim_end_matches('/').to_ascii_lowercase();
                        (!host.is_empty()).then_some(host)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Settings {
            extra_hosts,
            api_base: non_empty(API_BASE_SETTING).map(|base| base.trim_end_matches('/').to_string()),
            token_secret: non_empty(TOKEN_SECRET_SETTING).unwrap_or_else(|| default_token_secret.to_string()),
            username: non_empty(USERNAME_SETTING),
        }
    }

    /// The hosts this provider claims: `default_hosts` and the admin's extra ones.
    pub fn claimed_hosts(&self, default_hosts: &[&str]) -> Vec<String> {
        let mut hosts: Vec<String> = default_hosts.iter().map(|host| host.to_string()).collect();
        hosts.extend(self.extra_hosts.iter().cloned());
        hosts
    }

    /// `{{secret:NAME}}` for the token secret, after checking its name cannot break out of
    /// the placeholder.
    pub fn token_placeholder(&self) -> Result<String, Failure> {
        Ok(format!("{{{{secret:{}}}}}", self.checked_token_secret()?))
    }

    /// `{{basic:USER:secret:NAME}}`: the host turns it into base64 of `USER:TOKEN`.
    pub fn basic_placeholder(&self, user: &str) -> Result<String, Failure> {
        if user.is_empty() || user.contains([':', '{', '}']) {
            return Err(Failure::InvalidInput(format!(
                "setting {USERNAME_SETTING}: {user:?} cannot be a Basic auth user name (it is empty or holds ':', '{{' or '}}')"
            )));
        }
        Ok(format!("{{{{basic:{user}:secret:{}}}}}", self.checked_token_secret()?))
    }

    fn checked_token_secret(&self) -> Result<&str, Failure> {
        let valid = self
            .token_secret
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
        if valid {
            Ok(&self.token_secret)
        } else {
            Err(Failure::InvalidInput(format!(
                "setting {TOKEN_SECRET_SETTING}: {:?} is not a secret name (letters, digits, '-', '_' and '.')",
                self.token_secret
            )))
        }
    }
}

// ---------------------------------------------------------------- forge answers

/// The body as JSON, if it is JSON.
pub fn parse_json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

/// A readable rendering of a forge's message value: a string as it is, a list joined with
/// "; ", an object as `key: value` pairs (GitLab's `{"source_branch": ["is invalid"]}`).
pub fn render_message(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .map(render_message)
            .filter(|item| !item.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        Value::Object(fields) => fields
            .iter()
            .map(|(key, value)| format!("{key}: {}", render_message(value)))
            .collect::<Vec<_>>()
            .join("; "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A remote failure with `message` if the forge gave one, or else the start of the body, or
/// the status line when the body is empty. Cut to [`MAX_REMOTE_MESSAGE_CHARS`].
pub fn remote_failure(status: u16, message: Option<String>, body: &[u8]) -> Failure {
    let message = message
        .map(|message| message.trim().to_string())
        .filter(|message| !message.is_empty())
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                format!("HTTP {status} {} with an empty body", reason_phrase(status))
            } else {
                text.to_string()
            }
        });
    Failure::Remote {
        status,
        message: truncate_chars(&message, MAX_REMOTE_MESSAGE_CHARS),
    }
}

fn truncate_chars(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// The usual reason phrase of the status codes forges answer with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The string at JSON pointer `pointer` (`/links/html/href`).
pub fn json_string(value: &Value, pointer: &str) -> Option<String> {
    value.pointer(pointer)?.as_str().map(str::to_string)
}

/// The unsigned number at JSON pointer `pointer`.
pub fn json_u64(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer)?.as_u64()
}

/// Reads a successful "create pull request" answer: the page at `url_pointer` and the number
/// at `number_pointer`; a 2xx without them is a remote error, since the pull request may or
/// may not exist and the caller must not assume either.
pub fn created_pull_request(
    status: u16,
    body: &[u8],
    url_pointer: &str,
    number_pointer: &str,
) -> Result<PullRequest, Failure> {
    let parsed = parse_json(body);
    let url = parsed.as_ref().and_then(|value| json_string(value, url_pointer));
    let number = parsed.as_ref().and_then(|value| json_u64(value, number_pointer));
    match (url, number) {
        (Some(url), Some(number)) => Ok(PullRequest { url, number }),
        _ => Err(remote_failure(
            status,
            Some(format!(
                "the forge answered {status} but the body has no {url_pointer} and {number_pointer}: {}",
                truncate_chars(String::from_utf8_lossy(body).trim(), 200)
            )),
            body,
        )),
    }
}

/// Reads the answer to a lookup of the open pull request of a head and base branch, sent when
/// the forge refused a create because one is already open (an earlier attempt opened it and its
/// answer was lost). A 2xx holds a list (at `list_pointer`, `""` for a bare array) whose first
/// item is taken, or, with `list_pointer` `None`, the pull request itself; 404 means none.
/// Another status is the forge's error, in the words `error_message` reads from its body.
pub fn found_pull_request(
    status: u16,
    body: &[u8],
    list_pointer: Option<&str>,
    (url_pointer, number_pointer): (&str, &str),
    error_message: fn(&Value) -> Option<String>,
) -> Result<Option<PullRequest>, Failure> {
    if status == 404 && list_pointer.is_none() {
        return Ok(None);
    }
    if !(200..300).contains(&status) {
        return Err(remote_failure(
            status,
            parse_json(body).and_then(|value| error_message(&value)),
            body,
        ));
    }
    let Some(parsed) = parse_json(body) else {
        return Err(remote_failure(
            status,
            Some(format!(
                "the forge's answer to a pull request lookup is not JSON: {}",
                truncate_chars(String::from_utf8_lossy(body).trim(), 200)
            )),
            body,
        ));
    };
    let item = match list_pointer {
        None => Some(&parsed),
        Some(pointer) => match parsed.pointer(pointer).and_then(Value::as_array) {
            Some(items) => items.first(),
            None => {
                return Err(remote_failure(
                    status,
                    Some(format!(
                        "the forge's answer to a pull request lookup has no list at {pointer:?}"
                    )),
                    body,
                ))
            }
        },
    };
    let Some(item) = item else {
        return Ok(None);
    };
    match (json_string(item, url_pointer), json_u64(item, number_pointer)) {
        (Some(url), Some(number)) => Ok(Some(PullRequest { url, number })),
        _ => Err(remote_failure(
            status,
            Some(format!(
                "the forge's pull request has no {url_pointer} and {number_pointer}: {}",
                truncate_chars(&item.to_string(), 200)
            )),
            body,
        )),
    }
}

/// The forge's refusal of a create, with why looking up the open pull request it spoke of
/// failed too.
pub fn refusal_with_failed_lookup(refused: Failure, lookup: Failure) -> Failure {
    let lookup = match lookup {
        Failure::Unsupported(message) | Failure::InvalidInput(message) => message,
        Failure::Remote { status, message } => format!("HTTP {status}: {message}"),
    };
    match refused {
        Failure::Remote { status, message } => Failure::Remote {
            status,
            message: format!("{message} (looking up the open pull request failed: {lookup})"),
        },
        other => other,
    }
}

// ---------------------------------------------------------------- webhooks

/// The value of the first header called `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(header_name, _)| header_name.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// `main` for `refs/heads/main`; `None` for tags and other refs.
pub fn branch_of_ref(git_ref: &str) -> Option<String> {
    git_ref.strip_prefix("refs/heads/").map(str::to_string)
}

/// The webhook body as a JSON object, or an invalid-input failure naming the provider.
pub fn webhook_json(provider: &str, body: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(body)
        .map_err(|error| Failure::InvalidInput(format!("{provider} webhook body is not JSON: {error}")))
}

// ---------------------------------------------------------------- the WIT glue of a forge

/// The whole `lib.rs` of a forge provider below its `mod logic;`: the WIT bindings (generated in
/// the calling crate from `../wit`), the exported `Guest` that asks `logic` for every decision
/// and sends the HTTP requests of a pull request, and the conversions between the generated
/// types and this crate's. `logic` must have `NAME`, `DISPLAY_NAME`, `DEFAULT_TOKEN_SECRET`,
/// `url_patterns`, `match_url`, `clone_spec`, `pull_request_request`, `pull_request_response`,
/// `already_open`, `open_pull_request_request`, `open_pull_request_response` and
/// `parse_webhook`, as the GitHub, GitLab, Bitbucket and Gitea providers do.
///
/// Opening a pull request is idempotent: when the forge refuses the create because an open
/// pull request of the same head and base exists (`already_open`), that one is looked up and
/// returned. An owner that died between the forge's answer and recording it leaves the next
/// owner to ask again, and the agent then records the pull request the first attempt opened.
#[macro_export]
macro_rules! forge_provider {
    () => {
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
        use $crate as support;

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
                let settings = read_settings();
                let input = pull_request_input(input);
                let request = logic::pull_request_request(&input, &settings).map_err(plugin_error)?;
                let response = http::send(&http_request(request)).map_err(PluginError::Http)?;
                let refused = match logic::pull_request_response(response.status, &response.body) {
                    Ok(created) => return Ok(pull_request(created)),
                    Err(refused) if logic::already_open(response.status, &response.body) => refused,
                    Err(failure) => return Err(plugin_error(failure)),
                };
                // An open pull request of this head and base exists: an earlier attempt opened it.
                let lookup = logic::open_pull_request_request(&input, &settings).map_err(plugin_error)?;
                let found = http::send(&http_request(lookup)).map_err(PluginError::Http)?;
                match logic::open_pull_request_response(found.status, &found.body) {
                    Ok(Some(existing)) => Ok(pull_request(existing)),
                    // Not ours after all (another base, or closed meanwhile): the forge's refusal stands.
                    Ok(None) => Err(plugin_error(refused)),
                    Err(failure) => Err(plugin_error(support::refusal_with_failed_lookup(refused, failure))),
                }
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

        fn pull_request(pull_request: support::PullRequest) -> PullRequest {
            PullRequest {
                url: pull_request.url,
                number: pull_request.number,
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
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_message(_: &Value) -> Option<String> {
        None
    }

    #[test]
    fn pull_request_lookups_read_lists_single_answers_and_not_found() {
        let github = br#"[{"number": 7, "html_url": "https://github.com/acme/w/pull/7"}, {"number": 9}]"#;
        assert_eq!(
            found_pull_request(200, github, Some(""), ("/html_url", "/number"), no_message).unwrap(),
            Some(PullRequest {
                url: "https://github.com/acme/w/pull/7".to_string(),
                number: 7
            })
        );
        assert_eq!(
            found_pull_request(200, b"[]", Some(""), ("/html_url", "/number"), no_message).unwrap(),
            None
        );
        let bitbucket = br#"{"values": [{"id": 3, "links": {"html": {"href": "https://bitbucket.org/a/b/pull-requests/3"}}}], "page": 1}"#;
        assert_eq!(
            found_pull_request(200, bitbucket, Some("/values"), ("/links/html/href", "/id"), no_message)
                .unwrap()
                .map(|found| found.number),
            Some(3)
        );
        let gitea = br#"{"number": 4, "html_url": "http://h/a/b/pulls/4"}"#;
        assert_eq!(
            found_pull_request(200, gitea, None, ("/html_url", "/number"), no_message)
                .unwrap()
                .map(|found| found.number),
            Some(4)
        );
        assert_eq!(
            found_pull_request(404, b"{}", None, ("/html_url", "/number"), no_message).unwrap(),
            None
        );
        // A 404 on a list endpoint is the repository missing, not an empty list.
        assert!(matches!(
            found_pull_request(404, b"{}", Some(""), ("/html_url", "/number"), no_message),
            Err(Failure::Remote { status: 404, .. })
        ));
        assert!(matches!(
            found_pull_request(
                200,
                b"{\"values\": 1}",
                Some("/values"),
                ("/links/html/href", "/id"),
                no_message
            ),
            Err(Failure::Remote { .. })
        ));
        assert!(matches!(
            found_pull_request(
                200,
                b"[{\"number\": 1}]",
                Some(""),
                ("/html_url", "/number"),
                no_message
            ),
            Err(Failure::Remote { .. })
        ));
        assert!(matches!(
            found_pull_request(200, b"<html>", Some(""), ("/html_url", "/number"), no_message),
            Err(Failure::Remote { .. })
        ));
    }

    #[test]
    fn queries_are_percent_encoded_and_refusals_keep_the_forges_words() {
        assert_eq!(
            query_string(&[("head", "acme:flotilla/x y"), ("state", "open")]),
            "?head=acme%3Aflotilla%2Fx%20y&state=open"
        );
        let refused = Failure::Remote {
            status: 422,
            message: "A pull request already exists".to_string(),
        };
        let lookup = Failure::Remote {
            status: 500,
            message: "boom".to_string(),
        };
        assert_eq!(
            refusal_with_failed_lookup(refused, lookup),
            Failure::Remote {
                status: 422,
                message: "A pull request already exists (looking up the open pull request failed: HTTP 500: boom)"
                    .to_string()
            }
        );
    }

    fn parsed(url: &str) -> RemoteUrl {
        parse_remote_url(url).unwrap_or_else(|| panic!("{url} should parse"))
    }

    #[test]
    fn https_urls_lose_user_info_suffix_query_and_default_port() {
        let url = parsed("https://x-access-token:abc@GitHub.com:443/acme/widgets.git?x=1#readme");
        assert_eq!(url.scheme, Scheme::Https);
        assert_eq!(url.host, "github.com");
        assert_eq!(url.segments, ["acme", "widgets"]);
        assert_eq!(url.web_origin(), "https://github.com");
    }

    #[test]
    fn scp_like_and_ssh_urls_parse_and_match_on_the_host_name() {
        let scp = parsed("git@github.com:acme/widgets.git");
        assert_eq!((scp.scheme, scp.host.as_str()), (Scheme::Ssh, "github.com"));
        assert_eq!(scp.segments, ["acme", "widgets"]);
        let ssh = parsed("ssh://git@gitlab.example.com:2222/group/sub/project.git");
        assert_eq!(ssh.host, "gitlab.example.com:2222");
        assert_eq!(ssh.web_origin(), "https://gitlab.example.com");
        assert!(ssh.host_is_one_of(&["gitlab.example.com".to_string()]));
        assert_eq!(parsed("ssh://git@github.com:22/a/b").host, "github.com");
    }

    #[test]
    fn loopback_http_keeps_http_and_its_port() {
        let url = parsed("http://127.0.0.1:8080/acme/widgets");
        assert_eq!(url.web_origin(), "http://127.0.0.1:8080");
        assert!(url.host_is_one_of(&["127.0.0.1:8080".to_string()]));
        assert!(!url.host_is_one_of(&["127.0.0.1".to_string()]));
        assert_eq!(
            parsed("http://forge.example.com/a/b").web_origin(),
            "https://forge.example.com"
        );
        assert_eq!(parsed("http://[::1]:3000/a/b").web_origin(), "http://[::1]:3000");
    }

    #[test]
    fn file_urls_have_an_empty_host() {
        let url = parsed("file:///srv/git/widgets.git");
        assert_eq!((url.scheme, url.host.as_str()), (Scheme::File, ""));
        assert_eq!(url.segments, ["srv", "git", "widgets"]);
    }

    #[test]
    fn non_urls_are_refused() {
        for url in [
            "",
            "/srv/git/widgets.git",
            "./widgets",
            "C:\\repos\\widgets",
            "c:/repos",
            "git://github.com/acme/widgets.git",
            "ftp://example.com/a/b",
            "https://",
            "https:///acme/widgets",
            "https://github.com/acme/../widgets",
            "https://github.com:abc/acme/widgets",
            "https://github.com/acme/wid gets",
            "https://github.com/acme/.git",
        ] {
            assert_eq!(parse_remote_url(url), None, "{url:?} should be refused");
        }
    }

    #[test]
    fn settings_are_trimmed_and_defaulted() {
        let settings = Settings::read(
            |key| match key {
                "hosts" => Some(" GHE.example.com , https://127.0.0.1:9000/ ,, ".to_string()),
                "api-base" => Some("http://127.0.0.1:9000/api/v3/".to_string()),
                "token-secret" => Some("  ".to_string()),
                _ => None,
            },
            "github-token",
        );
        assert_eq!(settings.extra_hosts, ["ghe.example.com", "127.0.0.1:9000"]);
        assert_eq!(settings.api_base.as_deref(), Some("http://127.0.0.1:9000/api/v3"));
        assert_eq!(settings.token_secret, "github-token");
        assert_eq!(settings.token_placeholder().unwrap(), "{{secret:github-token}}");
        assert_eq!(
            settings.basic_placeholder("oauth2").unwrap(),
            "{{basic:oauth2:secret:github-token}}"
        );
    }

    #[test]
    fn a_secret_name_or_user_that_could_break_the_placeholder_is_refused() {
        let mut settings = Settings::read(|_| None, "t");
        settings.token_secret = "a}}{{secret:other".to_string();
        assert!(matches!(settings.token_placeholder(), Err(Failure::InvalidInput(_))));
        settings.token_secret = "ok".to_string();
        assert!(matches!(
            settings.basic_placeholder("a:b"),
            Err(Failure::InvalidInput(_))
        ));
    }

    #[test]
    fn messages_render_readably_and_fall_back_to_the_body_or_status() {
        let gitlab = json!({"source_branch": ["is invalid", "is missing"], "title": ["can't be blank"]});
        assert_eq!(
            render_message(&gitlab),
            "source_branch: is invalid; is missing; title: can't be blank"
        );
        assert_eq!(
            remote_failure(502, None, b"<html>bad gateway</html>"),
            Failure::Remote {
                status: 502,
                message: "<html>bad gateway</html>".to_string()
            }
        );
        assert_eq!(
            remote_failure(401, None, b""),
            Failure::Remote {
                status: 401,
                message: "HTTP 401 Unauthorized with an empty body".to_string()
            }
        );
        let long = "x".repeat(MAX_REMOTE_MESSAGE_CHARS + 10);
        let Failure::Remote { message, .. } = remote_failure(500, Some(long), b"") else {
            panic!("expected a remote failure");
        };
        assert_eq!(message.chars().count(), MAX_REMOTE_MESSAGE_CHARS + 1);
    }

    #[test]
    fn a_created_answer_without_the_fields_is_an_error() {
        let body = br#"{"html_url":"https://x/1","number":1}"#;
        assert_eq!(
            created_pull_request(201, body, "/html_url", "/number"),
            Ok(PullRequest {
                url: "https://x/1".to_string(),
                number: 1
            })
        );
        assert!(matches!(
            created_pull_request(201, b"{}", "/html_url", "/number"),
            Err(Failure::Remote { status: 201, .. })
        ));
    }

    #[test]
    fn path_components_are_percent_encoded() {
        assert_eq!(
            encode_path_component("group/sub/my project"),
            "group%2Fsub%2Fmy%20project"
        );
        assert_eq!(encode_path_component("a-b_c.d~e"), "a-b_c.d~e");
    }

    #[test]
    fn headers_match_case_insensitively_and_refs_give_branches() {
        let headers = vec![("x-github-event".to_string(), "push".to_string())];
        assert_eq!(header(&headers, "X-GitHub-Event"), Some("push"));
        assert_eq!(branch_of_ref("refs/heads/feature/x").as_deref(), Some("feature/x"));
        assert_eq!(branch_of_ref("refs/tags/v1"), None);
    }
}
