//! Coalesced writes on the server's connections. HTTP/2 answers each call on a connection from
//! its own task, and the connection's task writes whatever frames are queued when it runs. The
//! runtime runs a task it was just woken for next (its "last in, first out" slot), so when a
//! batch of writes is answered at once, the connection's task runs after each answer and writes
//! each one alone: one TLS record and one `writev` per answer, and on loopback the receiver's
//! TCP processing with it.
//!
//! [`CoalescedWrites`] keeps what the connection writes and, at the connection's first flush,
//! yields its task once (to the back of the run queue) before writing: the answers whose tasks
//! were already runnable queue their frames meanwhile, and the next flush writes them all in one
//! record and one system call. A yield is not free (the runtime wakes an idle worker for the
//! yielded task), so a connection whose yields find nothing new to write (a lone client, one
//! answer at a time) stops yielding for a number of flushes that doubles with each such yield,
//! up to [`MAX_FLUSHES_WITHOUT_YIELD`], and yields at every flush again as soon as one yield
//! gathers more. Never a timer. What is kept is bounded: past [`MAX_KEPT_BYTES`] the kept
//! bytes are written first.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes kept for the next flush; a write that would go past it writes them out first,
/// and a write at least this large goes straight through.
pub const MAX_KEPT_BYTES: usize = 64 * 1024;
/// Most flushes a connection writes without yielding after its yields gathered nothing.
pub const MAX_FLUSHES_WITHOUT_YIELD: u32 = 32;

/// A connection whose writes are kept until a flush, and whose first flush yields once.
pub struct CoalescedWrites<T> {
    inner: T,
    /// Bytes accepted and not yet written to `inner`, from `written` on.
    kept: Vec<u8>,
    written: usize,
    /// The current flush has yielded once, with this many bytes pending: the next poll writes.
    yielded_at: Option<usize>,
    /// Flushes left that write without yielding, and how many the last useless yield earned.
    flushes_without_yield: u32,
    backoff: u32,
    /// The current flush is writing (it decided whether to yield already).
    writing: bool,
}

impl<T> CoalescedWrites<T> {
    pub fn new(inner: T) -> CoalescedWrites<T> {
        CoalescedWrites {
            inner,
            kept: Vec::new(),
            written: 0,
            yielded_at: None,
            flushes_without_yield: 0,
            backoff: 0,
            writing: false,
        }
    }

    #[cfg(test)]
    fn get_ref(&self) -> &T {
        &self.inner
    }

