//! Tearing machines down: `destroy` of one machine, and on start the removal of whatever a
//! previous run of the node left (mounts, cgroups, directories).

use crate::error::Result;

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

impl BwrapDriver {
    pub(super) fn remove_stale_machines(&self) {
        let Ok(entries) = std::fs::read_dir(self.machines_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            tracing::info!(machine = %id, "removing a machine left by a previous run");
            let mut resources = Resources::new(entry.path());
            resources.cgroup = Some(self.cgroups.machine(&id));
            // Shallowest first: teardown unmounts from the end.
            let mut mount_points = crate::mounts::mount_points_under(&entry.path());
            mount_points.reverse();
            resources.mounts = mount_points;
            let image = entry.path().join("disk.img");
            resources.disk_image = image.exists().then_some(image);
            drop(resources);
        }
    }
}
