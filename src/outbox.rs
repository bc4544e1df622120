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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes};
use socket2::SockRef;
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
    /// Queued by `push_deferred`, and nobody owed this connection a flush yet: the caller must
    /// call `flush_now` once its batch is queued. (Later frames of the batch answer `Queued`,
    /// so a batch flushes each connection once, however many of its events it gets.)
    Batched,
    /// Over the message or byte bound: nothing was queued.
    Full,
    /// The connection is closing or its socket failed: nothing was queued.
    Closed,
}

impl Push {
    pub fn delivered(self) -> bool {
        matches!(self, Push::Written | Push::Queued | Push::Batched)
    }
}

/// What is being offered: the bounds and the write policy follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An event, written at once to an idle socket.
    Event,
    /// An event of a batch: queued now, written by `flush_now` with the rest of the batch.
    Deferred,
    /// A reply or a frame of the protocol's own (pings, pongs, close): more slack, and never
    /// refused because events are.
    Control,
}

/// Laid out for the publisher's fast path: everything a delivery to an idle connection reads or
/// writes (the descriptor, the lock word, the queue's byte count, the flags, the activity stamp
/// and the sent counter) sits in the first ~85 bytes (two or three cache lines, almost always
/// one page), and `ConnShared` puts the outbox first. On its own this measured within noise
/// (the first touch of a cold connection costs the same whatever follows it); it is what lets
/// the fan-out's single warm-up load per subscriber (`warm`, see `Hub::fan_out`) bring in all a
/// delivery needs.
/// BENCHMARKS.md, "hot fields first" and "group warm-up".
#[repr(C)]
pub struct Outbox {
    /// The connection's socket, kept here rather than behind its own `Arc`: the publisher's
    /// direct write reads the descriptor next to the lock it takes, instead of chasing one more
    /// pointer per subscriber into memory gone cold since the last publish. Set once, when the
    /// upgrade is done; writes happen only under the lock, reads (tungstenite's, through
    /// `SharedSocket`) need none.
    socket: OnceLock<TcpStream>,
    /// `std`'s `Mutex` keeps its lock word in front of the data, so the lock and the hot head
    /// of `State` share the socket's cache lines (a unit test checks the layout).
    state: Mutex<State>,
    max_messages: usize,
    max_bytes: usize,
}

/// Hot fields first (see `Outbox`), the queue and the waker (slow path only) after them.
#[repr(C)]
struct State {
    /// Bytes queued; 0 exactly when the queue is empty (frames are never empty).
    bytes: usize,
    /// Messages handed to this connection (events and replies), for `/status`.
    sent: u64,
    /// The last application message in either direction, in `clock_ms` (see `registry.rs`).
    last_activity_ms: u64,
    /// The front entry is the rest of a frame already partly on the wire.
    front_partial: bool,
    closed: bool,
    /// A write failed: the connection is gone.
    failed: bool,
    /// No more events: a close frame (or the shutdown goodbye) is queued, or the connection was
    /// told to close, and RFC 6455 allows nothing after a close frame. Set under the same lock
    /// the close frame is queued under, so a publisher racing the close cannot slip an event in
    /// behind it.
    events_refused: bool,
    /// A batch queued frames here and will call `flush_now` (see `Push::Batched`).
    flush_owed: bool,
    queue: VecDeque<Bytes>,
    /// The connection task, waiting for frames to drain.
    waker: Option<Waker>,
}