    fn pending_bytes(&self) -> usize {
        self.kept.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> CoalescedWrites<T> {
    /// Writes every kept byte to `inner`.
    fn poll_write_kept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.kept.len() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.kept[self.written..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += written;
        }
        self.kept.clear();
        self.written = 0;
        // A large burst does not leave a large buffer behind on an idle connection.
        if self.kept.capacity() > MAX_KEPT_BYTES {
            self.kept.shrink_to(MAX_KEPT_BYTES);
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: writes out what is kept if they would not fit.
    fn poll_room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.pending_bytes() + len > MAX_KEPT_BYTES {
            ready!(self.poll_write_kept(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room_for(cx, buf.len()))?;
        if buf.len() >= MAX_KEPT_BYTES {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.kept.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|buf| buf.len()).sum();
        ready!(this.poll_room_for(cx, len))?;
        if len >= MAX_KEPT_BYTES {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            this.kept.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.writing {
            let pending = this.pending_bytes();
            match this.yielded_at.take() {
                Some(before) if pending > before => this.backoff = 0,
                Some(_) => {
                    this.backoff = (this.backoff * 2).clamp(1, MAX_FLUSHES_WITHOUT_YIELD);
                    this.flushes_without_yield = this.backoff;
                }
                None if pending == 0 => {}
                None if this.flushes_without_yield > 0 => this.flushes_without_yield -= 1,
                None => {
                    // Woken from inside its own poll, the task goes to the back of the run
                    // queue (not the slot for the next task), behind the answers ready now.
                    this.yielded_at = Some(pending);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            this.writing = true;
        }
        ready!(this.poll_write_kept(cx))?;
        this.writing = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_kept(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for CoalescedWrites<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A writer that counts the writes that reach it.
    struct CountingWriter {
        bytes: Vec<u8>,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncWrite for CountingWriter {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes.fetch_add(1, Ordering::SeqCst);
            this.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn counting() -> (CoalescedWrites<CountingWriter>, Arc<AtomicUsize>) {
        let writes = Arc::new(AtomicUsize::new(0));
        let writer = CountingWriter {
            bytes: Vec::new(),
            writes: writes.clone(),
        };
        (CoalescedWrites::new(writer), writes)
    }

    #[tokio::test]
    async fn writes_before_a_flush_reach_the_connection_as_one_write_in_order() {
        let (mut connection, writes) = counting();
        connection.write_all(b"first ").await.unwrap();
        let taken = connection
            .write_vectored(&[IoSlice::new(b"second "), IoSlice::new(b"third")])
            .await
            .unwrap();
        assert_eq!(taken, 12, "both slices are taken whole");
        assert_eq!(writes.load(Ordering::SeqCst), 0, "nothing is written before a flush");
        connection.flush().await.unwrap();
        assert_eq!(writes.load(Ordering::SeqCst), 1);
        assert_eq!(connection.get_ref().bytes, b"first second third");
        connection.flush().await.unwrap();
        assert_eq!(writes.load(Ordering::SeqCst), 1, "an empty flush writes nothing");
    }

    #[tokio::test]
    async fn a_flush_yields_once_before_it_writes() {
        let (mut connection, writes) = counting();
        connection.write_all(b"answer").await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_pending());
        assert_eq!(writes.load(Ordering::SeqCst), 0);
        // Written while the flush was yielded: goes out with the first.
        connection.write_all(b" and another").await.unwrap();
        assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_ready());
        assert_eq!(writes.load(Ordering::SeqCst), 1);
        assert_eq!(connection.get_ref().bytes, b"answer and another");
    }

    /// Polls one flush to its end; whether it yielded first.
    fn flush_yielded(connection: &mut CoalescedWrites<CountingWriter>) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let yielded = Pin::new(&mut *connection).poll_flush(&mut cx).is_pending();
        if yielded {
            assert!(Pin::new(&mut *connection).poll_flush(&mut cx).is_ready());
        }
        yielded
    }

    #[tokio::test]
    async fn a_connection_whose_yields_gather_nothing_yields_less_often_until_one_does() {
        let (mut connection, writes) = counting();
        let mut yields = Vec::new();
        for _ in 0..8 {
            connection.write_all(b"lone answer").await.unwrap();
            yields.push(flush_yielded(&mut connection));
        }
        // Yield, then 1 flush without; yield, 2 without; yield, 4 without...
        assert_eq!(yields, [true, false, true, false, false, true, false, false]);
        assert_eq!(writes.load(Ordering::SeqCst), 8);

        // A yield that gathers more puts the connection back to yielding at every flush.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            connection.write_all(b"first").await.unwrap();
            if Pin::new(&mut connection).poll_flush(&mut cx).is_pending() {
                break;
            }
        }
        connection.write_all(b"second").await.unwrap();
        assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_ready());
        for _ in 0..3 {
            connection.write_all(b"answer").await.unwrap();
            connection.write_all(b"another").await.unwrap();
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_pending());
            connection.write_all(b"joined").await.unwrap();
            assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_ready());
        }
        // The backoff never passes its bound.
        for _ in 0..200 {
            connection.write_all(b"lone answer").await.unwrap();
            flush_yielded(&mut connection);
        }
        assert!(connection.backoff <= MAX_FLUSHES_WITHOUT_YIELD);
    }

    #[tokio::test]
    async fn what_is_kept_stays_bounded() {
        let (mut connection, writes) = counting();
        let chunk = vec![7u8; MAX_KEPT_BYTES / 4 + 1];
        for _ in 0..4 {
            connection.write_all(&chunk).await.unwrap();
        }
        assert_eq!(
            writes.load(Ordering::SeqCst),
            1,
            "the fourth chunk wrote out the first three"
        );
        assert!(connection.pending_bytes() <= MAX_KEPT_BYTES);
        let large = vec![9u8; MAX_KEPT_BYTES];
        connection.write_all(&large).await.unwrap();
        assert_eq!(
            writes.load(Ordering::SeqCst),
            3,
            "a large write goes through after what was kept"
        );
        connection.flush().await.unwrap();
        assert_eq!(connection.get_ref().bytes.len(), 4 * chunk.len() + large.len());
    }

    #[tokio::test]
    async fn a_shutdown_writes_what_is_kept() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut connection = CoalescedWrites::new(client);
        connection.write_all(b"last words").await.unwrap();
        connection.shutdown().await.unwrap();
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last words");
    }
}
