//! `flotilla-bench watch`: many concurrent `WatchAgent` streams on one node, and how fast a
//! committed event reaches all of them.
//!
//! One loopback node with no slots (agents stay queued, so the only events are the ones the
//! bench commits). The bench creates `--agents` agents, opens `--watchers` watch streams spread
//! over them and over `--connections` HTTP/2 connections (many streams each), then commits
//! `--events` follow-ups at `--rate` per second, round-robin over the agents, and at the end
//! stops every agent, whose terminal event ends its streams. Every durable event a watcher
//! receives is matched to the write that made it by (agent, sequence): the follow-up's answer
//! carries the agent's `last_sequence`, which is the new event's.
//!
//! Latency is measured from the write's acknowledgement to the client (the commit time as the
//! client knows it; a watcher may see the event before the answer arrives, and then counts 0)
//! and, as an upper bound, from the moment the write was sent. It also reports the node's
//! resident memory before and after opening the watchers, per watcher, and the latency of
//! `GetAgent` on a connection of its own, before and while the events fan out. Prints figures;
//! asserts nothing about time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::v1::access_service_client::AccessServiceClient;
use flotilla_proto::v1::{
    watch_agent_response, CreateAgentRequest, CreateKeyRequest, GetAgentRequest, SendFollowUpRequest, StopAgentRequest,
    WatchAgentRequest,
};
use futures::StreamExt as _;
use tonic::transport::Channel;

use crate::client::{agent_client, connect, unary, AgentClient, BearerToken};
use crate::local_cluster::LocalCluster;
use crate::machines::Percentiles;

const MAX_WATCHERS: usize = 100_000;
const MAX_CONNECTIONS: usize = 256;
/// The node refuses a key's watch past this many open on one node (`MAX_WATCHES_PER_KEY` in
/// the node's authorization table): the bench mints one viewer key per this many watchers.
const WATCHES_PER_KEY: usize = 32;
/// An agent takes at most 256 pending follow-ups; the bench stays under that.
const MAX_FOLLOW_UPS_PER_AGENT: usize = 200;
const MAX_RATE_PER_SECOND: u64 = 10_000;
/// Writes in flight at once when the rate outruns one writer's round trips.
const MAX_WRITES_IN_FLIGHT: usize = 64;
/// Watch opens in flight at once (each waits for its first message, the agent record).
const MAX_OPENS_IN_FLIGHT: usize = 512;
/// Every watcher must have its agent record within this long of the first open.
const OPEN_DEADLINE_MS: u64 = 300_000;
/// After the last write, every delivery must arrive within this long.
const DELIVERY_DEADLINE_MS: u64 = 120_000;
/// The unary call measured for responsiveness, this often.
const PROBE_INTERVAL_MS: u64 = 10;
/// The baseline probe runs this long before any watcher opens.
const BASELINE_PROBE_MS: u64 = 2_000;
const PROGRESS_POLL_MS: u64 = 20;
const BENCH_REPOSITORY: &str = "https://example.com/bench/repo.git";

#[derive(clap::Args, Debug, Clone)]
pub struct BenchWatchArgs {
    /// concurrent WatchAgent streams
    #[arg(long, default_value_t = 10_000)]
    pub watchers: usize,
    /// agents watched; watcher i watches agent i mod agents
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// HTTP/2 connections the watch streams share
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// follow-ups committed while the watchers are open (round-robin over the agents)
    #[arg(long, default_value_t = 1_000)]
    pub events: usize,
    /// follow-ups per second
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// the `flotilla` executable the node runs; by default the one next to this executable
    #[arg(long, env = "FLOTILLA_BINARY")]
    pub flotilla_binary: Option<PathBuf>,
}

impl BenchWatchArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.watchers == 0 || self.watchers > MAX_WATCHERS {
            bail!(
                "--watchers must be between 1 and {MAX_WATCHERS}, found {}",
                self.watchers
            );
        }
        if self.agents == 0 || self.agents > self.watchers {
            bail!(
                "--agents must be between 1 and --watchers ({}), found {}",
                self.watchers,
                self.agents
            );
        }
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            bail!(
                "--connections must be between 1 and {MAX_CONNECTIONS}, found {}",
                self.connections
            );
        }
        let most_events = self.agents * MAX_FOLLOW_UPS_PER_AGENT;
        if self.events > most_events {
            bail!(
                "--events must be at most {most_events} ({MAX_FOLLOW_UPS_PER_AGENT} follow-ups per agent), found {}",
                self.events
            );
        }
        if self.rate == 0 || self.rate > MAX_RATE_PER_SECOND {
            bail!(
                "--rate must be between 1 and {MAX_RATE_PER_SECOND}, found {}",
                self.rate
            );
        }
        Ok(())
    }
}

