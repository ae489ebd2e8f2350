//! `flotilla-bench turns`: what the turn loop itself costs, and how many concurrent agents one
//! node carries. It runs the real pieces of a node in this process (a single-node Raft group on
//! RocksDB, the actor mesh, real machines, the repository actor) and drives agents with the
//! scripted provider, whose replies take `--model-latency-ms` like a model's would. Each turn
//! calls one read-only tool (`list_dir`, a real command in the machine).
//!
//! Per turn: total time, model time, tool time; the orchestration overhead is what is left
//! (checkpoint, Raft write, live events, follow-up check). Then, per level of concurrency, the
//! turn latency against the one-agent baseline of the same run, to find where it doubles. A
//! second part measures how many events per second one watcher receives from a run whose
//! turns cost nothing. It prints figures and asserts nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use flotilla_actors::machine::{MachineHost, MachineSettings};
use flotilla_actors::mesh::{Mesh, MeshConfig};
use flotilla_actors::model::{ModelProvider, ScriptedProvider};
use flotilla_actors::repo::{mirror_path, RepoActor, RepoArgs};
use flotilla_actors::run::{AgentRuntime, RunContext, RunOutcome, TurnTiming};
use flotilla_raft::command::AssignOne;
use flotilla_raft::{AgentId, AgentSpec, AgentStatus, Command, Epoch, NodeAddr, NodeInfo, Replica, ReplicaConfig};
use futures::StreamExt;
use hdrhistogram::Histogram;
use ractor::Actor;

const MAX_AGENTS: usize = 2_000;
const MAX_TURNS: u32 = 1_000;
/// Machines booted at once while preparing a level.
const PROVISION_CONCURRENCY: usize = 8;
const MAX_RECORDED_US: u64 = 600_000_000;

#[derive(clap::Args, Debug)]
pub struct BenchTurnsArgs {
    /// Concurrent agents, one run per value; the first is the baseline.
    #[arg(long, default_value = "1,50,100,200,300", value_delimiter = ',')]
    pub agents: Vec<usize>,
    /// Turns per agent (each with one list_dir call), then a final answer.
    #[arg(long, default_value_t = 20)]
    pub turns: u32,
    /// How long each scripted reply takes, as a model's would.
    #[arg(long, default_value_t = 1000)]
    pub model_latency_ms: u64,
    /// The tool every turn calls: list_dir (a real command in the machine) or noop (answered
    /// at once, nothing runs).
    #[arg(long, default_value = "list_dir")]
    pub tool: String,
    /// Text-only turns of the run whose events one watcher counts (0 skips that part).
    #[arg(long, default_value_t = 2000)]
    pub watch_turns: u32,
    /// Working directory (a temporary one when absent).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
}

