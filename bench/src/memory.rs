//! `flotilla-bench memory`: what agents cost a node in memory, and how a node with a large
//! history starts and lists. Three parts, each on a fresh one-node loopback cluster:
//!
//! 1. idle records: queued agents on a node without slots; the node's resident memory and the
//!    serialised state (a backup's bytes) before and after, divided by the count;
//! 2. running agents: agents with real machines holding a long command (the fake model server's
//!    hold script), the node's and its machines' proportional memory (PSS) before and after;
//! 3. a large history: agents created and stopped through the public API (each a replicated
//!    create and stop), then a SIGKILL and a start (what it re-applied from the Raft log, from
//!    the node's log), a clean stop and a restart of the node, each start timed until it
//!    answers, and `ListAgents` pages, filters and searches timed on the restarted node.
//!
//! It prints figures and asserts nothing about time.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::v1::{self, admin_service_client::AdminServiceClient};
use flotilla_tests::burst::{hold_script, node_config};
use flotilla_tests::fakes::{create_bare_repository, FakeModelServer};
use futures::StreamExt;
use prost::Message;

use crate::client::{agent_client, connect, get_cluster, AgentClient, BearerToken};
use crate::local_cluster::{LocalCluster, NodeSetup};
use crate::run_limits::until_interrupted;

const MAX_AGENTS: usize = 1_000_000;
const MAX_RUNNING_AGENTS: usize = 500;
const MAX_CONCURRENCY: usize = 1024;
/// HTTP/2 connections the bench's clients share.
const CONNECTIONS: usize = 4;
/// Errors tolerated while filling a node before the bench gives up.
const MAX_FILL_ERRORS: usize = 100;
/// How long a node may take to stop cleanly, and to answer again after a restart.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
const RESTART_DEADLINE: Duration = Duration::from_secs(300);
/// How long the running agents may take to all be running.
const RUNNING_DEADLINE: Duration = Duration::from_secs(600);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
const BENCH_REPOSITORY: &str = "https://example.com/bench/repo.git";

#[derive(clap::Args, Debug)]
pub struct BenchMemoryArgs {
    /// queued agents created on a node without slots (0 skips the part)
    #[arg(long, default_value_t = 10_000)]
    pub idle_agents: usize,
    /// agents running at once with real machines (0 skips the part)
    #[arg(long, default_value_t = 20)]
    pub running_agents: usize,
    /// agents created and stopped before the node restarts (0 skips the part)
    #[arg(long, default_value_t = 100_000)]
    pub ended_agents: usize,
    /// creates (and stops) in flight at once
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// calls timed per kind of list call
    #[arg(long, default_value_t = 100)]
    pub list_samples: usize,
    /// the `flotilla` executable the cluster runs; by default the one next to this executable
    #[arg(long, env = "FLOTILLA_BINARY")]
    pub flotilla_binary: Option<PathBuf>,
    /// each created agent's prompt is lengthened with prose to this many bytes (0: a one-line
    /// prompt of about 60 bytes)
    #[arg(long, default_value_t = 0)]
    pub prompt_bytes: usize,
}

pub async fn run_memory(args: BenchMemoryArgs) -> anyhow::Result<()> {
    for (flag, value, most) in [
        ("--idle-agents", args.idle_agents, MAX_AGENTS),
        ("--ended-agents", args.ended_agents, MAX_AGENTS),
        ("--running-agents", args.running_agents, MAX_RUNNING_AGENTS),
    ] {
        if value > most {
            bail!("{flag} must be at most {most}, found {value}");
        }
    }
    if args.concurrency == 0 || args.concurrency > MAX_CONCURRENCY {
        bail!(
            "--concurrency must be between 1 and {MAX_CONCURRENCY}, found {}",
            args.concurrency
        );
    }
    if args.list_samples == 0 {
        bail!("--list-samples must be at least 1");
    }
    let binary = match &args.flotilla_binary {
        Some(path) => path.clone(),
        None => crate::create::sibling_flotilla_binary()?,
    };
    until_interrupted(async {
        if args.idle_agents > 0 {
            idle_records(&binary, &args).await.context("idle agent records")?;
        }
        if args.running_agents > 0 {
            running_agents(&binary, args.running_agents)
                .await
                .context("running agents")?;
        }
        if args.ended_agents > 0 {
            large_history(&binary, &args)
                .await
                .context("a node with a large history")?;
        }
        Ok(())
    })
    .await
}

