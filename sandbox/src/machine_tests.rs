//! Real bubblewrap machines on the `host` base image, in temporary directories. They need root
//! (layer mounts and cgroups), as the driver does; CI runs as root.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::bwrap::{BwrapConfig, BwrapDriver, BwrapMachine};
use crate::driver::{
    boot, BaseImage, BaseLayer, ExecOutput, ExecRequest, KilledReason, Layer, MachineDriver, MachineHandle,
    MachineSpec, WorkspaceMode, EGRESS_SOCKET_PATH,
};
use crate::environment::{self, EnvironmentConfig, Terminal};
use crate::error::{Result, SandboxError};
use crate::install_layer::{InstallLayerCache, InstallRequest};
use crate::limits::{MachineLimits, MIB};
use crate::pty::{PtySession, PtySize};

/// Deadline for conditions that a healthy machine meets in milliseconds; generous because
/// tests share two cores.
pub(crate) const CONDITION_DEADLINE: Duration = Duration::from_secs(20);

/// The bubblewrap machine behind a handle, for what only it tells (its directory).
pub(crate) fn bwrap_machine(handle: &MachineHandle) -> &BwrapMachine {
    handle.downcast_ref::<BwrapMachine>().expect("a bubblewrap machine")
}

pub(crate) struct Harness {
    pub(crate) scratch: tempfile::TempDir,
    pub(crate) driver: Arc<BwrapDriver>,
    pub(crate) base: BaseLayer,
}

pub(crate) async fn harness() -> Harness {
    let scratch = tempfile::Builder::new()
        .prefix("flotilla-sandbox-test")
        .tempdir()
        .expect("scratch dir");
    let driver =
        Arc::new(BwrapDriver::new(BwrapConfig::new(scratch.path().join("node-data/machines"))).expect("driver"));
    let base = driver.prepare_base(BaseImage::Host).await.expect("host base image");
    Harness { scratch, driver, base }
}

impl Harness {
    /// A checkout with one file named after it.
    pub(crate) fn workspace(&self, name: &str) -> PathBuf {
        let path = self.scratch.path().join("checkouts").join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join(format!("{name}-only.txt")), format!("{name}\n")).unwrap();
        path
    }

    pub(crate) fn spec(&self, name: &str, workspace: &Path) -> MachineSpec {
        let mut spec = MachineSpec::new(name, self.base.clone(), workspace);
        spec.limits = MachineLimits {
            memory_bytes: 256 * MIB,
            max_processes: 128,
            disk_bytes: 64 * MIB,
            command_timeout_ms: 60_000,
            ..MachineLimits::default()
        };
        spec
    }

    pub(crate) async fn machine(&self, name: &str) -> MachineHandle {
        let workspace = self.workspace(name);
        self.driver
            .create(self.spec(name, &workspace))
            .await
            .expect("create machine")
    }

    pub(crate) async fn run(&self, machine: &MachineHandle, command: &str) -> ExecOutput {
        self.driver
            .exec(machine, ExecRequest::new(command))
            .await
            .expect("exec")
    }

    pub(crate) async fn run_ok(&self, machine: &MachineHandle, command: &str) -> String {
        let output = self.run(machine, command).await;
        assert!(
            output.success(),
            "{command:?} failed: {} {:?}",
            output.outcome(),
            output.last_lines(10)
        );
        output.stdout_text()
    }

    pub(crate) fn machines_dir(&self) -> PathBuf {
        self.driver.root().join("machines")
    }
}

/// Polls `condition` until it returns `Some`, or fails naming what was awaited.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + CONDITION_DEADLINE;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {CONDITION_DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the last `lines` lines of `machine`'s terminal `name` contain `needle`, and
/// answers them.
pub(crate) async fn wait_for_terminal(
    driver: &Arc<BwrapDriver>,
    machine: &MachineHandle,
    name: &str,
    lines: usize,
    needle: &str,
) -> String {
    wait_for(&format!("{needle:?} in the terminal {name:?}"), || async move {
        let text = driver.read_terminal(machine, name, lines).await.ok()?;
        text.contains(needle).then_some(text)
    })
    .await
}

/// Reads what an attached terminal prints until `done` holds for all of it, and answers it;
/// fails, showing what was read, when the attach ends first or the deadline passes.
pub(crate) async fn read_pty_until(session: &PtySession, what: &str, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + CONDITION_DEADLINE;
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(count) = tokio::time::timeout(left, session.read(&mut buffer)).await else {
            panic!("the attach never showed {what}: {:?}", String::from_utf8_lossy(&seen));
        };
        let count = count.unwrap();
        assert!(count > 0, "attach ended early: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..count]);
    }
    seen
}

