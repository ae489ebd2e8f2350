//! Pure helpers shared by Flotilla's built-in VCS-provider plugins (GitHub, GitLab, Bitbucket,
//! Gitea/Forgejo and plain git).
//!
//! A provider plugin is a Wasm component that the node asks which repository a URL names, how
//! to clone it and how to open a pull request on it. The four forge providers share one
//! skeleton, [`forge`]: each implements [`Forge`] with only its forge's API calls and answers,
//! and the skeleton does the rest. Below it: repository URL parsing ([`RemoteUrl`]), forge
//! repositories ([`ForgeRepository`]), the admin's settings ([`Settings`]), requests
//! ([`HttpRequest`]), reading a forge's JSON answers and error bodies ([`Failure`]), and
//! webhooks. None of it depends on `wit-bindgen`, so it is unit-tested natively; a plugin's
//! `lib.rs` only converts between these types and the generated WIT bindings
//! ([`forge_provider!`] is that glue for the forges, [`provider_bindings!`] its conversions).

mod error;
pub mod forge;
mod glue;
mod http;
mod json;
mod pull_requests;
mod remote_url;
mod repository;
mod settings;
mod types;
mod webhook;

pub use error::{reason_phrase, refusal_with_failed_lookup, remote_failure, Failure, MAX_REMOTE_MESSAGE_CHARS};
pub use forge::{Forge, WebhookDetails};
pub use http::{encode_path_component, header, query_string, HttpRequest, HttpResponse};
pub use json::{json_string, json_u64, parse_json, render_message, rendered_field};
pub use pull_requests::{created_pull_request, found_pull_request, LookupAnswer, LookupReading, PullRequestFields};
pub use remote_url::{is_loopback_host, parse_remote_url, split_host_port, RemoteUrl, Scheme};
pub use repository::{is_plain_name, owner_and_name, ForgeRepository};
pub use settings::{Settings, API_BASE_SETTING, HOSTS_SETTING, TOKEN_SECRET_SETTING, USERNAME_SETTING};
pub use types::{CloneSpec, PullRequest, PullRequestInput, RepoRef, WebhookEvent};
pub use webhook::{branch_of_ref, webhook_json, WebhookKind};
