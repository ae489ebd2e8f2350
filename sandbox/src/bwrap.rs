//! The bubblewrap driver.
//!
//! A machine is one long-lived bubblewrap process (new user, mount, PID, IPC, UTS, network and
//! cgroup namespaces; all capabilities dropped; `--die-with-parent`) whose command is an init
//! that only waits. Its root is an overlay the driver mounts on the node beforehand — bubblewrap
//! 0.8 has no `--overlay` — with the install snapshot and the base image as lower layers and the
//! machine's upper layer on a size-limited filesystem; `/workspace` is a second overlay with the
//! caller's checkout as its lower layer. Commands and terminals enter the running machine's
//! namespaces with `nsenter`, drop what the entering process still holds with `setpriv`, and so
//! share one process tree, one loopback network and one set of files. Every process of a machine
//! sits in its cgroup (memory, pids, cpu), each command in a leaf of its own so that a timeout
//! kills the command's whole tree and nothing else.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt};

use crate::cgroup::{Cgroups, Leaf, MachineCgroup};
use crate::driver::{
    BaseImage, BaseLayer, ExecOutput, ExecRequest, KilledReason, Layer, MachineDriver, MachineSpec, WorkspaceMode,
    EGRESS_SOCKET_PATH, TERMINAL_SESSION,
};
use crate::environment::Terminal;
use crate::error::{Result, SandboxError};
use crate::image;
use crate::limits::MachineLimits;
use crate::mounts;

/// How long a new machine's init has to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// After a command exits, how long its output pipes may stay open (held by a process it left
/// running in the background) before the driver stops capturing them.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Hard cap on a request's output limit, whatever the machine's limits say.
const MAX_OUTPUT_BYTES_CEILING: u64 = 64 * 1024 * 1024;
/// Machine starts waiting for the spawner thread; more wait for a place in the queue.
const SPAWN_QUEUE_LENGTH: usize = 64;
/// Scrollback kept per terminal window.
const TERMINAL_HISTORY_LINES: usize = 10_000;
/// Longest accepted machine label (it also becomes the hostname, with the id).
const MAX_NAME_CHARS: usize = 24;
const WORKSPACE_DIR: &str = "/workspace";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Runs `$@` in directory `$1`; the shell is the image's, so it works on every base image.
const CHDIR_SCRIPT: &str = "cd -- \"$1\" || exit 126; shift; exec \"$@\"";

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
    /// The driver's directory (the node's data dir / `machines`): images, machines, snapshots.
    pub root: PathBuf,
    pub disk: DiskBacking,
    /// Name of the cgroup under each hierarchy's root that holds every machine of this node.
    pub cgroup_parent: String,
    pub bwrap_program: PathBuf,
    pub nsenter_program: PathBuf,
    pub setpriv_program: PathBuf,
}

impl BwrapConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        BwrapConfig {
            root: root.into(),
            disk: DiskBacking::Tmpfs,
            cgroup_parent: "flotilla".to_string(),
            bwrap_program: PathBuf::from("/usr/bin/bwrap"),
            nsenter_program: PathBuf::from("/usr/bin/nsenter"),
            setpriv_program: PathBuf::from("/usr/bin/setpriv"),
        }
    }
}

/// Cheap to clone: clones share the debootstrap lock.
#[derive(Clone)]
pub struct BwrapDriver {
    config: BwrapConfig,
    cgroups: Cgroups,
    debian_lock: Arc<tokio::sync::Mutex<()>>,
}

/// A running (or stopped) bubblewrap machine. Dropping it tears it down like `destroy`.
pub struct BwrapMachine {
    id: String,
    dir: PathBuf,
    init_pid: i32,
    uid: u32,
    gid: u32,
    /// The environment every command starts from (user, home, path, the spec's variables).
    base_env: Vec<(String, String)>,
    limits: MachineLimits,
    workspace_view: PathBuf,
    cgroup: MachineCgroup,
    exec_counter: AtomicU64,
    nsenter_program: PathBuf,
    setpriv_program: PathBuf,
    terminals: Mutex<Vec<String>>,
    resources: Arc<Mutex<Resources>>,
}

/// What has to be undone, in order; shared by `destroy`, `Drop` and failed creates.
struct Resources {
    init: Option<std::process::Child>,
    cgroup: Option<MachineCgroup>,
    /// Mount points, innermost last (unmounted in reverse).
    mounts: Vec<PathBuf>,
    disk_image: Option<PathBuf>,
    dir: Option<PathBuf>,
    stopped: Option<String>,
}

impl Resources {
    fn new(dir: PathBuf) -> Self {
        Resources {
            init: None,
            cgroup: None,
            mounts: Vec::new(),
            disk_image: None,
            dir: Some(dir),
            stopped: None,
        }
    }

