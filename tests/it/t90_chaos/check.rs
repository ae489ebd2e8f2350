//! The chaos history checker: once the faults stop and every agent has ended, every node's view
//! is read and compared with what the workload was acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_proto::v1::{self, agent_event};
use flotilla_tests::{agent_client, invariants};

use super::workload::Record;
use crate::common::status_of;

/// How long every acknowledged agent may take to end once the faults stop.
const SETTLE_DEADLINE: Duration = Duration::from_secs(300);

/// From a fault's injection until its node was seen up again by every node (plus a lease): the
/// only time a "node N down" may be recorded for it.
#[derive(Clone, Copy, Debug)]
pub struct FaultWindow {
    pub node: u64,
    pub from: SystemTime,
    pub until: SystemTime,
    /// A kill -9: the time its node's agents took to be assigned elsewhere is measured.
    pub kill: bool,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub finished: usize,
    pub stopped: usize,
    pub failed: usize,
    pub not_ended: usize,
    pub violations: Vec<String>,
    /// Durable events per agent, as every node agreed.
    pub history_lengths: BTreeMap<String, u64>,
    /// From a kill -9 to each of its node's agents assigned to another node.
    pub reassign: Vec<Duration>,
}

pub async fn check(
    endpoints: &[String],
    token: &str,
    repository: &str,
    record: &Record,
    windows: &[FaultWindow],
) -> Summary {
    let mut summary = Summary {
        violations: record.violations.clone(),
        ..Default::default()
    };
    let ended = settle(&endpoints[0], token, record, &mut summary).await;
    let views = list_everywhere(endpoints, token, &mut summary).await;
    check_lists(&views, record, &mut summary);
    for created in &record.creates {
        let Some(agent) = ended.get(&created.id) else {
            continue;
        };
        match status_of(agent) {
            v1::AgentStatus::Finished => {
                summary.finished += 1;
                check_pushed(repository, agent, &mut summary);
            }
            v1::AgentStatus::Stopped => {
                summary.stopped += 1;
                check_pushed(repository, agent, &mut summary);
            }
            _ => {
                summary.failed += 1;
                summary
                    .violations
                    .push(format!("agent {} ended FAILED: {}", agent.id, agent.error));
            }
        }
        if record.stops.contains(&created.id) && status_of(agent) != v1::AgentStatus::Stopped {
            summary.violations.push(format!(
                "agent {}: a stop was acknowledged but it ended {:?}",
                agent.id,
                status_of(agent)
            ));
        }
        check_histories(endpoints, token, &created.id, record, windows, &mut summary).await;
    }
    summary
}

