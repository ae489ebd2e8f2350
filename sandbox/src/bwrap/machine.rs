//! A running (or stopped) bubblewrap machine, and the resources it holds: what `destroy`, a
//! failed create and `Drop` undo, in order.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::cgroup::MachineCgroup;
use crate::environment::Terminal;
use crate::error::{Result, SandboxError};
use crate::limits::MachineLimits;
use crate::mounts;
use crate::uid_range::UidRange;

use super::create::Handover;
use super::WORKSPACE_DIR;

/// Runs `$@` in directory `$1`; the shell is the image's, so it works on every base image.
const CHDIR_SCRIPT: &str = "cd -- \"$1\" || exit 126; shift; exec \"$@\"";

/// A running (or stopped) bubblewrap machine. Dropping it tears it down like `destroy`.
pub struct BwrapMachine {
    pub(super) id: String,
    pub(super) dir: PathBuf,
    /// The init's pid; a command opens a pidfd on it to enter (see `open_init_pidfd`).
    pub(super) init_pid: i32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// The environment every command starts from (user, home, path, the spec's variables).
    pub(super) base_env: Vec<(String, String)>,
    pub(super) limits: MachineLimits,
    /// The machine's `/workspace` and disk as paths the node (and its child processes) can
    /// open: they go through `views`, whose descriptors reach into the machine's mount namespace.
    pub(super) workspace_view: PathBuf,
    pub(super) disk_view: PathBuf,
    pub(super) _views: LayerViews,
    pub(super) cgroup: MachineCgroup,
    pub(super) exec_counter: AtomicU64,
    /// Command leaves whose command has ended cleanly (no process left, no limit hit): the
    /// next commands run in them rather than in new ones (see `cgroup` on why removals cost).
    pub(super) idle_command_leaves: Mutex<Vec<String>>,
    pub(super) terminals: Mutex<Vec<String>>,
    /// Terminals set up but not started (all of them on demand): the first read or attach
    /// starts them, holding this lock while it does.
    pub(super) deferred_terminals: tokio::sync::Mutex<Vec<Terminal>>,
    pub(super) resources: Arc<Mutex<Resources>>,
}

/// Descriptors on a machine's disk and `/workspace`, opened inside its mount namespace: the
/// node's own namespace has neither mounted. They live as long as the machine (its last handle),
/// so the paths through them never name another machine's files.
pub(super) struct LayerViews {
    disk: std::os::fd::OwnedFd,
    workspace: std::os::fd::OwnedFd,
}

impl LayerViews {
    pub(super) fn open(disk: &Path, workspace: &Path) -> Result<Self> {
        Ok(LayerViews {
            disk: open_directory(disk)?,
            workspace: open_directory(workspace)?,
        })
    }

    pub(super) fn disk_path(&self) -> PathBuf {
        descriptor_path(&self.disk)
    }

    pub(super) fn workspace_path(&self) -> PathBuf {
        descriptor_path(&self.workspace)
    }
}

/// `O_PATH` on a directory: a handle on the tree, not a reader of it.
fn open_directory(path: &Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|error| SandboxError::io("open", path, error))?;
    Ok(file.into())
}

/// The node's `/proc` entry for one of its descriptors: it resolves to the tree the descriptor
/// holds, whichever mount namespace that tree is mounted in, for the node and for the processes
/// it runs as root (which is why it names the node's PID, not `self`).
fn descriptor_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()))
}

/// What has to be undone, in order; shared by `destroy`, `Drop` and failed creates.
pub(super) struct Resources {
    pub(super) init: Option<crate::vfork::Child>,
    pub(super) cgroup: Option<MachineCgroup>,
    /// Mount points, innermost last (unmounted in reverse).
    pub(super) mounts: Vec<PathBuf>,
    pub(super) disk_image: Option<PathBuf>,
    pub(super) dir: Option<PathBuf>,
    pub(super) stopped: Option<String>,
    /// The host ids the machine runs as; given back once its processes are gone.
    pub(super) uid_range: Option<UidRange>,
    /// What bubblewrap inherited; closed once the machine has started.
    pub(super) handover: Option<Handover>,
}

impl Resources {
    pub(super) fn new(dir: PathBuf) -> Self {
        Resources {
            init: None,
            cgroup: None,
            mounts: Vec::new(),
            disk_image: None,
            dir: Some(dir),
            stopped: None,
            uid_range: None,
            handover: None,
        }
    }

    /// What a machine holds once `destroy` has taken its resources away.
    pub(super) fn destroyed() -> Self {
        Resources {
            init: None,
            cgroup: None,
            mounts: Vec::new(),
            disk_image: None,
            dir: None,
            stopped: Some("destroyed".to_string()),
            uid_range: None,
            handover: None,
        }
    }

