//! The kernel surface of real bubblewrap machines (root only, like `machine_tests`): sysctls and
//! SysRq are read-only, /sys is not mounted, the calls of the system-call filter's deny list
//! fail with EPERM (`clone3` with ENOSYS) in commands, terminals and take-overs, every process
//! of a machine runs under the filter, and the node and the machine go on afterwards.

use std::collections::BTreeMap;

use crate::driver::MachineDriver;
use crate::environment::Terminal;
use crate::machine_tests::{bwrap_machine, harness, read_pty_until, wait_for};
use crate::pty::PtySize;

/// A python3 script (the `host` image binds the node's /usr, which has it) that makes raw system
/// calls and prints `name result errno` for each. Every argument is chosen so that, without the
/// filter, the call would not fail with EPERM: the test can only pass because of the filter.
fn probe_script() -> String {
    let probes: [(&str, libc::c_long, &[i64]); 9] = [
        // KEYCTL_GET_KEYRING_ID of the session keyring, without creating it: allowed to anyone.
        ("keyctl", libc::SYS_keyctl, &[0, -3, 0]),
        // An unknown command: EINVAL.
        ("bpf", libc::SYS_bpf, &[9999, 0, 0]),
        // A NULL target: EFAULT, before any permission check.
        ("mount", libc::SYS_mount, &[0, 0, 0, 0, 0]),
        // A NULL attribute block: EFAULT.
        ("perf_event_open", libc::SYS_perf_event_open, &[0, 0, -1, -1, 0]),
        // A descriptor that is not open: EBADF.
        ("setns", libc::SYS_setns, &[-1, 0]),
        // unshare(CLONE_NEWUSER): succeeds for anyone when user namespaces are enabled.
        ("unshare_newuser", libc::SYS_unshare, &[libc::CLONE_NEWUSER as i64]),
        // A NULL argument block: EFAULT; the filter answers ENOSYS so that libc uses clone.
        ("clone3", libc::SYS_clone3, &[0, 88]),
        // READ_IMPLIES_EXEC: allowed without the filter.
        ("personality_exec", libc::SYS_personality, &[0x040_0000]),
        // The query stays allowed.
        ("personality_query", libc::SYS_personality, &[0xffff_ffff]),
    ];
    let mut script = String::from(
        "import ctypes\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         libc.syscall.restype = ctypes.c_long\n\
         def probe(name, number, *args):\n\
         \x20   ctypes.set_errno(0)\n\
         \x20   result = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])\n\
         \x20   print(name, result, ctypes.get_errno(), flush=True)\n",
    );
    for (name, number, args) in probes {
        let args: Vec<String> = args.iter().map(i64::to_string).collect();
        script.push_str(&format!("probe({name:?}, {number}, {})\n", args.join(", ")));
    }
    script
}

/// `name -> (result, errno)` from the probe script's output.
fn parse_probes(output: &str) -> BTreeMap<String, (i64, i32)> {
    output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_string();
            let result = fields.next()?.parse().ok()?;
            let errno = fields.next()?.parse().ok()?;
            Some((name, (result, errno)))
        })
        .collect()
}

fn assert_probes(output: &str) {
    let probes = parse_probes(output);
    for name in [
        "keyctl",
        "bpf",
        "mount",
        "perf_event_open",
        "setns",
        "unshare_newuser",
        "personality_exec",
    ] {
        assert_eq!(
            probes.get(name),
            Some(&(-1, libc::EPERM)),
            "{name} was not refused with EPERM: {output}"
        );
    }
    assert_eq!(probes.get("clone3"), Some(&(-1, libc::ENOSYS)), "{output}");
    let query = probes.get("personality_query").expect("the query ran");
    assert!(query.0 >= 0, "the personality query was refused: {output}");
}

