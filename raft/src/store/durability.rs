//! How far this node's log is synced, and which appends are the leader's own proposals.
//!
//! openraft 0.9's core waits for every append's flush before it does anything else, including
//! sending the entry to the followers, so a leader's write would wait for two syncs in a row:
//! its own, then a follower's. A leader's own proposals are therefore reported flushed as soon
//! as they are written, and synced right after, while they travel. Nothing outside the leader
//! may depend on them before that sync:
//!
//! - the commit index sent to followers is capped at the last synced entry (`cap_commit`), so
//!   no follower applies an entry that a power loss on the leader could still take away from
//!   the majority that acknowledged it;
//! - the state machine applies an entry only once it is synced here (`wait_synced`), and a
//!   client is answered only after the apply, so an answered write is on disk on a majority
//!   (this node and a follower that synced before it acknowledged);
//! - every other append (a follower's, or a leader's own older entries sent back to it after a
//!   restart, when it no longer leads) is reported only after its sync, as before.
//!
//! A proposal is the leader's own when its entries carry the leader id of this node's current
//! committed vote. openraft saves that vote before the leader's first entry and saves another
//! before this node takes any entry as a follower.

use std::sync::{Mutex, OnceLock};

use openraft::{CommittedLeaderId, LogId, Vote};

use crate::NodeId;

type Mark = Result<Option<LogId<NodeId>>, String>;

/// The last entry written when a sync began, and the truncations the log had had by then.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WrittenMark {
    last: Option<LogId<NodeId>>,
    truncations: u64,
}

pub struct Durability {
    me: OnceLock<NodeId>,
    /// The leader id this node proposes under, while it leads.
    leading: Mutex<Option<CommittedLeaderId<NodeId>>>,
    /// The last entry written to the log (synced or not), and how many truncations the log has
    /// had: a sync that began before a truncation says nothing of what was written after it.
    written: Mutex<WrittenMark>,
    /// The last entry known synced, or the sync failure that stopped the log.
    synced: tokio::sync::watch::Sender<Mark>,
}

impl Durability {
    /// A log whose entries up to `last` are synced.
    pub(crate) fn new(last: Option<LogId<NodeId>>) -> Durability {
        Durability {
            me: OnceLock::new(),
            leading: Mutex::new(None),
            written: Mutex::new(WrittenMark { last, truncations: 0 }),
            synced: tokio::sync::watch::channel(Ok(last)).0,
        }
    }

    /// Names this node, so that its own proposals can be told apart; until then every append
    /// is reported after its sync. A log belongs to one node: a second name is ignored.
    pub fn set_node(&self, me: NodeId) {
        let _first = self.me.set(me);
    }

    pub(super) fn vote_saved(&self, vote: &Vote<NodeId>) {
        let me = self.me.get().copied();
        let leading = (vote.is_committed() && me.is_some() && vote.leader_id().voted_for() == me)
            .then(|| CommittedLeaderId::from(*vote));
        *self.leading.lock().expect("durability lock poisoned") = leading;
    }