struct Bench {
    replica: Replica,
    mesh: Mesh,
    machines: Arc<MachineHost>,
    repo: ractor::ActorRef<flotilla_actors::repo::RepoMsg>,
    repository: String,
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn git(args: &[&str], cwd: &std::path::Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("git")
        .args(args)
        .current_dir(cwd)
        .status()
        .context("run git")?;
    anyhow::ensure!(status.success(), "git {args:?} failed");
    Ok(())
}

fn sample_repository(dir: &std::path::Path) -> anyhow::Result<String> {
    let seed = dir.join("seed");
    let origin = dir.join("origin.git");
    std::fs::create_dir_all(&seed)?;
    git(&["init", "--quiet", "--bare", &origin.display().to_string()], dir)?;
    git(&["init", "--quiet", "-b", "main"], &seed)?;
    std::fs::write(seed.join("README.md"), "a repository for the turn benchmark\n")?;
    git(&["add", "."], &seed)?;
    git(
        &[
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.test",
            "commit",
            "--quiet",
            "-m",
            "seed",
        ],
        &seed,
    )?;
    git(&["push", "--quiet", &origin.display().to_string(), "main"], &seed)?;
    Ok(format!("file://{}", origin.display()))
}

/// A script of `turns` turns, each calling `tool` (a tool the runtime does not know answers at
/// once with an error, without running anything: a no-op).
fn script(turns: u32, latency_ms: u64, tool: &str) -> String {
    let mut entries: Vec<serde_json::Value> = (0..turns)
        .map(|turn| {
            serde_json::json!({
                "text": format!("Turn {turn}: looking at the workspace."),
                "delay_ms": latency_ms,
                "tool_calls": [{"name": tool, "arguments": {"path": "."}}]
            })
        })
        .collect();
    entries.push(serde_json::json!({"text": "Nothing to change.", "delay_ms": latency_ms}));
    serde_json::json!({ "turns": entries }).to_string()
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_RECORDED_US, 3).expect("valid histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Bench {
    async fn start(dir: &std::path::Path) -> anyhow::Result<Bench> {
        let secret = "bench-turns-secret".to_string();
        let replica = Replica::open(ReplicaConfig::new(1, dir.join("node"), None)).await?;
        let grpc_port = free_port()?;
        let mesh_port = free_port()?;
        replica
            .bootstrap(NodeAddr {
                grpc: format!("127.0.0.1:{grpc_port}"),
                mesh: format!("127.0.0.1:{mesh_port}"),
            })
            .await?;
        replica
            .wait_for_leader(Duration::from_secs(30))
            .await
            .ok_or_else(|| anyhow!("no leader within 30 s"))?;
        replica
            .write(Command::RegisterNode {
                node: 1,
                info: NodeInfo {
                    grpc_address: format!("127.0.0.1:{grpc_port}"),
                    mesh_address: format!("127.0.0.1:{mesh_port}"),
                    region: "local".to_string(),
                    labels: Default::default(),
                    slots: MAX_AGENTS as u32 * 4,
                },
            })
            .await?;
        let mesh = Mesh::start(MeshConfig {
            node_id: 1,
            listen_port: mesh_port,
            cluster_secret: secret,
            max_live_events_per_watcher: 65_536,
            listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            tls: None,
        })
        .await
        .map_err(|error| anyhow!("mesh: {error}"))?;
        let machines = Arc::new(MachineHost::open(&dir.join("node"), MachineSettings::default())?);
        let dir = &std::path::absolute(dir)?;
        let repository = sample_repository(dir)?;
        let (repo, _) = Actor::spawn(
            None,
            RepoActor,
            RepoArgs {
                url: repository.clone(),
                mirror: mirror_path(&machines.repos_dir, &repository),
                // The sample origin is local: the policy lists the benchmark's directory.
                git: flotilla_actors::repo::GitSettings {
                    repositories: flotilla_actors::repo_url::RepositoryPolicy::new(vec![dir.to_path_buf()]),
                    ..Default::default()
                },
                providers: None,
            },
        )
        .await
        .map_err(|error| anyhow!("repository actor: {error}"))?;
        Ok(Bench {
            replica,
            mesh,
            machines,
            repo,
            repository,
        })
    }

    /// Creates, assigns and marks running `count` agents of `model`.
    async fn agents(&self, count: usize, model: &str) -> anyhow::Result<Vec<AgentId>> {
        let ids: Vec<AgentId> = (0..count).map(|_| AgentId::new()).collect();
        let writes = ids.iter().map(|id| {
            self.replica.write(Command::CreateAgent {
                id: *id,
                spec: std::sync::Arc::new(AgentSpec {
                    name: format!("bench-{id}"),
                    prompt: "Look around and report.".to_string(),
                    repository: self.repository.clone(),
                    base_branch: "main".to_string(),
                    work_branch: format!("flotilla/{}-bench", id.short()),
                    model: model.to_string(),
                    team: "default".to_string(),
                    scripted: true,
                    user: String::new(),
                    ..Default::default()
                }),
            })
        });
        for result in futures::future::join_all(writes).await {
            result?;
        }
        self.replica
            .write(Command::AssignAgents {
                assignments: ids
                    .iter()
                    .map(|id| AssignOne {
                        agent: *id,
                        node: 1,
                        epoch: Epoch(1),
                    })
                    .collect(),
            })
            .await?;
        for status in [AgentStatus::Provisioning, AgentStatus::Running] {
            let writes = ids.iter().map(|id| {
                self.replica.write(Command::SetAgentStatus {
                    agent: *id,
                    node: 1,
                    epoch: Epoch(1),
                    status,
                    reason: "benchmark".to_string(),
                    summary: None,
                    error: None,
                })
            });
            for result in futures::future::join_all(writes).await {
                result?;
            }
        }
        Ok(ids)
    }

    /// Boots a machine for each agent and runs them all at once; answers every turn's timing
    /// and the wall time of the runs.
    async fn run(&self, ids: &[AgentId], runtime: Arc<AgentRuntime>) -> anyhow::Result<(Vec<TurnTiming>, Duration)> {
        let records: Vec<_> = self
            .replica
            .reader()
            .read(|state| ids.iter().filter_map(|id| state.agents.get(id).cloned()).collect());
        // The benchmark's machines get no secrets.
        let no_secrets = flotilla_actors::secrets::SecretValues::default();
        let provisioned: Vec<_> = futures::stream::iter(records.iter())
            .map(|record| self.machines.provision(&self.repo, record, Epoch(1), None, &no_secrets))
            .buffered(PROVISION_CONCURRENCY)
            .collect()
            .await;
        let timings = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (record, provisioned) in records.iter().zip(provisioned) {
            let provisioned = provisioned.map_err(|error| anyhow!("provisioning {}: {error}", record.id))?;
            let sink = timings.clone();
            let context = RunContext {
                agent: record.id,
                epoch: Epoch(1),
                replica: self.replica.clone(),
                mesh: self.mesh.clone(),
                machine: provisioned.machine,
                repo: self.repo.clone(),
                workspace: provisioned.workspace,
                runtime: runtime.clone(),
                redactor: provisioned.redactor.into(),
                notes: Default::default(),
                observer: Some(Arc::new(move |timing| {
                    sink.lock().expect("timings").push(timing);
                })),
            };
            tasks.push(context);
        }
        let started = Instant::now();
        let handles: Vec<_> = tasks
            .into_iter()
            .map(|context| tokio::spawn(flotilla_actors::run::run(context)))
            .collect();
        for handle in handles {
            let outcome = handle.await?;
            anyhow::ensure!(
                outcome == RunOutcome::Ended(AgentStatus::Finished),
                "a benchmark agent ended with {outcome:?}"
            );
        }
        let wall = started.elapsed();
        for id in ids {
            flotilla_actors::machine::release_machine(*id, Epoch(1)).await;
        }
        let timings = std::mem::take(&mut *timings.lock().expect("timings"));
        Ok((timings, wall))
    }
}

struct Level {
    agents: usize,
    turns: usize,
    wall: Duration,
    total: Histogram<u64>,
    overhead: Histogram<u64>,
    tools: Histogram<u64>,
    record: Histogram<u64>,
}

fn summarise(agents: usize, timings: &[TurnTiming], wall: Duration) -> Level {
    let mut level = Level {
        agents,
        turns: timings.len(),
        wall,
        total: histogram(),
        overhead: histogram(),
        tools: histogram(),
        record: histogram(),
    };
    for timing in timings {
        let us = |duration: Duration| (duration.as_micros() as u64).clamp(1, MAX_RECORDED_US);
        let _ = level.total.record(us(timing.total));
        let _ = level.overhead.record(us(timing.overhead()));
        let _ = level.tools.record(us(timing.tools));
        let _ = level.record.record(us(timing.record));
    }
    level
}

pub async fn run_turns(args: BenchTurnsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.agents.is_empty(), "--agents needs at least one value");
    anyhow::ensure!(
        args.agents.iter().all(|count| (1..=MAX_AGENTS).contains(count)),
        "--agents values must be between 1 and {MAX_AGENTS}"
    );
    anyhow::ensure!(
        (1..=MAX_TURNS).contains(&args.turns),
        "--turns must be between 1 and {MAX_TURNS}"
    );
    anyhow::ensure!(
        args.tool == "list_dir" || args.tool == "noop",
        "--tool must be list_dir or noop"
    );
    let temporary = tempfile::Builder::new().prefix("flotilla-bench-turns-").tempdir()?;
    let dir = args.data_dir.clone().unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let bench = Bench::start(&dir).await?;

