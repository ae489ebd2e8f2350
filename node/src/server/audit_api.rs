//! `flotilla.v1.AuditService` (reading the audit log) and `flotilla.v1.LimitsService` (per-team
//! limits). A team admin reads its own team's audit entries, the cluster-admin key all; limits
//! are set by the cluster-admin key and enforced by the state machine (see
//! `flotilla_state::audit`).

use flotilla_proto::v1;
use flotilla_proto::v1::audit_service_server::AuditService;
use flotilla_proto::v1::limits_service_server::LimitsService;
use flotilla_raft::{AuditEntry, Command, Replica, Response, Role, TeamLimits};
use tonic::{Request, Status};

use super::audit::note_target;
use super::auth::principal;
use super::authz::Principal;
use super::status::read_status;
use super::{convert, validate, write_status};

/// Most audit entries one page looks at, matching or not, so that one call holds the state's
/// lock for a bounded time; a page that stops there is short but has a next token.
pub const MAX_AUDIT_SCANNED_PER_PAGE: usize = 20_000;
/// How far out of order (by the serving nodes' clocks) entries may be and still be found by
/// `since`: the search for the first entry starts this much earlier.
const SINCE_SLACK_MS: u64 = 5 * 60 * 1000;

pub struct AuditApi {
    pub replica: Replica,
}

pub struct LimitsApi {
    pub replica: Replica,
}

fn code_name(code: i32) -> String {
    let code = tonic::Code::from_i32(code);
    if code == tonic::Code::Ok {
        return "OK".to_string();
    }
    // tonic's description is "Some requested entity was not found"; the wire name is wanted.
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(index, letter)| {
            let separator = (index > 0 && letter.is_ascii_uppercase()).then_some('_');
            separator
                .into_iter()
                .chain(std::iter::once(letter.to_ascii_uppercase()))
        })
        .collect()
}

fn event(entry: &AuditEntry) -> v1::AuditEvent {
    v1::AuditEvent {
        sequence: entry.sequence,
        at: Some(convert::timestamp(entry.at_ms)),
        node: entry.node,
        key_id: entry.key_id.clone(),
        user: entry.user.clone(),
        team: entry.team.clone(),
        target_team: entry.target_team.clone(),
        method: entry.method.clone(),
        target: entry.target.clone(),
        result: code_name(entry.code),
    }
}

fn parse_page_token(token: &str) -> Result<Option<u64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix("audit-")
        .and_then(|sequence| sequence.parse().ok())
        .map(Some)
        .ok_or_else(|| Status::invalid_argument("page_token: not a token this service issued; start again without one"))
}

/// The team whose entries the caller asks for: `wanted` (its own, unless cluster-admin).
fn team_filter(caller: &Principal, wanted: &str) -> Result<Option<String>, Status> {
    if caller.role == Role::ClusterAdmin {
        return Ok((!wanted.is_empty()).then(|| wanted.to_string()));
    }
    if !wanted.is_empty() && wanted != caller.team {
        return Err(Status::permission_denied(format!(
            "key {} is an admin of team {}; it reads that team's audit entries only, not team {wanted}'s",
            caller.key_id, caller.team
        )));
    }
    Ok(Some(caller.team.clone()))
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<v1::ListAuditEventsRequest>,
    ) -> Result<tonic::Response<v1::ListAuditEventsResponse>, Status> {
        let caller = principal(&request)?;
        let body = request.into_inner();
        let team = team_filter(&caller, &body.team)?;
        let page_size = validate::page_size(body.page_size)?;
        let after = parse_page_token(&body.page_token)?;
        let since_ms = body
            .since
            .map(|since| (since.seconds.max(0) as u64) * 1000 + (since.nanos.max(0) as u64) / 1_000_000)
            .unwrap_or(0);
        self.replica.read_barrier().await.map_err(read_status)?;
        let (events, next) = self.replica.reader().read(|state| {
            let start = match after {
                Some(after) => state.audit.partition_point(|entry| entry.sequence <= after),
                None => state
                    .audit
                    .partition_point(|entry| entry.at_ms.saturating_add(SINCE_SLACK_MS) < since_ms),
            };
            let mut events = Vec::with_capacity(page_size);
            let mut last_seen = None;
            for entry in state.audit.range(start..).take(MAX_AUDIT_SCANNED_PER_PAGE) {
                if events.len() == page_size {
                    break;
                }
                last_seen = Some(entry.sequence);
                let matches = entry.at_ms >= since_ms && team.as_deref().is_none_or(|team| entry.concerns_team(team));
                if matches {
                    events.push(event(entry));
                }
            }
            let more = last_seen.is_some_and(|last| state.audit.back().is_some_and(|back| back.sequence > last));
            (events, more.then_some(last_seen).flatten())
        });
        Ok(tonic::Response::new(v1::ListAuditEventsResponse {
            events,
            next_page_token: next.map(|sequence| format!("audit-{sequence}")).unwrap_or_default(),
        }))
    }
}

