//! `flotilla-bench compare`: Flotilla's write path side by side with etcd's on this machine.
//! For each cluster size and each client count it starts a loopback etcd cluster, loads it,
//! stops it, then does the same with a loopback Flotilla cluster (only one of them runs at a
//! time, so they never compete for CPU or disk; `--shared-cluster` runs every client count on
//! one cluster per system instead), and prints one table: throughput and p50/p99 for each and
//! their ratio.
//!
//! Both are durable: etcd fsyncs its WAL before acknowledging (its default), a Flotilla node
//! fsyncs its Raft log before an append counts (the log flusher, raft/src/store/flusher.rs).
//! Both are driven by the same load generator ([`crate::load`]) with ~1 KB requests: a Put under
//! a distinct key, and a CreateAgent with a padded prompt. Clients are spread over every
//! member; followers forward writes to their leader on both sides. Flotilla's API and its nodes'
//! links are TLS only; etcd is measured with TLS the same way (clients check a server
//! certificate, members authenticate each other) and, for reference, in plaintext, one table
//! each (`--etcd-transports`). Besides throughput and latency it prints the CPU time each
//! system spent per write (its member processes together, and the load generator's own), read
//! from /proc: on a small machine a latency-bound figure hides how much work a write costs. It
//! prints figures and asserts nothing about time.
//!
//! `--flotilla-only --baseline-binary A --flotilla-binary B --rounds N` compares two builds of
//! Flotilla instead: each round runs both, one after the other, in alternating order (A B, then
//! B A), and the table shows every round and the means. Beside writes a second it shows each
//! run's members' CPU per write over the load generator's: the generator's work per write is the
//! same whatever the server does, so this ratio stays put when the machine's speed drifts (on a
//! shared guest by 15-20 % within minutes), where the throughput and the CPU per write move with
//! it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::{agent_client, connect, BearerToken};
use crate::cpu::{CpuPerWrite, CpuSample};
use crate::etcd_cluster::{EtcdCluster, EtcdTransport};
use crate::load::{run_once, timed_write, RunResult, Writer, MAX_WRITES_PER_RUN, RECORD_BYTES};
use crate::local_cluster::LocalCluster;
use crate::run_limits::{check_counts, check_seconds, until_interrupted, MAX_CLIENTS_PER_RUN, MAX_CLUSTER_NODES};

/// HTTP/2 connections opened to each member, on both sides; clients share them round-robin.
const CONNECTIONS_PER_MEMBER: usize = 2;
const ETCD_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Unmeasured load before the first run on each system.
const WARM_UP_MS: u64 = 1_000;
/// Most rounds of a comparison of two builds.
const MAX_ROUNDS: usize = 50;

