//! The actors of a Flotilla node, supervised with ractor.
//!
//! `NodeSupervisor` is the root. Under it, `AgentSupervisor` keeps one `AgentActor` per agent the
//! replicated state assigns to this node; on the leader, `Scheduler` places pending agents and
//! `LivenessMonitor` marks silent nodes down so their agents move elsewhere under a higher epoch.
//! `mesh` links the nodes with ractor_cluster for live traffic (event streams to watchers on
//! other nodes); anything durable goes through Raft instead.

pub mod agent;
pub mod checkpoint;
pub mod follow;
pub mod liveness;
pub mod machine;
pub mod mesh;
pub mod metrics;
pub mod model;
pub mod origin_fence;
pub mod push_bundle;
pub mod repo;
pub mod repo_url;
pub mod run;
pub mod scheduler;
pub mod secrets;
pub mod supervisor;
pub mod tools;
pub mod turn;
pub mod vcs;

/// The node's one retry policy; it lives in the lowest crate that retries.
pub use flotilla_raft::retry;
