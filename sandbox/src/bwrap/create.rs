//! Creating a bubblewrap machine: its directory, the writable disk, the root and `/workspace`
//! overlays, the user it runs as, its cgroup, the bubblewrap command, and waiting for its init.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use crate::cgroup::{Leaf, MachineCgroup};
use crate::driver::{MachineSpec, WorkspaceMode, EGRESS_SOCKET_PATH};
use crate::error::{Result, SandboxError};
use crate::limits::MachineLimits;
use crate::mounts;
use crate::seccomp;
use crate::uid_range::UidRange;

use super::machine::{BwrapMachine, LayerViews, Resources};
use super::{blocking, create_dir, BwrapDriver, DiskBacking, WORKSPACE_DIR};

/// How long a new machine's init has to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// What is kept of bubblewrap's stderr after a failed start, and how long reading it may take.
const START_FAILURE_STDERR_BYTES: u64 = 16 * 1024;
const START_FAILURE_STDERR_TIMEOUT: Duration = Duration::from_secs(2);
/// Machine starts waiting for the spawner thread; more wait for a place in the queue.
const SPAWN_QUEUE_LENGTH: usize = 64;
/// Longest accepted machine label (it also becomes the hostname, with the id).
pub(super) const MAX_NAME_CHARS: usize = 24;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The mounted layers of a new machine, as paths inside its mount namespace.
struct MountedLayers {
    /// The machine's disk: the upper layers live there.
    disk: PathBuf,
    /// The merged root overlay, bound as `/`.
    merged: PathBuf,
    /// What becomes `/workspace`: the workspace overlay, or the idmapped checkout.
    workspace_view: PathBuf,
}

/// What the machine's mount namespace hands out once its layers are mounted: descriptors, since
/// the node's own namespace has none of those mounts.
struct MountedMachine {
    account: Account,
    root: std::os::fd::OwnedFd,
    workspace: std::os::fd::OwnedFd,
    views: LayerViews,
}

/// What bubblewrap is handed as open descriptors: the machine's user namespace, which it starts
/// in, and the trees it binds. Bubblewrap works inside that namespace, where the node's
/// directories (owned by host root, perhaps under a private temporary directory) cannot be
/// walked, so it is given the trees themselves rather than their paths. Each is inherited by
/// bubblewrap alone.
pub(super) struct Handover {
    user_namespace: std::os::fd::OwnedFd,
    /// The machine's mount namespace, where its layers are mounted: bubblewrap starts there.
    /// Once bubblewrap has made its own copy, nothing needs it, and closing it unmounts
    /// everything no descriptor or machine still holds.
    mount_namespace: std::os::fd::OwnedFd,
    root: std::os::fd::OwnedFd,
    workspace: std::os::fd::OwnedFd,
    egress_socket: Option<std::os::fd::OwnedFd>,
}

impl Handover {
    /// The descriptors bubblewrap binds, which it must inherit.
    fn bound_fds(&self) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        let mut fds = vec![self.root.as_raw_fd(), self.workspace.as_raw_fd()];
        fds.extend(self.egress_socket.as_ref().map(AsRawFd::as_raw_fd));
        fds
    }
}

/// Opens `path` as a handle for bubblewrap (`O_PATH`: no access to its contents is needed).
fn open_path(path: &Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|error| SandboxError::io("open", path, error))?;
    Ok(file.into())
}

/// The account commands run as, from the machine's own `/etc/passwd`.
struct Account {
    user: String,
    uid: u32,
    gid: u32,
    home: String,
}

impl BwrapDriver {
    pub(super) async fn create_machine(&self, spec: MachineSpec) -> Result<BwrapMachine> {
        // Mounts, cgroup writes and the passwd lookup block for a millisecond or two.
        let driver = self.clone();
        let (mut machine, command) = blocking("machine set-up", move || driver.create_blocking(spec)).await?;
        if let Err(error) = self.start_init(&mut machine, command).await {
            // Dropping the machine here would unmount and drain its cgroup on a runtime worker.
            let mut resources = {
                let mut guard = machine.resources.lock().expect("machine resources lock");
                std::mem::replace(&mut *guard, Resources::destroyed())
            };
            if let Err(teardown) =
                blocking("tear down a machine that failed to start", move || resources.teardown()).await
            {
                tracing::warn!(machine = %machine.id, error = %teardown, "a machine that failed to start was not torn down whole");
            }
            return Err(error);
        }
        Ok(machine)
    }

