//! `flotilla plugin ...`: uploading and managing the cluster's Wasm plugins (admin tokens).

use std::path::{Path, PathBuf};

use flotilla_proto::v1::{
    upload_plugin_request, ConfigurePluginRequest, ConfigurePluginResponse, GrantHostsRequest, ListPluginsRequest,
    PluginRef, UploadPluginHeader, UploadPluginRequest,
};
use flotilla_raft::command::MAX_PLUGIN_BYTES;

use super::client::{admin_client, call_within, connect, unary, BearerToken, CliError};
use super::{json, print_json, print_text, render, ClientArgs, OutputFormat};

/// Bytes per message of an upload stream.
pub(crate) const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;
/// Deadline of a whole upload: the node checks (compiles) the component and replicates it
/// before it answers.
const UPLOAD_CALL_TIMEOUT_MS: u64 = 120_000;

#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// Upload a Wasm component as a new plugin version (enabled unless --disabled)
    Add {
        /// the component, a .wasm file
        file: PathBuf,
        /// plugin name (the file name without .wasm when absent)
        #[arg(long)]
        name: Option<String>,
        /// plugin version, MAJOR.MINOR.PATCH
        #[arg(long)]
        version: String,
        /// a host the plugin may reach, as for --allow-host of agents (repeatable)
        #[arg(long = "grant-host", value_name = "HOST", value_parser = super::host_pattern)]
        grant_hosts: Vec<String>,
        /// upload without enabling it
        #[arg(long)]
        disabled: bool,
    },
    /// List plugin versions by name, then version
    List {
        /// only the versions of this plugin
        #[arg(long)]
        name: Option<String>,
    },
    /// Enable a version (the other versions of its name are disabled)
    Enable {
        /// plugin name
        name: String,
        /// the version to enable
        #[arg(long)]
        version: String,
    },
    /// Disable a version
    Disable {
        /// plugin name
        name: String,
        /// the version to disable
        #[arg(long)]
        version: String,
    },
    /// Remove a disabled version and its bytes
    Remove {
        /// plugin name
        name: String,
        /// the version to remove
        #[arg(long)]
        version: String,
    },
    /// Replace the hosts a version may reach
    Grant {
        /// plugin name
        name: String,
        /// the version whose hosts change
        #[arg(long)]
        version: String,
        /// a host the plugin may reach (repeatable; the list replaces the current one)
        #[arg(long = "host", value_name = "HOST", required_unless_present = "none", value_parser = super::host_pattern)]
        hosts: Vec<String>,
        /// revoke every host
        #[arg(long, conflicts_with = "hosts")]
        none: bool,
    },
    /// Replace the settings of a plugin name (every version; built-in providers too), e.g.
    /// `flotilla plugin configure github api-base=https://ghe.example.com/api/v3 hosts=ghe.example.com`
    Configure {
        /// plugin name
        name: String,
        /// KEY=VALUE (repeatable; the whole list replaces the current settings)
        #[arg(value_name = "KEY=VALUE", required_unless_present = "clear", value_parser = parse_setting)]
        settings: Vec<(String, String)>,
        /// remove every setting
        #[arg(long, conflicts_with = "settings")]
        clear: bool,
    },
}

/// A `plugin configure` argument that is not `KEY=VALUE`.
#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not KEY=VALUE")]
struct NotASetting {
    text: String,
}

/// `KEY=VALUE`, the value possibly empty or holding `=`.
fn parse_setting(text: &str) -> Result<(String, String), NotASetting> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(NotASetting { text: text.to_string() }),
    }
}

/// The plugin name a file gives when no --name is: its name without `.wasm`.
fn name_from_file(file: &Path) -> Result<String, CliError> {
    let stem = file.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default();
    flotilla_raft::validate_plugin_name(stem).map_err(|error| {
        CliError::Usage(format!(
            "{error}; it comes from the file name {}: give one with --name",
            file.display()
        ))
    })?;
    Ok(stem.to_string())
}

/// The upload stream: the header, then the file in [`UPLOAD_CHUNK_BYTES`] chunks.
fn upload_messages(header: UploadPluginHeader, bytes: &[u8]) -> Vec<UploadPluginRequest> {
    std::iter::once(upload_plugin_request::Kind::Header(header))
        .chain(
            bytes
                .chunks(UPLOAD_CHUNK_BYTES)
                .map(|chunk| upload_plugin_request::Kind::Chunk(chunk.to_vec())),
        )
        .map(|kind| UploadPluginRequest { kind: Some(kind) })
        .collect()
}

