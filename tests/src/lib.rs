//! The harness for Flotilla's integration and failure tests.
//!
//! Tests here treat Flotilla the way an operator does: they start real `flotilla node`
//! processes on free loopback ports in temporary directories, talk to them over the public
//! gRPC API or the `flotilla` CLI, kill them with SIGKILL, and restart them on the same data
//! directory. Nothing here links the node's code, so a test exercises exactly the binary
//! that ships. Every node is killed when its [`NodeProcess`] is dropped, including when a
//! test panics.
//!
//! Tests wait for conditions with [`wait_for`], never with a sleep: a sleep is either too
//! short on a loaded two-core machine or wasted time everywhere else.

pub mod burst;
pub mod fakes;
pub mod invariants;
pub mod local_cluster;
pub mod netlab;
mod ports;

pub use ports::free_port;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_proto::v1::admin_service_client::AdminServiceClient;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::{Cluster, GetClusterRequest};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// How long a node may take to start, elect a leader or join. Generous because a debug
/// build opening RocksDB on a busy two-core machine is slow, and a timeout here only costs
/// time when something is already broken.
pub const NODE_STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// Time between two polls in [`wait_for`].
const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long a gRPC client waits for a TCP connection before the call fails.
const CLIENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines of each node's log printed when a cluster is dropped during a panic.
const LOG_LINES_ON_FAILURE: usize = 40;

/// Set this environment variable to keep a failed test's cluster directory (data and logs);
/// set it to `always` to keep every test's.
const KEEP_TEST_DIRS_ENV: &str = "FLOTILLA_KEEP_TEST_DIRS";
/// Set this environment variable to a log filter (`RUST_LOG` syntax) for the nodes a test starts.
const TEST_LOG_ENV: &str = "FLOTILLA_TEST_LOG";

/// Environment of the outer build that must not reach (and rebuild) the wasm guests.
const GUEST_BUILD_LEAKING_ENVIRONMENT: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
];

/// The component of test guest `name` from `plugins/testdata` (e.g. "well-behaved"), built for
/// wasm32-wasip2 once per test process into `target/plugin-testdata` (shared with the plugin
/// host's own tests).
pub fn test_guest(name: &str) -> Vec<u8> {
    static DIRECTORY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let directory = DIRECTORY.get_or_init(|| {
        let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests crate lives one level below the workspace root");
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => workspace_root.join(dir).join("plugin-testdata"),
            None => workspace_root.join("target/plugin-testdata"),
        };
        let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        command
            .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(workspace_root.join("plugins/testdata/Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target);
        for variable in GUEST_BUILD_LEAKING_ENVIRONMENT {
            command.env_remove(variable);
        }
        let output = command.output().expect("run cargo to build the test guests");
        assert!(
            output.status.success(),
            "building the test guests failed (is the wasm32-wasip2 target installed?):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        target.join("wasm32-wasip2/release")
    });
    let path = directory.join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|error| panic!("read test guest {}: {error}", path.display()))
}

/// The path of the `flotilla` binary under test: `$FLOTILLA_BIN` if set, otherwise the
/// workspace's debug build.
/// Compiled plugin code shared by every node the tests start (beside the binary they run), so
/// the built-ins are compiled once per build of them rather than at every node start. Each node
/// still checks and loads them; a node of another build finds no usable file and compiles.
pub fn shared_compiled_plugin_cache() -> PathBuf {
    flotilla_bin()
        .parent()
        .expect("the binary lives in a directory")
        .join("test-compiled-plugins")
}

pub fn flotilla_bin() -> PathBuf {
    let binary = match std::env::var_os("FLOTILLA_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("the tests crate lives one level below the workspace root");
            let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
                Some(dir) => workspace_root.join(dir),
                None => workspace_root.join("target"),
            };
            target_dir.join("debug").join("flotilla")
        }
    };
    assert!(
        binary.is_file(),
        "the flotilla binary was not found at {}: run `cargo build --bin flotilla` first \
         (or set FLOTILLA_BIN to a built binary)",
        binary.display()
    );
    binary
}

