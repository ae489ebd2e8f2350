//! `flotilla node`: opens the replicated state, serves the public and internal gRPC services,
//! joins or bootstraps the cluster, links the actor mesh and starts the node's actor tree.

pub mod access;
pub mod admin;
pub mod agent_list;
pub mod agents;
pub mod audit;
pub mod audit_api;
pub mod auth;
pub mod authz;
pub mod aws;
pub mod backup;
pub mod cluster;
mod coalesce;
pub mod convert;
pub mod default_branch;
pub mod enroll;
mod identity;
pub mod internal;
pub mod known_secrets;
pub mod live_hub;
pub mod pki;
pub mod plugins;
pub mod restore;
pub mod retention;
pub mod runtime;
pub mod secrets;
pub mod settings;
pub mod state_format;
pub mod status;
pub mod transport;
pub mod validate;
pub mod vcs;
pub mod visibility;
pub mod watch_hub;

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use flotilla_actors::liveness::LivenessTable;
use flotilla_actors::mesh::{Mesh, MeshConfig};
use flotilla_actors::retry::RetryPolicy;
use flotilla_actors::supervisor::{NodeSupervisor, NodeSupervisorArgs};
use flotilla_proto::internal::enrollment_server::EnrollmentServer;
use flotilla_proto::internal::internal_client::InternalClient;
use flotilla_proto::internal::internal_server::InternalServer;
use flotilla_proto::internal::{JoinRequest, JoinResponse};
use flotilla_proto::v1::admin_service_server::AdminServiceServer;
use flotilla_proto::v1::agent_service_server::AgentServiceServer;
use flotilla_proto::v1::cluster_service_server::ClusterServiceServer;
use flotilla_proto::v1::secret_service_server::SecretServiceServer;
use flotilla_raft::network::Peers;
use flotilla_raft::{Command, NodeAddr, NodeId, NodeInfo, Replica, ReplicaConfig, Role};
use ractor::Actor;

use crate::config::NodeConfig;
pub use status::write_status;

