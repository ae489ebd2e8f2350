//! [`SkiffForge`]: the REST API of "Skiff", a made-up forge that no built-in provider knows,
//! on a loopback port. The test guest plugin `skiff` (`plugins/testdata/skiff`) opens its pull
//! requests here, so a test can add a provider to a running cluster and watch it work.
//!
//! One endpoint, `POST /api/repos/{owner}/{name}/pulls`, authenticated with
//! `Authorization: Bearer TOKEN`, taking a JSON object with string `title`, `head` and `base`
//! (and optional string `body` and `opened_by`, boolean `draft`). It answers 201 with the pull
//! request's `number` (counted per repository from 1), `html_url`, `head`, `base` and `title`;
//! errors are `{"message": ...}`: 401 for a missing or wrong token, 404 for a path it does not
//! serve or a repository not added with [`SkiffForge::add_repository`], 422 for a request that
//! is not JSON, lacks a field, or opens a second pull request from the same head of a
//! repository. Checks run in that order: token, repository, body. Every request is recorded,
//! refused ones included.
//!
//! `GET` on the same path lists the repository's pull requests, filtered by the optional query
//! parameters `head` and `base` (the skiff plugin looks there when a create is refused because
//! one already exists).
//!
//! [`SkiffForge::hold_pull_requests`] holds pull request requests (recorded, not yet checked)
//! until released, so a test can act while a plugin waits for its answer;
//! [`SkiffForge::hold_answers`] opens them and holds only the answers (an answer lost on the way).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::forges::{json_response, RecordedForgeRequest};

/// Requests kept for [`SkiffForge::requests`]; older ones are dropped.
pub const MAX_RECORDED_SKIFF_REQUESTS: usize = 1000;
/// Largest request body accepted.
pub const MAX_SKIFF_BODY_BYTES: usize = 1024 * 1024;

/// A pull request the fake opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkiffPullRequest {
    /// `OWNER/NAME`.
    pub repository: String,
    pub number: u64,
    /// The page the fake answered with (`html_url`).
    pub url: String,
    pub head: String,
    pub base: String,
    pub title: String,
    /// Empty when the request had none.
    pub body: String,
    pub draft: bool,
    /// The `opened_by` field, which the skiff plugin sets to its version's marker.
    pub opened_by: Option<String>,
}

/// Whether pull request requests go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Open,
    Held,
    /// The fake stopped; held requests are answered 503.
    Closed,
}

/// A fake Skiff API on `127.0.0.1`. Clones share one server, which stops (answering the
/// requests it holds) when the last clone is dropped.
#[derive(Clone)]
pub struct SkiffForge {
    shared: Arc<Shared>,
    address: SocketAddr,
    _server: Arc<ServerTask>,
}

struct Shared {
    token: String,
    /// `http://127.0.0.1:PORT`.
    origin: String,
    state: Mutex<SkiffState>,
    gate: watch::Sender<Gate>,
    /// Pull request requests waiting at the gate.
    pending: AtomicUsize,
    /// Answers of opened pull requests wait here (the pull request exists, the client does not
    /// know yet).
    answer_gate: watch::Sender<Gate>,
    pending_answers: AtomicUsize,
}

#[derive(Default)]
struct SkiffState {
    /// `OWNER/NAME` of the repositories the fake hosts.
    repositories: BTreeSet<String>,
    requests: VecDeque<RecordedForgeRequest>,
    pull_requests: Vec<SkiffPullRequest>,
    /// The last number given out, per repository.
    last_number: BTreeMap<String, u64>,
}

struct ServerTask {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.shared.gate.send_replace(Gate::Closed);
        self.shared.answer_gate.send_replace(Gate::Closed);
        self.task.abort();
    }
}

/// Counts a request as waiting at the gate for as long as it lives, even if the connection
/// goes away while it waits.
struct PendingGuard<'a>(&'a AtomicUsize);

