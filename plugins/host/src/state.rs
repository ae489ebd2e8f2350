//! What one call's `Store` holds: the sandboxed WASI context, the limits, and the plugin's
//! identity and grants for the `http` and `log` imports.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::vcs_world::flotilla::plugin::log::{self as wit_log, Level};
use crate::host::Shared;
use crate::types::PluginLabel;

/// Log lines one call may write; the rest are dropped (with one line saying so).
const MAX_LOG_LINES_PER_CALL: u32 = 256;
/// What the host keeps of a call's stdout and stderr: the tail, for a trap's message.
const MAX_CAPTURED_OUTPUT_BYTES: usize = 4096;
/// Elements of one table (indirect-call tables of a Rust guest hold a few hundred).
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Core instances, tables and memories of one plugin instance (a wasip2 Rust guest has a few).
pub(crate) const MAX_CORE_INSTANCES_PER_PLUGIN: usize = 32;
pub(crate) const MAX_TABLES_PER_PLUGIN: usize = 32;
pub(crate) const MAX_MEMORIES_PER_PLUGIN: usize = 4;

pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: CallLimiter,
    pub(crate) plugin: Arc<PluginLabel>,
    pub(crate) granted_hosts: Arc<[String]>,
    settings: Arc<BTreeMap<String, String>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) captured_output: CapturedOutput,
    pub(crate) http_requests_sent: u32,
    log_lines_written: u32,
}

impl HostState {
    pub(crate) fn new(
        shared: Arc<Shared>,
        plugin: Arc<PluginLabel>,
        granted_hosts: Arc<[String]>,
        settings: Arc<BTreeMap<String, String>>,
    ) -> HostState {
        let captured_output = CapturedOutput::default();
        // Nothing inherited: no environment, arguments, preopened directories or host stdio. The
        // linker does not even offer wasi:sockets.
        let wasi = WasiCtx::builder()
            .stdout(captured_output.clone())
            .stderr(captured_output.clone())
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: CallLimiter::new(shared.config.memory_limit_bytes),
            plugin,
            granted_hosts,
            settings,
            shared,
            captured_output,
            http_requests_sent: 0,
            log_lines_written: 0,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Bounds one call's memories and tables, and remembers whether the memory bound was hit so
/// that the failure it causes (a trap, usually an abort on allocation failure) is reported as
/// what it is.
pub(crate) struct CallLimiter {
    memory_limit_bytes: usize,
    /// All memories of the instance together.
    memory_bytes: usize,
    pub(crate) memory_limit_hit: bool,
}

impl CallLimiter {
    fn new(memory_limit_bytes: usize) -> CallLimiter {
        CallLimiter {
            memory_limit_bytes,
            memory_bytes: 0,
            memory_limit_hit: false,
        }
    }
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.memory_bytes.saturating_sub(current).saturating_add(desired);
        if total > self.memory_limit_bytes {
            // `memory.grow` fails (returns -1) as the spec says it may; a guest that cannot cope
            // traps, and the flag names the cause.
            self.memory_limit_hit = true;
            return Ok(false);
        }
        self.memory_bytes = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES_PER_PLUGIN
    }

    fn tables(&self) -> usize {
        MAX_TABLES_PER_PLUGIN
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES_PER_PLUGIN
    }
}

/// The guest's stdout and stderr, of which the last [`MAX_CAPTURED_OUTPUT_BYTES`] are kept: a
/// Rust guest prints its panic message there just before it traps.
#[derive(Clone, Default)]
pub(crate) struct CapturedOutput {
    tail: Arc<Mutex<VecDeque<u8>>>,
}

impl CapturedOutput {
    fn append(&self, bytes: &[u8]) {
        let mut tail = self.tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let keep = bytes.len().min(MAX_CAPTURED_OUTPUT_BYTES);
        tail.extend(&bytes[bytes.len() - keep..]);
        let excess = tail.len().saturating_sub(MAX_CAPTURED_OUTPUT_BYTES);
        tail.drain(..excess);
    }

    /// The kept tail, lossily decoded, its lines joined with " | " so that an error stays one line.
    pub(crate) fn text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let bytes: Vec<u8> = tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
        lines.join(" | ")
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always room: old output makes way for new.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(self: Pin<&mut Self>, _context: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        self.append(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `text` cut to at most `max_bytes` at a character boundary.
pub(crate) fn truncate_at_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// The type-only interfaces have nothing to implement.
impl crate::bindings::vcs_world::flotilla::plugin::types::Host for HostState {}
impl crate::bindings::vcs_world::flotilla::plugin::vcs::Host for HostState {}
impl crate::bindings::tool_world::flotilla::plugin::tool_types::Host for HostState {}

impl crate::bindings::vcs_world::flotilla::plugin::settings::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.settings.get(&key).cloned()
    }
}

impl wit_log::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.log_lines_written = self.log_lines_written.saturating_add(1);
        let plugin = &*self.plugin;
        if self.log_lines_written > MAX_LOG_LINES_PER_CALL {
            if self.log_lines_written == MAX_LOG_LINES_PER_CALL + 1 {
                tracing::warn!(%plugin, "plugin wrote more than {MAX_LOG_LINES_PER_CALL} log lines in one call; the rest are dropped");
            }
            return;
        }
        let max_bytes = self.shared.config.max_log_line_bytes;
        let line = truncate_at_char_boundary(&message, max_bytes);
        let cut = if line.len() < message.len() { " [cut]" } else { "" };
        match level {
            Level::Debug => tracing::debug!(%plugin, "{line}{cut}"),
            Level::Info => tracing::info!(%plugin, "{line}{cut}"),
            Level::Warn => tracing::warn!(%plugin, "{line}{cut}"),
            Level::Error => tracing::error!(%plugin, "{line}{cut}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_output_keeps_the_tail() {
        let output = CapturedOutput::default();
        output.append(&vec![b'a'; MAX_CAPTURED_OUTPUT_BYTES]);
        output.append(b"panicked at src/lib.rs:9:9:\nthe end\n");
        let text = output.text();
        assert!(text.len() <= MAX_CAPTURED_OUTPUT_BYTES + 2, "{}", text.len());
        assert!(text.ends_with("panicked at src/lib.rs:9:9: | the end"), "{text}");
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate_at_char_boundary("héllo", 2), "h");
        assert_eq!(truncate_at_char_boundary("héllo", 3), "hé");
        assert_eq!(truncate_at_char_boundary("hi", 10), "hi");
    }

    #[test]
    fn the_memory_bound_counts_all_memories() {
        let mut limiter = CallLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        assert!(limiter.memory_growing(0, 40, None).unwrap());
        assert!(!limiter.memory_growing(40, 41, None).unwrap());
        assert!(limiter.memory_limit_hit);
        assert!(limiter.memory_growing(60, 60, None).unwrap());
    }
}
