//! The agent runtime's view of the node's plugins: the repository's VCS provider (chosen by
//! `match-url`, in the registry's order) for clones, pushes and pull requests, and the tool
//! plugins offered to the model. Every call takes the plugin version loaded at that moment.

use std::sync::Arc;

use async_trait::async_trait;
use flotilla_actors::model::ToolSpec;
use flotilla_actors::vcs::{GitOrigin, OpenedPullRequest, PluginTools, PullRequestSpec, VcsError, VcsProviders};
use flotilla_plugins::{Plugin, PullRequestInput};

use super::plugins::{PluginRegistry, PluginsNotReady};

/// Why no provider can serve a repository.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    NotReady(#[from] PluginsNotReady),
    #[error("no VCS provider plugin is enabled on this node, so none can serve {repository:?}")]
    NoProvider { repository: String },
    #[error(
        "no enabled VCS provider plugin claims {repository:?} (asked: {asked}); upload and enable a provider for it, or configure a built-in one's `hosts`"
    )]
    Unclaimed { repository: String, asked: String },
}

/// A claimed provider that did not say what it supports.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ProviderInfoError(pub flotilla_plugins::CallError);

/// The provider that claims a repository.
pub struct Claim {
    pub plugin: Plugin,
}

/// Repository URLs whose claiming provider is remembered, per set of providers.
const CLAIMS_REMEMBERED: usize = 4_096;

pub struct NodePlugins {
    pub registry: Arc<PluginRegistry>,
    /// Which provider claimed a repository, valid while the providers are the very same loaded
    /// plugins: asking every provider costs a plugin instance per call, on every create.
    claims: std::sync::Mutex<ClaimCache>,
}

/// The providers (in match order) the remembered claims were asked of, and by repository URL
/// the index of the one that claimed it. `match-url` answers from the URL and the plugin's
/// settings alone, and a change of plugins, versions, grants or settings loads other plugin
/// values, which empties the cache.
#[derive(Default)]
struct ClaimCache {
    providers: Vec<Plugin>,
    claimed_by: std::collections::HashMap<String, usize>,
}

impl ClaimCache {
    /// Whether the remembered claims were asked of exactly these providers.
    fn asked_of(&self, providers: &[Plugin]) -> bool {
        self.providers.len() == providers.len()
            && self
                .providers
                .iter()
                .zip(providers)
                .all(|(kept, now)| kept.is_same(now))
    }

    fn lookup(&mut self, providers: &[Plugin], repository: &str) -> Option<Plugin> {
        if !self.asked_of(providers) {
            self.providers = providers.to_vec();
            self.claimed_by.clear();
            return None;
        }
        let index = *self.claimed_by.get(repository)?;
        providers.get(index).cloned()
    }

    fn remember(&mut self, providers: &[Plugin], repository: &str, index: usize) {
        if !self.asked_of(providers) {
            return;
        }
        if self.claimed_by.len() >= CLAIMS_REMEMBERED {
            self.claimed_by.clear();
        }
        self.claimed_by.insert(repository.to_string(), index);
    }
}

impl NodePlugins {
    pub fn new(registry: Arc<PluginRegistry>) -> NodePlugins {
        NodePlugins {
            registry,
            claims: std::sync::Mutex::new(ClaimCache::default()),
        }
    }

