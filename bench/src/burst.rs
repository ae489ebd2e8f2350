//! `flotilla-bench burst`: many agents at once on a loopback cluster with fewer slots than
//! agents, real machines and the fake model server. It prints the worst and 99th-percentile
//! `cluster status` latency during the burst, whether the leader changed, how many agents run,
//! wait or failed, and the machine start rate.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_tests::burst::{hold_script, node_config, run_burst, BurstPlan};
use flotilla_tests::fakes::{create_bare_repository, FakeModelServer};

use crate::local_cluster::{LocalCluster, NodeSetup};

const MAX_BURST_AGENTS: usize = 100_000;
const MAX_BURST_NODES: usize = 16;

#[derive(clap::Args, Debug)]
pub struct BenchBurstArgs {
    /// agents submitted at once
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// slots of the whole cluster, spread evenly over the nodes
    #[arg(long, default_value_t = 400)]
    pub slots: u32,
    /// nodes of the loopback cluster
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// how long to wait for every slot to run an agent
    #[arg(long, default_value_t = 600)]
    pub settle_seconds: u64,
    /// the `flotilla` executable the cluster runs; by default the one next to this executable
    #[arg(long, env = "FLOTILLA_BINARY")]
    pub flotilla_binary: Option<PathBuf>,
}

fn validate(args: &BenchBurstArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.agents > MAX_BURST_AGENTS {
        bail!(
            "--agents must be between 1 and {MAX_BURST_AGENTS}, found {}",
            args.agents
        );
    }
    if args.nodes == 0 || args.nodes > MAX_BURST_NODES {
        bail!("--nodes must be between 1 and {MAX_BURST_NODES}, found {}", args.nodes);
    }
    if args.slots == 0 || (args.slots as usize) < args.nodes {
        bail!(
            "--slots must give every node at least one slot, found {} for {} nodes",
            args.slots,
            args.nodes
        );
    }
    Ok(())
}

pub async fn run_burst_bench(args: BenchBurstArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let flotilla_binary = match &args.flotilla_binary {
        Some(path) => path.clone(),
        None => crate::create::sibling_flotilla_binary()?,
    };
    let model = FakeModelServer::start().await;
    model.set_script(hold_script());
    let slots_per_node = args.slots / args.nodes as u32;
    let setup = NodeSetup {
        slots: slots_per_node,
        config: Some(node_config(&model)),
    };
    println!(
        "starting {} nodes with {slots_per_node} slots each ({})",
        args.nodes,
        flotilla_binary.display()
    );
    let cluster = LocalCluster::start_with(&flotilla_binary, args.nodes, setup)
        .await
        .context("starting the loopback cluster")?;
    let origin = create_bare_repository(cluster.directory(), "burst", &[("README.md", "burst\n")]);
    let plan = BurstPlan {
        endpoints: cluster.endpoints(),
        token: cluster.admin_token().to_string(),
        agents: args.agents,
        repository: format!("file://{}", origin.display()),
        prompt: "Hold the machine".to_string(),
        settle_deadline: Duration::from_secs(args.settle_seconds),
        settled_started: (slots_per_node as usize * args.nodes).min(args.agents),
    };
    println!("submitting {} agents", args.agents);
    let report = tokio::select! {
        report = run_burst(&plan) => report,
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("listening for Ctrl-C")?;
            bail!("interrupted")
        }
    };
    print!("{}", report.render());
    for error in report.create_errors.iter().chain(report.failed.iter()).take(10) {
        println!("  {error}");
    }
    Ok(())
}
