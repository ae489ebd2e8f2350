//! `flotilla bench create`: how many agents per second a cluster acknowledges, and how long
//! each acknowledgement takes. A create returns only after its Raft commit, so this measures
//! the write path end to end: authentication, forwarding from followers, replication, apply.
//!
//! Against `--endpoints` it loads an existing cluster. Without them it starts its own loopback
//! clusters (this same executable as `flotilla node` processes in a temporary directory) and
//! stops them again, also on error or Ctrl-C. It prints figures and asserts nothing.

use std::collections::HashSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::v1::{AddNodeRequest, Cluster, CreateAgentRequest, GetClusterRequest};
use hdrhistogram::Histogram;

use crate::cli::{agent_client, cluster_client, connect, error_chain, unary, AgentClient, BearerToken, CliError};

/// Hard cap on requests in one run, whatever the duration and client count.
const MAX_CREATES_PER_RUN: u64 = 1_000_000;
const MAX_RUN_SECONDS: u64 = 3_600;
const MAX_CLIENTS_PER_RUN: usize = 4_096;
const MAX_LOCAL_CLUSTER_NODES: usize = 9;
/// A create slower than this counts as an error and its client moves on.
const CREATE_TIMEOUT_MS: u64 = 10_000;
/// HTTP/2 connections opened to each node; clients share them round-robin.
const CONNECTIONS_PER_NODE: usize = 2;
/// Latencies are recorded in microseconds up to one minute, with three significant digits.
const MAX_RECORDED_LATENCY_US: u64 = 60_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// Bench nodes run no agents: the figure is the create path (validation, Raft commit,
/// apply), not machine provisioning, which has its own benchmark (`flotilla bench machines`).
const SLOTS_PER_BENCH_NODE: u32 = 0;
/// Nodes beyond this stay learners: a Raft group wants few voters.
const MAX_BENCH_VOTERS: u64 = 5;
/// Time for a loopback cluster to bootstrap, join and elect; RocksDB opens dominate.
const CLUSTER_READY_TIMEOUT_MS: u64 = 120_000;
const READINESS_POLL_INTERVAL_MS: u64 = 100;
/// After SIGTERM a node gets this long to exit before its process group is killed.
const NODE_SHUTDOWN_GRACE_MS: u64 = 5_000;
const NODE_LOG_TAIL_LINES: usize = 15;

const BENCH_REPOSITORY: &str = "https://example.com/bench/repo.git";
const BENCH_PROMPT: &str = "Benchmark agent: reply that there is nothing to do.";

#[derive(clap::Args, Debug)]
pub struct BenchCreateArgs {
    /// endpoints of existing nodes; if empty, the bench starts its own loopback clusters of the
    /// sizes in --nodes
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// concurrent clients, one run per value
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    pub clients: Vec<usize>,
    /// duration of each run
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// sizes of the loopback clusters to start (ignored with --endpoints)
    #[arg(long, default_value = "1,3", value_delimiter = ',')]
    pub nodes: Vec<usize>,
    /// bearer token for --endpoints (a started cluster uses its own admin token)
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub async fn run_create(args: BenchCreateArgs) -> anyhow::Result<()> {
    validate(&args)?;
    // Dropping the run on Ctrl-C drops the loopback cluster with it, which stops its nodes:
    // they sit in their own process groups and would not see the terminal's SIGINT.
    tokio::select! {
        result = run_all(&args) => result,
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("listening for Ctrl-C")?;
            bail!("interrupted")
        }
    }
}

fn validate(args: &BenchCreateArgs) -> anyhow::Result<()> {
    if args.seconds == 0 || args.seconds > MAX_RUN_SECONDS {
        bail!(
            "--seconds must be between 1 and {MAX_RUN_SECONDS}, found {}",
            args.seconds
        );
    }
    if args.clients.is_empty() {
        bail!("--clients must list at least one client count");
    }
    if let Some(bad) = args
        .clients
        .iter()
        .find(|&&clients| clients == 0 || clients > MAX_CLIENTS_PER_RUN)
    {
        bail!("--clients values must be between 1 and {MAX_CLIENTS_PER_RUN}, found {bad}");
    }
    if args.endpoints.is_empty() {
        if args.nodes.is_empty() {
            bail!("--nodes must list at least one cluster size");
        }
        if let Some(bad) = args
            .nodes
            .iter()
            .find(|&&nodes| nodes == 0 || nodes > MAX_LOCAL_CLUSTER_NODES)
        {
            bail!("--nodes values must be between 1 and {MAX_LOCAL_CLUSTER_NODES}, found {bad}");
        }
    }
    Ok(())
}

