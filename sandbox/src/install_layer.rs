//! Install layers: `install` runs once per (repository, install hash, base image) on a node;
//! its disk state is captured as a read-only layer that every later machine stacks on its base.
//!
//! Two requests for one key build once (a per-key async lock; the second finds the layer). An
//! install layer is built in a hidden directory and renamed into place, so a crash never leaves a
//! half layer that looks finished. A failed or timed-out install caches nothing and fails with
//! its last output lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::driver::{BaseLayer, ExecRequest, Layer, MachineDriver, MachineHandle, MachineSpec, WorkspaceMode};
use crate::environment::EnvironmentConfig;
use crate::error::{Result, SandboxError};
use crate::limits::MachineLimits;

/// Lines of install output quoted in a failure.
pub const INSTALL_FAILURE_LINES: usize = 20;
/// Default wall-clock limit of one install.
pub const DEFAULT_INSTALL_TIMEOUT_MS: u64 = 30 * 60 * 1000;

/// Marks a finished install layer. The file keeps the name it had when install layers were
/// called snapshots: renaming it would make every layer a node already built look unfinished.
const METADATA_FILE: &str = "snapshot.json";

#[derive(Debug, Clone)]
pub struct InstallRequest {
    /// The repository's identity (its clone URL): part of the key.
    pub repository: String,
    pub config: EnvironmentConfig,
    pub base: BaseLayer,
    /// A checkout of the repository for `install` to run in (its lower layer; never written).
    pub workspace: PathBuf,
    pub env: Vec<(String, String)>,
    /// Limits of the install machine; `command_timeout_ms` is the install's time limit.
    pub limits: MachineLimits,
}

impl InstallRequest {
    pub fn new(
        repository: impl Into<String>,
        config: EnvironmentConfig,
        base: BaseLayer,
        workspace: impl Into<PathBuf>,
    ) -> Self {
        InstallRequest {
            repository: repository.into(),
            config,
            base,
            workspace: workspace.into(),
            env: Vec::new(),
            limits: MachineLimits {
                command_timeout_ms: DEFAULT_INSTALL_TIMEOUT_MS,
                ..MachineLimits::default()
            },
        }
    }

    /// The cache key: SHA-256 of repository, install hash and base image, hex, 32 characters.
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.repository.as_bytes());
        hasher.update([0]);
        hasher.update(self.config.install_hash().as_bytes());
        hasher.update([0]);
        hasher.update(self.base.image.name().as_bytes());
        hex::encode(hasher.finalize())[..32].to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallLayerMetadata {
    pub repository: String,
    pub install_hash: String,
    pub base_image: String,
    pub install_duration_ms: u64,
}

/// What a request resolves to: the install layer's key and, if `install` is set, its layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallLayer {
    pub key: String,
    /// `None` when the environment has no `install`: machines use the base alone.
    pub layer: Option<Layer>,
    /// Whether this call ran the install (false: reused, or nothing to install).
    pub built: bool,
}

