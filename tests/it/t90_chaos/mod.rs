//! The chaos suite (`make chaos`, not part of `make test`): three real nodes, scripted agents kept
//! at work through random nodes, and a seeded schedule of faults (kill -9 then restart, SIGSTOP
//! past the lease then SIGCONT) on one node at a time; then a history checker over every node's
//! view. `SEED=N make chaos` replays a schedule; `CHAOS_SECS` sets how long faults are injected.

mod check;
mod workload;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_tests::{try_get_cluster, ClusterOptions, TestCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common::bare_repository;
use crate::t18_agent_runs::{config_with, scripted_model};

const LEASE_MS: u64 = 2_000;
const NODE_COUNT: usize = 3;
const DEFAULT_CHAOS_SECS: u64 = 120;
/// How long a faulted node may take to be back, serving and seen up by every node.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
/// Scripted turns: pairs of (write a file, answer), so that a run ends after each answer unless a
/// follow-up is pending; long enough for every follow-up a run sends.
const SCRIPTED_PAIRS: usize = 80;

/// One fault of the schedule, drawn before it is injected so that a seed names the schedule.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL, stay dead for `down`, restart on the same data directory.
    Kill9 { node: u64, down: Duration },
    /// SIGSTOP for `paused` (always past the lease), then SIGCONT.
    Pause { node: u64, paused: Duration },
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Kill9 { .. } => "kill -9 + restart",
            Fault::Pause { .. } => "SIGSTOP past the lease + SIGCONT",
        }
    }

    fn node(&self) -> u64 {
        match self {
            Fault::Kill9 { node, .. } | Fault::Pause { node, .. } => *node,
        }
    }
}

/// Draws the next fault and the quiet time before it. One node at a time: with three nodes a
/// minority is one.
fn draw_fault(rng: &mut StdRng) -> (Duration, Fault) {
    let quiet = Duration::from_millis(rng.gen_range(1_000..5_000));
    let node = rng.gen_range(1..=NODE_COUNT as u64);
    let fault = if rng.gen_bool(0.5) {
        Fault::Kill9 {
            node,
            down: Duration::from_millis(rng.gen_range(200..4_000)),
        }
    } else {
        Fault::Pause {
            node,
            paused: Duration::from_millis(LEASE_MS + rng.gen_range(500..4_000)),
        }
    };
    (quiet, fault)
}

fn seed() -> u64 {
    match std::env::var("SEED") {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .unwrap_or_else(|error| panic!("SEED={text:?} is not an unsigned integer: {error}")),
        _ => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1),
    }
}

fn chaos_duration() -> Duration {
    let secs = match std::env::var("CHAOS_SECS") {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .unwrap_or_else(|error| panic!("CHAOS_SECS={text:?} is not a number of seconds: {error}")),
        _ => DEFAULT_CHAOS_SECS,
    };
    Duration::from_secs(secs)
}

