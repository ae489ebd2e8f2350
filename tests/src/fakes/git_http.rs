//! [`GitHttpServer`]: git's smart HTTP protocol on a loopback port, served by the real
//! `git http-backend` run as a CGI program for each request, behind HTTP Basic auth.
//!
//! Every request needs the configured credentials, as a private forge would ask. The
//! authenticated user is passed on as `REMOTE_USER`, which is what makes `http-backend`
//! accept pushes (`receive-pack`). A repository `NAME.git` under the project root is at
//! `http://127.0.0.1:PORT/NAME.git`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use base64::Engine;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout};

/// The realm of the `WWW-Authenticate` challenge.
pub const REALM: &str = "flotilla-test";
/// Largest request body passed to `http-backend` (a push of a big repository).
pub const MAX_REQUEST_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// Largest CGI header block accepted from `http-backend`.
const MAX_CGI_HEADER_BYTES: usize = 64 * 1024;
/// Largest `receive-pack` answer (a status report per ref), which is read whole; see
/// [`finish_buffered`].
const MAX_RECEIVE_PACK_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Tail of `http-backend`'s stderr kept for the message printed when it fails.
const MAX_STDERR_BYTES: usize = 64 * 1024;
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// `Content-Length` of git's credential probe, a lone flush packet `0000`.
const PROBE_BODY_LENGTH: &str = "4";

/// A git smart-HTTP server over a project root. Clones share one server, which stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct GitHttpServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    _server: Arc<ServerTask>,
}

struct Shared {
    project_root: PathBuf,
    username: String,
    password: String,
    reject_pushes: AtomicBool,
    pushes_accepted: AtomicU64,
    request_count: AtomicU64,
}

struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl GitHttpServer {
    /// Serves the repositories under `project_root` on a free loopback port to a user who
    /// logs in as `username`/`password`.
    pub async fn start(project_root: impl Into<PathBuf>, username: &str, password: &str) -> GitHttpServer {
        let project_root = project_root.into();
        assert!(
            project_root.is_dir(),
            "the git project root {} is not a directory",
            project_root.display()
        );
        let shared = Arc::new(Shared {
            project_root,
            username: username.to_string(),
            password: password.to_string(),
            reject_pushes: AtomicBool::new(false),
            pushes_accepted: AtomicU64::new(0),
            request_count: AtomicU64::new(0),
        });
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let (listener, address) = super::bind_loopback("git HTTP server").await;
        let task = super::serve(listener, app, "git HTTP server");
        GitHttpServer {
            shared,
            address,
            _server: Arc::new(ServerTask(task)),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// `http://127.0.0.1:PORT/NAME.git`, the repository `PROJECT_ROOT/NAME.git`.
    pub fn repository_url(&self, name: &str) -> String {
        format!("http://{}/{name}.git", self.address)
    }

    pub fn project_root(&self) -> &Path {
        &self.shared.project_root
    }

    /// The path of the bare repository `NAME.git` under the project root.
    pub fn repository_path(&self, name: &str) -> PathBuf {
        self.shared.project_root.join(format!("{name}.git"))
    }

    /// `Basic BASE64(user:password)`, the value of the `Authorization` header this server
    /// accepts.
    pub fn authorization(&self) -> String {
        basic_authorization(&self.shared.username, &self.shared.password)
    }

    /// Environment that makes `git` send this server's credentials on every request
    /// (`http.extraHeader` through `GIT_CONFIG_COUNT`), with no credential helper or prompt.
    pub fn git_credentials_env(&self) -> Vec<(String, String)> {
        git_extra_header_env(&self.authorization())
    }

    /// While true, pushes (`git-receive-pack`, its ref advertisement included) get `403`.
    pub fn reject_pushes(&self, reject: bool) {
        self.shared.reject_pushes.store(reject, Ordering::SeqCst);
    }

    /// `receive-pack` POSTs that `http-backend` completed with exit status 0, leaving out the
    /// 4-byte credential probe git sends before a large push: one per successful `git push`.
    /// Counted before the answer is sent, so it is up to date when `git push` returns.
    pub fn pushes_accepted(&self) -> u64 {
        self.shared.pushes_accepted.load(Ordering::SeqCst)
    }

    /// Every HTTP request received, refused ones included.
    pub fn request_count(&self) -> u64 {
        self.shared.request_count.load(Ordering::SeqCst)
    }
}

/// `Basic BASE64(username:password)`.
pub fn basic_authorization(username: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {encoded}")
}

/// `GIT_CONFIG_COUNT=1`, `GIT_CONFIG_KEY_0=http.extraHeader`,
/// `GIT_CONFIG_VALUE_0=Authorization: AUTHORIZATION`, and `GIT_TERMINAL_PROMPT=0` so that a
/// refused request fails instead of asking for a password.
pub fn git_extra_header_env(authorization: &str) -> Vec<(String, String)> {
    vec![
        ("GIT_CONFIG_COUNT".to_string(), "1".to_string()),
        ("GIT_CONFIG_KEY_0".to_string(), "http.extraHeader".to_string()),
        (
            "GIT_CONFIG_VALUE_0".to_string(),
            format!("Authorization: {authorization}"),
        ),
        ("GIT_TERMINAL_PROMPT".to_string(), "0".to_string()),
    ]
}

/// Makes the bare repository `dir/NAME.git`, whose `main` (also its `HEAD`) holds one commit
/// with `files` (`(path, contents)`, parent directories made as needed), and returns its path.
/// The commit's author, committer and dates are fixed, so the same files give the same commit
/// id. Panics with git's message if git fails.
pub fn create_bare_repository(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let origin = dir.join(format!("{name}.git"));
    let seed = tempfile::Builder::new()
        .prefix("flotilla-seed-")
        .tempdir()
        .expect("could not create a temporary directory for the seed commit");
    let origin_text = origin.display().to_string();
    run_git(
        &["init", "--quiet", "--bare", "--initial-branch=main", &origin_text],
        dir,
    );
    run_git(&["init", "--quiet", "--initial-branch=main"], seed.path());
    for (path, contents) in files {
        let path = seed.path().join(path);
        let parent = path.parent().expect("a file path has a parent directory");
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|error| panic!("could not create {}: {error}", parent.display()));
        std::fs::write(&path, contents).unwrap_or_else(|error| panic!("could not write {}: {error}", path.display()));
    }
    run_git(&["add", "--all"], seed.path());
    run_git(&["commit", "--quiet", "--allow-empty", "-m", "seed"], seed.path());
    run_git(&["push", "--quiet", &origin_text, "main"], seed.path());
    origin
}

/// Runs git isolated from the user's and the system's configuration (no hooks, signing or
/// templates from outside), with a fixed identity and dates.
fn run_git(args: &[&str], cwd: &Path) {
    const FIXED_DATE: &str = "2024-01-01T00:00:00Z";
    let output = Command::new("git")
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "flotilla-test")
        .env("GIT_AUTHOR_EMAIL", "test@example.test")
        .env("GIT_AUTHOR_DATE", FIXED_DATE)
        .env("GIT_COMMITTER_NAME", "flotilla-test")
        .env("GIT_COMMITTER_EMAIL", "test@example.test")
        .env("GIT_COMMITTER_DATE", FIXED_DATE)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("could not run git {args:?}: {error}"));
    assert!(
        output.status.success(),
        "git {args:?} in {} failed: {}",
        cwd.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    if !is_authorized(&shared, request.headers()) {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", format!("Basic realm=\"{REALM}\""))
            .header("content-type", "text/plain")
            .body(Body::from("authentication required\n"))
            .expect("a static response is valid");
    }
    let cgi_request = match CgiRequest::check(&shared, &request) {
        Ok(cgi_request) => cgi_request,
        Err((status, message)) => return plain_response(status, message),
    };
    run_http_backend(&shared, request, cgi_request).await
}

/// An authorized request that passed the server's own checks, as `http-backend` is told of it.
struct CgiRequest {
    path: String,
    query: String,
    content_length: Option<String>,
    /// A push: `git-receive-pack`, its ref advertisement included.
    is_receive_pack: bool,
}

