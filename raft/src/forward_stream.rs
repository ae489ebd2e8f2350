//! A follower's forwarded writes to the leader over one long-lived `ForwardStream` call per
//! leader address, instead of a unary `ForwardWrite` call each. A unary call writes its headers,
//! its body and its end as three socket writes, and its answer two; on the stream a forward is
//! one message each way. Several forwards are in flight at once (one per batch slot), so each
//! request carries an id and its answer the same id, in whatever order the leader finishes them.
//!
//! The stream is opened by the first forward that finds none: its request is already queued when
//! the call starts, so it goes out with the call's headers. A task per stream reads the answers
//! and hands each to the forward waiting for its id. When the stream fails or ends, every forward
//! still waiting gets an error (and retries, as after a failed unary call), and the next forward
//! opens a new stream. A leader that answers `UNIMPLEMENTED` (an older version) gets unary calls
//! from then on.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::internal::internal_client::InternalClient;
use flotilla_proto::internal::RaftPayload;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

/// Requests queued for one stream's sender; a forward waits for room beyond this.
const QUEUED_REQUESTS: usize = 64;

type Answer = Result<Vec<u8>, tonic::Status>;

/// One open (or opening) stream to a leader.
struct ForwardStream {
    requests: mpsc::Sender<RaftPayload>,
    /// The forwards waiting for their answer, by id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    /// Cleared when the stream has failed or ended: no forward joins it from then on.
    open: AtomicBool,
}

impl ForwardStream {
    /// Marks the stream closed and answers every forward still waiting: with `failure` when
    /// the stream failed; a stream that ended drops their senders, which tells them it is gone.
    fn close(&self, failure: Option<&tonic::Status>) {
        self.open.store(false, Ordering::SeqCst);
        let waiting: Vec<_> = self
            .waiting
            .lock()
            .expect("forward stream lock poisoned")
            .drain()
            .collect();
        if let Some(status) = failure {
            for (_, waiting) in waiting {
                let _ = waiting.send(Err(tonic::Status::new(status.code(), status.message())));
            }
        }
    }

    /// Hands each answer on the stream to the forward waiting for its id, until the stream ends.
    async fn pass_answers(&self, answers: tonic::Response<tonic::Streaming<RaftPayload>>) -> Result<(), tonic::Status> {
        let mut answers = answers.into_inner();
        while let Some(answer) = answers.message().await? {
            let waiting = self
                .waiting
                .lock()
                .expect("forward stream lock poisoned")
                .remove(&answer.id);
            // A forward that gave up (its deadline passed) has left.
            if let Some(waiting) = waiting {
                let _ = waiting.send(Ok(answer.data));
            }
        }
        Ok(())
    }
}

/// The forward streams of one node, by leader address.
#[derive(Default)]
pub(crate) struct ForwardStreams {
    streams: Mutex<HashMap<String, Arc<ForwardStream>>>,
    /// Addresses that answered the stream with `UNIMPLEMENTED`.
    unary: Mutex<HashSet<String>>,
}

/// What became of a forward over a stream.
pub(crate) enum Forwarded {
    /// The leader's answer (postcard bytes of a `ForwardReply`).
    Answered(Vec<u8>),
    /// The leader has no stream (an older version): forward with a unary call instead.
    Unsupported,
}

impl ForwardStreams {
    /// Forwards `data` to the leader at `address` (dialed through `client` if no stream is
    /// open) and waits for the answer until `timeout`. A failure is a status as a unary call
    /// would have answered.
    pub(crate) async fn forward(
        &self,
        address: &str,
        client: InternalClient<Channel>,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Forwarded, tonic::Status> {
        if self
            .unary
            .lock()
            .expect("forward stream lock poisoned")
            .contains(address)
        {
            return Ok(Forwarded::Unsupported);
        }
        let stream = self.stream_to(address, client);
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        stream
            .waiting
            .lock()
            .expect("forward stream lock poisoned")
            .insert(id, reply);
        let forget = || {
            stream.waiting.lock().expect("forward stream lock poisoned").remove(&id);
        };
        // Checked after joining: a stream that closed meanwhile may have cleared the waiting
        // forwards before this one joined.
        if !stream.open.load(Ordering::SeqCst) {
            forget();
            return Err(tonic::Status::unavailable("the forward stream to the leader closed"));
        }
        let sent = tokio::time::timeout(
            timeout,
            stream.requests.send(RaftPayload {
                data,
                id,
                restores_prompts: true,
            }),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            forget();
            return Err(tonic::Status::unavailable("the forward stream to the leader closed"));
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(Ok(data))) => Ok(Forwarded::Answered(data)),
            Ok(Ok(Err(status))) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(leader = %address, "the leader has no forward stream; forwarding with unary calls");
                self.unary
                    .lock()
                    .expect("forward stream lock poisoned")
                    .insert(address.to_string());
                Ok(Forwarded::Unsupported)
            }
            Ok(Ok(Err(status))) => Err(status),
            Ok(Err(_)) => Err(tonic::Status::unavailable(
                "the forward stream to the leader closed before answering",
            )),
            Err(_) => {
                forget();
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer from the leader within {timeout:?}"
                )))
            }
        }
    }

    /// The open stream to `address`, or a new one (its call started in a task of its own).
    fn stream_to(&self, address: &str, mut client: InternalClient<Channel>) -> Arc<ForwardStream> {
        let mut streams = self.streams.lock().expect("forward stream lock poisoned");
        if let Some(stream) = streams.get(address).filter(|stream| stream.open.load(Ordering::SeqCst)) {
            return stream.clone();
        }
        let (requests, outgoing) = mpsc::channel(QUEUED_REQUESTS);
        let stream = Arc::new(ForwardStream {
            requests,
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            open: AtomicBool::new(true),
        });
        streams.insert(address.to_string(), stream.clone());
        let reader = stream.clone();
        tokio::spawn(async move {
            let outgoing = tokio_stream::wrappers::ReceiverStream::new(outgoing);
            let ended = match client.forward_stream(outgoing).await {
                Ok(answers) => reader.pass_answers(answers).await,
                Err(status) => Err(status),
            };
            reader.close(ended.err().as_ref());
        });
        stream
    }
}
