//! The chaos suite (`make chaos`, not part of `make test`): real nodes (five by default,
//! `CHAOS_NODES`), each in a network namespace of its own in three regions, scripted agents kept
//! at work through random nodes, and a seeded schedule of faults: kill -9 then restart, SIGSTOP
//! past the lease then SIGCONT, one node cut off, a minority cut from the majority, a one-way cut
//! between two nodes, and delay with loss between two regions. Then a history checker over every
//! node's view and every watch stream. `SEED=N make chaos` replays a schedule; `CHAOS_SECS` sets
//! how long faults are injected.

mod check;
mod watch;
mod workload;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_tests::netlab::LinkFaults;
use flotilla_tests::{try_get_cluster, ClusterOptions, TestCluster};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common::bare_repository;
use crate::t18_agent_runs::{config_with, scripted_model};

const LEASE_MS: u64 = 2_000;
const DEFAULT_NODE_COUNT: usize = 5;
const DEFAULT_CHAOS_SECS: u64 = 120;
/// How long the cluster may take, once a fault is lifted, to be whole again (every node serving,
/// a leader, every member up); longer is a violation (a slow start or a slow judgement).
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// How long the run waits for that before it gives up on the cluster.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
/// Scripted turns: pairs of (write a file, answer), so that a run ends after each answer unless a
/// follow-up is pending; long enough for every follow-up a run sends.
const SCRIPTED_PAIRS: usize = 80;

/// One fault of the schedule, drawn before it is injected so that a seed names the schedule.
#[derive(Clone, Debug)]
enum Fault {
    /// SIGKILL, stay dead for `down`, restart on the same data directory.
    Kill9 { node: u64, down: Duration },
    /// SIGSTOP for `paused` (always past the lease), then SIGCONT.
    Pause { node: u64, paused: Duration },
    /// Cut `side` (a minority: one node, or two of five) from the rest, both ways, for `cut`.
    Partition { side: Vec<u64>, cut: Duration },
    /// Drop what `from` sends to `to` (only that direction) for `cut`.
    OneWay { from: u64, to: u64, cut: Duration },
    /// Delay and loss on the links between two regions for `slow`.
    SlowLink {
        regions: (String, String),
        faults: LinkFaults,
        slow: Duration,
    },
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Kill9 { .. } => "kill -9 + restart",
            Fault::Pause { .. } => "SIGSTOP past the lease + SIGCONT",
            Fault::Partition { side, .. } if side.len() == 1 => "one node cut off",
            Fault::Partition { .. } => "minority cut from the majority",
            Fault::OneWay { .. } => "one-way cut",
            Fault::SlowLink { .. } => "delay and loss between regions",
        }
    }

    fn describe(&self) -> String {
        match self {
            Fault::Kill9 { node, down } => format!("kill -9 node {node}, restart after {down:?}"),
            Fault::Pause { node, paused } => format!("SIGSTOP node {node} for {paused:?}"),
            Fault::Partition { side, cut } => format!("cut {side:?} from the rest for {cut:?}"),
            Fault::OneWay { from, to, cut } => format!("drop what node {from} sends to node {to} for {cut:?}"),
            Fault::SlowLink { regions, faults, slow } => format!(
                "{} <-> {}: {:?} delay, {} per mille held back, for {slow:?}",
                regions.0, regions.1, faults.delay, faults.loss_per_mille
            ),
        }
    }

    /// The nodes that may be judged down during this fault: those it silences. A slow link
    /// stays far under the lease, so it silences none.
    fn silenced(&self) -> Vec<u64> {
        match self {
            Fault::Kill9 { node, .. } | Fault::Pause { node, .. } => vec![*node],
            Fault::Partition { side, .. } => side.clone(),
            // Whichever of the two leads (or neither), either may be the one that goes quiet.
            Fault::OneWay { from, to, .. } => vec![*from, *to],
            Fault::SlowLink { .. } => Vec::new(),
        }
    }
}

/// Region of node i (1-based): two nodes per region in order, "region-a", "region-b", ...
fn regions(node_count: usize) -> Vec<String> {
    let per_region = if node_count >= 5 { 2 } else { 1 };
    (0..node_count)
        .map(|index| format!("region-{}", (b'a' + (index / per_region) as u8) as char))
        .collect()
}