    /// What a machine holds once `destroy` has taken its resources away.
    fn destroyed() -> Self {
        Resources {
            init: None,
            cgroup: None,
            mounts: Vec::new(),
            disk_image: None,
            dir: None,
            stopped: Some("destroyed".to_string()),
        }
    }

    /// Kills every process; the files stay.
    fn stop(&mut self, reason: &str) {
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_processes();
        }
        if let Some(init) = self.init.as_mut() {
            let _ = init.kill();
            let _ = init.wait();
        }
        self.init = None;
        if self.stopped.is_none() {
            self.stopped = Some(reason.to_string());
        }
    }

    fn teardown(&mut self) -> Result<()> {
        self.stop("destroyed");
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
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
            // Never delete through a mount that is still there (it could reach a lower layer's
            // files via the upper's view, or a checkout).
            let still_mounted = ["workspace", "merged", "disk"]
                .iter()
                .any(|name| mounts::is_mount_point(&dir.join(name)));
            if still_mounted {
                tracing::warn!(dir = %dir.display(), "machine directory left in place: a layer is still mounted");
            } else if let Err(error) = std::fs::remove_dir_all(&dir) {
                if error.kind() != io::ErrorKind::NotFound {
                    first_error.get_or_insert(SandboxError::io("remove", &dir, error));
                }
            }
        }
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

    /// The machine's init (PID 1 inside) as a node PID.
    pub fn init_pid(&self) -> i32 {
        self.init_pid
    }

    pub fn limits(&self) -> &MachineLimits {
        &self.limits
    }

    /// The per-machine directory under the driver's root.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ensure_running(&self) -> Result<()> {
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

    /// The argv that enters the machine as its user, with no capabilities, in `cwd`.
    fn enter_argv(&self, cwd: &str, argv: &[String]) -> Vec<String> {
        let mut full = vec![
            self.nsenter_program.display().to_string(),
            format!("--target={}", self.init_pid),
            "--user".into(),
            "--mount".into(),
            "--pid".into(),
            "--ipc".into(),
            "--uts".into(),
            "--net".into(),
            "--cgroup".into(),
            "--root".into(),
        ];
        // The init runs in /workspace, the usual directory: entering in the init's directory
        // saves the shell that would change to it.
        let in_init_directory = cwd == WORKSPACE_DIR;
        if in_init_directory {
            full.push("--wd".into());
        }
        if self.uid != 0 {
            full.push(format!("--setuid={}", self.uid));
            full.push(format!("--setgid={}", self.gid));
        }
        full.push("--".into());
        full.push(self.setpriv_program.display().to_string());
        if self.uid == 0 {
            // Root inside the user namespace would still hold every capability there.
            full.extend(["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"].map(String::from));
        }
        full.push("--no-new-privs".into());
        full.push("--".into());
        if !in_init_directory {
            full.extend(["/bin/sh", "-c", CHDIR_SCRIPT, "flotilla"].map(String::from));
            full.push(cwd.to_string());
        }
        full.extend(argv.iter().cloned());
        full
    }

    fn terminal_index(&self, name: Option<&str>) -> Result<usize> {
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

/// A process spawned by a thread that lives as long as the node: `--die-with-parent` uses
/// PR_SET_PDEATHSIG, which fires when the spawning *thread* ends, and tokio's blocking threads
/// end after a while idle.
async fn spawn_long_lived(command: std::process::Command) -> io::Result<std::process::Child> {
    type Request = (
        std::process::Command,
        tokio::sync::oneshot::Sender<io::Result<std::process::Child>>,
    );
    static SPAWNER: OnceLock<tokio::sync::mpsc::Sender<Request>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Request>(SPAWN_QUEUE_LENGTH);
        std::thread::Builder::new()
            .name("flotilla-machine-spawner".into())
            .spawn(move || {
                while let Some((mut command, reply)) = receiver.blocking_recv() {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawn the machine spawner thread");
        sender
    });
    let gone = || io::Error::other("the machine spawner thread is gone");
    let (reply_sender, reply_receiver) = tokio::sync::oneshot::channel();
    sender.send((command, reply_sender)).await.map_err(|_| gone())?;
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

fn check_program(path: &Path, hint: &str) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(SandboxError::MissingTool {
            tool: path.display().to_string(),
            hint: hint.to_string(),
        })
    }
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|error| SandboxError::io("create", path, error))
}

/// Reads `relative` under `root` only if no component on the way is a symlink or `..`.
fn read_inside(root: &Path, relative: &Path) -> Option<String> {
    let mut path = root.to_path_buf();
    for component in relative.components() {
        let std::path::Component::Normal(name) = component else {
            return None;
        };
        path.push(name);
        if std::fs::symlink_metadata(&path).ok()?.file_type().is_symlink() {
            return None;
        }
    }
    std::fs::read_to_string(path).ok()
}

