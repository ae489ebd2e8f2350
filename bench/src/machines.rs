//! `flotilla-bench machines`: time from `create` to the first command's output, warm (the
//! install layer exists) and cold (the install runs first), beside a whole `crun run` (or
//! `runc run`, where crun refuses the host) of `/bin/true` in the same run; then the same warm
//! start with many idle machines on the node (how many it holds before memory or processes run
//! short, and whether a start stays as fast). Needs root. Prints figures; asserts nothing about
//! time.

mod peer;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use flotilla_sandbox::{
    BaseImage, BaseLayer, BwrapConfig, BwrapDriver, DiskBacking, EnvironmentConfig, ExecOutput, ExecRequest,
    InstallLayerCache, InstallRequest, Layer, MachineDriver, MachineHandle, MachineSpec,
};

use peer::Peer;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub fn of(samples_ms: &[f64]) -> Option<Self> {
        if samples_ms.is_empty() {
            return None;
        }
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |quantile: f64| {
            let index = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[index]
        };
        Some(Percentiles {
            count: sorted.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            min_ms: sorted[0],
            max_ms: sorted[sorted.len() - 1],
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
        })
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        write!(
            formatter,
            "n={} p50 {:.1} ms  p99 {:.1} ms  min {:.1} ms  max {:.1} ms  mean {:.1} ms",
            self.count, self.p50_ms, self.p99_ms, self.min_ms, self.max_ms, self.mean_ms
        )
    }
}

/// Warm starts timed in one phase, and as many runs of the peer (after them, or interleaved).
#[derive(Debug, Clone, PartialEq)]
pub struct WarmPhase {
    /// create → first command's output, from an existing install layer.
    pub warm_start: Option<Percentiles>,
    /// The two parts of a warm start: `create` returning (layers mounted, init ready) ...
    pub create: Option<Percentiles>,
    /// ... and the first command (`cat` of a file from the install layer) entering and running.
    pub first_command: Option<Percentiles>,
    /// destroy after a warm start.
    pub teardown: Option<Percentiles>,
    /// A whole `run` of `/bin/true` by the peer runtime.
    pub peer_run: Option<Percentiles>,
}

impl WarmPhase {
    fn print(&self, title: &str, peer_name: &str) {
        println!("{title}");
        let line = |label: &str, figures: &Option<Percentiles>| match figures {
            Some(figures) => println!("  {label:<18} {figures}"),
            None => println!("  {label:<18} not measured"),
        };
        line("warm start (ours)", &self.warm_start);
        line("  create", &self.create);
        line("  first command", &self.first_command);
        line("  teardown", &self.teardown);
        line(&format!("{peer_name} run (peer)"), &self.peer_run);
        if let (Some(ours), Some(peer)) = (&self.warm_start, &self.peer_run) {
            println!(
                "  {:<18} p50 {:.2}x  p99 {:.2}x",
                "ratio ours/peer",
                ours.p50_ms / peer.p50_ms,
                ours.p99_ms / peer.p99_ms
            );
        }
    }
}

/// What every start of the bench shares: one driver, its base image, a workspace and the
/// install layer warm starts reuse.
struct Bench {
    driver: Arc<BwrapDriver>,
    base: BaseLayer,
    workspace: std::path::PathBuf,
    cache: InstallLayerCache,
    install_layer: Option<Layer>,
}

fn install_config(marker: &str) -> EnvironmentConfig {
    EnvironmentConfig {
        install: Some(format!(
            "mkdir -p /opt/bench && echo {marker} > /opt/bench/marker && mkdir -p deps && echo x > deps/x"
        )),
        ..EnvironmentConfig::default()
    }
}

impl Bench {
    async fn new(root: &Path, disk: DiskBacking) -> anyhow::Result<Bench> {
        let mut config = BwrapConfig::new(root.join("driver"));
        config.disk = disk;
        let driver = Arc::new(BwrapDriver::new(config)?);
        let base = driver.prepare_base(BaseImage::Host).await?;
        let workspace = root.join("workspace");
        std::fs::create_dir_all(&workspace).with_context(|| format!("creating {}", workspace.display()))?;
        std::fs::write(workspace.join("README"), "bench\n")
            .with_context(|| format!("writing a README in {}", workspace.display()))?;
        let cache = InstallLayerCache::new(driver.clone(), driver.install_layers_dir())?;
        let request = InstallRequest::new(
            "bench-warm",
            "bench-tree",
            install_config("warm"),
            base.clone(),
            &workspace,
        );
        let install_layer = cache.get_or_build(&request).await?.layer;
        Ok(Bench {
            driver,
            base,
            workspace,
            cache,
            install_layer,
        })
    }

