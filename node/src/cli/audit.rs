//! `flotilla audit list` (the audit log, oldest first) and `flotilla limits get|set` (per-team
//! limits on agents).

use flotilla_proto::v1::audit_service_client::AuditServiceClient;
use flotilla_proto::v1::limits_service_client::LimitsServiceClient;
use flotilla_proto::v1::{AuditEvent, GetTeamLimitsRequest, ListAuditEventsRequest, SetTeamLimitsRequest, TeamLimits};

use super::access::lifetime_seconds;
use super::client::{connect, unary, BearerToken, CliError};
use super::{print_json, print_text, ClientArgs, OutputFormat, MAX_PAGE_SIZE};

/// Most entries `audit list` prints: the newest pages past this are left for `--since`.
const MAX_LISTED_EVENTS: usize = 10_000;

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// List audit entries, oldest first (team admin: its team's; cluster-admin: all)
    List {
        /// only this team's entries
        #[arg(long)]
        team: Option<String>,
        /// only entries this recent, such as 1h, 30m or 7d
        #[arg(long, value_parser = lifetime_seconds)]
        since: Option<u64>,
        /// print JSON (the same as `--output json`)
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum LimitsCommand {
    /// Show a team's limits (its own and those in force)
    Get {
        /// the team (the caller's own when absent)
        #[arg(long, conflicts_with = "cluster_default")]
        team: Option<String>,
        /// the cluster default, which every team without its own limit gets
        #[arg(long = "default")]
        cluster_default: bool,
    },
    /// Set a team's limits, or the cluster default (cluster-admin key); an absent limit is cleared
    Set {
        #[arg(
            long,
            required_unless_present = "cluster_default",
            conflicts_with = "cluster_default"
        )]
        team: Option<String>,
        #[arg(long = "default")]
        cluster_default: bool,
        /// most agents of the team not finished, failed or stopped
        #[arg(long)]
        max_running_agents: Option<u32>,
        /// most agents the team may create per minute
        #[arg(long)]
        creates_per_minute: Option<u32>,
    },
}

fn event_json(event: &AuditEvent) -> serde_json::Value {
    serde_json::json!({
        "sequence": event.sequence,
        "at": event.at.map(|at| at.to_string()),
        "node": event.node,
        "key_id": event.key_id,
        "user": event.user,
        "team": event.team,
        "target_team": event.target_team,
        "method": event.method,
        "target": event.target,
        "result": event.result,
    })
}

fn event_line(event: &AuditEvent) -> String {
    let at = event
        .at
        .map(|at| prost_types::Timestamp { nanos: 0, ..at }.to_string())
        .unwrap_or_default();
    let team = if event.target_team.is_empty() {
        event.team.clone()
    } else {
        format!("{}→{}", event.team, event.target_team)
    };
    format!(
        "{at} node {:<3} {:<26} {:<12} {:<16} {:<32} {:<28} {}",
        event.node, event.key_id, event.user, team, event.method, event.target, event.result
    )
}

fn limit_text(value: u32) -> String {
    if value == 0 {
        "none".to_string()
    } else {
        value.to_string()
    }
}

fn limits_json(limits: &TeamLimits) -> serde_json::Value {
    serde_json::json!({
        "team": limits.team,
        "max_running_agents": limits.max_running_agents,
        "creates_per_minute": limits.creates_per_minute,
        "effective_max_running_agents": limits.effective_max_running_agents,
        "effective_creates_per_minute": limits.effective_creates_per_minute,
    })
}

fn limits_lines(limits: &TeamLimits) -> String {
    let team = if limits.team.is_empty() {
        "cluster default"
    } else {
        &limits.team
    };
    format!(
        "{team}\nmax_running_agents  {} (in force: {})\ncreates_per_minute  {} (in force: {})",
        limit_text(limits.max_running_agents),
        limit_text(limits.effective_max_running_agents),
        limit_text(limits.creates_per_minute),
        limit_text(limits.effective_creates_per_minute),
    )
}

pub(crate) async fn audit_command(args: &ClientArgs, cmd: AuditCommand) -> Result<(), CliError> {
    let endpoint = args.endpoint.as_str();
    let token = BearerToken::new(args.token.as_deref())?;
    let mut client = AuditServiceClient::with_interceptor(connect(args).await?, token);
    let AuditCommand::List { team, since, json } = cmd;
    let since = since.map(|seconds| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        prost_types::Timestamp {
            seconds: now.saturating_sub(seconds) as i64,
            nanos: 0,
        }
    });
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListAuditEventsRequest {
            team: team.clone().unwrap_or_default(),
            since,
            page_size: MAX_PAGE_SIZE as i32,
            page_token: page_token.clone(),
        };
        let page = unary(endpoint, client.list_audit_events(request)).await?;
        events.extend(page.events);
        if page.next_page_token.is_empty() || events.len() >= MAX_LISTED_EVENTS {
            break;
        }
        page_token = page.next_page_token;
    }
    if json || args.output == OutputFormat::Json {
        print_json(&serde_json::Value::Array(events.iter().map(event_json).collect()))
    } else {
        print_text(&events.iter().map(event_line).collect::<Vec<_>>().join("\n"))
    }
}

pub(crate) async fn limits_command(args: &ClientArgs, cmd: LimitsCommand) -> Result<(), CliError> {
    let endpoint = args.endpoint.as_str();
    let token = BearerToken::new(args.token.as_deref())?;
    let mut client = LimitsServiceClient::with_interceptor(connect(args).await?, token);
    let limits = match cmd {
        LimitsCommand::Get { team, cluster_default } => {
            let request = GetTeamLimitsRequest {
                team: team.unwrap_or_default(),
                cluster_default,
            };
            unary(endpoint, client.get_team_limits(request)).await?
        }
        LimitsCommand::Set {
            team,
            cluster_default,
            max_running_agents,
            creates_per_minute,
        } => {
            let request = SetTeamLimitsRequest {
                team: team.unwrap_or_default(),
                cluster_default,
                max_running_agents: max_running_agents.unwrap_or(0),
                creates_per_minute: creates_per_minute.unwrap_or(0),
            };
            unary(endpoint, client.set_team_limits(request)).await?
        }
    };
    match args.output {
        OutputFormat::Json => print_json(&limits_json(&limits)),
        OutputFormat::Table => print_text(&limits_lines(&limits)),
    }
}
