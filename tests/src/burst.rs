//! A burst of agents against a running cluster, watched from outside: every node's `cluster
//! status` is polled with a deadline throughout (its latency, and the leader it names), and the
//! agents' statuses are counted until every agent runs, has finished or waits in the queue.
//! The integration test asserts on the [`BurstReport`]; `flotilla-bench burst` prints it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::v1::{self, GetClusterRequest, ListAgentsRequest};
use futures::StreamExt;

use crate::{agent_client, cluster_client};

/// A status call that takes longer than this is recorded at this value and counted as missed.
pub const STATUS_CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Time between two status polls of one node.
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Creates in flight at once.
const CREATE_CONCURRENCY: usize = 32;
/// Agents listed per page.
const LIST_PAGE_SIZE: i32 = 500;
/// Time between two counts of the agents' statuses.
const COUNT_INTERVAL: Duration = Duration::from_millis(500);

/// What to submit, and where.
#[derive(Debug, Clone)]
pub struct BurstPlan {
    pub endpoints: Vec<String>,
    pub token: String,
    pub agents: usize,
    pub repository: String,
    pub prompt: String,
    /// How long to wait for the burst to settle (every agent running, finished or queued,
    /// and as many running or finished as `settled_started` asks).
    pub settle_deadline: Duration,
    /// Agents that must have started (run or finished) for the burst to count as settled.
    pub settled_started: usize,
}

/// What the burst did, as seen from outside.
#[derive(Debug, Clone, Default)]
pub struct BurstReport {
    pub agents: usize,
    pub created: usize,
    pub create_errors: Vec<String>,
    /// Status calls made, their worst and 99th-percentile latency, and how many missed the
    /// one-second mark or failed.
    pub status_calls: usize,
    pub status_max: Duration,
    pub status_p99: Duration,
    pub status_over_one_second: usize,
    pub status_errors: usize,
    /// Distinct leaders named by any answer (0, no leader, included when seen).
    pub leaders_seen: Vec<u64>,
    /// Agents by status at the end.
    pub by_status: BTreeMap<String, usize>,
    /// Agents in no status the burst accepts (failed, stopped), with their errors.
    pub failed: Vec<String>,
    /// Agents that have started (running or finished) at the end, and when the last one
    /// counted started, from the first create.
    pub started: usize,
    pub started_within: Duration,
    pub elapsed: Duration,
    pub settled: bool,
}

impl BurstReport {
    /// Whether the leader changed (or was lost) at any point.
    pub fn leader_changed(&self) -> bool {
        self.leaders_seen.len() != 1 || self.leaders_seen.first() == Some(&0)
    }

    /// Agents that started per second, over the time they took to start.
    pub fn machine_start_rate(&self) -> f64 {
        if self.started_within.is_zero() {
            return 0.0;
        }
        self.started as f64 / self.started_within.as_secs_f64()
    }

    /// The figures, one per line.
    pub fn render(&self) -> String {
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(status, count)| format!("{status}={count}"))
            .collect();
        format!(
            "agents submitted:        {} (created {}, create errors {})\n\
             cluster status calls:    {} (max {:.1} ms, p99 {:.1} ms, over 1 s {}, failed {})\n\
             leaders seen:            {:?} (changed: {})\n\
             agents by status:        {}\n\
             agents failed/stopped:   {}\n\
             agents started:          {} in {:.1} s ({:.2} machine starts/s)\n\
             settled:                 {} after {:.1} s\n",
            self.agents,
            self.created,
            self.create_errors.len(),
            self.status_calls,
            self.status_max.as_secs_f64() * 1000.0,
            self.status_p99.as_secs_f64() * 1000.0,
            self.status_over_one_second,
            self.status_errors,
            self.leaders_seen,
            self.leader_changed(),
            statuses.join(" "),
            self.failed.len(),
            self.started,
            self.started_within.as_secs_f64(),
            self.machine_start_rate(),
            self.settled,
            self.elapsed.as_secs_f64(),
        )
    }
}

#[derive(Default)]
struct StatusLog {
    latencies: Vec<Duration>,
    errors: usize,
    leaders: Vec<u64>,
}

/// Polls one node's `cluster status` until `stop`, each call bounded by the deadline.
async fn poll_status(endpoint: String, token: String, stop: Arc<AtomicBool>, log: Arc<Mutex<StatusLog>>) {
    let mut client = cluster_client(&endpoint, &token).await;
    let mut ticker = tokio::time::interval(STATUS_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Acquire) {
        ticker.tick().await;
        let started = Instant::now();
        let answer = tokio::time::timeout(STATUS_CALL_DEADLINE, client.get_cluster(GetClusterRequest {})).await;
        let latency = started.elapsed().min(STATUS_CALL_DEADLINE);
        let mut log = log.lock().expect("status log");
        log.latencies.push(latency);
        match answer {
            Ok(Ok(cluster)) => {
                let leader = cluster.into_inner().leader_id;
                if !log.leaders.contains(&leader) {
                    log.leaders.push(leader);
                }
            }
            Ok(Err(_)) | Err(_) => log.errors += 1,
        }
    }
}

