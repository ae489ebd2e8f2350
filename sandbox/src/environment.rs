//! environment.json: how a repository wants its machine set up.
//!
//! [`parse`] is a pure function of the file's name and text; [`load`] finds the file in a
//! checkout (`.flotilla/environment.json`, else `.cursor/environment.json`, read as is for
//! compatibility). Known fields are typed; every other key is kept and reported as unsupported
//! rather than failing the agent. A malformed file fails with the file, line, column and field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::driver::BaseImage;
use crate::error::{EnvironmentError, SandboxError};
use crate::workspace_file::{read_workspace_file, MAX_WORKSPACE_CONFIG_FILE_BYTES};

pub const FLOTILLA_ENVIRONMENT_FILE: &str = ".flotilla/environment.json";
pub const CURSOR_ENVIRONMENT_FILE: &str = ".cursor/environment.json";
/// A larger environment.json is refused: it is configuration, not data.
pub const MAX_ENVIRONMENT_FILE_BYTES: u64 = MAX_WORKSPACE_CONFIG_FILE_BYTES;

/// A parsed environment.json.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct EnvironmentConfig {
    pub name: Option<String>,
    /// The user commands run as inside the machine; `None` means the image's default (root).
    pub user: Option<String>,
    /// Run once per (repository, install hash, base image); its disk state becomes a layer.
    pub install: Option<String>,
    /// Run on every boot, before the terminals.
    pub start: Option<String>,
    pub terminals: Vec<Terminal>,
    pub ports: Vec<Port>,
    /// The `snapshot` field of environment.json: an opaque id of another product's snapshot,
    /// from its settings. Kept (and part of the install hash), never used to find a layer:
    /// flotilla builds its own install layer from `install`.
    pub snapshot: Option<String>,
    pub build: Option<BuildConfig>,
    /// Paths of keys flotilla does not know (`agentCanUpdateSnapshot`, `terminals[0].ports`).
    pub unsupported: Vec<String>,
    /// The values of those keys, by path, so that nothing in the file is silently lost.
    pub unsupported_values: BTreeMap<String, serde_json::Value>,
}

/// A long-running process in the machine's tmux session: one window each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terminal {
    pub name: String,
    pub command: String,
    pub description: Option<String>,
    /// Whether `command` runs in a login shell (`sh -lc`, which reads the image's profile), as
    /// every terminal of an environment.json does. A command that starts a login shell itself
    /// (the built-in interactive shell) runs under `sh -c`, so the profile is read once.
    #[serde(default = "runs_in_login_shell")]
    pub login: bool,
    /// Started when first read or attached rather than at boot, when every terminal of the
    /// machine is so (the built-in interactive shell of a machine whose environment declares
    /// none): a machine nobody looks at runs no tmux, shell or profile. Terminals of an
    /// environment.json start at boot.
    #[serde(default)]
    pub on_demand: bool,
}

fn runs_in_login_shell() -> bool {
    true
}

impl Terminal {
    /// A terminal whose command runs in a login shell.
    pub fn new(name: impl Into<String>, command: impl Into<String>) -> Self {
        Terminal {
            name: name.into(),
            command: command.into(),
            description: None,
            login: true,
            on_demand: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    pub port: u16,
    pub name: Option<String>,
}

/// `build.dockerfile` / `build.context`: parsed and reported; the bwrap driver cannot build images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuildConfig {
    pub dockerfile: String,
    pub context: Option<String>,
}

impl EnvironmentConfig {
    /// SHA-256 (hex) of the whole configuration in a canonical form (sorted keys, no spaces).
    pub fn config_hash(&self) -> String {
        let value = serde_json::to_value(self).expect("an EnvironmentConfig always serialises");
        sha256_hex(canonical_json(&value).as_bytes())
    }

