//! `flotilla-bench provision`: how fast one node takes a burst of agents from create to work.
//! A one-node loopback cluster (real bubblewrap machines, so run as root) with a slot for every
//! agent, a repository whose environment.json has an `install` step, and the fake
//! OpenAI-compatible model server of the tests. A warm-up agent builds the install layer and
//! the node's mirror first ("from a warm snapshot"); then the burst is created, `--concurrency`
//! creates in flight at a time.
//!
//! An agent counts as *provisioned* when its first model request reaches the model server: the
//! node has assigned it, started its actor, prepared its workspace, booted its machine (with
//! `start` and terminals), written `RUNNING` and begun its first turn. The fake server holds
//! that request, so nothing after it costs the node anything.
//!
//! Per stage, from the node's own log lines (JSON, timestamped by the node): create sent ->
//! acknowledged -> agent actor started (the assignment applied on the node) -> `PROVISIONING`
//! written -> workspace prepared -> machine ready -> first model request. Prints p50/p99 per
//! stage and agents per second; asserts nothing about time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use flotilla_proto::v1::{AgentStatus, CreateAgentRequest, GetAgentRequest, ListAgentsRequest};
use flotilla_tests::burst::node_config;
use flotilla_tests::fakes::{create_bare_repository, FakeModelServer};
use futures::StreamExt;

use crate::client::{agent_client, connect, unary, BearerToken};
use crate::local_cluster::{LocalCluster, NodeSetup};
use crate::machines::Percentiles;

const MAX_AGENTS: usize = 5_000;
const MAX_CONCURRENCY: usize = 1_024;
/// How often the model server's request count is read while the burst runs.
const ARRIVAL_POLL: Duration = Duration::from_millis(1);
/// How often the node is asked for failed agents while the burst runs.
const FAILURE_POLL: Duration = Duration::from_millis(250);
/// The warm-up agent (install layer, mirror clone) gets this long.
const WARM_UP_DEADLINE: Duration = Duration::from_secs(180);
/// The node's log filter while it runs under this bench: the stage lines and warnings only.
const NODE_LOG_FILTER: &str =
    "warn,flotilla_actors::agent=info,flotilla_actors::machine=debug,flotilla_actors::repo=debug";

#[derive(clap::Args, Debug)]
pub struct BenchProvisionArgs {
    /// agents of the burst
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// creates in flight at once
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// how long to wait for every agent of the burst to be provisioned
    #[arg(long, default_value_t = 300)]
    pub settle_seconds: u64,
    /// the `flotilla` executable the node runs; by default the one next to this executable
    #[arg(long, env = "FLOTILLA_BINARY")]
    pub flotilla_binary: Option<PathBuf>,
}

/// The node inherits this process's environment: JSON log lines with the stage events. Called
/// before the async runtime starts (no other thread reads the environment then).
pub fn prepare_node_environment() {
    std::env::set_var("FLOTILLA_LOG_FORMAT", "json");
    std::env::set_var("RUST_LOG", NODE_LOG_FILTER);
}

/// One agent of the burst, as the bench and the node saw it.
#[derive(Default, Clone)]
struct Timeline {
    id: String,
    sent: Option<SystemTime>,
    acknowledged: Option<SystemTime>,
    actor_started: Option<SystemTime>,
    provisioning: Option<SystemTime>,
    workspace: Option<SystemTime>,
    machine_ready: Option<SystemTime>,
    first_model_request: Option<SystemTime>,
}

fn marker(index: usize) -> String {
    format!("provision-agent-{index}:")
}

