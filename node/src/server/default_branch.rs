//! The default branch of a repository, read from its origin: `git ls-remote --symref URL HEAD`
//! answers `ref: refs/heads/NAME<TAB>HEAD`. An agent whose request and team name no base branch
//! forks from it, as a clone would.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::Status;

/// How long the origin has to answer.
pub const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an origin's answer is reused: a burst of creates on one repository asks it once, and
/// a change of the origin's HEAD is seen within this time.
pub const DEFAULT_BRANCH_CACHE_TTL: Duration = Duration::from_secs(60);
/// Most repositories whose default branch is remembered.
pub const DEFAULT_BRANCH_CACHE_ENTRIES: usize = 1024;
/// Most bytes of git's error kept in the message.
const MAX_ERROR_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DefaultBranchError {
    #[error("cannot run git to read the default branch of {url}: {message}")]
    Spawn { url: String, message: String },
    #[error(
        "the origin {url} did not answer `git ls-remote --symref HEAD` within {seconds} s; give base_branch or retry"
    )]
    Timeout { url: String, seconds: u64 },
    #[error("git could not read the default branch of {url}: {message}")]
    Git { url: String, message: String },
    #[error(
        "the origin {url} has no HEAD naming a branch (an empty repository, or a detached HEAD); give base_branch"
    )]
    NoSymbolicHead { url: String },
}

impl From<DefaultBranchError> for Status {
    fn from(error: DefaultBranchError) -> Status {
        match error {
            DefaultBranchError::Timeout { .. } => Status::unavailable(error.to_string()),
            DefaultBranchError::Spawn { .. } => Status::internal(error.to_string()),
            _ => Status::failed_precondition(error.to_string()),
        }
    }
}

/// Default branches recently read, by repository URL (bounded; entries expire).
#[derive(Default)]
pub struct DefaultBranches {
    entries: Mutex<HashMap<String, (String, Instant)>>,
}

impl DefaultBranches {
    /// The default branch of `url`, from the cache when fresh, else from the origin.
    pub async fn get(&self, url: &str, auth_env: Vec<(String, String)>) -> Result<String, DefaultBranchError> {
        let now = Instant::now();
        if let Some((branch, at)) = self.lock().get(url) {
            if now.duration_since(*at) < DEFAULT_BRANCH_CACHE_TTL {
                return Ok(branch.clone());
            }
        }
        let branch = default_branch(url, auth_env).await?;
        let mut entries = self.lock();
        if entries.len() >= DEFAULT_BRANCH_CACHE_ENTRIES {
            entries.retain(|_, (_, at)| now.duration_since(*at) < DEFAULT_BRANCH_CACHE_TTL);
            if entries.len() >= DEFAULT_BRANCH_CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(url.to_string(), (branch.clone(), now));
        Ok(branch)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // A panic while holding the lock leaves a plain map behind: still usable.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The branch the origin's `HEAD` points at. `auth_env` carries the node's credential for the
/// URL (git's `GIT_CONFIG_*` variables, never on the command line).
pub async fn default_branch(url: &str, auth_env: Vec<(String, String)>) -> Result<String, DefaultBranchError> {
    let mut command = tokio::process::Command::new("git");
    command
        .args(["ls-remote", "--symref", url, "HEAD"])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .envs(auth_env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(LS_REMOTE_TIMEOUT, command.output()).await {
        Err(_) => {
            return Err(DefaultBranchError::Timeout {
                url: url.to_string(),
                seconds: LS_REMOTE_TIMEOUT.as_secs(),
            })
        }
        Ok(Err(error)) => {
            return Err(DefaultBranchError::Spawn {
                url: url.to_string(),
                message: error.to_string(),
            })
        }
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message: String = stderr.trim().chars().take(MAX_ERROR_BYTES).collect();
        return Err(DefaultBranchError::Git {
            url: url.to_string(),
            message,
        });
    }
    parse_symref(&String::from_utf8_lossy(&output.stdout))
        .ok_or_else(|| DefaultBranchError::NoSymbolicHead { url: url.to_string() })
}

/// The branch of the `ref: refs/heads/NAME<TAB>HEAD` line of `ls-remote --symref`.
fn parse_symref(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let (target, name) = line.strip_prefix("ref: ")?.split_once('\t')?;
        (name.trim() == "HEAD")
            .then(|| target.strip_prefix("refs/heads/").map(str::to_string))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_symbolic_head_line_names_the_branch() {
        let answer = "ref: refs/heads/trunk\tHEAD\n0123456789abcdef0123456789abcdef01234567\tHEAD\n";
        assert_eq!(parse_symref(answer).as_deref(), Some("trunk"));
        assert_eq!(parse_symref("0123\tHEAD\n"), None);
        assert_eq!(parse_symref(""), None);
    }
}
