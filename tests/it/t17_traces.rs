//! Traces: a node started with `--otlp-endpoint` exports its spans over OTLP/gRPC to a
//! receiver this test runs (the collector's own trace service, from `opentelemetry-proto`).
//! One create shows as a trace from the public RPC through the Raft write, and the agent's
//! provisioning and machine start carry the agent's id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_proto::v1;
use flotilla_tests::{agent_client, wait_for, ClusterOptions, TestCluster};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

use crate::common::{create_request, status_of, DEADLINE};
use crate::t18_agent_runs::wait_for_agent;

/// One span as the receiver got it.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: BTreeMap<String, String>,
    service: String,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|value| value.value.as_ref()) {
        Some(AnyValue::StringValue(text)) => text.clone(),
        Some(AnyValue::IntValue(number)) => number.to_string(),
        Some(AnyValue::BoolValue(flag)) => flag.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| text(&attribute.value))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(ReceivedSpan {
                        name: span.name,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|attribute| (attribute.key.clone(), text(&attribute.value)))
                            .collect(),
                        service: service.clone(),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves the OTLP trace service on a loopback port; returns its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let address = listener.local_addr().expect("the receiver's address");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("the OTLP receiver serves");
        });
        format!("http://{address}")
    }

    fn named(&self, name: &str, attribute: (&str, &str)) -> Option<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .find(|span| span.name == name && span.attributes.get(attribute.0).map(String::as_str) == Some(attribute.1))
            .cloned()
    }

    fn in_trace(&self, name: &str, trace_id: &str) -> Option<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .find(|span| span.name == name && span.trace_id == trace_id)
            .cloned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_is_one_trace_from_the_rpc_through_raft_and_its_machine_names_the_agent() {
    let receiver = Receiver::default();
    let endpoint = receiver.serve().await;
    let cluster = TestCluster::start(
        1,
        ClusterOptions {
            extra_args: vec!["--otlp-endpoint".to_string(), endpoint],
            ..ClusterOptions::default()
        },
    )
    .await;
    let mut client = agent_client(&cluster.node(1).endpoint(), &cluster.admin_token()).await;
    // The caller's own trace: the node's spans for the call continue it.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(create_request("traced", "Hold the machine"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01").parse().unwrap(),
    );
    let agent = client
        .create_agent(request)
        .await
        .expect("create the agent")
        .into_inner()
        .agent
        .expect("create answers with the agent");
    wait_for_agent(&cluster, &agent.id, "to run", |agent| {
        status_of(agent) == v1::AgentStatus::Running
    })
    .await;

    let rpc = wait_for("the CreateAgent span naming the agent", DEADLINE, || {
        let found = receiver.named("flotilla.v1.AgentService/CreateAgent", ("agent", &agent.id));
        async move { found }
    })
    .await;
    assert_eq!(rpc.service, "flotilla");
    assert_eq!(rpc.trace_id, caller_trace, "the call continues the caller's trace");
    assert_eq!(rpc.parent_span_id, caller_span);
    assert_eq!(rpc.attributes.get("rpc.system").map(String::as_str), Some("grpc"));
    assert_eq!(
        rpc.attributes.get("rpc.grpc.status_code").map(String::as_str),
        Some("OK")
    );

    let write = wait_for("the Raft write of the create, in the call's trace", DEADLINE, || {
        let found = receiver.in_trace("raft.write", &rpc.trace_id);
        async move { found }
    })
    .await;
    assert_eq!(
        write.attributes.get("command").map(String::as_str),
        Some("create-agent")
    );
    assert_eq!(write.attributes.get("outcome").map(String::as_str), Some("applied"));
    let commit = wait_for("the commit of the write, under it", DEADLINE, || {
        let found = receiver.in_trace("raft.commit", &rpc.trace_id);
        async move { found }
    })
    .await;
    let propose = wait_for("the proposal on the leader, under the commit", DEADLINE, || {
        let found = receiver.in_trace("raft.propose", &rpc.trace_id);
        async move { found }
    })
    .await;
    assert_eq!(commit.parent_span_id, write.span_id);
    assert_eq!(propose.parent_span_id, commit.span_id);

    let assign = wait_for("the scheduler's assignment of the agent", DEADLINE, || {
        let found = receiver.named("scheduler.assign", ("agent", &agent.id));
        async move { found }
    })
    .await;
    assert!(
        receiver.in_trace("raft.write", &assign.trace_id).is_some(),
        "the assignment's Raft write is in its trace"
    );
    let provision = wait_for("the agent's provisioning span", DEADLINE, || {
        let found = receiver.named("agent.provision", ("agent", &agent.id));
        async move { found }
    })
    .await;
    let machine = wait_for("the machine start span", DEADLINE, || {
        let found = receiver.named("machine.start", ("agent", &agent.id));
        async move { found }
    })
    .await;
    assert_eq!(machine.trace_id, provision.trace_id);
    assert_eq!(
        machine.parent_span_id, provision.span_id,
        "the machine starts within the provisioning"
    );

    // Raft's own traffic and health checks are not traced.
    let spans = receiver.spans.lock().unwrap().clone();
    for span in &spans {
        assert!(
            !span.name.ends_with("/AppendEntries")
                && !span.name.ends_with("/Heartbeat")
                && !span.name.contains("Health"),
            "{span:?}"
        );
    }
}
