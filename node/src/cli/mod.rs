//! The client half of the `flotilla` binary: `flotilla agent ...`, `flotilla cluster ...` and
//! `flotilla plugin ...`.
//!
//! Each command connects to one node over gRPC (any node: followers forward writes to the
//! leader), sends the bearer token on every call, and prints either a table for people or JSON
//! for scripts. Failures print one `error: ...` line to standard error and exit with code 1;
//! usage errors are clap's own, with code 2.

mod access;
mod attach;
mod audit;
mod backup;
mod client;
mod json;
mod plugin;
mod render;
mod secret;
mod settings;
mod wait;
mod watch;

use std::io::Write;
use std::process::ExitCode;

use flotilla_proto::v1::{
    AddNodeRequest, Agent, AgentStatus, CreateAgentRequest, CreateJoinTokenRequest, DeleteAgentRequest,
    DrainNodeRequest, GetAgentRequest, GetClusterRequest, ListAgentsRequest, RemoveNodeRequest, SendFollowUpRequest,
    StopAgentRequest,
};

pub use access::{KeyCommand, TeamCommand};
pub use audit::{AuditCommand, LimitsCommand};
pub use backup::AdminCommand;
pub use plugin::PluginCommand;
pub use secret::SecretCommand;
pub use settings::{ModelsCommand, SettingsCommand};

pub(crate) use client::{agent_client, cluster_client, connect, unary, AgentClient, BearerToken, CliError};

/// Largest page asked of the server; the API accepts 1..=500.
const MAX_PAGE_SIZE: u32 = 500;

// Options shared by every client command. A plain comment: a doc comment here would become
// the `about` of whichever command flattens these arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// gRPC endpoint of any node
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ENDPOINT",
        default_value = "https://127.0.0.1:7420"
    )]
    pub endpoint: String,
    /// PEM certificate of the cluster CA (DATA_DIR/ca.pem of the first node) to check the node against
    #[arg(long, global = true, env = "FLOTILLA_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// bearer token
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// output format
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// tables and lines for people
    Table,
    /// JSON with the proto field names, for scripts (NDJSON for `agent watch`)
    Json,
}

/// The statuses `agent list --status` filters on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Pending,
    Provisioning,
    Running,
    Finished,
    Failed,
    Stopped,
}

