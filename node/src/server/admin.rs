//! `flotilla.v1.AdminService`: uploading and managing the cluster's Wasm plugins. Admin tokens
//! only.
//!
//! An upload is read whole (at most `MAX_PLUGIN_BYTES`), checked by the node's
//! [`PluginValidator`] before anything is written, then replicated as `PutPluginChunk` writes
//! (concurrent; the write batcher groups them into log entries) and one `CommitPlugin`, which
//! every node's state machine checks against the length and SHA-256 it computes itself. Any
//! failure after the first chunk writes `AbortUpload`, so no staged bytes are left behind (and a
//! node that dies mid-upload leaves an upload that the next one drops once it is stale).

use std::sync::Arc;

use flotilla_proto::v1::admin_service_server::AdminService;
use flotilla_proto::v1::{self, upload_plugin_request};
use flotilla_raft::command::{MAX_PLUGIN_BYTES, MAX_PLUGIN_CHUNK_BYTES};
use flotilla_raft::{Command, PluginKey, PluginKind, PluginRecord, Replica, Response, UploadId};
use sha2::{Digest as _, Sha256};
use tonic::{Request, Status, Streaming};

use super::{convert, validate, write_status};

/// Largest message of an upload stream; clients send chunks well below it (the CLI 256 KiB).
pub const MAX_UPLOAD_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// What `UploadPlugin` answers on a node that cannot check a component before storing it.
pub const UPLOAD_UNAVAILABLE: &str =
    "plugin validation is not available on this node: it has no plugin host to check a component before it is stored";

/// Checks an uploaded component before it is written: that it is a component, that it imports
/// only what the host offers, and that it exports one of the plugin worlds. Returns the world it
/// implements, or why it cannot be loaded, in words for the admin ("not a component", "imports
/// wasi:sockets/tcp which the host does not offer", "exports do not match world vcs-provider:
/// missing create-pull-request"). It may take a while (compiling a component): it is called
/// off the async threads.
pub trait PluginValidator: Send + Sync {
    fn validate(&self, name: &str, version: &str, bytes: &[u8]) -> Result<PluginKind, ComponentRejected>;
}

/// Why a component cannot be loaded, in words for the admin.
#[derive(Debug, thiserror::Error)]
pub enum ComponentRejected {
    #[error(transparent)]
    Load(#[from] flotilla_plugins::PluginError),
    /// A validator's own reason (a node without a plugin host, a test).
    #[error("{0}")]
    Other(String),
}

/// An upload refused because its component cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("plugin {key} cannot be loaded: {reason}")]
pub struct PluginRejected {
    pub key: PluginKey,
    pub reason: ComponentRejected,
}

/// The validator of a node: the plugin host itself loads (and so checks and compiles) the
/// component, exactly as it will when the plugin is used.
pub struct HostValidator {
    pub host: Arc<flotilla_plugins::PluginHost>,
}

impl PluginValidator for HostValidator {
    fn validate(&self, name: &str, version: &str, bytes: &[u8]) -> Result<PluginKind, ComponentRejected> {
        let plugin = self.host.load(name, version, bytes, Vec::new())?;
        Ok(match plugin.kind() {
            flotilla_plugins::PluginKind::VcsProvider => PluginKind::VcsProvider,
            flotilla_plugins::PluginKind::Tool => PluginKind::Tool,
        })
    }
}

pub struct AdminApi {
    pub replica: Replica,
    /// `None` on a node without a plugin host: `UploadPlugin` answers UNIMPLEMENTED, and the
    /// rest (list, enable, disable, grant, remove) works.
    pub validator: Option<Arc<dyn PluginValidator>>,
    /// What this node has loaded; `None` on a node without a plugin host.
    pub registry: Option<Arc<super::plugins::PluginRegistry>>,
    /// What a backup names (cluster, key-encryption key); `None`: `Backup` is UNIMPLEMENTED.
    pub backup: Option<Arc<super::backup::BackupSource>>,
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

fn plugin_of(response: Response) -> Result<PluginRecord, Status> {
    match response {
        Response::Plugin(record) => Ok(*record),
        other => Err(Status::internal(format!(
            "the state machine answered a plugin command with {other:?}"
        ))),
    }
}

/// A checked upload, ready to be written.
struct CheckedUpload {
    key: PluginKey,
    kind: PluginKind,
    sha256: String,
    granted_hosts: Vec<String>,
    enable: bool,
    bytes: Vec<u8>,
}

impl AdminApi {
    /// A plugin on the wire, with whether this node runs it.
    fn wire(&self, record: &PluginRecord) -> v1::Plugin {
        let mut plugin = convert::plugin(record);
        if let Some(registry) = &self.registry {
            plugin.loaded_here = registry.is_loaded(record);
            plugin.load_error = registry.load_error(record).unwrap_or_default();
        }
        plugin.settings = self.settings_of(&record.name);
        plugin
    }

