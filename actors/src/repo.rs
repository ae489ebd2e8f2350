//! Repositories on a node: one `RepoActor` per repository URL keeps a bare mirror under the
//! node's data dir and makes agent workspaces from it. A workspace is a local clone of the
//! mirror (objects hard-linked where the filesystem allows, so it is fast and yet
//! self-contained: a machine sees nothing outside its workspace) with the agent's work branch
//! checked out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sha2::{Digest, Sha256};
use tokio::process::Command as Process;

use crate::origin_fence::{ObjectFormat, OwnerFence};
use crate::push_bundle::{self, PushSource};
use crate::repo_url::{allowed_git_protocols, RepositoryPolicy, RepositoryUrlRefused};
use crate::vcs::{GitOrigin, VcsProviders};

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
    #[error("this node refuses the repository: {0}")]
    Refused(RepositoryUrlRefused),
    #[error("push of {branch} to {url} failed: {message}")]
    Push {
        url: String,
        branch: String,
        message: String,
    },
    /// The origin's branch is not at the commit the push was leased on: another owner moved it.
    #[error(
        "push of {branch} to {url} refused: the origin holds {} where the record says {}",
        shown(found),
        shown(expected)
    )]
    LeaseLost {
        url: String,
        branch: String,
        expected: Option<String>,
        found: Option<String>,
    },
    #[error("cannot read the branch {branch} at {url}: {message}")]
    ListRemote {
        url: String,
        branch: String,
        message: String,
    },
    #[error(
        "cannot move the branch {branch} at {url} back to the recorded {}: {message}",
        shown(recorded)
    )]
    Restore {
        url: String,
        branch: String,
        recorded: Option<String>,
        message: String,
    },
    /// The origin's fence of the agent is a later owner's (or no owner's): this owner lost the
    /// agent, and the origin refused its push whole.
    #[error("the origin {url} refused the push: its {fence_ref} is at {found}, not the fence of epoch {epoch}: a later owner holds the agent")]
    Fenced {
        url: String,
        fence_ref: String,
        epoch: u64,
        found: String,
    },
    #[error("cannot move the fence {fence_ref} at {url}: {message}")]
    Fence {
        url: String,
        fence_ref: String,
        message: String,
    },
}

/// A commit of a branch as an error names it: the branch may not exist.
fn shown(commit: &Option<String>) -> String {
    commit.clone().unwrap_or_else(|| "no branch".to_string())
}

/// Why a git command gave no answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GitError {
    #[error("git {command} took longer than {timeout:?}")]
    TimedOut { command: String, timeout: Duration },
    #[error("cannot run git: {0}")]
    Spawn(String),
    /// git's own words (its stderr), cut to [`MAX_GIT_ERROR_BYTES`].
    #[error("{0}")]
    Failed(String),
}

/// Where git goes could not be settled: the provider failed, or this node's repository policy
/// refuses the URL.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    #[error("VCS provider: {0}")]
    Provider(#[from] crate::vcs::VcsError),
    #[error("refused by this node: {0}")]
    Refused(#[from] RepositoryUrlRefused),
}

/// How the node talks to git origins: the commit author of agent commits and the credentials
/// for http(s) origins, chosen by the longest matching URL prefix.
#[derive(Clone, Default)]
pub struct GitSettings {
    pub author_name: String,
    pub author_email: String,
    pub credentials: Vec<GitCredential>,
    /// Which repository URLs this node hands to git (local ones only under `[repos] allow_local`).
    pub repositories: RepositoryPolicy,
}

#[derive(Clone)]
pub struct GitCredential {
    pub url_prefix: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for GitCredential {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "GitCredential({} as {}, <redacted>)",
            self.url_prefix, self.username
        )
    }
}

impl std::fmt::Debug for GitSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GitSettings")
            .field("author_name", &self.author_name)
            .field("author_email", &self.author_email)
            .field("credentials", &self.credentials)
            .field("repositories", &self.repositories)
            .finish()
    }
}