impl CgiRequest {
    /// Refuses a path that leaves the project root, a push while pushes are rejected, and a
    /// body too large or with a bad `Content-Length`, in that order.
    fn check(shared: &Shared, request: &Request) -> Result<CgiRequest, (StatusCode, &'static str)> {
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        if path.split('/').any(|component| component == "..") {
            return Err((StatusCode::NOT_FOUND, "no such repository\n"));
        }
        let is_receive_pack =
            path.ends_with("/git-receive-pack") || query.split('&').any(|pair| pair == "service=git-receive-pack");
        if is_receive_pack && shared.reject_pushes.load(Ordering::SeqCst) {
            return Err((StatusCode::FORBIDDEN, "pushes are rejected by this test server\n"));
        }
        let content_length = header_text(request.headers(), "content-length").map(str::to_string);
        if let Some(length) = &content_length {
            match length.parse::<u64>() {
                Ok(length) if length <= MAX_REQUEST_BODY_BYTES => {}
                Ok(_) => return Err((StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")),
                Err(_) => return Err((StatusCode::BAD_REQUEST, "bad content-length\n")),
            }
        }
        Ok(CgiRequest {
            path,
            query,
            content_length,
            is_receive_pack,
        })
    }

    /// `git http-backend` with the CGI environment of this request (and nothing of this
    /// process's environment but `PATH`), its three standard streams piped.
    fn command(&self, shared: &Shared, method: &Method, headers: &HeaderMap) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("git");
        command
            .arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_PROJECT_ROOT", &shared.project_root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("GIT_HTTP_MAX_REQUEST_BUFFER", MAX_REQUEST_BODY_BYTES.to_string())
            .env("GATEWAY_INTERFACE", "CGI/1.1")
            .env("SERVER_PROTOCOL", "HTTP/1.1")
            .env("REMOTE_ADDR", "127.0.0.1")
            .env("REMOTE_USER", &shared.username)
            .env("REQUEST_METHOD", method.as_str())
            .env("PATH_INFO", &self.path)
            .env("QUERY_STRING", &self.query)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(length) = &self.content_length {
            command.env("CONTENT_LENGTH", length);
        }
        for (header, variable) in [
            ("content-type", "CONTENT_TYPE"),
            ("content-encoding", "HTTP_CONTENT_ENCODING"),
            // Protocol v2 is asked for with this header; http-backend passes it on to git.
            ("git-protocol", "HTTP_GIT_PROTOCOL"),
        ] {
            if let Some(value) = header_text(headers, header) {
                command.env(variable, value);
            }
        }
        command
    }
}

/// Runs `http-backend` for `request`, feeds it the request's body, and answers with what it
/// writes: streamed, or read whole for a push (see [`finish_buffered`]).
async fn run_http_backend(shared: &Shared, request: Request, cgi_request: CgiRequest) -> Response {
    let mut command = cgi_request.command(shared, request.method(), request.headers());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return plain_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("could not start git http-backend: {error}\n"),
            )
        }
    };
    let CgiRequest {
        path,
        query,
        content_length,
        is_receive_pack,
    } = cgi_request;

    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    tokio::spawn(feed_request_body(request.into_body(), stdin));
    let stderr_tail = tokio::spawn(read_tail(stderr));
    let backend = Backend {
        child,
        stderr_tail,
        description: format!("git http-backend for {path}?{query}"),
    };

    let mut stdout = stdout;
    let (head, rest_of_first_read) = match read_cgi_head(&mut stdout).await {
        Ok(split) => split,
        Err(error) => {
            let (_, stderr) = backend.finish().await;
            return plain_response(
                StatusCode::BAD_GATEWAY,
                &format!("git http-backend gave no CGI header ({error}): {stderr}\n"),
            );
        }
    };
    let (status, headers) = parse_cgi_head(&head);
    if is_receive_pack && path.ends_with("/git-receive-pack") {
        // Before a body too big for its post buffer, which goes chunked and cannot be resent,
        // git checks the credentials with a POST of just a flush packet ("0000"). It pushes
        // nothing and is not counted.
        let is_probe = content_length.as_deref() == Some(PROBE_BODY_LENGTH);
        let counter = (!is_probe).then_some(&shared.pushes_accepted);
        return finish_buffered(counter, status, headers, rest_of_first_read, stdout, backend).await;
    }
    let body = Body::from_stream(stream_rest(rest_of_first_read, stdout, backend));
    build_response(status, headers, body)
}

