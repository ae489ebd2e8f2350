//! Capturing an install layer: the machine's processes are stopped (only disk state
//! is kept: processes started there are not alive in later machines) and its upper layers are
//! copied out, without the privilege a file can carry (see `layer_privilege`).

use std::path::Path;

use crate::driver::Layer;
use crate::error::{Result, SandboxError};

use super::create_dir;
use super::machine::BwrapMachine;

pub(super) async fn capture_layer(machine: &BwrapMachine, dest: &Path) -> Result<Layer> {
    if dest.exists() {
        return Err(SandboxError::InvalidSpec {
            detail: format!("layer destination {} already exists", dest.display()),
        });
    }
    let disk = machine.disk_view.clone();
    let dest = dest.to_path_buf();
    let resources = machine.resources.clone();
    let machine_id = machine.id.clone();
    let layer_dest = dest.clone();
    tokio::task::spawn_blocking(move || -> Result<Layer> {
        {
            let mut resources = resources.lock().expect("machine resources lock");
            if resources.dir.is_none() {
                return Err(SandboxError::MachineStopped {
                    machine: machine_id,
                    detail: "destroyed".into(),
                });
            }
            // Only disk state is kept: processes started here are not alive in later machines.
            resources.stop("its layer was captured");
        }
        create_dir(&layer_dest)?;
        for (from, to) in [("root-upper", "root"), ("workspace-upper", "workspace")] {
            let output = std::process::Command::new("cp")
                .args(["-a", "--no-target-directory"])
                .arg(disk.join(from))
                .arg(layer_dest.join(to))
                .output()
                .map_err(|error| SandboxError::io("run cp for", disk.join(from), error))?;
            if !output.status.success() {
                return Err(SandboxError::HostCommand {
                    program: "cp -a".to_string(),
                    detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                });
            }
        }
        // The layer is what the repository's install chose to leave: it keeps no privilege,
        // and no host ids of this machine's range (a later machine has another).
        {
            let resources = resources.lock().expect("machine resources lock");
            if let Some(uid_range) = &resources.uid_range {
                crate::uid_range::shift_owners_down(&layer_dest, uid_range)?;
            }
        }
        crate::layer_privilege::drop_captured_layer_privilege(&layer_dest)?;
        Ok(Layer { path: layer_dest })
    })
    .await
    .map_err(|error| SandboxError::HostCommand {
        program: "layer capture".into(),
        detail: error.to_string(),
    })?
}