/// Polls `condition` every 50 ms until it returns `Some`, and returns that value. Panics
/// with "timed out after {deadline:?} waiting for {what}" once `deadline` has passed. A
/// poll that hangs (for example a call to a frozen node) is cut off at the deadline too.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        let remaining = deadline.saturating_sub(started.elapsed());
        if let Ok(Some(value)) = tokio::time::timeout(remaining, condition()).await {
            return value;
        }
        if started.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(WAIT_POLL_INTERVAL.min(deadline.saturating_sub(started.elapsed()))).await;
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug)]
pub struct BearerAuth {
    authorization: MetadataValue<Ascii>,
}

impl BearerAuth {
    pub fn new(token: &str) -> Self {
        let authorization = format!("Bearer {token}")
            .parse()
            .unwrap_or_else(|error| panic!("the token is not a valid header value: {error}"));
        BearerAuth { authorization }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        Ok(request)
    }
}

pub type AgentClient = AgentServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type ClusterClient = ClusterServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

/// The cluster CA certificates this test process trusts (each cluster's `ca.pem`, added when
/// its first node wrote it), with the path of the last one, which [`run_cli`] passes on.
static TRUSTED_CAS: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

/// Makes the clients of this process trust the cluster CA at `path` (a first node's
/// `DATA_DIR/ca.pem`).
pub fn trust_cluster_ca(path: &Path) {
    let pem =
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("could not read {}: {error}", path.display()));
    let mut trusted = TRUSTED_CAS.lock().expect("trusted CA list poisoned");
    trusted.retain(|(existing, _)| existing != path);
    trusted.push((path.to_path_buf(), pem));
}

/// The CA certificate the CLI is told to trust: the last cluster's.
pub fn trusted_ca_path() -> Option<PathBuf> {
    TRUSTED_CAS
        .lock()
        .expect("trusted CA list poisoned")
        .last()
        .map(|(path, _)| path.clone())
}

/// The TLS files a node keeps in its data dir, to call the internal service as that node.
pub fn node_tls(data_dir: &Path, node_id: u64) -> flotilla_raft::tls::NodeTls {
    let read = |name: &str| {
        let path = data_dir.join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("could not read {}: {error}", path.display()))
    };
    flotilla_raft::tls::NodeTls {
        node_id,
        ca_pem: read("ca.pem"),
        certificate_pem: read("node.pem"),
        private_key_pem: read("node.key"),
    }
}

/// `https://HOST:PORT` for an endpoint given with either scheme: nodes speak TLS only.
pub fn https(endpoint: &str) -> String {
    match endpoint.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => endpoint.to_string(),
    }
}

/// A channel to `endpoint` over TLS, trusting this process's cluster CAs, that sends nothing
/// of its own (no token): for calls made as an anonymous client.
pub fn channel(endpoint: &str) -> Channel {
    lazy_channel(endpoint)
}

/// A channel that connects on first use, so that creating a client never fails: a node
/// that is down shows up as an `Unavailable` error on the call, which [`wait_for`] retries.
/// It speaks TLS and trusts the CAs of this process's clusters ([`trust_cluster_ca`]).
fn lazy_channel(endpoint: &str) -> Channel {
    let cas: Vec<tonic::transport::Certificate> = TRUSTED_CAS
        .lock()
        .expect("trusted CA list poisoned")
        .iter()
        .map(|(_, pem)| tonic::transport::Certificate::from_pem(pem))
        .collect();
    let endpoint = https(endpoint);
    Endpoint::from_shared(endpoint.clone())
        .unwrap_or_else(|error| panic!("invalid endpoint {endpoint:?}: {error}"))
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificates(cas))
        .unwrap_or_else(|error| panic!("no TLS for {endpoint:?}: {error}"))
        .connect_timeout(CLIENT_CONNECT_TIMEOUT)
        .connect_lazy()
}

/// An `AgentService` client for `endpoint` (such as `https://127.0.0.1:7420`) that sends
/// `token` with every call.
pub async fn agent_client(endpoint: &str, token: &str) -> AgentClient {
    AgentServiceClient::with_interceptor(lazy_channel(endpoint), BearerAuth::new(token))
}

/// A `ClusterService` client for `endpoint` that sends `token` with every call.
pub async fn cluster_client(endpoint: &str, token: &str) -> ClusterClient {
    ClusterServiceClient::with_interceptor(lazy_channel(endpoint), BearerAuth::new(token))
}

/// An `AdminService` client for `endpoint` that sends `token` with every call.
pub async fn admin_client(endpoint: &str, token: &str) -> AdminClient {
    AdminServiceClient::with_interceptor(lazy_channel(endpoint), BearerAuth::new(token))
}

