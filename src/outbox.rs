//! `Outbox`: the one place that writes to a connection's socket, and its bounded queue.
//!
//! Every byte the server sends on a WebSocket goes through here, in order: events (pre-framed
//! once per publish and shared by all subscribers), replies, pings, and the frames tungstenite
//! itself emits (automatic pongs, close frames; see `SharedSocket`). Whoever holds the lock may
//! write, and writes only from the front of the queue, so frames can never interleave.
//!
//! The fast path is the floor server's: when nothing is queued, the publisher writes the frame
//! to the socket itself with one non-blocking `write` and the connection task is not woken at
//! all. Only when the socket cannot take a frame whole is the rest queued, and the connection
//! task, woken once, waits for writability and drains the queue with vectored writes. So a
//! burst costs one syscall per batch and a lone event one syscall, with no task hand-off.
//!
//! The queue is bounded by messages and bytes (a full queue is a slow consumer), allocates
//! nothing until something is queued, and gives its memory back after a burst. The lock is a
//! `std::sync::Mutex`, held for a non-blocking syscall at most and never across an `.await`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// After a burst, a drained queue keeps at most this many slots allocated.
const RETAINED_SLOTS: usize = 8;
/// Frames handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// Control frames and replies may exceed the event bounds by this much (they are few: the
/// client's own message rate and pings bound them) before the connection counts as stalled.
const CONTROL_SLACK_BYTES: usize = 64 * 1024;
const CONTROL_SLACK_MESSAGES: usize = 64;

/// What became of an offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket at once.
    Written,
    /// Queued behind other frames or for a socket that was full.
    Queued,
    /// Over the message or byte bound: nothing was queued.
    Full,
    /// The connection is closing or its socket failed: nothing was queued.
    Closed,
}

impl Push {
    pub fn delivered(self) -> bool {
        matches!(self, Push::Written | Push::Queued)
    }
}

pub struct Outbox {
    state: Mutex<State>,
    max_messages: usize,
    max_bytes: usize,
}

struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// The front entry is the rest of a frame already partly on the wire.
    front_partial: bool,
    closed: bool,
    /// A write failed: the connection is gone.
    failed: bool,
    socket: Option<Arc<TcpStream>>,
    /// The connection task, waiting for frames to drain.
    waker: Option<Waker>,
}

