//! `--metrics-listen ADDR`: the node's metrics in the Prometheus text format, over plain HTTP
//! at `GET /metrics`.
//!
//! Every crate records through the `metrics` facade; this module installs the one recorder
//! that keeps the figures (only when the flag is set: without it recording costs an atomic
//! load) and serves them. Counters and histograms are recorded where their events happen;
//! gauges that mirror the replicated state or Raft's own view (term, leader, indexes, agents
//! by status) are read at scrape time, so that they are never stale and cost nothing between
//! scrapes.
//!
//! The listener has no TLS and no authentication: it is meant for a scraper on the same host
//! or a private network (bind it to loopback, the usual case, or to an address only the
//! scraper reaches). The figures name no secret, but agent counts and method names are
//! operational data.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use flotilla_raft::Replica;
use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::rpc::{RPC_DURATION_SECONDS, RPC_REQUESTS_TOTAL};

/// How often histograms are drained into their buckets when nobody scrapes (the recorder keeps
/// samples until then, so this bounds their memory).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Buckets of every `_seconds` histogram: from a local RocksDB sync to a slow machine boot.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets of every `_bytes` histogram (snapshot sizes): 1 KiB to 4 GiB by powers of four.
const BYTES_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];

pub const RAFT_TERM: &str = "flotilla_raft_term";
pub const RAFT_IS_LEADER: &str = "flotilla_raft_is_leader";
pub const RAFT_LEADER_ID: &str = "flotilla_raft_leader_id";
pub const RAFT_LAST_LOG_INDEX: &str = "flotilla_raft_last_log_index";
pub const RAFT_APPLIED_INDEX: &str = "flotilla_raft_applied_index";
pub const RAFT_SNAPSHOT_INDEX: &str = "flotilla_raft_snapshot_index";
pub const RAFT_VOTERS: &str = "flotilla_raft_voters";
pub const AGENTS: &str = "flotilla_agents";
pub const NODE_AGENTS: &str = "flotilla_node_agents";
pub const NODES_UP: &str = "flotilla_cluster_nodes";

/// Installs the Prometheus recorder as the process's global recorder and registers every
/// metric's help text. Call once, before the parts that record start.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), SECONDS_BUCKETS)
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_bytes".to_string()), BYTES_BUCKETS))
        .map_err(|error| anyhow!("cannot configure the metrics recorder: {error}"))?
        .install_recorder()
        .map_err(|error| anyhow!("cannot install the metrics recorder: {error}"))?;
    describe();
    // Gauges moved by increments get their series now, so that a scrape shows a zero rather
    // than nothing before the first watch or machine.
    gauge!(crate::server::authz::WATCHERS).increment(0.0);
    gauge!(flotilla_actors::metrics::MACHINES_RUNNING).increment(0.0);
    flotilla_raft::metrics::describe();
    flotilla_actors::metrics::describe();
    flotilla_sandbox::metrics::describe();
    flotilla_plugins::metrics::describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        RPC_REQUESTS_TOTAL,
        Unit::Count,
        "gRPC calls served, by method and status code (streams count when they end)."
    );
    describe_histogram!(
        RPC_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of each gRPC call served, by method and status code (a stream's whole life)."
    );
    describe_gauge!(RAFT_TERM, "This node's current Raft term.");
    describe_gauge!(RAFT_IS_LEADER, "1 when this node is the Raft leader, else 0.");
    describe_gauge!(
        RAFT_LEADER_ID,
        "The node id this node knows as Raft leader (0: none known)."
    );
    describe_gauge!(RAFT_LAST_LOG_INDEX, "Index of the last entry in this node's Raft log.");
    describe_gauge!(
        RAFT_APPLIED_INDEX,
        "Index of the last Raft entry applied to this node's state machine."
    );
    describe_gauge!(
        RAFT_SNAPSHOT_INDEX,
        "Index of the last Raft entry in this node's latest snapshot."
    );
    describe_gauge!(RAFT_VOTERS, "Voting members of the Raft group, as this node sees it.");
    describe_gauge!(
        AGENTS,
        "Agents in the replicated state, by status (the whole cluster, as this node has applied it)."
    );
    describe_gauge!(NODE_AGENTS, "Agents assigned to this node, by status.");
    describe_gauge!(NODES_UP, "Nodes registered in the cluster, by liveness (up or down).");
    describe_gauge!(crate::server::authz::WATCHERS, "Agent watch streams open on this node.");
}

