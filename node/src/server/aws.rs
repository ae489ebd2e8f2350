//! AWS role assumption: a team secret names an IAM role, and the node that runs the team's
//! agent assumes it with its own AWS credentials (the SDK's default chain) and the team's
//! external ID, so that the machine gets short-lived session credentials instead of the
//! node's long-lived ones.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_actors::secrets::{CredentialsFile, Kek, RenewCredentials, RenewableCredentials, SecretValues};
use sha2::{Digest, Sha256};

/// Team secrets that name the role, first match wins.
pub const ROLE_ARN_SECRETS: [&str; 2] = ["FLOTILLA_AWS_ASSUME_IAM_ROLE_ARN", "CURSOR_AWS_ASSUME_IAM_ROLE_ARN"];
/// How long the session credentials last: an hour, the longest every role allows by default.
pub const SESSION_SECONDS: i32 = 3600;
/// Loading the node's credentials and the STS call together: a node with no route to STS
/// fails the agent after this instead of hanging.
pub const ASSUME_TIMEOUT: Duration = Duration::from_secs(30);
/// Unless configured otherwise, sessions are renewed at most this long before they expire.
pub const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// Where, inside a machine, the node keeps its session credentials (`AWS_SHARED_CREDENTIALS_FILE`
/// names it): in the machine's own /tmp, never in the workspace, which is committed.
pub const CREDENTIALS_FILE_IN_MACHINE: &str = "/tmp/flotilla-aws/credentials";
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

/// How this node makes and renews session credentials (`[aws]` in the node's config).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// STS endpoint from the node's config (`[aws] sts_endpoint`); without it the SDK reads
    /// `AWS_ENDPOINT_URL_STS` or uses AWS's own.
    pub sts_endpoint: Option<String>,
    /// The sessions' lifetime asked of STS (`[aws] session_seconds`).
    pub session_seconds: i32,
    /// Renew this long after each session is made (`[aws] renew_after_seconds`); by default
    /// at two thirds of its lifetime or [`RENEW_BEFORE_EXPIRY`] before it ends, the earlier.
    pub renew_after: Option<Duration>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            sts_endpoint: None,
            session_seconds: SESSION_SECONDS,
            renew_after: None,
        }
    }
}

/// When to renew a session made at `issued` that expires at `expires`.
pub fn renew_at(issued: SystemTime, expires: SystemTime, renew_after: Option<Duration>) -> SystemTime {
    if let Some(after) = renew_after {
        return (issued + after).min(expires);
    }
    let lifetime = expires.duration_since(issued).unwrap_or_default();
    let two_thirds = issued + lifetime * 2 / 3;
    let before_end = expires.checked_sub(RENEW_BEFORE_EXPIRY).unwrap_or(issued);
    two_thirds.min(before_end).max(issued)
}

/// The `[default]` profile of an AWS shared credentials file.
fn credentials_file_text(access_key_id: &str, secret_access_key: &str, session_token: &str) -> String {
    format!(
        "[default]\naws_access_key_id = {access_key_id}\naws_secret_access_key = {secret_access_key}\naws_session_token = {session_token}\n"
    )
}

/// Assumes roles for this node's agents.
pub struct RoleAssumer {
    settings: SessionSettings,
    config: tokio::sync::OnceCell<aws_config::SdkConfig>,
}

/// One session's credentials, as the machine gets them.
struct Session {
    access_key_id: String,
    file: CredentialsFile,
}

impl RoleAssumer {
    pub fn new(settings: SessionSettings) -> RoleAssumer {
        RoleAssumer {
            settings,
            config: tokio::sync::OnceCell::new(),
        }
    }