/// One agent of the run: its id and its last sequence when the watchers opened.
struct WatchedAgent {
    id: String,
    first_sequence: u64,
}

/// When the write that made (agent index, sequence) was sent and acknowledged.
type WriteTimes = HashMap<(usize, u64), (Instant, Instant)>;

/// One durable event as a watcher received it.
struct Receipt {
    agent: usize,
    sequence: u64,
    received: Instant,
    /// Milliseconds from the event's own time (`at`: the proposer's clock when it stamped the
    /// write, before the commit) to its receipt, on this machine's wall clock.
    from_event_time_ms: f64,
}

/// What one watcher saw.
struct WatcherReport {
    receipts: Vec<Receipt>,
    /// The status the stream ended with, if not a clean end.
    failure: Option<String>,
}

/// Counters the watchers share with the driver.
#[derive(Default)]
struct Progress {
    opened: AtomicUsize,
    failed: AtomicUsize,
    delivered: AtomicU64,
}

pub async fn run_watch(args: BenchWatchArgs) -> anyhow::Result<()> {
    args.check()?;
    let fd_limit = raise_fd_limit();
    let flotilla_binary = match &args.flotilla_binary {
        Some(path) => path.clone(),
        None => crate::create::sibling_flotilla_binary()?,
    };
    let cluster = LocalCluster::start(&flotilla_binary, 1)
        .await
        .context("starting the loopback node")?;
    let endpoint = cluster.endpoints()[0].clone();
    let node_pid = cluster.node_pid(0).context("the node has no process id")?;
    let admin = BearerToken::new(Some(cluster.admin_token()))?;
    let mut writer = agent_client(connect(&endpoint).await?, admin.clone());
    let agents = create_agents(&endpoint, &mut writer, args.agents).await?;
    let keys = mint_viewer_keys(&endpoint, &admin, args.watchers.div_ceil(WATCHES_PER_KEY)).await?;

    let baseline = probe_for(
        &endpoint,
        &admin,
        &agents[0].id,
        Duration::from_millis(BASELINE_PROBE_MS),
    )
    .await?;
    let rss_before_kib = node_rss_kib(node_pid)?;
    let progress = Arc::new(Progress::default());
    let open_started = Instant::now();
    let watchers = open_watchers(&endpoint, &args, &agents, &keys, &progress).await?;
    wait_for_opens(&progress, args.watchers).await?;
    let open_elapsed = open_started.elapsed();
    let rss_after_kib = node_rss_kib(node_pid)?;

    let probe_stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe_until(
        endpoint.clone(),
        admin.clone(),
        agents[0].id.clone(),
        probe_stop.clone(),
    ));
    let fan_out_started = Instant::now();
    let writes = commit_follow_ups(&endpoint, &writer, &agents, args.events, args.rate).await?;
    let expected = expected_deliveries(&args, args.events);
    wait_for_deliveries(&progress, expected).await;
    let fan_out_elapsed = fan_out_started.elapsed();
    let delivered = progress.delivered.load(Ordering::Relaxed);
    probe_stop.store(true, Ordering::Relaxed);
    let during = probe.await.context("the probe task failed")??;

    let stops = stop_agents(&endpoint, &mut writer, &agents).await?;
    let mut reports = Vec::with_capacity(watchers.len());
    for watcher in watchers {
        reports.push(watcher.await.context("a watcher task failed")?);
    }
    let summary = RunSummary {
        fd_limit,
        open_elapsed,
        rss_before_kib,
        rss_after_kib,
        fan_out_elapsed,
        expected,
        delivered,
        baseline,
        during,
    };
    print_figures(&args, &summary, &writes, &stops, &reports);
    drop(cluster);
    Ok(())
}