/// The CGI child and what is needed to report on it once it exits.
struct Backend {
    child: Child,
    stderr_tail: tokio::task::JoinHandle<Vec<u8>>,
    description: String,
}

impl Backend {
    /// Waits for the child to exit and prints its stderr if it failed. Returns whether it
    /// succeeded, and its stderr.
    async fn finish(mut self) -> (bool, String) {
        let status = self.child.wait().await;
        let stderr = self.stderr_tail.await.unwrap_or_default();
        let stderr = String::from_utf8_lossy(&stderr).trim().to_string();
        let succeeded = match status {
            Ok(status) if status.success() => true,
            Ok(status) => {
                eprintln!("{} exited with {status}: {stderr}", self.description);
                false
            }
            Err(error) => {
                eprintln!("{}: could not wait for it: {error}", self.description);
                false
            }
        };
        (succeeded, stderr)
    }
}

/// A `receive-pack` answer is read whole and the child awaited before it is sent, so that
/// [`GitHttpServer::pushes_accepted`] already counts the push when `git push` returns.
async fn finish_buffered(
    pushes_accepted: Option<&AtomicU64>,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    mut body: Vec<u8>,
    mut stdout: ChildStdout,
    backend: Backend,
) -> Response {
    let room = MAX_RECEIVE_PACK_RESPONSE_BYTES.saturating_sub(body.len()) as u64 + 1;
    if let Err(error) = (&mut stdout).take(room).read_to_end(&mut body).await {
        return plain_response(StatusCode::BAD_GATEWAY, &format!("reading git http-backend: {error}\n"));
    }
    if body.len() > MAX_RECEIVE_PACK_RESPONSE_BYTES {
        return plain_response(StatusCode::BAD_GATEWAY, "git http-backend answered too much\n");
    }
    drop(stdout);
    let (succeeded, _stderr) = backend.finish().await;
    if let Some(pushes_accepted) = pushes_accepted.filter(|_| succeeded && status == StatusCode::OK) {
        pushes_accepted.fetch_add(1, Ordering::SeqCst);
    }
    build_response(status, headers, Body::from(body))
}

/// Copies the request body to the CGI's stdin, then closes it (the end of input is how
/// `http-backend` knows a chunked body has ended). Stops after [`MAX_REQUEST_BODY_BYTES`],
/// which truncates the input and makes git fail, and when the child stops reading.
async fn feed_request_body(body: Body, mut stdin: tokio::process::ChildStdin) {
    let mut chunks = body.into_data_stream();
    let mut fed_bytes: u64 = 0;
    while let Some(Ok(chunk)) = chunks.next().await {
        fed_bytes += chunk.len() as u64;
        if fed_bytes > MAX_REQUEST_BODY_BYTES {
            eprintln!("git HTTP server: request body over {MAX_REQUEST_BODY_BYTES} bytes; cut off");
            break;
        }
        if stdin.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = stdin.shutdown().await;
}

/// The last [`MAX_STDERR_BYTES`] of a stream.
async fn read_tail(mut stream: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buffer = vec![0; READ_CHUNK_BYTES];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return tail,
            Ok(read) => {
                tail.extend_from_slice(&buffer[..read]);
                if tail.len() > MAX_STDERR_BYTES {
                    tail.drain(..tail.len() - MAX_STDERR_BYTES);
                }
            }
        }
    }
}

