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
use openraft::LogId;
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
    /// Streams of forwarded writes, by leader address.
    forwards: Arc<crate::forward_stream::ForwardStreams>,
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
            forwards: Arc::default(),
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

    pub(crate) fn forwards(&self) -> &crate::forward_stream::ForwardStreams {
        &self.forwards
    }

    /// Wraps a payload for an internal call. It carries no credential: the TLS connection
    /// authenticates the caller.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        tonic::Request::new(message)
    }
}

pub struct NetworkFactory {
    peers: Peers,
    durability: Arc<crate::store::Durability>,
}

impl NetworkFactory {
    /// `durability` caps the commit index sent to followers at what this node's log has synced.
    pub fn new(peers: Peers, durability: Arc<crate::store::Durability>) -> NetworkFactory {
        NetworkFactory { peers, durability }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> Self::Network {
        PeerConnection {
            target,
            address: node.grpc.clone(),
            peers: self.peers.clone(),
            appends: None,
            unary_appends: false,
            exchanging: false,
            durability: self.durability.clone(),
        }
    }
}

/// Raft's calls to one peer, made by one replication task (or election) at a time.
pub struct PeerConnection {
    target: NodeId,
    address: String,
    peers: Peers,
    /// The open append stream to the peer, if any. AppendEntries go over it as one message
    /// each way: a unary call per request writes its headers, its body and its end (and the
    /// answer its headers, body and trailers) separately, and wakes the other side for each.
    /// Any failure or timeout drops it; the next append opens a new one.
    appends: Option<AppendStream>,
    /// The peer refused the stream as a method it does not know (an older version): appends
    /// are unary calls to it from then on.
    unary_appends: bool,
    /// An exchange on the append stream is under way: set when a request goes out, cleared
    /// when its answer (or failure) is in. Found set at the next append, it means the caller
    /// dropped the last one half-way.
    exchanging: bool,
    durability: Arc<crate::store::Durability>,
}

/// One open `AppendStream` call: a request goes in through `requests`, its answer is the next
/// message of `answers`. One request is outstanding at a time.
struct AppendStream {
    requests: tokio::sync::mpsc::Sender<RaftPayload>,
    answers: tonic::Streaming<RaftPayload>,
}

/// Why an append over the stream failed.
#[derive(thiserror::Error, Debug)]
enum AppendStreamError {
    #[error(transparent)]
    Connect(#[from] PeerError),
    #[error("append stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the peer closed the append stream")]
    Closed,
    #[error("no answer on the append stream within {0:?}")]
    TimedOut(Duration),
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
        let mut grpc_request = self.peers.request(RaftPayload {
            data: encode(request),
            id: 0,
        });
        grpc_request.set_timeout(timeout);
        let reply = match method {
            Method::Append => client.append_entries(grpc_request).await,
            Method::Vote => client.vote(grpc_request).await,
            Method::Snapshot => client.install_snapshot(grpc_request).await,
        };
        let reply = reply.map_err(|status| status_error(&status))?;
        self.answer(&reply.into_inner().data)
    }

    /// Decodes a peer's answer.
    // The error is openraft's own, which `RaftNetwork`'s methods return as it is.
    #[allow(clippy::result_large_err)]
    fn answer<Resp, E>(&self, data: &[u8]) -> Result<Resp, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>
    where
        Resp: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    {
        let decoded: RemoteResult<Resp, E> =
            decode(data).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        decoded.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }

