//! The chaos workload: scripted agents created, followed up, read and stopped through random
//! nodes, every acknowledged call recorded for the checker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1;
use flotilla_tests::{agent_client, AgentClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

use super::watch::{WatchLog, Watcher};
use crate::t18_agent_runs::request;

/// How long one call may take before it counts as unacknowledged (a frozen node answers nothing).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents created per run at most: each one is a real machine on a two-core host.
const MAX_AGENTS: usize = 40;
/// One agent in this many gets a watcher for the whole run.
const WATCH_ONE_IN: usize = 3;

pub struct Settings {
    pub endpoints: Vec<String>,
    pub token: String,
    pub repository: String,
    pub seed: u64,
    /// Set once the run has settled: watchers then deliver the rest and end.
    pub finish_watching: Arc<AtomicBool>,
}

/// A watcher's task and the history length it must reach, set once known.
#[derive(Debug)]
pub struct Watched {
    pub id: String,
    pub target: Arc<std::sync::Mutex<Option<u64>>>,
    pub task: tokio::task::JoinHandle<WatchLog>,
}

#[derive(Clone, Debug)]
pub struct Created {
    pub id: String,
    pub name: String,
    pub via: u64,
}

/// Every acknowledged call, and every answer that already breaks a rule.
#[derive(Debug, Default)]
pub struct Record {
    pub creates: Vec<Created>,
    /// (agent id, index the acknowledgement gave).
    pub follow_ups: Vec<(String, u32)>,
    pub stops: Vec<String>,
    pub reads: usize,
    pub unacknowledged: usize,
    pub violations: Vec<String>,
    pub watched: Vec<Watched>,
}

pub async fn run(settings: Settings, stop: Arc<AtomicBool>) -> Record {
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut clients = Vec::new();
    for endpoint in &settings.endpoints {
        clients.push(agent_client(endpoint, &settings.token).await);
    }
    let mut record = Record::default();
    let mut stopped = std::collections::BTreeSet::new();
    while !stop.load(Ordering::SeqCst) {
        let via = rng.gen_range(0..clients.len());
        let client = &mut clients[via];
        let node = via as u64 + 1;
        let live: Vec<&Created> = record
            .creates
            .iter()
            .filter(|created| !stopped.contains(&created.id))
            .collect();
        let roll = rng.gen_range(0..100);
        if live.is_empty() || (roll < 30 && record.creates.len() < MAX_AGENTS) {
            let name = format!("chaos-{}", record.creates.len() + record.unacknowledged);
            match call(client.create_agent(request(&settings.repository, &name, "Write the files"))).await {
                Ok(reply) => {
                    let agent = reply.agent.expect("create answers with the agent");
                    if record.creates.len() % WATCH_ONE_IN == 0 {
                        record.watched.push(watch(&settings, &agent.id, rng.gen()));
                    }
                    record.creates.push(Created {
                        id: agent.id,
                        name,
                        via: node,
                    });
                }
                Err(_) => record.unacknowledged += 1,
            }
        } else {
            let id = live[rng.gen_range(0..live.len())].id.clone();
            if roll < 70 {
                follow_up(client, node, &id, &mut record).await;
            } else if roll < 80 {
                let answer = call(client.stop_agent(v1::StopAgentRequest {
                    id: id.clone(),
                    reason: "chaos stop".to_string(),
                }))
                .await;
                match answer {
                    Ok(_) => {
                        stopped.insert(id.clone());
                        record.stops.push(id);
                    }
                    Err(status) => judge_refusal(&mut record, node, "StopAgent", &id, &status),
                }
            } else {
                match call(client.get_agent(v1::GetAgentRequest { id: id.clone() })).await {
                    Ok(_) => record.reads += 1,
                    Err(status) => judge_refusal(&mut record, node, "GetAgent", &id, &status),
                }
            }
        }
        // The workload's pace: about two calls a second over the whole cluster.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
    }
    record
}

fn watch(settings: &Settings, id: &str, seed: u64) -> Watched {
    let target = Arc::new(std::sync::Mutex::new(None));
    let watcher = Watcher {
        endpoints: settings.endpoints.clone(),
        token: settings.token.clone(),
        id: id.to_string(),
        seed,
    };
    Watched {
        id: id.to_string(),
        target: target.clone(),
        task: tokio::spawn(watcher.run(settings.finish_watching.clone(), target)),
    }
}

async fn follow_up(client: &mut AgentClient, node: u64, id: &str, record: &mut Record) {
    let text = format!("Follow-up {} please.", record.follow_ups.len() + 1);
    match call(client.send_follow_up(v1::SendFollowUpRequest {
        id: id.to_string(),
        text,
    }))
    .await
    {
        Ok(reply) => record.follow_ups.push((id.to_string(), reply.index)),
        Err(status) => judge_refusal(record, node, "SendFollowUp", id, &status),
    }
}

/// A refusal is fine (the node is down, frozen, has no leader, the agent has ended) except
/// NOT_FOUND: every id the workload uses was acknowledged.
fn judge_refusal(record: &mut Record, node: u64, rpc: &str, id: &str, status: &tonic::Status) {
    record.unacknowledged += 1;
    if status.code() == Code::NotFound {
        record.violations.push(format!(
            "{rpc} through node {node} answered NOT_FOUND for acknowledged agent {id}: {}",
            status.message()
        ));
    }
}

async fn call<T>(
    future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within the call timeout")),
    }
}
