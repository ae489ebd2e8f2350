//! Tearing machines down: `destroy` of one machine, and the sweep that removes every machine
//! of this node's root — what an earlier life of the node left (on start) and what is still
//! running (on a clean stop): processes first, then mounts, cgroups and directories.

use crate::error::Result;
use crate::mounts;

use super::machine::{BwrapMachine, Resources};
use super::{blocking, BwrapDriver};

/// Takes the machine's resources and undoes them off the async threads (unmounts and cgroup
/// drains block).
pub(super) async fn destroy(machine: &BwrapMachine) -> Result<()> {
    let mut resources = {
        let mut guard = machine.resources.lock().expect("machine resources lock");
        std::mem::replace(&mut *guard, Resources::destroyed())
    };
    blocking("machine teardown", move || resources.teardown()).await
}

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Machine directories under the root.
    pub machine_dirs: usize,
    /// Machine cgroups under the node's parent that had no directory any more.
    pub orphan_cgroups: usize,
    /// Mounts under the machines directory that no machine directory accounted for.
    pub orphan_mounts: usize,
}

impl BwrapDriver {
    /// Kills and removes every machine under this driver's root and cgroup parent. Blocking:
    /// call it off the async runtime (see [`BwrapDriver::reap_all`]).
    pub fn reap_blocking(&self) -> ReapReport {
        let mut report = ReapReport::default();
        // Every process of every machine first: a process in a machine holds its mounts busy.
        for name in self.cgroups.machine_names() {
            self.cgroups.machine(&name).kill_processes();
        }
        if let Ok(entries) = std::fs::read_dir(self.machines_dir()) {
            for entry in entries.flatten() {
                let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                tracing::info!(machine = %id, "removing a machine left by a previous run");
                let mut resources = Resources::new(entry.path());
                // The machine's cgroup, as its directory names it (a directory from before cgroups
                // were reused has none: its cgroup was named for the machine).
                let cgroup = std::fs::read_to_string(entry.path().join(super::CGROUP_NAME_FILE))
                    .ok()
                    .map(|name| name.trim().to_string())
                    .filter(|name| is_cgroup_name(name))
                    .unwrap_or_else(|| id.clone());
                resources.cgroup = Some(self.cgroups.machine(&cgroup));
                // Every layer still mounted (the disk, idmapped lowers, overlays), earliest
                // first: teardown unmounts from the end.
                let mut mount_points = mounts::mount_points_under(&entry.path());
                mount_points.reverse();
                resources.mounts = mount_points;
                let image = entry.path().join("disk.img");
                resources.disk_image = image.exists().then_some(image);
                drop(resources);
                report.machine_dirs += 1;
            }
        }
        report.orphan_cgroups = self.cgroups.reap_all().len();
        // Whatever is still mounted under the machines directory (a directory removed by hand,
        // a mount the list above does not name), deepest first.
        for mount_point in mounts::mount_points_under(&self.machines_dir()) {
            tracing::info!(mount = %mount_point.display(), "unmounting a machine layer left by a previous run");
            if let Err(error) = mounts::unmount(&mount_point) {
                tracing::warn!(%error, "could not unmount a machine layer left by a previous run");
            }
            report.orphan_mounts += 1;
        }
        report
    }

    /// [`BwrapDriver::reap_blocking`] on a blocking thread.
    pub async fn reap_all(&self) -> Result<ReapReport> {
        let driver = self.clone();
        blocking("reap machines", move || Ok(driver.reap_blocking())).await
    }
}

/// Whether `name`, read from a machine directory, can only name a directory right under the
/// cgroup parent.
fn is_cgroup_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || character == '-' || character == '_')
}
