//! `flotilla secret ...`: team, user and cluster secrets. A value is read from standard input,
//! never from the command line (where every process on the machine could read it).

use std::io::Read;

use flotilla_proto::v1::secret_service_client::SecretServiceClient;
use flotilla_proto::v1::{ListSecretsRequest, RemoveSecretRequest, SecretScopeKind, SetSecretRequest};
use flotilla_raft::secrets::{validate_secret_name, MAX_SECRET_VALUE_BYTES};
use flotilla_raft::SecretScope;

use super::client::{connect, unary, BearerToken, CliError};
use super::{print_json, print_text, ClientArgs, OutputFormat};

#[derive(clap::Args, Debug, Clone)]
pub struct ScopeArgs {
    /// a secret of this team (default: the token's team)
    #[arg(long, conflicts_with_all = ["user", "cluster"])]
    team: Option<String>,
    /// a secret of the token's own user
    #[arg(long, conflicts_with = "cluster")]
    user: bool,
    /// a node-level secret (model keys, git credentials, plugin tokens; admin token)
    #[arg(long)]
    cluster: bool,
}

impl ScopeArgs {
    fn kind(&self) -> SecretScopeKind {
        match (self.user, self.cluster) {
            (true, _) => SecretScopeKind::User,
            (_, true) => SecretScopeKind::Cluster,
            _ => SecretScopeKind::Team,
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum SecretCommand {
    /// Set a secret; its value is read from standard input (one trailing newline dropped)
    Set {
        /// the name, an environment variable name
        name: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List the secrets the token may see: names, scopes and update times, never values
    List,
    /// Remove a secret
    Rm {
        name: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

/// The value on standard input, without one trailing newline.
fn read_value() -> Result<Vec<u8>, CliError> {
    let mut value = Vec::new();
    std::io::stdin()
        .take(MAX_SECRET_VALUE_BYTES as u64 + 2)
        .read_to_end(&mut value)
        .map_err(|error| CliError::Usage(format!("cannot read the secret value from standard input: {error}")))?;
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(CliError::Usage(
            "the secret value is empty: give it on standard input, e.g. `printf %s \"$VALUE\" | flotilla secret set NAME`"
                .to_string(),
        ));
    }
    if value.len() > MAX_SECRET_VALUE_BYTES {
        return Err(CliError::Usage(format!(
            "the secret value is over {MAX_SECRET_VALUE_BYTES} bytes"
        )));
    }
    Ok(value)
}

pub(crate) async fn secret_command(args: &ClientArgs, cmd: SecretCommand) -> Result<(), CliError> {
    let token = BearerToken::new(args.token.as_deref())?;
    let endpoint = args.endpoint.as_str();
    let value = match &cmd {
        SecretCommand::Set { name, scope } => {
            let checked = if scope.cluster {
                SecretScope::Cluster
            } else {
                SecretScope::Team { team: "t".to_string() }
            };
            validate_secret_name(&checked, name).map_err(CliError::Usage)?;
            Some(
                tokio::task::spawn_blocking(read_value)
                    .await
                    .map_err(|error| CliError::Usage(format!("reading standard input failed: {error}")))??,
            )
        }
        _ => None,
    };
    let mut client = SecretServiceClient::with_interceptor(connect(args).await?, token);
    match cmd {
        SecretCommand::Set { name, scope } => {
            let info = unary(
                endpoint,
                client.set_secret(SetSecretRequest {
                    name,
                    value: value.unwrap_or_default(),
                    scope: scope.kind() as i32,
                    team: scope.team.unwrap_or_default(),
                }),
            )
            .await?;
            match args.output {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "name": info.name, "scope": info.scope, "updated_at_ms": info.updated_at_ms,
                })),
                OutputFormat::Table => print_text(&format!("set {} ({})", info.name, info.scope)),
            }
        }
        SecretCommand::Rm { name, scope } => {
            unary(
                endpoint,
                client.remove_secret(RemoveSecretRequest {
                    name: name.clone(),
                    scope: scope.kind() as i32,
                    team: scope.team.unwrap_or_default(),
                }),
            )
            .await?;
            print_text(&format!("removed {name}"))
        }
        SecretCommand::List => {
            let response = unary(endpoint, client.list_secrets(ListSecretsRequest {})).await?;
            match args.output {
                OutputFormat::Json => print_json(&serde_json::Value::Array(
                    response
                        .secrets
                        .iter()
                        .map(|info| {
                            serde_json::json!({
                                "name": info.name, "scope": info.scope,
                                "updated_at_ms": info.updated_at_ms, "updated_by": info.updated_by,
                            })
                        })
                        .collect(),
                )),
                OutputFormat::Table => {
                    let mut lines = vec![format!(
                        "{:<32} {:<32} {:<15} UPDATED BY",
                        "NAME", "SCOPE", "UPDATED (ms)"
                    )];
                    for info in &response.secrets {
                        lines.push(format!(
                            "{:<32} {:<32} {:<15} {}",
                            info.name, info.scope, info.updated_at_ms, info.updated_by
                        ));
                    }
                    print_text(&lines.join("\n"))
                }
            }
        }
    }
}