#[tokio::test]
async fn sysctls_are_read_only_and_denied_calls_fail_with_eperm_in_commands() {
    let harness = harness().await;
    let machine = harness.machine("kernel-surface").await;

    // The write puts back the value that is there, so a machine that could write it changes
    // nothing on the node running this test.
    let sysctl = harness
        .run(
            &machine,
            "v=$(cat /proc/sys/kernel/core_pattern) && printf '%s\\n' \"$v\" > /proc/sys/kernel/core_pattern",
        )
        .await;
    assert!(!sysctl.success(), "core_pattern was writable");
    assert!(
        sysctl.stderr_text().contains("Read-only file system"),
        "{}",
        sysctl.stderr_text()
    );

    // Opening for writing is enough to tell; nothing is written.
    let sysrq = harness
        .run_ok(
            &machine,
            "if [ ! -e /proc/sysrq-trigger ]; then echo absent; \
             elif (exec 3>>/proc/sysrq-trigger) 2>/dev/null; then echo writable; else echo read-only; fi",
        )
        .await;
    assert!(
        sysrq == "absent\n" || sysrq == "read-only\n",
        "/proc/sysrq-trigger is {sysrq}"
    );

    let sys = harness
        .run_ok(
            &machine,
            "awk '$5 ~ \"^/sys\" {print $5}' /proc/self/mountinfo; ls -A /sys 2>/dev/null | head -3",
        )
        .await;
    assert_eq!(sys, "", "/sys is mounted or not empty");

    let nested = harness.run(&machine, "unshare -U true").await;
    assert!(!nested.success(), "a nested user namespace was made");
    assert!(
        nested.stderr_text().contains("Operation not permitted"),
        "{}",
        nested.stderr_text()
    );

    let probes = harness
        .run_ok(&machine, &format!("python3 - <<'EOF'\n{}EOF", probe_script()))
        .await;
    assert_probes(&probes);

    // What the filter allows on purpose: threads (glibc falls back from clone3 to clone) and
    // ptrace of the machine's own processes.
    let allowed = harness
        .run_ok(
            &machine,
            "python3 -c 'import threading; t = threading.Thread(target=print, args=(\"thread ran\",)); t.start(); t.join()'; \
             strace -f -o /dev/null true && echo traced",
        )
        .await;
    assert_eq!(allowed, "thread ran\ntraced\n");

    // The machine and the node go on: a command in this machine, and a new machine.
    assert_eq!(harness.run_ok(&machine, "echo still-here").await, "still-here\n");
    let other = harness.machine("after-denials").await;
    assert_eq!(harness.run_ok(&other, "echo fine").await, "fine\n");
    harness.driver.destroy(&other).await.unwrap();
    harness.driver.destroy(&machine).await.unwrap();
}

/// `(comm, Seccomp, Seccomp_filters)` of every process in the PID namespace of the machine
/// whose init is `init_pid` (node PIDs), read from the node's /proc.
fn machine_processes(init_pid: i32) -> Vec<(String, String, String)> {
    let namespace = std::fs::read_link(format!("/proc/{init_pid}/ns/pid")).expect("the init's PID namespace");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        // A process may end while it is looked at; it is simply not counted.
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&namespace) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_string())
                .unwrap_or_default()
        };
        found.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    found
}

#[tokio::test]
async fn terminals_take_overs_and_the_init_run_under_the_filter() {
    let harness = harness().await;
    let machine = harness.machine("filtered-terminals").await;
    let terminals = vec![Terminal::new("shell", "sh")];
    harness.driver.start_terminals(&machine, &terminals).await.unwrap();

    // A take-over types into the terminal's shell.
    let session = harness
        .driver
        .open_pty(&machine, Some("shell"), false, PtySize { cols: 120, rows: 40 })
        .await
        .unwrap();
    session
        .write_all(b"unshare -U true; echo \"nested-exit-$?\"\r")
        .await
        .unwrap();
    // The echoed input reads `nested-exit-$?`; the shell's answer has the status.
    let exit_status = |seen: &[u8]| {
        let text = String::from_utf8_lossy(seen);
        text.match_indices("nested-exit-")
            .find_map(|(at, marker)| text[at + marker.len()..].chars().next().filter(char::is_ascii_digit))
    };
    let seen = read_pty_until(&session, "unshare's exit status", |seen| exit_status(seen).is_some()).await;
    let text = String::from_utf8_lossy(&seen);
    assert_eq!(
        exit_status(&seen),
        Some('1'),
        "a nested user namespace was made: {text:?}"
    );
    assert!(text.contains("Operation not permitted"), "{text:?}");

    // Seen from the node, with the take-over still attached: the init side (bubblewrap's
    // PID 1 and the init's `sleep`), the tmux server, the terminal's shell and the take-over's
    // tmux client all run under both programs.
    let init_pid = bwrap_machine(&machine).init_pid();
    let processes = wait_for("the take-over's tmux client in the machine", || {
        let processes = machine_processes(init_pid);
        let attached = processes.iter().any(|(name, _, _)| name == "tmux: client");
        async move { attached.then_some(processes) }
    })
    .await;
    for name in ["sleep", "tmux: server", "sh", "tmux: client"] {
        assert!(
            processes.iter().any(|(found, _, _)| found == name),
            "no {name} in {processes:?}"
        );
    }
    for (name, mode, filters) in &processes {
        assert_eq!(mode, "2", "{name} is not filtered: {processes:?}");
        assert_eq!(filters, "2", "{name} does not have both programs: {processes:?}");
    }
    drop(session);
    harness.driver.destroy(&machine).await.unwrap();
}
