//! The Raft that replicates a Flotilla cluster's state: the adapter between openraft and the
//! pure state machine of `flotilla-state`.
//!
//! Every fact a client was told (an agent exists, who owns it under which epoch, what it did)
//! is a record of [`flotilla_state::ClusterState`], changed only by [`flotilla_state::apply`].
//! This crate makes that state durable and shared: `store` keeps openraft's log in segment
//! files and its state machine on RocksDB (applying each committed entry with `apply` and
//! persisting the records it touched); `network` carries Raft messages between nodes over the internal gRPC service;
//! `replica` is the handle the rest of the node uses to read the state and to write commands
//! (grouping writes into batches, and forwarding to the leader when it is not the leader);
//! `read_index` lets a read wait until the local state holds every acknowledged write.
//!
//! The records and commands are re-exported here, so that the crates above use one path for
//! them whichever crate defines them.

mod append_encoding;
mod forward_stream;
mod forwarded_prompts;
pub mod handover;
pub mod metrics;
pub mod network;
pub mod read_index;
pub mod replica;
pub mod retry;
pub mod store;
pub mod tls;
pub mod trace_context;
mod write_queue;

pub use flotilla_state::{apply, cluster_state, command, invariants, secrets, settings, types};
pub use flotilla_state::{SealedSecret, SecretRecord, SecretScope, STATE_FORMAT_VERSION};

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use flotilla_state::command::{ApplyError, ApplyResult, Command, Request, Response};
pub use flotilla_state::settings::*;
pub use flotilla_state::types::*;
pub use flotilla_state::{audit, AuditEntry, Changes, ClusterState, TeamLimits};
pub use handover::{CampaignRefused, Handover};
pub use read_index::ReadError;
pub use replica::{Readiness, Replica, ReplicaConfig, WriteError};

/// Where a Raft member is reached: its gRPC address (public and internal services) and its
/// actor-mesh address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    pub grpc: String,
    pub mesh: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "grpc={} mesh={}", self.grpc, self.mesh)
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for Flotilla.
    pub TypeConfig:
        // Shared: the leader reads each new entry once per follower, and a clone of the
        // request would copy every prompt in it (the encoding is the request's own).
        D = std::sync::Arc<Request>,
        R = ApplyResult,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
