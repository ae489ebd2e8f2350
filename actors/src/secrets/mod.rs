//! Secrets on a node: the envelope that seals and opens replicated secrets under the cluster's
//! key-encryption key ([`envelope`]), the redactor that keeps their values out of events,
//! tool output and logs ([`redact`]), and what a machine is given ([`MachineSecrets`]).

pub mod envelope;
pub mod redact;

pub use envelope::{EnvelopeError, Kek, KEK_FILE};
pub use redact::{Redactor, SharedRedactor, StreamRedactor, MIN_REDACTED_BYTES};

use std::sync::Arc;
use std::time::SystemTime;

/// The secrets one agent's machine gets, opened on the node that runs it, in the order they
/// are given (a later one of the same name wins: team first, then user).
#[derive(Clone, Default)]
pub struct SecretValues {
    pub values: Vec<(String, String)>,
    /// Values redacted but not given to the machine (the node's own secrets).
    pub also_redacted: Vec<(String, String)>,
    /// Values given to the machine but not redacted: identifiers that are no secret (an AWS
    /// access key id, a credentials file's path) and that users need to see in output.
    pub plain: Vec<(String, String)>,
    /// Session credentials that expire, and the means to make new ones before they do: the
    /// run keeps them in a file in the machine (see [`RenewableCredentials`]).
    pub renewable: Option<RenewableCredentials>,
}

/// Credentials made for a run that expire (an AWS role's session): the machine finds them in
/// a file at `machine_path` (one of its variables names it), which the node rewrites with new
/// ones before the current ones expire.
#[derive(Clone)]
pub struct RenewableCredentials {
    /// Absolute path of the credentials file inside the machine.
    pub machine_path: String,
    pub current: CredentialsFile,
    pub renewer: Arc<dyn RenewCredentials>,
}

/// One generation of renewable credentials.
#[derive(Clone)]
pub struct CredentialsFile {
    /// The file's whole text.
    pub text: String,
    /// The secret values in it, by name: redacted wherever the run's text leaves it.
    pub secret_values: Vec<(String, String)>,
    /// When to make the next generation.
    pub renew_at: SystemTime,
    pub expires_at: SystemTime,
}

/// Makes the next generation of a run's renewable credentials.
#[async_trait::async_trait]
pub trait RenewCredentials: Send + Sync {
    /// What is renewed, for messages ("AWS role arn:...").
    fn describe(&self) -> String;
    async fn renew(&self) -> Result<CredentialsFile, String>;
}

impl SecretValues {
    /// A redactor for every value here.
    pub fn redactor(&self) -> Redactor {
        Redactor::new(
            self.values
                .iter()
                .chain(&self.also_redacted)
                .map(|(name, value)| (name.as_str(), value.as_str())),
        )
    }
}

impl std::fmt::Debug for SecretValues {
    // Names only: a value must never reach a log through a debug print.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.values.iter().map(|(name, _)| name.as_str()).collect();
        formatter.debug_struct("SecretValues").field("names", &names).finish()
    }
}

/// Where an agent's secrets come from: the node implements it over the replicated state and
/// its key-encryption key, so that the actors need neither.
#[async_trait::async_trait]
pub trait MachineSecrets: Send + Sync {
    /// The team's and the user's secrets of `agent`, user last (so it wins a clash), opened.
    fn for_agent(&self, agent: &flotilla_raft::AgentRecord) -> Result<SecretValues, String>;
    /// Values of node-level secrets this node uses (model keys, git credentials, plugin
    /// tokens), redacted from everything an agent shows.
    fn node_values(&self) -> Vec<(String, String)>;
    /// Every secret value this node knows (all teams' and users' it can open, its own): for
    /// text written before an agent's own secrets are known, such as a provisioning error.
    fn known_redactor(&self) -> Redactor {
        Redactor::default()
    }
    /// Credentials the machine gets beyond the stored secrets, made for this run from them
    /// (session credentials of an AWS role the team names); none by default. An error fails
    /// the agent with its message.
    async fn run_credentials(
        &self,
        _agent: &flotilla_raft::AgentRecord,
        _secrets: &SecretValues,
    ) -> Result<SecretValues, String> {
        Ok(SecretValues::default())
    }
}

#[cfg(test)]
mod tests {
    use crate::repo::prefix_matches;

    #[test]
    fn a_credential_prefix_matches_whole_path_segments_only() {
        let prefix = "https://git.example.com/team";
        assert!(prefix_matches(prefix, "https://git.example.com/team/repo.git"));
        assert!(prefix_matches(prefix, "https://git.example.com/team"));
        assert!(!prefix_matches(prefix, "https://git.example.com/team-other/repo.git"));
        assert!(!prefix_matches(
            "https://git.example.com",
            "https://git.example.com.evil/x.git"
        ));
        assert!(prefix_matches(
            "https://git.example.com/",
            "https://git.example.com/x.git"
        ));
    }
}