/// Sets the gauges that mirror Raft's view and the replicated state; called at every scrape.
fn refresh_state_gauges(replica: &Replica) {
    {
        let raft_metrics = replica.raft().metrics();
        let raft_metrics = raft_metrics.borrow();
        gauge!(RAFT_TERM).set(raft_metrics.current_term as f64);
        let leader = raft_metrics.current_leader;
        gauge!(RAFT_IS_LEADER).set(if leader == Some(raft_metrics.id) { 1.0 } else { 0.0 });
        gauge!(RAFT_LEADER_ID).set(leader.unwrap_or(0) as f64);
        gauge!(RAFT_LAST_LOG_INDEX).set(raft_metrics.last_log_index.unwrap_or(0) as f64);
        gauge!(RAFT_APPLIED_INDEX).set(raft_metrics.last_applied.map(|id| id.index).unwrap_or(0) as f64);
        gauge!(RAFT_SNAPSHOT_INDEX).set(raft_metrics.snapshot.map(|id| id.index).unwrap_or(0) as f64);
        gauge!(RAFT_VOTERS).set(raft_metrics.membership_config.membership().voter_ids().count() as f64);
    }
    let me = replica.node_id();
    let (cluster_counts, node_counts, nodes_up, nodes_down) = replica.reader().read(|state| {
        let mut cluster_counts = [0u64; STATUSES.len()];
        let mut node_counts = [0u64; STATUSES.len()];
        for agent in state.agents.values() {
            let slot = STATUSES
                .iter()
                .position(|status| *status == agent.status)
                .expect("every status is listed");
            cluster_counts[slot] += 1;
            if agent
                .assignment
                .as_ref()
                .is_some_and(|assignment| assignment.node == me)
            {
                node_counts[slot] += 1;
            }
        }
        let up = state.nodes.values().filter(|node| node.up).count();
        (cluster_counts, node_counts, up, state.nodes.len() - up)
    });
    for (slot, status) in STATUSES.iter().enumerate() {
        gauge!(AGENTS, "status" => status.as_str()).set(cluster_counts[slot] as f64);
        gauge!(NODE_AGENTS, "status" => status.as_str()).set(node_counts[slot] as f64);
    }
    gauge!(NODES_UP, "liveness" => "up").set(nodes_up as f64);
    gauge!(NODES_UP, "liveness" => "down").set(nodes_down as f64);
}

/// Every agent status, so that each has a series (a zero is an answer; a missing series is not).
const STATUSES: [flotilla_raft::AgentStatus; 6] = [
    flotilla_raft::AgentStatus::Pending,
    flotilla_raft::AgentStatus::Provisioning,
    flotilla_raft::AgentStatus::Running,
    flotilla_raft::AgentStatus::Finished,
    flotilla_raft::AgentStatus::Failed,
    flotilla_raft::AgentStatus::Stopped,
];

#[derive(Clone)]
struct Scrape {
    handle: PrometheusHandle,
    replica: Replica,
}

async fn scrape(axum::extract::State(scrape): axum::extract::State<Scrape>) -> impl axum::response::IntoResponse {
    refresh_state_gauges(&scrape.replica);
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        scrape.handle.render(),
    )
}

/// Binds `address` (before the node goes on, so that a taken port fails the start) and serves
/// the metrics there until the returned task is aborted.
pub async fn serve(
    address: SocketAddr,
    handle: PrometheusHandle,
    replica: Replica,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address}"))?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(address = %bound, "the metrics listener is plain HTTP with no authentication: make sure only the scraper reaches it");
    }
    tracing::info!(address = %bound, "serving Prometheus metrics at /metrics");
    let upkeep_handle = handle.clone();
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(Scrape { handle, replica });
    Ok(tokio::spawn(async move {
        let upkeep = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                ticks.tick().await;
                upkeep_handle.run_upkeep();
            }
        });
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "the metrics listener stopped");
        }
        upkeep.abort();
    }))
}