/// Part 1: bytes per queued agent record.
async fn idle_records(binary: &Path, args: &BenchMemoryArgs) -> anyhow::Result<()> {
    let cluster = LocalCluster::start(binary, 1).await?;
    let endpoint = cluster.endpoints()[0].clone();
    let token = BearerToken::new(Some(cluster.admin_token()))?;
    let pid = cluster.node_pid(0).context("the node has no process id")?;
    let rss_before = rss_bytes(pid)?;
    let backup_before = backup_bytes(&endpoint, &token).await?;
    let filled = fill(
        &endpoint,
        &token,
        args.idle_agents,
        args.concurrency,
        false,
        args.prompt_bytes,
    )
    .await?;
    let rss_after = rss_bytes(pid)?;
    let backup_after = backup_bytes(&endpoint, &token).await?;
    let count = args.idle_agents as f64;
    println!(
        "idle agent records (one node, 0 slots, {} queued agents; {} build)",
        args.idle_agents,
        crate::build_profile()
    );
    println!("  created at {:.0}/s", filled.per_second());
    println!(
        "  node RSS {} -> {}: {:.0} bytes per agent",
        mib(rss_before),
        mib(rss_after),
        (rss_after.saturating_sub(rss_before)) as f64 / count
    );
    println!(
        "  serialised state (backup) {} -> {}: {:.0} bytes per agent",
        mib(backup_before),
        mib(backup_after),
        (backup_after.saturating_sub(backup_before)) as f64 / count
    );
    println!(
        "  in-memory state (heap of the records, events and indexes, built by apply here): {:.0} bytes per queued agent, {:.0} per stopped agent",
        state_bytes_per_agent(args.idle_agents, false),
        state_bytes_per_agent(args.idle_agents, true)
    );
    Ok(())
}

