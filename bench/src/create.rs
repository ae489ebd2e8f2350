//! `flotilla-bench create`: how many agents per second a cluster acknowledges, and how long
//! each acknowledgement takes. A create returns only after its Raft commit, so this measures
//! the write path end to end: authentication, forwarding from followers, replication, apply.
//!
//! Against `--endpoints` it loads an existing cluster. Without them it starts its own loopback
//! clusters (`flotilla node` processes in a temporary directory, see [`LocalCluster`]) and
//! stops them again, also on error or Ctrl-C. It prints figures and asserts nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::v1::CreateAgentRequest;
use hdrhistogram::Histogram;

use crate::client::{agent_client, connect, get_cluster, AgentClient, BearerToken, ClientError};
use crate::local_cluster::LocalCluster;
use crate::run_limits::{check_counts, check_seconds, until_interrupted, MAX_CLIENTS_PER_RUN, MAX_CLUSTER_NODES};

/// Hard cap on requests in one run, whatever the duration and client count.
const MAX_CREATES_PER_RUN: u64 = 1_000_000;
/// A create slower than this counts as an error and its client moves on.
const CREATE_TIMEOUT_MS: u64 = 10_000;
/// HTTP/2 connections opened to each node; clients share them round-robin.
const CONNECTIONS_PER_NODE: usize = 2;
/// Latencies are recorded in microseconds up to one minute, with three significant digits.
const MAX_RECORDED_LATENCY_US: u64 = 60_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

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
    /// PEM certificate of the cluster CA for --endpoints (DATA_DIR/ca.pem of the first node)
    #[arg(long, env = "FLOTILLA_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// the `flotilla` executable the loopback clusters run (ignored with --endpoints); by
    /// default the one next to this executable, as cargo builds them
    #[arg(long, env = "FLOTILLA_BINARY")]
    pub flotilla_binary: Option<PathBuf>,
}

pub async fn run_create(args: BenchCreateArgs) -> anyhow::Result<()> {
    validate(&args)?;
    until_interrupted(run_all(&args)).await
}

fn validate(args: &BenchCreateArgs) -> anyhow::Result<()> {
    check_seconds(args.seconds)?;
    check_counts("--clients", "client count", &args.clients, MAX_CLIENTS_PER_RUN)?;
    if args.endpoints.is_empty() {
        check_counts("--nodes", "cluster size", &args.nodes, MAX_CLUSTER_NODES)?;
    }
    Ok(())
}

async fn run_all(args: &BenchCreateArgs) -> anyhow::Result<()> {
    let run_duration = Duration::from_secs(args.seconds);
    if !args.endpoints.is_empty() {
        let token = BearerToken::new(args.token.as_deref())?;
        if let Some(ca_cert) = &args.ca_cert {
            crate::client::trust_ca(
                std::fs::read_to_string(ca_cert).with_context(|| format!("reading --ca-cert {}", ca_cert.display()))?,
            );
        }
        let targets = connect_targets(&args.endpoints, &token).await?;
        let node_count = member_count(&args.endpoints[0], &token).await?;
        for &clients in &args.clients {
            let result = run_once(&targets, clients, run_duration).await;
            result.print(node_count);
        }
        return Ok(());
    }
    let flotilla_binary = match &args.flotilla_binary {
        Some(path) => path.clone(),
        None => sibling_flotilla_binary()?,
    };
    for &node_count in &args.nodes {
        let started = Instant::now();
        let cluster = LocalCluster::start(&flotilla_binary, node_count).await?;
        eprintln!(
            "started a loopback cluster of {node_count} node(s) in {:.1}s (data and logs in {}, removed at the end)",
            started.elapsed().as_secs_f64(),
            cluster.directory().display()
        );
        let token = BearerToken::new(Some(cluster.admin_token()))?;
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

/// `flotilla` in the directory of this executable: `cargo build` puts both binaries there.
pub(crate) fn sibling_flotilla_binary() -> anyhow::Result<PathBuf> {
    let bench = std::env::current_exe().context("finding the flotilla-bench executable")?;
    let binary = bench.with_file_name("flotilla");
    if !binary.is_file() {
        bail!(
            "no flotilla executable next to {} (build it with `cargo build --bin flotilla`, or pass --flotilla-binary)",
            bench.display()
        );
    }
    Ok(binary)
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
            let channel = connect(endpoint).await?;
            targets.push(Target {
                endpoint: endpoint.clone(),
                client: agent_client(channel, token.clone()),
            });
        }
    }
    Ok(targets)
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
        let client = target.client.clone();
        let endpoint = target.endpoint.clone();
        let issued = Arc::clone(&issued);
        let name_prefix = format!("bench-{run_tag}-{client_index}");
        tasks.spawn(drive_client(client, endpoint, name_prefix, deadline, issued));
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

/// One client: creates agents one after the other until the deadline or the run's cap on
/// requests, recording each acknowledged create's latency.
async fn drive_client(
    mut client: AgentClient,
    endpoint: String,
    name_prefix: String,
    deadline: tokio::time::Instant,
    issued: Arc<AtomicU64>,
) -> ClientOutcome {
    let mut outcome = ClientOutcome {
        creates: 0,
        errors: 0,
        latency_us: new_latency_histogram(),
        first_error: None,
    };
    let mut request_index: u64 = 0;
    while tokio::time::Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < MAX_CREATES_PER_RUN {
        request_index += 1;
        let request = CreateAgentRequest {
            prompt: BENCH_PROMPT.to_string(),
            repository: BENCH_REPOSITORY.to_string(),
            // Named, so that a create does not read the (unreachable) origin's default branch.
            base_branch: "main".to_string(),
            name: format!("{name_prefix}-{request_index}"),
            ..Default::default()
        };
        let request_started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_millis(CREATE_TIMEOUT_MS), client.create_agent(request)).await;
        let latency_us = u64::try_from(request_started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let failure = match answer {
            Ok(Ok(_response)) => None,
            Ok(Err(status)) => Some(ClientError::from_status(&endpoint, status).to_string()),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_validated() {
        let args = BenchCreateArgs {
            endpoints: vec![],
            clients: vec![0],
            seconds: 10,
            nodes: vec![1],
            token: None,
            ca_cert: None,
            flotilla_binary: None,
        };
        assert!(validate(&args).is_err());
    }
}
