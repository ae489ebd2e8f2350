//! Secret placeholders in header values: `{{secret:NAME}}` becomes the secret's value, and
//! `{{basic:USER:secret:NAME}}` becomes base64("USER:" + value), the credentials of an HTTP Basic
//! header. Filled in by the host, so a plugin names secrets without ever holding them.

use base64::Engine as _;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PlaceholderError {
    /// No such secret, or not one this plugin may use.
    UnknownSecret(String),
    /// A `{{secret:` or `{{basic:` that does not form a placeholder. Says where, never the value.
    Malformed(String),
}

fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
}

/// `value` with every placeholder replaced, looking secrets up with `secret`.
pub(crate) fn fill(value: &str, secret: impl Fn(&str) -> Option<String>) -> Result<String, PlaceholderError> {
    let mut filled = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("{{") {
        filled.push_str(&rest[..start]);
        let candidate = &rest[start + 2..];
        if !(candidate.starts_with("secret:") || candidate.starts_with("basic:")) {
            // Not a placeholder: "{{" stays as written.
            filled.push_str("{{");
            rest = candidate;
            continue;
        }
        let Some(end) = candidate.find("}}") else {
            return Err(PlaceholderError::Malformed(format!(
                "unterminated placeholder at byte {start}"
            )));
        };
        let body = &candidate[..end];
        let replacement = if let Some(name) = body.strip_prefix("secret:") {
            if !is_secret_name(name) {
                return Err(PlaceholderError::Malformed(format!(
                    "bad secret name in placeholder at byte {start}"
                )));
            }
            secret(name).ok_or_else(|| PlaceholderError::UnknownSecret(name.to_string()))?
        } else {
            let basic = body.strip_prefix("basic:").unwrap_or_default();
            let Some((user, name)) = basic.split_once(":secret:") else {
                return Err(PlaceholderError::Malformed(format!(
                    "basic placeholder at byte {start} is not {{{{basic:USER:secret:NAME}}}}"
                )));
            };
            if user.is_empty() || user.contains(':') || !is_secret_name(name) {
                return Err(PlaceholderError::Malformed(format!(
                    "bad user or secret name in placeholder at byte {start}"
                )));
            }
            let value = secret(name).ok_or_else(|| PlaceholderError::UnknownSecret(name.to_string()))?;
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{value}"))
        };
        filled.push_str(&replacement);
        rest = &candidate[end + 2..];
    }
    filled.push_str(rest);
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(name: &str) -> Option<String> {
        match name {
            "token" => Some("s3cret".to_string()),
            "other.token-2" => Some("two".to_string()),
            _ => None,
        }
    }

    #[test]
    fn secret_placeholders_are_filled() {
        assert_eq!(fill("Bearer {{secret:token}}", secrets).unwrap(), "Bearer s3cret");
        assert_eq!(
            fill("{{secret:token}}/{{secret:other.token-2}}", secrets).unwrap(),
            "s3cret/two"
        );
    }

    #[test]
    fn basic_placeholders_are_base64_of_user_and_secret() {
        // base64("x-access-token:s3cret")
        assert_eq!(
            fill("Basic {{basic:x-access-token:secret:token}}", secrets).unwrap(),
            "Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0"
        );
    }

    #[test]
    fn text_without_placeholders_is_unchanged() {
        assert_eq!(fill("application/json", secrets).unwrap(), "application/json");
        assert_eq!(
            fill("{{not a placeholder}} {{", secrets).unwrap(),
            "{{not a placeholder}} {{"
        );
    }

    #[test]
    fn unknown_secrets_are_named() {
        assert_eq!(
            fill("Bearer {{secret:nope}}", secrets),
            Err(PlaceholderError::UnknownSecret("nope".to_string()))
        );
        assert_eq!(
            fill("{{basic:u:secret:nope}}", secrets),
            Err(PlaceholderError::UnknownSecret("nope".to_string()))
        );
    }

    #[test]
    fn malformed_placeholders_are_refused() {
        for value in [
            "{{secret:token",
            "{{secret:}}",
            "{{secret:a b}}",
            "{{basic:token}}",
            "{{basic::secret:token}}",
        ] {
            assert!(
                matches!(fill(value, secrets), Err(PlaceholderError::Malformed(_))),
                "{value:?}"
            );
        }
    }
}
