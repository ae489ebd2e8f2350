//! The container runtime a machine start is measured against: a whole `crun run` of `/bin/true`
//! from a minimal OCI bundle (create, start, wait, delete; a container id of its own each time),
//! or `runc run` where crun refuses the host (crun 1.8 refuses some cgroup v1 hybrid layouts).
//! The bundle is made here in a scratch directory: a root filesystem holding one static binary
//! (busybox from Debian's busybox-static, which runs as `true` under that name) and the
//! runtime's own default `config.json` with the process set to `/bin/true`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context as _};

/// Where a static busybox is found (Debian's busybox-static installs the first).
const BUSYBOX_CANDIDATES: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];
/// The runtimes tried, in order, each with where Debian installs it.
const RUNTIMES: [(&str, &str); 2] = [("crun", "/usr/bin/crun"), ("runc", "/usr/sbin/runc")];
/// What is kept of a runtime's stderr when it refuses to run.
const REFUSAL_CHARS: usize = 300;

/// The runtime that ran, its bundle and why it was chosen.
pub struct Peer {
    pub name: &'static str,
    pub version: String,
    /// Why this runtime: crun ran, or what crun said when it refused.
    pub why: String,
    program: PathBuf,
    bundle: PathBuf,
    state: PathBuf,
}

impl Peer {
    /// Makes the bundle under `root` and finds the first runtime that runs it.
    pub async fn prepare(root: &Path) -> anyhow::Result<Peer> {
        let busybox = static_busybox()?;
        let mut refusals = Vec::new();
        for (name, program) in RUNTIMES {
            let program = PathBuf::from(program);
            if !program.exists() {
                refusals.push(format!("{name} is not installed at {}", program.display()));
                continue;
            }
            let bundle = root.join(format!("{name}-bundle"));
            let state = root.join(format!("{name}-state"));
            make_bundle(&program, &bundle, &busybox)?;
            std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
            let peer = Peer {
                name,
                version: version_of(&program).await,
                why: String::new(),
                program,
                bundle,
                state,
            };
            match peer.run_once().await {
                Ok(_) => {
                    let why = if refusals.is_empty() {
                        format!("{name} ran the bundle")
                    } else {
                        format!("{name} ran the bundle; {}", refusals.join("; "))
                    };
                    return Ok(Peer { why, ..peer });
                }
                Err(error) => refusals.push(format!("{name} refused: {error:#}")),
            }
        }
        bail!(
            "no container runtime ran the bundle ({}); install crun or runc (scripts/setup)",
            refusals.join("; ")
        )
    }

    /// One whole `run` of `/bin/true` under a new container id, in milliseconds.
    pub async fn run_once(&self) -> anyhow::Result<f64> {
        let id = format!("flotilla-peer-{}", ulid::Ulid::new().to_string().to_lowercase());
        let started = Instant::now();
        let output = tokio::process::Command::new(&self.program)
            .arg("--root")
            .arg(&self.state)
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .with_context(|| format!("starting {}", self.program.display()))?;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stderr: String = stderr.trim().chars().take(REFUSAL_CHARS).collect();
            bail!("`{} run` exited with {}: {stderr}", self.name, output.status);
        }
        Ok(elapsed_ms)
    }
}

/// A static busybox: the bundle's root has no libraries for a dynamic one to load.
fn static_busybox() -> anyhow::Result<PathBuf> {
    for candidate in BUSYBOX_CANDIDATES {
        let path = Path::new(candidate);
        if let Ok(bytes) = std::fs::read(path) {
            if is_static_elf(&bytes) {
                return Ok(path.to_path_buf());
            }
        }
    }
    bail!(
        "no static busybox at {} (the peer's bundle needs one): apt-get install busybox-static, or run scripts/setup",
        BUSYBOX_CANDIDATES.join(" or ")
    )
}

/// A 64-bit little-endian ELF with no program interpreter (PT_INTERP) is statically linked.
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let field = |offset: usize, width: usize| -> Option<u64> {
        let slice = bytes.get(offset..offset + width)?;
        Some(
            slice
                .iter()
                .rev()
                .fold(0u64, |value, byte| (value << 8) | u64::from(*byte)),
        )
    };
    if bytes.get(0..4) != Some(b"\x7fELF".as_slice()) || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return false;
    }
    let (Some(table), Some(entry_size), Some(entries)) = (field(0x20, 8), field(0x36, 2), field(0x38, 2)) else {
        return false;
    };
    (0..entries).all(|index| {
        let offset = (table + index * entry_size) as usize;
        field(offset, 4).is_some_and(|kind| kind as u32 != PT_INTERP)
    })
}

/// `rootfs/bin/true` (busybox, which acts as the applet it is named) and the runtime's default
/// `config.json` with `/bin/true` as the process, no terminal and a read-only root.
fn make_bundle(program: &Path, bundle: &Path, busybox: &Path) -> anyhow::Result<()> {
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    std::fs::copy(busybox, bin.join("true"))
        .with_context(|| format!("copying {} into the bundle", busybox.display()))?;
    let config_path = bundle.join("config.json");
    let _ = std::fs::remove_file(&config_path);
    let output = std::process::Command::new(program)
        .arg("spec")
        .current_dir(bundle)
        .output()
        .with_context(|| format!("running {} spec", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} spec exited with {}: {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    config["process"]["args"] = serde_json::json!(["/bin/true"]);
    config["process"]["terminal"] = serde_json::json!(false);
    config["root"] = serde_json::json!({ "path": "rootfs", "readonly": true });
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    Ok(())
}

async fn version_of(program: &Path) -> String {
    let output = tokio::process::Command::new(program).arg("--version").output().await;
    match output {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("unknown version")
            .to_string(),
        Err(error) => format!("unknown version ({error})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_elf_has_no_interpreter() {
        let mut elf = vec![0u8; 0x40 + 2 * 56];
        elf[0..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20] = 0x40;
        elf[0x36] = 56;
        elf[0x38] = 2;
        elf[0x40] = 1; // PT_LOAD
        elf[0x40 + 56] = 6; // PT_PHDR
        assert!(is_static_elf(&elf));
        elf[0x40 + 56] = 3; // PT_INTERP
        assert!(!is_static_elf(&elf));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
