//! What every forge's webhook deliveries share: the kinds of event the node cares about, the
//! branch a ref names, and the body as JSON.

use std::fmt;

use serde_json::Value;

use crate::error::Failure;

/// The events a provider reports from a delivery; everything else is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookKind {
    Push,
    PullRequest,
    /// A comment on a pull request (or a review of one).
    Comment,
}

impl WebhookKind {
    /// The WIT `webhook-event.kind`: "push", "pull-request" or "comment".
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::Push => "push",
            WebhookKind::PullRequest => "pull-request",
            WebhookKind::Comment => "comment",
        }
    }
}

impl fmt::Display for WebhookKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// `main` for `refs/heads/main`; `None` for tags and other refs.
pub fn branch_of_ref(git_ref: &str) -> Option<String> {
    git_ref.strip_prefix("refs/heads/").map(str::to_string)
}

/// The webhook body as a JSON object, or an invalid-input failure naming the provider.
pub fn webhook_json(provider: &str, body: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(body)
        .map_err(|error| Failure::InvalidInput(format!("{provider} webhook body is not JSON: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_give_branches_and_kinds_their_wit_names() {
        assert_eq!(branch_of_ref("refs/heads/feature/x").as_deref(), Some("feature/x"));
        assert_eq!(branch_of_ref("refs/tags/v1"), None);
        assert_eq!(WebhookKind::PullRequest.to_string(), "pull-request");
        assert!(matches!(webhook_json("GitHub", b"nope"), Err(Failure::InvalidInput(_))));
    }
}
