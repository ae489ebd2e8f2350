//! Team settings, deleting an agent, and purging ended agents past their team's retention.
//! These are the only commands that remove an agent: everything the state holds of it goes in
//! one step (record, durable events, checkpoint, index entries), so no half-removed agent is
//! ever visible. A purge is judged against the time of its own entry (the leader's clock when
//! it proposed), so every node removes exactly the same agents.

use super::{not_in_family, tokens::team_exists};
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Response};
use crate::settings::MAX_PURGE_BATCH;
use crate::types::{AgentId, DEFAULT_TEAM};

/// Routes a settings, delete or purge command to its rule.
pub(super) fn apply_retention_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::SetTeamSetting { team, name, value } => set_team_setting(state, changes, team, name, value),
        Command::DeleteAgent { agent } => {
            let record = state
                .agents
                .get(agent)
                .cloned()
                .ok_or(ApplyError::AgentNotFound(*agent))?;
            remove_agent(state, changes, *agent);
            Ok(Response::Agent(Box::new(record)))
        }
        Command::PurgeEndedAgents { agents } => purge_ended_agents(state, changes, at_ms, agents),
        other => not_in_family("retention", other),
    }
}

fn set_team_setting(
    state: &mut ClusterState,
    changes: &mut Changes,
    team: &str,
    name: &str,
    value: &str,
) -> ApplyResult {
    let team = if team.is_empty() { DEFAULT_TEAM } else { team };
    if !team_exists(state, team) {
        return Err(ApplyError::TeamNotFound(team.to_string()));
    }
    let next = state.settings_of(team).with(name, value).map_err(ApplyError::Invalid)?;
    state.team_settings.insert(team.to_string(), next.clone());
    changes.meta = true;
    Ok(Response::TeamSettings(Box::new(next)))
}

fn purge_ended_agents(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, agents: &[AgentId]) -> ApplyResult {
    if agents.len() > MAX_PURGE_BATCH {
        return Err(ApplyError::Invalid(format!(
            "a purge removes at most {MAX_PURGE_BATCH} agents, found {}",
            agents.len()
        )));
    }
    let mut purged = Vec::new();
    for id in agents {
        let due = state.agents.get(id).is_some_and(|record| {
            record.status.is_terminal()
                && state
                    .settings_of(&record.spec.team)
                    .purge_due(record.updated_at_ms, at_ms)
        });
        if due {
            remove_agent(state, changes, *id);
            purged.push(*id);
        }
    }
    Ok(Response::Purged(purged))
}

/// Removes every trace of `id` from the state and records the keys storage must delete.
fn remove_agent(state: &mut ClusterState, changes: &mut Changes, id: AgentId) {
    state.agents.remove(&id);
    changes.agents.insert(id);
    if let Some(events) = state.events.remove(&id) {
        changes
            .trimmed_events
            .extend(events.iter().map(|event| (id, event.sequence)));
        // Events appended earlier in the same batch are not stored yet: drop them too.
        changes.new_events.retain(|event| event.agent != id);
    }
    if state.checkpoints.remove(&id).is_some() {
        changes.checkpoints.insert(id);
    }
    state.pending.remove(&id);
    for set in state.active_by_node.values_mut() {
        set.remove(&id);
    }
    for set in state.by_status.values_mut() {
        set.remove(&id);
    }
    state.by_status.retain(|_, set| !set.is_empty());
    state.search_signatures.remove(&id);
}