/// Voters the cluster grows to on its own; further nodes join as learners.
pub const MAX_VOTERS: usize = 3;
/// Largest gRPC message a node accepts (snapshots travel in chunks below this).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Most streams one client connection may have open at once (HTTP/2 SETTINGS). Unbounded
/// otherwise; a watch is a stream, and clients that watch thousands of agents share a few
/// connections, so the bound is high (10,000 watchers fit in three connections). A client past
/// it waits for a stream to close; the per-key watch cap still applies.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;
/// Largest HTTP/2 frame a peer may send this node (SETTINGS_MAX_FRAME_SIZE; the protocol's
/// default is 16 KiB). A message is sent as frames of at most this size, and the sender's
/// connection writes each frame as it comes: at the default, a leader's append of a few dozen
/// writes left as two or three socket writes, each a wake-up of the follower, where one does.
/// The flow-control windows bound what a peer may send either way.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;
/// Live events buffered per watcher before they are dropped.
pub const LIVE_EVENTS_PER_WATCHER: usize = 1024;
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
/// How long a stopping node waits for its gRPC server to finish the calls still open (a
/// follower's append streams end when the stop begins, so they do not hold it).
pub const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping node waits for its actors (and so its machines) to stop before it
/// sweeps whatever machines are left.
const SHUTDOWN_ACTORS_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping node tries to hand its agents back (`NodeStopping`). Past it (no leader,
/// no quorum) the node stops anyway and its agents move once its lease runs out, as after a
/// crash.
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between `Join` calls; `JOIN_DEADLINE` bounds the whole.
const JOIN_RETRY: RetryPolicy = RetryPolicy {
    first_delay_ms: 100,
    max_delay_ms: 2_000,
    max_retries: None,
};
/// Waits between attempts at registering this node. Unbounded in number: a node that cannot
/// write its record keeps trying while it runs (each attempt waits for Raft's own timeout).
const REGISTER_RETRY: RetryPolicy = RetryPolicy {
    first_delay_ms: 200,
    max_delay_ms: 5_000,
    max_retries: None,
};

/// Holds an exclusive lock on the data dir for the life of the process.
struct DataDirLock {
    _file: File,
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<DataDirLock> {
    let path = dir.join("flotilla.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let locked = flotilla_sandbox::file_lock::try_lock_exclusive(&file)
        .with_context(|| format!("cannot lock {}", path.display()))?;
    if !locked {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "data dir {} is in use by another flotilla process (pid {})",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(DataDirLock { _file: file })
}

fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
}

async fn join_client(peers: &Peers, join: &str) -> anyhow::Result<InternalClient<tonic::transport::Channel>> {
    peers
        .client(join)
        .map_err(|error| anyhow!("invalid join address {join}: {error}"))
}

/// Calls `Join` until it answers or the deadline passes; a refusal fails at once.
async fn call_join(peers: &Peers, join: &str, request: JoinRequest) -> anyhow::Result<JoinResponse> {
    let deadline = tokio::time::Instant::now() + JOIN_DEADLINE;
    let mut delays = JOIN_RETRY.delays();
    loop {
        let mut client = join_client(peers, join).await?;
        let mut grpc_request = peers.request(request.clone());
        grpc_request.set_timeout(JOIN_DEADLINE);
        match client.join(grpc_request).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                bail!("{join} refused to let this node join: {}", status.message())
            }
            Err(status)
                if status.code() == tonic::Code::InvalidArgument || state_format::is_format_refusal(&status) =>
            {
                bail!("{join} refused the join request: {}", status.message())
            }
            Err(status) => {
                let backoff = delays.next().unwrap_or(Duration::from_millis(JOIN_RETRY.max_delay_ms));
                if tokio::time::Instant::now() + backoff > deadline {
                    bail!("could not join through {join} within {JOIN_DEADLINE:?}: {status}");
                }
                tracing::info!(%status, "join not answered yet; retrying");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// The node id this data dir keeps, checked against `--id`.
fn stored_id(config: &NodeConfig) -> anyhow::Result<Option<NodeId>> {
    let path = config.data_dir.join("node.id");
    let Some(stored) = read_trimmed(&path) else {
        return Ok(None);
    };
    let stored: NodeId = stored
        .parse()
        .with_context(|| format!("{} does not hold a node id", path.display()))?;
    if let Some(flag) = config.id {
        if flag != stored {
            bail!(
                "--id {flag} conflicts with node id {stored} stored in {}",
                path.display()
            );
        }
    }
    Ok(Some(stored))
}

/// The operator's certificate for clients of the public listener, if one was given.
fn public_certificate(config: &NodeConfig) -> anyhow::Result<Option<std::sync::Arc<rustls::sign::CertifiedKey>>> {
    let Some((cert_path, key_path)) = &config.public_tls else {
        return Ok(None);
    };
    let read = |path: &Path| std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()));
    let chain =
        flotilla_raft::tls::parse_certificates(&format!("--tls-cert {}", cert_path.display()), &read(cert_path)?)?;
    let key = flotilla_raft::tls::parse_private_key(&format!("--tls-key {}", key_path.display()), &read(key_path)?)?;
    Ok(Some(flotilla_raft::tls::certified_key(chain, &key).with_context(
        || {
            format!(
                "--tls-cert {} and --tls-key {} do not make a usable pair",
                cert_path.display(),
                key_path.display()
            )
        },
    )?))
}

fn node_info(config: &NodeConfig) -> NodeInfo {
    NodeInfo {
        grpc_address: config.advertise.to_string(),
        mesh_address: format!("{}:{}", config.advertise.ip(), config.mesh_port),
        region: config.region.clone(),
        labels: config.labels.clone(),
        slots: config.slots,
    }
}

async fn ensure_admin_token(replica: &Replica, data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join("admin.token");
    if path.exists() {
        return Ok(());
    }
    let token = auth::new_token();
    replica
        .write(Command::CreateToken {
            sha256_hex: auth::token_digest(&token),
            name: "admin".to_string(),
            role: Role::ClusterAdmin,
            team: flotilla_raft::DEFAULT_TEAM.to_string(),
        })
        .await
        .context("cannot record the admin token")?;
    write_private_file(&path, &format!("{token}\n"))?;
    tracing::info!(path = %path.display(), "wrote the admin token");
    Ok(())
}

/// Makes sure the replicated record of this node says what the node now declares.
async fn register_self(replica: &Replica, info: NodeInfo) {
    let me = replica.node_id();
    let mut delays = REGISTER_RETRY.delays();
    loop {
        // A node that stopped cleanly registers again even when nothing it declares changed:
        // that takes its stopping mark off, so it gets agents again.
        let current = replica.reader().read(|state| {
            state
                .nodes
                .get(&me)
                .filter(|node| !node.stopping)
                .map(|node| node.info.clone())
        });
        if current.as_ref() == Some(&info) {
            return;
        }
        match replica
            .write(Command::RegisterNode {
                node: me,
                info: info.clone(),
            })
            .await
        {
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, "registering this node failed; retrying");
                let backoff = delays
                    .next()
                    .unwrap_or(Duration::from_millis(REGISTER_RETRY.max_delay_ms));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// The node's plugin host: it checks uploads and runs the enabled plugins (see `plugins`).
fn plugin_host(
    config: &NodeConfig,
    secrets: std::sync::Arc<secrets::NodeSecretStore>,
) -> anyhow::Result<flotilla_plugins::PluginHost> {
    flotilla_plugins::PluginHost::new(
        flotilla_plugins::HostConfig {
            compiled_cache_dir: Some(config.compiled_plugin_cache()),
            ..flotilla_plugins::HostConfig::default()
        },
        secrets,
    )
    .map_err(|error| anyhow!("cannot start the plugin host: {error}"))
}

pub async fn run_node(mut config: NodeConfig) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Checked whole before the data dir is created: a refused backup writes nothing.
    let restore = restore::prepare(&config).await?;
    if let Some(restore) = &restore {
        config.id = Some(restore.node_id);
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let _lock = lock_data_dir(&config.data_dir)?;
    if let Some(restore) = restore {
        restore::write(restore, &config.data_dir).await?;
    }
    let identity = identity::node_identity(&config).await?;
    let node_id = identity.node_id;
    let peers = Peers::new(Some(&identity.tls));
    let ca_fingerprint = identity.tls.ca_fingerprint()?;
    let kek = secrets::NodeKek::open(&config.data_dir, config.join.is_none()).await?;
    // Before anything records: figures recorded with no recorder installed are lost.
    let metrics_recorder = match config.metrics_listen {
        Some(_) => Some(crate::observability::metrics::install()?),
        None => None,
    };
    let info = node_info(&config);
    tracing::info!(node = node_id, grpc = %info.grpc_address, mesh = %info.mesh_address, region = %info.region, "starting node");
    let model_names: Vec<&String> = config.models.keys().collect();
    tracing::info!(models = ?model_names, "models declared in the config");
    let default_model = runtime::default_model(&config);

    let mut replica_config = ReplicaConfig::new(node_id, config.data_dir.clone(), Some(identity.tls.clone()));
    replica_config.state_format_version = state_format::state_format_version()?;
    replica_config.set_timing(config.raft.heartbeat_ms, config.raft.election_timeout_ms);
    replica_config.snapshot_after_logs = config.snapshot_after_logs;
    replica_config.logs_kept_after_snapshot = config.logs_kept_after_snapshot;
    let replica = Replica::open(replica_config).await?;
    let metrics_server = match (config.metrics_listen, metrics_recorder) {
        (Some(address), Some(recorder)) => {
            Some(crate::observability::metrics::serve(address, recorder, replica.clone()).await?)
        }
        _ => None,
    };
    let secret_store = std::sync::Arc::new(secrets::NodeSecretStore::new(
        replica.clone(),
        kek.clone(),
        config.data_dir.clone(),
        aws::SessionSettings {
            sts_endpoint: config.aws.sts_endpoint.as_ref().map(|endpoint| endpoint.0.clone()),
            session_seconds: config
                .aws
                .session_seconds
                .map_or(aws::SESSION_SECONDS, |seconds| seconds.0),
            renew_after: config.aws.renew_after_seconds.map(std::time::Duration::from_secs),
        },
    ));
    // The node's log redacts every secret value it can open, from now on.
    known_secrets::follow(secret_store.clone());
    // After the replica opened: a cluster-scope secret this node has applied comes first.
    let mut runtime = runtime::build_runtime(&config, &|name| secret_store.node_secret(name))?;
    runtime.secrets = Some(secret_store.clone());
    let plugin_host = std::sync::Arc::new(plugin_host(&config, secret_store)?);
    let registry = plugins::PluginRegistry::start(plugin_host.clone(), &replica, config.plugins.chosen_builtins());
    let node_plugins = std::sync::Arc::new(vcs::NodePlugins::new(registry.clone()));
    runtime.providers = Some(node_plugins.clone());
    runtime.plugin_tools = Some(node_plugins.clone());
    let runtime = std::sync::Arc::new(runtime);
    let liveness = LivenessTable::default();
    let mesh = Mesh::start(MeshConfig {
        node_id,
        listen_port: config.mesh_port,
        listen_ip: config.listen.ip(),
        // The mesh's handshake wants a cookie; mutual TLS is what authenticates a link.
        cluster_secret: ca_fingerprint.clone(),
        tls: Some(flotilla_actors::mesh::MeshTls {
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
                identity
                    .tls
                    .mutual_server_config(transport::refuse_removed_nodes(&replica))?,
            )),
            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(identity.tls.client_config()?)),
        }),
        max_live_events_per_watcher: LIVE_EVENTS_PER_WATCHER,
    })
    .await
    .map_err(|error| anyhow!("cannot start the actor mesh on port {}: {error}", config.mesh_port))?;

    let machines = open_machines(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let health = tonic_health::server::HealthReporter::new();
    // The server as a whole ("") reports NOT_SERVING until the node is ready to lead, and
    // again once it stops: what a readiness probe asks.
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let (shutdown_sender, shutdown_receiver) = tokio::sync::oneshot::channel::<()>();
    let agent_api = agents::AgentApi {
        replica: replica.clone(),
        models: std::sync::Arc::new(agents::ModelCatalog {
            scripted: runtime
                .models
                .iter()
                .map(|(name, provider)| (name.clone(), provider.scripted()))
                .collect(),
            default_model,
        }),
        plugins: Some(node_plugins),
        repositories: runtime.git.repositories.clone(),
        watches: authz::WatchQuota::default(),
        watch_hub: watch_hub::WatchHub::start(replica.reader().clone()),
        live_hub: live_hub::LiveHub::new(mesh.clone()),
        node_tls: identity.tls.tonic_client_config(),
        git: runtime.git.clone(),
        default_branches: default_branch::DefaultBranches::default(),
    };
    let admin_api = admin::AdminApi {
        replica: replica.clone(),
        validator: Some(std::sync::Arc::new(admin::HostValidator { host: plugin_host })),
        registry: Some(registry),
        backup: Some(std::sync::Arc::new(backup::BackupSource {
            cluster_id: ca_fingerprint.clone(),
            kek: kek.clone(),
        })),
    };
    let server = tokio::spawn(serve(
        listener,
        replica.clone(),
        Services {
            agent_api,
            admin_api,
            liveness: liveness.clone(),
            health: health.clone(),
            kek: kek.clone(),
        },
        ServerTls {
            config: std::sync::Arc::new(identity.tls.grpc_server_config(public_certificate(&config)?)?),
            node_client: identity.tls.tonic_client_config(),
            ca_fingerprint: ca_fingerprint.clone(),
        },
        shutdown_receiver,
    ));
    become_ready(&replica, &health, started).await?;

    join_or_bootstrap(&replica, &config, &peers, node_id, &info, &kek).await?;

    let (supervisor, supervisor_handle) = Actor::spawn(
        None,
        NodeSupervisor,
        NodeSupervisorArgs {
            replica: replica.clone(),
            mesh: mesh.clone(),
            machines: machines.clone(),
            runtime,
            liveness,
            lease: Duration::from_millis(config.lease_ms),
        },
    )
    .await
    .map_err(|error| anyhow!("cannot start the node supervisor: {error}"))?;
    tracing::info!(node = node_id, "node is ready");
    let purger = retention::spawn_purger(replica.clone());

    wait_for_shutdown(supervisor_handle).await?;
    purger.abort();
    let stopping = std::time::Instant::now();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    hand_agents_back(&replica).await;
    stop_leading(&replica).await;
    // The supervisor's children (agents, their machine actors) destroy their machines as they
    // stop; whatever is left after the wait is destroyed by the driver's sweep. The agents
    // handed back are fenced here already: whatever their runs still try to write is refused.
    let stopped = supervisor
        .stop_and_wait(Some("node shutting down".to_string()), Some(SHUTDOWN_ACTORS_TIMEOUT))
        .await;
    if let Err(error) = stopped {
        tracing::warn!(%error, "the node supervisor did not stop in time");
    }
    machines.shutdown().await;
    // The server stops taking calls, so the leader can no longer replicate here: the calls
    // still open stop waiting for this node to apply their writes or reads.
    replica.close_waits();
    let _ = shutdown_sender.send(());
    if tokio::time::timeout(SERVER_STOP_TIMEOUT, server).await.is_err() {
        // Calls still open past the wait are cut off with the process.
        tracing::warn!(
            timeout_ms = SERVER_STOP_TIMEOUT.as_millis() as u64,
            "the gRPC server did not stop in time: calls were still open"
        );
    }
    mesh.shutdown().await;
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    replica.shutdown().await;
    tracing::info!(elapsed_ms = stopping.elapsed().as_millis() as u64, "node stopped");
    Ok(())
}

/// Opens the machine host; the sweep of what an earlier life of the node left (it kills,
/// waits for cgroups to drain, unmounts: seconds per machine) runs in the background. The
/// leader role does not need it (placement, liveness, membership and forwarded writes never
/// touch this node's machines); this node's own agents wait for it before their machines
/// start.
async fn open_machines(config: &NodeConfig) -> anyhow::Result<std::sync::Arc<flotilla_actors::machine::MachineHost>> {
    let (data_dir, settings) = (config.data_dir.clone(), config.machines.clone());
    let (host, earlier_life) =
        tokio::task::spawn_blocking(move || flotilla_actors::machine::MachineHost::open_unreaped(&data_dir, settings))
            .await
            .map_err(|error| anyhow!("cannot set up machines: {error}"))?
            .map_err(|error| anyhow!("cannot set up machines: {error}"))?;
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || earlier_life.reap()).await {
            Ok(report) => tracing::info!(
                ?report,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "swept what an earlier run of the node left; machines can start"
            ),
            Err(error) => {
                tracing::error!(%error, "sweeping what an earlier run of the node left failed; no machine starts on this node")
            }
        }
    });
    Ok(std::sync::Arc::new(host))
}

