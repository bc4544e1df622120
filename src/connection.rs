//! One task per WebSocket connection: a single `select!` loop over kick / shutdown / outbound
//! queue / inbound frames / timers, and the cleanup that runs on every exit path.
//!
//! The task owns the socket. Events reach it only through its bounded queue (see `registry`);
//! it writes whatever is already queued in one flush, so a burst costs one syscall, and an
//! event that arrives alone is written at once. Heartbeat, dead-peer and idle checks share one
//! timer re-armed to the nearest deadline.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::config::{enabled, Config, Limits};
use crate::limits::{ConnPermit, RateDecision, RateLimiter};
use crate::metrics::CloseReason;
use crate::protocol::{self, AdvertisedLimits, ClientMessage};
use crate::registry::ConnShared;
use crate::state::Gateway;
use crate::topic::TopicName;

/// Queued events written in one flush, at most.
const BATCH_MAX_MESSAGES: usize = 64;
/// Bytes of queued events written in one flush, at most (one event may exceed it alone).
const BATCH_MAX_BYTES: usize = 64 * 1024;
/// A write (or flush) that makes no progress for this long ends the connection, when no
/// heartbeat timeout is configured to bound it.
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-connection read buffer: room for the usual subscribe/ping message in one read.
const READ_BUFFER_BYTES: usize = 512;
/// The largest publish body the config accepts (`admin.max_publish_bytes` ceiling).
const MAX_EVENT_BYTES_CEILING: usize = 64 * 1024 * 1024;
/// Stand-in deadline when every timer is disabled.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365);

/// What the connection serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The JSON client protocol.
    Client,
    /// Echoes every message back (conformance testing); same limits and code path.
    Echo,
}

/// Everything a connection task starts with.
pub struct ConnSetup {
    pub gateway: Arc<Gateway>,
    /// The config in force when the connection was accepted: the limits advertised to the client
    /// stay the ones it enforces for its whole life.
    pub config: Arc<Config>,
    pub shared: Arc<ConnShared>,
    pub permit: ConnPermit,
    pub mode: Mode,
    /// Topics this connection may subscribe to, when an auth backend restricted it.
    pub allowed_topics: Option<Arc<BTreeSet<TopicName>>>,
}

/// tungstenite's defaults suit a client, not an edge daemon (128 KiB read buffer per connection,
/// 64 MiB messages, an unbounded write buffer): every field comes from our limits.
pub fn ws_config(limits: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        // Allocated (and zero-filled on the first read) per connection, idle or not: small,
        // since client messages are small JSON. A larger message (up to the cap) makes
        // tungstenite reserve its whole length when the frame header arrives.
        .read_buffer_size(READ_BUFFER_BYTES)
        // Only our replies, pings and closes go through tungstenite's write buffer (events are
        // written pre-framed, see `write_pending`), and each is flushed at once.
        .write_buffer_size(0)
        // The buffer only grows past one batch while the socket blocks, and we never feed more
        // than one batch plus one event (or reply) before flushing: this cap is a backstop, set
        // from the largest event a publish can ever carry (admin.max_publish_bytes may be
        // raised on reload; a connection must not fail because of that).
        .max_write_buffer_size(BATCH_MAX_BYTES + MAX_EVENT_BYTES_CEILING + 64 * 1024)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes))
        .accept_unmasked_frames(false)
}

/// How the loop ended.
enum Exit {
    /// Send a close frame with this code and reason, then finish the closing handshake.
    Close(CloseReason, CloseCode, &'static str),
    /// The peer closed or vanished; flush what tungstenite owes it and stop.
    Gone(CloseReason),
    /// Server shutdown: flush the queue, say goodbye, close 1001.
    Shutdown,
}

/// Releases everything the connection held, on every exit path (including a panic): its
/// subscriptions, its registry entry and, by dropping the permit, its connection slot.
struct Cleanup {
    gateway: Arc<Gateway>,
    shared: Arc<ConnShared>,
    _permit: ConnPermit,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.shared.outbox.close();
        for topic in self.shared.take_subscriptions() {
            self.gateway.hub.unsubscribe(&topic, self.shared.id);
        }
        self.gateway.registry.remove(self.shared.id);
        let reason = self.shared.set_close_reason(CloseReason::Error);
        self.gateway.metrics.closed(reason);
        debug!(reason = reason.label(), "connection closed");
    }
}

