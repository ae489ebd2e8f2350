//! Tests of team settings, delete and the purge of ended agents.

use super::*;
use crate::invariants::check_transition;
use crate::settings::MAX_PURGE_BATCH;

/// Applies `command` at `at_ms`, checks the invariants and the transition, and answers with the
/// result and the changes storage would persist.
fn run_checked(state: &mut ClusterState, at_ms: u64, command: Command) -> (ApplyResult, Changes) {
    let before = state.clone();
    let mut changes = Changes::default();
    let result = apply(state, &mut changes, &Request::at(at_ms, command.clone()));
    check_invariants(state).unwrap_or_else(|violation| panic!("after {result:?}: {violation}"));
    check_transition(&before, &command, &result, state)
        .unwrap_or_else(|violation| panic!("{} broke a transition rule: {violation}", command.name()));
    (result, changes)
}

/// An agent that ran one turn (so it has a checkpoint) and finished, at 1 000 ms.
fn finished_with_turn(state: &mut ClusterState, name: &str) -> AgentId {
    let id = running(state, name, 1);
    run(state, turn(id, 1, 0)).unwrap();
    run(state, set_status(id, 1, 1, AgentStatus::Finished, Some("done"))).unwrap();
    id
}

#[test]
fn delete_removes_the_record_events_and_checkpoint_and_a_running_agent_leaves_its_node() {
    let mut state = with_nodes(1);
    let ended = finished_with_turn(&mut state, "ended");
    let live = running(&mut state, "live", 1);
    let sequences = state.events[&ended].len();
    assert!(state.checkpoints.contains_key(&ended));

    let (result, changes) = run_checked(&mut state, 2_000, Command::DeleteAgent { agent: ended });
    assert!(matches!(result, Ok(Response::Agent(record)) if record.id == ended));
    assert!(!state.agents.contains_key(&ended) && !state.events.contains_key(&ended));
    assert!(!state.checkpoints.contains_key(&ended));
    assert_eq!(changes.trimmed_events.len(), sequences, "every stored event is deleted");
    assert!(changes.agents.contains(&ended) && changes.checkpoints.contains(&ended));

    run_checked(&mut state, 2_000, Command::DeleteAgent { agent: live })
        .0
        .unwrap();
    assert_eq!(state.slots_in_use(1), 0, "a deleted live agent leaves its node");
    let (again, _) = run_checked(&mut state, 2_000, Command::DeleteAgent { agent: live });
    assert_eq!(again, Err(ApplyError::AgentNotFound(live)));
}

#[test]
fn a_purge_removes_ended_agents_past_retention_by_the_entry_time_only() {
    let mut state = with_nodes(1);
    run(
        &mut state,
        Command::SetTeamSetting {
            team: String::new(),
            name: "retention".into(),
            value: "10s".into(),
        },
    )
    .unwrap();
    let ended = finished_with_turn(&mut state, "ended");
    let live = running(&mut state, "live", 1);
    let both = vec![ended, live];
    // 1 000 ms + 10 s is the earliest: one millisecond before, nothing goes.
    let (early, _) = run_checked(&mut state, 10_999, Command::PurgeEndedAgents { agents: both.clone() });
    assert_eq!(early, Ok(Response::Purged(Vec::new())));
    let (due, _) = run_checked(&mut state, 11_000, Command::PurgeEndedAgents { agents: both });
    assert_eq!(due, Ok(Response::Purged(vec![ended])), "a live agent is never purged");
    assert!(state.agents.contains_key(&live) && !state.agents.contains_key(&ended));

    let too_many = vec![live; MAX_PURGE_BATCH + 1];
    let (refused, _) = run_checked(&mut state, 99_000, Command::PurgeEndedAgents { agents: too_many });
    assert!(matches!(refused, Err(ApplyError::Invalid(_))));
}

#[test]
fn settings_belong_to_an_existing_team_and_a_refused_value_changes_nothing() {
    let mut state = ClusterState::default();
    let set = |team: &str, name: &str, value: &str| Command::SetTeamSetting {
        team: team.into(),
        name: name.into(),
        value: value.into(),
    };
    assert_eq!(
        run(&mut state, set("red", "display_summary", "off")),
        Err(ApplyError::TeamNotFound("red".into()))
    );
    run(&mut state, Command::CreateTeam { name: "red".into() }).unwrap();
    let Ok(Response::TeamSettings(settings)) = run(&mut state, set("red", "display_summary", "off")) else {
        panic!("settings not answered");
    };
    assert!(!settings.display_summary);
    assert!(state.settings_of("default").display_summary, "other teams keep theirs");
    let before = state.clone();
    assert!(matches!(
        run(&mut state, set("red", "retention", "never")),
        Err(ApplyError::Invalid(message)) if message.contains("privacy")
    ));
    assert_eq!(state, before);
}
