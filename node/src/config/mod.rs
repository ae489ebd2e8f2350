//! `flotilla node` settings: command-line flags over an optional TOML file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod values;

pub use values::{
    AllowedLocalDirectory, BuiltinName, RaftElectionTimeoutMs, RaftHeartbeatMs, SessionSeconds, StsEndpoint,
};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// Directory for the node's database, tokens and secrets.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address; the actor mesh listens on the next port.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address other nodes use to reach this one (defaults to --listen).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Node id; the first node defaults to 1 and joining nodes get one from the leader.
    #[arg(long)]
    pub id: Option<u64>,
    #[arg(long)]
    pub region: Option<String>,
    /// How many agents this node runs at once.
    #[arg(long)]
    pub slots: Option<u32>,
    /// URL of any member, to join its cluster instead of starting a new one.
    #[arg(long)]
    pub join: Option<String>,
    /// A node silent for this long is marked down and its agents move.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Build a Raft snapshot after this many log entries (default 100,000, as etcd's snapshot count).
    #[arg(long)]
    pub snapshot_after_logs: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long)]
    pub logs_kept_after_snapshot: Option<u64>,
    /// Base image of agent machines: host (the node's own /usr, read-only) or debian.
    #[arg(long)]
    pub base_image: Option<String>,
    /// Wall-clock limit of one environment install.
    #[arg(long)]
    pub install_timeout_ms: Option<u64>,
    /// Memory limit of one machine.
    #[arg(long)]
    pub machine_memory_mb: Option<u64>,
    /// Process limit of one machine.
    #[arg(long)]
    pub machine_max_processes: Option<u64>,
    /// Disk space of one machine's own layer.
    #[arg(long)]
    pub machine_disk_mb: Option<u64>,
    /// Default wall-clock limit of one command in a machine.
    #[arg(long)]
    pub command_timeout_ms: Option<u64>,
    /// TOML file with a [node] table; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Single-use token from `flotilla cluster join-token`, needed once, by a node that joins
    /// with no certificate yet (prefer the environment variable).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// PEM certificate chain the public listener shows clients instead of the node certificate
    /// (nodes still get the node certificate); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Directory of compiled plugin code kept across restarts (default DATA_DIR/plugins-compiled;
    /// it must be this node's user's alone).
    #[arg(long, env = "FLOTILLA_COMPILED_PLUGIN_CACHE")]
    pub compiled_plugin_cache: Option<PathBuf>,
    /// Load and validate the settings (the --config file and flags), print a summary and exit:
    /// 0 when they are valid, 1 with the file, line and field at fault when not. Needs no root
    /// and touches nothing.
    #[arg(long)]
    pub check_config: bool,
    /// Start a new cluster from a backup file (`flotilla admin backup`) into an empty data dir;
    /// the file is checked whole before anything is written.
    #[arg(long, conflicts_with = "join")]
    pub restore: Option<PathBuf>,
    /// The old cluster's key-encryption key (DATA_DIR/kek of any of its nodes), needed by
    /// --restore when the backup holds secrets: they stay sealed under it.
    #[arg(long, requires = "restore")]
    pub restore_kek: Option<PathBuf>,
    /// Serve Prometheus metrics over plain HTTP at ADDR/metrics (off by default; meant for a
    /// local scraper, e.g. 127.0.0.1:9420).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export traces (OpenTelemetry, OTLP over gRPC) to the collector at URL, e.g.
    /// http://127.0.0.1:4317 (off by default).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Log lines as text (default) or json (one object per line, with span fields).
    #[arg(long, value_enum, env = "FLOTILLA_LOG_FORMAT", default_value_t = crate::observability::LogFormat::Text)]
    pub log_format: crate::observability::LogFormat,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    node: FileNode,
    /// Model providers by the name agents ask for (`agent create --model NAME`).
    #[serde(default)]
    models: BTreeMap<String, flotilla_actors::model::ModelConfig>,
    #[serde(default)]
    agents: AgentSettings,
    #[serde(default)]
    git: GitSection,
    #[serde(default)]
    plugins: PluginsSection,
    #[serde(default)]
    repos: ReposSection,
    #[serde(default)]
    machines: MachinesSection,
    #[serde(default)]
    aws: AwsSection,
}