impl GitSettings {
    /// Environment that makes git send the credential for `url` as an HTTP header. It goes
    /// through git's `GIT_CONFIG_*` variables, so it is on no command line and in no file.
    pub fn auth_env(&self, url: &str) -> Vec<(String, String)> {
        use base64::Engine as _;
        let Some(credential) = self
            .credentials
            .iter()
            .filter(|credential| prefix_matches(&credential.url_prefix, url))
            .max_by_key(|credential| credential.url_prefix.len())
        else {
            return Vec::new();
        };
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", credential.username, credential.password));
        extra_header_env(&format!("Authorization: Basic {basic}"))
    }
}

/// Whether a credential for `prefix` may be sent to `url`: the prefix matches whole path
/// segments, so `https://git.example.com/team` covers `https://git.example.com/team/repo.git`
/// but neither `https://git.example.com/team-other/...` nor `https://git.example.com.evil/...`.
pub fn prefix_matches(prefix: &str, url: &str) -> bool {
    let Some(rest) = url.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/')
}

/// Environment that makes git send `header` ("Name: value") with every HTTP request, through
/// git's `GIT_CONFIG_*` variables: on no command line and in no file.
pub fn extra_header_env(header: &str) -> Vec<(String, String)> {
    vec![
        ("GIT_CONFIG_COUNT".to_string(), "1".to_string()),
        ("GIT_CONFIG_KEY_0".to_string(), "http.extraHeader".to_string()),
        ("GIT_CONFIG_VALUE_0".to_string(), header.to_string()),
    ]
}

/// A workspace ready for a machine.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub path: PathBuf,
    pub branch: String,
    pub head_commit: String,
    /// The tree of `head_commit` (`git rev-parse HEAD^{tree}`), read in the node's own mirror:
    /// the files of the checkout, part of the install layer's key.
    pub tree: String,
    /// Whether the work branch already existed in the origin (a resumed or follow-up run).
    pub resumed: bool,
}

async fn git(args: &[&str], cwd: Option<&Path>) -> Result<String, GitError> {
    git_with(args, cwd, &[]).await
}

async fn git_with(args: &[&str], cwd: Option<&Path>, env: &[(String, String)]) -> Result<String, GitError> {
    let mut command = Process::new("git");
    command.args(args);
    command.envs(env.iter().map(|(name, value)| (name, value)));
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    run_git(command, args).await
}

/// Git over what a machine sent, in a repository of the node's (`cwd`): only that repository's
/// config counts, no hooks run, no transport but those `args` allow after the isolating ones,
/// and every object received is checked (see [`crate::push_bundle`]).
async fn git_isolated(args: &[&str], cwd: &Path) -> Result<String, GitError> {
    let mut command = Process::new("git");
    command.args(push_bundle::ISOLATED_GIT_CONFIG).args(args);
    let (set, removed) = push_bundle::isolated_git_env(&push_bundle::incoming_dir(cwd));
    for name in removed {
        command.env_remove(name);
    }
    command.envs(set).current_dir(cwd);
    run_git(command, args).await
}

async fn run_git(mut command: Process, args: &[&str]) -> Result<String, GitError> {
    command.kill_on_drop(true);
    command.env("GIT_TERMINAL_PROMPT", "0");
    let output = tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .map_err(|_| GitError::TimedOut {
            command: args.join(" "),
            timeout: GIT_TIMEOUT,
        })?
        .map_err(|error| GitError::Spawn(error.to_string()))?;
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
        Err(GitError::Failed(message))
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
        /// The agent's recorded commit of `work_branch` (its `pushed_commit`): the workspace
        /// starts there, whatever the origin holds.
        recorded: Option<String>,
        path: PathBuf,
        /// When the agent asked: the mirror is fetched unless a fetch started after this.
        requested_at: Instant,
        reply: RpcReplyPort<Result<Workspace, RepoError>>,
    },
    /// Take `branch` from what the machine made of it (`source`: a bundle over `base` beneath
    /// `workspace`, the machine's `/workspace` as the node sees it) into the mirror and push it
    /// to the origin, leased on `lease` (the recorded commit; `None`: the branch must not exist).
    /// `base` is the commit the workspace was made at. The push moves `fence` with the branch,
    /// atomically (see [`crate::origin_fence`]). Answers the commit pushed.
    Push {
        fence: OwnerFence,
        workspace: PathBuf,
        branch: String,
        base: String,
        source: PushSource,
        lease: Option<String>,
        reply: RpcReplyPort<Result<String, RepoError>>,
    },
    /// What the origin's `branch` is at (`git ls-remote`); `None` when it does not exist.
    BranchAtOrigin {
        branch: String,
        reply: RpcReplyPort<Result<Option<String>, RepoError>>,
    },
    /// Keeps `found`'s commit (what the origin's `branch` holds instead of the record) in the
    /// mirror under its ref, and moves the origin's branch back to `recorded` (deletes it when
    /// `None`), leased on that commit; with `found` `None`, leased on the branch being absent.
    Restore {
        fence: OwnerFence,
        branch: String,
        recorded: Option<String>,
        /// The commit found, and the ref to keep it under.
        found: Option<(String, String)>,
        reply: RpcReplyPort<Result<(), RepoError>>,
    },
    /// Moves the origin's fence of the agent to `fence`'s epoch (what an owner that succeeds
    /// another does first).
    TakeFence {
        fence: OwnerFence,
        reply: RpcReplyPort<Result<(), RepoError>>,
    },
}

