//! `flotilla env check`, `flotilla image build` and `flotilla bench machines`: the machine side
//! of the binary, run on a node's host.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use flotilla_sandbox::{BaseImage, BwrapConfig, BwrapDriver, DiskBacking, ExecRequest, MachineDriver, MachineSpec};

#[derive(clap::Args, Debug)]
pub struct EnvCheckArgs {
    /// A checkout of the repository.
    pub dir: PathBuf,
    /// Base image the plan is for.
    #[arg(long, default_value = "host")]
    pub base: String,
}

/// Prints the plan for a checkout's environment.json, or the error; non-zero on error.
pub fn env_check(args: EnvCheckArgs) -> anyhow::Result<ExitCode> {
    let base: BaseImage = args.base.parse().map_err(|error| anyhow::anyhow!("--base: {error}"))?;
    if !args.dir.is_dir() {
        anyhow::bail!("{} is not a directory", args.dir.display());
    }
    match flotilla_sandbox::environment::check(&args.dir, base) {
        Ok(plan) => {
            println!("{plan}");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ImageBuildArgs {
    /// `debian` (debootstrap with git, build-essential, curl, ca-certificates, tmux) or `host`.
    pub image: String,
    /// The node's data dir; the image goes under DATA_DIR/machines/images.
    #[arg(long)]
    pub data_dir: PathBuf,
}

pub async fn image_build(args: ImageBuildArgs) -> anyhow::Result<ExitCode> {
    let image: BaseImage = args.image.parse().map_err(|error| anyhow::anyhow!("{error}"))?;
    let driver = BwrapDriver::new(BwrapConfig::new(args.data_dir.join("machines")))?;
    let started = Instant::now();
    let layer = driver.prepare_base(image).await?;
    println!(
        "base image {image} ready at {} in {:.1}s",
        layer.rootfs.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct BenchMachinesArgs {
    /// Warm starts measured (machine from an existing snapshot to its first command's output).
    #[arg(long, default_value_t = 100)]
    pub warm: usize,
    /// Cold starts measured (install runs first).
    #[arg(long, default_value_t = 10)]
    pub cold: usize,
    /// Most idle machines started when measuring how many one node holds.
    #[arg(long, default_value_t = 300)]
    pub max_idle: usize,
    /// Disk of each machine's own layer: tmpfs or ext4.
    #[arg(long, default_value = "tmpfs")]
    pub disk: String,
}

/// Memory the kernel says is available, in bytes.
fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kibibytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kibibytes * 1024)
}

pub async fn bench_machines(args: BenchMachinesArgs) -> anyhow::Result<ExitCode> {
    let disk = match args.disk.as_str() {
        "tmpfs" => DiskBacking::Tmpfs,
        "ext4" => DiskBacking::Ext4Image,
        other => anyhow::bail!("--disk: expected tmpfs or ext4, found {other:?}"),
    };
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-machines-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let figures = flotilla_sandbox::bench::bench_machine_starts(dir.path(), disk, args.warm, args.cold).await?;
    println!("{figures}");

    // Capacity: idle machines (init plus one shell each) until memory or processes run short.
    let mut config = BwrapConfig::new(dir.path().join("capacity"));
    config.disk = disk;
    let driver = Arc::new(BwrapDriver::new(config)?);
    let base = driver.prepare_base(BaseImage::Host).await?;
    let workspace = dir.path().join("capacity-workspace");
    std::fs::create_dir_all(&workspace)?;
    let memory_before = available_memory_bytes().unwrap_or(0);
    let floor = memory_before / 10;
    let mut machines = Vec::new();
    let mut stopped_by = format!("the --max-idle cap of {}", args.max_idle);
    let started = Instant::now();
    while machines.len() < args.max_idle {
        if available_memory_bytes().is_some_and(|available| available < floor) {
            stopped_by = "available memory falling under 10%".to_string();
            break;
        }
        let spec = MachineSpec::new(format!("idle-{}", machines.len()), base.clone(), &workspace);
        match driver.create(spec).await {
            Ok(machine) => {
                let shell = driver
                    .exec(&machine, ExecRequest::new("nohup sleep 1000000 >/dev/null 2>&1 &"))
                    .await;
                if let Err(error) = shell {
                    stopped_by = format!("a command failing: {error}");
                    machines.push(machine);
                    break;
                }
                machines.push(machine);
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
    for machine in &machines {
        let _ = driver.destroy(machine).await;
    }
    Ok(ExitCode::SUCCESS)
}