pub async fn run_provision(args: BenchProvisionArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.agents > MAX_AGENTS {
        bail!("--agents must be between 1 and {MAX_AGENTS}, found {}", args.agents);
    }
    if args.concurrency == 0 || args.concurrency > MAX_CONCURRENCY {
        bail!(
            "--concurrency must be between 1 and {MAX_CONCURRENCY}, found {}",
            args.concurrency
        );
    }
    let flotilla_binary = match &args.flotilla_binary {
        Some(path) => path.clone(),
        None => crate::create::sibling_flotilla_binary()?,
    };
    let model = FakeModelServer::start().await;
    // Every first turn waits here: the request is recorded, the agent holds its machine.
    let _held = model.hold_turn(0);
    let config = format!(
        "{}\n[repos]\nallow_local = [\"{}\"]\n",
        node_config(&model),
        std::env::temp_dir().display()
    );
    let setup = NodeSetup {
        slots: args.agents as u32 + 1,
        config: Some(config),
    };
    let cluster = LocalCluster::start_with(&flotilla_binary, 1, setup)
        .await
        .context("starting the one-node cluster")?;
    let origin = create_bare_repository(
        cluster.directory(),
        "provision",
        &[
            ("README.md", "a repository for the provisioning benchmark\n"),
            (
                ".flotilla/environment.json",
                r#"{"install": "mkdir -p /opt/bench && echo installed > /opt/bench/ready"}"#,
            ),
        ],
    );
    let repository = format!("file://{}", origin.display());
    let endpoint = cluster.endpoints()[0].clone();
    let token = BearerToken::new(Some(cluster.admin_token()))?;
    let client = agent_client(connect(&endpoint).await?, token);

    let warm_up_started = SystemTime::now();
    create(&endpoint, &client, &repository, "provision-warm-up: hold the machine.").await?;
    if !model.wait_for_turn_request(0, WARM_UP_DEADLINE).await {
        bail!("the warm-up agent made no model request within {WARM_UP_DEADLINE:?}");
    }
    let warm_up = warm_up_started.elapsed().unwrap_or_default();
    let before_burst = model.request_count();

    let arrivals = Arc::new(Mutex::new(Vec::<SystemTime>::with_capacity(args.agents)));
    let watcher = tokio::spawn(watch_arrivals(model.clone(), before_burst, arrivals.clone()));
    let node_pid = cluster.node_pid(0).context("the node has no process id")?;
    let node_cpu_before = crate::cpu::cpu_seconds(node_pid);
    let burst_started = SystemTime::now();
    let mut timelines = create_burst(&endpoint, &client, &repository, &args).await?;
    let settle = Duration::from_secs(args.settle_seconds);
    let failed = wait_for_burst(&endpoint, &client, &timelines, &arrivals, settle).await;
    watcher.abort();
    let failed = match failed {
        Ok(failed) => failed,
        Err(error) => {
            let missing = describe_missing(&endpoint, &client, &model, &timelines).await;
            return Err(error.context(missing));
        }
    };
    attribute_arrivals(&model, before_burst, &arrivals, &mut timelines)?;
    let mut repo = RepoWork::default();
    read_node_log(&cluster.directory().join("node1.log"), &mut timelines, &mut repo)?;
    print_report(&args, &timelines, burst_started, warm_up);
    for (name, samples) in [
        ("mirror fetches", &repo.fetches_ms),
        ("workspaces made", &repo.workspaces_ms),
    ] {
        if let Some(figures) = Percentiles::of(samples) {
            println!("{name:<38} {figures}");
        }
    }
    if let Some(cpu) = crate::cpu::cpu_seconds(node_pid)
        .zip(node_cpu_before)
        .map(|(now, then)| now - then)
    {
        println!(
            "node CPU during the burst: {cpu:.1} s (the node and the git and helper processes it reaped), {:.0} ms per agent",
            cpu * 1000.0 / args.agents as f64
        );
    }
    if !failed.is_empty() {
        println!("agents failed before their first model call: {}", failed.len());
        for error in failed.iter().take(5) {
            println!("  {error}");
        }
    }
    Ok(())
}

async fn create(
    endpoint: &str,
    client: &crate::client::AgentClient,
    repository: &str,
    prompt: &str,
) -> anyhow::Result<String> {
    let request = CreateAgentRequest {
        prompt: prompt.to_string(),
        repository: repository.to_string(),
        base_branch: "main".to_string(),
        ..Default::default()
    };
    let created = unary(endpoint, client.clone().create_agent(request)).await?;
    created
        .agent
        .map(|agent| agent.id)
        .context("a create answered without its agent")
}

