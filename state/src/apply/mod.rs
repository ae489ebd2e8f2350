//! `apply`: the one way the replicated state changes. It does no I/O and reads no clock (the
//! proposer stamped the time into the request), so the same log gives the same state on every
//! node. What it touched is recorded in [`Changes`], so that storage persists exactly those
//! records.
//!
//! The rules live in one file per command family, named after it: `agents` (create, status,
//! stop, follow-up), `assignments` (placement under epochs, and sending agents back to pending),
//! `turns` (what an owner records of a run: turns, pushes, pull requests, the work branch, and
//! the owner's check before a push), `nodes`, `plugins`, `tokens`, `retention` (team settings,
//! delete, purge) and `audit` (the audit log, and the team limits a create is checked against).
//! `events` appends to an agent's durable history. The match below only dispatches. Every rule
//! keeps one promise: a refused command leaves the state exactly as it
//! was, so it checks everything before it changes anything.

mod agents;
mod assignments;
mod audit;
mod events;
mod join_tokens;
mod nodes;
mod plugins;
mod retention;
mod secrets;
mod tokens;
mod turns;

#[cfg(test)]
mod tests;

use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Request, Response, COMMAND_VERSION};
use crate::types::{AgentId, Assignment, Epoch, NodeId, Term};

pub(crate) use events::push_event;
pub use tokens::team_exists;
pub use turns::displaced_ref;

/// Applies a request outside any log (tests, replays of a single request), as an entry of the
/// term before any election: a command judged in a later term is refused. The log applies its
/// entries with [`apply_in_term`].
pub fn apply(state: &mut ClusterState, changes: &mut Changes, request: &Request) -> ApplyResult {
    apply_in_term(state, changes, Term::default(), request)
}

/// Applies one log entry, appended by the leader of `term` (the term of its log id). A refused
/// command leaves the state exactly as it was.
///
/// The term is the entry's, not the state's: a leader's judgement (`NodeDownInTerm`,
/// `NodeUpInTerm`) holds only when the entry carrying it was appended in the term it names. A
/// judgement that a deposed leader hands on to its successor lands in the successor's term and
/// is refused; one it appended itself is either lost with its uncommitted tail or was already
/// on a majority before any successor was elected.
pub fn apply_in_term(state: &mut ClusterState, changes: &mut Changes, term: Term, request: &Request) -> ApplyResult {
    if request.version != COMMAND_VERSION {
        return Err(ApplyError::UnsupportedVersion {
            found: request.version,
            supported: COMMAND_VERSION,
        });
    }
    match &request.command {
        Command::Batch { commands } => Ok(Response::Batch(
            commands
                .iter()
                .map(|command| apply_command(state, changes, request.at_ms, term, command))
                .collect(),
        )),
        command => apply_command(state, changes, request.at_ms, term, command),
    }
}

/// Applies one command; each command of a batch succeeds or is refused on its own. Each family
/// of commands has its rules in the file named after it.
fn apply_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    term: Term,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::Batch { .. } => Err(ApplyError::NestedBatch),
        Command::CreateAgent { .. }
        | Command::SetAgentStatus { .. }
        | Command::StopAgent { .. }
        | Command::FollowUp { .. } => agents::apply_agent_command(state, changes, at_ms, command),
        Command::AssignAgents { assignments } => assignments::assign_agents(state, changes, at_ms, assignments),
        Command::RecordTurn { .. }
        | Command::RecordPush { .. }
        | Command::RecordPullRequest { .. }
        | Command::RecordBranch { .. }
        | Command::CheckOwner { .. } => turns::apply_turn_command(state, changes, at_ms, command),
        Command::ReserveNodeId
        | Command::RegisterNode { .. }
        | Command::RemoveNode { .. }
        | Command::SetDraining { .. }
        | Command::NodeDown { .. }
        | Command::NodeUp { .. }
        | Command::NodeStopping { .. }
        | Command::RecordInstallLayer { .. } => nodes::apply_node_command(state, changes, at_ms, command),
        Command::NodeDownInTerm { .. } | Command::NodeUpInTerm { .. } => {
            nodes::apply_judged_node_command(state, changes, at_ms, term, command)
        }
        Command::PutPluginChunk { .. }
        | Command::CommitPlugin { .. }
        | Command::AbortUpload { .. }
        | Command::SetPluginEnabled { .. }
        | Command::GrantPluginHosts { .. }
        | Command::RemovePlugin { .. }
        | Command::SetPluginSettings { .. } => plugins::apply_plugin_command(state, changes, at_ms, command),
        Command::CreateToken { .. }
        | Command::CreateTeam { .. }
        | Command::CreateKey { .. }
        | Command::RevokeKey { .. } => tokens::apply_token_command(state, changes, at_ms, command),
        Command::CreateJoinToken { .. } | Command::ConsumeJoinToken { .. } => {
            join_tokens::apply_join_token_command(state, changes, at_ms, command)
        }
        Command::SetSecret { .. } | Command::RemoveSecret { .. } => {
            secrets::apply_secret_command(state, changes, at_ms, command)
        }
        Command::SetTeamSetting { .. } | Command::DeleteAgent { .. } | Command::PurgeEndedAgents { .. } => {
            retention::apply_retention_command(state, changes, at_ms, command)
        }
        Command::RecordAudit { .. } | Command::SetTeamLimits { .. } => {
            audit::apply_audit_command(state, changes, at_ms, command)
        }
        Command::SetClusterCa { record } => join_tokens::set_cluster_ca(state, changes, record),
    }
}

/// For a family's own dispatch: `command` was routed to a family it does not belong to, which
/// [`apply_command`] never does.
fn not_in_family(family: &str, command: &Command) -> ! {
    unreachable!("{} is not a {family} command", command.name())
}

/// The agent's assignment, if `node` owns it under `epoch`; a fenced refusal otherwise.
fn check_owner(
    state: &ClusterState,
    agent: AgentId,
    node: NodeId,
    epoch: Epoch,
) -> Result<Option<Assignment>, ApplyError> {
    let record = state.agents.get(&agent).ok_or(ApplyError::AgentNotFound(agent))?;
    let owner = record.assignment;
    if owner != Some(Assignment { node, epoch }) {
        return Err(ApplyError::Fenced {
            agent,
            owner: owner.map(|assignment| assignment.node),
            current: owner.map(|assignment| assignment.epoch),
            found: epoch,
            node,
        });
    }
    Ok(owner)
}

/// Marks an agent changed, re-indexes it and answers with its record.
fn finish_agent_change(state: &mut ClusterState, changes: &mut Changes, id: AgentId) -> ApplyResult {
    changes.agents.insert(id);
    state.index_agent(id);
    let record = state.agents.get(&id).ok_or(ApplyError::AgentNotFound(id))?;
    Ok(Response::Agent(Box::new(record.clone())))
}
