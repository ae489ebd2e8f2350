//! Misbehaves: `info` allocates without end (the host must stop it at its memory limit).

wit_bindgen::generate!({ path: "../../wit", world: "vcs-provider" });

struct Hog;

impl Guest for Hog {
    fn info() -> ProviderInfo {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Touch every page so that nothing can be optimised away.
            hoard.push(std::hint::black_box(vec![0x5a; 1 << 20]));
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

export!(Hog);