async fn create_burst(
    endpoint: &str,
    client: &crate::client::AgentClient,
    repository: &str,
    args: &BenchProvisionArgs,
) -> anyhow::Result<Vec<Timeline>> {
    let results: Vec<anyhow::Result<Timeline>> = futures::stream::iter(0..args.agents)
        .map(|index| async move {
            let sent = SystemTime::now();
            let prompt = format!("{} hold the machine.", marker(index));
            let id = create(endpoint, client, repository, &prompt).await?;
            Ok(Timeline {
                id,
                sent: Some(sent),
                acknowledged: Some(SystemTime::now()),
                ..Default::default()
            })
        })
        .buffered(args.concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Records when the model server's request count passes each value after `before`, until
/// aborted.
async fn watch_arrivals(model: FakeModelServer, before: u64, arrivals: Arc<Mutex<Vec<SystemTime>>>) {
    let mut seen = before;
    loop {
        let count = model.request_count();
        if count > seen {
            let now = SystemTime::now();
            let mut arrivals = arrivals.lock().expect("arrivals lock");
            for _ in seen..count {
                arrivals.push(now);
            }
            seen = count;
        }
        tokio::time::sleep(ARRIVAL_POLL).await;
    }
}

/// Waits until every agent of the burst made its first model request or failed; answers the
/// failed ones (id and error).
async fn wait_for_burst(
    endpoint: &str,
    client: &crate::client::AgentClient,
    timelines: &[Timeline],
    arrivals: &Mutex<Vec<SystemTime>>,
    settle: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + settle;
    let ids: std::collections::HashSet<&str> = timelines.iter().map(|timeline| timeline.id.as_str()).collect();
    loop {
        let request = ListAgentsRequest {
            statuses: vec![AgentStatus::Failed as i32],
            page_size: 500,
            ..Default::default()
        };
        let listed = unary(endpoint, client.clone().list_agents(request)).await?;
        let failed: Vec<String> = listed
            .agents
            .iter()
            .filter(|agent| ids.contains(agent.id.as_str()))
            .map(|agent| format!("{}: {}", agent.id, agent.error))
            .collect();
        let arrived = arrivals.lock().expect("arrivals lock").len();
        if arrived + failed.len() >= timelines.len() {
            return Ok(failed);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{arrived} agents provisioned and {} failed of {} within {settle:?}",
                failed.len(),
                timelines.len()
            );
        }
        tokio::time::sleep(FAILURE_POLL).await;
    }
}

/// Which agent made each request of the burst (the marker in its prompt), and when it came.
fn attribute_arrivals(
    model: &FakeModelServer,
    before: u64,
    arrivals: &Mutex<Vec<SystemTime>>,
    timelines: &mut [Timeline],
) -> anyhow::Result<()> {
    let requests = model.requests();
    let since_burst = (model.request_count() - before) as usize;
    if since_burst > requests.len() {
        bail!(
            "the model server keeps {} requests, the burst made {since_burst}",
            requests.len()
        );
    }
    let arrivals = arrivals.lock().expect("arrivals lock");
    let first = requests.len() - since_burst;
    for (request, arrived) in requests[first..].iter().zip(arrivals.iter()) {
        let body = request.body.to_string();
        let Some(index) = (0..timelines.len()).find(|index| body.contains(&marker(*index))) else {
            continue;
        };
        timelines[index].first_model_request.get_or_insert(*arrived);
    }
    Ok(())
}

/// What the node's repository actor did during the run: its fetches of the mirror and its
/// workspaces made (milliseconds each).
#[derive(Default)]
struct RepoWork {
    fetches_ms: Vec<f64>,
    workspaces_ms: Vec<f64>,
}

/// The stage lines of the node's JSON log, by agent id.
fn read_node_log(path: &Path, timelines: &mut [Timeline], repo: &mut RepoWork) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let by_id: HashMap<String, usize> = timelines
        .iter()
        .enumerate()
        .map(|(index, timeline)| (timeline.id.clone(), index))
        .collect();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &event["fields"];
        let elapsed_ms = fields["elapsed_ms"].as_f64();
        match (fields["message"].as_str(), elapsed_ms) {
            (Some("mirror fetched"), Some(elapsed)) => repo.fetches_ms.push(elapsed),
            (Some("workspace made"), Some(elapsed)) => repo.workspaces_ms.push(elapsed),
            _ => {}
        }
        let (Some(message), Some(agent), Some(timestamp)) = (
            fields["message"].as_str(),
            fields["agent"].as_str(),
            event["timestamp"].as_str(),
        ) else {
            continue;
        };
        let Some(&index) = by_id.get(agent) else {
            continue;
        };
        let Ok(at) = humantime::parse_rfc3339_weak(timestamp) else {
            continue;
        };
        let timeline = &mut timelines[index];
        let slot = match message {
            "started agent actor" => &mut timeline.actor_started,
            "provisioning a machine" => &mut timeline.provisioning,
            "workspace prepared" => &mut timeline.workspace,
            "machine ready" => &mut timeline.machine_ready,
            _ => continue,
        };
        slot.get_or_insert(at);
    }
    Ok(())
}