impl<'a> PendingGuard<'a> {
    fn new(pending: &'a AtomicUsize) -> Self {
        pending.fetch_add(1, Ordering::SeqCst);
        PendingGuard(pending)
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SkiffForge {
    /// Serves the API on a free loopback port to clients that authenticate with `token`. It
    /// hosts no repository until [`SkiffForge::add_repository`].
    pub async fn start(token: &str) -> SkiffForge {
        let (listener, address) = super::bind_loopback("fake skiff forge").await;
        let shared = Arc::new(Shared {
            token: token.to_string(),
            origin: format!("http://{address}"),
            state: Mutex::new(SkiffState::default()),
            gate: watch::Sender::new(Gate::Open),
            pending: AtomicUsize::new(0),
            answer_gate: watch::Sender::new(Gate::Open),
            pending_answers: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(MAX_SKIFF_BODY_BYTES))
            .with_state(shared.clone());
        let task = super::serve(listener, app, "fake skiff forge");
        SkiffForge {
            _server: Arc::new(ServerTask {
                shared: shared.clone(),
                task,
            }),
            shared,
            address,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `127.0.0.1:PORT`, as the plugin's `hosts` setting names it.
    pub fn host(&self) -> String {
        self.address.to_string()
    }

    /// `http://127.0.0.1:PORT`, the plugin's `api-base` setting.
    pub fn api_base(&self) -> String {
        self.shared.origin.clone()
    }

    /// `http://127.0.0.1:PORT/OWNER/NAME`, a repository's URL as the plugin claims it.
    pub fn repository_url(&self, repository: &str) -> String {
        format!("{}/{repository}", self.shared.origin)
    }

    /// Hosts `repository` (`OWNER/NAME`) from now on.
    pub fn add_repository(&self, repository: &str) {
        self.shared.lock().repositories.insert(repository.to_string());
    }

    /// Every request received, oldest first (at most [`MAX_RECORDED_SKIFF_REQUESTS`]).
    pub fn requests(&self) -> Vec<RecordedForgeRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// The pull requests opened so far, oldest first.
    pub fn pull_requests(&self) -> Vec<SkiffPullRequest> {
        self.shared.lock().pull_requests.clone()
    }

    /// `true`: pull request requests that arrive from now on wait, recorded but not yet
    /// checked, until this is called with `false`, which lets every waiting one go on.
    pub fn hold_pull_requests(&self, hold: bool) {
        set_gate(&self.shared.gate, hold);
    }

    /// Pull request requests waiting at the gate now.
    pub fn pending_pull_requests(&self) -> usize {
        self.shared.pending.load(Ordering::SeqCst)
    }

    /// `true`: pull requests are opened as usual but their answers wait until this is called
    /// with `false` (a forge whose answer is lost on the way: the pull request exists, the client
    /// has not heard).
    pub fn hold_answers(&self, hold: bool) {
        set_gate(&self.shared.answer_gate, hold);
    }

    /// Answers of opened pull requests waiting now.
    pub fn pending_answers(&self) -> usize {
        self.shared.pending_answers.load(Ordering::SeqCst)
    }
}

fn set_gate(gate: &watch::Sender<Gate>, hold: bool) {
    gate.send_if_modified(|gate| {
        let wanted = if hold { Gate::Held } else { Gate::Open };
        if *gate == Gate::Closed || *gate == wanted {
            return false;
        }
        *gate = wanted;
        true
    });
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SkiffState> {
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn record(&self, request: RecordedForgeRequest) {
        request.keep_in(&mut self.lock().requests, MAX_RECORDED_SKIFF_REQUESTS);
    }

    /// Waits while the gate is held; false if the fake stopped.
    async fn pass_gate(&self) -> bool {
        pass(&self.gate, &self.pending).await
    }
}

/// Waits while `gate` is held, counted in `pending`; false if the fake stopped.
async fn pass(gate: &watch::Sender<Gate>, pending: &AtomicUsize) -> bool {
    let mut gate = gate.subscribe();
    match *gate.borrow_and_update() {
        Gate::Open => return true,
        Gate::Closed => return false,
        Gate::Held => {}
    }
    let _pending = PendingGuard::new(pending);
    gate.wait_for(|gate| *gate != Gate::Held)
        .await
        .is_ok_and(|gate| *gate == Gate::Open)
}

fn error(status: u16, message: &str) -> (u16, Value) {
    (status, json!({ "message": message }))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.record(RecordedForgeRequest::from_parts(&method, &uri, &headers, &body));
    let (status, answer) = answer(&shared, &method, &uri, &headers, &body).await;
    json_response(status, &answer)
}

/// A pull request as the API shows it.
fn pull_request_json(pull_request: &SkiffPullRequest) -> Value {
    json!({
        "number": pull_request.number,
        "html_url": pull_request.url,
        "head": pull_request.head,
        "base": pull_request.base,
        "title": pull_request.title,
    })
}

async fn answer(shared: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> (u16, Value) {
    let segments: Vec<&str> = uri.path().split('/').collect();
    let (owner, name) = match segments.as_slice() {
        ["", "api", "repos", owner, name, "pulls"] if !owner.is_empty() && !name.is_empty() => (*owner, *name),
        _ => return error(404, "not found"),
    };
    if method != Method::POST && method != Method::GET {
        return error(405, "method not allowed");
    }
    if method == Method::POST && !shared.pass_gate().await {
        return error(503, "the forge stopped");
    }
    let token = header(headers, "authorization")
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    if token != Some(shared.token.as_str()) {
        return error(401, "bad credentials");
    }
    let repository = format!("{owner}/{name}");
    if !shared.lock().repositories.contains(&repository) {
        return error(404, "repository not found");
    }
    if method == Method::GET {
        return (200, list_pull_requests(shared, &repository, uri));
    }
    open_pull_request(shared, repository, headers, body).await
}

/// The value of the header `name`, if it is text.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// `GET`: the pull requests of `repository`, filtered by the optional query parameters `head`
/// and `base`.
fn list_pull_requests(shared: &Shared, repository: &str, uri: &Uri) -> Value {
    let query: Vec<(String, String)> = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let filter = |key: &str| {
        query
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
    };
    let (head, base) = (filter("head"), filter("base"));
    let listed: Vec<Value> = shared
        .lock()
        .pull_requests
        .iter()
        .filter(|open| {
            open.repository == repository
                && head.as_ref().is_none_or(|head| &open.head == head)
                && base.as_ref().is_none_or(|base| &open.base == base)
        })
        .map(pull_request_json)
        .collect();
    Value::Array(listed)
}

/// `POST`: checks the body, opens the pull request in `repository`, and answers once the
/// answer gate lets it.
async fn open_pull_request(shared: &Shared, repository: String, headers: &HeaderMap, body: &[u8]) -> (u16, Value) {
    let requested = match RequestedPullRequest::from_request(headers, body) {
        Ok(requested) => requested,
        Err(refusal) => return refusal,
    };
    let pull_request = match shared.open(repository, requested) {
        Ok(pull_request) => pull_request,
        Err(refusal) => return refusal,
    };
    if !pass(&shared.answer_gate, &shared.pending_answers).await {
        return error(503, "the forge stopped");
    }
    (201, pull_request_json(&pull_request))
}

/// The fields of a create, as its body gives them.
struct RequestedPullRequest {
    title: String,
    head: String,
    base: String,
    /// Empty when the request had none.
    description: String,
    draft: bool,
    opened_by: Option<String>,
}

impl RequestedPullRequest {
    /// Checks a create's content type and body; the refusal names the first field at fault.
    fn from_request(headers: &HeaderMap, body: &[u8]) -> Result<RequestedPullRequest, (u16, Value)> {
        let json_content = header(headers, "content-type")
            .and_then(|value| value.split(';').next())
            .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"));
        if !json_content {
            return Err(error(422, "content-type must be application/json"));
        }
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return Err(error(422, "the body must be a JSON object"));
        };
        let mut required = BTreeMap::new();
        for field in ["title", "head", "base"] {
            match fields.get(field).and_then(Value::as_str) {
                Some(value) if !value.is_empty() => {
                    required.insert(field, value.to_string());
                }
                _ => return Err(error(422, &format!("{field} must be a non-empty string"))),
            }
        }
        let optional_string = |field: &str| match fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => Err(error(422, &format!("{field} must be a string"))),
        };
        let description = optional_string("body")?.unwrap_or_default();
        let opened_by = optional_string("opened_by")?;
        let draft = match fields.get("draft") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(draft)) => *draft,
            Some(_) => return Err(error(422, "draft must be a boolean")),
        };
        Ok(RequestedPullRequest {
            title: required.remove("title").unwrap_or_default(),
            head: required.remove("head").unwrap_or_default(),
            base: required.remove("base").unwrap_or_default(),
            description,
            draft,
            opened_by,
        })
    }
}

impl Shared {
    /// Opens `requested` in `repository` under the repository's next number, unless a pull
    /// request from the same head is open there.
    fn open(&self, repository: String, requested: RequestedPullRequest) -> Result<SkiffPullRequest, (u16, Value)> {
        let mut state = self.lock();
        let head = requested.head;
        if state
            .pull_requests
            .iter()
            .any(|open| open.repository == repository && open.head == head)
        {
            return Err(error(422, &format!("a pull request for {head} already exists")));
        }
        let number = {
            let last = state.last_number.entry(repository.clone()).or_insert(0);
            *last += 1;
            *last
        };
        let pull_request = SkiffPullRequest {
            url: format!("{}/{repository}/pulls/{number}", self.origin),
            repository,
            number,
            head,
            base: requested.base,
            title: requested.title,
            body: requested.description,
            draft: requested.draft,
            opened_by: requested.opened_by,
        };
        state.pull_requests.push(pull_request.clone());
        Ok(pull_request)
    }
}