pub struct InstallLayerCache {
    driver: Arc<dyn MachineDriver>,
    root: PathBuf,
    /// One lock per key ever asked for on this node: bounded by the number of distinct
    /// (repository, install, base) triples, which is small.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl InstallLayerCache {
    pub fn new(driver: Arc<dyn MachineDriver>, root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|error| SandboxError::io("create", &root, error))?;
        remove_partial_builds(&root);
        Ok(InstallLayerCache {
            driver,
            root,
            locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The finished install layer for `key`, if there is one.
    pub fn lookup(&self, key: &str) -> Option<Layer> {
        let path = self.root.join(key);
        path.join(METADATA_FILE).is_file().then_some(Layer { path })
    }

    /// Returns the install layer for the request, running `install` if no one has yet.
    pub async fn get_or_build(&self, request: &InstallRequest) -> Result<InstallLayer> {
        let key = request.key();
        let Some(install) = request.config.install.clone() else {
            return Ok(InstallLayer {
                key,
                layer: None,
                built: false,
            });
        };
        if let Some(layer) = self.lookup(&key) {
            return Ok(InstallLayer {
                key,
                layer: Some(layer),
                built: false,
            });
        }
        let lock = {
            let mut locks = self.locks.lock().expect("install layer locks");
            locks.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(layer) = self.lookup(&key) {
            return Ok(InstallLayer {
                key,
                layer: Some(layer),
                built: false,
            });
        }
        let layer = self.build(request, &key, &install).await?;
        Ok(InstallLayer {
            key,
            layer: Some(layer),
            built: true,
        })
    }

    async fn build(&self, request: &InstallRequest, key: &str, install: &str) -> Result<Layer> {
        let started = Instant::now();
        let mut spec = MachineSpec::new(
            format!("install-{}", &key[..8]),
            request.base.clone(),
            &request.workspace,
        );
        spec.workspace_mode = WorkspaceMode::Overlay;
        spec.env = request.env.clone();
        spec.limits = request.limits;
        spec.user = request.config.user.clone();
        let machine = self.driver.create(spec).await?;
        let building = self.root.join(format!(".building-{key}-{}", ulid::Ulid::new()));
        let result = self.install_and_capture(&machine, request, install, &building).await;
        let destroyed = self.driver.destroy(&machine).await;
        let layer = match result {
            Ok(layer) => layer,
            Err(error) => {
                // A half-copied layer can be large: removed off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&building)).await;
                return Err(error);
            }
        };
        destroyed?;
        let metadata = InstallLayerMetadata {
            repository: request.repository.clone(),
            install_hash: request.config.install_hash(),
            base_image: request.base.image.to_string(),
            install_duration_ms: started.elapsed().as_millis() as u64,
        };
        let final_path = self.root.join(key);
        tokio::task::spawn_blocking(move || publish_layer(&layer, &metadata, &final_path))
            .await
            .map_err(|error| SandboxError::HostCommand {
                program: "install layer publish".to_string(),
                detail: error.to_string(),
            })?
    }

    async fn install_and_capture(
        &self,
        machine: &MachineHandle,
        request: &InstallRequest,
        install: &str,
        building: &Path,
    ) -> Result<Layer> {
        // One stream, so that the last lines are in the order they were printed.
        let command = format!("exec 2>&1\n{install}");
        let output = self
            .driver
            .exec(
                machine,
                ExecRequest::new(command).with_timeout_ms(request.limits.command_timeout_ms),
            )
            .await?;
        if !output.success() {
            return Err(SandboxError::InstallFailed {
                repository: request.repository.clone(),
                outcome: output.outcome(),
                last_lines: output.last_lines(INSTALL_FAILURE_LINES),
            });
        }
        self.driver.capture_layer(machine, building).await
    }
}

/// Writes the layer's metadata and moves it to its final place (blocking).
fn publish_layer(layer: &Layer, metadata: &InstallLayerMetadata, final_path: &Path) -> Result<Layer> {
    let metadata_path = layer.path.join(METADATA_FILE);
    let written = serde_json::to_vec_pretty(metadata).expect("metadata serialises");
    std::fs::write(&metadata_path, written).map_err(|error| SandboxError::io("write", &metadata_path, error))?;
    std::fs::rename(&layer.path, final_path).map_err(|error| {
        let _ = std::fs::remove_dir_all(&layer.path);
        SandboxError::io("move the install layer into place at", final_path, error)
    })?;
    Ok(Layer {
        path: final_path.to_path_buf(),
    })
}

fn remove_partial_builds(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".building-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::BaseImage;

    fn request(repository: &str, install: &str, image: BaseImage) -> InstallRequest {
        let config = EnvironmentConfig {
            install: Some(install.to_string()),
            ..EnvironmentConfig::default()
        };
        let base = BaseLayer {
            image,
            rootfs: PathBuf::from("/nonexistent"),
            host_read_only_binds: Vec::new(),
        };
        InstallRequest::new(repository, config, base, "/nonexistent")
    }

    #[test]
    fn key_depends_on_repository_install_and_base() {
        let first = request("https://a/repo.git", "npm install", BaseImage::Host);
        assert_eq!(
            first.key(),
            request("https://a/repo.git", "npm install", BaseImage::Host).key()
        );
        assert_ne!(
            first.key(),
            request("https://b/repo.git", "npm install", BaseImage::Host).key()
        );
        assert_ne!(
            first.key(),
            request("https://a/repo.git", "yarn", BaseImage::Host).key()
        );
        assert_ne!(
            first.key(),
            request("https://a/repo.git", "npm install", BaseImage::Debian).key()
        );
        assert_eq!(first.key().len(), 32);
    }

    #[test]
    fn key_ignores_terminals() {
        let mut first = request("r", "make", BaseImage::Host);
        let second = first.clone();
        first.config.terminals.push(crate::environment::Terminal::new("t", "c"));
        assert_eq!(first.key(), second.key());
    }
}