/// `[aws]`: how this node reaches AWS for teams' role assumption. `sts_endpoint` overrides the
/// STS endpoint (the SDK also reads `AWS_ENDPOINT_URL_STS`); the node's own credentials and
/// region come from the SDK's default chain.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AwsSection {
    pub sts_endpoint: Option<StsEndpoint>,
    /// Lifetime of the session credentials machines get (AWS allows 900 to 43200 s; default 3600).
    pub session_seconds: Option<SessionSeconds>,
    /// Renew a machine's session this long after it was made, instead of at two thirds of its
    /// lifetime or five minutes before its end (the earlier).
    pub renew_after_seconds: Option<u64>,
}

/// `[repos]`: which repositories this node clones. `allow_local` lists the directories that
/// `file://` URLs and paths may name (none by default: every local repository is refused).
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ReposSection {
    #[serde(default)]
    pub allow_local: Vec<AllowedLocalDirectory>,
}

impl ReposSection {
    pub fn policy(&self) -> flotilla_actors::repo_url::RepositoryPolicy {
        flotilla_actors::repo_url::RepositoryPolicy::new(
            self.allow_local.iter().map(|directory| directory.0.clone()).collect(),
        )
    }
}

/// `[machines]`: the limits of every machine of this node, sizes with a unit ("10GiB",
/// "512MiB"). They override the `[node]` table's older `machine_*_mb` keys; flags override both.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct MachinesSection {
    #[serde(default, deserialize_with = "memory_size")]
    pub memory: Option<u64>,
    /// The machine's writable layers together (root and workspace upper layers).
    #[serde(default, deserialize_with = "disk_size")]
    pub disk: Option<u64>,
    pub max_processes: Option<u64>,
    /// What holds the writable layers: "tmpfs" (fast; its pages count against `memory` too, so
    /// a machine holds at most the smaller of the two) or "ext4" (a sparse image on the node's
    /// disk, for disks larger than memory).
    #[serde(default, deserialize_with = "disk_backing")]
    pub disk_backing: Option<flotilla_sandbox::DiskBacking>,
    /// The host id of machine uid 0 in the first machine's range (default 1,000,000,000): the
    /// machines of every node on the host take ranges of 65,536 ids from here. Set it when
    /// another system on the host hands out ids there.
    pub uid_range_start: Option<u32>,
    /// How many ranges there are (default 16,384): the most machines the host runs at once.
    pub uid_ranges: Option<u32>,
}

/// A size field, its value parsed by `flotilla_sandbox::parse_bytes`; the error names the field.
fn size_field<'de, D: serde::Deserializer<'de>>(field: &str, deserializer: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(deserializer)?;
    flotilla_sandbox::parse_bytes(&text)
        .map(Some)
        .map_err(|message| serde::de::Error::custom(format!("machines.{field}: {message}")))
}

fn memory_size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    size_field("memory", deserializer)
}

fn disk_size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    size_field("disk", deserializer)
}

fn disk_backing<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<flotilla_sandbox::DiskBacking>, D::Error> {
    match String::deserialize(deserializer)?.as_str() {
        "tmpfs" => Ok(Some(flotilla_sandbox::DiskBacking::Tmpfs)),
        "ext4" => Ok(Some(flotilla_sandbox::DiskBacking::Ext4Image)),
        other => Err(serde::de::Error::custom(format!(
            "machines.disk_backing: {other:?} is not one of \"tmpfs\", \"ext4\""
        ))),
    }
}

/// `[plugins]`: which built-in VCS providers this node offers (all of them by default). Without
/// `git`, a repository that no forge provider claims is refused at create time.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    pub builtins: Option<Vec<BuiltinName>>,
    /// Where compiled plugin code is kept across restarts (the `--compiled-plugin-cache` flag
    /// overrides it; default `DATA_DIR/plugins-compiled`).
    pub compiled_cache: Option<PathBuf>,
}

/// Under the data directory, where compiled plugin code is kept unless the config says otherwise.
pub const DEFAULT_COMPILED_PLUGIN_CACHE: &str = "plugins-compiled";

