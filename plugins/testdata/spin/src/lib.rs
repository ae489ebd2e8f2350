//! Misbehaves: `info` never returns (the host must stop it by fuel or by the clock).

wit_bindgen::generate!({ path: "../../wit", world: "vcs-provider" });

struct Spin;

impl Guest for Spin {
    fn info() -> ProviderInfo {
        let mut counter: u64 = 0;
        loop {
            counter = std::hint::black_box(counter.wrapping_add(1));
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

export!(Spin);
