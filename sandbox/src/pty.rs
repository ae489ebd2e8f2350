//! A pseudo-terminal around a command (the tmux client attached to a machine's session), so a
//! bidirectional gRPC stream can pump bytes and resizes through it.
// Unsafe: openpty, ioctl, fcntl, the pre_exec that makes the pty the controlling terminal, and
// raw read/write on the non-blocking master are libc calls with no safe wrapper in std.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};

use tokio::io::unix::AsyncFd;

use crate::error::{Result, SandboxError};

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
    child: tokio::process::Child,
}

impl Drop for PtySession {
    fn drop(&mut self) {
        // The attached client (a tmux client) goes with its session; the terminal it showed stays.
        let _ = self.child.start_kill();
    }
}

impl PtySession {
    pub fn spawn(command: std::process::Command, size: PtySize) -> Result<Self> {
        let (master, slave) =
            open_pty(size).map_err(|error| SandboxError::io("open a pseudo-terminal", "/dev/ptmx", error))?;
        let mut command = tokio::process::Command::from(command);
        let clone_slave = |slave: &OwnedFd| -> Result<Stdio> {
            let copy = slave
                .try_clone()
                .map_err(|error| SandboxError::io("duplicate", "the pty slave", error))?;
            Ok(Stdio::from(copy))
        };
        command
            .stdin(clone_slave(&slave)?)
            .stdout(clone_slave(&slave)?)
            .stderr(clone_slave(&slave)?);
        command.kill_on_drop(true);
        // SAFETY: setsid and ioctl are async-signal-safe; the closure touches no shared state.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|error| SandboxError::io("start", "the terminal attach command", error))?;
        drop(slave);
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
        self.child.kill().await
    }
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
        command.args(["-c", "stty size; test -t 0 && echo is-a-tty"]);
        let mut session = PtySession::spawn(command, PtySize { cols: 91, rows: 27 }).unwrap();
        let text = read_to_end(&session).await;
        assert!(text.contains("27 91"), "{text}");
        assert!(text.contains("is-a-tty"), "{text}");
        assert!(session.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn keystrokes_and_resize_reach_the_command() {
        let mut command = std::process::Command::new("/bin/sh");
        command.args(["-c", "read line; stty size; echo got:$line"]);
        let mut session = PtySession::spawn(command, PtySize::default()).unwrap();
        session.resize(PtySize { cols: 100, rows: 40 }).unwrap();
        session.write_all(b"hello\n").await.unwrap();
        let text = read_to_end(&session).await;
        assert!(text.contains("got:hello"), "{text}");
        assert!(text.contains("40 100"), "{text}");
        session.wait().await.unwrap();
    }
}