    fn settings_of(&self, name: &str) -> std::collections::HashMap<String, String> {
        self.replica.reader().read(|state| {
            state
                .plugin_settings
                .get(name)
                .map(|settings| settings.clone().into_iter().collect())
                .unwrap_or_default()
        })
    }

    /// The built-in providers of the answering node, as plugins.
    fn builtins(&self, name: &str) -> Vec<v1::Plugin> {
        let Some(registry) = &self.registry else {
            return Vec::new();
        };
        registry
            .builtin_listings()
            .into_iter()
            .filter(|listing| name.is_empty() || listing.name == name)
            .map(|listing| v1::Plugin {
                loaded_here: registry.builtin_active(&listing.name),
                settings: self.settings_of(&listing.name),
                name: listing.name,
                version: listing.version,
                sha256: listing.sha256,
                size_bytes: listing.size_bytes,
                kind: v1::PluginKind::VcsProvider as i32,
                enabled: !listing.shadowed,
                granted_hosts: listing.granted_hosts,
                uploaded_at: None,
                load_error: listing.load_error.unwrap_or_default(),
                builtin: true,
            })
            .collect()
    }

    fn refuse_existing(&self, key: &PluginKey) -> Result<(), Status> {
        let exists = self.replica.reader().read(|state| state.plugins.contains_key(key));
        if exists {
            return Err(Status::already_exists(format!(
                "plugin {key} already exists; upload it under a new version"
            )));
        }
        Ok(())
    }

    /// Checks an upload's header before its bytes are read: the name, version and hosts, and
    /// that the version is new (checked again by the commit, since two uploads may race).
    fn check_header(&self, header: &v1::UploadPluginHeader) -> Result<(PluginKey, Vec<String>), Status> {
        validate::plugin_ref(&header.name, &header.version)?;
        let granted_hosts = validate::granted_hosts("granted_hosts", &header.granted_hosts)?;
        let key = PluginKey::new(&header.name, &header.version);
        self.refuse_existing(&key)?;
        Ok((key, granted_hosts))
    }

    /// Validates the component off the async threads, then replicates it.
    async fn store_upload(
        &self,
        validator: Arc<dyn PluginValidator>,
        key: PluginKey,
        granted_hosts: Vec<String>,
        enable: bool,
        bytes: Vec<u8>,
    ) -> Result<PluginRecord, Status> {
        let (kind, sha256, bytes) = {
            let key = key.clone();
            tokio::task::spawn_blocking(move || {
                let kind = validator.validate(&key.name, &key.version, &bytes);
                let sha256 = hex::encode(Sha256::digest(&bytes));
                (kind, sha256, bytes)
            })
            .await
            .map_err(|error| Status::internal(format!("the plugin validator failed: {error}")))?
        };
        let kind = kind.map_err(|reason| PluginRejected {
            key: key.clone(),
            reason,
        })?;
        let upload = CheckedUpload {
            key,
            kind,
            sha256,
            granted_hosts,
            enable,
            bytes,
        };
        tokio::spawn(replicate(self.replica.clone(), upload))
            .await
            .map_err(|error| Status::internal(format!("the plugin upload task failed: {error}")))?
    }

