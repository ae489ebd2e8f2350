//! `flotilla.v1.SettingsService`: a team's settings and the models this node offers. Any key of
//! a team reads its settings; its admin (or the cluster-admin key, for every team) changes them.
//! Values are checked here for their shape (a declared model, a branch name, a repository URL)
//! and again by the state machine for size and syntax, so a refused value names the setting.

use std::sync::Arc;

use flotilla_proto::v1;
use flotilla_proto::v1::settings_service_server::SettingsService;
use flotilla_raft::{Command, Replica, Response, Role, TeamSettings, SETTING_NAMES};
use tonic::{Request, Status};

use super::agents::ModelCatalog;
use super::auth::principal;
use super::authz::{owning_team, Principal};
use super::status::read_status;
use super::{validate, write_status};

pub struct SettingsApi {
    pub replica: Replica,
    pub models: Arc<ModelCatalog>,
}

/// The settings on the wire, every setting in [`SETTING_NAMES`] order.
pub fn wire(team: &str, settings: &TeamSettings) -> v1::TeamSettings {
    v1::TeamSettings {
        team: team.to_string(),
        settings: SETTING_NAMES
            .iter()
            .map(|name| v1::Setting {
                name: name.to_string(),
                value: settings.get(name).unwrap_or_default(),
            })
            .collect(),
    }
}

/// The team a call is about: the caller's own when `asked` is empty. Only the cluster-admin key
/// reaches another team.
fn team_for(caller: &Principal, asked: &str) -> Result<String, Status> {
    let team = if asked.is_empty() {
        owning_team(&caller.team).to_string()
    } else {
        asked.to_string()
    };
    if caller.role != Role::ClusterAdmin && team != owning_team(&caller.team) {
        return Err(Status::permission_denied(format!(
            "key {} belongs to team {}; only the cluster-admin key reaches team {team}'s settings",
            caller.key_id, caller.team
        )));
    }
    Ok(team)
}

impl SettingsApi {
    /// The team's settings after a read barrier; NOT_FOUND for a team that does not exist.
    async fn settings(&self, team: &str) -> Result<TeamSettings, Status> {
        self.replica.read_barrier().await.map_err(read_status)?;
        self.replica.reader().read(|state| {
            if flotilla_raft::apply::team_exists(state, team) {
                Ok(state.settings_of(team))
            } else {
                Err(Status::not_found(format!("team {team} not found")))
            }
        })
    }

    /// Refuses a value whose shape is wrong for its setting, naming both.
    fn check_value(&self, name: &str, value: &str) -> Result<(), Status> {
        let value = value.trim();
        match name {
            "default_model" if !value.is_empty() => self.check_model(name, value),
            "allowed_models" => value
                .split(',')
                .map(str::trim)
                .filter(|model| !model.is_empty())
                .try_for_each(|model| self.check_model(name, model)),
            "default_base_branch" if !value.is_empty() => {
                validate::branch("default_base_branch", value).map_err(Status::from)
            }
            "default_repository" if !value.is_empty() => validate::repository(value).map_err(Status::from),
            _ => Ok(()),
        }
    }

    fn check_model(&self, setting: &str, model: &str) -> Result<(), Status> {
        if self.models.scripted.contains_key(model) {
            return Ok(());
        }
        Err(Status::invalid_argument(format!(
            "setting {setting}: model {model:?} is not offered by this node; models: {}",
            self.models.names()
        )))
    }
}

#[tonic::async_trait]
impl SettingsService for SettingsApi {
    async fn get_settings(
        &self,
        request: Request<v1::GetSettingsRequest>,
    ) -> Result<tonic::Response<v1::TeamSettings>, Status> {
        let caller = principal(&request)?;
        let team = team_for(&caller, &request.get_ref().team)?;
        let settings = self.settings(&team).await?;
        Ok(tonic::Response::new(wire(&team, &settings)))
    }

    async fn set_setting(
        &self,
        request: Request<v1::SetSettingRequest>,
    ) -> Result<tonic::Response<v1::TeamSettings>, Status> {
        let caller = principal(&request)?;
        let audit_note = super::audit::note_of(&request);
        let body = request.into_inner();
        let team = team_for(&caller, &body.team)?;
        audit_note.set(body.name.clone(), Some(&team));
        if !SETTING_NAMES.contains(&body.name.as_str()) {
            return Err(Status::invalid_argument(format!(
                "name: unknown setting {:?}; settings: {}",
                body.name,
                SETTING_NAMES.join(", ")
            )));
        }
        self.check_value(&body.name, &body.value)?;
        let command = Command::SetTeamSetting {
            team: team.clone(),
            name: body.name.clone(),
            value: body.value,
        };
        match self.replica.write(command).await {
            Ok(Response::TeamSettings(settings)) => {
                tracing::info!(%team, setting = %body.name, by = %caller.key_id, "team setting changed");
                Ok(tonic::Response::new(wire(&team, &settings)))
            }
            Ok(other) => Err(Status::internal(format!(
                "unexpected answer to set-team-setting: {other:?}"
            ))),
            Err(error) => Err(write_status(error)),
        }
    }

    async fn list_models(
        &self,
        request: Request<v1::ListModelsRequest>,
    ) -> Result<tonic::Response<v1::ListModelsResponse>, Status> {
        let caller = principal(&request)?;
        let team = team_for(&caller, &request.get_ref().team)?;
        let settings = self.settings(&team).await?;
        let default = if settings.default_model.is_empty() {
            self.models.default_model.clone().unwrap_or_default()
        } else {
            settings.default_model.clone()
        };
        let models = self
            .models
            .scripted
            .iter()
            .map(|(name, scripted)| v1::Model {
                name: name.clone(),
                allowed: settings.allows_model(name),
                default: *name == default,
                scripted: *scripted,
            })
            .collect();
        Ok(tonic::Response::new(v1::ListModelsResponse { team, models }))
    }
}
