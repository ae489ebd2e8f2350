//! The fake driver honours what the tools and the turn loop rely on, without root.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::driver::{
    boot, BaseImage, ExecRequest, KilledReason, MachineDriver, MachineHandle, MachineSpec, WorkspaceMode,
};
use crate::environment::{EnvironmentConfig, Terminal};
use crate::error::SandboxError;
use crate::install_layer::{InstallLayerCache, InstallRequest};
use crate::pty::PtySize;

use super::{map_workspace_paths, FakeDriver, FakeMachine};

/// Deadline for conditions a healthy fake machine meets in milliseconds.
const CONDITION_DEADLINE: Duration = Duration::from_secs(10);

struct Harness {
    scratch: tempfile::TempDir,
    driver: Arc<FakeDriver>,
}

fn harness() -> Harness {
    let scratch = tempfile::Builder::new().prefix("flotilla-fake-test").tempdir().unwrap();
    let driver = Arc::new(FakeDriver::new(scratch.path().join("machines")).unwrap());
    Harness { scratch, driver }
}

impl Harness {
    fn checkout(&self, name: &str) -> PathBuf {
        let path = self.scratch.path().join("checkouts").join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("README"), format!("{name}\n")).unwrap();
        path
    }

    async fn machine(&self, name: &str) -> (MachineHandle, PathBuf) {
        let checkout = self.checkout(name);
        let base = self.driver.prepare_base(BaseImage::Host).await.unwrap();
        let machine = self
            .driver
            .create(MachineSpec::new(name, base, &checkout))
            .await
            .unwrap();
        (machine, checkout)
    }

    async fn run(&self, machine: &MachineHandle, command: &str) -> crate::driver::ExecOutput {
        self.driver.exec(machine, ExecRequest::new(command)).await.unwrap()
    }
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONDITION_DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn workspace_paths_are_mapped_only_as_whole_paths() {
    let mapped = |text: &str| map_workspace_paths(text, "/tmp/m/ws");
    assert_eq!(mapped("/workspace"), "/tmp/m/ws");
    assert_eq!(
        mapped("cd /workspace/a && ls /workspace"),
        "cd /tmp/m/ws/a && ls /tmp/m/ws"
    );
    assert_eq!(mapped("/workspace|/workspace/*)"), "/tmp/m/ws|/tmp/m/ws/*)");
    assert_eq!(mapped("\"${resolved#/workspace/}\""), "\"${resolved#/tmp/m/ws/}\"");
    assert_eq!(
        mapped("/tmp/workspace /workspace-other /workspaces"),
        "/tmp/workspace /workspace-other /workspaces"
    );
}

