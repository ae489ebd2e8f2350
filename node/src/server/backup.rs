//! `AdminService.Backup`: the whole replicated state as a backup file, streamed to the client.
//!
//! A read barrier first (every write acknowledged before the call is in the backup), then the
//! state is encoded under the state machine's read lock, so the backup stands for exactly one
//! applied index while the cluster keeps running. The file's bytes go out in messages of at
//! most [`BACKUP_CHUNK_BYTES`] through a channel of [`BACKUP_CHUNKS_IN_FLIGHT`], so a slow client
//! holds at most a few MiB of sends beyond the encoded state itself. The file format and its
//! checks are in `flotilla_raft::store::backup`.

use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::v1::{self, backup_chunk};
use flotilla_raft::store::backup::Backup;
use flotilla_raft::Replica;
use tokio_stream::Stream;
use tonic::Status;

use super::{convert, secrets::NodeKek};

/// Most file bytes in one `BackupChunk`.
pub const BACKUP_CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks queued for a client before the sender waits.
pub const BACKUP_CHUNKS_IN_FLIGHT: usize = 4;

pub type BackupStream = Pin<Box<dyn Stream<Item = Result<v1::BackupChunk, Status>> + Send>>;

/// What a backup names besides the state: the cluster and the key its secrets are sealed under.
pub struct BackupSource {
    /// The cluster CA's fingerprint.
    pub cluster_id: String,
    pub kek: NodeKek,
}

fn info(backup: &Backup) -> v1::BackupInfo {
    let header = &backup.header;
    v1::BackupInfo {
        cluster_id: header.cluster_id.clone(),
        applied_index: header.applied_index,
        applied_term: header.applied_term,
        created_at: Some(convert::timestamp(header.created_at_ms)),
        format_version: flotilla_raft::store::backup::BACKUP_FORMAT_VERSION,
        state_format_version: header.state_format_version,
        total_bytes: backup.len_bytes(),
        body_sha256: header.body_sha256.clone(),
        kek_id: header.kek_id.clone().unwrap_or_default(),
        agents: header.agents,
        plugins: header.plugins,
        secrets: header.secrets,
    }
}

/// Takes a backup after a read barrier and streams it.
pub async fn stream_backup(replica: &Replica, source: &BackupSource) -> Result<BackupStream, Status> {
    replica.read_barrier().await.map_err(super::status::read_status)?;
    let reader = replica.reader().clone();
    let cluster_id = source.cluster_id.clone();
    let kek_id = source.kek.get().map(|kek| kek.id().to_string());
    // Encoding the whole state (plugin bytes included) and hashing it is CPU work of its size.
    let backup =
        tokio::task::spawn_blocking(move || reader.take_backup(&cluster_id, kek_id, flotilla_raft::command::now_ms()))
            .await
            .map_err(|error| Status::internal(format!("taking the backup failed: {error}")))?
            .map_err(|error| Status::internal(format!("reading the state for the backup failed: {error}")))?;
    tracing::info!(
        applied_index = backup.header.applied_index,
        bytes = backup.len_bytes(),
        agents = backup.header.agents,
        "streaming a backup"
    );
    let (sender, receiver) = tokio::sync::mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        let first = v1::BackupChunk {
            kind: Some(backup_chunk::Kind::Info(info(&backup))),
        };
        if sender.send(Ok(first)).await.is_err() {
            return;
        }
        let pieces = backup
            .prefix
            .chunks(BACKUP_CHUNK_BYTES)
            .chain(backup.body.chunks(BACKUP_CHUNK_BYTES));
        for piece in pieces {
            let chunk = v1::BackupChunk {
                kind: Some(backup_chunk::Kind::Data(piece.to_vec())),
            };
            if sender.send(Ok(chunk)).await.is_err() {
                tracing::info!("the client left before the backup was sent");
                return;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
}

pub fn unavailable() -> Status {
    Status::unimplemented("this node serves no backups (it has no cluster identity)")
}

/// Convenience for the service: the optional source of a node.
pub async fn backup_or_unavailable(
    replica: &Replica,
    source: &Option<Arc<BackupSource>>,
) -> Result<BackupStream, Status> {
    match source {
        Some(source) => stream_backup(replica, source).await,
        None => Err(unavailable()),
    }
}
