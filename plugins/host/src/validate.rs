//! Which components are plugins: the imports the host offers and the exports each world needs.
//! Works on names and item kinds only, so the rules are tested without compiling anything.
//! Its [`ValidationError`] names what is wrong; the host adds which plugin it is.

use crate::types::PluginKind;

/// Why a component is not a plugin, as far as its imports and exports tell.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ValidationError {
    /// The component imports something no plugin is offered.
    #[error("imports `{import}`, which the host does not offer (it offers {OFFERED_IMPORTS})")]
    ImportNotOffered { import: String },

    /// The component imports an interface of the other world.
    #[error("imports `{import}`, which world {world} does not offer")]
    ImportNotInWorld { import: String, world: PluginKind },

    #[error("exports neither world vcs-provider nor world tool; found exports: [{found}]")]
    NoWorld { found: String },

    #[error("exports functions of both worlds vcs-provider and tool")]
    BothWorlds,

    #[error("exports do not match world {world}: {mismatch}")]
    ExportsMismatch {
        world: PluginKind,
        mismatch: ExportMismatch,
    },
}

/// How a component's exports differ from those of the world it targets.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ExportMismatch {
    #[error("missing export `{0}`")]
    Missing(&'static str),

    #[error("export `{0}` is not a function")]
    NotAFunction(&'static str),

    #[error("unexpected export `{0}`")]
    Unexpected(String),
}

/// What a component item is, as far as these rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ItemKind {
    Instance,
    Function,
    Type,
    Other,
}

/// The plugin's own interfaces, by world. `types` holds records both worlds use.
const VCS_PROVIDER_INTERFACES: &[&str] = &["types", "http", "log", "settings", "vcs"];
const TOOL_INTERFACES: &[&str] = &["types", "http", "log", "settings", "tool-types"];

/// WASI 0.2 interfaces a `wasm32-wasip2` Rust guest imports through its standard library, all
/// sandboxed by the host: empty environment and arguments, no preopened directories (so no files),
/// stdin closed, stdout and stderr captured into a small buffer, clocks and randomness as usual.
/// `wasi:sockets` and `wasi:http` are not offered: a plugin's only way out is `flotilla:plugin/http`.
const WASI_INTERFACES: &[(&str, &[&str])] = &[
    (
        "cli",
        &[
            "environment",
            "exit",
            "stdin",
            "stdout",
            "stderr",
            "terminal-input",
            "terminal-output",
            "terminal-stdin",
            "terminal-stdout",
            "terminal-stderr",
        ],
    ),
    ("io", &["error", "poll", "streams"]),
    ("clocks", &["wall-clock", "monotonic-clock"]),
    ("random", &["random", "insecure", "insecure-seed"]),
    ("filesystem", &["types", "preopens"]),
];

/// For error messages: what a plugin may import.
pub(crate) const OFFERED_IMPORTS: &str =
    "flotilla:plugin/{types,http,log,settings,vcs,tool-types}@0.1 and a sandboxed \
     wasi:{cli,io,clocks,random,filesystem}@0.2 without files, network or environment";

const VCS_PROVIDER_EXPORTS: &[&str] = &[
    "info",
    "match-url",
    "clone-spec",
    "create-pull-request",
    "parse-webhook",
];
const TOOL_EXPORTS: &[&str] = &["describe", "invoke"];

/// `namespace:package/interface@version`, split.
struct InterfaceName<'a> {
    namespace: &'a str,
    package: &'a str,
    interface: &'a str,
    version: Option<&'a str>,
}

fn parse_interface_name(name: &str) -> Option<InterfaceName<'_>> {
    let (path, version) = match name.split_once('@') {
        Some((path, version)) => (path, Some(version)),
        None => (name, None),
    };
    let (namespace, rest) = path.split_once(':')?;
    let (package, interface) = rest.split_once('/')?;
    Some(InterfaceName {
        namespace,
        package,
        interface,
        version,
    })
}