async fn read_component(file: &Path) -> Result<Vec<u8>, CliError> {
    let unreadable = |error: std::io::Error| CliError::Usage(format!("cannot read {}: {error}", file.display()));
    let size_bytes = tokio::fs::metadata(file).await.map_err(unreadable)?.len();
    if size_bytes > MAX_PLUGIN_BYTES as u64 {
        return Err(CliError::Usage(format!(
            "{} is {size_bytes} bytes; a plugin may be at most {MAX_PLUGIN_BYTES} bytes (32 MiB)",
            file.display()
        )));
    }
    let bytes = tokio::fs::read(file).await.map_err(unreadable)?;
    if bytes.is_empty() {
        return Err(CliError::Usage(format!("{} is empty", file.display())));
    }
    Ok(bytes)
}

/// The messages of an upload (`plugin add`), its name, version and file checked; `None` for
/// the other commands.
async fn prepare_upload(cmd: &PluginCommand) -> Result<Option<Vec<UploadPluginRequest>>, CliError> {
    let PluginCommand::Add {
        file,
        name,
        version,
        grant_hosts,
        disabled,
    } = cmd
    else {
        return Ok(None);
    };
    let name = match name {
        Some(name) => {
            flotilla_raft::validate_plugin_name(name).map_err(|error| CliError::Usage(error.to_string()))?;
            name.clone()
        }
        None => name_from_file(file)?,
    };
    flotilla_raft::validate_plugin_version(version).map_err(|error| CliError::Usage(error.to_string()))?;
    let bytes = read_component(file).await?;
    let header = UploadPluginHeader {
        name,
        version: version.clone(),
        granted_hosts: grant_hosts.clone(),
        enable: !disabled,
    };
    Ok(Some(upload_messages(header, &bytes)))
}

fn print_settings(args: &ClientArgs, response: &ConfigurePluginResponse) -> Result<(), CliError> {
    let settings: std::collections::BTreeMap<&String, &String> = response.settings.iter().collect();
    match args.output {
        OutputFormat::Json => print_json(&serde_json::json!({ "name": response.name, "settings": settings })),
        OutputFormat::Table => print_text(&if settings.is_empty() {
            format!("{}: no settings", response.name)
        } else {
            let lines: Vec<String> = settings
                .iter()
                .map(|(key, value)| format!("  {key} = {value}"))
                .collect();
            format!("{}:\n{}", response.name, lines.join("\n"))
        }),
    }
}