    /// `warm_starts` warm starts, then as many runs of `peer` (or each start followed by one
    /// run of the peer, when `interleave`).
    async fn warm_phase(&self, warm_starts: usize, peer: &Peer, interleave: bool) -> anyhow::Result<WarmPhase> {
        let mut warm_ms = Vec::with_capacity(warm_starts);
        let mut create_ms = Vec::with_capacity(warm_starts);
        let mut first_command_ms = Vec::with_capacity(warm_starts);
        let mut teardown_ms = Vec::with_capacity(warm_starts);
        let mut peer_ms = Vec::with_capacity(warm_starts);
        for _ in 0..warm_starts {
            let mut spec = MachineSpec::new("bench-warm", self.base.clone(), &self.workspace);
            spec.install_layer = self.install_layer.clone();
            let started = Instant::now();
            let machine = self.driver.create(spec).await?;
            let created = Instant::now();
            let output = self
                .driver
                .exec(&machine, ExecRequest::new("cat /opt/bench/marker"))
                .await?;
            let first_output = Instant::now();
            create_ms.push((created - started).as_secs_f64() * 1000.0);
            first_command_ms.push((first_output - created).as_secs_f64() * 1000.0);
            self.driver.destroy(&machine).await?;
            warm_ms.push((first_output - started).as_secs_f64() * 1000.0);
            teardown_ms.push(first_output.elapsed().as_secs_f64() * 1000.0);
            check_output(&output, "warm")?;
            if interleave {
                peer_ms.push(peer.run_once().await?);
            }
        }
        while peer_ms.len() < warm_starts {
            peer_ms.push(peer.run_once().await?);
        }
        Ok(WarmPhase {
            warm_start: Percentiles::of(&warm_ms),
            create: Percentiles::of(&create_ms),
            first_command: Percentiles::of(&first_command_ms),
            teardown: Percentiles::of(&teardown_ms),
            peer_run: Percentiles::of(&peer_ms),
        })
    }

    /// install (install layer build) → create → first command's output, `cold_starts` times.
    async fn cold_starts(&self, cold_starts: usize) -> anyhow::Result<Option<Percentiles>> {
        let mut cold_ms = Vec::with_capacity(cold_starts);
        for _ in 0..cold_starts {
            let started = Instant::now();
            let request = InstallRequest::new(
                format!("bench-cold-{}", ulid::Ulid::new()),
                "bench-tree",
                install_config("cold"),
                self.base.clone(),
                &self.workspace,
            );
            let install_layer = self.cache.get_or_build(&request).await?;
            let mut spec = MachineSpec::new("bench-cold", self.base.clone(), &self.workspace);
            spec.install_layer = install_layer.layer.clone();
            let machine = self.driver.create(spec).await?;
            let output = self
                .driver
                .exec(&machine, ExecRequest::new("cat /opt/bench/marker"))
                .await?;
            cold_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            self.driver.destroy(&machine).await?;
            if let Some(layer) = install_layer.layer {
                let _ = std::fs::remove_dir_all(layer.path);
            }
            check_output(&output, "cold")?;
        }
        Ok(Percentiles::of(&cold_ms))
    }

    /// Starts idle machines (init plus one background process each) until `max_idle`, memory or
    /// processes run short, and prints how many and what each cost in memory.
    async fn start_idle(&self, max_idle: usize) -> Vec<MachineHandle> {
        let memory_before = available_memory_bytes().unwrap_or(0);
        let floor = memory_before / 10;
        let mut machines = Vec::new();
        let mut stopped_by = format!("the --max-idle cap of {max_idle}");
        let started = Instant::now();
        while machines.len() < max_idle {
            if available_memory_bytes().is_some_and(|available| available < floor) {
                stopped_by = "available memory falling under 10%".to_string();
                break;
            }
            let spec = MachineSpec::new(format!("idle-{}", machines.len()), self.base.clone(), &self.workspace);
            match self.driver.create(spec).await {
                Ok(machine) => {
                    let shell = self
                        .driver
                        .exec(&machine, ExecRequest::new("nohup sleep 1000000 >/dev/null 2>&1 &"))
                        .await;
                    machines.push(machine);
                    if let Err(error) = shell {
                        stopped_by = format!("a command failing: {error}");
                        break;
                    }
                }
                Err(error) => {
                    stopped_by = format!("machine creation failing: {error}");
                    break;
                }
            }
        }
        let memory_after = available_memory_bytes().unwrap_or(0);
        let count = machines.len().max(1) as u64;
        println!(
            "idle machines held: {} in {:.1}s (stopped by {stopped_by}); memory per idle machine ≈ {} KiB",
            machines.len(),
            started.elapsed().as_secs_f64(),
            memory_before.saturating_sub(memory_after) / count / 1024
        );
        machines
    }
}