#[derive(clap::Args, Debug)]
pub struct BenchCompareArgs {
    /// concurrent clients, one run per value and system
    #[arg(long, default_value = "1,16,64,256", value_delimiter = ',')]
    pub clients: Vec<usize>,
    /// duration of each run
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// sizes of the loopback clusters to compare, one table each
    #[arg(long, default_value = "1,3", value_delimiter = ',')]
    pub nodes: Vec<usize>,
    /// the `etcd` executable (Debian package etcd-server)
    #[arg(long, env = "ETCD_BINARY", default_value = "etcd")]
    pub etcd_binary: PathBuf,
    /// how etcd is spoken to, one etcd cluster and one table each: `tls` (as Flotilla, which
    /// has no plaintext), `plaintext`
    #[arg(long, value_enum, default_value = "tls,plaintext", value_delimiter = ',')]
    pub etcd_transports: Vec<EtcdTransport>,
    /// the `flotilla` executable; by default the one next to this executable, as cargo builds them
    #[arg(long, env = "FLOTILLA_BINARY")]
    pub flotilla_binary: Option<PathBuf>,
    /// measure Flotilla alone (no etcd, no ratios): for comparing two builds run after each
    /// other, with `--flotilla-binary`
    #[arg(long)]
    pub flotilla_only: bool,
    /// run every client count on one cluster per system, in order, instead of a fresh cluster
    /// per client count (each later run then meets the history the earlier ones wrote)
    #[arg(long)]
    pub shared_cluster: bool,
    /// with `--flotilla-only`: a second `flotilla` executable (A), measured in turns with
    /// `--flotilla-binary` (B) for `--rounds` rounds
    #[arg(long)]
    pub baseline_binary: Option<PathBuf>,
    /// rounds of a comparison of two builds (`--baseline-binary`), each running both builds
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

pub async fn run_compare(args: BenchCompareArgs) -> anyhow::Result<()> {
    validate(&args)?;
    until_interrupted(run_all(&args)).await
}

fn validate(args: &BenchCompareArgs) -> anyhow::Result<()> {
    check_seconds(args.seconds)?;
    check_counts("--clients", "client count", &args.clients, MAX_CLIENTS_PER_RUN)?;
    check_counts("--nodes", "cluster size", &args.nodes, MAX_CLUSTER_NODES)?;
    if args.etcd_transports.is_empty() && !args.flotilla_only {
        anyhow::bail!("--etcd-transports: name at least one of tls, plaintext");
    }
    if args.baseline_binary.is_some() && !args.flotilla_only {
        anyhow::bail!("--baseline-binary compares two builds of Flotilla: it needs --flotilla-only");
    }
    if args.rounds == 0 || args.rounds > MAX_ROUNDS {
        anyhow::bail!("--rounds: {} is not between 1 and {MAX_ROUNDS}", args.rounds);
    }
    if args.rounds > 1 && args.baseline_binary.is_none() {
        anyhow::bail!("--rounds is for comparing two builds: give --baseline-binary as well");
    }
    Ok(())
}

async fn run_all(args: &BenchCompareArgs) -> anyhow::Result<()> {
    let flotilla_binary = match &args.flotilla_binary {
        Some(path) => path.clone(),
        None => crate::create::sibling_flotilla_binary()?,
    };
    let run_duration = Duration::from_secs(args.seconds);
    println!(
        "flotilla-bench compare: {RECORD_BYTES}-byte writes, {}s per run, {} build of flotilla-bench",
        args.seconds,
        crate::build_profile()
    );
    if let Some(baseline) = &args.baseline_binary {
        return compare_builds(args, baseline, &flotilla_binary, run_duration).await;
    }
    for &node_count in &args.nodes {
        let mut etcd: Vec<(EtcdTransport, Vec<Measured>)> = if args.flotilla_only {
            Vec::new()
        } else {
            args.etcd_transports
                .iter()
                .map(|&transport| (transport, Vec::new()))
                .collect()
        };
        let mut flotilla = Vec::with_capacity(args.clients.len());
        for clients in client_groups(&args.clients, args.shared_cluster) {
            for (transport, measured) in &mut etcd {
                measured.extend(measure_etcd(&args.etcd_binary, node_count, *transport, clients, run_duration).await?);
            }
            flotilla.extend(measure_flotilla(&flotilla_binary, node_count, clients, run_duration).await?);
        }
        if args.flotilla_only {
            print_flotilla_table(node_count, &flotilla);
        }
        for (transport, etcd) in &etcd {
            print_table(node_count, *transport, etcd, &flotilla);
        }
    }
    Ok(())
}

/// The client counts each cluster runs: one count per cluster by default, so that the runs a
/// ratio compares are minutes apart at most and each meets a cluster as fresh as the other's
/// (a shared cluster's 256-client run comes after some 100,000 writes of the earlier runs);
/// all of them on one cluster with `--shared-cluster`.
fn client_groups(clients: &[usize], shared_cluster: bool) -> Vec<&[usize]> {
    if shared_cluster {
        vec![clients]
    } else {
        clients.chunks(1).collect()
    }
}

/// The two builds of a comparison: the baseline and the build measured against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Build {
    A,
    B,
}

/// The order of the builds in a round: A then B, then B then A, so that a drift of the
/// machine's speed over the rounds weighs on both alike.
fn round_order(round: usize) -> [Build; 2] {
    if round.is_multiple_of(2) {
        [Build::A, Build::B]
    } else {
        [Build::B, Build::A]
    }
}

