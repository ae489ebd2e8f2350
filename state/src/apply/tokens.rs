//! API tokens: only a token's SHA-256 is replicated; writing a hash again replaces its record.

use super::not_in_family;
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyResult, Command, Response};
use crate::types::{Role, TokenRecord};

/// Routes a token command to its rule.
pub(super) fn apply_token_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::CreateToken {
            sha256_hex,
            name,
            role,
            team,
        } => create_token(state, changes, at_ms, sha256_hex, name, *role, team),
        other => not_in_family("token", other),
    }
}

fn create_token(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    sha256_hex: &str,
    name: &str,
    role: Role,
    team: &str,
) -> ApplyResult {
    state.tokens.insert(
        sha256_hex.to_string(),
        TokenRecord {
            sha256_hex: sha256_hex.to_string(),
            name: name.to_string(),
            role,
            team: team.to_string(),
            created_at_ms: at_ms,
        },
    );
    changes.tokens.insert(sha256_hex.to_string());
    Ok(Response::Done)
}
