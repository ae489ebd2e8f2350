//! One node: the agent API end to end, and every bad input refused without effect.

use flotilla_proto::v1::{self, watch_agent_response};
use flotilla_tests::{agent_client, wait_for, AgentClient, ClusterOptions, TestCluster};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{create, create_request, get, identity, status_of, wait_for_a_leader, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_list_page_and_search() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let mut client = agent_client(&cluster.nodes[0].endpoint(), &cluster.admin_token()).await;

    let created = create_seven_agents_one_with_a_needle(&mut client).await;
    check_created_agents_are_readable(&mut client, &created).await;
    check_listing_is_paged_newest_first(&mut client, &created).await;
    check_search_is_case_insensitive(&mut client, &created).await;
    wait_for_every_agent_running_on_node_1(&cluster).await;
    check_status_and_repository_filters(&mut client).await;
}

/// Creates `agent-0` to `agent-6`; only `agent-3`'s prompt holds the word NEEDLE.
async fn create_seven_agents_one_with_a_needle(client: &mut AgentClient) -> Vec<v1::Agent> {
    let mut created = Vec::new();
    for index in 0..7 {
        let prompt = if index == 3 {
            "Fix the flaky NEEDLE test in the parser".to_string()
        } else {
            format!("Refactor module number {index}")
        };
        created.push(create(client, &format!("agent-{index}"), &prompt).await);
    }
    created
}

async fn check_created_agents_are_readable(client: &mut AgentClient, created: &[v1::Agent]) {
    let first = &created[0];
    assert_eq!(first.id.len(), 26, "ids are ULIDs");
    assert_eq!(first.base_branch, "main");
    assert_eq!(first.model, "hold", "the default_model of the node config");
    assert!(first.scripted, "the hold model is scripted");
    assert!(first.work_branch.starts_with("flotilla/"), "{}", first.work_branch);
    assert!(first.work_branch.ends_with("-agent-0"), "{}", first.work_branch);

    for agent in created {
        let fetched = get(client, &agent.id).await.expect("created agent is readable");
        assert_eq!(identity(&fetched), identity(agent));
    }
}

/// Newest first, in pages of three, with opaque tokens.
async fn check_listing_is_paged_newest_first(client: &mut AgentClient, created: &[v1::Agent]) {
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let reply = client
            .list_agents(v1::ListAgentsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        pages += 1;
        assert!(reply.agents.len() <= 3);
        seen.extend(reply.agents.into_iter().map(|agent| agent.id));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
    }
    let mut expected: Vec<String> = created.iter().map(|agent| agent.id.clone()).collect();
    expected.reverse();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
}

