//! Starting a process with steps between its birth and its exec (joining a cgroup and a
//! machine's namespaces, taking its ids, installing its filter) without copying the node.
//!
//! std's `Command` runs such steps (`pre_exec`) in a child made by `fork`, which copies the
//! page tables of the whole node and makes its memory copy-on-write until the exec: about 2 ms
//! of the node's CPU and of the caller's wall time per start for a node of 100 MB, more as it
//! grows (`flotilla-bench spawn`). Here the child is a `clone(CLONE_VM | CLONE_VFORK)` that
//! shares the node's memory and runs on a stack of its own while the calling thread waits, as
//! glibc's `posix_spawn` does; nothing is copied.
//!
//! What the child may do is narrower than after a fork, and every step given here must keep to
//! it: system calls only, no allocation, no lock, no thread-local state other than `errno`, and
//! no glibc call that acts on the whole process as glibc sees it (`setuid` and friends signal
//! every thread of the node: use the raw system calls, see [`set_ids`]). The calling thread
//! blocks every signal around the clone, so that none of the node's handlers runs in the child;
//! the child puts every caught signal back to its default before it unblocks them for its exec.

// Unsafe: clone, execve, waitpid, pidfd system calls and the child's raw steps have no safe
// wrapper; each block says what it relies on. The pidfd calls and the signal-blocked clone here
// are the sandbox's only ones.
#![allow(unsafe_code)]

use std::convert::Infallible;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Where a program named without a `/` is looked for when the environment has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The child's stack: the steps are system calls with small frames.
const CHILD_STACK_BYTES: usize = 256 * 1024;

/// Where a child's standard output or error goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// A pipe whose reading end the caller gets.
    Piped,
    /// `/dev/null`.
    Null,
}

/// What to start: the program, its arguments (the first is its name) and its whole
/// environment. A program named without a `/` is looked for in the `PATH` of that environment,
/// by the child, after its steps (so inside the root they may have entered), as `execvp` does.
pub(crate) struct Spawn {
    /// The paths tried in turn.
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
    stdout: Output,
    stderr: Output,
    /// A terminal's slave side as standard input, output and error, and as the controlling
    /// terminal of a session of the child's own (see [`Spawn::terminal`]).
    terminal: Option<RawFd>,
}

impl Spawn {
    pub(crate) fn new(program: &str, argv: &[String], env: &[(String, String)]) -> io::Result<Spawn> {
        let c_string = |text: String| {
            CString::new(text).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a command"))
        };
        let candidates = if program.contains('/') {
            vec![c_string(program.to_string())?]
        } else {
            let path = env
                .iter()
                .rev()
                .find(|(key, _)| key == "PATH")
                .map(|(_, value)| value.as_str())
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .map(|directory| match directory {
                    "" => c_string(program.to_string()),
                    directory => c_string(format!("{}/{program}", directory.trim_end_matches('/'))),
                })
                .collect::<io::Result<_>>()?
        };
        Ok(Spawn {
            candidates,
            argv: argv.iter().cloned().map(c_string).collect::<io::Result<_>>()?,
            env: env
                .iter()
                .map(|(key, value)| c_string(format!("{key}={value}")))
                .collect::<io::Result<_>>()?,
            stdout: Output::Null,
            stderr: Output::Null,
            terminal: None,
        })
    }

