//! Tests of what an owner records of its run: turns, pushes and pull requests.

use super::*;

#[test]
fn the_owner_records_a_turn_with_its_checkpoint_and_events() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    follow_up(&mut state, id, "also the docs");
    let sequence_before = state.agents[&id].last_sequence;
    let events = vec![
        EventKind::AssistantMessage {
            turn: 1,
            text: "Pushing.".into(),
        },
        EventKind::ToolCallFinished {
            call_id: "call_1_1".into(),
            tool: "run_command".into(),
            arguments: r#"{"command":"git push"}"#.into(),
            output: "ok".into(),
            truncated: false,
            failed: false,
            duration_ms: 12,
        },
        EventKind::CommitPushed {
            branch: "flotilla/a".into(),
            commit: "abc123".into(),
        },
        EventKind::TurnFinished {
            turn: 1,
            input_tokens: 10,
            output_tokens: 5,
            tool_calls: 1,
            model_ms: 3,
            tools_ms: 12,
        },
    ];
    let command = TurnFields {
        head_commit: Some("abc123".into()),
        events: events.clone(),
        ..turn_fields(id, 1, 1)
    }
    .command();
    let mut changes = Changes::default();
    assert_eq!(apply(&mut state, &mut changes, &request(command)), Ok(Response::Done));

    let agent = &state.agents[&id];
    assert_eq!(agent.turns, 1);
    assert_eq!(agent.follow_ups_delivered, 1);
    assert_eq!(agent.pending_follow_ups(), 0);
    assert_eq!(agent.head_commit.as_deref(), Some("abc123"));
    assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
    assert!(agent.scripted);
    assert_eq!(agent.status, AgentStatus::Running);
    assert_eq!(
        state.checkpoints[&id],
        Checkpoint {
            turn: 1,
            at_ms: 1_000,
            head_commit: Some("abc123".into()),
            data: b"conversation after turn 1".to_vec(),
        }
    );
    assert!(
        changes.checkpoints.contains(&id),
        "the store is told to persist the checkpoint"
    );
    assert!(changes.agents.contains(&id));

    let recorded = state.events_after(id, sequence_before);
    let kinds: Vec<EventKind> = recorded.iter().map(|event| event.kind.clone()).collect();
    assert_eq!(kinds, events, "events are appended in the order given");
    let sequences: Vec<u64> = recorded.iter().map(|event| event.sequence).collect();
    let expected: Vec<u64> = (sequence_before + 1..=sequence_before + 4).collect();
    assert_eq!(sequences, expected, "consecutive sequence numbers");
    assert!(recorded.iter().all(|event| event.node == Some(1)));
    assert_eq!(state.agents[&id].last_sequence, sequence_before + 4);
    assert_eq!(changes.new_events, recorded);

    // The next turn replaces the checkpoint; a turn without a head commit keeps the agent's.
    run(&mut state, turn(id, 2, 1)).unwrap();
    let agent = &state.agents[&id];
    assert_eq!(agent.turns, 2);
    assert_eq!(agent.head_commit.as_deref(), Some("abc123"));
    assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
    assert_eq!(state.checkpoints[&id].turn, 2);
    assert_eq!(state.checkpoints[&id].data, b"conversation after turn 2".to_vec());
}

#[test]
fn a_turn_from_anyone_but_the_running_owner_is_refused() {
    let mut state = with_nodes(2);
    let id = running(&mut state, "a", 1);
    let before = state.clone();
    for (node, epoch) in [(2, 1), (1, 2), (1, 0)] {
        let command = TurnFields {
            node,
            epoch,
            ..turn_fields(id, 1, 0)
        }
        .command();
        assert!(
            matches!(run(&mut state, command), Err(ApplyError::Fenced { .. })),
            "node {node} under epoch {epoch}"
        );
    }
    assert_eq!(state, before, "a fenced turn changes nothing");

    let unknown = AgentId::new();
    assert_eq!(
        run(&mut state, turn(unknown, 1, 0)),
        Err(ApplyError::AgentNotFound(unknown))
    );

    // Assigned but not yet running.
    let waiting = create(&mut state, "b");
    assign(&mut state, waiting, 1, 1);
    assert!(matches!(
        run(&mut state, turn(waiting, 1, 0)),
        Err(ApplyError::InvalidState {
            status: AgentStatus::Pending,
            ..
        })
    ));

    // Stopped while its turn ran: the owner's late turn is refused.
    stop(&mut state, id);
    let before = state.clone();
    assert!(matches!(
        run(&mut state, turn(id, 1, 0)),
        Err(ApplyError::InvalidState {
            status: AgentStatus::Stopped,
            ..
        })
    ));
    assert_eq!(state, before);
}

