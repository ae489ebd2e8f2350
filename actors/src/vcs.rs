//! What the agent runtime asks of a repository's VCS provider and of tool plugins. The node
//! answers through its plugin registry (Wasm components); these traits keep the actors free of
//! the plugin host, and let a node without providers fall back to plain git with the
//! credentials of its config.

use async_trait::async_trait;

use crate::model::ToolSpec;

/// How git reaches a repository's origin, resolved anew for every clone, fetch and push (a
/// provider's token or its plugin version may change between them).
#[derive(Clone, PartialEq, Eq)]
pub struct GitOrigin {
    /// The URL git clones from and pushes to.
    pub url: String,
    /// A header git sends with every request (`http.extraHeader`), secret filled in.
    pub auth_header: Option<(String, String)>,
}

impl std::fmt::Debug for GitOrigin {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GitOrigin")
            .field("url", &self.url)
            .field(
                "auth_header",
                &self.auth_header.as_ref().map(|(name, _)| (name, "<redacted>")),
            )
            .finish()
    }
}

/// The pull request an agent asks its provider to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestSpec {
    pub repository: String,
    pub head_branch: String,
    pub base_branch: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
}

/// A pull request the provider opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedPullRequest {
    pub url: String,
    pub number: u64,
    /// The provider that opened it.
    pub provider: String,
}

/// Why a provider could not do what was asked, in words for the agent's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcsError {
    /// The provider that was asked ("" when none claims the repository).
    pub provider: String,
    pub message: String,
}

impl std::fmt::Display for VcsError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.provider.is_empty() {
            formatter.write_str(&self.message)
        } else {
            write!(formatter, "{}: {}", self.provider, self.message)
        }
    }
}

impl std::error::Error for VcsError {}

/// The repository providers of a node.
#[async_trait]
pub trait VcsProviders: Send + Sync + 'static {
    /// Where git clones and pushes `repository`, from its provider's `clone-spec`.
    async fn origin(&self, repository: &str) -> Result<GitOrigin, VcsError>;
    /// Opens a pull request through the repository's provider.
    async fn open_pull_request(&self, spec: PullRequestSpec) -> Result<OpenedPullRequest, VcsError>;
}

/// Tools an admin added as plugins, offered to the model next to the built-in tools.
#[async_trait]
pub trait PluginTools: Send + Sync + 'static {
    /// The tools enabled now (described by each plugin).
    async fn specs(&self) -> Vec<ToolSpec>;
    /// Runs tool `name` with the model's JSON arguments: `Ok` is the result for the model,
    /// `Err` an error message (also for the model). `None` when no plugin tool has that name.
    async fn invoke(&self, name: &str, arguments_json: &str) -> Option<Result<String, String>>;
}