/// Draws the next fault and the quiet time before it. At most a minority is faulted at once.
fn draw_fault(rng: &mut StdRng, node_count: usize, region_pairs: &[(String, String)]) -> (Duration, Fault) {
    let quiet = Duration::from_millis(rng.gen_range(1_000..4_000));
    let nodes: Vec<u64> = (1..=node_count as u64).collect();
    let node = *nodes.choose(rng).expect("a node");
    let past_lease = Duration::from_millis(LEASE_MS + rng.gen_range(500..4_000));
    let fault = match rng.gen_range(0..100) {
        0..=19 => Fault::Kill9 {
            node,
            down: Duration::from_millis(rng.gen_range(200..4_000)),
        },
        20..=39 => Fault::Pause {
            node,
            paused: past_lease,
        },
        40..=54 => Fault::Partition {
            side: vec![node],
            cut: past_lease,
        },
        55..=69 if node_count >= 5 => {
            let mut side: Vec<u64> = nodes.choose_multiple(rng, (node_count - 1) / 2).copied().collect();
            side.sort_unstable();
            Fault::Partition { side, cut: past_lease }
        }
        55..=84 => {
            let to = *nodes
                .iter()
                .filter(|other| **other != node)
                .collect::<Vec<_>>()
                .choose(rng)
                .expect("two nodes");
            Fault::OneWay {
                from: node,
                to: *to,
                cut: past_lease,
            }
        }
        _ => Fault::SlowLink {
            regions: region_pairs.choose(rng).expect("two regions").clone(),
            faults: LinkFaults {
                delay: Duration::from_millis(rng.gen_range(20..400)),
                loss_per_mille: rng.gen_range(0..50),
                jitter: Duration::ZERO,
            },
            slow: Duration::from_millis(rng.gen_range(3_000..8_000)),
        },
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

fn node_count() -> usize {
    match std::env::var("CHAOS_NODES") {
        Ok(text) if !text.trim().is_empty() => match text.trim().parse() {
            Ok(count @ 3..=9) => count,
            _ => panic!("CHAOS_NODES={text:?}: expected a number of nodes from 3 to 9"),
        },
        _ => DEFAULT_NODE_COUNT,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the chaos suite runs with `make chaos`, for minutes"]
async fn chaos() {
    let seed = seed();
    let duration = chaos_duration();
    let node_count = node_count();
    println!("chaos seed: {seed} (replay with SEED={seed} make chaos), {node_count} nodes, faults for {duration:?}");
    let dir = tempfile::Builder::new().prefix("flotilla-chaos-").tempdir().unwrap();
    let repository = bare_repository(dir.path(), "origin", &[("README.md", "a chaos target\n")]);
    let config = config_with(&scripted_model(dir.path(), "script", agent_script()), "script");
    let mut cluster = TestCluster::start(
        node_count,
        ClusterOptions {
            regions: regions(node_count),
            lease_ms: Some(LEASE_MS),
            slots: 4,
            config: Some(config),
            network_lab: true,
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let endpoints: Vec<String> = cluster.nodes.iter().map(|node| node.endpoint()).collect();
    let region_pairs = cluster.lab.as_ref().expect("a lab").region_pairs();

    let stop = Arc::new(AtomicBool::new(false));
    let finish_watching = Arc::new(AtomicBool::new(false));
    let workload = tokio::spawn(workload::run(
        workload::Settings {
            endpoints: endpoints.clone(),
            token: token.clone(),
            repository: repository.clone(),
            seed: seed ^ 0x9e37_79b9_7f4a_7c15,
            finish_watching: finish_watching.clone(),
        },
        stop.clone(),
    ));

    let mut rng = StdRng::seed_from_u64(seed);
    let mut injected: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut windows: Vec<check::FaultWindow> = Vec::new();
    let mut violations = Vec::new();
    let mut recoveries = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let (quiet, fault) = draw_fault(&mut rng, node_count, &region_pairs);
        // The schedule's pacing: time passing between faults is what is being tested.
        tokio::time::sleep(quiet).await;
        println!("[{:>6.1}s] {}", started.elapsed().as_secs_f64(), fault.describe());
        *injected.entry(fault.kind()).or_default() += 1;
        let from = SystemTime::now();
        inject(&mut cluster, &fault).await;
        let lifted = Instant::now();
        let back = wait_until_all_up(&endpoints, &token).await;
        let recovery = lifted.elapsed();
        recoveries.push(recovery);
        if back.is_ok() && recovery > RECOVERY_BOUND {
            violations.push(format!(
                "after {}: the cluster took {recovery:?} to be whole again (bound {RECOVERY_BOUND:?})",
                fault.describe()
            ));
        }
        for node in fault.silenced() {
            windows.push(check::FaultWindow {
                node,
                from,
                // A NodeDown decided just before the node was seen up again is applied a little later.
                until: SystemTime::now() + Duration::from_millis(LEASE_MS),
                kill: matches!(fault, Fault::Kill9 { .. }),
            });
        }
        if let Err(violation) = back {
            violations.push(format!("after {}: {violation}", fault.describe()));
            break;
        }
    }
    let fault_time = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut record = workload.await.expect("the workload task ended without panicking");
    for node in cluster.nodes.iter_mut() {
        if !node.is_running() {
            violations.push(format!("node {} is not running at the end", node.id));
        }
    }

    let summary = check::check(&endpoints, &token, &repository, &record, &windows).await;
    violations.extend(summary.violations.iter().cloned());
    let watch_logs = finish_watchers(&mut record, &summary, &finish_watching).await;
    for log in &watch_logs {
        violations.extend(log.violations.iter().cloned());
    }
    // The nodes are stopped before the summary, so that it is the last thing printed (a panic
    // with the cluster alive would print every node's log tail after it).
    if !violations.is_empty() && std::env::var_os("FLOTILLA_KEEP_TEST_DIRS").is_some() {
        cluster.dir.disable_cleanup(true);
        println!("kept the cluster directory {}", cluster.dir.path().display());
    }
    drop(cluster);
    println!("----- chaos summary -----");
    println!("seed: {seed}, {node_count} nodes");
    println!("fault time: {fault_time:?}");
    println!("faults injected: {}", injected.values().sum::<usize>());
    for (kind, count) in &injected {
        println!("  {count} x {kind}");
    }
    let faulted: std::collections::BTreeSet<u64> = windows.iter().map(|window| window.node).collect();
    println!("nodes faulted: {faulted:?}");
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
    println!(
        "watch streams: {} agents watched, {} streams opened, {} durable events delivered",
        watch_logs.len(),
        watch_logs.iter().map(|log| log.opened).sum::<usize>(),
        watch_logs.iter().map(|log| log.last).sum::<u64>()
    );
    println!("{}", reassign_line(&summary.reassign));
    println!("{}", figures_line("whole again after a fault was lifted", &recoveries));
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

/// Tells every watcher the length of its agent's history and collects what they saw.
async fn finish_watchers(
    record: &mut workload::Record,
    summary: &check::Summary,
    finish: &AtomicBool,
) -> Vec<watch::WatchLog> {
    for watched in &record.watched {
        *watched.target.lock().unwrap() = summary.history_lengths.get(&watched.id).copied();
    }
    finish.store(true, Ordering::SeqCst);
    let mut logs = Vec::new();
    for watched in record.watched.drain(..) {
        logs.push(watched.task.await.expect("a watcher ended without panicking"));
    }
    logs
}

fn reassign_line(measured: &[Duration]) -> String {
    if measured.is_empty() {
        return "reassign after kill -9: no agent was running on a killed node".to_string();
    }
    figures_line(
        &format!("reassign after kill -9 (lease {LEASE_MS} ms), agents"),
        measured,
    )
}

fn figures_line(what: &str, measured: &[Duration]) -> String {
    if measured.is_empty() {
        return format!("{what}: none");
    }
    let mut sorted = measured.to_vec();
    sorted.sort_unstable();
    format!(
        "{what}: {} samples, min {:?}, median {:?}, max {:?}",
        sorted.len(),
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    )
}

async fn inject(cluster: &mut TestCluster, fault: &Fault) {
    match fault {
        Fault::Kill9 { node, down } => {
            cluster.node_mut(*node).kill9();
            tokio::time::sleep(*down).await;
            cluster.node_mut(*node).restart();
        }
        Fault::Pause { node, paused } => {
            cluster.node_mut(*node).freeze();
            tokio::time::sleep(*paused).await;
            cluster.node_mut(*node).thaw();
        }
        Fault::Partition { side, cut } => {
            let lab = cluster.lab.as_ref().expect("a lab");
            lab.partition(side).expect("cut the partition");
            tokio::time::sleep(*cut).await;
            lab.heal().expect("heal the partition");
        }
        Fault::OneWay { from, to, cut } => {
            let lab = cluster.lab.as_ref().expect("a lab");
            lab.cut(*from, *to).expect("cut one way");
            tokio::time::sleep(*cut).await;
            lab.heal().expect("heal the cut");
        }
        Fault::SlowLink { regions, faults, slow } => {
            let lab = cluster.lab.as_ref().expect("a lab");
            lab.set_link(&regions.0, &regions.1, *faults);
            tokio::time::sleep(*slow).await;
            lab.clear_links();
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