async fn run_all(args: &BenchCreateArgs) -> anyhow::Result<()> {
    let run_duration = Duration::from_secs(args.seconds);
    if !args.endpoints.is_empty() {
        let token = BearerToken::new(args.token.as_deref()).map_err(cli_error)?;
        let targets = connect_targets(&args.endpoints, &token).await?;
        let node_count = member_count(&args.endpoints[0], &token).await?;
        for &clients in &args.clients {
            let result = run_once(&targets, clients, run_duration).await;
            result.print(node_count);
        }
        return Ok(());
    }
    for &node_count in &args.nodes {
        let started = Instant::now();
        let cluster = LocalCluster::start(node_count).await?;
        eprintln!(
            "started a loopback cluster of {node_count} node(s) in {:.1}s (data and logs in {}, removed at the end)",
            started.elapsed().as_secs_f64(),
            cluster.directory().display()
        );
        let token = BearerToken::new(Some(&cluster.admin_token)).map_err(cli_error)?;
        let targets = connect_targets(&cluster.endpoints(), &token).await?;
        for &clients in &args.clients {
            let result = run_once(&targets, clients, run_duration).await;
            result.print(node_count);
        }
        drop(targets);
        drop(cluster);
    }
    Ok(())
}

fn cli_error(error: CliError) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

/// One client handle per connection, interleaved across nodes so that consecutive clients
/// talk to different nodes and followers forward their share to the leader.
struct Target {
    endpoint: String,
    client: AgentClient,
}

async fn connect_targets(endpoints: &[String], token: &BearerToken) -> anyhow::Result<Vec<Target>> {
    let mut targets = Vec::with_capacity(endpoints.len() * CONNECTIONS_PER_NODE);
    for _ in 0..CONNECTIONS_PER_NODE {
        for endpoint in endpoints {
            let channel = connect(endpoint).await.map_err(cli_error)?;
            targets.push(Target {
                endpoint: endpoint.clone(),
                client: agent_client(channel, token.clone()),
            });
        }
    }
    Ok(targets)
}

async fn get_cluster(endpoint: &str, token: &BearerToken) -> Result<Cluster, CliError> {
    let mut client = cluster_client(connect(endpoint).await?, token.clone());
    unary(endpoint, client.get_cluster(GetClusterRequest {})).await
}

async fn member_count(endpoint: &str, token: &BearerToken) -> anyhow::Result<usize> {
    let cluster = get_cluster(endpoint, token)
        .await
        .map_err(|error| anyhow::anyhow!("asking {endpoint} for the cluster: {error}"))?;
    Ok(cluster.members.len())
}

/// What one run measured.
struct RunResult {
    clients: usize,
    creates: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

impl RunResult {
    fn print(&self, node_count: usize) {
        let rate = self.creates as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON);
        let quantile_ms = |quantile: f64| {
            if self.latency_us.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}ms", self.latency_us.value_at_quantile(quantile) as f64 / 1000.0)
            }
        };
        println!(
            "nodes={node_count} clients={} creates={} elapsed={:.1}s rate={rate:.0}/s p50={} p99={} errors={}",
            self.clients,
            self.creates,
            self.elapsed.as_secs_f64(),
            quantile_ms(0.50),
            quantile_ms(0.99),
            self.errors,
        );
        if let Some(first_error) = &self.first_error {
            eprintln!("  first error: {first_error}");
        }
    }
}

struct ClientOutcome {
    creates: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_RECORDED_LATENCY_US, LATENCY_SIGNIFICANT_DIGITS)
        .expect("the latency histogram bounds are valid constants")
}