impl Outbox {
    pub fn new(max_messages: usize, max_bytes: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                front_partial: false,
                closed: false,
                failed: false,
                socket: None,
                waker: None,
            }),
            max_messages: max_messages.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under the lock completes before anything could panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the outbox the socket to write to (until then frames are only queued).
    pub fn attach(&self, socket: Arc<TcpStream>) {
        self.lock().socket = Some(socket);
    }

    /// Offers an event frame: written at once when nothing is queued and the socket takes it,
    /// queued otherwise, refused when the queue is at its bounds. Never waits.
    pub fn push(&self, frame: &Bytes) -> Push {
        self.offer(frame, self.max_messages, self.max_bytes, true)
    }

    /// Queues an event frame without writing it: a batch publish queues all of its events
    /// first, then calls `flush_now` once, so each subscriber gets the whole batch in one
    /// `writev` instead of one `write` per event.
    pub fn push_deferred(&self, frame: &Bytes) -> Push {
        self.offer(frame, self.max_messages, self.max_bytes, false)
    }

    /// Offers a control frame or reply (more slack than events; see `CONTROL_SLACK_BYTES`).
    pub fn push_control(&self, frame: &Bytes) -> Push {
        self.offer(
            frame,
            self.max_messages + CONTROL_SLACK_MESSAGES,
            self.max_bytes + CONTROL_SLACK_BYTES,
            true,
        )
    }

    /// Writes what is queued without waiting, as far as the socket takes it; what is left is
    /// handed to the connection task (woken to wait for writability).
    pub fn flush_now(&self) {
        let mut st = self.lock();
        if st.closed || st.failed {
            return;
        }
        let Some(socket) = st.socket.clone() else { return };
        while !st.queue.is_empty() {
            match st.write_some(&socket) {
                Ok(0) => {
                    st.failed = true;
                    break;
                }
                Ok(n) => st.consume(n),
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        st.failed = true;
                    }
                    break;
                }
            }
        }
        if !st.queue.is_empty() || st.failed {
            let waker = st.waker.take();
            drop(st);
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    fn offer(&self, frame: &Bytes, max_messages: usize, max_bytes: usize, direct: bool) -> Push {
        let mut st = self.lock();
        if st.closed || st.failed {
            return Push::Closed;
        }
        let len = frame.len();
        if st.queue.is_empty() && direct {
            if let Some(socket) = &st.socket {
                let outcome = match socket.try_write(frame) {
                    Ok(n) if n == len => return Push::Written,
                    Ok(n) => {
                        st.queue.push_back(frame.slice(n..));
                        st.front_partial = n > 0;
                        st.bytes += len - n;
                        Push::Queued
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        st.queue.push_back(frame.clone());
                        st.bytes += len;
                        Push::Queued
                    }
                    Err(_) => {
                        st.failed = true;
                        Push::Closed
                    }
                };
                // The connection task takes over: wait for writability, or notice the failure.
                let waker = st.waker.take();
                drop(st);
                if let Some(w) = waker {
                    w.wake();
                }
                return outcome;
            }
        } else if st.queue.len() >= max_messages || st.bytes + len > max_bytes {
            return Push::Full;
        }
        // One frame larger than the whole budget still goes through on an empty queue (the
        // publish body cap bounds it).
        st.queue.push_back(frame.clone());
        st.bytes += len;
        // A deferred frame is followed by `flush_now`, which wakes the task if it must.
        let waker = if st.queue.len() == 1 && direct {
            st.waker.take()
        } else {
            None
        };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        Push::Queued
    }

    /// Writes queued frames until the queue is empty (`Ready(Ok)`), the socket is full
    /// (`Pending`, woken when writable), or a write fails.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut st = self.lock();
            if st.failed {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if st.queue.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let Some(socket) = st.socket.clone() else {
                st.waker = Some(cx.waker().clone());
                return Poll::Pending;
            };
            match st.write_some(&socket) {
                Ok(0) => {
                    st.failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => st.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(st);
                    // Registers for writability; loops to write again once it is there.
                    if let Err(e) = ready!(socket.poll_write_ready(cx)) {
                        self.lock().failed = true;
                        return Poll::Ready(Err(e));
                    }
                }
                Err(e) => {
                    st.failed = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    /// For the connection task's loop: writes what is queued, then waits until something is
    /// queued again. Resolves only when the socket failed.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match ready!(self.poll_flush(cx)) {
            Err(e) => Poll::Ready(e),
            Ok(()) => {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    st.waker = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    // Something arrived between the flush and the lock: go round again.
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }
    }

    /// Drops every queued frame that has not started going out (a close frame is about to
    /// follow); a frame already partly written stays, so the stream remains well-formed.
    pub fn discard_unsent(&self) {
        let mut st = self.lock();
        let keep = if st.front_partial {
            st.queue.pop_front()
        } else {
            None
        };
        st.queue = VecDeque::new();
        st.bytes = 0;
        if let Some(front) = keep {
            st.bytes = front.len();
            st.queue.push_back(front);
        }
    }

    /// Refuses further frames and drops what is queued (the connection is over).
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.queue = VecDeque::new();
        st.bytes = 0;
        st.socket = None;
        st.waker = None;
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything queued, removed (for tests of what was queued where no socket is attached).
    #[cfg(test)]
    pub fn take_all(&self) -> Vec<Bytes> {
        let mut st = self.lock();
        st.bytes = 0;
        std::mem::take(&mut st.queue).into_iter().collect()
    }
}

impl State {
    /// One non-blocking `writev` of the front of the queue (up to `MAX_IOVECS` frames).
    fn write_some(&self, socket: &TcpStream) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let n = self.queue.len().min(MAX_IOVECS);
        for (slot, frame) in slices.iter_mut().zip(self.queue.iter()) {
            *slot = IoSlice::new(frame);
        }
        socket.try_write_vectored(&slices[..n])
    }

    /// Removes `n` written bytes from the front of the queue.
    fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.queue.pop_front();
                self.front_partial = false;
            } else {
                front.advance(n);
                self.front_partial = true;
                n = 0;
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > RETAINED_SLOTS {
            self.queue.shrink_to(RETAINED_SLOTS);
        }
    }
}

/// The socket as tungstenite sees it: reads go to the TCP stream; writes (automatic pongs,
/// close frames) become control frames in the outbox, so they take their place in line behind
/// whatever is queued instead of cutting into a frame on the wire.
pub struct SharedSocket {
    socket: Arc<TcpStream>,
    outbox: Arc<crate::registry::ConnShared>,
}

impl SharedSocket {
    pub fn new(socket: Arc<TcpStream>, outbox: Arc<crate::registry::ConnShared>) -> SharedSocket {
        SharedSocket { socket, outbox }
    }
}