    /// SHA-256 (hex) of the fields that can change what `install` leaves on disk. The install
    /// layer is keyed by this, so editing a terminal or a port does not rebuild it.
    pub fn install_hash(&self) -> String {
        let value = serde_json::json!({
            "install": self.install,
            "user": self.user,
            "build": self.build,
            "snapshot": self.snapshot,
        });
        sha256_hex(canonical_json(&value).as_bytes())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// JSON with object keys sorted at every level, whatever map order serde_json was built with.
pub(crate) fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Parses environment.json text. `file_name` is only used in error messages.
pub fn parse(file_name: &str, text: &str) -> Result<EnvironmentConfig, EnvironmentError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let raw: RawEnvironment =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|error| convert_error(file_name, error))?;
    deserializer.end().map_err(|error| EnvironmentError {
        file: file_name.to_string(),
        line: Some(error.line()),
        column: Some(error.column()),
        field: None,
        message: "invalid JSON: unexpected text after the top-level object".to_string(),
    })?;
    Ok(raw.into_config())
}

/// Finds and parses a checkout's environment file: `.flotilla/environment.json` first, then
/// `.cursor/environment.json`. `Ok(None)` when neither exists. The checkout is the repository's
/// content, so the file is read with [`read_workspace_file`]: no symlink is followed, only a
/// regular file of at most [`MAX_ENVIRONMENT_FILE_BYTES`] is read. Blocking.
pub fn load(checkout: &Path) -> Result<Option<(PathBuf, EnvironmentConfig)>, SandboxError> {
    for relative in [FLOTILLA_ENVIRONMENT_FILE, CURSOR_ENVIRONMENT_FILE] {
        let Some(bytes) = read_workspace_file(checkout, relative, MAX_ENVIRONMENT_FILE_BYTES)? else {
            continue;
        };
        let text = String::from_utf8(bytes).map_err(|error| EnvironmentError {
            file: relative.to_string(),
            line: None,
            column: None,
            field: None,
            message: format!("the file is not UTF-8 text: {error}"),
        })?;
        let config = parse(relative, &text)?;
        return Ok(Some((checkout.join(relative), config)));
    }
    Ok(None)
}

/// What `flotilla env check DIR` prints: the checkout's plan on `base_image`, or the error.
/// A checkout without an environment file gets the defaults.
pub fn check(checkout: &Path, base_image: BaseImage) -> Result<Plan, SandboxError> {
    Ok(match load(checkout)? {
        Some((path, config)) => {
            let shown = path.strip_prefix(checkout).map(Path::to_path_buf).unwrap_or(path);
            Plan::new(Some(shown), base_image, config)
        }
        None => Plan::new(None, base_image, EnvironmentConfig::default()),
    })
}

fn convert_error(file_name: &str, error: serde_path_to_error::Error<serde_json::Error>) -> EnvironmentError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    let (line, column) = (inner.line(), inner.column());
    let full = inner.to_string();
    let bare = match full.rfind(" at line ") {
        Some(position) => full[..position].to_string(),
        None => full,
    };
    let field = (path != ".").then(|| path.clone());
    let subject = match &field {
        Some(field) => format!("{field:?}"),
        None => "the file".to_string(),
    };
    let message = match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof | serde_json::error::Category::Io => {
            match &field {
                Some(field) => format!("invalid JSON in {field:?}: {bare}"),
                None => format!("invalid JSON: {bare}"),
            }
        }
        serde_json::error::Category::Data => describe_data_error(&subject, &bare),
    };
    EnvironmentError {
        file: file_name.to_string(),
        line: (line > 0).then_some(line),
        column: (line > 0).then_some(column),
        field,
        message,
    }
}

/// Rephrases serde's `invalid type: string "x", expected a sequence` as
/// `"terminals" must be an array, found a string`.
fn describe_data_error(subject: &str, bare: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = bare.strip_prefix(prefix) {
            if let Some((unexpected, expected)) = rest.rsplit_once(", expected ") {
                return format!(
                    "{subject} must be {}, found {}",
                    describe_expected(expected),
                    describe_found(unexpected)
                );
            }
        }
    }
    format!("{subject} {bare}")
}

