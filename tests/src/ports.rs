//! Loopback ports for test nodes: each node listens for gRPC on P and for its mesh on P+1.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How many candidate ports [`free_port`] tries before giving up.
const FREE_PORT_ATTEMPTS: usize = 1000;

/// Ports already returned by [`free_port`] in this process, so that two nodes of one cluster
/// never get overlapping port pairs (P+1 of one node equal to P of the next).
static PORTS_HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Returns a port P such that both P (a node's gRPC port) and P+1 (its mesh port) can be
/// bound on 127.0.0.1 right now.
///
/// Candidates are drawn below the kernel's ephemeral port range when there is room there:
/// a port the kernel hands out with `bind(0)` can also be handed to any outgoing
/// connection in the meantime, for example while a killed node waits to be restarted on
/// the same port. Where the range leaves no room, `bind(0)` picks the candidate.
pub fn free_port() -> u16 {
    let search_range = port_range_below_ephemeral();
    let mut random_state = port_search_seed();
    for _ in 0..FREE_PORT_ATTEMPTS {
        let candidate = match search_range {
            Some((low, high)) => {
                let span = u64::from(high - low);
                low + (next_random(&mut random_state) % span) as u16
            }
            None => match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) {
                Ok(listener) => match listener.local_addr() {
                    Ok(address) => address.port(),
                    Err(_) => continue,
                },
                Err(_) => continue,
            },
        };
        if candidate == 0 || candidate == u16::MAX {
            continue;
        }
        let mut handed_out = PORTS_HANDED_OUT.lock().unwrap_or_else(|poison| poison.into_inner());
        let overlaps_earlier_pair = handed_out.contains(&(candidate - 1))
            || handed_out.contains(&candidate)
            || handed_out.contains(&(candidate + 1));
        if overlaps_earlier_pair {
            continue;
        }
        let grpc_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, candidate));
        let mesh_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, candidate + 1));
        if grpc_listener.is_ok() && mesh_listener.is_ok() {
            handed_out.insert(candidate);
            handed_out.insert(candidate + 1);
            return candidate;
        }
    }
    panic!("found no free pair of loopback ports after {FREE_PORT_ATTEMPTS} attempts");
}

/// `[low, high)` for port candidates below the ephemeral range, or `None` when the range
/// starts too low to leave a useful gap above the well-known and registered ports we avoid.
fn port_range_below_ephemeral() -> Option<(u16, u16)> {
    const LOWEST_CANDIDATE_PORT: u16 = 10_000;
    const MINIMUM_CANDIDATES: u16 = 2_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // The pair's upper port must stay below the ephemeral range too.
    let high = ephemeral_low.checked_sub(1)?;
    (high >= LOWEST_CANDIDATE_PORT + MINIMUM_CANDIDATES).then_some((LOWEST_CANDIDATE_PORT, high))
}

/// Different in every process and every call sequence, so that parallel test processes
/// start their searches in different places. Port choice is not test logic, so it needs
/// no reproducible seed.
fn port_search_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ (u64::from(std::process::id()) << 32)) | 1
}

/// xorshift64: enough to scatter port candidates.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