struct Conn<S> {
    ws: WebSocketStream<S>,
    /// Pre-framed events taken from the outbox and not yet fully written; the front one may be
    /// partly written. Empty whenever the loop waits, so tungstenite's own writes (replies,
    /// pings, close) never land inside an event frame.
    pending: VecDeque<Bytes>,
    /// The outbox had more than one batch: write again before waiting.
    more_queued: bool,
    /// Full length of the front pending frame, to tell a partly written one.
    pending_front_len: usize,
    /// When draining: the moment this connection says goodbye.
    goodbye_at: Option<Instant>,
    gateway: Arc<Gateway>,
    config: Arc<Config>,
    shared: Arc<ConnShared>,
    mode: Mode,
    allowed_topics: Option<Arc<BTreeSet<TopicName>>>,
    write_timeout: Duration,
    last_rx: Instant,
    last_app: Instant,
    next_ping: Option<Instant>,
    rate: RateLimiter,
}

/// Registers the connection and returns the future that runs it to its end.
///
/// Not an `async fn`: its arguments would stay in the future's state next to the `Conn` they
/// are moved into, doubling the socket's share of every connection's memory.
pub fn run<S>(ws: WebSocketStream<S>, setup: ConnSetup) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ConnSetup {
        gateway,
        config,
        shared,
        permit,
        mode,
        allowed_topics,
    } = setup;
    gateway.registry.insert(Arc::clone(&shared));
    gateway.metrics.connections_opened.fetch_add(1, Relaxed);
    let cleanup = Cleanup {
        gateway: Arc::clone(&gateway),
        shared: Arc::clone(&shared),
        _permit: permit,
    };
    let now = Instant::now();
    let limits = &config.limits;
    let mut conn = Conn {
        write_timeout: enabled(limits.heartbeat_timeout).unwrap_or(DEFAULT_WRITE_TIMEOUT),
        next_ping: enabled(limits.heartbeat_interval).map(|i| now + i),
        rate: RateLimiter::new(limits.max_message_rate_per_minute, now.into_std()),
        last_rx: now,
        last_app: now,
        ws,
        pending: VecDeque::new(),
        more_queued: false,
        pending_front_len: 0,
        goodbye_at: None,
        gateway,
        config: Arc::clone(&config),
        shared,
        mode,
        allowed_topics,
    };
    conn.shared.touch(now.into_std());
    async move {
        let _cleanup = cleanup;
        let exit = conn.serve().await;
        // Boxed: needed once, at the end; inline it would enlarge every idle connection.
        Box::pin(conn.finish(exit)).await;
    }
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn serve(&mut self) -> Exit {
        if self.mode == Mode::Client {
            let l = &self.config.limits;
            let hello = protocol::connection_established(
                &self.shared.client_id,
                AdvertisedLimits {
                    max_subscriptions: l.max_subscriptions,
                    message_rate_limit: l.max_message_rate_per_minute,
                    idle_timeout_secs: l.idle_timeout.as_secs(),
                },
            );
            if let Err(exit) = self.reply(hello).await {
                return exit;
            }
        }
        let timer = sleep_until(self.next_deadline());
        tokio::pin!(timer);
        loop {
            timer.as_mut().reset(self.next_deadline());
            tokio::select! {
                biased;
                () = self.shared.kicked() => return self.kicked_exit(),
                () = self.gateway.shutdown.cancelled(), if self.goodbye_at.is_none() => {
                    // The goodbye waits on the connection's one timer (see `on_timer`).
                    self.goodbye_at = Some(Instant::now() + self.goodbye_delay());
                }
                () = self.shared.outbox.ready(), if !self.more_queued => {
                    if let Err(exit) = self.write_events().await {
                        return exit;
                    }
                }
                () = std::future::ready(()), if self.more_queued => {
                    if let Err(exit) = self.write_events().await {
                        return exit;
                    }
                }
                frame = self.ws.next() => {
                    // Boxed: client messages are rare next to events, and inline this future
                    // would enlarge every connection's task for its whole life.
                    if let Err(exit) = Box::pin(self.on_frame(frame)).await {
                        return exit;
                    }
                }
                () = &mut timer => {
                    if let Err(exit) = Box::pin(self.on_timer()).await {
                        return exit;
                    }
                }
            }
        }
    }

    /// The nearest of the heartbeat, dead-peer and idle deadlines.
    fn next_deadline(&self) -> Instant {
        let l = &self.config.limits;
        [
            self.goodbye_at,
            self.next_ping,
            enabled(l.heartbeat_timeout).map(|t| self.last_rx + t),
            enabled(l.idle_timeout).map(|t| self.last_app + t),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + FAR_FUTURE)
    }

    async fn on_timer(&mut self) -> Result<(), Exit> {
        let now = Instant::now();
        let l = &self.config.limits;
        if self.goodbye_at.is_some_and(|at| now >= at) {
            return Err(Exit::Shutdown);
        }
        if enabled(l.heartbeat_timeout).is_some_and(|t| now >= self.last_rx + t) {
            return Err(Exit::Gone(CloseReason::DeadPeer));
        }
        if enabled(l.idle_timeout).is_some_and(|t| now >= self.last_app + t) {
            return Err(Exit::Close(CloseReason::Idle, CloseCode::Normal, "idle timeout"));
        }
        if let (Some(at), Some(every)) = (self.next_ping, enabled(l.heartbeat_interval)) {
            if now >= at {
                self.next_ping = Some(now + every);
                self.send(Message::Ping(Default::default())).await?;
            }
        }
        Ok(())
    }

    /// Spreads goodbyes over `shutdown.close_spread` so that thousands of clients do not all
    /// reconnect in the same millisecond: each connection waits a fixed fraction of the window
    /// derived from its id (a multiplicative hash, so consecutive ids land far apart).
    fn goodbye_delay(&self) -> Duration {
        let spread = self.gateway.config().shutdown.close_spread;
        let fraction =
            (self.shared.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        spread.mul_f64(fraction)
    }

    fn kicked_exit(&self) -> Exit {
        let reason = self.shared.close_reason().unwrap_or(CloseReason::Kicked);
        if self.mid_frame() {
            // Part of an event frame is on the wire: a close frame now would corrupt the stream.
            return Exit::Gone(reason);
        }
        match reason {
            CloseReason::SlowConsumer => Exit::Close(reason, CloseCode::Policy, "slow consumer"),
            CloseReason::Kicked => Exit::Close(reason, CloseCode::Policy, "disconnected by operator"),
            other => Exit::Close(other, CloseCode::Policy, "closed by server"),
        }
    }

    /// Whether an event frame has been partly written.
    fn mid_frame(&self) -> bool {
        self.pending
            .front()
            .is_some_and(|f| f.len() < self.pending_front_len)
    }

    /// Takes a batch from the outbox and writes it: whatever is queued goes out in as few
    /// (vectored) writes as the socket allows; a lone event is written at once.
    async fn write_events(&mut self) -> Result<(), Exit> {
        self.more_queued =
            self.shared
                .outbox
                .take_batch(&mut self.pending, BATCH_MAX_MESSAGES, BATCH_MAX_BYTES);
        if self.pending.is_empty() {
            return Ok(());
        }
        self.pending_front_len = self.pending.front().map_or(0, Bytes::len);
        let count = self.pending.len() as u64;
        let shared = Arc::clone(&self.shared);
        let result = tokio::select! {
            r = timeout(self.write_timeout, self.write_pending()) => r,
            () = shared.kicked() => return Err(self.kicked_exit()),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "write failed");
                return Err(Exit::Gone(CloseReason::Client));
            }
            // The peer stopped reading long enough to fill every buffer between us.
            Err(_) => return Err(Exit::Gone(CloseReason::SlowConsumer)),
        }
        shared.messages_sent.fetch_add(count, Relaxed);
        self.last_app = Instant::now();
        shared.touch(self.last_app.into_std());
        Ok(())
    }

    /// Writes every pending frame straight to the socket, bypassing tungstenite's write buffer:
    /// the frames are already encoded and shared by all subscribers, so copying them into a
    /// per-connection buffer would only cost time and memory. Cancel-safe: progress is kept in
    /// `pending` (the front frame is advanced in place).
    async fn write_pending(&mut self) -> std::io::Result<()> {
        // tungstenite may still hold part of a frame of its own (an automatic pong): it must be
        // on the wire before any raw bytes.
        self.ws
            .flush()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        while !self.pending.is_empty() {
            // The slice array is built inside each poll, so it never lives across an await
            // (it would add 1 KiB to every connection task's future).
            let pending = &self.pending;
            let io = self.ws.get_mut();
            let mut written = std::future::poll_fn(|cx| {
                let mut slices = [IoSlice::new(&[]); BATCH_MAX_MESSAGES];
                let n = pending.len().min(BATCH_MAX_MESSAGES);
                for (slot, frame) in slices.iter_mut().zip(pending.iter()) {
                    *slot = IoSlice::new(frame);
                }
                std::pin::Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
            })
            .await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let Some(front) = self.pending.front_mut() else {
                    break;
                };
                if written >= front.len() {
                    written -= front.len();
                    self.pending.pop_front();
                    self.pending_front_len = self.pending.front().map_or(0, Bytes::len);
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        self.ws.get_mut().flush().await
    }

    /// Sends one reply to the client.
    async fn reply(&mut self, text: Utf8Bytes) -> Result<(), Exit> {
        self.send(Message::Text(text)).await?;
        self.shared.messages_sent.fetch_add(1, Relaxed);
        Ok(())
    }

    async fn send(&mut self, msg: Message) -> Result<(), Exit> {
        let shared = Arc::clone(&self.shared);
        let result = tokio::select! {
            r = timeout(self.write_timeout, self.ws.send(msg)) => r,
            () = shared.kicked() => return Err(self.kicked_exit()),
        };
        self.after_write(result)
    }

    fn after_write(
        &self,
        result: Result<Result<(), WsError>, tokio::time::error::Elapsed>,
    ) -> Result<(), Exit> {
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(error = %e, "write failed");
                Err(Exit::Gone(CloseReason::Client))
            }
            // The peer stopped reading long enough to fill every buffer between us.
            Err(_) => Err(Exit::Gone(CloseReason::SlowConsumer)),
        }
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Result<(), Exit> {
        let msg = match frame {
            None => return Err(Exit::Gone(CloseReason::Client)),
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return Err(read_error_exit(e)),
        };
        let now = Instant::now();
        self.last_rx = now;
        match msg {
            Message::Text(text) => {
                if !self.admit_message(now).await? {
                    return Ok(());
                }
                match self.mode {
                    Mode::Client => self.on_client_message(text.as_str()).await,
                    Mode::Echo => self.send(Message::Text(text)).await,
                }
            }
            Message::Binary(data) => match self.mode {
                Mode::Client => Err(Exit::Close(
                    CloseReason::Protocol,
                    CloseCode::Unsupported,
                    "binary messages are not supported",
                )),
                Mode::Echo => {
                    if !self.admit_message(now).await? {
                        return Ok(());
                    }
                    self.send(Message::Binary(data)).await
                }
            },
            // tungstenite answers pings itself; a pong only proves the peer is alive.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(Exit::Gone(CloseReason::Client)),
        }
    }

    /// Counts an application message and applies the rate limit: `Ok(false)` when this
    /// message is refused (the client was told), an exit when the client keeps flooding.
    async fn admit_message(&mut self, now: Instant) -> Result<bool, Exit> {
        self.gateway.metrics.messages_received.fetch_add(1, Relaxed);
        self.shared.messages_received.fetch_add(1, Relaxed);
        self.last_app = now;
        self.shared.touch(now.into_std());
        match self.rate.check(now.into_std()) {
            RateDecision::Allow => Ok(true),
            RateDecision::Refuse => {
                self.gateway.metrics.rate_limit_violations.fetch_add(1, Relaxed);
                let limit = self.config.limits.max_message_rate_per_minute;
                self.reply(protocol::rate_limit_exceeded(limit)).await?;
                Ok(false)
            }
            RateDecision::Disconnect => {
                self.gateway.metrics.rate_limit_violations.fetch_add(1, Relaxed);
                Err(Exit::Close(
                    CloseReason::RateLimit,
                    CloseCode::Policy,
                    "rate limit exceeded",
                ))
            }
        }
    }

    async fn on_client_message(&mut self, text: &str) -> Result<(), Exit> {
        let reply = match protocol::parse_client_message(text) {
            Err(message) => protocol::error(&message),
            Ok(ClientMessage::Ping) => protocol::pong(),
            Ok(ClientMessage::Subscribe(names)) => self.subscribe(&names),
            Ok(ClientMessage::Unsubscribe(names)) => self.unsubscribe(&names),
            Ok(ClientMessage::GetStatus) => {
                protocol::status(self.shared.info(), self.gateway.server_metrics())
            }
        };
        self.reply(reply).await
    }

    /// Validates every name first: the request is applied whole or not at all.
    fn topics(&self, names: &[String]) -> Result<Vec<TopicName>, Utf8Bytes> {
        let current = self.gateway.config();
        let mut out: Vec<TopicName> = Vec::with_capacity(names.len());
        for name in names {
            let topic = TopicName::parse(name, current.topics.max_name_length)
                .ok()
                .filter(|t| current.topics.allowed.as_ref().is_none_or(|a| a.contains(t)))
                .filter(|t| self.allowed_topics.as_ref().is_none_or(|a| a.contains(t)))
                .ok_or_else(|| protocol::invalid_event_type(name))?;
            if !out.contains(&topic) {
                out.push(topic);
            }
        }
        Ok(out)
    }

    fn subscribe(&mut self, names: &[String]) -> Utf8Bytes {
        let topics = match self.topics(names) {
            Ok(t) => t,
            Err(reply) => return reply,
        };
        let max = self.config.limits.max_subscriptions;
        let new: Vec<&TopicName> = topics.iter().filter(|t| !self.shared.is_subscribed(t)).collect();
        if self.shared.subscription_count() + new.len() > max {
            return protocol::subscription_error(max);
        }
        for topic in new {
            self.shared.add_subscription(topic.clone());
            self.gateway.hub.subscribe(topic, &self.shared);
        }
        protocol::subscription_confirmed(&topics)
    }

    fn unsubscribe(&mut self, names: &[String]) -> Utf8Bytes {
        // Unsubscribing needs no allowlist check: any syntactically valid name can be dropped.
        let max_len = self.gateway.config().topics.max_name_length;
        let mut topics: Vec<TopicName> = Vec::with_capacity(names.len());
        for name in names {
            match TopicName::parse(name, max_len) {
                Ok(t) if !topics.contains(&t) => topics.push(t),
                Ok(_) => {}
                Err(_) => return protocol::invalid_event_type(name),
            }
        }
        for topic in &topics {
            if self.shared.remove_subscription(topic) {
                self.gateway.hub.unsubscribe(topic, self.shared.id);
            }
        }
        protocol::unsubscription_confirmed(&topics)
    }

    /// Ends the connection the way `exit` says, bounded in time whatever the peer does.
    async fn finish(&mut self, exit: Exit) {
        match exit {
            Exit::Gone(reason) => {
                self.shared.set_close_reason(reason);
                self.shared.outbox.close();
                // Flushes the close reply tungstenite queued when the peer's close arrived.
                // (Not `WebSocketStream::close`, which would try to *send* a close frame,
                // fail with SendAfterClosing, and drop the queued reply: an unclean close.)
                let _ = timeout(CLOSE_TIMEOUT, SinkExt::close(&mut self.ws)).await;
            }
            Exit::Close(reason, code, why) => {
                self.shared.set_close_reason(reason);
                self.shared.outbox.close();
                self.close_handshake(code, why).await;
            }
            Exit::Shutdown => {
                let limit = self.write_timeout.min(CLOSE_TIMEOUT);
                // What is already queued goes out first, then the goodbye.
                let queued = async {
                    loop {
                        let more = self.shared.outbox.take_batch(
                            &mut self.pending,
                            BATCH_MAX_MESSAGES,
                            BATCH_MAX_BYTES,
                        );
                        self.write_pending().await?;
                        if !more {
                            return Ok::<(), std::io::Error>(());
                        }
                    }
                };
                let flushed = matches!(timeout(limit, queued).await, Ok(Ok(())));
                self.shared.set_close_reason(CloseReason::Shutdown);
                if !flushed {
                    return;
                }
                let goodbye = async {
                    self.ws.feed(Message::Text(protocol::server_shutdown())).await?;
                    self.ws.flush().await
                };
                if matches!(
                    timeout(self.write_timeout.min(CLOSE_TIMEOUT), goodbye).await,
                    Ok(Ok(()))
                ) {
                    self.close_handshake(CloseCode::Away, "server shutting down")
                        .await;
                }
            }
        }
    }

    /// Sends a close frame and waits (briefly) for the peer's, reading and discarding anything
    /// still in flight.
    async fn close_handshake(&mut self, code: CloseCode, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let closing = async {
            self.ws.close(Some(frame)).await?;
            while let Some(r) = self.ws.next().await {
                r?;
            }
            Ok::<(), WsError>(())
        };
        let _ = timeout(CLOSE_TIMEOUT, closing).await;
    }
}

/// Maps a read error to how the connection ends.
fn read_error_exit(e: WsError) -> Exit {
    match e {
        WsError::Capacity(_) => Exit::Close(CloseReason::TooBig, CloseCode::Size, "message too big"),
        WsError::Utf8(_) => Exit::Close(CloseReason::Protocol, CloseCode::Invalid, "invalid UTF-8"),
        // The peer vanished without a close frame: a client going away, not a violation.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Exit::Gone(CloseReason::Client),
        WsError::Protocol(p) => {
            debug!(error = %p, "protocol violation");
            Exit::Close(CloseReason::Protocol, CloseCode::Protocol, "protocol error")
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed => Exit::Gone(CloseReason::Client),
        other => {
            debug!(error = %other, "read failed");
            Exit::Gone(CloseReason::Client)
        }
    }
}
