//! Secrets: a sealed value per (scope, name); writing a name again replaces its record.

use super::not_in_family;
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Response};
use crate::secrets::{
    validate_sealed, validate_secret_name, validate_secret_scope, SealedSecret, SecretRecord, SecretScope, MAX_SECRETS,
};

/// Routes a secret command to its rule.
pub(super) fn apply_secret_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::SetSecret {
            scope,
            name,
            sealed,
            by,
        } => set_secret(state, changes, at_ms, scope, name, sealed, by),
        Command::RemoveSecret { scope, name } => {
            let key = (scope.clone(), name.clone());
            if state.secrets.remove(&key).is_none() {
                return Err(ApplyError::SecretNotFound {
                    scope: scope.to_string(),
                    name: name.clone(),
                });
            }
            changes.secrets = true;
            Ok(Response::Done)
        }
        other => not_in_family("secret", other),
    }
}

fn set_secret(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    scope: &SecretScope,
    name: &str,
    sealed: &SealedSecret,
    by: &str,
) -> ApplyResult {
    validate_secret_name(scope, name)
        .and_then(|()| validate_secret_scope(scope))
        .and_then(|()| validate_sealed(sealed))
        .map_err(ApplyError::Invalid)?;
    let key = (scope.clone(), name.to_string());
    if !state.secrets.contains_key(&key) && state.secrets.len() >= MAX_SECRETS {
        return Err(ApplyError::Invalid(format!(
            "the cluster holds {MAX_SECRETS} secrets, the most it keeps; remove one first"
        )));
    }
    state.secrets.insert(
        key,
        SecretRecord {
            scope: scope.clone(),
            name: name.to_string(),
            sealed: sealed.clone(),
            updated_at_ms: at_ms,
            updated_by: by.to_string(),
        },
    );
    changes.secrets = true;
    Ok(Response::Done)
}
