//! Tests of the record of an agent's work branch at the origin: which writes may move it
//! (`RecordTurn`, `RecordPush`, `RecordBranch` from the owner under its epoch), the displaced
//! commits reported, and a finished agent's record that never moves again.

use super::*;
use crate::apply::displaced_ref;
use crate::invariants::check_transition;

fn branch(
    agent: AgentId,
    node: NodeId,
    epoch: u64,
    recorded: Option<&str>,
    commit: Option<&str>,
    displaced: Option<&str>,
) -> Command {
    Command::RecordBranch {
        agent,
        node,
        epoch: Epoch(epoch),
        branch: "flotilla/a".into(),
        recorded: recorded.map(str::to_string),
        commit: commit.map(str::to_string),
        displaced: displaced.map(str::to_string),
    }
}

/// Applies `command` and checks both the state it leaves and the step it made.
fn step(state: &mut ClusterState, command: Command) -> ApplyResult {
    let before = state.clone();
    let result = run(state, command.clone());
    if let Err(violation) = check_transition(&before, &command, &result, state) {
        panic!("{} gave {result:?}: {violation}", command.name());
    }
    result
}

/// An agent running on node 1 under epoch 1 that pushed `abc`, then moved to node 2 under
/// epoch 2 (node 1 went down) and running there.
fn failed_over(state: &mut ClusterState) -> AgentId {
    let id = running(state, "a", 1);
    step(state, push(id, 1, 1, "abc", None)).unwrap();
    run(state, Command::NodeDown { node: 1 }).unwrap();
    assert_eq!(assign(state, id, 2, 2), vec![id]);
    step(state, set_status(id, 2, 2, AgentStatus::Running, None)).unwrap();
    id
}

#[test]
fn a_displaced_commit_is_reported_by_the_current_owner_and_refused_from_a_stale_one() {
    let mut state = with_nodes(2);
    let id = failed_over(&mut state);
    let before = state.clone();
    for (node, epoch) in [(1, 1), (2, 1), (1, 2)] {
        let result = step(
            &mut state,
            branch(id, node, epoch, Some("abc"), Some("abc"), Some("stale")),
        );
        assert!(
            matches!(result, Err(ApplyError::Fenced { .. })),
            "node {node} epoch {epoch}: {result:?}"
        );
    }
    assert!(matches!(
        step(&mut state, push(id, 1, 1, "stale", None)),
        Err(ApplyError::Fenced { .. })
    ));
    for (node, epoch) in [(1, 1), (2, 1)] {
        let check = Command::CheckOwner {
            agent: id,
            node,
            epoch: Epoch(epoch),
        };
        assert!(matches!(step(&mut state, check), Err(ApplyError::Fenced { .. })));
    }
    assert_eq!(state, before, "fenced writes change nothing");
    let check = Command::CheckOwner {
        agent: id,
        node: 2,
        epoch: Epoch(2),
    };
    assert_eq!(step(&mut state, check), Ok(Response::Done));
    assert_eq!(state, before, "an owner's check changes nothing");

    let sequence_before = state.agents[&id].last_sequence;
    let result = step(&mut state, branch(id, 2, 2, Some("abc"), Some("abc"), Some("stale")));
    assert_eq!(result, Ok(Response::Done));
    assert_eq!(
        state.agents[&id].pushed_commit.as_deref(),
        Some("abc"),
        "the record wins"
    );
    assert_eq!(
        event_kinds_after(&state, id, sequence_before),
        vec![EventKind::CommitDisplaced {
            branch: "flotilla/a".into(),
            commit: "stale".into(),
            restored: Some("abc".into()),
            kept: displaced_ref(id, "stale"),
        }]
    );
    assert_eq!(
        displaced_ref(id, "stale"),
        format!("refs/flotilla/displaced/{id}/stale")
    );
    let events = state.events_after(id, sequence_before);
    assert_eq!(
        events[0].node,
        Some(2),
        "the event names the node that keeps the commit"
    );
}