fn is_wasi_interface(name: &InterfaceName<'_>) -> bool {
    name.namespace == "wasi"
        && name.version.is_some_and(|version| version.starts_with("0.2."))
        && WASI_INTERFACES
            .iter()
            .any(|(package, interfaces)| *package == name.package && interfaces.contains(&name.interface))
}

fn flotilla_interface<'a>(name: &InterfaceName<'a>) -> Option<&'a str> {
    let compatible = name.namespace == "flotilla"
        && name.package == "plugin"
        && name.version.is_some_and(|version| version.starts_with("0.1."));
    compatible.then_some(name.interface)
}

/// Whether the host offers `import` to some plugin; the first import it does not offer is the
/// error.
pub(crate) fn check_imports_offered<'a>(
    imports: impl IntoIterator<Item = (&'a str, ItemKind)>,
) -> Result<(), ValidationError> {
    for (name, kind) in imports {
        let offered = match kind {
            // Types alone grant nothing.
            ItemKind::Type => true,
            ItemKind::Instance => parse_interface_name(name).is_some_and(|parsed| {
                is_wasi_interface(&parsed)
                    || flotilla_interface(&parsed).is_some_and(|interface| {
                        VCS_PROVIDER_INTERFACES.contains(&interface) || TOOL_INTERFACES.contains(&interface)
                    })
            }),
            ItemKind::Function | ItemKind::Other => false,
        };
        if !offered {
            return Err(ValidationError::ImportNotOffered {
                import: name.to_string(),
            });
        }
    }
    Ok(())
}

/// The first of the plugin's own interfaces that `kind`'s world does not offer.
pub(crate) fn check_imports_in_world<'a>(
    kind: PluginKind,
    imports: impl IntoIterator<Item = (&'a str, ItemKind)>,
) -> Result<(), ValidationError> {
    let world_interfaces = match kind {
        PluginKind::VcsProvider => VCS_PROVIDER_INTERFACES,
        PluginKind::Tool => TOOL_INTERFACES,
    };
    for (name, _) in imports {
        if let Some(interface) = parse_interface_name(name).as_ref().and_then(flotilla_interface) {
            if !world_interfaces.contains(&interface) {
                return Err(ValidationError::ImportNotInWorld {
                    import: name.to_string(),
                    world: kind,
                });
            }
        }
    }
    Ok(())
}