impl ractor::Message for RepoMsg {}

#[derive(Clone)]
pub struct RepoArgs {
    /// The repository as the agent names it (its provider maps it to the URL git uses).
    pub url: String,
    pub mirror: PathBuf,
    /// Credentials of the node's config, for origins whose provider gives no auth header.
    pub git: GitSettings,
    /// The node's VCS providers; `None` clones `url` as it is.
    pub providers: Option<Arc<dyn VcsProviders>>,
}

/// Where git goes for one clone, fetch or push, and the environment that authenticates it.
struct ResolvedOrigin {
    url: String,
    env: Vec<(String, String)>,
}

pub struct RepoState {
    args: RepoArgs,
    cloned: bool,
    /// When the last successful fetch of the mirror started: a workspace asked for before then
    /// is served without another fetch (a burst of agents of one repository fetches once).
    refreshed_at: Option<Instant>,
    /// Workspaces are made from the mirror off the actor, each holding this shared; whatever
    /// moves the mirror's branches or repacks it (fetch, push, restore) holds it exclusively
    /// ([`RepoState::hold_exclusive`]), so no workspace reads a pack that a fetch's repack is
    /// removing. It holds the mirror's generation, which each exclusive hold raises: the
    /// workspaces of one generation are copied from one skeleton.
    mirror_lock: Arc<tokio::sync::RwLock<u64>>,
    /// The workspace skeleton of the latest generation asked for (see [`skeleton`]).
    skeleton: skeleton::SkeletonCache,
    /// The mirror's object format (the origin's), read once per clone of the mirror: every
    /// fence an agent takes needs it.
    object_format: Arc<tokio::sync::OnceCell<crate::origin_fence::ObjectFormat>>,
    /// What this node knows of the agents' fences at the origin (`refs/flotilla/fence/*`): read
    /// from the mirror once per clone of it (a new mirror holds the origin's), then kept by
    /// every fence this node moves. The origin's leases keep any error in it harmless: a push
    /// planned from a stale or missing value is refused, and the origin is read.
    fences: fence::FenceKnowledge,
}

impl RepoState {
    /// The state of a repository actor that has not cloned its mirror yet (it may be on disk
    /// from an earlier run: the first use fetches it).
    fn new(args: RepoArgs) -> RepoState {
        RepoState {
            args,
            cloned: false,
            refreshed_at: None,
            mirror_lock: Default::default(),
            skeleton: Default::default(),
            object_format: Default::default(),
            fences: Default::default(),
        }
    }

