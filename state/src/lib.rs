//! The replicated state of a Flotilla cluster and the pure rules over it.
//!
//! Everything a client was told lives in this state once Raft has committed it: which agents
//! exist, who owns each under which epoch, what each did, which nodes are up, which plugins and
//! settings the cluster has. This crate holds the records and the functions over them, and
//! nothing else: no I/O, no async, no openraft types. `flotilla-raft` wraps it in a log, a
//! RocksDB store and a network; the actors read it and propose commands to it.

pub mod host_pattern;
