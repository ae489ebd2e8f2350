//! The audit log and team limits: appending audit entries (bounded by count and age), setting a
//! team's limits, and the limit checks a create or a re-queueing follow-up must pass. The checks
//! read the log's time and the replicated records only, so every node refuses the same creates.

use super::not_in_family;
use super::tokens::team_exists;
use crate::audit::{
    AuditEntry, TeamLimits, CREATE_WINDOW_MS, MAX_AUDIT_AGE_MS, MAX_AUDIT_ENTRIES, MAX_AUDIT_ENTRIES_PER_COMMAND,
};
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Response};
use crate::types::owning_team;

/// Routes an audit or limits command to its rule.
pub(super) fn apply_audit_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::RecordAudit { entries } => record_audit(state, changes, at_ms, entries),
        Command::SetTeamLimits { team, limits } => set_team_limits(state, changes, team.as_deref(), *limits),
        other => not_in_family("audit", other),
    }
}

fn record_audit(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, entries: &[AuditEntry]) -> ApplyResult {
    if entries.len() > MAX_AUDIT_ENTRIES_PER_COMMAND {
        return Err(ApplyError::TooMany {
            what: "audit entries in one command".to_string(),
            limit: MAX_AUDIT_ENTRIES_PER_COMMAND,
        });
    }
    if let Some((field, found)) = entries.iter().find_map(AuditEntry::oversized_field) {
        return Err(ApplyError::TooLarge {
            what: format!("audit entry field {field}"),
            found,
            limit: crate::audit::MAX_AUDIT_FIELD_BYTES,
        });
    }
    let first = state.next_audit_sequence;
    for entry in entries {
        let mut entry = entry.clone();
        entry.sequence = state.next_audit_sequence;
        state.next_audit_sequence += 1;
        changes.audit_appended.push(entry.sequence);
        state.audit.push_back(entry);
    }
    let oldest_kept_ms = at_ms.saturating_sub(MAX_AUDIT_AGE_MS);
    while let Some(front) = state.audit.front() {
        if state.audit.len() <= MAX_AUDIT_ENTRIES && front.at_ms >= oldest_kept_ms {
            break;
        }
        changes.audit_trimmed.push(front.sequence);
        state.audit.pop_front();
    }
    Ok(Response::Audited {
        first,
        count: entries.len() as u64,
    })
}

fn set_team_limits(
    state: &mut ClusterState,
    changes: &mut Changes,
    team: Option<&str>,
    limits: TeamLimits,
) -> ApplyResult {
    for (name, value) in [
        ("max_running_agents", limits.max_running_agents),
        ("creates_per_minute", limits.creates_per_minute),
    ] {
        if value == Some(0) {
            return Err(ApplyError::Invalid(format!(
                "{name}: 0 would refuse every agent; leave it unset for no limit"
            )));
        }
    }
    match team {
        Some(team) => {
            if !team_exists(state, team) {
                return Err(ApplyError::TeamNotFound(team.to_string()));
            }
            if limits == TeamLimits::default() {
                state.team_limits.remove(team);
            } else {
                state.team_limits.insert(team.to_string(), limits);
            }
        }
        None => state.default_team_limits = limits,
    }
    changes.meta = true;
    Ok(Response::TeamLimits {
        team: team.map(str::to_string),
        limits,
    })
}

/// Refuses a new agent of `team` at `at_ms` that would pass either of its limits.
pub(super) fn check_create_limits(state: &ClusterState, team: &str, at_ms: u64) -> Result<(), ApplyError> {
    let team = owning_team(team);
    let limits = state.limits_of(team);
    check_running_limit(state, team, limits)?;
    if let Some(limit) = limits.creates_per_minute {
        let since = at_ms.saturating_sub(CREATE_WINDOW_MS);
        let recent = state
            .created_by_team
            .get(team)
            .map(|created| {
                created
                    .range((since.saturating_add(1), crate::types::AgentId(ulid::Ulid::nil()))..)
                    .filter(|(_, id)| state.agents.contains_key(id))
                    .count()
            })
            .unwrap_or(0);
        if recent >= limit as usize {
            return Err(ApplyError::LimitReached {
                team: team.to_string(),
                limit: "creates_per_minute".to_string(),
                value: limit,
                detail: format!(
                    "{recent} agents created in the last {} s of log time",
                    CREATE_WINDOW_MS / 1000
                ),
            });
        }
    }
    Ok(())
}

/// Refuses one more non-terminal agent of `team` past its `max_running_agents`.
pub(super) fn check_running_limit(state: &ClusterState, team: &str, limits: TeamLimits) -> Result<(), ApplyError> {
    let Some(limit) = limits.max_running_agents else {
        return Ok(());
    };
    let live = state.live_by_team.get(team).map_or(0, |live| live.len());
    if live >= limit as usize {
        return Err(ApplyError::LimitReached {
            team: team.to_string(),
            limit: "max_running_agents".to_string(),
            value: limit,
            detail: format!("{live} agents are not finished, failed or stopped"),
        });
    }
    Ok(())
}
