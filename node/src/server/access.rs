//! `flotilla.v1.AccessService`: teams and API keys. The method table of [`super::authz`] lets
//! the cluster-admin key manage teams and team admins manage keys; which team's keys a team
//! admin may touch is checked here, against the caller's own team. A key's secret is made here,
//! returned once, and only its digest is written.

use flotilla_proto::v1;
use flotilla_proto::v1::access_service_server::AccessService;
use flotilla_raft::{key_id_of, Command, Replica, Response, Role, TeamRecord, TokenRecord, DEFAULT_TEAM};
use tonic::{Request, Status};

use super::audit::{note_of, note_target};
use super::auth::{new_token, principal, token_digest};
use super::authz::{owning_team, Principal};
use super::status::read_status;
use super::{convert, write_status};

/// Longest key lifetime a caller may ask for: ten years, in seconds.
pub const MAX_KEY_LIFETIME_SECONDS: u64 = 10 * 365 * 24 * 3600;

pub struct AccessApi {
    pub replica: Replica,
    /// The cluster key, from which each team's AWS external ID is derived.
    pub kek: super::secrets::NodeKek,
}

fn team(record: &TeamRecord) -> v1::Team {
    v1::Team {
        name: record.name.clone(),
        created_at: Some(convert::timestamp(record.created_at_ms)),
        aws_external_id: String::new(),
    }
}

fn key(record: &TokenRecord) -> v1::Key {
    let id = if record.key_id.is_empty() {
        key_id_of(&record.sha256_hex)
    } else {
        record.key_id.clone()
    };
    v1::Key {
        id,
        team: owning_team(&record.team).to_string(),
        user: record.name.clone(),
        role: record.role.as_str().to_string(),
        created_at: Some(convert::timestamp(record.created_at_ms)),
        expires_at: record.expires_at_ms.map(convert::timestamp),
    }
}

/// The same answer for a team the caller may not manage as for one that does not exist.
fn key_not_found(id: &str) -> Status {
    Status::not_found(format!("key {id} not found"))
}

fn refuse_other_team(caller: &Principal, team: &str) -> Result<(), Status> {
    if caller.manages_keys_of(team) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "key {} is an admin of team {}; it manages that team's keys only, not team {team}'s",
        caller.key_id, caller.team
    )))
}

