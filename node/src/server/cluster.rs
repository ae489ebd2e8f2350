//! `flotilla.v1.ClusterService`. Membership changes run on the leader; a follower passes the
//! call on to the leader's public endpoint with the caller's own credentials.

use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::cluster_service_server::ClusterService;
use flotilla_proto::v1::{self, RaftRole};
use flotilla_raft::{Command, Replica};
use openraft::ServerState;
use tonic::{Request, Status};

use super::status::{membership_status, read_status};
use super::{convert, write_status};

pub struct ClusterApi {
    pub replica: Replica,
    /// How this node dials another node's public endpoint (TLS, checked against the CA).
    pub node_tls: tonic::transport::ClientTlsConfig,
    /// SHA-256 of the cluster CA certificate, which every join token carries.
    pub ca_fingerprint: String,
}

impl ClusterApi {
    fn describe(&self) -> v1::Cluster {
        let metrics = self.replica.raft().metrics().borrow().clone();
        let me = self.replica.node_id();
        let voters = self.replica.voter_ids();
        let leader = metrics.current_leader;
        let members = self.replica.reader().read(|state| {
            state
                .nodes
                .values()
                .map(|node| {
                    let role = if node.id == me {
                        match metrics.state {
                            ServerState::Leader => RaftRole::Leader,
                            ServerState::Candidate => RaftRole::Candidate,
                            ServerState::Learner => RaftRole::Learner,
                            _ => RaftRole::Follower,
                        }
                    } else if Some(node.id) == leader {
                        RaftRole::Leader
                    } else if voters.contains(&node.id) {
                        RaftRole::Follower
                    } else {
                        RaftRole::Learner
                    };
                    v1::Member {
                        id: node.id,
                        grpc_address: node.info.grpc_address.clone(),
                        mesh_address: node.info.mesh_address.clone(),
                        region: node.info.region.clone(),
                        role: role as i32,
                        up: node.up,
                        draining: node.draining,
                        slots: node.info.slots,
                        slots_in_use: state.slots_in_use(node.id),
                        voter: voters.contains(&node.id),
                        last_seen: Some(convert::timestamp(node.changed_at_ms)),
                        labels: node.info.labels.clone().into_iter().collect(),
                        stopping: node.stopping,
                    }
                })
                .collect()
        });
        v1::Cluster {
            members,
            leader_id: leader.unwrap_or(0),
            term: metrics.current_term,
            node_id: me,
            last_applied_index: metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map(|log_id| log_id.index).unwrap_or(0),
            purged_index: metrics.purged.map(|log_id| log_id.index).unwrap_or(0),
        }
    }

    /// The leader's public client, when this node is not the leader.
    fn leader_client(&self) -> Result<Option<ClusterServiceClient<tonic::transport::Channel>>, Status> {
        if self.replica.is_leader() {
            return Ok(None);
        }
        let leader = self
            .replica
            .current_leader()
            .ok_or_else(|| Status::unavailable("no raft leader is known; try again shortly"))?;
        let address = self
            .replica
            .member_address(leader)
            .ok_or_else(|| Status::unavailable(format!("leader {leader} has no known address")))?;
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", address.grpc))
            .map_err(|error| Status::internal(error.to_string()))?
            .tls_config(self.node_tls.clone())
            .map_err(|error| Status::internal(error.to_string()))?
            .connect_lazy();
        Ok(Some(ClusterServiceClient::new(channel)))
    }

    /// Runs a leader-only step, here or forwarded, again while leadership is moving.
    async fn on_leader<F, Fut>(&self, step: F) -> Result<(), Status>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), Status>>,
    {
        let deadline = tokio::time::Instant::now() + LEADER_DEADLINE;
        loop {
            match step().await {
                Err(status) if retryable(&status) && tokio::time::Instant::now() < deadline => {
                    let mut metrics = self.replica.raft().metrics();
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), metrics.changed()).await;
                }
                other => return other,
            }
        }
    }

    /// Refuses a node the cluster never registered. One this node has not applied yet (it
    /// joined a moment ago) is looked for again after a read barrier, not refused.
    async fn require_node(&self, node: u64) -> Result<(), Status> {
        if node == 0 {
            return Err(Status::invalid_argument("node_id: required"));
        }
        let known_here = || self.replica.reader().read(|state| state.nodes.contains_key(&node));
        let known = known_here() || {
            self.replica.read_barrier().await.map_err(read_status)?;
            known_here()
        };
        if known {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "node {node} is not a member of this cluster"
            )))
        }
    }
}

