//! `flotilla-bench spawn`: what starting one process costs a process of a given size, by the
//! two ways a Rust program starts one.
//!
//! A `Command` with a `pre_exec` step (how the sandbox started bubblewrap and every command in a
//! machine before `sandbox/src/vfork.rs`: it joins a cgroup and namespaces between fork and
//! exec) is started by a real `fork`:
//! the kernel copies the parent's page tables and marks its memory copy-on-write, so every page
//! the parent writes while the child lives is copied once. A `Command` without one is started
//! by `posix_spawn`, which glibc does with `clone(CLONE_VM | CLONE_VFORK)`: no copy at all. The
//! bench holds a resident set of each size, starts `/bin/true` both ways in alternating blocks,
//! and while each child lives writes a set number of the resident pages, as a busy node's other
//! threads would; it prints the wall time per start and the CPU time this process spent on it.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchSpawnArgs {
    /// resident sets to hold, in MiB, one row each
    #[arg(long, value_delimiter = ',', default_value = "16,128,512")]
    resident_mib: Vec<usize>,
    /// MiB of the resident set written while each child lives, one row each (0: none)
    #[arg(long, value_delimiter = ',', default_value = "0,4")]
    written_mib: Vec<usize>,
    /// starts per way and row
    #[arg(long, default_value_t = 200)]
    spawns: usize,
    /// the program started (it must exit at once, successfully)
    #[arg(long, default_value = "/bin/true")]
    program: String,
}

const PAGE: usize = 4096;
const BLOCK: usize = 20;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Fork,
    Spawn,
}

#[derive(Default)]
struct Tally {
    wall_ms: Vec<f64>,
    cpu_ms: f64,
}

pub fn run_spawn(args: BenchSpawnArgs) -> Result<()> {
    if args.spawns == 0 {
        bail!("--spawns must be at least 1");
    }
    println!(
        "starting {} {} times per way and row: `fork` (a Command with a pre_exec step) against \
         `posix_spawn` (one without); CPU is this process's own, per start",
        args.program, args.spawns
    );
    println!("| resident MiB | MiB written while the child lives | fork p50 ms | fork CPU ms | posix_spawn p50 ms | posix_spawn CPU ms | fork/posix_spawn CPU |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &resident_mib in &args.resident_mib {
        let mut resident = vec![0u8; resident_mib << 20];
        // Every page touched: resident, as a node's heap is.
        for page in resident.chunks_mut(PAGE) {
            page[0] = 1;
        }
        for &written_mib in &args.written_mib {
            let written_pages = ((written_mib << 20) / PAGE).min(resident.len() / PAGE);
            let mut fork = Tally::default();
            let mut spawn = Tally::default();
            let mut cursor = 0usize;
            let mut done = 0;
            while done < args.spawns {
                let block = BLOCK.min(args.spawns - done);
                for way in [Way::Fork, Way::Spawn] {
                    let tally = if way == Way::Fork { &mut fork } else { &mut spawn };
                    // The forks left every page copy-on-write; writing each once, untimed, gives
                    // it back before the other way is timed.
                    rewrite_every_page(&mut resident);
                    for _ in 0..block {
                        start_one(&args.program, way, &mut resident, written_pages, &mut cursor, tally)?;
                    }
                }
                done += block;
            }
            let fork_cpu = fork.cpu_ms / args.spawns as f64;
            let spawn_cpu = spawn.cpu_ms / args.spawns as f64;
            println!(
                "| {resident_mib} | {written_mib} | {:.3} | {fork_cpu:.3} | {:.3} | {spawn_cpu:.3} | {:.1} |",
                p50(&fork.wall_ms),
                p50(&spawn.wall_ms),
                fork_cpu / spawn_cpu.max(f64::EPSILON)
            );
        }
        drop(resident);
    }
    Ok(())
}

fn rewrite_every_page(resident: &mut [u8]) {
    for page in resident.chunks_mut(PAGE) {
        let first = &mut page[0];
        // A changed value: a real write, which a store of the same value might not be.
        let value = *first;
        std::hint::black_box(&mut *first);
        *first = value.wrapping_add(1);
    }
}

fn start_one(
    program: &str,
    way: Way,
    resident: &mut [u8],
    written_pages: usize,
    cursor: &mut usize,
    tally: &mut Tally,
) -> Result<()> {
    let mut command = Command::new(program);
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    if way == Way::Fork {
        with_empty_pre_exec(&mut command);
    }
    let cpu_before = own_cpu_ms()?;
    let started = Instant::now();
    let mut child = command.spawn().with_context(|| format!("start {program}"))?;
    let pages = resident.len() / PAGE;
    for _ in 0..written_pages {
        resident[(*cursor % pages) * PAGE] ^= 1;
        *cursor += 1;
    }
    let status = child.wait().with_context(|| format!("wait for {program}"))?;
    tally.wall_ms.push(started.elapsed().as_secs_f64() * 1e3);
    tally.cpu_ms += own_cpu_ms()? - cpu_before;
    if !status.success() {
        bail!("{program} exited with {status}");
    }
    Ok(())
}

/// A pre_exec step that does nothing: enough to make std start the child with `fork`.
// Unsafe: `pre_exec` is unsafe because its closure runs between fork and exec; this one makes
// no call at all.
#[allow(unsafe_code)]
fn with_empty_pre_exec(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure makes no call, so nothing in it can be unsafe after a fork.
    unsafe {
        command.pre_exec(|| Ok(()));
    }
}

/// CPU time (user and system) of this whole process so far, in ms, from `getrusage`.
fn own_cpu_ms() -> Result<f64> {
    let usage = own_rusage()?;
    let ms = |time: libc::timeval| time.tv_sec as f64 * 1e3 + time.tv_usec as f64 / 1e3;
    Ok(ms(usage.ru_utime) + ms(usage.ru_stime))
}

// Unsafe: getrusage has no safe wrapper in std.
#[allow(unsafe_code)]
fn own_rusage() -> Result<libc::rusage> {
    // SAFETY: rusage is plain data; the kernel fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage of this process's own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    Ok(usage)
}

/// The median wall time, ranked as the machine starts' are.
fn p50(samples_ms: &[f64]) -> f64 {
    crate::machines::Percentiles::of(samples_ms).map_or(f64::NAN, |percentiles| percentiles.p50_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_start_the_program_and_count_its_cost() {
        let mut resident = vec![1u8; 4 * PAGE];
        let mut cursor = 0;
        for way in [Way::Fork, Way::Spawn] {
            let mut tally = Tally::default();
            start_one("/bin/true", way, &mut resident, 3, &mut cursor, &mut tally).unwrap();
            assert_eq!(tally.wall_ms.len(), 1);
            assert!(tally.wall_ms[0] > 0.0);
        }
        assert_eq!(cursor, 6, "each start wrote its pages");
        let mut tally = Tally::default();
        let error = start_one("/bin/false", Way::Spawn, &mut resident, 0, &mut cursor, &mut tally).unwrap_err();
        assert!(error.to_string().contains("/bin/false exited"), "{error}");
    }
}
