//! A region cut off: with voters east, east, west, the east side holds the Raft majority. While
//! the west node is cut off, an east agent keeps running and its watch stream (through the other
//! east node) keeps receiving durable events, and creates through the east go on; once the cut
//! heals, a read through the west node finds what the east acknowledged meanwhile.

use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_proto::v1::watch_agent_response;
use flotilla_tests::{agent_client, wait_for, ClusterOptions, TestCluster};
use futures::StreamExt;

use crate::common::{create_from, create_request, get, status_of, DEADLINE};

/// Durable events the east agent's watch must deliver while the west is cut off.
const EVENTS_DURING_CUT: usize = 4;

/// A scripted model that works in short steps: a turn, a one-second command, the next turn.
fn ticking_config(dir: &std::path::Path) -> String {
    let turns: Vec<String> = (0..60)
        .map(|turn| {
            format!(
                r#"{{"text": "Step {turn}.", "tool_calls": [{{"name": "run_command", "arguments": {{"command": "sleep 1"}}}}]}}"#
            )
        })
        .collect();
    let script = dir.join("ticking.json");
    std::fs::write(&script, format!(r#"{{"turns": [{}]}}"#, turns.join(",\n"))).expect("write the script");
    format!(
        "[models.tick]\nprovider = \"scripted\"\nscript = {:?}\n\n[agents]\ndefault_model = \"tick\"\nmax_turns = 100\n",
        script.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t28_a_cut_off_region_leaves_the_majority_region_working() {
    let scripts = tempfile::tempdir().expect("temp dir");
    let cluster = TestCluster::start(
        3,
        ClusterOptions {
            regions: vec!["east".into(), "east".into(), "west".into()],
            network_lab: true,
            config: Some(ticking_config(scripts.path())),
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let lab = cluster.lab.as_ref().expect("the cluster runs in a lab");
    let mut east = agent_client(&cluster.node(1).endpoint(), &token).await;
    let mut request = create_request("east-worker", "work in small steps");
    request.region = "east".to_string();
    let agent = create_from(&mut east, request).await;
    wait_for("the east agent to run", DEADLINE, || {
        let (mut east, id) = (east.clone(), agent.id.clone());
        async move { (status_of(&get(&mut east, &id).await?) == v1::AgentStatus::Running).then_some(()) }
    })
    .await;

    let mut watcher = agent_client(&cluster.node(2).endpoint(), &token).await;
    let mut stream = watcher
        .watch_agent(v1::WatchAgentRequest {
            id: agent.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch through node 2")
        .into_inner();
    let mut last_sequence = 0;
    // Everything recorded so far, up to the first message that arrives live.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
            Ok(Some(Ok(message))) => {
                if let Some(watch_agent_response::Kind::Event(event)) = message.kind {
                    if !event.live {
                        last_sequence = event.sequence;
                    }
                }
            }
            Ok(other) => panic!("the watch ended before the cut: {other:?}"),
            Err(_) => break,
        }
    }

    lab.partition(&[3]).expect("cut the west node off");
    let cut_at = Instant::now();
    let mut during_cut = Vec::new();
    while during_cut.len() < EVENTS_DURING_CUT {
        let message = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the east watch stalled while the west was cut off: {} durable events in {:?}",
                    during_cut.len(),
                    cut_at.elapsed()
                )
            })
            .expect("the watch stays open")
            .expect("the watch does not fail");
        if let Some(watch_agent_response::Kind::Event(event)) = message.kind {
            if !event.live && event.sequence > last_sequence {
                assert_eq!(event.sequence, last_sequence + 1, "no gap in the east watch");
                last_sequence = event.sequence;
                during_cut.push(event.sequence);
            }
        }
    }
    let current = get(&mut east, &agent.id).await.expect("the agent");
    assert_eq!(
        status_of(&current),
        v1::AgentStatus::Running,
        "the east agent keeps running"
    );
    let mut request = create_request("created-during-cut", "created while the west is cut off");
    request.region = "east".to_string();
    let created = create_from(&mut east, request).await;

    lab.heal().expect("heal");
    let mut west = agent_client(&cluster.node(3).endpoint(), &token).await;
    wait_for(
        "the west node to find the agent created during the cut",
        DEADLINE,
        || {
            let (mut west, id) = (west.clone(), created.id.clone());
            async move { get(&mut west, &id).await }
        },
    )
    .await;
    west = agent_client(&cluster.node(3).endpoint(), &token).await;
    let seen_west = get(&mut west, &agent.id)
        .await
        .expect("the east agent, read through the west");
    assert!(
        seen_west.updated_at.is_some(),
        "the west node serves the east agent's record after the heal"
    );
    eprintln!(
        "east watch: {EVENTS_DURING_CUT} durable events in {:?} while the west was cut off",
        cut_at.elapsed()
    );
}