    /// The program, arguments and environment of `command`, which must have had its
    /// environment cleared (`env_clear`): only what was set on it is passed.
    pub(crate) fn from_command(command: &std::process::Command) -> io::Result<Spawn> {
        use std::os::unix::ffi::OsStrExt;
        let text = |value: &std::ffi::OsStr| {
            std::str::from_utf8(value.as_bytes())
                .map(str::to_string)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a command that is not UTF-8"))
        };
        let program = text(command.get_program())?;
        let mut argv = vec![program.clone()];
        for argument in command.get_args() {
            argv.push(text(argument)?);
        }
        let mut env = Vec::new();
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                env.push((text(key)?, text(value)?));
            }
        }
        Spawn::new(&program, &argv, &env)
    }

    pub(crate) fn stdout(mut self, output: Output) -> Spawn {
        self.stdout = output;
        self
    }

    pub(crate) fn stderr(mut self, output: Output) -> Spawn {
        self.stderr = output;
        self
    }

    /// Gives the child `slave` (a pseudo-terminal's slave side) as its standard input, output
    /// and error, and makes it the controlling terminal of a new session the child leads,
    /// before its steps. `slave` must stay open until [`Spawn::start`] has returned.
    pub(crate) fn terminal(mut self, slave: &OwnedFd) -> Spawn {
        self.terminal = Some(slave.as_raw_fd());
        self
    }

    /// Starts the program, with standard input from `/dev/null`, after `steps` have run in the
    /// child (see the module's rules for what they may do). An error of a step or of the exec
    /// is returned here, and the child is gone by then.
    pub(crate) fn start(&self, steps: &mut dyn FnMut() -> io::Result<()>) -> io::Result<Child> {
        let null = open_dev_null()?;
        let (stdout_read, stdout_write) = self.output_ends(self.stdout, &null)?;
        let (stderr_read, stderr_write) = self.output_ends(self.stderr, &null)?;
        let (error_read, error_write) = pipe()?;
        let argv = pointers(&self.argv);
        let envp = pointers(&self.env);
        let candidates = pointers(&self.candidates);
        let (stdin, stdout, stderr) = match self.terminal {
            Some(slave) => (slave, slave, slave),
            None => (null.as_raw_fd(), stdout_write.as_raw_fd(), stderr_write.as_raw_fd()),
        };
        let mut context = ChildContext {
            candidates: &candidates[..self.candidates.len()],
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            stdin,
            stdout,
            stderr,
            controlling_terminal: self.terminal.is_some(),
            error: error_write.as_raw_fd(),
            steps,
        };
        let pid = clone_vfork(&mut context)?;
        drop((stdout_write, stderr_write, error_write, null));
        // The child has exec'd (the error pipe closed with it) or written why not and exited.
        if let Some(errno) = read_errno(&error_read)? {
            let mut status = 0;
            // SAFETY: our own child, which has exited; status is a valid pointer.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Err(io::Error::from_raw_os_error(errno));
        }
        let pidfd = match pidfd_open(pid) {
            Ok(pidfd) => pidfd,
            Err(error) => {
                // SAFETY: our own child, not yet reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                return Err(error);
            }
        };
        let piped = |read: Option<OwnedFd>| if self.terminal.is_some() { None } else { read };
        Ok(Child {
            pid,
            pidfd,
            stdout: piped(stdout_read),
            stderr: piped(stderr_read),
            status: None,
        })
    }

    fn output_ends(&self, output: Output, null: &OwnedFd) -> io::Result<(Option<OwnedFd>, OwnedFd)> {
        match output {
            Output::Piped => {
                let (read, write) = pipe()?;
                Ok((Some(read), write))
            }
            Output::Null => Ok((None, null.try_clone()?)),
        }
    }
}

/// A started process: ours until it is reaped. Dropping it unreaped kills it and reaps it on a
/// thread of its own.
pub(crate) struct Child {
    pid: i32,
    pidfd: OwnedFd,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Child {
    pub(crate) fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Sends SIGKILL, through the pidfd: never to a process that took the number later.
    pub(crate) fn start_kill(&self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        match pidfd_send_signal(&self.pidfd, libc::SIGKILL) {
            // Exited already, not yet reaped.
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// The exit status, if the process has exited; reaps it then.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut status = 0;
        // SAFETY: our own child, not yet reaped; status is a valid pointer.
        match unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } {
            0 => Ok(None),
            pid if pid == self.pid => {
                let status = ExitStatus::from_raw(status);
                self.status = Some(status);
                Ok(Some(status))
            }
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Waits for the process to exit, blocking this thread.
    pub(crate) fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let mut status = 0;
        loop {
            // SAFETY: our own child, not yet reaped; status is a valid pointer.
            if unsafe { libc::waitpid(self.pid, &mut status, 0) } == self.pid {
                break;
            }
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EINTR) {
                return Err(error);
            }
        }
        let status = ExitStatus::from_raw(status);
        self.status = Some(status);
        Ok(status)
    }

    /// Waits for the process to exit without blocking the runtime: the pidfd becomes readable
    /// when it has.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let pidfd = self.pidfd.try_clone()?;
        // SAFETY: the AsyncFd owns this duplicate for its whole life, so the descriptor stays
        // open and names the same pidfd until the AsyncFd is dropped.
        let readable =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }?;
        loop {
            let mut guard = readable.readable().await?;
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            guard.clear_ready();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.start_kill();
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.pid;
        // Killed; its exit is a matter of the kernel tearing it down. Reaped off this thread.
        let reaper = std::thread::Builder::new()
            .name("flotilla-reaper".into())
            .spawn(move || {
                // SAFETY: our own child, not yet reaped.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            });
        if let Err(error) = reaper {
            tracing::warn!(pid, %error, "could not reap a killed child");
        }
    }
}

/// A pipe's reading end as a tokio reader.
pub(crate) fn async_reader(fd: OwnedFd) -> io::Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
}

/// setgroups (none), setresgid and setresuid as raw system calls, for the calling process
/// alone: glibc's wrappers apply them to every thread glibc knows of, which in a child that
/// shares the node's memory are the node's threads.
pub(crate) fn set_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain system calls with integer arguments and a null list.
    unsafe {
        check_long(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()))?;
        check_long(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
        check_long(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
    }
    Ok(())
}

/// A system call's `long` result: 0, or the error in errno.
pub(crate) fn check_long(result: libc::c_long) -> io::Result<()> {
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct ChildContext<'a> {
    candidates: &'a [*const libc::c_char],
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// Standard input is a terminal to take as the controlling terminal of a new session.
    controlling_terminal: bool,
    error: RawFd,
    steps: &'a mut dyn FnMut() -> io::Result<()>,
}

fn clone_vfork(context: &mut ChildContext<'_>) -> io::Result<i32> {
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    // SAFETY: with CLONE_VFORK this thread waits until the child has exec'd or exited, so
    // `stack` and `context` (which the child alone uses meanwhile) outlive its use of them.
    let pid = unsafe {
        clone_with_signals_blocked(
            child_main,
            &mut stack,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            context as *mut ChildContext<'_> as *mut libc::c_void,
        )
    };
    drop(stack);
    pid
}

/// `clone(2)` of `child` on `stack` with `flags`, with every signal blocked in the calling
/// thread around it: the child starts with them all blocked, so none of the node's handlers runs
/// on the node's memory in it. The calling thread's mask is restored right after.
///
/// # Safety
///
/// `stack` and whatever `argument` points to must outlive the child's use of them, and `child`
/// must keep to what a child sharing the caller's memory may do.
pub(crate) unsafe fn clone_with_signals_blocked(
    child: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    stack: &mut [u8],
    flags: libc::c_int,
    argument: *mut libc::c_void,
) -> io::Result<i32> {
    // The stack grows down from its end, aligned as the ABI wants.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !0xf;
    // SAFETY: sigset_t values are plain data, filled by sigfillset before use; the caller
    // answers for the stack and the argument.
    let (pid, error) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let pid = libc::clone(child, top as *mut libc::c_void, flags, argument);
        let error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        (pid, error)
    };
    if pid < 0 {
        return Err(error);
    }
    Ok(pid)
}