pub(crate) async fn plugin_command(args: &ClientArgs, cmd: PluginCommand) -> Result<(), CliError> {
    let token = BearerToken::new(args.token.as_deref())?;
    let endpoint = args.endpoint.as_str();
    // An upload is checked and read before connecting, so that a bad name, version or file is
    // told at once.
    let upload = prepare_upload(&cmd).await?;
    let mut client = admin_client(connect(args).await?, token);
    let plugin = match cmd {
        PluginCommand::Add { .. } => {
            let messages = upload.unwrap_or_default();
            call_within(
                endpoint,
                UPLOAD_CALL_TIMEOUT_MS,
                client.upload_plugin(tokio_stream::iter(messages)),
            )
            .await?
        }
        PluginCommand::List { name } => {
            let response = unary(
                endpoint,
                client.list_plugins(ListPluginsRequest {
                    name: name.unwrap_or_default(),
                }),
            )
            .await?;
            return match args.output {
                OutputFormat::Json => print_json(&serde_json::Value::Array(
                    response.plugins.iter().map(json::plugin).collect(),
                )),
                OutputFormat::Table => print_text(&render::plugin_list(&response.plugins)),
            };
        }
        PluginCommand::Enable { name, version } => {
            unary(endpoint, client.enable_plugin(PluginRef { name, version })).await?
        }
        PluginCommand::Disable { name, version } => {
            unary(endpoint, client.disable_plugin(PluginRef { name, version })).await?
        }
        PluginCommand::Remove { name, version } => {
            let response = unary(endpoint, client.remove_plugin(PluginRef { name, version })).await?;
            let plugin = response.plugin.ok_or_else(|| {
                CliError::Rpc(tonic::Status::internal(
                    "the node removed the plugin but returned no record of it",
                ))
            })?;
            return match args.output {
                OutputFormat::Json => print_json(&json::plugin(&plugin)),
                OutputFormat::Table => print_text(&format!("removed {} {}", plugin.name, plugin.version)),
            };
        }
        PluginCommand::Grant {
            name,
            version,
            hosts,
            none,
        } => {
            let hosts = if none { Vec::new() } else { hosts };
            unary(endpoint, client.grant_hosts(GrantHostsRequest { name, version, hosts })).await?
        }
        PluginCommand::Configure { name, settings, .. } => {
            let response = unary(
                endpoint,
                client.configure_plugin(ConfigurePluginRequest {
                    name,
                    settings: settings.into_iter().collect(),
                }),
            )
            .await?;
            return print_settings(args, &response);
        }
    };
    match args.output {
        OutputFormat::Json => print_json(&json::plugin(&plugin)),
        OutputFormat::Table => print_text(&render::plugin_record(&plugin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: PluginCommand,
    }

    #[test]
    fn add_requires_a_version_and_takes_repeated_hosts() {
        assert!(TestCli::try_parse_from(["flotilla", "add", "github.wasm"]).is_err());
        let cli = TestCli::try_parse_from([
            "flotilla",
            "add",
            "github.wasm",
            "--version",
            "1.0.0",
            "--grant-host",
            "api.github.com",
            "--grant-host",
            "github.com",
            "--disabled",
        ])
        .unwrap();
        let PluginCommand::Add {
            grant_hosts, disabled, ..
        } = cli.command
        else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(grant_hosts, vec!["api.github.com", "github.com"]);
        assert!(disabled);
    }

    #[test]
    fn bad_host_patterns_are_refused_before_sending() {
        for (args, bad) in [
            (
                vec!["grant", "github", "--version", "1.0.0", "--host", "10.0.0.0/33"],
                "prefix length /33",
            ),
            (
                vec!["grant", "github", "--version", "1.0.0", "--host", "example.com:0"],
                "port 0",
            ),
            (
                vec!["add", "f.wasm", "--version", "1.0.0", "--grant-host", ""],
                "pattern is empty",
            ),
        ] {
            let error = TestCli::try_parse_from(std::iter::once("flotilla").chain(args))
                .unwrap_err()
                .to_string();
            assert!(error.contains(bad), "{error}");
        }
    }

    #[test]
    fn grant_needs_hosts_or_none_but_not_both() {
        assert!(TestCli::try_parse_from(["flotilla", "grant", "github", "--version", "1.0.0"]).is_err());
        assert!(TestCli::try_parse_from([
            "flotilla",
            "grant",
            "github",
            "--version",
            "1.0.0",
            "--host",
            "a.com",
            "--none"
        ])
        .is_err());
        let cli = TestCli::try_parse_from(["flotilla", "grant", "github", "--version", "1.0.0", "--none"]).unwrap();
        assert!(matches!(cli.command, PluginCommand::Grant { none: true, .. }));
    }

    #[test]
    fn configure_takes_key_value_pairs_or_clear() {
        let cli = TestCli::try_parse_from([
            "flotilla",
            "configure",
            "github",
            "api-base=https://ghe.example.com/api/v3?x=1",
            "hosts=",
        ])
        .unwrap();
        let PluginCommand::Configure { settings, .. } = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(
            settings,
            vec![
                ("api-base".to_string(), "https://ghe.example.com/api/v3?x=1".to_string()),
                ("hosts".to_string(), String::new())
            ]
        );
        assert!(TestCli::try_parse_from(["flotilla", "configure", "github"]).is_err());
        assert!(TestCli::try_parse_from(["flotilla", "configure", "github", "=x"]).is_err());
        assert!(TestCli::try_parse_from(["flotilla", "configure", "github", "--clear"]).is_ok());
    }

    #[test]
    fn the_name_defaults_to_the_file_stem() {
        assert_eq!(name_from_file(Path::new("/tmp/github.wasm")).unwrap(), "github");
        let refused = name_from_file(Path::new("/tmp/My_Plugin.wasm"))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("give one with --name"), "{refused}");
    }

    #[test]
    fn an_upload_is_its_header_then_chunks_of_256_kib() {
        let bytes = vec![1u8; UPLOAD_CHUNK_BYTES * 2 + 10];
        let messages = upload_messages(UploadPluginHeader::default(), &bytes);
        assert_eq!(messages.len(), 4);
        assert!(matches!(messages[0].kind, Some(upload_plugin_request::Kind::Header(_))));
        let sizes: Vec<usize> = messages[1..]
            .iter()
            .map(|message| match &message.kind {
                Some(upload_plugin_request::Kind::Chunk(chunk)) => chunk.len(),
                other => panic!("a chunk, found {other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES, 10]);
    }
}