/// How long a membership call keeps looking for the leader through elections.
const LEADER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn retryable(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable
}

fn pass_on<T: Clone>(request: &Request<T>) -> Request<T> {
    let mut forwarded = Request::new(request.get_ref().clone());
    if let Some(value) = request.metadata().get("authorization") {
        forwarded.metadata_mut().insert("authorization", value.clone());
    }
    forwarded
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn get_cluster(
        &self,
        _request: Request<v1::GetClusterRequest>,
    ) -> Result<tonic::Response<v1::Cluster>, Status> {
        Ok(tonic::Response::new(self.describe()))
    }

    async fn add_node(&self, request: Request<v1::AddNodeRequest>) -> Result<tonic::Response<v1::Cluster>, Status> {
        let node = request.get_ref().node_id;
        super::audit::note_target(&request, format!("node {node}"), None);
        self.require_node(node).await?;
        self.on_leader(|| async {
            if let Some(mut leader) = self.leader_client()? {
                return leader.add_node(pass_on(&request)).await.map(|_| ());
            }
            let address = self.replica.member_address(node).ok_or_else(|| {
                Status::failed_precondition(format!("node {node} is registered but not a raft member"))
            })?;
            self.replica
                .add_member(node, address, request.get_ref().voter, super::MAX_VOTERS)
                .await
                .map(|_| ())
                .map_err(membership_status)
        })
        .await?;
        Ok(tonic::Response::new(self.describe()))
    }

    async fn remove_node(
        &self,
        request: Request<v1::RemoveNodeRequest>,
    ) -> Result<tonic::Response<v1::Cluster>, Status> {
        let node = request.get_ref().node_id;
        super::audit::note_target(&request, format!("node {node}"), None);
        self.require_node(node).await?;
        self.on_leader(|| async {
            if let Some(mut leader) = self.leader_client()? {
                return leader.remove_node(pass_on(&request)).await.map(|_| ());
            }
            let voters = self.replica.voter_ids();
            if voters.len() == 1 && voters.contains(&node) {
                return Err(Status::failed_precondition(format!(
                    "node {node} is the only voter; add another voter first"
                )));
            }
            self.replica.remove_member(node).await.map_err(membership_status)
        })
        .await?;
        self.replica
            .write(Command::RemoveNode { node })
            .await
            .map_err(write_status)?;
        Ok(tonic::Response::new(self.describe()))
    }

    async fn drain_node(&self, request: Request<v1::DrainNodeRequest>) -> Result<tonic::Response<v1::Cluster>, Status> {
        super::audit::note_target(&request, format!("node {}", request.get_ref().node_id), None);
        let body = request.into_inner();
        self.require_node(body.node_id).await?;
        self.replica
            .write(Command::SetDraining {
                node: body.node_id,
                draining: body.drain,
            })
            .await
            .map_err(write_status)?;
        Ok(tonic::Response::new(self.describe()))
    }

    async fn create_join_token(
        &self,
        request: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<tonic::Response<v1::CreateJoinTokenResponse>, Status> {
        let requested = request.into_inner().expires_in_seconds;
        let ttl = match requested {
            0 => super::enroll::DEFAULT_JOIN_TOKEN_TTL,
            seconds => std::time::Duration::from_secs(seconds),
        };
        if ttl > super::enroll::MAX_JOIN_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "expires_in_seconds: at most {} (a week), found {requested}",
                super::enroll::MAX_JOIN_TOKEN_TTL.as_secs()
            )));
        }
        let token = super::enroll::JoinToken::mint(&self.ca_fingerprint);
        let expires_at_ms = flotilla_raft::command::now_ms() + ttl.as_millis() as u64;
        self.replica
            .write(Command::CreateJoinToken {
                sha256_hex: token.digest(),
                expires_at_ms,
            })
            .await
            .map_err(write_status)?;
        Ok(tonic::Response::new(v1::CreateJoinTokenResponse {
            token: token.to_string(),
            expires_at: Some(convert::timestamp(expires_at_ms)),
        }))
    }
}