/// Creates the watched agents one after the other (they stay queued: the node has no slots).
async fn create_agents(endpoint: &str, writer: &mut AgentClient, count: usize) -> anyhow::Result<Vec<WatchedAgent>> {
    let mut agents = Vec::with_capacity(count);
    for index in 0..count {
        let request = CreateAgentRequest {
            prompt: "Benchmark agent: reply that there is nothing to do.".to_string(),
            repository: BENCH_REPOSITORY.to_string(),
            base_branch: "main".to_string(),
            name: format!("watch-{index}"),
            ..Default::default()
        };
        let created = unary(endpoint, writer.create_agent(request)).await?;
        let agent = created.agent.context("a create answered without its agent")?;
        agents.push(WatchedAgent {
            id: agent.id,
            first_sequence: agent.last_sequence,
        });
    }
    Ok(agents)
}

/// Viewer keys of the admin's team, enough for every watcher under the per-key cap.
async fn mint_viewer_keys(endpoint: &str, admin: &BearerToken, count: usize) -> anyhow::Result<Vec<BearerToken>> {
    let mut access = AccessServiceClient::with_interceptor(connect(endpoint).await?, admin.clone());
    let mut keys = Vec::with_capacity(count);
    for index in 0..count {
        let minted = unary(
            endpoint,
            access.create_key(CreateKeyRequest {
                team: String::new(),
                user: format!("watcher-{index}"),
                role: "viewer".to_string(),
                expires_in_seconds: 0,
            }),
        )
        .await?;
        keys.push(BearerToken::new(Some(&minted.secret))?);
    }
    Ok(keys)
}

/// Starts every watcher task, over `--connections` connections; opens at most
/// [`MAX_OPENS_IN_FLIGHT`] at once.
async fn open_watchers(
    endpoint: &str,
    args: &BenchWatchArgs,
    agents: &[WatchedAgent],
    keys: &[BearerToken],
    progress: &Arc<Progress>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<WatcherReport>>> {
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        channels.push(connect(endpoint).await?);
    }
    let opens = Arc::new(tokio::sync::Semaphore::new(MAX_OPENS_IN_FLIGHT));
    let mut watchers = Vec::with_capacity(args.watchers);
    for index in 0..args.watchers {
        let agent_index = index % agents.len();
        let client = agent_client(
            channels[index % channels.len()].clone(),
            keys[index / WATCHES_PER_KEY].clone(),
        );
        let request = WatchAgentRequest {
            id: agents[agent_index].id.clone(),
            after_sequence: agents[agent_index].first_sequence,
        };
        let turn = opens
            .clone()
            .acquire_owned()
            .await
            .context("the open semaphore closed")?;
        watchers.push(tokio::spawn(watch_one(
            client,
            request,
            agent_index,
            turn,
            progress.clone(),
        )));
    }
    Ok(watchers)
}

/// One watcher: waits for the agent record, gives back its open turn, then records every
/// durable event until the stream ends.
async fn watch_one(
    mut client: AgentClient,
    request: WatchAgentRequest,
    agent_index: usize,
    turn: tokio::sync::OwnedSemaphorePermit,
    progress: Arc<Progress>,
) -> WatcherReport {
    let mut report = WatcherReport {
        receipts: Vec::new(),
        failure: None,
    };
    let mut turn = Some(turn);
    let mut stream = match client.watch_agent(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            report.failure = Some(format!("{:?}: {}", status.code(), status.message()));
            return report;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(message)) => match message.kind {
                Some(watch_agent_response::Kind::Snapshot(_)) => {
                    progress.opened.fetch_add(1, Ordering::Relaxed);
                    drop(turn.take());
                }
                Some(watch_agent_response::Kind::Event(event)) if !event.live => {
                    let stamped_ms = event
                        .at
                        .map(|at| at.seconds as f64 * 1000.0 + f64::from(at.nanos) / 1e6)
                        .unwrap_or_default();
                    report.receipts.push(Receipt {
                        agent: agent_index,
                        sequence: event.sequence,
                        received: Instant::now(),
                        from_event_time_ms: wall_clock_ms() - stamped_ms,
                    });
                    progress.delivered.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            },
            Ok(None) => break,
            Err(status) => {
                report.failure = Some(format!("{:?}: {}", status.code(), status.message()));
                break;
            }
        }
    }
    if turn.is_some() {
        progress.failed.fetch_add(1, Ordering::Relaxed);
    }
    report
}

