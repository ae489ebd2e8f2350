//! A watcher on one node sees an agent that runs on another: durable events through Raft, live
//! events over the actor mesh.

use flotilla_proto::v1::{self, watch_agent_response};
use flotilla_tests::{agent_client, ClusterOptions, TestCluster};
use tokio_stream::StreamExt;

use crate::common::DEADLINE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_node_a_sees_events_of_an_agent_on_node_b() {
    let cluster = TestCluster::start(
        3,
        ClusterOptions {
            regions: vec!["east".to_string(), "west".to_string(), "north".to_string()],
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let (node_a, node_b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut client_a = agent_client(&node_a.endpoint(), &token).await;
    let agent = crate::common::create_from(
        &mut client_a,
        v1::CreateAgentRequest {
            prompt: "Runs in the west".to_string(),
            repository: crate::common::sample_repository(),
            region: "west".to_string(),
            ..Default::default()
        },
    )
    .await;

    let mut stream = client_a
        .watch_agent(v1::WatchAgentRequest {
            id: agent.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch on node a")
        .into_inner();
    let mut saw_provisioning_on_b = false;
    let mut saw_live_from_b = false;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !(saw_provisioning_on_b && saw_live_from_b) {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("events from node b before the deadline")
            .expect("stream open")
            .expect("no error");
        let Some(watch_agent_response::Kind::Event(event)) = message.kind else {
            continue;
        };
        if event.live {
            assert_eq!(event.node_id, node_b.id, "live events come from the owning node");
            saw_live_from_b = true;
        } else if let Some(v1::agent_event::Kind::StatusChanged(change)) = &event.kind {
            if change.to == v1::AgentStatus::Provisioning as i32 {
                assert_eq!(event.node_id, node_b.id);
                assert_eq!(change.assignment.as_ref().map(|a| a.node_id), Some(node_b.id));
                saw_provisioning_on_b = true;
            }
        }
    }

    // Stopping it through a third node ends the stream on node a.
    let mut client_c = agent_client(&cluster.nodes[2].endpoint(), &token).await;
    client_c
        .stop_agent(v1::StopAgentRequest {
            id: agent.id.clone(),
            reason: "done watching".to_string(),
        })
        .await
        .expect("stop via node c");
    let mut stopped = false;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the stream ends before the deadline");
        let Some(message) = next else { break };
        if let Some(watch_agent_response::Kind::Event(event)) = message.expect("no error").kind {
            if let Some(v1::agent_event::Kind::StatusChanged(change)) = &event.kind {
                stopped |= change.to == v1::AgentStatus::Stopped as i32;
            }
        }
    }
    assert!(stopped, "the watcher saw the stop before its stream ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_through_another_node_reaches_the_owner() {
    let cluster = TestCluster::start(
        2,
        ClusterOptions {
            regions: vec!["east".to_string(), "west".to_string()],
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    let repository = crate::common::bare_repository(
        cluster.dir.path(),
        "remote",
        &[(
            ".flotilla/environment.json",
            r#"{"terminals": [{"name": "hello", "command": "echo remote-terminal-ok; exec sleep 1000000"}]}"#,
        )],
    );
    let endpoint_a = cluster.nodes[0].endpoint();
    let mut client_a = agent_client(&endpoint_a, &token).await;
    let agent = crate::common::create_from(
        &mut client_a,
        v1::CreateAgentRequest {
            prompt: "Runs in the west".to_string(),
            repository,
            region: "west".to_string(),
            ..Default::default()
        },
    )
    .await;
    let running = crate::t50_machines::wait_for_status(&endpoint_a, &token, &agent.id, v1::AgentStatus::Running).await;
    assert_eq!(
        running.assignment.map(|assignment| assignment.node_id),
        Some(cluster.nodes[1].id)
    );
    // Node A runs no machine for it; it passes the attach on to node B.
    let mut terminal = crate::t50_machines::Attached::open(&mut client_a, &agent.id, "hello", false)
        .await
        .expect("attach through node a");
    terminal.read_until("remote-terminal-ok").await;
    terminal.read_until(&format!("on node {}", cluster.nodes[1].id)).await;
}
