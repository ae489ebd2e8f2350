//! `flotilla-bench assign`: how long a created agent waits for its node, on a loopback cluster
//! with free slots. One create at a time, round-robin over the nodes; after each create's
//! acknowledgement the client asks the same node for the agent (`GetAgent`, back to back)
//! until it shows an assignment. That node shows it once it has applied the scheduler's
//! `AssignAgents` entry, which is when its owner could start the agent. Prints p50/p99;
//! asserts nothing about time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::v1::{CreateAgentRequest, GetAgentRequest};

use crate::client::{agent_client, connect, unary, BearerToken};
use crate::local_cluster::{LocalCluster, NodeSetup};
use crate::machines::Percentiles;

const MAX_AGENTS: usize = 100_000;
/// An agent not assigned within this long counts as lost and ends the run with an error.
const ASSIGN_DEADLINE_MS: u64 = 10_000;
/// Slots per node: far more than the agents of a run, so every agent finds a free slot (the
/// bench's agents fail at their missing repository and free theirs anyway).
const SLOTS_PER_NODE: u32 = 10_000;
/// A local repository that does not exist, under a directory the nodes allow: an agent fails at
/// its first fetch, at once and without leaving the machine.
const BENCH_REPOSITORY: &str = "file:///tmp/flotilla-bench-assign-missing/repo.git";
const BENCH_CONFIG: &str =
    "[models.bench]\nprovider = \"scripted\"\nscript = \"bench.json\"\n\n[repos]\nallow_local = [\"/tmp\"]\n";

#[derive(clap::Args, Debug)]
pub struct BenchAssignArgs {
    /// agents to create, one after the other
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// nodes of the loopback cluster
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// the `flotilla` executable the cluster runs; by default the one next to this executable
    #[arg(long, env = "FLOTILLA_BINARY")]
    pub flotilla_binary: Option<PathBuf>,
}

pub async fn run_assign(args: BenchAssignArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.agents > MAX_AGENTS {
        bail!("--agents must be between 1 and {MAX_AGENTS}, found {}", args.agents);
    }
    if args.nodes == 0 || args.nodes > 9 {
        bail!("--nodes must be between 1 and 9, found {}", args.nodes);
    }
    let flotilla_binary = match &args.flotilla_binary {
        Some(path) => path.clone(),
        None => crate::create::sibling_flotilla_binary()?,
    };
    let setup = NodeSetup {
        slots: SLOTS_PER_NODE,
        config: Some(BENCH_CONFIG.to_string()),
    };
    let cluster = LocalCluster::start_with(&flotilla_binary, args.nodes, setup)
        .await
        .context("starting the loopback cluster")?;
    let token = BearerToken::new(Some(cluster.admin_token()))?;
    let mut clients = Vec::new();
    for endpoint in cluster.endpoints() {
        clients.push((endpoint.clone(), agent_client(connect(&endpoint).await?, token.clone())));
    }
    let mut ack_ms = Vec::with_capacity(args.agents);
    let mut assigned_ms = Vec::with_capacity(args.agents);
    for index in 0..args.agents {
        let (endpoint, client) = &mut clients[index % args.nodes];
        let request = CreateAgentRequest {
            prompt: "Benchmark agent: reply that there is nothing to do.".to_string(),
            repository: BENCH_REPOSITORY.to_string(),
            base_branch: "main".to_string(),
            name: format!("assign-{index}"),
            ..Default::default()
        };
        let started = Instant::now();
        let created = unary(endpoint, client.create_agent(request)).await?;
        let acknowledged = Instant::now();
        let id = created
            .agent
            .map(|agent| agent.id)
            .context("a create answered without its agent")?;
        loop {
            let agent = unary(endpoint, client.get_agent(GetAgentRequest { id: id.clone() })).await?;
            if agent.assignment.is_some() {
                break;
            }
            if acknowledged.elapsed() > Duration::from_millis(ASSIGN_DEADLINE_MS) {
                bail!("agent {id} was not assigned within {ASSIGN_DEADLINE_MS} ms of its create");
            }
        }
        ack_ms.push((acknowledged - started).as_secs_f64() * 1000.0);
        assigned_ms.push(acknowledged.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "{} nodes, {} agents one at a time ({} build of flotilla-bench)",
        args.nodes,
        args.agents,
        crate::build_profile()
    );
    if let Some(figures) = Percentiles::of(&ack_ms) {
        println!("create acknowledged:            {figures}");
    }
    if let Some(figures) = Percentiles::of(&assigned_ms) {
        println!("acknowledged -> assigned (seen): {figures}");
    }
    Ok(())
}