async fn wait_for_opens(progress: &Progress, watchers: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(OPEN_DEADLINE_MS);
    loop {
        let opened = progress.opened.load(Ordering::Relaxed);
        let failed = progress.failed.load(Ordering::Relaxed);
        if opened == watchers {
            return Ok(());
        }
        if failed > 0 {
            bail!("{failed} of {watchers} watches failed to open ({opened} opened)");
        }
        if Instant::now() >= deadline {
            bail!("only {opened} of {watchers} watches opened within {OPEN_DEADLINE_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
    }
}

/// Commits `events` follow-ups at `rate` per second, round-robin over the agents, and returns
/// when each was sent and acknowledged, by (agent index, sequence of its event).
async fn commit_follow_ups(
    endpoint: &str,
    writer: &AgentClient,
    agents: &[WatchedAgent],
    events: usize,
    rate: u64,
) -> anyhow::Result<WriteTimes> {
    let start = tokio::time::Instant::now();
    let writes = futures::stream::iter(0..events)
        .map(|index| {
            let mut writer = writer.clone();
            let agent_index = index % agents.len();
            let id = agents[agent_index].id.clone();
            let due = start + Duration::from_secs_f64(index as f64 / rate as f64);
            async move {
                tokio::time::sleep_until(due).await;
                let sent = Instant::now();
                let request = SendFollowUpRequest {
                    id,
                    text: format!("follow-up {index}"),
                };
                let answer = unary(endpoint, writer.send_follow_up(request)).await?;
                let acknowledged = Instant::now();
                let sequence = answer
                    .agent
                    .map(|agent| agent.last_sequence)
                    .context("a follow-up answered without its agent")?;
                anyhow::Ok(((agent_index, sequence), (sent, acknowledged)))
            }
        })
        .buffer_unordered(MAX_WRITES_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    writes.into_iter().collect()
}

/// Follow-up deliveries the watchers should see: each watcher sees its agent's share.
fn expected_deliveries(args: &BenchWatchArgs, events: usize) -> u64 {
    (0..args.watchers)
        .map(|watcher| {
            let agent = watcher % args.agents;
            let share = events / args.agents + usize::from(agent < events % args.agents);
            share as u64
        })
        .sum()
}

async fn wait_for_deliveries(progress: &Progress, expected: u64) {
    let deadline = Instant::now() + Duration::from_millis(DELIVERY_DEADLINE_MS);
    while progress.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
    }
}

/// Stops every agent: its terminal event is measured like the follow-ups, and ends its streams.
async fn stop_agents(endpoint: &str, writer: &mut AgentClient, agents: &[WatchedAgent]) -> anyhow::Result<WriteTimes> {
    let mut writes = WriteTimes::new();
    for (agent_index, agent) in agents.iter().enumerate() {
        let sent = Instant::now();
        let request = StopAgentRequest {
            id: agent.id.clone(),
            reason: "watch bench done".to_string(),
        };
        let stopped = unary(endpoint, writer.stop_agent(request)).await?;
        writes.insert((agent_index, stopped.last_sequence), (sent, Instant::now()));
    }
    Ok(writes)
}

/// `GetAgent` latencies (ms) on a connection of its own, for `length`.
async fn probe_for(endpoint: &str, token: &BearerToken, id: &str, length: Duration) -> anyhow::Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe_until(
        endpoint.to_string(),
        token.clone(),
        id.to_string(),
        stop.clone(),
    ));
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    probe.await.context("the probe task failed")?
}

async fn probe_until(
    endpoint: String,
    token: BearerToken,
    id: String,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<f64>> {
    let channel: Channel = connect(&endpoint).await?;
    let mut client = agent_client(channel, token);
    let mut latencies_ms = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_millis(PROBE_INTERVAL_MS));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let started = Instant::now();
        unary(&endpoint, client.get_agent(GetAgentRequest { id: id.clone() })).await?;
        latencies_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(latencies_ms)
}

struct RunSummary {
    fd_limit: Option<u64>,
    open_elapsed: Duration,
    rss_before_kib: u64,
    rss_after_kib: u64,
    fan_out_elapsed: Duration,
    expected: u64,
    /// Follow-up deliveries when the fan-out ended (all expected, or the deadline passed).
    delivered: u64,
    baseline: Vec<f64>,
    during: Vec<f64>,
}

