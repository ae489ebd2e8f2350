//! Join tokens: single-use, expiring admissions for new nodes. Only the SHA-256 of a token's
//! secret part is replicated; spending one removes it, so a token admits exactly one node
//! however many nodes present it at once (the log orders them; the first wins).

use super::not_in_family;
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Response};

/// Unused join tokens the cluster keeps at once; minting more is refused until some are used
/// or expire.
pub const MAX_JOIN_TOKENS: usize = 1024;

/// Routes a join-token command to its rule.
pub(super) fn apply_join_token_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::CreateJoinToken {
            sha256_hex,
            expires_at_ms,
        } => create(state, changes, at_ms, sha256_hex, *expires_at_ms),
        Command::ConsumeJoinToken { sha256_hex } => consume(state, changes, at_ms, sha256_hex),
        other => not_in_family("join token", other),
    }
}

/// Records the cluster CA once. The node that created it may record it again (after a crash
/// between the write and removing its key file); a different CA is refused, whatever key it
/// is sealed with.
pub(super) fn set_cluster_ca(
    state: &mut ClusterState,
    changes: &mut Changes,
    record: &crate::secrets::ClusterCaRecord,
) -> ApplyResult {
    crate::secrets::validate_cluster_ca(record).map_err(ApplyError::Invalid)?;
    if let Some(held) = &state.cluster_ca {
        if held.ca_pem == record.ca_pem {
            return Ok(Response::Done);
        }
        return Err(ApplyError::ClusterCaSet);
    }
    state.cluster_ca = Some(record.clone());
    changes.meta = true;
    Ok(Response::Done)
}

fn create(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    sha256_hex: &str,
    expires_at_ms: u64,
) -> ApplyResult {
    if expires_at_ms <= at_ms {
        return Err(ApplyError::Invalid(format!(
            "a join token must expire after it is minted; expires_at_ms {expires_at_ms} is not after {at_ms}"
        )));
    }
    // A refused command changes nothing, so the bound counts live tokens before pruning.
    let live = state.join_tokens.values().filter(|expires| **expires > at_ms).count();
    if live >= MAX_JOIN_TOKENS && !state.join_tokens.contains_key(sha256_hex) {
        return Err(ApplyError::TooManyJoinTokens { limit: MAX_JOIN_TOKENS });
    }
    state.join_tokens.retain(|_, expires| *expires > at_ms);
    state.join_tokens.insert(sha256_hex.to_string(), expires_at_ms);
    changes.meta = true;
    Ok(Response::Done)
}

fn consume(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, sha256_hex: &str) -> ApplyResult {
    let expires_at_ms = *state.join_tokens.get(sha256_hex).ok_or(ApplyError::JoinTokenUnknown)?;
    if expires_at_ms <= at_ms {
        // Left in place (a refused command changes nothing); the next mint prunes it.
        return Err(ApplyError::JoinTokenExpired {
            expired_at_ms: expires_at_ms,
        });
    }
    state.join_tokens.remove(sha256_hex);
    changes.meta = true;
    Ok(Response::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &mut ClusterState, at_ms: u64, command: Command) -> ApplyResult {
        apply_join_token_command(state, &mut Changes::default(), at_ms, &command)
    }

    #[test]
    fn the_cluster_ca_is_set_once() {
        let mut state = ClusterState::default();
        let record = |pem: &str| crate::secrets::ClusterCaRecord {
            ca_pem: pem.to_string(),
            sealed_key: crate::secrets::SealedSecret {
                kek_id: "k".to_string(),
                wrapped_key: vec![1],
                ciphertext: vec![2],
            },
        };
        let set = |state: &mut ClusterState, pem: &str| set_cluster_ca(state, &mut Changes::default(), &record(pem));
        assert_eq!(set(&mut state, "-----\nAAAA\n"), Ok(Response::Done));
        assert_eq!(set(&mut state, "-----\nAAAA\n"), Ok(Response::Done));
        assert!(matches!(
            set(&mut state, "-----\nBBBB\n"),
            Err(ApplyError::ClusterCaSet)
        ));
        assert_eq!(state.cluster_ca, Some(record("-----\nAAAA\n")));
        assert!(matches!(
            set(&mut ClusterState::default(), ""),
            Err(ApplyError::Invalid(_))
        ));
    }

    #[test]
    fn a_join_token_admits_once_and_only_before_it_expires() {
        let mut state = ClusterState::default();
        let mint = |digest: &str, expires_at_ms| Command::CreateJoinToken {
            sha256_hex: digest.to_string(),
            expires_at_ms,
        };
        let spend = |digest: &str| Command::ConsumeJoinToken {
            sha256_hex: digest.to_string(),
        };
        run(&mut state, 100, mint("a", 1_000)).unwrap();
        run(&mut state, 100, mint("b", 200)).unwrap();
        assert_eq!(run(&mut state, 150, spend("a")), Ok(Response::Done));
        assert_eq!(run(&mut state, 160, spend("a")), Err(ApplyError::JoinTokenUnknown));
        assert_eq!(
            run(&mut state, 200, spend("b")),
            Err(ApplyError::JoinTokenExpired { expired_at_ms: 200 })
        );
        assert_eq!(
            run(&mut state, 210, spend("b")),
            Err(ApplyError::JoinTokenExpired { expired_at_ms: 200 })
        );
        assert_eq!(run(&mut state, 210, spend("never")), Err(ApplyError::JoinTokenUnknown));
        assert!(matches!(
            run(&mut state, 300, mint("c", 300)),
            Err(ApplyError::Invalid(_))
        ));
        run(&mut state, 300, mint("d", 400)).unwrap();
        assert_eq!(
            state.join_tokens.keys().collect::<Vec<_>>(),
            vec!["d"],
            "the mint pruned b"
        );
    }

    #[test]
    fn minting_drops_expired_tokens_and_is_bounded() {
        let mut state = ClusterState::default();
        for index in 0..MAX_JOIN_TOKENS {
            run(
                &mut state,
                0,
                Command::CreateJoinToken {
                    sha256_hex: format!("t{index}"),
                    expires_at_ms: 10,
                },
            )
            .unwrap();
        }
        let over = Command::CreateJoinToken {
            sha256_hex: "over".to_string(),
            expires_at_ms: 10,
        };
        assert_eq!(
            run(&mut state, 5, over.clone()),
            Err(ApplyError::TooManyJoinTokens { limit: MAX_JOIN_TOKENS })
        );
        let later = Command::CreateJoinToken {
            sha256_hex: "later".to_string(),
            expires_at_ms: 100,
        };
        assert_eq!(run(&mut state, 20, later), Ok(Response::Done));
        assert_eq!(state.join_tokens.len(), 1);
    }
}
