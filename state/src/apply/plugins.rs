//! Plugin commands. An upload stages chunks under its id (bounded in number, size and total
//! bytes; a stale upload makes room for a new one); a commit checks the staged bytes against
//! the length and SHA-256 it names and moves them to a plugin version. Versions are enabled
//! (one per name at a time), granted hosts, and removed once disabled; settings belong to a
//! plugin name.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use super::not_in_family;
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{
    ApplyError, ApplyResult, Command, Response, MAX_PLUGINS, MAX_PLUGIN_BYTES, MAX_PLUGIN_CHUNKS,
    MAX_PLUGIN_CHUNK_BYTES, MAX_STAGED_UPLOADS, MAX_TOTAL_PLUGIN_BYTES, STALE_UPLOAD_MS,
};
use crate::types::{
    validate_granted_hosts, validate_plugin_name, validate_plugin_settings, validate_plugin_version,
    validate_sha256_hex, PluginKey, PluginKind, PluginRecord, PluginUpload, UploadId,
};

/// Routes a plugin command to its rule.
pub(super) fn apply_plugin_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::PutPluginChunk { upload, index, bytes } => {
            put_plugin_chunk(state, changes, at_ms, *upload, *index, bytes)
        }
        Command::CommitPlugin {
            upload,
            name,
            version,
            sha256,
            kind,
            size_bytes,
            chunk_count,
            granted_hosts,
            enable,
        } => commit_plugin(
            state,
            changes,
            at_ms,
            PluginCommit {
                upload: *upload,
                key: PluginKey::new(name, version),
                sha256,
                kind: *kind,
                size_bytes: *size_bytes,
                chunk_count: *chunk_count,
                granted_hosts,
                enable: *enable,
            },
        ),
        Command::AbortUpload { upload } => abort_upload(state, changes, *upload),
        Command::SetPluginEnabled { name, version, enabled } => {
            set_plugin_enabled(state, changes, name, version, *enabled)
        }
        Command::GrantPluginHosts { name, version, hosts } => grant_plugin_hosts(state, changes, name, version, hosts),
        Command::RemovePlugin { name, version } => remove_plugin(state, changes, name, version),
        Command::SetPluginSettings { name, settings } => set_plugin_settings(state, changes, name, settings),
        other => not_in_family("plugin", other),
    }
}

fn abort_upload(state: &mut ClusterState, changes: &mut Changes, upload: UploadId) -> ApplyResult {
    if !state.plugin_uploads.contains_key(&upload) {
        return Err(ApplyError::UploadNotFound(upload));
    }
    drop_upload(state, changes, upload);
    Ok(Response::Done)
}

/// Enabling a version disables the other versions of its name: one active version per name.
fn set_plugin_enabled(
    state: &mut ClusterState,
    changes: &mut Changes,
    name: &str,
    version: &str,
    enabled: bool,
) -> ApplyResult {
    let key = existing_plugin(state, name, version)?;
    if enabled {
        disable_other_versions(state, changes, &key);
    }
    let record = state.plugins.get_mut(&key).expect("checked above");
    record.enabled = enabled;
    changes.plugins.insert(key);
    Ok(Response::Plugin(Box::new(record.clone())))
}

/// Replaces the settings of plugin name `name`; an empty map clears them.
fn set_plugin_settings(
    state: &mut ClusterState,
    changes: &mut Changes,
    name: &str,
    settings: &BTreeMap<String, String>,
) -> ApplyResult {
    validate_plugin_name(name)?;
    validate_plugin_settings(settings)?;
    if settings.is_empty() {
        state.plugin_settings.remove(name);
    } else {
        state.plugin_settings.insert(name.to_string(), settings.clone());
    }
    changes.meta = true;
    Ok(Response::PluginSettings(settings.clone()))
}

/// Replaces the hosts a plugin version may reach.
fn grant_plugin_hosts(
    state: &mut ClusterState,
    changes: &mut Changes,
    name: &str,
    version: &str,
    hosts: &[String],
) -> ApplyResult {
    let key = existing_plugin(state, name, version)?;
    validate_granted_hosts(hosts)?;
    let record = state.plugins.get_mut(&key).expect("checked above");
    record.granted_hosts = hosts.to_vec();
    changes.plugins.insert(key);
    Ok(Response::Plugin(Box::new(record.clone())))
}

