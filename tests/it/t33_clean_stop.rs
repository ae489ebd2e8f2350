//! A clean stop fails no agent: a node stopped with SIGTERM hands its running agents back
//! before its machines go, other nodes take them over from their last checkpoint under the next
//! epoch at once (not after the lease), and they finish there with their work at the origin. The
//! stopping node is given no agent while it stops, and takes agents again once restarted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_proto::v1::{self, agent_event};
use flotilla_tests::{agent_client, invariants, try_get_cluster, wait_for, ClusterOptions, TestCluster};
use serde_json::json;

use crate::common::{bare_repository, create_from, get, status_of, DEADLINE};
use crate::t18_agent_runs::{config_with, request, scripted_model, show};
use crate::t30_failover::{placements, Placements};
use crate::t32_ready_and_handover::agreed_leader;

const LEASE_MS: u64 = 2_000;
/// The command each agent runs in its second turn: long enough that the SIGTERM finds every
/// agent in it (they reach it a few seconds apart), short enough that the run, done twice by
/// the agents that move, stays within the test's deadlines.
const HOLD_SECS: u64 = 15;
/// Agents created once the node is marked stopping, before its lease runs out.
const CREATED_WHILE_STOPPING: usize = 4;

/// Turn 1 writes and pushes `note.txt`, turn 2 runs a long command, turn 3 answers.
fn work_script() -> serde_json::Value {
    json!({"turns": [
        {"text": "Writing the note.", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "note.txt", "content": "noted\n"}}
        ]},
        {"text": "Checking.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": format!("sleep {HOLD_SECS}"), "timeout_ms": 120_000}}
        ]},
        {"text": "The note is written."}
    ]})
}

