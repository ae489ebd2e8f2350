//! A pseudo-terminal around a command (the tmux client attached to a machine's session), so a
//! bidirectional gRPC stream can pump bytes and resizes through it.
// Unsafe: openpty, ioctl, fcntl, and raw read/write on the non-blocking master are libc calls
// with no safe wrapper in std.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

use crate::error::{Result, SandboxError};
use crate::vfork;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for PtySize {
    fn default() -> Self {
        PtySize { cols: 80, rows: 24 }
    }
}

impl PtySize {
    fn winsize(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

/// The master side of a pseudo-terminal and the process on its slave side. Dropping it kills
/// the process (the tmux client: the terminal itself goes on running in the machine).
pub struct PtySession {
    master: AsyncFd<OwnedFd>,
    child: vfork::Child,
}

impl Drop for PtySession {
    fn drop(&mut self) {
        // The attached client (a tmux client) goes with its session; the terminal it showed stays.
        let _ = self.child.start_kill();
    }
}

impl PtySession {
    /// Runs `command` (its program, arguments, directory and the environment set on it: clear
    /// it first, `env_clear`) on a new pseudo-terminal of `size`, in a session of its own.
    pub fn spawn(command: std::process::Command, size: PtySize) -> Result<Self> {
        let failed = |error: io::Error| SandboxError::io("start", "the terminal attach command", error);
        let spawn = vfork::Spawn::from_command(&command).map_err(failed)?;
        let directory = command
            .get_current_dir()
            .map(|directory| CString::new(directory.as_os_str().as_bytes()))
            .transpose()
            .map_err(|_| failed(io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a directory")))?;
        let (master, slave) = open_pair(size)?;
        let mut steps = || match &directory {
            // SAFETY: chdir reads a NUL-terminated path that outlives the call.
            Some(directory) if unsafe { libc::chdir(directory.as_ptr()) } < 0 => Err(io::Error::last_os_error()),
            _ => Ok(()),
        };
        let child = spawn.terminal(&slave).start(&mut steps).map_err(failed)?;
        drop(slave);
        PtySession::new(master, child)
    }

    /// The session of `child`, started on the slave side of `master` (see [`open_pair`] and
    /// `vfork::Spawn::terminal`).
    pub(crate) fn new(master: OwnedFd, child: vfork::Child) -> Result<Self> {
        // SAFETY: the OwnedFd is an open descriptor that stays open and unchanged while the
        // AsyncFd owns it.
        let master = unsafe { AsyncFd::register(master) }
            .map_err(|error| SandboxError::io("register", "the pty master", io::Error::other(error.to_string())))?;
        Ok(PtySession { master, child })
    }

    /// Reads what the terminal printed; `Ok(0)` once the attached process has gone.
    pub async fn read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            let result = guard.try_io(|inner| {
                // SAFETY: reading into a valid, exclusively borrowed buffer.
                let count = unsafe { libc::read(inner.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
                if count < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(count as usize)
                }
            });
            match result {
                Ok(Ok(count)) => return Ok(count),
                // Linux reports EIO on the master once every slave descriptor is closed.
                Ok(Err(error)) if error.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes keystrokes to the terminal.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            let result = guard.try_io(|inner| {
                // SAFETY: writing from a valid slice.
                let count = unsafe { libc::write(inner.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if count < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(count as usize)
                }
            });
            match result {
                Ok(Ok(count)) => data = &data[count..],
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, size: PtySize) -> io::Result<()> {
        let winsize = size.winsize();
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        let result = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    pub async fn kill(&mut self) -> io::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await.map(drop)
    }
}

/// A new pseudo-terminal of `size`: its master (non-blocking) and slave sides, both closed on
/// exec.
pub(crate) fn open_pair(size: PtySize) -> Result<(OwnedFd, OwnedFd)> {
    open_pty(size).map_err(|error| SandboxError::io("open a pseudo-terminal", "/dev/ptmx", error))
}

fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master = -1;
    let mut slave = -1;
    let winsize = size.winsize();
    // SAFETY: openpty writes two descriptors into valid out-pointers; name and termios are null.
    let result = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &winsize,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both are open descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
        // SAFETY: fcntl on descriptors we own.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    // SAFETY: as above; the master is polled by tokio, so it must not block.
    unsafe {
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok((master, slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the command writes until it closes the terminal.
    async fn read_to_end(session: &PtySession) -> String {
        let mut output = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            let count = session.read(&mut buffer).await.unwrap();
            if count == 0 {
                break;
            }
            output.extend_from_slice(&buffer[..count]);
        }
        String::from_utf8_lossy(&output).into_owned()
    }

    #[tokio::test]
    async fn a_command_sees_a_terminal_and_its_size() {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args([
                "-c",
                "stty size; test -t 0 && echo is-a-tty; echo pid:$$; cat /proc/$$/stat",
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        let mut session = PtySession::spawn(command, PtySize { cols: 91, rows: 27 }).unwrap();
        let text = read_to_end(&session).await;
        assert!(text.contains("27 91"), "{text}");
        assert!(text.contains("is-a-tty"), "{text}");
        // The shell leads a session of its own, with the terminal as its controlling one, and
        // is that terminal's foreground process group.
        let pid = text
            .split("pid:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("pid");
        let stat = text
            .lines()
            .find(|line| line.starts_with(&format!("{pid} (")))
            .expect("stat");
        let fields: Vec<&str> = stat.rsplit_once(") ").expect("stat fields").1.split(' ').collect();
        let (process_group, session_id, tty, foreground) = (fields[2], fields[3], fields[4], fields[5]);
        assert_eq!(session_id, pid, "{stat}");
        assert_ne!(tty, "0", "{stat}");
        assert_eq!(foreground, process_group, "{stat}");
        assert!(session.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn keystrokes_and_resize_reach_the_command() {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", "read line; stty size; echo got:$line:$(pwd)"])
            .current_dir("/tmp")
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        let mut session = PtySession::spawn(command, PtySize::default()).unwrap();
        session.resize(PtySize { cols: 100, rows: 40 }).unwrap();
        session.write_all(b"hello\n").await.unwrap();
        let text = read_to_end(&session).await;
        assert!(text.contains("got:hello:/tmp"), "{text}");
        assert!(text.contains("40 100"), "{text}");
        session.wait().await.unwrap();
    }
}