fn between(from: Option<SystemTime>, to: Option<SystemTime>) -> Option<f64> {
    let elapsed = to?.duration_since(from?).unwrap_or_default();
    Some(elapsed.as_secs_f64() * 1000.0)
}

fn print_report(args: &BenchProvisionArgs, timelines: &[Timeline], burst_started: SystemTime, warm_up: Duration) {
    println!(
        "1 node, {} agents, {} creates in flight ({} build of flotilla-bench); warm-up agent provisioned in {:.0} ms",
        args.agents,
        args.concurrency,
        crate::build_profile(),
        warm_up.as_secs_f64() * 1000.0
    );
    println!("provisioned = the agent's first model request reached the model server (machine up, RUNNING written, first turn begun)");
    type Stage = fn(&Timeline) -> Option<f64>;
    let stages: [(&str, Stage); 8] = [
        ("create sent -> acknowledged", |t| between(t.sent, t.acknowledged)),
        ("acknowledged -> actor started", |t| {
            between(t.acknowledged, t.actor_started)
        }),
        ("actor started -> PROVISIONING", |t| {
            between(t.actor_started, t.provisioning)
        }),
        ("PROVISIONING -> workspace ready", |t| {
            between(t.provisioning, t.workspace)
        }),
        ("workspace -> machine ready", |t| between(t.workspace, t.machine_ready)),
        ("machine ready -> first model call", |t| {
            between(t.machine_ready, t.first_model_request)
        }),
        ("machine start share (provisioning)", |t| {
            between(t.provisioning, t.machine_ready)
        }),
        ("create sent -> provisioned", |t| between(t.sent, t.first_model_request)),
    ];
    for (name, stage) in stages {
        let samples: Vec<f64> = timelines.iter().filter_map(stage).collect();
        match Percentiles::of(&samples) {
            Some(figures) => println!("{name:<38} {figures}"),
            None => println!("{name:<38} (no samples)"),
        }
    }
    let provisioned: Vec<SystemTime> = timelines.iter().filter_map(|t| t.first_model_request).collect();
    if let Some(last) = provisioned.iter().max() {
        let span = last.duration_since(burst_started).unwrap_or_default().as_secs_f64();
        println!(
            "burst: {} of {} agents provisioned in {:.2} s from the first create: {:.1} agents/s",
            provisioned.len(),
            timelines.len(),
            span,
            provisioned.len() as f64 / span.max(f64::EPSILON)
        );
    }
}

/// The agents not provisioned yet, with their status and error, for the bench's failure.
async fn describe_missing(
    endpoint: &str,
    client: &crate::client::AgentClient,
    model: &FakeModelServer,
    timelines: &[Timeline],
) -> String {
    let requests = model.requests();
    let mut missing = Vec::new();
    for (index, timeline) in timelines.iter().enumerate() {
        let made = requests
            .iter()
            .any(|request| request.body.to_string().contains(&marker(index)));
        if made {
            continue;
        }
        let request = GetAgentRequest {
            id: timeline.id.clone(),
        };
        let described = match unary(endpoint, client.clone().get_agent(request)).await {
            Ok(agent) => format!("{} status {} {}", timeline.id, agent.status, agent.error),
            Err(error) => format!("{} ({error})", timeline.id),
        };
        missing.push(described);
        if missing.len() >= 5 {
            break;
        }
    }
    missing.join("; ")
}