impl NodeConfig {
    /// The directory of compiled plugin code.
    pub fn compiled_plugin_cache(&self) -> PathBuf {
        self.plugins
            .compiled_cache
            .clone()
            .unwrap_or_else(|| self.data_dir.join(DEFAULT_COMPILED_PLUGIN_CACHE))
    }
}

impl PluginsSection {
    /// The built-ins to load, in match order (the order of `BUILTIN`, plain git last).
    pub fn chosen_builtins(&self) -> Vec<&'static flotilla_builtin_plugins::Builtin> {
        flotilla_builtin_plugins::BUILTIN
            .iter()
            .filter(|builtin| match &self.builtins {
                None => true,
                Some(names) => names.iter().any(|name| name.0 == builtin.name),
            })
            .collect()
    }
}

/// `[agents]`: the default model and the budgets of one run.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// The model of an agent created without `--model`.
    pub default_model: Option<String>,
    pub max_turns: Option<u32>,
    pub max_total_tokens: Option<u64>,
    pub max_wall_clock_s: Option<u64>,
    /// Output tokens asked of the model per turn.
    pub max_output_tokens: Option<u32>,
    /// The most a tool result may hold.
    pub tool_output_bytes: Option<usize>,
}

/// `[git]`: the author of agent commits and credentials for http(s) origins.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct GitSection {
    pub author_name: Option<String>,
    pub author_email: Option<String>,
    #[serde(default)]
    pub credentials: Vec<GitCredentialSection>,
}

/// `[[git.credentials]]`: used for origins whose URL starts with `url_prefix`. The password
/// (or token) comes from an environment variable or a secret, never from the file itself.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct GitCredentialSection {
    pub url_prefix: String,
    #[serde(default = "default_git_username")]
    pub username: String,
    pub password_env: Option<String>,
    pub password_secret: Option<String>,
}

fn default_git_username() -> String {
    "x-access-token".to_string()
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileNode {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
    id: Option<u64>,
    region: Option<String>,
    slots: Option<u32>,
    join: Option<String>,
    lease_ms: Option<u64>,
    raft_heartbeat_ms: Option<RaftHeartbeatMs>,
    raft_election_timeout_ms: Option<RaftElectionTimeoutMs>,
    snapshot_after_logs: Option<u64>,
    logs_kept_after_snapshot: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    base_image: Option<String>,
    install_timeout_ms: Option<u64>,
    machine_memory_mb: Option<u64>,
    machine_max_processes: Option<u64>,
    machine_disk_mb: Option<u64>,
    command_timeout_ms: Option<u64>,
    metrics_listen: Option<SocketAddr>,
    otlp_endpoint: Option<String>,
}

/// Settings after merging flags, file and defaults, and validating them.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub mesh_port: u16,
    pub id: Option<u64>,
    pub region: String,
    pub slots: u32,
    pub join: Option<String>,
    pub lease_ms: u64,
    /// Raft's heartbeat and (least) election timeout: [`RaftTiming`].
    pub raft: RaftTiming,
    pub snapshot_after_logs: u64,
    pub logs_kept_after_snapshot: u64,
    pub labels: BTreeMap<String, String>,
    pub join_token: Option<String>,
    /// An operator's certificate chain and key for clients of the public listener.
    pub public_tls: Option<(PathBuf, PathBuf)>,
    pub machines: flotilla_actors::machine::MachineSettings,
    pub models: BTreeMap<String, flotilla_actors::model::ModelConfig>,
    pub agents: AgentSettings,
    pub git: GitSection,
    pub plugins: PluginsSection,
    pub repos: ReposSection,
    pub aws: AwsSection,
    /// `--restore FILE` and `--restore-kek FILE`.
    pub restore: Option<(PathBuf, Option<PathBuf>)>,
    /// Where Prometheus metrics are served; `None`: not at all.
    pub metrics_listen: Option<SocketAddr>,
    /// The OTLP/gRPC collector traces go to; `None`: no traces.
    pub otlp_endpoint: Option<url::Url>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    #[error("config file {path} line {line} column {column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
}

