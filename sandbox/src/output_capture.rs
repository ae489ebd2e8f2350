//! Bounded capture of a command's output, shared by the drivers: a stream keeps its first and
//! last halves within a byte budget, so both how a command started and how it ended survive.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Hard cap on a request's output limit, whatever the machine's limits say.
pub(crate) const MAX_OUTPUT_BYTES_CEILING: u64 = 64 * 1024 * 1024;
/// Bytes read from a pipe at once.
const PUMP_READ_BYTES: usize = 16 * 1024;

/// Keeps the first and the last part of a stream within a byte budget.
pub(crate) struct OutputCapture {
    head: Vec<u8>,
    head_limit: usize,
    tail: std::collections::VecDeque<u8>,
    tail_limit: usize,
    total_bytes: u64,
}

impl OutputCapture {
    pub(crate) fn new(limit_bytes: usize) -> Self {
        let tail_limit = limit_bytes / 2;
        OutputCapture {
            head: Vec::new(),
            head_limit: limit_bytes - tail_limit,
            tail: std::collections::VecDeque::new(),
            tail_limit,
            total_bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, mut data: &[u8]) {
        self.total_bytes += data.len() as u64;
        let head_room = self.head_limit - self.head.len();
        let into_head = head_room.min(data.len());
        self.head.extend_from_slice(&data[..into_head]);
        data = &data[into_head..];
        if self.tail_limit == 0 {
            return;
        }
        if data.len() >= self.tail_limit {
            self.tail.clear();
            self.tail.extend(&data[data.len() - self.tail_limit..]);
            return;
        }
        let overflow = (self.tail.len() + data.len()).saturating_sub(self.tail_limit);
        self.tail.drain(..overflow);
        self.tail.extend(data);
    }

    fn captured_bytes(&self) -> u64 {
        (self.head.len() + self.tail.len()) as u64
    }

    pub(crate) fn finish(self) -> (Vec<u8>, bool, u64) {
        let omitted = self.total_bytes - self.captured_bytes();
        let mut bytes = self.head;
        bytes.extend(self.tail);
        (bytes, omitted > 0, omitted)
    }
}

pub(crate) async fn pump<R: AsyncRead + Unpin>(mut reader: R, capture: Arc<Mutex<OutputCapture>>) {
    let mut buffer = vec![0u8; PUMP_READ_BYTES];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(count) => capture.lock().expect("capture lock").push(&buffer[..count]),
        }
    }
}

/// Takes what a shared capture holds, leaving an empty one that keeps nothing (a pump still
/// running behind a background process goes on reading into it, so that process does not die
/// of SIGPIPE on its next write).
pub(crate) fn take_capture(capture: &Mutex<OutputCapture>) -> (Vec<u8>, bool, u64) {
    let mut guard = capture.lock().expect("capture lock");
    std::mem::replace(&mut *guard, OutputCapture::new(0)).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_everything_within_the_limit() {
        let mut capture = OutputCapture::new(10);
        capture.push(b"hello");
        capture.push(b"world");
        assert_eq!(capture.finish(), (b"helloworld".to_vec(), false, 0));
    }

    #[test]
    fn capture_keeps_head_and_tail_beyond_the_limit() {
        let mut capture = OutputCapture::new(6);
        capture.push(b"abcdefghij");
        capture.push(b"klm");
        let (bytes, truncated, omitted) = capture.finish();
        assert_eq!(bytes, b"abcklm".to_vec());
        assert!(truncated);
        assert_eq!(omitted, 7);
    }
}