async fn run_once(targets: &[Target], clients: usize, run_duration: Duration) -> RunResult {
    let run_tag = format!("{:08x}", rand::random::<u32>());
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + run_duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client_index in 0..clients {
        let target = &targets[client_index % targets.len()];
        let mut client = target.client.clone();
        let endpoint = target.endpoint.clone();
        let issued = Arc::clone(&issued);
        let name_prefix = format!("bench-{run_tag}-{client_index}");
        tasks.spawn(async move {
            let mut outcome = ClientOutcome {
                creates: 0,
                errors: 0,
                latency_us: new_latency_histogram(),
                first_error: None,
            };
            let mut request_index: u64 = 0;
            while tokio::time::Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < MAX_CREATES_PER_RUN
            {
                request_index += 1;
                let request = CreateAgentRequest {
                    prompt: BENCH_PROMPT.to_string(),
                    repository: BENCH_REPOSITORY.to_string(),
                    name: format!("{name_prefix}-{request_index}"),
                    ..Default::default()
                };
                let request_started = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_millis(CREATE_TIMEOUT_MS), client.create_agent(request)).await;
                let latency_us = u64::try_from(request_started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let failure = match answer {
                    Ok(Ok(_response)) => None,
                    Ok(Err(status)) => Some(CliError::from_status(&endpoint, status).to_string()),
                    Err(_elapsed) => Some(format!("no answer from {endpoint} within {CREATE_TIMEOUT_MS} ms")),
                };
                match failure {
                    None => {
                        outcome.creates += 1;
                        outcome.latency_us.saturating_record(latency_us);
                    }
                    Some(message) => {
                        outcome.errors += 1;
                        outcome.first_error.get_or_insert(message);
                    }
                }
            }
            outcome
        });
    }
    let mut result = RunResult {
        clients,
        creates: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: new_latency_histogram(),
        first_error: None,
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => {
                result.creates += outcome.creates;
                result.errors += outcome.errors;
                // Same bounds on both sides, so adding cannot fail.
                let _ = result.latency_us.add(&outcome.latency_us);
                if result.first_error.is_none() {
                    result.first_error = outcome.first_error;
                }
            }
            Err(join_error) => {
                result.errors += 1;
                result
                    .first_error
                    .get_or_insert(format!("a bench client task failed: {join_error}"));
            }
        }
    }
    result.elapsed = started.elapsed();
    result
}

/// A `flotilla node` process started by the bench.
struct LocalNode {
    id: u64,
    endpoint: String,
    log_path: PathBuf,
    child: Child,
}

/// Loopback nodes in a temporary directory. Dropping it stops every node and removes the
/// directory, so no path out of the bench (error, panic, Ctrl-C) leaves processes behind.
struct LocalCluster {
    nodes: Vec<LocalNode>,
    admin_token: String,
    executable: PathBuf,
    cluster_secret: String,
    // Declared last so that it is removed after the nodes are stopped.
    directory: tempfile::TempDir,
}

impl LocalCluster {
    async fn start(node_count: usize) -> anyhow::Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix("flotilla-bench-")
            .tempdir()
            .context("creating a temporary directory for the bench cluster")?;
        let executable = std::env::current_exe().context("finding the flotilla executable")?;
        let mut cluster = LocalCluster {
            nodes: Vec::with_capacity(node_count),
            admin_token: String::new(),
            executable,
            cluster_secret: hex::encode(rand::random::<[u8; 32]>()),
            directory,
        };
        let deadline = Instant::now() + Duration::from_millis(CLUSTER_READY_TIMEOUT_MS);
        let grpc_ports = free_port_pairs(node_count)?;

        cluster.spawn_node(1, grpc_ports[0], None)?;
        cluster.admin_token = cluster.wait_for_admin_token(deadline).await?;
        let token = BearerToken::new(Some(&cluster.admin_token)).map_err(cli_error)?;
        cluster
            .wait_for_cluster(0, &token, deadline, "node 1 to elect itself leader", |state| {
                state.leader_id != 0
            })
            .await?;

        let seed = cluster.nodes[0].endpoint.clone();
        for (index, &port) in grpc_ports.iter().enumerate().skip(1) {
            cluster.spawn_node(index as u64 + 1, port, Some(&seed))?;
        }
        let expected_ids: Vec<u64> = (1..=node_count as u64).collect();
        let all_members_up = |state: &Cluster| {
            state.leader_id != 0
                && expected_ids
                    .iter()
                    .all(|id| state.members.iter().any(|member| member.id == *id && member.up))
        };
        let joined = cluster
            .wait_for_cluster(0, &token, deadline, "every node to join and be up", &all_members_up)
            .await?;

