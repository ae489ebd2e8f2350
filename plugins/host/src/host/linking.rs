//! What a plugin's instance is linked against: the plugin interfaces the host implements, and
//! WASI as far as a `wasm32-wasip2` guest's standard library needs it.

use wasmtime::component::{Linker, ResourceTable};

use crate::bindings::tool_world;
use crate::bindings::vcs_world::{self, flotilla::plugin::log as wit_log};
use crate::state::HostState;

/// The plugin's own interfaces: `http`, `log`, `settings`, and the type-only `types`, `vcs`,
/// `tool-types`.
pub(super) fn add_plugin_interfaces(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    vcs_world::flotilla::plugin::types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    vcs_world::flotilla::plugin::http::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    wit_log::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    vcs_world::flotilla::plugin::settings::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    vcs_world::flotilla::plugin::vcs::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    tool_world::flotilla::plugin::tool_types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    Ok(())
}

/// WASI 0.2 for a `wasm32-wasip2` guest's standard library, minus `wasi:sockets`: the same
/// interfaces as `wasmtime_wasi::p2::add_to_linker_async` otherwise. What they can reach is
/// decided by the empty `WasiCtx` of each call (see `HostState::new`).
pub(super) fn add_sandboxed_wasi(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
    use wasmtime_wasi::random::WasiRandom;
    use wasmtime_wasi::WasiView;

    struct HasTable;
    impl wasmtime::component::HasData for HasTable {
        type Data<'a> = &'a mut ResourceTable;
    }
    fn table(state: &mut HostState) -> &mut ResourceTable {
        state.ctx().table
    }
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<HostState, HasTable>(linker, table)?;
    wasmtime_wasi_io::bindings::wasi::io::poll::add_to_linker::<HostState, HasTable>(linker, table)?;
    wasmtime_wasi_io::bindings::wasi::io::streams::add_to_linker::<HostState, HasTable>(linker, table)?;

    let l = linker;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    filesystem::types::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
    filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
    random::random::add_to_linker::<HostState, WasiRandom>(l, |state| state.ctx().ctx.random())?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(l, |state| state.ctx().ctx.random())?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, |state| state.ctx().ctx.random())?;
    cli::exit::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::environment::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    Ok(())
}