    async fn start_init(&self, machine: &mut BwrapMachine, command: InitCommand) -> Result<()> {
        let InitCommand { command, steps } = command;
        let spawn = crate::vfork::Spawn::from_command(&command)
            .map_err(|error| SandboxError::io("start", &self.config.bwrap_program, error))?
            .stdout(crate::vfork::Output::Piped)
            .stderr(crate::vfork::Output::Piped);
        let mut init = spawn_long_lived(spawn, steps)
            .await
            .map_err(|error| SandboxError::io("start", &self.config.bwrap_program, error))?;
        let stdout = init.stdout.take().expect("stdout is piped");
        {
            let mut resources = machine.resources.lock().expect("machine resources lock");
            resources.init = Some(init);
            // Bubblewrap holds what it inherited; the node's copies are not needed any more.
            resources.handover = None;
        }
        self.wait_ready(machine, stdout).await
    }

    fn create_blocking(&self, spec: MachineSpec) -> Result<(BwrapMachine, InitCommand)> {
        validate_spec(&spec)?;
        let name = sanitize_name(&spec.name);
        let id = format!("{name}-{}", ulid::Ulid::new().to_string().to_lowercase());
        let dir = self.machines_dir().join(&id);
        create_dir(&dir)?;
        // Everything made from here on is undone by `resources` if a later step fails.
        let mut resources = Resources::new(dir.clone());
        let uid_range = UidRange::claim(&self.config.uid_ranges)?;
        let user_namespace = uid_range.user_namespace()?;
        // The layers are mounted in a namespace of the machine's own (see `mount_namespace`).
        let (mount_namespace, mounted) = crate::mount_namespace::run_in_new_mount_namespace(|| {
            let (layers, account) = self.mount_layers(&dir, &spec, &uid_range, &user_namespace, &mut resources)?;
            Ok(MountedMachine {
                account,
                root: open_path(&layers.merged)?,
                workspace: open_path(&layers.workspace_view)?,
                views: LayerViews::open(&layers.disk, &layers.workspace_view)?,
            })
        })?;
        let MountedMachine {
            account,
            root,
            workspace,
            views,
        } = mounted;
        let egress_socket = match &spec.egress_socket {
            Some(socket) => {
                // Connecting to a Unix socket needs write permission on it: the machine's user
                // gets it, and nobody else on the host.
                let (uid, gid) = owner_of(&uid_range, &account);
                chown(socket, uid, gid)?;
                Some(open_path(socket)?)
            }
            None => None,
        };
        let handover = Handover {
            user_namespace,
            mount_namespace,
            root,
            workspace,
            egress_socket,
        };
        resources.uid_range = Some(uid_range);
        let cgroup = self.cgroups.create_machine(&spec.limits)?;
        resources.cgroup = Some(cgroup.clone());
        // Cgroups are named for no machine (they are reused): the machine's directory says which
        // is its own, for a later life's sweep and for whoever looks at the host.
        let cgroup_file = dir.join(super::CGROUP_NAME_FILE);
        std::fs::write(&cgroup_file, cgroup.name()).map_err(|error| SandboxError::io("write", &cgroup_file, error))?;
        let command = self.bwrap_command(&name, &spec, &handover, &cgroup)?;
        resources.handover = Some(handover);
        let mut base_env = base_env(&account, &id);
        base_env.extend(spec.env.iter().cloned());
        let machine = BwrapMachine {
            id,
            dir,
            init_pid: 0,
            uid: account.uid,
            gid: account.gid,
            base_env,
            limits: spec.limits,
            workspace_view: views.workspace_path(),
            disk_view: views.disk_path(),
            _views: views,
            cgroup,
            exec_counter: AtomicU64::new(0),
            idle_command_leaves: Mutex::new(Vec::new()),
            terminals: Mutex::new(Vec::new()),
            deferred_terminals: tokio::sync::Mutex::new(Vec::new()),
            resources: Arc::new(Mutex::new(resources)),
        };
        Ok((machine, command))
    }

