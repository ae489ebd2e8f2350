//! A command that enters a machine from the node's own child holds exactly what one that entered
//! through `nsenter` and `setpriv` held: the same ids, groups, capability sets, `no_new_privs`,
//! system-call filter and namespaces (the init's), for the machine's root and for a named user.

use std::collections::BTreeMap;
use std::ffi::CString;

use crate::cgroup::Leaf;
use crate::driver::{ExecRequest, MachineDriver};
use crate::machine_tests::{bwrap_machine, harness};

use super::machine::BwrapMachine;
use super::WORKSPACE_DIR;

/// The argv that entered the machine through `nsenter` and `setpriv`, as its user, with no
/// capabilities, in the init's directory (`/workspace`).
fn nsenter_argv(machine: &BwrapMachine, argv: &[&str]) -> Vec<String> {
    let mut full = vec!["/usr/bin/nsenter".to_string(), format!("--target={}", machine.init_pid)];
    full.extend(
        [
            "--user", "--mount", "--pid", "--ipc", "--uts", "--net", "--cgroup", "--root", "--wd",
        ]
        .map(String::from),
    );
    if machine.uid != 0 {
        full.push(format!("--setuid={}", machine.uid));
        full.push(format!("--setgid={}", machine.gid));
    }
    full.extend(["--", "/usr/bin/setpriv"].map(String::from));
    if machine.uid == 0 {
        // Root inside the user namespace would still hold every capability there.
        full.extend(["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"].map(String::from));
    }
    full.extend(["--no-new-privs", "--"].map(String::from));
    full.extend(argv.iter().map(|argument| argument.to_string()));
    full
}

const NAMESPACES: [&str; 7] = ["user", "mnt", "pid", "ipc", "uts", "net", "cgroup"];

/// Prints what a process holds: its status lines that describe privilege, its namespaces, its
/// directory and root, and whether its PID is one of the machine's (small) ones.
const PROBE: &str = "grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|Seccomp_filters):' \
     /proc/self/status; for ns in user mnt pid ipc uts net cgroup; do echo \"ns-$ns: $(readlink /proc/self/ns/$ns)\"; done; \
     echo \"cwd: $(pwd)\"; echo \"root: $(ls -di / | cut -d' ' -f1)\"; echo \"shell-pid-small: $(test $$ -lt 1000 && echo yes)\"";

fn fields(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

/// The probe through the former path: `nsenter` and `setpriv`, spawned as exec spawned them
/// (a session, the command's leaf cgroup) but without the system-call filter, which refuses the
/// `setns` nsenter makes (the former path installed it before nsenter ran).
// Unsafe: pre_exec, as the former exec path did.
#[allow(unsafe_code)]
fn probe_through_nsenter(machine: &BwrapMachine) -> BTreeMap<String, String> {
    use std::os::unix::process::CommandExt;
    let argv = nsenter_argv(machine, &["/bin/sh", "-lc", PROBE]);
    let mut command = std::process::Command::new(&argv[0]);
    command.args(&argv[1..]).env_clear();
    for (key, value) in &machine.base_env {
        command.env(key, value);
    }
    let leaf = machine.cgroup.leaf("probe").expect("probe leaf");
    let procs_files: Vec<CString> = leaf.procs_files();
    // SAFETY: as in the former exec path: async-signal-safe calls only.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            Leaf::join_current_process(&procs_files)
        });
    }
    let output = command.output().expect("nsenter runs");
    assert!(output.status.success(), "{output:?}");
    fields(&String::from_utf8_lossy(&output.stdout))
}

