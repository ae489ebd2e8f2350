//! Node liveness, judged by the leader for its term. Every node reports to the leader every
//! quarter lease; the leader's monitor marks a node down through Raft once it has heard nothing
//! from it for a whole lease (which sends its agents back to placement under a higher epoch) and
//! up again when it reports.
//!
//! Only what the leader has itself seen counts, and only for the term it leads: the view is
//! reset when the monitor first sees this node lead a term, and again after any pause of this
//! process (a check that comes far later than scheduled: the process was stopped, or starved,
//! and heard nothing meanwhile), and at every check while this node has heard from no majority
//! of the members within half a lease (it is cut off itself: the silence it sees is its own).
//! After a reset nothing is judged down for a grace of one lease.
//! Each judgement names the term it was made in, and the state machine refuses it in an entry
//! of any other term; it is proposed on this node only, never forwarded, so a deposed leader's
//! judgement cannot reach the log through its successor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_raft::replica::ForwardReply;
use flotilla_raft::{Command, NodeId, Replica, Request, Term};
use ractor::{Actor, ActorProcessingErr, ActorRef};

/// Checks per lease: a node is judged down at most an eighth of a lease after its lease ran out.
pub const CHECKS_PER_LEASE: u32 = 8;
/// A check this many intervals after the one before means this process did not run for that
/// long (half a lease at [`CHECKS_PER_LEASE`]): it heard no reports meanwhile, so its view is
/// reset.
pub const LATE_CHECK_INTERVALS: u32 = 4;

/// When each node last reported to this node. Reports arrive whether or not this node leads;
/// the monitor counts only those that arrived since its view was last reset.
#[derive(Clone, Default)]
pub struct LivenessTable {
    last_seen: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

impl LivenessTable {
    pub fn report(&self, node: NodeId) {
        self.last_seen
            .lock()
            .expect("liveness lock poisoned")
            .insert(node, Instant::now());
    }

    fn last_seen(&self, node: NodeId) -> Option<Instant> {
        self.last_seen
            .lock()
            .expect("liveness lock poisoned")
            .get(&node)
            .copied()
    }
}

/// Why the monitor started its view afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// This node leads `term` and had no view of it yet (just elected, or the monitor started).
    NewTerm(Term),
    /// This check came `gap` after the one before: the process did not run meanwhile.
    Paused { gap: Duration },
    /// Only `heard` of the `members` (this node included) reported within half a lease: this
    /// leader is cut off from its majority, and the others' silence says nothing about them.
    CutOff { heard: usize, members: usize },
}

/// What one check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This node does not lead: it judges nothing.
    NotLeader,
    /// The view was started afresh; nothing is judged at this check.
    Reset(ResetReason),
    /// The judgements to write (often none), each naming the term they were made in.
    Judged(Vec<Command>),
}

/// The monitor's decisions as a plain function of the time, this node's leadership, the marks
/// in the state and the reports received: tested with any clock.
#[derive(Debug, Clone)]
pub struct LivenessJudge {
    lease: Duration,
    check_interval: Duration,
    /// The term the view belongs to; `None` until this node is seen leading.
    term: Option<Term>,
    /// When the view was last reset: reports from before do not count, and silence is measured
    /// from here at the earliest.
    view_since: Instant,
    /// No node is judged down before this (one lease after a reset).
    grace_until: Instant,
    last_check: Option<Instant>,
}

impl LivenessJudge {
    pub fn new(lease: Duration, now: Instant) -> LivenessJudge {
        LivenessJudge {
            lease,
            check_interval: lease / CHECKS_PER_LEASE,
            term: None,
            view_since: now,
            grace_until: now + lease,
            last_check: None,
        }
    }

    pub fn check_interval(&self) -> Duration {
        self.check_interval
    }

    /// One check at `now`. `leading` is the term this node leads, if it leads; `marked` is each
    /// node and whether the state has it up; `last_seen` is when each node last reported here.
    pub fn check(
        &mut self,
        now: Instant,
        leading: Option<Term>,
        marked: &[(NodeId, bool)],
        last_seen: impl Fn(NodeId) -> Option<Instant>,
    ) -> Verdict {
        let gap = self.last_check.map(|last| now.saturating_duration_since(last));
        self.last_check = Some(now);
        let Some(term) = leading else {
            self.term = None;
            return Verdict::NotLeader;
        };
        if self.term != Some(term) {
            self.reset(now, term);
            return Verdict::Reset(ResetReason::NewTerm(term));
        }
        if let Some(gap) = gap.filter(|gap| *gap > self.check_interval * LATE_CHECK_INTERVALS) {
            self.reset(now, term);
            return Verdict::Reset(ResetReason::Paused { gap });
        }
        // Reports of any age count here, even from before the view: they show the links work.
        let heard = marked
            .iter()
            .filter(|(node, _)| {
                last_seen(*node).is_some_and(|seen| now.saturating_duration_since(seen) < self.lease / 2)
            })
            .count();
        if heard * 2 <= marked.len() {
            self.reset(now, term);
            return Verdict::Reset(ResetReason::CutOff {
                heard,
                members: marked.len(),
            });
        }
        Verdict::Judged(self.judge(now, term, marked, last_seen))
    }

    fn reset(&mut self, now: Instant, term: Term) {
        self.term = Some(term);
        self.view_since = now;
        self.grace_until = now + self.lease;
    }