/// `GetCluster` on `endpoint`, or `None` if the call fails for any reason (node down, not
/// ready, no leader known yet...). Meant for [`wait_for`] conditions.
pub async fn try_get_cluster(endpoint: &str, token: &str) -> Option<Cluster> {
    let mut client = cluster_client(endpoint, token).await;
    client
        .get_cluster(GetClusterRequest {})
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Whether the node at `endpoint` says it is ready to lead (the gRPC health of its server as a
/// whole); `None` if it does not answer.
pub async fn is_ready(endpoint: &str) -> Option<bool> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(lazy_channel(endpoint));
    let reply = client
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .ok()?
        .into_inner();
    Some(reply.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// Runs the `flotilla` binary as a CLI client against `endpoint` with `FLOTILLA_TOKEN` set
/// to `token`, and returns its exit status and output. The call blocks until the CLI exits,
/// which is fine from a test: the nodes it talks to are other processes.
pub fn run_cli(endpoint: &str, token: &str, args: &[&str]) -> Output {
    run_cli_trusting(endpoint, token, trusted_ca_path().as_deref(), args)
}

/// [`run_cli`] with the CLI trusting the CA certificate at `ca` (`FLOTILLA_CA_CERT`).
pub fn run_cli_trusting(endpoint: &str, token: &str, ca: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(flotilla_bin());
    if let Some(ca) = ca {
        command.env("FLOTILLA_CA_CERT", ca);
    }
    command
        .arg("--endpoint")
        .arg(https(endpoint))
        .args(args)
        .env("FLOTILLA_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("could not run the flotilla CLI with {args:?}: {error}"))
}

/// The environment variable a joining node reads its join token from.
pub const JOIN_TOKEN_ENV: &str = "FLOTILLA_JOIN_TOKEN";

/// Everything needed to start (and restart) one node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: u64,
    /// The address the node listens on: 127.0.0.1, or its address in a [`netlab::NetLab`].
    pub host: Ipv4Addr,
    /// The network namespace the node runs in (`nsenter --net`), in a lab.
    pub netns: Option<PathBuf>,
    /// The node listens for gRPC on this port and for the actor mesh on the next one.
    pub grpc_port: u16,
    pub data_dir: PathBuf,
    pub region: String,
    pub slots: u32,
    /// Endpoint of a member to join through; `None` bootstraps a new cluster.
    pub join: Option<String>,
    pub lease_ms: Option<u64>,
    pub extra_args: Vec<String>,
    /// The node's `--config` file.
    pub config_path: PathBuf,
    /// Extra environment of the node process (API keys of test model servers...).
    pub env: Vec<(String, String)>,
}

/// The scripted model test nodes declare by default: one turn that runs a long command, so an
/// agent stays RUNNING for the length of any test (and its machine keeps a busy process).
pub const HOLD_SCRIPT: &str = r#"{"turns": [{"text": "Holding the machine.", "tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 590", "timeout_ms": 600000}}]}]}"#;

/// The default node config of test clusters: the `hold` model as the default.
pub fn hold_config(dir: &Path) -> String {
    let script = dir.join("hold.json");
    std::fs::write(&script, HOLD_SCRIPT).expect("could not write the hold script");
    format!(
        "[models.hold]\nprovider = \"scripted\"\nscript = {:?}\n\n[agents]\ndefault_model = \"hold\"\n",
        script.display().to_string()
    )
}

/// A node config that allows local repositories under the system's temporary directory, where
/// tests make their `file://` origins, unless it has a `[repos]` table of its own (a test of the
/// policy writes its own).
pub fn with_local_repositories_allowed(config: String) -> String {
    if config.contains("[repos]") {
        return config;
    }
    let temporary = std::env::temp_dir();
    let temporary = temporary.canonicalize().unwrap_or(temporary);
    format!(
        "{config}\n[repos]\nallow_local = [{:?}]\n",
        temporary.display().to_string()
    )
}

impl NodeSpec {
    fn command_args(&self) -> Vec<String> {
        let mut args = vec![
            "node".to_string(),
            "--id".to_string(),
            self.id.to_string(),
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
            "--listen".to_string(),
            format!("{}:{}", self.host, self.grpc_port),
            "--region".to_string(),
            self.region.clone(),
            "--slots".to_string(),
            self.slots.to_string(),
        ];
        if let Some(join_endpoint) = &self.join {
            args.push("--join".to_string());
            args.push(join_endpoint.clone());
        }
        if let Some(lease_ms) = self.lease_ms {
            args.push("--lease-ms".to_string());
            args.push(lease_ms.to_string());
        }
        args.push("--config".to_string());
        args.push(self.config_path.display().to_string());
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// `DATA_DIR/../node-N.log`: next to the data directory, so that wiping the data
    /// directory (a disk-loss test) keeps the log of the node's earlier lives.
    fn log_path(&self) -> PathBuf {
        let parent = self.data_dir.parent().unwrap_or_else(|| Path::new("."));
        parent.join(format!("node-{}.log", self.id))
    }
}

/// One `flotilla node` process. Dropping it kills the process.
pub struct NodeProcess {
    pub id: u64,
    pub host: Ipv4Addr,
    pub grpc_port: u16,
    pub data_dir: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
    spec: NodeSpec,
}

impl NodeProcess {
    /// Starts a node as described by `spec`; does not wait for it to be ready.
    pub fn spawn(spec: NodeSpec) -> NodeProcess {
        let mut node = NodeProcess {
            id: spec.id,
            host: spec.host,
            grpc_port: spec.grpc_port,
            data_dir: spec.data_dir.clone(),
            child: None,
            log_path: spec.log_path(),
            spec,
        };
        node.start_child();
        node
    }

    fn start_child(&mut self) {
        let log_file = open_log_for_append(&self.log_path);
        let stderr_file = log_file
            .try_clone()
            .unwrap_or_else(|error| panic!("could not reopen {}: {error}", self.log_path.display()));
        // `nsenter --net` enters the network namespace only and then execs the node, so the
        // child is the node itself (signals reach it) and /sys and the cgroup tree stay the host's.
        let mut command = match &self.spec.netns {
            Some(namespace) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net={}", namespace.display()))
                    .arg("--")
                    .arg(flotilla_bin());
                command
            }
            None => Command::new(flotilla_bin()),
        };
        let child = command
            .args(self.spec.command_args())
            .env("FLOTILLA_COMPILED_PLUGIN_CACHE", shared_compiled_plugin_cache())
            .env(
                "RUST_LOG",
                std::env::var(TEST_LOG_ENV).unwrap_or_else(|_| "info".to_string()),
            )
            .envs(self.spec.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr_file)
            .spawn()
            .unwrap_or_else(|error| panic!("could not start node {}: {error}", self.id));
        self.child = Some(child);
    }

    /// `https://HOST:P`, the node's gRPC endpoint.
    pub fn endpoint(&self) -> String {
        format!("https://{}:{}", self.host, self.grpc_port)
    }

    /// The port of the node's actor mesh.
    pub fn mesh_port(&self) -> u16 {
        self.grpc_port + 1
    }

    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// Sets (or replaces) a variable of the node's environment for its next start.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.spec.env.retain(|(existing, _)| existing != name);
        self.spec.env.push((name.to_string(), value.to_string()));
    }

    /// Removes a variable from the node's environment for its next start.
    pub fn remove_env(&mut self, name: &str) {
        self.spec.env.retain(|(existing, _)| existing != name);
    }

    /// The node's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process is alive (a frozen process counts as alive).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process with SIGKILL, as a power loss would, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if the process already exited, which is what we want anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the process to shut down with SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.send_signal_to(&child, libc::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (a clean stop) and returns at once; [`NodeProcess::wait_exit`] waits.
    pub fn begin_terminate(&mut self) {
        if let Some(child) = &self.child {
            self.send_signal_to(child, libc::SIGTERM);
        }
    }

    /// Waits (blocking, up to `deadline`) for the process to exit, and reaps it. Panics with
    /// the log tail if it is still running at the deadline.
    pub fn wait_exit(&mut self, deadline: Duration) {
        let started = Instant::now();
        while self.is_running() {
            if started.elapsed() >= deadline {
                panic!(
                    "node {} did not exit within {deadline:?}; last lines of {}:\n{}",
                    self.id,
                    self.log_path.display(),
                    self.log_tail(LOG_LINES_ON_FAILURE)
                );
            }
            std::thread::sleep(WAIT_POLL_INTERVAL);
        }
        self.child = None;
    }

    /// Stops the process with SIGSTOP: it holds its ports and files but answers nothing,
    /// like a node stuck in a long pause or cut off by a partition.
    pub fn freeze(&mut self) {
        if let Some(child) = &self.child {
            self.send_signal_to(child, libc::SIGSTOP);
        }
    }

    /// Resumes a process stopped by [`NodeProcess::freeze`].
    pub fn thaw(&mut self) {
        if let Some(child) = &self.child {
            self.send_signal_to(child, libc::SIGCONT);
        }
    }

    // Unsafe: kill(2) with SIGSTOP/SIGCONT; std can only send SIGKILL.
    #[allow(unsafe_code)]
    fn send_signal_to(&self, child: &Child, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(child.id()).expect("process ids fit in pid_t");
        // SAFETY: `kill` has no memory-safety preconditions; the pid is our own unreaped
        // child, so it cannot have been reused by another process.
        let result = unsafe { libc::kill(pid, signal) };
        if result != 0 {
            let error = std::io::Error::last_os_error();
            panic!("could not send signal {signal} to node {}: {error}", self.id);
        }
    }

    /// Starts the node again with the same arguments and data directory, killing the
    /// current process first if it is still alive. Does not wait for it to be ready.
    pub fn restart(&mut self) {
        self.kill9();
        self.start_child();
    }

    /// The last `line_count` lines of the node's log (all its lives), for failure messages.
    pub fn log_tail(&self, line_count: usize) -> String {
        match std::fs::read_to_string(&self.log_path) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let first_kept = lines.len().saturating_sub(line_count);
                lines[first_kept..].join("\n")
            }
            Err(error) => format!("(could not read {}: {error})", self.log_path.display()),
        }
    }

    /// Panics with the log tail if the process has exited: a node that dies while a test
    /// waits for it should fail the test at once, with the reason, not at the deadline.
    pub fn assert_running(&mut self, while_doing: &str) {
        if !self.is_running() {
            panic!(
                "node {} is not running while {while_doing}; last lines of {}:\n{}",
                self.id,
                self.log_path.display(),
                self.log_tail(LOG_LINES_ON_FAILURE)
            );
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // At teardown the node's own children go too (a `git` fetch or checkout it started
        // would otherwise go on writing into the directory being removed). A test's `kill9`
        // leaves them to the node's own handling, which some tests check.
        let descendants = self
            .child
            .as_ref()
            .map(|child| descendants_of(child.id()))
            .unwrap_or_default();
        self.kill9();
        for pid in descendants {
            kill_quietly(pid);
        }
    }
}

/// Every process descended from `pid` (children first), from `/proc/PID/task/*/children`.
fn descendants_of(pid: u32) -> Vec<libc::pid_t> {
    let mut found = Vec::new();
    let mut next = libc::pid_t::try_from(pid).into_iter().collect::<Vec<_>>();
    while let Some(parent) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|pid| pid.parse::<libc::pid_t>().ok())
            {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// SIGKILL to `pid`, which need not be this process's child and may have exited already (that
/// answer, ESRCH, is ignored).
// Unsafe: kill(2) on pids that are not our children; std can signal only its own.
#[allow(unsafe_code)]
pub(crate) fn kill_quietly(pid: libc::pid_t) {
    // SAFETY: `kill` has no memory-safety preconditions.
    let _ = unsafe { libc::kill(pid, libc::SIGKILL) };
}

fn open_log_for_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|error| panic!("could not open the node log {}: {error}", path.display()))
}