    let mut models: HashMap<String, Arc<dyn ModelProvider>> = HashMap::new();
    models.insert(
        "bench".to_string(),
        Arc::new(ScriptedProvider::from_json(&script(
            args.turns,
            args.model_latency_ms,
            &args.tool,
        ))?),
    );
    models.insert(
        "chatty".to_string(),
        Arc::new(ScriptedProvider::from_json(&script(
            args.watch_turns.max(1),
            0,
            "noop",
        ))?),
    );
    let mut runtime = AgentRuntime {
        models,
        ..AgentRuntime::default()
    };
    runtime.budgets.max_turns = args.turns + 10;
    let runtime = Arc::new(runtime);

    println!(
        "turn benchmark: {} turns per agent, one {} call per turn, scripted replies taking {} ms",
        args.turns, args.tool, args.model_latency_ms
    );
    println!("overhead = turn time - model time - tool time (checkpoint, Raft write, events, bookkeeping)\n");
    println!(
        "{:>7} {:>7} {:>9} {:>11} {:>11} {:>12} {:>12} {:>10} {:>11} {:>9}",
        "agents",
        "turns",
        "turns/s",
        "turn p50",
        "turn p99",
        "overhead p50",
        "overhead p99",
        "tool p50",
        "raft p50",
        "vs base"
    );
    measure_levels(&bench, &args.agents, &runtime).await?;
    if args.watch_turns > 0 {
        measure_watcher(&bench, args.watch_turns, &runtime).await?;
    }
    bench.mesh.shutdown().await;
    bench.replica.shutdown().await;
    Ok(())
}