fn describe_found(unexpected: &str) -> String {
    let kind = unexpected.split_whitespace().next().unwrap_or(unexpected);
    match kind {
        "string" => "a string".to_string(),
        "integer" | "floating" => {
            let number = unexpected.split('`').nth(1);
            match number {
                Some(number) => format!("the number {number}"),
                None => "a number".to_string(),
            }
        }
        "boolean" => "a boolean".to_string(),
        "map" => "an object".to_string(),
        "sequence" => "an array".to_string(),
        "null" | "unit" => "null".to_string(),
        _ => unexpected.to_string(),
    }
}

fn describe_expected(expected: &str) -> String {
    match expected {
        "a sequence" => "an array".to_string(),
        "a map" => "an object".to_string(),
        "u16" => "a port number from 0 to 65535".to_string(),
        other => other.to_string(),
    }
}

// ---- deserialisation: hand-written visitors so that unknown keys are kept with their paths,
// ---- type errors keep serde_json's position, and duplicate keys are refused.

#[derive(Default)]
struct RawEnvironment {
    config: EnvironmentConfig,
}

impl RawEnvironment {
    fn into_config(self) -> EnvironmentConfig {
        let mut config = self.config;
        config.unsupported = config.unsupported_values.keys().cloned().collect();
        config
    }
}

fn duplicate<E: de::Error>(key: &str) -> E {
    E::custom(format_args!("has the key {key:?} twice"))
}

/// An optional string: `null` and a string of only spaces are the same as leaving the key out.
fn optional_text<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<String>, A::Error> {
    let value: Option<String> = map.next_value()?;
    Ok(value.filter(|text| !text.trim().is_empty()))
}

impl<'de> Deserialize<'de> for RawEnvironment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EnvironmentVisitor)
    }
}

struct EnvironmentVisitor;

impl<'de> Visitor<'de> for EnvironmentVisitor {
    type Value = RawEnvironment;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnvironment, A::Error> {
        let mut config = EnvironmentConfig::default();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(duplicate(&key));
            }
            match key.as_str() {
                "name" => config.name = optional_text(&mut map)?,
                "user" => config.user = optional_text(&mut map)?,
                "install" => config.install = optional_text(&mut map)?,
                "start" => config.start = optional_text(&mut map)?,
                "snapshot" => config.snapshot = optional_text(&mut map)?,
                "terminals" => {
                    let terminals: Option<Vec<RawTerminal>> = map.next_value()?;
                    for (index, terminal) in terminals.unwrap_or_default().into_iter().enumerate() {
                        for (extra_key, value) in terminal.extra {
                            config
                                .unsupported_values
                                .insert(format!("terminals[{index}].{extra_key}"), value);
                        }
                        config.terminals.push(terminal.terminal);
                    }
                }
                "ports" => {
                    let ports: Option<Vec<RawPort>> = map.next_value()?;
                    for (index, port) in ports.unwrap_or_default().into_iter().enumerate() {
                        for (extra_key, value) in port.extra {
                            config
                                .unsupported_values
                                .insert(format!("ports[{index}].{extra_key}"), value);
                        }
                        config.ports.push(port.port);
                    }
                }
                "build" => {
                    let build: Option<RawBuild> = map.next_value()?;
                    if let Some(build) = build {
                        for (extra_key, value) in build.extra {
                            config.unsupported_values.insert(format!("build.{extra_key}"), value);
                        }
                        config.build = Some(build.build);
                    }
                }
                _ => {
                    let value: serde_json::Value = map.next_value()?;
                    config.unsupported_values.insert(key, value);
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for terminal in &config.terminals {
            if !names.insert(terminal.name.as_str()) {
                return Err(de::Error::custom(format_args!(
                    "has two terminals named {:?}; terminal names must be unique",
                    terminal.name
                )));
            }
        }
        Ok(RawEnvironment { config })
    }
}

struct RawTerminal {
    terminal: Terminal,
    extra: BTreeMap<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for RawTerminal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TerminalVisitor)
    }
}

