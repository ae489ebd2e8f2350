//! A machine's terminals: tmux windows started at boot or at their first use, read and attached.

use super::*;

/// A machine whose terminals are all on demand runs no tmux until one is first read or attached;
/// two first uses at once start it once.
#[tokio::test]
async fn on_demand_terminals_start_at_their_first_use() {
    let harness = harness().await;
    let machine = harness.machine("on-demand").await;
    let mut shell = Terminal::new("shell", "echo shell-started; exec sleep 1000");
    shell.on_demand = true;
    harness.driver.start_terminals(&machine, &[shell]).await.unwrap();
    let tmux_processes = "cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^tmux' || true";
    let before = harness.run(&machine, tmux_processes).await;
    assert_eq!(before.stdout_text().trim(), "0", "no tmux before the first use");

    let error = harness.driver.read_terminal(&machine, "missing", 10).await.unwrap_err();
    assert!(matches!(error, SandboxError::UnknownTerminal { .. }), "{error}");
    let (first, second) = tokio::join!(
        harness.driver.read_terminal(&machine, "shell", 10),
        harness.driver.read_terminal(&machine, "shell", 10),
    );
    first.unwrap();
    second.unwrap();
    wait_for_terminal(&harness.driver, &machine, "shell", 10, "shell-started").await;
    let after = harness.run(&machine, tmux_processes).await;
    assert_eq!(
        after.stdout_text().trim(),
        "1",
        "one tmux server: {}",
        after.stderr_text()
    );

    // An attach as the first use starts them too.
    let attached = harness.machine("on-demand-attach").await;
    let mut shell = Terminal::new("shell", "echo attach-started; exec sleep 1000");
    shell.on_demand = true;
    harness.driver.start_terminals(&attached, &[shell]).await.unwrap();
    let session = harness
        .driver
        .open_pty(&attached, None, true, PtySize { cols: 80, rows: 24 })
        .await
        .unwrap();
    read_pty_until_text(&session, "attach-started").await;
}

#[tokio::test]
async fn terminals_run_in_tmux_and_are_readable_and_attachable() {
    let harness = harness().await;
    let machine = harness.machine("terminals").await;
    let terminals = vec![
        Terminal::new("Run Next.js", "echo hello-from-terminal; sleep 1000"),
        // Ends in `\;`, which tmux would turn into a bare `;` (and `find` would then fail).
        Terminal::new("counter", "seq 1 5; find /workspace -maxdepth 0 -exec echo counted \\;"),
    ];
    harness.driver.start_terminals(&machine, &terminals).await.unwrap();
    wait_for_terminal(&harness.driver, &machine, "Run Next.js", 50, "hello-from-terminal").await;
    let counted = wait_for_terminal(&harness.driver, &machine, "counter", 3, "counted").await;
    assert!(counted.lines().count() <= 3, "{counted}");
    let error = harness.driver.read_terminal(&machine, "missing", 10).await.unwrap_err();
    assert!(matches!(error, SandboxError::UnknownTerminal { .. }), "{error}");

    let session = harness
        .driver
        .open_pty(&machine, Some("Run Next.js"), false, PtySize { cols: 100, rows: 30 })
        .await
        .unwrap();
    read_pty_until_text(&session, "hello-from-terminal").await;
    session.resize(PtySize { cols: 120, rows: 40 }).unwrap();
    drop(session);
    harness.driver.destroy(&machine).await.unwrap();
}
