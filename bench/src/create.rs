//! `flotilla-bench create`: how many agents per second a cluster acknowledges, and how long
//! each acknowledgement takes. A create returns only after its Raft commit, so this measures
//! the write path end to end: authentication, forwarding from followers, replication, apply.
//!
//! Against `--endpoints` it loads an existing cluster. Without them it starts its own loopback
//! clusters (`flotilla node` processes in a temporary directory, see [`LocalCluster`]) and
//! stops them again, also on error or Ctrl-C. It prints figures and asserts nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client::{agent_client, connect, get_cluster, BearerToken};
use crate::load::{run_once, RunResult, Writer};
use crate::local_cluster::LocalCluster;
use crate::run_limits::{check_counts, check_seconds, until_interrupted, MAX_CLIENTS_PER_RUN, MAX_CLUSTER_NODES};

/// Hard cap on requests in one run, whatever the duration and client count.
const MAX_CREATES_PER_RUN: u64 = 1_000_000;
/// HTTP/2 connections opened to each node; clients share them round-robin.
const CONNECTIONS_PER_NODE: usize = 2;

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
            let result = run_once(&targets, clients, run_duration, MAX_CREATES_PER_RUN).await;
            print_run(&result, node_count);
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
            let result = run_once(&targets, clients, run_duration, MAX_CREATES_PER_RUN).await;
            print_run(&result, node_count);
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
async fn connect_targets(endpoints: &[String], token: &BearerToken) -> anyhow::Result<Vec<Writer>> {
    let mut targets = Vec::with_capacity(endpoints.len() * CONNECTIONS_PER_NODE);
    for _ in 0..CONNECTIONS_PER_NODE {
        for endpoint in endpoints {
            let channel = connect(endpoint).await?;
            targets.push(Writer::Flotilla {
                endpoint: endpoint.clone(),
                client: agent_client(channel, token.clone()),
                padded: false,
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

/// One line per run: its throughput, latency and errors.
fn print_run(result: &RunResult, node_count: usize) {
    let quantile_ms = |quantile: f64| match result.latency_ms(quantile) {
        Some(latency) => format!("{latency:.2}ms"),
        None => "-".to_string(),
    };
    println!(
        "nodes={node_count} clients={} creates={} elapsed={:.1}s rate={:.0}/s p50={} p99={} errors={}",
        result.clients,
        result.writes,
        result.elapsed.as_secs_f64(),
        result.rate(),
        quantile_ms(0.50),
        quantile_ms(0.99),
        result.errors,
    );
    if let Some(first_error) = &result.first_error {
        eprintln!("  first error: {first_error}");
    }
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