    /// The disk, the root overlay (install layer and base as lowers), the user's home inside it, and
    /// the workspace overlay (checkout above the install layer's `workspace/`) or the checkout
    /// alone. Every lower layer is an idmapped mount, so the machine sees the files the node
    /// keeps (owned by host ids 0..65,536) as owned by its own ids, and the upper layers belong
    /// to the machine's range: what it writes is owned by that range on the host.
    fn mount_layers(
        &self,
        dir: &Path,
        spec: &MachineSpec,
        uid_range: &UidRange,
        user_namespace: &std::os::fd::OwnedFd,
        resources: &mut Resources,
    ) -> Result<(MountedLayers, Account)> {
        use std::os::fd::AsFd;
        let disk = self.mount_disk(dir, &spec.limits, resources)?;
        let root_upper = disk.join("root-upper");
        let root_work = disk.join("root-work");
        let workspace_upper = disk.join("workspace-upper");
        let workspace_work = disk.join("workspace-work");
        for path in [&root_upper, &root_work, &workspace_upper, &workspace_work] {
            create_dir(path)?;
        }
        let machine_root = uid_range.host_id(0);
        chown(&root_upper, machine_root, machine_root)?;

        let mut idmapped = IdmappedLowers::new(dir);
        let mut root_lowers = Vec::new();
        if let Some(install_layer) = &spec.install_layer {
            if install_layer.root_dir().is_dir() {
                root_lowers.push(idmapped.mount(&install_layer.root_dir(), user_namespace.as_fd())?);
            }
        }
        root_lowers.push(idmapped.mount(&spec.base.rootfs, user_namespace.as_fd())?);
        let merged = dir.join("merged");
        create_dir(&merged)?;
        mounts::mount_overlay(&merged, &root_lowers, &root_upper, &root_work)?;

        // The node makes the user's home as the machine's user: inside, it is theirs.
        let account = find_account(&merged, spec, uid_range)?;
        let workspace_owner = uid_range.user_namespace_owned_by(account.uid, account.gid)?;
        let workspace_view = match spec.workspace_mode {
            WorkspaceMode::Overlay => {
                // The checkout (made by the node, owned by host root) shows as the user's; what
                // the install left in the layer's workspace keeps the ids the machine gave it.
                let mut lowers = vec![idmapped.mount(&spec.workspace, workspace_owner.as_fd())?];
                if let Some(install_layer) = &spec.install_layer {
                    if install_layer.workspace_dir().is_dir() {
                        lowers.push(idmapped.mount(&install_layer.workspace_dir(), user_namespace.as_fd())?);
                    }
                }
                let (uid, gid) = owner_of(uid_range, &account);
                chown(&workspace_upper, uid, gid)?;
                let view = dir.join("workspace");
                create_dir(&view)?;
                mounts::mount_overlay(&view, &lowers, &workspace_upper, &workspace_work)?;
                view
            }
            WorkspaceMode::Bind => idmapped.mount(&spec.workspace, workspace_owner.as_fd())?,
        };
        Ok((
            MountedLayers {
                disk,
                merged,
                workspace_view,
            },
            account,
        ))
    }