fn check_output(output: &ExecOutput, expected: &str) -> anyhow::Result<()> {
    if output.success() && output.stdout_text().trim() == expected {
        return Ok(());
    }
    bail!(
        "the bench's first command: expected {expected:?}, got {} with {:?}",
        output.outcome(),
        output.last_lines(5)
    )
}

#[derive(clap::Args, Debug)]
pub struct BenchMachinesArgs {
    /// Warm starts measured per phase (machine from an existing install layer to its first
    /// command's output), each beside one whole run of the peer runtime.
    #[arg(long, default_value_t = 100)]
    pub warm: usize,
    /// Cold starts measured (install runs first).
    #[arg(long, default_value_t = 10)]
    pub cold: usize,
    /// Idle machines started before the warm starts are timed again (fewer when memory or
    /// processes run short first); 0 skips that phase.
    #[arg(long, default_value_t = 300)]
    pub max_idle: usize,
    /// Disk of each machine's own layer: tmpfs or ext4.
    #[arg(long, default_value = "tmpfs")]
    pub disk: String,
    /// Follow each of our warm starts with one run of the peer, instead of timing all of ours
    /// and then all of the peer's: each side then also pays for the other's cgroup teardown,
    /// which the kernel finishes after the call that asked for it has returned.
    #[arg(long)]
    pub interleave: bool,
    /// Times the whole sequence (empty node, then with idle machines) runs; the figures of each
    /// round are printed, then the median of their ratios: one round on a shared or virtual
    /// host swings by a few tenths.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// MiB of memory this process holds resident (written once) for the whole run, so that
    /// machines start from a process the size of a node (about 100 MB with its plugins
    /// compiled): a start that forked this process paid for its size (see `flotilla-bench
    /// spawn`).
    #[arg(long, default_value_t = 0)]
    pub ballast_mib: usize,
}

/// The ratios of one round, for the summary over rounds.
#[derive(Debug, Clone, Copy, Default)]
struct RoundRatios {
    ours_vs_peer_empty: Option<f64>,
    ours_vs_peer_dense: Option<f64>,
    ours_dense_vs_empty: Option<f64>,
    peer_dense_vs_empty: Option<f64>,
}

fn p50_ratio(numerator: &Option<Percentiles>, denominator: &Option<Percentiles>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(numerator), Some(denominator)) if denominator.p50_ms > 0.0 => Some(numerator.p50_ms / denominator.p50_ms),
        _ => None,
    }
}

/// The median of the values present, and the values themselves, as one line.
fn summary_line(label: &str, values: impl Iterator<Item = Option<f64>>) -> String {
    let mut present: Vec<f64> = values.flatten().collect();
    if present.is_empty() {
        return format!("  {label:<28} not measured");
    }
    let listed: Vec<String> = present.iter().map(|value| format!("{value:.2}x")).collect();
    present.sort_by(f64::total_cmp);
    let middle = present.len() / 2;
    let median = if present.len() % 2 == 1 {
        present[middle]
    } else {
        (present[middle - 1] + present[middle]) / 2.0
    };
    format!("  {label:<28} median {median:.2}x  ({})", listed.join(", "))
}

/// Memory the kernel says is available, in bytes.
fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kibibytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kibibytes * 1024)
}

/// Most rounds one run takes (each starts and removes the idle machines again).
const MAX_ROUNDS: usize = 20;