/// One run per level of concurrency, each printed as a row, then where turn latency doubled
/// against the first (baseline) level.
async fn measure_levels(bench: &Bench, agent_counts: &[usize], runtime: &Arc<AgentRuntime>) -> anyhow::Result<()> {
    let mut baseline: Option<u64> = None;
    let mut doubled_at = None;
    let mut largest_within = None;
    for &count in agent_counts {
        let ids = bench.agents(count, "bench").await?;
        let (timings, wall) = bench.run(&ids, runtime.clone()).await?;
        let level = summarise(count, &timings, wall);
        let p50 = level.total.value_at_quantile(0.5);
        let base = *baseline.get_or_insert(p50);
        let ratio = p50 as f64 / base as f64;
        if ratio >= 2.0 && doubled_at.is_none() {
            doubled_at = Some(count);
        } else if ratio < 2.0 {
            largest_within = Some(count);
        }
        println!(
            "{:>7} {:>7} {:>9.1} {:>8.1} ms {:>8.1} ms {:>9.2} ms {:>9.2} ms {:>7.1} ms {:>8.2} ms {:>8.2}x",
            level.agents,
            level.turns,
            level.turns as f64 / level.wall.as_secs_f64(),
            ms(p50),
            ms(level.total.value_at_quantile(0.99)),
            ms(level.overhead.value_at_quantile(0.5)),
            ms(level.overhead.value_at_quantile(0.99)),
            ms(level.tools.value_at_quantile(0.5)),
            ms(level.record.value_at_quantile(0.5)),
            ratio
        );
    }
    match (doubled_at, largest_within) {
        (Some(at), _) => println!("\nturn latency doubled against the baseline at {at} concurrent agents"),
        (None, Some(largest)) => {
            println!(
                "\nturn latency stayed under twice the baseline up to {largest} concurrent agents (the largest run)"
            )
        }
        _ => {}
    }
    Ok(())
}

/// How many events per second one watcher receives (live over the mesh plus durable from the
/// replica) from one agent whose `watch_turns` turns cost nothing.
async fn measure_watcher(bench: &Bench, watch_turns: u32, runtime: &Arc<AgentRuntime>) -> anyhow::Result<()> {
    let mut budgets = runtime.budgets;
    budgets.max_turns = watch_turns + 10;
    let runtime = Arc::new(AgentRuntime {
        models: runtime.models.clone(),
        budgets,
        ..AgentRuntime::default()
    });
    let ids = bench.agents(1, "chatty").await?;
    let id = ids[0];
    let mut live = bench
        .mesh
        .subscribe(&id.to_string())
        .await
        .map_err(|error| anyhow!("subscribe: {error}"))?;
    let mut durable = bench.replica.reader().subscribe_events();
    let counter = tokio::spawn(async move {
        let mut live_count = 0u64;
        let mut durable_count = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                event = live.next() => match event {
                    Some(_) => live_count += 1,
                    None => break,
                },
                event = durable.recv() => match event {
                    Ok(event) if event.agent == id => {
                        durable_count += 1;
                        if let flotilla_raft::EventKind::StatusChanged { to: AgentStatus::Finished, .. } = event.kind {
                            last = Instant::now();
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => durable_count += missed,
                    Err(_) => break,
                },
            }
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
        }
        (
            live_count,
            durable_count,
            first.map(|first| last - first).unwrap_or_default(),
        )
    });
    let (_, wall) = bench.run(&ids, runtime.clone()).await?;
    let (live_count, durable_count, span) = tokio::time::timeout(Duration::from_secs(60), counter)
        .await
        .context("the watcher did not see the run end")??;
    let seconds = span.as_secs_f64().max(1e-9);
    println!(
        "\none watcher of a run of {} turns with a no-op tool (run took {:.2} s): {} live + {} durable events in {:.2} s = {:.0} events/s",
        watch_turns,
        wall.as_secs_f64(),
        live_count,
        durable_count,
        seconds,
        (live_count + durable_count) as f64 / seconds
    );
    Ok(())
}
