//! One task per WebSocket connection: a single `select!` loop over kick / shutdown / outbox /
//! inbound frames / timers, and the cleanup that runs on every exit path.
//!
//! The task reads; it does not own the writing. Every outbound frame (events, replies, pings,
//! close frames) goes through the connection's `Outbox`, which publishers write through
//! directly while the socket keeps up; the task only drains what the socket could not take at
//! once (see `outbox`). Heartbeat, dead-peer, idle and goodbye deadlines share one timer
//! re-armed to the nearest of them.

use std::collections::BTreeSet;
use std::future::poll_fn;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
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
use crate::outbox::{Push, SharedSocket};
use crate::protocol::{self, AdvertisedLimits, ClientMessage};
use crate::registry::ConnShared;
use crate::state::Gateway;
use crate::topic::TopicName;

/// How long the closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-connection read buffer: room for the usual subscribe/ping message in one read.
const READ_BUFFER_BYTES: usize = 512;
/// tungstenite only ever writes its own small control frames (pongs, closes), and always
/// whole (see `SharedSocket`): its write buffer never needs more.
const TUNGSTENITE_WRITE_BUFFER_MAX: usize = 64 * 1024;
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
        .write_buffer_size(0)
        .max_write_buffer_size(TUNGSTENITE_WRITE_BUFFER_MAX)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes))
        .accept_unmasked_frames(false)
}

