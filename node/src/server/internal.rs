//! `flotilla.internal.v1.Internal`: what nodes say to each other. Every call came over a TLS
//! connection whose client certificate the cluster CA signed (see
//! [`super::transport::RequireNodeCertificate`]); where the caller's id matters, the
//! certificate must name it.

use flotilla_actors::liveness::LivenessTable;
use flotilla_proto::internal::internal_server::Internal;
use flotilla_proto::internal::{
    HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, RaftPayload, TimeoutNowRequest, TimeoutNowResponse,
};
use flotilla_raft::replica::UndecodablePayload;
use flotilla_raft::CampaignRefused;
use flotilla_raft::{Command, NodeAddr, NodeInfo, Replica};
use tonic::{Request, Response, Status, Streaming};

use super::write_status;

pub struct InternalApi {
    pub replica: Replica,
    pub liveness: LivenessTable,
    /// Sent to a joining node in the `Join` answer (see `secrets`).
    pub kek: super::secrets::NodeKek,
    /// Becomes true when the server stops: append streams end then, so that a stopping server
    /// does not wait for a leader to close a stream it never closes by itself.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// The answers of one stream of requests from a peer node.
type PeerAnswers = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftPayload, Status>> + Send>>;

/// One stream of requests from a peer node (appends or forwarded writes).
struct PeerStream {
    replica: Replica,
    requests: Streaming<RaftPayload>,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The caller's certificate, checked again for every request: a node removed from the
    /// cluster after it opened the stream is refused from then on, as its new calls are.
    certificate: Option<super::transport::PeerCertificate>,
    check: flotilla_raft::tls::CertificateCheck,
}

impl PeerStream {
    fn open(api: &InternalApi, request: Request<Streaming<RaftPayload>>) -> PeerStream {
        PeerStream {
            replica: api.replica.clone(),
            certificate: request.extensions().get::<super::transport::PeerCertificate>().cloned(),
            requests: request.into_inner(),
            stopping: api.stopping.clone(),
            check: super::transport::refuse_removed_nodes(&api.replica),
        }
    }

    /// The next request: `None` when the caller closed the stream or the server is stopping; an
    /// error, after which the stream ends, when the stream failed or the caller's certificate
    /// is refused.
    async fn next_request(&mut self) -> Option<Result<RaftPayload, Status>> {
        let request = tokio::select! {
            request = self.requests.message() => request,
            _ = self.stopping.wait_for(|stopping| *stopping) => return None,
        };
        let request = match request {
            Ok(request) => request?,
            Err(status) => return Some(Err(status)),
        };
        if let Some(certificate) = &self.certificate {
            if let Err(refused) = (self.check)(&certificate.0) {
                return Some(Err(Status::unauthenticated(refused)));
            }
        }
        Some(Ok(request))
    }
}

/// A handler's answer to the request `id`; a payload that does not decode is the caller's error.
fn answer(result: Result<Vec<u8>, UndecodablePayload>, id: u64) -> Result<RaftPayload, Status> {
    result
        .map(|data| RaftPayload {
            data,
            id,
            ..Default::default()
        })
        .map_err(|error| Status::invalid_argument(error.to_string()))
}

fn payload(result: Result<Vec<u8>, UndecodablePayload>) -> Result<Response<RaftPayload>, Status> {
    answer(result, 0).map(Response::new)
}

/// The answer to an append stream's next request, and the stream for the one after (none after
/// an error, which ends the stream).
async fn next_append(mut stream: PeerStream) -> Option<(Result<RaftPayload, Status>, Option<PeerStream>)> {
    match stream.next_request().await? {
        Ok(request) => {
            let answer = answer(stream.replica.handle_append(request.data).await, 0);
            let next = answer.is_ok().then_some(stream);
            Some((answer, next))
        }
        Err(status) => Some((Err(status), None)),
    }
}

/// Forwarded writes handled at once on one stream; the stream's next request waits for room.
const FORWARDS_IN_FLIGHT_PER_STREAM: usize = 64;

/// Serves one forward stream: each request in a task of its own (several batches of one follower
/// are in flight at once, and the leader's write queue gathers them), each answer sent back with
/// its request's id as it is ready. Ends when the follower closes the stream, the server stops,
/// or the caller's certificate is refused (a node removed since it opened the stream).
async fn serve_forward_stream(mut stream: PeerStream, answers: tokio::sync::mpsc::Sender<Result<RaftPayload, Status>>) {
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT_PER_STREAM));
    loop {
        let Ok(permit) = room.clone().acquire_owned().await else {
            return;
        };
        let request = tokio::select! {
            request = stream.next_request() => request,
            _ = answers.closed() => return,
        };
        let request = match request {
            Some(Ok(request)) => request,
            Some(Err(status)) => {
                let _ = answers.send(Err(status)).await;
                return;
            }
            None => return,
        };
        let (replica, answers) = (stream.replica.clone(), answers.clone());
        tokio::spawn(async move {
            let _ = answers
                .send(answer(
                    replica.handle_forward(&request.data, request.restores_prompts).await,
                    request.id,
                ))
                .await;
            drop(permit);
        });
    }
}