pub async fn run_machines(args: BenchMachinesArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.rounds > MAX_ROUNDS {
        anyhow::bail!("--rounds: expected 1 to {MAX_ROUNDS}, found {}", args.rounds);
    }
    let disk = match args.disk.as_str() {
        "tmpfs" => DiskBacking::Tmpfs,
        "ext4" => DiskBacking::Ext4Image,
        other => anyhow::bail!("--disk: expected tmpfs or ext4, found {other:?}"),
    };
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-machines-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let peer = Peer::prepare(dir.path()).await?;
    println!("peer: {} ({}); {}", peer.name, peer.version, peer.why);
    // Every page written, so resident; kept until the run ends.
    let ballast = vec![1u8; args.ballast_mib << 20];
    if args.ballast_mib > 0 {
        println!(
            "this process holds {} MiB resident while it starts machines",
            args.ballast_mib
        );
    }
    let bench = Bench::new(dir.path(), disk).await?;
    println!(
        "bwrap machines (host base image, cgroup {}, disk {disk:?}); peer: whole `{} run` of /bin/true",
        bench.driver.cgroup_version(),
        peer.name
    );
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            println!("round {round} of {}", args.rounds);
        }
        rounds.push(run_round(&bench, &peer, &args).await?);
    }
    if args.rounds > 1 {
        println!("over {} rounds (p50 ratios)", args.rounds);
        let lines = [
            (
                "ours/peer, empty node",
                rounds.iter().map(|round| round.ours_vs_peer_empty).collect::<Vec<_>>(),
            ),
            (
                "ours/peer, idle machines",
                rounds.iter().map(|round| round.ours_vs_peer_dense).collect(),
            ),
            (
                "ours, idle/empty",
                rounds.iter().map(|round| round.ours_dense_vs_empty).collect(),
            ),
            (
                "peer, idle/empty",
                rounds.iter().map(|round| round.peer_dense_vs_empty).collect(),
            ),
        ];
        for (label, values) in lines {
            println!("{}", summary_line(label, values.into_iter()));
        }
    }
    match bench.cold_starts(args.cold).await? {
        Some(cold) => println!("cold start (install, then create and first command): {cold}"),
        None => println!("cold start: not measured"),
    }
    drop(ballast);
    Ok(())
}

/// One round: warm starts on the empty node, then with idle machines (which it removes after).
async fn run_round(bench: &Bench, peer: &Peer, args: &BenchMachinesArgs) -> anyhow::Result<RoundRatios> {
    let empty = bench.warm_phase(args.warm, peer, args.interleave).await?;
    empty.print("empty node", peer.name);
    let mut ratios = RoundRatios {
        ours_vs_peer_empty: p50_ratio(&empty.warm_start, &empty.peer_run),
        ..RoundRatios::default()
    };
    if args.max_idle > 0 {
        let idle = bench.start_idle(args.max_idle).await;
        let dense = bench.warm_phase(args.warm, peer, args.interleave).await;
        for machine in &idle {
            let _ = bench.driver.destroy(machine).await;
        }
        let dense = dense?;
        dense.print(&format!("with {} idle machines", idle.len()), peer.name);
        if let (Some(empty), Some(dense)) = (&empty.warm_start, &dense.warm_start) {
            println!(
                "  {:<18} p50 {:.2}x  p99 {:.2}x",
                format!("ratio {}/empty", idle.len()),
                dense.p50_ms / empty.p50_ms,
                dense.p99_ms / empty.p99_ms
            );
        }
        if let Some(peer_growth) = p50_ratio(&dense.peer_run, &empty.peer_run) {
            println!("  {:<18} p50 {peer_growth:.2}x", format!("peer {}/empty", idle.len()));
        }
        ratios.ours_vs_peer_dense = p50_ratio(&dense.warm_start, &dense.peer_run);
        ratios.ours_dense_vs_empty = p50_ratio(&dense.warm_start, &empty.warm_start);
        ratios.peer_dense_vs_empty = p50_ratio(&dense.peer_run, &empty.peer_run);
    }
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let figures = Percentiles::of(&samples).unwrap();
        assert_eq!(figures.p50_ms, 50.0);
        assert_eq!(figures.p99_ms, 99.0);
        assert_eq!(figures.min_ms, 1.0);
        assert_eq!(figures.max_ms, 100.0);
        assert!(Percentiles::of(&[]).is_none());
        assert_eq!(Percentiles::of(&[7.0]).unwrap().p99_ms, 7.0);
    }

    #[test]
    fn the_summary_gives_the_median_of_the_rounds_present() {
        let line = summary_line("x", [Some(1.3), None, Some(1.1), Some(2.0)].into_iter());
        assert!(line.contains("median 1.30x"), "{line}");
        assert!(line.contains("(1.30x, 1.10x, 2.00x)"), "{line}");
        let even = summary_line("x", [Some(1.0), Some(1.2)].into_iter());
        assert!(even.contains("median 1.10x"), "{even}");
        assert!(summary_line("x", [None].into_iter()).contains("not measured"));
    }
}