/// Turn 2k-1 writes `turn-k.txt` (a new commit to push), turn 2k answers.
fn agent_script() -> serde_json::Value {
    let turns: Vec<serde_json::Value> = (1..=SCRIPTED_PAIRS)
        .flat_map(|k| {
            [
                json!({"text": format!("Writing turn-{k}.txt."), "delay_ms": 700, "tool_calls": [
                    {"name": "write_file", "arguments": {"path": format!("turn-{k}.txt"), "content": format!("{k}\n")}}
                ]}),
                json!({"text": format!("Wrote turn-{k}.txt."), "delay_ms": 300}),
            ]
        })
        .collect();
    json!({ "turns": turns })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the chaos suite runs with `make chaos`, for minutes"]
async fn chaos() {
    let seed = seed();
    let duration = chaos_duration();
    println!("chaos seed: {seed} (replay with SEED={seed} make chaos), faults for {duration:?}");
    let dir = tempfile::Builder::new().prefix("flotilla-chaos-").tempdir().unwrap();
    let repository = bare_repository(dir.path(), "origin", &[("README.md", "a chaos target\n")]);
    let config = config_with(&scripted_model(dir.path(), "script", agent_script()), "script");
    let mut cluster = TestCluster::start(
        NODE_COUNT,
        ClusterOptions {
            lease_ms: Some(LEASE_MS),
            slots: 4,
            config: Some(config),
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let endpoints: Vec<String> = cluster.nodes.iter().map(|node| node.endpoint()).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let workload = tokio::spawn(workload::run(
        workload::Settings {
            endpoints: endpoints.clone(),
            token: token.clone(),
            repository: repository.clone(),
            seed: seed ^ 0x9e37_79b9_7f4a_7c15,
        },
        stop.clone(),
    ));

    let mut rng = StdRng::seed_from_u64(seed);
    let mut injected: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut windows: Vec<check::FaultWindow> = Vec::new();
    let mut violations = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let (quiet, fault) = draw_fault(&mut rng);
        // The schedule's pacing: time passing between faults is what is being tested.
        tokio::time::sleep(quiet).await;
        println!(
            "[{:>6.1}s] {} on node {}",
            started.elapsed().as_secs_f64(),
            fault.kind(),
            fault.node()
        );
        *injected.entry(fault.kind()).or_default() += 1;
        let from = SystemTime::now();
        inject(&mut cluster, fault).await;
        let back = wait_until_all_up(&endpoints, &token).await;
        windows.push(check::FaultWindow {
            node: fault.node(),
            from,
            // A NodeDown decided just before the node was seen up again is applied a little later.
            until: SystemTime::now() + Duration::from_millis(LEASE_MS),
        });
        if let Err(violation) = back {
            violations.push(format!("after {} on node {}: {violation}", fault.kind(), fault.node()));
            break;
        }
    }
    let fault_time = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let record = workload.await.expect("the workload task ended without panicking");
    for node in cluster.nodes.iter_mut() {
        if !node.is_running() {
            violations.push(format!("node {} is not running at the end", node.id));
        }
    }

    let summary = check::check(&endpoints, &token, &repository, &record, &windows).await;
    violations.extend(summary.violations.iter().cloned());
    // The nodes are stopped before the summary, so that it is the last thing printed (a panic
    // with the cluster alive would print every node's log tail after it).
    if !violations.is_empty() && std::env::var_os("FLOTILLA_KEEP_TEST_DIRS").is_some() {
        cluster.dir.disable_cleanup(true);
        println!("kept the cluster directory {}", cluster.dir.path().display());
    }
    drop(cluster);
    println!("----- chaos summary -----");
    println!("seed: {seed}");
    println!("fault time: {fault_time:?}");
    for (kind, count) in &injected {
        println!("faults: {count} x {kind}");
    }
    let faulted: std::collections::BTreeSet<u64> = windows.iter().map(|window| window.node).collect();
    println!("faulted nodes: {faulted:?}");
    println!(
        "calls acknowledged: {} creates, {} follow-ups, {} stops, {} reads (refused or timed out: {})",
        record.creates.len(),
        record.follow_ups.len(),
        record.stops.len(),
        record.reads,
        record.unacknowledged
    );
    println!(
        "agents: {} created, {} finished, {} stopped, {} failed, {} not ended",
        record.creates.len(),
        summary.finished,
        summary.stopped,
        summary.failed,
        summary.not_ended
    );
    println!("violations: {}", violations.len());
    for violation in &violations {
        println!("  VIOLATION: {violation}");
    }
    assert!(
        violations.is_empty(),
        "{} violations under seed {seed}",
        violations.len()
    );
}

async fn inject(cluster: &mut TestCluster, fault: Fault) {
    match fault {
        Fault::Kill9 { node, down } => {
            cluster.node_mut(node).kill9();
            tokio::time::sleep(down).await;
            cluster.node_mut(node).restart();
        }
        Fault::Pause { node, paused } => {
            cluster.node_mut(node).freeze();
            tokio::time::sleep(paused).await;
            cluster.node_mut(node).thaw();
        }
    }
}

/// Waits until every node answers, knows a leader and sees every member up: the next fault then
/// never takes down more than a minority.
async fn wait_until_all_up(endpoints: &[String], token: &str) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let mut all = true;
        for endpoint in endpoints {
            let view = tokio::time::timeout(Duration::from_secs(5), try_get_cluster(endpoint, token))
                .await
                .ok()
                .flatten();
            let ready = view.is_some_and(|cluster| {
                cluster.leader_id != 0
                    && cluster.members.len() == endpoints.len()
                    && cluster.members.iter().all(|member| member.up)
            });
            all &= ready;
        }
        if all {
            return Ok(());
        }
        if started.elapsed() > RECOVERY_DEADLINE {
            return Err(format!(
                "the cluster was not back (every node serving, a leader, all members up) within {RECOVERY_DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