    /// The bubblewrap command of the machine's init, and the steps its process takes before it
    /// execs: it joins the machine's `init` leaf cgroup and its namespaces.
    // Unsafe: the steps' system calls (fcntl, setns) have no safe wrapper.
    #[allow(unsafe_code)]
    fn bwrap_command(
        &self,
        hostname: &str,
        spec: &MachineSpec,
        handover: &Handover,
        cgroup: &MachineCgroup,
    ) -> Result<InitCommand> {
        let init_leaf = cgroup.leaf("init")?;
        let mut command = std::process::Command::new(&self.config.bwrap_program);
        // Bubblewrap starts inside the machine's own user namespace (its ids mapped onto its
        // range, made by the node) as the machine's root, so it makes no user namespace of its
        // own. (Its `--userns` would keep host root's id, which the namespace does not map, when
        // the machine's user is root, and mounting the new root then fails with EOVERFLOW.) The
        // init it starts holds no capability; commands enter as the machine's user.
        command.args([
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            hostname,
        ]);
        command.args([
            "--unshare-net",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
        ]);
        command.args(["--cap-drop", "ALL"]);
        // The init and everything it starts run under the machine's system-call filter; the
        // memfds reach bubblewrap alone (see the pre_exec below), which reads and closes them.
        let seccomp_files = seccomp::machine_filter()?.bubblewrap_files()?;
        for file in &seccomp_files {
            command.arg("--add-seccomp-fd").arg(file.as_raw_fd().to_string());
        }
        command
            .arg("--bind-fd")
            .arg(handover.root.as_raw_fd().to_string())
            .arg("/");
        for bind in &spec.base.host_read_only_binds {
            command.arg("--ro-bind").arg(bind).arg(bind);
        }
        command.args(["--proc", "/proc"]);
        // Sysctls are the kernel's, not the machine's: read-only. Bubblewrap covers /proc/sys
        // only when it finds the directory writable, which it never does (its mode is 0555),
        // so the files below stayed writable to a machine's root. The source is the node's
        // /proc: sysctl files show the namespaces of whoever reads them, whichever proc mount
        // they are reached through. /proc/sysrq-trigger (absent when the kernel has no magic
        // SysRq) is bound read-only too; /sys is never mounted.
        command.args(["--ro-bind", "/proc/sys", "/proc/sys"]);
        command.args(["--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger"]);
        command.args(["--dev", "/dev"]);
        command
            .arg("--bind-fd")
            .arg(handover.workspace.as_raw_fd().to_string())
            .arg(WORKSPACE_DIR);
        if let Some(socket) = &handover.egress_socket {
            command
                .arg("--bind-fd")
                .arg(socket.as_raw_fd().to_string())
                .arg(EGRESS_SOCKET_PATH);
        }
        command.args([
            "--chdir",
            WORKSPACE_DIR,
            "--",
            "/bin/sh",
            "-c",
            "echo ready; exec sleep infinity",
        ]);
        // Started with standard input from /dev/null and its output piped (`start_init`).
        command.env_clear().env("PATH", DEFAULT_PATH);
        let procs_files = init_leaf.procs_files();
        let inherited = handover.bound_fds();
        let user_namespace = handover.user_namespace.as_raw_fd();
        let mount_namespace = handover.mount_namespace.as_raw_fd();
        // SAFETY: the steps only open and write files, change descriptor flags on descriptors
        // the parent keeps open until the spawn, join the mount and user namespaces and take
        // their root ids, all as plain system calls (the child shares the node's memory, see
        // `vfork`). The cgroup is joined first: once in the machine's namespace the process can
        // no longer write the node's cgroup files.
        let steps: InitSteps = Box::new(move || {
            seccomp::inherit_in_child(&seccomp_files)?;
            for fd in &inherited {
                if unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Leaf::join_current_process(&procs_files)?;
            // Into the machine's mount namespace, where its layers are, while still host
            // root (entering one takes CAP_SYS_ADMIN over the namespace's owner).
            if unsafe { libc::setns(mount_namespace, libc::CLONE_NEWNS) } != 0 {
                return Err(io::Error::last_os_error());
            }
            if unsafe { libc::setns(user_namespace, libc::CLONE_NEWUSER) } != 0 {
                return Err(io::Error::last_os_error());
            }
            crate::vfork::set_ids(0, 0)
        });
        Ok(InitCommand { command, steps })
    }

    fn mount_disk(&self, dir: &Path, limits: &MachineLimits, resources: &mut Resources) -> Result<PathBuf> {
        let disk = dir.join("disk");
        create_dir(&disk)?;
        match self.config.disk {
            DiskBacking::Tmpfs => {
                let max_inodes = (limits.disk_bytes / 4096).max(4096);
                mounts::mount_tmpfs(&disk, limits.disk_bytes, max_inodes)?;
            }
            DiskBacking::Ext4Image => {
                let template = self.ext4_template(limits.disk_bytes)?;
                let image = dir.join("disk.img");
                resources.disk_image = Some(image.clone());
                // `cp --sparse=always` keeps the holes: a few megabytes are written, not the size.
                run_host_command(
                    std::process::Command::new("cp")
                        .arg("--sparse=always")
                        .arg(&template)
                        .arg(&image),
                )?;
                mounts::mount_ext4_image(&image, &disk)?;
            }
        }
        Ok(disk)
    }

    /// An empty, formatted ext4 image of `disk_bytes`, made once per size: copying it is a few
    /// milliseconds where `mkfs` is tens.
    fn ext4_template(&self, disk_bytes: u64) -> Result<PathBuf> {
        let templates = self.config.root.join("disk-templates");
        let template = templates.join(format!("ext4-{disk_bytes}.img"));
        if template.exists() {
            return Ok(template);
        }
        create_dir(&templates)?;
        let building = templates.join(format!(".building-{}", ulid::Ulid::new()));
        let file = std::fs::File::create(&building).map_err(|error| SandboxError::io("create", &building, error))?;
        file.set_len(disk_bytes)
            .map_err(|error| SandboxError::io("size", &building, error))?;
        let formatted = run_host_command(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
                .arg("lazy_itable_init=1,lazy_journal_init=1,nodiscard")
                .arg(&building),
        );
        if let Err(error) = formatted {
            let _ = std::fs::remove_file(&building);
            return Err(error);
        }
        std::fs::rename(&building, &template).map_err(|error| SandboxError::io("move into place", &template, error))?;
        Ok(template)
    }

    /// Waits for the init's "ready" and finds its node PID.
    async fn wait_ready(&self, machine: &mut BwrapMachine, stdout: std::os::fd::OwnedFd) -> Result<()> {
        let stdout = crate::vfork::async_reader(stdout)
            .map_err(|error| SandboxError::io("watch", "the machine's init output", error))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let failure = match ready {
            Ok(Ok(Some(line))) if line == "ready" => None,
            Ok(Ok(_)) | Ok(Err(_)) => Some("bubblewrap exited before the init was ready".to_string()),
            Err(_) => Some(format!(
                "the init was not ready within {} ms",
                START_TIMEOUT.as_millis()
            )),
        };
        let bwrap_pid = {
            let resources = machine.resources.lock().expect("machine resources lock");
            resources.init.as_ref().map(|init| init.id() as i32).unwrap_or(0)
        };
        if let Some(mut detail) = failure {
            let stderr_pipe = {
                let mut resources = machine.resources.lock().expect("machine resources lock");
                resources.init.as_mut().and_then(|init| init.stderr.take())
            };
            // Kill the whole tree first (the cgroup's processes, then bubblewrap): a process
            // the machine started keeps the stderr pipe open, and the kill and the reap are
            // blocking calls that must not run on the runtime's workers.
            let resources = machine.resources.clone();
            blocking("stop a machine that failed to start", move || {
                resources
                    .lock()
                    .expect("machine resources lock")
                    .stop("it failed to start");
                Ok(())
            })
            .await?;
            let stderr = match stderr_pipe {
                Some(pipe) => read_start_failure(pipe).await,
                None => String::new(),
            };
            if !stderr.trim().is_empty() {
                detail.push_str(&format!(": {}", stderr.trim()));
            }
            return Err(SandboxError::MachineStart {
                machine: machine.id.clone(),
                detail,
            });
        }
        let children = blocking("find the machine's init", move || {
            Ok(std::fs::read_to_string(format!("/proc/{bwrap_pid}/task/{bwrap_pid}/children")).unwrap_or_default())
        })
        .await?;
        machine.init_pid = children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| SandboxError::MachineStart {
                machine: machine.id.clone(),
                detail: "bubblewrap has no child process".to_string(),
            })?;
        // Commands enter through a pidfd on the init, opened for each (see `open_init_pidfd`):
        // one now proves the kernel has pidfds and the init is bubblewrap's running child.
        machine.open_init_pidfd().map_err(|error| SandboxError::MachineStart {
            machine: machine.id.clone(),
            detail: format!("could not open a pidfd on its init: {error}"),
        })?;
        // Bubblewrap's stderr only explains a start that failed. Past the start the node keeps
        // no pipe per machine: every descriptor the node holds is copied into each process it
        // forks and closed again at its exec, a cost that grows with the machines running.
        let stderr = {
            let mut resources = machine.resources.lock().expect("machine resources lock");
            resources.init.as_mut().and_then(|init| init.stderr.take())
        };
        drop(stderr);
        Ok(())
    }
}