struct TerminalVisitor;

impl<'de> Visitor<'de> for TerminalVisitor {
    type Value = RawTerminal;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object with \"name\" and \"command\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTerminal, A::Error> {
        let (mut name, mut command, mut description) = (None, None, None);
        let mut extra = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(duplicate(&key));
            }
            match key.as_str() {
                "name" => name = Some(map.next_value::<String>()?),
                "command" => command = Some(map.next_value::<String>()?),
                "description" => description = optional_text(&mut map)?,
                _ => {
                    extra.insert(key, map.next_value::<serde_json::Value>()?);
                }
            }
        }
        let name = name.ok_or_else(|| de::Error::custom("is missing the field \"name\""))?;
        if name.trim().is_empty() {
            return Err(de::Error::custom("has an empty \"name\""));
        }
        let command = command.ok_or_else(|| de::Error::custom("is missing the field \"command\""))?;
        Ok(RawTerminal {
            terminal: Terminal {
                name,
                command,
                description,
                login: true,
                on_demand: false,
            },
            extra,
        })
    }
}

struct RawPort {
    port: Port,
    extra: BTreeMap<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

impl<'de> Visitor<'de> for PortVisitor {
    type Value = RawPort;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a port number or an object with \"port\"")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<RawPort, E> {
        let port = u16::try_from(value)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(value), &"a port number from 0 to 65535"))?;
        Ok(RawPort {
            port: Port { port, name: None },
            extra: BTreeMap::new(),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPort, A::Error> {
        let (mut port, mut name) = (None, None);
        let mut extra = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(duplicate(&key));
            }
            match key.as_str() {
                "port" => port = Some(map.next_value::<u16>()?),
                "name" => name = optional_text(&mut map)?,
                _ => {
                    extra.insert(key, map.next_value::<serde_json::Value>()?);
                }
            }
        }
        let port = port.ok_or_else(|| de::Error::custom("is missing the field \"port\""))?;
        Ok(RawPort {
            port: Port { port, name },
            extra,
        })
    }
}

struct RawBuild {
    build: BuildConfig,
    extra: BTreeMap<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for RawBuild {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(BuildVisitor)
    }
}

struct BuildVisitor;

impl<'de> Visitor<'de> for BuildVisitor {
    type Value = RawBuild;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object with \"dockerfile\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBuild, A::Error> {
        let (mut dockerfile, mut context) = (None, None);
        let mut extra = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(duplicate(&key));
            }
            match key.as_str() {
                "dockerfile" => dockerfile = Some(map.next_value::<String>()?),
                "context" => context = optional_text(&mut map)?,
                _ => {
                    extra.insert(key, map.next_value::<serde_json::Value>()?);
                }
            }
        }
        let dockerfile = dockerfile.ok_or_else(|| de::Error::custom("is missing the field \"dockerfile\""))?;
        Ok(RawBuild {
            build: BuildConfig { dockerfile, context },
            extra,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<RawBuild, A::Error> {
        Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
    }
}

/// What a machine for this configuration will do, for `flotilla env check` and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The environment file, as found in the checkout; `None` when the checkout has none.
    pub file: Option<PathBuf>,
    pub base_image: BaseImage,
    pub config: EnvironmentConfig,
}

impl Plan {
    pub fn new(file: Option<PathBuf>, base_image: BaseImage, config: EnvironmentConfig) -> Self {
        Plan {
            file,
            base_image,
            config,
        }
    }