impl From<StatusFilter> for AgentStatus {
    fn from(filter: StatusFilter) -> Self {
        match filter {
            StatusFilter::Pending => AgentStatus::Pending,
            StatusFilter::Provisioning => AgentStatus::Provisioning,
            StatusFilter::Running => AgentStatus::Running,
            StatusFilter::Finished => AgentStatus::Finished,
            StatusFilter::Failed => AgentStatus::Failed,
            StatusFilter::Stopped => AgentStatus::Stopped,
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// Create an agent and print its id
    Create {
        /// git repository URL (the team's default_repository when absent)
        #[arg(long, value_name = "URL")]
        repo: Option<String>,
        /// what the agent should do
        #[arg(long, value_name = "TEXT")]
        prompt: String,
        /// display name (derived from the prompt when absent)
        #[arg(long)]
        name: Option<String>,
        /// model (the team's default when absent)
        #[arg(long)]
        model: Option<String>,
        /// branch to start from (the team's default_base_branch, else the origin's HEAD, when absent)
        #[arg(long, value_name = "BRANCH")]
        base: Option<String>,
        /// run only on nodes of this region
        #[arg(long, value_name = "REGION")]
        region: Option<String>,
        /// branch the agent commits to (flotilla/<id>-<name> when absent)
        #[arg(long, value_name = "WORK_BRANCH")]
        branch: Option<String>,
        /// open a pull request when the agent finishes
        #[arg(long)]
        open_pr: bool,
        /// a host the machine may reach through the node's egress proxy (repeatable): NAME,
        /// *.NAME, an address or a network, with :PORT (443 when absent)
        #[arg(long = "allow-host", value_parser = host_pattern)]
        allow_hosts: Vec<String>,
    },
    /// List agents, newest first
    List {
        /// case-insensitive text searched in name, prompt and summary
        #[arg(long)]
        search: Option<String>,
        /// only agents with this status (repeatable)
        #[arg(long = "status", value_enum, value_name = "STATUS", value_delimiter = ',')]
        statuses: Vec<StatusFilter>,
        /// only agents on this repository URL
        #[arg(long, value_name = "URL")]
        repo: Option<String>,
        /// only agents constrained to this region
        #[arg(long)]
        region: Option<String>,
        /// at most this many agents, fetched page by page
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Show one agent
    Get {
        /// agent id
        id: String,
    },
    /// Follow an agent's events until it reaches a final status
    Watch {
        /// agent id
        id: String,
        /// start after this durable sequence number (0 replays the retained history)
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
    },
    /// Send a follow-up instruction to an agent
    #[command(visible_alias = "follow-up")]
    Followup {
        /// agent id
        id: String,
        /// the follow-up instruction
        text: String,
    },
    /// Join a terminal of the agent's machine (Ctrl-] detaches)
    Attach {
        /// agent id
        id: String,
        /// a terminal from environment.json; the shell when absent
        #[arg(long)]
        terminal: Option<String>,
        /// type into the terminal; the agent waits until you detach
        #[arg(long)]
        takeover: bool,
    },
    /// Delete an agent cluster-wide: stops it if it runs, removes its record, events and
    /// checkpoint (its pushed branch at the origin stays)
    Delete {
        /// agent id
        id: String,
    },
    /// Stop an agent
    Stop {
        /// agent id
        id: String,
        /// why, recorded in the agent's history
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the members, the leader and the replication progress
    Status,
    /// Register a node started with --join, or promote a learner to a voter
    AddNode {
        node_id: u64,
        /// make the node a voter (otherwise it is a learner that runs agents)
        #[arg(long)]
        voter: bool,
    },
    /// Remove a node from the cluster
    RemoveNode { node_id: u64 },
    /// Stop placing new agents on a node; running agents finish where they are
    Drain {
        node_id: u64,
        /// lift the drain
        #[arg(long)]
        undo: bool,
    },
    /// Wait until the node serves and, with --members, until that many members are up under
    /// a leader; exits 1 with the last reason after --timeout
    Wait {
        /// members that must be up (needs a token)
        #[arg(long)]
        members: Option<usize>,
        /// give up after this long: a number and s, m, h or d
        #[arg(long, default_value = "60s", value_parser = parse_expiry)]
        timeout: std::time::Duration,
    },
    /// Mint a single-use token that lets one new node join (`flotilla node --join-token`);
    /// printed once, on the last line
    JoinToken {
        /// how long the token stays valid: a number and s, m, h or d
        #[arg(long, default_value = "1h", value_parser = parse_expiry)]
        expires: std::time::Duration,
    },
}

/// `90s`, `30m`, `1h`, `7d`.
fn parse_expiry(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a number and a unit (s, m, h or d), such as 1h; found {text:?}"))?;
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use s, m, h or d")),
    };
    if number == 0 {
        return Err(format!("the expiry must be more than zero, found {text:?}"));
    }
    Ok(std::time::Duration::from_secs(number.saturating_mul(seconds_per_unit)))
}

/// Prints the error the way every client command does and picks the exit code.
fn finish(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &serde_json::Value) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value).map_err(std::io::Error::from)?;
    writeln!(stdout)?;
    Ok(())
}

fn print_text(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}

fn or_empty(value: Option<String>) -> String {
    value.unwrap_or_default()
}

pub async fn run_agent(args: &ClientArgs, cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(agent_command(args, cmd).await))
}

pub async fn run_cluster(args: &ClientArgs, cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(cluster_command(args, cmd).await))
}

pub async fn run_team(args: &ClientArgs, cmd: TeamCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(access::team_command(args, cmd).await))
}

pub async fn run_key(args: &ClientArgs, cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(access::key_command(args, cmd).await))
}

pub async fn run_settings(args: &ClientArgs, cmd: SettingsCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(settings::settings_command(args, cmd).await))
}

pub async fn run_models(args: &ClientArgs, cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(settings::models_command(args, cmd).await))
}

pub async fn run_audit(args: &ClientArgs, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(audit::audit_command(args, cmd).await))
}

pub async fn run_limits(args: &ClientArgs, cmd: LimitsCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(audit::limits_command(args, cmd).await))
}

pub async fn run_plugin(args: &ClientArgs, cmd: PluginCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(plugin::plugin_command(args, cmd).await))
}

pub async fn run_secret(args: &ClientArgs, cmd: SecretCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(secret::secret_command(args, cmd).await))
}

