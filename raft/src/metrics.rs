//! The replicated state's metrics: their names (one home, Prometheus style) and descriptions.
//! They are recorded through the `metrics` facade, so they cost an atomic load until a process
//! installs a recorder; [`describe`] registers their help text with it.

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

/// Snapshots of the state machine this node built (for log compaction or to send to a
/// lagging follower).
pub const RAFT_SNAPSHOTS_BUILT_TOTAL: &str = "flotilla_raft_snapshots_built_total";
/// Encoded size of each snapshot built: the state a new or lagging node receives at once.
pub const RAFT_SNAPSHOT_SIZE_BYTES: &str = "flotilla_raft_snapshot_size_bytes";

/// Index of the last log entry this node knows committed (saved by Raft as it learns it).
pub const RAFT_COMMITTED_INDEX: &str = "flotilla_raft_committed_index";
/// How long each group sync of the log's write-ahead log took: the disk's part of an append.
pub const RAFT_LOG_SYNC_DURATION_SECONDS: &str = "flotilla_raft_log_sync_duration_seconds";
/// How long each write through [`crate::Replica::write`] took, from the call to the answer
/// (batched, forwarded to the leader if need be, committed and applied here), by `outcome`:
/// `applied`, `refused` (the state machine said no) or `failed` (no answer in time).
pub const RAFT_WRITE_DURATION_SECONDS: &str = "flotilla_raft_write_duration_seconds";

pub(crate) fn record_committed(index: u64) {
    gauge!(RAFT_COMMITTED_INDEX).set(index as f64);
}

pub(crate) fn record_log_sync(elapsed: std::time::Duration) {
    histogram!(RAFT_LOG_SYNC_DURATION_SECONDS).record(elapsed.as_secs_f64());
}

pub(crate) fn record_write(outcome: &'static str, elapsed: std::time::Duration) {
    histogram!(RAFT_WRITE_DURATION_SECONDS, "outcome" => outcome).record(elapsed.as_secs_f64());
}

pub(crate) fn record_snapshot_built(size_bytes: usize) {
    counter!(RAFT_SNAPSHOTS_BUILT_TOTAL).increment(1);
    histogram!(RAFT_SNAPSHOT_SIZE_BYTES).record(size_bytes as f64);
}

/// Registers the help text of every Raft metric with the installed recorder.
pub fn describe() {
    describe_counter!(
        RAFT_SNAPSHOTS_BUILT_TOTAL,
        Unit::Count,
        "Snapshots of the state machine built by this node."
    );
    describe_histogram!(
        RAFT_SNAPSHOT_SIZE_BYTES,
        Unit::Bytes,
        "Encoded size of each state-machine snapshot built by this node."
    );
    describe_gauge!(
        RAFT_COMMITTED_INDEX,
        "Index of the last Raft log entry this node knows committed."
    );
    describe_histogram!(
        RAFT_LOG_SYNC_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of each sync of the Raft log to disk (one sync covers a group of appends)."
    );
    describe_histogram!(
        RAFT_WRITE_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of each replicated write from this node, proposal to local apply, by outcome: applied, refused or failed."
    );
}

#[cfg(test)]
mod tests {
    use ::metrics::Key;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;

    use super::*;

    #[test]
    fn building_a_snapshot_counts_it_and_records_its_size() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        ::metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let (_, mut state_machine) = crate::store::open(dir.path()).expect("open the store");
                state_machine
                    .get_snapshot_builder()
                    .await
                    .build_snapshot()
                    .await
                    .expect("build a snapshot");
            })
        });
        let counters = snapshotter.snapshot().into_hashmap();
        let built = CompositeKey::new(MetricKind::Counter, Key::from_static_name(RAFT_SNAPSHOTS_BUILT_TOTAL));
        assert_eq!(
            counters.get(&built).map(|(_, _, value)| value),
            Some(&DebugValue::Counter(1))
        );
        let size = CompositeKey::new(MetricKind::Histogram, Key::from_static_name(RAFT_SNAPSHOT_SIZE_BYTES));
        assert!(
            matches!(counters.get(&size), Some((_, _, DebugValue::Histogram(sizes))) if sizes.len() == 1 && sizes[0].into_inner() > 0.0),
            "one snapshot size recorded: {:?}",
            counters.get(&size)
        );
    }
}
