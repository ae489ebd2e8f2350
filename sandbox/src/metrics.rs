//! The sandbox's metrics: their names (one home, Prometheus style) and descriptions. They are
//! recorded through the `metrics` facade, so they cost an atomic load until a process installs
//! a recorder; [`describe`] registers their help text with it.

use ::metrics::{counter, describe_counter, Unit};

/// Connections to a machine's egress proxy, by `outcome`: `allowed` (host on the allowlist),
/// `refused` (403, host not on it) or `rejected` (turned away before a policy decision:
/// malformed, head too large or too slow, over the connection limit).
pub const EGRESS_CONNECTIONS_TOTAL: &str = "flotilla_egress_connections_total";
/// The label of [`EGRESS_CONNECTIONS_TOTAL`].
pub const EGRESS_OUTCOME_LABEL: &str = "outcome";

/// What the egress proxy did with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressOutcome {
    Allowed,
    Refused,
    Rejected,
}

impl EgressOutcome {
    pub fn label_value(self) -> &'static str {
        match self {
            EgressOutcome::Allowed => "allowed",
            EgressOutcome::Refused => "refused",
            EgressOutcome::Rejected => "rejected",
        }
    }
}

pub(crate) fn record_egress_connection(outcome: EgressOutcome) {
    counter!(EGRESS_CONNECTIONS_TOTAL, EGRESS_OUTCOME_LABEL => outcome.label_value()).increment(1);
}

/// Bytes relayed by machines' egress proxies, by `direction`: `upstream` (machine to the
/// outside) or `downstream`.
pub const EGRESS_BYTES_TOTAL: &str = "flotilla_egress_bytes_total";

/// Which way relayed bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressDirection {
    Upstream,
    Downstream,
}

pub(crate) fn record_egress_bytes(direction: EgressDirection, bytes: usize) {
    let direction = match direction {
        EgressDirection::Upstream => "upstream",
        EgressDirection::Downstream => "downstream",
    };
    counter!(EGRESS_BYTES_TOTAL, "direction" => direction).increment(bytes as u64);
}

/// Registers the help text of every sandbox metric with the installed recorder.
pub fn describe() {
    describe_counter!(
        EGRESS_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed by machines' egress proxies, by direction: upstream (machine to the outside) or downstream."
    );
    describe_counter!(
        EGRESS_CONNECTIONS_TOTAL,
        Unit::Count,
        "Connections to machines' egress proxies, by outcome: allowed, refused (host not on the allowlist) or rejected (before a policy decision)."
    );
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use ::metrics::{Key, Label};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::egress::{EgressLimits, EgressPolicy, EgressProxy};

    #[test]
    fn an_egress_request_to_an_unlisted_host_counts_as_refused() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // One thread, so that the proxy's tasks record into this thread's local recorder.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        ::metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let (_proxy, address) = EgressProxy::serve_tcp(
                    SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                    EgressPolicy::from_patterns(["allowed.example"]).expect("a valid pattern"),
                    EgressLimits::default(),
                )
                .await
                .expect("the proxy serves on loopback");
                let mut client = tokio::net::TcpStream::connect(address).await.expect("connect");
                client
                    .write_all(b"CONNECT unlisted.example:443 HTTP/1.1\r\n\r\n")
                    .await
                    .expect("send");
                let mut response = Vec::new();
                client.read_to_end(&mut response).await.expect("read the answer");
                let response = String::from_utf8_lossy(&response);
                assert!(response.starts_with("HTTP/1.1 403"), "{response:?}");
            })
        });
        let refused = CompositeKey::new(
            MetricKind::Counter,
            Key::from_parts(
                EGRESS_CONNECTIONS_TOTAL,
                vec![Label::new(EGRESS_OUTCOME_LABEL, "refused")],
            ),
        );
        let counters = snapshotter.snapshot().into_hashmap();
        assert_eq!(
            counters.get(&refused).map(|(_, _, value)| value),
            Some(&DebugValue::Counter(1))
        );
    }
}
