//! The fence on the work branch, as a run keeps it. The agent's record (`pushed_commit`,
//! written through Raft) is the truth about the branch; the origin is made to agree with it:
//!
//! - every push is leased on the recorded commit, so the origin refuses a push from an owner
//!   whose idea of the branch is not the record's, and each push is preceded by a `CheckOwner`
//!   write, so an owner that lost the agent while cut off or paused learns it from the log and
//!   leaves the origin alone;
//! - a run of a later owner first moves the agent's fence ref at the origin to its epoch, and
//!   every push moves the fence with the branch in one atomic push (see
//!   [`crate::origin_fence`]): an owner paused between its `CheckOwner` and its push finds the
//!   origin refusing it whole once its successor has taken the fence, and its run ends as
//!   superseded (the log confirms it is stale). The first owner has no one to fence out: its
//!   first push creates the fence, leased on its absence;
//! - the commit a push made is recorded by the turn (`RecordTurn`), under the owner's epoch;
//! - when the origin holds another commit than the record (a fenced owner pushed it between its
//!   last check and the takeover), the owner records the displaced commit first
//!   (`RecordBranch`: refused if this owner is itself stale, so a stale owner never overwrites
//!   anything), keeps it in its mirror under `refs/flotilla/displaced/AGENT/COMMIT`, and moves
//!   the branch back to the record, leased on what it found;
//! - a branch at the origin before anything was recorded (the user's own, or the first push of
//!   an owner that died before recording it) is adopted: the record takes it.
//!
//! A run settles the branch when it opens and before it finishes, and a finish is written only
//! once `git ls-remote` shows the origin at the recorded commit. The one run that opens without
//! reading the origin is a first owner's with nothing recorded on a branch its mirror did not
//! have: that mirror was fetched for this run, so it read the origin already.

use flotilla_raft::apply::displaced_ref;
use flotilla_raft::{AgentId, Command, Epoch, Replica};
use ractor::ActorRef;

use crate::origin_fence::OwnerFence;
use crate::repo::{RepoError, RepoMsg};

use super::git::{push, PushError};
use super::{record, write_outcome, Live, RunContext, RunOutcome};

/// Why the work branch could not be settled with the origin.
pub(super) enum BranchTrouble {
    /// The run ends here: another owner has the agent, or Raft is unavailable.
    Ended(RunOutcome),
    /// The origin could not be read or moved, or refused the push (git's words).
    Origin(String),
}

/// What the origin's work branch is at.
async fn at_origin(context: &RunContext) -> Result<Option<String>, BranchTrouble> {
    ractor::call!(context.repo, |reply| RepoMsg::BranchAtOrigin {
        branch: context.workspace.branch.clone(),
        reply,
    })
    .map_err(|error| BranchTrouble::Origin(format!("the repository actor did not answer: {error}")))?
    .map_err(|error| BranchTrouble::Origin(error.to_string()))
}

/// The agent's recorded commit of its work branch, as this node's replica has it (it has
/// applied every write this node made).
fn recorded(context: &RunContext) -> Result<Option<String>, BranchTrouble> {
    record(&context.replica, context.agent)
        .map(|record| record.pushed_commit)
        .ok_or(BranchTrouble::Ended(RunOutcome::Superseded))
}

async fn write(context: &RunContext, command: Command) -> Result<(), BranchTrouble> {
    context
        .replica
        .write(command)
        .await
        .map(|_| ())
        .map_err(|error| BranchTrouble::Ended(write_outcome(error)))
}

/// What the fence on the work branch needs of a run: whose agent, under which epoch, the log,
/// and the repository actor that reaches the origin.
pub(super) struct BranchOwner<'a> {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub replica: &'a Replica,
    pub repo: &'a ActorRef<RepoMsg>,
}

impl BranchOwner<'_> {
    pub(super) fn of(context: &RunContext) -> BranchOwner<'_> {
        BranchOwner {
            agent: context.agent,
            epoch: context.epoch,
            replica: &context.replica,
            repo: &context.repo,
        }
    }

    pub(super) fn fence(&self) -> OwnerFence {
        OwnerFence {
            agent: self.agent,
            epoch: self.epoch,
        }
    }
}

/// Confirms through the log that this node still owns the agent under its epoch.
pub(super) async fn check_owner(owner: &BranchOwner<'_>) -> Result<(), BranchTrouble> {
    let command = Command::CheckOwner {
        agent: owner.agent,
        node: owner.replica.node_id(),
        epoch: owner.epoch,
    };
    owner
        .replica
        .write(command)
        .await
        .map(|_| ())
        .map_err(|error| BranchTrouble::Ended(write_outcome(error)))
}

/// What an error from the origin means for the run: a fence held by another owner ends it as
/// superseded once the log confirms this owner is stale (the agent is not failed: it is no
/// longer this owner's); anything else is the origin's trouble, in its words.
pub(super) async fn origin_trouble(owner: &BranchOwner<'_>, error: RepoError) -> BranchTrouble {
    if let RepoError::Fenced { .. } = error {
        if let Err(ended) = check_owner(owner).await {
            return ended;
        }
        // The log still names this owner: the fence holds a value no owner wrote.
    }
    BranchTrouble::Origin(error.to_string())
}

/// Moves the agent's fence at the origin to this owner's epoch: from then on the origin refuses
/// every push of an older owner. A run does this before anything else at the origin.
pub(super) async fn take_fence(owner: &BranchOwner<'_>) -> Result<(), BranchTrouble> {
    let taken = ractor::call!(owner.repo, |reply| RepoMsg::TakeFence {
        fence: owner.fence(),
        reply,
    })
    .map_err(|error| BranchTrouble::Origin(format!("the repository actor did not answer: {error}")))?;
    match taken {
        Ok(()) => Ok(()),
        Err(error) => Err(origin_trouble(owner, error).await),
    }
}