/// Part 2: bytes per running agent, node and machines.
async fn running_agents(binary: &Path, count: usize) -> anyhow::Result<()> {
    let model = FakeModelServer::start().await;
    model.set_script(hold_script());
    // The origin is a bare repository in the cluster's temporary directory, under /tmp.
    let setup = NodeSetup {
        slots: count as u32,
        config: Some(format!("{}\n[repos]\nallow_local = [\"/tmp\"]\n", node_config(&model))),
    };
    let cluster = LocalCluster::start_with(binary, 1, setup).await?;
    let origin = create_bare_repository(cluster.directory(), "memory", &[("README.md", "memory\n")]);
    let endpoint = cluster.endpoints()[0].clone();
    let token = BearerToken::new(Some(cluster.admin_token()))?;
    let pid = cluster.node_pid(0).context("the node has no process id")?;
    let node_before = rss_bytes(pid)?;
    let tree_before = tree_pss_bytes(pid);
    let mut client = agent_client(connect(&endpoint).await?, token.clone());
    for index in 0..count {
        client
            .create_agent(v1::CreateAgentRequest {
                prompt: "Hold the machine".to_string(),
                repository: format!("file://{}", origin.display()),
                base_branch: "main".to_string(),
                name: format!("memory-running-{index}"),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating running agent {index}"))?;
    }
    let started = Instant::now();
    loop {
        let running = count_with_status(&mut client, v1::AgentStatus::Running).await?;
        if running >= count {
            break;
        }
        if started.elapsed() >= RUNNING_DEADLINE {
            bail!(
                "only {running} of {count} agents running after {} s",
                RUNNING_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let node_after = rss_bytes(pid)?;
    let tree_after = tree_pss_bytes(pid);
    let per = |before: u64, after: u64| after.saturating_sub(before) as f64 / count as f64;
    println!("running agents (one node, {count} agents with real machines holding `sleep`)");
    println!(
        "  all running {:.1} s after the last create",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  node RSS {} -> {}: {:.0} KiB per running agent",
        mib(node_before),
        mib(node_after),
        per(node_before, node_after) / 1024.0
    );
    println!(
        "  node and its machines' processes, PSS {} ({} processes) -> {} ({} processes): {:.0} KiB per running agent",
        mib(tree_before.bytes),
        tree_before.processes,
        mib(tree_after.bytes),
        tree_after.processes,
        per(tree_before.bytes, tree_after.bytes) / 1024.0
    );
    Ok(())
}

/// Part 3: a node with many ended agents, stopped, restarted and listed.
async fn large_history(binary: &Path, args: &BenchMemoryArgs) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(binary, 1).await?;
    let endpoint = cluster.endpoints()[0].clone();
    let token = BearerToken::new(Some(cluster.admin_token()))?;
    let filled = fill(
        &endpoint,
        &token,
        args.ended_agents,
        args.concurrency,
        true,
        args.prompt_bytes,
    )
    .await?;
    let rss = rss_bytes(cluster.node_pid(0).context("the node has no process id")?)?;
    println!(
        "large history (one node, {} agents created and stopped; {} build)",
        args.ended_agents,
        crate::build_profile()
    );
    println!(
        "  created and stopped at {:.0} agents/s ({:.0} writes/s); node RSS {}",
        filled.per_second(),
        filled.per_second() * 2.0,
        mib(rss)
    );
    // A crash first: the state's records are written without RocksDB's log, so a start after
    // a kill re-applies from the Raft log what was applied after the state's last flush.
    cluster.kill_node(0)?;
    let spawned = Instant::now();
    cluster.start_node_again(0)?;
    let (serving, led) = wait_until_serving(&endpoint, &token, spawned).await?;
    println!(
        "  start after SIGKILL: answering GetCluster {:.2} s after spawn, leader {:.2} s ({})",
        serving.as_secs_f64(),
        led.as_secs_f64(),
        reapplied_entries(cluster.log_path(0))
    );
    let stop = cluster.stop_node(0, STOP_DEADLINE).await?;
    let spawned = Instant::now();
    cluster.start_node_again(0)?;
    let (serving, led) = wait_until_serving(&endpoint, &token, spawned).await?;
    let mut client = agent_client(connect(&endpoint).await?, token.clone());
    let first_list = time_call(list(&mut client, 50, "", &[], String::new())).await?.0;
    println!("  clean stop {:.2} s", stop.as_secs_f64());
    println!(
        "  restart: answering GetCluster {:.2} s after spawn, leader {:.2} s, first ListAgents {:.1} ms later; RSS {}",
        serving.as_secs_f64(),
        led.as_secs_f64(),
        first_list.as_secs_f64() * 1000.0,
        mib(rss_bytes(cluster.node_pid(0).context("the node has no process id")?)?)
    );
    time_lists(&mut client, args.list_samples).await
}

/// What the node's log says its start re-applied from the Raft log (its `re-applied committed
/// log entries` line), for the figure above.
fn reapplied_entries(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let line = text
        .lines()
        .find(|line| line.contains("re-applied committed log entries"));
    let field = |name: &str| {
        line.and_then(|line| line.split(&format!("{name}=")).nth(1))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or("?")
            .to_string()
    };
    match line {
        Some(_) => format!(
            "re-applied {} log entries in {} ms",
            field("entries"),
            field("elapsed_ms")
        ),
        None => "re-applied nothing".to_string(),
    }
}

/// What filling a node did.
struct Filled {
    agents: usize,
    elapsed: Duration,
}

impl Filled {
    fn per_second(&self) -> f64 {
        self.agents as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Creates `count` agents (named `memory-N`) with `concurrency` in flight, and stops each one
/// after its create when `stop` is set.
async fn fill(
    endpoint: &str,
    token: &BearerToken,
    count: usize,
    concurrency: usize,
    stop: bool,
    prompt_bytes: usize,
) -> anyhow::Result<Filled> {
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(agent_client(connect(endpoint).await?, token.clone()));
    }
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let mut client = clients[worker % CONNECTIONS].clone();
            let next = next.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        return;
                    }
                    if let Err(error) = create_and_maybe_stop(&mut client, index, stop, prompt_bytes).await {
                        let mut errors = errors.lock().expect("error list");
                        errors.push(error);
                        if errors.len() >= MAX_FILL_ERRORS {
                            next.store(count, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.context("a fill worker panicked")?;
    }
    let errors = errors.lock().expect("error list");
    if let Some(first) = errors.first() {
        bail!("{} creates or stops failed; the first: {first}", errors.len());
    }
    Ok(Filled {
        agents: count,
        elapsed: started.elapsed(),
    })
}

/// The prompt of the bench's agent `index`, lengthened with prose to `bytes` when longer.
fn bench_prompt(index: usize, bytes: usize) -> String {
    let mut prompt = format!("Memory bench agent {index}: reply that there is nothing to do.");
    const PROSE: &str =
        " Read the repository's README, run its tests, and explain in a short paragraph what fails and why.";
    while prompt.len() + PROSE.len() <= bytes {
        prompt.push_str(PROSE);
    }
    prompt
}

async fn create_and_maybe_stop(
    client: &mut AgentClient,
    index: usize,
    stop: bool,
    prompt_bytes: usize,
) -> Result<(), String> {
    let created = client
        .create_agent(v1::CreateAgentRequest {
            prompt: bench_prompt(index, prompt_bytes),
            repository: BENCH_REPOSITORY.to_string(),
            base_branch: "main".to_string(),
            name: format!("memory-{index:07}"),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("create {index}: {}", status.message()))?
        .into_inner();
    if stop {
        let id = created
            .agent
            .map(|agent| agent.id)
            .ok_or_else(|| format!("create {index}: no agent in the answer"))?;
        client
            .stop_agent(v1::StopAgentRequest {
                id,
                reason: "memory bench".to_string(),
            })
            .await
            .map_err(|status| format!("stop {index}: {}", status.message()))?;
    }
    Ok(())
}

/// Polls the restarted node until it answers `GetCluster`, then until it names a leader.
async fn wait_until_serving(
    endpoint: &str,
    token: &BearerToken,
    spawned: Instant,
) -> anyhow::Result<(Duration, Duration)> {
    let mut serving = None;
    loop {
        match get_cluster(endpoint, token).await {
            Ok(cluster) => {
                let answered = *serving.get_or_insert_with(|| spawned.elapsed());
                if cluster.leader_id != 0 {
                    return Ok((answered, spawned.elapsed()));
                }
            }
            Err(error) if spawned.elapsed() >= RESTART_DEADLINE => {
                bail!(
                    "the node did not answer within {} s of its restart: {error}",
                    RESTART_DEADLINE.as_secs()
                )
            }
            Err(_) => {}
        }
        if spawned.elapsed() >= RESTART_DEADLINE {
            bail!(
                "the node named no leader within {} s of its restart",
                RESTART_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn list(
    client: &mut AgentClient,
    page_size: i32,
    search: &str,
    statuses: &[v1::AgentStatus],
    page_token: String,
) -> anyhow::Result<v1::ListAgentsResponse> {
    let response = client
        .list_agents(v1::ListAgentsRequest {
            statuses: statuses.iter().map(|status| *status as i32).collect(),
            search: search.to_string(),
            page_size,
            page_token,
            ..Default::default()
        })
        .await
        .context("ListAgents")?;
    Ok(response.into_inner())
}

async fn time_call<T>(call: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<(Duration, T)> {
    let started = Instant::now();
    let value = call.await?;
    Ok((started.elapsed(), value))
}

async fn count_with_status(client: &mut AgentClient, status: v1::AgentStatus) -> anyhow::Result<usize> {
    let mut count = 0;
    let mut token = String::new();
    loop {
        let page = list(client, 500, "", &[status], token).await?;
        count += page.agents.len();
        if page.next_page_token.is_empty() {
            return Ok(count);
        }
        token = page.next_page_token;
    }
}

/// Times each kind of list call `samples` times and prints p50, p99 and the worst.
async fn time_lists(client: &mut AgentClient, samples: usize) -> anyhow::Result<()> {
    let mut figures: BTreeMap<usize, (String, Vec<Duration>, usize)> = BTreeMap::new();
    let kinds: [(&str, i32, &str, &[v1::AgentStatus]); 6] = [
        ("page 50", 50, "", &[]),
        ("page 500", 500, "", &[]),
        ("status stopped, page 50", 50, "", &[v1::AgentStatus::Stopped]),
        ("status running (none), page 50", 50, "", &[v1::AgentStatus::Running]),
        ("search one name, page 50", 50, "memory-0000042", &[]),
        ("search every prompt, page 50", 50, "nothing to do", &[]),
    ];
    for (order, (label, page_size, search, statuses)) in kinds.into_iter().enumerate() {
        // Pages in order from the first, starting over at the end: first and next pages alike.
        let mut token = String::new();
        let mut latencies = Vec::with_capacity(samples);
        let mut returned = 0;
        for _ in 0..samples {
            let (took, page) = time_call(list(client, page_size, search, statuses, token.clone())).await?;
            latencies.push(took);
            returned += page.agents.len();
            token = page.next_page_token;
        }
        figures.insert(order, (label.to_string(), latencies, returned));
    }
    println!("  ListAgents on the restarted node ({samples} calls each, pages followed in order):");
    for (label, mut latencies, returned) in figures.into_values() {
        latencies.sort_unstable();
        let at = |quantile: f64| {
            let index = ((latencies.len() as f64 * quantile) as usize).min(latencies.len() - 1);
            latencies[index].as_secs_f64() * 1000.0
        };
        println!(
            "    {label:<32} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({:.0} agents per call)",
            at(0.50),
            at(0.99),
            latencies
                .last()
                .map(|worst| worst.as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
            returned as f64 / latencies.len() as f64
        );
    }
    Ok(())
}

/// The serialised state's size: the bytes of a backup streamed from the node.
async fn backup_bytes(endpoint: &str, token: &BearerToken) -> anyhow::Result<u64> {
    let channel = connect(endpoint).await?;
    let mut admin = AdminServiceClient::with_interceptor(channel, token.clone());
    let mut stream = admin
        .backup(v1::BackupRequest {})
        .await
        .context("starting a backup")?
        .into_inner();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        total += chunk.context("reading a backup chunk")?.encoded_len() as u64;
    }
    Ok(total)
}

/// The global allocator of the bench: mimalloc, as in the node, counting the bytes live on the
/// heap so that the in-memory state's own size can be measured apart from RSS (which also holds
/// RocksDB's memtables, connection buffers and what the allocator keeps for reuse).
pub struct CountingAllocator;

static HEAP_LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// Unsafe: implementing `GlobalAlloc` is unsafe by definition; every call is passed to mimalloc.
#[allow(unsafe_code)]
// SAFETY: each method forwards to mimalloc's implementation with the caller's own arguments,
// so mimalloc's guarantees hold; the counter is only arithmetic on the sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        HEAP_LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: std::alloc::Layout) {
        HEAP_LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `pointer` came from this allocator with `layout`.
        unsafe { mimalloc::MiMalloc.dealloc(pointer, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        HEAP_LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc_zeroed` requires.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        HEAP_LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        HEAP_LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `pointer` came from this allocator with `layout`; the size is the caller's.
        unsafe { mimalloc::MiMalloc.realloc(pointer, layout, new_size) }
    }
}

/// Heap bytes of a [`ClusterState`] holding `count` agents as the node's state holds them: each
/// created, then stopped when `stop` is set, by `apply` itself (the node's own rule), over the
/// bytes of the empty state. Records, durable events and indexes; no storage.
fn state_bytes_per_agent(count: usize, stop: bool) -> f64 {
    use flotilla_state::{apply, AgentSpec, Changes, ClusterState, Command, Request};
    let before = HEAP_LIVE_BYTES.load(Ordering::Relaxed);
    let mut state = ClusterState::default();
    let mut at_ms = 1_700_000_000_000u64;
    for index in 0..count {
        at_ms += 1;
        let id = flotilla_state::AgentId(ulid::Ulid::from_parts(at_ms, index as u128));
        let spec = AgentSpec {
            name: format!("memory-{index:07}"),
            prompt: format!("Memory bench agent {index}: reply that there is nothing to do."),
            repository: BENCH_REPOSITORY.to_string(),
            base_branch: "main".to_string(),
            work_branch: format!("flotilla/{}-memory-{index:07}", id.short()),
            model: "bench".to_string(),
            team: "default".to_string(),
            ..Default::default()
        };
        let mut changes = Changes::default();
        let created = apply(
            &mut state,
            &mut changes,
            &Request::at(at_ms, Command::CreateAgent { id, spec: spec.into() }),
        );
        debug_assert!(created.is_ok(), "a fresh id is created");
        if stop {
            let stopped = Command::StopAgent {
                agent: id,
                reason: "memory bench".to_string(),
            };
            let _ = apply(&mut state, &mut changes, &Request::at(at_ms, stopped));
        }
    }
    let bytes = HEAP_LIVE_BYTES.load(Ordering::Relaxed).saturating_sub(before);
    drop(state);
    bytes as f64 / count.max(1) as f64
}

/// A process's resident memory, from `/proc/PID/status`.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    proc_field_kib(&status, "VmRSS:")
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn proc_field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
}

/// Proportional memory of a process tree.
struct TreeMemory {
    bytes: u64,
    processes: usize,
}

/// The PSS of `root` and every process descended from it (machines, their shells and
/// terminals), so that pages shared between machines count once overall.
fn tree_pss_bytes(root: u32) -> TreeMemory {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(parent) = parent_of(pid) {
                children.entry(parent).or_default().push(pid);
            }
        }
    }
    let mut memory = TreeMemory { bytes: 0, processes: 0 };
    let mut queue = VecDeque::from([root]);
    while let Some(pid) = queue.pop_front() {
        // A process that exited meanwhile counts for nothing.
        if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            memory.bytes += proc_field_kib(&rollup, "Pss:").unwrap_or(0) * 1024;
            memory.processes += 1;
        }
        queue.extend(children.get(&pid).into_iter().flatten().copied());
    }
    memory
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the fields after it are plain.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
