//! Swapping a plugin's version while a call is in flight: the call finishes on the version it
//! started with.

use flotilla_plugins::{CallError, Plugin, PullRequestInput};

use crate::support::{guest, host, LoopbackForge, WAIT_DEADLINE};

#[tokio::test]
async fn a_call_in_flight_finishes_on_its_version() {
    // The forge holds requests until told to answer, so version 1's call is still running when
    // version 2 replaces it.
    let forge = LoopbackForge::start(false).await;
    let host = std::sync::Arc::new(host(true));
    let mut current: Plugin = host
        .load("forge", "1.0.0", &guest("well-behaved"), vec![forge.grant()])
        .unwrap();

    let in_flight = tokio::spawn({
        let host = host.clone();
        let version_1 = current.clone();
        let input = PullRequestInput {
            repository_url: forge.repository_url(),
            head_branch: "agent/v1".to_string(),
            base_branch: "main".to_string(),
            title: "From version 1".to_string(),
            body: String::new(),
            draft: false,
        };
        async move { host.create_pull_request(&version_1, input).await }
    });
    forge.wait_for_requests(1).await;

    // Version 2 (the nosy provider: different code, same name) replaces version 1.
    current = host
        .load("forge", "2.0.0", &guest("nosy"), vec![forge.grant()])
        .unwrap();
    assert_eq!(current.version(), "2.0.0");
    forge.open();

    let pull_request = tokio::time::timeout(WAIT_DEADLINE, in_flight)
        .await
        .expect("the call in flight finishes")
        .unwrap()
        .expect("version 1's call succeeds");
    assert_eq!(pull_request.number, 7);

    // New calls run version 2's code, which tries an ungranted host.
    let input = PullRequestInput {
        repository_url: forge.repository_url(),
        head_branch: "agent/v2".to_string(),
        base_branch: "main".to_string(),
        title: "From version 2".to_string(),
        body: String::new(),
        draft: false,
    };
    let error = host.create_pull_request(&current, input).await.unwrap_err();
    assert!(
        matches!(&error, CallError::HostNotGranted { plugin, .. } if plugin.version == "2.0.0"),
        "{error}"
    );
}