impl AsyncRead for SharedSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.socket.poll_read_ready(cx))?;
            match self.socket.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; try_read cleared it, so the next poll registers again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedSocket {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // tungstenite writes whole frames from its buffer, and we take all of it at once, so
        // each call is complete frames.
        match self.outbox.outbox.push_control(&Bytes::copy_from_slice(buf)) {
            Push::Written | Push::Queued => Poll::Ready(Ok(buf.len())),
            Push::Full => Poll::Ready(Err(io::Error::other("send queue full"))),
            Push::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The outbox drains on its own schedule (see `Outbox::poll_drain`).
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn bounds_messages_and_bytes_without_a_socket() {
        let o = Outbox::new(3, 100);
        assert_eq!(o.push(&frame(10)), Push::Queued);
        assert_eq!(o.push(&frame(10)), Push::Queued);
        assert_eq!(o.push(&frame(10)), Push::Queued);
        assert_eq!(o.push(&frame(1)), Push::Full);
        // Control frames get some slack beyond the event bounds.
        assert_eq!(o.push_control(&frame(10)), Push::Queued);
        let o = Outbox::new(100, 100);
        assert_eq!(o.push(&frame(60)), Push::Queued);
        assert_eq!(o.push(&frame(60)), Push::Full);
        assert_eq!(o.push(&frame(40)), Push::Queued);
        // One oversized frame alone is accepted; behind another it is not.
        let o = Outbox::new(100, 100);
        assert_eq!(o.push(&frame(500)), Push::Queued);
        assert_eq!(o.push(&frame(1)), Push::Full);
    }

    #[test]
    fn closed_refuses_and_frees() {
        let o = Outbox::new(10, 1000);
        o.push(&frame(10));
        o.close();
        assert!(o.is_empty());
        assert_eq!(o.push(&frame(10)), Push::Closed);
    }

    async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (Arc::new(server), client)
    }

    #[tokio::test]
    async fn writes_directly_when_idle_and_queues_in_order_when_the_socket_is_full() {
        let (server, mut client) = socket_pair().await;
        let o = Arc::new(Outbox::new(100_000, 1 << 30));
        o.attach(Arc::clone(&server));
        assert_eq!(o.push(&Bytes::from_static(b"hello")), Push::Written);
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // Fill every buffer between us (the client is not reading): frames start to queue.
        let mut sent = Vec::new();
        let mut i: u32 = 0;
        loop {
            let f = Bytes::from(format!("<{i:08}>").repeat(1000));
            let r = o.push(&f);
            sent.push(f);
            i += 1;
            if r == Push::Queued {
                break;
            }
            assert_eq!(r, Push::Written);
        }
        for _ in 0..10 {
            let f = Bytes::from(format!("<{i:08}>").repeat(1000));
            assert_eq!(o.push(&f), Push::Queued);
            sent.push(f);
            i += 1;
        }
        // Drain with the connection task's flush while the client reads: every byte, in order.
        let expected: Vec<u8> = sent.concat();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == expected, "bytes out of order or lost");
        });
        let o2 = Arc::clone(&o);
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| o2.poll_flush(cx)),
        )
        .await
        .unwrap()
        .unwrap();
        reader.await.unwrap();
        assert!(o.is_empty());
    }

    #[tokio::test]
    async fn deferred_frames_go_out_together_on_flush_now() {
        let (server, mut client) = socket_pair().await;
        let o = Outbox::new(100, 1 << 20);
        o.attach(server);
        for i in 0..10u8 {
            assert_eq!(o.push_deferred(&Bytes::from(vec![b'a' + i; 3])), Push::Queued);
        }
        assert_eq!(o.len(), 10, "nothing is written before the flush");
        o.flush_now();
        assert!(o.is_empty());
        let mut got = [0u8; 30];
        client.read_exact(&mut got).await.unwrap();
        let expected: Vec<u8> = (0..10u8).flat_map(|i| [b'a' + i; 3]).collect();
        assert_eq!(&got[..], &expected[..]);
    }

    #[tokio::test]
    async fn discard_keeps_a_partly_written_frame() {
        let o = Outbox::new(10, 1000);
        o.push(&frame(10));
        o.push(&frame(20));
        {
            let mut st = o.lock();
            st.consume(4);
        }
        o.discard_unsent();
        let left = o.take_all();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].len(), 6, "the rest of the partly written frame stays");
        let o = Outbox::new(10, 1000);
        o.push(&frame(10));
        o.discard_unsent();
        assert!(o.is_empty());
    }
}