/// The child's whole life: steps, exec, or the errno of what failed on the error pipe.
extern "C" fn child_main(argument: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent passed a valid ChildContext and waits (CLONE_VFORK) while we use it.
    let context = unsafe { &mut *(argument as *mut ChildContext<'_>) };
    let Err(error) = run_child(context);
    let errno: i32 = error.raw_os_error().unwrap_or(libc::EINVAL);
    // SAFETY: writes four bytes from a local to the error pipe, then ends this process without
    // running anything of the node's (no atexit handlers, no flush of shared buffers).
    unsafe {
        libc::write(context.error, (&errno as *const i32).cast(), std::mem::size_of::<i32>());
        libc::_exit(127)
    }
}

fn run_child(context: &mut ChildContext<'_>) -> io::Result<Infallible> {
    default_signal_handlers();
    for (from, to) in [(context.stdin, 0), (context.stdout, 1), (context.stderr, 2)] {
        // SAFETY: dup2 onto the standard descriptors of this (unshared) descriptor table; the
        // duplicate does not close on exec. A descriptor already in place keeps its number and
        // only loses close-on-exec.
        let result = unsafe {
            if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            }
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if context.controlling_terminal {
        // SAFETY: setsid and ioctl are plain system calls; TIOCSCTTY takes no pointer.
        let result = unsafe {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY as _, 0)
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    (context.steps)()?;
    // SAFETY: an empty set, filled by sigemptyset, becomes this process's mask for the exec.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    // As execvp: the first error other than "not there" is the one reported.
    let mut reported: Option<io::Error> = None;
    for candidate in context.candidates {
        // SAFETY: NUL-terminated strings and NULL-terminated arrays the parent keeps alive.
        unsafe { libc::execve(*candidate, context.argv, context.envp) };
        let error = io::Error::last_os_error();
        let absent = matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR));
        if !absent && reported.is_none() {
            reported = Some(error);
        }
    }
    Err(reported.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOENT)))
}

/// Every signal the node catches goes back to its default in the child (its handlers would run
/// on the node's memory), and so does SIGPIPE, which Rust programs ignore.
fn default_signal_handlers() {
    for signal in 1..=libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: sigaction reads the current action into a zeroed struct and sets the default
        // one; both are plain data. Signals glibc reserves answer EINVAL, which is ignored.
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            if current.sa_sigaction != libc::SIG_DFL
                && (current.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
    }
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|string| string.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors into a two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made by the kernel and belong to nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_dev_null() -> io::Result<OwnedFd> {
    let file = std::fs::File::options().read(true).write(true).open("/dev/null")?;
    Ok(file.into())
}

/// A pidfd on `pid`: it names that process, and no later one that reuses the number.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor (close-on-exec).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` (0: none, only the checks) to the process behind `pidfd`.
pub(crate) fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: a signal through a pidfd the caller holds, with no siginfo.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
}