/// Creates the missing directories of `relative` under `root`; stops, creating nothing more,
/// at a symlink, a file or a `..` on the way.
fn create_dirs_inside(root: &Path, relative: &Path) -> Result<()> {
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
            }
            Err(error) => return Err(SandboxError::io("inspect", &path, error)),
        }
    }
    Ok(())
}

/// A machine label made safe for hostnames and paths.
fn sanitize_name(name: &str) -> String {
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
fn lookup_user(passwd: &str, user: &str) -> Option<(u32, u32, String)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 7 && fields[0] == user {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?, fields[5].to_string()))
        } else {
            None
        }
    })
}

/// One tmux invocation that starts the server with the session's options, then the session
/// [`TERMINAL_SESSION`] with window `i` running terminal `i` (windows are addressed by index:
/// names like "Run Next.js" contain tmux's target separators).
fn terminal_session_argv(terminals: &[Terminal]) -> Vec<String> {
    let history_limit = TERMINAL_HISTORY_LINES.to_string();
    let mut commands: Vec<Vec<String>> = vec![
        vec!["start-server".into()],
        // Keep the server without sessions, and a finished terminal's output readable.
        vec!["set-option".into(), "-g".into(), "exit-empty".into(), "off".into()],
        vec!["set-option".into(), "-g".into(), "remain-on-exit".into(), "on".into()],
        vec!["set-option".into(), "-g".into(), "history-limit".into(), history_limit],
    ];
    for (index, terminal) in terminals.iter().enumerate() {
        let mut command: Vec<String> = if index == 0 {
            ["new-session", "-d", "-s", TERMINAL_SESSION, "-x", "200", "-y", "50"]
                .map(String::from)
                .to_vec()
        } else {
            vec![
                "new-window".into(),
                "-d".into(),
                "-t".into(),
                format!("{TERMINAL_SESSION}:{index}"),
            ]
        };
        command.extend([
            "-n".to_string(),
            terminal.name.clone(),
            "-c".to_string(),
            WORKSPACE_DIR.to_string(),
        ]);
        command.push(format!("exec /bin/sh -lc {}", shell_quote(&terminal.command)));
        commands.push(command);
    }
    let mut argv = vec!["tmux".to_string(), "-f".to_string(), "/dev/null".to_string()];
    for (index, command) in commands.into_iter().enumerate() {
        if index > 0 {
            argv.push(";".to_string());
        }
        argv.extend(command);
    }
    argv
}

/// The last `max_lines` lines of a captured pane, without the blank screen rows between a dead
/// pane's output and tmux's "Pane is dead" line at the bottom.
fn terminal_tail(captured: &str, max_lines: usize) -> String {
    let mut lines: Vec<&str> = captured.lines().map(str::trim_end).collect();
    let drop_blank_tail = |lines: &mut Vec<&str>| {
        while lines.last().is_some_and(|line| line.is_empty()) {
            lines.pop();
        }
    };
    drop_blank_tail(&mut lines);
    if let Some(last) = lines.last().copied().filter(|line| line.starts_with("Pane is dead")) {
        lines.pop();
        drop_blank_tail(&mut lines);
        lines.push(last);
    }
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

/// Quotes a string for a POSIX shell.
pub(crate) fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Keeps the first and the last part of a stream within a byte budget.
struct OutputCapture {
    head: Vec<u8>,
    head_limit: usize,
    tail: std::collections::VecDeque<u8>,
    tail_limit: usize,
    total_bytes: u64,
}

impl OutputCapture {
    fn new(limit_bytes: usize) -> Self {
        let tail_limit = limit_bytes / 2;
        OutputCapture {
            head: Vec::new(),
            head_limit: limit_bytes - tail_limit,
            tail: std::collections::VecDeque::new(),
            tail_limit,
            total_bytes: 0,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        self.total_bytes += data.len() as u64;
        let head_room = self.head_limit - self.head.len();
        let into_head = head_room.min(data.len());
        self.head.extend_from_slice(&data[..into_head]);
        data = &data[into_head..];
        if self.tail_limit == 0 {
            return;
        }
        if data.len() >= self.tail_limit {
            self.tail.clear();
            self.tail.extend(&data[data.len() - self.tail_limit..]);
            return;
        }
        let overflow = (self.tail.len() + data.len()).saturating_sub(self.tail_limit);
        self.tail.drain(..overflow);
        self.tail.extend(data);
    }

    fn captured_bytes(&self) -> u64 {
        (self.head.len() + self.tail.len()) as u64
    }

    fn finish(self) -> (Vec<u8>, bool, u64) {
        let omitted = self.total_bytes - self.captured_bytes();
        let mut bytes = self.head;
        bytes.extend(self.tail);
        (bytes, omitted > 0, omitted)
    }
}

async fn pump<R: AsyncRead + Unpin>(mut reader: R, capture: Arc<Mutex<OutputCapture>>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(count) => capture.lock().expect("capture lock").push(&buffer[..count]),
        }
    }
}

