//! `flotilla agent attach`: the local terminal joined to a terminal in the agent's machine.
//! In a real terminal the local side goes to raw mode (restored on every exit path); Ctrl-]
//! detaches. With `--takeover` the agent waits while you type.

use std::io::Write as _;

use flotilla_proto::v1::{self, attach_request, attach_response};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use super::client::{agent_client, connect, BearerToken, CliError};

/// The byte that ends an attach from the keyboard (Ctrl-]).
pub const DETACH_BYTE: u8 = 0x1d;
/// Requests queued towards the node before typing waits.
const OUTBOUND_BUFFER_MESSAGES: usize = 64;

/// Puts the terminal in raw mode for its lifetime.
struct RawMode {
    enabled: bool,
}

impl RawMode {
    fn enable() -> RawMode {
        let enabled =
            std::io::IsTerminal::is_terminal(&std::io::stdin()) && crossterm::terminal::enable_raw_mode().is_ok();
        RawMode { enabled }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if self.enabled {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
}

fn terminal_size() -> v1::TerminalSize {
    match crossterm::terminal::size() {
        Ok((cols, rows)) => v1::TerminalSize {
            rows: u32::from(rows),
            cols: u32::from(cols),
        },
        Err(_) => v1::TerminalSize { rows: 24, cols: 80 },
    }
}

pub(crate) async fn attach(
    args: &super::ClientArgs,
    token: BearerToken,
    agent_id: String,
    terminal: Option<String>,
    takeover: bool,
) -> Result<(), CliError> {
    let mut client = agent_client(connect(args).await?, token);
    let (outbound, requests) = mpsc::channel::<v1::AttachRequest>(OUTBOUND_BUFFER_MESSAGES);
    outbound
        .send(v1::AttachRequest {
            kind: Some(attach_request::Kind::Open(v1::AttachOpen {
                agent_id,
                terminal: terminal.unwrap_or_default(),
                takeover,
                size: Some(terminal_size()),
            })),
        })
        .await
        .map_err(|_| CliError::Usage("the attach stream closed before it opened".to_string()))?;
    let mut responses = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .map_err(CliError::Rpc)?
        .into_inner();
    let raw = RawMode::enable();
    eprint!("attached; Ctrl-] detaches\r\n");

    let keyboard = outbound.clone();
    let typing = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buffer = [0u8; 4096];
        loop {
            let count = match stdin.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(count) => count,
            };
            let chunk = &buffer[..count];
            let (input, detach) = match chunk.iter().position(|byte| *byte == DETACH_BYTE) {
                Some(at) => (&chunk[..at], true),
                None => (chunk, false),
            };
            if !input.is_empty() {
                let request = v1::AttachRequest {
                    kind: Some(attach_request::Kind::Input(input.to_vec())),
                };
                if keyboard.send(request).await.is_err() {
                    return;
                }
            }
            if detach {
                return;
            }
        }
    });
    let resizer = outbound.clone();
    let resizing = tokio::spawn(async move {
        let Ok(mut changes) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
            return;
        };
        while changes.recv().await.is_some() {
            let request = v1::AttachRequest {
                kind: Some(attach_request::Kind::Resize(terminal_size())),
            };
            if resizer.send(request).await.is_err() {
                return;
            }
        }
    });
    drop(outbound);

    let mut typing = typing;
    let result = loop {
        tokio::select! {
            message = responses.next() => match message {
                Some(Ok(response)) => match response.kind {
                    Some(attach_response::Kind::Output(bytes)) => {
                        let mut stdout = std::io::stdout().lock();
                        if stdout.write_all(&bytes).and_then(|()| stdout.flush()).is_err() {
                            break Ok(());
                        }
                    }
                    Some(attach_response::Kind::Notice(text)) => eprint!("[flotilla] {text}\r\n"),
                    None => {}
                },
                Some(Err(status)) => break Err(CliError::Rpc(status)),
                None => break Ok(()),
            },
            _ = &mut typing => break Ok(()),
        }
    };
    resizing.abort();
    typing.abort();
    drop(raw);
    eprintln!();
    eprintln!("detached");
    result
}
