//! flotilla-plugins against real guest components (built from `plugins/testdata` for
//! wasm32-wasip2 on first use) and a loopback forge. One binary, so wasmtime links once.

mod support;

mod load;
mod misbehaving;
mod tool;
mod vcs_provider;
mod versions;