        let promoted = cluster.promote_to_voters(&token, &joined).await;
        for index in 0..cluster.nodes.len() {
            let what = format!("node {} to see every member and a leader", index + 1);
            cluster
                .wait_for_cluster(index, &token, deadline, &what, |state| {
                    all_members_up(state)
                        && (!promoted
                            || state
                                .members
                                .iter()
                                .all(|member| member.voter || member.id > MAX_BENCH_VOTERS))
                })
                .await?;
        }
        Ok(cluster)
    }

    fn directory(&self) -> &Path {
        self.directory.path()
    }

    fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.endpoint.clone()).collect()
    }

    fn spawn_node(&mut self, id: u64, grpc_port: u16, join: Option<&str>) -> anyhow::Result<()> {
        let data_dir = self.directory().join(format!("node{id}"));
        let log_path = self.directory().join(format!("node{id}.log"));
        let log = File::create(&log_path).with_context(|| format!("creating the log file {}", log_path.display()))?;
        let log_for_stderr = log.try_clone().context("duplicating the node log handle")?;
        // Creates need a declared model; bench nodes run no agent (no slots), so a script
        // that is never read is enough.
        let config_path = self.directory().join(format!("node{id}.toml"));
        std::fs::write(self.directory().join("bench.json"), r#"{"turns": [{"text": "done"}]}"#)
            .context("writing the bench model script")?;
        std::fs::write(
            &config_path,
            "[models.bench]\nprovider = \"scripted\"\nscript = \"bench.json\"\n",
        )
        .with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = Command::new(&self.executable);
        command
            .arg("node")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--region", "local"])
            .args(["--slots", &SLOTS_PER_BENCH_NODE.to_string()])
            .arg("--config")
            .arg(&config_path);
        if let Some(seed) = join {
            command.args(["--join", seed]);
        }
        command
            .env("FLOTILLA_CLUSTER_SECRET", &self.cluster_secret)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            // Its own process group, so that stopping the node also reaches anything it started.
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} node --id {id}", self.executable.display()))?;
        self.nodes.push(LocalNode {
            id,
            endpoint: format!("http://127.0.0.1:{grpc_port}"),
            log_path,
            child,
        });
        Ok(())
    }

    /// Fails with the node's log tail if any node has exited.
    fn ensure_all_running(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if let Some(status) = node.child.try_wait().context("checking a bench node")? {
                bail!(
                    "bench node {} exited early ({status}); last lines of {}:\n{}",
                    node.id,
                    node.log_path.display(),
                    log_tail(&node.log_path)
                );
            }
        }
        Ok(())
    }

    async fn wait_for_admin_token(&mut self, deadline: Instant) -> anyhow::Result<String> {
        let token_path = self.directory().join("node1").join("admin.token");
        loop {
            self.ensure_all_running()?;
            if let Ok(contents) = std::fs::read_to_string(&token_path) {
                let token = contents.trim();
                if !token.is_empty() {
                    return Ok(token.to_string());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "node 1 wrote no {} within {CLUSTER_READY_TIMEOUT_MS} ms; last lines of its log:\n{}",
                    token_path.display(),
                    log_tail(&self.nodes[0].log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(READINESS_POLL_INTERVAL_MS)).await;
        }
    }

    /// Polls GetCluster on one node until `ready` holds, a node exits, or the deadline passes.
    async fn wait_for_cluster(
        &mut self,
        node_index: usize,
        token: &BearerToken,
        deadline: Instant,
        what: &str,
        ready: impl Fn(&Cluster) -> bool,
    ) -> anyhow::Result<Cluster> {
        let endpoint = self.nodes[node_index].endpoint.clone();
        loop {
            self.ensure_all_running()?;
            let last_observation = match get_cluster(&endpoint, token).await {
                Ok(state) if ready(&state) => return Ok(state),
                Ok(state) => describe_cluster(&state),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|node| format!("--- {}:\n{}", node.log_path.display(), log_tail(&node.log_path)))
                    .collect();
                bail!(
                    "timed out after {CLUSTER_READY_TIMEOUT_MS} ms waiting for {what}; {endpoint} last said: {last_observation}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(READINESS_POLL_INTERVAL_MS)).await;
        }
    }

    /// Makes the first few nodes voters so that commits wait for a real quorum. Returns false
    /// (after a warning) when the cluster refuses; the bench then measures it as it is.
    async fn promote_to_voters(&self, token: &BearerToken, state: &Cluster) -> bool {
        let seed = &self.nodes[0].endpoint;
        let mut learners: Vec<u64> = state
            .members
            .iter()
            .filter(|member| !member.voter && member.id <= MAX_BENCH_VOTERS)
            .map(|member| member.id)
            .collect();
        learners.sort_unstable();
        for node_id in learners {
            let promoted = async {
                let mut client = cluster_client(connect(seed).await?, token.clone());
                unary(seed, client.add_node(AddNodeRequest { node_id, voter: true })).await
            }
            .await;
            if let Err(error) = promoted {
                eprintln!("warning: could not make node {node_id} a voter ({error}); measuring the cluster as it is");
                return false;
            }
        }
        true
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // This may block a runtime thread for up to the grace period; it happens once, at the
        // end of a run or on the way out of an error.
        for node in &self.nodes {
            signal_process_group(&node.child, libc::SIGTERM);
        }
        let grace_deadline = Instant::now() + Duration::from_millis(NODE_SHUTDOWN_GRACE_MS);
        for node in &mut self.nodes {
            loop {
                match node.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < grace_deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        // Still running, so its process group id cannot have been reused.
                        signal_process_group(&node.child, libc::SIGKILL);
                        let _ = node.child.wait();
                        break;
                    }
                }
            }
        }
    }
}

