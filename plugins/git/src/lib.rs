//! Flotilla's built-in plain git provider: a `vcs-provider` Wasm component that takes any
//! `file://`, `http(s)://`, `ssh://` or scp-like repository URL the forge providers do not
//! claim, so that an agent can work on a repository on any git server. It clones and pushes
//! but cannot open pull requests.
//!
//! Settings: `username` and `token-secret` (no default): when both are set, http(s) clones
//! to a host listed in `hosts` carry a Basic auth header with that user and the token as the
//! password (any other host gets none). The decisions live
//! in [`logic`]; this file is its `Guest`, with the support crate's `provider_bindings!`
//! converting to and from the WIT bindings.

mod logic;

flotilla_guest_support::provider_bindings!();

struct Provider;

fn read_settings() -> support::Settings {
    support::Settings::read(settings::get, logic::NO_DEFAULT_TOKEN_SECRET)
}

impl Guest for Provider {
    fn info() -> ProviderInfo {
        ProviderInfo {
            name: logic::NAME.to_string(),
            display_name: logic::DISPLAY_NAME.to_string(),
            url_patterns: logic::url_patterns(),
            supports_pull_requests: false,
        }
    }

    fn match_url(url: String) -> Option<RepoRef> {
        logic::match_url(&url).map(repo_ref)
    }

    fn clone_spec(url: String) -> Result<CloneSpec, PluginError> {
        logic::clone_spec(&url, &read_settings())
            .map(clone_spec)
            .map_err(plugin_error)
    }

    fn create_pull_request(_input: PullRequestInput) -> Result<PullRequest, PluginError> {
        Err(plugin_error(logic::pull_requests_unsupported()))
    }

    fn parse_webhook(_input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
        // A plain git server sends no deliveries this provider could read.
        Ok(None)
    }
}

bindings::export!(Provider with_types_in bindings);
