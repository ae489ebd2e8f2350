//! A plugin uploaded to one node of a three-node cluster is compiled and swapped in by every
//! node while they run: a new version replaces the old one everywhere, and a disabled one is
//! unloaded everywhere. Each node says whether it runs a version (`loaded_here`).

use std::time::Instant;

use flotilla_proto::v1;
use flotilla_tests::{admin_client, wait_for, ClusterOptions, TestCluster};

use crate::common::DEADLINE;
use crate::t55_plugins::{list, upload_stream};

/// Waits until every node says whether it runs `version` of `name` as `wanted`.
pub(crate) async fn wait_everywhere(cluster: &TestCluster, name: &str, version: &str, wanted: bool) {
    let token = cluster.admin_token();
    for node in &cluster.nodes {
        let endpoint = node.endpoint();
        let what = format!("node {} to have {name} {version} loaded = {wanted}", node.id);
        wait_for(&what, DEADLINE, || {
            let (endpoint, token) = (endpoint.clone(), token.clone());
            async move {
                let mut client = admin_client(&endpoint, &token).await;
                let plugins = list(&mut client, name).await;
                let plugin = plugins.iter().find(|plugin| plugin.version == version)?;
                assert!(
                    plugin.load_error.is_empty(),
                    "node could not load it: {}",
                    plugin.load_error
                );
                (plugin.loaded_here == wanted).then_some(())
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_plugin_is_loaded_swapped_and_unloaded_on_every_node() {
    let cluster = TestCluster::start(3, ClusterOptions::default()).await;
    let token = cluster.admin_token();
    let component = flotilla_tests::test_guest("well-behaved");
    // Upload through a follower: the bytes reach the others through Raft only.
    let mut client = admin_client(&cluster.nodes[1].endpoint(), &token).await;
    let started = Instant::now();
    client
        .upload_plugin(tokio_stream::iter(upload_stream("acme-forge", "1.0.0", &component)))
        .await
        .expect("upload 1.0.0");
    wait_everywhere(&cluster, "acme-forge", "1.0.0", true).await;
    println!(
        "upload of a {} byte component to loaded on all 3 nodes: {} ms",
        component.len(),
        started.elapsed().as_millis()
    );

    // A new version (other bytes) replaces it on every node without a restart.
    let tool = flotilla_tests::test_guest("echo-tool");
    client
        .upload_plugin(tokio_stream::iter(upload_stream("acme-forge", "1.0.1", &tool)))
        .await
        .expect("upload 1.0.1");
    wait_everywhere(&cluster, "acme-forge", "1.0.1", true).await;
    wait_everywhere(&cluster, "acme-forge", "1.0.0", false).await;
    let listed = list(&mut client, "acme-forge").await;
    let enabled: Vec<&str> = listed
        .iter()
        .filter(|plugin| plugin.enabled)
        .map(|plugin| plugin.version.as_str())
        .collect();
    assert_eq!(enabled, vec!["1.0.1"], "one enabled version per name");
    assert_eq!(
        listed
            .iter()
            .find(|plugin| plugin.version == "1.0.1")
            .map(|plugin| plugin.kind),
        Some(v1::PluginKind::Tool as i32),
        "the new version's world decides its kind"
    );

    client
        .disable_plugin(v1::PluginRef {
            name: "acme-forge".to_string(),
            version: "1.0.1".to_string(),
        })
        .await
        .expect("disable");
    wait_everywhere(&cluster, "acme-forge", "1.0.1", false).await;
}
