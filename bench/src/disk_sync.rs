//! `flotilla-bench disk-sync`: what one durable write costs the disk a directory is on, the
//! floor under every acknowledged write (a leader's and a follower's log sync).
//!
//! Each way writes `--write-bytes` at a time, one after the other into one file, and syncs
//! each write (`fdatasync`) before the next, as the Raft log's appends are synced:
//! - `append`: each write grows the file, so each sync also commits the file's new size (on
//!   ext4, a journal commit);
//! - `zeroed`: the file was written with zeros and synced first, and the writes go over the
//!   zeros: the size never changes and a sync writes the data only. The log's last segment is
//!   kept this way (raft/src/store/segments.rs);
//! - `fallocated`: the space was reserved with `posix_fallocate` first (unwritten extents on
//!   ext4: a write still changes the file's extent map, which its sync commits).
//!
//! The ways take turns, one after another in each round, so that a slower phase of the disk
//! falls on all of them. It prints the sync latency (the write and its `fdatasync`) per way and
//! the ratio of each p50 to `append`'s. It asserts nothing.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::machines::Percentiles;

#[derive(Args, Debug)]
pub struct BenchDiskSyncArgs {
    /// directory whose disk is measured (a temporary folder is made inside it and removed);
    /// by default the system's temporary directory
    #[arg(long)]
    dir: Option<PathBuf>,
    /// bytes per write
    #[arg(long, default_value_t = 8192)]
    write_bytes: usize,
    /// synced writes per way and round
    #[arg(long, default_value_t = 2000)]
    writes: usize,
    /// rounds; each way runs once per round, in turn
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    Append,
    Zeroed,
    Fallocated,
}

const WAYS: [Way; 3] = [Way::Append, Way::Zeroed, Way::Fallocated];

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Append => "append",
            Way::Zeroed => "zeroed",
            Way::Fallocated => "fallocated",
        }
    }
}

/// Prepares `file` for `way` over `len` bytes, synced, so that only the writes are timed.
fn prepare(file: &File, way: Way, len: u64) -> Result<()> {
    match way {
        Way::Append => {}
        Way::Zeroed => {
            let zeros = vec![0u8; 1024 * 1024];
            let mut at = 0;
            while at < len {
                file.write_all_at(&zeros, at).context("writing zeros")?;
                at += zeros.len() as u64;
            }
        }
        Way::Fallocated => reserve(file, len)?,
    }
    file.sync_all().context("syncing the prepared file")?;
    Ok(())
}

/// Reserves `len` bytes of `file` with `posix_fallocate`.
#[allow(unsafe_code)]
fn reserve(file: &File, len: u64) -> Result<()> {
    let len = libc::off_t::try_from(len).context("the file is too long for off_t")?;
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and the range is
    // non-negative; the call touches no memory of this process.
    let error = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if error != 0 {
        return Err(std::io::Error::from_raw_os_error(error)).context("posix_fallocate");
    }
    Ok(())
}

/// Milliseconds of each synced write of one way, in a fresh file in `dir`.
fn measure(dir: &std::path::Path, way: Way, write_bytes: usize, writes: usize) -> Result<Vec<f64>> {
    let path = dir.join(way.name());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let len = (write_bytes * writes) as u64;
    prepare(&file, way, len)?;
    // Not all zeros, as a log's frames are not.
    let data: Vec<u8> = (0..write_bytes).map(|at| (at % 251) as u8 + 1).collect();
    let mut samples = Vec::with_capacity(writes);
    for write in 0..writes {
        let started = Instant::now();
        file.write_all_at(&data, (write * write_bytes) as u64)
            .with_context(|| format!("writing {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("syncing {}", path.display()))?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(samples)
}

pub fn run_disk_sync(args: BenchDiskSyncArgs) -> Result<()> {
    if args.write_bytes == 0 || args.writes == 0 || args.rounds == 0 {
        bail!("--write-bytes, --writes and --rounds must each be at least 1");
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("flotilla-disk-sync-")
        .tempdir_in(&parent)
        .with_context(|| format!("making a folder in {}", parent.display()))?;
    println!(
        "disk-sync: {} writes of {} bytes per way and round, each synced (fdatasync), in {}; {} round(s)",
        args.writes,
        args.write_bytes,
        parent.display(),
        args.rounds
    );
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); WAYS.len()];
    for round in 1..=args.rounds {
        for (position, way) in WAYS.iter().enumerate() {
            let measured = measure(dir.path(), *way, args.write_bytes, args.writes)?;
            let percentiles = Percentiles::of(&measured).expect("at least one write");
            println!(
                "  round {round} {:<10} p50 {:.3} ms, p99 {:.3} ms",
                way.name(),
                percentiles.p50_ms,
                percentiles.p99_ms
            );
            samples[position].extend(measured);
        }
    }
    println!();
    println!("| way | writes | p50 ms | p99 ms | mean ms | synced writes/s, one at a time | p50 / append's |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let append_p50 = Percentiles::of(&samples[0]).map(|percentiles| percentiles.p50_ms);
    for (position, way) in WAYS.iter().enumerate() {
        let percentiles = Percentiles::of(&samples[position]).expect("every way ran");
        let ratio = append_p50.map_or(f64::NAN, |append| percentiles.p50_ms / append);
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.0} | {:.2} |",
            way.name(),
            percentiles.count,
            percentiles.p50_ms,
            percentiles.p99_ms,
            percentiles.mean_ms,
            1000.0 / percentiles.mean_ms,
            ratio
        );
    }
    Ok(())
}
