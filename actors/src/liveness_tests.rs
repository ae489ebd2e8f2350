//! The monitor's decisions, with an injected clock: who it judges, when, and in which term.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flotilla_raft::{Command, NodeId, Term};

use super::{LivenessJudge, ResetReason, Verdict};

const LEASE: Duration = Duration::from_secs(4);
const TICK: Duration = Duration::from_millis(500);

/// A leader of term 3 over nodes 1 (itself), 2 and 3, all marked up, with a clock of its own.
struct Scenario {
    judge: LivenessJudge,
    now: Instant,
    seen: HashMap<NodeId, Instant>,
    marked: Vec<(NodeId, bool)>,
}

impl Scenario {
    fn new() -> Scenario {
        let now = Instant::now();
        Scenario {
            judge: LivenessJudge::new(LEASE, now),
            now,
            seen: HashMap::new(),
            marked: vec![(1, true), (2, true), (3, true)],
        }
    }

    /// Advances the clock by `by`, records a report from each of `reporting` at the new time,
    /// and runs one check as the leader of `leading`.
    fn check_after(&mut self, by: Duration, leading: Option<u64>, reporting: &[NodeId]) -> Verdict {
        self.now += by;
        for node in reporting {
            self.seen.insert(*node, self.now);
        }
        let seen = self.seen.clone();
        self.judge.check(self.now, leading.map(Term), &self.marked, |node| {
            seen.get(&node).copied()
        })
    }

    /// Regular checks for `span` as the leader of term 3, with `reporting` reporting at each;
    /// every node-down decided meanwhile, with the time since the start of the span.
    fn run_for(&mut self, span: Duration, reporting: &[NodeId]) -> Vec<(Duration, Command)> {
        let mut downs = Vec::new();
        let mut elapsed = Duration::ZERO;
        while elapsed < span {
            elapsed += TICK;
            if let Verdict::Judged(commands) = self.check_after(TICK, Some(3), reporting) {
                downs.extend(commands.into_iter().map(|command| (elapsed, command)));
            }
        }
        downs
    }
}

#[test]
fn a_node_silent_for_a_lease_is_judged_down_in_the_leaders_term() {
    let mut scenario = Scenario::new();
    assert_eq!(
        scenario.check_after(TICK, Some(3), &[1, 2, 3]),
        Verdict::Reset(ResetReason::NewTerm(Term(3)))
    );
    // Node 3 stops reporting; 1 and 2 go on.
    let downs = scenario.run_for(LEASE * 3, &[1, 2]);
    assert_eq!(
        downs.len(),
        (LEASE * 3 - LEASE).as_millis() as usize / TICK.as_millis() as usize + 1
    );
    let (first_at, first) = &downs[0];
    assert_eq!(first, &Command::NodeDownInTerm { node: 3, term: Term(3) });
    // Judged down at the first check a whole lease after its last report, not before.
    assert_eq!(*first_at, LEASE);
    assert!(downs
        .iter()
        .all(|(_, command)| matches!(command, Command::NodeDownInTerm { node: 3, .. })));
}

#[test]
fn a_node_that_reports_again_is_judged_up() {
    let mut scenario = Scenario::new();
    scenario.marked = vec![(1, true), (2, false), (3, true)];
    scenario.check_after(TICK, Some(3), &[]);
    assert_eq!(scenario.check_after(TICK, Some(3), &[1, 3]), Verdict::Judged(vec![]));
    assert_eq!(
        scenario.check_after(TICK, Some(3), &[1, 2, 3]),
        Verdict::Judged(vec![Command::NodeUpInTerm { node: 2, term: Term(3) }])
    );
}

#[test]
fn a_node_that_is_not_leader_judges_nothing() {
    let mut scenario = Scenario::new();
    // Nobody has reported for many leases: a follower still judges nobody.
    for _ in 0..40 {
        assert_eq!(scenario.check_after(TICK, None, &[]), Verdict::NotLeader);
    }
}

#[test]
fn a_new_leader_waits_a_lease_and_counts_only_what_it_received_itself() {
    let mut scenario = Scenario::new();
    scenario.marked = (1..=5).map(|node| (node, true)).collect();
    // Node 2 reported long ago, while this node was a follower; node 3 never reported here;
    // nodes 4 and 5 report to the new leader from its election on.
    scenario.seen.insert(2, scenario.now);
    scenario.check_after(LEASE * 5, None, &[]);
    assert_eq!(
        scenario.check_after(TICK, Some(3), &[1, 4, 5]),
        Verdict::Reset(ResetReason::NewTerm(Term(3)))
    );
    // Within the grace, no one is judged down, whatever the table says.
    let downs = scenario.run_for(LEASE - TICK * 2, &[1, 4, 5]);
    assert!(downs.is_empty(), "judged down within the grace: {downs:?}");
    // A lease after the election, silent nodes go down.
    let downs = scenario.run_for(TICK * 2, &[1, 4, 5]);
    let nodes: Vec<&Command> = downs.iter().map(|(_, command)| command).collect();
    assert_eq!(
        nodes,
        vec![
            &Command::NodeDownInTerm { node: 2, term: Term(3) },
            &Command::NodeDownInTerm { node: 3, term: Term(3) },
        ]
    );
}