/// How [`TestCluster::start`] configures its nodes.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Region of node i (0-based) is `regions[i]`; nodes past the end of the list, and all
    /// nodes when it is empty (the default), are in region "local".
    pub regions: Vec<String>,
    /// Agent slots per node.
    pub slots: u32,
    /// Appended to every node's command line.
    pub extra_args: Vec<String>,
    /// Passed as `--lease-ms`; the node's default when `None`.
    pub lease_ms: Option<u64>,
    /// The node config (TOML) every node gets; [`hold_config`] when `None`.
    pub config: Option<String>,
    /// Extra environment of every node process.
    pub env: Vec<(String, String)>,
    /// Runs every node in a network namespace of its own ([`netlab::NetLab`]), so that a test
    /// can cut and slow the links between them; the nodes' regions are `regions`.
    pub network_lab: bool,
    /// Where the cluster's directory is made; the system's temporary directory when `None`.
    pub parent_dir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            regions: Vec::new(),
            slots: 8,
            extra_args: Vec::new(),
            lease_ms: None,
            config: None,
            env: Vec::new(),
            network_lab: false,
            parent_dir: None,
        }
    }
}

impl ClusterOptions {
    fn region_of(&self, node_index: usize) -> String {
        self.regions
            .get(node_index)
            .cloned()
            .unwrap_or_else(|| "local".to_string())
    }
}