/// Reads up to the blank line that ends the CGI header block; returns the block and the body
/// bytes read past it.
async fn read_cgi_head(stdout: &mut ChildStdout) -> io::Result<(String, Vec<u8>)> {
    let mut read_so_far = Vec::new();
    let mut buffer = vec![0; READ_CHUNK_BYTES];
    loop {
        if let Some((head_end, body_start)) = find_head_end(&read_so_far) {
            let head = String::from_utf8_lossy(&read_so_far[..head_end]).into_owned();
            return Ok((head, read_so_far[body_start..].to_vec()));
        }
        if read_so_far.len() > MAX_CGI_HEADER_BYTES {
            return Err(io::Error::other(format!(
                "header block over {MAX_CGI_HEADER_BYTES} bytes"
            )));
        }
        let read = stdout.read(&mut buffer).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "output ended before a blank line",
            ));
        }
        read_so_far.extend_from_slice(&buffer[..read]);
    }
}

/// Where the header block ends and the body starts: the first `\r\n\r\n` or `\n\n`.
fn find_head_end(bytes: &[u8]) -> Option<(usize, usize)> {
    let crlf = bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| (at, at + 4));
    let lf = bytes
        .windows(2)
        .position(|window| window == b"\n\n")
        .map(|at| (at, at + 2));
    match (crlf, lf) {
        (Some(crlf), Some(lf)) => Some(if crlf.0 < lf.0 { crlf } else { lf }),
        (crlf, lf) => crlf.or(lf),
    }
}

/// The status (`Status: 404 Not Found`, 200 when absent) and the other headers of a CGI
/// header block; lines that are not valid headers are skipped.
fn parse_cgi_head(head: &str) -> (StatusCode, Vec<(HeaderName, HeaderValue)>) {
    let mut status = StatusCode::OK;
    let mut headers = Vec::new();
    for line in head.lines() {
        let Some((name, value)) = line.trim_end_matches('\r').split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|code| code.parse::<u16>().ok());
            if let Some(code) = code.and_then(|code| StatusCode::from_u16(code).ok()) {
                status = code;
            }
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.push((name, value));
        }
    }
    (status, headers)
}

/// The body: the bytes already read, then the rest of stdout as it comes; the child is
/// awaited (and its failure printed) at the end.
fn stream_rest(
    first: Vec<u8>,
    stdout: ChildStdout,
    backend: Backend,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    let first = futures::stream::iter((!first.is_empty()).then(|| Ok(Bytes::from(first))));
    let rest = futures::stream::unfold(Some((stdout, backend)), |state| async move {
        let (mut stdout, backend) = state?;
        let mut buffer = vec![0; READ_CHUNK_BYTES];
        match stdout.read(&mut buffer).await {
            Ok(0) => {
                drop(stdout);
                backend.finish().await;
                None
            }
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(Bytes::from(buffer)), Some((stdout, backend))))
            }
            Err(error) => Some((Err(error), None)),
        }
    });
    first.chain(rest)
}

fn build_response(status: StatusCode, headers: Vec<(HeaderName, HeaderValue)>, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for (name, value) in headers {
        response.headers_mut().append(name, value);
    }
    response
}

fn plain_response(status: StatusCode, text: &str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Body::from(text.to_string()))
        .expect("a plain response is valid")
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn is_authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(encoded) = header_text(headers, "authorization").and_then(|value| {
        let (scheme, credentials) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then_some(credentials.trim())
    }) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let expected = format!("{}:{}", shared.username, shared.password);
    decoded == expected.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_head_gives_status_and_headers() {
        let (status, headers) = parse_cgi_head(
            "Status: 404 Not Found\r\nContent-Type: text/plain\r\nExpires: Fri, 01 Jan 1980 00:00:00 GMT",
        );
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[0].0, "content-type");
        let (status, _) = parse_cgi_head("Content-Type: application/x-git-upload-pack-advertisement");
        assert_eq!(status, StatusCode::OK);
    }

    #[test]
    fn head_ends_at_the_first_blank_line_of_either_kind() {
        assert_eq!(find_head_end(b"A: b\r\n\r\nbody\n\n"), Some((4, 8)));
        assert_eq!(find_head_end(b"A: b\n\nbody\r\n\r\n"), Some((4, 6)));
        assert_eq!(find_head_end(b"A: b\r\n"), None);
    }
}