    /// Fields the bwrap driver parses but cannot act on, each with the reason.
    pub fn not_acted_on(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(build) = &self.config.build {
            let context = build.context.as_deref().unwrap_or(".");
            notes.push(format!(
                "build (dockerfile {:?}, context {context:?}): not yet supported by the bwrap driver; the base image is used",
                build.dockerfile
            ));
        }
        if let Some(snapshot) = &self.config.snapshot {
            notes.push(format!(
                "snapshot {snapshot:?}: another product's snapshot id; flotilla builds its own install layer from \"install\""
            ));
        }
        if !self.config.ports.is_empty() {
            notes.push("ports: machines have no network yet, so no port is exposed".to_string());
        }
        for key in &self.config.unsupported {
            notes.push(format!("{key}: unknown key, ignored"));
        }
        notes
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        let config = &self.config;
        match &self.file {
            Some(file) => writeln!(formatter, "environment file: {}", file.display())?,
            None => writeln!(formatter, "environment file: none (defaults)")?,
        }
        if let Some(name) = &config.name {
            writeln!(formatter, "name:        {name}")?;
        }
        writeln!(formatter, "base image:  {}", self.base_image)?;
        writeln!(
            formatter,
            "user:        {}",
            config.user.as_deref().unwrap_or("root (default)")
        )?;
        match &config.install {
            Some(install) => {
                writeln!(formatter, "install:     {}", one_line(install))?;
                writeln!(
                    formatter,
                    "             runs once per repository, install hash {} and base image; the result is cached as a layer",
                    &config.install_hash()[..16]
                )?;
            }
            None => writeln!(formatter, "install:     (none)")?,
        }
        match &config.start {
            Some(start) => writeln!(formatter, "start:       {} (every boot)", one_line(start))?,
            None => writeln!(formatter, "start:       (none)")?,
        }
        if config.terminals.is_empty() {
            writeln!(formatter, "terminals:   (none)")?;
        } else {
            writeln!(formatter, "terminals:   tmux session \"flotilla\", one window each")?;
            for (index, terminal) in config.terminals.iter().enumerate() {
                write!(
                    formatter,
                    "  {}. {}: {}",
                    index + 1,
                    terminal.name,
                    one_line(&terminal.command)
                )?;
                match &terminal.description {
                    Some(description) => writeln!(formatter, " ({})", one_line(description))?,
                    None => writeln!(formatter)?,
                }
            }
        }
        for port in &config.ports {
            match &port.name {
                Some(name) => writeln!(formatter, "port:        {} ({name})", port.port)?,
                None => writeln!(formatter, "port:        {}", port.port)?,
            }
        }
        let notes = self.not_acted_on();
        if !notes.is_empty() {
            writeln!(formatter, "not acted on:")?;
            for note in notes {
                writeln!(formatter, "  - {note}")?;
            }
        }
        Ok(())
    }
}

