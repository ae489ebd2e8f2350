//! A burst of agents on a small cluster of real machines: more agents than slots. The nodes
//! keep answering `cluster status` in under a second throughout, the leader never changes,
//! and every agent runs or waits in the queue; none is lost or failed. (`flotilla-bench burst`
//! runs the same burst at full size and prints the figures.)

use std::time::Duration;

use flotilla_tests::burst::{hold_script, node_config, run_burst, BurstPlan};
use flotilla_tests::fakes::FakeModelServer;
use flotilla_tests::{ClusterOptions, TestCluster};

use crate::common::bare_repository;

const NODES: usize = 2;
const SLOTS_PER_NODE: u32 = 8;
const AGENTS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_slots_keeps_status_fast_and_the_leader_and_loses_no_agent() {
    let model = FakeModelServer::start().await;
    model.set_script(hold_script());
    let cluster = TestCluster::start(
        NODES,
        ClusterOptions {
            slots: SLOTS_PER_NODE,
            config: Some(node_config(&model)),
            ..Default::default()
        },
    )
    .await;
    let repository = bare_repository(cluster.dir.path(), "burst", &[("README.md", "burst\n")]);
    let plan = BurstPlan {
        endpoints: cluster.nodes.iter().map(|node| node.endpoint()).collect(),
        token: cluster.admin_token(),
        agents: AGENTS,
        repository,
        prompt: "Hold the machine".to_string(),
        settle_deadline: Duration::from_secs(120),
        settled_started: NODES * SLOTS_PER_NODE as usize,
    };
    let report = run_burst(&plan).await;
    let figures = report.render();
    assert!(report.create_errors.is_empty(), "{:?}\n{figures}", report.create_errors);
    assert!(report.failed.is_empty(), "{:?}\n{figures}", report.failed);
    assert!(report.settled, "the burst did not settle\n{figures}");
    assert_eq!(
        report.by_status.values().sum::<usize>(),
        AGENTS,
        "agents were lost\n{figures}"
    );
    assert_eq!(
        report.by_status.get("running").copied().unwrap_or(0),
        NODES * SLOTS_PER_NODE as usize,
        "every slot runs an agent\n{figures}"
    );
    assert_eq!(report.status_errors, 0, "cluster status failed\n{figures}");
    assert!(
        report.status_max < Duration::from_secs(1),
        "cluster status took a second or more\n{figures}"
    );
    assert!(!report.leader_changed(), "the leader changed\n{figures}");
}
