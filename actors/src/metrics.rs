//! The actors' metrics: their names (one home, Prometheus style) and descriptions. They are
//! recorded through the `metrics` facade, so they cost an atomic load until a process installs
//! a recorder; [`describe`] registers their help text with it.

use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Live events a watcher's full buffer dropped on this node (a slow reader loses live tokens,
/// never durable events). The same figure per mesh is
/// [`crate::mesh::Mesh::event_dropped_count`].
pub const MESH_LIVE_EVENTS_DROPPED_TOTAL: &str = "flotilla_mesh_live_events_dropped_total";
/// Dials this node's mesh started to other nodes (a link already up is not dialed again).
pub const MESH_DIALS_TOTAL: &str = "flotilla_mesh_dials_total";

/// Machines running on this node (booted and not yet destroyed).
pub const MACHINES_RUNNING: &str = "flotilla_machines_running";
/// How long each machine took from the start of provisioning (workspace, environment, install
/// layer, boot) to running.
pub const MACHINE_START_DURATION_SECONDS: &str = "flotilla_machine_start_duration_seconds";
/// Machines started on an install layer (the snapshot of an environment's install step), by
/// `outcome`: `hit` (the layer was there) or `miss` (this start built it).
pub const MACHINE_INSTALL_LAYER_LOOKUPS_TOTAL: &str = "flotilla_machine_install_layer_lookups_total";

/// One running machine in [`MACHINES_RUNNING`], for as long as this value lives.
pub(crate) struct RunningMachineGauge;

impl RunningMachineGauge {
    pub(crate) fn start() -> RunningMachineGauge {
        ::metrics::gauge!(MACHINES_RUNNING).increment(1.0);
        RunningMachineGauge
    }
}

impl Drop for RunningMachineGauge {
    fn drop(&mut self) {
        ::metrics::gauge!(MACHINES_RUNNING).decrement(1.0);
    }
}

pub(crate) fn record_machine_started(elapsed: std::time::Duration, install_layer: Option<bool>) {
    ::metrics::histogram!(MACHINE_START_DURATION_SECONDS).record(elapsed.as_secs_f64());
    if let Some(built) = install_layer {
        let outcome = if built { "miss" } else { "hit" };
        ::metrics::counter!(MACHINE_INSTALL_LAYER_LOOKUPS_TOTAL, "outcome" => outcome).increment(1);
    }
}

/// Registers the help text of every actor metric with the installed recorder.
pub fn describe() {
    describe_gauge!(MACHINES_RUNNING, "Machines running on this node.");
    describe_histogram!(
        MACHINE_START_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of each machine start, from provisioning to running."
    );
    describe_counter!(
        MACHINE_INSTALL_LAYER_LOOKUPS_TOTAL,
        Unit::Count,
        "Machine starts on an environment's install layer, by outcome: hit (reused) or miss (built by this start)."
    );
    describe_counter!(
        MESH_LIVE_EVENTS_DROPPED_TOTAL,
        Unit::Count,
        "Live events dropped because a watcher's buffer was full (durable events are never dropped)."
    );
    describe_counter!(
        MESH_DIALS_TOTAL,
        Unit::Count,
        "Dials started by this node's mesh to other nodes."
    );
}

#[cfg(test)]
mod tests {
    use ::metrics::Key;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};

    use super::*;
    use crate::mesh::{Mesh, MeshConfig};

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("free port address").port()
    }

    #[test]
    fn a_dial_counts_even_when_nobody_answers() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // One thread, so that everything the mesh does records into this thread's local recorder.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        ::metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                // A node id no other test uses: actor names are global to the process.
                let mesh = Mesh::start(MeshConfig {
                    node_id: 190,
                    listen_port: free_port(),
                    cluster_secret: "metrics-test-secret".to_string(),
                    max_live_events_per_watcher: 1,
                    listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                    tls: None,
                })
                .await
                .expect("start a mesh");
                // Nothing listens on a port just released.
                let closed_port = free_port();
                assert!(mesh.connect(&format!("127.0.0.1:{closed_port}")).await.is_err());
                assert_eq!(mesh.dials_started(), 1);
                mesh.shutdown().await;
            })
        });
        let dials = CompositeKey::new(MetricKind::Counter, Key::from_static_name(MESH_DIALS_TOTAL));
        let counters = snapshotter.snapshot().into_hashmap();
        assert_eq!(
            counters.get(&dials).map(|(_, _, value)| value),
            Some(&DebugValue::Counter(1))
        );
    }
}
