//! What an operator's tools see of one node: gRPC reflection through Python's stock client
//! (v1alpha only), the Prometheus metrics read by `prometheus_client`'s text parser, and JSON
//! log lines that carry the agent they are about. The Python tools come from the set-up's
//! `.venv` (scripts/setup installs them); the scripts are in `it/py/`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flotilla_proto::v1;
use flotilla_tests::{agent_client, free_port, wait_for, ClusterOptions, TestCluster};
use serde_json::Value;

use crate::common::{create, get, status_of, DEADLINE};
use crate::t18_agent_runs::wait_for_agent;

/// Runs `it/py/SCRIPT ARGS...` with the set-up's Python and returns its standard output.
async fn run_python(script: &str, args: &[&str]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup (it installs grpcio-reflection and prometheus-client into .venv)",
        python.display()
    );
    let output = tokio::process::Command::new(&python)
        .arg(root.join("it/py").join(script))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|error| panic!("could not run {script}: {error}"));
    assert!(
        output.status.success(),
        "{script} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the script prints UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_python_reflection_client_lists_services_through_v1alpha() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let node = cluster.node(1);
    let target = format!("{}:{}", node.host, node.grpc_port);
    let ca = cluster.ca_path();
    let listed = run_python("reflection_v1alpha.py", &[&target, ca.to_str().unwrap()]).await;
    let lines: Vec<&str> = listed.lines().collect();
    for service in [
        "flotilla.v1.AgentService",
        "flotilla.v1.ClusterService",
        "grpc.health.v1.Health",
    ] {
        assert!(lines.contains(&service), "{service} is listed: {listed}");
    }
    // The reflected descriptors resolve: the client built AgentService's methods from them.
    assert!(lines.contains(&"method CreateAgent"), "{listed}");
    assert!(lines.contains(&"method WatchAgent"), "{listed}");
}

/// One scrape, as the parser read it.
struct Scrape {
    families: BTreeMap<String, Value>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    async fn take(url: &str) -> Scrape {
        let printed = run_python("scrape_metrics.py", &[url]).await;
        let parsed: Value = serde_json::from_str(&printed).expect("the scrape script prints JSON");
        assert!(
            parsed["content_type"].as_str().unwrap_or("").starts_with("text/plain"),
            "{}",
            parsed["content_type"]
        );
        let families = parsed["families"]
            .as_object()
            .expect("families")
            .iter()
            .map(|(name, family)| (name.clone(), family.clone()))
            .collect();
        let samples = parsed["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|sample| {
                let labels = sample[1]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(name, value)| (name.clone(), value.as_str().unwrap_or("").to_string()))
                    .collect();
                (
                    sample[0].as_str().expect("a name").to_string(),
                    labels,
                    sample[2].as_f64().expect("a value"),
                )
            })
            .collect();
        Scrape { families, samples }
    }

    /// The family `name` with its type; panics naming what is there when it is missing.
    fn family_type(&self, name: &str) -> &str {
        self.families
            .get(name)
            .and_then(|family| family["type"].as_str())
            .unwrap_or_else(|| panic!("no family {name}; families: {:?}", self.families.keys()))
    }

    /// The value of the sample `name` whose labels include `labels` (summed over the rest).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(sample, sample_labels, _)| {
                sample == name
                    && labels
                        .iter()
                        .all(|(label, value)| sample_labels.get(*label).map(String::as_str) == Some(*value))
            })
            .map(|(_, _, value)| value)
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_metrics_a_prometheus_parser_reads_and_logs_json_lines_naming_the_agent() {
    let metrics_port = free_port();
    let cluster = TestCluster::start(
        1,
        ClusterOptions {
            extra_args: vec![
                "--metrics-listen".to_string(),
                format!("127.0.0.1:{metrics_port}"),
                "--log-format".to_string(),
                "json".to_string(),
            ],
            ..ClusterOptions::default()
        },
    )
    .await;
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let mut client = agent_client(&cluster.node(1).endpoint(), &cluster.admin_token()).await;
    let agent = create(&mut client, "observed", "Hold the machine").await;
    wait_for_agent(&cluster, &agent.id, "to run", |agent| {
        status_of(agent) == v1::AgentStatus::Running
    })
    .await;

    let before = Scrape::take(&url).await;
    check_families(&before);
    check_state_and_raft(&before);
    assert_eq!(before.value("flotilla_watchers", &[]), 0.0);
    let watch = client
        .watch_agent(v1::WatchAgentRequest {
            id: agent.id.clone(),
            ..Default::default()
        })
        .await
        .expect("watch the agent");
    let watching = Scrape::take(&url).await;
    assert_eq!(watching.value("flotilla_watchers", &[]), 1.0, "one watch stream open");
    drop(watch);
    const CALLS: usize = 5;
    for _ in 0..CALLS {
        assert!(get(&mut client, &agent.id).await.is_some());
    }
    assert!(get(&mut client, "01ARZ3NDEKTSV4RRFFQ69G5FAV").await.is_none());
    let get_method = [("method", "/flotilla.v1.AgentService/GetAgent"), ("code", "OK")];
    let not_found = [("method", "/flotilla.v1.AgentService/GetAgent"), ("code", "NOT_FOUND")];
    // A scrape sees every call whose answer the client has: the status is recorded as it is sent.
    let after = wait_for("the GetAgent calls to show in the metrics", DEADLINE, || {
        let url = url.clone();
        let before_count = before.value("flotilla_rpc_requests_total", &get_method);
        async move {
            let after = Scrape::take(&url).await;
            (after.value("flotilla_rpc_requests_total", &get_method) >= before_count + CALLS as f64
                && after.value("flotilla_rpc_requests_total", &not_found) >= 1.0)
                .then_some(after)
        }
    })
    .await;
    assert!(after.value("flotilla_rpc_duration_seconds_count", &get_method) >= CALLS as f64);
    let create_bucket = after.value(
        "flotilla_rpc_duration_seconds_bucket",
        &[("method", "/flotilla.v1.AgentService/CreateAgent"), ("le", "+Inf")],
    );
    assert_eq!(create_bucket, 1.0, "one CreateAgent call in the histogram");

    check_json_logs(&cluster, &agent.id);
}

