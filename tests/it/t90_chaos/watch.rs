//! Watchers: live `WatchAgent` streams kept open on some agents through random nodes for the
//! whole run. A stream that breaks (its node killed, frozen or cut off) is resumed through another
//! node after the last durable event it delivered. Every durable event must be the one after the
//! last: a gap or a repeat is a violation, and so is NOT_FOUND for the acknowledged agent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::{self, watch_agent_response};
use flotilla_tests::agent_client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_stream::StreamExt;
use tonic::Code;

/// A stream that delivers nothing for this long is resumed elsewhere (a frozen or cut-off node
/// keeps it open without answering; an idle agent sends nothing either, so this is no violation).
const QUIET_STREAM: Duration = Duration::from_secs(5);
/// Between a stream's end and its resume.
const RESUME_PAUSE: Duration = Duration::from_millis(500);
/// Once the run is over, how long a watcher may take to deliver the rest of the history.
const CATCH_UP: Duration = Duration::from_secs(60);

/// What one watcher saw.
#[derive(Debug, Default)]
pub struct WatchLog {
    /// The last durable sequence delivered, in order and without gaps up to it.
    pub last: u64,
    /// Streams opened (the first and every resume).
    pub opened: usize,
    pub violations: Vec<String>,
}

pub struct Watcher {
    pub endpoints: Vec<String>,
    pub token: String,
    pub id: String,
    pub seed: u64,
}

impl Watcher {
    /// Watches until `finish` is set and then until the stream has delivered `target` (the length
    /// of the agent's history, known once the run has settled) or `CATCH_UP` has passed.
    pub async fn run(self, finish: Arc<AtomicBool>, target: Arc<std::sync::Mutex<Option<u64>>>) -> WatchLog {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut log = WatchLog::default();
        let mut finishing_since = None;
        loop {
            if finish.load(Ordering::SeqCst) {
                let started = *finishing_since.get_or_insert_with(std::time::Instant::now);
                let wanted = *target.lock().unwrap_or_else(|poison| poison.into_inner());
                match wanted {
                    Some(wanted) if log.last >= wanted => return log,
                    None => return log,
                    _ if started.elapsed() > CATCH_UP => {
                        log.violations.push(format!(
                            "watch of {}: delivered {} of {} durable events {CATCH_UP:?} after the run",
                            self.id,
                            log.last,
                            wanted.unwrap_or(0)
                        ));
                        return log;
                    }
                    _ => {}
                }
            }
            let via = rng.gen_range(0..self.endpoints.len());
            self.follow(via, &mut log).await;
        }
    }

    /// One stream through node `via + 1`, until it breaks or goes quiet.
    async fn follow(&self, via: usize, log: &mut WatchLog) {
        let node = via + 1;
        let mut client = agent_client(&self.endpoints[via], &self.token).await;
        let request = v1::WatchAgentRequest {
            id: self.id.clone(),
            after_sequence: log.last,
        };
        let opened = tokio::time::timeout(QUIET_STREAM, client.watch_agent(request)).await;
        let mut stream = match opened {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) => {
                if status.code() == Code::NotFound {
                    log.violations.push(format!(
                        "WatchAgent through node {node} answered NOT_FOUND for acknowledged agent {}: {}",
                        self.id,
                        status.message()
                    ));
                }
                // A refusal (no leader, node stopping, ...) is retried elsewhere.
                tokio::time::sleep(RESUME_PAUSE).await;
                return;
            }
            Err(_) => return,
        };
        log.opened += 1;
        while let Ok(Some(Ok(message))) = tokio::time::timeout(QUIET_STREAM, stream.next()).await {
            let Some(watch_agent_response::Kind::Event(event)) = message.kind else {
                continue;
            };
            if event.live {
                continue;
            }
            if event.sequence != log.last + 1 {
                log.violations.push(format!(
                    "watch of {} through node {node}: durable event {} came after {} (a {})",
                    self.id,
                    event.sequence,
                    log.last,
                    if event.sequence > log.last { "gap" } else { "repeat" }
                ));
            }
            log.last = log.last.max(event.sequence);
        }
        // The stream ended or went quiet (the agent has ended, or its node is gone): resume after
        // a pause, so that an ended agent is not asked in a tight loop.
        tokio::time::sleep(RESUME_PAUSE).await;
    }
}
