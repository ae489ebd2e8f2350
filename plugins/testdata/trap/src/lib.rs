//! Misbehaves: `info` panics (a trap; the panic message reaches the host through stderr).

wit_bindgen::generate!({ path: "../../wit", world: "vcs-provider" });

struct Trap;

impl Guest for Trap {
    fn info() -> ProviderInfo {
        panic!("the trap guest panics on purpose");
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

export!(Trap);
