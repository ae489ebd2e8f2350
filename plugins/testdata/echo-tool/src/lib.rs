//! An agent tool that answers with the JSON arguments it was given; `{"fail": ...}` makes it
//! answer with an error instead.

wit_bindgen::generate!({ path: "../../wit", world: "tool" });

use flotilla::plugin::log::{log, Level};

struct EchoTool;

impl Guest for EchoTool {
    fn describe() -> ToolDescription {
        ToolDescription {
            name: "echo".to_string(),
            description: "Answers with its arguments.".to_string(),
            parameters_schema: r#"{"type":"object","properties":{"text":{"type":"string"}}}"#.to_string(),
        }
    }

    fn invoke(arguments_json: String) -> Result<String, String> {
        log(
            Level::Debug,
            &format!("echo invoked with {} bytes", arguments_json.len()),
        );
        if arguments_json.contains("\"fail\"") {
            return Err(format!("asked to fail: {arguments_json}"));
        }
        Ok(arguments_json)
    }
}

export!(EchoTool);