/// Runs both builds in turns, `args.rounds` times for each cluster size and client group, and
/// prints a table per cluster size.
async fn compare_builds(
    args: &BenchCompareArgs,
    baseline: &std::path::Path,
    candidate: &std::path::Path,
    run_duration: Duration,
) -> anyhow::Result<()> {
    println!("A (baseline): {}", baseline.display());
    println!("B: {}", candidate.display());
    for &node_count in &args.nodes {
        // Per build (A, then B), its runs in the order they ran: round by round, a run per
        // client count in each.
        let mut runs: [Vec<Measured>; 2] = [Vec::new(), Vec::new()];
        for clients in client_groups(&args.clients, args.shared_cluster) {
            for round in 0..args.rounds {
                for build in round_order(round) {
                    let binary = match build {
                        Build::A => baseline,
                        Build::B => candidate,
                    };
                    eprintln!("round {} of {}, build {build:?}", round + 1, args.rounds);
                    let measured = measure_flotilla(binary, node_count, clients, run_duration).await?;
                    runs[build as usize].extend(measured);
                }
            }
        }
        print_builds_table(node_count, &args.clients, &runs[0], &runs[1]);
    }
    Ok(())
}

/// The members' CPU per write over the load generator's (see the module's documentation).
fn members_over_generator(cpu: &CpuPerWrite) -> Option<f64> {
    match (cpu.servers_ms, cpu.generator_ms) {
        (Some(members), Some(generator)) if generator > 0.0 => Some(members / generator),
        _ => None,
    }
}

/// The mean of the figures, `None` if any is missing or there are none.
fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let values: Option<Vec<f64>> = values.into_iter().collect();
    let values = values?;
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The runs of one client count, in the order of their rounds.
fn runs_with(runs: &[Measured], client_count: usize) -> Vec<&Measured> {
    runs.iter()
        .filter(|measured| measured.load.clients == client_count)
        .collect()
}