/// The errno a failed child wrote, or `None` once the pipe is closed with nothing in it.
fn read_errno(pipe: &OwnedFd) -> io::Result<Option<i32>> {
    let mut bytes = [0u8; 4];
    loop {
        // SAFETY: reads at most four bytes into a four-byte array.
        let count = unsafe { libc::read(pipe.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) };
        match count {
            0 => return Ok(None),
            4 => return Ok(Some(i32::from_ne_bytes(bytes))),
            count if count < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
            count if count < 0 => return Err(io::Error::last_os_error()),
            _ => return Err(io::Error::other("a short report from a child that failed to start")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn read_all(fd: Option<OwnedFd>) -> String {
        let mut text = String::new();
        async_reader(fd.expect("piped"))
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        text
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_program_runs_with_its_arguments_environment_and_pipes() {
        let spawn = Spawn::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                "echo \"$GREETING $1\"; echo oops >&2; exit 3".into(),
                "sh".into(),
                "world".into(),
            ],
            &[("GREETING".into(), "hello".into())],
        )
        .unwrap()
        .stdout(Output::Piped)
        .stderr(Output::Piped);
        let mut ran_steps = false;
        let mut child = spawn
            .start(&mut || {
                ran_steps = true;
                Ok(())
            })
            .unwrap();
        assert!(ran_steps, "the steps ran in the child, on this memory");
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (out, err) = tokio::join!(read_all(stdout), read_all(stderr));
        assert_eq!(out, "hello world\n");
        assert_eq!(err, "oops\n");
        assert_eq!(child.wait().await.unwrap().code(), Some(3));
    }

    #[test]
    fn a_failed_step_or_exec_is_the_callers_error_and_leaves_no_child() {
        let spawn = Spawn::new("/bin/true", &["true".into()], &[]).unwrap();
        let error = spawn
            .start(&mut || Err(io::Error::from_raw_os_error(libc::EACCES)))
            .err()
            .expect("a failed step fails the start");
        assert_eq!(error.raw_os_error(), Some(libc::EACCES));
        let missing = Spawn::new("/nonexistent/program", &["x".into()], &[]).unwrap();
        let error = missing
            .start(&mut || Ok(()))
            .err()
            .expect("a missing program fails the start");
        assert_eq!(error.raw_os_error(), Some(libc::ENOENT));
        let searched = Spawn::new("true", &["true".into()], &[("PATH".into(), "/nonexistent:/bin".into())]).unwrap();
        let mut child = searched.start(&mut || Ok(())).unwrap();
        assert!(
            child.wait_blocking().unwrap().success(),
            "found in the environment's PATH"
        );
    }

    #[test]
    fn the_program_starts_with_no_signal_blocked_and_sigpipe_not_ignored() {
        // The test harness, like every Rust program, ignores SIGPIPE.
        let spawn = Spawn::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                "grep -E '^Sig(Cgt|Ign|Blk):' /proc/self/status".into(),
            ],
            &[],
        )
        .unwrap()
        .stdout(Output::Piped);
        let mut child = spawn.start(&mut || Ok(())).unwrap();
        let mut text = String::new();
        use std::io::Read;
        std::fs::File::from(child.stdout.take().unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(child.wait_blocking().unwrap().success());
        assert_eq!(text.lines().count(), 3, "{text}");
        for line in text.lines() {
            let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            if line.starts_with("SigBlk") {
                assert_eq!(mask, 0, "nothing blocked: {text}");
            } else if line.starts_with("SigIgn") {
                assert_eq!(mask & (1u64 << (libc::SIGPIPE - 1)), 0, "SIGPIPE not ignored: {text}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_child_is_reaped_and_dropping_one_kills_it() {
        let spawn = Spawn::new("/bin/sleep", &["sleep".into(), "30".into()], &[]).unwrap();
        let mut child = spawn.start(&mut || Ok(())).unwrap();
        child.start_kill().unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let dropped = spawn.start(&mut || Ok(())).unwrap();
        let pid = dropped.id() as i32;
        drop(dropped);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Gone once reaped: signal 0 finds no such process.
        // SAFETY: kill with signal 0 only checks the process.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a dropped child was not killed and reaped"
            );
            std::thread::yield_now();
        }
    }
}
