//! The fence on the origin's work branch. Every push is leased on the commit the agent's record
//! names (`git push --force-with-lease=refs/heads/BRANCH:RECORDED`, an empty lease when nothing
//! is recorded: the branch must not exist), so the origin itself refuses a push from an owner
//! whose idea of the branch is not the record's. Every push of the branch is also `--atomic`
//! with a move of the owner's fence ref (see [`crate::origin_fence`]), leased on the fence the
//! owner's epoch gave it: once a later owner has moved the fence to its epoch, an older owner's
//! push fails whole at the origin and the branch does not move. What the origin holds is read
//! with `git ls-remote`; a commit found there instead of the record's (an older owner pushed it
//! before the fence moved) is kept in the mirror and the branch moved back to the record, leased
//! on what was found.

use std::process::Stdio;
use std::sync::Arc;

use indexmap::IndexMap;

use tokio::io::AsyncWriteExt as _;

use crate::origin_fence::{classify, fence_commit, fence_move, FenceFound, FenceMove, ObjectFormat, OwnerFence};

use super::{git, git_with, GitError, RepoError, RepoState, ResolvedOrigin, GIT_TIMEOUT};

/// The `--force-with-lease` option that lets a push to `branch` through only while the origin
/// holds `lease` there (no branch at all when `None`).
pub(super) fn lease_option(branch: &str, lease: Option<&str>) -> String {
    format!("--force-with-lease=refs/heads/{branch}:{}", lease.unwrap_or(""))
}

/// What a node knows of the agents' fences at the origin, by ref name, the fence moved last at
/// the end: `None` until read from the mirror (see `RepoState::fences`).
pub(super) type FenceKnowledge = Arc<tokio::sync::Mutex<Option<IndexMap<String, String>>>>;

/// The most fences a repository actor remembers. Past it, the half moved longest ago is
/// forgotten: a forgotten fence costs its next move a read of the origin, never a wrong push.
pub(super) const MAX_KNOWN_FENCES: usize = 10_000;

/// The fence refs the mirror holds (`refs/flotilla/fence/*`), at most [`MAX_KNOWN_FENCES`].
/// Nothing, when they cannot be read: the origin's leases make a forgotten fence cost a read of
/// the origin, never a wrong push.
async fn read_mirror_fences(mirror: &std::path::Path) -> IndexMap<String, String> {
    let listed = git(
        &[
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            crate::origin_fence::FENCE_REF_PREFIX,
        ],
        Some(mirror),
    )
    .await;
    match listed {
        Ok(text) => text
            .lines()
            .filter_map(|line| line.split_once(' '))
            .take(MAX_KNOWN_FENCES)
            .map(|(name, id)| (name.to_string(), id.to_string()))
            .collect(),
        Err(error) => {
            tracing::debug!(mirror = %mirror.display(), %error, "could not read the mirror's fences");
            IndexMap::new()
        }
    }
}

/// Why a push with the fence did not go through.
pub(super) enum FencedPushError {
    /// The origin's fence is not this owner's to move: a later owner took the agent.
    Fenced { found: String },
    /// The branch is not at the lease: another owner moved it (before the fence did).
    LeaseLost { found: Option<String> },
    /// Anything else, in git's words.
    Git(String),
}

