//! The WIT glue of a built-in provider, as macros expanded in the guest crate (the bindings are
//! generated there, from `../wit`): [`provider_bindings!`] generates the bindings and the
//! conversions between them and this crate's plain types, and [`forge_provider!`] adds the
//! exported `Guest` of a [`crate::Forge`], which asks the [`crate::forge`] skeleton for every
//! decision and sends its HTTP requests through the host.

/// The WIT bindings of the `vcs-provider` world (module `bindings`), the imports a provider's
/// `Guest` uses, and conversions from this crate's types to the generated ones: `repo_ref`,
/// `clone_spec`, `pull_request_input` (the other way), `pull_request`, `http_request`,
/// `http_response` (the other way), `webhook_event` and `plugin_error`.
#[macro_export]
macro_rules! provider_bindings {
    () => {
        mod bindings {
            // Generated code; its lowered import functions take many arguments.
            #![allow(clippy::too_many_arguments)]
            wit_bindgen::generate!({ world: "vcs-provider", path: "../wit" });
        }

        // A provider uses some of these; which ones depends on the provider.
        #[allow(unused_imports)]
        use bindings::flotilla::plugin::types::{Header, HttpRequest, HttpResponse};
        #[allow(unused_imports)]
        use bindings::flotilla::plugin::vcs::RemoteError;
        #[allow(unused_imports)]
        use bindings::flotilla::plugin::{http, settings};
        // The world's `use vcs.{...}` puts the provider types at the top of the bindings.
        #[allow(unused_imports)]
        use bindings::{
            CloneSpec, Guest, PluginError, ProviderInfo, PullRequest, PullRequestInput, RepoRef, WebhookEvent, WebhookInput,
        };
        use $crate as support;

        $crate::wit_conversions!();
    };
}

/// Conversions between this crate's plain types and the generated WIT ones, expanded beside
/// the bindings by [`provider_bindings!`]; each provider uses some of them.
#[doc(hidden)]
#[macro_export]
macro_rules! wit_conversions {
    () => {
        #[allow(dead_code)]
        fn repo_ref(repository: support::RepoRef) -> RepoRef {
            RepoRef {
                host: repository.host,
                owner: repository.owner,
                name: repository.name,
                web_url: repository.web_url,
            }
        }

        #[allow(dead_code)]
        fn clone_spec(spec: support::CloneSpec) -> CloneSpec {
            CloneSpec {
                url: spec.url,
                auth_header: spec.auth_header.map(|(name, value)| Header { name, value }),
            }
        }

        #[allow(dead_code)]
        fn pull_request_input(input: PullRequestInput) -> support::PullRequestInput {
            support::PullRequestInput {
                repository_url: input.repository_url,
                head_branch: input.head_branch,
                base_branch: input.base_branch,
                title: input.title,
                body: input.body,
                draft: input.draft,
            }
        }

        #[allow(dead_code)]
        fn pull_request(pull_request: support::PullRequest) -> PullRequest {
            PullRequest {
                url: pull_request.url,
                number: pull_request.number,
            }
        }

        #[allow(dead_code)]
        fn http_request(request: support::HttpRequest) -> HttpRequest {
            HttpRequest {
                method: request.method,
                url: request.url,
                headers: request
                    .headers
                    .into_iter()
                    .map(|(name, value)| Header { name, value })
                    .collect(),
                body: request.body,
            }
        }

        #[allow(dead_code)]
        fn http_response(response: HttpResponse) -> support::HttpResponse {
            support::HttpResponse {
                status: response.status,
                body: response.body,
            }
        }

        #[allow(dead_code)]
        fn webhook_event(event: support::WebhookEvent) -> WebhookEvent {
            WebhookEvent {
                kind: event.kind,
                repository_url: event.repository_url,
                branch: event.branch,
                pull_request_number: event.pull_request_number,
                actor: event.actor,
            }
        }

        #[allow(dead_code)]
        fn plugin_error(failure: support::Failure) -> PluginError {
            match failure {
                support::Failure::Unsupported(message) => PluginError::Unsupported(message),
                support::Failure::InvalidInput(message) => PluginError::InvalidInput(message),
                support::Failure::Remote { status, message } => PluginError::Remote(RemoteError { status, message }),
            }
        }
    };
}

/// The whole `lib.rs` of a forge provider below the module that defines its [`crate::Forge`]:
/// `forge_provider!(logic::GitHub);` exports a `Guest` whose every function is the
/// [`crate::forge`] skeleton's for that forge, with its requests sent by the host's `http.send`.
#[macro_export]
macro_rules! forge_provider {
    ($forge:ty) => {
        $crate::provider_bindings!();

        struct Provider;

        fn read_settings() -> support::Settings {
            support::forge::read_settings::<$forge>(settings::get)
        }

        impl Guest for Provider {
            fn info() -> ProviderInfo {
                ProviderInfo {
                    name: <$forge as support::Forge>::NAME.to_string(),
                    display_name: <$forge as support::Forge>::DISPLAY_NAME.to_string(),
                    url_patterns: <$forge as support::Forge>::url_patterns(),
                    supports_pull_requests: true,
                }
            }

            fn match_url(url: String) -> Option<RepoRef> {
                support::forge::match_url::<$forge>(&url, &read_settings()).map(repo_ref)
            }

            fn clone_spec(url: String) -> Result<CloneSpec, PluginError> {
                support::forge::clone_spec::<$forge>(&url, &read_settings())
                    .map(clone_spec)
                    .map_err(plugin_error)
            }

            fn create_pull_request(input: PullRequestInput) -> Result<PullRequest, PluginError> {
                let send = |request| http::send(&http_request(request)).map(http_response);
                support::forge::create_pull_request::<$forge, _>(&pull_request_input(input), &read_settings(), send)
                    .map(pull_request)
                    .map_err(|failure| match failure {
                        support::forge::CreateFailure::Failure(failure) => plugin_error(failure),
                        support::forge::CreateFailure::Http(error) => PluginError::Http(error),
                    })
            }

            fn parse_webhook(input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
                let headers: Vec<(String, String)> = input
                    .headers
                    .into_iter()
                    .map(|header| (header.name, header.value))
                    .collect();
                support::forge::parse_webhook::<$forge>(&headers, &input.body)
                    .map(|event| event.map(webhook_event))
                    .map_err(plugin_error)
            }
        }

        bindings::export!(Provider with_types_in bindings);
    };
}