fn status_name(status: i32) -> String {
    v1::AgentStatus::try_from(status)
        .map(|status| status.as_str_name().trim_start_matches("AGENT_STATUS_").to_lowercase())
        .unwrap_or_else(|_| format!("unknown-{status}"))
}

/// Every agent of the cluster, from `endpoint`.
async fn list_all(endpoint: &str, token: &str) -> Result<Vec<v1::Agent>, tonic::Status> {
    let mut client = agent_client(endpoint, token).await;
    let mut agents = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_agents(ListAgentsRequest {
                page_size: LIST_PAGE_SIZE,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        agents.extend(page.agents);
        if page.next_page_token.is_empty() {
            return Ok(agents);
        }
        page_token = page.next_page_token;
    }
}

async fn submit(plan: &BurstPlan, report: &mut BurstReport) {
    let requests = (0..plan.agents).map(|index| {
        let endpoint = plan.endpoints[index % plan.endpoints.len()].clone();
        let (token, repository, prompt) = (plan.token.clone(), plan.repository.clone(), plan.prompt.clone());
        async move {
            let mut client = agent_client(&endpoint, &token).await;
            client
                .create_agent(v1::CreateAgentRequest {
                    prompt,
                    repository,
                    name: format!("burst-{index}"),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|status| format!("agent {index} on {endpoint}: {status}"))
        }
    });
    let results: Vec<Result<(), String>> = futures::stream::iter(requests)
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    for result in results {
        match result {
            Ok(()) => report.created += 1,
            Err(error) => report.create_errors.push(error),
        }
    }
}

/// Counts the agents by status; answers whether the burst has settled.
fn count(agents: &[v1::Agent], plan: &BurstPlan, report: &mut BurstReport) -> bool {
    report.by_status.clear();
    report.failed.clear();
    let mut started = 0;
    let mut in_flight = 0;
    for agent in agents {
        *report.by_status.entry(status_name(agent.status)).or_default() += 1;
        match v1::AgentStatus::try_from(agent.status) {
            Ok(v1::AgentStatus::Running | v1::AgentStatus::Finished) => started += 1,
            Ok(v1::AgentStatus::Pending) => {}
            Ok(v1::AgentStatus::Provisioning) => in_flight += 1,
            _ => report
                .failed
                .push(format!("{} {}: {}", agent.name, status_name(agent.status), agent.error)),
        }
    }
    report.started = started;
    agents.len() == plan.agents && in_flight == 0 && started >= plan.settled_started
}

/// Submits the burst and watches it until it settles or the deadline passes.
pub async fn run_burst(plan: &BurstPlan) -> BurstReport {
    let mut report = BurstReport {
        agents: plan.agents,
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(StatusLog::default()));
    let pollers: Vec<_> = plan
        .endpoints
        .iter()
        .map(|endpoint| {
            tokio::spawn(poll_status(
                endpoint.clone(),
                plan.token.clone(),
                stop.clone(),
                log.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    submit(plan, &mut report).await;
    let deadline = started + plan.settle_deadline;
    let mut last_started = 0;
    loop {
        if let Ok(agents) = list_all(&plan.endpoints[0], &plan.token).await {
            report.settled = count(&agents, plan, &mut report);
            if report.started > last_started {
                last_started = report.started;
                report.started_within = started.elapsed();
            }
        }
        if report.settled || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(COUNT_INTERVAL).await;
    }
    report.elapsed = started.elapsed();
    stop.store(true, Ordering::Release);
    for poller in pollers {
        let _ = poller.await;
    }
    let log = log.lock().expect("status log");
    let mut latencies = log.latencies.clone();
    latencies.sort_unstable();
    report.status_calls = latencies.len();
    report.status_max = latencies.last().copied().unwrap_or_default();
    report.status_p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    report.status_over_one_second = latencies
        .iter()
        .filter(|latency| **latency >= Duration::from_secs(1))
        .count();
    report.status_errors = log.errors;
    report.leaders_seen = log.leaders.clone();
    report
}

/// The model every burst agent talks to: one turn that holds its machine with a long command,
/// so that an agent that started keeps its slot and the rest wait in the queue.
pub fn hold_script() -> Vec<crate::fakes::FakeTurn> {
    vec![crate::fakes::FakeTurn::tool_call(
        "run_command",
        serde_json::json!({"command": "sleep 590", "timeout_ms": 600000}),
    )]
}

/// The node config of a burst cluster: the fake model server as the default (OpenAI) model.
pub fn node_config(server: &crate::fakes::FakeModelServer) -> String {
    format!(
        "[models.burst]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake-burst\"\n\n[agents]\ndefault_model = \"burst\"\n\n[git]\nauthor_name = \"Burst Agent\"\nauthor_email = \"burst-agent@example.test\"\n",
        server.openai_base_url()
    )
}