/// Raft's timing from the file, each value checked while parsed and the pair here.
fn raft_timing(file: &FileNode) -> Result<RaftTiming, ConfigError> {
    let defaults = RaftTiming::default();
    let timing = RaftTiming {
        heartbeat_ms: file
            .raft_heartbeat_ms
            .map(|heartbeat| heartbeat.0)
            .unwrap_or(defaults.heartbeat_ms),
        election_timeout_ms: file
            .raft_election_timeout_ms
            .map(|timeout| timeout.0)
            .unwrap_or(defaults.election_timeout_ms),
    };
    if timing.election_timeout_ms < MIN_HEARTBEATS_PER_ELECTION_TIMEOUT * timing.heartbeat_ms {
        return Err(ConfigError::Invalid {
            field: "node.raft_election_timeout_ms",
            message: format!(
                "{} ms is less than {MIN_HEARTBEATS_PER_ELECTION_TIMEOUT} heartbeats of node.raft_heartbeat_ms ({} ms): a late heartbeat would start an election",
                timing.election_timeout_ms, timing.heartbeat_ms
            ),
        });
    }
    Ok(timing)
}

/// `--otlp-endpoint` / `otlp_endpoint`: an http URL with a host. Plain http only: traces go to
/// a collector beside the node (its host or network), which forwards them further.
fn otlp_endpoint(given: Option<String>) -> Result<Option<url::Url>, ConfigError> {
    let Some(given) = given else {
        return Ok(None);
    };
    let invalid = |message: String| ConfigError::Invalid {
        field: "otlp_endpoint",
        message,
    };
    let url = url::Url::parse(&given).map_err(|error| invalid(format!("{given:?} is not a URL: {error}")))?;
    if url.scheme() != "http" || url.host().is_none() {
        return Err(invalid(format!(
            "{given:?} must be an http:// URL with a host, e.g. http://127.0.0.1:4317 (a collector beside the node; TLS to it is not supported)"
        )));
    }
    Ok(Some(url))
}

/// Raft's timing. The defaults suit a region and its neighbours (round trips up to ~100 ms);
/// clusters whose members are further apart raise both, keeping the election timeout at three
/// heartbeats or more so that one late heartbeat does not start an election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    /// A follower campaigns after hearing nothing for a random time between this and twice it.
    pub election_timeout_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: flotilla_raft::replica::DEFAULT_HEARTBEAT_INTERVAL_MS,
            election_timeout_ms: flotilla_raft::replica::DEFAULT_ELECTION_TIMEOUT_MIN_MS,
        }
    }
}

/// Heartbeats per least election timeout, at least.
pub const MIN_HEARTBEATS_PER_ELECTION_TIMEOUT: u64 = 3;

pub const DEFAULT_SLOTS: u32 = 8;
pub const DEFAULT_LEASE_MS: u64 = 3_000;
pub const MAX_SLOTS: u32 = 10_000;