/// Deletes a disabled plugin version and its bytes; an enabled one is refused.
fn remove_plugin(state: &mut ClusterState, changes: &mut Changes, name: &str, version: &str) -> ApplyResult {
    let key = existing_plugin(state, name, version)?;
    if state.plugins[&key].enabled {
        return Err(ApplyError::PluginEnabled {
            name: name.to_string(),
            version: version.to_string(),
        });
    }
    let record = state.plugins.remove(&key).expect("checked above");
    for index in 0..record.chunk_count {
        state.plugin_chunks.remove(&(key.clone(), index));
        changes.plugin_chunks.insert((key.clone(), index));
    }
    changes.plugins.insert(key);
    Ok(Response::Plugin(Box::new(record)))
}

fn existing_plugin(state: &ClusterState, name: &str, version: &str) -> Result<PluginKey, ApplyError> {
    let key = PluginKey::new(name, version);
    if state.plugins.contains_key(&key) {
        Ok(key)
    } else {
        Err(ApplyError::PluginNotFound {
            name: name.to_string(),
            version: version.to_string(),
        })
    }
}

fn disable_other_versions(state: &mut ClusterState, changes: &mut Changes, key: &PluginKey) {
    for (other, record) in state.plugins.iter_mut() {
        if other.name == key.name && other.version != key.version && record.enabled {
            record.enabled = false;
            changes.plugins.insert(other.clone());
        }
    }
}

fn drop_upload(state: &mut ClusterState, changes: &mut Changes, upload: UploadId) {
    state.plugin_uploads.remove(&upload);
    changes.plugin_uploads.insert(upload);
    let indexes: Vec<u32> = state.staged_chunks(upload).map(|(index, _)| index).collect();
    for index in indexes {
        state.upload_chunks.remove(&(upload, index));
        changes.upload_chunks.insert((upload, index));
    }
}

fn put_plugin_chunk(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    upload: UploadId,
    index: u32,
    bytes: &[u8],
) -> ApplyResult {
    if bytes.is_empty() {
        return Err(ApplyError::Invalid(format!("upload {upload}: chunk {index} is empty")));
    }
    if bytes.len() > MAX_PLUGIN_CHUNK_BYTES {
        return Err(ApplyError::TooLarge {
            what: format!("upload {upload}: chunk {index}"),
            found: bytes.len(),
            limit: MAX_PLUGIN_CHUNK_BYTES,
        });
    }
    if index >= MAX_PLUGIN_CHUNKS {
        return Err(ApplyError::Invalid(format!(
            "upload {upload}: chunk index {index} is past the {MAX_PLUGIN_CHUNKS} chunks a plugin may have"
        )));
    }
    // A new upload drops the stale ones, but only once it is sure to be accepted: a refused
    // command changes nothing.
    let starting = !state.plugin_uploads.contains_key(&upload);
    let stale: Vec<UploadId> = if starting {
        state
            .plugin_uploads
            .values()
            .filter(|staged| staged.last_chunk_at_ms.saturating_add(STALE_UPLOAD_MS) <= at_ms)
            .map(|staged| staged.id)
            .collect()
    } else {
        Vec::new()
    };
    if starting && state.plugin_uploads.len() - stale.len() >= MAX_STAGED_UPLOADS {
        return Err(ApplyError::TooManyUploads {
            limit: MAX_STAGED_UPLOADS,
        });
    }
    let replaced = state
        .upload_chunks
        .get(&(upload, index))
        .map_or(0, |previous| previous.len() as u64);
    let upload_bytes = state.staged_bytes(upload) - replaced + bytes.len() as u64;
    if upload_bytes > MAX_PLUGIN_BYTES as u64 {
        return Err(ApplyError::TooLarge {
            what: format!("upload {upload}"),
            found: upload_bytes as usize,
            limit: MAX_PLUGIN_BYTES,
        });
    }
    let freed: u64 = stale.iter().map(|staged| state.staged_bytes(*staged)).sum();
    let held = state.plugin_bytes_held() - freed - replaced + bytes.len() as u64;
    if held > MAX_TOTAL_PLUGIN_BYTES as u64 {
        return Err(ApplyError::TooLarge {
            what: "the plugins and uploads of the cluster".to_string(),
            found: held as usize,
            limit: MAX_TOTAL_PLUGIN_BYTES,
        });
    }
    for staged in stale {
        drop_upload(state, changes, staged);
    }
    let record = state.plugin_uploads.entry(upload).or_insert_with(|| PluginUpload {
        id: upload,
        started_at_ms: at_ms,
        last_chunk_at_ms: at_ms,
    });
    record.last_chunk_at_ms = at_ms;
    changes.plugin_uploads.insert(upload);
    state.upload_chunks.insert((upload, index), bytes.to_vec());
    changes.upload_chunks.insert((upload, index));
    Ok(Response::Done)
}