/// Test hook: `FLOTILLA_TEST_HOOK_READY_DELAY_MS` holds the node back from being ready to
/// lead for that long after its listeners are bound, as a slow start-up would. Tests only.
const TEST_HOOK_READY_DELAY_ENV: &str = "FLOTILLA_TEST_HOOK_READY_DELAY_MS";

fn test_hook_ready_delay() -> anyhow::Result<Option<Duration>> {
    match std::env::var(TEST_HOOK_READY_DELAY_ENV) {
        Ok(value) => {
            let delay_ms: u64 = value.trim().parse().map_err(|error| {
                anyhow!("{TEST_HOOK_READY_DELAY_ENV}: expected a number of milliseconds, found {value:?}: {error}")
            })?;
            Ok(Some(Duration::from_millis(delay_ms)))
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(error) => bail!("{TEST_HOOK_READY_DELAY_ENV}: {error}"),
    }
}

/// Lets the node campaign and says so: both listeners are bound and what the leader role
/// needs is up. Before this the node follows and votes, and never leads.
async fn become_ready(
    replica: &Replica,
    health: &tonic_health::server::HealthReporter,
    started: std::time::Instant,
) -> anyhow::Result<()> {
    if let Some(delay) = test_hook_ready_delay()? {
        tracing::warn!(delay_ms = delay.as_millis() as u64, "test hook: holding back readiness");
        tokio::time::sleep(delay).await;
    }
    replica.declare_ready();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "node is ready to lead"
    );
    Ok(())
}