/// How a process is started inside a machine.
struct Invocation {
    argv: Vec<String>,
    cwd: String,
    env: Vec<(String, String)>,
    timeout_ms: u64,
    max_output_bytes: u64,
    /// The leaf cgroup; `None` makes a fresh `exec-N` leaf for this process alone.
    leaf_name: Option<&'static str>,
}

impl BwrapDriver {
    /// Checks the tools, detects cgroups, creates the directories and tears down whatever a
    /// previous run of the node left under `root` (mounts, cgroups, directories).
    pub fn new(config: BwrapConfig) -> Result<Self> {
        check_program(
            &config.bwrap_program,
            "apt-get install bubblewrap, or run scripts/setup",
        )?;
        check_program(&config.nsenter_program, "it comes with util-linux")?;
        check_program(&config.setpriv_program, "it comes with util-linux")?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Unsupported {
                what: "running without root (layer mounts and cgroups need it)".to_string(),
            });
        }
        let cgroups = Cgroups::detect(&config.cgroup_parent)?;
        for dir in ["images", "machines", "snapshots"] {
            create_dir(&config.root.join(dir))?;
        }
        let driver = BwrapDriver {
            config,
            cgroups,
            debian_lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        driver.remove_stale_machines();
        Ok(driver)
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    /// Where install snapshots live, for the snapshot cache.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.config.root.join("snapshots")
    }

    fn machines_dir(&self) -> PathBuf {
        self.config.root.join("machines")
    }

    pub fn cgroup_version(&self) -> &'static str {
        match self.cgroups.version() {
            crate::cgroup::Version::V1 => "v1",
            crate::cgroup::Version::V2 => "v2",
        }
    }

    fn remove_stale_machines(&self) {
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
            resources.mounts = ["disk", "merged", "workspace"]
                .iter()
                .map(|name| entry.path().join(name))
                .collect();
            let image = entry.path().join("disk.img");
            resources.disk_image = image.exists().then_some(image);
            drop(resources);
        }
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
        resources.mounts.push(disk.clone());
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

    fn create_blocking(&self, spec: MachineSpec) -> Result<(BwrapMachine, std::process::Command)> {
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
        let name = sanitize_name(&spec.name);
        let id = format!("{name}-{}", ulid::Ulid::new().to_string().to_lowercase());
        let dir = self.machines_dir().join(&id);
        create_dir(&dir)?;
        let mut resources = Resources::new(dir.clone());

        let disk = self.mount_disk(&dir, &spec.limits, &mut resources)?;
        let root_upper = disk.join("root-upper");
        let root_work = disk.join("root-work");
        let workspace_upper = disk.join("workspace-upper");
        let workspace_work = disk.join("workspace-work");
        for path in [&root_upper, &root_work, &workspace_upper, &workspace_work] {
            create_dir(path)?;
        }

        let merged = dir.join("merged");
        create_dir(&merged)?;
        let mut root_lowers = Vec::new();
        if let Some(snapshot) = &spec.snapshot {
            if snapshot.root_dir().is_dir() {
                root_lowers.push(snapshot.root_dir());
            }
        }
        root_lowers.push(spec.base.rootfs.clone());
        mounts::mount_overlay(&merged, &root_lowers, &root_upper, &root_work)?;
        resources.mounts.push(merged.clone());

        let user = spec.user.clone().unwrap_or_else(|| "root".to_string());
        // The layers are the machine's to write (an install can leave symlinks anywhere), so
        // the node only reads and creates through real directories inside `merged`.
        let passwd = read_inside(&merged, Path::new("etc/passwd")).unwrap_or_default();
        let (uid, gid, home) = lookup_user(&passwd, &user).ok_or_else(|| SandboxError::UnknownUser {
            user: user.clone(),
            image: spec.base.image.to_string(),
        })?;
        create_dirs_inside(&merged, Path::new(home.trim_start_matches('/')))?;

        let workspace_view = match spec.workspace_mode {
            WorkspaceMode::Overlay => {
                let view = dir.join("workspace");
                create_dir(&view)?;
                let mut lowers = vec![spec.workspace.clone()];
                if let Some(snapshot) = &spec.snapshot {
                    if snapshot.workspace_dir().is_dir() {
                        lowers.push(snapshot.workspace_dir());
                    }
                }
                mounts::mount_overlay(&view, &lowers, &workspace_upper, &workspace_work)?;
                resources.mounts.push(view.clone());
                view
            }
            WorkspaceMode::Bind => spec.workspace.clone(),
        };

        let cgroup = self.cgroups.create_machine(&id, &spec.limits)?;
        resources.cgroup = Some(cgroup.clone());
        let init_leaf = cgroup.leaf("init")?;

        let mut command = std::process::Command::new(&self.config.bwrap_program);
        command.args(["--unshare-user", "--uid", &uid.to_string(), "--gid", &gid.to_string()]);
        command.args(["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", &name]);
        command.args([
            "--unshare-net",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
        ]);
        command.args(["--cap-drop", "ALL"]);
        command.arg("--bind").arg(&merged).arg("/");
        for bind in &spec.base.host_read_only_binds {
            command.arg("--ro-bind").arg(bind).arg(bind);
        }
        command.args(["--proc", "/proc", "--dev", "/dev"]);
        command.arg("--bind").arg(&workspace_view).arg(WORKSPACE_DIR);
        if let Some(socket) = &spec.egress_socket {
            command.arg("--bind").arg(socket).arg(EGRESS_SOCKET_PATH);
        }
        command.args([
            "--chdir",
            WORKSPACE_DIR,
            "--",
            "/bin/sh",
            "-c",
            "echo ready; exec sleep infinity",
        ]);
        command.env_clear().env("PATH", DEFAULT_PATH);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let procs_files = init_leaf.procs_files();
        // SAFETY: the closure only opens and writes files (async-signal-safe calls).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                Leaf::join_current_process(&procs_files)
            });
        }

        let mut base_env = vec![
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ("HOME".to_string(), home.clone()),
            ("USER".to_string(), user.clone()),
            ("LOGNAME".to_string(), user.clone()),
            ("SHELL".to_string(), "/bin/sh".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("TERM".to_string(), "xterm-256color".to_string()),
            ("FLOTILLA_MACHINE".to_string(), id.clone()),
        ];
        base_env.extend(spec.env.iter().cloned());

        let machine = BwrapMachine {
            id,
            dir,
            init_pid: 0,
            uid,
            gid,
            base_env,
            limits: spec.limits,
            workspace_view,
            cgroup,
            exec_counter: AtomicU64::new(0),
            nsenter_program: self.config.nsenter_program.clone(),
            setpriv_program: self.config.setpriv_program.clone(),
            terminals: Mutex::new(Vec::new()),
            resources: Arc::new(Mutex::new(resources)),
        };
        Ok((machine, command))
    }

    /// Waits for the init's "ready" and finds its node PID.
    async fn wait_ready(&self, machine: &mut BwrapMachine, stdout: std::process::ChildStdout) -> Result<()> {
        let stdout = tokio::process::ChildStdout::from_std(stdout)
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
            let init = machine.resources.lock().expect("machine resources lock").init.take();
            let mut stderr = String::new();
            if let Some(mut init) = init {
                let _ = init.kill();
                let _ = init.wait();
                if let Some(mut stderr_pipe) = init.stderr.take() {
                    use std::io::Read;
                    let _ = stderr_pipe.read_to_string(&mut stderr);
                }
            }
            machine
                .resources
                .lock()
                .expect("machine resources lock")
                .stop("it failed to start");
            if !stderr.trim().is_empty() {
                detail.push_str(&format!(": {}", stderr.trim()));
            }
            return Err(SandboxError::MachineStart {
                machine: machine.id.clone(),
                detail,
            });
        }
        let children =
            std::fs::read_to_string(format!("/proc/{bwrap_pid}/task/{bwrap_pid}/children")).unwrap_or_default();
        machine.init_pid = children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| SandboxError::MachineStart {
                machine: machine.id.clone(),
                detail: "bubblewrap has no child process".to_string(),
            })?;
        Ok(())
    }

    async fn run(&self, machine: &BwrapMachine, invocation: Invocation) -> Result<ExecOutput> {
        machine.ensure_running()?;
        let started = Instant::now();
        let leaf_name = match invocation.leaf_name {
            Some(name) => name.to_string(),
            None => format!("exec-{}", machine.exec_counter.fetch_add(1, Ordering::Relaxed)),
        };
        let leaf = machine.cgroup.leaf(&leaf_name)?;
        let oom_kills_before = leaf.oom_kill_count();
        let argv = machine.enter_argv(&invocation.cwd, &invocation.argv);
        let mut command = tokio::process::Command::new(&argv[0]);
        command.args(&argv[1..]);
        command.env_clear();
        for (key, value) in machine.base_env.iter().chain(invocation.env.iter()) {
            command.env(key, value);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let procs_files: Vec<CString> = leaf.procs_files();
        // SAFETY: setsid and the leaf join only make async-signal-safe calls.
        unsafe {
            command.pre_exec(move || {
                // A session of its own: no controlling terminal of the node's to reach.
                libc::setsid();
                Leaf::join_current_process(&procs_files)
            });
        }
        let mut child = command
            .spawn()
            .map_err(|error| SandboxError::io("start", &machine.nsenter_program, error))?;
        let limit = invocation.max_output_bytes.min(MAX_OUTPUT_BYTES_CEILING) as usize;
        let stdout_capture = Arc::new(Mutex::new(OutputCapture::new(limit)));
        let stderr_capture = Arc::new(Mutex::new(OutputCapture::new(limit)));
        let stdout_pump = tokio::spawn(pump(
            child.stdout.take().expect("stdout is piped"),
            stdout_capture.clone(),
        ));
        let stderr_pump = tokio::spawn(pump(
            child.stderr.take().expect("stderr is piped"),
            stderr_capture.clone(),
        ));

        let timeout = Duration::from_millis(invocation.timeout_ms);
        let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => (
                status.map_err(|error| SandboxError::io("wait for", &machine.nsenter_program, error))?,
                false,
            ),
            Err(_) => {
                let leaf = Arc::new(leaf);
                let killer = leaf.clone();
                let _ = tokio::task::spawn_blocking(move || killer.kill_all()).await;
                let _ = child.start_kill();
                let status = child
                    .wait()
                    .await
                    .map_err(|error| SandboxError::io("wait for", &machine.nsenter_program, error))?;
                let leaf = Arc::try_unwrap(leaf).ok();
                return self
                    .finish(
                        machine,
                        leaf,
                        status,
                        true,
                        started,
                        invocation.timeout_ms,
                        oom_kills_before,
                        (stdout_pump, stderr_pump),
                        (stdout_capture, stderr_capture),
                    )
                    .await;
            }
        };
        self.finish(
            machine,
            Some(leaf),
            status,
            timed_out,
            started,
            invocation.timeout_ms,
            oom_kills_before,
            (stdout_pump, stderr_pump),
            (stdout_capture, stderr_capture),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        machine: &BwrapMachine,
        leaf: Option<Leaf>,
        status: std::process::ExitStatus,
        timed_out: bool,
        started: Instant,
        timeout_ms: u64,
        oom_kills_before: u64,
        pumps: (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>),
        captures: (Arc<Mutex<OutputCapture>>, Arc<Mutex<OutputCapture>>),
    ) -> Result<ExecOutput> {
        use std::os::unix::process::ExitStatusExt;
        let (mut stdout_pump, mut stderr_pump) = pumps;
        let oom_killed = leaf
            .as_ref()
            .is_some_and(|leaf| leaf.oom_kill_count() > oom_kills_before);
        let leaf = leaf.map(Arc::new);
        if !status.success() || timed_out {
            // What a failed command left running is debris (a fork bomb's children, a half
            // started server): kill it so the machine stays usable. A command that succeeds may
            // leave daemons behind on purpose (`start`, `nohup server &`).
            if let Some(leaf) = leaf.clone() {
                tokio::task::spawn_blocking(move || leaf.kill_all()).await.ok();
            }
        }
        let drained = tokio::time::timeout(OUTPUT_DRAIN_GRACE, async {
            let _ = (&mut stdout_pump).await;
            let _ = (&mut stderr_pump).await;
        })
        .await;
        if drained.is_err() {
            // A background process still holds the pipes. The pumps go on reading into the
            // empty captures left below (which keep nothing) until it exits, so that it does not
            // die of SIGPIPE on its next write.
            tracing::debug!(machine = %machine.id, "output pipes outlived the command");
        }
        if let Some(leaf) = leaf {
            // A process the command left running keeps its leaf (and is killed on destroy).
            tokio::task::spawn_blocking(move || leaf.remove_if_empty()).await.ok();
        }
        let take = |capture: Arc<Mutex<OutputCapture>>| {
            let mut guard = capture.lock().expect("capture lock");
            std::mem::replace(&mut *guard, OutputCapture::new(0)).finish()
        };
        let (stdout, stdout_truncated, stdout_omitted) = take(captures.0);
        let (stderr, stderr_truncated, stderr_omitted) = take(captures.1);
        let killed_reason = if timed_out {
            Some(KilledReason::Timeout { limit_ms: timeout_ms })
        } else if oom_killed && !status.success() {
            Some(KilledReason::OutOfMemory {
                limit_bytes: machine.limits.memory_bytes,
            })
        } else {
            None
        };
        Ok(ExecOutput {
            exit_code: status.code(),
            signal: status.signal(),
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            omitted_bytes: stdout_omitted + stderr_omitted,
            timed_out,
            killed_reason,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Runs an argv (no shell) inside the machine and fails unless it exits 0.
    async fn run_checked(
        &self,
        machine: &BwrapMachine,
        argv: Vec<String>,
        leaf_name: Option<&'static str>,
    ) -> Result<ExecOutput> {
        let program = argv.first().cloned().unwrap_or_default();
        let output = self
            .run(
                machine,
                Invocation {
                    argv,
                    cwd: WORKSPACE_DIR.to_string(),
                    env: Vec::new(),
                    timeout_ms: machine.limits.command_timeout_ms.min(60_000),
                    max_output_bytes: machine.limits.max_output_bytes,
                    leaf_name,
                },
            )
            .await?;
        if !output.success() {
            return Err(SandboxError::MachineCommand {
                machine: machine.id.clone(),
                program,
                detail: format!("{}: {}", output.outcome(), output.last_lines(5)),
            });
        }
        Ok(output)
    }
}

#[async_trait]
impl MachineDriver for BwrapDriver {
    type Machine = BwrapMachine;

    async fn prepare_base(&self, image: BaseImage) -> Result<BaseLayer> {
        let root = self.config.root.clone();
        match image {
            BaseImage::Host => tokio::task::spawn_blocking(move || image::prepare_host(&root))
                .await
                .map_err(|error| SandboxError::ImageNotPrepared {
                    image: "host".into(),
                    detail: error.to_string(),
                })?,
            BaseImage::Debian => {
                let _guard = self.debian_lock.lock().await;
                image::prepare_debian(&root).await
            }
        }
    }

    async fn create(&self, spec: MachineSpec) -> Result<BwrapMachine> {
        // Mounts, cgroup writes and the passwd lookup block for a millisecond or two.
        let driver = self.clone();
        let (mut machine, command) = tokio::task::spawn_blocking(move || driver.create_blocking(spec))
            .await
            .map_err(|error| SandboxError::HostCommand {
                program: "machine set-up".into(),
                detail: error.to_string(),
            })??;
        let mut init = spawn_long_lived(command)
            .await
            .map_err(|error| SandboxError::io("start", &self.config.bwrap_program, error))?;
        let stdout = init.stdout.take().expect("stdout is piped");
        machine.resources.lock().expect("machine resources lock").init = Some(init);
        self.wait_ready(&mut machine, stdout).await?;
        Ok(machine)
    }

    async fn exec(&self, machine: &BwrapMachine, request: ExecRequest) -> Result<ExecOutput> {
        let invocation = Invocation {
            argv: vec!["/bin/sh".to_string(), "-lc".to_string(), request.command],
            cwd: request.cwd.unwrap_or_else(|| WORKSPACE_DIR.to_string()),
            env: request.env,
            timeout_ms: request.timeout_ms.unwrap_or(machine.limits.command_timeout_ms),
            max_output_bytes: request.max_output_bytes.unwrap_or(machine.limits.max_output_bytes),
            leaf_name: None,
        };
        self.run(machine, invocation).await
    }

    async fn capture_layer(&self, machine: &BwrapMachine, dest: &Path) -> Result<Layer> {
        if dest.exists() {
            return Err(SandboxError::InvalidSpec {
                detail: format!("layer destination {} already exists", dest.display()),
            });
        }
        let disk = machine.dir.join("disk");
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
            Ok(Layer { path: layer_dest })
        })
        .await
        .map_err(|error| SandboxError::HostCommand {
            program: "layer capture".into(),
            detail: error.to_string(),
        })?
    }

    async fn destroy(&self, machine: &BwrapMachine) -> Result<()> {
        let mut resources = {
            let mut guard = machine.resources.lock().expect("machine resources lock");
            std::mem::replace(&mut *guard, Resources::destroyed())
        };
        tokio::task::spawn_blocking(move || resources.teardown())
            .await
            .map_err(|error| SandboxError::HostCommand {
                program: "machine teardown".into(),
                detail: error.to_string(),
            })?
    }

    async fn start_terminals(&self, machine: &BwrapMachine, terminals: &[Terminal]) -> Result<()> {
        if terminals.is_empty() {
            return Ok(());
        }
        {
            let existing = machine.terminals.lock().expect("terminals lock");
            if !existing.is_empty() {
                return Err(SandboxError::InvalidSpec {
                    detail: format!("machine {} already has its terminals", machine.id),
                });
            }
        }
        let mut names = std::collections::BTreeSet::new();
        if let Some(duplicate) = terminals.iter().find(|terminal| !names.insert(terminal.name.as_str())) {
            return Err(SandboxError::InvalidSpec {
                detail: format!("two terminals are named {:?}", duplicate.name),
            });
        }
        let argv = terminal_session_argv(terminals);
        self.run_checked(machine, argv, Some("terminals")).await?;
        *machine.terminals.lock().expect("terminals lock") =
            terminals.iter().map(|terminal| terminal.name.clone()).collect();
        Ok(())
    }

    async fn read_terminal(&self, machine: &BwrapMachine, name: &str, max_lines: usize) -> Result<String> {
        let index = machine.terminal_index(Some(name))?;
        let max_lines = max_lines.clamp(1, TERMINAL_HISTORY_LINES);
        let argv = vec![
            "tmux".to_string(),
            "capture-pane".to_string(),
            "-p".to_string(),
            "-J".to_string(),
            "-t".to_string(),
            format!("{TERMINAL_SESSION}:{index}"),
            "-S".to_string(),
            format!("-{max_lines}"),
        ];
        let output = self.run_checked(machine, argv, None).await?;
        Ok(terminal_tail(&output.stdout_text(), max_lines))
    }

    fn attach_command(
        &self,
        machine: &BwrapMachine,
        terminal: Option<&str>,
        read_only: bool,
    ) -> Result<std::process::Command> {
        machine.ensure_running()?;
        let index = machine.terminal_index(terminal)?;
        let mut tmux = vec!["tmux".to_string(), "attach-session".to_string()];
        if read_only {
            // A viewer sees everything and can type nothing.
            tmux.push("-r".to_string());
        }
        tmux.extend(["-t".to_string(), format!("{TERMINAL_SESSION}:{index}")]);
        let argv = machine.enter_argv(WORKSPACE_DIR, &tmux);
        let mut command = std::process::Command::new(&argv[0]);
        command.args(&argv[1..]).env_clear();
        for (key, value) in &machine.base_env {
            command.env(key, value);
        }
        let leaf = machine.cgroup.leaf("attach")?;
        let procs_files = leaf.procs_files();
        // SAFETY: the closure only opens and writes files (async-signal-safe calls).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                Leaf::join_current_process(&procs_files)
            });
        }
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_everything_within_the_limit() {
        let mut capture = OutputCapture::new(10);
        capture.push(b"hello");
        capture.push(b"world");
        assert_eq!(capture.finish(), (b"helloworld".to_vec(), false, 0));
    }

    #[test]
    fn capture_keeps_head_and_tail_beyond_the_limit() {
        let mut capture = OutputCapture::new(6);
        capture.push(b"abcdefghij");
        capture.push(b"klm");
        let (bytes, truncated, omitted) = capture.finish();
        assert_eq!(bytes, b"abcklm".to_vec());
        assert!(truncated);
        assert_eq!(omitted, 7);
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("Install: my/Repo!"), "install--my-repo");
        assert_eq!(sanitize_name("!!!"), "machine");
        assert_eq!(sanitize_name(&"x".repeat(100)).len(), MAX_NAME_CHARS);
    }

    #[test]
    fn users_are_found_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nagent:x:1000:1001::/home/agent:/bin/sh\n";
        assert_eq!(
            lookup_user(passwd, "agent"),
            Some((1000, 1001, "/home/agent".to_string()))
        );
        assert_eq!(lookup_user(passwd, "nobody"), None);
    }

    #[test]
    fn terminal_tail_skips_blank_rows_before_a_dead_pane() {
        let captured = "1\n2\ncounted\n\n\n\nPane is dead (status 0)\n\n";
        assert_eq!(terminal_tail(captured, 2), "counted\nPane is dead (status 0)");
        assert_eq!(terminal_tail("a\nb   \n\n", 5), "a\nb");
        assert_eq!(terminal_tail("", 5), "");
    }

    #[test]
    fn terminal_session_argv_addresses_windows_by_index() {
        let terminals = [
            Terminal::new("Run Next.js", "npm run dev"),
            Terminal::new("watch", "it's"),
        ];
        let argv = terminal_session_argv(&terminals);
        let text = argv.join(" ");
        assert!(
            text.starts_with("tmux -f /dev/null start-server ; set-option -g exit-empty off ;"),
            "{text}"
        );
        assert!(
            text.contains("new-session -d -s flotilla -x 200 -y 50 -n Run Next.js -c /workspace"),
            "{text}"
        );
        assert!(text.contains("new-window -d -t flotilla:1 -n watch"), "{text}");
        assert_eq!(argv.last().unwrap(), "exec /bin/sh -lc 'it'\\''s'");
        assert_ne!(argv.last().unwrap(), ";");
    }

    #[test]
    fn paths_inside_a_layer_do_not_follow_symlinks_out() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("etc/passwd")).unwrap();
        assert_eq!(read_inside(root.path(), Path::new("etc/passwd")), None);
        assert_eq!(read_inside(root.path(), Path::new("../secret")), None);

        std::os::unix::fs::symlink(outside.path(), root.path().join("home")).unwrap();
        create_dirs_inside(root.path(), Path::new("home/agent")).unwrap();
        assert!(!outside.path().join("agent").exists());
        create_dirs_inside(root.path(), Path::new("../escaped")).unwrap();
        assert!(!root.path().parent().unwrap().join("escaped").exists());
        create_dirs_inside(root.path(), Path::new("srv/agent")).unwrap();
        assert!(root.path().join("srv/agent").is_dir());
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
