//! Tests of the node commands.

use super::*;

#[test]
fn node_down_requeues_its_agents_and_the_next_epoch_is_higher() {
    let mut state = with_nodes(2);
    let id = create(&mut state, "a");
    assign(&mut state, id, 1, 1);
    let requeued = run(&mut state, Command::NodeDown { node: 1 }).unwrap();
    assert_eq!(requeued, Response::Requeued(vec![id]));
    assert_eq!(state.agents[&id].status, AgentStatus::Pending);
    assert!(state.pending.contains(&id));
    assert!(!state.nodes[&1].up);
    assert!(assign(&mut state, id, 1, 2).is_empty(), "a down node takes nothing");
    assert_eq!(assign(&mut state, id, 2, 2), vec![id]);
    // The old owner's writes under epoch 1 are refused.
    let stale = run(
        &mut state,
        Command::SetAgentStatus {
            agent: id,
            node: 1,
            epoch: Epoch(1),
            status: AgentStatus::Running,
            reason: "stale".into(),
            summary: None,
            error: None,
        },
    );
    assert!(matches!(stale, Err(ApplyError::Fenced { .. })));
}

#[test]
fn reserved_node_ids_are_unique() {
    let mut state = with_nodes(2);
    assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(3)));
    assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(4)));
    run(
        &mut state,
        Command::RegisterNode {
            node: 9,
            info: NodeInfo::default(),
        },
    )
    .unwrap();
    assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(10)));
}

/// Applies `command` as an entry appended in `entry_term` and checks the invariants after.
fn run_in_term(state: &mut ClusterState, entry_term: u64, command: Command) -> ApplyResult {
    let result = super::super::apply_in_term(state, &mut Changes::default(), Term(entry_term), &request(command));
    if let Err(violation) = check_invariants(state) {
        panic!("after {result:?}: {violation}");
    }
    result
}

#[test]
fn a_node_down_judged_in_the_entry_term_requeues_the_agents() {
    let mut state = with_nodes(2);
    let id = running(&mut state, "a", 1);
    let result = run_in_term(&mut state, 4, Command::NodeDownInTerm { node: 1, term: Term(4) });
    assert_eq!(result, Ok(Response::Requeued(vec![id])));
    assert!(!state.nodes[&1].up);
    assert_eq!(state.agents[&id].status, AgentStatus::Pending);
    let result = run_in_term(&mut state, 5, Command::NodeUpInTerm { node: 1, term: Term(5) });
    assert!(matches!(result, Ok(Response::Node(record)) if record.up));
}

#[test]
fn a_node_down_judged_in_an_earlier_term_is_refused_without_change() {
    // The leader of term 4 judged node 1 down; the entry reached the log only once the leader
    // of term 5 appended it (handed on by the deposed leader): the judgement no longer holds.
    let mut state = with_nodes(2);
    let id = running(&mut state, "a", 1);
    let before = state.clone();
    let result = run_in_term(&mut state, 5, Command::NodeDownInTerm { node: 1, term: Term(4) });
    assert_eq!(
        result,
        Err(ApplyError::StaleTerm {
            command: "node-down-in-term".to_string(),
            node: 1,
            judged: Term(4),
            entry: Term(5),
        })
    );
    assert_eq!(state, before, "a refused node-down changes nothing");
    assert_eq!(state.agents[&id].assignment.map(|assignment| assignment.node), Some(1));
    let message = result.unwrap_err().to_string();
    assert!(message.contains("term 4") && message.contains("term 5"), "{message}");
}

#[test]
fn judgements_outside_their_term_are_refused_both_ways() {
    let mut state = with_nodes(2);
    run_in_term(&mut state, 3, Command::NodeDownInTerm { node: 2, term: Term(3) }).unwrap();
    let before = state.clone();
    // A node-up from a deposed leader, and any judgement naming a term the log has not reached.
    for (entry, judged) in [(4, 3), (3, 4)] {
        let result = run_in_term(
            &mut state,
            entry,
            Command::NodeUpInTerm {
                node: 2,
                term: Term(judged),
            },
        );
        assert!(matches!(result, Err(ApplyError::StaleTerm { .. })), "{result:?}");
        let result = run_in_term(
            &mut state,
            entry,
            Command::NodeDownInTerm {
                node: 1,
                term: Term(judged),
            },
        );
        assert!(matches!(result, Err(ApplyError::StaleTerm { .. })), "{result:?}");
    }
    assert_eq!(state, before);
    // Outside any log (`apply`), only the term before any election holds.
    assert!(matches!(
        run(&mut state, Command::NodeDownInTerm { node: 1, term: Term(3) }),
        Err(ApplyError::StaleTerm { .. })
    ));
}

