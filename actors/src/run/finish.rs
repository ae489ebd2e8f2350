//! The end of a run whose model gave its final answer: the pull request the request asked for,
//! then `FINISHED`, or `FAILED` when the last push failed or the forge refused.

use flotilla_raft::{AgentRecord, AgentStatus, ApplyError, Command, EventKind, PullRequestRef, WriteError};

use crate::vcs::{PullRequestSpec, VcsError};

use super::branch::{confirm, BranchTrouble};
use super::{
    capped, record, set_status, write_outcome, Live, RunContext, RunOutcome, MAX_EVENT_OUTPUT_BYTES,
    MAX_EVENT_TEXT_BYTES,
};

/// Why the pull request a finished agent asked for is not open.
#[derive(Debug, thiserror::Error)]
pub enum PullRequestError {
    #[error("this node has no VCS providers to open pull requests with")]
    NoProviders,
    #[error("could not record the pull request: {0}")]
    Record(WriteError),
    #[error("{0}")]
    Forge(VcsError),
}

/// Ends a run whose model gave its final answer (`summary`, at `turn`; `pushed` and `push_error`
/// are the run's last pushed commit and push failure): `FAILED` if the last push failed or the
/// pull request could not be opened, else `FINISHED`. `None` when a follow-up arrived during the
/// last turn: the run goes on to answer it.
pub(super) async fn finish(
    context: &RunContext,
    live: &Live,
    start: &AgentRecord,
    turn: u32,
    summary: &str,
    pushed: &Option<String>,
    push_error: &Option<String>,
) -> Option<RunOutcome> {
    let summary = capped(summary, MAX_EVENT_TEXT_BYTES);
    let failed = |reason: &'static str, error: String| {
        let summary = summary.clone();
        async move {
            match set_status(
                context,
                AgentStatus::Failed,
                reason.to_string(),
                Some(summary),
                Some(error),
            )
            .await
            {
                Ok(()) => RunOutcome::Ended(AgentStatus::Failed),
                Err(error) => write_outcome(error),
            }
        }
    };
    if let Some(error) = push_error {
        // The work is done but not on the origin: that is not a finished agent.
        let error = capped(error, MAX_EVENT_OUTPUT_BYTES);
        return Some(failed("the work branch could not be pushed", error).await);
    }
    // A finish is written only once the origin holds the recorded commit.
    match confirm(context, live).await {
        Ok(()) => {}
        Err(BranchTrouble::Ended(outcome)) => return Some(outcome),
        Err(BranchTrouble::Origin(error)) => {
            let error = capped(&error, MAX_EVENT_OUTPUT_BYTES);
            return Some(failed("the work branch at the origin is not the recorded commit", error).await);
        }
    }
    if start.spec.open_pull_request {
        if let Err(failure) = open_pull_request(context, live, pushed.is_some(), &summary).await {
            let error = capped(&failure.to_string(), MAX_EVENT_OUTPUT_BYTES);
            return Some(failed("the pull request could not be opened", error).await);
        }
    }
    match set_status(
        context,
        AgentStatus::Finished,
        format!("finished after turn {turn}"),
        Some(summary.clone()),
        None,
    )
    .await
    {
        Ok(()) => Some(RunOutcome::Ended(AgentStatus::Finished)),
        Err(WriteError::Refused(ApplyError::UndeliveredFollowUps { .. })) => None,
        Err(error) => Some(write_outcome(error)),
    }
}

/// The error of the agent's last push, if its last push event is a failure (what an owner that
/// stopped after recording its final turn would have finished with).
pub(super) fn last_push_failure(context: &RunContext) -> Option<String> {
    context
        .replica
        .reader()
        .agent_events_after(context.agent, 0)
        .iter()
        .rev()
        .find_map(|event| match &event.kind {
            EventKind::CommitPushed { .. } => Some(None),
            EventKind::PushFailed { error, .. } => Some(Some(error.clone())),
            _ => None,
        })
        .flatten()
}

/// Opens the pull request a finished agent's request asked for, once: a pull request already
/// recorded (a follow-up run) is updated by the push itself. Answers why it could not.
async fn open_pull_request(
    context: &RunContext,
    live: &Live,
    pushed: bool,
    summary: &str,
) -> Result<(), PullRequestError> {
    let Some(current) = record(&context.replica, context.agent) else {
        return Ok(());
    };
    if current.pull_request.is_some() {
        return Ok(());
    }
    if !pushed {
        live.log("no pull request: the agent pushed no commit");
        return Ok(());
    }
    let Some(providers) = &context.runtime.providers else {
        return Err(PullRequestError::NoProviders);
    };
    let spec = &current.spec;
    let title = pull_request_title(&spec.name, &spec.prompt);
    let body = format!(
        "{}\n\n---\nOpened by Flotilla agent {} ({}) from the prompt:\n\n{}",
        summary.trim(),
        spec.name,
        context.agent,
        capped(spec.prompt.trim(), 4000)
    );
    let outcome = providers
        .open_pull_request(PullRequestSpec {
            repository: spec.repository.clone(),
            head_branch: context.workspace.branch.clone(),
            base_branch: spec.base_branch.clone(),
            title,
            body,
            draft: false,
        })
        .await;
    let (provider, pull_request, error) = match &outcome {
        Ok(opened) => (
            opened.provider.clone(),
            Some(PullRequestRef {
                url: opened.url.clone(),
                number: opened.number,
            }),
            None,
        ),
        Err(error) => (
            error.provider.clone(),
            None,
            Some(capped(&error.message, MAX_EVENT_OUTPUT_BYTES)),
        ),
    };
    context
        .replica
        .write(Command::RecordPullRequest {
            agent: context.agent,
            node: context.replica.node_id(),
            epoch: context.epoch,
            provider,
            pull_request,
            error,
        })
        .await
        .map_err(PullRequestError::Record)?;
    outcome.map(|_| ()).map_err(PullRequestError::Forge)
}

/// A pull request title: the prompt's first non-blank line (the agent's name for a blank
/// prompt), cut to fit forges' limits.
fn pull_request_title(name: &str, prompt: &str) -> String {
    const MAX_TITLE_CHARS: usize = 120;
    let title = prompt
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or(name);
    let mut cut: String = title.chars().take(MAX_TITLE_CHARS).collect();
    if cut.len() < title.len() {
        cut.push('…');
    }
    cut
}
