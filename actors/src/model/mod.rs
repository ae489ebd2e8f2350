//! Model providers for the agent turn loop.
//!
//! A provider takes the conversation so far and the tool definitions, asks a model for the next
//! assistant message, streams what arrives as [`StreamEvent`]s and returns the assembled
//! [`TurnResponse`]. The turn loop above it decides what to do with tool calls; nothing here runs
//! tools or keeps conversation state (the scripted provider picks its turn from the conversation).
//!
//! Three providers: `openai` (Chat Completions, streamed or, for servers that only give tool
//! calls in whole responses, not; any compatible server such as vLLM, llama.cpp or Ollama), `anthropic` (the Messages API) and `scripted` (a deterministic
//! replay of a JSON file, for tests and the offline demo; [`ModelProvider::scripted`] says so,
//! so output can be marked as scripted).
//!
//! The wire formats are parsed by plain, synchronous assemblers (`openai::StreamAssembler`,
//! `anthropic::StreamAssembler`, [`sse::SseParser`]) and, for whole responses, a plain parser
//! (`openai::parse_completion`); the HTTP part (`http`) adds retries with bounded backoff, the
//! whole-request and idle-stream timeouts, and the size limits.

mod anthropic;
mod http;
mod openai;
mod scripted;
pub mod sse;

#[cfg(test)]
mod test_support;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

pub use anthropic::AnthropicProvider;
pub use openai::OpenAiProvider;
pub use scripted::ScriptedProvider;

/// Largest assembled assistant text in one turn.
pub const MAX_RESPONSE_TEXT_BYTES: usize = 1024 * 1024;
/// Largest arguments JSON of one tool call.
pub const MAX_TOOL_ARGUMENTS_BYTES: usize = 1024 * 1024;
/// Most tool calls accepted in one turn.
pub const MAX_TOOL_CALLS_PER_TURN: usize = 256;
/// Largest single SSE line or event payload.
pub const MAX_SSE_EVENT_BYTES: usize = 4 * 1024 * 1024;
/// Largest error body read from a provider to find its message.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Largest whole (not streamed) response body: room for the largest text and a few large tool
/// calls; the per-text and per-call limits above still apply inside it.
pub const MAX_WHOLE_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

pub const DEFAULT_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_STREAM_IDLE_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_MAX_RETRIES: u32 = 4;
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Tool calls the assistant made in this message (assistant messages only).
    pub tool_calls: Vec<ToolCall>,
    /// The call this message answers (tool results only).
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self::plain(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::plain(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
            tool_calls,
            tool_call_id: None,
        }
    }

    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(tool_call_id.into()),
        }
    }

    fn plain(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments exactly as the model produced them (JSON text, not re-serialised).
    pub arguments_json: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnRequest {
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub max_output_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    TextDelta(String),
    ToolCallStarted {
        id: String,
        name: String,
    },
    ToolCallArgumentsDelta {
        id: String,
        delta: String,
    },
    /// The last event of a successful turn; the same response `turn` returns.
    Done(TurnResponse),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    ToolUse,
    MaxTokens,
    /// A reason this code does not map, as the provider spelled it.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnResponse {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    pub stop_reason: StopReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The provider refused the request (a 4xx other than 429); `message` is its own words.
    #[error("model provider rejected the request (http {status}): {message}")]
    Rejected { status: u16, message: String },
    /// 429, 5xx, connection errors or a failure reported inside the stream, after retries.
    #[error("model provider unavailable after {attempts} attempt(s): {last}")]
    Unavailable { attempts: u32, last: String },
    #[error("model provider timed out after {after_ms} ms")]
    Timeout { after_ms: u64 },
    /// The response did not follow the wire format (bad SSE, bad JSON, missing end).
    #[error("malformed model response: {0}")]
    Malformed(String),
    /// The response went past one of the size limits of this module.
    #[error("model response too large: {what} exceeds {limit_bytes} bytes")]
    TooLarge { what: String, limit_bytes: usize },
    #[error("model script: {0}")]
    Script(String),
    /// The model configuration cannot be used (missing key, bad URL, ...).
    #[error("model configuration: {0}")]
    Config(String),
}

/// One model call of the turn loop.
#[async_trait::async_trait]
pub trait ModelProvider: Send + Sync {
    /// The provider kind and model, for logs and events (`openai:served-model-id`).
    fn name(&self) -> &str;
    /// True when replies come from a script, never from a model.
    fn scripted(&self) -> bool;
    /// Asks for the next assistant message. Events are sent as they arrive, ending with
    /// [`StreamEvent::Done`]; a failed send (the receiver is gone) does not stop the turn.
    /// A full channel holds the turn back, and that time counts against `timeout_ms`.
    /// On error, events already sent stay sent: the caller should discard the partial turn.
    async fn turn(
        &self,
        request: &TurnRequest,
        events: tokio::sync::mpsc::Sender<StreamEvent>,
    ) -> Result<TurnResponse, ModelError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Scripted,
}

/// One `[models.NAME]` table of the node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub provider: ProviderKind,
    #[serde(default)]
    pub base_url: Option<String>,
    /// The model id sent to the provider; required for `openai` and `anthropic`.
    #[serde(default)]
    pub model: String,
    /// Environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Name of the Flotilla secret holding the API key.
    #[serde(default)]
    pub api_key_secret: Option<String>,
    /// Script file (`scripted` only), relative to the node's working directory.
    #[serde(default)]
    pub script: Option<PathBuf>,
    /// Limit on one whole turn: connecting, retries, backoff and streaming.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Limit on silence between two pieces of a streamed response.
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// Retries after the first attempt on 429, 5xx and connection errors.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// `openai` only: false asks for one whole JSON response instead of an event stream, for
    /// servers that give tool calls only in whole responses (llama-cpp-python). Watchers then
    /// see the turn's text and tool calls at once, when the response has arrived.
    #[serde(default = "default_stream")]
    pub stream: bool,
    /// `openai` only: sent as `tool_choice` with requests that carry tools; unset sends none
    /// (the server's default, `auto` for OpenAI).
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
}