/// What bubblewrap said on stderr before a failed start, read without blocking a runtime worker
/// and bounded in bytes and time: if something still holds the pipe open, the read gives up
/// with what it has.
async fn read_start_failure(pipe: std::os::fd::OwnedFd) -> String {
    use tokio::io::AsyncReadExt as _;
    let Ok(pipe) = crate::vfork::async_reader(pipe) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    let mut bounded = pipe.take(START_FAILURE_STDERR_BYTES);
    let _ = tokio::time::timeout(START_FAILURE_STDERR_TIMEOUT, bounded.read_to_end(&mut bytes)).await;
    String::from_utf8_lossy(&bytes).into_owned()
}

fn validate_spec(spec: &MachineSpec) -> Result<()> {
    spec.limits.validate()?;
    if !spec.workspace.is_dir() {
        return Err(SandboxError::InvalidSpec {
            detail: format!("workspace {} is not a directory", spec.workspace.display()),
        });
    }
    if let Some(socket) = &spec.egress_socket {
        if !socket.exists() {
            return Err(SandboxError::InvalidSpec {
                detail: format!("egress socket {} does not exist", socket.display()),
            });
        }
    }
    Ok(())
}

/// The spec's user (root when it names none) from the merged root's `/etc/passwd`, with its
/// home directory made.
fn find_account(merged: &Path, spec: &MachineSpec, uid_range: &UidRange) -> Result<Account> {
    let user = spec.user.clone().unwrap_or_else(|| "root".to_string());
    // The layers are the machine's to write (an install can leave symlinks anywhere), so
    // the node only reads and creates through real directories inside `merged`.
    let passwd = read_inside(merged, Path::new("etc/passwd")).unwrap_or_default();
    let (uid, gid, home) = lookup_user(&passwd, &user).ok_or_else(|| SandboxError::UnknownUser {
        user: user.clone(),
        image: spec.base.image.to_string(),
    })?;
    let owner = (uid_range.host_id(uid), uid_range.host_id(gid));
    create_dirs_inside(merged, Path::new(home.trim_start_matches('/')), Some(owner))?;
    Ok(Account { user, uid, gid, home })
}