/// [`read_pty_until`] the terminal shows `needle`.
pub(crate) async fn read_pty_until_text(session: &PtySession, needle: &str) -> Vec<u8> {
    read_pty_until(session, &format!("{needle:?}"), |seen| {
        String::from_utf8_lossy(seen).contains(needle)
    })
    .await
}

#[tokio::test]
async fn a_command_runs_in_the_workspace_as_root_without_capabilities() {
    let harness = harness().await;
    let machine = harness.machine("basic").await;
    let output = harness
        .run_ok(
            &machine,
            "pwd; id -u; cat basic-only.txt; grep CapEff /proc/self/status; hostname",
        )
        .await;
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "/workspace");
    assert_eq!(lines[1], "0");
    assert_eq!(lines[2], "basic");
    assert_eq!(lines[3], "CapEff:\t0000000000000000");
    assert_eq!(lines[4], "basic");
    let elsewhere = harness
        .driver
        .exec(&machine, ExecRequest::new("pwd").with_cwd("/tmp"))
        .await
        .unwrap();
    assert_eq!(elsewhere.stdout_text(), "/tmp\n");
    let nowhere = harness
        .driver
        .exec(&machine, ExecRequest::new("pwd").with_cwd("/missing"))
        .await
        .unwrap();
    assert_eq!(nowhere.exit_code, Some(126));
    let with_env = ExecRequest::new("echo $GREETING $HOME").with_env("GREETING", "hello");
    assert_eq!(
        harness.driver.exec(&machine, with_env).await.unwrap().stdout_text(),
        "hello /root\n"
    );
    let failing = harness.run(&machine, "echo out; echo err >&2; exit 3").await;
    assert_eq!(failing.exit_code, Some(3));
    assert_eq!(failing.stdout_text(), "out\n");
    assert_eq!(failing.stderr_text(), "err\n");
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn isolation_hides_node_data_other_machines_and_node_processes() {
    let harness = harness().await;
    let node_data = harness.scratch.path().join("node-data");
    std::fs::write(node_data.join("secret.txt"), "node secret\n").unwrap();
    let first = harness.machine("first").await;
    let second = harness.machine("second").await;
    harness
        .run_ok(&second, "echo second-secret > /workspace/written-by-second")
        .await;

    let secret = node_data.join("secret.txt");
    let probes = [
        format!("cat {}", secret.display()),
        format!("ls {}", node_data.display()),
        format!("ls {}", second.workspace_path().display()),
        format!("ls {}", harness.machines_dir().display()),
        "ls /workspace/second-only.txt".to_string(),
        "ls /workspace/written-by-second".to_string(),
        "cat /etc/shadow".to_string(),
        format!("kill -0 {}", std::process::id()),
        "touch /usr/flotilla-probe".to_string(),
    ];
    for probe in &probes {
        let output = harness.run(&first, probe).await;
        assert!(
            !output.success(),
            "{probe:?} should fail inside a machine but printed {:?}",
            output.stdout_text()
        );
    }

    // Only the machine's own processes exist: its init, its sleep and this command's shells.
    let processes = harness
        .run_ok(&first, "for p in /proc/[0-9]*; do cat $p/comm; done")
        .await;
    let test_comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert!(!processes.lines().any(|comm| comm == test_comm.trim()), "{processes}");
    assert!(processes.lines().count() <= 6, "unexpected processes: {processes}");

    // Writes to the base layer land in the machine's own upper layer.
    harness
        .run_ok(&first, "echo mine > /etc/flotilla-probe && cat /etc/flotilla-probe")
        .await;
    assert!(!harness.base.rootfs.join("etc/flotilla-probe").exists());
    assert!(!Path::new("/etc/flotilla-probe").exists());
    assert!(!harness.run(&second, "cat /etc/flotilla-probe").await.success());

    // No network but loopback.
    let interfaces = harness.run_ok(&first, "tail -n +3 /proc/net/dev | cut -d: -f1").await;
    assert_eq!(interfaces.split_whitespace().collect::<Vec<_>>(), vec!["lo"]);

    harness.driver.destroy(&first).await.unwrap();
    harness.driver.destroy(&second).await.unwrap();
}

