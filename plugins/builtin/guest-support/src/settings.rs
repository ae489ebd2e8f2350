//! The admin's plain-string settings of a built-in provider, and the secret placeholders built
//! from them (the host fills those in; the token never enters the component).

use crate::error::Failure;

/// The settings key of the extra hosts a provider claims besides its public forge
/// (self-hosted instances, loopback test forges): comma-separated `host` or `host:port`.
pub const HOSTS_SETTING: &str = "hosts";
/// The settings key of the forge's REST API base URL, overriding the one derived from the host.
pub const API_BASE_SETTING: &str = "api-base";
/// The settings key naming the secret that holds the forge token.
pub const TOKEN_SECRET_SETTING: &str = "token-secret";
/// The settings key of the user name sent with the token in HTTP Basic auth, where the
/// provider lets the admin choose it.
pub const USERNAME_SETTING: &str = "username";

/// The settings a built-in provider reads, from the admin's plain-string settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// From `hosts`: lowercase `host` or `host:port`, schemes and slashes removed.
    pub extra_hosts: Vec<String>,
    /// From `api-base`, without a trailing slash.
    pub api_base: Option<String>,
    /// From `token-secret`, or the provider's default.
    pub token_secret: String,
    /// From `username`.
    pub username: Option<String>,
}

impl Settings {
    /// Reads the settings through `get` (the WIT `settings.get`).
    pub fn read(get: impl Fn(&str) -> Option<String>, default_token_secret: &str) -> Settings {
        let non_empty = |key: &str| {
            get(key)
                .map(|value| value.trim().to_string())
                .filter(|value| !value.is_empty())
        };
        Settings {
            extra_hosts: non_empty(HOSTS_SETTING)
                .map(|hosts| parse_hosts(&hosts))
                .unwrap_or_default(),
            api_base: non_empty(API_BASE_SETTING).map(|base| base.trim_end_matches('/').to_string()),
            token_secret: non_empty(TOKEN_SECRET_SETTING).unwrap_or_else(|| default_token_secret.to_string()),
            username: non_empty(USERNAME_SETTING),
        }
    }

    /// The hosts this provider claims: `default_hosts` and the admin's extra ones.
    pub fn claimed_hosts(&self, default_hosts: &[&str]) -> Vec<String> {
        let mut hosts: Vec<String> = default_hosts.iter().map(|host| host.to_string()).collect();
        hosts.extend(self.extra_hosts.iter().cloned());
        hosts
    }

    /// `{{secret:NAME}}` for the token secret, after checking its name cannot break out of
    /// the placeholder.
    pub fn token_placeholder(&self) -> Result<String, Failure> {
        Ok(format!("{{{{secret:{}}}}}", self.checked_token_secret()?))
    }

    /// `{{basic:USER:secret:NAME}}`: the host turns it into base64 of `USER:TOKEN`.
    pub fn basic_placeholder(&self, user: &str) -> Result<String, Failure> {
        if user.is_empty() || user.contains([':', '{', '}']) {
            return Err(Failure::InvalidInput(format!(
                "setting {USERNAME_SETTING}: {user:?} cannot be a Basic auth user name (it is empty or holds ':', '{{' or '}}')"
            )));
        }
        Ok(format!("{{{{basic:{user}:secret:{}}}}}", self.checked_token_secret()?))
    }

    fn checked_token_secret(&self) -> Result<&str, Failure> {
        let valid = self
            .token_secret
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
        if valid {
            Ok(&self.token_secret)
        } else {
            Err(Failure::InvalidInput(format!(
                "setting {TOKEN_SECRET_SETTING}: {:?} is not a secret name (letters, digits, '-', '_' and '.')",
                self.token_secret
            )))
        }
    }
}

/// The `hosts` setting's comma-separated entries, lowercase, without schemes and slashes.
fn parse_hosts(hosts: &str) -> Vec<String> {
    hosts
        .split(',')
        .filter_map(|host| {
            let host = host.trim();
            let host = host.split_once("://").map_or(host, |(_scheme, rest)| rest);
            let host = host.trim_end_matches('/').to_ascii_lowercase();
            (!host.is_empty()).then_some(host)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_trimmed_and_defaulted() {
        let settings = Settings::read(
            |key| match key {
                "hosts" => Some(" GHE.example.com , https://127.0.0.1:9000/ ,, ".to_string()),
                "api-base" => Some("http://127.0.0.1:9000/api/v3/".to_string()),
                "token-secret" => Some("  ".to_string()),
                _ => None,
            },
            "github-token",
        );
        assert_eq!(settings.extra_hosts, ["ghe.example.com", "127.0.0.1:9000"]);
        assert_eq!(settings.api_base.as_deref(), Some("http://127.0.0.1:9000/api/v3"));
        assert_eq!(settings.token_secret, "github-token");
        assert_eq!(settings.token_placeholder().unwrap(), "{{secret:github-token}}");
        assert_eq!(
            settings.basic_placeholder("oauth2").unwrap(),
            "{{basic:oauth2:secret:github-token}}"
        );
    }

    #[test]
    fn a_secret_name_or_user_that_could_break_the_placeholder_is_refused() {
        let mut settings = Settings::read(|_| None, "t");
        settings.token_secret = "a}}{{secret:other".to_string();
        assert!(matches!(settings.token_placeholder(), Err(Failure::InvalidInput(_))));
        settings.token_secret = "ok".to_string();
        assert!(matches!(
            settings.basic_placeholder("a:b"),
            Err(Failure::InvalidInput(_))
        ));
    }
}