/// What the probe must show whichever way it entered (the filter aside, see
/// [`probe_through_nsenter`]).
fn assert_contained(probe: &BTreeMap<String, String>, machine: &BwrapMachine, root: bool) {
    assert_eq!(probe["NoNewPrivs"], "1", "{probe:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(probe[set], "0000000000000000", "{set}: {probe:?}");
    }
    if root {
        assert_eq!(probe["CapBnd"], "0000000000000000", "{probe:?}");
        assert_eq!(probe["Uid"], "0\t0\t0\t0", "{probe:?}");
    }
    assert_eq!(probe["Groups"], "", "{probe:?}");
    assert_eq!(probe["cwd"], WORKSPACE_DIR);
    assert_eq!(probe["shell-pid-small"], "yes", "{probe:?}");
    for namespace in NAMESPACES {
        let init = std::fs::read_link(format!("/proc/{}/ns/{namespace}", machine.init_pid)).expect("init namespace");
        assert_eq!(
            probe[&format!("ns-{namespace}")],
            init.display().to_string(),
            "{namespace} namespace: {probe:?}"
        );
    }
}

async fn compare(user: Option<&str>) {
    let harness = harness().await;
    let name = user.unwrap_or("root");
    let workspace = harness.workspace(name);
    let mut spec = harness.spec(name, &workspace);
    spec.user = user.map(str::to_string);
    let handle = harness.driver.create(spec).await.expect("create machine");
    let machine = bwrap_machine(&handle);
    let output = harness
        .driver
        .exec(&handle, ExecRequest::new(PROBE))
        .await
        .expect("exec");
    assert!(output.success(), "{output:?}");
    let entered = fields(&output.stdout_text());
    let former = tokio::task::spawn_blocking({
        let handle = handle.clone();
        move || probe_through_nsenter(bwrap_machine(&handle))
    })
    .await
    .expect("nsenter probe");
    assert_contained(&entered, machine, user.is_none());
    assert_contained(&former, machine, user.is_none());
    // The filter, installed last: the machine's two programs on top of the init's, which the
    // probe inherits from nothing (it was born outside the machine).
    assert_eq!(entered["Seccomp"], "2", "{entered:?}");
    assert_eq!(entered["Seccomp_filters"], "2", "{entered:?}");
    let without_filter = |probe: &BTreeMap<String, String>| {
        let mut probe = probe.clone();
        probe.retain(|key, _| !key.starts_with("Seccomp"));
        probe
    };
    assert_eq!(
        without_filter(&entered),
        without_filter(&former),
        "entered directly (left) and through nsenter and setpriv (right)"
    );
    harness.driver.destroy(&handle).await.expect("destroy");
}

#[tokio::test]
async fn the_machine_root_enters_holding_what_nsenter_and_setpriv_left() {
    compare(None).await;
}

#[tokio::test]
async fn a_named_user_enters_holding_what_nsenter_and_setpriv_left() {
    compare(Some("nobody")).await;
}

#[tokio::test]
async fn a_machine_whose_init_was_killed_is_entered_by_no_command() {
    let harness = harness().await;
    let handle = harness.machine("init-killed").await;
    let machine = bwrap_machine(&handle);
    assert!(
        machine.open_init_pidfd().is_ok(),
        "a running machine's init takes a pidfd"
    );
    let init_pid = machine.init_pid();
    // SAFETY: a signal to the machine's init, a process of the test's own making.
    #[allow(unsafe_code)]
    let killed = unsafe { libc::kill(init_pid, libc::SIGKILL) };
    assert_eq!(killed, 0);
    crate::machine_tests::wait_for("the machine's init to be gone", || {
        let gone = machine.open_init_pidfd().is_err();
        async move { gone.then_some(()) }
    })
    .await;
    let result = harness.driver.exec(&handle, ExecRequest::new("echo entered")).await;
    assert!(
        result.is_err(),
        "a command entered a machine without its init: {result:?}"
    );
    harness.driver.destroy(&handle).await.unwrap();
}

#[test]
fn a_parent_pid_is_read_past_any_command_name() {
    // A command name may hold ") " itself: the parent comes after the last one.
    let scratch = tempfile::tempdir().unwrap();
    let program = scratch.path().join("x) 1 2 (y");
    std::fs::copy("/bin/sleep", &program).unwrap();
    let mut child = std::process::Command::new(&program).arg("100").spawn().unwrap();
    let parent = super::machine::parent_pid(child.id() as i32);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(parent, Some(std::process::id() as i32));
    assert_eq!(super::machine::parent_pid(i32::MAX), None);
}