impl AccessApi {
    async fn settle(&self) -> Result<(), Status> {
        self.replica.read_barrier().await.map(|_| ()).map_err(read_status)
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn create_team(&self, request: Request<v1::CreateTeamRequest>) -> Result<tonic::Response<v1::Team>, Status> {
        note_target(&request, request.get_ref().name.clone(), Some(&request.get_ref().name));
        let name = request.into_inner().name;
        if let Some(problem) = flotilla_raft::name_problem(&name) {
            return Err(Status::invalid_argument(format!("name: {problem}")));
        }
        match self.replica.write(Command::CreateTeam { name }).await {
            Ok(Response::Team(record)) => Ok(tonic::Response::new(team(&record))),
            Ok(other) => Err(Status::internal(format!("unexpected answer to create-team: {other:?}"))),
            Err(error) => Err(write_status(error)),
        }
    }

    async fn get_team(&self, request: Request<v1::GetTeamRequest>) -> Result<tonic::Response<v1::Team>, Status> {
        let caller = principal(&request)?;
        let name = request.into_inner().name;
        let name = if name.is_empty() { caller.team.clone() } else { name };
        // Another team's name answers as one that does not exist: names do not leak.
        let not_found = || Status::not_found(format!("team {name} not found"));
        if !caller.manages_keys_of(&name) {
            return Err(not_found());
        }
        self.settle().await?;
        let mut found = if name == DEFAULT_TEAM {
            Some(v1::Team {
                name: DEFAULT_TEAM.to_string(),
                created_at: None,
                aws_external_id: String::new(),
            })
        } else {
            self.replica.reader().read(|state| state.teams.get(&name).map(team))
        }
        .ok_or_else(not_found)?;
        let kek = self
            .kek
            .get()
            .ok_or_else(|| Status::failed_precondition("this node holds no key-encryption key (DATA_DIR/kek)"))?;
        found.aws_external_id = super::aws::external_id(kek, &found.name);
        Ok(tonic::Response::new(found))
    }

    async fn list_teams(
        &self,
        _request: Request<v1::ListTeamsRequest>,
    ) -> Result<tonic::Response<v1::ListTeamsResponse>, Status> {
        self.settle().await?;
        let mut teams = vec![v1::Team {
            name: DEFAULT_TEAM.to_string(),
            created_at: None,
            aws_external_id: String::new(),
        }];
        self.replica
            .reader()
            .read(|state| teams.extend(state.teams.values().map(team)));
        Ok(tonic::Response::new(v1::ListTeamsResponse { teams }))
    }

    async fn create_key(
        &self,
        request: Request<v1::CreateKeyRequest>,
    ) -> Result<tonic::Response<v1::CreateKeyResponse>, Status> {
        let caller = principal(&request)?;
        let audit_note = note_of(&request);
        let body = request.into_inner();
        let team = if body.team.is_empty() {
            caller.team.clone()
        } else {
            body.team
        };
        refuse_other_team(&caller, &team)?;
        audit_note.set("", Some(&team));
        let role = Role::from_name(&body.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "role: {:?} is not a role; use viewer, member, admin or cluster-admin",
                body.role
            ))
        })?;
        if role == Role::ClusterAdmin && caller.role != Role::ClusterAdmin {
            return Err(Status::permission_denied(format!(
                "key {} has role {}; only the cluster-admin key creates cluster-admin keys",
                caller.key_id, caller.role
            )));
        }
        if let Some(problem) = flotilla_raft::name_problem(&body.user) {
            return Err(Status::invalid_argument(format!("user: {problem}")));
        }
        if body.expires_in_seconds > MAX_KEY_LIFETIME_SECONDS {
            return Err(Status::invalid_argument(format!(
                "expires_in_seconds: at most {MAX_KEY_LIFETIME_SECONDS} (ten years), found {}",
                body.expires_in_seconds
            )));
        }
        let secret = new_token();
        let team_name = team.clone();
        let command = Command::CreateKey {
            sha256_hex: token_digest(&secret),
            team,
            user: body.user,
            role,
            expires_in_ms: (body.expires_in_seconds > 0).then(|| body.expires_in_seconds * 1000),
        };
        match self.replica.write(command).await {
            Ok(Response::Key(record)) => {
                audit_note.set(record.key_id.clone(), Some(&team_name));
                tracing::info!(key = %record.key_id, team = %record.team, user = %record.name, role = %record.role, by = %caller.key_id, "key created");
                Ok(tonic::Response::new(v1::CreateKeyResponse {
                    key: Some(key(&record)),
                    secret,
                }))
            }
            Ok(other) => Err(Status::internal(format!("unexpected answer to create-key: {other:?}"))),
            Err(error) => Err(write_status(error)),
        }
    }

    async fn list_keys(
        &self,
        request: Request<v1::ListKeysRequest>,
    ) -> Result<tonic::Response<v1::ListKeysResponse>, Status> {
        let caller = principal(&request)?;
        let wanted = request.into_inner().team;
        if !wanted.is_empty() {
            refuse_other_team(&caller, &wanted)?;
        }
        self.settle().await?;
        let keys = self.replica.reader().read(|state| {
            state
                .tokens
                .values()
                .filter(|record| {
                    let team = owning_team(&record.team);
                    caller.manages_keys_of(team) && (wanted.is_empty() || wanted == team)
                })
                .map(key)
                .collect::<Vec<_>>()
        });
        Ok(tonic::Response::new(v1::ListKeysResponse { keys }))
    }

    async fn get_key_info(&self, request: Request<v1::GetKeyInfoRequest>) -> Result<tonic::Response<v1::Key>, Status> {
        let caller = principal(&request)?;
        let record = self.replica.reader().read(|state| {
            state
                .tokens
                .values()
                .find(|record| key_id_of(&record.sha256_hex) == caller.key_id)
                .cloned()
        });
        // The wrapper found the key a moment ago; a revocation in between is the only way out.
        let record = record.ok_or_else(|| Status::unauthenticated("unknown or revoked key"))?;
        Ok(tonic::Response::new(key(&record)))
    }

    async fn revoke_key(&self, request: Request<v1::RevokeKeyRequest>) -> Result<tonic::Response<v1::Key>, Status> {
        let caller = principal(&request)?;
        let audit_note = note_of(&request);
        let id = request.into_inner().id;
        audit_note.set(id.clone(), None);
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "id: required (a key id as `key list` shows it)",
            ));
        }
        self.settle().await?;
        let owner = self.replica.reader().read(|state| {
            state
                .tokens
                .values()
                .find(|record| key_id_of(&record.sha256_hex) == id)
                .map(|record| owning_team(&record.team).to_string())
        });
        // Another team's key answers like an unknown one: key ids do not leak across teams.
        match owner {
            Some(team) if caller.manages_keys_of(&team) => audit_note.set(id.clone(), Some(&team)),
            _ => return Err(key_not_found(&id)),
        }
        match self.replica.write(Command::RevokeKey { key_id: id }).await {
            Ok(Response::Key(record)) => {
                tracing::info!(key = %record.key_id, team = %record.team, by = %caller.key_id, "key revoked");
                Ok(tonic::Response::new(key(&record)))
            }
            Ok(other) => Err(Status::internal(format!("unexpected answer to revoke-key: {other:?}"))),
            Err(error) => Err(write_status(error)),
        }
    }
}
