//! "skiff", a VCS provider for a made-up forge whose REST API a test serves on loopback. It
//! claims the repositories on the hosts of its `hosts` setting, clones with HTTP Basic
//! credentials (`username` setting and the `skiff-token` secret) and opens pull requests at
//! `{api-base}/api/repos/OWNER/NAME/pulls`, marking each with [`MARKER`] so that a test can tell
//! which version opened it. Opening is idempotent: refused because one already exists, it looks
//! the open one up (`GET` with `head` and `base`) and answers it. `skiff-v2` is the same provider with another marker.

// The generated bindings of the WIT world have functions with many arguments.
#![allow(clippy::too_many_arguments)]

/// Sent as `opened_by` with every pull request.
const MARKER: &str = "skiff 1";

include!("provider.rs");