#[tonic::async_trait]
impl Internal for InternalApi {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        payload(self.replica.handle_append(request.into_inner().data).await)
    }

    type AppendStreamStream = PeerAnswers;

    async fn append_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let stream = PeerStream::open(self, request);
        let answers = futures::stream::unfold(Some(stream), |stream| async move { next_append(stream?).await });
        Ok(Response::new(Box::pin(answers)))
    }

    type ForwardStreamStream = PeerAnswers;

    async fn forward_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let (answers, outgoing) = tokio::sync::mpsc::channel(FORWARDS_IN_FLIGHT_PER_STREAM);
        tokio::spawn(serve_forward_stream(PeerStream::open(self, request), answers));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            outgoing,
        ))))
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        payload(self.replica.handle_vote(&request.into_inner().data).await)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        payload(self.replica.handle_install_snapshot(&request.into_inner().data).await)
    }

    async fn forward_write(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let request = request.into_inner();
        payload(
            self.replica
                .handle_forward(&request.data, request.restores_prompts)
                .await,
        )
    }

    async fn read_index(&self, _request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(RaftPayload {
            data: self.replica.handle_read_index().await,
            ..Default::default()
        }))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // A node joins as itself; a member passing a join on to the leader joins another.
        if request.get_ref().node_id != 0 && !super::transport::peer_is(&request, request.get_ref().node_id) {
            let caller_is_member = self.replica.reader().read(|state| {
                state
                    .nodes
                    .keys()
                    .any(|member| super::transport::peer_is(&request, *member))
            });
            if !caller_is_member {
                return Err(Status::permission_denied(format!(
                    "the caller's certificate does not name node {}, and it is not a member's",
                    request.get_ref().node_id
                )));
            }
        }
        let body = request.into_inner();
        if !self.replica.is_leader() {
            let leader = self
                .replica
                .current_leader()
                .ok_or_else(|| Status::unavailable("no raft leader is known; try joining again shortly"))?;
            let address = self
                .replica
                .member_address(leader)
                .ok_or_else(|| Status::unavailable(format!("leader {leader} has no known address")))?;
            let mut client = self
                .replica
                .peers()
                .client(&address.grpc)
                .map_err(|error| Status::unavailable(error.to_string()))?;
            return client.join(self.replica.peers().request(body)).await;
        }
        let leader_id = self.replica.node_id();
        let state_format_version = self.replica.state_format_version();
        super::state_format::check_joining_node(body.node_id, body.state_format_version, state_format_version)?;
        if body.node_id == 0 {
            // First step of a join without an id: reserve one through Raft so it is never reused.
            let node_id = match self.replica.write(Command::ReserveNodeId).await.map_err(write_status)? {
                flotilla_raft::Response::NodeId(id) => id,
                other => {
                    return Err(Status::internal(format!(
                        "unexpected answer to reserve-node-id: {other:?}"
                    )))
                }
            };
            return Ok(Response::new(JoinResponse {
                node_id,
                leader_id,
                kek: self.kek.hex(),
                state_format_version,
            }));
        }
        super::validate::region(&body.region)?;
        if body.grpc_address.is_empty() || body.mesh_address.is_empty() {
            return Err(Status::invalid_argument(
                "grpc_address and mesh_address are required to join",
            ));
        }
        let holder = self.replica.reader().read(|state| {
            state
                .nodes
                .get(&body.node_id)
                .map(|node| node.info.grpc_address.clone())
        });
        if let Some(holder) = holder.filter(|holder| *holder != body.grpc_address) {
            return Err(Status::already_exists(format!(
                "node id {} is already used by the node at {holder}",
                body.node_id
            )));
        }
        let address = NodeAddr {
            grpc: body.grpc_address.clone(),
            mesh: body.mesh_address.clone(),
        };
        self.replica
            .add_member(body.node_id, address, false, super::MAX_VOTERS)
            .await
            .map_err(|error| Status::failed_precondition(error.to_string()))?;
        self.replica
            .write(Command::RegisterNode {
                node: body.node_id,
                info: NodeInfo {
                    grpc_address: body.grpc_address,
                    mesh_address: body.mesh_address,
                    region: body.region,
                    labels: body.labels.into_iter().collect(),
                    slots: body.slots,
                },
            })
            .await
            .map_err(write_status)?;
        self.liveness.report(body.node_id);
        tracing::info!(node = body.node_id, "node joined");
        Ok(Response::new(JoinResponse {
            node_id: body.node_id,
            leader_id,
            kek: self.kek.hex(),
            state_format_version,
        }))
    }

    async fn timeout_now(&self, request: Request<TimeoutNowRequest>) -> Result<Response<TimeoutNowResponse>, Status> {
        let request = request.into_inner();
        match self.replica.campaign_on_request(request.leader_id, request.term).await {
            Ok(()) => Ok(Response::new(TimeoutNowResponse {})),
            Err(error @ CampaignRefused::Fatal(_)) => Err(Status::unavailable(error.to_string())),
            Err(error) => Err(Status::failed_precondition(error.to_string())),
        }
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let node = request.get_ref().node_id;
        if !super::transport::peer_is(&request, node) {
            return Err(Status::permission_denied(format!(
                "a liveness report for node {node} must come from node {node}'s certificate"
            )));
        }
        self.liveness.report(node);
        Ok(Response::new(HeartbeatResponse {
            leader_id: self.replica.current_leader().unwrap_or(0),
        }))
    }
}
