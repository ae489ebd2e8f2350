//! [`FakeForge`]: the "create a pull request" REST endpoint of GitHub, GitLab, Bitbucket Cloud
//! or Gitea/Forgejo on a loopback port, for testing the VCS provider plugins.
//!
//! Each fake checks a request the way its forge's published API wants it (method, path,
//! authentication with the expected token, the headers the forge requires or Flotilla pins,
//! a JSON content type and the required body fields) and answers in that forge's words and
//! shapes: 201 with the pull request, 401 for a missing or wrong token, 404 for a repository it
//! does not host, and the forge's own error for a pull request that is already open. Each also
//! answers the lookup a provider makes after that error (GitHub and GitLab list filters,
//! Bitbucket's BBQL `q`, Gitea's `pulls/{base}/{head}`). Every request is recorded, refused
//! ones included, for assertions.
//!
//! The API lives where a self-hosted instance serves it, so a provider finds it from the
//! repository URL alone: GitHub Enterprise `/api/v3`, GitLab `/api/v4`, Gitea `/api/v1`;
//! Bitbucket Cloud's `api.bitbucket.org/2.0` becomes `/2.0` on the same port (a provider needs
//! its `api-base` setting to find it). Repository `OWNER/NAME` is at
//! `http://127.0.0.1:PORT/OWNER/NAME` (GitLab: `GROUP[/SUBGROUP]/NAME`).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use serde_json::{json, Value};

/// Requests kept for [`FakeForge::requests`]; older ones are dropped.
pub const MAX_RECORDED_REQUESTS: usize = 1000;
/// Largest request body accepted; a pull request's description is a few KiB.
pub const MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;
/// The GitHub REST API version Flotilla pins (`X-GitHub-Api-Version`).
pub const GITHUB_API_VERSION: &str = "2022-11-28";

const GITHUB_DOCS: &str = "https://docs.github.com/rest";

/// Which forge a [`FakeForge`] plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForgeKind {
    GitHub,
    GitLab,
    Bitbucket,
    Gitea,
}

