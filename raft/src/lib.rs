//! The replicated state of a Flotilla cluster and the Raft that replicates it.
//!
//! Every fact a client was told (an agent exists, who owns it under which epoch, what it did)
//! lives here. `state::apply` is a pure function from a command to a new state; `store` puts
//! openraft's log and state machine on RocksDB; `network` carries Raft messages between nodes over
//! the internal gRPC service; `replica` is the handle the rest of the node uses to read the state
//! and to write commands (forwarding to the leader when it is not the leader).

pub mod command;
pub mod metrics;
pub mod network;
pub mod replica;
pub mod state;
pub mod store;
pub mod types;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use command::{ApplyError, ApplyResult, Command, Request, Response};
pub use replica::{Replica, ReplicaConfig, WriteError};
pub use state::ClusterState;
pub use types::*;

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
        D = Request,
        R = ApplyResult,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
