//! `flotilla`: one binary for the node daemon (`flotilla node`) and the command-line client
//! (`flotilla agent ...`, `flotilla cluster ...`, `flotilla plugin ...`). The load generators
//! are a binary of their own, `flotilla-bench` (`bench/`), so that no benchmark code ships in
//! the node.

mod cli;
mod config;
mod log_redact;
mod machines_cli;
mod observability;
mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The node allocates and frees many small buffers per request (gRPC frames, log entries,
// records); mimalloc does that with less contention than the system allocator.
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Self-hosted control plane for cloud coding agents"
)]
struct Cli {
    #[command(flatten)]
    client: cli::ClientArgs,
    #[command(subcommand)]
    command: TopCommand,
}

#[derive(Subcommand)]
enum TopCommand {
    /// Run a node of a Flotilla cluster.
    Node(Box<config::NodeArgs>),
    /// Create, list, watch and steer agents.
    Agent {
        #[command(subcommand)]
        command: cli::AgentCommand,
    },
    /// Inspect and change the cluster's membership.
    Cluster {
        #[command(subcommand)]
        command: cli::ClusterCommand,
    },
    /// Upload and manage the cluster's Wasm plugins (admin token).
    Plugin {
        #[command(subcommand)]
        command: cli::PluginCommand,
    },
    /// Create and list teams (cluster-admin key).
    Team {
        #[command(subcommand)]
        command: cli::TeamCommand,
    },
    /// Create, list and revoke API keys; `key info` says who the calling key is.
    Key {
        #[command(subcommand)]
        command: cli::KeyCommand,
    },
    /// Set, list and remove team, user and cluster secrets (values from standard input).
    Secret {
        #[command(subcommand)]
        command: cli::SecretCommand,
    },
    /// A team's settings: default model, repository and base branch, summary display, allowed
    /// models, retention, privacy mode.
    Settings {
        #[command(subcommand)]
        command: cli::SettingsCommand,
    },
    /// The models this node offers, and which the caller's team may use.
    Models {
        #[command(subcommand)]
        command: cli::ModelsCommand,
    },
    /// Read the audit log of mutating calls (team admin: its team's; cluster-admin: all).
    Audit {
        #[command(subcommand)]
        command: cli::AuditCommand,
    },
    /// Show or set per-team limits on agents (setting needs the cluster-admin key).
    Limits {
        #[command(subcommand)]
        command: cli::LimitsCommand,
    },
    /// Operate the cluster: `admin backup FILE` (cluster-admin key).
    Admin {
        #[command(subcommand)]
        command: cli::AdminCommand,
    },
    /// Check a checkout's environment.json and print the machine plan.
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// Build a base image for agent machines.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

#[derive(Subcommand)]
enum EnvCommand {
    /// Parse DIR's .flotilla/environment.json (or .cursor/environment.json) and print the plan.
    Check(machines_cli::EnvCheckArgs),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build (or find) a base image: debian or host.
    Build(machines_cli::ImageBuildArgs),
}

fn init_logging(default_level: &str) {
    init_logging_as(default_level, observability::LogFormat::Text)
}

fn init_logging_as(default_level: &str, format: observability::LogFormat) {
    // Without an endpoint no exporter is built.
    let _ = init_node_logging(default_level, format, None);
}

/// The log lines, and with an OTLP endpoint the trace exporter (returned, to be flushed when
/// the node stops). Each has its own filter: `RUST_LOG` chooses the lines, the traces take the
/// node's own spans (see observability::traces).
fn init_node_logging(
    default_level: &str,
    format: observability::LogFormat,
    traces: Option<(&url::Url, observability::traces::TraceIdentity)>,
) -> Result<Option<observability::traces::Traces>, observability::traces::TracesError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = observability::log_filter::LineFilter::from_env(default_level);
    // Every line passes the redactor: no secret value reaches the log. Colours only on a
    // terminal: a log file or journal would keep the escape codes, in the middle of every
    // `field=value` a reader searches for.
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(log_redact::RedactingMakeWriter::new(std::io::stderr));
    let lines = match format {
        observability::LogFormat::Text => lines.boxed(),
        observability::LogFormat::Json => lines.json().boxed(),
    };
    let lines = lines.with_filter(filter.and_also(observability::traces::logged));
    // Without an endpoint there is no second layer at all: an absent (`None`) layer would
    // make every call site the lines leave out "sometimes" interesting, asked on every call.
    match traces {
        Some((endpoint, identity)) => {
            let (exporter, layer) = observability::traces::start(endpoint, identity)?;
            let spans = layer.with_filter(observability::traces::exported_filter());
            tracing_subscriber::registry().with(lines).with(spans).init();
            Ok(Some(exporter))
        }
        None => {
            tracing_subscriber::registry().with(lines).init();
            Ok(None)
        }
    }
}