/// The host ids of the machine's user.
fn owner_of(uid_range: &UidRange, account: &Account) -> (u32, u32) {
    (uid_range.host_id(account.uid), uid_range.host_id(account.gid))
}

/// Sets the owner of `path` itself (a symlink is not followed).
fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|error| SandboxError::io("change the owner of", path, error))
}

/// The idmapped views of a machine's lower layers, `lower-0`, `lower-1`, ... in its directory
/// (mounted in the machine's own mount namespace, which unmounts them when it goes).
struct IdmappedLowers {
    dir: PathBuf,
    count: usize,
}

impl IdmappedLowers {
    fn new(machine_dir: &Path) -> Self {
        IdmappedLowers {
            dir: machine_dir.to_path_buf(),
            count: 0,
        }
    }

    /// Mounts `source` through `user_namespace` at the next `lower-N`.
    fn mount(&mut self, source: &Path, user_namespace: std::os::fd::BorrowedFd<'_>) -> Result<PathBuf> {
        let target = self.dir.join(format!("lower-{}", self.count));
        self.count += 1;
        create_dir(&target)?;
        mounts::idmapped_bind(source, &target, user_namespace)?;
        Ok(target)
    }
}

/// The environment every command starts from, before the spec's variables.
fn base_env(account: &Account, id: &str) -> Vec<(String, String)> {
    vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOME".to_string(), account.home.clone()),
        ("USER".to_string(), account.user.clone()),
        ("LOGNAME".to_string(), account.user.clone()),
        ("SHELL".to_string(), "/bin/sh".to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("TERM".to_string(), "xterm-256color".to_string()),
        ("FLOTILLA_MACHINE".to_string(), id.to_string()),
    ]
}