#[test]
fn a_pause_of_this_process_resets_the_view_and_grants_a_grace() {
    let mut scenario = Scenario::new();
    scenario.check_after(TICK, Some(3), &[1, 2, 3]);
    assert!(scenario.run_for(LEASE, &[1, 2, 3]).is_empty());
    // The process is stopped for three leases: no check runs and no report arrives. The first
    // check after it sees its clock jump and judges nobody.
    let verdict = scenario.check_after(LEASE * 3, Some(3), &[]);
    assert_eq!(verdict, Verdict::Reset(ResetReason::Paused { gap: LEASE * 3 }));
    // The followers report again (to whoever leads) within the grace: nobody goes down.
    assert!(scenario.run_for(LEASE * 2, &[1, 2, 3]).is_empty());
}

#[test]
fn a_late_check_resets_but_a_slightly_late_one_does_not() {
    let mut scenario = Scenario::new();
    scenario.check_after(TICK, Some(3), &[1, 2, 3]);
    // Twice the interval late: a busy runtime, not a pause.
    assert_eq!(
        scenario.check_after(TICK * 3, Some(3), &[1, 2, 3]),
        Verdict::Judged(vec![])
    );
    // More than half a lease: the process did not run.
    assert!(matches!(
        scenario.check_after(LEASE / 2 + TICK, Some(3), &[1, 2, 3]),
        Verdict::Reset(ResetReason::Paused { .. })
    ));
}

#[test]
fn a_pause_without_reports_after_it_judges_after_a_full_lease_only() {
    let mut scenario = Scenario::new();
    scenario.check_after(TICK, Some(3), &[1, 2, 3]);
    scenario.run_for(LEASE / 2, &[1, 2, 3]);
    scenario.check_after(LEASE * 2, Some(3), &[]);
    // Node 3 really died during the pause: it is judged down a lease after the pause, in the
    // leader's term, and only then.
    let downs = scenario.run_for(LEASE * 2, &[1, 2]);
    assert_eq!(
        downs.first(),
        Some(&(LEASE, Command::NodeDownInTerm { node: 3, term: Term(3) }))
    );
}

#[test]
fn a_change_of_term_resets_the_view() {
    let mut scenario = Scenario::new();
    scenario.marked = (1..=5).map(|node| (node, true)).collect();
    scenario.check_after(TICK, Some(3), &[1, 2, 3, 4, 5]);
    scenario.run_for(LEASE, &[1, 2, 3, 4, 5]);
    // Leadership lost and won again: a new term, a new view, and a new grace.
    assert_eq!(scenario.check_after(TICK, None, &[1, 4, 5]), Verdict::NotLeader);
    assert_eq!(
        scenario.check_after(TICK, Some(5), &[1, 4, 5]),
        Verdict::Reset(ResetReason::NewTerm(Term(5)))
    );
    let mut downs = Vec::new();
    for _ in 0..(LEASE.as_millis() / TICK.as_millis()) {
        if let Verdict::Judged(commands) = scenario.check_after(TICK, Some(5), &[1, 4, 5]) {
            downs.extend(commands);
        }
    }
    assert_eq!(
        downs,
        vec![
            Command::NodeDownInTerm { node: 2, term: Term(5) },
            Command::NodeDownInTerm { node: 3, term: Term(5) },
        ]
    );
}

#[test]
fn a_leader_cut_off_from_its_majority_judges_nobody_and_grants_a_grace_once_healed() {
    let mut scenario = Scenario::new();
    scenario.marked = (1..=5).map(|node| (node, true)).collect();
    scenario.check_after(TICK, Some(3), &[1, 2, 3, 4, 5]);
    assert!(scenario.run_for(LEASE, &[1, 2, 3, 4, 5]).is_empty());
    // Cut off with node 2 for three leases: only 1 and 2 report, two of five.
    let mut verdicts = Vec::new();
    for _ in 0..(LEASE * 3).as_millis() / TICK.as_millis() {
        verdicts.push(scenario.check_after(TICK, Some(3), &[1, 2]));
    }
    assert!(
        verdicts
            .iter()
            .all(|verdict| !matches!(verdict, Verdict::Judged(commands) if !commands.is_empty())),
        "a cut-off leader judged: {verdicts:?}"
    );
    assert!(verdicts
        .iter()
        .any(|verdict| matches!(verdict, Verdict::Reset(ResetReason::CutOff { heard: 2, members: 5 }))));
    // Healed, node 5 reports late: it still has a whole lease from the last reset.
    let downs = scenario.run_for(LEASE - TICK, &[1, 2, 3, 4]);
    assert!(
        downs.is_empty(),
        "judged down within the grace after the heal: {downs:?}"
    );
    assert!(scenario.run_for(LEASE, &[1, 2, 3, 4, 5]).is_empty());
}

#[test]
fn a_short_cut_off_below_half_a_lease_judges_nobody() {
    let mut scenario = Scenario::new();
    scenario.check_after(TICK, Some(3), &[1, 2, 3]);
    assert!(scenario.run_for(LEASE, &[1, 2, 3]).is_empty());
    // Nobody reports for a little under half a lease: no reset, and nobody silent for a lease.
    assert!(scenario.run_for(LEASE / 2 - TICK, &[1]).is_empty());
    assert!(scenario.run_for(LEASE, &[1, 2, 3]).is_empty());
}