/// Tasks a runtime worker runs between two looks at the sockets and timers when it has work
/// queued (the runtime's default is 61; a worker with nothing queued looks at once either way).
/// Each look is a system call, and the tasks it readies are shared with the other workers,
/// waking an idle one. Under a node's write load its tasks are short (an answer, a frame, a
/// hand-off), so looking four times less often took 7–10 % off the CPU a write costs three
/// loopback nodes (docs/performance.md, "How often a worker looks at its sockets"). At
/// 256 polls of a few microseconds a socket waits well under a millisecond longer.
const RUNTIME_EVENT_INTERVAL: u32 = 256;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before anything that needs root: a config check touches nothing.
    if let TopCommand::Node(args) = &cli.command {
        if args.check_config {
            return match (**args).clone().check() {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    // A node's machine layers, and an image build's, live and die with this process.
    let mounts_layers = matches!(cli.command, TopCommand::Node(_) | TopCommand::Image { .. });
    if mounts_layers {
        if let Err(error) = flotilla_sandbox::enter_private_mount_namespace() {
            eprintln!("error: machine layers need a mount namespace of this process's own (run as root): {error}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(RUNTIME_EVENT_INTERVAL)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let client = cli.client;
    let result = runtime.block_on(async move {
        match cli.command {
            TopCommand::Node(args) => {
                let log_format = args.log_format;
                let config = (*args).resolve()?;
                let identity = observability::traces::TraceIdentity {
                    instance: config.advertise.to_string(),
                    region: config.region.clone(),
                };
                let traces = init_node_logging(
                    "info,openraft=warn,ractor_cluster=warn",
                    log_format,
                    config.otlp_endpoint.as_ref().map(|endpoint| (endpoint, identity)),
                )?;
                let ran = server::run_node(config).await;
                if let Some(traces) = traces {
                    // Flushing blocks until the last export ends or times out.
                    let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
                }
                ran?;
                Ok(ExitCode::SUCCESS)
            }
            TopCommand::Agent { command } => {
                init_logging("warn");
                cli::run_agent(&client, command).await
            }
            TopCommand::Cluster { command } => {
                init_logging("warn");
                cli::run_cluster(&client, command).await
            }
            TopCommand::Plugin { command } => {
                init_logging("warn");
                cli::run_plugin(&client, command).await
            }
            TopCommand::Team { command } => {
                init_logging("warn");
                cli::run_team(&client, command).await
            }
            TopCommand::Key { command } => {
                init_logging("warn");
                cli::run_key(&client, command).await
            }
            TopCommand::Secret { command } => {
                init_logging("warn");
                cli::run_secret(&client, command).await
            }
            TopCommand::Settings { command } => {
                init_logging("warn");
                cli::run_settings(&client, command).await
            }
            TopCommand::Models { command } => {
                init_logging("warn");
                cli::run_models(&client, command).await
            }
            TopCommand::Audit { command } => {
                init_logging("warn");
                cli::run_audit(&client, command).await
            }
            TopCommand::Limits { command } => {
                init_logging("warn");
                cli::run_limits(&client, command).await
            }
            TopCommand::Admin { command } => {
                init_logging("warn");
                cli::run_admin(&client, command).await
            }
            TopCommand::Env {
                command: EnvCommand::Check(args),
            } => machines_cli::env_check(args),
            TopCommand::Image {
                command: ImageCommand::Build(args),
            } => {
                init_logging("info");
                machines_cli::image_build(args).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
