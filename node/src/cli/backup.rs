//! `flotilla admin backup FILE`: streams a backup of the replicated state from a node into FILE.
//!
//! The bytes go to a temporary file next to FILE (mode 0600: the backup holds key digests and
//! sealed secrets), which is checked whole with the same checks a restore runs, synced, and only
//! then renamed onto FILE (and the directory synced): FILE is either the old file or a complete,
//! verified backup, never a partial one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_proto::v1::{backup_chunk, BackupInfo, BackupRequest};
use tokio::io::AsyncWriteExt as _;

use super::client::{admin_client, connect, BearerToken, CliError};
use super::{print_json, print_text, ClientArgs, OutputFormat};

/// How long the node may stay silent during the stream (taking the backup, then each chunk).
const BACKUP_MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Write a backup of the whole replicated state (agents, events, plugins, settings, teams and
    /// keys, sealed secrets, audit) to FILE, taken at one applied index while the cluster runs;
    /// `flotilla node --restore FILE` starts a new cluster from it (cluster-admin key)
    Backup {
        /// where to write the backup (replaced only once the new one is complete and checked)
        file: PathBuf,
    },
}

pub(crate) async fn admin_command(args: &ClientArgs, cmd: AdminCommand) -> Result<(), CliError> {
    match cmd {
        AdminCommand::Backup { file } => backup(args, &file).await,
    }
}

fn temporary_path(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".to_string());
    file.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn local(what: String) -> CliError {
    CliError::Usage(what)
}

async fn backup(args: &ClientArgs, file: &Path) -> Result<(), CliError> {
    let token = BearerToken::new(args.token.as_deref())?;
    let endpoint = args.endpoint.as_str();
    let mut client = admin_client(connect(args).await?, token);
    let mut stream = client
        .backup(BackupRequest {})
        .await
        .map_err(|status| CliError::from_status(endpoint, status))?
        .into_inner();
    let first = next_message(endpoint, &mut stream).await?;
    let Some(backup_chunk::Kind::Info(info)) = first else {
        return Err(local(format!(
            "{endpoint} did not start the backup with its description"
        )));
    };
    let temporary = temporary_path(file);
    let written = receive_into(endpoint, &mut stream, &info, &temporary).await;
    let checked = match written {
        Ok(()) => check_and_rename(&temporary, file).await,
        Err(error) => Err(error),
    };
    if let Err(error) = checked {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Err(error);
    }
    match args.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "file": file.display().to_string(),
            "cluster_id": info.cluster_id,
            "applied_index": info.applied_index,
            "total_bytes": info.total_bytes,
            "body_sha256": info.body_sha256,
            "kek_id": info.kek_id,
            "agents": info.agents,
            "plugins": info.plugins,
            "secrets": info.secrets,
        })),
        OutputFormat::Table => print_text(&format!(
            "wrote {}: {} bytes at applied index {}: {} agents, {} plugins, {} secrets{}",
            file.display(),
            info.total_bytes,
            info.applied_index,
            info.agents,
            info.plugins,
            info.secrets,
            if info.secrets > 0 {
                format!(
                    " (sealed under key-encryption key {}: keep a node's DATA_DIR/kek to restore them)",
                    info.kek_id
                )
            } else {
                String::new()
            }
        )),
    }
}

async fn next_message(
    endpoint: &str,
    stream: &mut tonic::Streaming<flotilla_proto::v1::BackupChunk>,
) -> Result<Option<backup_chunk::Kind>, CliError> {
    match tokio::time::timeout(BACKUP_MESSAGE_TIMEOUT, stream.message()).await {
        Err(_) => Err(local(format!(
            "{endpoint} sent nothing for {} s during the backup",
            BACKUP_MESSAGE_TIMEOUT.as_secs()
        ))),
        Ok(Err(status)) => Err(CliError::from_status(endpoint, status)),
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(chunk))) => Ok(chunk.kind),
    }
}

/// Writes the stream's bytes to `temporary`, holding it to the length the node announced.
async fn receive_into(
    endpoint: &str,
    stream: &mut tonic::Streaming<flotilla_proto::v1::BackupChunk>,
    info: &BackupInfo,
    temporary: &Path,
) -> Result<(), CliError> {
    let failed = |error: std::io::Error| local(format!("cannot write {}: {error}", temporary.display()));
    let mut output = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(temporary)
        .await
        .map_err(failed)?;
    let mut received: u64 = 0;
    while let Some(kind) = next_message(endpoint, stream).await? {
        let backup_chunk::Kind::Data(bytes) = kind else {
            return Err(local(format!("{endpoint} sent a second description during the backup")));
        };
        received += bytes.len() as u64;
        if received > info.total_bytes {
            return Err(local(format!(
                "{endpoint} sent more than the {} bytes it announced",
                info.total_bytes
            )));
        }
        output.write_all(&bytes).await.map_err(failed)?;
    }
    if received != info.total_bytes {
        return Err(local(format!(
            "the backup stream from {endpoint} ended after {received} of {} bytes",
            info.total_bytes
        )));
    }
    output.flush().await.map_err(failed)?;
    output.sync_all().await.map_err(failed)?;
    Ok(())
}

/// Runs a restore's checks on the written file, then puts it in place durably.
async fn check_and_rename(temporary: &Path, file: &Path) -> Result<(), CliError> {
    let (temporary, file) = (temporary.to_path_buf(), file.to_path_buf());
    tokio::task::spawn_blocking(move || -> Result<(), CliError> {
        flotilla_raft::store::backup::read_backup(&temporary)
            .map_err(|error| local(format!("the received backup does not check out: {error}")))?;
        std::fs::rename(&temporary, &file)
            .map_err(|error| local(format!("cannot rename the backup onto {}: {error}", file.display())))?;
        let directory = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(&directory)
            .and_then(|handle| handle.sync_all())
            .map_err(|error| local(format!("cannot sync {}: {error}", directory.display())))?;
        Ok(())
    })
    .await
    .map_err(|error| local(format!("checking the backup failed: {error}")))?
}
