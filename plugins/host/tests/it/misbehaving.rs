//! Each misbehaving guest fails only its own call, with an error that says why; the same host
//! then serves the well-behaved plugin as before. With and without the pooling allocator.

use std::time::Duration;

use flotilla_plugins::{CallError, HostConfig, PluginHost, PullRequestInput};

use crate::support::{guest, host, host_with, test_config, POOLING_SETTINGS};

/// The host still works: the well-behaved provider answers.
async fn assert_host_goes_on(host: &PluginHost) {
    let plugin = host.load("forge", "1.0.0", &guest("well-behaved"), Vec::new()).unwrap();
    assert_eq!(host.info(&plugin).await.unwrap().name, "loopback-forge");
}

#[tokio::test]
async fn an_endless_loop_runs_out_of_fuel() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        let plugin = host.load("spin", "1.0.0", &guest("spin"), Vec::new()).unwrap();
        let error = host.info(&plugin).await.unwrap_err();
        assert!(
            matches!(
                error,
                CallError::OutOfFuel {
                    fuel_per_call: 200_000_000,
                    ..
                }
            ),
            "pooling {pooling}: {error}"
        );
        assert!(error.to_string().contains("spin@1.0.0"), "{error}");
        assert_host_goes_on(&host).await;
    }
}

#[tokio::test]
async fn an_endless_loop_with_fuel_to_spare_times_out() {
    for pooling in POOLING_SETTINGS {
        let config = HostConfig {
            fuel_per_call: u64::MAX / 2,
            call_timeout: Duration::from_millis(300),
            ..test_config(pooling)
        };
        let host = host_with(config);
        let plugin = host.load("spin", "1.0.0", &guest("spin"), Vec::new()).unwrap();
        let error = host.info(&plugin).await.unwrap_err();
        assert!(
            matches!(error, CallError::Timeout { timeout, .. } if timeout == Duration::from_millis(300)),
            "pooling {pooling}: {error}"
        );
        assert_host_goes_on(&host).await;
    }
}

#[tokio::test]
async fn unbounded_allocation_hits_the_memory_limit() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        let plugin = host.load("hog", "1.0.0", &guest("hog"), Vec::new()).unwrap();
        let error = host.info(&plugin).await.unwrap_err();
        assert!(
            matches!(error, CallError::MemoryLimit { memory_limit_bytes, .. } if memory_limit_bytes == 32 << 20),
            "pooling {pooling}: {error}"
        );
        assert_host_goes_on(&host).await;
    }
}

#[tokio::test]
async fn a_panic_is_a_trap_with_the_panic_message() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        let plugin = host.load("trap", "1.0.0", &guest("trap"), Vec::new()).unwrap();
        let error = host.info(&plugin).await.unwrap_err();
        match &error {
            CallError::Trap { message, .. } => {
                assert!(
                    message.contains("the trap guest panics on purpose"),
                    "pooling {pooling}: {message}"
                )
            }
            other => panic!("pooling {pooling}: expected a trap, got {other}"),
        }
        // The instance is gone with its store; the next call starts afresh and traps again.
        assert!(matches!(host.info(&plugin).await, Err(CallError::Trap { .. })));
        assert_host_goes_on(&host).await;
    }
}

#[tokio::test]
async fn an_ungranted_host_is_refused_and_named() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        // Granted a loopback port, not the host it tries.
        let plugin = host
            .load("forge", "1.0.0", &guest("nosy"), vec!["127.0.0.1:9".to_string()])
            .unwrap();
        let input = PullRequestInput {
            repository_url: "http://127.0.0.1:9/octo/widgets".to_string(),
            head_branch: "b".to_string(),
            base_branch: "main".to_string(),
            title: "t".to_string(),
            body: "secrets please".to_string(),
            draft: true,
        };
        let error = host.create_pull_request(&plugin, input).await.unwrap_err();
        assert!(
            matches!(&error, CallError::HostNotGranted { host, .. } if host == "exfiltrate.example.net"),
            "pooling {pooling}: {error}"
        );
        assert_host_goes_on(&host).await;
    }
}

#[tokio::test]
async fn an_oversized_answer_is_refused() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        let plugin = host.load("chatty", "1.0.0", &guest("chatty"), Vec::new()).unwrap();
        let error = host.info(&plugin).await.unwrap_err();
        assert!(
            matches!(error, CallError::OutputTooLarge { output_bytes, max_output_bytes: 1048576, .. } if output_bytes > 10 << 20),
            "pooling {pooling}: {error}"
        );
        assert_host_goes_on(&host).await;
    }
}

#[tokio::test]
async fn misbehaving_calls_at_once_do_not_disturb_a_good_one() {
    let host = std::sync::Arc::new(host(true));
    let spin = host.load("spin", "1.0.0", &guest("spin"), Vec::new()).unwrap();
    let hog = host.load("hog", "1.0.0", &guest("hog"), Vec::new()).unwrap();
    let good = host.load("forge", "1.0.0", &guest("well-behaved"), Vec::new()).unwrap();
    let spinning = tokio::spawn({
        let host = host.clone();
        async move { host.info(&spin).await }
    });
    let hogging = tokio::spawn({
        let host = host.clone();
        async move { host.info(&hog).await }
    });
    assert_eq!(host.info(&good).await.unwrap().name, "loopback-forge");
    assert!(matches!(spinning.await.unwrap(), Err(CallError::OutOfFuel { .. })));
    assert!(matches!(hogging.await.unwrap(), Err(CallError::MemoryLimit { .. })));
}
