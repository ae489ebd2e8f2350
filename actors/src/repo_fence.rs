//! The fence on the origin's work branch. Every push is leased on the commit the agent's record
//! names (`git push --force-with-lease=refs/heads/BRANCH:RECORDED`, an empty lease when nothing
//! is recorded: the branch must not exist), so the origin itself refuses a push from an owner
//! whose idea of the branch is not the record's. What the origin holds is read with
//! `git ls-remote`; a commit found there instead of the record's (a fenced owner pushed it) is
//! kept in the mirror and the branch moved back to the record, leased on what was found.

use super::{git, git_with, RepoError, RepoState};

/// The `--force-with-lease` option that lets a push to `branch` through only while the origin
/// holds `lease` there (no branch at all when `None`).
pub(super) fn lease_option(branch: &str, lease: Option<&str>) -> String {
    format!("--force-with-lease=refs/heads/{branch}:{}", lease.unwrap_or(""))
}

impl RepoState {
    /// The commit the origin's `branch` is at, or `None` when it has no such branch.
    pub(super) async fn branch_at_origin(&self, branch: &str) -> Result<Option<String>, RepoError> {
        let failed = |message: String| RepoError::ListRemote {
            url: self.args.url.clone(),
            branch: branch.to_string(),
            message,
        };
        let origin = self.origin().await.map_err(|error| failed(error.to_string()))?;
        let name = format!("refs/heads/{branch}");
        let listed = git_with(
            &["ls-remote", "--refs", &origin.url, &name],
            Some(&self.args.mirror),
            &origin.env,
        )
        .await
        .map_err(|error| failed(error.to_string()))?;
        // ls-remote matches patterns by their tail: keep the line naming exactly this branch.
        Ok(listed.lines().find_map(|line| {
            let (commit, listed_name) = line.split_once('\t')?;
            (listed_name == name).then(|| commit.to_string())
        }))
    }

    /// Keeps the commit `found` in the mirror under its ref, then moves the origin's `branch`
    /// from it back to `recorded` (deletes it when `None`), leased on it (on the branch being
    /// absent when `found` is `None`): if the branch moved again meanwhile, nothing is
    /// overwritten and the error says so.
    pub(super) async fn restore(
        &mut self,
        branch: &str,
        recorded: Option<&str>,
        found: Option<(&str, &str)>,
    ) -> Result<(), RepoError> {
        let url = self.args.url.clone();
        let failed = |message: String| RepoError::Restore {
            url: url.clone(),
            branch: branch.to_string(),
            recorded: recorded.map(str::to_string),
            message,
        };
        // The fetch brings the displaced commit into the mirror while the origin still holds it.
        self.refresh().await.map_err(|error| failed(error.to_string()))?;
        let mirror = self.args.mirror.clone();
        if let Some((found, kept)) = found {
            git(&["update-ref", kept, found], Some(&mirror))
                .await
                .map_err(|error| failed(format!("cannot keep the displaced commit {found} as {kept}: {error}")))?;
        }
        let source = match recorded {
            Some(recorded) => {
                git(&["cat-file", "-e", &format!("{recorded}^{{commit}}")], Some(&mirror))
                    .await
                    .map_err(|_| failed("this node's mirror does not hold the recorded commit".to_string()))?;
                recorded.to_string()
            }
            None => String::new(),
        };
        let origin = self.origin().await.map_err(|error| failed(error.to_string()))?;
        git_with(
            &[
                "push",
                "--quiet",
                "--no-verify",
                &lease_option(branch, found.map(|(found, _)| found)),
                &origin.url,
                &format!("{source}:refs/heads/{branch}"),
            ],
            Some(&mirror),
            &origin.env,
        )
        .await
        .map_err(|error| failed(error.to_string()))?;
        let head = format!("refs/heads/{branch}");
        let _ = match recorded {
            Some(recorded) => git(&["update-ref", &head, recorded], Some(&mirror)).await,
            None => git(&["update-ref", "-d", &head], Some(&mirror)).await,
        };
        tracing::info!(url = %self.args.url, branch, ?found, ?recorded, "moved the origin's branch back to its recorded commit");
        Ok(())
    }
}