    fn judge(
        &self,
        now: Instant,
        term: Term,
        marked: &[(NodeId, bool)],
        last_seen: impl Fn(NodeId) -> Option<Instant>,
    ) -> Vec<Command> {
        let in_grace = now < self.grace_until;
        let mut commands = Vec::new();
        for (node, up) in marked {
            let seen = last_seen(*node).filter(|seen| *seen >= self.view_since);
            let silent_for = now.saturating_duration_since(seen.unwrap_or(self.view_since));
            let fresh = seen.is_some() && silent_for < self.lease;
            match (up, fresh) {
                (true, false) if !in_grace && silent_for >= self.lease => {
                    commands.push(Command::NodeDownInTerm { node: *node, term })
                }
                (false, true) => commands.push(Command::NodeUpInTerm { node: *node, term }),
                _ => {}
            }
        }
        commands
    }
}

/// The term this node leads, as Raft sees it now; `None` when it does not lead.
fn leading_term(replica: &Replica) -> Option<Term> {
    let metrics = replica.raft().metrics();
    let metrics = metrics.borrow();
    let leads = metrics.state == openraft::ServerState::Leader && metrics.current_leader == Some(replica.node_id());
    leads.then_some(Term(metrics.current_term))
}

pub struct LivenessMonitor;

pub enum LivenessMsg {
    Check,
}

impl ractor::Message for LivenessMsg {}

pub struct LivenessArgs {
    pub replica: Replica,
    pub table: LivenessTable,
    pub lease: Duration,
}

pub struct LivenessState {
    args: LivenessArgs,
    judge: LivenessJudge,
    ticker: tokio::task::JoinHandle<()>,
    /// The last check found this leader cut off from its majority.
    cut_off: bool,
}

impl Actor for LivenessMonitor {
    type Msg = LivenessMsg;
    type State = LivenessState;
    type Arguments = LivenessArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LivenessMsg>,
        args: LivenessArgs,
    ) -> Result<LivenessState, ActorProcessingErr> {
        let judge = LivenessJudge::new(args.lease, Instant::now());
        let ticker = ractor::time::send_interval(judge.check_interval(), myself.get_cell(), || LivenessMsg::Check);
        Ok(LivenessState {
            args,
            judge,
            ticker,
            cut_off: false,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<LivenessMsg>,
        message: LivenessMsg,
        state: &mut LivenessState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LivenessMsg::Check => {
                let replica = &state.args.replica;
                state.args.table.report(replica.node_id());
                let marked: Vec<(NodeId, bool)> = replica
                    .reader()
                    .read(|cluster| cluster.nodes.values().map(|node| (node.id, node.up)).collect());
                let table = state.args.table.clone();
                let verdict = state
                    .judge
                    .check(Instant::now(), leading_term(replica), &marked, |node| {
                        table.last_seen(node)
                    });
                let was_cut_off = state.cut_off;
                state.cut_off = matches!(verdict, Verdict::Reset(ResetReason::CutOff { .. }));
                if was_cut_off && !state.cut_off {
                    tracing::info!("a majority reports again; judging after the grace");
                }
                match verdict {
                    Verdict::NotLeader => {}
                    // While cut off, every check resets: say so once.
                    Verdict::Reset(reason @ ResetReason::CutOff { .. }) if was_cut_off => {
                        tracing::debug!(?reason, "liveness view reset")
                    }
                    Verdict::Reset(reason) => {
                        tracing::info!(?reason, "liveness view reset; judging no node down for one lease")
                    }
                    Verdict::Judged(commands) => write_judgements(replica, commands, state.args.lease).await,
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<LivenessMsg>,
        state: &mut LivenessState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        Ok(())
    }
}

/// Writes judgements on this node only, once a quorum has confirmed it still leads. A node
/// that no longer leads drops them: its successor judges for itself.
async fn write_judgements(replica: &Replica, commands: Vec<Command>, lease: Duration) {
    if commands.is_empty() {
        return;
    }
    // Bounded: a leader cut off from its quorum would otherwise wait here past its term.
    let confirmed = tokio::time::timeout(lease / 2, replica.raft().get_read_log_id()).await;
    if !matches!(confirmed, Ok(Ok(_))) {
        tracing::info!("leadership not confirmed by a quorum; liveness judgements dropped");
        return;
    }
    for command in commands {
        tracing::info!(command = command.name(), ?command, "liveness change");
        let written = tokio::time::timeout(lease, replica.write_local(Request::new(command))).await;
        match written {
            Ok(ForwardReply::Applied { result: Ok(_), .. }) => {}
            Ok(ForwardReply::Applied { result: Err(error), .. }) => {
                tracing::warn!(%error, "a liveness change was refused");
            }
            Ok(ForwardReply::NotLeader { leader }) => {
                tracing::info!(?leader, "no longer leader; liveness judgements dropped, not forwarded");
                return;
            }
            Ok(ForwardReply::Failed(error)) => {
                tracing::warn!(%error, "writing a liveness change failed; judging again on the next check");
            }
            Err(_) => {
                tracing::warn!("writing a liveness change timed out; judging again on the next check");
                return;
            }
        }
    }
}

#[cfg(test)]
#[path = "liveness_tests.rs"]
mod tests;