fn print_builds_table(node_count: usize, clients: &[usize], a: &[Measured], b: &[Measured]) {
    println!();
    println!("{node_count} node(s), build A against build B, rounds in alternating order");
    println!(
        "| clients | round | A ops/s | B ops/s | A CPU µs/write, members + generator | B CPU µs/write, members + generator | A members/generator | B members/generator |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rate = |measured: &Measured| (measured.load.writes > 0).then(|| measured.load.rate());
    let figure = |value: Option<f64>, digits: usize| value.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"));
    let mut means = Vec::new();
    for &client_count in clients {
        let (a_runs, b_runs) = (runs_with(a, client_count), runs_with(b, client_count));
        for (round, (a, b)) in a_runs.iter().zip(&b_runs).enumerate() {
            println!(
                "| {client_count} | {} | {} | {} | {} | {} | {} | {} |",
                round + 1,
                figure(rate(a), 0),
                figure(rate(b), 0),
                cpu_cell(&a.cpu),
                cpu_cell(&b.cpu),
                figure(members_over_generator(&a.cpu), 2),
                figure(members_over_generator(&b.cpu), 2),
            );
        }
        let mean_rate = |runs: &[&Measured]| mean(runs.iter().map(|measured| rate(measured)));
        let mean_share = |runs: &[&Measured]| mean(runs.iter().map(|measured| members_over_generator(&measured.cpu)));
        means.push((
            client_count,
            ratio(mean_rate(&b_runs), mean_rate(&a_runs)),
            ratio(mean_share(&b_runs), mean_share(&a_runs)),
            figure(mean_rate(&a_runs), 0),
            figure(mean_rate(&b_runs), 0),
        ));
    }
    println!();
    println!("| clients | A ops/s, mean | B ops/s, mean | ops/s B/A | members/generator B/A |");
    println!("|---:|---:|---:|---:|---:|");
    for (client_count, rate_ratio, share_ratio, a_rate, b_rate) in means {
        println!("| {client_count} | {a_rate} | {b_rate} | {rate_ratio} | {share_ratio} |");
    }
}

/// One run's load figures and the CPU it cost.
struct Measured {
    load: RunResult,
    cpu: CpuPerWrite,
}

async fn measure_etcd(
    etcd_binary: &std::path::Path,
    node_count: usize,
    transport: EtcdTransport,
    clients: &[usize],
    run_duration: Duration,
) -> anyhow::Result<Vec<Measured>> {
    let started = Instant::now();
    let cluster = EtcdCluster::start(etcd_binary, node_count, transport).await?;
    eprintln!(
        "started an etcd cluster of {node_count} member(s), {}, in {:.1}s (data and logs in {}, removed at the end)",
        transport.name(),
        started.elapsed().as_secs_f64(),
        cluster.directory().display()
    );
    let mut writers = Vec::with_capacity(node_count * CONNECTIONS_PER_MEMBER);
    for _ in 0..CONNECTIONS_PER_MEMBER {
        for endpoint in cluster.endpoints() {
            let options = cluster.connect_options(Duration::from_millis(ETCD_CONNECT_TIMEOUT_MS));
            let client = etcd_client::Client::connect([&endpoint], Some(options))
                .await
                .with_context(|| format!("connecting to etcd at {endpoint}"))?;
            writers.push(Writer::Etcd {
                endpoint,
                kv: client.kv_client(),
            });
        }
    }
    let system = format!("etcd ({})", transport.name());
    let results = run_each(&writers, &cluster.pids(), clients, run_duration, &system, node_count).await;
    drop(writers);
    drop(cluster);
    Ok(results)
}

async fn measure_flotilla(
    flotilla_binary: &std::path::Path,
    node_count: usize,
    clients: &[usize],
    run_duration: Duration,
) -> anyhow::Result<Vec<Measured>> {
    let started = Instant::now();
    let cluster = LocalCluster::start(flotilla_binary, node_count).await?;
    eprintln!(
        "started a Flotilla cluster of {node_count} node(s) in {:.1}s (data and logs in {}, removed at the end)",
        started.elapsed().as_secs_f64(),
        cluster.directory().display()
    );
    let token = BearerToken::new(Some(cluster.admin_token()))?;
    let mut writers = Vec::with_capacity(node_count * CONNECTIONS_PER_MEMBER);
    for _ in 0..CONNECTIONS_PER_MEMBER {
        for endpoint in cluster.endpoints() {
            let channel = connect(&endpoint).await?;
            writers.push(Writer::Flotilla {
                endpoint,
                client: agent_client(channel, token.clone()),
                padded: true,
            });
        }
    }
    let results = run_each(&writers, &cluster.pids(), clients, run_duration, "flotilla", node_count).await;
    drop(writers);
    drop(cluster);
    Ok(results)
}

async fn run_each(
    writers: &[Writer],
    pids: &[u32],
    clients: &[usize],
    run_duration: Duration,
    system: &str,
    node_count: usize,
) -> Vec<Measured> {
    // A warm-up, not measured: the first write on each connection, then a second of load, so
    // that one-off costs (connection setup, first-use initialisation) stay out of the figures.
    let first = match writers.first() {
        Some(writer) => match timed_write(writer.clone(), format!("bench-warm-up-{system}")).await {
            Ok(took) => format!("{:.1} ms", took.as_secs_f64() * 1000.0),
            Err(error) => format!("failed ({error})"),
        },
        None => "-".to_string(),
    };
    let warm_up = run_once(
        writers,
        writers.len(),
        Duration::from_millis(WARM_UP_MS),
        MAX_WRITES_PER_RUN,
    )
    .await;
    eprintln!(
        "  {system} nodes={node_count} warm-up: first write {first}, then {:.0}/s, {} errors",
        warm_up.rate(),
        warm_up.errors
    );
    let mut results = Vec::with_capacity(clients.len());
    for &client_count in clients {
        let before = CpuSample::take(pids);
        let result = run_once(writers, client_count, run_duration, MAX_WRITES_PER_RUN).await;
        let cpu = CpuSample::take(pids).per_write_since(&before, result.writes);
        eprintln!(
            "  {system} nodes={node_count} clients={client_count}: {:.0}/s, {} errors",
            result.rate(),
            result.errors
        );
        if let Some(first_error) = &result.first_error {
            eprintln!("    first error: {first_error}");
        }
        results.push(Measured { load: result, cpu });
    }
    results
}

fn print_table(node_count: usize, transport: EtcdTransport, etcd: &[Measured], flotilla: &[Measured]) {
    println!();
    println!(
        "{node_count} node(s), etcd over {} (Flotilla over TLS)",
        transport.name()
    );
    println!(
        "| clients | etcd ops/s | etcd p50 ms | etcd p99 ms | Flotilla ops/s | Flotilla p50 ms | Flotilla p99 ms | ops/s Flotilla/etcd | p50 Flotilla/etcd | errors etcd/Flotilla | etcd CPU µs/write, members + generator | Flotilla CPU µs/write, members + generator | members' CPU Flotilla/etcd |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (etcd, flotilla) in etcd.iter().zip(flotilla) {
        println!(
            "{} {} | {} | {} |",
            table_row(&etcd.load, &flotilla.load),
            cpu_cell(&etcd.cpu),
            cpu_cell(&flotilla.cpu),
            ratio(flotilla.cpu.servers_ms, etcd.cpu.servers_ms)
        );
    }
}

fn print_flotilla_table(node_count: usize, flotilla: &[Measured]) {
    println!();
    println!("{node_count} node(s), Flotilla alone");
    println!("| clients | Flotilla ops/s | Flotilla p50 ms | Flotilla p99 ms | errors | Flotilla CPU µs/write, members + generator |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for measured in flotilla {
        let load = &measured.load;
        println!(
            "| {} | {} | {} | {} |",
            load.clients,
            load_cells(load),
            load.errors,
            cpu_cell(&measured.cpu)
        );
    }
}

/// One system's `ops/s | p50 ms | p99 ms` cells.
fn load_cells(result: &RunResult) -> String {
    let ms = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"));
    format!(
        "{:.0} | {} | {}",
        result.rate(),
        ms(result.latency_ms(0.50)),
        ms(result.latency_ms(0.99))
    )
}

/// `members + generator` in microseconds per write, `-` for a figure that could not be read.
fn cpu_cell(cpu: &CpuPerWrite) -> String {
    let us = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |ms| format!("{:.0}", ms * 1000.0));
    format!("{} + {}", us(cpu.servers_ms), us(cpu.generator_ms))
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> String {
    match (numerator, denominator) {
        (Some(numerator), Some(denominator)) if denominator > 0.0 => format!("{:.2}", numerator / denominator),
        _ => "-".to_string(),
    }
}

fn table_row(etcd: &RunResult, flotilla: &RunResult) -> String {
    let rate = |result: &RunResult| (result.writes > 0).then(|| result.rate());
    format!(
        "| {} | {} | {} | {} | {} | {}/{} |",
        etcd.clients,
        load_cells(etcd),
        load_cells(flotilla),
        ratio(rate(flotilla), rate(etcd)),
        ratio(flotilla.latency_ms(0.50), etcd.latency_ms(0.50)),
        etcd.errors,
        flotilla.errors,
    )
}

#[cfg(test)]
mod tests {
    use hdrhistogram::Histogram;

    use super::*;

    fn args() -> BenchCompareArgs {
        BenchCompareArgs {
            clients: vec![1, 16],
            seconds: 5,
            nodes: vec![1, 3],
            etcd_binary: PathBuf::from("etcd"),
            etcd_transports: vec![EtcdTransport::Tls, EtcdTransport::Plaintext],
            flotilla_binary: None,
            flotilla_only: false,
            shared_cluster: false,
            baseline_binary: None,
            rounds: 1,
        }
    }

    #[test]
    fn each_client_count_gets_a_cluster_unless_they_share_one() {
        let clients = [1, 16, 64, 256];
        assert_eq!(
            client_groups(&clients, false),
            vec![&[1][..], &[16][..], &[64][..], &[256][..]]
        );
        assert_eq!(client_groups(&clients, true), vec![&clients[..]]);
    }

    #[test]
    fn arguments_are_validated() {
        assert!(validate(&args()).is_ok());
        let mut zero_seconds = args();
        zero_seconds.seconds = 0;
        assert!(validate(&zero_seconds).is_err());
        let mut zero_clients = args();
        zero_clients.clients = vec![0];
        assert!(validate(&zero_clients).is_err());
        let mut too_many_nodes = args();
        too_many_nodes.nodes = vec![MAX_CLUSTER_NODES + 1];
        assert!(validate(&too_many_nodes).is_err());
        let mut no_transport = args();
        no_transport.etcd_transports = Vec::new();
        assert!(validate(&no_transport).is_err());
    }

    /// Two builds are compared only without etcd, over a bounded number of rounds, and rounds
    /// mean nothing without a second build.
    #[test]
    fn a_comparison_of_builds_is_validated() {
        let builds = || BenchCompareArgs {
            flotilla_only: true,
            baseline_binary: Some(PathBuf::from("/tmp/flotilla-a")),
            rounds: 3,
            ..args()
        };
        assert!(validate(&builds()).is_ok());
        let refused_naming = |args: BenchCompareArgs, flag: &str| {
            let error = validate(&args).expect_err(flag).to_string();
            assert!(error.contains(flag), "{error}");
        };
        let with_etcd = BenchCompareArgs {
            flotilla_only: false,
            ..builds()
        };
        refused_naming(with_etcd, "--flotilla-only");
        for rounds in [0, MAX_ROUNDS + 1] {
            refused_naming(BenchCompareArgs { rounds, ..builds() }, "--rounds");
        }
        let rounds_alone = BenchCompareArgs {
            baseline_binary: None,
            ..builds()
        };
        refused_naming(rounds_alone, "--baseline-binary");
    }

    #[test]
    fn rounds_alternate_which_build_goes_first() {
        assert_eq!(round_order(0), [Build::A, Build::B]);
        assert_eq!(round_order(1), [Build::B, Build::A]);
        assert_eq!(round_order(2), [Build::A, Build::B]);
    }

    #[test]
    fn the_members_share_and_means_need_every_figure() {
        let cpu = CpuPerWrite {
            servers_ms: Some(0.15),
            generator_ms: Some(0.04),
        };
        assert_eq!(members_over_generator(&cpu).map(|v| (v * 100.0).round()), Some(375.0));
        let no_generator = CpuPerWrite {
            generator_ms: Some(0.0),
            ..cpu
        };
        assert_eq!(members_over_generator(&no_generator), None);
        assert_eq!(members_over_generator(&CpuPerWrite::default()), None);
        assert_eq!(mean([Some(1.0), Some(2.0), Some(6.0)]), Some(3.0));
        assert_eq!(mean([Some(1.0), None]), None);
        assert_eq!(mean(std::iter::empty()), None);
    }

    #[test]
    fn a_row_shows_the_ratios_of_throughput_and_median_latency() {
        let result = |writes: u64, latency_us: u64| {
            let mut histogram = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
            histogram.record(latency_us).unwrap();
            RunResult {
                clients: 16,
                writes,
                errors: 0,
                elapsed: Duration::from_secs(1),
                latency_us: histogram,
                first_error: None,
            }
        };
        let row = table_row(&result(1000, 4000), &result(500, 8000));
        assert_eq!(
            row,
            "| 16 | 1000 | 4.00 | 4.00 | 500 | 8.00 | 8.00 | 0.50 | 2.00 | 0/0 |"
        );
    }

    #[test]
    fn a_cpu_cell_shows_members_and_generator_in_microseconds() {
        let cpu = CpuPerWrite {
            servers_ms: Some(0.2126),
            generator_ms: Some(0.04),
        };
        assert_eq!(cpu_cell(&cpu), "213 + 40");
        assert_eq!(cpu_cell(&CpuPerWrite::default()), "- + -");
        assert_eq!(ratio(Some(0.3), Some(0.2)), "1.50");
        assert_eq!(ratio(Some(0.3), None), "-");
    }
}
