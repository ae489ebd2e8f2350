//! AWS role assumption: a team secret names an IAM role, and the node that runs the team's
//! agent assumes it with its own AWS credentials (the SDK's default chain) and the team's
//! external ID, so that the machine gets short-lived session credentials instead of the
//! node's long-lived ones.

use std::time::Duration;

use flotilla_actors::secrets::{Kek, SecretValues};
use sha2::{Digest, Sha256};

/// Team secrets that name the role, first match wins.
pub const ROLE_ARN_SECRETS: [&str; 2] = ["FLOTILLA_AWS_ASSUME_IAM_ROLE_ARN", "CURSOR_AWS_ASSUME_IAM_ROLE_ARN"];
/// How long the session credentials last: an hour, the longest every role allows by default.
pub const SESSION_SECONDS: i32 = 3600;
/// Loading the node's credentials and the STS call together: a node with no route to STS
/// fails the agent after this instead of hanging.
pub const ASSUME_TIMEOUT: Duration = Duration::from_secs(30);
/// Region when the default chain names none (STS answers in every region).
pub const DEFAULT_REGION: &str = "us-east-1";

#[derive(Debug, thiserror::Error)]
pub enum AssumeError {
    #[error("assuming AWS role {role_arn} failed: {message}")]
    Sts { role_arn: String, message: String },
    #[error("assuming AWS role {role_arn} failed: STS did not answer within {}s", ASSUME_TIMEOUT.as_secs())]
    Timeout { role_arn: String },
    #[error("assuming AWS role {role_arn} failed: STS answered with no credentials")]
    NoCredentials { role_arn: String },
}

/// The role ARN an agent's secrets name, if any.
pub fn role_arn(secrets: &SecretValues) -> Option<String> {
    ROLE_ARN_SECRETS.iter().find_map(|wanted| {
        secrets
            .values
            .iter()
            .rev()
            .find(|(name, value)| name == wanted && !value.trim().is_empty())
            .map(|(_, value)| value.trim().to_string())
    })
}

/// The team's external ID: derived from the cluster's key-encryption key and the team name,
/// so it is the same on every node, unguessable without the key, and needs no replicated
/// write. It changes only if the cluster key does.
pub fn external_id(kek: &Kek, team: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"flotilla aws external id\0");
    hasher.update(kek.to_hex().as_bytes());
    hasher.update(b"\0");
    hasher.update(team.as_bytes());
    let digest = hex::encode(hasher.finalize());
    format!("flotilla-{}", &digest[..32])
}

/// Assumes roles for this node's agents.
pub struct RoleAssumer {
    /// STS endpoint from the node's config (`[aws] sts_endpoint`); without it the SDK reads
    /// `AWS_ENDPOINT_URL_STS` or uses AWS's own.
    sts_endpoint: Option<String>,
    config: tokio::sync::OnceCell<aws_config::SdkConfig>,
}

impl RoleAssumer {
    pub fn new(sts_endpoint: Option<String>) -> RoleAssumer {
        RoleAssumer {
            sts_endpoint,
            config: tokio::sync::OnceCell::new(),
        }
    }

    async fn sdk_config(&self) -> &aws_config::SdkConfig {
        self.config
            .get_or_init(|| async {
                let region = aws_config::meta::region::RegionProviderChain::default_provider()
                    .or_else(aws_config::Region::new(DEFAULT_REGION));
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region);
                if let Some(endpoint) = &self.sts_endpoint {
                    loader = loader.endpoint_url(endpoint.clone());
                }
                loader.load().await
            })
            .await
    }

    /// Session credentials of `role_arn` as machine variables: the secret key and token are
    /// secrets (redacted), the access key id is not.
    pub async fn assume(
        &self,
        role_arn: &str,
        external_id: &str,
        session_name: &str,
    ) -> Result<SecretValues, AssumeError> {
        let call = async {
            let client = aws_sdk_sts::Client::new(self.sdk_config().await);
            client
                .assume_role()
                .role_arn(role_arn)
                .external_id(external_id)
                .role_session_name(session_name)
                .duration_seconds(SESSION_SECONDS)
                .send()
                .await
        };
        let output = tokio::time::timeout(ASSUME_TIMEOUT, call)
            .await
            .map_err(|_| AssumeError::Timeout {
                role_arn: role_arn.to_string(),
            })?
            .map_err(|error| AssumeError::Sts {
                role_arn: role_arn.to_string(),
                message: aws_sdk_sts::error::DisplayErrorContext(&error).to_string(),
            })?;
        let credentials = output.credentials().ok_or_else(|| AssumeError::NoCredentials {
            role_arn: role_arn.to_string(),
        })?;
        tracing::info!(role_arn, expires = %credentials.expiration(), "assumed AWS role");
        Ok(SecretValues {
            values: vec![
                (
                    "AWS_SECRET_ACCESS_KEY".to_string(),
                    credentials.secret_access_key().to_string(),
                ),
                ("AWS_SESSION_TOKEN".to_string(), credentials.session_token().to_string()),
            ],
            plain: vec![("AWS_ACCESS_KEY_ID".to_string(), credentials.access_key_id().to_string())],
            ..SecretValues::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flotilla_name_wins_and_blank_values_name_no_role() {
        let secrets = SecretValues {
            values: vec![
                ("CURSOR_AWS_ASSUME_IAM_ROLE_ARN".to_string(), "arn:cursor".to_string()),
                (
                    "FLOTILLA_AWS_ASSUME_IAM_ROLE_ARN".to_string(),
                    " arn:flotilla ".to_string(),
                ),
            ],
            ..SecretValues::default()
        };
        assert_eq!(role_arn(&secrets).as_deref(), Some("arn:flotilla"));
        let blank = SecretValues {
            values: vec![("FLOTILLA_AWS_ASSUME_IAM_ROLE_ARN".to_string(), " ".to_string())],
            ..SecretValues::default()
        };
        assert_eq!(role_arn(&blank), None);
    }

    #[test]
    fn the_external_id_is_stable_per_team_and_differs_between_teams() {
        let kek = Kek::generate();
        assert_eq!(external_id(&kek, "alpha"), external_id(&kek, "alpha"));
        assert_ne!(external_id(&kek, "alpha"), external_id(&kek, "beta"));
        assert_ne!(external_id(&kek, "alpha"), external_id(&Kek::generate(), "alpha"));
    }
}