    /// Asks the repository's provider where git goes now (the credentials may have changed).
    /// Both the URL the agent names and the one the provider answers are checked against this
    /// node's own policy (its config may differ from the node that took the create), and git
    /// is told to use no other protocol than the URL needs.
    async fn origin(&self) -> Result<ResolvedOrigin, OriginError> {
        let policy = &self.args.git.repositories;
        policy.check_blocking(&self.args.url).await?;
        let origin = match &self.args.providers {
            Some(providers) => providers.origin(&self.args.url).await?,
            None => GitOrigin {
                url: self.args.url.clone(),
                auth_header: None,
            },
        };
        let location = policy.check_blocking(&origin.url).await?;
        let mut env = match &origin.auth_header {
            Some((name, value)) => extra_header_env(&format!("{name}: {value}")),
            None => self.args.git.auth_env(&origin.url),
        };
        env.push((
            "GIT_ALLOW_PROTOCOL".to_string(),
            allowed_git_protocols(&location).to_string(),
        ));
        Ok(ResolvedOrigin { url: origin.url, env })
    }

    async fn refresh(&mut self) -> Result<(), RepoError> {
        let started = Instant::now();
        let url = self.args.url.clone();
        let mirror = self.args.mirror.display().to_string();
        let origin = self.origin().await.map_err(|error| match error {
            OriginError::Refused(refused) => RepoError::Refused(refused),
            OriginError::Provider(_) => RepoError::Clone {
                url: url.clone(),
                message: error.to_string(),
            },
        })?;
        if !self.cloned && !self.args.mirror.join("HEAD").exists() {
            let partial = format!("{mirror}.partial");
            let _ = tokio::fs::remove_dir_all(&partial).await;
            // git runs in the mirrors' directory, so it is given the partial clone's name there
            // (the mirror's path may be relative to the node's own working directory).
            let partial_name = Path::new(&partial)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| partial.clone());
            // `--no-local`: a local origin is read through git's transport (which checks what it
            // serves) rather than copied file by file; `--`: no URL reads as an option; the
            // mirrors' directory as the working directory: a URL is never found as a relative path.
            git_with(
                &[
                    "clone",
                    "--mirror",
                    "--quiet",
                    "--no-local",
                    "--",
                    &origin.url,
                    &partial_name,
                ],
                self.args.mirror.parent(),
                &origin.env,
            )
            .await
            .map_err(|error| RepoError::Clone {
                url: url.clone(),
                message: error.to_string(),
            })?;
            tokio::fs::rename(&partial, &mirror)
                .await
                .map_err(|error| RepoError::Clone {
                    url: url.clone(),
                    message: error.to_string(),
                })?;
            // A new clone may hold another object format than a mirror cloned before it.
            self.object_format = Default::default();
            // It also holds the origin's fences: what this node knew of them is read again.
            self.fences = Default::default();
        } else {
            // The provider may move the repository (another clone URL): follow it.
            git(&["remote", "set-url", "origin", &origin.url], Some(&self.args.mirror))
                .await
                .map_err(|error| RepoError::Fetch {
                    url: url.clone(),
                    message: error.to_string(),
                })?;
            // Branches and tags only: `--prune` then leaves the node's own refs alone (the
            // commits of refused pushes under refs/flotilla/kept/), which a mirror's
            // `+refs/*:refs/*` would delete as missing from origin.
            git_with(
                &[
                    "fetch",
                    "--prune",
                    "--quiet",
                    "origin",
                    "+refs/heads/*:refs/heads/*",
                    "+refs/tags/*:refs/tags/*",
                ],
                Some(&self.args.mirror),
                &origin.env,
            )
            .await
            .map_err(|error| RepoError::Fetch {
                url,
                message: error.to_string(),
            })?;
        }
        self.cloned = true;
        self.refreshed_at = Some(started);
        Ok(())
    }
}