#[test]
fn turns_are_recorded_exactly_once_and_in_order() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    assert_eq!(
        run(&mut state, turn(id, 2, 0)),
        Err(ApplyError::TurnOutOfOrder {
            agent: id,
            recorded: 0,
            found: 2
        })
    );
    assert_eq!(
        run(&mut state, turn(id, 0, 0)),
        Err(ApplyError::TurnOutOfOrder {
            agent: id,
            recorded: 0,
            found: 0
        })
    );
    run(&mut state, turn(id, 1, 0)).unwrap();

    // The same turn again (a retried proposal, or a node resuming from an older checkpoint)
    // must not append its events twice or move the checkpoint back.
    let before = state.clone();
    let replay = TurnFields {
        head_commit: Some("older".into()),
        checkpoint: b"an older conversation".to_vec(),
        events: vec![EventKind::Log { text: "again".into() }],
        ..turn_fields(id, 1, 0)
    }
    .command();
    let mut changes = Changes::default();
    assert_eq!(
        apply(&mut state, &mut changes, &request(replay)),
        Err(ApplyError::TurnOutOfOrder {
            agent: id,
            recorded: 1,
            found: 1
        })
    );
    assert_eq!(state, before, "a replayed turn changes nothing");
    assert!(changes.new_events.is_empty() && changes.checkpoints.is_empty());
    assert!(matches!(
        run(&mut state, turn(id, 3, 0)),
        Err(ApplyError::TurnOutOfOrder { recorded: 1, .. })
    ));
    run(&mut state, turn(id, 2, 0)).unwrap();
    assert_eq!(state.agents[&id].turns, 2);
}

#[test]
fn delivered_follow_ups_only_move_forward_within_those_that_exist() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    follow_up(&mut state, id, "first");
    let before = state.clone();
    assert!(matches!(run(&mut state, turn(id, 1, 2)), Err(ApplyError::Invalid(_))));
    assert_eq!(state, before);
    run(&mut state, turn(id, 1, 1)).unwrap();
    follow_up(&mut state, id, "second");
    let before = state.clone();
    let backwards = run(&mut state, turn(id, 2, 0));
    assert!(
        matches!(&backwards, Err(ApplyError::Invalid(message)) if message.contains("1 were before")),
        "{backwards:?}"
    );
    assert_eq!(state, before);
    // A turn may take in nothing new: the second follow-up waits for the next one.
    run(&mut state, turn(id, 2, 1)).unwrap();
    assert_eq!(state.agents[&id].pending_follow_ups(), 1);
    run(&mut state, turn(id, 3, 2)).unwrap();
    assert_eq!(state.agents[&id].pending_follow_ups(), 0);
}

#[test]
fn oversized_turns_are_refused_and_the_limits_themselves_accepted() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    let before = state.clone();
    let big_checkpoint = TurnFields {
        checkpoint: vec![7; MAX_CHECKPOINT_BYTES + 1],
        ..turn_fields(id, 1, 0)
    }
    .command();
    assert_eq!(
        run(&mut state, big_checkpoint),
        Err(ApplyError::TooLarge {
            what: "checkpoint".into(),
            found: MAX_CHECKPOINT_BYTES + 1,
            limit: MAX_CHECKPOINT_BYTES
        })
    );
    let log = |count: usize| -> Vec<EventKind> {
        (0..count)
            .map(|number| EventKind::Log {
                text: format!("line {number}"),
            })
            .collect()
    };
    let many_events = TurnFields {
        events: log(MAX_EVENTS_PER_TURN + 1),
        ..turn_fields(id, 1, 0)
    }
    .command();
    assert!(matches!(
        run(&mut state, many_events),
        Err(ApplyError::TooLarge { found, limit: MAX_EVENTS_PER_TURN, .. }) if found == MAX_EVENTS_PER_TURN + 1
    ));
    assert_eq!(state, before, "an oversized turn changes nothing");

    let at_the_limits = TurnFields {
        checkpoint: vec![7; MAX_CHECKPOINT_BYTES],
        events: log(MAX_EVENTS_PER_TURN),
        ..turn_fields(id, 1, 0)
    }
    .command();
    run(&mut state, at_the_limits).unwrap();
    assert_eq!(state.checkpoints[&id].data.len(), MAX_CHECKPOINT_BYTES);
    assert_eq!(
        state.agents[&id].last_sequence,
        before.agents[&id].last_sequence + MAX_EVENTS_PER_TURN as u64
    );
}

