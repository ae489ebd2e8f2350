//! `deploy/local/cluster` (the `flotilla-lab` binary): a local cluster of two regions of two
//! nodes each comes up with a WAN delay between the regions, runs agents in the region each asks
//! for, reports its nodes, and goes down leaving no namespace, bridge or node process, also after
//! its keeper was killed.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use flotilla_proto::v1;
use flotilla_tests::local_cluster::{process_alive, LocalState};
use flotilla_tests::{agent_client, trust_cluster_ca, wait_for};

use crate::common::{create_request, get, status_of, DEADLINE};

const LAB: &str = env!("CARGO_BIN_EXE_flotilla-lab");

fn lab(state_dir: &Path, args: &[&str]) -> Output {
    let output = Command::new(LAB)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env("FLOTILLA_BIN", flotilla_tests::flotilla_bin())
        .output()
        .expect("flotilla-lab runs");
    assert!(
        output.status.success(),
        "flotilla-lab {args:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn assert_all_gone(state: &LocalState) {
    for node in &state.nodes {
        assert!(
            !Path::new("/run/netns").join(&node.namespace).exists(),
            "namespace {} is left after down",
            node.namespace
        );
        if let Some(pid) = node.pid {
            assert!(
                !process_alive(pid),
                "node {} (pid {pid}) still runs after down",
                node.id
            );
        }
    }
    assert!(
        !Path::new("/sys/class/net").join(&state.bridge).exists(),
        "bridge {} is left after down",
        state.bridge
    );
    assert!(!process_alive(state.keeper_pid), "the keeper still runs after down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t27_two_regions_come_up_run_agents_in_their_region_and_go_down() {
    let state_dir = tempfile::Builder::new()
        .prefix("flotilla-it-local-")
        .tempdir()
        .expect("temp dir");
    let up = lab(
        state_dir.path(),
        &[
            "up",
            "--regions",
            "eu=2,us=2",
            "--wan-latency",
            "20ms",
            "--jitter",
            "2ms",
        ],
    );
    let state = LocalState::read(state_dir.path())
        .expect("readable record")
        .expect("up leaves a record");
    assert_eq!(state.nodes.len(), 4, "{}", String::from_utf8_lossy(&up.stdout));
    assert_eq!(state.wan_latency_ms, 20);
    let status = String::from_utf8_lossy(&lab(state_dir.path(), &["status"]).stdout).to_string();
    for node in &state.nodes {
        let line = status
            .lines()
            .find(|line| line.contains(&node.endpoint))
            .unwrap_or_else(|| panic!("status lists no line for {}:\n{status}", node.endpoint));
        assert!(
            line.contains("running") && line.contains(" up "),
            "node {} is not up: {line}",
            node.id
        );
    }

    // An agent per region, each created through a node of the other region, runs on a node of
    // the region it asked for.
    trust_cluster_ca(&state.ca_cert);
    let token = std::fs::read_to_string(&state.admin_token_file).expect("admin token");
    let token = token.trim();
    let region_of = |node_id: u64| {
        state
            .nodes
            .iter()
            .find(|node| node.id == node_id)
            .map(|node| node.region.clone())
    };
    let mut agents = Vec::new();
    for (region, through) in [("eu", "us"), ("us", "eu")] {
        let node = state.nodes.iter().find(|node| node.region == through).expect("a node");
        let mut client = agent_client(&node.endpoint, token).await;
        let mut request = create_request(&format!("in-{region}"), "hold");
        request.region = region.to_string();
        let agent = crate::common::create_from(&mut client, request).await;
        agents.push((region, agent.id, node.endpoint.clone()));
    }
    for (region, id, endpoint) in &agents {
        let mut client = agent_client(endpoint, token).await;
        let agent = wait_for(&format!("agent {id} to run in {region}"), DEADLINE, || {
            let (mut client, id) = (client.clone(), id.clone());
            async move {
                let agent = get(&mut client, &id).await?;
                (status_of(&agent) == v1::AgentStatus::Running).then_some(agent)
            }
        })
        .await;
        let node_id = agent
            .assignment
            .as_ref()
            .map(|assignment| assignment.node_id)
            .unwrap_or(0);
        assert_eq!(
            region_of(node_id).as_deref(),
            Some(*region),
            "agent {id} asked for {region} and runs on node {node_id}"
        );
        client = agent_client(endpoint, token).await;
        let _ = client
            .stop_agent(v1::StopAgentRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await;
    }

    lab(state_dir.path(), &["down"]);
    assert_all_gone(&state);
    assert!(
        LocalState::read(state_dir.path()).expect("readable").is_none(),
        "down removes the record"
    );

    // A killed keeper leaves nodes running in their namespaces: down removes them.
    lab(
        state_dir.path(),
        &["up", "--regions", "eu=1,us=1", "--wan-latency", "5ms"],
    );
    let state = LocalState::read(state_dir.path()).expect("readable").expect("a record");
    let keeper = libc::pid_t::try_from(state.keeper_pid).expect("pid");
    kill_keeper(keeper);
    wait_for("the keeper to die", Duration::from_secs(10), || {
        let gone = !process_alive(state.keeper_pid);
        async move { gone.then_some(()) }
    })
    .await;
    for node in &state.nodes {
        let pid = node.pid.expect("a recorded pid");
        assert!(process_alive(pid), "node {} should outlive its killed keeper", node.id);
    }
    lab(state_dir.path(), &["down"]);
    assert_all_gone(&state);
}

// Unsafe: kill(2) with SIGKILL on the keeper, which is not this process's child.
#[allow(unsafe_code)]
fn kill_keeper(pid: libc::pid_t) {
    // SAFETY: `kill` has no memory-safety preconditions.
    let result = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(result, 0, "could not kill the keeper {pid}");
}
