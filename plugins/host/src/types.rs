//! Plain Rust mirrors of the WIT records that cross the host's public API, so that callers never
//! see generated binding types.

use std::fmt;

/// The two worlds a plugin can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PluginKind {
    /// World `vcs-provider`: maps repository URLs, gives clone credentials, opens pull requests.
    VcsProvider,
    /// World `tool`: an agent tool, described to the model and invoked with its JSON arguments.
    Tool,
}

impl PluginKind {
    /// The WIT world's name.
    pub fn world_name(self) -> &'static str {
        match self {
            PluginKind::VcsProvider => "vcs-provider",
            PluginKind::Tool => "tool",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.world_name())
    }
}

/// One plugin version, as errors and logs name it: `NAME@VERSION`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PluginLabel {
    pub name: String,
    pub version: String,
}

impl fmt::Display for PluginLabel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}@{}", self.name, self.version)
    }
}

/// A VCS provider's answer to `info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Short identifier, e.g. "github".
    pub name: String,
    pub display_name: String,
    /// Human-readable URL patterns the provider claims.
    pub url_patterns: Vec<String>,
    pub supports_pull_requests: bool,
}

/// A repository as the provider names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRef {
    pub host: String,
    pub owner: String,
    pub name: String,
    /// The repository's page in a browser.
    pub web_url: String,
}

/// How git reaches a repository, with the auth header's placeholders already filled in by the
/// host. The header holds a secret: it is for git's `http.extraHeader`, never for logs or for
/// the plugin.
#[derive(Clone, PartialEq, Eq)]
pub struct ResolvedCloneSpec {
    pub url: String,
    /// (name, value), e.g. ("Authorization", "Basic eC1hY2Nlc3MtdG9rZW46...").
    pub auth_header: Option<(String, String)>,
}

impl fmt::Debug for ResolvedCloneSpec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ResolvedCloneSpec")
            .field("url", &self.url)
            .field(
                "auth_header",
                &self.auth_header.as_ref().map(|(name, _)| (name, "<redacted>")),
            )
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullRequestInput {
    pub repository_url: String,
    pub head_branch: String,
    pub base_branch: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullRequest {
    pub url: String,
    pub number: u64,
}

/// A webhook delivery as the node received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookInput {
    /// (name, value) pairs in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEvent {
    /// "push", "pull-request", "comment"...
    pub kind: String,
    pub repository_url: String,
    pub branch: Option<String>,
    pub pull_request_number: Option<u64>,
    /// The sender's login, when the forge says.
    pub actor: Option<String>,
}

/// A tool's answer to `describe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolDescription {
    /// The name the model calls.
    pub name: String,
    pub description: String,
    /// A JSON schema (an object) of the arguments, as the plugin wrote it.
    pub parameters_schema: String,
}
