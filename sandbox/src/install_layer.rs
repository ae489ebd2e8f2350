//! Install layers: `install` runs once per key on a node; its disk state is captured as a
//! read-only layer that every later machine with the same key stacks on its base.
//!
//! The key covers everything `install` can see: the repository, the tree of its checkout (so a
//! branch with another lockfile never gets a layer built from this one's), the parts of the
//! environment config that shape the install machine (command, user, build, snapshot, the
//! machine's environment variables) and the base image with the id of its build. A layer made
//! under an older key is simply not found, and is built again under the new one.
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

/// Changes when the key's inputs change, so keys of different versions never meet.
const KEY_VERSION: &str = "install-layer-key-v2";

/// Marks a finished install layer. The file keeps the name it had when install layers were
/// called snapshots: renaming it would make every layer a node already built look unfinished.
const METADATA_FILE: &str = "snapshot.json";

#[derive(Debug, Clone)]
pub struct InstallRequest {
    /// The repository's identity (its clone URL): part of the key.
    pub repository: String,
    /// The git tree id of the checkout `install` runs in (`HEAD^{tree}`), read by the node in
    /// its own clone: part of the key.
    pub source_tree: String,
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
        source_tree: impl Into<String>,
        config: EnvironmentConfig,
        base: BaseLayer,
        workspace: impl Into<PathBuf>,
    ) -> Self {
        InstallRequest {
            repository: repository.into(),
            source_tree: source_tree.into(),
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

    /// The cache key: SHA-256, hex, 32 characters, of every input of `install` (see the module
    /// docs). Each part is length-prefixed, so no two lists of parts hash alike.
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        part(KEY_VERSION.as_bytes());
        part(self.repository.as_bytes());
        part(self.source_tree.as_bytes());
        part(self.config.install_hash().as_bytes());
        part(self.base.image.name().as_bytes());
        part(self.base.identity.as_bytes());
        part(&(self.env.len() as u64).to_le_bytes());
        for (name, value) in &self.env {
            part(name.as_bytes());
            part(value.as_bytes());
        }
        hex::encode(hasher.finalize())[..32].to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallLayerMetadata {
    pub repository: String,
    pub install_hash: String,
    pub base_image: String,
    pub install_duration_ms: u64,
    #[serde(default)]
    pub source_tree: String,
    #[serde(default)]
    pub base_image_identity: String,
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
    /// One lock per key ever asked for on this node: bounded by the number of distinct keys
    /// asked for (the trees of base branches agents start from), which is small.
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
            source_tree: request.source_tree.clone(),
            base_image_identity: request.base.identity.clone(),
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

    const TREE_A: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
    const TREE_B: &str = "9bd7ac2d3e6e3e2b43b46a6c6e6f1f1b4b5c7a1e";

    fn request(repository: &str, install: &str, image: BaseImage) -> InstallRequest {
        let config = EnvironmentConfig {
            install: Some(install.to_string()),
            ..EnvironmentConfig::default()
        };
        let base = BaseLayer {
            image,
            rootfs: PathBuf::from("/nonexistent"),
            host_read_only_binds: Vec::new(),
            identity: "build-1".to_string(),
        };
        InstallRequest::new(repository, TREE_A, config, base, "/nonexistent")
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
    fn key_depends_on_the_tree_the_install_reads() {
        let on_a = request("r", "npm ci", BaseImage::Host);
        let mut on_b = on_a.clone();
        on_b.source_tree = TREE_B.to_string();
        assert_ne!(on_a.key(), on_b.key(), "another lockfile is another tree");
        let mut again_a = on_b.clone();
        again_a.source_tree = TREE_A.to_string();
        assert_eq!(on_a.key(), again_a.key(), "the same tree and config share");
    }

    type Change = Box<dyn Fn(&mut InstallRequest)>;

    #[test]
    fn key_depends_on_every_part_of_the_config_install_sees() {
        let first = request("r", "make", BaseImage::Host);
        let changes: Vec<(&str, Change)> = vec![
            ("install", Box::new(|r| r.config.install = Some("make all".into()))),
            ("user", Box::new(|r| r.config.user = Some("builder".into()))),
            ("snapshot", Box::new(|r| r.config.snapshot = Some("snap-1".into()))),
            (
                "build",
                Box::new(|r| {
                    r.config.build = Some(crate::environment::BuildConfig {
                        dockerfile: "Dockerfile".into(),
                        context: None,
                    })
                }),
            ),
            (
                "env",
                Box::new(|r| r.env.push(("NODE_ENV".into(), "production".into()))),
            ),
            (
                "env value",
                Box::new(|r| {
                    r.env.push(("A".into(), "bc".into()));
                }),
            ),
            ("base image identity", Box::new(|r| r.base.identity = "build-2".into())),
        ];
        let mut seen = std::collections::BTreeSet::from([first.key()]);
        for (what, change) in changes {
            let mut changed = first.clone();
            change(&mut changed);
            assert!(seen.insert(changed.key()), "changing {what} must change the key");
        }
        // Environment parts are length-prefixed: ("A", "bc") and ("Ab", "c") differ.
        let mut split_one = first.clone();
        split_one.env.push(("A".into(), "bc".into()));
        let mut split_two = first.clone();
        split_two.env.push(("Ab".into(), "c".into()));
        assert_ne!(split_one.key(), split_two.key());
    }

    #[test]
    fn key_ignores_terminals_and_start() {
        let mut first = request("r", "make", BaseImage::Host);
        let second = first.clone();
        first.config.terminals.push(crate::environment::Terminal::new("t", "c"));
        first.config.start = Some("echo booted".into());
        assert_eq!(first.key(), second.key());
    }
}
