//! The agent runtime of a node from its config: model providers by name, git author and
//! credentials, budgets and tool limits. Keys and passwords come from environment variables or
//! from the node's secrets, never from the config file or the command line.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use flotilla_actors::repo::{GitCredential, GitSettings};
use flotilla_actors::run::AgentRuntime;

use crate::config::NodeConfig;

/// A secret of this node: the file `DATA_DIR/secrets/NAME` (until the replicated, encrypted
/// secret store replaces it). Names are plain words, so a name cannot leave that directory.
pub fn read_secret(data_dir: &Path, name: &str) -> Option<String> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '_' | '-' | '.'))
        && !name.starts_with('.');
    if !plain {
        return None;
    }
    let text = std::fs::read_to_string(data_dir.join("secrets").join(name)).ok()?;
    let text = text.trim_end_matches(['\n', '\r']).to_string();
    (!text.is_empty()).then_some(text)
}

/// The runtime of `config`; `resolve` finds a node-level secret by name (a cluster-scope
/// replicated secret first, then `DATA_DIR/secrets/NAME`: see `secrets::NodeSecretStore`).
pub fn build_runtime(config: &NodeConfig, resolve: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<AgentRuntime> {
    let mut runtime = AgentRuntime::default();
    let mut models = HashMap::new();
    for (name, model) in &config.models {
        let provider = flotilla_actors::model::build_provider(model, resolve)
            .map_err(|error| anyhow!("[models.{name}]: {error}"))?;
        models.insert(name.clone(), provider);
    }
    runtime.models = models;
    let agents = &config.agents;
    if let Some(turns) = agents.max_turns {
        if turns == 0 {
            bail!("[agents] max_turns must be at least 1");
        }
        runtime.budgets.max_turns = turns;
    }
    if let Some(tokens) = agents.max_total_tokens {
        runtime.budgets.max_total_tokens = tokens;
    }
    if let Some(seconds) = agents.max_wall_clock_s {
        runtime.budgets.max_wall_clock = Duration::from_secs(seconds);
    }
    if let Some(tokens) = agents.max_output_tokens {
        runtime.max_output_tokens = tokens;
    }
    if let Some(bytes) = agents.tool_output_bytes {
        if !(1024..=16 * 1024 * 1024).contains(&bytes) {
            bail!("[agents] tool_output_bytes must be between 1024 and 16777216, found {bytes}");
        }
        runtime.tool_limits.max_output_bytes = bytes;
    }
    runtime.tool_limits.default_timeout_ms = runtime
        .tool_limits
        .default_timeout_ms
        .min(config.machines.limits.command_timeout_ms.max(1));
    let git = &config.git;
    let mut credentials = Vec::new();
    for credential in &git.credentials {
        let password = match (&credential.password_env, &credential.password_secret) {
            (Some(variable), _) => std::env::var(variable)
                .ok()
                .filter(|value| !value.is_empty())
                .with_context(|| {
                    format!(
                        "[[git.credentials]] for {:?}: environment variable {variable} is not set",
                        credential.url_prefix
                    )
                })?,
            (None, Some(secret)) => resolve(secret).with_context(|| {
                format!(
                    "[[git.credentials]] for {:?}: secret {secret:?} not found",
                    credential.url_prefix
                )
            })?,
            (None, None) => bail!("[[git.credentials]] needs password_env or password_secret"),
        };
        credentials.push(GitCredential {
            url_prefix: credential.url_prefix.clone(),
            username: credential.username.clone(),
            password,
        });
    }
    runtime.git = GitSettings {
        author_name: git.author_name.clone().unwrap_or(runtime.git.author_name),
        author_email: git.author_email.clone().unwrap_or(runtime.git.author_email),
        credentials,
        repositories: config.repos.policy(),
    };
    Ok(runtime)
}

/// The model an agent created without one gets: the `default_model` setting, else the only
/// model declared.
pub fn default_model(config: &NodeConfig) -> Option<String> {
    config.agents.default_model.clone().or_else(|| {
        (config.models.len() == 1)
            .then(|| config.models.keys().next().cloned())
            .flatten()
    })
}
