use super::super::http::StreamAssembly;
use super::super::sse::SseEvent;
use super::super::test_support::{
    config, pieces, provider, provider_from, run_turn, streamed_arguments, streamed_text,
};
use super::super::test_support::{FakeServer, Reply, TEST_API_KEY};
use super::super::{build_provider, ModelConfig, ProviderKind, ToolSpec, MAX_WHOLE_RESPONSE_BYTES};
use super::super::{
    StopReason, ToolCall, Usage, MAX_RESPONSE_TEXT_BYTES, MAX_TOOL_ARGUMENTS_BYTES, MAX_TOOL_CALLS_PER_TURN,
};
use super::*;

fn sse(chunks: &[serde_json::Value]) -> String {
    let mut body: String = chunks.iter().map(|chunk| format!("data: {chunk}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    body
}

fn request() -> TurnRequest {
    TurnRequest {
        messages: vec![
            Message::system("You are a coding agent."),
            Message::user("List the files."),
            Message::assistant(
                "",
                vec![ToolCall {
                    id: "call_a".to_string(),
                    name: "list_dir".to_string(),
                    arguments_json: r#"{"path":"."}"#.to_string(),
                }],
            ),
            Message::tool_result("call_a", "README.md\nsrc/"),
        ],
        tools: vec![ToolSpec {
            name: "list_dir".to_string(),
            description: "List a directory.".to_string(),
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
        }],
        max_output_tokens: 1024,
    }
}

fn text_answer() -> String {
    sse(&[
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
        json!({"choices": [{"index": 0, "delta": {"content": "Hello, "}, "finish_reason": null}]}),
        json!({"choices": [{"index": 0, "delta": {"content": "wörld."}, "finish_reason": null}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}),
    ])
}

#[tokio::test]
async fn streams_a_text_answer() {
    let server = FakeServer::start(|_| Reply::Sse(pieces(&text_answer(), 7))).await;
    let provider = provider(ProviderKind::Openai, &format!("{}/v1", server.address), 5_000);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    let response = outcome.expect("turn succeeds");
    assert_eq!(response.text, "Hello, wörld.");
    assert_eq!(streamed_text(&events), "Hello, wörld.");
    assert!(response.tool_calls.is_empty());
    assert_eq!(response.stop_reason, StopReason::EndTurn);
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 3
        }
    );
    assert_eq!(events.last(), Some(&StreamEvent::Done(response)));
}

#[tokio::test]
async fn reassembles_a_tool_call_split_over_deltas_and_sends_the_right_request() {
    let arguments = r#"{"command": "ls -la", "timeout_ms": 5000}"#;
    let (first, rest) = arguments.split_at(9);
    let (second, third) = rest.split_at(14);
    let body = sse(&[
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me look."}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_xyz", "type": "function",
            "function": {"name": "run_command", "arguments": ""}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": first}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": second}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": third}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ]);
    let server = FakeServer::start(move |_| Reply::Sse(pieces(&body, 5))).await;
    let provider = provider(ProviderKind::Openai, &format!("{}/v1", server.address), 5_000);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    let response = outcome.expect("turn succeeds");
    assert_eq!(response.text, "Let me look.");
    assert_eq!(
        response.tool_calls,
        vec![ToolCall {
            id: "call_xyz".to_string(),
            name: "run_command".to_string(),
            arguments_json: arguments.to_string()
        }]
    );
    assert_eq!(response.stop_reason, StopReason::ToolUse);
    assert!(events.contains(&StreamEvent::ToolCallStarted {
        id: "call_xyz".to_string(),
        name: "run_command".to_string()
    }));
    assert_eq!(streamed_arguments(&events, "call_xyz"), arguments);

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let received = &requests[0];
    assert_eq!(received.path, "/v1/chat/completions");
    assert_eq!(
        received.headers["authorization"],
        format!("Bearer {TEST_API_KEY}").as_str()
    );
    assert_eq!(received.headers["content-type"], "application/json");
    let expected = json!({
        "model": "test-model",
        "max_tokens": 1024,
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "List the files."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "list_dir", "arguments": "{\"path\":\".\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": "README.md\nsrc/"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "list_dir",
            "description": "List a directory.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        }}],
    });
    assert_eq!(received.body, expected);
}

#[tokio::test]
async fn retries_after_429_then_succeeds() {
    let server = FakeServer::start(|number| match number {
        1 => Reply::Status {
            status: 429,
            headers: vec![("retry-after", "0".to_string())],
            body: r#"{"error": {"message": "Rate limit reached", "type": "requests"}}"#.to_string(),
        },
        _ => Reply::Sse(vec![text_answer()]),
    })
    .await;
    let provider = provider(ProviderKind::Openai, &server.address, 5_000);
    let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(outcome.expect("second attempt succeeds").text, "Hello, wörld.");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_400_is_rejected_at_once_with_the_provider_message() {
    let server = FakeServer::start(|_| Reply::Status {
        status: 400,
        headers: Vec::new(),
        body: r#"{"error": {"message": "The model `nope` does not exist", "type": "invalid_request_error"}}"#
            .to_string(),
    })
    .await;
    let provider = provider(ProviderKind::Openai, &server.address, 5_000);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(
        outcome,
        Err(ModelError::Rejected {
            status: 400,
            message: "The model `nope` does not exist".to_string()
        })
    );
    assert!(events.is_empty());
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_server_that_hangs_times_out() {
    let server = FakeServer::start(|_| Reply::Hang).await;
    let provider = provider(ProviderKind::Openai, &server.address, 300);
    let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(outcome, Err(ModelError::Timeout { after_ms: 300 }));
}

#[tokio::test]
async fn a_stream_that_stalls_times_out() {
    let first = "data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Hel\"}}]}\n\n".to_string();
    let server = FakeServer::start(move |_| Reply::SseThenHang(first.clone())).await;
    let provider = provider(ProviderKind::Openai, &server.address, 300);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(outcome, Err(ModelError::Timeout { after_ms: 300 }));
    assert_eq!(events, vec![StreamEvent::TextDelta("Hel".to_string())]);
}

#[tokio::test]
async fn an_idle_stream_times_out_and_server_errors_give_up_after_the_retries() {
    let first = "data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Hel\"}}]}\n\n".to_string();
    let server = FakeServer::start(move |_| Reply::SseThenHang(first.clone())).await;
    let config = ModelConfig {
        provider: ProviderKind::Openai,
        base_url: Some(server.address.clone()),
        model: "test-model".to_string(),
        api_key_env: None,
        api_key_secret: None,
        script: None,
        timeout_ms: 10_000,
        stream_idle_timeout_ms: 200,
        max_retries: 1,
        stream: true,
        tool_choice: None,
    };
    let idle = build_provider(&config, &|_| None).unwrap();
    let (outcome, _events) = run_turn(idle.as_ref(), &request()).await;
    assert_eq!(outcome, Err(ModelError::Timeout { after_ms: 200 }));
    assert!(server.requests()[0].headers.get("authorization").is_none());

    let failing = FakeServer::start(|_| Reply::Status {
        status: 503,
        headers: Vec::new(),
        body: r#"{"error": {"message": "loading model"}}"#.to_string(),
    })
    .await;
    let config = ModelConfig {
        base_url: Some(failing.address.clone()),
        ..config
    };
    let provider = build_provider(&config, &|_| None).unwrap();
    let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(
        outcome,
        Err(ModelError::Unavailable {
            attempts: 2,
            last: "http 503: loading model".to_string()
        })
    );
    assert_eq!(failing.requests().len(), 2);
}

#[tokio::test]
async fn malformed_sse_is_reported() {
    let server = FakeServer::start(|_| Reply::Sse(vec!["data: {not json\n\n".to_string()])).await;
    let provider = provider(ProviderKind::Openai, &server.address, 5_000);
    let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
    assert!(
        matches!(&outcome, Err(ModelError::Malformed(message)) if message.contains("{not json")),
        "{outcome:?}"
    );
    assert_eq!(server.requests().len(), 1);
}

/// A provider asking for whole responses with `tool_choice: "auto"`, as llama-cpp-python needs.
fn whole_response_provider(base_url: &str, timeout_ms: u64) -> std::sync::Arc<dyn ModelProvider> {
    provider_from(&ModelConfig {
        stream: false,
        tool_choice: Some(ToolChoice::Auto),
        ..config(ProviderKind::Openai, base_url, timeout_ms)
    })
}

fn ok_json(body: serde_json::Value) -> Reply {
    Reply::Status {
        status: 200,
        headers: Vec::new(),
        body: body.to_string(),
    }
}

#[tokio::test]
async fn a_whole_text_answer_is_parsed_with_its_usage_and_emitted_as_one_delta() {
    let server = FakeServer::start(|_| {
        ok_json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "test-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hello, wörld."}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        }))
    })
    .await;
    let provider = whole_response_provider(&format!("{}/v1", server.address), 5_000);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    let response = outcome.expect("turn succeeds");
    assert_eq!(response.text, "Hello, wörld.");
    assert!(response.tool_calls.is_empty());
    assert_eq!(response.stop_reason, StopReason::EndTurn);
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 3
        }
    );
    assert_eq!(
        events,
        vec![
            StreamEvent::TextDelta("Hello, wörld.".to_string()),
            StreamEvent::Done(response)
        ]
    );

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let received = &requests[0];
    assert_eq!(received.path, "/v1/chat/completions");
    assert_eq!(received.headers["accept"], "application/json");
    assert_eq!(received.body["stream"], json!(false));
    assert_eq!(received.body.get("stream_options"), None);
    assert_eq!(received.body["tool_choice"], json!("auto"));
    assert_eq!(received.body["messages"][2]["content"], json!(""));
}

