//! `flotilla-lab`: a multi-region Flotilla cluster on one machine, each node in a network
//! namespace of its own, with a user-space WAN delay between regions. `deploy/local/cluster`
//! wraps it; see deploy/README.md. Needs root, `ip`, `nft` and `nsenter`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use flotilla_tests::local_cluster::{
    parse_latency, parse_regions, process_alive, LocalNode, LocalState, ENV_FILE, KEEPER_LOG,
};
use flotilla_tests::netlab::{self, LinkFaults};
use flotilla_tests::{ClusterOptions, TestCluster};

mod lab_bench;
mod lab_status;

/// How long `up` waits for the keeper to report every node up.
const UP_DEADLINE: Duration = Duration::from_secs(180);
/// How long `down` lets the keeper stop the nodes before it removes what is left itself.
const DOWN_DEADLINE: Duration = Duration::from_secs(60);
/// How long a node gets to stop cleanly (hand its agents over) before it is killed.
const NODE_STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Left by `down --keep-data` for the keeper: keep the nodes' directory.
const KEEP_DATA_MARKER: &str = "keep-data";

#[derive(Parser, Debug)]
#[command(name = "flotilla-lab", about = "A multi-region Flotilla cluster on one machine")]
struct Cli {
    /// Where the cluster's record, node data and logs live.
    #[arg(
        long,
        env = "FLOTILLA_LOCAL_DIR",
        default_value = "/tmp/flotilla-local",
        global = true
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand, Debug)]
enum LabCommand {
    /// Start the nodes, join them and set the delay between regions; returns once all are up.
    Up(UpArgs),
    /// The recorded nodes, whether each runs, and the cluster's view of its members.
    Status,
    /// Stop the nodes and remove every namespace, bridge and process the cluster made.
    Down {
        /// Keep the nodes' data directories and logs.
        #[arg(long)]
        keep_data: bool,
    },
    /// Create latency p50/p99 through each region's nodes.
    Bench(lab_bench::BenchArgs),
    /// Runs the cluster in the foreground (what `up` starts in the background).
    #[command(hide = true)]
    Keep(UpArgs),
}

#[derive(Args, Debug, Clone)]
struct UpArgs {
    /// Regions and their node counts; the first region's first node bootstraps the cluster.
    #[arg(long, default_value = "eu=3,us=2", value_parser = |text: &str| parse_regions(text).map(RegionList))]
    regions: RegionList,
    /// One-way delay added to every link between two regions.
    #[arg(long, default_value = "40ms", value_parser = parse_latency)]
    wan_latency: Duration,
    /// Each chunk's delay varies within ± this.
    #[arg(long, default_value = "0", value_parser = parse_latency)]
    jitter: Duration,
    /// A node config (TOML) for every node; by default a scripted model that holds its
    /// machine, and local repositories allowed under the system's temporary directory.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Agent slots per node.
    #[arg(long, default_value_t = 8)]
    slots: u32,
}

/// One region name per node, in order.
#[derive(Clone, Debug)]
struct RegionList(Vec<String>);