impl Outbox {
    /// An outbox whose activity stamp starts at `now_ms` (see `registry::clock_ms`).
    pub fn new(max_messages: usize, max_bytes: usize, now_ms: u64) -> Outbox {
        Outbox {
            socket: OnceLock::new(),
            state: Mutex::new(State {
                bytes: 0,
                sent: 0,
                last_activity_ms: now_ms,
                front_partial: false,
                closed: false,
                failed: false,
                events_refused: false,
                flush_owed: false,
                queue: VecDeque::new(),
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

    /// Gives the outbox the socket to write to (until then frames are only queued). Once.
    pub fn attach(&self, socket: TcpStream) {
        let attached = self.socket.set(socket).is_ok();
        debug_assert!(attached, "a connection has one socket");
    }

    /// Reads the head of the outbox and discards it: brings the fast path's cache lines in
    /// (see `Hub::fan_out`, which warms several subscribers at once so their misses overlap).
    /// A plain load rather than a prefetch instruction: no `unsafe`, and the out-of-order core
    /// overlaps a run of independent loads just as well.
    pub fn warm(&self) {
        std::hint::black_box(self.socket.get().is_some());
    }

    /// The socket, once attached.
    pub fn socket(&self) -> Option<&TcpStream> {
        self.socket.get()
    }

    /// Offers an event frame: written at once when nothing is queued and the socket takes it,
    /// queued otherwise, refused when the queue is at its bounds. Never waits.
    /// An event counts as a message sent and as activity at `now_ms` (the publish time).
    pub fn push(&self, frame: &Bytes, now_ms: u64) -> Push {
        self.offer(frame, Kind::Event, now_ms)
    }

    /// Queues an event frame without writing it: a batch publish queues all of its events
    /// first, then calls `flush_now` for every connection that answered `Push::Batched`, so
    /// each subscriber gets the whole batch in one `writev` instead of one `write` per event.
    pub fn push_deferred(&self, frame: &Bytes, now_ms: u64) -> Push {
        self.offer(frame, Kind::Deferred, now_ms)
    }

    /// Offers a control frame or reply (more slack than events; see `CONTROL_SLACK_BYTES`).
    /// A close frame among them ends the events: none is accepted after it.
    pub fn push_control(&self, frame: &Bytes) -> Push {
        self.offer(frame, Kind::Control, 0)
    }

    /// Counts a reply as a message sent (events count themselves).
    pub fn count_sent(&self) {
        self.lock().sent += 1;
    }

    /// Messages handed to this connection.
    pub fn sent(&self) -> u64 {
        self.lock().sent
    }

    /// Records application activity at `now_ms`.
    pub fn touch(&self, now_ms: u64) {
        let mut st = self.lock();
        st.last_activity_ms = st.last_activity_ms.max(now_ms);
    }

    /// The last application activity, in `clock_ms`.
    pub fn last_activity_ms(&self) -> u64 {
        self.lock().last_activity_ms
    }

    /// Refuses events from now on; control frames still pass (the shutdown goodbye and the
    /// close frame go out after what is already queued, and nothing else does).
    pub fn refuse_events(&self) {
        self.lock().events_refused = true;
    }

    /// Writes what is queued without waiting, as far as the socket takes it; what is left is
    /// handed to the connection task (woken to wait for writability).
    pub fn flush_now(&self) {
        let mut st = self.lock();
        st.flush_owed = false;
        if st.closed || st.failed {
            return;
        }
        st.write_queued(self.socket.get());
        if !st.queue.is_empty() || st.failed {
            let waker = st.waker.take();
            drop(st);
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    fn offer(&self, frame: &Bytes, kind: Kind, now_ms: u64) -> Push {
        debug_assert!(!frame.is_empty(), "an empty frame would read as a failed write");
        let mut st = self.lock();
        let (outcome, wake) = self.offer_locked(&mut st, frame, kind);
        if kind != Kind::Control && outcome.delivered() {
            st.sent += 1;
            st.last_activity_ms = st.last_activity_ms.max(now_ms);
        }
        let waker = if wake { st.waker.take() } else { None };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        outcome
    }

    /// `offer` under the lock: what became of the frame, and whether the connection task must
    /// be woken (to wait for writability, drain, or notice a failure).
    fn offer_locked(&self, st: &mut State, frame: &Bytes, kind: Kind) -> (Push, bool) {
        if st.closed || st.failed || (kind != Kind::Control && st.events_refused) {
            return (Push::Closed, false);
        }
        if kind == Kind::Control && crate::protocol::holds_close_frame(frame) {
            st.events_refused = true;
        }
        let len = frame.len();
        // `bytes` rather than `queue.is_empty()`: it is on the hot cache line, the queue is not.
        if st.bytes == 0 && kind != Kind::Deferred {
            if let Some(socket) = self.socket.get() {
                // A plain `send(2)` on the borrowed descriptor rather than tokio's `try_write`:
                // this path never waits, so tokio's readiness bookkeeping (one more cache line
                // per subscriber, and the largest user-space symbol in the fan-out profile) buys
                // nothing here. When the send would block, the connection task's `poll_flush`
                // goes through tokio, which then learns the socket is full and registers for
                // writability (a stale "writable" costs it one extra `EAGAIN`, never a hang).
                // SIGPIPE needs no flag: Rust ignores it in every binary, as tokio relies on too.
                // Anything but a whole write hands over to the connection task.
                return match SockRef::from(socket).send(frame) {
                    Ok(n) if n == len => (Push::Written, false),
                    Ok(n) => {
                        st.queue.push_back(frame.slice(n..));
                        st.front_partial = n > 0;
                        st.bytes += len - n;
                        (Push::Queued, true)
                    }
                    Err(e) if retryable(&e) => {
                        st.queue.push_back(frame.clone());
                        st.bytes += len;
                        (Push::Queued, true)
                    }
                    Err(_) => {
                        st.failed = true;
                        (Push::Closed, true)
                    }
                };
            }
        }
        let (max_messages, max_bytes) = match kind {
            Kind::Control => (
                self.max_messages + CONTROL_SLACK_MESSAGES,
                self.max_bytes + CONTROL_SLACK_BYTES,
            ),
            Kind::Event | Kind::Deferred => (self.max_messages, self.max_bytes),
        };
        let over = |st: &State| st.queue.len() >= max_messages || st.bytes + len > max_bytes;
        // One frame larger than the whole budget still goes through on an empty queue (the
        // publish body cap bounds it).
        if !st.queue.is_empty() && over(st) {
            // A batch larger than the queue is not a slow consumer: write out what the socket
            // takes, and judge the client by what it cannot.
            if kind == Kind::Deferred {
                st.write_queued(self.socket.get());
            }
            if st.failed {
                return (Push::Closed, false);
            }
            if !st.queue.is_empty() && over(st) {
                return (Push::Full, false);
            }
        }
        st.queue.push_back(frame.clone());
        st.bytes += len;
        if kind == Kind::Deferred {
            // `flush_now` follows, and wakes the task if it must.
            let owed = std::mem::replace(&mut st.flush_owed, true);
            return (if owed { Push::Queued } else { Push::Batched }, false);
        }
        (Push::Queued, st.queue.len() == 1)
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
            let Some(socket) = self.socket.get() else {
                st.waker = Some(cx.waker().clone());
                return Poll::Pending;
            };
            match st.write_some(socket) {
                Ok(0) => {
                    st.failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => st.consume(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
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
                } else {
                    // Something arrived between the flush and the lock: go round again.
                    drop(st);
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
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

/// A failed non-blocking write that is worth trying again later (the socket is full, or a
/// signal interrupted the call), as opposed to a dead connection.
fn retryable(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

impl State {
    /// Writes from the front of the queue until it is empty or the socket is full; a write
    /// error marks the connection failed. Never waits.
    fn write_queued(&mut self, socket: Option<&TcpStream>) {
        let Some(socket) = socket else {
            return;
        };
        while !self.queue.is_empty() {
            match self.write_some(socket) {
                Ok(0) => {
                    self.failed = true;
                    break;
                }
                Ok(n) => self.consume(n),
                Err(e) => {
                    if !retryable(&e) {
                        self.failed = true;
                    }
                    break;
                }
            }
        }
    }

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
    conn: Arc<crate::registry::ConnShared>,
}

impl SharedSocket {
    /// Over the socket attached to `conn`'s outbox.
    pub fn new(conn: Arc<crate::registry::ConnShared>) -> SharedSocket {
        SharedSocket { conn }
    }
}

impl AsyncRead for SharedSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Some(socket) = self.conn.outbox.socket() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        loop {
            ready!(socket.poll_read_ready(cx))?;
            match socket.try_read(buf.initialize_unfilled()) {
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
        match self.conn.outbox.push_control(&Bytes::copy_from_slice(buf)) {
            Push::Written | Push::Queued | Push::Batched => Poll::Ready(Ok(buf.len())),
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
        let o = Outbox::new(3, 100, 0);
        assert_eq!(o.push(&frame(10), 0), Push::Queued);
        assert_eq!(o.push(&frame(10), 0), Push::Queued);
        assert_eq!(o.push(&frame(10), 0), Push::Queued);
        assert_eq!(o.push(&frame(1), 0), Push::Full);
        // Control frames get some slack beyond the event bounds.
        assert_eq!(o.push_control(&frame(10)), Push::Queued);
        let o = Outbox::new(100, 100, 0);
        assert_eq!(o.push(&frame(60), 0), Push::Queued);
        assert_eq!(o.push(&frame(60), 0), Push::Full);
        assert_eq!(o.push(&frame(40), 0), Push::Queued);
        // One oversized frame alone is accepted; behind another it is not.
        let o = Outbox::new(100, 100, 0);
        assert_eq!(o.push(&frame(500), 0), Push::Queued);
        assert_eq!(o.push(&frame(1), 0), Push::Full);
    }

    /// The fast path's fields (socket, lock word, hot head of `State`) stay within the first
    /// 96 bytes, wherever the allocator puts the connection. A change in `std`'s `Mutex` or
    /// `OnceLock` layout that broke this would cost performance, not correctness; this test
    /// says so instead of a benchmark weeks later.
    #[test]
    fn the_fast_path_fields_are_packed_at_the_front() {
        use std::mem::offset_of;
        let o = Outbox::new(1, 1, 0);
        let outbox_at = &o as *const Outbox as usize;
        let guard = o.lock();
        let state_at = &*guard as *const State as usize - outbox_at;
        let hot_end = state_at + offset_of!(State, flush_owed) + 1;
        assert!(offset_of!(Outbox, socket) == 0, "the socket comes first");
        assert!(hot_end <= 96, "hot fields end at byte {hot_end}");
        assert!(offset_of!(State, queue) > offset_of!(State, flush_owed));
        assert_eq!(offset_of!(crate::registry::ConnShared, outbox), 0);
    }

    #[test]
    fn closed_refuses_and_frees() {
        let o = Outbox::new(10, 1000, 0);
        o.push(&frame(10), 0);
        o.close();
        assert!(o.is_empty());
        assert_eq!(o.push(&frame(10), 0), Push::Closed);
    }

    async fn socket_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (server, client)
    }

    #[tokio::test]
    async fn writes_directly_when_idle_and_queues_in_order_when_the_socket_is_full() {
        let (server, mut client) = socket_pair().await;
        let o = Arc::new(Outbox::new(100_000, 1 << 30, 0));
        o.attach(server);
        assert_eq!(o.push(&Bytes::from_static(b"hello"), 0), Push::Written);
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // Fill every buffer between us (the client is not reading): frames start to queue.
        let mut sent = Vec::new();
        let mut i: u32 = 0;
        loop {
            let f = Bytes::from(format!("<{i:08}>").repeat(1000));
            let r = o.push(&f, 0);
            sent.push(f);
            i += 1;
            if r == Push::Queued {
                break;
            }
            assert_eq!(r, Push::Written);
        }
        for _ in 0..10 {
            let f = Bytes::from(format!("<{i:08}>").repeat(1000));
            assert_eq!(o.push(&f, 0), Push::Queued);
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
        let o = Outbox::new(100, 1 << 20, 0);
        o.attach(server);
        for i in 0..10u8 {
            let expected = if i == 0 { Push::Batched } else { Push::Queued };
            assert_eq!(o.push_deferred(&Bytes::from(vec![b'a' + i; 3]), 0), expected);
        }
        assert_eq!(o.len(), 10, "nothing is written before the flush");
        o.flush_now();
        assert!(o.is_empty());
        let mut got = [0u8; 30];
        client.read_exact(&mut got).await.unwrap();
        let expected: Vec<u8> = (0..10u8).flat_map(|i| [b'a' + i; 3]).collect();
        assert_eq!(&got[..], &expected[..]);
    }

    #[test]
    fn a_batch_owes_each_connection_one_flush() {
        let o = Outbox::new(100, 1 << 20, 0);
        assert_eq!(o.push_deferred(&frame(3), 0), Push::Batched);
        assert_eq!(o.push_deferred(&frame(3), 0), Push::Queued);
        o.flush_now();
        assert_eq!(o.push_deferred(&frame(3), 0), Push::Batched);
    }

    /// Publishers on other threads race the connection queueing its close frame: whatever
    /// they manage to send must be on the wire before the close frame, never after it.
    #[test]
    fn no_event_follows_a_close_frame() {
        use std::io::Read;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        const EVENT: &[u8] = &[0x81, 0x01, b'E'];
        const CLOSE: &[u8] = &[0x88, 0x02, 0x03, 0xE8];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for round in 0..100 {
            let (server, client) = rt.block_on(socket_pair());
            let o = Arc::new(Outbox::new(1 << 20, 1 << 30, 0));
            o.attach(server);
            let stop = Arc::new(AtomicBool::new(false));
            let pushes = Arc::new(AtomicUsize::new(0));
            let publishers: Vec<_> = (0..3)
                .map(|_| {
                    let (o, stop, pushes) = (Arc::clone(&o), Arc::clone(&stop), Arc::clone(&pushes));
                    std::thread::spawn(move || {
                        while !stop.load(Relaxed) {
                            let r = o.push(&Bytes::from_static(EVENT), 0);
                            pushes.fetch_add(1, Relaxed);
                            if r == Push::Closed {
                                break;
                            }
                        }
                    })
                })
                .collect();
            // The close goes in while the publishers are in full swing, and they keep trying
            // after it until each has been refused (or, were events not refused, for a while).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let wait_until = |what: &str, done: &dyn Fn() -> bool| {
                while !done() {
                    assert!(std::time::Instant::now() < deadline, "round {round}: {what}");
                    std::thread::yield_now();
                }
            };
            wait_until("publishers did not start", &|| pushes.load(Relaxed) >= 50);
            assert!(o.push_control(&Bytes::from_static(CLOSE)).delivered());
            let at_close = pushes.load(Relaxed);
            wait_until("publishers stalled", &|| {
                publishers.iter().all(|p| p.is_finished()) || pushes.load(Relaxed) >= at_close + 300
            });
            stop.store(true, Relaxed);
            for p in publishers {
                p.join().unwrap();
            }
            o.close();
            drop(o);
            let mut client = client.into_std().unwrap();
            client.set_nonblocking(false).unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            let tail = got
                .windows(CLOSE.len())
                .position(|w| w == CLOSE)
                .map(|i| &got[i + CLOSE.len()..]);
            assert_eq!(tail, Some(&[][..]), "round {round}: bytes after the close frame");
        }
    }

    #[tokio::test]
    async fn discard_keeps_a_partly_written_frame() {
        let o = Outbox::new(10, 1000, 0);
        o.push(&frame(10), 0);
        o.push(&frame(20), 0);
        {
            let mut st = o.lock();
            st.consume(4);
        }
        o.discard_unsent();
        let left = o.take_all();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].len(), 6, "the rest of the partly written frame stays");
        let o = Outbox::new(10, 1000, 0);
        o.push(&frame(10), 0);
        o.discard_unsent();
        assert!(o.is_empty());
    }
}