#[tokio::test]
async fn a_whole_tool_call_answer_is_parsed_and_emitted_as_started_and_arguments() {
    // As llama-cpp-python 0.3 answers with tool_choice "auto": content null, no usage.
    let arguments = r#"{"path": "hello.txt", "content": "hello"}"#;
    let body = json!({
        "id": "chatcmpl-2", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": null,
            "message": {"role": "assistant", "content": null,
                "tool_calls": [
                    {"id": "call__0_write_file_cmpl-9", "type": "function",
                        "function": {"name": "write_file", "arguments": arguments}},
                    {"type": "function", "function": {"name": "list_dir"}},
                ],
                "function_call": {"name": "write_file", "arguments": arguments}}}],
    });
    let server = FakeServer::start(move |_| ok_json(body.clone())).await;
    let provider = whole_response_provider(&server.address, 5_000);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    let response = outcome.expect("turn succeeds");
    assert_eq!(response.text, "");
    assert_eq!(
        response.tool_calls,
        vec![
            ToolCall {
                id: "call__0_write_file_cmpl-9".to_string(),
                name: "write_file".to_string(),
                arguments_json: arguments.to_string()
            },
            ToolCall {
                id: "call_1".to_string(),
                name: "list_dir".to_string(),
                arguments_json: "{}".to_string()
            },
        ]
    );
    assert_eq!(response.stop_reason, StopReason::ToolUse);
    assert_eq!(response.usage, Usage::default());
    assert_eq!(
        events,
        vec![
            StreamEvent::ToolCallStarted {
                id: "call__0_write_file_cmpl-9".to_string(),
                name: "write_file".to_string()
            },
            StreamEvent::ToolCallArgumentsDelta {
                id: "call__0_write_file_cmpl-9".to_string(),
                delta: arguments.to_string()
            },
            StreamEvent::ToolCallStarted {
                id: "call_1".to_string(),
                name: "list_dir".to_string()
            },
            StreamEvent::ToolCallArgumentsDelta {
                id: "call_1".to_string(),
                delta: "{}".to_string()
            },
            StreamEvent::Done(response),
        ]
    );
    let received = &server.requests()[0];
    assert_eq!(received.body["stream"], json!(false));
    assert_eq!(received.body["tool_choice"], json!("auto"));
    assert_eq!(received.body["tools"][0]["function"]["name"], json!("list_dir"));
}

