//! Prints the cost of plugin calls (see `flotilla_plugins::bench_calls`).
//!
//!     cargo run --release -p flotilla-plugins --example plugin_bench -- COMPONENT.wasm [CALLS]
//!
//! The test guests are built by `cargo test -p flotilla-plugins` into
//! `target/plugin-testdata/wasm32-wasip2/release/` (e.g. `well_behaved.wasm`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let mut arguments = std::env::args().skip(1);
    let Some(path) = arguments.next() else {
        eprintln!("usage: plugin_bench COMPONENT.wasm [CALLS]");
        return ExitCode::from(2);
    };
    let calls = match arguments.next().map(|text| text.parse::<usize>()) {
        None => 10_000,
        Some(Ok(calls)) => calls,
        Some(Err(error)) => {
            eprintln!("plugin_bench: CALLS must be a number: {error}");
            return ExitCode::from(2);
        }
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("plugin_bench: cannot read {path}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match flotilla_plugins::bench_calls(&bytes, calls).await {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("plugin_bench: {error}");
            ExitCode::FAILURE
        }
    }
}
