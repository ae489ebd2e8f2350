//! Version 2 of the "skiff" VCS provider: the source of `skiff`, with another [`MARKER`], so a
//! test can tell which version opened a pull request.

// The generated bindings of the WIT world have functions with many arguments.
#![allow(clippy::too_many_arguments)]

/// Sent as `opened_by` with every pull request.
const MARKER: &str = "skiff 2";

include!("../../skiff/src/provider.rs");
