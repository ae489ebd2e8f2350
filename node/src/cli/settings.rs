//! `flotilla settings ...` and `flotilla models list`: a team's settings and the models this
//! node offers, marked allowed or not for the team.

use flotilla_proto::v1::settings_service_client::SettingsServiceClient;
use flotilla_proto::v1::{GetSettingsRequest, ListModelsRequest, SetSettingRequest, TeamSettings};

use super::client::{connect, unary, AuthenticatedChannel, BearerToken, CliError};
use super::{print_json, print_text, ClientArgs, OutputFormat};

#[derive(clap::Subcommand, Debug)]
pub enum SettingsCommand {
    /// Show a team's settings (the caller's team when --team is absent)
    Get {
        /// another team (cluster-admin key)
        #[arg(long)]
        team: Option<String>,
    },
    /// Change one setting (team admin or cluster-admin key): default_model, default_repository,
    /// default_base_branch (blank: the repository's default branch), display_summary on|off,
    /// allowed_models a,b (blank: all), retention 7d|12h|30m|45s|never, privacy_mode on|off
    Set {
        /// the setting's name
        name: String,
        /// its new value ("" clears a text setting)
        value: String,
        /// another team (cluster-admin key)
        #[arg(long)]
        team: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ModelsCommand {
    /// The models this node offers, and which the team's agents may use
    List {
        /// another team (cluster-admin key)
        #[arg(long)]
        team: Option<String>,
    },
}

async fn client(args: &ClientArgs) -> Result<SettingsServiceClient<AuthenticatedChannel>, CliError> {
    let token = BearerToken::new(args.token.as_deref())?;
    Ok(SettingsServiceClient::with_interceptor(connect(args).await?, token))
}

fn print_settings(args: &ClientArgs, settings: &TeamSettings) -> Result<(), CliError> {
    match args.output {
        OutputFormat::Json => {
            let values: serde_json::Map<String, serde_json::Value> = settings
                .settings
                .iter()
                .map(|setting| (setting.name.clone(), serde_json::Value::String(setting.value.clone())))
                .collect();
            print_json(&serde_json::json!({ "team": settings.team, "settings": values }))
        }
        OutputFormat::Table => {
            let mut lines = vec![format!("team {}", settings.team)];
            lines.extend(
                settings
                    .settings
                    .iter()
                    .map(|setting| format!("{:<20} {}", setting.name, setting.value)),
            );
            print_text(&lines.join("\n"))
        }
    }
}

pub(crate) async fn settings_command(args: &ClientArgs, cmd: SettingsCommand) -> Result<(), CliError> {
    let endpoint = args.endpoint.as_str();
    let mut client = client(args).await?;
    let settings = match cmd {
        SettingsCommand::Get { team } => {
            let request = GetSettingsRequest {
                team: team.unwrap_or_default(),
            };
            unary(endpoint, client.get_settings(request)).await?
        }
        SettingsCommand::Set { name, value, team } => {
            let request = SetSettingRequest {
                team: team.unwrap_or_default(),
                name,
                value,
            };
            unary(endpoint, client.set_setting(request)).await?
        }
    };
    print_settings(args, &settings)
}

pub(crate) async fn models_command(args: &ClientArgs, cmd: ModelsCommand) -> Result<(), CliError> {
    let endpoint = args.endpoint.as_str();
    let mut client = client(args).await?;
    let ModelsCommand::List { team } = cmd;
    let request = ListModelsRequest {
        team: team.unwrap_or_default(),
    };
    let answer = unary(endpoint, client.list_models(request)).await?;
    match args.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "team": answer.team,
            "models": answer.models.iter().map(|model| serde_json::json!({
                "name": model.name,
                "allowed": model.allowed,
                "default": model.default,
                "scripted": model.scripted,
            })).collect::<Vec<_>>(),
        })),
        OutputFormat::Table => {
            let mut lines = vec![format!("{:<24} {:<12} {:<8} scripted", "MODEL", "ALLOWED", "DEFAULT")];
            lines.extend(answer.models.iter().map(|model| {
                format!(
                    "{:<24} {:<12} {:<8} {}",
                    model.name,
                    if model.allowed { "allowed" } else { "not allowed" },
                    if model.default { "default" } else { "" },
                    if model.scripted { "yes" } else { "no" }
                )
            }));
            print_text(&lines.join("\n"))
        }
    }
}
