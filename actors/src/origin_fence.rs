//! The owner's fence at the origin: a ref, `refs/flotilla/fence/AGENT`, that every push of the
//! agent's work branch moves in the same atomic push, leased on the value the pushing owner's
//! epoch gave it. A new owner that succeeds another moves the fence to its own epoch before
//! anything else, and from then on the origin itself refuses every push of an older owner, the
//! branch included, whatever the older owner believes about the log. An agent's first owner
//! has none to fence out: its first push creates the fence, leased on its absence.
//!
//! The fence's values are deterministic commit objects (the empty tree, a fixed identity and
//! date, a message naming the agent, the epoch and the phase), so their ids are a pure function
//! of (agent, epoch, phase) that every node computes without fetching anything. Each epoch has
//! two values, its two phases, and every push moves the fence from one to the other: a ref whose
//! value does not change is "up to date" to git and is left out of what the origin checks, so
//! only a fence that moves is compared and swapped by the origin under the same lock as the
//! branch. The functions here are pure; the repository actor reads and pushes the ref.

use std::fmt;

use flotilla_raft::{AgentId, Epoch};
use sha1::Digest as _;

/// Where the origin keeps the fence refs, one per agent.
pub const FENCE_REF_PREFIX: &str = "refs/flotilla/fence/";
/// Most earlier epochs a found fence is compared against: an agent reassigned more often than
/// this cannot be taken over from the fence of an epoch that old (the error says so).
pub const MAX_EARLIER_EPOCHS_SCANNED: u64 = 100_000;

/// The fence of one owner: the agent and the epoch it owns it under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerFence {
    pub agent: AgentId,
    pub epoch: Epoch,
}

impl OwnerFence {
    /// The ref at the origin that fences this agent's branch.
    pub fn ref_name(&self) -> String {
        fence_ref(self.agent)
    }

    /// Whether an owner held the agent before this one. The first assignment is epoch 1 (every
    /// assignment raises the epoch, and an unassigned agent keeps its last one), so the first
    /// owner has nobody to fence out: its pushes move the fence with its branch, leased on the
    /// fence being absent, and any later owner's fence makes the origin refuse them.
    pub fn succeeds_an_owner(&self) -> bool {
        self.epoch > Epoch(1)
    }
}

/// The fence ref of `agent` at the origin.
pub fn fence_ref(agent: AgentId) -> String {
    format!("{FENCE_REF_PREFIX}{agent}")
}

/// The hash of the repository's objects: a fence's id depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFormat {
    Sha1,
    Sha256,
}

impl ObjectFormat {
    /// The format of a full object id (40 or 64 hex digits).
    pub fn of_id(id: &str) -> Option<ObjectFormat> {
        match id.len() {
            40 => Some(ObjectFormat::Sha1),
            64 => Some(ObjectFormat::Sha256),
            _ => None,
        }
    }

    /// The format git names (`git rev-parse --show-object-format`).
    pub fn named(name: &str) -> Option<ObjectFormat> {
        match name {
            "sha1" => Some(ObjectFormat::Sha1),
            "sha256" => Some(ObjectFormat::Sha256),
            _ => None,
        }
    }

    fn empty_tree(self) -> &'static str {
        match self {
            ObjectFormat::Sha1 => "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            ObjectFormat::Sha256 => "6ef19b41225c5369f1c104d45d8d85efa9b057b53b14b4b9b939dd74decc5321",
        }
    }
}

/// Which of its epoch's two values the fence holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Tick,
    Tock,
}

impl Phase {
    /// The value the next push moves the fence to.
    pub fn next(self) -> Phase {
        match self {
            Phase::Tick => Phase::Tock,
            Phase::Tock => Phase::Tick,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Phase::Tick => "tick",
            Phase::Tock => "tock",
        })
    }
}

/// The text of the fence commit of `fence` in `phase` (what `git hash-object -t commit` hashes).
pub fn fence_commit(format: ObjectFormat, fence: OwnerFence, phase: Phase) -> String {
    format!(
        "tree {}\nauthor flotilla <fence@flotilla.invalid> 0 +0000\ncommitter flotilla <fence@flotilla.invalid> 0 +0000\n\nflotilla fence {} epoch {} phase {phase}\n",
        format.empty_tree(),
        fence.agent,
        fence.epoch
    )
}

/// The object id of the fence commit of `fence` in `phase`: what the origin's fence ref holds
/// while that owner holds the agent.
pub fn fence_id(format: ObjectFormat, fence: OwnerFence, phase: Phase) -> String {
    let text = fence_commit(format, fence, phase);
    let header = format!("commit {}\0", text.len());
    match format {
        ObjectFormat::Sha1 => {
            let mut hasher = sha1::Sha1::new();
            hasher.update(header.as_bytes());
            hasher.update(text.as_bytes());
            hex::encode(hasher.finalize())
        }
        ObjectFormat::Sha256 => {
            let mut hasher = sha2::Sha256::new();
            hasher.update(header.as_bytes());
            hasher.update(text.as_bytes());
            hex::encode(hasher.finalize())
        }
    }
}