impl RepoState {
    /// Pushes through the mirror, never from the workspace: the machine's git made a bundle of
    /// the branch, the node imports it into the mirror (see [`crate::push_bundle`]) and pushes
    /// from there. Nothing of the workspace's `.git` (config, hooks, alternates, refs) is read by
    /// git on the node.
    async fn push(
        &mut self,
        fence: OwnerFence,
        workspace: &Path,
        branch: &str,
        base: &str,
        source: &PushSource,
        lease: Option<&str>,
    ) -> Result<String, RepoError> {
        let failed = |message: String| RepoError::Push {
            url: self.args.url.clone(),
            branch: branch.to_string(),
            message,
        };
        let staging = format!("refs/flotilla/push/{branch}");
        let mirror = self.args.mirror.clone();
        self.stage(workspace, branch, base, source, &staging)
            .await
            .map_err(failed)?;
        let result = async {
            let commit = git(
                &["rev-parse", "--verify", &format!("{staging}^{{commit}}")],
                Some(&mirror),
            )
            .await
            .map_err(|error| failed(error.to_string()))?;
            let format =
                ObjectFormat::of_id(&commit).ok_or_else(|| failed(format!("{commit:?} is not an object id")))?;
            // The lease is the record's commit and the fence the owner's epoch: the origin takes
            // the push only while its branch is where the record says and no later owner has
            // moved the fence, so an owner that lost the agent cannot move the branch.
            let pushed = self.push_with_fence(format, fence, branch, lease, &commit).await;
            if let Err(error) = pushed {
                // The commits stay on this node, where an operator can still push them.
                let kept = format!("refs/flotilla/kept/{branch}");
                let _ = git(&["update-ref", &kept, &commit], Some(&mirror)).await;
                return Err(match error {
                    fence::FencedPushError::Git(error) => failed(format!(
                        "{error} (commit {commit} is kept in the mirror {} as {kept})",
                        mirror.display()
                    )),
                    refused => self.fence_error(fence, branch, lease, refused),
                });
            }
            // The mirror now knows the pushed commit, so a workspace made here resumes from it.
            let _ = git(&["update-ref", &format!("refs/heads/{branch}"), &commit], Some(&mirror)).await;
            Ok(commit)
        }
        .await;
        let _ = git(&["update-ref", "-d", &staging], Some(&mirror)).await;
        result
    }
}

impl RepoState {
    /// Sets the mirror's `staging` ref to the machine's branch: imports the bundle the machine
    /// made, or, when the branch holds nothing new, checks that its tip is a commit of the base.
    async fn stage(
        &self,
        workspace: &Path,
        branch: &str,
        base: &str,
        source: &PushSource,
        staging: &str,
    ) -> Result<(), String> {
        let mirror = &self.args.mirror;
        match source {
            PushSource::Bundle => {
                let bundle = push_bundle::copy_bundle(
                    workspace,
                    &push_bundle::incoming_dir(mirror),
                    push_bundle::MAX_PUSH_BUNDLE_BYTES,
                )
                .await
                .map_err(|error| error.to_string())?;
                let bundle_path = bundle.path().display().to_string();
                git_isolated(
                    &[
                        "-c",
                        "protocol.file.allow=always",
                        "fetch",
                        "--quiet",
                        "--no-tags",
                        "--no-write-fetch-head",
                        &bundle_path,
                        &format!("+refs/heads/{branch}:{staging}"),
                    ],
                    mirror,
                )
                .await
                .map_err(|error| format!("cannot take the branch from the workspace's bundle: {error}"))?;
            }
            PushSource::NothingNew { tip } => {
                if !push_bundle::is_object_id(tip) || !push_bundle::is_object_id(base) {
                    return Err(format!(
                        "the machine named {tip:?} as the branch's commit, not an object id"
                    ));
                }
                git_isolated(&["merge-base", "--is-ancestor", tip, base], mirror)
                    .await
                    .map_err(|_| {
                        format!("the machine named {tip} as the branch's commit, which the base {base} does not hold")
                    })?;
                git_isolated(&["update-ref", staging, tip], mirror)
                    .await
                    .map_err(|error| error.to_string())?;
            }
        }
        Ok(())
    }
}

impl Actor for RepoActor {
    type Msg = RepoMsg;
    type State = RepoState;
    type Arguments = RepoArgs;

    async fn pre_start(&self, _myself: ActorRef<RepoMsg>, args: RepoArgs) -> Result<RepoState, ActorProcessingErr> {
        Ok(RepoState::new(args))
    }