    /// Kills every process; the files stay.
    pub(super) fn stop(&mut self, reason: &str) {
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_processes();
        }
        if let Some(init) = self.init.as_mut() {
            let _ = init.start_kill();
            let _ = init.wait_blocking();
        }
        self.init = None;
        if self.stopped.is_none() {
            self.stopped = Some(reason.to_string());
        }
    }

    pub(super) fn teardown(&mut self) -> Result<()> {
        self.stop("destroyed");
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.release();
        }
        let mut first_error = None;
        while let Some(mount_point) = self.mounts.pop() {
            if let Err(error) = mounts::unmount(&mount_point) {
                tracing::warn!(%error, "could not unmount a machine layer");
                first_error.get_or_insert(error);
            }
        }
        if let Some(image) = self.disk_image.take() {
            let _ = std::fs::remove_file(image);
        }
        if let Some(dir) = self.dir.take() {
            // Never delete through a mount that is still there: it could be a lower layer (the
            // base image, an install layer, a checkout) or a view of one.
            let still_mounted = mounts::mount_points_under(&dir);
            if !still_mounted.is_empty() {
                tracing::warn!(
                    dir = %dir.display(),
                    mounts = still_mounted.len(),
                    "machine directory left in place: a layer is still mounted"
                );
            } else if let Err(error) = std::fs::remove_dir_all(&dir) {
                if error.kind() != io::ErrorKind::NotFound {
                    first_error.get_or_insert(SandboxError::io("remove", &dir, error));
                }
            }
        }
        // The range goes back only when nothing of the machine can still run as it.
        self.handover = None;
        self.uid_range = None;
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            tracing::warn!(%error, "machine teardown on drop was incomplete");
        }
    }
}

impl BwrapMachine {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The machine's `/workspace` as seen from the node (the merged overlay, or the bound
    /// checkout): read it, or run git in it, while the machine exists.
    pub fn workspace_path(&self) -> &Path {
        &self.workspace_view
    }

    /// The name of the machine's cgroup under the node's parent (cgroups are reused, so it is
    /// not the machine's id).
    pub fn cgroup_name(&self) -> &str {
        self.cgroup.name()
    }

    /// The machine's init (PID 1 inside) as a node PID.
    pub fn init_pid(&self) -> i32 {
        self.init_pid
    }

    pub fn limits(&self) -> &MachineLimits {
        &self.limits
    }

    /// The machine's disk (its upper layers, `root-upper` and `workspace-upper`) as seen from
    /// the node, while the machine exists.
    pub fn disk_path(&self) -> &Path {
        &self.disk_view
    }

    /// The per-machine directory under the driver's root.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn ensure_running(&self) -> Result<()> {
        let mut resources = self.resources.lock().expect("machine resources lock");
        if let Some(reason) = &resources.stopped {
            return Err(SandboxError::MachineStopped {
                machine: self.id.clone(),
                detail: reason.clone(),
            });
        }
        let exited = match resources.init.as_mut() {
            Some(init) => init.try_wait().ok().flatten(),
            None => None,
        };
        if let Some(status) = exited {
            let reason = format!("its init exited ({status})");
            resources.stopped = Some(reason.clone());
            return Err(SandboxError::MachineStopped {
                machine: self.id.clone(),
                detail: reason,
            });
        }
        Ok(())
    }

    /// What a command entering the machine execs, and whether it starts in the init's
    /// directory: the init runs in /workspace, the usual directory, and entering there saves
    /// the shell that would change to any other.
    pub(super) fn command_argv(&self, cwd: &str, argv: &[String]) -> (Vec<String>, bool) {
        if cwd == WORKSPACE_DIR {
            return (argv.to_vec(), true);
        }
        let mut full: Vec<String> = ["/bin/sh", "-c", CHDIR_SCRIPT, "flotilla"].map(String::from).to_vec();
        full.push(cwd.to_string());
        full.extend(argv.iter().cloned());
        (full, false)
    }

    /// A pidfd on the machine's init, for one command's entry. The machine holds none between
    /// commands: every descriptor the node holds is copied into each process it forks, and
    /// closed again at its exec, a cost that grows with the machines running.
    ///
    /// The number is checked, with the machine's resources locked, to name a running child of
    /// the machine's bubblewrap. Bubblewrap is the node's child and is reaped only under that
    /// lock, so its own number cannot have been reused meanwhile; and the process the pidfd
    /// names is checked to still run after its parent was read, so the parent read was its own
    /// (a running process keeps its number). From then on the pidfd names the init whatever
    /// becomes of the number.
    pub(super) fn open_init_pidfd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        let gone = || std::io::Error::new(std::io::ErrorKind::NotFound, "the machine's init is gone");
        let resources = self.resources.lock().expect("machine resources lock");
        let bwrap_pid = match (&resources.stopped, resources.init.as_ref()) {
            (None, Some(init)) => init.id() as i32,
            _ => return Err(gone()),
        };
        let pidfd = crate::vfork::pidfd_open(self.init_pid)?;
        let parent = parent_pid(self.init_pid).ok_or_else(gone)?;
        super::enter::check_alive(&pidfd)?;
        drop(resources);
        if parent != bwrap_pid {
            return Err(gone());
        }
        Ok(pidfd)
    }

    pub(super) fn terminal_index(&self, name: Option<&str>) -> Result<usize> {
        let terminals = self.terminals.lock().expect("terminals lock");
        match name {
            None if terminals.is_empty() => Err(SandboxError::UnknownTerminal {
                machine: self.id.clone(),
                terminal: "(any)".to_string(),
            }),
            None => Ok(0),
            Some(name) => {
                terminals
                    .iter()
                    .position(|existing| existing == name)
                    .ok_or_else(|| SandboxError::UnknownTerminal {
                        machine: self.id.clone(),
                        terminal: name.to_string(),
                    })
            }
        }
    }
}

/// The parent pid of process `pid`, from `/proc/<pid>/stat` (after the command name, which may
/// hold any byte but ends at the last `)`).
pub(super) fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}