#[tokio::test]
async fn a_whole_answer_that_is_not_json_is_malformed_and_not_retried() {
    let server = FakeServer::start(|_| Reply::Status {
        status: 200,
        headers: Vec::new(),
        body: "{\"choices\": [".to_string(),
    })
    .await;
    let provider = whole_response_provider(&server.address, 5_000);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    assert!(
        matches!(&outcome, Err(ModelError::Malformed(message)) if message.contains("{\"choices\": [")),
        "{outcome:?}"
    );
    assert!(events.is_empty());
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_whole_answer_400_is_rejected_and_a_503_is_retried() {
    let rejecting = FakeServer::start(|_| Reply::Status {
        status: 400,
        headers: Vec::new(),
        body: r#"{"error": {"message": "'tool_choice' is invalid", "type": "invalid_request_error"}}"#.to_string(),
    })
    .await;
    let provider = whole_response_provider(&rejecting.address, 5_000);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(
        outcome,
        Err(ModelError::Rejected {
            status: 400,
            message: "'tool_choice' is invalid".to_string()
        })
    );
    assert!(events.is_empty());
    assert_eq!(rejecting.requests().len(), 1);

    let recovering = FakeServer::start(|number| match number {
        1 => Reply::Status {
            status: 503,
            headers: vec![("retry-after", "0".to_string())],
            body: r#"{"error": {"message": "loading model"}}"#.to_string(),
        },
        _ => ok_json(json!({"choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "ok"}}]})),
    })
    .await;
    let provider = whole_response_provider(&recovering.address, 5_000);
    let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(outcome.expect("the retry succeeds").text, "ok");
    assert_eq!(recovering.requests().len(), 2);
}

#[tokio::test]
async fn a_whole_answer_that_never_comes_times_out() {
    let server = FakeServer::start(|_| Reply::Hang).await;
    let provider = whole_response_provider(&server.address, 300);
    let (outcome, events) = run_turn(provider.as_ref(), &request()).await;
    assert_eq!(outcome, Err(ModelError::Timeout { after_ms: 300 }));
    assert!(events.is_empty());
}

#[test]
fn whole_answers_keep_the_limits_and_need_a_choice_and_a_finish_reason() {
    let huge_text = "x".repeat(MAX_RESPONSE_TEXT_BYTES + 1);
    let body = json!({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"content": huge_text}}]});
    assert!(matches!(
        parse_completion(body.to_string().as_bytes()),
        Err(ModelError::TooLarge {
            limit_bytes: MAX_RESPONSE_TEXT_BYTES,
            ..
        })
    ));
    let huge_arguments = format!("{{\"content\": \"{}\"}}", "x".repeat(MAX_TOOL_ARGUMENTS_BYTES));
    let body = json!({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"tool_calls": [
        {"id": "a", "function": {"name": "write_file", "arguments": huge_arguments}}]}}]});
    assert!(matches!(
        parse_completion(body.to_string().as_bytes()),
        Err(ModelError::TooLarge {
            limit_bytes: MAX_TOOL_ARGUMENTS_BYTES,
            ..
        })
    ));
    let many_calls: Vec<serde_json::Value> = (0..=MAX_TOOL_CALLS_PER_TURN)
        .map(|number| json!({"id": format!("c{number}"), "function": {"name": "list_dir", "arguments": "{}"}}))
        .collect();
    let body = json!({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"tool_calls": many_calls}}]});
    assert!(matches!(
        parse_completion(body.to_string().as_bytes()),
        Err(ModelError::TooLarge {
            limit_bytes: MAX_TOOL_CALLS_PER_TURN,
            ..
        })
    ));
    let nameless = json!({"choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}}]});
    assert!(matches!(
        parse_completion(nameless.to_string().as_bytes()),
        Err(ModelError::Malformed(_))
    ));
    let no_choice = json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}});
    assert!(matches!(
        parse_completion(no_choice.to_string().as_bytes()),
        Err(ModelError::Malformed(_))
    ));
    let unfinished = json!({"choices": [{"index": 0, "message": {"content": "hi"}}]});
    assert!(matches!(
        parse_completion(unfinished.to_string().as_bytes()),
        Err(ModelError::Malformed(_))
    ));
    assert!(matches!(parse_completion(b""), Err(ModelError::Malformed(_))));
    let failed = json!({"error": {"message": "out of memory"}});
    assert_eq!(
        parse_completion(failed.to_string().as_bytes()),
        Err(ModelError::Unavailable {
            attempts: 0,
            last: "error in the response: out of memory".to_string()
        })
    );
    // Arguments given as an object (some servers) are kept as its JSON text.
    let object_arguments = json!({"choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"tool_calls": [{"id": "a", "function": {"name": "list_dir", "arguments": {"path": "."}}}]}}]});
    let response = parse_completion(object_arguments.to_string().as_bytes()).unwrap();
    assert_eq!(response.tool_calls[0].arguments_json, r#"{"path":"."}"#);
}

#[tokio::test]
async fn a_whole_answer_over_the_body_limit_is_refused() {
    let text = "x".repeat(MAX_WHOLE_RESPONSE_BYTES);
    let body = json!({"choices": [{"index": 0, "finish_reason": "stop", "message": {"content": text}}]});
    let server = FakeServer::start(move |_| ok_json(body.clone())).await;
    let provider = whole_response_provider(&server.address, 5_000);
    let (outcome, _events) = run_turn(provider.as_ref(), &request()).await;
    assert!(
        matches!(
            &outcome,
            Err(ModelError::TooLarge {
                limit_bytes: MAX_WHOLE_RESPONSE_BYTES,
                ..
            })
        ),
        "{outcome:?}"
    );
}

#[test]
fn tool_choice_is_sent_only_with_tools_and_streaming_asks_for_usage() {
    let options = OpenAiOptions {
        stream: true,
        tool_choice: Some(ToolChoice::Required),
    };
    let with_tools = request_body("m", &request(), options);
    assert_eq!(with_tools["tool_choice"], json!("required"));
    assert_eq!(with_tools["stream"], json!(true));
    assert_eq!(with_tools["stream_options"], json!({"include_usage": true}));
    let without_tools = TurnRequest {
        tools: Vec::new(),
        ..request()
    };
    assert_eq!(request_body("m", &without_tools, options).get("tool_choice"), None);
    let unset = request_body("m", &request(), OpenAiOptions::default());
    assert_eq!(unset.get("tool_choice"), None);
}

#[test]
fn a_stream_without_an_end_is_malformed_and_oversized_text_is_refused() {
    let mut assembler = StreamAssembler::default();
    let mut out = Vec::new();
    let chunk = json!({"choices": [{"index": 0, "delta": {"content": "partial"}}]}).to_string();
    assembler
        .on_event(
            SseEvent {
                event: None,
                data: chunk,
            },
            &mut out,
        )
        .unwrap();
    assert!(matches!(assembler.finish(), Err(ModelError::Malformed(_))));

    let mut assembler = StreamAssembler::default();
    let huge = "x".repeat(MAX_RESPONSE_TEXT_BYTES / 2 + 1);
    let chunk = json!({"choices": [{"index": 0, "delta": {"content": huge}}]}).to_string();
    assembler
        .on_event(
            SseEvent {
                event: None,
                data: chunk.clone(),
            },
            &mut out,
        )
        .unwrap();
    let outcome = assembler.on_event(
        SseEvent {
            event: None,
            data: chunk,
        },
        &mut out,
    );
    assert!(matches!(outcome, Err(ModelError::TooLarge { .. })));
}