/// The first step of a clean stop, before any machine goes: the node takes no new agents and
/// its live agents go back to pending (`NodeStopping`), so that other nodes take them over from
/// their last checkpoint under the next epoch at once, not after the lease, and this node's runs
/// end without recording anything (their writes are fenced from here on). Bounded: with no
/// leader the node stops as before and its agents move after its lease.
async fn hand_agents_back(replica: &Replica) {
    let started = std::time::Instant::now();
    let node = replica.node_id();
    let written = tokio::time::timeout(HAND_BACK_TIMEOUT, replica.write(Command::NodeStopping { node })).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match written {
        Ok(Ok(flotilla_raft::Response::Requeued(agents))) => {
            tracing::info!(
                agents = agents.len(),
                elapsed_ms,
                "handed this node's agents back for other nodes to take over"
            )
        }
        Ok(Ok(other)) => tracing::warn!(?other, "handing this node's agents back got an unexpected answer"),
        Ok(Err(error)) => tracing::warn!(
            %error,
            elapsed_ms,
            "could not hand this node's agents back; they move once its lease runs out"
        ),
        Err(_) => tracing::warn!(
            timeout_ms = HAND_BACK_TIMEOUT.as_millis() as u64,
            "handing this node's agents back was not answered in time (no leader?); they move once its lease runs out"
        ),
    }
}