fn check_families(scrape: &Scrape) {
    for (family, kind) in [
        ("flotilla_rpc_requests", "counter"),
        ("flotilla_rpc_duration_seconds", "histogram"),
        ("flotilla_raft_term", "gauge"),
        ("flotilla_raft_is_leader", "gauge"),
        ("flotilla_raft_leader_id", "gauge"),
        ("flotilla_raft_committed_index", "gauge"),
        ("flotilla_raft_applied_index", "gauge"),
        ("flotilla_raft_write_duration_seconds", "histogram"),
        ("flotilla_raft_log_sync_duration_seconds", "histogram"),
        ("flotilla_agents", "gauge"),
        ("flotilla_node_agents", "gauge"),
        ("flotilla_machines_running", "gauge"),
        ("flotilla_machine_start_duration_seconds", "histogram"),
        ("flotilla_watchers", "gauge"),
    ] {
        assert_eq!(scrape.family_type(family), kind, "the type of {family}");
    }
    let help = scrape.families["flotilla_rpc_requests"]["help"].as_str().unwrap_or("");
    assert!(help.contains("gRPC calls"), "families carry their help text: {help:?}");
}

fn check_state_and_raft(scrape: &Scrape) {
    assert_eq!(scrape.value("flotilla_raft_is_leader", &[]), 1.0, "a single node leads");
    assert_eq!(scrape.value("flotilla_raft_leader_id", &[]), 1.0);
    assert!(scrape.value("flotilla_raft_term", &[]) >= 1.0);
    let committed = scrape.value("flotilla_raft_committed_index", &[]);
    assert!(
        committed >= 3.0,
        "bootstrap, registration and the create are committed: {committed}"
    );
    assert!(scrape.value("flotilla_raft_applied_index", &[]) >= committed - 1.0);
    assert!(scrape.value("flotilla_raft_write_duration_seconds_count", &[("outcome", "applied")]) >= 1.0);
    assert!(scrape.value("flotilla_raft_log_sync_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(scrape.value("flotilla_agents", &[("status", "running")]), 1.0);
    assert_eq!(scrape.value("flotilla_agents", &[("status", "failed")]), 0.0);
    assert_eq!(scrape.value("flotilla_node_agents", &[("status", "running")]), 1.0);
    assert_eq!(scrape.value("flotilla_machines_running", &[]), 1.0);
    assert_eq!(scrape.value("flotilla_machine_start_duration_seconds_count", &[]), 1.0);
    // The create asked the built-in providers which one claims the repository.
    assert!(scrape.value("flotilla_plugin_calls_total", &[("outcome", "ok")]) >= 1.0);
    assert!(scrape.value("flotilla_plugin_fuel_consumed_total", &[]) > 0.0);
}

/// Every line of the node's log is a JSON object, and the lines of the agent's work carry its
/// id, team and epoch.
fn check_json_logs(cluster: &TestCluster, agent_id: &str) {
    let log = std::fs::read_to_string(cluster.node(1).log_path()).expect("read the node log");
    let mut agent_lines = Vec::new();
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let parsed: Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("a log line is not JSON ({error}): {line}"));
        assert!(parsed["timestamp"].is_string() && parsed["level"].is_string(), "{line}");
        if parsed["span"]["agent"] == agent_id {
            agent_lines.push(parsed);
        }
    }
    let messages: Vec<&str> = agent_lines
        .iter()
        .filter_map(|line| line["fields"]["message"].as_str())
        .collect();
    for expected in ["provisioning a machine", "machine ready"] {
        assert!(
            messages.contains(&expected),
            "a line {expected:?} in the agent's span; its lines: {messages:?}"
        );
    }
    for line in &agent_lines {
        assert_eq!(line["span"]["team"], "default", "{line}");
        assert_eq!(line["span"]["epoch"], "1", "{line}");
    }
}
