//! `flotilla-lab bench`: create latency through each region's nodes of a local cluster, under
//! its WAN delay. A create returns after its Raft commit, so a region without the leader pays
//! the forward to it and the leader's round to a majority. Every node is drained for the bench
//! (and the drains it set are lifted after), so the bench's agents stay queued and no agent work
//! competes with the write path; they are deleted at the end. Prints figures, asserts nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_proto::v1::{CreateAgentRequest, DeleteAgentRequest, DrainNodeRequest, GetClusterRequest};
use flotilla_tests::local_cluster::LocalState;

/// Never fetched: the bench's agents are never placed.
const BENCH_REPOSITORY: &str = "https://example.com/bench/repo.git";
const CREATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies kept per run, whatever its length.
const MAX_SAMPLES: usize = 200_000;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Concurrent clients per run, each run through every node of one region.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
    /// Length of each run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

struct Run {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
    ids: Vec<String>,
}

pub async fn bench(state_dir: &Path, args: &BenchArgs) -> Result<(), String> {
    let state =
        LocalState::read(state_dir)?.ok_or_else(|| format!("no local cluster is up in {}", state_dir.display()))?;
    let token = std::fs::read_to_string(&state.admin_token_file)
        .map_err(|error| format!("could not read {}: {error}", state.admin_token_file.display()))?;
    let token = token.trim().to_string();
    flotilla_tests::trust_cluster_ca(&state.ca_cert);
    println!(
        "create latency by the region of the node called, {} ms one way between regions (jitter {} ms), {} s per run",
        state.wan_latency_ms, state.jitter_ms, args.seconds
    );
    println!(
        "{:<10} {:>7} {:>9} {:>9} {:>9} {:>7}",
        "region", "clients", "creates/s", "p50 ms", "p99 ms", "errors"
    );
    let drained = drain_all(&state.nodes[0].endpoint, &token, true, &[]).await?;
    let mut created = Vec::new();
    for (region, endpoints) in state.endpoints_by_region() {
        for &clients in &args.clients {
            let run = run(&endpoints, &token, clients.max(1), Duration::from_secs(args.seconds)).await;
            let mut latencies = run.latencies;
            latencies.sort_unstable();
            println!(
                "{:<10} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>7}",
                region,
                clients,
                latencies.len() as f64 / args.seconds.max(1) as f64,
                percentile_ms(&latencies, 50.0),
                percentile_ms(&latencies, 99.0),
                run.errors
            );
            if let Some(error) = run.first_error {
                println!("           first error: {error}");
            }
            created.extend(run.ids.into_iter().map(|id| (endpoints[0].clone(), id)));
        }
    }
    let removed = delete_all(&created, &token).await;
    println!("deleted {removed} of the {} bench agents", created.len());
    drain_all(&state.nodes[0].endpoint, &token, false, &drained).await?;
    Ok(())
}

/// Drains (`drain`) every member not draining yet and returns their ids; or lifts the drain of
/// the members in `only`.
async fn drain_all(endpoint: &str, token: &str, drain: bool, only: &[u64]) -> Result<Vec<u64>, String> {
    let mut client = flotilla_tests::cluster_client(endpoint, token).await;
    let cluster = client
        .get_cluster(GetClusterRequest {})
        .await
        .map_err(|status| format!("GetCluster on {endpoint}: {status}"))?
        .into_inner();
    let mut changed = Vec::new();
    for member in cluster.members {
        let wanted = if drain {
            !member.draining
        } else {
            only.contains(&member.id)
        };
        if !wanted {
            continue;
        }
        client
            .drain_node(DrainNodeRequest {
                node_id: member.id,
                drain,
            })
            .await
            .map_err(|status| format!("DrainNode {} (drain: {drain}): {status}", member.id))?;
        changed.push(member.id);
    }
    Ok(changed)
}

async fn run(endpoints: &[String], token: &str, clients: usize, length: Duration) -> Run {
    let deadline = Instant::now() + length;
    let mut tasks = Vec::with_capacity(clients);
    for client_index in 0..clients {
        let endpoint = endpoints[client_index % endpoints.len()].clone();
        let token = token.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = flotilla_tests::agent_client(&endpoint, &token).await;
            let mut run = Run {
                latencies: Vec::new(),
                errors: 0,
                first_error: None,
                ids: Vec::new(),
            };
            let mut sequence = 0u64;
            while Instant::now() < deadline && run.latencies.len() < MAX_SAMPLES / clients.max(1) {
                sequence += 1;
                let request = CreateAgentRequest {
                    prompt: "Local cluster bench: nothing to do.".to_string(),
                    repository: BENCH_REPOSITORY.to_string(),
                    base_branch: "main".to_string(),
                    name: format!("lab-bench-{client_index}-{sequence}"),
                    ..Default::default()
                };
                let started = Instant::now();
                match tokio::time::timeout(CREATE_TIMEOUT, client.create_agent(request)).await {
                    Ok(Ok(reply)) => {
                        run.latencies.push(started.elapsed());
                        if let Some(agent) = reply.into_inner().agent {
                            run.ids.push(agent.id);
                        }
                    }
                    Ok(Err(status)) => {
                        run.errors += 1;
                        run.first_error.get_or_insert(format!("{endpoint}: {status}"));
                    }
                    Err(_) => {
                        run.errors += 1;
                        run.first_error
                            .get_or_insert(format!("{endpoint}: no answer within {CREATE_TIMEOUT:?}"));
                    }
                }
            }
            run
        }));
    }
    let mut total = Run {
        latencies: Vec::new(),
        errors: 0,
        first_error: None,
        ids: Vec::new(),
    };
    for task in tasks {
        if let Ok(run) = task.await {
            total.latencies.extend(run.latencies);
            total.errors += run.errors;
            total.ids.extend(run.ids);
            if total.first_error.is_none() {
                total.first_error = run.first_error;
            }
        }
    }
    total
}

fn percentile_ms(sorted: &[Duration], percentile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((percentile / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Deletes the bench's agents, 16 at a time.
async fn delete_all(created: &[(String, String)], token: &str) -> usize {
    let mut removed = 0;
    for batch in created.chunks(16) {
        let mut calls = Vec::with_capacity(batch.len());
        for (endpoint, id) in batch {
            let (endpoint, id, token) = (endpoint.clone(), id.clone(), token.to_string());
            calls.push(tokio::spawn(async move {
                let mut client = flotilla_tests::agent_client(&endpoint, &token).await;
                client.delete_agent(DeleteAgentRequest { id }).await.is_ok()
            }));
        }
        for call in calls {
            if matches!(call.await, Ok(true)) {
                removed += 1;
            }
        }
    }
    removed
}