/// The next step of a clean stop: never campaign again, and hand leadership to a follower if
/// this node leads, while it still serves (its agents' last writes go to the new leader).
async fn stop_leading(replica: &Replica) {
    match replica.hand_over_leadership().await {
        flotilla_raft::Handover::NotLeader => {}
        flotilla_raft::Handover::Handed { to, elapsed } => {
            tracing::info!(to, elapsed_ms = elapsed.as_millis() as u64, "handed leadership over")
        }
        flotilla_raft::Handover::Failed { last_error } => {
            tracing::warn!(%last_error, "could not hand leadership over; the cluster elects after the lease")
        }
    }
}

/// Makes this node a member: bootstraps a new cluster or joins through `config.join` the first
/// time, then waits for a leader and registers the node's current information.
async fn join_or_bootstrap(
    replica: &Replica,
    config: &NodeConfig,
    peers: &Peers,
    node_id: u64,
    info: &NodeInfo,
    kek: &secrets::NodeKek,
) -> anyhow::Result<()> {
    if !replica.is_initialized().await {
        match &config.join {
            None => {
                replica
                    .bootstrap(NodeAddr {
                        grpc: info.grpc_address.clone(),
                        mesh: info.mesh_address.clone(),
                    })
                    .await?;
                tracing::info!("bootstrapped a new cluster");
            }
            Some(join) => {
                let reply = call_join(
                    peers,
                    join,
                    JoinRequest {
                        node_id,
                        grpc_address: info.grpc_address.clone(),
                        mesh_address: info.mesh_address.clone(),
                        region: info.region.clone(),
                        slots: info.slots,
                        labels: info.labels.clone().into_iter().collect(),
                        state_format_version: replica.state_format_version(),
                    },
                )
                .await?;
                state_format::check_cluster(join, reply.state_format_version, replica.state_format_version())?;
                kek.adopt(&config.data_dir, &reply.kek).await?;
                tracing::info!(through = %join, "joined the cluster");
            }
        }
    }
    replica
        .wait_for_leader(Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow!("no raft leader within 30 s"))?;
    if kek.get().is_none() {
        tracing::warn!(
            "this node holds no key-encryption key (DATA_DIR/kek): it cannot seal or open secrets; copy the file from another node"
        );
    }
    register_self(replica, info.clone()).await;
    identity::hand_ca_key_to_cluster(replica, &config.data_dir, kek).await?;
    // A restored cluster's first node writes a new admin key too (the old keys keep working).
    if config.join.is_none() && (node_id == 1 || config.restore.is_some()) {
        ensure_admin_token(replica, &config.data_dir).await?;
    }
    Ok(())
}