    /// The first provider, in match order, that claims `repository`; `Err` names the providers
    /// asked when none does.
    pub async fn claim(&self, repository: &str) -> Result<Claim, ClaimError> {
        self.registry.wait_ready().await?;
        let host = self.registry.host();
        let providers = self.registry.providers();
        let remembered = self
            .claims
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .lookup(&providers, repository);
        if let Some(plugin) = remembered {
            return Ok(Claim { plugin });
        }
        let mut asked = Vec::with_capacity(providers.len());
        for (index, plugin) in providers.iter().enumerate() {
            match host.match_url(plugin, repository).await {
                Ok(Some(_)) => {
                    self.claims
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .remember(&providers, repository, index);
                    return Ok(Claim { plugin: plugin.clone() });
                }
                Ok(None) => asked.push(plugin.name().to_string()),
                Err(error) => {
                    tracing::warn!(%error, "a provider failed to match a repository URL");
                    asked.push(format!("{} (failed: {error})", plugin.name()));
                }
            }
        }
        Err(if asked.is_empty() {
            ClaimError::NoProvider {
                repository: repository.to_string(),
            }
        } else {
            ClaimError::Unclaimed {
                repository: repository.to_string(),
                asked: asked.join(", "),
            }
        })
    }

    /// Whether a claimed repository's provider can open pull requests.
    pub async fn supports_pull_requests(&self, claim: &Claim) -> Result<bool, ProviderInfoError> {
        self.registry
            .host()
            .info(&claim.plugin)
            .await
            .map(|info| info.supports_pull_requests)
            .map_err(ProviderInfoError)
    }
}

fn vcs_error(provider: &str, message: impl Into<String>) -> VcsError {
    VcsError {
        provider: provider.to_string(),
        message: message.into(),
    }
}

#[async_trait]
impl VcsProviders for NodePlugins {
    async fn origin(&self, repository: &str) -> Result<GitOrigin, VcsError> {
        let claim = self
            .claim(repository)
            .await
            .map_err(|error| vcs_error("", error.to_string()))?;
        let spec = self
            .registry
            .host()
            .clone_spec(&claim.plugin, repository)
            .await
            .map_err(|error| vcs_error(claim.plugin.name(), error.to_string()))?;
        Ok(GitOrigin {
            url: spec.url,
            auth_header: spec.auth_header,
        })
    }

    async fn open_pull_request(&self, spec: PullRequestSpec) -> Result<OpenedPullRequest, VcsError> {
        let claim = self
            .claim(&spec.repository)
            .await
            .map_err(|error| vcs_error("", error.to_string()))?;
        let provider = claim.plugin.name().to_string();
        let opened = self
            .registry
            .host()
            .create_pull_request(
                &claim.plugin,
                PullRequestInput {
                    repository_url: spec.repository,
                    head_branch: spec.head_branch,
                    base_branch: spec.base_branch,
                    title: spec.title,
                    body: spec.body,
                    draft: spec.draft,
                },
            )
            .await
            .map_err(|error| vcs_error(&provider, error.to_string()))?;
        Ok(OpenedPullRequest {
            url: opened.url,
            number: opened.number,
            provider,
        })
    }
}

#[async_trait]
impl PluginTools for NodePlugins {
    async fn specs(&self) -> Vec<ToolSpec> {
        let host = self.registry.host();
        let mut specs = Vec::new();
        for plugin in self.registry.tools() {
            let description = match host.describe(&plugin).await {
                Ok(description) => description,
                Err(error) => {
                    tracing::warn!(%error, "a tool plugin could not describe itself");
                    continue;
                }
            };
            let parameters = match serde_json::from_str::<serde_json::Value>(&description.parameters_schema) {
                Ok(schema @ serde_json::Value::Object(_)) => schema,
                _ => {
                    tracing::warn!(plugin = %plugin.label(), "a tool plugin's parameter schema is not a JSON object");
                    continue;
                }
            };
            specs.push(ToolSpec {
                name: description.name,
                description: description.description,
                parameters,
            });
        }
        specs
    }

    async fn invoke(&self, name: &str, arguments_json: &str) -> Option<Result<String, String>> {
        let host = self.registry.host();
        for plugin in self.registry.tools() {
            let Ok(description) = host.describe(&plugin).await else {
                continue;
            };
            if description.name != name {
                continue;
            }
            return Some(match host.invoke(&plugin, arguments_json).await {
                Ok(answer) => answer,
                Err(error) => Err(error.to_string()),
            });
        }
        None
    }
}
