//! Flotilla's built-in Bitbucket Cloud provider: a `vcs-provider` Wasm component for
//! bitbucket.org.
//!
//! The node asks it which repository an agent's URL names (`WORKSPACE/REPO_SLUG`), how to
//! clone and push it (an https URL and a Basic auth header with an access token as the
//! password of `x-token-auth`), and to open the agent's pull request through the REST API 2.0.
//! The token never enters the component: requests carry `{{secret:NAME}}` placeholders that
//! the host fills in.
//!
//! Settings: `hosts` (extra hosts, e.g. a loopback test forge), `api-base` (default
//! `https://api.bitbucket.org/2.0`), `token-secret` (default `bitbucket-token`). What is
//! Bitbucket's own lives in [`logic`]; the rest is the support crate's forge skeleton, and the
//! WIT glue its `forge_provider!`.

mod logic;

flotilla_guest_support::forge_provider!(logic::Bitbucket);