/// Search is case-insensitive over name, prompt and summary.
async fn check_search_is_case_insensitive(client: &mut AgentClient, created: &[v1::Agent]) {
    let found = client
        .list_agents(v1::ListAgentsRequest {
            search: "needle".to_string(),
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner()
        .agents;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, created[3].id);
    let by_name = client
        .list_agents(v1::ListAgentsRequest {
            search: "AGENT-5".to_string(),
            ..Default::default()
        })
        .await
        .expect("search by name")
        .into_inner()
        .agents;
    assert_eq!(by_name.len(), 1);
    assert_eq!(by_name[0].id, created[5].id);
}

/// The scheduler places every agent on the only node, and its actor boots it a machine.
async fn wait_for_every_agent_running_on_node_1(cluster: &TestCluster) {
    let endpoint = cluster.nodes[0].endpoint();
    let token = cluster.admin_token();
    wait_for("all agents running on node 1", DEADLINE, || {
        let endpoint = endpoint.clone();
        let token = token.clone();
        async move {
            let mut client = agent_client(&endpoint, &token).await;
            let reply = client
                .list_agents(v1::ListAgentsRequest {
                    statuses: vec![v1::AgentStatus::Running as i32],
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let placed = reply
                .agents
                .iter()
                .filter(|agent| {
                    agent
                        .assignment
                        .as_ref()
                        .is_some_and(|a| a.node_id == 1 && a.epoch == 1)
                })
                .count();
            (placed == 7).then_some(())
        }
    })
    .await;
}

async fn check_status_and_repository_filters(client: &mut AgentClient) {
    let pending = client
        .list_agents(v1::ListAgentsRequest {
            statuses: vec![v1::AgentStatus::Pending as i32],
            ..Default::default()
        })
        .await
        .expect("status filter")
        .into_inner()
        .agents;
    assert!(pending.is_empty());
    let by_repo = client
        .list_agents(v1::ListAgentsRequest {
            repository: "https://other.example.test/x.git".to_string(),
            ..Default::default()
        })
        .await
        .expect("repository filter")
        .into_inner()
        .agents;
    assert!(by_repo.is_empty());
}

async fn next_event(stream: &mut tonic::Streaming<v1::WatchAgentResponse>) -> Option<v1::AgentEvent> {
    loop {
        let message = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("watch stream produced nothing before the deadline")?
            .expect("watch stream failed");
        match message.kind {
            Some(watch_agent_response::Kind::Event(event)) if !event.live => return Some(event),
            _ => continue,
        }
    }
}

fn status_change(event: &v1::AgentEvent) -> Option<v1::AgentStatus> {
    match &event.kind {
        Some(v1::agent_event::Kind::StatusChanged(change)) => v1::AgentStatus::try_from(change.to).ok(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_reconnect_without_gaps_or_duplicates() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let mut client = agent_client(&cluster.nodes[0].endpoint(), &cluster.admin_token()).await;
    let agent = create(&mut client, "watched", "Watch me work").await;

    let mut stream = client
        .watch_agent(v1::WatchAgentRequest {
            id: agent.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("a first message").expect("no error");
    match first.kind {
        Some(watch_agent_response::Kind::Snapshot(agent_record)) => assert_eq!(agent_record.id, agent.id),
        other => panic!("the first message must be the agent record, found {other:?}"),
    }
    let mut sequences = Vec::new();
    loop {
        let event = next_event(&mut stream).await.expect("stream open");
        sequences.push(event.sequence);
        if status_change(&event) == Some(v1::AgentStatus::Running) {
            break;
        }
    }
    assert_eq!(
        sequences,
        (1..=sequences.len() as u64).collect::<Vec<_>>(),
        "no gaps from 1"
    );
    let last_seen = *sequences.last().expect("events seen");
    drop(stream);

    // Events happen while nobody watches.
    let reply = crate::common::follow_up(&mut client, &agent.id, "Also update the changelog").await;
    assert_eq!(reply.index, 1);
    client
        .stop_agent(v1::StopAgentRequest {
            id: agent.id.clone(),
            reason: "enough".to_string(),
        })
        .await
        .expect("stop");

    let mut resumed = client
        .watch_agent(v1::WatchAgentRequest {
            id: agent.id.clone(),
            after_sequence: last_seen,
        })
        .await
        .expect("watch again")
        .into_inner();
    let first_message = resumed.next().await.expect("agent record").expect("no error");
    assert!(matches!(
        first_message.kind,
        Some(watch_agent_response::Kind::Snapshot(_))
    ));
    let mut after = Vec::new();
    while let Some(event) = next_event(&mut resumed).await {
        after.push(event);
    }
    let resumed_sequences: Vec<u64> = after.iter().map(|event| event.sequence).collect();
    assert_eq!(
        resumed_sequences,
        vec![last_seen + 1, last_seen + 2],
        "exactly the missed events"
    );
    assert!(matches!(
        after[0].kind,
        Some(v1::agent_event::Kind::FollowUpAccepted(ref accepted)) if accepted.index == 1
    ));
    assert_eq!(status_change(&after[1]), Some(v1::AgentStatus::Stopped));

    let stopped = get(&mut client, &agent.id).await.expect("readable");
    assert_eq!(status_of(&stopped), v1::AgentStatus::Stopped);
    assert_eq!(stopped.last_sequence, last_seen + 2);
    // The stopped agent's actor is gone: the node reports no slot in use.
    let mut cluster_client = flotilla_tests::cluster_client(&cluster.nodes[0].endpoint(), &cluster.admin_token()).await;
    wait_for("the stopped agent's slot to be freed", DEADLINE, || {
        let mut cluster_client = cluster_client.clone();
        async move {
            let reply = cluster_client
                .get_cluster(v1::GetClusterRequest {})
                .await
                .ok()?
                .into_inner();
            (reply.members[0].slots_in_use == 0).then_some(())
        }
    })
    .await;
    let _ = cluster_client.get_cluster(v1::GetClusterRequest {}).await;
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, String) {
    let status = result.expect_err("the call must fail");
    (status.code(), status.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_precise_status_and_changes_nothing() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let mut client = agent_client(&endpoint, &cluster.admin_token()).await;
    let stopped = create(&mut client, "to-stop", "Stop me").await;
    client
        .stop_agent(v1::StopAgentRequest {
            id: stopped.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("stop");
    let count_before = client
        .list_agents(v1::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .agents
        .len();

    check_bad_create_requests_are_refused(&mut client).await;
    check_unknown_and_malformed_ids_are_refused(&mut client, &stopped).await;
    check_bad_list_requests_are_refused(&mut client).await;
    check_changes_to_a_stopped_agent_are_refused(&mut client, &stopped).await;
    check_missing_and_wrong_tokens_are_unauthenticated(&endpoint).await;
    check_refused_requests_changed_nothing(&mut client, &stopped, count_before).await;
}

async fn check_bad_create_requests_are_refused(client: &mut AgentClient) {
    let cases: Vec<(&str, v1::CreateAgentRequest, Code, &str)> = vec![
        (
            "empty prompt",
            create_request("x", "   "),
            Code::InvalidArgument,
            "prompt",
        ),
        (
            "oversized prompt",
            create_request("x", &"p".repeat(256 * 1024 + 1)),
            Code::InvalidArgument,
            "prompt: at most 262144 bytes",
        ),
        (
            "malformed repository",
            v1::CreateAgentRequest {
                repository: "not a url".to_string(),
                ..create_request("x", "go")
            },
            Code::InvalidArgument,
            "repository",
        ),
        (
            "unsupported scheme",
            v1::CreateAgentRequest {
                repository: "ftp://host/repo.git".to_string(),
                ..create_request("x", "go")
            },
            Code::InvalidArgument,
            "scheme",
        ),
        (
            "invalid region",
            v1::CreateAgentRequest {
                region: "EU West".to_string(),
                ..create_request("x", "go")
            },
            Code::InvalidArgument,
            "region",
        ),
        (
            "region with no node",
            v1::CreateAgentRequest {
                region: "mars-1".to_string(),
                ..create_request("x", "go")
            },
            Code::FailedPrecondition,
            "mars-1",
        ),
        (
            "bad base branch",
            v1::CreateAgentRequest {
                base_branch: "feature..x".to_string(),
                ..create_request("x", "go")
            },
            Code::InvalidArgument,
            "base_branch",
        ),
    ];
    for (what, request, expected, fragment) in cases {
        let (found, message) = code(client.create_agent(request).await);
        assert_eq!(found, expected, "{what}: {message}");
        assert!(
            message.contains(fragment),
            "{what}: {message:?} should mention {fragment:?}"
        );
    }
}

async fn check_unknown_and_malformed_ids_are_refused(client: &mut AgentClient, stopped: &v1::Agent) {
    let unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let (found, message) = code(
        client
            .get_agent(v1::GetAgentRequest {
                id: unknown.to_string(),
            })
            .await,
    );
    assert_eq!(found, Code::NotFound, "{message}");
    assert!(message.contains(unknown));
    let (found, _) = code(client.get_agent(v1::GetAgentRequest { id: "nope".to_string() }).await);
    assert_eq!(found, Code::InvalidArgument);
    let (found, _) = code(
        client
            .stop_agent(v1::StopAgentRequest {
                id: unknown.to_string(),
                reason: String::new(),
            })
            .await,
    );
    assert_eq!(found, Code::NotFound);
    let (found, _) = code(
        client
            .watch_agent(v1::WatchAgentRequest {
                id: unknown.to_string(),
                after_sequence: 0,
            })
            .await,
    );
    assert_eq!(found, Code::NotFound);
    let (found, _) = code(
        client
            .watch_agent(v1::WatchAgentRequest {
                id: stopped.id.clone(),
                after_sequence: 10_000,
            })
            .await,
    );
    assert_eq!(found, Code::OutOfRange);
}

async fn check_bad_list_requests_are_refused(client: &mut AgentClient) {
    for (page_size, page_token) in [(-1, ""), (1_000_000, ""), (10, "garbage!!"), (10, "AAAA")] {
        let (found, message) = code(
            client
                .list_agents(v1::ListAgentsRequest {
                    page_size,
                    page_token: page_token.to_string(),
                    ..Default::default()
                })
                .await,
        );
        assert_eq!(
            found,
            Code::InvalidArgument,
            "page_size {page_size} token {page_token:?}: {message}"
        );
    }
    let (found, _) = code(
        client
            .list_agents(v1::ListAgentsRequest {
                statuses: vec![42],
                ..Default::default()
            })
            .await,
    );
    assert_eq!(found, Code::InvalidArgument);
}

async fn check_changes_to_a_stopped_agent_are_refused(client: &mut AgentClient, stopped: &v1::Agent) {
    let (found, message) = code(
        client
            .send_follow_up(v1::SendFollowUpRequest {
                id: stopped.id.clone(),
                text: "more".to_string(),
            })
            .await,
    );
    assert_eq!(found, Code::FailedPrecondition, "{message}");
    assert!(message.contains("stopped"), "{message}");
    let (found, _) = code(
        client
            .send_follow_up(v1::SendFollowUpRequest {
                id: stopped.id.clone(),
                text: String::new(),
            })
            .await,
    );
    assert_eq!(found, Code::InvalidArgument);
    let (found, _) = code(
        client
            .stop_agent(v1::StopAgentRequest {
                id: stopped.id.clone(),
                reason: String::new(),
            })
            .await,
    );
    assert_eq!(found, Code::FailedPrecondition);
}

async fn check_missing_and_wrong_tokens_are_unauthenticated(endpoint: &str) {
    let mut anonymous = v1::agent_service_client::AgentServiceClient::new(flotilla_tests::channel(endpoint));
    let (found, _) = code(anonymous.list_agents(v1::ListAgentsRequest::default()).await);
    assert_eq!(found, Code::Unauthenticated);
    let mut wrong = agent_client(endpoint, "flt_not_a_real_token").await;
    let (found, _) = code(wrong.list_agents(v1::ListAgentsRequest::default()).await);
    assert_eq!(found, Code::Unauthenticated);
}

async fn check_refused_requests_changed_nothing(client: &mut AgentClient, stopped: &v1::Agent, count_before: usize) {
    let count_after = client
        .list_agents(v1::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(count_after.len(), count_before, "refused requests created nothing");
    assert_eq!(
        status_of(get(client, &stopped.id).await.as_ref().expect("still there")),
        v1::AgentStatus::Stopped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_a_data_dir_in_use_is_refused() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let node = &cluster.nodes[0];
    let output = std::process::Command::new(flotilla_tests::flotilla_bin())
        .args(["node", "--data-dir"])
        .arg(&node.data_dir)
        .args(["--listen", &format!("127.0.0.1:{}", flotilla_tests::free_port())])
        .output()
        .expect("run flotilla");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is in use by another flotilla process"), "{stderr}");
    // The running node is unaffected.
    let mut client = agent_client(&node.endpoint(), &cluster.admin_token()).await;
    client
        .list_agents(v1::ListAgentsRequest::default())
        .await
        .expect("still serving");
}

/// A node killed with SIGKILL just after acknowledging creates holds every one of them, as
/// acknowledged, once it runs again. The state's records are written without RocksDB's own log,
/// so the kill takes the ones not yet flushed to a table with it: the start re-applies them from
/// the Raft log, which had each of them synced before its create was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_after_acknowledging_creates_holds_them_all_when_started_again() {
    // No slots: the agents stay queued, and no machine outlives the kill holding the data dir.
    let options = ClusterOptions {
        slots: 0,
        ..Default::default()
    };
    let mut cluster = TestCluster::start(1, options).await;
    let (endpoint, token) = (cluster.nodes[0].endpoint(), cluster.admin_token());
    let mut client = agent_client(&endpoint, &token).await;
    let mut acknowledged = Vec::new();
    for index in 0..30 {
        acknowledged.push(
            create(
                &mut client,
                &format!("kept-{index}"),
                &format!("Survive a kill, {index}"),
            )
            .await,
        );
    }

    cluster.nodes[0].kill9();
    cluster.nodes[0].restart();
    wait_for_a_leader("the restarted node to lead again", &endpoint, &token).await;
    let mut client = agent_client(&endpoint, &token).await;
    for agent in &acknowledged {
        let read = get(&mut client, &agent.id).await.unwrap_or_else(|| {
            panic!(
                "{} ({}) was acknowledged and is gone after the kill",
                agent.id, agent.name
            )
        });
        assert_eq!(
            (read.name.as_str(), read.prompt.as_str()),
            (agent.name.as_str(), agent.prompt.as_str())
        );
    }
}