#[test]
fn a_successful_push_records_the_pushed_commit() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    let sequence_before = state.agents[&id].last_sequence;
    let mut changes = Changes::default();
    let result = apply(&mut state, &mut changes, &request(push(id, 1, 1, "abc123", None)));
    assert_eq!(result, Ok(Response::Done));
    let agent = &state.agents[&id];
    assert_eq!(agent.head_commit.as_deref(), Some("abc123"));
    assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
    assert_eq!(
        event_kinds_after(&state, id, sequence_before),
        vec![EventKind::CommitPushed {
            branch: "flotilla/a".into(),
            commit: "abc123".into()
        }]
    );
    assert!(changes.agents.contains(&id));
    assert_eq!(changes.new_events.len(), 1);
}

#[test]
fn a_failed_push_is_an_event_and_keeps_the_last_pushed_commit() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    run(&mut state, push(id, 1, 1, "abc123", None)).unwrap();
    let sequence_before = state.agents[&id].last_sequence;
    run(&mut state, push(id, 1, 1, "def456", Some("remote rejected"))).unwrap();
    let agent = &state.agents[&id];
    assert_eq!(agent.pushed_commit.as_deref(), Some("abc123"));
    assert_eq!(
        event_kinds_after(&state, id, sequence_before),
        vec![EventKind::PushFailed {
            branch: "flotilla/a".into(),
            commit: "def456".into(),
            error: "remote rejected".into()
        }]
    );
}

#[test]
fn a_push_is_recorded_after_a_stop_but_fenced_for_another_epoch() {
    let mut state = with_nodes(2);
    let id = running(&mut state, "a", 1);
    stop(&mut state, id);
    // The owner pushes what it had before it wound down.
    run(&mut state, push(id, 1, 1, "abc123", None)).unwrap();
    assert_eq!(state.agents[&id].status, AgentStatus::Stopped);
    assert_eq!(state.agents[&id].pushed_commit.as_deref(), Some("abc123"));
    let before = state.clone();
    assert!(matches!(
        run(&mut state, push(id, 1, 2, "def456", None)),
        Err(ApplyError::Fenced { .. })
    ));
    assert!(matches!(
        run(&mut state, push(id, 2, 1, "def456", None)),
        Err(ApplyError::Fenced { .. })
    ));
    assert_eq!(state, before);

    // After a failover the old owner's push under epoch 1 is refused.
    let moved = running(&mut state, "b", 1);
    run(&mut state, Command::NodeDown { node: 1 }).unwrap();
    assert_eq!(assign(&mut state, moved, 2, 2), vec![moved]);
    let before = state.clone();
    assert!(matches!(
        run(&mut state, push(moved, 1, 1, "stale", None)),
        Err(ApplyError::Fenced { .. })
    ));
    assert_eq!(state, before);
    run(&mut state, push(moved, 2, 2, "fresh", None)).unwrap();
    assert_eq!(state.agents[&moved].pushed_commit.as_deref(), Some("fresh"));
}

#[test]
fn the_owner_records_a_pull_request_or_why_it_could_not_open_one() {
    let mut state = with_nodes(2);
    let id = running(&mut state, "a", 1);
    let record = |node: NodeId, epoch: u64, pull_request: Option<PullRequestRef>, error: Option<&str>| {
        Command::RecordPullRequest {
            agent: id,
            node,
            epoch: Epoch(epoch),
            provider: "github".into(),
            pull_request,
            error: error.map(str::to_string),
        }
    };
    let opened = PullRequestRef {
        url: "https://github.com/acme/widgets/pull/7".into(),
        number: 7,
    };
    let before = state.clone();
    assert!(matches!(
        run(&mut state, record(2, 1, Some(opened.clone()), None)),
        Err(ApplyError::Fenced { .. })
    ));
    assert!(matches!(
        run(&mut state, record(1, 1, Some(opened.clone()), Some("both"))),
        Err(ApplyError::Invalid(_))
    ));
    assert_eq!(state, before);

    let sequence_before = state.agents[&id].last_sequence;
    run(&mut state, record(1, 1, None, Some("422 Validation Failed"))).unwrap();
    assert_eq!(state.agents[&id].pull_request, None);
    run(&mut state, record(1, 1, Some(opened.clone()), None)).unwrap();
    assert_eq!(state.agents[&id].pull_request, Some(opened));
    assert_eq!(
        event_kinds_after(&state, id, sequence_before),
        vec![
            EventKind::PullRequestFailed {
                provider: "github".into(),
                error: "422 Validation Failed".into()
            },
            EventKind::PullRequestOpened {
                url: "https://github.com/acme/widgets/pull/7".into(),
                number: 7,
                provider: "github".into()
            }
        ]
    );
}