    async fn sdk_config(&self) -> &aws_config::SdkConfig {
        self.config
            .get_or_init(|| async {
                let region = aws_config::meta::region::RegionProviderChain::default_provider()
                    .or_else(aws_config::Region::new(DEFAULT_REGION));
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region);
                if let Some(endpoint) = &self.settings.sts_endpoint {
                    loader = loader.endpoint_url(endpoint.clone());
                }
                loader.load().await
            })
            .await
    }

    /// Session credentials of `role_arn` as machine variables, and as a shared credentials
    /// file the node keeps renewed in the machine: the secret key and token are secrets
    /// (redacted), the access key id and the file's path are not.
    pub async fn assume(
        self: &Arc<Self>,
        role_arn: &str,
        external_id: &str,
        session_name: &str,
    ) -> Result<SecretValues, AssumeError> {
        let session = self.session(role_arn, external_id, session_name).await?;
        let renewer = RoleRenewer {
            assumer: self.clone(),
            role_arn: role_arn.to_string(),
            external_id: external_id.to_string(),
            session_name: session_name.to_string(),
        };
        Ok(SecretValues {
            values: session.file.secret_values.clone(),
            plain: vec![
                ("AWS_ACCESS_KEY_ID".to_string(), session.access_key_id),
                (
                    "AWS_SHARED_CREDENTIALS_FILE".to_string(),
                    CREDENTIALS_FILE_IN_MACHINE.to_string(),
                ),
            ],
            renewable: Some(RenewableCredentials {
                machine_path: CREDENTIALS_FILE_IN_MACHINE.to_string(),
                current: session.file,
                renewer: Arc::new(renewer),
            }),
            ..SecretValues::default()
        })
    }

    async fn session(&self, role_arn: &str, external_id: &str, session_name: &str) -> Result<Session, AssumeError> {
        let call = async {
            let client = aws_sdk_sts::Client::new(self.sdk_config().await);
            client
                .assume_role()
                .role_arn(role_arn)
                .external_id(external_id)
                .role_session_name(session_name)
                .duration_seconds(self.settings.session_seconds)
                .send()
                .await
        };
        let issued = SystemTime::now();
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
        let secret_values = vec![
            (
                "AWS_SECRET_ACCESS_KEY".to_string(),
                credentials.secret_access_key().to_string(),
            ),
            ("AWS_SESSION_TOKEN".to_string(), credentials.session_token().to_string()),
        ];
        // Before any line could carry them: the node's log redacts these values too.
        crate::log_redact::remember_session_values(&secret_values);
        let expires_at = SystemTime::try_from(*credentials.expiration())
            .unwrap_or_else(|_| issued + Duration::from_secs(self.settings.session_seconds.unsigned_abs().into()));
        tracing::info!(role_arn, expires = %credentials.expiration(), "assumed AWS role");
        Ok(Session {
            access_key_id: credentials.access_key_id().to_string(),
            file: CredentialsFile {
                text: credentials_file_text(
                    credentials.access_key_id(),
                    credentials.secret_access_key(),
                    credentials.session_token(),
                ),
                secret_values,
                renew_at: renew_at(issued, expires_at, self.settings.renew_after),
                expires_at,
            },
        })
    }
}

/// Makes a new session of one agent's role, for its machine's credentials file.
struct RoleRenewer {
    assumer: Arc<RoleAssumer>,
    role_arn: String,
    external_id: String,
    session_name: String,
}

#[async_trait::async_trait]
impl RenewCredentials for RoleRenewer {
    fn describe(&self) -> String {
        format!("AWS role {}", self.role_arn)
    }

    async fn renew(&self) -> Result<CredentialsFile, String> {
        self.assumer
            .session(&self.role_arn, &self.external_id, &self.session_name)
            .await
            .map(|session| session.file)
            .map_err(|error| error.to_string())
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
    fn sessions_are_renewed_at_two_thirds_or_five_minutes_before_the_end_whichever_is_earlier() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = issued + Duration::from_secs(3600);
        assert_eq!(renew_at(issued, hour, None), issued + Duration::from_secs(2400));
        let quarter = issued + Duration::from_secs(900);
        assert_eq!(renew_at(issued, quarter, None), issued + Duration::from_secs(600));
        let short = issued + Duration::from_secs(600);
        assert_eq!(renew_at(issued, short, None), issued + Duration::from_secs(300));
        assert_eq!(
            renew_at(issued, hour, Some(Duration::from_secs(2))),
            issued + Duration::from_secs(2)
        );
        assert_eq!(renew_at(issued, short, Some(Duration::from_secs(7200))), short);
    }

    #[test]
    fn the_credentials_file_has_a_default_profile() {
        let text = credentials_file_text("ASIAKEY", "secret", "token");
        assert_eq!(
            text,
            "[default]\naws_access_key_id = ASIAKEY\naws_secret_access_key = secret\naws_session_token = token\n"
        );
    }

    #[test]
    fn the_external_id_is_stable_per_team_and_differs_between_teams() {
        let kek = Kek::generate();
        assert_eq!(external_id(&kek, "alpha"), external_id(&kek, "alpha"));
        assert_ne!(external_id(&kek, "alpha"), external_id(&kek, "beta"));
        assert_ne!(external_id(&kek, "alpha"), external_id(&Kek::generate(), "alpha"));
    }
}
