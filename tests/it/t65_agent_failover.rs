//! An agent whose node is killed with SIGKILL in the middle of a run finishes on another node,
//! from its last checkpoint and its last pushed commit, with a transcript that has no gap and
//! no turn applied twice (only the turn in flight is asked of the model again).

use std::time::Duration;

use flotilla_proto::v1::{self, agent_event};
use flotilla_tests::fakes::{FakeModelServer, FakeTurn};
use flotilla_tests::{agent_client, wait_for, ClusterOptions, TestCluster};
use serde_json::json;

use crate::common::{bare_repository, create_from, get, status_of, DEADLINE};
use crate::t18_agent_runs::{config_with, durable_events, openai_model, request, show, turns_finished};
use crate::t56_plugins_everywhere::wait_everywhere;
use crate::t57_provider_hot_add::{add_plugin, skiff_config, SkiffWorld};

const LEASE_MS: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_the_sigkill_of_its_node_with_a_continuous_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let url = bare_repository(dir.path(), "origin", &[("README.md", "a service\n")]);
    let model = FakeModelServer::start().await;
    model.set_script(vec![
        FakeTurn::tool_call("write_file", json!({"path": "a.txt", "content": "A\n"})),
        FakeTurn::tool_call("write_file", json!({"path": "b.txt", "content": "B\n"})),
        FakeTurn::tool_call("run_command", json!({"command": "cat a.txt b.txt"})),
        FakeTurn::text("a and b are written and read back."),
    ]);
    let mut cluster = TestCluster::start(
        3,
        ClusterOptions {
            lease_ms: Some(LEASE_MS),
            config: Some(config_with(&openai_model("gpt", &model, ""), "gpt")),
            ..Default::default()
        },
    )
    .await;
    let token = cluster.admin_token();
    // Hold the third model turn: by then two turns are checkpointed and pushed.
    let gate = model.hold_turn(2);
    let mut client = cluster.agent_client(1).await;
    let agent = create_from(&mut client, request(&url, "survivor", "Write a.txt and b.txt")).await;
    assert!(
        model.wait_for_turn_request(2, DEADLINE).await,
        "turn 3 was asked of the model"
    );
    let before = get(&mut client, &agent.id).await.expect("the agent");
    assert_eq!(before.turns, 2, "two turns are checkpointed");
    let owner = before.assignment.expect("assigned").node_id;
    let origin = std::path::PathBuf::from(url.strip_prefix("file://").unwrap());
    assert_eq!(show(&origin, &before.work_branch, "b.txt").as_deref(), Some("B\n"));

    cluster.node_mut(owner).kill9();
    // The held request dies with its node; the next owner asks again.
    gate.release();
    let survivor = if owner == 1 { 2 } else { 1 };
    let endpoint = cluster.node(survivor).endpoint();
    let finishing = wait_for("the agent to finish on another node", DEADLINE * 2, || {
        let (endpoint, token, id) = (endpoint.clone(), token.clone(), agent.id.clone());
        async move {
            let agent = get(&mut agent_client(&endpoint, &token).await, &id).await?;
            assert_ne!(status_of(&agent), v1::AgentStatus::Failed, "{}", agent.error);
            (status_of(&agent) == v1::AgentStatus::Finished).then_some(agent)
        }
    });
    let finished = match tokio::time::timeout(DEADLINE, finishing).await {
        Ok(finished) => finished,
        Err(_) => panic!(
            "the agent did not finish on another node within {DEADLINE:?}; the nodes' logs:\n{}",
            cluster.log_tails(60)
        ),
    };
    let assignment = finished.assignment.expect("assigned");
    assert_ne!(assignment.node_id, owner, "another node finished it");
    assert!(assignment.epoch > before.assignment.unwrap().epoch);
    assert_eq!(finished.turns, 4);
    assert_eq!(finished.summary, "a and b are written and read back.");

    // No turn was applied twice: every model turn but the one in flight was asked exactly once.
    assert_eq!(model.turn_request_count(0), 1);
    assert_eq!(model.turn_request_count(1), 1);
    assert!(model.turn_request_count(2) >= 1);
    assert_eq!(model.turn_request_count(3), 1);
    // The new node ran the command on the files the dead node had pushed.
    let last = model
        .requests()
        .into_iter()
        .rev()
        .find(|request| request.turn_index == Some(3))
        .expect("the last turn");
    assert!(last.body.to_string().contains("A\\nB"), "{}", last.body);

    let mut client = agent_client(&endpoint, &token).await;
    let events = tokio::time::timeout(Duration::from_secs(60), durable_events(&mut client, &agent.id))
        .await
        .expect("events");
    assert_eq!(
        turns_finished(&events),
        vec![1, 2, 3, 4],
        "one event per turn, no gap, no repeat"
    );
    let sequences: Vec<u64> = events.iter().map(|event| event.sequence).collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    let nodes_of_turns: Vec<u64> = events
        .iter()
        .filter(|event| matches!(event.kind, Some(agent_event::Kind::TurnFinished(_))))
        .map(|event| event.node_id)
        .collect();
    assert_eq!(nodes_of_turns[..2], [owner, owner]);
    assert_eq!(nodes_of_turns[2..], [assignment.node_id, assignment.node_id]);
    assert_eq!(
        show(&origin, &finished.work_branch, "a.txt").as_deref(),
        Some("A\n"),
        "the branch keeps the dead node's commits"
    );
}

