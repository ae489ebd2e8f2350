//! Raft messages between nodes, over the internal gRPC service. Payloads are postcard-encoded
//! openraft types; every call carries the proof that the caller knows the cluster secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::internal::internal_client::InternalClient;
use flotilla_proto::internal::RaftPayload;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint};

use crate::{NodeAddr, NodeId, TypeConfig};

/// Metadata key that carries the cluster proof on internal calls.
pub const CLUSTER_PROOF_HEADER: &str = "x-flotilla-cluster-proof";

/// A value derived from the cluster secret that internal calls present. The secret itself never
/// crosses the wire.
pub fn cluster_proof(secret: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"flotilla-cluster-proof-v1:");
    hasher.update(secret.as_bytes());
    hex::encode(hasher.finalize())
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("serialising to memory cannot fail")
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// Connections to other nodes' internal service, one channel per address, shared.
#[derive(Clone)]
pub struct Peers {
    proof: Arc<String>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
}

impl Peers {
    pub fn new(cluster_secret: &str) -> Peers {
        Peers {
            proof: Arc::new(cluster_proof(cluster_secret)),
            channels: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout: Duration::from_millis(500),
        }
    }

    pub fn proof(&self) -> &str {
        &self.proof
    }

    /// A client for the internal service at `address` (host:port or a URL). Channels connect
    /// lazily and reconnect by themselves.
    pub fn client(&self, address: &str) -> Result<InternalClient<Channel>, tonic::transport::Error> {
        let url = if address.starts_with("http://") || address.starts_with("https://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let mut channels = self.channels.lock().expect("peer map poisoned");
        let channel = match channels.get(&url) {
            Some(channel) => channel.clone(),
            None => {
                let channel = Endpoint::from_shared(url.clone())?
                    .connect_timeout(self.connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .connect_lazy();
                channels.insert(url, channel.clone());
                channel
            }
        };
        Ok(InternalClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }

    /// Wraps a payload with the cluster proof.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert(CLUSTER_PROOF_HEADER, self.proof.parse().expect("hex is valid metadata"));
        request
    }
}

pub struct NetworkFactory {
    peers: Peers,
}

impl NetworkFactory {
    pub fn new(peers: Peers) -> NetworkFactory {
        NetworkFactory { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> Self::Network {
        PeerConnection {
            target,
            address: node.grpc.clone(),
            peers: self.peers.clone(),
        }
    }
}

pub struct PeerConnection {
    target: NodeId,
    address: String,
    peers: Peers,
}

type RemoteResult<T, E> = Result<T, RaftError<NodeId, E>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &self,
        request: &Req,
        timeout: Duration,
        method: Method,
    ) -> Result<Resp, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    {
        let mut client = self
            .peers
            .client(&self.address)
            .map_err(|error| RPCError::Unreachable(Unreachable::new(&error)))?;
        let mut grpc_request = self.peers.request(RaftPayload { data: encode(request) });
        grpc_request.set_timeout(timeout);
        let reply = match method {
            Method::Append => client.append_entries(grpc_request).await,
            Method::Vote => client.vote(grpc_request).await,
            Method::Snapshot => client.install_snapshot(grpc_request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let decoded: RemoteResult<Resp, E> =
            decode(&reply.into_inner().data).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        decoded.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        self.call(&request, option.hard_ttl(), Method::Append).await
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(&request, option.hard_ttl(), Method::Snapshot).await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        self.call(&request, option.hard_ttl(), Method::Vote).await
    }
}