impl RepoState {
    /// What this node knows of the fences, read from the mirror the first time.
    async fn fences(&self) -> tokio::sync::MappedMutexGuard<'_, IndexMap<String, String>> {
        let mut fences = self.fences.lock().await;
        if fences.is_none() {
            *fences = Some(read_mirror_fences(&self.args.mirror).await);
        }
        tokio::sync::MutexGuard::map(fences, |fences| fences.get_or_insert_with(IndexMap::new))
    }

    /// What this node knows of `name` at the origin: the fence it last moved or found there.
    pub(super) async fn known_fence(&self, name: &str) -> Option<String> {
        self.fences().await.get(name).cloned()
    }

    /// Remembers that the origin holds `id` at `name` (nothing, for `None`). Kept in memory
    /// only: a node started again knows what its mirror held, and the origin's leases settle
    /// anything older (see `RepoState::fences`).
    pub(super) async fn remember_fence(&self, name: &str, id: Option<&str>) {
        let mut fences = self.fences().await;
        fences.shift_remove(name);
        if let Some(id) = id {
            fences.insert(name.to_string(), id.to_string());
            if fences.len() > MAX_KNOWN_FENCES {
                fences.drain(..MAX_KNOWN_FENCES / 2);
            }
        }
    }

    /// Forgets every fence, as a node started again with a mirror that never saw them would.
    #[cfg(test)]
    pub(super) async fn forget_fences(&self) {
        *self.fences.lock().await = Some(IndexMap::new());
    }

    /// The commit the origin's `branch` is at, or `None` when it has no such branch.
    pub(super) async fn branch_at_origin(&self, branch: &str) -> Result<Option<String>, RepoError> {
        let name = format!("refs/heads/{branch}");
        let listed = self
            .list_origin(&[&name])
            .await
            .map_err(|message| RepoError::ListRemote {
                url: self.args.url.clone(),
                branch: branch.to_string(),
                message,
            })?;
        Ok(listed.into_iter().next().flatten())
    }

    /// What the origin holds at each of `names` (full ref names), in one `git ls-remote`.
    async fn list_origin(&self, names: &[&str]) -> Result<Vec<Option<String>>, String> {
        let origin = self.origin().await.map_err(|error| error.to_string())?;
        let mut args = vec!["ls-remote", "--refs", &origin.url];
        args.extend_from_slice(names);
        let listed = git_with(&args, Some(&self.args.mirror), &origin.env)
            .await
            .map_err(|error| error.to_string())?;
        // ls-remote matches patterns by their tail: keep the lines naming exactly these refs.
        Ok(names
            .iter()
            .map(|name| {
                listed.lines().find_map(|line| {
                    let (commit, listed_name) = line.split_once('\t')?;
                    (listed_name == *name).then(|| commit.to_string())
                })
            })
            .collect())
    }

    /// The object format of the mirror, which is the origin's (read once per clone of it).
    async fn object_format(&self) -> Result<ObjectFormat, String> {
        let format = self
            .object_format
            .get_or_try_init(|| async {
                let name = git(&["rev-parse", "--show-object-format"], Some(&self.args.mirror))
                    .await
                    .map_err(|error| error.to_string())?;
                ObjectFormat::named(&name).ok_or_else(|| format!("the mirror uses the unknown object format {name:?}"))
            })
            .await?;
        Ok(*format)
    }

    /// How the next push moves `fence`: from what this node last saw the origin hold when that
    /// is this owner's own fence, else from what the origin holds now (`fresh` reads it always).
    async fn plan_fence(
        &self,
        format: ObjectFormat,
        fence: OwnerFence,
        fresh: bool,
    ) -> Result<FenceMove, FencedPushError> {
        let name = fence.ref_name();
        if !fresh {
            let known = self.known_fence(&name).await;
            if matches!(classify(format, fence, known.as_deref()), FenceFound::Own(_)) {
                if let Some(planned) = fence_move(format, fence, known.as_deref()) {
                    return Ok(planned);
                }
            }
        }
        let found = self.list_origin(&[&name]).await.map_err(FencedPushError::Git)?;
        let found = found.into_iter().next().flatten();
        fence_move(format, fence, found.as_deref()).ok_or_else(|| FencedPushError::Fenced {
            found: found.unwrap_or_default(),
        })
    }

    /// Writes the fence commit `planned` moves to into the mirror, so that it can be pushed, and
    /// checks that git names it as the fence's id.
    async fn write_fence(&self, format: ObjectFormat, fence: OwnerFence, planned: &FenceMove) -> Result<(), String> {
        let text = fence_commit(format, fence, planned.phase);
        let written = git_stdin(
            &["hash-object", "-t", "commit", "-w", "--stdin"],
            &self.args.mirror,
            &text,
        )
        .await
        .map_err(|error| format!("cannot write the fence commit: {error}"))?;
        if written != planned.next {
            return Err(format!(
                "git wrote the fence commit as {written}, expected {}",
                planned.next
            ));
        }
        Ok(())
    }

    /// Pushes `source` (a commit of the mirror, or empty: delete) to the origin's `branch`,
    /// leased on `lease`, in one atomic push with the move of `fence`. When the fence had moved
    /// under this same owner or an earlier one (the mirror's idea of it was behind), plans again
    /// from the origin and tries once more; a fence of a later owner refuses the push.
    pub(super) async fn push_with_fence(
        &self,
        format: ObjectFormat,
        fence: OwnerFence,
        branch: &str,
        lease: Option<&str>,
        source: &str,
    ) -> Result<(), FencedPushError> {
        let origin = self
            .origin()
            .await
            .map_err(|error| FencedPushError::Git(error.to_string()))?;
        let fence_name = fence.ref_name();
        let mut planned = self.plan_fence(format, fence, false).await?;
        for attempt in 0..2 {
            self.write_fence(format, fence, &planned)
                .await
                .map_err(FencedPushError::Git)?;
            let fence_lease = format!(
                "--force-with-lease={fence_name}:{}",
                planned.lease.as_deref().unwrap_or("")
            );
            let pushed = git_with(
                &[
                    "push",
                    "--quiet",
                    "--no-verify",
                    "--atomic",
                    &lease_option(branch, lease),
                    &fence_lease,
                    &origin.url,
                    &format!("{source}:refs/heads/{branch}"),
                    &format!("{}:{fence_name}", planned.next),
                ],
                Some(&self.args.mirror),
                &origin.env,
            )
            .await;
            let error = match pushed {
                Ok(_) => {
                    // Remembered, so the next push needs no read of it.
                    self.remember_fence(&fence_name, Some(&planned.next)).await;
                    return Ok(());
                }
                Err(error) => error.to_string(),
            };
            let Ok(found) = self.list_origin(&[&format!("refs/heads/{branch}"), &fence_name]).await else {
                return Err(FencedPushError::Git(error));
            };
            let (found_branch, found_fence) = (found[0].clone(), found[1].clone());
            let Some(replanned) = fence_move(format, fence, found_fence.as_deref()) else {
                self.remember_fence(&fence_name, found_fence.as_deref()).await;
                return Err(FencedPushError::Fenced {
                    found: found_fence.unwrap_or_default(),
                });
            };
            if found_branch.as_deref() != lease {
                return Err(FencedPushError::LeaseLost { found: found_branch });
            }
            if replanned.lease == planned.lease || attempt == 1 {
                return Err(FencedPushError::Git(error));
            }
            planned = replanned;
        }
        Err(FencedPushError::Git("the push was not tried".to_string()))
    }

    /// Moves the origin's fence of the agent to `fence`'s epoch, on its own (a new owner does
    /// this first): from then on no older owner's push moves the branch. Refused when the fence
    /// is a later owner's.
    pub(super) async fn take_fence(&mut self, fence: OwnerFence) -> Result<(), RepoError> {
        let url = self.args.url.clone();
        let failed = |message: String| RepoError::Fence {
            url: url.clone(),
            fence_ref: fence.ref_name(),
            message,
        };
        if !self.cloned {
            // The fence objects are written into the mirror, which may not exist yet.
            self.refresh().await.map_err(|error| failed(error.to_string()))?;
        }
        let format = self.object_format().await.map_err(failed)?;
        if self.take_fence_as_known(format, fence).await {
            return Ok(());
        }
        let name = fence.ref_name();
        let found = self.list_origin(&[&name]).await.map_err(failed)?;
        let found = found.into_iter().next().flatten();
        if let FenceFound::Own(_) = classify(format, fence, found.as_deref()) {
            // Already this owner's: remember it and leave it.
            self.remember_fence(&name, found.as_deref()).await;
            return Ok(());
        }
        let Some(planned) = fence_move(format, fence, found.as_deref()) else {
            let error = FencedPushError::Fenced {
                found: found.unwrap_or_default(),
            };
            return Err(self.fence_error(fence, "", None, error));
        };
        self.write_fence(format, fence, &planned).await.map_err(failed)?;
        let origin = self.origin().await.map_err(|error| failed(error.to_string()))?;
        self.push_fence(&origin, fence, &planned)
            .await
            .map_err(|error| failed(error.to_string()))
    }

    /// Pushes the planned fence commit to the origin with a lease on what the move started
    /// from, then records it in the mirror.
    async fn push_fence(
        &self,
        origin: &ResolvedOrigin,
        fence: OwnerFence,
        planned: &FenceMove,
    ) -> Result<(), GitError> {
        let name = fence.ref_name();
        git_with(
            &[
                "push",
                "--quiet",
                "--no-verify",
                &format!("--force-with-lease={name}:{}", planned.lease.as_deref().unwrap_or("")),
                &origin.url,
                &format!("{}:{name}", planned.next),
            ],
            Some(&self.args.mirror),
            &origin.env,
        )
        .await?;
        self.remember_fence(&name, Some(&planned.next)).await;
        tracing::info!(url = %self.args.url, fence = %name, epoch = %fence.epoch, "took the fence at the origin");
        Ok(())
    }

    /// The usual fence move, without reading the origin first: from what this node knows of
    /// the fence (nothing, for a new agent) with a lease on exactly that, so the origin takes
    /// it only if it holds the same. Answers false when this node knows this owner's fence or
    /// a later one, or when the push is refused for any reason: [`RepoState::take_fence`]
    /// then reads the origin and decides as it always did. Saves a read of the origin (a
    /// `git ls-remote` and the server side it starts) per agent start.
    async fn take_fence_as_known(&self, format: ObjectFormat, fence: OwnerFence) -> bool {
        let name = fence.ref_name();
        let known = self.known_fence(&name).await;
        if !matches!(
            classify(format, fence, known.as_deref()),
            FenceFound::Absent | FenceFound::Earlier { .. }
        ) {
            return false;
        }
        let Some(planned) = fence_move(format, fence, known.as_deref()) else {
            return false;
        };
        let Ok(origin) = self.origin().await else {
            return false;
        };
        if self.write_fence(format, fence, &planned).await.is_err() {
            return false;
        }
        self.push_fence(&origin, fence, &planned).await.is_ok()
    }

    /// The error of a push with the fence, as the repository actor answers it.
    pub(super) fn fence_error(
        &self,
        fence: OwnerFence,
        branch: &str,
        lease: Option<&str>,
        error: FencedPushError,
    ) -> RepoError {
        match error {
            FencedPushError::Fenced { found } => RepoError::Fenced {
                url: self.args.url.clone(),
                fence_ref: fence.ref_name(),
                epoch: fence.epoch.0,
                found,
            },
            FencedPushError::LeaseLost { found } => RepoError::LeaseLost {
                url: self.args.url.clone(),
                branch: branch.to_string(),
                expected: lease.map(str::to_string),
                found,
            },
            FencedPushError::Git(message) => RepoError::Fence {
                url: self.args.url.clone(),
                fence_ref: fence.ref_name(),
                message,
            },
        }
    }

    /// Keeps the commit `found` in the mirror under its ref, then moves the origin's `branch`
    /// from it back to `recorded` (deletes it when `None`), leased on it (on the branch being
    /// absent when `found` is `None`) and with the owner's fence: if the branch moved again
    /// meanwhile, nothing is overwritten and the error says so.
    pub(super) async fn restore(
        &mut self,
        fence: OwnerFence,
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
        let format = self.object_format().await.map_err(failed)?;
        let lease = found.map(|(found, _)| found);
        match self.push_with_fence(format, fence, branch, lease, &source).await {
            Ok(()) => {}
            Err(error @ FencedPushError::Fenced { .. }) => return Err(self.fence_error(fence, branch, lease, error)),
            Err(FencedPushError::LeaseLost { found }) => {
                return Err(failed(format!(
                    "the origin's branch moved meanwhile to {}",
                    found.as_deref().unwrap_or("no branch")
                )))
            }
            Err(FencedPushError::Git(message)) => return Err(failed(message)),
        }
        let head = format!("refs/heads/{branch}");
        let _ = match recorded {
            Some(recorded) => git(&["update-ref", &head, recorded], Some(&mirror)).await,
            None => git(&["update-ref", "-d", &head], Some(&mirror)).await,
        };
        tracing::info!(url = %self.args.url, branch, ?found, ?recorded, "moved the origin's branch back to its recorded commit");
        Ok(())
    }
}

/// Runs git in `cwd` with `input` on its standard input and answers its trimmed output.
pub(super) async fn git_stdin(args: &[&str], cwd: &std::path::Path, input: &str) -> Result<String, GitError> {
    let mut command = tokio::process::Command::new("git");
    command
        .args(args)
        .current_dir(cwd)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let run = async {
        let mut child = command.spawn().map_err(|error| GitError::Spawn(error.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|error| GitError::Spawn(error.to_string()))?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|error| GitError::Spawn(error.to_string()))
    };
    let output = tokio::time::timeout(GIT_TIMEOUT, run)
        .await
        .map_err(|_| GitError::TimedOut {
            command: args.join(" "),
            timeout: GIT_TIMEOUT,
        })??;
    if !output.status.success() {
        return Err(GitError::Failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