/// A cluster of real nodes in one temporary directory: `node<N>/` data directories and
/// `node-<N>.log` logs. Node ids are 1..=n and `nodes[i]` has id `i + 1`.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProcess>,
    /// The nodes' network namespaces, with [`ClusterOptions::network_lab`]. Declared after
    /// `nodes`, and the drop kills the nodes first, so the lab goes last.
    pub lab: Option<netlab::NetLab>,
    options: ClusterOptions,
}

impl TestCluster {
    /// Starts node 1, which bootstraps the cluster, waits for it to lead, then starts nodes
    /// 2..=n joining through node 1 and waits until node 1 reports all n members up.
    pub async fn start(node_count: usize, options: ClusterOptions) -> TestCluster {
        assert!(node_count >= 1, "a cluster needs at least one node");
        let builder = tempfile::Builder::new().prefix("flotilla-it-").clone();
        let dir = match &options.parent_dir {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .expect("could not create the cluster's temporary directory");
        let lab = if options.network_lab {
            let regions: Vec<String> = (0..node_count).map(|index| options.region_of(index)).collect();
            match netlab::NetLab::create(&regions).await {
                Ok(lab) => Some(lab),
                Err(error) => panic!(
                    "this test runs its nodes in network namespaces of their own and needs root, \
                     `ip`, `nft` (the nftables package) and `nsenter`: {error}"
                ),
            }
        } else {
            None
        };
        let mut cluster = TestCluster {
            dir,
            nodes: Vec::with_capacity(node_count),
            lab,
            options,
        };

        cluster.spawn_node(None);
        cluster.wait_for_bootstrap().await;

        let join_endpoint = cluster.nodes[0].endpoint();
        for _ in 1..node_count {
            cluster.spawn_node(Some(join_endpoint.clone()));
        }
        if node_count > 1 {
            cluster.wait_for_members_up(node_count).await;
        }
        cluster
    }

    /// Starts one more node (the next id) joining through node 1, with the cluster's
    /// options; does not wait for it to join. Returns its index in `nodes`.
    pub fn spawn_joining_node(&mut self) -> usize {
        let join_endpoint = self.nodes[0].endpoint();
        self.spawn_node(Some(join_endpoint));
        self.nodes.len() - 1
    }

    fn spawn_node(&mut self, join: Option<String>) {
        let node_index = self.nodes.len();
        let id = node_index as u64 + 1;
        let config_path = self.dir.path().join(format!("node{id}.toml"));
        let config = match &self.options.config {
            Some(config) => config.clone(),
            None => hold_config(self.dir.path()),
        };
        let config = with_local_repositories_allowed(config);
        std::fs::write(&config_path, config).expect("could not write a node config");
        let (host, netns, grpc_port) = match &self.lab {
            Some(lab) => {
                let place = lab.node(id);
                (place.address, Some(place.namespace_path()), netlab::NODE_GRPC_PORT)
            }
            None => (Ipv4Addr::LOCALHOST, None, free_port()),
        };
        let mut env = self.options.env.clone();
        if join.is_some() {
            env.push((JOIN_TOKEN_ENV.to_string(), self.mint_join_token()));
        }
        let spec = NodeSpec {
            id,
            host,
            netns,
            grpc_port,
            data_dir: self.dir.path().join(format!("node{id}")),
            region: self.options.region_of(node_index),
            slots: self.options.slots,
            join,
            lease_ms: self.options.lease_ms,
            extra_args: self.options.extra_args.clone(),
            config_path,
            env,
        };
        self.nodes.push(NodeProcess::spawn(spec));
    }

    async fn wait_for_bootstrap(&mut self) {
        let token_path = self.admin_token_path();
        let bootstrap_node = &mut self.nodes[0];
        let what = format!("node 1 to write {}", token_path.display());
        wait_for(&what, NODE_STARTUP_DEADLINE, || {
            bootstrap_node.assert_running("waiting for its admin token");
            let token_written = std::fs::read_to_string(&token_path)
                .map(|token| !token.trim().is_empty())
                .unwrap_or(false);
            async move { token_written.then_some(()) }
        })
        .await;
        trust_cluster_ca(&self.ca_path());

        let token = self.admin_token();
        let endpoint = self.nodes[0].endpoint();
        let bootstrap_node = &mut self.nodes[0];
        wait_for("node 1 to report a leader", NODE_STARTUP_DEADLINE, || {
            bootstrap_node.assert_running("waiting for a leader");
            let (endpoint, token) = (endpoint.clone(), token.clone());
            async move {
                let cluster = try_get_cluster(&endpoint, &token).await?;
                (cluster.leader_id != 0).then_some(())
            }
        })
        .await;
    }

    /// Waits until node 1 lists `member_count` members, all up.
    pub async fn wait_for_members_up(&mut self, member_count: usize) -> Cluster {
        let token = self.admin_token();
        let endpoint = self.nodes[0].endpoint();
        let nodes = &mut self.nodes;
        let what = format!("node 1 to list {member_count} members, all up");
        wait_for(&what, NODE_STARTUP_DEADLINE, || {
            for node in nodes.iter_mut() {
                node.assert_running("waiting for the cluster to form");
            }
            let (endpoint, token) = (endpoint.clone(), token.clone());
            async move {
                let cluster = try_get_cluster(&endpoint, &token).await?;
                let all_up = cluster.members.len() == member_count && cluster.members.iter().all(|member| member.up);
                all_up.then_some(cluster)
            }
        })
        .await
    }

    /// The cluster CA that node 1 created: what the clients of this process trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("node1").join("ca.pem")
    }

