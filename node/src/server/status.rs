//! The one place where the errors of the node's services become gRPC statuses: each error
//! type that crosses a service boundary has its `From<...> for Status` (or, for types of other
//! crates, one function) here, so a code is chosen once per kind of failure.
//!
//! | error | code |
//! | --- | --- |
//! | `validate::InvalidInput` (a request field) | `InvalidArgument` |
//! | `WriteError::Refused`: not found / exists / limits / fenced / invalid | `NotFound` / `AlreadyExists` / `ResourceExhausted` / `Aborted` / `InvalidArgument`, else `FailedPrecondition` |
//! | `WriteError::Unavailable` | `Unavailable` |
//! | `WriteError::Fatal` | `Internal` |
//! | `ReplicaError::NotLeader` (membership) | `Unavailable`, else `FailedPrecondition` |
//! | `ReadError` (no read index confirmed / this node lags) / raft stopped | `Unavailable` / `Internal` |
//! | `vcs::ClaimError` (no provider for a repository, plugins not loaded) | `FailedPrecondition` |
//! | `vcs::ProviderInfoError` (a provider did not answer) | `Unavailable` |
//! | `admin::PluginRejected` (an upload cannot be loaded) | `InvalidArgument` |
//! | `repo_url::RepositoryUrlRefused`: a form never taken / a local path not allowed | `InvalidArgument` / `PermissionDenied` |

use flotilla_raft::{ApplyError, WriteError};
use tonic::Status;

use super::admin::PluginRejected;
use super::validate::InvalidInput;
use super::vcs::{ClaimError, ProviderInfoError};

impl From<InvalidInput> for Status {
    fn from(error: InvalidInput) -> Status {
        Status::invalid_argument(error.to_string())
    }
}

impl From<ClaimError> for Status {
    fn from(error: ClaimError) -> Status {
        Status::failed_precondition(error.to_string())
    }
}

impl From<ProviderInfoError> for Status {
    fn from(error: ProviderInfoError) -> Status {
        Status::unavailable(error.to_string())
    }
}

impl From<PluginRejected> for Status {
    fn from(error: PluginRejected) -> Status {
        Status::invalid_argument(error.to_string())
    }
}

/// The one place a write failure becomes a gRPC status.
pub fn write_status(error: WriteError) -> Status {
    match error {
        WriteError::Refused(refusal) => {
            let message = refusal.to_string();
            match refusal {
                ApplyError::AgentNotFound(_)
                | ApplyError::NodeNotFound(_)
                | ApplyError::PluginNotFound { .. }
                | ApplyError::UploadNotFound(_)
                | ApplyError::SecretNotFound { .. } => Status::not_found(message),
                ApplyError::AgentExists(_) | ApplyError::PluginExists { .. } => Status::already_exists(message),
                ApplyError::PluginEnabled { .. } => Status::failed_precondition(message),
                ApplyError::TooManyUploads { .. } | ApplyError::TooManyPlugins { .. } => {
                    Status::resource_exhausted(message)
                }
                ApplyError::InvalidState { .. } | ApplyError::UnsupportedVersion { .. } | ApplyError::NestedBatch => {
                    Status::failed_precondition(message)
                }
                ApplyError::Fenced { .. } | ApplyError::BranchRecordMoved { .. } | ApplyError::StaleTerm { .. } => {
                    Status::aborted(message)
                }
                ApplyError::TooManyFollowUps { .. } | ApplyError::TooLarge { .. } => {
                    Status::resource_exhausted(message)
                }
                ApplyError::TurnOutOfOrder { .. } | ApplyError::UndeliveredFollowUps { .. } => {
                    Status::failed_precondition(message)
                }
                ApplyError::Invalid(_) => Status::invalid_argument(message),
                ApplyError::TeamNotFound(_) | ApplyError::KeyNotFound(_) => Status::not_found(message),
                ApplyError::TeamExists(_) | ApplyError::KeyExists => Status::already_exists(message),
                ApplyError::TooMany { .. } | ApplyError::LimitReached { .. } => Status::resource_exhausted(message),
                ApplyError::JoinTokenUnknown | ApplyError::JoinTokenExpired { .. } => Status::unauthenticated(message),
                ApplyError::TooManyJoinTokens { .. } => Status::resource_exhausted(message),
                ApplyError::NodeRemoved(_) | ApplyError::ClusterCaSet => Status::failed_precondition(message),
            }
        }
        WriteError::Unavailable { .. } => Status::unavailable(error.to_string()),
        WriteError::Fatal(_) => Status::internal(error.to_string()),
    }
}

/// A read barrier that failed. A node that cannot confirm what the cluster acknowledged (no
/// quorum, no leader, its state machine behind, or it is stopping and no longer catches up)
/// says so as `Unavailable`, which a client may retry, here or through another node: it never
/// answers from a state that may be stale.
pub fn read_status(error: flotilla_raft::ReadError) -> Status {
    Status::unavailable(error.to_string())
}

/// A repository URL the node's policy refuses. A local path outside `[repos] allow_local` is
/// `PermissionDenied`: the request is well formed, but this node's operator has not allowed it
/// to reach that directory (the message names the setting that would). A form the node never
/// takes (a transport helper, an unknown scheme) is `InvalidArgument`, like any other malformed
/// field: no setting changes the answer.
pub fn repository_status(error: flotilla_actors::repo_url::RepositoryUrlRefused) -> Status {
    if error.denied_by_policy() {
        Status::permission_denied(error.to_string())
    } else {
        Status::invalid_argument(error.to_string())
    }
}

/// A membership change that failed: retried by the caller while the leader moves.
pub fn membership_status(error: flotilla_raft::replica::ReplicaError) -> Status {
    match error {
        flotilla_raft::replica::ReplicaError::NotLeader { .. } => Status::unavailable(error.to_string()),
        other => Status::failed_precondition(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failed read barrier is one a client retries elsewhere, a stopping node's included.
    #[test]
    fn a_failed_read_barrier_is_unavailable_and_says_why() {
        for (error, words) in [
            (
                flotilla_raft::ReadError::Unavailable {
                    deadline_ms: 5,
                    last_error: "no leader elected".to_string(),
                },
                "no leader elected",
            ),
            (
                flotilla_raft::ReadError::Lagging {
                    needed: 9,
                    applied: 7,
                    deadline_ms: 5,
                },
                "needs index 9",
            ),
            (
                flotilla_raft::ReadError::Stopped("this node is stopping and no longer catches up".to_string()),
                "stopping",
            ),
        ] {
            let status = read_status(error);
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains(words), "{status:?}");
        }
    }
}
