//! Checks of the harness itself, so that a broken helper fails here with a plain message
//! rather than as a puzzling cluster test failure.

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use flotilla_tests::{free_port, wait_for};

#[test]
fn free_port_returns_a_bindable_grpc_and_mesh_pair() {
    for _ in 0..20 {
        let port = free_port();
        let grpc = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let mesh = TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1));
        assert!(grpc.is_ok(), "gRPC port {port} could not be bound: {grpc:?}");
        assert!(mesh.is_ok(), "mesh port {} could not be bound: {mesh:?}", port + 1);
    }
}

#[test]
fn free_port_never_hands_out_overlapping_pairs() {
    let mut taken = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let port = free_port();
        assert!(taken.insert(port), "port {port} was handed out twice");
        assert!(taken.insert(port + 1), "port {} was handed out twice", port + 1);
    }
}

#[tokio::test]
async fn wait_for_returns_the_first_value_that_is_some() {
    let mut polls = 0;
    let value = wait_for("the third poll", Duration::from_secs(10), || {
        polls += 1;
        let current = polls;
        async move { (current == 3).then_some(current * 10) }
    })
    .await;
    assert_eq!(value, 30);
}

#[tokio::test]
#[should_panic(expected = "timed out after 200ms waiting for a condition that never holds")]
async fn wait_for_panics_at_the_deadline() {
    wait_for::<(), _, _>("a condition that never holds", Duration::from_millis(200), || async {
        None
    })
    .await;
}

#[tokio::test]
#[should_panic(expected = "timed out after 200ms waiting for a poll that never returns")]
async fn wait_for_cuts_off_a_poll_that_hangs() {
    wait_for::<(), _, _>(
        "a poll that never returns",
        Duration::from_millis(200),
        std::future::pending,
    )
    .await;
}
