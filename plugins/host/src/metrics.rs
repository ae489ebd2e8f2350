//! The plugin host's metrics: their names (one home, Prometheus style) and descriptions. They
//! are recorded through the `metrics` facade, so they cost an atomic load until a process
//! installs a recorder; [`describe`] registers their help text with it.

use ::metrics::{describe_counter, Unit};

/// Components compiled by the compiler (not served from the memory or disk cache). The same
/// figure per host is [`crate::PluginHost::compile_count`].
pub const PLUGIN_COMPILES_TOTAL: &str = "flotilla_plugin_compiles_total";
/// Components whose compiled code came from the disk cache instead of the compiler.
pub const PLUGIN_DISK_LOADS_TOTAL: &str = "flotilla_plugin_disk_loads_total";
/// Compiled code written to the disk cache, by `outcome`: `written` or `failed` (a failure
/// costs only a compile at the next start).
pub const PLUGIN_DISK_CACHE_WRITES_TOTAL: &str = "flotilla_plugin_disk_cache_writes_total";
/// The label of [`PLUGIN_DISK_CACHE_WRITES_TOTAL`].
pub const DISK_CACHE_WRITE_OUTCOME_LABEL: &str = "outcome";

pub(crate) fn record_disk_cache_write(written: bool) {
    let outcome = if written { "written" } else { "failed" };
    ::metrics::counter!(PLUGIN_DISK_CACHE_WRITES_TOTAL, DISK_CACHE_WRITE_OUTCOME_LABEL => outcome).increment(1);
}

/// Calls into plugins, by `plugin` (its name), `function` and `outcome` (`ok` or `error`).
pub const PLUGIN_CALLS_TOTAL: &str = "flotilla_plugin_calls_total";
/// Wasmtime fuel (about one unit per Wasm instruction) that plugin calls burnt, by `plugin`
/// and `function`.
pub const PLUGIN_FUEL_CONSUMED_TOTAL: &str = "flotilla_plugin_fuel_consumed_total";

pub(crate) fn record_call(plugin: &str, function: &'static str, succeeded: bool) {
    let outcome = if succeeded { "ok" } else { "error" };
    ::metrics::counter!(PLUGIN_CALLS_TOTAL, "plugin" => plugin.to_string(), "function" => function, "outcome" => outcome)
        .increment(1);
}

pub(crate) fn record_fuel(plugin: &str, function: &'static str, fuel: u64) {
    ::metrics::counter!(PLUGIN_FUEL_CONSUMED_TOTAL, "plugin" => plugin.to_string(), "function" => function)
        .increment(fuel);
}

/// Registers the help text of every plugin-host metric with the installed recorder.
pub fn describe() {
    describe_counter!(
        PLUGIN_CALLS_TOTAL,
        Unit::Count,
        "Calls into plugins, by plugin, function and outcome (ok or error)."
    );
    describe_counter!(
        PLUGIN_FUEL_CONSUMED_TOTAL,
        Unit::Count,
        "Wasm fuel (about one unit per instruction) burnt by plugin calls, by plugin and function."
    );
    describe_counter!(
        PLUGIN_COMPILES_TOTAL,
        Unit::Count,
        "Plugin components compiled (loads served from the memory or disk cache do not count)."
    );
    describe_counter!(
        PLUGIN_DISK_LOADS_TOTAL,
        Unit::Count,
        "Plugin components whose compiled code was read from the disk cache instead of compiled."
    );
    describe_counter!(
        PLUGIN_DISK_CACHE_WRITES_TOTAL,
        Unit::Count,
        "Compiled plugin code written to the disk cache, by outcome: written or failed."
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ::metrics::Key;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};

    use super::*;
    use crate::{HostConfig, NoSecrets, PluginHost};

    #[test]
    fn compiling_a_component_counts_even_when_it_then_fails_validation() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let component = wat::parse_str("(component)").expect("an empty component");
        ::metrics::with_local_recorder(&recorder, || {
            let host = PluginHost::new(HostConfig::default(), Arc::new(NoSecrets)).expect("a plugin host");
            // An empty component compiles, then fails validation (it exports no world).
            assert!(host.load("empty", "1", &component, Vec::new()).is_err());
            assert_eq!(host.compile_count(), 1);
        });
        let compiles = CompositeKey::new(MetricKind::Counter, Key::from_static_name(PLUGIN_COMPILES_TOTAL));
        let counters = snapshotter.snapshot().into_hashmap();
        assert_eq!(
            counters.get(&compiles).map(|(_, _, value)| value),
            Some(&DebugValue::Counter(1))
        );
    }
}
