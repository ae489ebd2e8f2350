//! The well-behaved provider, end to end: every export, secrets filled in by the host, and a
//! pull request through `http.send` to a loopback forge. Each test runs with and without the
//! pooling allocator.

use flotilla_plugins::{CallError, HttpFailure, PluginFailure, PullRequestInput, WebhookInput};

use crate::support::{guest, host, LoopbackForge, FORGE_TOKEN, POOLING_SETTINGS};

fn pull_request_input(forge: &LoopbackForge) -> PullRequestInput {
    PullRequestInput {
        repository_url: forge.repository_url(),
        head_branch: "agent/fix-typo".to_string(),
        base_branch: "main".to_string(),
        title: "Fix a typo".to_string(),
        body: "Found by an agent.".to_string(),
        draft: false,
    }
}

#[tokio::test]
async fn info_match_url_and_webhooks_answer() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        let plugin = host.load("forge", "1.0.0", &guest("well-behaved"), Vec::new()).unwrap();
        let info = host.info(&plugin).await.unwrap();
        assert_eq!(info.name, "loopback-forge");
        assert!(info.supports_pull_requests);

        let repo = host
            .match_url(&plugin, "https://forge.example/octo/widgets.git")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (repo.host.as_str(), repo.owner.as_str(), repo.name.as_str()),
            ("forge.example", "octo", "widgets")
        );
        assert_eq!(repo.web_url, "https://forge.example/octo/widgets");
        assert_eq!(host.match_url(&plugin, "ssh://forge.example/x").await.unwrap(), None);

        let push = WebhookInput {
            headers: vec![("X-Forge-Event".to_string(), "push".to_string())],
            body: b"repository=https://forge.example/octo/widgets\nbranch=main\n".to_vec(),
        };
        let event = host.parse_webhook(&plugin, push).await.unwrap().unwrap();
        assert_eq!((event.kind.as_str(), event.branch.as_deref()), ("push", Some("main")));
        let ping = WebhookInput {
            headers: vec![("x-forge-event".to_string(), "ping".to_string())],
            body: Vec::new(),
        };
        assert_eq!(host.parse_webhook(&plugin, ping).await.unwrap(), None);
        let unsigned = WebhookInput {
            headers: Vec::new(),
            body: Vec::new(),
        };
        let error = host.parse_webhook(&plugin, unsigned).await.unwrap_err();
        assert!(
            matches!(
                &error,
                CallError::Plugin {
                    failure: PluginFailure::InvalidInput(_),
                    ..
                }
            ),
            "pooling {pooling}: {error}"
        );
    }
}

#[tokio::test]
async fn settings_reach_the_plugin() {
    let host = host(true);
    let plugin = host.load("forge", "1.0.0", &guest("well-behaved"), Vec::new()).unwrap();
    assert_eq!(host.info(&plugin).await.unwrap().display_name, "Loopback Forge");
    let configured = plugin.with_settings([("display-name".to_string(), "Acme Forge".to_string())].into());
    assert_eq!(host.info(&configured).await.unwrap().display_name, "Acme Forge");
    assert_eq!(
        configured.settings().get("display-name").map(String::as_str),
        Some("Acme Forge")
    );
    assert!(
        plugin.settings().is_empty(),
        "the original plugin keeps its own settings"
    );
    assert_eq!(host.compile_count(), 1);
}

#[tokio::test]
async fn clone_spec_gets_its_secret_from_the_host() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        let plugin = host.load("forge", "1.0.0", &guest("well-behaved"), Vec::new()).unwrap();
        let spec = host
            .clone_spec(&plugin, "http://127.0.0.1:9/octo/widgets")
            .await
            .unwrap();
        assert_eq!(spec.url, "http://127.0.0.1:9/octo/widgets.git");
        assert_eq!(
            spec.auth_header,
            Some(("Authorization".to_string(), format!("Bearer {FORGE_TOKEN}")))
        );
        assert!(
            !format!("{spec:?}").contains(FORGE_TOKEN),
            "Debug must not print the secret"
        );

        // Secrets belong to a plugin name: the same code under another name gets none.
        let stranger = host
            .load("stranger", "1.0.0", &guest("well-behaved"), Vec::new())
            .unwrap();
        let error = host
            .clone_spec(&stranger, "http://127.0.0.1:9/octo/widgets")
            .await
            .unwrap_err();
        assert!(
            matches!(&error, CallError::UnknownSecret { secret, .. } if secret == "token"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn a_pull_request_goes_to_the_granted_forge_with_the_secret_filled_in() {
    for pooling in POOLING_SETTINGS {
        let forge = LoopbackForge::start(true).await;
        let host = host(pooling);
        let plugin = host
            .load("forge", "1.0.0", &guest("well-behaved"), vec![forge.grant()])
            .unwrap();
        let pull_request = host
            .create_pull_request(&plugin, pull_request_input(&forge))
            .await
            .unwrap();
        assert_eq!(pull_request.number, 7);
        assert_eq!(
            pull_request.url,
            format!("http://{}/octo/widgets/pull/7", forge.address)
        );
        assert!(!pull_request.url.contains(FORGE_TOKEN));

        let received = forge.received();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].path, "/api/repos/octo/widgets/pulls");
        // The forge got the token; the plugin only ever wrote the placeholder.
        assert_eq!(
            received[0].authorization.as_deref(),
            Some(format!("Bearer {FORGE_TOKEN}").as_str())
        );
        assert!(
            received[0].body.contains("\"head\":\"agent/fix-typo\""),
            "{}",
            received[0].body
        );
    }
}

