//! Flotilla's built-in GitLab provider: a `vcs-provider` Wasm component for gitlab.com and
//! self-managed GitLab.
//!
//! The node asks it which project an agent's URL names (groups may nest: `group/sub/project`),
//! how to clone and push it (an https URL and a Basic auth header with the token as the
//! password of `oauth2`), and to open the agent's merge request through the REST API v4. The
//! token never enters the component: requests carry `{{secret:NAME}}` placeholders that the
//! host fills in.
//!
//! Settings: `hosts` (extra self-managed hosts), `api-base`, `token-secret` (default
//! `gitlab-token`). What is GitLab's own lives in [`logic`]; the rest is the support crate's
//! forge skeleton, and the WIT glue its `forge_provider!`.

mod logic;

flotilla_guest_support::forge_provider!(logic::GitLab);
