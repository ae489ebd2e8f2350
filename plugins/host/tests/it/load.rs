//! What `load` accepts and refuses, and that it compiles each component once.

use flotilla_plugins::{PluginError, PluginKind};

use crate::support::{guest, host, host_with, test_config};

fn component_from_wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("test component parses")
}

#[test]
fn a_vcs_provider_and_a_tool_load_with_their_kind() {
    let host = host(false);
    let provider = host
        .load(
            "forge",
            "1.0.0",
            &guest("well-behaved"),
            vec!["127.0.0.1:1".to_string()],
        )
        .unwrap();
    assert_eq!(provider.kind(), PluginKind::VcsProvider);
    assert_eq!((provider.name(), provider.version()), ("forge", "1.0.0"));
    assert_eq!(provider.sha256().len(), 64);
    assert_eq!(provider.granted_hosts(), ["127.0.0.1:1".to_string()]);
    let tool = host.load("echo", "0.1.0", &guest("echo-tool"), Vec::new()).unwrap();
    assert_eq!(tool.kind(), PluginKind::Tool);
}

#[test]
fn the_same_bytes_compile_once() {
    let host = host(false);
    let bytes = guest("well-behaved");
    let first = host.load("forge", "1.0.0", &bytes, Vec::new()).unwrap();
    assert_eq!(host.compile_count(), 1);
    let second = host.load("forge", "1.0.1", &bytes, Vec::new()).unwrap();
    let renamed = host.load("other", "9", &bytes, Vec::new()).unwrap();
    assert_eq!(
        host.compile_count(),
        1,
        "loads of the same bytes must come from the cache"
    );
    assert_eq!(first.sha256(), second.sha256());
    assert_eq!(renamed.version(), "9");
    host.load("echo", "0.1.0", &guest("echo-tool"), Vec::new()).unwrap();
    assert_eq!(host.compile_count(), 2);
}

#[test]
fn bytes_that_are_not_wasm_are_refused() {
    let error = host(false)
        .load("junk", "1", b"this is not a wasm component at all", Vec::new())
        .unwrap_err();
    assert!(matches!(error, PluginError::NotAComponent { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("junk@1") && message.contains("not wasm"), "{message}");
}

#[test]
fn a_core_module_is_refused_as_not_a_component() {
    let module = component_from_wat("(module (func (export \"info\")))");
    let error = host(false).load("core", "1", &module, Vec::new()).unwrap_err();
    assert!(matches!(error, PluginError::NotAComponent { .. }), "{error}");
    assert!(error.to_string().contains("core wasm module"), "{error}");
}

#[test]
fn an_import_the_host_does_not_offer_is_named() {
    let component = component_from_wat(
        r#"(component
             (import "wasi:sockets/tcp-create-socket@0.2.0"
               (instance (export "create-tcp-socket" (func (param "address-family" u8)))))
           )"#,
    );
    let error = host(false).load("sneaky", "1", &component, Vec::new()).unwrap_err();
    match &error {
        PluginError::ImportNotOffered { import, .. } => assert_eq!(import, "wasi:sockets/tcp-create-socket@0.2.0"),
        other => panic!("expected ImportNotOffered, got {other}"),
    }
    assert!(
        error
            .to_string()
            .contains("imports `wasi:sockets/tcp-create-socket@0.2.0`"),
        "{error}"
    );
}

#[test]
fn a_component_of_no_world_is_refused() {
    let error = host(false)
        .load("empty", "1", &component_from_wat("(component)"), Vec::new())
        .unwrap_err();
    assert!(matches!(error, PluginError::NoWorld { .. }), "{error}");
}

/// A component exporting each of `names` as a `func()`.
fn component_exporting(names: &[&str]) -> Vec<u8> {
    let exports: String = names
        .iter()
        .map(|name| format!("(func (export \"{name}\") (canon lift (core func $instance \"f\")))\n"))
        .collect();
    component_from_wat(&format!(
        r#"(component
             (core module $module (func (export "f")))
             (core instance $instance (instantiate $module))
             {exports}
           )"#
    ))
}

#[test]
fn a_missing_export_is_named() {
    let error = host(false)
        .load("half", "1", &component_exporting(&["invoke"]), Vec::new())
        .unwrap_err();
    match &error {
        PluginError::ExportsMismatch { world, problem, .. } => {
            assert_eq!(*world, PluginKind::Tool);
            assert_eq!(problem, "missing export `describe`");
        }
        other => panic!("expected ExportsMismatch, got {other}"),
    }
}

#[test]
fn exports_of_the_wrong_type_are_refused() {
    let error = host(false)
        .load("typo", "1", &component_exporting(&["describe", "invoke"]), Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            error,
            PluginError::ExportsMismatch {
                world: PluginKind::Tool,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_component_over_the_size_limit_is_refused() {
    let config = flotilla_plugins::HostConfig {
        max_component_bytes: 1000,
        ..test_config(false)
    };
    let error = host_with(config)
        .load("big", "1", &guest("echo-tool"), Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            error,
            PluginError::TooLarge {
                max_component_bytes: 1000,
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn compiled_code_on_disk_spares_the_next_host_a_compile() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("compiled");
    let with_cache = || {
        let mut config = test_config(true);
        config.compiled_cache_dir = Some(cache_dir.clone());
        host_with(config)
    };
    let bytes = guest("well-behaved");

    let first = with_cache();
    first.load("forge", "1.0.0", &bytes, Vec::new()).unwrap();
    assert_eq!((first.compile_count(), first.disk_load_count()), (1, 0));
    let files: Vec<_> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one file for one component: {files:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the directory is its owner's alone");

    // A restarted node: no compile, and the plugin answers.
    let second = with_cache();
    let plugin = second.load("forge", "1.0.0", &bytes, Vec::new()).unwrap();
    assert_eq!((second.compile_count(), second.disk_load_count()), (0, 1));
    assert_eq!(second.info(&plugin).await.unwrap().name, "loopback-forge");

    // Damaged code is thrown away and compiled again.
    std::fs::write(&files[0], b"not compiled code").unwrap();
    let third = with_cache();
    let plugin = third.load("forge", "1.0.0", &bytes, Vec::new()).unwrap();
    assert_eq!((third.compile_count(), third.disk_load_count()), (1, 0));
    assert_eq!(third.info(&plugin).await.unwrap().name, "loopback-forge");
    assert_ne!(
        std::fs::read(&files[0]).unwrap(),
        b"not compiled code",
        "the file was written anew"
    );

    // A component that fails its checks is never kept.
    let before = std::fs::read_dir(&cache_dir).unwrap().count();
    let no_world = wat::parse_str("(component)").unwrap();
    assert!(with_cache().load("empty", "1", &no_world, Vec::new()).is_err());
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), before);
}

#[test]
fn the_disk_cache_keeps_a_bounded_number_of_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(false);
    config.compiled_cache_dir = Some(dir.path().to_path_buf());
    config.max_compiled_files = 2;
    let host = host_with(config);
    for name in ["well-behaved", "echo-tool", "spin"] {
        host.load(name, "1", &guest(name), Vec::new()).unwrap();
    }
    assert_eq!(host.compile_count(), 3);
    let kept = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(kept, 2, "only the two most recent of three compiled components stay");
}