fn print_figures(
    args: &BenchWatchArgs,
    summary: &RunSummary,
    writes: &WriteTimes,
    stops: &WriteTimes,
    reports: &[WatcherReport],
) {
    let build = crate::build_profile();
    println!(
        "1 node, {} watchers on {} agents over {} connections, {} follow-ups at {}/s, then a stop per agent ({build} build of flotilla-bench and flotilla)",
        args.watchers, args.agents, args.connections, args.events, args.rate
    );
    if let Some(limit) = summary.fd_limit {
        println!("open-file limit of the bench: {limit}");
    }
    println!(
        "watchers open (agent record received) in {:.1} s",
        summary.open_elapsed.as_secs_f64()
    );
    let grown_kib = summary.rss_after_kib.saturating_sub(summary.rss_before_kib);
    println!(
        "node RSS: {} KiB before, {} KiB with the watchers open: {:.1} KiB per watcher",
        summary.rss_before_kib,
        summary.rss_after_kib,
        grown_kib as f64 / args.watchers as f64
    );
    print_latencies("follow-up", writes, reports);
    print_latencies("stop", stops, reports);
    println!(
        "follow-up deliveries: {} of {} expected in {:.1} s from the first write: {:.0} events/s delivered in total",
        summary.delivered,
        summary.expected,
        summary.fan_out_elapsed.as_secs_f64(),
        summary.delivered as f64 / summary.fan_out_elapsed.as_secs_f64()
    );
    let failures: Vec<&String> = reports.iter().filter_map(|report| report.failure.as_ref()).collect();
    if let Some(first) = failures.first() {
        println!("{} streams ended with an error; the first: {first}", failures.len());
    }
    if let Some(figures) = Percentiles::of(&summary.baseline) {
        println!("GetAgent before the watchers: {figures}");
    }
    if let Some(figures) = Percentiles::of(&summary.during) {
        println!("GetAgent during the fan-out:  {figures}");
    }
}

/// Delivery latency of the events `writes` made, to every watcher that received one: from
/// the write's acknowledgement, from its send, from the event's own time, and from the first
/// watcher's receipt of the same event (the fan-out's own spread).
fn print_latencies(what: &str, writes: &WriteTimes, reports: &[WatcherReport]) {
    let mut first_receipt: HashMap<(usize, u64), Instant> = HashMap::new();
    for receipt in reports.iter().flat_map(|report| &report.receipts) {
        let first = first_receipt
            .entry((receipt.agent, receipt.sequence))
            .or_insert(receipt.received);
        *first = (*first).min(receipt.received);
    }
    let (mut from_ack, mut from_send, mut from_stamp, mut spread) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut before_ack = 0usize;
    let milliseconds = |duration: Duration| duration.as_secs_f64() * 1000.0;
    for receipt in reports.iter().flat_map(|report| &report.receipts) {
        let key = (receipt.agent, receipt.sequence);
        let Some(&(sent, acknowledged)) = writes.get(&key) else {
            continue;
        };
        if receipt.received < acknowledged {
            before_ack += 1;
        }
        from_ack.push(milliseconds(receipt.received.saturating_duration_since(acknowledged)));
        from_send.push(milliseconds(receipt.received.saturating_duration_since(sent)));
        from_stamp.push(receipt.from_event_time_ms.max(0.0));
        spread.push(milliseconds(
            receipt.received.saturating_duration_since(first_receipt[&key]),
        ));
    }
    let lines = [
        ("from the write's acknowledgement", from_ack),
        ("from the write's send", from_send),
        ("from the event's time (`at`)", from_stamp),
        ("from the first watcher's receipt", spread),
    ];
    for (from, samples) in lines {
        if let Some(figures) = Percentiles::of(&samples) {
            println!("{what} delivery {from:<34} {figures}");
        }
    }
    println!("  ({before_ack} {what} deliveries arrived before their write's acknowledgement; counted 0)");
}

fn wall_clock_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64() * 1000.0)
        .unwrap_or_default()
}

/// The node's resident set (VmRSS) in KiB.
fn node_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no VmRSS line"))
}

/// Raises this process's soft open-file limit to its hard limit (each connection is one file;
/// a stream is not). Returns the limit in force, or `None` when it cannot be read.
// Unsafe: getrlimit(2)/setrlimit(2) have no safe wrapper in std.
#[allow(unsafe_code)]
fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some(limit.rlim_cur)
}
