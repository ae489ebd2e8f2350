//! flotilla-plugins against real guest components (built from `plugins/testdata` for
//! wasm32-wasip2 on first use) and a loopback forge. One binary, so wasmtime links once.
// An integration-test crate: its helpers fail the test by panicking, as its tests do, and
// clippy's allow-unwrap-in-tests covers only `#[test]` functions and `#[cfg(test)]` items.
#![allow(clippy::unwrap_used)]

mod support;

mod load;
mod misbehaving;
mod tool;
mod vcs_provider;
mod versions;