fn signal_process_group(child: &Child, signal: libc::c_int) {
    let Ok(process_group) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The group id is the pid of a child
    // this process has not reaped yet, so it still names that child's group.
    unsafe {
        libc::kill(-process_group, signal);
    }
}

fn describe_cluster(state: &Cluster) -> String {
    let members: Vec<String> = state
        .members
        .iter()
        .map(|member| {
            format!(
                "{}({}{})",
                member.id,
                if member.up { "up" } else { "down" },
                if member.voter { ", voter" } else { "" }
            )
        })
        .collect();
    format!("leader {}, members [{}]", state.leader_id, members.join(" "))
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(contents) => {
            let lines: Vec<&str> = contents.lines().collect();
            lines[lines.len().saturating_sub(NODE_LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(cannot read the log: {})", error_chain(&error)),
    }
}

/// gRPC ports P such that P and P + 1 (the mesh port) are both free, all distinct. The ports
/// are released before the nodes bind them, a small race that a bench can live with.
fn free_port_pairs(count: usize) -> anyhow::Result<Vec<u16>> {
    const MAX_ATTEMPTS: usize = 200;
    let mut chosen: Vec<u16> = Vec::with_capacity(count);
    let mut taken: HashSet<u16> = HashSet::new();
    for _ in 0..MAX_ATTEMPTS {
        if chosen.len() == count {
            break;
        }
        let grpc = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).context("binding a loopback port")?;
        let port = grpc.local_addr()?.port();
        let Some(mesh_port) = port.checked_add(1) else {
            continue;
        };
        if taken.contains(&port) || taken.contains(&mesh_port) {
            continue;
        }
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, mesh_port)).is_ok() {
            taken.insert(port);
            taken.insert(mesh_port);
            chosen.push(port);
        }
    }
    if chosen.len() < count {
        bail!(
            "found only {} free loopback port pairs of the {count} needed",
            chosen.len()
        );
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_pairs_are_distinct_and_adjacent_ports_are_free() {
        let ports = free_port_pairs(3).unwrap();
        assert_eq!(ports.len(), 3);
        let mut all: Vec<u16> = ports.iter().flat_map(|&port| [port, port + 1]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6);
    }

    #[test]
    fn arguments_are_validated() {
        let args = BenchCreateArgs {
            endpoints: vec![],
            clients: vec![0],
            seconds: 10,
            nodes: vec![1],
            token: None,
        };
        assert!(validate(&args).is_err());
    }
}