    async fn write_plugin_command(&self, command: Command) -> Result<tonic::Response<v1::Plugin>, Status> {
        let response = self.replica.write(command).await.map_err(write_status)?;
        Ok(tonic::Response::new(convert::plugin(&plugin_of(response)?)))
    }
}

/// Reads the chunks after the header, up to [`MAX_PLUGIN_BYTES`].
async fn read_chunks(stream: &mut Streaming<v1::UploadPluginRequest>, key: &PluginKey) -> Result<Vec<u8>, Status> {
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.kind {
            Some(upload_plugin_request::Kind::Chunk(chunk)) => {
                if bytes.len() + chunk.len() > MAX_PLUGIN_BYTES {
                    return Err(Status::resource_exhausted(format!(
                        "plugin {key} is larger than {MAX_PLUGIN_BYTES} bytes (32 MiB), the most a plugin may be"
                    )));
                }
                bytes.extend_from_slice(&chunk);
            }
            Some(upload_plugin_request::Kind::Header(_)) => {
                return Err(invalid(format!(
                    "a second header arrived after {} bytes; an upload has one header, first",
                    bytes.len()
                )))
            }
            None => {
                return Err(invalid(
                    "an upload message holds neither a header nor a chunk".to_string(),
                ))
            }
        }
    }
    if bytes.is_empty() {
        return Err(invalid(format!(
            "plugin {key}: no bytes were uploaded after the header"
        )));
    }
    Ok(bytes)
}

/// Stages the chunks and commits them; on any failure aborts the upload. Runs on a task of its
/// own, so that a client that goes away mid-write still leaves a committed plugin or nothing.
async fn replicate(replica: Replica, upload: CheckedUpload) -> Result<PluginRecord, Status> {
    let upload_id = UploadId::new();
    let size_bytes = upload.bytes.len() as u64;
    let chunks: Vec<Command> = upload
        .bytes
        .chunks(MAX_PLUGIN_CHUNK_BYTES)
        .enumerate()
        .map(|(index, chunk)| Command::PutPluginChunk {
            upload: upload_id,
            index: index as u32,
            bytes: chunk.to_vec(),
        })
        .collect();
    drop(upload.bytes);
    let chunk_count = chunks.len() as u32;
    let staged = futures::future::join_all(chunks.into_iter().map(|chunk| replica.write(chunk))).await;
    let outcome = match staged.into_iter().find_map(Result::err) {
        Some(error) => Err(write_status(error)),
        None => replica
            .write(Command::CommitPlugin {
                upload: upload_id,
                name: upload.key.name.clone(),
                version: upload.key.version.clone(),
                sha256: upload.sha256,
                kind: upload.kind,
                size_bytes,
                chunk_count,
                granted_hosts: upload.granted_hosts,
                enable: upload.enable,
            })
            .await
            .map_err(write_status)
            .and_then(plugin_of),
    };
    if let Err(status) = &outcome {
        if let Err(error) = replica.write(Command::AbortUpload { upload: upload_id }).await {
            // Harmless beyond the bytes it holds: a later upload drops it once it is stale.
            tracing::warn!(upload = %upload_id, plugin = %upload.key, %error, "could not abort a failed plugin upload");
        }
        tracing::warn!(upload = %upload_id, plugin = %upload.key, %status, "plugin upload failed");
    }
    outcome
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    type BackupStream = super::backup::BackupStream;

    async fn backup(
        &self,
        _request: Request<v1::BackupRequest>,
    ) -> Result<tonic::Response<Self::BackupStream>, Status> {
        super::backup::backup_or_unavailable(&self.replica, &self.backup)
            .await
            .map(tonic::Response::new)
    }

    async fn upload_plugin(
        &self,
        request: Request<Streaming<v1::UploadPluginRequest>>,
    ) -> Result<tonic::Response<v1::Plugin>, Status> {
        let validator = self
            .validator
            .clone()
            .ok_or_else(|| Status::unimplemented(UPLOAD_UNAVAILABLE))?;
        let audit_note = super::audit::note_of(&request);
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(v1::UploadPluginRequest {
                kind: Some(upload_plugin_request::Kind::Header(header)),
            }) => header,
            Some(_) => {
                return Err(invalid(
                    "the first message of an upload must be its header (name, version), found none".to_string(),
                ))
            }
            None => return Err(invalid("the upload ended before its header".to_string())),
        };
        audit_note.set(format!("{}@{}", header.name, header.version), None);
        let (key, granted_hosts) = self.check_header(&header)?;
        let bytes = read_chunks(&mut stream, &key).await?;
        let record = self
            .store_upload(validator, key, granted_hosts, header.enable, bytes)
            .await?;
        tracing::info!(plugin = %record.key(), kind = %record.kind, size_bytes = record.size_bytes, enabled = record.enabled, "plugin uploaded");
        Ok(tonic::Response::new(convert::plugin(&record)))
    }