/// The `tool_choice` values a model configuration may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ToolChoice {
    /// The model decides between text and tool calls.
    Auto,
    /// The model must call a tool.
    Required,
    /// The model must not call a tool.
    None,
}

impl ToolChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolChoice::Auto => "auto",
            ToolChoice::Required => "required",
            ToolChoice::None => "none",
        }
    }
}

impl TryFrom<String> for ToolChoice {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            "none" => Ok(ToolChoice::None),
            other => Err(format!(
                "tool_choice must be \"auto\", \"required\" or \"none\", found {other:?}"
            )),
        }
    }
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_stream_idle_timeout_ms() -> u64 {
    DEFAULT_STREAM_IDLE_TIMEOUT_MS
}

fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}

fn default_stream() -> bool {
    true
}

/// An API key. Its `Debug` never shows the key.
#[derive(Clone)]
pub(crate) struct ApiKey(String);

impl ApiKey {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ApiKey(<redacted>)")
    }
}

/// Builds the provider a model configuration describes.
///
/// The API key is read from the environment variable `api_key_env` or from the secret
/// `api_key_secret` (through `resolve_secret`); it is never taken from a command line and never
/// logged. A named variable or secret that is missing or empty is an error; a key is optional
/// for `openai` (local servers), required for `anthropic`.
pub fn build_provider(
    config: &ModelConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn ModelProvider>, ModelError> {
    if config.timeout_ms == 0 {
        return Err(ModelError::Config("timeout_ms must be above 0".to_string()));
    }
    if config.stream_idle_timeout_ms == 0 {
        return Err(ModelError::Config("stream_idle_timeout_ms must be above 0".to_string()));
    }
    if config.provider != ProviderKind::Scripted && config.script.is_some() {
        return Err(ModelError::Config(
            "\"script\" is only for provider \"scripted\"".to_string(),
        ));
    }
    if config.provider != ProviderKind::Openai && !config.stream {
        return Err(ModelError::Config(
            "\"stream = false\" is only for provider \"openai\"".to_string(),
        ));
    }
    if config.provider != ProviderKind::Openai && config.tool_choice.is_some() {
        return Err(ModelError::Config(
            "\"tool_choice\" is only for provider \"openai\"".to_string(),
        ));
    }
    match config.provider {
        ProviderKind::Scripted => {
            let Some(script_path) = &config.script else {
                return Err(ModelError::Config("provider \"scripted\" needs \"script\"".to_string()));
            };
            Ok(Arc::new(ScriptedProvider::from_file(script_path)?))
        }
        ProviderKind::Openai => {
            let http = http_settings(config, DEFAULT_OPENAI_BASE_URL)?;
            let api_key = resolve_api_key(config, resolve_secret)?;
            let options = openai::OpenAiOptions {
                stream: config.stream,
                tool_choice: config.tool_choice,
            };
            Ok(Arc::new(OpenAiProvider::new(
                http,
                config.model.clone(),
                api_key,
                options,
            )?))
        }
        ProviderKind::Anthropic => {
            let http = http_settings(config, DEFAULT_ANTHROPIC_BASE_URL)?;
            let Some(api_key) = resolve_api_key(config, resolve_secret)? else {
                return Err(ModelError::Config(
                    "provider \"anthropic\" needs an API key: set api_key_env or api_key_secret".to_string(),
                ));
            };
            Ok(Arc::new(AnthropicProvider::new(http, config.model.clone(), api_key)?))
        }
    }
}

fn http_settings(config: &ModelConfig, default_base_url: &str) -> Result<http::HttpSettings, ModelError> {
    if config.model.trim().is_empty() {
        return Err(ModelError::Config(
            "\"model\" must name the model to call, found an empty string".to_string(),
        ));
    }
    let base_url = config
        .base_url
        .as_deref()
        .unwrap_or(default_base_url)
        .trim_end_matches('/')
        .to_string();
    match reqwest::Url::parse(&base_url) {
        Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {}
        Ok(url) => {
            return Err(ModelError::Config(format!(
                "base_url {base_url:?} must be http or https, found scheme {:?}",
                url.scheme()
            )))
        }
        Err(error) => {
            return Err(ModelError::Config(format!(
                "base_url {base_url:?} is not a URL: {error}"
            )))
        }
    }
    Ok(http::HttpSettings {
        base_url,
        timeout_ms: config.timeout_ms,
        stream_idle_timeout_ms: config.stream_idle_timeout_ms,
        max_retries: config.max_retries,
    })
}

fn resolve_api_key(
    config: &ModelConfig,
    resolve_secret: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ApiKey>, ModelError> {
    let key = match (&config.api_key_env, &config.api_key_secret) {
        (Some(_), Some(_)) => {
            return Err(ModelError::Config(
                "set api_key_env or api_key_secret, not both".to_string(),
            ));
        }
        (None, None) => return Ok(None),
        (Some(variable), None) => match std::env::var(variable) {
            Ok(value) if !value.trim().is_empty() => value,
            _ => {
                return Err(ModelError::Config(format!(
                    "api_key_env names {variable:?}, but that environment variable is unset or empty"
                )))
            }
        },
        (None, Some(secret)) => match resolve_secret(secret) {
            Some(value) if !value.trim().is_empty() => value,
            _ => {
                return Err(ModelError::Config(format!(
                    "api_key_secret names {secret:?}, but no such secret is set or it is empty"
                )))
            }
        },
    };
    Ok(Some(ApiKey(key.trim().to_string())))
}

/// Sends an event, ignoring a receiver that has gone away (the turn still completes).
async fn emit(events: &tokio::sync::mpsc::Sender<StreamEvent>, event: StreamEvent) {
    let _ = events.send(event).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct NodeConfigFragment {
        models: std::collections::BTreeMap<String, ModelConfig>,
    }

    #[test]
    fn config_parses_from_toml() {
        let text = r#"
            [models.local]
            provider = "openai"             # openai | anthropic | scripted
            base_url = "http://127.0.0.1:8080/v1"
            model = "served-model-id"
            api_key_env = "LOCAL_API_KEY"   # or api_key_secret = "NAME"; optional for local servers

            [models.demo]
            provider = "scripted"
            script = "path/to/script.json"  # scripted only
        "#;
        let parsed: NodeConfigFragment = toml::from_str(text).expect("config parses");
        let local = &parsed.models["local"];
        assert_eq!(local.provider, ProviderKind::Openai);
        assert_eq!(local.base_url.as_deref(), Some("http://127.0.0.1:8080/v1"));
        assert_eq!(local.model, "served-model-id");
        assert_eq!(local.api_key_env.as_deref(), Some("LOCAL_API_KEY"));
        assert_eq!(local.api_key_secret, None);
        assert_eq!(local.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(local.max_retries, DEFAULT_MAX_RETRIES);
        assert!(local.stream);
        assert_eq!(local.tool_choice, None);
        let demo = &parsed.models["demo"];
        assert_eq!(demo.provider, ProviderKind::Scripted);
        assert_eq!(
            demo.script.as_deref(),
            Some(std::path::Path::new("path/to/script.json"))
        );
    }

    #[test]
    fn config_refuses_unknown_fields_and_providers() {
        let unknown_field = toml::from_str::<ModelConfig>("provider = \"openai\"\nmodel = \"m\"\napi_key = \"k\"\n");
        assert!(unknown_field.unwrap_err().to_string().contains("api_key"));
        let unknown_provider = toml::from_str::<ModelConfig>("provider = \"gemini\"\nmodel = \"m\"\n");
        assert!(unknown_provider.is_err());
    }

    #[test]
    fn stream_and_tool_choice_parse_and_a_bad_tool_choice_is_refused_at_load() {
        let whole: ModelConfig =
            toml::from_str("provider = \"openai\"\nmodel = \"m\"\nstream = false\ntool_choice = \"auto\"\n").unwrap();
        assert!(!whole.stream);
        assert_eq!(whole.tool_choice, Some(ToolChoice::Auto));
        for (text, choice) in [("required", ToolChoice::Required), ("none", ToolChoice::None)] {
            let config: ModelConfig = toml::from_str(&format!(
                "provider = \"openai\"\nmodel = \"m\"\ntool_choice = \"{text}\"\n"
            ))
            .unwrap();
            assert_eq!(config.tool_choice, Some(choice));
            assert_eq!(choice.as_str(), text);
        }
        let bad = toml::from_str::<ModelConfig>("provider = \"openai\"\nmodel = \"m\"\ntool_choice = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("tool_choice must be \"auto\", \"required\" or \"none\", found \"sometimes\""),
            "{bad}"
        );
        let anthropic_whole: ModelConfig =
            toml::from_str("provider = \"anthropic\"\nmodel = \"m\"\napi_key_secret = \"K\"\nstream = false\n")
                .unwrap();
        let refused = build_provider(&anthropic_whole, &|_| Some("key".to_string())).err();
        assert!(matches!(refused, Some(ModelError::Config(message)) if message.contains("stream = false")));
        let anthropic_choice: ModelConfig =
            toml::from_str("provider = \"anthropic\"\nmodel = \"m\"\napi_key_secret = \"K\"\ntool_choice = \"auto\"\n")
                .unwrap();
        let refused = build_provider(&anthropic_choice, &|_| Some("key".to_string())).err();
        assert!(matches!(refused, Some(ModelError::Config(message)) if message.contains("tool_choice")));
    }

    #[test]
    fn api_key_comes_from_secret_and_missing_key_is_an_error() {
        let config: ModelConfig =
            toml::from_str("provider = \"anthropic\"\nmodel = \"m\"\napi_key_secret = \"ANTHROPIC\"\n").unwrap();
        let key = resolve_api_key(&config, &|name| (name == "ANTHROPIC").then(|| "sk-test".to_string())).unwrap();
        assert_eq!(key.unwrap().expose(), "sk-test");
        assert!(format!("{:?}", ApiKey("sk-test".to_string())).contains("redacted"));
        let missing = build_provider(&config, &|_| None)
            .err()
            .expect("missing secret is an error");
        assert!(matches!(missing, ModelError::Config(message) if message.contains("ANTHROPIC")));
        let no_key: ModelConfig = toml::from_str("provider = \"anthropic\"\nmodel = \"m\"\n").unwrap();
        assert!(matches!(build_provider(&no_key, &|_| None), Err(ModelError::Config(_))));
        let local: ModelConfig =
            toml::from_str("provider = \"openai\"\nmodel = \"m\"\nbase_url = \"http://127.0.0.1:1/v1\"\n").unwrap();
        let provider = build_provider(&local, &|_| None).expect("openai without a key is allowed");
        assert_eq!(provider.name(), "openai:m");
        assert!(!provider.scripted());
    }
}