#[test]
fn a_stale_judgement_in_a_batch_is_refused_on_its_own() {
    let mut state = with_nodes(3);
    let result = run_in_term(
        &mut state,
        7,
        Command::Batch {
            commands: vec![
                Command::NodeDownInTerm { node: 1, term: Term(6) },
                Command::NodeDownInTerm { node: 2, term: Term(7) },
            ],
        },
    );
    let Ok(Response::Batch(results)) = result else {
        panic!("a batch answers per command: {result:?}");
    };
    assert!(matches!(results[0], Err(ApplyError::StaleTerm { .. })));
    assert!(results[1].is_ok());
    assert!(state.nodes[&1].up);
    assert!(!state.nodes[&2].up);
}

#[test]
fn a_stopping_node_hands_its_agents_back_and_takes_none_until_it_registers() {
    let mut state = with_nodes(2);
    let id = running(&mut state, "a", 1);
    let result = run(&mut state, Command::NodeStopping { node: 1 });
    assert_eq!(result, Ok(Response::Requeued(vec![id])));
    assert!(state.nodes[&1].stopping && state.nodes[&1].up, "stopping, still up");
    assert_eq!(state.agents[&id].status, AgentStatus::Pending);
    assert!(matches!(
        event_kinds_after(&state, id, 0).last(),
        Some(EventKind::StatusChanged { reason, .. }) if reason == "node 1 stopping"
    ));
    // Not placed on the stopping node, even when it reports up; taken over by another.
    assert!(assign(&mut state, id, 1, 2).is_empty(), "a stopping node takes nothing");
    run(&mut state, Command::NodeUp { node: 1 }).unwrap();
    assert!(state.nodes[&1].stopping, "reporting up does not clear the mark");
    assert_eq!(assign(&mut state, id, 2, 2), vec![id]);
    // The old owner's writes under epoch 1 are refused.
    let stale = run(&mut state, set_status(id, 1, 1, AgentStatus::Failed, None));
    assert!(matches!(stale, Err(ApplyError::Fenced { .. })));
    // Its next start registers it: it takes agents again.
    let info = state.nodes[&1].info.clone();
    run(&mut state, Command::RegisterNode { node: 1, info }).unwrap();
    assert!(!state.nodes[&1].stopping);
    let other = create(&mut state, "b");
    assert_eq!(assign(&mut state, other, 1, 1), vec![other]);
}

#[test]
fn a_stopping_mark_is_kept_apart_from_draining() {
    let mut state = with_nodes(2);
    run(
        &mut state,
        Command::SetDraining {
            node: 1,
            draining: true,
        },
    )
    .unwrap();
    run(&mut state, Command::NodeStopping { node: 1 }).unwrap();
    let info = state.nodes[&1].info.clone();
    run(&mut state, Command::RegisterNode { node: 1, info }).unwrap();
    assert!(state.nodes[&1].draining, "an admin's drain outlives a restart");
    assert!(!state.nodes[&1].stopping);
    assert_eq!(
        run(&mut state, Command::NodeStopping { node: 7 }),
        Err(ApplyError::NodeNotFound(7))
    );
}

#[test]
fn a_removed_node_stays_removed() {
    let mut state = with_nodes(3);
    run(&mut state, Command::RemoveNode { node: 3 }).unwrap();
    assert!(state.removed_nodes.contains(&3));
    let again = run(
        &mut state,
        Command::RegisterNode {
            node: 3,
            info: NodeInfo::default(),
        },
    );
    assert_eq!(again, Err(ApplyError::NodeRemoved(3)));
    assert!(!state.nodes.contains_key(&3));
    assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(4)));
}