/// How the loop ended.
enum Exit {
    /// Send a close frame with this code and reason, then finish the closing handshake.
    Close(CloseReason, CloseCode, &'static str),
    /// The peer closed or vanished; send what tungstenite owes it and stop.
    Gone(CloseReason),
    /// Server shutdown: what is queued, then the goodbye, then close 1001.
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

struct Conn {
    ws: WebSocketStream<SharedSocket>,
    /// When draining: the moment this connection says goodbye.
    goodbye_at: Option<Instant>,
    gateway: Arc<Gateway>,
    config: Arc<Config>,
    shared: Arc<ConnShared>,
    mode: Mode,
    allowed_topics: Option<Arc<BTreeSet<TopicName>>>,
    last_rx: Instant,
    next_ping: Option<Instant>,
    rate: RateLimiter,
}

/// Registers the connection and returns the future that runs it to its end.
///
/// Not an `async fn`: its arguments would stay in the future's state next to the `Conn` they
/// are moved into, doubling the socket's share of every connection's memory.
pub fn run(ws: WebSocketStream<SharedSocket>, setup: ConnSetup) -> impl std::future::Future<Output = ()> {
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
        next_ping: enabled(limits.heartbeat_interval).map(|i| now + i),
        rate: RateLimiter::new(limits.max_message_rate_per_minute, now.into_std()),
        last_rx: now,
        ws,
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

impl Conn {
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
            if let Err(exit) = self.reply(hello.as_str()) {
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
                e = poll_fn(|cx| self.shared.outbox.poll_drain(cx)) => {
                    debug!(error = %e, "write failed");
                    return Exit::Gone(CloseReason::Client);
                }
                frame = self.ws.next() => {
                    // Boxed: client messages are rare next to events, and inline this future
                    // would enlarge every connection's task for its whole life.
                    if let Err(exit) = Box::pin(self.on_frame(frame)).await {
                        return exit;
                    }
                }
                () = &mut timer => {
                    if let Err(exit) = self.on_timer() {
                        return exit;
                    }
                }
            }
        }
    }

    /// The nearest of the goodbye, heartbeat, dead-peer and idle deadlines. Idle counts
    /// events written by publishers too (they record it in `ConnShared`).
    fn next_deadline(&self) -> Instant {
        let l = &self.config.limits;
        let last_app = Instant::from_std(self.shared.last_activity());
        [
            self.goodbye_at,
            self.next_ping,
            enabled(l.heartbeat_timeout).map(|t| self.last_rx + t),
            enabled(l.idle_timeout).map(|t| last_app + t),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + FAR_FUTURE)
    }

    fn on_timer(&mut self) -> Result<(), Exit> {
        let now = Instant::now();
        let l = &self.config.limits;
        if self.goodbye_at.is_some_and(|at| now >= at) {
            return Err(Exit::Shutdown);
        }
        if enabled(l.heartbeat_timeout).is_some_and(|t| now >= self.last_rx + t) {
            return Err(Exit::Gone(CloseReason::DeadPeer));
        }
        let last_app = Instant::from_std(self.shared.last_activity());
        if enabled(l.idle_timeout).is_some_and(|t| now >= last_app + t) {
            return Err(Exit::Close(CloseReason::Idle, CloseCode::Normal, "idle timeout"));
        }
        if let (Some(at), Some(every)) = (self.next_ping, enabled(l.heartbeat_interval)) {
            if now >= at {
                self.next_ping = Some(now + every);
                self.send_frame(&protocol::ping_frame())?;
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
        match self.shared.close_reason().unwrap_or(CloseReason::Kicked) {
            reason @ CloseReason::SlowConsumer => Exit::Close(reason, CloseCode::Policy, "slow consumer"),
            reason @ CloseReason::Kicked => {
                Exit::Close(reason, CloseCode::Policy, "disconnected by operator")
            }
            other => Exit::Close(other, CloseCode::Policy, "closed by server"),
        }
    }

    /// Queues (or writes at once) a frame of our own, in line behind queued events.
    fn send_frame(&self, frame: &Bytes) -> Result<(), Exit> {
        match self.shared.send_control(frame) {
            Push::Written | Push::Queued | Push::Batched => Ok(()),
            // The queue is over its bounds: the kick is pending and ends the loop.
            Push::Full => Ok(()),
            Push::Closed => Err(Exit::Gone(CloseReason::Client)),
        }
    }

    /// Sends one text reply to the client.
    fn reply(&self, text: &str) -> Result<(), Exit> {
        self.send_frame(&protocol::text_frame(text.as_bytes()))?;
        self.shared.outbox.count_sent();
        Ok(())
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
                if !self.admit_message(now)? {
                    return Ok(());
                }
                match self.mode {
                    Mode::Client => self.on_client_message(text.as_str()),
                    Mode::Echo => self.reply(text.as_str()),
                }
            }
            Message::Binary(data) => match self.mode {
                Mode::Client => Err(Exit::Close(
                    CloseReason::Protocol,
                    CloseCode::Unsupported,
                    "binary messages are not supported",
                )),
                Mode::Echo => {
                    if !self.admit_message(now)? {
                        return Ok(());
                    }
                    self.send_frame(&protocol::binary_frame(&data))?;
                    self.shared.outbox.count_sent();
                    Ok(())
                }
            },
            // tungstenite answers pings itself (through the outbox); a pong only proves the
            // peer is alive.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(Exit::Gone(CloseReason::Client)),
        }
    }

    /// Counts an application message and applies the rate limit: `Ok(false)` when this
    /// message is refused (the client was told), an exit when the client keeps flooding.
    fn admit_message(&mut self, now: Instant) -> Result<bool, Exit> {
        self.gateway.metrics.messages_received.fetch_add(1, Relaxed);
        self.shared.messages_received.fetch_add(1, Relaxed);
        self.shared.touch(now.into_std());
        match self.rate.check(now.into_std()) {
            RateDecision::Allow => Ok(true),
            RateDecision::Refuse => {
                self.gateway.metrics.rate_limit_violations.fetch_add(1, Relaxed);
                let limit = self.config.limits.max_message_rate_per_minute;
                self.reply(protocol::rate_limit_exceeded(limit).as_str())?;
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

    fn on_client_message(&mut self, text: &str) -> Result<(), Exit> {
        let reply = match protocol::parse_client_message(text) {
            Err(message) => protocol::error(&message),
            Ok(ClientMessage::Ping) => protocol::pong(),
            Ok(ClientMessage::Subscribe(names)) => self.subscribe(&names),
            Ok(ClientMessage::Unsubscribe(names)) => self.unsubscribe(&names),
            Ok(ClientMessage::GetStatus) => {
                protocol::status(self.shared.info(), self.gateway.server_metrics())
            }
        };
        self.reply(reply.as_str())
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
                // Hands over the close reply tungstenite queued when the peer's close arrived
                // (`SinkExt::close`, not `WebSocketStream::close`, which would try to send a new
                // close frame, fail with SendAfterClosing and drop the reply), then writes it.
                let _ = timeout(CLOSE_TIMEOUT, SinkExt::close(&mut self.ws)).await;
                self.flush_outbox(CLOSE_TIMEOUT).await;
            }
            Exit::Close(reason, code, why) => {
                self.shared.set_close_reason(reason);
                if reason == CloseReason::SlowConsumer {
                    // The client is not reading: do not make it wait behind the backlog.
                    self.shared.outbox.discard_unsent();
                }
                self.close_handshake(code, why).await;
            }
            Exit::Shutdown => {
                // Events published from here on are refused; those already queued go first.
                self.shared.set_close_reason(CloseReason::Shutdown);
                self.shared.outbox.refuse_events();
                let bye = protocol::server_shutdown();
                if self.send_frame(&protocol::text_frame(bye.as_bytes())).is_ok() {
                    self.close_handshake(CloseCode::Away, "server shutting down")
                        .await;
                }
            }
        }
    }

    /// Waits (at most `limit`) until everything queued is on the wire.
    async fn flush_outbox(&self, limit: Duration) -> bool {
        matches!(
            timeout(limit, poll_fn(|cx| self.shared.outbox.poll_flush(cx))).await,
            Ok(Ok(()))
        )
    }

    /// Sends a close frame (behind what is queued) and waits, within `CLOSE_TIMEOUT` in all,
    /// for the peer's, reading and discarding anything still in flight.
    async fn close_handshake(&mut self, code: CloseCode, reason: &'static str) {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // tungstenite records that we closed and emits the frame into the outbox.
        if !matches!(
            timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await,
            Ok(Ok(()))
        ) {
            return;
        }
        if !self
            .flush_outbox(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            return;
        }
        let ws = &mut self.ws;
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(r) = ws.next().await {
                if r.is_err() {
                    break;
                }
            }
        })
        .await;
        // The peer's close may have made tungstenite owe a reply; it is harmless to try.
        self.flush_outbox(Duration::from_millis(100)).await;
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
