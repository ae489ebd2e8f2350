//! A rolling restart of a three-node cluster under load: each node in turn is stopped cleanly
//! (SIGTERM: it hands its agents and leadership over), started again, and waited for until it is
//! a member up again and has applied what the cluster had applied when it came back. Meanwhile a
//! client keeps creating agents, retrying an UNAVAILABLE answer on the next node (the documented
//! retry rule), and agents run a long command across the restarts. Afterwards every acknowledged
//! create exists and every agent finished: the running ones kept running or resumed from their
//! checkpoint on another node. The time for the whole rolling restart is printed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_tests::{agent_client, try_get_cluster, wait_for, ClusterOptions, TestCluster};
use serde_json::json;

use crate::common::{bare_repository, create_from, get, status_of, DEADLINE};
use crate::t18_agent_runs::{config_with, request, scripted_model};

const LEASE_MS: u64 = 2_000;
/// Between two creates of the client's steady stream.
const CREATE_EVERY: Duration = Duration::from_millis(400);
/// Attempts of one create across the nodes before the client gives up (it never should).
const CREATE_ATTEMPTS: usize = 20;

fn cluster_config(dir: &std::path::Path) -> String {
    // `work` holds its machine across at least one restart; `quick` is the steady stream.
    let work = json!({"turns": [
        {"text": "Writing the note.", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "note.txt", "content": "noted\n"}}
        ]},
        {"text": "Checking.", "tool_calls": [
            {"name": "run_command", "arguments": {"command": "sleep 8", "timeout_ms": 120_000}}
        ]},
        {"text": "The note is written."}
    ]});
    let quick = json!({"turns": [{"text": "Nothing to do."}]});
    let models = format!(
        "{}{}",
        scripted_model(dir, "work", work),
        scripted_model(dir, "quick", quick)
    );
    config_with(&models, "work")
}

/// The client's retry rule, as the CLI's (`node/src/cli/watch.rs`): UNAVAILABLE, or a
/// connection torn down under the call (a node stopping), which the local transport reports as
/// UNKNOWN or INTERNAL with a source error. A status the server sent itself is final.
fn worth_retrying(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Internal => status.source().is_some(),
        _ => false,
    }
}

/// Creates agents until told to stop, each through the next node, retrying UNAVAILABLE, a
/// connection torn down under the call, and a node that does not answer on the next one. Returns the acknowledged ids.
async fn steady_creates(endpoints: Vec<String>, token: String, url: String, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut acknowledged = Vec::new();
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let mut request = request(&url, &format!("stream-{}", acknowledged.len()), "Nothing");
        request.model = "quick".to_string();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let endpoint = &endpoints[next % endpoints.len()];
            next += 1;
            let mut client = agent_client(endpoint, &token).await;
            let answer = tokio::time::timeout(Duration::from_secs(15), client.create_agent(request.clone())).await;
            match answer {
                Ok(Ok(reply)) => {
                    acknowledged.push(reply.into_inner().agent.expect("an agent").id);
                    break;
                }
                Ok(Err(status)) if worth_retrying(&status) => {}
                Ok(Err(status)) => panic!("a create was refused: {status}"),
                Err(_) => {}
            }
            assert!(attempts < CREATE_ATTEMPTS, "a create failed {attempts} times in a row");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(CREATE_EVERY).await;
    }
    acknowledged
}

/// Waits until `node` lists every member up and none stopping, and has applied `index`.
async fn wait_rejoined(cluster: &TestCluster, node: u64, index: u64, token: &str) {
    let endpoint = cluster.node(node).endpoint();
    wait_for(
        &format!("node {node} to rejoin and catch up to {index}"),
        DEADLINE,
        || {
            let (endpoint, token) = (endpoint.clone(), token.to_string());
            async move {
                let view = try_get_cluster(&endpoint, &token).await?;
                let all_up = view.members.len() == 3 && view.members.iter().all(|member| member.up && !member.stopping);
                (all_up && view.leader_id != 0 && view.last_applied_index >= index).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_no_create_and_fails_no_agent() {
    let dir = tempfile::tempdir().unwrap();
    let url = bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let mut cluster = TestCluster::start(
        3,
        ClusterOptions {
            lease_ms: Some(LEASE_MS),
            slots: 8,
            config: Some(cluster_config(dir.path())),
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let endpoints: Vec<String> = (1..=3).map(|id| cluster.node(id).endpoint()).collect();
    let mut client = agent_client(&endpoints[0], &token).await;
    let mut work = Vec::new();
    for index in 0..6 {
        work.push(
            create_from(&mut client, request(&url, &format!("work-{index}"), "Write"))
                .await
                .id,
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let creator = tokio::spawn(steady_creates(
        endpoints.clone(),
        token.clone(),
        url.clone(),
        stop.clone(),
    ));

    let timings = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    for node in 1..=3u64 {
        let other = if node == 1 { 2 } else { 1 };
        let stop_at = Instant::now();
        cluster.node_mut(node).begin_terminate();
        tokio::task::block_in_place(|| cluster.node_mut(node).wait_exit(DEADLINE));
        let stopped = stop_at.elapsed();
        // The leader's append stream to a stopping follower, and any other call, ends with the
        // stop: the server never waits its stop out.
        let log = std::fs::read_to_string(cluster.node(node).log_path()).unwrap_or_default();
        assert!(
            !log.contains("the gRPC server did not stop in time"),
            "node {node} waited out its server's stop:\n{}",
            cluster.node(node).log_tail(40)
        );
        let applied = wait_for(
            &format!("node {other} to answer while {node} is down"),
            DEADLINE,
            || {
                let (endpoint, token) = (cluster.node(other).endpoint(), token.clone());
                async move {
                    try_get_cluster(&endpoint, &token)
                        .await
                        .map(|view| view.last_applied_index)
                }
            },
        )
        .await;
        cluster.node_mut(node).restart();
        wait_rejoined(&cluster, node, applied, &token).await;
        timings.lock().unwrap().push((node, stopped, stop_at.elapsed()));
    }
    let rolling = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let acknowledged = creator.await.unwrap();
    for (node, stopped, back) in timings.lock().unwrap().iter() {
        eprintln!("node {node}: exited {stopped:?} after SIGTERM, rejoined and caught up {back:?} after it");
    }
    eprintln!(
        "rolling restart of 3 nodes: {rolling:?}; {} creates acknowledged meanwhile",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() >= 5,
        "the client created too little to mean anything: {acknowledged:?}"
    );

    // No acknowledged create is lost, and every agent ends well (the work agents resumed from
    // their checkpoint when their node stopped).
    let every: Vec<String> = work.iter().chain(&acknowledged).cloned().collect();
    let finished = wait_for("every agent finished", DEADLINE * 3, || {
        let (endpoint, token, every) = (endpoints[0].clone(), token.clone(), every.clone());
        async move {
            let mut client = agent_client(&endpoint, &token).await;
            let mut finished = Vec::new();
            for id in &every {
                let agent = get(&mut client, id)
                    .await
                    .unwrap_or_else(|| panic!("acknowledged agent {id} is lost"));
                assert_ne!(status_of(&agent), v1::AgentStatus::Failed, "{id}: {}", agent.error);
                if status_of(&agent) != v1::AgentStatus::Finished {
                    return None;
                }
                finished.push(agent);
            }
            Some(finished)
        }
    })
    .await;
    let moved = finished
        .iter()
        .filter(|agent| work.contains(&agent.id))
        .filter(|agent| agent.assignment.as_ref().is_some_and(|assignment| assignment.epoch > 1))
        .count();
    eprintln!("{moved} of {} work agents resumed on another node", work.len());
}
