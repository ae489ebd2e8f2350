//! The `openai` provider: Chat Completions with function tools, streamed or whole, as spoken by
//! OpenAI and compatible servers (vLLM, llama.cpp, Ollama, ...).
//!
//! Streaming is the default. Whole responses (`stream = false`) exist for servers that give tool
//! calls only there: llama-cpp-python 0.3 answers a streamed request with `tool_choice: "auto"`
//! with an empty body. `tool_choice` is sent only when configured, since servers differ in
//! what they accept.

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::json;
use tokio::sync::mpsc::Sender;

use super::http::{self, HttpSettings};
use super::{ApiKey, Message, ModelError, ModelProvider, Role, StreamEvent, ToolChoice, TurnRequest, TurnResponse};

mod completion;
mod stream;
#[cfg(test)]
mod tests;

pub(crate) use completion::parse_completion;
pub(crate) use stream::StreamAssembler;

/// The request options of the `openai` provider that a model configuration chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenAiOptions {
    /// Ask for an event stream (true) or one whole JSON response (false).
    pub(crate) stream: bool,
    /// Sent as `tool_choice` with requests that carry tools.
    pub(crate) tool_choice: Option<ToolChoice>,
}

impl Default for OpenAiOptions {
    fn default() -> Self {
        Self {
            stream: true,
            tool_choice: None,
        }
    }
}

pub struct OpenAiProvider {
    name: String,
    model: String,
    options: OpenAiOptions,
    settings: HttpSettings,
    client: reqwest::Client,
    authorization: Option<HeaderValue>,
}

impl OpenAiProvider {
    pub(crate) fn new(
        settings: HttpSettings,
        model: String,
        api_key: Option<ApiKey>,
        options: OpenAiOptions,
    ) -> Result<Self, ModelError> {
        let authorization = match api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                    ModelError::Config("the API key contains characters not allowed in a header".into())
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self {
            name: format!("openai:{model}"),
            model,
            options,
            client: http::build_client(&settings)?,
            settings,
            authorization,
        })
    }
}

#[async_trait::async_trait]
impl ModelProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn scripted(&self) -> bool {
        false
    }

    async fn turn(&self, request: &TurnRequest, events: Sender<StreamEvent>) -> Result<TurnResponse, ModelError> {
        let body = serde_json::to_vec(&request_body(&self.model, request, self.options))
            .map_err(|error| ModelError::Config(format!("cannot encode the request: {error}")))?;
        let url = format!("{}/chat/completions", self.settings.base_url);
        let accept = if self.options.stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let make_request = || {
            let builder = self
                .client
                .post(&url)
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, accept)
                .body(body.clone());
            match &self.authorization {
                Some(authorization) => builder.header(AUTHORIZATION, authorization.clone()),
                None => builder,
            }
        };
        if self.options.stream {
            http::run_streamed_turn(&self.settings, &make_request, StreamAssembler::default(), &events).await
        } else {
            http::run_whole_turn(&self.settings, &make_request, parse_completion, &events).await
        }
    }
}

/// The Chat Completions request for `request`.
pub(crate) fn request_body(model: &str, request: &TurnRequest, options: OpenAiOptions) -> serde_json::Value {
    let messages: Vec<serde_json::Value> = request.messages.iter().map(message_json).collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": request.max_output_tokens,
        "stream": options.stream,
    });
    if options.stream {
        body["stream_options"] = json!({ "include_usage": true });
    }
    if !request.tools.is_empty() {
        if let Some(tool_choice) = options.tool_choice {
            body["tool_choice"] = json!(tool_choice.as_str());
        }
        let tools: Vec<serde_json::Value> = request
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "function",
                    "function": { "name": tool.name, "description": tool.description, "parameters": tool.parameters },
                })
            })
            .collect();
        body["tools"] = serde_json::Value::Array(tools);
    }
    body
}

fn message_json(message: &Message) -> serde_json::Value {
    match message.role {
        Role::System => json!({ "role": "system", "content": message.content }),
        Role::User => json!({ "role": "user", "content": message.content }),
        Role::Assistant if message.tool_calls.is_empty() => json!({ "role": "assistant", "content": message.content }),
        Role::Assistant => {
            let tool_calls: Vec<serde_json::Value> = message
                .tool_calls
                .iter()
                .map(|call| {
                    json!({
                        "id": call.id,
                        "type": "function",
                        "function": { "name": call.name, "arguments": call.arguments_json },
                    })
                })
                .collect();
            // An empty string, not null: OpenAI accepts both, but llama-cpp-python refuses null
            // (and a missing key) with an error.
            json!({ "role": "assistant", "content": message.content, "tool_calls": tool_calls })
        }
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": message.tool_call_id.as_deref().unwrap_or_default(),
            "content": message.content,
        }),
    }
}
