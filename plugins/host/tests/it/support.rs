//! Shared by the tests: the guest components, a host with test limits, secrets, and a loopback
//! forge that records what it receives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use flotilla_plugins::{HostConfig, PluginHost, SecretSource};
use tokio::sync::{watch, Notify};

/// How long a test waits for something that should happen at once before it fails.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(30);

pub const FORGE_TOKEN: &str = "s3cret-forge-token";

/// Variables that would change the nested guest build if they leaked from the outer one.
const LEAKING_ENVIRONMENT: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PROFILE_RELEASE_DEBUG",
    "CARGO_PROFILE_RELEASE_OPT_LEVEL",
    "CARGO_PROFILE_RELEASE_PANIC",
];

/// Builds the guests of `plugins/testdata` once per test process and returns their directory.
fn guests_directory() -> &'static Path {
    static DIRECTORY: OnceLock<PathBuf> = OnceLock::new();
    DIRECTORY.get_or_init(|| {
        let host_crate = Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = host_crate.join("../testdata/Cargo.toml");
        // A target directory of their own: building the guests never waits on (or invalidates)
        // the main build.
        let target_directory = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(directory) => PathBuf::from(directory).join("plugin-testdata"),
            None => host_crate.join("../../target/plugin-testdata"),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", &target_directory);
        // Settings meant for the host build must not reach (and rebuild) the guests.
        for variable in LEAKING_ENVIRONMENT {
            command.env_remove(variable);
        }
        let output = command.output().expect("run cargo to build the test guests");
        assert!(
            output.status.success(),
            "building the test guests ({}) failed; the wasm32-wasip2 target must be installed \
             (rustup target add wasm32-wasip2):\n{}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        target_directory.join("wasm32-wasip2/release")
    })
}

/// The component of guest crate `name` (e.g. "well-behaved").
pub fn guest(name: &str) -> Vec<u8> {
    let path = guests_directory().join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|error| panic!("read guest {}: {error}", path.display()))
}

/// Secrets for plugin "forge" only, so that scoping by plugin name shows.
pub struct ForgeSecrets;

impl SecretSource for ForgeSecrets {
    fn secret(&self, plugin: &str, name: &str) -> Option<String> {
        (plugin == "forge" && name == "token").then(|| FORGE_TOKEN.to_string())
    }
}

/// Limits small enough that misbehaving guests fail fast.
pub fn test_config(pooling: bool) -> HostConfig {
    HostConfig {
        fuel_per_call: 200_000_000,
        memory_limit_bytes: 32 << 20,
        call_timeout: Duration::from_secs(20),
        max_output_bytes: 1 << 20,
        max_http_response_bytes: 1 << 20,
        http_timeout: Duration::from_secs(10),
        max_log_line_bytes: 1024,
        pooling,
        max_instances: 8,
        max_component_bytes: 16 << 20,
        max_cached_components: 16,
        compiled_cache_dir: None,
        max_compiled_files: 8,
    }
}

pub fn host_with(config: HostConfig) -> PluginHost {
    PluginHost::new(config, Arc::new(ForgeSecrets)).expect("plugin host starts")
}

pub fn host(pooling: bool) -> PluginHost {
    host_with(test_config(pooling))
}

/// What the loopback forge saw of one pull-request request.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    pub path: String,
    pub authorization: Option<String>,
    pub body: String,
}

#[derive(Clone)]
struct ForgeState {
    received: Arc<Mutex<Vec<ReceivedRequest>>>,
    request_arrived: Arc<Notify>,
    /// Requests are answered only while this is true.
    open: watch::Receiver<bool>,
    address: SocketAddr,
}

/// A forge on 127.0.0.1 that opens pull requests: `POST /api/repos/{owner}/{name}/pulls`
/// answers `NUMBER URL`.
pub struct LoopbackForge {
    pub address: SocketAddr,
    received: Arc<Mutex<Vec<ReceivedRequest>>>,
    request_arrived: Arc<Notify>,
    gate: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

async fn open_pull_request(
    State(forge): State<ForgeState>,
    UrlPath((owner, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let received = ReceivedRequest {
        path: format!("/api/repos/{owner}/{name}/pulls"),
        authorization: headers
            .get("authorization")
            .map(|value| value.to_str().unwrap_or("<binary>").to_string()),
        body,
    };
    forge.received.lock().unwrap().push(received);
    forge.request_arrived.notify_one();
    let mut open = forge.open.clone();
    if open.wait_for(|open| *open).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "forge shutting down".to_string());
    }
    (
        StatusCode::CREATED,
        format!("7 http://{}/{owner}/{name}/pull/7", forge.address),
    )
}

impl LoopbackForge {
    /// A forge answering at once (`open`) or holding every request until [`Self::open`].
    pub async fn start(open: bool) -> LoopbackForge {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let address = listener.local_addr().expect("local address");
        let (gate, open_receiver) = watch::channel(open);
        let received = Arc::new(Mutex::new(Vec::new()));
        let request_arrived = Arc::new(Notify::new());
        let state = ForgeState {
            received: received.clone(),
            request_arrived: request_arrived.clone(),
            open: open_receiver,
            address,
        };
        let router = Router::new()
            .route("/api/repos/{owner}/{name}/pulls", post(open_pull_request))
            .with_state(state);
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("loopback forge serves");
        });
        LoopbackForge {
            address,
            received,
            request_arrived,
            gate,
            server,
        }
    }

    /// `127.0.0.1:PORT`, as a grant.
    pub fn grant(&self) -> String {
        self.address.to_string()
    }

    pub fn repository_url(&self) -> String {
        format!("http://{}/octo/widgets", self.address)
    }

    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until the forge has received `count` requests.
    pub async fn wait_for_requests(&self, count: usize) {
        let waited = tokio::time::timeout(WAIT_DEADLINE, async {
            loop {
                let notified = self.request_arrived.notified();
                if self.received.lock().unwrap().len() >= count {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the forge did not receive {count} request(s) within {WAIT_DEADLINE:?}"
        );
    }

    /// Lets held requests (and later ones) through.
    pub fn open(&self) {
        self.gate.send_replace(true);
    }
}

impl Drop for LoopbackForge {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Both allocators: tests that should hold for either run once per setting.
pub const POOLING_SETTINGS: [bool; 2] = [false, true];