    async fn handle(
        &self,
        _myself: ActorRef<RepoMsg>,
        message: RepoMsg,
        state: &mut RepoState,
    ) -> Result<(), ActorProcessingErr> {
        let message = match message {
            RepoMsg::PrepareWorkspace {
                base_branch,
                work_branch,
                recorded,
                path,
                requested_at,
                reply,
            } => {
                let wanted = workspace::Wanted {
                    base_branch,
                    work_branch,
                    recorded,
                    path,
                };
                match state.refresh_for(requested_at).await {
                    // The rest runs off the actor: the next agent's workspace need not wait.
                    Ok(()) => state.spawn_workspace(wanted, reply).await,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
                return Ok(());
            }
            // Per-agent refs at the origin and in the mirror: agents take their fences and read
            // their branches side by side once the mirror exists.
            RepoMsg::TakeFence { fence, reply } if state.cloned => {
                let detached = state.detached();
                state
                    .spawn_shared(|_| async move {
                        let _ = reply.send(detached.take_fence_cloned(fence).await);
                    })
                    .await;
                return Ok(());
            }
            RepoMsg::BranchAtOrigin { branch, reply } => {
                let detached = state.detached();
                state
                    .spawn_shared(|_| async move {
                        let _ = reply.send(detached.branch_at_origin(&branch).await);
                    })
                    .await;
                return Ok(());
            }
            other => other,
        };
        // Everything below writes the mirror (or reads the origin next to a write): no workspace
        // clone is in flight while it runs.
        let _exclusive = state.hold_exclusive().await;
        match message {
            // Answered above.
            RepoMsg::PrepareWorkspace { .. } | RepoMsg::BranchAtOrigin { .. } => {}
            RepoMsg::Push {
                fence,
                workspace,
                branch,
                base,
                source,
                lease,
                reply,
            } => {
                let result = state
                    .push(fence, &workspace, &branch, &base, &source, lease.as_deref())
                    .await;
                let _ = reply.send(result);
            }
            RepoMsg::Restore {
                fence,
                branch,
                recorded,
                found,
                reply,
            } => {
                let found = found.as_ref().map(|(commit, kept)| (commit.as_str(), kept.as_str()));
                let _ = reply.send(state.restore(fence, &branch, recorded.as_deref(), found).await);
            }
            RepoMsg::TakeFence { fence, reply } => {
                let _ = reply.send(state.take_fence(fence).await);
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
        git: &GitSettings,
        providers: Option<Arc<dyn VcsProviders>>,
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
                git: git.clone(),
                providers,
            },
            supervisor,
        )
        .await?;
        self.actors.insert(url.to_string(), actor.clone());
        Ok(actor)
    }
}

#[path = "repo_fence.rs"]
mod fence;

#[path = "repo_workspace.rs"]
mod workspace;

#[path = "repo_skeleton.rs"]
mod skeleton;

#[cfg(test)]
#[path = "repo_push_tests.rs"]
mod push_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings that allow local repositories under `directory` (the tests' origins).
    pub(super) fn allowing(directory: &Path) -> GitSettings {
        GitSettings {
            repositories: RepositoryPolicy::new(vec![directory.to_path_buf()]),
            ..GitSettings::default()
        }
    }

    pub(super) async fn origin_with_main(dir: &Path) -> String {
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
        let mut state = RepoState::new(RepoArgs {
            url: url.clone(),
            mirror: mirror_path(&dir.path().join("repos"), &url),
            git: allowing(dir.path()),
            providers: None,
        });
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        let workspace = state
            .prepare("main", "flotilla/abc-test", None, &dir.path().join("w1"))
            .await
            .unwrap();
        assert!(!workspace.resumed);
        assert_eq!(
            git(&["branch", "--show-current"], Some(&workspace.path)).await.unwrap(),
            "flotilla/abc-test"
        );
        assert!(workspace.path.join("README.md").exists());
        assert_eq!(
            workspace.tree,
            git(&["rev-parse", "HEAD^{tree}"], Some(&workspace.path)).await.unwrap()
        );
        assert_eq!(workspace.tree.len(), 40, "{}", workspace.tree);
        assert_eq!(
            git(&["remote", "get-url", "origin"], Some(&workspace.path))
                .await
                .unwrap(),
            url
        );
        // A second workspace reuses the mirror (fetch, not clone).
        let second = state
            .prepare("main", "flotilla/def", None, &dir.path().join("w2"))
            .await
            .unwrap();
        assert_eq!(second.head_commit, workspace.head_commit);
    }

    #[tokio::test]
    async fn fetches_prune_vanished_branches_but_keep_the_commits_of_refused_pushes() {
        let dir = tempfile::tempdir().unwrap();
        let url = origin_with_main(dir.path()).await;
        let origin = dir.path().join("origin.git");
        let mirror = mirror_path(&dir.path().join("repos"), &url);
        let mut state = RepoState::new(RepoArgs {
            url: url.clone(),
            mirror: mirror.clone(),
            git: allowing(dir.path()),
            providers: None,
        });
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        git(&["branch", "feature", "main"], Some(&origin)).await.unwrap();
        state
            .prepare("main", "flotilla/a", None, &dir.path().join("w1"))
            .await
            .unwrap();
        let head = git(&["rev-parse", "main"], Some(&mirror)).await.unwrap();
        git(&["update-ref", "refs/flotilla/kept/flotilla/a", &head], Some(&mirror))
            .await
            .unwrap();
        git(&["branch", "-D", "feature"], Some(&origin)).await.unwrap();

        state
            .prepare("main", "flotilla/b", None, &dir.path().join("w2"))
            .await
            .unwrap();
        assert!(
            git(&["rev-parse", "--verify", "refs/heads/feature"], Some(&mirror))
                .await
                .is_err(),
            "a branch deleted on origin is pruned from the mirror"
        );
        assert_eq!(
            git(&["rev-parse", "refs/flotilla/kept/flotilla/a"], Some(&mirror))
                .await
                .unwrap(),
            head,
            "the kept commit of a refused push survives the fetch"
        );
    }

    #[tokio::test]
    async fn unknown_branches_and_unreachable_repositories_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let url = origin_with_main(dir.path()).await;
        let mut state = RepoState::new(RepoArgs {
            url: url.clone(),
            mirror: mirror_path(dir.path(), &url),
            git: allowing(dir.path()),
            providers: None,
        });
        let error = state
            .prepare("develop", "w", None, &dir.path().join("w"))
            .await
            .unwrap_err();
        assert_eq!(
            error,
            RepoError::NoSuchBranch {
                url: url.clone(),
                branch: "develop".to_string()
            }
        );
        let missing = format!("file://{}/nowhere.git", dir.path().display());
        let mut state = RepoState::new(RepoArgs {
            url: missing.clone(),
            mirror: mirror_path(dir.path(), &missing),
            git: allowing(dir.path()),
            providers: None,
        });
        let error = state
            .prepare("main", "w", None, &dir.path().join("w2"))
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with(&format!("cannot clone {missing}:")), "{text}");
        assert!(
            text.contains("does not exist") || text.contains("not found") || text.contains("fatal"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_cloning_node_refuses_repositories_its_own_policy_does_not_allow() {
        let dir = tempfile::tempdir().unwrap();
        let url = origin_with_main(dir.path()).await;
        let repos = dir.path().join("repos");
        std::fs::create_dir_all(&repos).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let pwned = dir.path().join("pwned");
        let helper = format!("ext::sh -c touch% {}", pwned.display());
        for (url, settings) in [
            (url.clone(), GitSettings::default()),
            (url.clone(), allowing(&elsewhere)),
            (helper.clone(), allowing(dir.path())),
        ] {
            let mirror = mirror_path(&repos, &url);
            let mut state = RepoState::new(RepoArgs {
                url: url.clone(),
                mirror: mirror.clone(),
                git: settings,
                providers: None,
            });
            let error = state
                .prepare("main", "w", None, &dir.path().join("w"))
                .await
                .unwrap_err();
            let RepoError::Refused(refused) = &error else {
                panic!("{url}: expected a refusal, found {error}");
            };
            let text = error.to_string();
            assert!(
                text.starts_with("this node refuses the repository: repository "),
                "{text}"
            );
            if url == helper {
                assert!(!refused.denied_by_policy(), "{text}");
                assert!(text.contains("\"ext::\" transport runs a helper program"), "{text}");
            } else {
                assert!(refused.denied_by_policy(), "{text}");
                assert!(text.contains("[repos] allow_local"), "{text}");
            }
            assert!(!mirror.exists(), "{url}: nothing is cloned");
        }
        assert!(!pwned.exists(), "the ext:: helper never ran");
    }
}