/// The owner dies after the forge opened the agent's pull request but before the answer reached
/// it (the answer is held at the forge, then the node is SIGKILLed). The next owner finishes the
/// run from the recorded final answer without asking the model again, asks the forge again, is
/// told the pull request exists, finds it, and records that one: one pull request, recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_whose_answer_died_with_its_node_is_recorded_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let skiff = SkiffWorld::start(dir.path()).await;
    let (forge, origin, repository) = (&skiff.forge, &skiff.origin, &skiff.repository);
    let script = json!({"turns": [
        {"text": "Writing the note.", "tool_calls": [
            {"name": "write_file", "arguments": {"path": "NOTE.md", "content": "noted\n"}}
        ]},
        {"text": "Added NOTE.md."}
    ]});
    let mut cluster = TestCluster::start(
        3,
        ClusterOptions {
            lease_ms: Some(LEASE_MS),
            config: Some(skiff_config(dir.path(), script)),
            ..Default::default()
        },
    )
    .await;
    skiff.give_token_to(&cluster);
    skiff.configure(&cluster, 1);
    let file = dir.path().join("skiff.wasm");
    std::fs::write(&file, flotilla_tests::test_guest("skiff")).unwrap();
    add_plugin(&cluster, 1, &file, "1.0.0", &forge.host());
    wait_everywhere(&cluster, "skiff", "1.0.0", true).await;

    forge.hold_answers(true);
    let token = cluster.admin_token();
    let mut client = cluster.agent_client(1).await;
    let mut create = request(repository, "lost-answer", "Add the note");
    create.open_pull_request = true;
    let agent = create_from(&mut client, create).await;
    wait_for(
        "the forge to open the pull request and hold its answer",
        DEADLINE,
        || async { (forge.pending_answers() == 1).then_some(()) },
    )
    .await;
    let before = get(&mut client, &agent.id).await.expect("the agent");
    assert_eq!(before.turns, 2, "the final turn is recorded");
    let owner = before.assignment.expect("assigned").node_id;
    cluster.node_mut(owner).kill9();
    forge.hold_answers(false);

    let survivor = if owner == 1 { 2 } else { 1 };
    let endpoint = cluster.node(survivor).endpoint();
    let finished = wait_for("the agent to finish on another node", DEADLINE * 2, || {
        let (endpoint, token, id) = (endpoint.clone(), token.clone(), agent.id.clone());
        async move {
            let agent = get(&mut agent_client(&endpoint, &token).await, &id).await?;
            assert_ne!(status_of(&agent), v1::AgentStatus::Failed, "{}", agent.error);
            (status_of(&agent) == v1::AgentStatus::Finished).then_some(agent)
        }
    })
    .await;
    assert_ne!(finished.assignment.as_ref().expect("assigned").node_id, owner);
    assert_eq!(finished.turns, 2, "the model was not asked again");
    assert_eq!(finished.summary, "Added NOTE.md.");
    let opened = forge.pull_requests();
    assert_eq!(opened.len(), 1, "one pull request: {opened:?}");
    assert_eq!(opened[0].head, finished.work_branch);
    let recorded = finished.pull_request.clone().expect("the pull request is on the agent");
    assert_eq!((recorded.url.as_str(), recorded.number), (opened[0].url.as_str(), 1));
    assert_eq!(
        show(origin, &finished.work_branch, "NOTE.md").as_deref(),
        Some("noted\n")
    );
    let methods: Vec<String> = forge.requests().iter().map(|request| request.method.clone()).collect();
    assert_eq!(
        methods,
        ["POST", "POST", "GET"],
        "the dead owner's create, the next owner's refused create, and its lookup"
    );

    let mut client = agent_client(&endpoint, &token).await;
    let events = tokio::time::timeout(Duration::from_secs(60), durable_events(&mut client, &agent.id))
        .await
        .expect("events");
    assert_eq!(turns_finished(&events), vec![1, 2], "no turn after the final answer");
    let opened_events = events
        .iter()
        .filter(|event| matches!(event.kind, Some(agent_event::Kind::PullRequestOpened(_))))
        .count();
    assert_eq!(opened_events, 1, "the pull request is recorded once: {events:?}");
}