impl NodeArgs {
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let parts = match &self.config {
            Some(path) => read_config(path)?,
            None => ConfigFile::default(),
        };
        let ConfigFile {
            node: file,
            models,
            agents,
            git,
            mut plugins,
            repos,
            machines: machines_section,
            aws,
        } = parts;
        if let Some(dir) = &self.compiled_plugin_cache {
            plugins.compiled_cache = Some(dir.clone());
        }
        check_default_model(&agents, &models)?;
        check_git_credentials(&git)?;
        // Checked in this order so that the first of several mistakes is the one reported.
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .ok_or(ConfigError::Invalid {
                field: "data_dir",
                message: "required: pass --data-dir or set [node] data_dir".to_string(),
            })?;
        let (listen, advertise, mesh_port) = self.addresses(&file)?;
        let region = self
            .region
            .clone()
            .or(file.region.clone())
            .unwrap_or_else(|| "local".to_string());
        crate::server::validate::region(&region).map_err(|error| ConfigError::Invalid {
            field: "region",
            message: error.to_string(),
        })?;
        let slots = self.slots.or(file.slots).unwrap_or(DEFAULT_SLOTS);
        if slots > MAX_SLOTS {
            return Err(ConfigError::Invalid {
                field: "slots",
                message: format!("must be at most {MAX_SLOTS}, found {slots}"),
            });
        }
        let lease_ms = self.lease_ms.or(file.lease_ms).unwrap_or(DEFAULT_LEASE_MS);
        if !(500..=600_000).contains(&lease_ms) {
            return Err(ConfigError::Invalid {
                field: "lease_ms",
                message: format!("must be between 500 and 600000, found {lease_ms}"),
            });
        }
        let raft = raft_timing(&file)?;
        let id = self.id.or(file.id);
        if id == Some(0) {
            return Err(ConfigError::Invalid {
                field: "id",
                message: "node ids start at 1".to_string(),
            });
        }
        let snapshot_after_logs = self
            .snapshot_after_logs
            .or(file.snapshot_after_logs)
            .unwrap_or(flotilla_raft::replica::DEFAULT_SNAPSHOT_AFTER_LOGS)
            .max(1);
        let logs_kept_after_snapshot = self
            .logs_kept_after_snapshot
            .or(file.logs_kept_after_snapshot)
            .unwrap_or(2_000);
        let machines = self.machine_settings(&file, &machines_section)?;
        Ok(NodeConfig {
            models,
            agents,
            git,
            plugins,
            repos,
            aws,
            machines,
            data_dir,
            listen,
            advertise,
            mesh_port,
            id,
            region,
            slots,
            join: self.join.or(file.join),
            lease_ms,
            raft,
            snapshot_after_logs,
            logs_kept_after_snapshot,
            labels: file.labels,
            join_token: self.join_token.filter(|token| !token.trim().is_empty()),
            public_tls: self.tls_cert.zip(self.tls_key),
            restore: self.restore.map(|file| (file, self.restore_kek)),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            otlp_endpoint: otlp_endpoint(self.otlp_endpoint.or(file.otlp_endpoint))?,
        })
    }

    /// `--check-config`: resolves the settings as a start would, and says what it found. A
    /// parse error already names the file, line and column; a value refused after parsing is
    /// named by its field, with the file it came from.
    pub fn check(self) -> Result<String, String> {
        let source = self
            .config
            .as_ref()
            .map(|path| format!("config file {}", path.display()))
            .unwrap_or_else(|| "flags (no --config)".to_string());
        match self.resolve() {
            Ok(config) => Ok(format!(
                "{source} is valid: region {}, data dir {}, listen {}, advertise {}, {}, {} slots, lease {} ms, raft heartbeat {} ms and election timeout {}–{} ms, models [{}]",
                config.region,
                config.data_dir.display(),
                config.listen,
                config.advertise,
                config
                    .join
                    .as_deref()
                    .map(|join| format!("joins through {join}"))
                    .unwrap_or_else(|| "starts a new cluster unless its data dir holds one".to_string()),
                config.slots,
                config.lease_ms,
                config.raft.heartbeat_ms,
                config.raft.election_timeout_ms,
                flotilla_raft::replica::election_timeout_max_ms(config.raft.election_timeout_ms),
                config.models.keys().cloned().collect::<Vec<_>>().join(", "),
            )),
            Err(error @ (ConfigError::Read { .. } | ConfigError::Parse { .. })) => Err(error.to_string()),
            Err(error @ ConfigError::Invalid { .. }) => Err(format!("{source}: {error}")),
        }
    }

    /// The client address, the address other nodes use, and the actor mesh's port (the next
    /// one up).
    fn addresses(&self, file: &FileNode) -> Result<(SocketAddr, SocketAddr, u16), ConfigError> {
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:7420".parse().expect("valid default address"));
        let advertise = self.advertise.or(file.advertise).unwrap_or(listen);
        if advertise.ip().is_unspecified() {
            return Err(ConfigError::Invalid {
                field: "advertise",
                message: format!("listening on {listen} needs --advertise with an address other nodes can reach"),
            });
        }
        let mesh_port = listen.port().checked_add(1).ok_or(ConfigError::Invalid {
            field: "listen",
            message: "port 65535 leaves no port for the actor mesh".to_string(),
        })?;
        Ok((listen, advertise, mesh_port))
    }

    /// The machine settings: defaults, overridden by the file, overridden by flags.
    fn machine_settings(
        &self,
        file: &FileNode,
        section: &MachinesSection,
    ) -> Result<flotilla_actors::machine::MachineSettings, ConfigError> {
        let mut machines = flotilla_actors::machine::MachineSettings::default();
        if let Some(image) = self.base_image.as_ref().or(file.base_image.as_ref()) {
            machines.base_image =
                image
                    .parse()
                    .map_err(|error: flotilla_sandbox::SandboxError| ConfigError::Invalid {
                        field: "base_image",
                        message: error.to_string(),
                    })?;
        }
        if let Some(timeout) = self.install_timeout_ms.or(file.install_timeout_ms) {
            machines.install_timeout_ms = timeout;
        }
        let megabytes = |value: Option<u64>| value.map(|megabytes| megabytes * 1024 * 1024);
        if let Some(bytes) = megabytes(self.machine_memory_mb)
            .or(section.memory)
            .or(megabytes(file.machine_memory_mb))
        {
            machines.limits.memory_bytes = bytes;
        }
        if let Some(count) = self
            .machine_max_processes
            .or(section.max_processes)
            .or(file.machine_max_processes)
        {
            machines.limits.max_processes = count;
        }
        if let Some(bytes) = megabytes(self.machine_disk_mb)
            .or(section.disk)
            .or(megabytes(file.machine_disk_mb))
        {
            machines.limits.disk_bytes = bytes;
        }
        if let Some(backing) = section.disk_backing {
            machines.disk_backing = backing;
        }
        if let Some(start) = section.uid_range_start {
            machines.uid_ranges.first_host_id = start;
        }
        if let Some(count) = section.uid_ranges {
            machines.uid_ranges.ranges = count;
        }
        machines.uid_ranges.validate().map_err(|error| ConfigError::Invalid {
            field: "machines.uid_range_start and machines.uid_ranges",
            message: error.to_string(),
        })?;
        if let Some(timeout) = self.command_timeout_ms.or(file.command_timeout_ms) {
            machines.limits.command_timeout_ms = timeout;
        }
        machines.limits.validate().map_err(|error| ConfigError::Invalid {
            field: "machine limits",
            message: error.to_string(),
        })?;
        Ok(machines)
    }
}

