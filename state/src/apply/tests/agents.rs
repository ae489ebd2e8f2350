//! Tests of the agent commands: create, status writes, stop and follow-ups.

use super::*;

#[test]
fn create_makes_a_pending_agent_with_a_first_event() {
    let mut state = with_nodes(1);
    let id = create(&mut state, "a");
    let agent = &state.agents[&id];
    assert_eq!(agent.status, AgentStatus::Pending);
    assert_eq!(agent.last_sequence, 1);
    assert!(state.pending.contains(&id));
    assert_eq!(state.events_after(id, 0).len(), 1);
    assert_eq!(
        run(
            &mut state,
            Command::CreateAgent {
                id,
                spec: spec("a").into()
            }
        ),
        Err(ApplyError::AgentExists(id))
    );
}

#[test]
fn status_writes_are_fenced_by_epoch_and_node() {
    let mut state = with_nodes(2);
    let id = create(&mut state, "a");
    assign(&mut state, id, 1, 1);
    let write = |node, epoch| Command::SetAgentStatus {
        agent: id,
        node,
        epoch: Epoch(epoch),
        status: AgentStatus::Provisioning,
        reason: "start".into(),
        summary: None,
        error: None,
    };
    let before = state.clone();
    assert!(matches!(run(&mut state, write(2, 1)), Err(ApplyError::Fenced { .. })));
    assert!(matches!(run(&mut state, write(1, 2)), Err(ApplyError::Fenced { .. })));
    assert_eq!(state, before, "a refused command changes nothing");
    run(&mut state, write(1, 1)).unwrap();
    assert_eq!(state.agents[&id].status, AgentStatus::Provisioning);
}

#[test]
fn stop_and_follow_up_rules() {
    let mut state = with_nodes(1);
    let id = create(&mut state, "a");
    match run(
        &mut state,
        Command::FollowUp {
            agent: id,
            text: "more".into(),
        },
    )
    .unwrap()
    {
        Response::FollowUp { index, agent } => {
            assert_eq!(index, 1);
            assert_eq!(agent.pending_follow_ups(), 1);
        }
        other => panic!("unexpected {other:?}"),
    }
    run(
        &mut state,
        Command::StopAgent {
            agent: id,
            reason: "user".into(),
        },
    )
    .unwrap();
    assert_eq!(state.agents[&id].status, AgentStatus::Stopped);
    assert!(!state.pending.contains(&id));
    assert!(matches!(
        run(
            &mut state,
            Command::FollowUp {
                agent: id,
                text: "x".into()
            }
        ),
        Err(ApplyError::InvalidState { .. })
    ));
    assert!(matches!(
        run(
            &mut state,
            Command::StopAgent {
                agent: id,
                reason: "again".into()
            }
        ),
        Err(ApplyError::InvalidState { .. })
    ));
}

#[test]
fn follow_up_to_a_finished_agent_starts_a_new_run() {
    let mut state = with_nodes(1);
    let id = create(&mut state, "a");
    assign(&mut state, id, 1, 1);
    run(
        &mut state,
        Command::SetAgentStatus {
            agent: id,
            node: 1,
            epoch: Epoch(1),
            status: AgentStatus::Finished,
            reason: "done".into(),
            summary: Some("did it".into()),
            error: None,
        },
    )
    .unwrap();
    run(
        &mut state,
        Command::FollowUp {
            agent: id,
            text: "and more".into(),
        },
    )
    .unwrap();
    let agent = &state.agents[&id];
    assert_eq!(agent.status, AgentStatus::Pending);
    assert!(agent.assignment.is_none());
    assert_eq!(agent.epoch, Epoch(1));
    assert!(state.pending.contains(&id));
}

