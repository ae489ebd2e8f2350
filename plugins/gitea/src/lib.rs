//! Flotilla's built-in Gitea and Forgejo provider: a `vcs-provider` Wasm component for
//! codeberg.org and self-hosted instances.
//!
//! The node asks it which repository an agent's URL names, how to clone and push it (an https
//! URL and a Basic auth header with the token as the password; Gitea does not check the user
//! name), and to open the agent's pull request through the REST API v1. The token never enters
//! the component: requests carry `{{secret:NAME}}` placeholders that the host fills in.
//!
//! Settings: `hosts` (extra self-hosted hosts), `api-base`, `token-secret` (default
//! `gitea-token`), `username` (the Basic auth user for git, default `flotilla`). What is
//! the forge's own lives in [`logic`]; the rest is the support crate's forge skeleton, and the
//! WIT glue its `forge_provider!`.

mod logic;

flotilla_guest_support::forge_provider!(logic::Gitea);