fn one_line(text: &str) -> String {
    let trimmed = text.trim();
    if trimmed.contains('\n') {
        let lines = trimmed.lines().count();
        format!("{} … ({lines} lines)", trimmed.lines().next().unwrap_or_default())
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = ".flotilla/environment.json";

    fn parse_ok(text: &str) -> EnvironmentConfig {
        parse(FILE, text).unwrap_or_else(|error| panic!("expected {text} to parse: {error}"))
    }

    fn parse_err(text: &str) -> EnvironmentError {
        match parse(FILE, text) {
            Ok(config) => panic!("expected {text} to fail, got {config:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn reference_docs_example_parses() {
        let text = r#"{
  "snapshot": "POPULATED_FROM_SETTINGS",
  "install": "npm install",
  "terminals": [
    {
      "name": "Run Next.js",
      "command": "npm run dev"
    }
  ]
}"#;
        let config = parse(CURSOR_ENVIRONMENT_FILE, text).unwrap();
        assert_eq!(config.snapshot.as_deref(), Some("POPULATED_FROM_SETTINGS"));
        assert_eq!(config.install.as_deref(), Some("npm install"));
        assert_eq!(config.terminals, vec![Terminal::new("Run Next.js", "npm run dev")]);
        assert!(config.unsupported.is_empty());
    }

    #[test]
    fn every_known_field_parses() {
        let config = parse_ok(
            r#"{"name": "web", "user": "ubuntu", "install": "make deps", "start": "service x start",
                "terminals": [{"name": "dev", "command": "npm run dev", "description": "the dev server"}],
                "ports": [3000, {"port": 8080, "name": "api"}],
                "snapshot": "snap-1", "build": {"dockerfile": "Dockerfile", "context": ".."}}"#,
        );
        assert_eq!(config.name.as_deref(), Some("web"));
        assert_eq!(config.user.as_deref(), Some("ubuntu"));
        assert_eq!(config.start.as_deref(), Some("service x start"));
        assert_eq!(config.terminals[0].description.as_deref(), Some("the dev server"));
        assert_eq!(
            config.ports,
            vec![
                Port { port: 3000, name: None },
                Port {
                    port: 8080,
                    name: Some("api".into())
                }
            ]
        );
        assert_eq!(
            config.build,
            Some(BuildConfig {
                dockerfile: "Dockerfile".into(),
                context: Some("..".into())
            })
        );
    }

    #[test]
    fn empty_object_is_all_defaults() {
        assert_eq!(parse_ok("{}"), EnvironmentConfig::default());
    }

    #[test]
    fn null_and_blank_optional_fields_are_absent() {
        let config = parse_ok(r#"{"install": null, "start": "  ", "terminals": null, "user": null}"#);
        assert_eq!(config.install, None);
        assert_eq!(config.start, None);
        assert!(config.terminals.is_empty());
    }

    #[test]
    fn unknown_keys_are_kept_and_reported() {
        let config = parse_ok(
            r#"{"agentCanUpdateSnapshot": true, "repositoryDependencies": ["a/b"],
                "terminals": [{"name": "t", "command": "c", "ports": [1]}],
                "build": {"dockerfile": "D", "target": "dev"}, "ports": [{"port": 1, "protocol": "tcp"}]}"#,
        );
        assert_eq!(
            config.unsupported,
            vec![
                "agentCanUpdateSnapshot",
                "build.target",
                "ports[0].protocol",
                "repositoryDependencies",
                "terminals[0].ports"
            ]
        );
        assert_eq!(
            config.unsupported_values["agentCanUpdateSnapshot"],
            serde_json::json!(true)
        );
    }

    #[test]
    fn terminals_of_the_wrong_type_names_the_field_and_position() {
        let error = parse_err("{\n  \"install\": \"x\",\n\n  \"terminals\": \"npm\"\n}");
        assert_eq!(error.field.as_deref(), Some("terminals"));
        assert_eq!(error.line, Some(4));
        assert_eq!(
            error.to_string(),
            ".flotilla/environment.json line 4 column 20: \"terminals\" must be an array, found a string"
        );
    }

    #[test]
    fn nested_type_error_names_the_element() {
        let error = parse_err(r#"{"terminals": [{"name": "a", "command": "b"}, {"name": 5, "command": "c"}]}"#);
        assert_eq!(error.field.as_deref(), Some("terminals[1].name"));
        assert!(
            error
                .message
                .contains("\"terminals[1].name\" must be a string, found the number 5"),
            "{error}"
        );
    }

    #[test]
    fn install_must_be_a_string() {
        let error = parse_err(r#"{"install": ["npm install"]}"#);
        assert_eq!(error.message, "\"install\" must be a string, found an array");
    }

    #[test]
    fn a_terminal_without_a_command_is_refused() {
        let error = parse_err(r#"{"terminals": [{"name": "dev"}]}"#);
        assert_eq!(error.field.as_deref(), Some("terminals[0]"));
        assert!(error.message.contains("is missing the field \"command\""), "{error}");
    }

    #[test]
    fn a_terminal_that_is_a_string_is_refused() {
        let error = parse_err(r#"{"terminals": ["npm run dev"]}"#);
        assert_eq!(
            error.message,
            "\"terminals[0]\" must be an object with \"name\" and \"command\", found a string"
        );
    }

    #[test]
    fn duplicate_terminal_names_are_refused() {
        let error = parse_err(r#"{"terminals": [{"name": "a", "command": "1"}, {"name": "a", "command": "2"}]}"#);
        assert!(error.message.contains("two terminals named \"a\""), "{error}");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let error = parse_err(r#"{"install": "a", "install": "b"}"#);
        assert!(error.message.contains("has the key \"install\" twice"), "{error}");
    }

    #[test]
    fn port_out_of_range_is_refused() {
        let error = parse_err(r#"{"ports": [70000]}"#);
        assert_eq!(error.field.as_deref(), Some("ports[0]"));
        assert!(error.message.contains("a port number from 0 to 65535"), "{error}");
    }

    #[test]
    fn build_without_dockerfile_is_refused() {
        let error = parse_err(r#"{"build": {"context": "."}}"#);
        assert!(
            error.message.contains("\"build\" is missing the field \"dockerfile\""),
            "{error}"
        );
    }

    #[test]
    fn syntax_error_gives_line_and_column() {
        let error = parse_err("{\n  \"install\": \"a\"\n  \"start\": \"b\"\n}");
        assert_eq!(error.line, Some(3));
        assert_eq!(error.column, Some(3));
        assert!(error.message.starts_with("invalid JSON"), "{error}");
    }

    #[test]
    fn top_level_array_is_refused() {
        let error = parse_err("[]");
        assert_eq!(error.field, None);
        assert_eq!(error.message, "the file must be an object, found an array");
    }

    #[test]
    fn empty_file_is_refused() {
        let error = parse_err("");
        assert!(error.message.starts_with("invalid JSON"), "{error}");
    }

    #[test]
    fn trailing_text_is_refused() {
        let error = parse_err("{} {}");
        assert!(error.message.contains("after the top-level object"), "{error}");
    }

    #[test]
    fn error_names_the_cursor_file() {
        let error = parse(CURSOR_ENVIRONMENT_FILE, r#"{"start": 1}"#).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(".cursor/environment.json line 1 column 11: "),
            "{error}"
        );
    }

    #[test]
    fn config_hash_ignores_key_order_and_whitespace() {
        let first = parse_ok(r#"{"install": "a", "start": "b", "x": {"q": 1, "p": 2}}"#);
        let second = parse_ok("{\"x\": {\"p\": 2, \"q\": 1},\n \"start\": \"b\", \"install\": \"a\"}");
        assert_eq!(first.config_hash(), second.config_hash());
        assert_eq!(first.config_hash().len(), 64);
        let third = parse_ok(r#"{"install": "a", "start": "c", "x": {"q": 1, "p": 2}}"#);
        assert_ne!(first.config_hash(), third.config_hash());
    }

    #[test]
    fn install_hash_ignores_terminals_and_start() {
        let first = parse_ok(r#"{"install": "a", "start": "b"}"#);
        let second = parse_ok(r#"{"install": "a", "terminals": [{"name": "t", "command": "c"}]}"#);
        assert_eq!(first.install_hash(), second.install_hash());
        let other_user = parse_ok(r#"{"install": "a", "user": "u"}"#);
        assert_ne!(first.install_hash(), other_user.install_hash());
    }

    #[test]
    fn load_prefers_flotilla_over_cursor() {
        let checkout = tempfile::tempdir().unwrap();
        assert!(load(checkout.path()).unwrap().is_none());
        std::fs::create_dir_all(checkout.path().join(".cursor")).unwrap();
        std::fs::write(
            checkout.path().join(CURSOR_ENVIRONMENT_FILE),
            r#"{"install": "cursor"}"#,
        )
        .unwrap();
        let (path, config) = load(checkout.path()).unwrap().unwrap();
        assert!(path.ends_with(CURSOR_ENVIRONMENT_FILE));
        assert_eq!(config.install.as_deref(), Some("cursor"));
        std::fs::create_dir_all(checkout.path().join(".flotilla")).unwrap();
        std::fs::write(
            checkout.path().join(FLOTILLA_ENVIRONMENT_FILE),
            r#"{"install": "flotilla"}"#,
        )
        .unwrap();
        let (path, config) = load(checkout.path()).unwrap().unwrap();
        assert!(path.ends_with(FLOTILLA_ENVIRONMENT_FILE));
        assert_eq!(config.install.as_deref(), Some("flotilla"));
    }

    #[test]
    fn load_reports_a_malformed_file_by_its_relative_name() {
        let checkout = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(checkout.path().join(".cursor")).unwrap();
        std::fs::write(checkout.path().join(CURSOR_ENVIRONMENT_FILE), "{\"terminals\": {}}").unwrap();
        let error = match load(checkout.path()).unwrap_err() {
            SandboxError::Environment(error) => error,
            other => panic!("expected an environment error, got {other}"),
        };
        assert_eq!(error.file, CURSOR_ENVIRONMENT_FILE);
        assert_eq!(error.message, "\"terminals\" must be an array, found an object");
    }

    #[test]
    fn load_refuses_an_environment_file_that_is_a_symlink() {
        let checkout = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(checkout.path().join(".cursor")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", checkout.path().join(CURSOR_ENVIRONMENT_FILE)).unwrap();
        let error = load(checkout.path()).unwrap_err();
        assert_eq!(error.to_string(), ".cursor/environment.json is a symlink");
    }

    #[test]
    fn plan_lists_base_install_start_terminals_and_notes() {
        let config = parse_ok(
            r#"{"install": "npm install", "start": "echo hi", "build": {"dockerfile": "Dockerfile"},
                "terminals": [{"name": "dev", "command": "npm run dev", "description": "server"}], "extra": 1}"#,
        );
        let plan = Plan::new(Some(PathBuf::from(FLOTILLA_ENVIRONMENT_FILE)), BaseImage::Host, config);
        let text = plan.to_string();
        assert!(text.contains("base image:  host"), "{text}");
        assert!(text.contains("install:     npm install"), "{text}");
        assert!(text.contains("start:       echo hi (every boot)"), "{text}");
        assert!(text.contains("1. dev: npm run dev (server)"), "{text}");
        assert!(text.contains("not yet supported by the bwrap driver"), "{text}");
        assert!(text.contains("extra: unknown key, ignored"), "{text}");
    }

    #[test]
    fn check_prints_the_plan_of_a_checkout_or_its_error() {
        let checkout = tempfile::tempdir().unwrap();
        let plan = check(checkout.path(), BaseImage::Host).unwrap();
        assert_eq!(plan.file, None);
        std::fs::create_dir_all(checkout.path().join(".flotilla")).unwrap();
        std::fs::write(
            checkout.path().join(FLOTILLA_ENVIRONMENT_FILE),
            r#"{"start": "make serve"}"#,
        )
        .unwrap();
        let plan = check(checkout.path(), BaseImage::Host).unwrap();
        assert_eq!(plan.file.as_deref(), Some(Path::new(FLOTILLA_ENVIRONMENT_FILE)));
        assert!(plan
            .to_string()
            .contains("environment file: .flotilla/environment.json"));
        std::fs::write(
            checkout.path().join(FLOTILLA_ENVIRONMENT_FILE),
            "{\n  \"start\": [1]\n}",
        )
        .unwrap();
        let error = check(checkout.path(), BaseImage::Host).unwrap_err();
        assert_eq!(
            error.to_string(),
            ".flotilla/environment.json line 2 column 11: \"start\" must be a string, found an array"
        );
    }

    #[test]
    fn plan_without_a_file_uses_defaults() {
        let plan = Plan::new(None, BaseImage::Debian, EnvironmentConfig::default());
        let text = plan.to_string();
        assert!(text.contains("none (defaults)"), "{text}");
        assert!(text.contains("install:     (none)"), "{text}");
        assert!(text.contains("terminals:   (none)"), "{text}");
    }
}
