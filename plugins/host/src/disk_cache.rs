//! Compiled components on disk, so a node that restarts (or another node process given the same
//! directory) loads the machine code instead of compiling the component again.
//!
//! A file is named by the component's sha256 and a digest of the engine's precompile
//! compatibility hash (wasmtime's version and every setting that shapes the code), so a new
//! binary or other limits never pick up stale code; wasmtime checks the same again when it reads
//! the file. Files are written to a temporary name and renamed into place, so a reader never
//! sees half a file, and two processes storing the same component at once are harmless.
//!
//! Loading compiled code skips wasmtime's validation of it: the directory must be the node's own.
//! It is created readable by its owner only, and this module is its only writer.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The compiled code of components, one file per component and engine.
#[derive(Debug)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    /// Files kept; storing another removes the least recently written ones beyond it.
    max_files: usize,
    /// Hex digest of the engine's precompile compatibility hash.
    engine_key: String,
    /// Makes temporary file names unique within this process.
    writes: AtomicU64,
}

/// Feeds `Hash` output into SHA-256, which (unlike `DefaultHasher`) is the same in every process.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 8 bytes"))
    }
}

impl DiskCache {
    /// Opens `dir`, creating it (owner-only) if it is missing.
    pub(crate) fn open(dir: &Path, max_files: usize, engine: &Engine) -> std::io::Result<DiskCache> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex::encode(&hasher.0.finalize()[..8]);
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            max_files: max_files.max(1),
            engine_key,
            writes: AtomicU64::new(0),
        })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The component compiled earlier from the bytes whose digest is `sha256`, if the directory
    /// holds it. A file wasmtime will not take (another engine, damaged) is removed.
    // Unsafe: wasmtime marks loading precompiled code unsafe; the SAFETY note below says why it holds.
    #[allow(unsafe_code)]
    pub(crate) fn load(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        // Read, not mapped: a mapped file cut short by someone else would kill the process.
        let bytes = std::fs::read(&path).ok()?;
        // SAFETY: the file was written by `store` below with the output of
        // `Component::serialize` for an engine of the same compatibility hash, in a directory
        // that only the node's user can write; wasmtime checks its header and engine settings.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %error, "compiled plugin code is unusable; compiling again");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes `component`'s compiled code for later loads. A failure costs only a later compile.
    pub(crate) fn store(&self, sha256: &str, component: &Component) {
        let path = self.path(sha256);
        let temporary = self.dir.join(format!(
            ".{sha256}.{}.{}.tmp",
            std::process::id(),
            self.writes.fetch_add(1, Ordering::Relaxed)
        ));
        let written = component
            .serialize()
            .map_err(|error| error.to_string())
            .and_then(|bytes| std::fs::write(&temporary, bytes).map_err(|error| error.to_string()))
            .and_then(|()| std::fs::rename(&temporary, &path).map_err(|error| error.to_string()));
        crate::metrics::record_disk_cache_write(written.is_ok());
        if let Err(error) = written {
            let _ = std::fs::remove_file(&temporary);
            tracing::warn!(path = %path.display(), %error, "could not keep compiled plugin code on disk");
        }
        self.prune();
    }

    /// Removes the least recently written files beyond `max_files` (code of plugin versions
    /// long removed, or of earlier builds).
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|extension| extension == "cwasm"))
            .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
            .collect();
        if files.len() <= self.max_files {
            return;
        }
        files.sort();
        let excess = files.len() - self.max_files;
        for (_, path) in files.into_iter().take(excess) {
            let _ = std::fs::remove_file(path);
        }
    }
}