/// The fields of a `CommitPlugin`, borrowed.
struct PluginCommit<'a> {
    upload: UploadId,
    key: PluginKey,
    sha256: &'a str,
    kind: PluginKind,
    size_bytes: u64,
    chunk_count: u32,
    granted_hosts: &'a [String],
    enable: bool,
}

fn commit_plugin(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, commit: PluginCommit<'_>) -> ApplyResult {
    let PluginCommit {
        upload,
        key,
        sha256,
        kind,
        size_bytes,
        chunk_count,
        granted_hosts,
        enable,
    } = commit;
    validate_plugin_name(&key.name)?;
    validate_plugin_version(&key.version)?;
    validate_sha256_hex(sha256)?;
    validate_granted_hosts(granted_hosts)?;
    if state.plugins.contains_key(&key) {
        return Err(ApplyError::PluginExists {
            name: key.name,
            version: key.version,
        });
    }
    if state.plugins.len() >= MAX_PLUGINS {
        return Err(ApplyError::TooManyPlugins { limit: MAX_PLUGINS });
    }
    if size_bytes > MAX_PLUGIN_BYTES as u64 {
        return Err(ApplyError::TooLarge {
            what: format!("plugin {key}"),
            found: size_bytes as usize,
            limit: MAX_PLUGIN_BYTES,
        });
    }
    if !state.plugin_uploads.contains_key(&upload) {
        return Err(ApplyError::UploadNotFound(upload));
    }
    check_staged_upload(state, upload, &key, sha256, size_bytes, chunk_count)?;
    for index in 0..chunk_count {
        let bytes = state
            .upload_chunks
            .remove(&(upload, index))
            .expect("every chunk was checked above");
        changes.upload_chunks.insert((upload, index));
        state.plugin_chunks.insert((key.clone(), index), bytes);
        changes.plugin_chunks.insert((key.clone(), index));
    }
    state.plugin_uploads.remove(&upload);
    changes.plugin_uploads.insert(upload);
    if enable {
        disable_other_versions(state, changes, &key);
    }
    let record = PluginRecord {
        name: key.name.clone(),
        version: key.version.clone(),
        sha256: sha256.to_string(),
        size_bytes,
        kind,
        enabled: enable,
        granted_hosts: granted_hosts.to_vec(),
        uploaded_at_ms: at_ms,
        chunk_count,
    };
    state.plugins.insert(key.clone(), record.clone());
    changes.plugins.insert(key);
    Ok(Response::Plugin(Box::new(record)))
}

/// Refuses a commit unless `upload` holds exactly the chunks `0..chunk_count`, `size_bytes` in
/// all, whose SHA-256 is `sha256`.
fn check_staged_upload(
    state: &ClusterState,
    upload: UploadId,
    key: &PluginKey,
    sha256: &str,
    size_bytes: u64,
    chunk_count: u32,
) -> Result<(), ApplyError> {
    if chunk_count == 0 {
        return Err(ApplyError::Invalid(format!(
            "plugin {key}: a plugin has at least one chunk"
        )));
    }
    // Chunk indexes are unique and sorted, so `chunk_count` of them, the last being
    // `chunk_count - 1`, are exactly `0..chunk_count`.
    let staged: Vec<u32> = state.staged_chunks(upload).map(|(index, _)| index).collect();
    if staged.len() != chunk_count as usize || staged.last() != Some(&(chunk_count - 1)) {
        let missing = (0..chunk_count).find(|index| !staged.contains(index));
        return Err(ApplyError::Invalid(match missing {
            Some(index) => format!("upload {upload}: chunk {index} of {chunk_count} is missing"),
            None => format!(
                "upload {upload} holds {} chunks; the commit says {chunk_count}",
                staged.len()
            ),
        }));
    }
    // Hashing in apply is deterministic, so every node checks the bytes it holds itself.
    let mut hasher = Sha256::new();
    let mut found_bytes = 0u64;
    for (_, bytes) in state.staged_chunks(upload) {
        hasher.update(bytes);
        found_bytes += bytes.len() as u64;
    }
    if found_bytes != size_bytes {
        return Err(ApplyError::Invalid(format!(
            "upload {upload} holds {found_bytes} bytes; the commit says {size_bytes}"
        )));
    }
    let found_sha256 = hex::encode(hasher.finalize());
    if found_sha256 != sha256 {
        return Err(ApplyError::Invalid(format!(
            "upload {upload} has sha256 {found_sha256}; the commit says {sha256}"
        )));
    }
    Ok(())
}
