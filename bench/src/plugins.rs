//! `flotilla-bench plugins FILE.wasm [CALLS]`: the cost of a plugin call: compiling a component,
//! loading it again from the cache and from the disk cache, and one call (instantiate from the
//! compiled component + the cheapest export + drop), with and without the pooling allocator.
//! Asserts nothing about time.
//!
//! The test guests are built by `cargo test -p flotilla-plugins` into
//! `target/plugin-testdata/wasm32-wasip2/release/` (e.g. `well_behaved.wasm`); the built-in
//! providers by `cargo build -p flotilla-builtin-plugins`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flotilla_plugins::{CallError, HostConfig, NoSecrets, PluginError, PluginHost, PluginKind};

#[derive(clap::Args, Debug)]
pub struct BenchPluginsArgs {
    /// A plugin component (a VCS provider or a tool).
    pub component: PathBuf,
    /// Sequential calls measured on each host configuration.
    #[arg(default_value_t = 10_000)]
    pub calls: usize,
}

pub async fn run_plugins(args: BenchPluginsArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.component).with_context(|| format!("cannot read {}", args.component.display()))?;
    let report = bench_calls(&bytes, args.calls).await?;
    print!("{report}");
    Ok(())
}

/// Calls made before measuring, so that lazily set-up state (pool slots, page tables, the
/// allocator's caches) is warm.
const WARM_UP_CALLS: usize = 50;

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("benchmark: {0}")]
    Load(#[from] PluginError),
    #[error("benchmark: {0}")]
    Call(#[from] CallError),
}

/// Sequential calls on one host configuration.
#[derive(Clone, Debug)]
struct BenchRun {
    pooling: bool,
    /// First compilation of the component on this host.
    compile: Duration,
    /// A second `load` of the same bytes (served from the cache).
    cached_load: Duration,
    /// A `load` on a new host that finds the compiled code on disk (a restarted node).
    disk_load: Duration,
    calls: usize,
    p50: Duration,
    p99: Duration,
    mean: Duration,
    max: Duration,
}

#[derive(Clone, Debug)]
struct BenchReport {
    component_bytes: usize,
    kind: PluginKind,
    /// The export each measured call ran: `info` or `describe`.
    function: &'static str,
    runs: Vec<BenchRun>,
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

impl fmt::Display for BenchReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            formatter,
            "plugin call benchmark: {} component, {} bytes, each call = instantiate + {} + drop",
            self.kind, self.component_bytes, self.function
        )?;
        for run in &self.runs {
            writeln!(
                formatter,
                "  pooling {:<3}  compile {:>8.1} ms  cached load {:>7.1} µs  load from disk {:>7.1} ms  calls {:>6}  p50 {:>7.1} µs  p99 {:>7.1} µs  mean {:>7.1} µs  max {:>8.1} µs",
                if run.pooling { "on" } else { "off" },
                run.compile.as_secs_f64() * 1e3,
                micros(run.cached_load),
                run.disk_load.as_secs_f64() * 1e3,
                run.calls,
                micros(run.p50),
                micros(run.p99),
                micros(run.mean),
                micros(run.max),
            )?;
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn bench_one(component: &[u8], calls: usize, pooling: bool) -> Result<(BenchRun, PluginKind), BenchError> {
    let disk_dir = std::env::temp_dir().join(format!(
        "flotilla-plugin-bench-{}-{}",
        std::process::id(),
        if pooling { "pooled" } else { "unpooled" }
    ));
    let _ = std::fs::remove_dir_all(&disk_dir);
    let config = HostConfig {
        pooling,
        compiled_cache_dir: Some(disk_dir.clone()),
        ..HostConfig::default()
    };
    let host = PluginHost::new(config.clone(), Arc::new(NoSecrets))?;
    let started = Instant::now();
    let plugin = host.load("bench", "0", component, Vec::new())?;
    let compile = started.elapsed();
    let started = Instant::now();
    let plugin = host.load("bench", "0", component, plugin.granted_hosts().to_vec())?;
    let cached_load = started.elapsed();
    let restarted = PluginHost::new(config, Arc::new(NoSecrets))?;
    let started = Instant::now();
    restarted.load("bench", "0", component, Vec::new())?;
    let disk_load = started.elapsed();
    let _ = std::fs::remove_dir_all(&disk_dir);

    let kind = plugin.kind();
    let call_once = || async {
        match kind {
            PluginKind::VcsProvider => host.info(&plugin).await.map(drop),
            PluginKind::Tool => host.describe(&plugin).await.map(drop),
        }
    };
    for _ in 0..WARM_UP_CALLS {
        call_once().await?;
    }
    let mut durations = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        call_once().await?;
        durations.push(started.elapsed());
    }
    durations.sort_unstable();
    let total: Duration = durations.iter().sum();
    let run = BenchRun {
        pooling,
        compile,
        cached_load,
        disk_load,
        calls,
        p50: percentile(&durations, 0.50),
        p99: percentile(&durations, 0.99),
        mean: total / calls.max(1) as u32,
        max: durations.last().copied().unwrap_or_default(),
    };
    Ok((run, kind))
}

/// Measures `calls` sequential calls of the component's cheapest export (`info` for a VCS
/// provider, `describe` for a tool), once without and once with the pooling allocator, each on a
/// fresh host with default limits.
async fn bench_calls(component: &[u8], calls: usize) -> Result<BenchReport, BenchError> {
    let calls = calls.max(1);
    let (without_pooling, kind) = bench_one(component, calls, false).await?;
    let (with_pooling, _) = bench_one(component, calls, true).await?;
    Ok(BenchReport {
        component_bytes: component.len(),
        kind,
        function: match kind {
            PluginKind::VcsProvider => "info",
            PluginKind::Tool => "describe",
        },
        runs: vec![without_pooling, with_pooling],
    })
}