    /// Sends an AppendEntries request over the append stream (unary calls to a peer without
    /// one), and waits for its answer until `deadline`.
    async fn send_append(
        &mut self,
        request: &AppendEntriesRequest<TypeConfig>,
        deadline: tokio::time::Instant,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        if self.unary_appends {
            return self.call(request, timeout, Method::Append).await;
        }
        let payload = RaftPayload {
            data: encode(request),
            id: 0,
        };
        match self.append_streamed(payload, timeout).await {
            Ok(data) => self.answer(&data),
            Err(AppendStreamError::Status(status)) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    peer = self.target,
                    "the peer has no append stream; appending with unary calls"
                );
                self.unary_appends = true;
                let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.call(request, timeout, Method::Append).await
            }
            Err(AppendStreamError::Status(status)) => Err(status_error(&status)),
            Err(error) => Err(RPCError::Unreachable(Unreachable::new(&error))),
        }
    }

    /// Waits until `commit` is synced on this node, or until `until`. Its sync is under way
    /// (begun when the entry was written), so this is one fsync at most; a stalled disk costs
    /// the follower its commit until the next heartbeat, not the append.
    async fn wait_synced(&self, commit: Option<LogId<NodeId>>, until: tokio::time::Instant) {
        let Some(commit) = commit else { return };
        let _ = tokio::time::timeout_at(until, self.durability.wait_synced(commit.index)).await;
    }

    /// Sends `payload` over the append stream (opening one if none is open) and waits for its
    /// answer until `timeout`.
    async fn append_streamed(&mut self, payload: RaftPayload, timeout: Duration) -> Result<Vec<u8>, AppendStreamError> {
        if self.exchanging {
            // The last exchange was given up half-way (openraft drops an append that runs past
            // its timeout): its answer may still be on the way, so the stream is not reused.
            self.appends = None;
        }
        self.exchanging = true;
        let exchange = async {
            if let Some(stream) = self.appends.as_mut() {
                stream
                    .requests
                    .send(payload)
                    .await
                    .map_err(|_| AppendStreamError::Closed)?;
            } else {
                self.appends = Some(self.open_append_stream(payload).await?);
            }
            let stream = self.appends.as_mut().expect("sent on an open stream");
            match stream.answers.message().await? {
                Some(answer) => Ok(answer.data),
                None => Err(AppendStreamError::Closed),
            }
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(AppendStreamError::TimedOut(timeout)),
        };
        self.exchanging = false;
        if result.is_err() {
            // An answer may still come for the request that failed: a stream is never reused
            // after a failure, so no later request can take that answer for its own.
            self.appends = None;
        }
        result
    }

    /// Opens an append stream with `first` as its first request. The request goes out with the
    /// call's headers: waiting for the answer's headers first would make the first append on
    /// a stream two round trips, which a link slower than half the heartbeat never completes
    /// within an append's timeout (a timeout drops the stream, and the next append opens one).
    async fn open_append_stream(&self, first: RaftPayload) -> Result<AppendStream, AppendStreamError> {
        let mut client = self.peers.client(&self.address)?;
        // One request at a time: the channel holds the one being sent.
        let (requests, outgoing) = tokio::sync::mpsc::channel(1);
        requests
            .try_send(first)
            .expect("a new channel has room for its first request");
        let answers = client
            .append_stream(
                self.peers
                    .request(tokio_stream::wrappers::ReceiverStream::new(outgoing)),
            )
            .await?
            .into_inner();
        Ok(AppendStream { requests, answers })
    }
}

/// A failed call's status as openraft takes it: a peer that could not be reached (or answer in
/// time) is retried as unreachable, anything else is a network error.
fn status_error<E: std::error::Error>(status: &tonic::Status) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(status))
        }
        _ => RPCError::Network(NetworkError::new(status)),
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
        mut request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        // openraft gives up on an append at `hard_ttl` by dropping it; everything here ends
        // within `soft_ttl`, so that an exchange is never cut off half-way by that drop.
        let deadline = tokio::time::Instant::now() + option.soft_ttl();
        let quarter = option.hard_ttl() / 4;
        // No follower learns of a commit this node has not synced itself (see `Durability`).
        let wanted = request.leader_commit;
        request.leader_commit = self.durability.cap_commit(wanted);
        if request.leader_commit == wanted {
            return self.send_append(&request, deadline).await;
        }
        if request.entries.is_empty() {
            // A notice of a new commit (openraft sends one when its commit index moves) for
            // entries whose sync began as they were written: the notice waits for that sync, or
            // the follower would learn of the commit only with the next heartbeat.
            self.wait_synced(wanted, tokio::time::Instant::now() + quarter).await;
            request.leader_commit = self.durability.cap_commit(wanted);
            return self.send_append(&request, deadline).await;
        }
        // Entries go out at once with the commit capped. openraft tells this follower of that
        // commit again only if a later one comes, so once the entries are in and the sync is
        // done a notice follows on the same stream (an empty append after the last entry sent).
        let last = request.entries.last().map(|entry| entry.log_id);
        let answer = self.send_append(&request, deadline).await?;
        if matches!(answer, AppendEntriesResponse::Success) {
            self.wait_synced(wanted, (tokio::time::Instant::now() + quarter).min(deadline))
                .await;
            let notice = AppendEntriesRequest {
                vote: request.vote,
                prev_log_id: last,
                entries: Vec::new(),
                leader_commit: self.durability.cap_commit(wanted),
            };
            if notice.leader_commit > request.leader_commit && tokio::time::Instant::now() < deadline {
                // Its answer says nothing openraft needs: a failure only drops the stream,
                // which the next append opens again.
                if let Err(error) = self.send_append(&notice, deadline).await {
                    tracing::debug!(peer = self.target, %error, "a commit notice was not delivered");
                }
            }
        }
        Ok(answer)
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
