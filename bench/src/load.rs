//! The load generator of `flotilla-bench create` and `compare`: N clients, each writing one
//! record after the other until the deadline, against etcd (Put of ~1 KB under a distinct key)
//! or Flotilla (CreateAgent, its prompt padded to ~1 KB for `compare`). Both sides share this loop, the client runtime and the
//! way clients are spread over the members, so that the figures differ only by the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::v1::CreateAgentRequest;
use hdrhistogram::Histogram;
use prost::Message;

use crate::client::{AgentClient, ClientError};

/// The size of one write's request body, in bytes, on both sides.
pub const RECORD_BYTES: usize = 1024;
/// Hard cap on writes in one `compare` run, whatever the duration and client count.
pub const MAX_WRITES_PER_RUN: u64 = 2_000_000;
/// A write slower than this counts as an error and its client moves on.
const WRITE_TIMEOUT_MS: u64 = 10_000;
/// Latencies are recorded in microseconds up to one minute, with three significant digits.
const MAX_RECORDED_LATENCY_US: u64 = 60_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

const BENCH_REPOSITORY: &str = "https://example.com/bench/repo.git";
const BENCH_PROMPT: &str = "Benchmark agent: reply that there is nothing to do.";

/// One connection's client, for one system or the other; cheap to clone (a shared channel).
#[derive(Clone)]
pub enum Writer {
    Etcd {
        endpoint: String,
        kv: etcd_client::KvClient,
    },
    Flotilla {
        endpoint: String,
        client: AgentClient,
        /// Pad each create to [`RECORD_BYTES`] (`compare`); otherwise the plain request.
        padded: bool,
    },
}

impl Writer {
    /// One acknowledged write of record `key`, or why it failed.
    async fn write(&mut self, key: String) -> Result<(), String> {
        match self {
            Writer::Etcd { endpoint, kv } => {
                let value = vec![b'x'; RECORD_BYTES.saturating_sub(key.len())];
                kv.put(key, value, None)
                    .await
                    .map(drop)
                    .map_err(|error| format!("{endpoint}: {error}"))
            }
            Writer::Flotilla {
                endpoint,
                client,
                padded,
            } => client
                .create_agent(if *padded {
                    padded_create_request(key)
                } else {
                    create_request(key)
                })
                .await
                .map(drop)
                .map_err(|status| ClientError::from_status(endpoint, status).to_string()),
        }
    }

    fn endpoint(&self) -> &str {
        match self {
            Writer::Etcd { endpoint, .. } | Writer::Flotilla { endpoint, .. } => endpoint,
        }
    }
}

/// One write outside any run, and how long it took to be acknowledged.
pub async fn timed_write(mut writer: Writer, key: String) -> Result<Duration, String> {
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), writer.write(key)).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(message)) => Err(message),
        Err(_elapsed) => Err(format!(
            "no answer from {} within {WRITE_TIMEOUT_MS} ms",
            writer.endpoint()
        )),
    }
}

/// The bench's create, named `name`.
fn create_request(name: String) -> CreateAgentRequest {
    CreateAgentRequest {
        prompt: BENCH_PROMPT.to_string(),
        repository: BENCH_REPOSITORY.to_string(),
        // Named, so that a create does not read the (unreachable) origin's default branch.
        base_branch: "main".to_string(),
        name,
        ..Default::default()
    }
}

/// A create whose encoded body is [`RECORD_BYTES`] long: the prompt is padded with spaces.
pub fn padded_create_request(name: String) -> CreateAgentRequest {
    let mut request = create_request(name);
    let short_by = RECORD_BYTES.saturating_sub(request.encoded_len());
    request.prompt.push_str(&" ".repeat(short_by));
    // The prompt's length prefix may have grown by a byte or two.
    while request.encoded_len() > RECORD_BYTES && request.prompt.len() > BENCH_PROMPT.len() {
        request.prompt.pop();
    }
    request
}

/// What one run measured.
pub struct RunResult {
    pub clients: usize,
    pub writes: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    pub first_error: Option<String>,
}

impl RunResult {
    pub fn rate(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    /// Latency at `quantile` in milliseconds, if anything was acknowledged.
    pub fn latency_ms(&self, quantile: f64) -> Option<f64> {
        (!self.latency_us.is_empty()).then(|| self.latency_us.value_at_quantile(quantile) as f64 / 1000.0)
    }
}

fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_RECORDED_LATENCY_US, LATENCY_SIGNIFICANT_DIGITS)
        .expect("the latency histogram bounds are valid constants")
}

/// Runs `clients` clients for `run_duration`, and at most `max_writes` writes in all; client i
/// writes through `writers[i % len]`, and the writers interleave the members, so consecutive
/// clients talk to different members.
pub async fn run_once(writers: &[Writer], clients: usize, run_duration: Duration, max_writes: u64) -> RunResult {
    let run_tag = format!("{:08x}", rand::random::<u32>());
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + run_duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client_index in 0..clients {
        let writer = writers[client_index % writers.len()].clone();
        let key_prefix = format!("bench-{run_tag}-{client_index}");
        tasks.spawn(drive_client(
            writer,
            key_prefix,
            deadline,
            Arc::clone(&issued),
            max_writes,
        ));
    }
    let mut result = RunResult {
        clients,
        writes: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: new_latency_histogram(),
        first_error: None,
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => {
                result.writes += outcome.writes;
                result.errors += outcome.errors;
                // Same bounds on both sides, so adding cannot fail.
                let _ = result.latency_us.add(&outcome.latency_us);
                if result.first_error.is_none() {
                    result.first_error = outcome.first_error;
                }
            }
            Err(join_error) => {
                result.errors += 1;
                result
                    .first_error
                    .get_or_insert(format!("a bench client task failed: {join_error}"));
            }
        }
    }
    result.elapsed = started.elapsed();
    result
}

struct ClientOutcome {
    writes: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

/// One client: writes one record after the other until the deadline or the run's cap,
/// recording each acknowledged write's latency.
async fn drive_client(
    mut writer: Writer,
    key_prefix: String,
    deadline: tokio::time::Instant,
    issued: Arc<AtomicU64>,
    max_writes: u64,
) -> ClientOutcome {
    let mut outcome = ClientOutcome {
        writes: 0,
        errors: 0,
        latency_us: new_latency_histogram(),
        first_error: None,
    };
    let mut write_index: u64 = 0;
    while tokio::time::Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < max_writes {
        write_index += 1;
        let key = format!("{key_prefix}-{write_index}");
        let write_started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), writer.write(key)).await;
        let latency_us = u64::try_from(write_started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let failure = match answer {
            Ok(Ok(())) => None,
            Ok(Err(message)) => Some(message),
            Err(_elapsed) => Some(format!(
                "no answer from {} within {WRITE_TIMEOUT_MS} ms",
                writer.endpoint()
            )),
        };
        match failure {
            None => {
                outcome.writes += 1;
                outcome.latency_us.saturating_record(latency_us);
            }
            Some(message) => {
                outcome.errors += 1;
                outcome.first_error.get_or_insert(message);
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_padded_create_is_one_record_long() {
        let request = padded_create_request("bench-0123abcd-17-42".to_string());
        assert_eq!(request.encoded_len(), RECORD_BYTES);
        assert!(request.prompt.starts_with(BENCH_PROMPT));
    }
}
