//! Git around a run: commits are made inside the machine (the agent's own git config and hooks
//! act only there), pushes leave the machine as a bundle its own git writes and go through the
//! repository actor's mirror, and a stopped agent's work is committed and pushed one last time.

use flotilla_raft::{AgentId, Command, Epoch, Replica};
use flotilla_sandbox::{ExecRequest, SandboxError};
use ractor::ActorRef;
use std::sync::Arc;

use crate::machine::RunningMachine;
use crate::origin_fence::OwnerFence;
use crate::push_bundle::{PushSource, PUSH_BUNDLE_PATH, PUSH_BUNDLE_TIMEOUT_MS};
use crate::repo::{GitSettings, RepoError, RepoMsg, Workspace};

use super::{record, STOP_PUSH_TIMEOUT};

/// Why committing inside the machine gave no commit.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("cannot run git in the machine: {0}")]
    Machine(#[from] SandboxError),
    #[error("git commit failed in the machine: {last_lines}")]
    Failed { last_lines: String },
    #[error("git did not answer a commit: {answer:?}")]
    NotACommit { answer: String },
}

/// Why a push did not reach the origin.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("cannot run git in the machine to bundle the branch: {0}")]
    Machine(#[from] SandboxError),
    #[error("git could not bundle the branch in the machine: {last_lines}")]
    Bundle { last_lines: String },
    #[error("git in the machine gave no bundle answer: {answer:?}")]
    BundleAnswer { answer: String },
    #[error("the repository actor did not answer: {0}")]
    RepositoryActor(String),
    #[error(transparent)]
    Refused(#[from] RepoError),
}

const COMMIT_SCRIPT: &str = "set -e\n\
    g() { git -c safe.directory='*' -c core.hooksPath=/dev/null \"$@\"; }\n\
    g add -A\n\
    if ! g diff --cached --quiet; then\n\
      printf '%s\\n' \"$FLOTILLA_COMMIT_MESSAGE\" | g -c user.name=\"$FLOTILLA_GIT_NAME\" -c user.email=\"$FLOTILLA_GIT_EMAIL\" commit --quiet --no-verify -F -\n\
    fi\n\
    g rev-parse HEAD\n";

/// Commits everything the workspace holds inside the machine and answers the head commit.
pub async fn commit_in_machine(
    machine: &RunningMachine,
    git: &GitSettings,
    message: &str,
) -> Result<String, CommitError> {
    let request = ExecRequest::new(COMMIT_SCRIPT)
        .with_timeout_ms(120_000)
        .with_env("FLOTILLA_COMMIT_MESSAGE", message)
        .with_env("FLOTILLA_GIT_NAME", git.author_name.clone())
        .with_env("FLOTILLA_GIT_EMAIL", git.author_email.clone());
    let output = machine.exec(request).await?;
    if !output.success() {
        return Err(CommitError::Failed {
            last_lines: output.last_lines(8),
        });
    }
    let head = output.stdout_text().trim().lines().last().unwrap_or("").to_string();
    if head.len() < 40 || !head.chars().all(|character| character.is_ascii_hexdigit()) {
        return Err(CommitError::NotACommit { answer: head });
    }
    Ok(head)
}

/// Bundles the work branch over the workspace's base commit, in the machine and as its user: an
/// empty bundle is an error to git, so a branch with nothing new answers its tip instead. The
/// branch and base come in the environment, never in the script's text.
const BUNDLE_SCRIPT: &str = "set -e\n\
    g() { git -c safe.directory='*' -c core.hooksPath=/dev/null \"$@\"; }\n\
    rm -f \"$FLOTILLA_BUNDLE\"\n\
    tip=$(g rev-parse --verify --quiet \"refs/heads/$FLOTILLA_BRANCH^{commit}\") || \
      { echo \"the branch $FLOTILLA_BRANCH has no commit in the workspace\" >&2; exit 3; }\n\
    if [ -z \"$(g rev-list -n 1 \"$tip\" \"^$FLOTILLA_BASE\")\" ]; then echo \"nothing-new $tip\"; exit 0; fi\n\
    g bundle create --quiet \"$FLOTILLA_BUNDLE\" \"refs/heads/$FLOTILLA_BRANCH\" \"^$FLOTILLA_BASE\"\n\
    echo bundle\n";

/// Has git in the machine bundle `workspace`'s branch over its base commit.
async fn bundle_in_machine(machine: &RunningMachine, workspace: &Workspace) -> Result<PushSource, PushError> {
    let request = ExecRequest::new(BUNDLE_SCRIPT)
        .with_timeout_ms(PUSH_BUNDLE_TIMEOUT_MS)
        .with_max_output_bytes(64 * 1024)
        .with_env("FLOTILLA_BUNDLE", PUSH_BUNDLE_PATH)
        .with_env("FLOTILLA_BRANCH", workspace.branch.clone())
        .with_env("FLOTILLA_BASE", workspace.head_commit.clone());
    let output = machine.exec(request).await?;
    if !output.success() {
        let mut last_lines = output.last_lines(8);
        if let Some(reason) = output.killed_reason {
            last_lines = format!("{reason}; {last_lines}");
        }
        return Err(PushError::Bundle { last_lines });
    }
    let answer = output.stdout_text().trim().lines().last().unwrap_or("").to_string();
    match answer.split_once(' ') {
        None if answer == "bundle" => Ok(PushSource::Bundle),
        Some(("nothing-new", tip)) => Ok(PushSource::NothingNew { tip: tip.to_string() }),
        _ => Err(PushError::BundleAnswer { answer }),
    }
}

/// Pushes the work branch: git in the machine bundles it, and the repository actor takes the
/// bundle from the machine's view of its workspace into the mirror and pushes from there,
/// leased on `lease`, the agent's recorded commit, and moving the owner's `fence` with it (see
/// [`crate::run::branch`]).
pub async fn push(
    repo: &ActorRef<RepoMsg>,
    machine: &RunningMachine,
    workspace: &Workspace,
    fence: OwnerFence,
    lease: Option<String>,
) -> Result<String, PushError> {
    let source = bundle_in_machine(machine, workspace).await?;
    let pushed = ractor::call!(repo, |reply| RepoMsg::Push {
        fence,
        workspace: machine.workspace_path().to_path_buf(),
        branch: workspace.branch.clone(),
        base: workspace.head_commit.clone(),
        source: source.clone(),
        lease: lease.clone(),
        reply,
    })
    .map_err(|error| PushError::RepositoryActor(error.to_string()));
    if source == PushSource::Bundle {
        // The bundle has been copied out (or refused); it is no use to the machine.
        let remove = ExecRequest::new("rm -f \"$FLOTILLA_BUNDLE\"")
            .with_timeout_ms(30_000)
            .with_env("FLOTILLA_BUNDLE", PUSH_BUNDLE_PATH);
        let _ = machine.exec(remove).await;
    }
    Ok(pushed??)
}

/// What the final push of a stopped agent needs.
pub struct StopContext {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub name: String,
    pub replica: Replica,
    pub machine: Arc<RunningMachine>,
    pub repo: ActorRef<RepoMsg>,
    pub workspace: Workspace,
    pub git: GitSettings,
}

/// Commits what the workspace holds and pushes it when that is new: the commit and the push's
/// failure, or `None` when there was nothing new to push.
async fn commit_and_push_on_stop(context: &StopContext) -> Result<Option<(String, Option<String>)>, CommitError> {
    let message = format!(
        "{}: work so far (stopped)\n\nFlotilla-Agent: {}",
        context.name, context.agent
    );
    let head = commit_in_machine(&context.machine, &context.git, &message).await?;
    let pushed_before = record(&context.replica, context.agent).and_then(|record| record.pushed_commit);
    if pushed_before.as_deref() == Some(head.as_str())
        || (!context.workspace.resumed && head == context.workspace.head_commit)
    {
        return Ok(None);
    }
    let fence = OwnerFence {
        agent: context.agent,
        epoch: context.epoch,
    };
    let result = push(
        &context.repo,
        &context.machine,
        &context.workspace,
        fence,
        pushed_before,
    )
    .await;
    Ok(Some((head, result.err().map(|error| error.to_string()))))
}

/// Commits and pushes what the workspace holds when the agent is stopped, and records it.
pub async fn push_on_stop(context: &StopContext) {
    let outcome = match tokio::time::timeout(STOP_PUSH_TIMEOUT, commit_and_push_on_stop(context)).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => {
            tracing::warn!(agent = %context.agent, %error, "could not commit a stopped agent's work");
            None
        }
        Err(_) => {
            tracing::warn!(agent = %context.agent, "committing a stopped agent's work timed out");
            None
        }
    };
    if let Some((commit, error)) = outcome {
        let result = context
            .replica
            .write(Command::RecordPush {
                agent: context.agent,
                node: context.replica.node_id(),
                epoch: context.epoch,
                branch: context.workspace.branch.clone(),
                commit,
                error,
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(agent = %context.agent, %error, "could not record a stopped agent's push");
        }
    }
}
