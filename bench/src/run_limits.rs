//! The limits and checks the load benchmarks (`create`, `compare`) share, and their way of
//! stopping on Ctrl-C.

use anyhow::{bail, Context};

/// The longest run of one client count.
pub const MAX_RUN_SECONDS: u64 = 3_600;
/// The most concurrent clients of one run.
pub const MAX_CLIENTS_PER_RUN: usize = 4_096;
/// The most nodes of a cluster a benchmark starts.
pub const MAX_CLUSTER_NODES: usize = 9;

/// `--seconds` within 1..=[`MAX_RUN_SECONDS`].
pub fn check_seconds(seconds: u64) -> anyhow::Result<()> {
    if seconds == 0 || seconds > MAX_RUN_SECONDS {
        bail!("--seconds must be between 1 and {MAX_RUN_SECONDS}, found {seconds}");
    }
    Ok(())
}

/// A list flag (`--clients`, `--nodes`) with at least one value, each within 1..=`max`.
pub fn check_counts(flag: &str, what: &str, values: &[usize], max: usize) -> anyhow::Result<()> {
    if values.is_empty() {
        bail!("{flag} must list at least one {what}");
    }
    if let Some(bad) = values.iter().find(|&&value| value == 0 || value > max) {
        bail!("{flag} values must be between 1 and {max}, found {bad}");
    }
    Ok(())
}

/// Runs `run` until it ends or Ctrl-C comes. Dropping the run drops the cluster it holds, which
/// stops its processes: they sit in process groups of their own and do not see the terminal's
/// SIGINT.
pub async fn until_interrupted(run: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::select! {
        result = run => result,
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("listening for Ctrl-C")?;
            bail!("interrupted")
        }
    }
}
