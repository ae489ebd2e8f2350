//! The tool world: describe and invoke, and calls of the wrong world refused.

use flotilla_plugins::{CallError, PluginKind};

use crate::support::{guest, host, POOLING_SETTINGS};

#[tokio::test]
async fn the_echo_tool_describes_itself_and_echoes() {
    for pooling in POOLING_SETTINGS {
        let host = host(pooling);
        let tool = host.load("echo", "0.1.0", &guest("echo-tool"), Vec::new()).unwrap();
        let description = host.describe(&tool).await.unwrap();
        assert_eq!(description.name, "echo");
        let schema: serde_json::Value = serde_json::from_str(&description.parameters_schema).unwrap();
        assert_eq!(schema["type"], "object");

        let arguments = r#"{"text":"hello, tool"}"#;
        assert_eq!(host.invoke(&tool, arguments).await.unwrap(), Ok(arguments.to_string()));
        let failed = host.invoke(&tool, r#"{"fail":true}"#).await.unwrap();
        assert!(failed.unwrap_err().starts_with("asked to fail"));
    }
}

#[tokio::test]
async fn calls_of_the_other_world_are_refused() {
    let host = host(false);
    let tool = host.load("echo", "0.1.0", &guest("echo-tool"), Vec::new()).unwrap();
    let error = host.info(&tool).await.unwrap_err();
    assert!(
        matches!(
            error,
            CallError::WrongKind {
                kind: PluginKind::Tool,
                function: "info",
                ..
            }
        ),
        "{error}"
    );
    let provider = host.load("forge", "1.0.0", &guest("well-behaved"), Vec::new()).unwrap();
    let error = host.invoke(&provider, "{}").await.unwrap_err();
    assert!(
        matches!(
            error,
            CallError::WrongKind {
                kind: PluginKind::VcsProvider,
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn a_plugin_of_another_host_is_refused() {
    let first = host(false);
    let second = host(false);
    let tool = first.load("echo", "0.1.0", &guest("echo-tool"), Vec::new()).unwrap();
    let error = second.describe(&tool).await.unwrap_err();
    assert!(matches!(error, CallError::ForeignPlugin { .. }), "{error}");
}
