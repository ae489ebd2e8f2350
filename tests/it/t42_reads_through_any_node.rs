//! Reads that honour acknowledgement: an agent the cluster acknowledged is found through every
//! node at once (get, watch, follow-up, stop), also through a node that was paused while the
//! agent was created; an id the cluster never acknowledged is NOT_FOUND through every node; a
//! node cut off from a quorum answers UNAVAILABLE within a bound instead of a stale answer.

use std::time::{Duration, Instant};

use flotilla_proto::v1::{self, watch_agent_response};
use flotilla_tests::{agent_client, cluster_client, wait_for, AgentClient, ClusterOptions, TestCluster};
use tokio_stream::StreamExt;

use crate::common::{create, get, identity, status_of, DEADLINE};

/// Indices (into `cluster.nodes`) of the leader and of the two followers.
pub(crate) async fn leader_and_followers(cluster: &TestCluster, token: &str) -> (usize, [usize; 2]) {
    let endpoint = cluster.nodes[0].endpoint();
    let leader = wait_for("a leader all three nodes agree on", DEADLINE, || {
        let (endpoint, token) = (endpoint.clone(), token.to_string());
        async move {
            let mut client = cluster_client(&endpoint, &token).await;
            let view = client.get_cluster(v1::GetClusterRequest {}).await.ok()?.into_inner();
            (view.leader_id != 0).then_some(view.leader_id)
        }
    })
    .await;
    let leader_index = (0..3)
        .find(|index| cluster.nodes[*index].id == leader)
        .expect("leader is a node");
    let followers: Vec<usize> = (0..3).filter(|index| *index != leader_index).collect();
    (leader_index, [followers[0], followers[1]])
}

/// The first message of a watch: the agent's snapshot, which must name `id`.
async fn first_watch_snapshot(client: &mut AgentClient, id: &str, through: &str) -> v1::Agent {
    let mut stream = client
        .watch_agent(v1::WatchAgentRequest {
            id: id.to_string(),
            after_sequence: 0,
        })
        .await
        .unwrap_or_else(|status| panic!("watch of {id} through {through} failed: {status}"))
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no first watch message through {through}"))
        .unwrap_or_else(|| panic!("watch through {through} ended with no message"))
        .unwrap_or_else(|status| panic!("watch through {through} failed: {status}"));
    match first.kind {
        Some(watch_agent_response::Kind::Snapshot(agent)) => {
            assert_eq!(agent.id, id, "watch through {through} opens with the agent's snapshot");
            agent
        }
        other => panic!("watch through {through} opened with {other:?}, not a snapshot"),
    }
}

/// Get, watch and follow-up through one node, right away: every one must find the agent.
async fn find_everywhere_at_once(client: &mut AgentClient, id: &str, through: &str) {
    let agent = client
        .get_agent(v1::GetAgentRequest { id: id.to_string() })
        .await
        .unwrap_or_else(|status| panic!("get of acknowledged agent {id} through {through}: {status}"))
        .into_inner();
    assert_eq!(agent.id, id);
    first_watch_snapshot(client, id, through).await;
    client
        .send_follow_up(v1::SendFollowUpRequest {
            id: id.to_string(),
            text: format!("a follow-up through {through}"),
        })
        .await
        .unwrap_or_else(|status| panic!("follow-up to acknowledged agent {id} through {through}: {status}"));
}

