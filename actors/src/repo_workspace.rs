//! Workspaces from the mirror. The repository actor fetches the mirror when no fetch began
//! after the agent asked; then finding the start commit, the clone and the checkout run on a
//! task of their own under the mirror's shared lock, so that a burst of agents of one
//! repository fetches once and clones side by side instead of one after the other.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ractor::RpcReplyPort;

use super::{git, GitError, RepoError, RepoState, Workspace};
use crate::push_bundle;

/// What an agent asks for.
pub(super) struct Wanted {
    pub base_branch: String,
    pub work_branch: String,
    pub recorded: Option<String>,
    pub path: PathBuf,
}

/// Where a workspace starts, read in the mirror.
pub(super) struct Start {
    commit: String,
    tree: String,
    resumed: bool,
}

/// A commit and its tree in `mirror`, in one git call; `None` when `name` is no commit there.
async fn commit_and_tree(mirror: &Path, name: &str) -> Option<(String, String)> {
    // `--revs-only`: a name that is no revision prints nothing (it is never taken for a path).
    let output = git(
        &[
            "rev-parse",
            "--revs-only",
            &format!("{name}^{{commit}}"),
            &format!("{name}^{{tree}}"),
        ],
        Some(mirror),
    )
    .await
    .ok()?;
    let mut lines = output.lines();
    match (lines.next(), lines.next()) {
        (Some(commit), Some(tree)) => Some((commit.trim().to_string(), tree.trim().to_string())),
        _ => None,
    }
}

impl RepoState {
    /// Fetches the mirror unless a fetch started after the agent asked (the actor's only
    /// serial step of a workspace).
    pub(super) async fn refresh_for(&mut self, requested_at: Instant) -> Result<(), RepoError> {
        if self.refreshed_at.is_some_and(|fetched| fetched >= requested_at) {
            return Ok(());
        }
        let _exclusive = self.mirror_lock.clone().write_owned().await;
        let started = Instant::now();
        self.refresh().await?;
        tracing::debug!(url = %self.args.url, elapsed_ms = started.elapsed().as_millis() as u64, "mirror fetched");
        Ok(())
    }

    /// Finds where the workspace starts and clones it, on a task of its own holding the mirror
    /// shared, and answers `reply` from there. At most one per agent being provisioned is in
    /// flight: each agent waits for its answer.
    pub(super) async fn spawn_workspace(&self, wanted: Wanted, reply: RpcReplyPort<Result<Workspace, RepoError>>) {
        let mirror = self.args.mirror.clone();
        let url = self.args.url.clone();
        self.spawn_shared(async move {
            let result = async {
                let start = workspace_start(&mirror, &url, &wanted).await?;
                make_workspace(&mirror, &url, start, &wanted.work_branch, &wanted.path).await
            }
            .await;
            let _ = reply.send(result);
        })
        .await;
    }
}

/// The commit the workspace starts at, read in the mirror. The record wins over the origin: a
/// branch moved by a fenced owner is not built on.
async fn workspace_start(mirror: &Path, url: &str, wanted: &Wanted) -> Result<Start, RepoError> {
    let (found, resumed) = match wanted.recorded.as_deref() {
        Some(recorded) => {
            let found = if push_bundle::is_object_id(recorded) {
                commit_and_tree(mirror, recorded).await
            } else {
                None
            };
            let found = found.ok_or_else(|| RepoError::Workspace {
                path: wanted.path.display().to_string(),
                message: format!(
                    "the recorded commit {recorded} of {} is neither at the origin nor in this node's mirror",
                    wanted.work_branch
                ),
            })?;
            (found, true)
        }
        None => match commit_and_tree(mirror, &format!("refs/heads/{}", wanted.work_branch)).await {
            Some(tip) => (tip, true),
            None => {
                let base = commit_and_tree(mirror, &format!("refs/heads/{}", wanted.base_branch)).await;
                let base = base.ok_or_else(|| RepoError::NoSuchBranch {
                    url: url.to_string(),
                    branch: wanted.base_branch.clone(),
                })?;
                (base, false)
            }
        },
    };
    let (commit, tree) = found;
    Ok(Start { commit, tree, resumed })
}

impl RepoState {
    /// A copy for work off the actor on the mirror as it is (cloned already).
    pub(super) fn detached(&self) -> RepoState {
        RepoState {
            args: self.args.clone(),
            cloned: self.cloned,
            refreshed_at: self.refreshed_at,
            mirror_lock: self.mirror_lock.clone(),
        }
    }

    /// Runs `work` on a task of its own holding the mirror shared: it may add objects and
    /// per-agent refs, and runs beside workspace clones and other agents' work, never beside
    /// a fetch or a push.
    pub(super) async fn spawn_shared(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let shared = self.mirror_lock.clone().read_owned().await;
        tokio::spawn(async move {
            work.await;
            drop(shared);
        });
    }

    /// [`RepoState::take_fence`] on a detached copy of a cloned mirror.
    pub(super) async fn take_fence_cloned(mut self, fence: crate::origin_fence::OwnerFence) -> Result<(), RepoError> {
        self.take_fence(fence).await
    }
}

/// A local clone of the mirror at `path` (objects hard-linked where the filesystem allows, so
/// it is self-contained: a machine sees nothing outside it), on `work_branch` at the start.
async fn make_workspace(
    mirror: &Path,
    url: &str,
    start: Start,
    work_branch: &str,
    path: &Path,
) -> Result<Workspace, RepoError> {
    let started = Instant::now();
    let workspace_error = |error: GitError| RepoError::Workspace {
        path: path.display().to_string(),
        message: error.to_string(),
    };
    let _ = tokio::fs::remove_dir_all(path).await;
    let target = path.display().to_string();
    // A local clone holds every object of the mirror, the start commit included.
    git(
        &[
            "clone",
            "--local",
            "--quiet",
            "--no-checkout",
            &mirror.display().to_string(),
            &target,
        ],
        None,
    )
    .await
    .map_err(workspace_error)?;
    git(&["checkout", "--quiet", "-B", work_branch, &start.commit], Some(path))
        .await
        .map_err(workspace_error)?;
    // Pushes go to the real origin, not to the node's mirror.
    git(&["remote", "set-url", "origin", url], Some(path))
        .await
        .map_err(workspace_error)?;
    tracing::debug!(path = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "workspace cloned");
    Ok(Workspace {
        path: path.to_path_buf(),
        branch: work_branch.to_string(),
        // `checkout -B` put HEAD at the start commit.
        head_commit: start.commit,
        tree: start.tree,
        resumed: start.resumed,
    })
}

#[cfg(test)]
impl RepoState {
    /// A workspace asked for now, made on the caller's task (the tests drive the state directly).
    pub(super) async fn prepare(
        &mut self,
        base_branch: &str,
        work_branch: &str,
        recorded: Option<&str>,
        path: &Path,
    ) -> Result<Workspace, RepoError> {
        self.refresh_for(Instant::now()).await?;
        let wanted = Wanted {
            base_branch: base_branch.to_string(),
            work_branch: work_branch.to_string(),
            recorded: recorded.map(str::to_string),
            path: path.to_path_buf(),
        };
        let start = workspace_start(&self.args.mirror, &self.args.url, &wanted).await?;
        make_workspace(&self.args.mirror, &self.args.url, start, work_branch, path).await
    }
}