#[test]
fn an_agent_finishes_only_after_taking_in_every_follow_up() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    run(&mut state, turn(id, 1, 0)).unwrap();
    // The follow-up arrives while the last turn runs, after its RecordTurn was proposed.
    follow_up(&mut state, id, "also the docs");
    let before = state.clone();
    assert_eq!(
        run(&mut state, set_status(id, 1, 1, AgentStatus::Finished, Some("did it"))),
        Err(ApplyError::UndeliveredFollowUps { agent: id, pending: 1 })
    );
    assert_eq!(state, before, "the refused finish changes nothing");
    assert_eq!(state.agents[&id].status, AgentStatus::Running);

    run(&mut state, turn(id, 2, 1)).unwrap();
    let sequence_before = state.agents[&id].last_sequence;
    run(
        &mut state,
        set_status(id, 1, 1, AgentStatus::Finished, Some("did it and the docs")),
    )
    .unwrap();
    let agent = &state.agents[&id];
    assert_eq!(agent.status, AgentStatus::Finished);
    assert_eq!(agent.summary.as_deref(), Some("did it and the docs"));
    assert_eq!(
        event_kinds_after(&state, id, sequence_before),
        vec![
            EventKind::Summary {
                text: "did it and the docs".into()
            },
            EventKind::StatusChanged {
                from: AgentStatus::Running,
                to: AgentStatus::Finished,
                assignment: Some(Assignment {
                    node: 1,
                    epoch: Epoch(1)
                }),
                reason: "to finished".into(),
            },
        ],
        "the summary comes before the status change"
    );
    assert!(state.active_on(1).next().is_none(), "a finished agent holds no slot");
}

#[test]
fn failing_or_stopping_does_not_wait_for_follow_ups_and_no_summary_means_no_summary_event() {
    let mut state = with_nodes(1);
    let failed = running(&mut state, "a", 1);
    follow_up(&mut state, failed, "never taken in");
    run(&mut state, set_status(failed, 1, 1, AgentStatus::Failed, None)).unwrap();
    assert_eq!(state.agents[&failed].status, AgentStatus::Failed);

    let stopped = running(&mut state, "b", 1);
    follow_up(&mut state, stopped, "never taken in either");
    stop(&mut state, stopped);
    assert_eq!(state.agents[&stopped].status, AgentStatus::Stopped);

    let finished = running(&mut state, "c", 1);
    let sequence_before = state.agents[&finished].last_sequence;
    run(&mut state, set_status(finished, 1, 1, AgentStatus::Finished, None)).unwrap();
    assert!(matches!(
        event_kinds_after(&state, finished, sequence_before).as_slice(),
        [EventKind::StatusChanged {
            to: AgentStatus::Finished,
            ..
        }]
    ));
}

#[test]
fn the_search_signature_is_kept_through_status_changes_and_takes_in_the_summary() {
    use crate::search::SearchSignature;
    let mut state = with_nodes(1);
    let id = create(&mut state, "signature");
    assert_eq!(
        state.search_signatures[&id].taken(),
        None,
        "applying a create hashes no prompt"
    );
    // A search takes the signature, which then stays through status changes.
    let searched = state.search_signatures[&id].of(&state.agents[&id]);
    assert_eq!(searched, SearchSignature::of_record(&state.agents[&id]));
    let needle = SearchSignature::of_needle("zebra crossing");
    assert!(!searched.may_contain(&needle), "the prompt alone has the needle's bits");
    assert_eq!(assign(&mut state, id, 1, 1), vec![id]);
    run(&mut state, set_status(id, 1, 1, AgentStatus::Running, None)).unwrap();
    assert_eq!(state.search_signatures[&id].taken(), Some(searched));
    // A summary empties the cell: the next search takes the summary in.
    run(
        &mut state,
        set_status(id, 1, 1, AgentStatus::Finished, Some("Zebra Crossing painted")),
    )
    .unwrap();
    let finished = state.search_signatures[&id].of(&state.agents[&id]);
    assert_eq!(finished, SearchSignature::of_record(&state.agents[&id]));
    assert!(finished.may_contain(&needle));
}

#[test]
fn a_rebuild_takes_every_signature() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "rebuilt", 1);
    assert_eq!(state.search_signatures[&id].taken(), None);
    state.rebuild_indexes();
    assert_eq!(
        state.search_signatures[&id].taken(),
        Some(crate::search::SearchSignature::of_record(&state.agents[&id]))
    );
}

#[test]
fn a_queued_agent_s_history_holds_room_for_its_one_event_only() {
    let mut state = with_nodes(1);
    let id = create(&mut state, "one event");
    assert_eq!(state.events[&id].len(), 1);
    assert_eq!(
        state.events[&id].capacity(),
        1,
        "a queue's first growth would hold room for four events"
    );
    assert_eq!(assign(&mut state, id, 1, 1), vec![id]);
    run(&mut state, set_status(id, 1, 1, AgentStatus::Running, None)).unwrap();
    let events = &state.events[&id];
    assert!(events.len() > 1 && events.capacity() >= events.len());
    assert_eq!(
        events.iter().map(|event| event.sequence).collect::<Vec<_>>(),
        (1..=events.len() as u64).collect::<Vec<_>>()
    );
}
