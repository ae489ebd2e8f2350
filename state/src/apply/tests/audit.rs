//! The audit log's bounds and the team limits a create is judged against.

use super::*;
use crate::audit::{AuditEntry, TeamLimits, MAX_AUDIT_AGE_MS, MAX_AUDIT_ENTRIES, MAX_AUDIT_ENTRIES_PER_COMMAND};

fn entry(at_ms: u64, target: &str) -> AuditEntry {
    AuditEntry {
        sequence: 0,
        at_ms,
        node: 1,
        key_id: "key_1".to_string(),
        user: "ana".to_string(),
        team: "red".to_string(),
        target_team: String::new(),
        method: "AgentService/StopAgent".to_string(),
        target: target.to_string(),
        code: 0,
    }
}

fn limit(state: &mut ClusterState, team: Option<&str>, limits: TeamLimits) {
    run(
        state,
        Command::SetTeamLimits {
            team: team.map(str::to_string),
            limits,
        },
    )
    .expect("limits set");
}

fn create_at(state: &mut ClusterState, at_ms: u64, name: &str) -> ApplyResult {
    run_at(
        state,
        at_ms,
        Command::CreateAgent {
            id: AgentId::new(),
            spec: spec(name).into(),
        },
    )
}

fn limit_reached(result: ApplyResult) -> (String, u32) {
    match result {
        Err(ApplyError::LimitReached { limit, value, .. }) => (limit, value),
        other => panic!("expected a limit refusal, found {other:?}"),
    }
}

#[test]
fn audit_entries_get_increasing_sequences_and_the_oldest_go_past_the_bound() {
    let mut state = ClusterState::default();
    let batch: Vec<AuditEntry> = (0..MAX_AUDIT_ENTRIES_PER_COMMAND).map(|_| entry(1_000, "a")).collect();
    let commands = MAX_AUDIT_ENTRIES / MAX_AUDIT_ENTRIES_PER_COMMAND + 2;
    for _ in 0..commands {
        run(&mut state, Command::RecordAudit { entries: batch.clone() }).expect("recorded");
    }
    assert_eq!(state.audit.len(), MAX_AUDIT_ENTRIES);
    let written = (commands * MAX_AUDIT_ENTRIES_PER_COMMAND) as u64;
    assert_eq!(state.next_audit_sequence, written);
    assert_eq!(state.audit.back().expect("entries").sequence, written - 1);
    assert_eq!(
        state.audit.front().expect("entries").sequence,
        written - MAX_AUDIT_ENTRIES as u64
    );
    let too_many = run(
        &mut state,
        Command::RecordAudit {
            entries: vec![entry(1_000, "a"); MAX_AUDIT_ENTRIES_PER_COMMAND + 1],
        },
    );
    assert!(matches!(too_many, Err(ApplyError::TooMany { .. })), "{too_many:?}");
}

#[test]
fn audit_entries_older_than_the_age_bound_go_and_long_fields_are_refused() {
    let mut state = ClusterState::default();
    run_at(
        &mut state,
        1_000,
        Command::RecordAudit {
            entries: vec![entry(1_000, "old")],
        },
    )
    .expect("recorded");
    let later = 1_000 + MAX_AUDIT_AGE_MS + 1;
    let mut changes = Changes::default();
    apply(
        &mut state,
        &mut changes,
        &Request::at(
            later,
            Command::RecordAudit {
                entries: vec![entry(later, "new")],
            },
        ),
    )
    .expect("recorded");
    assert_eq!(state.audit.len(), 1);
    assert_eq!(state.audit[0].target, "new");
    assert_eq!(changes.audit_trimmed, vec![0]);
    assert_eq!(changes.audit_appended, vec![1]);
    let long = run(
        &mut state,
        Command::RecordAudit {
            entries: vec![entry(1_000, &"x".repeat(1_000))],
        },
    );
    assert!(matches!(long, Err(ApplyError::TooLarge { .. })), "{long:?}");
}

#[test]
fn the_running_limit_counts_live_agents_and_a_stop_frees_a_place() {
    let mut state = with_nodes(1);
    limit(
        &mut state,
        Some("default"),
        TeamLimits {
            max_running_agents: Some(2),
            creates_per_minute: None,
        },
    );
    let first = create(&mut state, "a");
    create(&mut state, "b");
    let (name, value) = limit_reached(create_at(&mut state, 1_000, "c"));
    assert_eq!((name.as_str(), value), ("max_running_agents", 2));
    run(
        &mut state,
        Command::StopAgent {
            agent: first,
            reason: "done".to_string(),
        },
    )
    .expect("stopped");
    create_at(&mut state, 1_000, "c").expect("a place is free");
}

#[test]
fn creates_per_minute_are_judged_from_log_time_the_same_after_a_rebuild() {
    let mut state = with_nodes(1);
    limit(
        &mut state,
        None,
        TeamLimits {
            max_running_agents: None,
            creates_per_minute: Some(2),
        },
    );
    create_at(&mut state, 10_000, "a").expect("first");
    create_at(&mut state, 20_000, "b").expect("second");
    let mut restarted = state.clone();
    restarted.rebuild_indexes();
    for state in [&mut state, &mut restarted] {
        let (name, value) = limit_reached(create_at(state, 69_000, "c"));
        assert_eq!((name.as_str(), value), ("creates_per_minute", 2));
        // A minute of log time after the first create, one place is free again.
        create_at(state, 70_001, "c").expect("the first create left the window");
        limit_reached(create_at(state, 70_002, "d"));
    }
}

#[test]
fn limits_need_an_existing_team_and_zero_is_refused() {
    let mut state = ClusterState::default();
    let missing = run(
        &mut state,
        Command::SetTeamLimits {
            team: Some("nobody".to_string()),
            limits: TeamLimits::default(),
        },
    );
    assert_eq!(missing, Err(ApplyError::TeamNotFound("nobody".to_string())));
    let zero = run(
        &mut state,
        Command::SetTeamLimits {
            team: None,
            limits: TeamLimits {
                max_running_agents: Some(0),
                creates_per_minute: None,
            },
        },
    );
    assert!(matches!(zero, Err(ApplyError::Invalid(_))), "{zero:?}");
}