fn wire_limits(team: &str, own: TeamLimits, effective: TeamLimits) -> v1::TeamLimits {
    v1::TeamLimits {
        team: team.to_string(),
        max_running_agents: own.max_running_agents.unwrap_or(0),
        creates_per_minute: own.creates_per_minute.unwrap_or(0),
        effective_max_running_agents: effective.max_running_agents.unwrap_or(0),
        effective_creates_per_minute: effective.creates_per_minute.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl LimitsService for LimitsApi {
    async fn get_team_limits(
        &self,
        request: Request<v1::GetTeamLimitsRequest>,
    ) -> Result<tonic::Response<v1::TeamLimits>, Status> {
        let caller = principal(&request)?;
        let body = request.into_inner();
        self.replica.read_barrier().await.map_err(read_status)?;
        if body.cluster_default {
            let limits = self.replica.reader().read(|state| state.default_team_limits);
            return Ok(tonic::Response::new(wire_limits("", limits, limits)));
        }
        let team = if body.team.is_empty() {
            caller.team.clone()
        } else {
            body.team
        };
        if !caller.sees_team(&team) {
            return Err(Status::not_found(format!("team {team} not found")));
        }
        let (own, effective, exists) = self.replica.reader().read(|state| {
            (
                state.team_limits.get(&team).copied().unwrap_or_default(),
                state.limits_of(&team),
                team == flotilla_raft::DEFAULT_TEAM || state.teams.contains_key(&team),
            )
        });
        if !exists {
            return Err(Status::not_found(format!("team {team} not found")));
        }
        Ok(tonic::Response::new(wire_limits(&team, own, effective)))
    }

    async fn set_team_limits(
        &self,
        request: Request<v1::SetTeamLimitsRequest>,
    ) -> Result<tonic::Response<v1::TeamLimits>, Status> {
        let body = request.get_ref().clone();
        let team = match (body.cluster_default, body.team.is_empty()) {
            (true, true) => None,
            (false, false) => Some(body.team.clone()),
            (true, false) => {
                return Err(Status::invalid_argument(
                    "team: give a team or cluster_default, not both",
                ))
            }
            (false, true) => {
                return Err(Status::invalid_argument(
                    "team: required (or cluster_default for the limits of every team without its own)",
                ))
            }
        };
        note_target(
            &request,
            team.clone().unwrap_or_else(|| "cluster-default".to_string()),
            team.as_deref(),
        );
        let limits = TeamLimits {
            max_running_agents: (body.max_running_agents > 0).then_some(body.max_running_agents),
            creates_per_minute: (body.creates_per_minute > 0).then_some(body.creates_per_minute),
        };
        match self
            .replica
            .write(Command::SetTeamLimits {
                team: team.clone(),
                limits,
            })
            .await
        {
            Ok(Response::TeamLimits { .. }) => {}
            Ok(other) => {
                return Err(Status::internal(format!(
                    "unexpected answer to set-team-limits: {other:?}"
                )))
            }
            Err(error) => return Err(write_status(error)),
        }
        let effective = match &team {
            Some(team) => self.replica.reader().read(|state| state.limits_of(team)),
            None => limits,
        };
        Ok(tonic::Response::new(wire_limits(
            team.as_deref().unwrap_or(""),
            limits,
            effective,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_on_the_wire() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(tonic::Code::PermissionDenied as i32), "PERMISSION_DENIED");
        assert_eq!(code_name(tonic::Code::ResourceExhausted as i32), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(tonic::Code::NotFound as i32), "NOT_FOUND");
    }

    #[test]
    fn page_tokens_round_trip_and_strangers_are_refused() {
        assert_eq!(parse_page_token("").expect("empty"), None);
        assert_eq!(parse_page_token("audit-41").expect("ours"), Some(41));
        let refused = parse_page_token("41").expect_err("not ours");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }
}
