//! Repositories on a node: one `RepoActor` per repository URL keeps a bare mirror under the
//! node's data dir and makes agent workspaces from it. A workspace is a local clone of the
//! mirror (objects hard-linked where the filesystem allows, so it is fast and yet
//! self-contained: a machine sees nothing outside its workspace) with the agent's work branch
//! checked out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sha2::{Digest, Sha256};
use tokio::process::Command as Process;

/// A git command that takes longer than this is killed (clones of large repositories included).
pub const GIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Most bytes of git's error output kept in an error message.
pub const MAX_GIT_ERROR_BYTES: usize = 4096;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RepoError {
    #[error("cannot clone {url}: {message}")]
    Clone { url: String, message: String },
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("repository {url} has no branch {branch:?}")]
    NoSuchBranch { url: String, branch: String },
    #[error("cannot prepare the workspace {path}: {message}")]
    Workspace { path: String, message: String },
}

/// A workspace ready for a machine.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub path: PathBuf,
    pub branch: String,
    pub head_commit: String,
    /// Whether the work branch already existed in the origin (a resumed or follow-up run).
    pub resumed: bool,
}

async fn git(args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
    let mut command = Process::new("git");
    command.args(args).kill_on_drop(true);
    command.env("GIT_TERMINAL_PROMPT", "0");
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let output = tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .map_err(|_| format!("git {} took longer than {GIT_TIMEOUT:?}", args.join(" ")))?
        .map_err(|error| format!("cannot run git: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut message = stderr.trim().to_string();
        if message.len() > MAX_GIT_ERROR_BYTES {
            let mut cut = MAX_GIT_ERROR_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [cut]");
        }
        Err(message)
    }
}

/// Where a repository's mirror lives under `repos_dir`.
pub fn mirror_path(repos_dir: &Path, url: &str) -> PathBuf {
    let digest = hex::encode(&Sha256::digest(url.as_bytes())[..12]);
    repos_dir.join(format!("{digest}.git"))
}

pub struct RepoActor;

pub enum RepoMsg {
    /// Fetch the mirror and make a workspace at `path` on `work_branch` (from the origin's
    /// `work_branch` when it exists, else from `base_branch`).
    PrepareWorkspace {
        base_branch: String,
        work_branch: String,
        path: PathBuf,
        reply: RpcReplyPort<Result<Workspace, RepoError>>,
    },
}

impl ractor::Message for RepoMsg {}

pub struct RepoArgs {
    pub url: String,
    pub mirror: PathBuf,
}

pub struct RepoState {
    args: RepoArgs,
    cloned: bool,
}

impl RepoState {
    async fn refresh(&mut self) -> Result<(), RepoError> {
        let url = self.args.url.clone();
        let mirror = self.args.mirror.display().to_string();
        if !self.cloned && !self.args.mirror.join("HEAD").exists() {
            let partial = format!("{mirror}.partial");
            let _ = tokio::fs::remove_dir_all(&partial).await;
            git(&["clone", "--mirror", "--quiet", &url, &partial], None)
                .await
                .map_err(|message| RepoError::Clone {
                    url: url.clone(),
                    message,
                })?;
            tokio::fs::rename(&partial, &mirror)
                .await
                .map_err(|error| RepoError::Clone {
                    url: url.clone(),
                    message: error.to_string(),
                })?;
        } else {
            git(&["fetch", "--prune", "--quiet", "origin"], Some(&self.args.mirror))
                .await
                .map_err(|message| RepoError::Fetch { url, message })?;
        }
        self.cloned = true;
        Ok(())
    }

    async fn prepare(&mut self, base_branch: &str, work_branch: &str, path: &Path) -> Result<Workspace, RepoError> {
        self.refresh().await?;
        let mirror = self.args.mirror.clone();
        let has = |branch: String| {
            let mirror = mirror.clone();
            async move {
                git(
                    &["rev-parse", "--verify", "--quiet", &format!("refs/heads/{branch}")],
                    Some(&mirror),
                )
                .await
                .is_ok()
            }
        };
        let resumed = has(work_branch.to_string()).await;
        let start = if resumed { work_branch } else { base_branch };
        if !resumed && !has(base_branch.to_string()).await {
            return Err(RepoError::NoSuchBranch {
                url: self.args.url.clone(),
                branch: base_branch.to_string(),
            });
        }
        let workspace_error = |message: String| RepoError::Workspace {
            path: path.display().to_string(),
            message,
        };
        let _ = tokio::fs::remove_dir_all(path).await;
        let target = path.display().to_string();
        git(
            &[
                "clone",
                "--local",
                "--quiet",
                "--branch",
                start,
                &self.args.mirror.display().to_string(),
                &target,
            ],
            None,
        )
        .await
        .map_err(workspace_error)?;
        if !resumed {
            git(&["checkout", "--quiet", "-b", work_branch], Some(path))
                .await
                .map_err(workspace_error)?;
        }
        // Pushes go to the real origin, not to the node's mirror.
        git(&["remote", "set-url", "origin", &self.args.url], Some(path))
            .await
            .map_err(workspace_error)?;
        let head_commit = git(&["rev-parse", "HEAD"], Some(path)).await.map_err(workspace_error)?;
        Ok(Workspace {
            path: path.to_path_buf(),
            branch: work_branch.to_string(),
            head_commit,
            resumed,
        })
    }
}

impl Actor for RepoActor {
    type Msg = RepoMsg;
    type State = RepoState;
    type Arguments = RepoArgs;

    async fn pre_start(&self, _myself: ActorRef<RepoMsg>, args: RepoArgs) -> Result<RepoState, ActorProcessingErr> {
        Ok(RepoState { args, cloned: false })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RepoMsg>,
        message: RepoMsg,
        state: &mut RepoState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RepoMsg::PrepareWorkspace {
                base_branch,
                work_branch,
                path,
                reply,
            } => {
                let result = state.prepare(&base_branch, &work_branch, &path).await;
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}

/// The node's repository actors, one per URL, started on first use.
#[derive(Default)]
pub struct Repos {
    actors: HashMap<String, ActorRef<RepoMsg>>,
}

impl Repos {
    pub async fn actor_for(
        &mut self,
        url: &str,
        repos_dir: &Path,
        supervisor: ractor::ActorCell,
    ) -> Result<ActorRef<RepoMsg>, ActorProcessingErr> {
        if let Some(actor) = self.actors.get(url) {
            // Only an actor that has ended is replaced: one that is still starting already owns
            // the mirror, and a second one would clone into the same directory.
            let ended = matches!(
                actor.get_status(),
                ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
            );
            if !ended {
                return Ok(actor.clone());
            }
        }
        let (actor, _) = Actor::spawn_linked(
            None,
            RepoActor,
            RepoArgs {
                url: url.to_string(),
                mirror: mirror_path(repos_dir, url),
            },
            supervisor,
        )
        .await?;
        self.actors.insert(url.to_string(), actor.clone());
        Ok(actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn origin_with_main(dir: &Path) -> String {
        let origin = dir.join("origin.git");
        let seed = dir.join("seed");
        git(&["init", "--quiet", "--bare", &origin.display().to_string()], None)
            .await
            .unwrap();
        git(&["init", "--quiet", "-b", "main", &seed.display().to_string()], None)
            .await
            .unwrap();
        std::fs::write(seed.join("README.md"), "hello\n").unwrap();
        for args in [
            vec!["add", "."],
            vec![
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.test",
                "commit",
                "--quiet",
                "-m",
                "seed",
            ],
            vec!["push", "--quiet", &origin.display().to_string(), "main"],
        ] {
            git(&args, Some(&seed)).await.unwrap();
        }
        format!("file://{}", origin.display())
    }

    #[tokio::test]
    async fn workspaces_come_from_the_mirror_on_the_work_branch() {
        let dir = tempfile::tempdir().unwrap();
        let url = origin_with_main(dir.path()).await;
        let mut state = RepoState {
            args: RepoArgs {
                url: url.clone(),
                mirror: mirror_path(&dir.path().join("repos"), &url),
            },
            cloned: false,
        };
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        let workspace = state
            .prepare("main", "flotilla/abc-test", &dir.path().join("w1"))
            .await
            .unwrap();
        assert!(!workspace.resumed);
        assert_eq!(
            git(&["branch", "--show-current"], Some(&workspace.path)).await.unwrap(),
            "flotilla/abc-test"
        );
        assert!(workspace.path.join("README.md").exists());
        assert_eq!(
            git(&["remote", "get-url", "origin"], Some(&workspace.path))
                .await
                .unwrap(),
            url
        );
        // A second workspace reuses the mirror (fetch, not clone).
        let second = state
            .prepare("main", "flotilla/def", &dir.path().join("w2"))
            .await
            .unwrap();
        assert_eq!(second.head_commit, workspace.head_commit);
    }

    #[tokio::test]
    async fn unknown_branches_and_unreachable_repositories_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let url = origin_with_main(dir.path()).await;
        let mut state = RepoState {
            args: RepoArgs {
                url: url.clone(),
                mirror: mirror_path(dir.path(), &url),
            },
            cloned: false,
        };
        let error = state.prepare("develop", "w", &dir.path().join("w")).await.unwrap_err();
        assert_eq!(
            error,
            RepoError::NoSuchBranch {
                url: url.clone(),
                branch: "develop".to_string()
            }
        );
        let missing = format!("file://{}/nowhere.git", dir.path().display());
        let mut state = RepoState {
            args: RepoArgs {
                url: missing.clone(),
                mirror: mirror_path(dir.path(), &missing),
            },
            cloned: false,
        };
        let error = state.prepare("main", "w", &dir.path().join("w2")).await.unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with(&format!("cannot clone {missing}:")), "{text}");
        assert!(
            text.contains("does not exist") || text.contains("not found") || text.contains("fatal"),
            "{text}"
        );
    }
}
