//! `flotilla cluster wait`: blocks until a node serves (and, with `--members N`, until the
//! cluster lists N members up under a leader), so that scripts and unit files can start nodes
//! and go on once the cluster is usable, without a sleep.

use std::time::{Duration, Instant};

use flotilla_proto::v1::GetClusterRequest;

use super::client::{cluster_client, connect, BearerToken, CliError};
use super::ClientArgs;

/// Between two attempts.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// One attempt's calls.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn wait(args: &ClientArgs, members: Option<usize>, timeout: Duration) -> Result<(), CliError> {
    let started = Instant::now();
    loop {
        let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(args, members))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")));
        match outcome {
            Ok(summary) => {
                println!("{summary} (after {:.1}s)", started.elapsed().as_secs_f64());
                return Ok(());
            }
            Err(last) if started.elapsed() >= timeout => {
                return Err(CliError::Usage(format!(
                    "{} was not ready after {timeout:?}; last: {last}",
                    args.endpoint
                )));
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// One try: the CA file is there, the node's health says SERVING, and the members are up.
async fn attempt(args: &ClientArgs, members: Option<usize>) -> Result<String, String> {
    if let Some(ca) = &args.ca_cert {
        if !ca.is_file() {
            return Err(format!("{} does not exist yet", ca.display()));
        }
    }
    let channel = connect(args).await.map_err(|error| error.to_string())?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .map_err(|status| format!("health check: {status}"))?
        .into_inner()
        .status;
    if status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
        return Err("the node is not serving yet".to_string());
    }
    let Some(wanted) = members else {
        return Ok(format!("{} is serving", args.endpoint));
    };
    let token = BearerToken::new(args.token.as_deref()).map_err(|error| error.to_string())?;
    let cluster = cluster_client(channel, token)
        .get_cluster(GetClusterRequest {})
        .await
        .map_err(|status| format!("GetCluster: {status}"))?
        .into_inner();
    let up = cluster.members.iter().filter(|member| member.up).count();
    if cluster.leader_id == 0 {
        return Err("no leader is known yet".to_string());
    }
    if up < wanted {
        return Err(format!("{up} of the {wanted} members wanted are up"));
    }
    Ok(format!("{up} members up, leader node {}", cluster.leader_id))
}