/// What the origin's fence ref holds, seen by the owner `fence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceFound {
    /// No fence yet (no owner has pushed since fences exist).
    Absent,
    /// The fence of an earlier owner: this owner may take it.
    Earlier { epoch: Epoch },
    /// This owner's own fence, in `phase`.
    Own(Phase),
    /// Anything else: the fence of a later owner (this one is stale), or a value no owner wrote.
    Other(String),
}

/// Names what the origin's fence ref holds (`found`), for the owner `fence`. Earlier epochs are
/// tried newest first (usually the one just before), at most [`MAX_EARLIER_EPOCHS_SCANNED`].
pub fn classify(format: ObjectFormat, fence: OwnerFence, found: Option<&str>) -> FenceFound {
    let Some(found) = found else {
        return FenceFound::Absent;
    };
    let is = |epoch: Epoch, phase: Phase| fence_id(format, OwnerFence { epoch, ..fence }, phase) == found;
    for phase in [Phase::Tick, Phase::Tock] {
        if is(fence.epoch, phase) {
            return FenceFound::Own(phase);
        }
    }
    let oldest = fence.epoch.0.saturating_sub(MAX_EARLIER_EPOCHS_SCANNED);
    for epoch in (oldest..fence.epoch.0).rev().map(Epoch) {
        if is(epoch, Phase::Tick) || is(epoch, Phase::Tock) {
            return FenceFound::Earlier { epoch };
        }
    }
    FenceFound::Other(found.to_string())
}

/// How one push moves the fence: from `lease` (what the origin must hold; `None`: no fence yet)
/// to `next`, this owner's value in `phase`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceMove {
    pub lease: Option<String>,
    pub next: String,
    pub phase: Phase,
}

/// The move of the fence for the owner `fence` when the origin holds `found`, or `None` when
/// the origin's fence is not this owner's to move (a later owner's, or no owner's).
pub fn fence_move(format: ObjectFormat, fence: OwnerFence, found: Option<&str>) -> Option<FenceMove> {
    let phase = match classify(format, fence, found) {
        FenceFound::Absent | FenceFound::Earlier { .. } => Phase::Tick,
        FenceFound::Own(phase) => phase.next(),
        FenceFound::Other(_) => return None,
    };
    Some(FenceMove {
        lease: found.map(str::to_string),
        next: fence_id(format, fence, phase),
        phase,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(epoch: u64) -> OwnerFence {
        OwnerFence {
            agent: "01J0000000000000000000FENC".parse().unwrap(),
            epoch: Epoch(epoch),
        }
    }

    /// What git itself answers for the object: the ids must agree with git's.
    fn git_id(format: ObjectFormat, text: &str) -> String {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let name = match format {
            ObjectFormat::Sha1 => "sha1",
            ObjectFormat::Sha256 => "sha256",
        };
        let status = std::process::Command::new("git")
            .args(["init", "--quiet", "--bare", &format!("--object-format={name}")])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let mut child = std::process::Command::new("git")
            .args(["hash-object", "-t", "commit", "--stdin"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn a_fence_is_a_pure_function_of_agent_epoch_and_phase_and_git_agrees() {
        for format in [ObjectFormat::Sha1, ObjectFormat::Sha256] {
            let id = fence_id(format, owner(3), Phase::Tick);
            assert_eq!(id, fence_id(format, owner(3), Phase::Tick), "deterministic");
            assert_eq!(ObjectFormat::of_id(&id), Some(format));
            assert_eq!(id, git_id(format, &fence_commit(format, owner(3), Phase::Tick)));
            assert_ne!(id, fence_id(format, owner(4), Phase::Tick), "epochs differ");
            assert_ne!(id, fence_id(format, owner(3), Phase::Tock), "phases differ");
            let other_agent = OwnerFence {
                agent: "01J0000000000000000000THER".parse().unwrap(),
                ..owner(3)
            };
            assert_ne!(id, fence_id(format, other_agent, Phase::Tick), "agents differ");
        }
    }

    #[test]
    fn an_owner_takes_an_earlier_fence_rotates_its_own_and_never_moves_a_later_one() {
        let format = ObjectFormat::Sha1;
        let later = fence_id(format, owner(6), Phase::Tock);
        let earlier = fence_id(format, owner(2), Phase::Tock);
        let own = fence_id(format, owner(5), Phase::Tick);
        assert_eq!(classify(format, owner(5), None), FenceFound::Absent);
        assert_eq!(
            classify(format, owner(5), Some(&earlier)),
            FenceFound::Earlier { epoch: Epoch(2) }
        );
        assert_eq!(classify(format, owner(5), Some(&own)), FenceFound::Own(Phase::Tick));
        assert_eq!(
            classify(format, owner(5), Some(&later)),
            FenceFound::Other(later.clone())
        );
        assert_eq!(fence_move(format, owner(5), Some(&later)), None);
        let taken = fence_move(format, owner(5), Some(&earlier)).unwrap();
        assert_eq!(
            (taken.lease.as_deref(), taken.next.as_str()),
            (Some(earlier.as_str()), own.as_str())
        );
        let rotated = fence_move(format, owner(5), Some(&own)).unwrap();
        assert_eq!(rotated.next, fence_id(format, owner(5), Phase::Tock));
        assert_eq!(rotated.phase, Phase::Tock);
        let first = fence_move(format, owner(1), None).unwrap();
        assert_eq!((first.lease, first.phase), (None, Phase::Tick));
    }
}