/// The world a component's exports target: all of its functions, nothing else but types.
pub(crate) fn world_of_exports<'a>(
    exports: impl IntoIterator<Item = (&'a str, ItemKind)>,
) -> Result<PluginKind, ValidationError> {
    let exports: Vec<(&str, ItemKind)> = exports.into_iter().collect();
    let exports_any_of = |names: &[&str]| exports.iter().any(|(name, _)| names.contains(name));
    let kind = match (exports_any_of(VCS_PROVIDER_EXPORTS), exports_any_of(TOOL_EXPORTS)) {
        (true, true) => return Err(ValidationError::BothWorlds),
        (true, false) => PluginKind::VcsProvider,
        (false, true) => PluginKind::Tool,
        (false, false) => {
            let found: Vec<&str> = exports.iter().map(|(name, _)| *name).collect();
            return Err(ValidationError::NoWorld {
                found: found.join(", "),
            });
        }
    };
    let expected = match kind {
        PluginKind::VcsProvider => VCS_PROVIDER_EXPORTS,
        PluginKind::Tool => TOOL_EXPORTS,
    };
    let mismatch = |mismatch: ExportMismatch| ValidationError::ExportsMismatch { world: kind, mismatch };
    for wanted in expected {
        match exports.iter().find(|(name, _)| name == wanted) {
            None => return Err(mismatch(ExportMismatch::Missing(wanted))),
            Some((_, ItemKind::Function)) => {}
            Some(_) => return Err(mismatch(ExportMismatch::NotAFunction(wanted))),
        }
    }
    for (name, item) in &exports {
        if *item != ItemKind::Type && !expected.contains(name) {
            return Err(mismatch(ExportMismatch::Unexpected(name.to_string())));
        }
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ItemKind::{Function, Instance, Type};

    #[test]
    fn a_wasip2_guest_imports_are_offered() {
        let imports = [
            ("wasi:cli/environment@0.2.6", Instance),
            ("wasi:io/streams@0.2.0", Instance),
            ("wasi:clocks/monotonic-clock@0.2.3", Instance),
            ("wasi:random/insecure-seed@0.2.6", Instance),
            ("wasi:filesystem/preopens@0.2.6", Instance),
            ("flotilla:plugin/http@0.1.0", Instance),
            ("flotilla:plugin/settings@0.1.0", Instance),
            ("flotilla:plugin/vcs@0.1.0", Instance),
            ("provider-info", Type),
        ];
        assert_eq!(check_imports_offered(imports), Ok(()));
    }

    fn not_offered(import: &str) -> ValidationError {
        ValidationError::ImportNotOffered {
            import: import.to_string(),
        }
    }

    #[test]
    fn network_and_unknown_imports_are_named() {
        for name in [
            "wasi:sockets/tcp@0.2.0",
            "wasi:http/outgoing-handler@0.2.0",
            "wasi:cli/environment@0.3.0",
            "wasi:cli/run@0.2.0",
            "flotilla:plugin/http@0.2.0",
            "flotilla:plugin/secrets@0.1.0",
            "evil:net/raw",
        ] {
            assert_eq!(check_imports_offered([(name, Instance)]), Err(not_offered(name)));
        }
        assert_eq!(check_imports_offered([("steal", Function)]), Err(not_offered("steal")));
    }

    #[test]
    fn a_world_does_not_offer_the_other_worlds_interfaces() {
        assert_eq!(
            check_imports_in_world(PluginKind::Tool, [("flotilla:plugin/vcs@0.1.0", Instance)]),
            Err(ValidationError::ImportNotInWorld {
                import: "flotilla:plugin/vcs@0.1.0".to_string(),
                world: PluginKind::Tool
            })
        );
        assert_eq!(
            check_imports_in_world(PluginKind::VcsProvider, [("flotilla:plugin/vcs@0.1.0", Instance)]),
            Ok(())
        );
    }

    #[test]
    fn exports_decide_the_world() {
        let vcs: Vec<_> = VCS_PROVIDER_EXPORTS.iter().map(|name| (*name, Function)).collect();
        assert_eq!(world_of_exports(vcs.clone()), Ok(PluginKind::VcsProvider));
        assert_eq!(
            world_of_exports([("describe", Function), ("invoke", Function)]),
            Ok(PluginKind::Tool)
        );
        let mut with_type = vcs.clone();
        with_type.push(("provider-info", Type));
        assert_eq!(world_of_exports(with_type), Ok(PluginKind::VcsProvider));
    }

    #[test]
    fn export_problems_are_precise() {
        assert_eq!(
            world_of_exports([("describe", Function)]),
            Err(ValidationError::ExportsMismatch {
                world: PluginKind::Tool,
                mismatch: ExportMismatch::Missing("invoke")
            })
        );
        assert_eq!(
            world_of_exports([("describe", Function), ("invoke", Function), ("extra", Function)]),
            Err(ValidationError::ExportsMismatch {
                world: PluginKind::Tool,
                mismatch: ExportMismatch::Unexpected("extra".to_string())
            })
        );
        assert_eq!(
            world_of_exports([("info", Function), ("invoke", Function)]),
            Err(ValidationError::BothWorlds)
        );
        assert_eq!(
            world_of_exports([("run", Function)]),
            Err(ValidationError::NoWorld {
                found: "run".to_string()
            })
        );
        assert_eq!(
            ValidationError::ExportsMismatch {
                world: PluginKind::Tool,
                mismatch: ExportMismatch::Missing("invoke")
            }
            .to_string(),
            "exports do not match world tool: missing export `invoke`"
        );
    }
}