pub async fn run_admin(args: &ClientArgs, cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    Ok(finish(backup::admin_command(args, cmd).await))
}

async fn agent_command(args: &ClientArgs, cmd: AgentCommand) -> Result<(), CliError> {
    let token = BearerToken::new(args.token.as_deref())?;
    let endpoint = args.endpoint.as_str();
    let mut client = agent_client(connect(args).await?, token.clone());
    match cmd {
        AgentCommand::Create {
            repo,
            prompt,
            name,
            model,
            base,
            region,
            branch,
            open_pr,
            allow_hosts,
        } => {
            let request = CreateAgentRequest {
                prompt,
                repository: or_empty(repo),
                base_branch: or_empty(base),
                name: or_empty(name),
                model: or_empty(model),
                region: or_empty(region),
                work_branch: or_empty(branch),
                open_pull_request: open_pr,
                egress_allow: allow_hosts,
            };
            let response = unary(endpoint, client.create_agent(request)).await?;
            let agent = response.agent.ok_or_else(|| {
                CliError::Rpc(tonic::Status::internal(
                    "the node acknowledged the create but returned no agent",
                ))
            })?;
            match args.output {
                OutputFormat::Json => print_json(&json::agent(&agent)),
                OutputFormat::Table => print_text(&agent.id),
            }
        }
        AgentCommand::List {
            search,
            statuses,
            repo,
            region,
            limit,
        } => {
            let filter = ListAgentsRequest {
                statuses: statuses
                    .iter()
                    .map(|status| AgentStatus::from(*status) as i32)
                    .collect(),
                repository: or_empty(repo),
                region: or_empty(region),
                search: or_empty(search),
                ..ListAgentsRequest::default()
            };
            let agents = list_agents(endpoint, &mut client, filter, limit).await?;
            match args.output {
                OutputFormat::Json => print_json(&serde_json::Value::Array(agents.iter().map(json::agent).collect())),
                OutputFormat::Table => print_text(&render::agent_list(&agents)),
            }
        }
        AgentCommand::Get { id } => {
            let agent = unary(endpoint, client.get_agent(GetAgentRequest { id })).await?;
            match args.output {
                OutputFormat::Json => print_json(&json::agent(&agent)),
                OutputFormat::Table => print_text(&render::agent_record(&agent)),
            }
        }
        AgentCommand::Watch { id, after } => watch::watch(endpoint, &mut client, &id, after, args.output).await,
        AgentCommand::Followup { id, text } => send_follow_up(args, &mut client, id, text).await,
        AgentCommand::Attach { id, terminal, takeover } => {
            attach::attach(args, token.clone(), id, terminal, takeover).await
        }
        AgentCommand::Delete { id } => {
            let answer = unary(endpoint, client.delete_agent(DeleteAgentRequest { id: id.clone() })).await?;
            match (args.output, answer.agent) {
                (OutputFormat::Json, Some(agent)) => print_json(&json::agent(&agent)),
                _ => print_text(&format!("{id} deleted")),
            }
        }
        AgentCommand::Stop { id, reason } => {
            let agent = unary(
                endpoint,
                client.stop_agent(StopAgentRequest {
                    id,
                    reason: or_empty(reason),
                }),
            )
            .await?;
            match args.output {
                OutputFormat::Json => print_json(&json::agent(&agent)),
                OutputFormat::Table => print_text(&format!("{} {}", agent.id, render::short_status(agent.status))),
            }
        }
    }
}

/// Up to `limit` agents matching `filter`, page after page.
async fn list_agents(
    endpoint: &str,
    client: &mut AgentClient,
    filter: ListAgentsRequest,
    limit: u32,
) -> Result<Vec<Agent>, CliError> {
    let mut agents = Vec::new();
    let mut page_token = String::new();
    while agents.len() < limit as usize {
        let remaining = limit - agents.len() as u32;
        let request = ListAgentsRequest {
            page_size: remaining.min(MAX_PAGE_SIZE) as i32,
            page_token: page_token.clone(),
            ..filter.clone()
        };
        let page = unary(endpoint, client.list_agents(request)).await?;
        // An empty page ends the listing even with a token, so a confused server
        // cannot keep the loop going.
        let page_was_empty = page.agents.is_empty();
        agents.extend(page.agents);
        if page.next_page_token.is_empty() || page_was_empty {
            break;
        }
        page_token = page.next_page_token;
    }
    agents.truncate(limit as usize);
    Ok(agents)
}

