//! Raft messages between nodes, over the internal gRPC service. Payloads are postcard-encoded
//! openraft types; every call goes over mutual TLS, the caller presenting its node certificate
//! (see [`crate::tls`]). No credential rides in the request itself, so nothing recorded off the
//! wire can be replayed.

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
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::tls::NodeTls;
use crate::{NodeAddr, NodeId, TypeConfig};

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("serialising to memory cannot fail")
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// Connections to other nodes' internal service, one channel per address, shared.
#[derive(Clone)]
pub struct Peers {
    /// `None` only for a replica that never talks to another node (single-node tests): it has
    /// no certificate, and there is no plaintext fallback.
    tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
}

/// Why a peer could not be dialed.
#[derive(thiserror::Error, Debug)]
pub enum PeerError {
    #[error("this node has no certificate, so it cannot call other nodes")]
    NoCertificate,
    #[error("invalid peer address {address:?}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

impl Peers {
    pub fn new(tls: Option<&NodeTls>) -> Peers {
        Peers {
            tls: tls.map(NodeTls::tonic_client_config),
            channels: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout: Duration::from_millis(500),
        }
    }

    /// A client for the internal service at `address` (host:port or a URL; always dialed over
    /// TLS). Channels connect lazily and reconnect by themselves.
    pub fn client(&self, address: &str) -> Result<InternalClient<Channel>, PeerError> {
        let tls = self.tls.clone().ok_or(PeerError::NoCertificate)?;
        let host_port = address
            .strip_prefix("https://")
            .or_else(|| address.strip_prefix("http://"))
            .unwrap_or(address);
        let url = format!("https://{host_port}");
        let mut channels = self.channels.lock().expect("peer map poisoned");
        let channel = match channels.get(&url) {
            Some(channel) => channel.clone(),
            None => {
                let address_error = |source| PeerError::Address {
                    address: address.to_string(),
                    source,
                };
                let channel = Endpoint::from_shared(url.clone())
                    .map_err(address_error)?
                    .tls_config(tls)
                    .map_err(address_error)?
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

    /// Wraps a payload for an internal call. It carries no credential: the TLS connection
    /// authenticates the caller.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        tonic::Request::new(message)
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