/// Waits until every acknowledged agent has ended (read through node 1), and returns them as
/// they ended.
async fn settle(endpoint: &str, token: &str, record: &Record, summary: &mut Summary) -> BTreeMap<String, v1::Agent> {
    let mut client = agent_client(endpoint, token).await;
    let started = Instant::now();
    let mut ended = BTreeMap::new();
    loop {
        for created in &record.creates {
            if ended.contains_key(&created.id) {
                continue;
            }
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                client.get_agent(v1::GetAgentRequest { id: created.id.clone() }),
            )
            .await;
            if let Ok(Ok(reply)) = answer {
                let agent = reply.into_inner();
                // A FINISHED agent with a follow-up pending has not ended: the follow-up starts a
                // new run. A stop ends an agent whatever it had pending.
                let ended_for_good = match status_of(&agent) {
                    v1::AgentStatus::Finished => agent.pending_follow_ups == 0,
                    v1::AgentStatus::Stopped | v1::AgentStatus::Failed => true,
                    _ => false,
                };
                if ended_for_good {
                    ended.insert(created.id.clone(), agent);
                }
            }
        }
        if ended.len() == record.creates.len() {
            return ended;
        }
        if started.elapsed() > SETTLE_DEADLINE {
            for created in record.creates.iter().filter(|created| !ended.contains_key(&created.id)) {
                summary.not_ended += 1;
                summary.violations.push(format!(
                    "agent {} ({}) had not ended {SETTLE_DEADLINE:?} after the faults stopped",
                    created.id, created.name
                ));
            }
            return ended;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every node's list of agents: (id, name) per node.
async fn list_everywhere(endpoints: &[String], token: &str, summary: &mut Summary) -> Vec<Vec<(String, String)>> {
    let mut views = Vec::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        let mut client = agent_client(endpoint, token).await;
        let request = v1::ListAgentsRequest {
            page_size: 1000,
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(30), client.list_agents(request)).await {
            Ok(Ok(reply)) => views.push(
                reply
                    .into_inner()
                    .agents
                    .into_iter()
                    .map(|agent| (agent.id, agent.name))
                    .collect(),
            ),
            other => {
                summary
                    .violations
                    .push(format!("node {} did not list its agents: {other:?}", index + 1));
                views.push(Vec::new());
            }
        }
    }
    views
}

/// Every node lists the same agents, each acknowledged create once, and no name twice (the
/// workload never reuses a name, so a second agent of one name is a duplicate).
fn check_lists(views: &[Vec<(String, String)>], record: &Record, summary: &mut Summary) {
    for (index, view) in views.iter().enumerate() {
        let node = index + 1;
        let ids: BTreeSet<&String> = view.iter().map(|(id, _)| id).collect();
        let reference: BTreeSet<&String> = views[0].iter().map(|(id, _)| id).collect();
        if ids != reference {
            summary.violations.push(format!(
                "node {node} lists {} agents, node 1 lists {}: they differ",
                ids.len(),
                reference.len()
            ));
        }
        for created in &record.creates {
            if !ids.contains(&created.id) {
                summary.violations.push(format!(
                    "node {node} lost acknowledged create {} ({}, through node {})",
                    created.id, created.name, created.via
                ));
            }
        }
        let mut names: BTreeMap<&String, usize> = BTreeMap::new();
        for (_, name) in view {
            *names.entry(name).or_default() += 1;
        }
        for (name, count) in names.into_iter().filter(|(_, count)| *count > 1) {
            summary
                .violations
                .push(format!("node {node} lists {count} agents named {name}"));
        }
    }
}

/// The origin's branch of an ended agent is at its recorded pushed commit, and an agent that
/// recorded no push has no branch there: a push the cluster did not record is a violation.
fn check_pushed(repository: &str, agent: &v1::Agent, summary: &mut Summary) {
    let origin = repository.strip_prefix("file://").expect("a file:// origin");
    let output = std::process::Command::new("git")
        .args(["ls-remote", origin, &format!("refs/heads/{}", agent.work_branch)])
        .output()
        .expect("run git ls-remote");
    let at_origin = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    if at_origin != agent.pushed_commit {
        summary.violations.push(format!(
            "agent {} ended {:?} with pushed commit {:?} but the origin's {} is at {:?}",
            agent.id,
            status_of(agent),
            agent.pushed_commit,
            agent.work_branch,
            at_origin
        ));
    }
}

/// The agent's durable history, read through every node: the same on all, valid by the
/// invariants, holding every acknowledged follow-up, and down only for a node while it was faulted.
async fn check_histories(
    endpoints: &[String],
    token: &str,
    id: &str,
    record: &Record,
    windows: &[FaultWindow],
    summary: &mut Summary,
) {
    let mut histories = Vec::new();
    let mut times = Vec::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        let mut client = agent_client(endpoint, token).await;
        match invariants::durable_history(&mut client, id).await {
            Ok(events) => histories.push({
                if times.is_empty() {
                    times = events.iter().map(|event| event.at).collect();
                }
                events
                    .into_iter()
                    .map(|event| (event.sequence, event.node_id, event.kind))
                    .collect::<Vec<_>>()
            }),
            Err(error) => {
                summary
                    .violations
                    .push(format!("node {}: history of {id}: {error}", index + 1));
                return;
            }
        }
    }
    for (index, history) in histories.iter().enumerate().skip(1) {
        if history != &histories[0] {
            summary.violations.push(format!(
                "agent {id}: node {} holds {} events, node 1 {}, and they differ",
                index + 1,
                history.len(),
                histories[0].len()
            ));
        }
    }
    let events: Vec<v1::AgentEvent> = histories[0]
        .iter()
        .map(|(sequence, node_id, kind)| v1::AgentEvent {
            sequence: *sequence,
            node_id: *node_id,
            kind: kind.clone(),
            ..Default::default()
        })
        .collect();
    if let Err(violation) = invariants::check_agent_history(id, &events) {
        summary.violations.push(violation);
    }
    summary.history_lengths.insert(id.to_string(), events.len() as u64);
    let times: Vec<Option<SystemTime>> = times.iter().map(|at| at.as_ref().map(timestamp)).collect();
    summary.reassign.extend(reassign_times(&events, &times, windows));
    let accepted: BTreeSet<u32> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(agent_event::Kind::FollowUpAccepted(accepted)) => Some(accepted.index),
            _ => None,
        })
        .collect();
    for (_, index) in record.follow_ups.iter().filter(|(agent, _)| agent == id) {
        if !accepted.contains(index) {
            summary.violations.push(format!(
                "agent {id}: acknowledged follow-up {index} is not in its history"
            ));
        }
    }
    for (event, at) in events.iter().zip(times.iter().copied()) {
        if let Some(agent_event::Kind::StatusChanged(change)) = &event.kind {
            let Some(node) = node_down(change) else { continue };
            let in_a_fault = at.is_some_and(|at| {
                windows
                    .iter()
                    .any(|window| window.node == node && window.from <= at && at <= window.until)
            });
            if !in_a_fault {
                summary.violations.push(format!(
                    "agent {id}: node {node} recorded down (sequence {}, at {at:?}) outside any fault of that node",
                    event.sequence
                ));
            }
        }
    }
}

fn timestamp(at: &prost_types::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::new(at.seconds.max(0) as u64, at.nanos.max(0) as u32)
}

/// The node a "node N down" status change names.
fn node_down(change: &v1::StatusChanged) -> Option<u64> {
    change
        .reason
        .strip_prefix("node ")
        .and_then(|rest| rest.strip_suffix(" down"))
        .and_then(|node| node.parse::<u64>().ok())
}

/// For each kill -9 that took this agent from its node: the time from the kill to the agent's
/// next assignment to another node.
fn reassign_times(events: &[v1::AgentEvent], times: &[Option<SystemTime>], windows: &[FaultWindow]) -> Vec<Duration> {
    let mut measured = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let Some(agent_event::Kind::StatusChanged(change)) = &event.kind else {
            continue;
        };
        let (Some(dead), Some(Some(at))) = (node_down(change), times.get(index)) else {
            continue;
        };
        let Some(window) = windows
            .iter()
            .find(|window| window.kill && window.node == dead && window.from <= *at && *at <= window.until)
        else {
            continue;
        };
        let assigned = events
            .iter()
            .zip(times)
            .skip(index + 1)
            .find_map(|(later, at)| match &later.kind {
                Some(agent_event::Kind::StatusChanged(change))
                    if change
                        .assignment
                        .as_ref()
                        .is_some_and(|assignment| assignment.node_id != dead) =>
                {
                    *at
                }
                _ => None,
            });
        if let Some(assigned) = assigned {
            if let Ok(elapsed) = assigned.duration_since(window.from) {
                measured.push(elapsed);
            }
        }
    }
    measured
}