impl ForgeKind {
    /// Where the REST API lives on the fake's port.
    pub fn api_prefix(self) -> &'static str {
        match self {
            ForgeKind::GitHub => "/api/v3",
            ForgeKind::GitLab => "/api/v4",
            ForgeKind::Bitbucket => "/2.0",
            ForgeKind::Gitea => "/api/v1",
        }
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedForgeRequest {
    pub method: String,
    /// The path as sent, percent-encoding kept (`/api/v4/projects/acme%2Fwidgets/merge_requests`).
    pub path: String,
    pub query: Option<String>,
    /// Names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedForgeRequest {
    /// The request as it arrived (header names are lowercase in `HeaderMap` already).
    pub(crate) fn from_parts(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> RecordedForgeRequest {
        RecordedForgeRequest {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        }
    }

    /// Appends this request to `requests`, dropping the oldest beyond `max`.
    pub(crate) fn keep_in(self, requests: &mut VecDeque<RecordedForgeRequest>, max: usize) {
        if requests.len() == max {
            requests.pop_front();
        }
        requests.push_back(self);
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(header_name, _)| *header_name == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "the {} {} body is not JSON ({error}): {}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A pull (merge) request the fake opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakePullRequest {
    /// `OWNER/NAME` (GitLab: the project's full path).
    pub repository: String,
    pub number: u64,
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    /// The page the forge answered with.
    pub url: String,
}

/// A fake forge API on `127.0.0.1`. Clones share one server, which stops when the last clone
/// is dropped.
#[derive(Clone)]
pub struct FakeForge {
    shared: Arc<Shared>,
    address: SocketAddr,
    _server: Arc<ServerTask>,
}

struct Shared {
    kind: ForgeKind,
    token: String,
    /// Full paths of the repositories the fake hosts.
    repositories: Vec<String>,
    /// `http://127.0.0.1:PORT`, set once the port is known.
    origin: String,
    state: Mutex<ForgeState>,
}

#[derive(Default)]
struct ForgeState {
    requests: VecDeque<RecordedForgeRequest>,
    pull_requests: Vec<FakePullRequest>,
    /// The last number given out, per repository.
    last_number: BTreeMap<String, u64>,
}

struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl FakeForge {
    /// Serves `kind`'s API on a free loopback port, for the repositories `repositories`
    /// (`OWNER/NAME`), to a client that authenticates with `token`.
    pub async fn start(kind: ForgeKind, token: &str, repositories: &[&str]) -> FakeForge {
        let (listener, address) = super::bind_loopback("fake forge").await;
        let shared = Arc::new(Shared {
            kind,
            token: token.to_string(),
            repositories: repositories.iter().map(|repository| repository.to_string()).collect(),
            origin: format!("http://{address}"),
            state: Mutex::new(ForgeState::default()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
            .with_state(shared.clone());
        let task = super::serve(listener, app, "fake forge");
        FakeForge {
            shared,
            address,
            _server: Arc::new(ServerTask(task)),
        }
    }

    pub fn kind(&self) -> ForgeKind {
        self.shared.kind
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `127.0.0.1:PORT`, as a provider's `hosts` setting names it.
    pub fn host(&self) -> String {
        self.address.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn origin(&self) -> String {
        self.shared.origin.clone()
    }

    /// `http://127.0.0.1:PORT/api/v3` (and the like): the API base a provider should use.
    pub fn api_base(&self) -> String {
        format!("{}{}", self.shared.origin, self.shared.kind.api_prefix())
    }

    /// `http://127.0.0.1:PORT/PATH`, the repository's page (and clone URL without `.git`).
    pub fn repository_url(&self, path: &str) -> String {
        format!("{}/{path}", self.shared.origin)
    }

    /// Every request received, oldest first (at most [`MAX_RECORDED_REQUESTS`]).
    pub fn requests(&self) -> Vec<RecordedForgeRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// The pull requests opened so far, oldest first.
    pub fn pull_requests(&self) -> Vec<FakePullRequest> {
        self.shared.lock().pull_requests.clone()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ForgeState> {
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn hosts(&self, repository: &str) -> bool {
        self.repositories.iter().any(|hosted| hosted == repository)
    }

    /// Opens a pull request unless `conflicts_with` finds an open one.
    fn open_pull_request(
        &self,
        mut pull_request: FakePullRequest,
        page: impl FnOnce(u64) -> String,
        conflicts_with: impl Fn(&FakePullRequest) -> bool,
    ) -> Opening {
        let mut state = self.lock();
        if let Some(existing) = state.pull_requests.iter().find(|existing| conflicts_with(existing)) {
            return Opening::AlreadyOpen(existing.clone());
        }
        let last_number = state.last_number.entry(pull_request.repository.clone()).or_insert(0);
        *last_number += 1;
        pull_request.number = *last_number;
        pull_request.url = page(pull_request.number);
        state.pull_requests.push(pull_request.clone());
        Opening::Opened(pull_request)
    }
}

impl Shared {
    /// The open pull requests of `repository` that `wanted` accepts, oldest first.
    fn find_pull_requests(&self, repository: &str, wanted: impl Fn(&FakePullRequest) -> bool) -> Vec<FakePullRequest> {
        self.lock()
            .pull_requests
            .iter()
            .filter(|pull_request| pull_request.repository == repository && wanted(pull_request))
            .cloned()
            .collect()
    }
}

/// Whether a lookup's `state` filter admits open pull requests (all of the fake's are open).
fn state_admits_open(state: Option<&str>, open_word: &str) -> bool {
    state.is_none_or(|state| state.eq_ignore_ascii_case(open_word) || state == "all")
}

/// What [`Shared::open_pull_request`] did.
enum Opening {
    Opened(FakePullRequest),
    /// An open pull request conflicts with the new one.
    AlreadyOpen(FakePullRequest),
}

/// A request on its way through a fake's checks.
struct Incoming {
    method: Method,
    path: String,
    /// The query's pairs, percent-decoded.
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Incoming {
    /// The first query parameter called `name`.
    fn query_value(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The API path's segments after the kind's prefix, or `None` outside the API.
    fn api_segments(&self, kind: ForgeKind) -> Option<Vec<&str>> {
        let rest = self.path.strip_prefix(kind.api_prefix())?;
        let rest = rest.strip_prefix('/')?;
        Some(rest.split('/').collect())
    }

    /// The token of `Authorization: SCHEME TOKEN` for one of `schemes` (case-insensitive).
    fn authorization_token(&self, schemes: &[&str]) -> Option<&str> {
        let (scheme, token) = self.header("authorization")?.split_once(' ')?;
        schemes
            .iter()
            .any(|accepted| accepted.eq_ignore_ascii_case(scheme))
            .then(|| token.trim())
    }

    fn content_type_is_json(&self) -> bool {
        self.header("content-type")
            .and_then(|value| value.split(';').next())
            .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"))
    }

    fn json_body(&self) -> Option<Value> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .filter(Value::is_object)
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let recorded = RecordedForgeRequest::from_parts(&method, &uri, &headers, &body);
    recorded.keep_in(&mut shared.lock().requests, MAX_RECORDED_REQUESTS);
    let incoming = Incoming {
        method,
        path: uri.path().to_string(),
        query: form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect(),
        headers,
        body,
    };
    let (status, answer) = match shared.kind {
        ForgeKind::GitHub => github(&shared, &incoming),
        ForgeKind::GitLab => gitlab(&shared, &incoming),
        ForgeKind::Bitbucket => bitbucket(&shared, &incoming),
        ForgeKind::Gitea => gitea(&shared, &incoming),
    };
    json_response(status, &answer)
}

/// A JSON answer, as the forges send it.
pub(crate) fn json_response(status: u16, answer: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(answer.to_string()))
        .expect("a JSON response is valid")
}

/// A string field of a JSON object, if present and a string.
fn string_field(body: &Value, pointer: &str) -> Option<String> {
    body.pointer(pointer).and_then(Value::as_str).map(str::to_string)
}

// ---------------------------------------------------------------- GitHub

fn github_error(status: u16, message: &str) -> (u16, Value) {
    (
        status,
        json!({"message": message, "documentation_url": GITHUB_DOCS, "status": status.to_string()}),
    )
}

/// A pull request as GitHub shows it.
fn github_pull(shared: &Shared, pull_request: &FakePullRequest) -> Value {
    let repository = &pull_request.repository;
    let owner = repository.split('/').next().unwrap_or_default();
    json!({
        "url": format!("{}/repos/{repository}/pulls/{}", shared.origin, pull_request.number),
        "id": 1000 + pull_request.number,
        "number": pull_request.number,
        "state": "open",
        "html_url": pull_request.url,
        "title": pull_request.title,
        "body": pull_request.body,
        "draft": pull_request.draft,
        "head": {"ref": pull_request.head, "label": format!("{owner}:{}", pull_request.head)},
        "base": {"ref": pull_request.base, "label": format!("{owner}:{}", pull_request.base)},
    })
}

/// `GET /api/v3/repos/{owner}/{repo}/pulls?state=&head=user:ref-name&base=`: a list.
fn github_find(shared: &Shared, request: &Incoming, repository: &str) -> (u16, Value) {
    if !state_admits_open(request.query_value("state"), "open") {
        return (200, json!([]));
    }
    let owner = repository.split('/').next().unwrap_or_default();
    let head = match request.query_value("head") {
        None => None,
        Some(head) => match head.split_once(':') {
            Some((user, branch)) if user == owner => Some(branch.to_string()),
            // Another user's fork: none of the fake's pull requests come from one.
            Some(_) => return (200, json!([])),
            None => return github_error(422, "Validation Failed: head must be in the form user:ref-name"),
        },
    };
    let base = request.query_value("base");
    let found = shared.find_pull_requests(repository, |pull_request| {
        head.as_deref().is_none_or(|head| pull_request.head == head)
            && base.is_none_or(|base| pull_request.base == base)
    });
    (
        200,
        Value::Array(
            found
                .iter()
                .map(|pull_request| github_pull(shared, pull_request))
                .collect(),
        ),
    )
}

/// `POST /api/v3/repos/{owner}/{repo}/pulls` (GitHub Enterprise Server's layout of
/// `api.github.com/repos/{owner}/{repo}/pulls`) opens one; `GET` on it lists them.
fn github(shared: &Shared, request: &Incoming) -> (u16, Value) {
    let repository = match request.api_segments(ForgeKind::GitHub).as_deref() {
        Some(["repos", owner, repo, "pulls"]) if matches!(request.method, Method::POST | Method::GET) => {
            format!("{owner}/{repo}")
        }
        _ => return github_error(404, "Not Found"),
    };
    match request.authorization_token(&["Bearer", "token"]) {
        None => return github_error(401, "Requires authentication"),
        Some(token) if token != shared.token => return github_error(401, "Bad credentials"),
        Some(_) => {}
    }
    if request.header("user-agent").is_none_or(str::is_empty) {
        return github_error(
            403,
            "Request forbidden by administrative rules. Please make sure your request has a User-Agent header.",
        );
    }
    // GitHub serves other media types to clients that ask; Flotilla asks for the documented one.
    if request.header("accept") != Some("application/vnd.github+json") {
        return github_error(415, "Unsupported 'Accept' header: expected application/vnd.github+json");
    }
    match request.header("x-github-api-version") {
        Some(GITHUB_API_VERSION) => {}
        Some(other) => return github_error(400, &format!("API version '{other}' is not supported.")),
        None => return github_error(400, "The X-GitHub-Api-Version header is required by this fake forge."),
    }
    if !shared.hosts(&repository) {
        return github_error(404, "Not Found");
    }
    if request.method == Method::GET {
        return github_find(shared, request, &repository);
    }
    if !request.content_type_is_json() {
        return github_error(415, "Unsupported Media Type: Content-Type must be application/json");
    }
    let Some(body) = request.json_body() else {
        return github_error(400, "Problems parsing JSON");
    };
    for field in ["title", "head", "base"] {
        if string_field(&body, &format!("/{field}")).is_none_or(|value| value.is_empty()) {
            return github_error(422, &format!("Invalid request.\n\n\"{field}\" wasn't supplied."));
        }
    }
    if body.get("draft").is_some_and(|draft| !draft.is_boolean()) {
        return github_error(422, "Invalid request.\n\nFor 'properties/draft', is not a boolean.");
    }
    let owner = repository.split('/').next().unwrap_or_default().to_string();
    let pull_request = FakePullRequest {
        repository: repository.clone(),
        number: 0,
        head: string_field(&body, "/head").unwrap_or_default(),
        base: string_field(&body, "/base").unwrap_or_default(),
        title: string_field(&body, "/title").unwrap_or_default(),
        body: string_field(&body, "/body").unwrap_or_default(),
        draft: body.get("draft").and_then(Value::as_bool).unwrap_or(false),
        url: String::new(),
    };
    let page_base = format!("{}/{repository}/pull", shared.origin);
    let opened = shared.open_pull_request(
        pull_request.clone(),
        |number| format!("{page_base}/{number}"),
        |existing| {
            existing.repository == pull_request.repository
                && existing.head == pull_request.head
                && existing.base == pull_request.base
        },
    );
    match opened {
        Opening::Opened(opened) => (201, github_pull(shared, &opened)),
        Opening::AlreadyOpen(existing) => (
            422,
            json!({
                "message": "Validation Failed",
                "errors": [{
                    "resource": "PullRequest",
                    "code": "custom",
                    "message": format!("A pull request already exists for {owner}:{}.", existing.head),
                }],
                "documentation_url": GITHUB_DOCS,
                "status": "422",
            }),
        ),
    }
}

// ---------------------------------------------------------------- GitLab

/// `%2F` and friends back to bytes; `None` for a malformed escape.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// GitLab's title prefixes that make a merge request a draft.
fn gitlab_title_is_draft(title: &str) -> bool {
    let lowercase = title.to_ascii_lowercase();
    ["draft:", "[draft]", "(draft)", "draft -"]
        .iter()
        .any(|prefix| lowercase.starts_with(prefix))
}

/// A merge request as GitLab shows it.
fn gitlab_merge_request(pull_request: &FakePullRequest) -> Value {
    json!({
        "id": 5000 + pull_request.number,
        "iid": pull_request.number,
        "project_id": 42,
        "title": pull_request.title,
        "description": pull_request.body,
        "state": "opened",
        "draft": pull_request.draft,
        "source_branch": pull_request.head,
        "target_branch": pull_request.base,
        "web_url": pull_request.url,
    })
}

/// `GET /api/v4/projects/{id}/merge_requests?state=&source_branch=&target_branch=`: a list.
fn gitlab_find(shared: &Shared, request: &Incoming, project: &str) -> (u16, Value) {
    if !state_admits_open(request.query_value("state"), "opened") {
        return (200, json!([]));
    }
    let source = request.query_value("source_branch");
    let target = request.query_value("target_branch");
    let found = shared.find_pull_requests(project, |pull_request| {
        source.is_none_or(|source| pull_request.head == source)
            && target.is_none_or(|target| pull_request.base == target)
    });
    (200, Value::Array(found.iter().map(gitlab_merge_request).collect()))
}

/// `POST /api/v4/projects/{url-encoded full path}/merge_requests` opens one; `GET` lists them.
fn gitlab(shared: &Shared, request: &Incoming) -> (u16, Value) {
    let not_found = || (404, json!({"message": "404 Not Found"}));
    let project = match request.api_segments(ForgeKind::GitLab).as_deref() {
        Some(["projects", id, "merge_requests"]) if matches!(request.method, Method::POST | Method::GET) => {
            match percent_decode(id) {
                Some(project) => project,
                None => return not_found(),
            }
        }
        _ => return not_found(),
    };
    let token = request
        .header("private-token")
        .or_else(|| request.authorization_token(&["Bearer"]));
    if token != Some(shared.token.as_str()) {
        return (401, json!({"message": "401 Unauthorized"}));
    }
    if !shared.hosts(&project) {
        return (404, json!({"message": "404 Project Not Found"}));
    }
    if request.method == Method::GET {
        return gitlab_find(shared, request, &project);
    }
    if !request.content_type_is_json() {
        return (415, json!({"message": "415 Unsupported Media Type"}));
    }
    let Some(body) = request.json_body() else {
        return (
            400,
            json!({"error": "The provided content-type 'application/json' is not valid JSON"}),
        );
    };
    let missing: Vec<String> = ["source_branch", "target_branch", "title"]
        .iter()
        .filter(|field| string_field(&body, &format!("/{field}")).is_none_or(|value| value.is_empty()))
        .map(|field| format!("{field} is missing"))
        .collect();
    if !missing.is_empty() {
        return (400, json!({"error": missing.join(", ")}));
    }
    let title = string_field(&body, "/title").unwrap_or_default();
    let pull_request = FakePullRequest {
        repository: project.clone(),
        number: 0,
        head: string_field(&body, "/source_branch").unwrap_or_default(),
        base: string_field(&body, "/target_branch").unwrap_or_default(),
        draft: gitlab_title_is_draft(&title),
        title,
        body: string_field(&body, "/description").unwrap_or_default(),
        url: String::new(),
    };
    let page_base = format!("{}/{project}/-/merge_requests", shared.origin);
    // GitLab allows one open merge request per source branch, whatever its target.
    let opened = shared.open_pull_request(
        pull_request.clone(),
        |number| format!("{page_base}/{number}"),
        |existing| existing.repository == pull_request.repository && existing.head == pull_request.head,
    );
    match opened {
        Opening::Opened(opened) => (201, gitlab_merge_request(&opened)),
        Opening::AlreadyOpen(existing) => (
            409,
            json!({"message": [format!(
                "Another open merge request already exists for this source branch: !{}",
                existing.number
            )]}),
        ),
    }
}

// ---------------------------------------------------------------- Bitbucket Cloud

fn bitbucket_error(status: u16, message: &str, fields: Option<Value>) -> (u16, Value) {
    let mut error = json!({"message": message});
    if let Some(fields) = fields {
        error["fields"] = fields;
    }
    (status, json!({"type": "error", "error": error}))
}

/// A pull request as Bitbucket shows it.
fn bitbucket_pull_request(shared: &Shared, pull_request: &FakePullRequest) -> Value {
    json!({
        "type": "pullrequest",
        "id": pull_request.number,
        "title": pull_request.title,
        "description": pull_request.body,
        "state": "OPEN",
        "draft": pull_request.draft,
        "source": {"branch": {"name": pull_request.head}},
        "destination": {"branch": {"name": pull_request.base}},
        "links": {
            "self": {"href": format!(
                "{}/2.0/repositories/{}/pullrequests/{}",
                shared.origin, pull_request.repository, pull_request.number
            )},
            "html": {"href": pull_request.url},
        },
    })
}

/// The conditions of a BBQL query made of `field = "value"` terms joined by `AND` (the
/// subset of Bitbucket's query language this fake understands); `None` if it is not that.
fn parse_bbql(query: &str) -> Option<Vec<(String, String)>> {
    let mut terms = Vec::new();
    let mut rest = query.trim_start();
    loop {
        let field_end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))?;
        let field = &rest[..field_end];
        rest = rest[field_end..]
            .trim_start()
            .strip_prefix('=')?
            .trim_start()
            .strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => value.push(chars.next()?.1),
                (index, '"') => break index,
                (_, other) => value.push(other),
            }
        };
        if field.is_empty() {
            return None;
        }
        terms.push((field.to_string(), value));
        rest = rest[end + 1..].trim_start();
        if rest.is_empty() {
            return Some(terms);
        }
        rest = rest.strip_prefix("AND")?.trim_start();
    }
}

/// `GET /2.0/repositories/{workspace}/{repo_slug}/pullrequests?q=BBQL`: a page. Without a
/// `state` term Bitbucket lists open pull requests.
fn bitbucket_find(shared: &Shared, request: &Incoming, repository: &str) -> (u16, Value) {
    let terms = match request.query_value("q") {
        None => Vec::new(),
        Some(query) => match parse_bbql(query) {
            Some(terms) => terms,
            None => return bitbucket_error(400, &format!("Invalid query: {query}"), None),
        },
    };
    let mut head = None;
    let mut base = None;
    let mut state = None;
    for (field, value) in terms {
        match field.as_str() {
            "source.branch.name" => head = Some(value),
            "destination.branch.name" => base = Some(value),
            "state" => state = Some(value),
            other => return bitbucket_error(400, &format!("Invalid field name: {other}"), None),
        }
    }
    let found = if state_admits_open(state.as_deref(), "OPEN") {
        shared.find_pull_requests(repository, |pull_request| {
            head.as_deref().is_none_or(|head| pull_request.head == head)
                && base.as_deref().is_none_or(|base| pull_request.base == base)
        })
    } else {
        Vec::new()
    };
    (
        200,
        json!({
            "values": found.iter().map(|pull_request| bitbucket_pull_request(shared, pull_request)).collect::<Vec<_>>(),
            "pagelen": 10,
            "size": found.len(),
            "page": 1,
        }),
    )
}

/// `POST /2.0/repositories/{workspace}/{repo_slug}/pullrequests` opens one; `GET` lists them.
fn bitbucket(shared: &Shared, request: &Incoming) -> (u16, Value) {
    let repository = match request.api_segments(ForgeKind::Bitbucket).as_deref() {
        Some(["repositories", workspace, slug, "pullrequests"])
            if matches!(request.method, Method::POST | Method::GET) =>
        {
            format!("{workspace}/{slug}")
        }
        _ => return bitbucket_error(404, "Resource not found", None),
    };
    match request.authorization_token(&["Bearer"]) {
        None => return bitbucket_error(401, "Unauthorized", None),
        Some(token) if token != shared.token => {
            return bitbucket_error(
                401,
                "Token is invalid, expired, or not supported for this endpoint.",
                None,
            )
        }
        Some(_) => {}
    }
    if !shared.hosts(&repository) {
        return bitbucket_error(404, &format!("Repository {repository} not found"), None);
    }
    if request.method == Method::GET {
        return bitbucket_find(shared, request, &repository);
    }
    if !request.content_type_is_json() {
        return bitbucket_error(415, "Unsupported Media Type", None);
    }
    let Some(body) = request.json_body() else {
        return bitbucket_error(400, "Bad request", None);
    };
    if string_field(&body, "/title").is_none_or(|title| title.is_empty()) {
        return bitbucket_error(
            400,
            "title: This field is required.",
            Some(json!({"title": ["This field is required."]})),
        );
    }
    let Some(head) = string_field(&body, "/source/branch/name").filter(|name| !name.is_empty()) else {
        return bitbucket_error(
            400,
            "source: This field is required.",
            Some(json!({"source": ["This field is required."]})),
        );
    };
    // Without a destination, Bitbucket targets the repository's main branch.
    let base = string_field(&body, "/destination/branch/name").unwrap_or_else(|| "main".to_string());
    let pull_request = FakePullRequest {
        repository: repository.clone(),
        number: 0,
        head,
        base,
        title: string_field(&body, "/title").unwrap_or_default(),
        body: string_field(&body, "/description").unwrap_or_default(),
        draft: body.get("draft").and_then(Value::as_bool).unwrap_or(false),
        url: String::new(),
    };
    let page_base = format!("{}/{repository}/pull-requests", shared.origin);
    let opened = shared.open_pull_request(
        pull_request.clone(),
        |number| format!("{page_base}/{number}"),
        |existing| {
            existing.repository == pull_request.repository
                && existing.head == pull_request.head
                && existing.base == pull_request.base
        },
    );
    match opened {
        Opening::Opened(opened) => (201, bitbucket_pull_request(shared, &opened)),
        // Bitbucket's error shape; the wording is this fake's.
        Opening::AlreadyOpen(existing) => bitbucket_error(
            400,
            &format!(
                "There is already an open pull request from {} to {} (#{}).",
                existing.head, existing.base, existing.number
            ),
            None,
        ),
    }
}

// ---------------------------------------------------------------- Gitea / Forgejo

fn gitea_error(shared: &Shared, status: u16, message: &str) -> (u16, Value) {
    (
        status,
        json!({"message": message, "url": format!("{}/api/swagger", shared.origin)}),
    )
}

/// A pull request as Gitea shows it.
fn gitea_pull(pull_request: &FakePullRequest) -> Value {
    json!({
        "id": 3000 + pull_request.number,
        "number": pull_request.number,
        "url": pull_request.url,
        "html_url": pull_request.url,
        "title": pull_request.title,
        "body": pull_request.body,
        "state": "open",
        "draft": pull_request.draft,
        "head": {"ref": pull_request.head, "label": pull_request.head},
        "base": {"ref": pull_request.base, "label": pull_request.base},
    })
}

/// `POST /api/v1/repos/{owner}/{repo}/pulls` opens one; `GET .../pulls/{base}/{head}` (the
/// head may hold `/`s) answers the pull request of a base and head.
fn gitea(shared: &Shared, request: &Incoming) -> (u16, Value) {
    let not_found = |shared: &Shared| gitea_error(shared, 404, "The target couldn't be found.");
    let (repository, base_and_head) = match request.api_segments(ForgeKind::Gitea).as_deref() {
        Some(["repos", owner, repo, "pulls"]) if request.method == Method::POST => (format!("{owner}/{repo}"), None),
        Some(["repos", owner, repo, "pulls", base, head @ ..]) if request.method == Method::GET && !head.is_empty() => {
            let head: Option<Vec<String>> = head.iter().map(|segment| percent_decode(segment)).collect();
            match (percent_decode(base), head) {
                (Some(base), Some(head)) => (format!("{owner}/{repo}"), Some((base, head.join("/")))),
                _ => return not_found(shared),
            }
        }
        _ => return not_found(shared),
    };
    match request.authorization_token(&["token", "Bearer"]) {
        None => return gitea_error(shared, 401, "token is required"),
        Some(token) if token != shared.token => return gitea_error(shared, 401, "invalid username, password or token"),
        Some(_) => {}
    }
    if !shared.hosts(&repository) {
        return not_found(shared);
    }
    if let Some((base, head)) = base_and_head {
        let found = shared.find_pull_requests(&repository, |pull_request| {
            pull_request.base == base && pull_request.head == head
        });
        return match found.last() {
            Some(pull_request) => (200, gitea_pull(pull_request)),
            None => not_found(shared),
        };
    }
    if !request.content_type_is_json() {
        return gitea_error(shared, 415, "Content-Type must be application/json");
    }
    let Some(body) = request.json_body() else {
        return gitea_error(shared, 422, "invalid JSON body");
    };
    for (field, name) in [("head", "Head"), ("base", "Base"), ("title", "Title")] {
        if string_field(&body, &format!("/{field}")).is_none_or(|value| value.is_empty()) {
            return (
                422,
                json!([{"fieldNames": [name], "classification": "RequiredError", "message": "Required"}]),
            );
        }
    }
    let title = string_field(&body, "/title").unwrap_or_default();
    let pull_request = FakePullRequest {
        repository: repository.clone(),
        number: 0,
        head: string_field(&body, "/head").unwrap_or_default(),
        base: string_field(&body, "/base").unwrap_or_default(),
        // Gitea's default WORK_IN_PROGRESS_PREFIXES.
        draft: title.starts_with("WIP:") || title.starts_with("[WIP]"),
        title,
        body: string_field(&body, "/body").unwrap_or_default(),
        url: String::new(),
    };
    let page_base = format!("{}/{repository}/pulls", shared.origin);
    let opened = shared.open_pull_request(
        pull_request.clone(),
        |number| format!("{page_base}/{number}"),
        |existing| {
            existing.repository == pull_request.repository
                && existing.head == pull_request.head
                && existing.base == pull_request.base
        },
    );
    match opened {
        Opening::Opened(opened) => (201, gitea_pull(&opened)),
        Opening::AlreadyOpen(existing) => gitea_error(
            shared,
            409,
            &format!(
                "pull request already exists for these targets [id: {}, issue_id: {}, head_repo_id: 1, \
                 base_repo_id: 1, head_branch: {}, base_branch: {}]",
                3000 + existing.number,
                existing.number,
                existing.head,
                existing.base
            ),
        ),
    }
}