    async fn list_plugins(
        &self,
        request: Request<v1::ListPluginsRequest>,
    ) -> Result<tonic::Response<v1::ListPluginsResponse>, Status> {
        let name = request.into_inner().name;
        if !name.is_empty() {
            flotilla_raft::validate_plugin_name(&name).map_err(|error| invalid(format!("name: {error}")))?;
        }
        // Records only: the bytes stay in `plugin_chunks`.
        let mut records: Vec<PluginRecord> = self.replica.reader().read(|state| {
            state
                .plugins
                .values()
                .filter(|record| name.is_empty() || record.name == name)
                .cloned()
                .collect()
        });
        records.sort_by(|left, right| {
            left.name
                .cmp(&right.name)
                .then_with(|| flotilla_raft::plugin_version_order(&left.version, &right.version))
        });
        let mut plugins: Vec<v1::Plugin> = records.iter().map(|record| self.wire(record)).collect();
        plugins.extend(self.builtins(&name));
        plugins.sort_by(|left, right| {
            left.name
                .cmp(&right.name)
                .then(left.builtin.cmp(&right.builtin).reverse())
                .then_with(|| flotilla_raft::plugin_version_order(&left.version, &right.version))
        });
        Ok(tonic::Response::new(v1::ListPluginsResponse { plugins }))
    }

    async fn enable_plugin(&self, request: Request<v1::PluginRef>) -> Result<tonic::Response<v1::Plugin>, Status> {
        super::audit::note_target(
            &request,
            format!("{}@{}", request.get_ref().name, request.get_ref().version),
            None,
        );
        let body = request.into_inner();
        validate::plugin_ref(&body.name, &body.version)?;
        self.write_plugin_command(Command::SetPluginEnabled {
            name: body.name,
            version: body.version,
            enabled: true,
        })
        .await
    }

    async fn disable_plugin(&self, request: Request<v1::PluginRef>) -> Result<tonic::Response<v1::Plugin>, Status> {
        super::audit::note_target(
            &request,
            format!("{}@{}", request.get_ref().name, request.get_ref().version),
            None,
        );
        let body = request.into_inner();
        validate::plugin_ref(&body.name, &body.version)?;
        self.write_plugin_command(Command::SetPluginEnabled {
            name: body.name,
            version: body.version,
            enabled: false,
        })
        .await
    }

    async fn remove_plugin(
        &self,
        request: Request<v1::PluginRef>,
    ) -> Result<tonic::Response<v1::RemovePluginResponse>, Status> {
        super::audit::note_target(
            &request,
            format!("{}@{}", request.get_ref().name, request.get_ref().version),
            None,
        );
        let body = request.into_inner();
        validate::plugin_ref(&body.name, &body.version)?;
        let response = self
            .replica
            .write(Command::RemovePlugin {
                name: body.name,
                version: body.version,
            })
            .await
            .map_err(write_status)?;
        Ok(tonic::Response::new(v1::RemovePluginResponse {
            plugin: Some(convert::plugin(&plugin_of(response)?)),
        }))
    }

    async fn grant_hosts(
        &self,
        request: Request<v1::GrantHostsRequest>,
    ) -> Result<tonic::Response<v1::Plugin>, Status> {
        super::audit::note_target(
            &request,
            format!("{}@{}", request.get_ref().name, request.get_ref().version),
            None,
        );
        let body = request.into_inner();
        validate::plugin_ref(&body.name, &body.version)?;
        let hosts = validate::granted_hosts("hosts", &body.hosts)?;
        self.write_plugin_command(Command::GrantPluginHosts {
            name: body.name,
            version: body.version,
            hosts,
        })
        .await
    }