#[tokio::test]
async fn commands_run_in_the_workspace_with_the_request_env_and_cwd() {
    let harness = harness();
    let (machine, checkout) = harness.machine("basics").await;
    let output = harness.run(&machine, "pwd; cat README; echo $FLOTILLA_MACHINE").await;
    assert!(output.success(), "{output:?}");
    let text = output.stdout_text();
    assert!(text.starts_with("/workspace\nbasics\n"), "{text}");
    assert!(text.trim_end().ends_with(machine.id()), "{text}");

    std::fs::create_dir(machine.workspace_path().join("sub")).unwrap();
    let request = ExecRequest::new("pwd; echo \"$GREETING\"")
        .with_cwd("/workspace/sub")
        .with_env("GREETING", "hello");
    let output = harness.driver.exec(&machine, request).await.unwrap();
    assert_eq!(output.stdout_text(), "/workspace/sub\nhello\n");

    let failing = harness.run(&machine, "echo out; echo err >&2; exit 3").await;
    assert_eq!(failing.exit_code, Some(3));
    assert_eq!(failing.stderr_text(), "err\n");

    // The overlay copy takes the writes; the checkout stays as it was.
    harness.run(&machine, "echo new > /workspace/new.txt").await;
    assert!(machine.workspace_path().join("new.txt").exists());
    assert!(!checkout.join("new.txt").exists());
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn a_bound_workspace_writes_through_and_survives_destroy() {
    let harness = harness();
    let checkout = harness.checkout("bound");
    let base = harness.driver.prepare_base(BaseImage::Host).await.unwrap();
    let mut spec = MachineSpec::new("bound", base, &checkout);
    spec.workspace_mode = WorkspaceMode::Bind;
    let machine = harness.driver.create(spec).await.unwrap();
    harness.run(&machine, "echo kept > kept.txt").await;
    harness.driver.destroy(&machine).await.unwrap();
    assert_eq!(std::fs::read_to_string(checkout.join("kept.txt")).unwrap(), "kept\n");
}

#[tokio::test]
async fn the_time_limit_kills_the_whole_command_and_output_is_capped() {
    let harness = harness();
    let (machine, _) = harness.machine("limits").await;
    let started = Instant::now();
    let request = ExecRequest::new("sleep 30 & sleep 30; echo never").with_timeout_ms(300);
    let output = harness.driver.exec(&machine, request).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(output.killed_reason, Some(KilledReason::Timeout { limit_ms: 300 }));
    assert!(output.timed_out && !output.success());

    let request = ExecRequest::new("seq 1 10000").with_max_output_bytes(100);
    let output = harness.driver.exec(&machine, request).await.unwrap();
    assert!(output.stdout_truncated);
    assert_eq!(output.stdout.len(), 100);
    assert!(output.stdout_text().starts_with("1\n2\n"));
    assert!(output.stdout_text().ends_with("10000\n"));
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
// Unsafe: kill(pid, 0) asks whether a process still exists; std cannot.
#[allow(unsafe_code)]
async fn destroy_stops_commands_and_removes_the_machine() {
    let harness = harness();
    let (machine, _) = harness.machine("teardown").await;
    let dir = harness.driver.machine(&machine).unwrap().dir().to_path_buf();
    let output = harness.run(&machine, "sleep 1000 >/dev/null 2>&1 & echo $!").await;
    let pid: i32 = output.stdout_text().trim().parse().unwrap();
    harness.driver.destroy(&machine).await.unwrap();
    harness.driver.destroy(&machine).await.unwrap();
    assert!(!dir.exists());
    // SAFETY: signal 0 only asks whether the process exists.
    wait_for("the background process to die", || unsafe { libc::kill(pid, 0) } != 0).await;
    let error = harness
        .driver
        .exec(&machine, ExecRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(error, SandboxError::MachineStopped { .. }), "{error}");

    let (dropped, _) = harness.machine("dropped").await;
    let dropped_dir = dropped.downcast_ref::<FakeMachine>().unwrap().dir().to_path_buf();
    drop(dropped);
    assert!(!dropped_dir.exists());
}

#[tokio::test]
async fn terminals_are_readable_and_attachable() {
    let harness = harness();
    let (machine, _) = harness.machine("terminals").await;
    let config = EnvironmentConfig {
        start: Some("echo started > started.txt".to_string()),
        terminals: vec![
            Terminal::new("counter", "for i in 1 2 3; do echo line $i; done; pwd; sleep 1000"),
            Terminal::new("idle", "sleep 1000"),
        ],
        ..EnvironmentConfig::default()
    };
    let report = boot(harness.driver.as_ref(), &machine, &config).await.unwrap();
    assert_eq!(report.terminals_started, 2);
    assert!(machine.workspace_path().join("started.txt").exists());
    let driver = harness.driver.clone();
    let handle = machine.clone();
    let deadline = Instant::now() + CONDITION_DEADLINE;
    loop {
        let text = driver.read_terminal(&handle, "counter", 2).await.unwrap();
        if text == "line 3\n/workspace" {
            break;
        }
        assert!(Instant::now() < deadline, "terminal shows {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = harness.driver.read_terminal(&machine, "missing", 5).await.unwrap_err();
    assert!(matches!(error, SandboxError::UnknownTerminal { .. }), "{error}");
    let error = harness
        .driver
        .start_terminals(&machine, &config.terminals)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("already has its terminals"), "{error}");

    let session = harness
        .driver
        .open_pty(&machine, Some("counter"), true, PtySize::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("line 2") {
        let count = tokio::time::timeout(CONDITION_DEADLINE, session.read(&mut buffer))
            .await
            .expect("the viewer shows the terminal")
            .unwrap();
        assert!(count > 0, "the viewer ended early");
        seen.extend_from_slice(&buffer[..count]);
    }
    harness.driver.destroy(&machine).await.unwrap();
}

#[tokio::test]
async fn an_install_layer_is_captured_and_stacked_under_later_machines() {
    let harness = harness();
    let checkout = harness.checkout("install-layer");
    let base = harness.driver.prepare_base(BaseImage::Host).await.unwrap();
    let cache = InstallLayerCache::new(harness.driver.clone(), harness.driver.install_layers_dir()).unwrap();
    let config = EnvironmentConfig {
        install: Some("mkdir -p deps && echo 1 > deps/v && echo home > \"$HOME/installed\"".to_string()),
        ..EnvironmentConfig::default()
    };
    let request = InstallRequest::new("repo", "tree-of-the-checkout", config.clone(), base.clone(), &checkout);
    let install_layer = cache.get_or_build(&request).await.unwrap();
    assert!(install_layer.built);
    assert!(!cache.get_or_build(&request).await.unwrap().built);
    assert!(!checkout.join("deps").exists(), "the install wrote into the checkout");

    let mut spec = MachineSpec::new("stacked", base, &checkout);
    spec.install_layer = install_layer.layer;
    let machine = harness.driver.create(spec).await.unwrap();
    let output = harness.run(&machine, "cat deps/v \"$HOME/installed\" README").await;
    assert_eq!(output.stdout_text(), "1\nhome\ninstall-layer\n");
    harness.driver.destroy(&machine).await.unwrap();
}
