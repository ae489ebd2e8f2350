//! The replicated state of a Flotilla cluster and the pure rules over it.
//!
//! Everything a client was told lives in this state once Raft has committed it: which agents
//! exist, who owns each under which epoch, what each did, which nodes are up, which plugins and
//! settings the cluster has. This crate holds the records and the functions over them, and
//! nothing else: no I/O, no async, no openraft types. `flotilla-raft` wraps it in a log, a
//! RocksDB store and a network; the actors read it and propose commands to it.
//!
//! - [`types`]: the records (agents, nodes, events, tokens, plugins) and the syntax of plugin
//!   fields.
//! - [`command`]: what may be written (a [`Request`] carries one [`Command`]), what a write
//!   answers, and the bounds a command must keep.
//! - [`cluster_state`]: [`ClusterState`], the records in memory with their derived indexes, and
//!   [`Changes`], the keys a write touched (what storage persists).
//! - [`apply`](mod@apply): the one pure function from a state and a request to the next state, one
//!   file per command family.
//! - [`invariants`]: what every state `apply` produces satisfies, as a checker.
//! - [`audit`]: the audit log's entries and the per-team limits `apply` enforces.
//! - [`search`]: the fixed-size signature that lets a `ListAgents` search skip records.
//! - [`placement`]: which node runs each pending agent, a pure decision the scheduler writes.
//!
//! The same log gives the same state on every node because `apply` reads no clock and no
//! randomness: the proposer stamps the time into the request.

pub mod apply;
pub mod audit;
pub mod cluster_state;
pub mod command;
pub mod host_pattern;
pub mod invariants;
pub mod placement;
pub mod search;
pub mod secrets;
pub mod settings;
pub mod types;

/// The version of the replicated state's format: the records' encoding (postcard by variant
/// and field order), the commands, and how the records sit on disk. A node stamps it in its data
/// dir and carries it in the `Join` exchange; a node refuses a data dir or a cluster whose format
/// is newer than its own, since it could misread records it does not know. Raise it when a change
/// cannot be read by the previous release (a new command variant a follower must apply is such a
/// change only if older nodes may still be members).
///
/// - 1: the first numbered format;
/// - 2: a node's Raft log is in segment files of its own (`raft-log/` in its store), no longer
///   in RocksDB's `log` family, which a release of format 1 would read as an empty log.
pub const STATE_FORMAT_VERSION: u32 = 2;

pub use apply::{apply, apply_in_term};
pub use audit::{AuditEntry, TeamLimits};
pub use cluster_state::{Changes, ClusterState, MAX_EVENTS_PER_AGENT, MAX_FOLLOW_UPS_PER_AGENT};
pub use command::{ApplyError, ApplyResult, AssignOne, Command, Request, Response};
pub use invariants::{check_invariants, InvariantViolation};
pub use secrets::{SealedSecret, SecretRecord, SecretScope};
pub use settings::*;
pub use types::*;