    async fn configure_plugin(
        &self,
        request: Request<v1::ConfigurePluginRequest>,
    ) -> Result<tonic::Response<v1::ConfigurePluginResponse>, Status> {
        super::audit::note_target(&request, request.get_ref().name.clone(), None);
        let body = request.into_inner();
        flotilla_raft::validate_plugin_name(&body.name).map_err(|error| invalid(format!("name: {error}")))?;
        let settings: std::collections::BTreeMap<String, String> = body.settings.into_iter().collect();
        flotilla_raft::validate_plugin_settings(&settings).map_err(|error| invalid(error.to_string()))?;
        let response = self
            .replica
            .write(Command::SetPluginSettings {
                name: body.name.clone(),
                settings,
            })
            .await
            .map_err(write_status)?;
        match response {
            Response::PluginSettings(settings) => Ok(tonic::Response::new(v1::ConfigurePluginResponse {
                name: body.name,
                settings: settings.into_iter().collect(),
            })),
            other => Err(Status::internal(format!(
                "the state machine answered set-plugin-settings with {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flotilla_raft::{NodeAddr, ReplicaConfig};

    use super::*;

    /// Accepts components that start with the Wasm magic, as the given kind; refuses the rest
    /// with the words a real validator would use.
    struct MagicValidator(PluginKind);

    impl PluginValidator for MagicValidator {
        fn validate(&self, _name: &str, _version: &str, bytes: &[u8]) -> Result<PluginKind, ComponentRejected> {
            if bytes.starts_with(b"\0asm") {
                Ok(self.0)
            } else {
                Err(ComponentRejected::Other("not a component".to_string()))
            }
        }
    }

    async fn one_node(dir: &std::path::Path) -> AdminApi {
        let replica = Replica::open(ReplicaConfig::new(1, dir.join("node"), None))
            .await
            .expect("open the replica");
        replica
            .bootstrap(NodeAddr {
                grpc: "127.0.0.1:1".to_string(),
                mesh: "127.0.0.1:2".to_string(),
            })
            .await
            .expect("bootstrap");
        replica
            .wait_for_leader(Duration::from_secs(30))
            .await
            .expect("a leader within 30 s");
        AdminApi {
            replica,
            validator: None,
            registry: None,
            backup: None,
        }
    }

    fn header(name: &str, version: &str, hosts: &[&str]) -> v1::UploadPluginHeader {
        v1::UploadPluginHeader {
            name: name.to_string(),
            version: version.to_string(),
            granted_hosts: hosts.iter().map(|host| host.to_string()).collect(),
            enable: true,
        }
    }

    /// A component of a little over two Raft chunks.
    fn component() -> Vec<u8> {
        let mut bytes = b"\0asm".to_vec();
        bytes.extend((0..2 * MAX_PLUGIN_CHUNK_BYTES + 1000).map(|index| (index % 251) as u8));
        bytes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_validated_upload_is_replicated_in_chunks_and_a_refused_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let api = one_node(dir.path()).await;
        let validator: Arc<dyn PluginValidator> = Arc::new(MagicValidator(PluginKind::Tool));
        let bytes = component();

        let (key, hosts) = api
            .check_header(&header("lint", "1.0.0", &["API.example.com", "api.example.com"]))
            .unwrap();
        assert_eq!(hosts, vec!["api.example.com"]);
        let record = api
            .store_upload(validator.clone(), key.clone(), hosts, true, bytes.clone())
            .await
            .unwrap();
        assert_eq!(record.kind, PluginKind::Tool, "the kind is the validator's");
        assert_eq!(record.chunk_count, 3);
        assert_eq!(record.size_bytes, bytes.len() as u64);
        assert_eq!(record.sha256, hex::encode(Sha256::digest(&bytes)));
        assert!(record.enabled);
        let reader = api.replica.reader();
        assert_eq!(reader.read(|state| state.plugin_bytes(&key)), Some(bytes.clone()));
        assert!(reader.read(|state| state.plugin_uploads.is_empty() && state.upload_chunks.is_empty()));

        // The same version again is refused before its bytes are read, and by the commit.
        let status = api.check_header(&header("lint", "1.0.0", &[])).unwrap_err();
        assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
        let status = api
            .store_upload(validator.clone(), key.clone(), Vec::new(), false, bytes.clone())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
        assert!(
            reader.read(|state| state.plugin_uploads.is_empty() && state.upload_chunks.is_empty()),
            "the refused commit's chunks were aborted"
        );

        // A component the validator refuses is INVALID_ARGUMENT with its reason; nothing is written.
        let applied = reader.last_applied_index();
        let status = api
            .store_upload(
                validator,
                PluginKey::new("lint", "2.0.0"),
                Vec::new(),
                true,
                b"not wasm".to_vec(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), "plugin lint 2.0.0 cannot be loaded: not a component");
        assert_eq!(reader.last_applied_index(), applied, "nothing was written");

        for (bad, field) in [
            (header("Lint", "1.0.0", &[]), "name: "),
            (header("lint", "1", &[]), "version: "),
            (header("lint", "3.0.0", &["*"]), "granted_hosts: "),
        ] {
            let status = api.check_header(&bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with(field), "{status:?}");
        }
        api.replica.shutdown().await;
    }
}