/// Makes the origin agree with the record: adopts a branch when nothing is recorded, or
/// reports the commit found instead of the record's and moves the branch back. Answers the
/// recorded commit.
pub(super) async fn settle(context: &RunContext, live: &Live) -> Result<Option<String>, BranchTrouble> {
    let recorded = recorded(context)?;
    if recorded.is_none() && !context.workspace.resumed && !BranchOwner::of(context).fence().succeeds_an_owner() {
        // The first owner's run of an agent that never pushed, on a branch the mirror did not
        // have: the mirror was fetched after this run asked for its workspace, so it already
        // read the origin here, and no earlier owner can have pushed since (there is none).
        // The origin agrees with the record (no branch); a push made meanwhile by anyone else
        // is refused by the first push's lease, as one made after a read of the origin would be.
        return Ok(None);
    }
    let found = at_origin(context).await?;
    if found == recorded {
        return Ok(recorded);
    }
    let branch = context.workspace.branch.clone();
    let command = |recorded: Option<String>, commit: Option<String>, displaced: Option<String>| Command::RecordBranch {
        agent: context.agent,
        node: context.replica.node_id(),
        epoch: context.epoch,
        branch: branch.clone(),
        recorded,
        commit,
        displaced,
    };
    match found {
        Some(found) if recorded.is_none() => {
            write(context, command(None, Some(found.clone()), None)).await?;
            live.log(format!(
                "the work branch {branch} was at {found} before anything was recorded; building on it"
            ));
            Ok(Some(found))
        }
        Some(found) => {
            // Recorded first: a stale owner is refused here and never touches the origin.
            write(
                context,
                command(recorded.clone(), recorded.clone(), Some(found.clone())),
            )
            .await?;
            let kept = displaced_ref(context.agent, &found);
            restore(context, recorded.clone(), Some((found.clone(), kept.clone()))).await?;
            live.log(format!(
                "the origin's {branch} held {found}, pushed by an owner that no longer holds the agent; moved back to the recorded {}; {found} is kept on node {} as {kept}",
                recorded.as_deref().unwrap_or("(no branch)"),
                context.replica.node_id()
            ));
            Ok(recorded)
        }
        None => {
            // Deleted at the origin (no owner deletes it): put the record back, leased on the
            // branch being absent still. Nothing was displaced.
            check_owner(&BranchOwner::of(context)).await?;
            restore(context, recorded.clone(), None).await?;
            live.log(format!(
                "the origin had no branch {branch}; pushed the recorded {} again",
                recorded.as_deref().unwrap_or("(no branch)")
            ));
            Ok(recorded)
        }
    }
}

/// Moves the origin's branch to `recorded`, leased on what was found there (with the ref that
/// keeps it), or on the branch being absent.
async fn restore(
    context: &RunContext,
    recorded: Option<String>,
    found: Option<(String, String)>,
) -> Result<(), BranchTrouble> {
    let owner = BranchOwner::of(context);
    let restored = ractor::call!(context.repo, |reply| RepoMsg::Restore {
        fence: owner.fence(),
        branch: context.workspace.branch.clone(),
        recorded,
        found,
        reply,
    })
    .map_err(|error| BranchTrouble::Origin(format!("the repository actor did not answer: {error}")))?;
    match restored {
        Ok(()) => Ok(()),
        Err(error) => Err(origin_trouble(&owner, error).await),
    }
}

/// Pushes the work branch leased on the recorded commit and with the owner's fence, after
/// confirming through the log that this node still owns the agent. When the lease is lost to an
/// older owner's push, settles the branch (the displaced commit is recorded and kept) and pushes
/// once more; when the fence is lost to a later owner, the run ends as superseded.
pub(super) async fn push_fenced(context: &RunContext, live: &Live) -> Result<String, BranchTrouble> {
    let owner = BranchOwner::of(context);
    check_owner(&owner).await?;
    let lease = recorded(context)?;
    let fence = owner.fence();
    match push(&context.repo, &context.machine, &context.workspace, fence, lease).await {
        Ok(commit) => Ok(commit),
        Err(PushError::Refused(RepoError::LeaseLost { .. })) => {
            let lease = settle(context, live).await?;
            match push(&context.repo, &context.machine, &context.workspace, fence, lease).await {
                Ok(commit) => Ok(commit),
                Err(PushError::Refused(error)) => Err(origin_trouble(&owner, error).await),
                Err(error) => Err(BranchTrouble::Origin(error.to_string())),
            }
        }
        Err(PushError::Refused(error)) => Err(origin_trouble(&owner, error).await),
        Err(error) => Err(BranchTrouble::Origin(error.to_string())),
    }
}

/// Settles the branch and confirms with `git ls-remote` that the origin holds the recorded
/// commit: what a finish needs, so that a finished agent's pushed commit is the origin's.
pub(super) async fn confirm(context: &RunContext, live: &Live) -> Result<(), BranchTrouble> {
    settle(context, live).await?;
    let recorded = recorded(context)?;
    let found = at_origin(context).await?;
    if found != recorded {
        return Err(BranchTrouble::Origin(format!(
            "the origin's {} is at {}, not at the recorded {}",
            context.workspace.branch,
            found.as_deref().unwrap_or("(no branch)"),
            recorded.as_deref().unwrap_or("(no branch)")
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "branch_tests.rs"]
mod tests;