fn check_default_model(
    agents: &AgentSettings,
    models: &BTreeMap<String, flotilla_actors::model::ModelConfig>,
) -> Result<(), ConfigError> {
    if let Some(model) = &agents.default_model {
        if !models.contains_key(model) {
            return Err(ConfigError::Invalid {
                field: "agents.default_model",
                message: format!(
                    "{model:?} is not declared; declared models: {:?}",
                    models.keys().collect::<Vec<_>>()
                ),
            });
        }
    }
    Ok(())
}

fn check_git_credentials(git: &GitSection) -> Result<(), ConfigError> {
    for credential in &git.credentials {
        if credential.password_env.is_some() == credential.password_secret.is_some() {
            return Err(ConfigError::Invalid {
                field: "git.credentials",
                message: format!(
                    "credential for {:?} needs exactly one of password_env and password_secret",
                    credential.url_prefix
                ),
            });
        }
    }
    Ok(())
}

fn read_config(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.display().to_string(),
        message: error.to_string(),
    })?;
    parse_config(path, &text)
}

fn parse_config(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    let mut parsed: ConfigFile = toml::from_str(text).map_err(|error| {
        let (line, column) = error
            .span()
            .map(|span| line_and_column(text, span.start))
            .unwrap_or((0, 0));
        ConfigError::Parse {
            path: path.display().to_string(),
            line,
            column,
            message: error.message().to_string(),
        }
    })?;
    // A script path is relative to the file that names it.
    if let Some(directory) = path.parent() {
        for model in parsed.models.values_mut() {
            if let Some(script) = &model.script {
                if script.is_relative() {
                    model.script = Some(directory.join(script));
                }
            }
        }
    }
    Ok(parsed)
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|index| index + 1).unwrap_or(0) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