    /// A single-use join token, minted through node 1 with the CLI (`flotilla cluster
    /// join-token`).
    pub fn mint_join_token(&self) -> String {
        let output = self.run_cli(1, &["cluster", "join-token", "--expires", "10m"]);
        assert!(
            output.status.success(),
            "minting a join token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or_else(|| panic!("`cluster join-token` printed nothing"))
            .trim()
            .to_string()
    }

    fn admin_token_path(&self) -> PathBuf {
        self.dir.path().join("node1").join("admin.token")
    }

    /// The admin token that node 1 wrote when it bootstrapped the cluster.
    pub fn admin_token(&self) -> String {
        let path = self.admin_token_path();
        std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("could not read {}: {error}", path.display()))
            .trim()
            .to_string()
    }

    /// The node with this id (ids start at 1).
    pub fn node(&self, id: u64) -> &NodeProcess {
        self.nodes
            .iter()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("the cluster has no node {id}"))
    }

    pub fn node_mut(&mut self, id: u64) -> &mut NodeProcess {
        self.nodes
            .iter_mut()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("the cluster has no node {id}"))
    }

    /// An admin `AgentService` client on the node with this id.
    pub async fn agent_client(&self, id: u64) -> AgentClient {
        agent_client(&self.node(id).endpoint(), &self.admin_token()).await
    }

    /// An admin `ClusterService` client on the node with this id.
    pub async fn cluster_client(&self, id: u64) -> ClusterClient {
        cluster_client(&self.node(id).endpoint(), &self.admin_token()).await
    }

    /// Runs the CLI against the node with this id with the admin token.
    pub fn run_cli(&self, id: u64, args: &[&str]) -> Output {
        run_cli_trusting(
            &self.node(id).endpoint(),
            &self.admin_token(),
            Some(&self.ca_path()),
            args,
        )
    }

    /// Every node's log tail, for failure messages.
    pub fn log_tails(&self, line_count: usize) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "----- node {} ({}) -----\n{}",
                    node.id,
                    node.log_path.display(),
                    node.log_tail(line_count)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let keep = std::env::var(KEEP_TEST_DIRS_ENV).ok();
        if std::thread::panicking() {
            eprintln!(
                "test failed; last {LOG_LINES_ON_FAILURE} log lines of each node:\n{}",
                self.log_tails(LOG_LINES_ON_FAILURE)
            );
        }
        if keep.as_deref() == Some("always") || (keep.is_some() && std::thread::panicking()) {
            self.dir.disable_cleanup(true);
            eprintln!("kept the cluster directory {}", self.dir.path().display());
        }
        // Kill the nodes before the directory they write to is removed.
        self.nodes.clear();
    }
}