#[test]
fn a_branch_record_against_another_record_is_refused() {
    let mut state = with_nodes(2);
    let id = failed_over(&mut state);
    let before = state.clone();
    assert_eq!(
        step(
            &mut state,
            branch(id, 2, 2, Some("older"), Some("older"), Some("stale"))
        ),
        Err(ApplyError::BranchRecordMoved {
            agent: id,
            recorded: Some("abc".into()),
            expected: Some("older".into()),
        })
    );
    // Adopting a branch is only for an agent with nothing recorded.
    assert!(matches!(
        step(&mut state, branch(id, 2, 2, None, Some("theirs"), None)),
        Err(ApplyError::BranchRecordMoved { .. })
    ));
    // A displaced commit keeps the record; anything else is not a branch record.
    for command in [
        branch(id, 2, 2, Some("abc"), Some("other"), Some("stale")),
        branch(id, 2, 2, Some("abc"), Some("abc"), Some("abc")),
        branch(id, 2, 2, Some("abc"), Some("abc"), None),
        branch(id, 2, 2, Some("abc"), None, None),
    ] {
        let result = step(&mut state, command);
        assert!(matches!(result, Err(ApplyError::Invalid(_))), "{result:?}");
    }
    assert_eq!(state, before);
}

#[test]
fn a_branch_at_the_origin_before_any_record_is_adopted_once() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    let sequence_before = state.agents[&id].last_sequence;
    step(&mut state, branch(id, 1, 1, None, Some("theirs"), None)).unwrap();
    assert_eq!(state.agents[&id].pushed_commit.as_deref(), Some("theirs"));
    let kinds = event_kinds_after(&state, id, sequence_before);
    assert!(
        matches!(&kinds[..], [EventKind::Log { text }] if text.contains("theirs") && text.contains("flotilla/a")),
        "{kinds:?}"
    );
    assert!(step(&mut state, branch(id, 1, 1, None, Some("again"), None)).is_err());
    // With nothing recorded, a displaced commit restores the absent branch (deletes it).
    let fresh = running(&mut state, "b", 1);
    step(&mut state, branch(fresh, 1, 1, None, None, Some("stale"))).unwrap();
    assert_eq!(state.agents[&fresh].pushed_commit, None);
}

#[test]
fn a_finished_agents_pushed_commit_never_moves() {
    let mut state = with_nodes(1);
    let id = running(&mut state, "a", 1);
    step(&mut state, push(id, 1, 1, "abc", None)).unwrap();
    step(&mut state, set_status(id, 1, 1, AgentStatus::Finished, Some("done"))).unwrap();
    let before = state.clone();
    for command in [
        push(id, 1, 1, "later", None),
        branch(id, 1, 1, Some("abc"), Some("abc"), Some("stale")),
    ] {
        let result = step(&mut state, command);
        assert!(
            matches!(
                result,
                Err(ApplyError::InvalidState {
                    status: AgentStatus::Finished,
                    ..
                })
            ),
            "{result:?}"
        );
    }
    assert_eq!(state, before);
}

#[test]
fn the_transition_check_catches_a_pushed_commit_moved_out_of_turn() {
    let mut state = with_nodes(2);
    let id = failed_over(&mut state);
    // A state whose record moved under a stale epoch's write, as a broken `apply` would leave it.
    let mut broken = state.clone();
    broken.agents.get_mut(&id).unwrap().pushed_commit = Some("stale".into());
    let command = push(id, 1, 1, "stale", None);
    assert!(matches!(
        check_transition(&state, &command, &Ok(Response::Done), &broken),
        Err(crate::invariants::InvariantViolation::PushedCommitMovedByNonOwner { .. })
    ));
    assert_eq!(
        check_transition(&state, &push(id, 2, 2, "stale", None), &Ok(Response::Done), &broken),
        Ok(())
    );
    step(&mut state, set_status(id, 2, 2, AgentStatus::Finished, Some("done"))).unwrap();
    let mut broken = state.clone();
    broken.agents.get_mut(&id).unwrap().pushed_commit = Some("later".into());
    assert!(matches!(
        check_transition(&state, &push(id, 2, 2, "later", None), &Ok(Response::Done), &broken),
        Err(crate::invariants::InvariantViolation::FinishedAgentPushedCommitMoved { .. })
    ));
}