    /// Whether every one of `entries` is this node's own proposal as the current leader.
    pub(super) fn own_proposal<'a>(&self, mut entries: impl Iterator<Item = &'a LogId<NodeId>>) -> bool {
        let leading = self.leading.lock().expect("durability lock poisoned");
        match leading.as_ref() {
            Some(leader) => entries.all(|log_id| log_id.leader_id == *leader),
            None => false,
        }
    }

    pub(crate) fn written(&self, last: LogId<NodeId>) {
        self.written.lock().expect("durability lock poisoned").last = Some(last);
    }

    /// The last entry written, read before a sync: the sync covers it.
    pub(crate) fn written_mark(&self) -> WrittenMark {
        *self.written.lock().expect("durability lock poisoned")
    }

    /// A sync that began after `written` has ended.
    pub(crate) fn synced(&self, written: WrittenMark) {
        // Under the lock, so that no truncation slips between the check and the mark.
        let current = self.written.lock().expect("durability lock poisoned");
        if current.truncations != written.truncations {
            return;
        }
        let upto = written.last;
        self.synced.send_if_modified(|mark| match mark {
            Ok(current) if upto.map(|log_id| log_id.index) > current.map(|log_id| log_id.index) => {
                *current = upto;
                true
            }
            _ => false,
        });
    }

    /// The log was cut back to `last` with a synced write: everything left is synced.
    pub(super) fn truncated(&self, last: Option<LogId<NodeId>>) {
        let mut written = self.written.lock().expect("durability lock poisoned");
        *written = WrittenMark {
            last,
            truncations: written.truncations + 1,
        };
        self.synced.send_modify(|mark| {
            if mark.is_ok() {
                *mark = Ok(last);
            }
        });
    }

    pub(super) fn sync_failed(&self, error: String) {
        let _previous = self.synced.send_replace(Err(error));
    }

    /// Caps a commit index to send to a follower at the last synced entry.
    pub fn cap_commit(&self, commit: Option<LogId<NodeId>>) -> Option<LogId<NodeId>> {
        match &*self.synced.borrow() {
            Ok(synced) if synced.map(|log_id| log_id.index) < commit.map(|log_id| log_id.index) => *synced,
            _ => commit,
        }
    }

    /// Waits until the entry at `index` is synced here. Without a node id no append is reported
    /// before its sync, so whatever openraft applies is synced already.
    pub(crate) async fn wait_synced(&self, index: u64) -> Result<(), String> {
        if self.me.get().is_none() {
            return Ok(());
        }
        let mut marks = self.synced.subscribe();
        let reached = marks
            .wait_for(|mark| match mark {
                Ok(synced) => synced.is_some_and(|log_id| log_id.index >= index),
                Err(_) => true,
            })
            .await
            .map_err(|_| "the log's sync state is gone".to_string())?;
        match &*reached {
            Ok(_) => Ok(()),
            Err(error) => Err(error.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::Durability;

    fn log_id(term: u64, node: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn committed_vote(term: u64, node: u64) -> Vote<u64> {
        let mut vote = Vote::new(term, node);
        vote.commit();
        vote
    }

    /// Only entries of this node's current committed leadership are its own proposals: not
    /// before it knows its id, not under a vote it only asked for, not another leader's, and
    /// not its own entries of an earlier term once another leader's vote is saved.
    #[test]
    fn only_entries_of_the_current_own_leadership_are_own_proposals() {
        let durability = Durability::new(None);
        durability.vote_saved(&committed_vote(3, 1));
        assert!(!durability.own_proposal([log_id(3, 1, 7)].iter()), "no node id yet");
        durability.set_node(1);
        durability.vote_saved(&Vote::new(3, 1));
        assert!(
            !durability.own_proposal([log_id(3, 1, 7)].iter()),
            "an uncommitted vote"
        );
        durability.vote_saved(&committed_vote(3, 1));
        assert!(durability.own_proposal([log_id(3, 1, 7), log_id(3, 1, 8)].iter()));
        assert!(
            !durability.own_proposal([log_id(3, 1, 7), log_id(2, 1, 8)].iter()),
            "an older term"
        );
        assert!(!durability.own_proposal([log_id(3, 2, 7)].iter()), "another node's");
        durability.vote_saved(&committed_vote(4, 2));
        assert!(!durability.own_proposal([log_id(3, 1, 7)].iter()), "a follower again");
        assert!(!durability.own_proposal([log_id(4, 2, 9)].iter()), "the new leader's");
    }

    /// The commit sent to followers stops at the last synced entry; an apply waits for its
    /// entry's sync and fails once a sync failed; a truncation (a synced write) counts all that
    /// is left as synced.
    #[tokio::test]
    async fn commits_are_capped_and_applies_wait_at_the_last_synced_entry() {
        let durability = std::sync::Arc::new(Durability::new(Some(log_id(1, 1, 2))));
        durability.set_node(1);
        assert_eq!(durability.cap_commit(Some(log_id(1, 1, 2))), Some(log_id(1, 1, 2)));
        durability.written(log_id(1, 1, 5));
        assert_eq!(durability.cap_commit(Some(log_id(1, 1, 5))), Some(log_id(1, 1, 2)));
        assert_eq!(durability.cap_commit(None), None);
        durability.wait_synced(2).await.expect("already synced");

        let waiter = {
            let durability = durability.clone();
            tokio::spawn(async move { durability.wait_synced(5).await })
        };
        let upto = durability.written_mark();
        durability.written(log_id(1, 1, 6));
        durability.synced(upto);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the apply waited past the sync")
            .expect("task")
            .expect("synced");
        assert_eq!(durability.cap_commit(Some(log_id(1, 1, 6))), Some(log_id(1, 1, 5)));
        let at_six = durability.written_mark();
        // A sync that began before the last one moves nothing back.
        durability.synced(upto);
        assert_eq!(durability.cap_commit(Some(log_id(1, 1, 6))), Some(log_id(1, 1, 5)));

        // A truncation (a synced write) counts all that is left as synced...
        let before_truncation = durability.written_mark();
        durability.truncated(Some(log_id(1, 1, 4)));
        assert_eq!(durability.written_mark().last, Some(log_id(1, 1, 4)));
        assert_eq!(durability.cap_commit(Some(log_id(1, 1, 6))), Some(log_id(1, 1, 4)));
        // ...and a sync that began before it says nothing of what is written after it.
        durability.written(log_id(2, 2, 6));
        durability.synced(before_truncation);
        durability.synced(at_six);
        assert_eq!(durability.cap_commit(Some(log_id(2, 2, 6))), Some(log_id(1, 1, 4)));
        durability.synced(durability.written_mark());
        assert_eq!(durability.cap_commit(Some(log_id(2, 2, 6))), Some(log_id(2, 2, 6)));

        durability.sync_failed("disk gone".to_string());
        let failed = durability
            .wait_synced(9)
            .await
            .expect_err("a failed sync fails the wait");
        assert!(failed.contains("disk gone"), "{failed}");
    }
}
