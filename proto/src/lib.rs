//! The wire contract of Flotilla. `v1` is the public API that clients call (agents, the
//! cluster and its plugins); `internal` is what nodes say to each other (Raft messages, joins,
//! liveness).
//! Everything here is generated from `flotilla/v1/*.proto`; no logic lives in this crate.

pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

pub mod internal {
    tonic::include_proto!("flotilla.internal.v1");
}

/// Encoded descriptors of every service, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flotilla_descriptor");
