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
    recent: Arc<crate::store::RecentEntries>,
}

impl NetworkFactory {
    /// `durability` caps the commit index sent to followers at what this node's log has synced;
    /// `recent` holds the encodings of the log's newest entries, which appends copy.
    pub fn new(
        peers: Peers,
        durability: Arc<crate::store::Durability>,
        recent: Arc<crate::store::RecentEntries>,
    ) -> NetworkFactory {
        NetworkFactory {
            peers,
            durability,
            recent,
        }
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
            durability: self.durability.clone(),
            recent: self.recent.clone(),
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
    /// Any failure or timeout drops it, and so does an append dropped half-way; the next
    /// append opens a new one.
    appends: Option<AppendStream>,
    /// The peer refused the stream as a method it does not know (an older version): appends
    /// are unary calls to it from then on.
    unary_appends: bool,
    durability: Arc<crate::store::Durability>,
    recent: Arc<crate::store::RecentEntries>,
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
            ..Default::default()
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
            data: crate::append_encoding::encode_append(request, &self.recent),
            ..Default::default()
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
        // The stream leaves `self` for the exchange and comes back only with its answer. One
        // that fails, times out or is dropped half-way (openraft drops an append that outlives
        // its time to live) goes with it: an answer may still come for that request, and no
        // later request may take it for its own. The next append opens a new stream.
        let open = self.appends.take();
        let exchange = async {
            let mut stream = match open {
                Some(stream) => {
                    stream
                        .requests
                        .send(payload)
                        .await
                        .map_err(|_| AppendStreamError::Closed)?;
                    stream
                }
                None => self.open_append_stream(payload).await?,
            };
            match stream.answers.message().await? {
                Some(answer) => Ok((stream, answer.data)),
                None => Err(AppendStreamError::Closed),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((stream, answer))) => {
                self.appends = Some(stream);
                Ok(answer)
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(AppendStreamError::TimedOut(timeout)),
        }
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

#[cfg(test)]
mod tests {
    //! [`PeerConnection`]'s appends against a peer that speaks the internal service over TLS
    //! and answers appends on the stream as each test scripts it.

    use std::pin::Pin;
    use std::sync::Mutex;

    use flotilla_proto::internal::internal_server::{Internal, InternalServer};
    use flotilla_proto::internal::{
        HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, TimeoutNowRequest, TimeoutNowResponse,
    };
    use futures::StreamExt;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Vote};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::store::Durability;

    /// An append with this commit index is answered late (and `Conflict`); any other at once
    /// (`Success`).
    const SLOW_COMMIT: u64 = 1;
    const SLOW_ANSWER: Duration = Duration::from_millis(300);

    type Answers = Pin<Box<dyn futures::Stream<Item = Result<RaftPayload, Status>> + Send>>;

    #[derive(Default)]
    struct FakePeer {
        received: Arc<Mutex<Vec<AppendEntriesRequest<TypeConfig>>>>,
    }

    fn not_here<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not part of this fake"))
    }

    #[tonic::async_trait]
    impl Internal for FakePeer {
        async fn append_entries(&self, _request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }

        type AppendStreamStream = Answers;

        async fn append_stream(
            &self,
            request: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<Self::AppendStreamStream>, Status> {
            let received = self.received.clone();
            let answers = request.into_inner().then(move |message| {
                let received = received.clone();
                async move {
                    let append: AppendEntriesRequest<TypeConfig> =
                        decode(&message?.data).map_err(|error| Status::invalid_argument(error.to_string()))?;
                    let slow = append.leader_commit.map(|log_id| log_id.index) == Some(SLOW_COMMIT);
                    received.lock().unwrap().push(append);
                    let answer = if slow {
                        tokio::time::sleep(SLOW_ANSWER).await;
                        AppendEntriesResponse::<NodeId>::Conflict
                    } else {
                        AppendEntriesResponse::Success
                    };
                    Ok(RaftPayload {
                        data: encode(&Ok::<_, RaftError<NodeId>>(answer)),
                        ..Default::default()
                    })
                }
            });
            Ok(Response::new(Box::pin(answers)))
        }

        async fn vote(&self, _request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }

        async fn install_snapshot(&self, _request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }

        async fn forward_write(&self, _request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }

        type ForwardStreamStream = Answers;

        async fn forward_stream(
            &self,
            _request: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<Self::ForwardStreamStream>, Status> {
            not_here()
        }

        async fn join(&self, _request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
            not_here()
        }

        async fn heartbeat(&self, _request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
            not_here()
        }

        async fn read_index(&self, _request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }

        async fn timeout_now(
            &self,
            _request: Request<TimeoutNowRequest>,
        ) -> Result<Response<TimeoutNowResponse>, Status> {
            not_here()
        }
    }

    /// A CA, a node certificate it signed (for the client) and a server certificate for the
    /// fake peer under the name nodes ask for.
    fn certificates() -> (NodeTls, tonic::transport::Identity) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let signed = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let certificate = CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (certificate.pem(), key.serialize_pem())
        };
        let (client_pem, client_key) = signed(&crate::tls::node_dns_name(1));
        let (server_pem, server_key) = signed(crate::tls::NODE_SERVER_NAME);
        let tls = NodeTls {
            node_id: 1,
            ca_pem: ca.pem(),
            certificate_pem: client_pem,
            private_key_pem: client_key,
        };
        (tls, tonic::transport::Identity::from_pem(server_pem, server_key))
    }

    /// Starts the fake peer on a loopback port and returns a connection to it, as a leader's
    /// replication to it would hold, and what the peer received.
    async fn connect_to_fake_peer(
        durability: Arc<Durability>,
    ) -> (PeerConnection, Arc<Mutex<Vec<AppendEntriesRequest<TypeConfig>>>>) {
        let (tls, identity) = certificates();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let peer = FakePeer::default();
        let received = peer.received.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap()
                .add_service(InternalServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let recent = Arc::new(crate::store::RecentEntries::new(1 << 20));
        let mut factory = NetworkFactory::new(Peers::new(Some(&tls)), durability, recent);
        let connection = factory
            .new_client(
                2,
                &NodeAddr {
                    grpc: address.to_string(),
                    mesh: String::new(),
                },
            )
            .await;
        (connection, received)
    }

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn append(prev: u64, entries: &[u64], commit: u64) -> AppendEntriesRequest<TypeConfig> {
        let mut vote = Vote::new(1, 1);
        vote.commit();
        AppendEntriesRequest {
            vote,
            prev_log_id: Some(log_id(prev)),
            entries: entries
                .iter()
                .map(|index| Entry {
                    log_id: log_id(*index),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(log_id(commit)),
        }
    }

    fn option(ttl_ms: u64) -> RPCOption {
        RPCOption::new(Duration::from_millis(ttl_ms))
    }

    fn sent(received: &Mutex<Vec<AppendEntriesRequest<TypeConfig>>>) -> Vec<(Option<u64>, usize, Option<u64>)> {
        received
            .lock()
            .unwrap()
            .iter()
            .map(|append| {
                (
                    append.prev_log_id.map(|log_id| log_id.index),
                    append.entries.len(),
                    append.leader_commit.map(|log_id| log_id.index),
                )
            })
            .collect()
    }

    /// openraft drops an append that outlives its time to live: the answer to that append,
    /// which the peer still sends, must not be taken for the next append's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_given_up_half_way_never_lends_its_answer_to_the_next() {
        let durability = Arc::new(Durability::new(Some(log_id(100))));
        let (mut connection, received) = connect_to_fake_peer(durability).await;
        // The stream opens with an answered append.
        let first = connection.append_entries(append(3, &[4], 2), option(5_000)).await;
        assert!(matches!(first, Ok(AppendEntriesResponse::Success)), "{first:?}");
        // This one is answered late, after its caller gave up (as openraft's timeout does).
        let given_up = tokio::time::timeout(
            Duration::from_millis(50),
            connection.append_entries(append(4, &[5], SLOW_COMMIT), option(5_000)),
        )
        .await;
        assert!(given_up.is_err(), "the slow append was answered within 50 ms");
        // The late `Conflict` arrives while this one waits; it must get its own `Success`.
        let next = connection.append_entries(append(4, &[5], 2), option(5_000)).await;
        assert!(
            matches!(next, Ok(AppendEntriesResponse::Success)),
            "the next append took another's answer: {next:?}"
        );
        assert_eq!(sent(&received).len(), 3);
    }

    /// Entries go out with the commit capped at what this node has synced; once its sync is
    /// done, the commit follows on an empty append after them. An empty append waits for the
    /// sync (a quarter of its time to live at most) and then carries the whole commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_capped_for_the_leaders_sync_follows_once_synced() {
        let durability = Arc::new(Durability::new(Some(log_id(5))));
        // A leader's log: its own entries are reported before their sync.
        durability.set_node(1);
        let (mut connection, received) = connect_to_fake_peer(durability.clone()).await;
        durability.written(log_id(6));
        let unsynced = durability.written_mark();
        let syncer = {
            let (durability, received) = (durability.clone(), received.clone());
            tokio::spawn(async move {
                // The peer has the entries before this node's sync ends, as a fast follower would.
                while received.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                durability.synced(unsynced);
            })
        };
        let answer = connection.append_entries(append(5, &[6], 6), option(4_000)).await;
        assert!(matches!(answer, Ok(AppendEntriesResponse::Success)), "{answer:?}");
        syncer.await.unwrap();
        assert_eq!(
            sent(&received),
            [(Some(5), 1, Some(5)), (Some(6), 0, Some(6))],
            "the entries with the commit capped at 5, then the commit alone after them"
        );

        // An empty append for a commit whose sync is under way waits for it...
        durability.written(log_id(7));
        let unsynced = durability.written_mark();
        let syncer = {
            let durability = durability.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                durability.synced(unsynced);
            })
        };
        let answer = connection.append_entries(append(7, &[], 7), option(4_000)).await;
        assert!(matches!(answer, Ok(AppendEntriesResponse::Success)), "{answer:?}");
        syncer.await.unwrap();
        assert_eq!(sent(&received)[2], (Some(7), 0, Some(7)));

        // ...but not past a quarter of its time to live: a stalled sync costs the follower the
        // commit until a later append, not the append itself.
        durability.written(log_id(8));
        let answer = connection.append_entries(append(8, &[], 8), option(2_000)).await;
        assert!(matches!(answer, Ok(AppendEntriesResponse::Success)), "{answer:?}");
        assert_eq!(sent(&received)[3], (Some(8), 0, Some(7)));
    }
}
