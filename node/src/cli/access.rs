//! `flotilla team ...` and `flotilla key ...`: teams and API keys. A new key's secret is printed
//! once, on stdout's last line, so a script can take it with `tail -n 1`.

use flotilla_proto::v1::access_service_client::AccessServiceClient;
use flotilla_proto::v1::{
    CreateKeyRequest, CreateTeamRequest, GetKeyInfoRequest, GetTeamRequest, Key, ListKeysRequest, ListTeamsRequest,
    RevokeKeyRequest, Team,
};

use super::client::{connect, unary, BearerToken, CliError};
use super::{print_json, print_text, ClientArgs, OutputFormat};

#[derive(clap::Subcommand, Debug)]
pub enum TeamCommand {
    /// Create a team (cluster-admin key)
    Create {
        /// lowercase letters, digits, '-', '_', '.', '@'
        name: String,
    },
    /// List the teams (cluster-admin key)
    List,
    /// One team and the external ID its AWS role's trust policy names (cluster-admin key or
    /// the team's admin)
    Show {
        /// the team (the caller's own when absent)
        name: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyCommand {
    /// Create a key for a user of a team; the key is printed once, on the last line
    Create {
        /// the team (the caller's own when absent)
        #[arg(long)]
        team: Option<String>,
        /// the user the key belongs to
        #[arg(long)]
        user: String,
        /// viewer, member, admin or cluster-admin
        #[arg(long, default_value = "member")]
        role: String,
        /// lifetime, such as 30d, 12h or 45m (no expiry when absent)
        #[arg(long, value_parser = lifetime_seconds)]
        expires: Option<u64>,
    },
    /// List the keys the caller manages (ids, never secrets)
    List {
        /// only this team's keys
        #[arg(long)]
        team: Option<String>,
    },
    /// Who am I: the calling key's team, user, role, id and expiry
    Info,
    /// Revoke a key by id; its next call is refused on every node
    Revoke {
        /// the key id, as `key list` shows it
        id: String,
    },
}

/// A lifetime such as `30d`, `12h`, `45m` or `90s`, in seconds.
pub(crate) fn lifetime_seconds(text: &str) -> Result<u64, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a lifetime: write a number and a unit, such as 30d, 12h or 45m"))?;
    let unit_seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{text:?}: unit {unit:?} is not one of d, h, m, s")),
    };
    match number.checked_mul(unit_seconds) {
        Some(0) | None => Err(format!("{text:?}: a lifetime must be above zero and below ten years")),
        Some(seconds) => Ok(seconds),
    }
}

fn at(timestamp: &Option<prost_types::Timestamp>) -> String {
    // prost's Timestamp prints RFC 3339; to the second, as in the other tables.
    timestamp
        .as_ref()
        .map(|at| {
            prost_types::Timestamp {
                seconds: at.seconds,
                nanos: 0,
            }
            .to_string()
        })
        .unwrap_or_else(|| "never".to_string())
}

fn key_json(key: &Key) -> serde_json::Value {
    serde_json::json!({
        "id": key.id,
        "team": key.team,
        "user": key.user,
        "role": key.role,
        "created_at": at(&key.created_at),
        "expires_at": key.expires_at.as_ref().map(|_| at(&key.expires_at)),
    })
}

fn key_line(key: &Key) -> String {
    format!(
        "{:<26} {:<16} {:<16} {:<13} expires {}",
        key.id,
        key.team,
        key.user,
        key.role,
        at(&key.expires_at)
    )
}

fn team_json(team: &Team) -> serde_json::Value {
    serde_json::json!({ "name": team.name, "created_at": team.created_at.as_ref().map(|_| at(&team.created_at)) })
}

async fn client(args: &ClientArgs) -> Result<AccessServiceClient<super::client::AuthenticatedChannel>, CliError> {
    let token = BearerToken::new(args.token.as_deref())?;
    Ok(AccessServiceClient::with_interceptor(connect(args).await?, token))
}

pub(crate) async fn team_command(args: &ClientArgs, cmd: TeamCommand) -> Result<(), CliError> {
    let endpoint = args.endpoint.as_str();
    let mut client = client(args).await?;
    let teams = match cmd {
        TeamCommand::Create { name } => vec![unary(endpoint, client.create_team(CreateTeamRequest { name })).await?],
        TeamCommand::List => unary(endpoint, client.list_teams(ListTeamsRequest {})).await?.teams,
        TeamCommand::Show { name } => {
            let request = GetTeamRequest {
                name: name.unwrap_or_default(),
            };
            let team = unary(endpoint, client.get_team(request)).await?;
            return match args.output {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "name": team.name,
                    "created_at": team.created_at.as_ref().map(|_| at(&team.created_at)),
                    "aws_external_id": team.aws_external_id,
                })),
                OutputFormat::Table => print_text(&format!(
                    "name: {}\naws external id: {}",
                    team.name, team.aws_external_id
                )),
            };
        }
    };
    match args.output {
        OutputFormat::Json => print_json(&serde_json::Value::Array(teams.iter().map(team_json).collect())),
        OutputFormat::Table => print_text(
            &teams
                .iter()
                .map(|team| team.name.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }
}

pub(crate) async fn key_command(args: &ClientArgs, cmd: KeyCommand) -> Result<(), CliError> {
    let endpoint = args.endpoint.as_str();
    let mut client = client(args).await?;
    let keys = match cmd {
        KeyCommand::Create {
            team,
            user,
            role,
            expires,
        } => {
            let request = CreateKeyRequest {
                team: team.unwrap_or_default(),
                user,
                role,
                expires_in_seconds: expires.unwrap_or(0),
            };
            let created = unary(endpoint, client.create_key(request)).await?;
            let key = created.key.unwrap_or_default();
            return match args.output {
                OutputFormat::Json => {
                    let mut value = key_json(&key);
                    value["secret"] = serde_json::Value::String(created.secret);
                    print_json(&value)
                }
                OutputFormat::Table => {
                    print_text(&key_line(&key))?;
                    print_text("the key below is shown once; only its digest is stored")?;
                    print_text(&created.secret)
                }
            };
        }
        KeyCommand::List { team } => {
            let request = ListKeysRequest {
                team: team.unwrap_or_default(),
            };
            unary(endpoint, client.list_keys(request)).await?.keys
        }
        KeyCommand::Info => vec![unary(endpoint, client.get_key_info(GetKeyInfoRequest {})).await?],
        KeyCommand::Revoke { id } => vec![unary(endpoint, client.revoke_key(RevokeKeyRequest { id })).await?],
    };
    match args.output {
        OutputFormat::Json => print_json(&serde_json::Value::Array(keys.iter().map(key_json).collect())),
        OutputFormat::Table => print_text(&keys.iter().map(key_line).collect::<Vec<_>>().join("\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::lifetime_seconds;

    #[test]
    fn lifetimes_take_days_hours_minutes_and_seconds() {
        assert_eq!(lifetime_seconds("30d"), Ok(30 * 86_400));
        assert_eq!(lifetime_seconds("12h"), Ok(12 * 3_600));
        assert_eq!(lifetime_seconds("45m"), Ok(45 * 60));
        assert_eq!(lifetime_seconds("5s"), Ok(5));
        assert!(lifetime_seconds("0d").is_err());
        assert!(lifetime_seconds("30").unwrap_err().contains("unit"));
        assert!(lifetime_seconds("d").is_err());
        assert!(lifetime_seconds("3w").unwrap_err().contains("\"w\""));
    }
}