async fn send_follow_up(args: &ClientArgs, client: &mut AgentClient, id: String, text: String) -> Result<(), CliError> {
    let response = unary(
        args.endpoint.as_str(),
        client.send_follow_up(SendFollowUpRequest { id: id.clone(), text }),
    )
    .await?;
    match args.output {
        OutputFormat::Json => print_json(&json::follow_up_response(&response)),
        OutputFormat::Table => {
            let status = response
                .agent
                .as_ref()
                .map(|agent| render::short_status(agent.status))
                .unwrap_or_else(|| "-".to_string());
            print_text(&format!("follow-up #{} sent to {id} (status {status})", response.index))
        }
    }
}

async fn cluster_command(args: &ClientArgs, cmd: ClusterCommand) -> Result<(), CliError> {
    if let ClusterCommand::Wait { members, timeout } = cmd {
        return wait::wait(args, members, timeout).await;
    }
    let token = BearerToken::new(args.token.as_deref())?;
    let endpoint = args.endpoint.as_str();
    let mut client = cluster_client(connect(args).await?, token);
    let cluster = match cmd {
        ClusterCommand::JoinToken { expires } => {
            let minted = unary(
                endpoint,
                client.create_join_token(CreateJoinTokenRequest {
                    expires_in_seconds: expires.as_secs(),
                }),
            )
            .await?;
            return match args.output {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "token": minted.token,
                    "expires_at": minted.expires_at.map(|at| at.seconds),
                })),
                OutputFormat::Table => {
                    eprintln!(
                        "single-use join token, valid for {} s; start the new node with --join {endpoint} --join-token TOKEN (or FLOTILLA_JOIN_TOKEN):",
                        expires.as_secs()
                    );
                    print_text(&minted.token)
                }
            };
        }
        ClusterCommand::Status => unary(endpoint, client.get_cluster(GetClusterRequest {})).await?,
        ClusterCommand::AddNode { node_id, voter } => {
            unary(endpoint, client.add_node(AddNodeRequest { node_id, voter })).await?
        }
        ClusterCommand::RemoveNode { node_id } => {
            unary(endpoint, client.remove_node(RemoveNodeRequest { node_id })).await?
        }
        ClusterCommand::Drain { node_id, undo } => {
            unary(endpoint, client.drain_node(DrainNodeRequest { node_id, drain: !undo })).await?
        }
        // Answered above, before the eager connect a not-yet-started node would fail.
        ClusterCommand::Wait { members, timeout } => return wait::wait(args, members, timeout).await,
    };
    match args.output {
        OutputFormat::Json => print_json(&json::cluster(&cluster)),
        OutputFormat::Table => print_text(&render::cluster(&cluster)),
    }
}

/// A host pattern as the node will read it (`flotilla_state::host_pattern`), so a bad one is
/// refused before anything is sent.
pub(crate) fn host_pattern(text: &str) -> Result<String, String> {
    text.parse::<flotilla_state::host_pattern::HostPattern>()
        .map(|_| text.to_string())
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AgentCommand,
    }

    #[test]
    fn list_accepts_repeated_and_comma_separated_statuses() {
        let cli =
            TestCli::try_parse_from(["flotilla", "list", "--status", "running", "--status", "failed,stopped"]).unwrap();
        let AgentCommand::List { statuses, limit, .. } = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(
            statuses,
            vec![StatusFilter::Running, StatusFilter::Failed, StatusFilter::Stopped]
        );
        assert_eq!(limit, 50);
    }

    #[test]
    fn global_options_follow_the_subcommand() {
        let cli = TestCli::try_parse_from([
            "flotilla",
            "get",
            "01HZX",
            "--output",
            "json",
            "--endpoint",
            "http://n2:7420",
        ])
        .unwrap();
        assert_eq!(cli.client.output, OutputFormat::Json);
        assert_eq!(cli.client.endpoint, "http://n2:7420");
    }

    #[test]
    fn create_requires_repo_and_prompt() {
        assert!(TestCli::try_parse_from(["flotilla", "create", "--repo", "r"]).is_err());
        let cli = TestCli::try_parse_from(["flotilla", "create", "--repo", "r", "--prompt", "p", "--open-pr"]).unwrap();
        assert!(matches!(cli.command, AgentCommand::Create { open_pr: true, .. }));
    }
}
