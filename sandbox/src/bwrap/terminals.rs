//! A machine's terminals: one tmux session [`TERMINAL_SESSION`] inside the machine, a window
//! per terminal (addressed by index), read with `capture-pane` and attached with
//! `attach-session` on a pseudo-terminal.

use crate::driver::TERMINAL_SESSION;
use crate::environment::Terminal;
use crate::error::{Result, SandboxError};
use crate::pty::{self, PtySession, PtySize};

use super::exec::spawn_entered;
use super::machine::BwrapMachine;
use super::{BwrapDriver, WORKSPACE_DIR};

/// Scrollback kept per terminal window.
const TERMINAL_HISTORY_LINES: usize = 10_000;

impl BwrapDriver {
    pub(super) async fn start_terminals_in(&self, machine: &BwrapMachine, terminals: &[Terminal]) -> Result<()> {
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
        if terminals.iter().all(|terminal| terminal.on_demand) {
            *machine.deferred_terminals.lock().await = terminals.to_vec();
        } else {
            let argv = terminal_session_argv(terminals);
            self.run_checked(machine, argv, Some("terminals")).await?;
        }
        *machine.terminals.lock().expect("terminals lock") =
            terminals.iter().map(|terminal| terminal.name.clone()).collect();
        Ok(())
    }

    /// Starts the terminals left for their first use, if any are; one caller starts them while
    /// the others wait.
    pub(super) async fn start_deferred_terminals(&self, machine: &BwrapMachine) -> Result<()> {
        let mut deferred = machine.deferred_terminals.lock().await;
        if deferred.is_empty() {
            return Ok(());
        }
        let argv = terminal_session_argv(&deferred);
        self.run_checked(machine, argv, Some("terminals")).await?;
        deferred.clear();
        Ok(())
    }

    pub(super) async fn read_terminal_in(
        &self,
        machine: &BwrapMachine,
        name: &str,
        max_lines: usize,
    ) -> Result<String> {
        let index = machine.terminal_index(Some(name))?;
        self.start_deferred_terminals(machine).await?;
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

    /// A tmux client attached to the machine's session, read-only for viewers, on a new
    /// pseudo-terminal of `size`: entered as every command is (see `exec::spawn_entered`), in
    /// the machine's `attach` leaf cgroup. Starts the terminals left for their first use.
    pub(super) async fn open_pty_in(
        &self,
        machine: &BwrapMachine,
        terminal: Option<&str>,
        read_only: bool,
        size: PtySize,
    ) -> Result<PtySession> {
        machine.ensure_running()?;
        // An unknown terminal is refused before anything is started for it.
        let index = machine.terminal_index(terminal)?;
        self.start_deferred_terminals(machine).await?;
        let mut tmux = vec!["tmux".to_string(), "attach-session".to_string()];
        if read_only {
            // A viewer sees everything and can type nothing.
            tmux.push("-r".to_string());
        }
        tmux.extend(["-t".to_string(), format!("{TERMINAL_SESSION}:{index}")]);
        let leaf = machine.cgroup.leaf("attach")?;
        let (master, slave) = pty::open_pair(size)?;
        let child = spawn_entered(machine, &tmux, WORKSPACE_DIR, &[], &leaf, Some(slave)).await?;
        PtySession::new(master, child)
    }
}

/// One tmux invocation that starts the server with the session's options, then the session
/// [`TERMINAL_SESSION`] with window `i` running terminal `i` (windows are addressed by index:
/// names like "Run Next.js" contain tmux's target separators).
pub(super) fn terminal_session_argv(terminals: &[Terminal]) -> Vec<String> {
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
        // Given as several arguments, the window's command is executed directly, without the
        // `sh -c` tmux would otherwise start around one string. tmux ends a command at any
        // argument ending in `;` (and turns a final `\;` into `;`), so the shell's script
        // ends in a newline, which the shell ignores and no terminal's command can remove.
        command.extend([
            "/bin/sh".to_string(),
            if terminal.login { "-lc" } else { "-c" }.to_string(),
            format!("{}\n", terminal.command),
        ]);
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
pub(super) fn terminal_tail(captured: &str, max_lines: usize) -> String {
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