fn cluster_config(dir: &Path) -> String {
    let models = format!(
        "{}{}",
        scripted_model(dir, "work", work_script()),
        scripted_model(dir, "hold", serde_json::from_str(flotilla_tests::HOLD_SCRIPT).unwrap())
    );
    config_with(&models, "work")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_cleanly_hands_its_agents_over_and_fails_none() {
    let dir = tempfile::tempdir().unwrap();
    let url = bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let origin = PathBuf::from(url.strip_prefix("file://").unwrap());
    let mut cluster = TestCluster::start(
        3,
        ClusterOptions {
            lease_ms: Some(LEASE_MS),
            slots: 6,
            config: Some(cluster_config(dir.path())),
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    // The leader stops: it hands its agents back and then leadership.
    let victim = agreed_leader(&cluster, &[1, 2, 3]).await;
    let entry = cluster.node(if victim == 1 { 2 } else { 1 }).endpoint();
    let mut client = agent_client(&entry, &token).await;
    let mut work = Vec::new();
    for index in 0..6 {
        work.push(
            create_from(&mut client, request(&url, &format!("work-{index}"), "Write the note"))
                .await
                .id,
        );
    }
    let before = wait_for_all_in_their_second_turn(&entry, &token, &work).await;
    let moved: Vec<String> = work.iter().filter(|id| before[*id].0 == victim).cloned().collect();
    assert!(!moved.is_empty(), "no agent runs on node {victim}: {before:?}");

    cluster.node_mut(victim).begin_terminate();
    let stopped_at = Instant::now();
    let marked_after = wait_for_stopping_mark(&entry, &token, victim).await;
    let during = create_while_stopping(&entry, &token, &url, victim).await;
    tokio::task::block_in_place(|| cluster.node_mut(victim).wait_exit(DEADLINE));
    let exited_after = stopped_at.elapsed();
    let taken_over_after = wait_for_running_elsewhere(&entry, &token, victim, &moved, 2).await;
    let taken_over_after = taken_over_after.saturating_duration_since(stopped_at);
    wait_for_running_elsewhere(&entry, &token, victim, &during, 1).await;
    eprintln!(
        "node {victim} (leader) stopped with SIGTERM and {} of its agents: marked stopping after {marked_after:?}, \
         exited after {exited_after:?}; its agents ran elsewhere {taken_over_after:?} after the SIGTERM (lease {LEASE_MS} ms)",
        moved.len()
    );
    assert!(
        taken_over_after < Duration::from_millis(LEASE_MS),
        "the agents took {taken_over_after:?} to run elsewhere, not less than the lease: they were not handed back"
    );

    let finished = wait_for_all_finished(&entry, &token, &work).await;
    for id in &work {
        let agent = &finished[id];
        assert_eq!(agent.summary, "The note is written.", "{id}");
        assert_eq!(
            show(&origin, &agent.work_branch, "note.txt").as_deref(),
            Some("noted\n"),
            "{id}"
        );
        let assignment = agent.assignment.expect("assigned");
        if moved.contains(id) {
            assert_ne!(assignment.node_id, victim, "{id} finished on the stopped node");
            assert_eq!(assignment.epoch, 2, "{id} was taken over once");
        }
    }
    check_histories(&entry, &token, victim, &moved, &work, &during).await;

    // Restarted, the node takes agents again by itself.
    cluster.node_mut(victim).restart();
    let restarted = Instant::now();
    wait_for(&format!("node {victim} up and taking agents again"), DEADLINE, || {
        let (entry, token) = (entry.clone(), token.clone());
        async move {
            let view = try_get_cluster(&entry, &token).await?;
            view.members
                .iter()
                .any(|member| member.id == victim && member.up && !member.stopping && !member.draining)
                .then_some(())
        }
    })
    .await;
    eprintln!(
        "node {victim} took agents again {:?} after its restart",
        restarted.elapsed()
    );
    let mut client = agent_client(&entry, &token).await;
    let mut request = request(&url, "after-restart", "Hold");
    request.model = "hold".to_string();
    create_from(&mut client, request).await;
    wait_for("an agent to run on the restarted node", DEADLINE, || {
        let (entry, token) = (entry.clone(), token.clone());
        async move {
            let placed = placements(&entry, &token).await?;
            placed
                .values()
                .any(|(node, _, status)| *node == victim && *status == v1::AgentStatus::Running as i32)
                .then_some(())
        }
    })
    .await;
    eprintln!("node {victim} ran an agent {:?} after its restart", restarted.elapsed());
}

/// Waits until every agent of `ids` runs its second turn (its first is checkpointed and its
/// note pushed), and returns where each one runs.
async fn wait_for_all_in_their_second_turn(endpoint: &str, token: &str, ids: &[String]) -> Placements {
    wait_for("every agent running its second turn", DEADLINE, || {
        let (endpoint, token, ids) = (endpoint.to_string(), token.to_string(), ids.to_vec());
        async move {
            let mut client = agent_client(&endpoint, &token).await;
            let mut placed = Placements::new();
            for id in &ids {
                let agent = get(&mut client, id).await?;
                let assignment = agent.assignment?;
                let in_second_turn = status_of(&agent) == v1::AgentStatus::Running && agent.turns == 1;
                assert!(
                    agent.turns <= 1,
                    "{id} passed its second turn before the stop: raise HOLD_SECS"
                );
                if !in_second_turn {
                    return None;
                }
                placed.insert(id.clone(), (assignment.node_id, assignment.epoch, agent.status));
            }
            Some(placed)
        }
    })
    .await
}

/// Waits until the cluster (asked through `endpoint`) shows `node` stopping; returns when.
async fn wait_for_stopping_mark(endpoint: &str, token: &str, node: u64) -> Duration {
    let started = Instant::now();
    wait_for(&format!("node {node} marked stopping"), DEADLINE, || {
        let (endpoint, token) = (endpoint.to_string(), token.to_string());
        async move {
            let view = try_get_cluster(&endpoint, &token).await?;
            view.members
                .iter()
                .any(|member| member.id == node && member.stopping)
                .then_some(())
        }
    })
    .await;
    started.elapsed()
}

/// Creates agents (the `hold` model) through `endpoint` once `victim` is marked stopping, and
/// checks that its lease has not run out meanwhile (it is not marked down): what keeps them off
/// it is the stopping mark alone.
async fn create_while_stopping(endpoint: &str, token: &str, url: &str, victim: u64) -> Vec<String> {
    let mut client = agent_client(endpoint, token).await;
    let mut created = Vec::new();
    for index in 0..CREATED_WHILE_STOPPING {
        let mut request = request(url, &format!("during-{index}"), "Hold");
        request.model = "hold".to_string();
        created.push(create_from(&mut client, request).await.id);
    }
    let view = try_get_cluster(endpoint, token).await.expect("the cluster view");
    let member = view
        .members
        .iter()
        .find(|member| member.id == victim)
        .expect("a member");
    assert!(
        member.up && member.stopping,
        "node {victim} should be up and stopping after the creates: {member:?}"
    );
    created
}

/// Waits until every agent of `ids` runs on a node other than `victim` under `epoch`; returns
/// when that was seen.
async fn wait_for_running_elsewhere(endpoint: &str, token: &str, victim: u64, ids: &[String], epoch: u64) -> Instant {
    wait_for(
        &format!("agents {ids:?} running off node {victim} under epoch {epoch}"),
        DEADLINE,
        || {
            let (endpoint, token, ids) = (endpoint.to_string(), token.to_string(), ids.to_vec());
            async move {
                let placed = placements(&endpoint, &token).await?;
                ids.iter()
                    .all(|id| {
                        let (node, placed_epoch, status) = placed[id];
                        assert_ne!(status, v1::AgentStatus::Failed as i32, "{id} failed");
                        node != victim && placed_epoch == epoch && status == v1::AgentStatus::Running as i32
                    })
                    .then_some(())
            }
        },
    )
    .await;
    Instant::now()
}

/// Waits until every agent of `ids` is finished; fails at once if one fails.
async fn wait_for_all_finished(endpoint: &str, token: &str, ids: &[String]) -> BTreeMap<String, v1::Agent> {
    wait_for("every agent finished", DEADLINE * 2, || {
        let (endpoint, token, ids) = (endpoint.to_string(), token.to_string(), ids.to_vec());
        async move {
            let mut client = agent_client(&endpoint, &token).await;
            let mut finished = BTreeMap::new();
            for id in &ids {
                let agent = get(&mut client, id).await?;
                assert_ne!(status_of(&agent), v1::AgentStatus::Failed, "{id}: {}", agent.error);
                if status_of(&agent) != v1::AgentStatus::Finished {
                    return None;
                }
                finished.insert(id.clone(), agent);
            }
            Some(finished)
        }
    })
    .await
}

/// Every history holds up and never shows a failure; the moved agents say why they moved; no
/// agent created while the node stopped was ever assigned to it.
async fn check_histories(
    endpoint: &str,
    token: &str,
    victim: u64,
    moved: &[String],
    work: &[String],
    during: &[String],
) {
    let mut client = agent_client(endpoint, token).await;
    let reason = format!("node {victim} stopping");
    for id in work.iter().chain(during) {
        let history = invariants::durable_history(&mut client, id).await.expect("history");
        invariants::check_agent_history(id, &history).unwrap_or_else(|violation| panic!("{violation}"));
        let changes: Vec<&v1::StatusChanged> = history
            .iter()
            .filter_map(|event| match &event.kind {
                Some(agent_event::Kind::StatusChanged(change)) => Some(change),
                _ => None,
            })
            .collect();
        assert!(
            changes.iter().all(|change| change.to != v1::AgentStatus::Failed as i32),
            "{id} was failed: {changes:?}"
        );
        if moved.contains(id) {
            assert!(
                changes.iter().any(|change| change.reason == reason),
                "{id} does not say it moved because its node stopped: {changes:?}"
            );
        }
        if during.contains(id) {
            assert!(
                changes.iter().all(|change| change
                    .assignment
                    .as_ref()
                    .is_none_or(|assignment| assignment.node_id != victim)),
                "{id}, created while node {victim} stopped, was assigned to it: {changes:?}"
            );
        }
    }
}
