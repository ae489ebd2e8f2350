//! Misbehaves: `info` returns a 10 MiB display name (past the host's output limit).

wit_bindgen::generate!({ path: "../../wit", world: "vcs-provider" });

struct Chatty;

impl Guest for Chatty {
    fn info() -> ProviderInfo {
        ProviderInfo {
            name: "chatty".to_string(),
            display_name: "x".repeat(10 << 20),
            url_patterns: Vec::new(),
            supports_pull_requests: false,
        }
    }

    fn match_url(_url: String) -> Option<RepoRef> {
        None
    }

    fn clone_spec(_url: String) -> Result<CloneSpec, PluginError> {
        Err(PluginError::Unsupported("clone-spec".to_string()))
    }

    fn create_pull_request(_input: PullRequestInput) -> Result<PullRequest, PluginError> {
        Err(PluginError::Unsupported("create-pull-request".to_string()))
    }

    fn parse_webhook(_input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
        Ok(None)
    }
}

export!(Chatty);
