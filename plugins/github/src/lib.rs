//! Flotilla's built-in GitHub provider: a `vcs-provider` Wasm component for github.com and
//! GitHub Enterprise Server.
//!
//! The node asks it which repository an agent's URL names, how to clone and push it (an
//! https URL and a Basic auth header with the token as an `x-access-token` password), and to
//! open the agent's pull request through the REST API. The token never enters the component:
//! requests carry `{{secret:NAME}}` placeholders that the host fills in.
//!
//! Settings: `hosts` (extra GitHub Enterprise hosts), `api-base`, `token-secret` (default
//! `github-token`). What is GitHub's own lives in [`logic`]; the rest is the support crate's
//! forge skeleton, and the WIT glue its `forge_provider!`.

mod logic;

flotilla_guest_support::forge_provider!(logic::GitHub);
