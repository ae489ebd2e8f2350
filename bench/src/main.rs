//! `flotilla-bench`: Flotilla's load generators and cost figures, a binary of their own so that
//! no benchmark code ships in the node. Each subcommand prints figures and asserts nothing
//! about time.
//!
//! - `compare`: the write path side by side with etcd's, on loopback clusters of each, with
//!   the same load generator;
//! - `create`: CreateAgent throughput and latency on loopback clusters of `flotilla node`
//!   processes (or an existing cluster);
//! - `machines`: machine start times (warm and cold) and how many idle machines a node holds;
//! - `turns`: the turn loop's overhead per turn, concurrent agents per node, events per second
//!   to a watcher, with the node's pieces running in this process;
//! - `burst`: many agents at once on fewer slots, with real machines: `cluster status` latency,
//!   leader changes, agents running, queued and failed, machine start rate;
//! - `plugins`: the cost of compiling, loading and calling a plugin component;
//! - `placement`: the scheduler's pure placement decision over a simulated cluster of 1,000
//!   nodes, on one thread;
//! - `assign`: from a create's acknowledgement to its agent's assignment on a loopback cluster;
//! - `memory`: bytes per idle and per running agent, and a node with a large history of ended
//!   agents: its restart time and `ListAgents` latency.
//! - `watch`: many concurrent `WatchAgent` streams on one node: delivery latency from commit,
//!   memory per watcher, the node's responsiveness meanwhile.
//! - `provision`: a burst of scripted agents on one node with real machines, from create to
//!   their first model call, per stage.
//! - `spawn`: what starting a process costs a process of a given size, with `fork` (a
//!   `pre_exec` step, as the sandbox starts bubblewrap and commands) and with `posix_spawn`.

mod assign;
mod burst;
mod client;
mod compare;
mod cpu;
mod create;
mod disk_sync;
mod etcd_cluster;
mod load;
mod local_cluster;
mod machines;
mod memory;
mod placement;
mod plugins;
mod provision;
mod run_limits;
mod spawn;
mod turns;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The same allocator as the node, so that `turns`, which runs the node's pieces in this
// process, measures what a node would.
#[global_allocator]
// `memory` counts the heap's live bytes through it.
static GLOBAL_ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

#[derive(Parser)]
#[command(
    name = "flotilla-bench",
    version,
    about = "Measure Flotilla (prints figures; asserts nothing)"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// CreateAgent throughput and latency on loopback clusters.
    Create(create::BenchCreateArgs),
    /// Writes per second and latency of Flotilla and etcd, side by side on loopback clusters.
    Compare(compare::BenchCompareArgs),
    /// Machine start times (warm and cold) and how many idle machines a node holds.
    Machines(machines::BenchMachinesArgs),
    /// Turn-loop overhead per turn, concurrent agents per node, events per second to a watcher.
    Turns(turns::BenchTurnsArgs),
    /// Plugin compile, load and call cost, with and without the pooling allocator.
    Plugins(plugins::BenchPluginsArgs),
    /// A burst of agents past the cluster's slots: status latency, leader, queue, start rate.
    Burst(burst::BenchBurstArgs),
    /// The scheduler's pure placement decision over a simulated cluster, on one thread.
    Placement(placement::BenchPlacementArgs),
    /// From a create's acknowledgement to the agent's assignment, on a loopback cluster.
    Assign(assign::BenchAssignArgs),
    /// Memory per idle and per running agent; a node with a large history: restart and lists.
    Memory(memory::BenchMemoryArgs),
    /// Many concurrent watch streams on one node: delivery latency, memory per watcher.
    Watch(watch::BenchWatchArgs),
    /// A burst of agents on one node with real machines: create to first model call, per stage.
    Provision(provision::BenchProvisionArgs),
    /// What starting a process costs a process of a given size: fork against posix_spawn.
    Spawn(spawn::BenchSpawnArgs),
    /// What one synced write costs this disk: a growing file against one written with zeros first.
    DiskSync(disk_sync::BenchDiskSyncArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Machines mount layers; like a node's, they live and die with this process.
    let mounts_layers = matches!(cli.command, BenchCommand::Machines(_) | BenchCommand::Turns(_));
    if mounts_layers {
        if let Err(error) = flotilla_sandbox::enter_private_mount_namespace() {
            eprintln!("error: machine layers need a mount namespace of this process's own (run as root): {error}");
            return ExitCode::FAILURE;
        }
    }
    if matches!(cli.command, BenchCommand::Provision(_)) {
        // Before any thread starts: the node it spawns inherits its log settings.
        provision::prepare_node_environment();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    init_logging();
    let result = runtime.block_on(async move {
        match cli.command {
            BenchCommand::Create(args) => create::run_create(args).await,
            BenchCommand::Compare(args) => compare::run_compare(args).await,
            BenchCommand::Machines(args) => machines::run_machines(args).await,
            BenchCommand::Turns(args) => turns::run_turns(args).await,
            BenchCommand::Plugins(args) => plugins::run_plugins(args).await,
            BenchCommand::Burst(args) => burst::run_burst_bench(args).await,
            // Pure computation on this thread: no runtime worker is involved.
            BenchCommand::Placement(args) => placement::run_placement(args),
            BenchCommand::Assign(args) => assign::run_assign(args).await,
            BenchCommand::Memory(args) => memory::run_memory(args).await,
            BenchCommand::Watch(args) => watch::run_watch(args).await,
            BenchCommand::Provision(args) => provision::run_provision(args).await,
            // On this thread, as a node's runtime worker starts a machine's command.
            BenchCommand::Spawn(args) => spawn::run_spawn(args),
            BenchCommand::DiskSync(args) => disk_sync::run_disk_sync(args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The build this program is (and, unless another binary was named, the `flotilla` next to it):
/// what its figures are printed with.
pub(crate) fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}