#[tokio::test]
async fn a_secret_of_another_plugin_is_not_filled_in() {
    let forge = LoopbackForge::start(true).await;
    let host = host(true);
    let stranger = host
        .load("stranger", "1.0.0", &guest("well-behaved"), vec![forge.grant()])
        .unwrap();
    let error = host
        .create_pull_request(&stranger, pull_request_input(&forge))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CallError::Plugin { failure: PluginFailure::Http(HttpFailure::UnknownSecret(name)), .. } if name == "token"),
        "{error}"
    );
    assert!(
        forge.received().is_empty(),
        "nothing may be sent when a placeholder cannot be filled"
    );
}

#[tokio::test]
async fn a_forge_on_another_port_is_not_granted() {
    let forge = LoopbackForge::start(true).await;
    let host = host(false);
    // Granted 127.0.0.1 on the default port only, not the forge's port.
    let plugin = host
        .load("forge", "1.0.0", &guest("well-behaved"), vec!["127.0.0.1".to_string()])
        .unwrap();
    let error = host
        .create_pull_request(&plugin, pull_request_input(&forge))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CallError::HostNotGranted { host, .. } if *host == forge.grant()),
        "{error}"
    );
    assert!(forge.received().is_empty());
    // Re-granting needs no recompilation.
    let regranted = plugin.with_granted_hosts(vec![forge.grant()]);
    assert_eq!(
        host.create_pull_request(&regranted, pull_request_input(&forge))
            .await
            .unwrap()
            .number,
        7
    );
    assert_eq!(host.compile_count(), 1);
}

#[tokio::test]
async fn many_calls_at_once_share_the_instance_slots() {
    for pooling in POOLING_SETTINGS {
        // 8 slots (test_config), 40 calls at once: the rest wait for a slot.
        let host = std::sync::Arc::new(host(pooling));
        let plugin = host.load("forge", "1.0.0", &guest("well-behaved"), Vec::new()).unwrap();
        let calls: Vec<_> = (0..40)
            .map(|_| {
                let host = host.clone();
                let plugin = plugin.clone();
                tokio::spawn(async move { host.info(&plugin).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().name, "loopback-forge");
        }
    }
}

#[tokio::test]
async fn a_granted_name_that_resolves_to_loopback_is_refused_unless_the_address_is_granted() {
    let forge = LoopbackForge::start(true).await;
    let host = host(false);
    let by_name = format!("localhost:{}", forge.address.port());
    let input = PullRequestInput {
        repository_url: format!("http://{by_name}/octo/widgets"),
        ..pull_request_input(&forge)
    };
    let plugin = host
        .load("forge", "1.0.0", &guest("well-behaved"), vec![by_name.clone()])
        .unwrap();
    let error = host.create_pull_request(&plugin, input.clone()).await.unwrap_err();
    let CallError::HostNotGranted { host: refused, .. } = &error else {
        panic!("expected a refusal, got {error}");
    };
    assert!(
        refused.starts_with(&format!("{by_name} (localhost resolves to ")),
        "{refused}"
    );
    assert!(
        refused.contains("a loopback address; list the address or its network to allow it"),
        "{refused}"
    );
    assert!(forge.received().is_empty(), "a refused address is never connected to");

    // Granting the address as well lets the name through, to exactly that address.
    let regranted = plugin.with_granted_hosts(vec![by_name.clone(), forge.grant()]);
    let pull_request = host.create_pull_request(&regranted, input).await.unwrap();
    assert_eq!(pull_request.number, 7);
    assert_eq!(forge.received().len(), 1);
}
