//! Host bindings of the two plugin worlds, generated from `plugins/wit`. The tool world reuses the
//! vcs world's `types`, `http`, `log` and `settings` modules, so one implementation of each import serves both.

pub(crate) mod vcs_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "vcs-provider",
        imports: { "flotilla:plugin/http.send": async },
        exports: { default: async },
    });
}

pub(crate) mod tool_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "tool",
        exports: { default: async },
        with: {
            "flotilla:plugin/types": super::vcs_world::flotilla::plugin::types,
            "flotilla:plugin/http": super::vcs_world::flotilla::plugin::http,
            "flotilla:plugin/log": super::vcs_world::flotilla::plugin::log,
            "flotilla:plugin/settings": super::vcs_world::flotilla::plugin::settings,
        },
    });
}