/// The steps bubblewrap's process takes between its birth and its exec (see `vfork`).
type InitSteps = Box<dyn FnMut() -> io::Result<()> + Send>;

/// Bubblewrap's command line and environment, and the steps before its exec.
pub(super) struct InitCommand {
    command: std::process::Command,
    steps: InitSteps,
}

/// A process spawned by a thread that lives as long as the node: `--die-with-parent` uses
/// PR_SET_PDEATHSIG, which fires when the spawning *thread* ends, and tokio's blocking threads
/// end after a while idle.
async fn spawn_long_lived(spawn: crate::vfork::Spawn, steps: InitSteps) -> io::Result<crate::vfork::Child> {
    type Request = (
        crate::vfork::Spawn,
        InitSteps,
        tokio::sync::oneshot::Sender<io::Result<crate::vfork::Child>>,
    );
    static SPAWNER: OnceLock<tokio::sync::mpsc::Sender<Request>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Request>(SPAWN_QUEUE_LENGTH);
        std::thread::Builder::new()
            .name("flotilla-machine-spawner".into())
            .spawn(move || {
                while let Some((spawn, mut steps, reply)) = receiver.blocking_recv() {
                    let _ = reply.send(spawn.start(&mut *steps));
                }
            })
            .expect("spawn the machine spawner thread");
        sender
    });
    let gone = || io::Error::other("the machine spawner thread is gone");
    let (reply_sender, reply_receiver) = tokio::sync::oneshot::channel();
    sender.send((spawn, steps, reply_sender)).await.map_err(|_| gone())?;
    reply_receiver.await.map_err(|_| gone())?
}

fn run_host_command(command: &mut std::process::Command) -> Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .output()
        .map_err(|error| SandboxError::io("run", PathBuf::from(&program), error))?;
    if !output.status.success() {
        return Err(SandboxError::HostCommand {
            program,
            detail: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(())
}

/// Reads `relative` under `root` only if no component on the way is a symlink or `..`.
pub(super) fn read_inside(root: &Path, relative: &Path) -> Option<String> {
    // The machine's root holds its install layer, which the repository's install wrote: the
    // file may be a symlink, a FIFO or endless, so it is read like any workspace file.
    let relative = relative.to_str()?;
    let bytes = crate::workspace_file::read_workspace_file(
        root,
        relative,
        crate::workspace_file::MAX_WORKSPACE_CONFIG_FILE_BYTES,
    )
    .ok()??;
    String::from_utf8(bytes).ok()
}

/// Creates the missing directories of `relative` under `root` (owned by `owner`, host ids, when
/// given); stops, creating nothing more, at a symlink, a file or a `..` on the way.
pub(super) fn create_dirs_inside(root: &Path, relative: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    let mut path = root.to_path_buf();
    for component in relative.components() {
        let std::path::Component::Normal(name) = component else {
            return Ok(());
        };
        path.push(name);
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_dir() => continue,
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map_err(|error| SandboxError::io("create", &path, error))?;
                if let Some((uid, gid)) = owner {
                    chown(&path, uid, gid)?;
                }
            }
            Err(error) => return Err(SandboxError::io("inspect", &path, error)),
        }
    }
    Ok(())
}

/// A machine label made safe for hostnames and paths.
pub(super) fn sanitize_name(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() {
                character.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(MAX_NAME_CHARS)
        .collect();
    clean = clean.trim_matches('-').to_string();
    if clean.is_empty() {
        clean.push_str("machine");
    }
    clean
}

/// The user's (uid, gid, home) from a passwd file.
pub(super) fn lookup_user(passwd: &str, user: &str) -> Option<(u32, u32, String)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 7 && fields[0] == user {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?, fields[5].to_string()))
        } else {
            None
        }
    })
}