/// Returns on Ctrl-C, SIGTERM, or when the node supervisor ends.
async fn wait_for_shutdown(supervisor_handle: tokio::task::JoinHandle<()>) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = terminate.recv() => tracing::info!("terminated; shutting down"),
        _ = supervisor_handle => tracing::error!("node supervisor ended; shutting down"),
    }
    Ok(())
}

/// What the listener needs for TLS and enrollment.
struct ServerTls {
    config: std::sync::Arc<rustls::ServerConfig>,
    node_client: tonic::transport::ClientTlsConfig,
    ca_fingerprint: String,
}

/// The services a node serves besides Raft's own.
struct Services {
    agent_api: agents::AgentApi,
    admin_api: admin::AdminApi,
    liveness: LivenessTable,
    health: tonic_health::server::HealthReporter,
    kek: secrets::NodeKek,
}

async fn serve(
    listener: tokio::net::TcpListener,
    replica: Replica,
    services: Services,
    tls: ServerTls,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let Services {
        agent_api,
        admin_api,
        liveness,
        health: health_reporter,
        kek,
    } = services;
    let tokens = auth::TokenCheck::new(replica.clone()).with_audit(audit::AuditRecorder::start(replica.clone()));
    let health_service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health_reporter.clone()),
    );
    health_reporter
        .set_serving::<AgentServiceServer<agents::AgentApi>>()
        .await;
    health_reporter
        .set_serving::<ClusterServiceServer<cluster::ClusterApi>>()
        .await;
    health_reporter
        .set_serving::<AdminServiceServer<admin::AdminApi>>()
        .await;
    health_reporter
        .set_serving::<flotilla_proto::v1::access_service_server::AccessServiceServer<access::AccessApi>>()
        .await;
    health_reporter
        .set_serving::<SecretServiceServer<secrets::SecretApi>>()
        .await;
    health_reporter
        .set_serving::<flotilla_proto::v1::settings_service_server::SettingsServiceServer<settings::SettingsApi>>()
        .await;
    // Both reflection versions: grpcurl and current clients ask v1; Python's grpcio-reflection,
    // Postman and older grpcurl speak only v1alpha. Like health, reflection needs no key: it
    // shows the API's shape, which is public, and nothing of the cluster.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let models = agent_api.models.clone();
    let agent_service = AgentServiceServer::new(agent_api).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let cluster_service = ClusterServiceServer::new(cluster::ClusterApi {
        replica: replica.clone(),
        node_tls: tls.node_client,
        ca_fingerprint: tls.ca_fingerprint.clone(),
    });
    let enrollment_service = EnrollmentServer::new(enroll::EnrollmentApi {
        replica: replica.clone(),
        kek: kek.clone(),
        ca_fingerprint: tls.ca_fingerprint,
    });
    let admin_service = AdminServiceServer::new(admin_api).max_decoding_message_size(admin::MAX_UPLOAD_MESSAGE_BYTES);
    let access_service = flotilla_proto::v1::access_service_server::AccessServiceServer::new(access::AccessApi {
        replica: replica.clone(),
        kek: kek.clone(),
    });
    let secret_service = SecretServiceServer::new(secrets::SecretApi {
        replica: replica.clone(),
        kek: kek.clone(),
    });
    let settings_service =
        flotilla_proto::v1::settings_service_server::SettingsServiceServer::new(settings::SettingsApi {
            replica: replica.clone(),
            models,
        });
    let audit_service = flotilla_proto::v1::audit_service_server::AuditServiceServer::new(audit_api::AuditApi {
        replica: replica.clone(),
    });
    let limits_service = flotilla_proto::v1::limits_service_server::LimitsServiceServer::new(audit_api::LimitsApi {
        replica: replica.clone(),
    });
    let require_node_certificate = transport::RequireNodeCertificate {
        check: transport::refuse_removed_nodes(&replica),
    };
    // Set once the server is told to stop: the internal service's append streams end then.
    let (stop_streams, stopping) = tokio::sync::watch::channel(false);
    let internal_service = InternalServer::new(internal::InternalApi {
        replica,
        liveness,
        kek,
        stopping,
    })
    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let (incoming, accepting) = transport::tls_incoming(listener, tls.config);
    let rpc_metrics = crate::observability::rpc::RpcMetricsLayer::new(crate::observability::rpc::known_methods(
        flotilla_proto::FILE_DESCRIPTOR_SET,
    )?);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_frame_size(MAX_FRAME_BYTES)
        .layer(rpc_metrics)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(auth::Authenticated::new(agent_service, tokens.clone()))
        .add_service(auth::Authenticated::new(cluster_service, tokens.clone()))
        .add_service(auth::Authenticated::new(admin_service, tokens.clone()))
        .add_service(auth::Authenticated::new(access_service, tokens.clone()))
        .add_service(auth::Authenticated::new(secret_service, tokens.clone()))
        .add_service(auth::Authenticated::new(settings_service, tokens.clone()))
        .add_service(auth::Authenticated::new(audit_service, tokens.clone()))
        .add_service(auth::Authenticated::new(limits_service, tokens))
        .add_service(enrollment_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            internal_service,
            require_node_certificate,
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.await;
            let _ = stop_streams.send(true);
        })
        .await;
    accepting.abort();
    served?;
    Ok(())
}