async fn stop(client: &mut AgentClient, id: &str, through: &str) -> v1::Agent {
    client
        .stop_agent(v1::StopAgentRequest {
            id: id.to_string(),
            reason: format!("stopped through {through}"),
        })
        .await
        .unwrap_or_else(|status| panic!("stop of acknowledged agent {id} through {through}: {status}"))
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_agent_is_found_through_every_node_at_once_and_an_unknown_one_nowhere() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let (leader, [follower, lagging]) = leader_and_followers(&cluster, &token).await;
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(agent_client(&node.endpoint(), &token).await);
    }

    // A follower paused while the agent is acknowledged by the other two; asked at once after
    // it resumes, before anything had a chance to tell it.
    cluster.nodes[lagging].freeze();
    let created = create(&mut clients[follower], "made while a follower sleeps", "Hold").await;
    cluster.nodes[lagging].thaw();
    let through = format!("node {} (just resumed)", cluster.nodes[lagging].id);
    find_everywhere_at_once(&mut clients[lagging], &created.id, &through).await;
    let stopped = stop(&mut clients[lagging], &created.id, &through).await;
    assert_eq!(status_of(&stopped), v1::AgentStatus::Stopped);

    // Created through each node in turn, used at once through each of the others.
    for creator in 0..3 {
        // A follower's answer is rebuilt from the leader's, which leaves out the prompt the
        // follower sent: it must hold the prompt as sent, as the leader's own answer does.
        let prompt = format!("Hold, created through node {} with a prompt of its own", creator + 1);
        let agent = create(&mut clients[creator], &format!("made on node {}", creator + 1), &prompt).await;
        assert_eq!(
            agent.prompt,
            prompt,
            "the answer to a create through node {}",
            creator + 1
        );
        let read = get(&mut clients[leader], &agent.id)
            .await
            .expect("the leader holds the agent");
        assert_eq!(
            identity(&read),
            identity(&agent),
            "the created agent as the leader reads it"
        );
        for other in (0..3).filter(|other| *other != creator) {
            let through = format!("node {}", cluster.nodes[other].id);
            find_everywhere_at_once(&mut clients[other], &agent.id, &through).await;
        }
        let next = (creator + 1) % 3;
        stop(&mut clients[next], &agent.id, &format!("node {}", next + 1)).await;
    }

    // An id the cluster never acknowledged is NOT_FOUND through every node, for every call.
    // A well-formed ULID no create ever made (ids are made from the clock at creation).
    let unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string();
    for (index, client) in clients.iter_mut().enumerate() {
        let through = format!("node {}", index + 1);
        let codes = [
            (
                "get",
                client
                    .get_agent(v1::GetAgentRequest { id: unknown.clone() })
                    .await
                    .map(|_| ()),
            ),
            (
                "follow-up",
                client
                    .send_follow_up(v1::SendFollowUpRequest {
                        id: unknown.clone(),
                        text: "anyone there?".to_string(),
                    })
                    .await
                    .map(|_| ()),
            ),
            (
                "stop",
                client
                    .stop_agent(v1::StopAgentRequest {
                        id: unknown.clone(),
                        reason: String::new(),
                    })
                    .await
                    .map(|_| ()),
            ),
            (
                "watch",
                client
                    .watch_agent(v1::WatchAgentRequest {
                        id: unknown.clone(),
                        after_sequence: 0,
                    })
                    .await
                    .map(|_| ()),
            ),
        ];
        for (call, result) in codes {
            let status = result.expect_err(&format!("{call} of a never-created id through {through} must fail"));
            assert_eq!(
                status.code(),
                tonic::Code::NotFound,
                "{call} of a never-created id through {through}: {status}"
            );
            assert!(
                status.message().contains(&unknown),
                "the message names the id: {status}"
            );
        }
    }

    report_read_latency(&cluster, &token, &created.id, leader, follower).await;
}

/// Prints what a linearizable `GetAgent` costs: through the leader (a quorum round) and through
/// a follower (a call to the leader, then the quorum round), against `GetCluster`, which reads
/// the local replica only. A figure, not an assertion.
async fn report_read_latency(cluster: &TestCluster, token: &str, id: &str, leader: usize, follower: usize) {
    const CALLS: usize = 200;
    for (label, index) in [("leader", leader), ("follower", follower)] {
        let endpoint = cluster.nodes[index].endpoint();
        let mut agents = agent_client(&endpoint, token).await;
        let mut clusters = cluster_client(&endpoint, token).await;
        let mut get_agent = Vec::with_capacity(CALLS);
        let mut get_cluster = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let started = Instant::now();
            agents
                .get_agent(v1::GetAgentRequest { id: id.to_string() })
                .await
                .expect("get agent");
            get_agent.push(started.elapsed());
            let started = Instant::now();
            clusters
                .get_cluster(v1::GetClusterRequest {})
                .await
                .expect("get cluster");
            get_cluster.push(started.elapsed());
        }
        println!(
            "read latency through the {label}, {CALLS} calls: GetAgent (read index) {}; GetCluster (local) {}",
            percentiles(&mut get_agent),
            percentiles(&mut get_cluster)
        );
    }
}

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |fraction: f64| samples[((samples.len() - 1) as f64 * fraction) as usize];
    format!("p50 {:?} p90 {:?} p99 {:?}", at(0.5), at(0.9), at(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_a_quorum_answers_unavailable_within_a_bound() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let (leader, [follower, alone]) = leader_and_followers(&cluster, &token).await;
    let mut client = agent_client(&cluster.nodes[alone].endpoint(), &token).await;
    let agent = create(&mut client, "before the partition", "Hold").await;

    cluster.nodes[leader].freeze();
    cluster.nodes[follower].freeze();
    let started = Instant::now();
    let status = client
        .get_agent(v1::GetAgentRequest { id: agent.id.clone() })
        .await
        .expect_err("a node without a quorum cannot confirm what the cluster acknowledged");
    let waited = started.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(
        status.message().contains("read"),
        "the message says a read could not be confirmed: {status}"
    );
    assert!(
        waited < Duration::from_secs(15),
        "the read gave up after {waited:?}, beyond its bound"
    );
    let watch = client
        .watch_agent(v1::WatchAgentRequest {
            id: agent.id.clone(),
            after_sequence: 0,
        })
        .await
        .map(|_| ())
        .expect_err("a watch without a quorum fails");
    assert_eq!(watch.code(), tonic::Code::Unavailable, "{watch}");
    println!(
        "a node cut off from a quorum answered {:?} after {waited:?}: {}",
        status.code(),
        status.message()
    );
    cluster.nodes[leader].thaw();
    cluster.nodes[follower].thaw();
}
