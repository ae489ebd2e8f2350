//! Builds the built-in provider guests (`plugins/NAME`) for `wasm32-wasip2` and copies the
//! components into `OUT_DIR`, with `builtin_plugins.rs` listing them for `include!`.
//!
//! The guests are standalone packages (each with its own `[workspace]` and `Cargo.lock`),
//! built by a nested `cargo build --release` into one shared target directory beside the outer
//! build's profile directories (`target/wasm-plugins`): never the outer build's own target
//! directory, whose lock the outer cargo holds while this script runs. Environment that the
//! outer build sets for its build scripts and that would change the nested build (flags meant
//! for the host target, clippy's wrapper, a `--target`) is removed, so a `cargo clippy` and a
//! `cargo build` share the guests' artefacts instead of rebuilding them in turn. The outer
//! jobserver (`CARGO_MAKEFLAGS`) is kept on purpose: the nested cargo then takes its job
//! slots from the same pool and does not oversubscribe the machine.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests, in the order the node should consult them: plain git claims every URL, so it
/// comes last.
const GUESTS: &[&str] = &["github", "gitlab", "bitbucket", "gitea", "git"];
const WASM_TARGET: &str = "wasm32-wasip2";

/// Variables the outer cargo sets (or a user sets for the outer build) that must not reach
/// the nested one.
const LEAKING_ENVIRONMENT: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_BUILD_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_PROFILE_RELEASE_DEBUG",
    "CARGO_PROFILE_RELEASE_OPT_LEVEL",
    "CARGO_PROFILE_RELEASE_LTO",
    "CARGO_PROFILE_RELEASE_CODEGEN_UNITS",
    "CARGO_PROFILE_RELEASE_STRIP",
    "CARGO_PROFILE_RELEASE_PANIC",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let plugins_dir = manifest_dir
        .parent()
        .expect("plugins/builtin lives in the plugins directory")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", plugins_dir.join("wit").display());
    // The helpers are only ever a dependency: their own Cargo.lock plays no part (and a
    // missing file named here would make cargo rerun this script on every build).
    watch_paths(&manifest_dir.join("guest-support"), &["src", "Cargo.toml"]);
    for guest in GUESTS {
        watch_paths(&plugins_dir.join(guest), &["src", "Cargo.toml", "Cargo.lock"]);
    }

    check_wasm_target_installed();

    let wasm_target_dir = shared_wasm_target_dir(&out_dir);
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut listing = String::from("pub const BUILTIN: &[Builtin] = &[\n");
    for guest in GUESTS {
        let guest_dir = plugins_dir.join(guest);
        let manifest = guest_dir.join("Cargo.toml");
        let mut command = Command::new(&cargo);
        for variable in LEAKING_ENVIRONMENT {
            command.env_remove(variable);
        }
        command
            .args(["build", "--release", "--target", WASM_TARGET, "--manifest-path"])
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", &wasm_target_dir);
        let status = command
            .status()
            .unwrap_or_else(|error| panic!("could not run {cargo:?} to build the {guest} plugin: {error}"));
        if !status.success() {
            panic!(
                "building the built-in {guest} plugin failed ({status}): cargo build --release --target {WASM_TARGET} \
                 --manifest-path {}; its errors are above",
                manifest.display()
            );
        }

        let artefact = format!("flotilla_plugin_{}.wasm", guest.replace('-', "_"));
        let built = wasm_target_dir.join(WASM_TARGET).join("release").join(&artefact);
        let embedded = out_dir.join(format!("{guest}.wasm"));
        fs::copy(&built, &embedded)
            .unwrap_or_else(|error| panic!("could not copy {} to {}: {error}", built.display(), embedded.display()));
        let version = package_version(&manifest);
        listing.push_str(&format!(
            "    Builtin {{ name: {guest:?}, version: {version:?}, bytes: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{guest}.wasm\")) }},\n"
        ));
    }
    listing.push_str("];\n");
    fs::write(out_dir.join("builtin_plugins.rs"), listing).expect("could not write builtin_plugins.rs");
}

/// Reruns this script when `entries` of `crate_dir` change: sources, manifest, lock file, never
/// the target directory the nested build writes.
fn watch_paths(crate_dir: &Path, entries: &[&str]) {
    for entry in entries {
        println!("cargo:rerun-if-changed={}", crate_dir.join(entry).display());
    }
}

/// Fails the build with the fix when the toolchain cannot build for `wasm32-wasip2`.
fn check_wasm_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .unwrap_or_else(|error| panic!("could not run {rustc:?} --print sysroot: {error}"));
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let target_libraries = sysroot.join("lib").join("rustlib").join(WASM_TARGET).join("lib");
    if !target_libraries.is_dir() {
        panic!(
            "the Rust target {WASM_TARGET} is not installed (no {}); the built-in VCS provider plugins are built \
             for it: run scripts/setup (or `rustup target add {WASM_TARGET}`)",
            target_libraries.display()
        );
    }
}

/// `target/wasm-plugins` (beside `target/debug` and `target/release`) when `OUT_DIR` has
/// cargo's usual layout `<target>/<profile>/build/<package>-<hash>/out`, so that every profile
/// and every `cargo clippy` shares one guest build; otherwise a directory inside `OUT_DIR`.
fn shared_wasm_target_dir(out_dir: &Path) -> PathBuf {
    let build_dir = out_dir.parent().and_then(Path::parent);
    match build_dir {
        Some(build_dir) if build_dir.file_name().is_some_and(|name| name == "build") => build_dir
            .parent()
            .and_then(Path::parent)
            .map(|target_dir| target_dir.join("wasm-plugins"))
            .unwrap_or_else(|| out_dir.join("wasm-plugins")),
        _ => out_dir.join("wasm-plugins"),
    }
}

/// The `version` of the `[package]` in `manifest`.
fn package_version(manifest: &Path) -> String {
    let text =
        fs::read_to_string(manifest).unwrap_or_else(|error| panic!("could not read {}: {error}", manifest.display()));
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
            continue;
        }
        if !in_package {
            continue;
        }
        if let Some(value) = line.strip_prefix("version") {
            if let Some(value) = value.trim_start().strip_prefix('=') {
                return value.trim().trim_matches('"').to_string();
            }
        }
    }
    panic!("{} has no [package] version", manifest.display());
}