#[tokio::test]
async fn workspace_overlay_keeps_the_checkout_unchanged() {
    let harness = harness().await;
    let workspace = harness.workspace("overlay");
    let machine = harness
        .driver
        .create(harness.spec("overlay", &workspace))
        .await
        .unwrap();
    harness
        .run_ok(
            &machine,
            "echo changed > overlay-only.txt && echo new > new.txt && rm -f nothing",
        )
        .await;
    assert_eq!(
        std::fs::read_to_string(workspace.join("overlay-only.txt")).unwrap(),
        "overlay\n"
    );
    assert!(!workspace.join("new.txt").exists());
    assert_eq!(
        std::fs::read_to_string(machine.workspace_path().join("new.txt")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(machine.workspace_path().join("overlay-only.txt")).unwrap(),
        "changed\n"
    );
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn bind_workspace_writes_through_to_the_checkout() {
    let harness = harness().await;
    let workspace = harness.workspace("bound");
    let mut spec = harness.spec("bound", &workspace);
    spec.workspace_mode = WorkspaceMode::Bind;
    let machine = harness.driver.create(spec).await.unwrap();
    harness.run_ok(&machine, "echo kept > kept.txt").await;
    harness.driver.destroy(&machine).await.unwrap();
    assert_eq!(std::fs::read_to_string(workspace.join("kept.txt")).unwrap(), "kept\n");
}

#[tokio::test]
async fn destroy_and_drop_remove_mounts_cgroups_and_files() {
    let harness = harness().await;
    let machine = harness.machine("teardown").await;
    let id = machine.id().to_string();
    let cgroup = bwrap_machine(&machine).cgroup_name().to_string();
    let dir = bwrap_machine(&machine).dir().to_path_buf();
    harness.run_ok(&machine, "sleep 1000 >/dev/null 2>&1 &").await;
    harness.driver.destroy(&machine).await.unwrap();
    harness.driver.destroy(&machine).await.unwrap();
    assert!(!dir.exists());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&id), "a mount of {id} is left");
    assert!(
        cgroup_released(&harness.driver, &cgroup),
        "the cgroup of {id} is left in use"
    );
    let error = harness
        .driver
        .exec(&machine, ExecRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(error, SandboxError::MachineStopped { .. }), "{error}");

    let dropped = harness.machine("dropped").await;
    let (dropped_cgroup, dropped_dir) = (
        bwrap_machine(&dropped).cgroup_name().to_string(),
        bwrap_machine(&dropped).dir().to_path_buf(),
    );
    drop(dropped);
    assert!(!dropped_dir.exists());
    assert!(cgroup_released(&harness.driver, &dropped_cgroup));
}

