//! Teams and API keys: only a key's SHA-256 is replicated; writing a digest again through
//! `CreateToken` replaces its record. Names are checked here, so a refused name is refused the
//! same on every node.

use super::not_in_family;
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Response};
use crate::types::{key_id_of, name_problem, Role, TeamRecord, TokenRecord, DEFAULT_TEAM, MAX_KEYS, MAX_TEAMS};

/// Routes a team or key command to its rule.
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
        Command::CreateTeam { name } => create_team(state, changes, at_ms, name),
        Command::CreateKey {
            sha256_hex,
            team,
            user,
            role,
            expires_in_ms,
        } => create_key(state, changes, at_ms, sha256_hex, team, user, *role, *expires_in_ms),
        Command::RevokeKey { key_id } => revoke_key(state, changes, key_id),
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
            key_id: key_id_of(sha256_hex),
            expires_at_ms: None,
        },
    );
    changes.tokens.insert(sha256_hex.to_string());
    Ok(Response::Done)
}

/// Whether `name` is a team: the default team always is.
pub fn team_exists(state: &ClusterState, name: &str) -> bool {
    name == DEFAULT_TEAM || state.teams.contains_key(name)
}

fn create_team(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, name: &str) -> ApplyResult {
    if let Some(problem) = name_problem(name) {
        return Err(ApplyError::Invalid(format!("team name: {problem}")));
    }
    if team_exists(state, name) {
        return Err(ApplyError::TeamExists(name.to_string()));
    }
    if state.teams.len() >= MAX_TEAMS {
        return Err(ApplyError::TooMany {
            what: "teams".to_string(),
            limit: MAX_TEAMS,
        });
    }
    let record = TeamRecord {
        name: name.to_string(),
        created_at_ms: at_ms,
    };
    state.teams.insert(name.to_string(), record.clone());
    changes.meta = true;
    Ok(Response::Team(record))
}

#[allow(clippy::too_many_arguments)]
fn create_key(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    sha256_hex: &str,
    team: &str,
    user: &str,
    role: Role,
    expires_in_ms: Option<u64>,
) -> ApplyResult {
    if sha256_hex.len() != 64 || !sha256_hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(ApplyError::Invalid(
            "key digest: must be 64 hexadecimal digits".to_string(),
        ));
    }
    if let Some(problem) = name_problem(user) {
        return Err(ApplyError::Invalid(format!("user name: {problem}")));
    }
    if !team_exists(state, team) {
        return Err(ApplyError::TeamNotFound(team.to_string()));
    }
    if role == Role::ClusterAdmin && team != DEFAULT_TEAM {
        return Err(ApplyError::Invalid(format!(
            "role cluster-admin: belongs to team {DEFAULT_TEAM}, found team {team}"
        )));
    }
    let key_id = key_id_of(sha256_hex);
    if state.tokens.contains_key(sha256_hex) || state.tokens.values().any(|record| record.key_id == key_id) {
        return Err(ApplyError::KeyExists);
    }
    if state.tokens.len() >= MAX_KEYS {
        return Err(ApplyError::TooMany {
            what: "keys".to_string(),
            limit: MAX_KEYS,
        });
    }
    let record = TokenRecord {
        sha256_hex: sha256_hex.to_string(),
        name: user.to_string(),
        role,
        team: team.to_string(),
        created_at_ms: at_ms,
        key_id,
        expires_at_ms: expires_in_ms.map(|lifetime| at_ms.saturating_add(lifetime)),
    };
    state.tokens.insert(sha256_hex.to_string(), record.clone());
    changes.tokens.insert(sha256_hex.to_string());
    Ok(Response::Key(Box::new(record)))
}

fn revoke_key(state: &mut ClusterState, changes: &mut Changes, key_id: &str) -> ApplyResult {
    let digest = state
        .tokens
        .values()
        .find(|record| record.key_id == key_id)
        .map(|record| record.sha256_hex.clone())
        .ok_or_else(|| ApplyError::KeyNotFound(key_id.to_string()))?;
    let record = state.tokens.remove(&digest).expect("found just above");
    changes.tokens.insert(digest);
    Ok(Response::Key(Box::new(record)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Request;

    fn digest(byte: char) -> String {
        std::iter::repeat_n(byte, 64).collect()
    }

    fn run(state: &mut ClusterState, at_ms: u64, command: Command) -> ApplyResult {
        crate::apply(state, &mut Changes::default(), &Request::at(at_ms, command))
    }

    #[test]
    fn a_key_needs_an_existing_team_and_expires_from_the_logged_time() {
        let mut state = ClusterState::default();
        let key = |team: &str| Command::CreateKey {
            sha256_hex: digest('a'),
            team: team.to_string(),
            user: "ana".to_string(),
            role: Role::Member,
            expires_in_ms: Some(5_000),
        };
        assert_eq!(
            run(&mut state, 1_000, key("red")),
            Err(ApplyError::TeamNotFound("red".into()))
        );
        run(&mut state, 1_000, Command::CreateTeam { name: "red".into() }).expect("team");
        assert_eq!(
            run(&mut state, 1_000, Command::CreateTeam { name: "red".into() }),
            Err(ApplyError::TeamExists("red".into()))
        );
        let Ok(Response::Key(record)) = run(&mut state, 2_000, key("red")) else {
            panic!("key not created");
        };
        assert_eq!(record.expires_at_ms, Some(7_000));
        assert!(!record.expired_at(6_999));
        assert!(record.expired_at(7_000));
        assert_eq!(run(&mut state, 2_000, key("red")), Err(ApplyError::KeyExists));
        let revoked = run(
            &mut state,
            3_000,
            Command::RevokeKey {
                key_id: record.key_id.clone(),
            },
        );
        assert!(matches!(revoked, Ok(Response::Key(_))));
        assert!(state.tokens.is_empty());
        assert_eq!(
            run(
                &mut state,
                3_000,
                Command::RevokeKey {
                    key_id: record.key_id.clone()
                }
            ),
            Err(ApplyError::KeyNotFound(record.key_id))
        );
    }

    #[test]
    fn names_and_cluster_admin_keys_are_checked() {
        let mut state = ClusterState::default();
        assert!(matches!(
            run(
                &mut state,
                1,
                Command::CreateTeam {
                    name: "Red Team".into()
                }
            ),
            Err(ApplyError::Invalid(_))
        ));
        assert_eq!(
            run(
                &mut state,
                1,
                Command::CreateTeam {
                    name: DEFAULT_TEAM.into()
                }
            ),
            Err(ApplyError::TeamExists(DEFAULT_TEAM.into()))
        );
        run(&mut state, 1, Command::CreateTeam { name: "blue".into() }).expect("team");
        let admin_in_blue = Command::CreateKey {
            sha256_hex: digest('b'),
            team: "blue".into(),
            user: "root".into(),
            role: Role::ClusterAdmin,
            expires_in_ms: None,
        };
        assert!(matches!(run(&mut state, 1, admin_in_blue), Err(ApplyError::Invalid(_))));
    }
}