impl UpArgs {
    /// The arguments as `keep` takes them again.
    fn to_args(&self) -> Vec<String> {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for region in &self.regions.0 {
            match counts.last_mut() {
                Some((name, count)) if name == region => *count += 1,
                _ => counts.push((region.clone(), 1)),
            }
        }
        let regions = counts
            .iter()
            .map(|(name, count)| format!("{name}={count}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "--regions".to_string(),
            regions,
            "--wan-latency".to_string(),
            format!("{}us", self.wan_latency.as_micros()),
            "--jitter".to_string(),
            format!("{}us", self.jitter.as_micros()),
            "--slots".to_string(),
            self.slots.to_string(),
        ];
        if let Some(config) = &self.config {
            args.push("--config".to_string());
            args.push(config.display().to_string());
        }
        args
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        LabCommand::Up(args) => up(&cli.state_dir, &args),
        LabCommand::Status => lab_status::status(&cli.state_dir),
        LabCommand::Down { keep_data } => down(&cli.state_dir, keep_data),
        LabCommand::Bench(args) => {
            runtime().and_then(|runtime| runtime.block_on(lab_bench::bench(&cli.state_dir, &args)))
        }
        LabCommand::Keep(args) => runtime().and_then(|runtime| runtime.block_on(keep(&cli.state_dir, args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("flotilla-lab: {message}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|error| format!("could not start a runtime: {error}"))
}

/// Starts the keeper in a session of its own and waits until it has recorded the cluster.
fn up(state_dir: &Path, args: &UpArgs) -> Result<(), String> {
    if let Some(state) = LocalState::read(state_dir)? {
        if process_alive(state.keeper_pid) {
            return Err(format!(
                "a local cluster is already up (keeper pid {}, record {}); run `down` first",
                state.keeper_pid,
                state_dir.display()
            ));
        }
        eprintln!("removing what a stopped local cluster left behind");
        down(state_dir, false)?;
    }
    let swept = netlab::sweep_dead_labs();
    if !swept.is_empty() {
        eprintln!("removed {} namespaces of labs whose owner is gone", swept.len());
    }
    std::fs::create_dir_all(state_dir).map_err(|error| format!("could not create {}: {error}", state_dir.display()))?;
    let log_path = state_dir.join(KEEPER_LOG);
    let log = std::fs::File::create(&log_path)
        .map_err(|error| format!("could not create {}: {error}", log_path.display()))?;
    let log_for_stderr = log.try_clone().map_err(|error| error.to_string())?;
    let exe = std::env::current_exe().map_err(|error| format!("could not find this program: {error}"))?;
    // The nodes run the `flotilla` built beside this program unless FLOTILLA_BIN names one.
    let sibling = exe.with_file_name("flotilla");
    let node_binary = std::env::var_os("FLOTILLA_BIN").unwrap_or_else(|| sibling.clone().into_os_string());
    if !Path::new(&node_binary).is_file() {
        return Err(format!(
            "no flotilla binary at {}: build it (`cargo build --bin flotilla`) or set FLOTILLA_BIN",
            Path::new(&node_binary).display()
        ));
    }
    let mut keeper = {
        use std::os::unix::process::CommandExt;
        Command::new(&exe)
            .env("FLOTILLA_BIN", &node_binary)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("keep")
            .args(args.to_args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            // Its own process group: a Ctrl-C in the shell that ran `up` does not reach it.
            .process_group(0)
            .spawn()
            .map_err(|error| format!("could not start the keeper: {error}"))?
    };
    let started = Instant::now();
    loop {
        if let Some(state) = LocalState::read(state_dir)? {
            print_summary(state_dir, &state, started.elapsed());
            return Ok(());
        }
        if let Ok(Some(status)) = keeper.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(format!(
                "the cluster did not come up (keeper {status}); last lines of {}:\n{}",
                log_path.display(),
                tail.join("\n")
            ));
        }
        if started.elapsed() > UP_DEADLINE {
            return Err(format!(
                "the cluster was not up after {UP_DEADLINE:?}; see {} and run `down`",
                log_path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_summary(state_dir: &Path, state: &LocalState, took: Duration) {
    println!(
        "{} nodes up in {:.1}s; {} ms between regions (jitter {} ms), none inside one",
        state.nodes.len(),
        took.as_secs_f64(),
        state.wan_latency_ms,
        state.jitter_ms
    );
    for node in &state.nodes {
        println!(
            "  node {}  {:<8} {}  ({})",
            node.id, node.region, node.endpoint, node.namespace
        );
    }
    println!(
        "Use it from this shell with:\n  source {}",
        state_dir.join(ENV_FILE).display()
    );
}

/// The keeper: runs the cluster until SIGTERM or SIGINT, then stops the nodes and the lab.
async fn keep(state_dir: &Path, args: UpArgs) -> Result<(), String> {
    let config = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|error| format!("could not read --config {}: {error}", path.display()))?,
        ),
        None => None,
    };
    let options = ClusterOptions {
        regions: args.regions.0.clone(),
        slots: args.slots,
        config,
        network_lab: true,
        parent_dir: Some(state_dir.to_path_buf()),
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(args.regions.0.len(), options).await;
    let lab = cluster.lab.as_ref().ok_or("the cluster has no network lab")?;
    for (a, b) in lab.region_pairs() {
        lab.set_link(
            &a,
            &b,
            LinkFaults {
                delay: args.wan_latency,
                loss_per_mille: 0,
                jitter: args.jitter,
            },
        );
    }
    let state = record(&cluster, &args);
    write_env_file(state_dir, &state)?;
    state.write(state_dir)?;
    eprintln!("up: {} nodes", state.nodes.len());

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| format!("could not watch SIGTERM: {error}"))?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("stopping the nodes");
    for node in cluster.nodes.iter_mut().filter(|node| node.pid().is_some()) {
        node.begin_terminate();
    }
    for node in cluster.nodes.iter_mut().filter(|node| node.pid().is_some()) {
        node.wait_exit(NODE_STOP_DEADLINE);
    }
    let _ = std::fs::remove_file(state_dir.join(flotilla_tests::local_cluster::STATE_FILE));
    if state_dir.join(KEEP_DATA_MARKER).exists() {
        cluster.dir.disable_cleanup(true);
        let _ = std::fs::remove_file(state_dir.join(KEEP_DATA_MARKER));
    }
    drop(cluster);
    eprintln!("down");
    Ok(())
}

fn record(cluster: &TestCluster, args: &UpArgs) -> LocalState {
    let lab = cluster.lab.as_ref().expect("the keeper's cluster runs in a lab");
    let nodes = cluster
        .nodes
        .iter()
        .map(|node| {
            let place = lab.node(node.id);
            LocalNode {
                id: node.id,
                region: place.region.clone(),
                endpoint: node.endpoint(),
                namespace: place.namespace.clone(),
                pid: node.pid(),
                data_dir: node.data_dir.clone(),
                log: node.log_path().to_path_buf(),
            }
        })
        .collect();
    LocalState {
        keeper_pid: std::process::id(),
        bridge: lab.bridge().to_string(),
        nodes,
        ca_cert: cluster.ca_path(),
        admin_token_file: cluster.dir.path().join("node1").join("admin.token"),
        cluster_dir: cluster.dir.path().to_path_buf(),
        wan_latency_ms: u64::try_from(args.wan_latency.as_millis()).unwrap_or(u64::MAX),
        jitter_ms: u64::try_from(args.jitter.as_millis()).unwrap_or(u64::MAX),
    }
}

fn write_env_file(state_dir: &Path, state: &LocalState) -> Result<(), String> {
    let first = state.nodes.first().ok_or("the cluster has no nodes")?;
    let text = format!(
        "# Written by `deploy/local/cluster up`: the first node, its CA and the cluster-admin key.\n\
         export FLOTILLA_ENDPOINT={}\nexport FLOTILLA_CA_CERT={}\nexport FLOTILLA_TOKEN=\"$(cat {})\"\n",
        first.endpoint,
        state.ca_cert.display(),
        state.admin_token_file.display()
    );
    let path = state_dir.join(ENV_FILE);
    std::fs::write(&path, text).map_err(|error| format!("could not write {}: {error}", path.display()))
}

/// Stops the keeper and waits for it; when it is gone or does not stop, removes what it made.
fn down(state_dir: &Path, keep_data: bool) -> Result<(), String> {
    let Some(state) = LocalState::read(state_dir)? else {
        let swept = netlab::sweep_dead_labs();
        println!(
            "no local cluster is recorded in {}; removed {} namespaces of labs whose owner is gone",
            state_dir.display(),
            swept.len()
        );
        return Ok(());
    };
    if process_alive(state.keeper_pid) {
        if keep_data {
            let marker = state_dir.join(KEEP_DATA_MARKER);
            std::fs::write(&marker, b"").map_err(|error| format!("could not write {}: {error}", marker.display()))?;
        }
        signal(state.keeper_pid, libc::SIGTERM);
        let started = Instant::now();
        while process_alive(state.keeper_pid) && started.elapsed() < DOWN_DEADLINE {
            std::thread::sleep(Duration::from_millis(100));
        }
        if process_alive(state.keeper_pid) {
            eprintln!("the keeper did not stop within {DOWN_DEADLINE:?}; killing it");
            signal(state.keeper_pid, libc::SIGKILL);
        }
    }
    remove_leftovers(&state);
    let _ = std::fs::remove_file(state_dir.join(flotilla_tests::local_cluster::STATE_FILE));
    let _ = std::fs::remove_file(state_dir.join(ENV_FILE));
    if keep_data {
        println!("kept the nodes' data and logs in {}", state.cluster_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&state.cluster_dir);
    }
    println!("the local cluster is down");
    Ok(())
}

/// What a killed keeper leaves: nodes in their namespaces, the namespaces, the bridge.
fn remove_leftovers(state: &LocalState) {
    for node in &state.nodes {
        netlab::kill_processes_in(&node.namespace);
        if Path::new("/run/netns").join(&node.namespace).exists() {
            let _ = Command::new("ip").args(["netns", "del", &node.namespace]).status();
        }
    }
    if Path::new("/sys/class/net").join(&state.bridge).exists() {
        let _ = Command::new("ip").args(["link", "del", &state.bridge]).status();
    }
}

// Unsafe: kill(2) on the keeper, which is not this process's child.
#[allow(unsafe_code)]
fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: `kill` has no memory-safety preconditions; a process gone meanwhile is ESRCH.
    let _ = unsafe { libc::kill(pid, signal) };
}