#[tokio::test]
async fn exec_timeout_kills_the_whole_command() {
    let harness = harness().await;
    let machine = harness.machine("timeout").await;
    let started = Instant::now();
    let request = ExecRequest::new("sleep 1000 & sleep 1000; echo never").with_timeout_ms(300);
    let output = harness.driver.exec(&machine, request).await.unwrap();
    assert!(output.timed_out);
    assert_eq!(output.killed_reason, Some(KilledReason::Timeout { limit_ms: 300 }));
    assert!(started.elapsed() < CONDITION_DEADLINE);
    assert!(!output.stdout_text().contains("never"));
    let left = harness
        .run_ok(&machine, "for p in /proc/[0-9]*; do cat $p/cmdline; echo; done")
        .await;
    assert!(
        !left.contains("sleep\u{0}1000"),
        "a timed-out process survived: {left:?}"
    );
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn output_is_capped_and_says_so() {
    let harness = harness().await;
    let machine = harness.machine("output").await;
    let request = ExecRequest::new("head -c 100000 /dev/zero | tr '\\0' a; echo END").with_max_output_bytes(1000);
    let output = harness.driver.exec(&machine, request).await.unwrap();
    assert!(output.success());
    assert_eq!(output.stdout.len(), 1000);
    assert!(output.stdout_truncated);
    assert!(!output.stderr_truncated);
    assert_eq!(output.omitted_bytes, 100_004 - 1000);
    assert!(output.stdout_text().ends_with("aaEND\n"), "the tail is kept");
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn a_fork_bomb_is_contained_while_another_machine_runs() {
    let harness = harness().await;
    let bomb_workspace = harness.workspace("bomb");
    let mut spec = harness.spec("bomb", &bomb_workspace);
    spec.limits.max_processes = 64;
    let bomb = harness.driver.create(spec).await.unwrap();
    let bystander = harness.machine("bystander").await;
    // Forks until the pids limit refuses, forever: only the time limit ends it.
    let bomb_request =
        ExecRequest::new("bomb() { bomb | bomb & }; while true; do bomb 2>/dev/null; done").with_timeout_ms(3_000);
    let (bombed, alive) = tokio::join!(harness.driver.exec(&bomb, bomb_request), async {
        // The bystander keeps working while the bomb goes off.
        let mut outputs = Vec::new();
        for _ in 0..5 {
            outputs.push(harness.run_ok(&bystander, "echo alive").await);
        }
        outputs
    });
    let bombed = bombed.unwrap();
    // The shell either dies on its own failed fork or runs into the time limit.
    assert!(!bombed.success(), "{bombed:?}");
    assert!(alive.iter().all(|output| output == "alive\n"));
    let count = harness.run_ok(&bomb, "ls -d /proc/[0-9]* | wc -l").await;
    assert!(
        count.trim().parse::<u32>().unwrap() < 10,
        "bomb processes survived: {count}"
    );
    harness.driver.destroy(&bomb).await.unwrap();
    harness.driver.destroy(&bystander).await.unwrap();
}

#[tokio::test]
async fn a_memory_hog_is_killed_by_the_memory_limit() {
    let harness = harness().await;
    let workspace = harness.workspace("hog");
    let mut spec = harness.spec("hog", &workspace);
    spec.limits.memory_bytes = 64 * MIB;
    let machine = harness.driver.create(spec).await.unwrap();
    // `tail -n 1` keeps the whole (newline-free) last line in memory.
    let output = harness
        .run(&machine, "head -c 1000000000 /dev/zero | tail -n 1 >/dev/null")
        .await;
    assert_eq!(
        output.killed_reason,
        Some(KilledReason::OutOfMemory { limit_bytes: 64 * MIB }),
        "{output:?}"
    );
    assert!(output.outcome().contains("memory limit"));
    assert_eq!(harness.run_ok(&machine, "echo still-here").await, "still-here\n");
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn a_disk_filler_is_stopped_by_the_disk_limit() {
    let harness = harness().await;
    let workspace = harness.workspace("filler");
    let mut spec = harness.spec("filler", &workspace);
    spec.limits.disk_bytes = 16 * MIB;
    let machine = harness.driver.create(spec).await.unwrap();
    for target in ["/tmp/fill", "/workspace/fill"] {
        let output = harness
            .run(&machine, &format!("dd if=/dev/zero of={target} bs=1M count=64"))
            .await;
        assert!(!output.success(), "filling {target} should fail");
        assert!(
            output.stderr_text().contains("No space left on device"),
            "{}",
            output.stderr_text()
        );
    }
    harness
        .run_ok(&machine, "rm /tmp/fill /workspace/fill && echo freed")
        .await;
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn an_unknown_user_is_a_clear_error_and_leaves_nothing() {
    let harness = harness().await;
    let workspace = harness.workspace("nouser");
    let mut spec = harness.spec("nouser", &workspace);
    spec.user = Some("no-such-user".to_string());
    let error = match harness.driver.create(spec).await {
        Ok(_) => panic!("a machine for an unknown user was created"),
        Err(error) => error,
    };
    assert_eq!(
        error.to_string(),
        "user \"no-such-user\" does not exist in base image host (looked in its /etc/passwd)"
    );
    assert_eq!(std::fs::read_dir(harness.machines_dir()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_named_user_runs_commands_as_itself() {
    let harness = harness().await;
    let workspace = harness.workspace("nobody");
    let mut spec = harness.spec("nobody", &workspace);
    spec.user = Some("nobody".to_string());
    let machine = harness.driver.create(spec).await.unwrap();
    let output = harness
        .run_ok(&machine, "id -un; touch /workspace/by-nobody && echo wrote")
        .await;
    assert_eq!(output, "nobody\nwrote\n");
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn the_egress_socket_is_bound_in() {
    let harness = harness().await;
    let socket = harness.scratch.path().join("egress.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let workspace = harness.workspace("egress");
    let mut spec = harness.spec("egress", &workspace);
    spec.egress_socket = Some(socket);
    let machine = harness.driver.create(spec).await.unwrap();
    harness.run_ok(&machine, &format!("test -S {EGRESS_SOCKET_PATH}")).await;
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn a_captured_layer_carries_root_and_workspace_changes() {
    let harness = harness().await;
    let workspace = harness.workspace("capture");
    let first = harness
        .driver
        .create(harness.spec("capture", &workspace))
        .await
        .unwrap();
    harness
        .run_ok(
            &first,
            "mkdir -p /opt/tool && echo tool > /opt/tool/v && mkdir deps && echo d > deps/d",
        )
        .await;
    let dest = harness.scratch.path().join("layer");
    let layer = harness.driver.capture_layer(&first, &dest).await.unwrap();
    assert!(matches!(
        harness.driver.exec(&first, ExecRequest::new("true")).await,
        Err(SandboxError::MachineStopped { .. })
    ));
    harness.driver.destroy(&first).await.unwrap();
    let mut spec = harness.spec("from-layer", &workspace);
    spec.install_layer = Some(layer);
    let second = harness.driver.create(spec).await.unwrap();
    assert_eq!(
        harness.run_ok(&second, "cat /opt/tool/v deps/d capture-only.txt").await,
        "tool\nd\ncapture\n"
    );
    harness.driver.destroy(&second).await.unwrap();
}

#[tokio::test]
async fn a_captured_layer_keeps_no_setuid_bit_capability_or_special_file() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    let harness = harness().await;
    let workspace = harness.workspace("privilege");
    let machine = harness
        .driver
        .create(harness.spec("privilege", &workspace))
        .await
        .unwrap();
    harness
        .run_ok(
            &machine,
            "mkdir -p /opt && cp /bin/true /opt/x && chmod u+s,g+s /opt/x && mkfifo /opt/fifo && \
             cp /bin/true setuid-in-workspace && chmod u+s setuid-in-workspace",
        )
        .await;
    // A machine has no capability to set file capabilities or make device nodes; these stand for
    // what a weaker sandbox might let through, written into the machine's upper layer directly.
    let upper_opt = bwrap_machine(&machine).disk_path().join("root-upper/opt");
    let has_setcap = std::process::Command::new("setcap")
        .args(["cap_net_raw+ep"])
        .arg(upper_opt.join("x"))
        .status()
        .is_ok_and(|status| status.success());
    let mknod = |name: &str, major: &str, minor: &str| {
        let status = std::process::Command::new("mknod")
            .arg(upper_opt.join(name))
            .args(["c", major, minor])
            .status()
            .unwrap();
        assert!(status.success(), "mknod {name}");
    };
    mknod("null", "1", "3");
    // A whiteout: records a file deleted from a lower layer and must survive the capture.
    mknod("whiteout", "0", "0");

    let dest = harness.scratch.path().join("layer");
    let layer = harness.driver.capture_layer(&machine, &dest).await.unwrap();
    harness.driver.destroy(&machine).await.unwrap();

    for captured in [
        layer.path.join("root/opt/x"),
        layer.path.join("workspace/setuid-in-workspace"),
    ] {
        let mode = std::fs::symlink_metadata(&captured).unwrap().mode();
        assert_eq!(mode & 0o6000, 0, "{} keeps mode {mode:o}", captured.display());
    }
    assert!(std::fs::symlink_metadata(layer.path.join("root/opt/fifo")).is_err());
    assert!(std::fs::symlink_metadata(layer.path.join("root/opt/null")).is_err());
    let whiteout = std::fs::symlink_metadata(layer.path.join("root/opt/whiteout")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    if has_setcap {
        let capabilities = std::process::Command::new("getcap")
            .arg(layer.path.join("root/opt/x"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&capabilities.stdout).trim(), "");
    }
}

/// The host image's own `/etc/profile` gives a login shell the `PATH` for its user's id and reads
/// `/etc/profile.d`, and starts no program to do it (Debian's ran `id -u`).
#[tokio::test]
async fn the_host_profile_sets_the_path_for_the_user_and_starts_no_program() {
    let harness = harness().await;
    let root = harness.machine("profile-root").await;
    let path = harness.run_ok(&root, "echo \"$PATH\"").await;
    assert_eq!(
        path.trim(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    harness
        .run_ok(
            &root,
            "echo 'export FROM_PROFILE_D=read' > /etc/profile.d/flotilla-test.sh",
        )
        .await;
    assert_eq!(harness.run_ok(&root, "echo \"$FROM_PROFILE_D\"").await.trim(), "read");
    // An `id` first in the PATH a login shell starts with records every run of it.
    let probe = "mkdir -p /tmp/probe && printf '#!/bin/sh\\necho ran >> /tmp/probe/ran\\nexec /usr/bin/id \"$@\"\\n' > /tmp/probe/id \
         && chmod +x /tmp/probe/id && env PATH=/tmp/probe:/usr/bin:/bin sh -lc true && test ! -e /tmp/probe/ran && echo none";
    assert_eq!(harness.run_ok(&root, probe).await.trim(), "none");

    let workspace = harness.workspace("profile-user");
    let mut spec = harness.spec("profile-user", &workspace);
    spec.user = Some("nobody".to_string());
    let user = harness.driver.create(spec).await.expect("create machine");
    let path = harness.run_ok(&user, "echo \"$PATH\"").await;
    assert_eq!(path.trim(), "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games");
}

/// Counts installs by counting the commands the install layer cache runs through the driver.
struct CountingDriver {
    inner: Arc<BwrapDriver>,
    execs: AtomicUsize,
}

#[async_trait]
impl MachineDriver for CountingDriver {
    async fn prepare_base(&self, image: BaseImage) -> Result<BaseLayer> {
        self.inner.prepare_base(image).await
    }

    async fn create(&self, spec: MachineSpec) -> Result<MachineHandle> {
        self.inner.create(spec).await
    }

    async fn exec(&self, machine: &MachineHandle, request: ExecRequest) -> Result<ExecOutput> {
        self.execs.fetch_add(1, Ordering::SeqCst);
        self.inner.exec(machine, request).await
    }

    async fn capture_layer(&self, machine: &MachineHandle, dest: &Path) -> Result<Layer> {
        self.inner.capture_layer(machine, dest).await
    }

    async fn destroy(&self, machine: &MachineHandle) -> Result<()> {
        self.inner.destroy(machine).await
    }

    async fn destroy_all(&self) -> Result<usize> {
        self.inner.destroy_all().await
    }

    async fn start_terminals(&self, machine: &MachineHandle, terminals: &[Terminal]) -> Result<()> {
        self.inner.start_terminals(machine, terminals).await
    }

    async fn read_terminal(&self, machine: &MachineHandle, name: &str, max_lines: usize) -> Result<String> {
        self.inner.read_terminal(machine, name, max_lines).await
    }

    async fn open_pty(
        &self,
        machine: &MachineHandle,
        terminal: Option<&str>,
        read_only: bool,
        size: PtySize,
    ) -> Result<PtySession> {
        self.inner.open_pty(machine, terminal, read_only, size).await
    }
}

/// Two branches' checkouts with different lockfiles (different trees) never share a layer; a
/// checkout of the same tree with the same config does.
#[tokio::test]
async fn install_layers_are_per_tree_of_the_checkout() {
    let harness = harness().await;
    let cache = InstallLayerCache::new(harness.driver.clone(), harness.driver.install_layers_dir()).unwrap();
    let config = EnvironmentConfig {
        install: Some("mkdir -p /opt/deps && cp /workspace/lock.txt /opt/deps/lock".to_string()),
        ..EnvironmentConfig::default()
    };
    let mut layers = Vec::new();
    for (branch, tree) in [
        ("main", "tree-main"),
        ("poisoned", "tree-poisoned"),
        ("main-again", "tree-main"),
    ] {
        let checkout = harness.workspace(branch);
        let lock = if tree == "tree-main" {
            "lock-main"
        } else {
            "lock-poisoned"
        };
        std::fs::write(checkout.join("lock.txt"), lock).unwrap();
        let request = InstallRequest::new("repo", tree, config.clone(), harness.base.clone(), &checkout);
        let install_layer = cache.get_or_build(&request).await.unwrap();
        let layer = install_layer.layer.unwrap();
        assert_eq!(
            std::fs::read_to_string(layer.root_dir().join("opt/deps/lock")).unwrap(),
            lock,
            "{branch} got a layer installed from another tree"
        );
        layers.push((install_layer.built, layer));
    }
    assert!(layers[0].0 && layers[1].0, "each tree builds its own layer");
    assert_ne!(layers[0].1, layers[1].1);
    assert!(!layers[2].0, "the same tree and config share");
    assert_eq!(layers[2].1, layers[0].1);
}

#[tokio::test]
async fn install_runs_once_for_concurrent_and_later_machines_and_start_runs_every_boot() {
    let harness = harness().await;
    let counting = Arc::new(CountingDriver {
        inner: harness.driver.clone(),
        execs: AtomicUsize::new(0),
    });
    let cache = InstallLayerCache::new(counting.clone(), harness.driver.install_layers_dir()).unwrap();
    let checkout = harness.workspace("repo");
    let config = environment::parse(
        ".flotilla/environment.json",
        r#"{"install": "echo ran >> /workspace/install-count && mkdir -p /opt/deps && echo dep > /opt/deps/v",
            "start": "echo booted >> /tmp/boot-log"}"#,
    )
    .unwrap();
    let request = InstallRequest::new(
        "https://example.com/repo.git",
        "tree-of-the-checkout",
        config.clone(),
        harness.base.clone(),
        &checkout,
    );

    let (first, second) = tokio::join!(cache.get_or_build(&request), cache.get_or_build(&request));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(counting.execs.load(Ordering::SeqCst), 1, "install ran more than once");
    assert!(
        first.built != second.built,
        "exactly one of two concurrent requests builds"
    );
    assert_eq!(first.layer, second.layer);
    let third = cache.get_or_build(&request).await.unwrap();
    assert!(!third.built);
    assert_eq!(counting.execs.load(Ordering::SeqCst), 1);
    let layer = third.layer.unwrap();
    assert_eq!(
        std::fs::read_to_string(layer.workspace_dir().join("install-count")).unwrap(),
        "ran\n"
    );
    assert!(
        !checkout.join("install-count").exists(),
        "install must not write into the checkout"
    );

    for name in ["boot-one", "boot-two"] {
        let mut spec = harness.spec(name, &checkout);
        spec.install_layer = Some(layer.clone());
        let machine = harness.driver.create(spec).await.unwrap();
        boot(harness.driver.as_ref(), &machine, &config).await.unwrap();
        let seen = harness
            .run_ok(&machine, "cat /workspace/install-count /opt/deps/v /tmp/boot-log")
            .await;
        assert_eq!(seen, "ran\ndep\nbooted\n");
        harness.driver.destroy(&machine).await.unwrap();
    }
}

#[tokio::test]
async fn a_failed_install_reports_its_last_lines_and_caches_nothing() {
    let harness = harness().await;
    let cache = InstallLayerCache::new(harness.driver.clone(), harness.driver.install_layers_dir()).unwrap();
    let checkout = harness.workspace("failing");
    let config = EnvironmentConfig {
        install: Some("for i in $(seq 1 30); do echo line$i; done; echo oops >&2; exit 3".to_string()),
        ..EnvironmentConfig::default()
    };
    let request = InstallRequest::new(
        "failing-repo",
        "tree-of-the-checkout",
        config,
        harness.base.clone(),
        &checkout,
    );
    let error = cache.get_or_build(&request).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with("install for failing-repo failed with exit code 3"),
        "{message}"
    );
    assert!(message.contains("line30\noops"), "{message}");
    assert!(message.contains("line12"), "{message}");
    assert!(!message.contains("line11\n"), "only the last 20 lines: {message}");
    assert!(cache.lookup(&request.key()).is_none());
    assert_eq!(
        std::fs::read_dir(cache.root()).unwrap().count(),
        0,
        "nothing is left in the cache"
    );
    assert_eq!(std::fs::read_dir(harness.machines_dir()).unwrap().count(), 0);
}

#[tokio::test]
async fn an_install_that_never_ends_is_killed_at_its_limit() {
    let harness = harness().await;
    let cache = InstallLayerCache::new(harness.driver.clone(), harness.driver.install_layers_dir()).unwrap();
    let checkout = harness.workspace("endless");
    let config = EnvironmentConfig {
        install: Some("echo starting; while true; do sleep 1; done".to_string()),
        ..EnvironmentConfig::default()
    };
    let mut request = InstallRequest::new(
        "endless-repo",
        "tree-of-the-checkout",
        config,
        harness.base.clone(),
        &checkout,
    );
    request.limits.command_timeout_ms = 500;
    let message = cache.get_or_build(&request).await.unwrap_err().to_string();
    assert!(message.contains("killed after the time limit of 500 ms"), "{message}");
    assert!(message.contains("starting"), "{message}");
    assert!(cache.lookup(&request.key()).is_none());
}

#[tokio::test]
async fn a_failing_start_command_fails_the_boot() {
    let harness = harness().await;
    let machine = harness.machine("badstart").await;
    let config = EnvironmentConfig {
        start: Some("echo cannot-start; exit 4".to_string()),
        ..Default::default()
    };
    let message = boot(harness.driver.as_ref(), &machine, &config)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "start command failed with exit code 4; last output lines:\ncannot-start"
    );
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn the_reference_cursor_file_boots_its_terminal() {
    let harness = harness().await;
    let checkout = harness.workspace("cursor");
    std::fs::create_dir_all(checkout.join(".cursor")).unwrap();
    std::fs::write(
        checkout.join(".cursor/environment.json"),
        r#"{
  "snapshot": "POPULATED_FROM_SETTINGS",
  "install": "echo installed > installed.txt",
  "terminals": [
    {
      "name": "Run Next.js",
      "command": "cat installed.txt; sleep 1000"
    }
  ]
}"#,
    )
    .unwrap();
    let (path, config) = environment::load(&checkout).unwrap().unwrap();
    assert!(path.ends_with(".cursor/environment.json"));
    let cache = InstallLayerCache::new(harness.driver.clone(), harness.driver.install_layers_dir()).unwrap();
    let request = InstallRequest::new(
        "cursor-repo",
        "tree-of-the-checkout",
        config.clone(),
        harness.base.clone(),
        &checkout,
    );
    let install_layer = cache.get_or_build(&request).await.unwrap();
    let mut spec = harness.spec("cursor", &checkout);
    spec.install_layer = install_layer.layer;
    let machine = harness.driver.create(spec).await.unwrap();
    let report = boot(harness.driver.as_ref(), &machine, &config).await.unwrap();
    assert_eq!(report.terminals_started, 1);
    wait_for_terminal(&harness.driver, &machine, "Run Next.js", 10, "installed").await;
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
#[ignore = "slow: debootstrap downloads Debian bookworm (minutes, needs the Debian mirror); run with `make sandbox-debian`"]
async fn the_debian_image_builds_and_runs_its_tools() {
    let harness = harness().await;
    let base = harness.driver.prepare_base(BaseImage::Debian).await.unwrap();
    let workspace = harness.workspace("debian");
    let mut spec = harness.spec("debian", &workspace);
    spec.base = base;
    spec.limits.memory_bytes = 1024 * MIB;
    let machine = harness.driver.create(spec).await.unwrap();
    let output = harness
        .run_ok(
            &machine,
            "grep VERSION_CODENAME /etc/os-release; git --version; tmux -V; cc --version | head -1",
        )
        .await;
    assert!(output.contains("bookworm"), "{output}");
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn an_ext4_backed_machine_enforces_its_disk_limit() {
    let scratch = tempfile::Builder::new()
        .prefix("flotilla-sandbox-test")
        .tempdir()
        .unwrap();
    let mut config = BwrapConfig::new(scratch.path().join("machines"));
    config.disk = crate::bwrap::DiskBacking::Ext4Image;
    let driver = BwrapDriver::new(config).unwrap();
    let base = driver.prepare_base(BaseImage::Host).await.unwrap();
    let workspace = scratch.path().join("checkout");
    std::fs::create_dir_all(&workspace).unwrap();
    let mut spec = MachineSpec::new("ext4", base, &workspace);
    spec.limits.disk_bytes = 16 * MIB;
    spec.limits.memory_bytes = 256 * MIB;
    let machine = driver.create(spec).await.unwrap();
    let output = driver
        .exec(
            &machine,
            ExecRequest::new("dd if=/dev/zero of=/var/tmp/fill bs=1M count=64"),
        )
        .await
        .unwrap();
    assert!(
        output.stderr_text().contains("No space left on device"),
        "{}",
        output.stderr_text()
    );
    let dir = bwrap_machine(&machine).dir().to_path_buf();
    driver.destroy(&machine).await.unwrap();
    assert!(!dir.exists());
}

#[tokio::test]
async fn background_processes_survive_success_and_die_with_failure() {
    let harness = harness().await;
    let machine = harness.machine("background").await;
    harness.run_ok(&machine, "sleep 1001 >/dev/null 2>&1 &").await;
    let failed = harness.run(&machine, "sleep 1002 >/dev/null 2>&1 & exit 1").await;
    assert_eq!(failed.exit_code, Some(1));
    let processes = harness
        .run_ok(&machine, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        .await;
    assert!(processes.contains("sleep 1001"), "{processes}");
    assert!(!processes.contains("sleep 1002"), "{processes}");

    // A survivor that keeps printing to the command's stdout is not killed by a closed pipe.
    let ticking = ExecRequest::new("(while true; do echo tick; echo t >> /tmp/ticks; sleep 0.05; done) &");
    let output = harness.driver.exec(&machine, ticking).await.unwrap();
    assert!(output.success());
    let driver = harness.driver.clone();
    wait_for("the background printer to keep running after its command", || {
        let driver = driver.clone();
        let machine = &machine;
        async move {
            let output = driver
                .exec(machine, ExecRequest::new("wc -l < /tmp/ticks"))
                .await
                .ok()?;
            (output.stdout_text().trim().parse::<u32>().ok()? >= 20).then_some(())
        }
    })
    .await;
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn a_machine_that_cannot_start_fails_with_bubblewraps_words() {
    let harness = harness().await;
    let workspace = harness.workspace("no-start");
    let mut spec = harness.spec("no-start", &workspace);
    spec.base
        .host_read_only_binds
        .push(PathBuf::from("/nonexistent-flotilla-bind"));
    let error = match harness.driver.create(spec).await {
        Ok(_) => panic!("a machine bound to a missing host path started"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("bubblewrap exited before the init was ready"), "{error}");
    assert!(error.contains("/nonexistent-flotilla-bind"), "{error}");
}

mod cgroups;
mod terminals;
mod uid_mapping;

pub(crate) use cgroups::{cgroup_exists, cgroup_released};
