//! `flotilla-lab status`: the record, which processes still run, and the cluster's own view.

use std::path::Path;

use flotilla_tests::local_cluster::{process_alive, LocalState};

pub fn status(state_dir: &Path) -> Result<(), String> {
    let Some(state) = LocalState::read(state_dir)? else {
        println!("no local cluster is up (nothing recorded in {})", state_dir.display());
        return Ok(());
    };
    let keeper = if process_alive(state.keeper_pid) {
        "running"
    } else {
        "GONE (run `down` to clean up)"
    };
    println!(
        "keeper pid {} {keeper}; {} ms between regions (jitter {} ms); data in {}",
        state.keeper_pid,
        state.wan_latency_ms,
        state.jitter_ms,
        state.cluster_dir.display()
    );
    let token = std::fs::read_to_string(&state.admin_token_file)
        .map_err(|error| format!("could not read {}: {error}", state.admin_token_file.display()))?;
    flotilla_tests::trust_cluster_ca(&state.ca_cert);
    let runtime = tokio::runtime::Runtime::new().map_err(|error| format!("could not start a runtime: {error}"))?;
    let view = runtime.block_on(async {
        for node in &state.nodes {
            if let Some(cluster) = flotilla_tests::try_get_cluster(&node.endpoint, token.trim()).await {
                return Some(cluster);
            }
        }
        None
    });
    println!(
        "{:<5} {:<10} {:<26} {:<9} {:<7} {:<8} slots",
        "node", "region", "endpoint", "process", "member", "role"
    );
    for node in &state.nodes {
        let process = match node.pid {
            Some(pid) if process_alive(pid) => "running",
            _ => "stopped",
        };
        let member = view
            .as_ref()
            .and_then(|cluster| cluster.members.iter().find(|member| member.id == node.id));
        let (up, role, slots) = match (member, &view) {
            (Some(member), Some(cluster)) => (
                if member.up { "up" } else { "down" },
                if cluster.leader_id == node.id {
                    "leader"
                } else if member.voter {
                    "voter"
                } else {
                    "learner"
                },
                format!("{}/{}", member.slots_in_use, member.slots),
            ),
            _ => ("?", "?", "?".to_string()),
        };
        println!(
            "{:<5} {:<10} {:<26} {:<9} {:<7} {:<8} {slots}",
            node.id, node.region, node.endpoint, process, up, role
        );
    }
    match view {
        Some(cluster) => println!("term {}, applied index {}", cluster.term, cluster.last_applied_index),
        None => println!("no node answered GetCluster"),
    }
    Ok(())
}
