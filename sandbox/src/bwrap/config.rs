//! What the bubblewrap driver is given: where it keeps its files, what backs a machine's
//! writable layers, and the host programs it runs.

use std::path::{Path, PathBuf};

use crate::uid_range::UidRangeConfig;

/// What backs a machine's writable layers, and so enforces `disk_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskBacking {
    /// A tmpfs of `disk_bytes`: mounts in microseconds; its pages also count against the
    /// machine's memory limit, so a machine holds at most `min(disk, memory)` of new files.
    #[default]
    Tmpfs,
    /// A sparse ext4 image of `disk_bytes` on the node's disk, loop-mounted: real disk, not
    /// memory. Each start copies a formatted template (made once per size) and attaches a loop
    /// device, about 20 ms more than a tmpfs.
    Ext4Image,
}

#[derive(Debug, Clone)]
pub struct BwrapConfig {
    /// The driver's directory (the node's data dir / `machines`): images, machines and install
    /// layers (in `snapshots`).
    pub root: PathBuf,
    pub disk: DiskBacking,
    /// Path of the cgroup under each hierarchy's root that holds every machine of this node and
    /// nothing else: on start the driver kills and removes whatever is under it.
    pub cgroup_parent: String,
    pub bwrap_program: PathBuf,
    /// The host ids machines run as (a range of 65,536 each, claimed host-wide).
    pub uid_ranges: UidRangeConfig,
}

impl BwrapConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        BwrapConfig {
            root: root.clone(),
            disk: DiskBacking::Tmpfs,
            cgroup_parent: cgroup_parent_for(&root),
            bwrap_program: PathBuf::from("/usr/bin/bwrap"),
            uid_ranges: UidRangeConfig::default(),
        }
    }
}

/// `flotilla/<16 hex digits of the root's hash>`: one parent per node root, so that nodes
/// sharing a host (tests, a bench cluster) never reap each other's machines, and a node
/// restarted on the same root finds its earlier life's cgroups.
pub fn cgroup_parent_for(root: &Path) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("flotilla/{}", &hex::encode(digest)[..16])
}
