//! The table of open connections, and `ConnShared`: what other tasks (the hub, the admin
//! endpoints) may see of, and do to, one connection.
//!
//! A connection's own task owns its socket; everybody else reaches it only through `ConnShared`:
//! queue an event (`try_deliver`, never waits), read its counters, or ask it to close (`kick`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::metrics::CloseReason;
use crate::outbox::{Outbox, Push};
use crate::protocol::rfc3339;
use crate::topic::TopicName;

/// Milliseconds since the process's clock epoch: the activity stamps' unit. One epoch for every
/// connection, so a publish computes the stamp once for all its subscribers and a delivery
/// stores it without reading anything else of the connection's.
pub fn clock_ms(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_millis()).unwrap_or(u64::MAX)
}

/// The instant `clock_ms` counts from.
fn clock_instant(ms: u64) -> Instant {
    *EPOCH + std::time::Duration::from_millis(ms)
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// One connection as seen from outside its task.
///
/// `repr(C)` with the outbox first: a delivery touches only the outbox's head (see `Outbox`),
/// which then starts 16 bytes into the allocation, right behind the `Arc` counts.
#[repr(C)]
pub struct ConnShared {
    /// Pre-framed events and replies, the socket, and the sent/activity counters.
    pub outbox: Outbox,
    pub id: u64,
    pub client_id: Box<str>,
    pub ip: IpAddr,
    pub connected_at: SystemTime,
    started: Instant,
    pub messages_received: AtomicU64,
    /// Topics subscribed to; bounded by the connection's `max_subscriptions`. The connection
    /// task is the only writer; the lock is never held across an `.await`.
    subscriptions: Mutex<Vec<TopicName>>,
    /// 0 while open; a `CloseReason` once something decided to close it.
    close_reason: AtomicU8,
    kick: Notify,
}

impl ConnShared {
    /// Creates the shared half, with an outbound queue bounded by messages and bytes.
    pub fn new(
        id: u64,
        client_id: Box<str>,
        ip: IpAddr,
        queue_messages: usize,
        queue_bytes: usize,
    ) -> Arc<ConnShared> {
        let started = Instant::now();
        Arc::new(ConnShared {
            outbox: Outbox::new(queue_messages, queue_bytes, clock_ms(started)),
            id,
            client_id,
            ip,
            connected_at: SystemTime::now(),
            started,
            messages_received: AtomicU64::new(0),
            subscriptions: Mutex::new(Vec::new()),
            close_reason: AtomicU8::new(0),
            kick: Notify::new(),
        })
    }

    /// Offers a pre-framed event without waiting: written at once when the socket is idle, or,
    /// when `deferred`, only queued (the caller then calls `outbox.flush_now()`).
    /// A full queue (by count or by bytes) marks the connection as a slow consumer: it is
    /// closed rather than allowed to hold memory or slow the publisher. `now_ms` is the
    /// publish time (`clock_ms`), taken once for all subscribers. A connection told to close
    /// refuses events (`kick`), so nothing but the outbox is read here.
    pub fn try_deliver(&self, frame: &Bytes, now_ms: u64, deferred: bool) -> Push {
        let r = if deferred {
            self.outbox.push_deferred(frame, now_ms)
        } else {
            self.outbox.push(frame, now_ms)
        };
        if r == Push::Full {
            self.kick(CloseReason::SlowConsumer);
        }
        r
    }

    /// Sends a reply or control frame from the connection task (in line behind queued events).
    pub fn send_control(&self, frame: &Bytes) -> Push {
        let r = self.outbox.push_control(frame);
        if r == Push::Full {
            self.kick(CloseReason::SlowConsumer);
        }
        r
    }

    /// The last application activity in either direction.
    pub fn last_activity(&self) -> Instant {
        clock_instant(self.outbox.last_activity_ms())
    }

    /// Events waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.outbox.len()
    }

    /// Asks the connection to close for `reason`. The first reason wins. No event is
    /// delivered after this (what is queued still goes out before the close frame).
    pub fn kick(&self, reason: CloseReason) {
        if self
            .close_reason
            .compare_exchange(0, reason as u8, Relaxed, Relaxed)
            .is_ok()
        {
            self.outbox.refuse_events();
            self.kick.notify_one();
        }
    }

    /// Records the reason the connection task itself decided on (if nobody decided before).
    pub fn set_close_reason(&self, reason: CloseReason) -> CloseReason {
        match self
            .close_reason
            .compare_exchange(0, reason as u8, Relaxed, Relaxed)
        {
            Ok(_) => reason,
            Err(prev) => CloseReason::from_u8(prev).unwrap_or(reason),
        }
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.close_reason.load(Relaxed))
    }

    /// Resolves when someone called `kick`.
    pub async fn kicked(&self) {
        self.kick.notified().await;
    }

    pub fn touch(&self, now: Instant) {
        self.outbox.touch(clock_ms(now));
    }

    pub fn idle_seconds(&self) -> f64 {
        let idle_ms = clock_ms(Instant::now()).saturating_sub(self.outbox.last_activity_ms());
        idle_ms as f64 / 1000.0
    }

    fn lock_subscriptions(&self) -> MutexGuard<'_, Vec<TopicName>> {
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscriptions(&self) -> Vec<TopicName> {
        self.lock_subscriptions().clone()
    }

    pub fn subscription_count(&self) -> usize {
        self.lock_subscriptions().len()
    }

    pub fn is_subscribed(&self, topic: &TopicName) -> bool {
        self.lock_subscriptions().contains(topic)
    }

    pub fn add_subscription(&self, topic: TopicName) {
        self.lock_subscriptions().push(topic);
    }

    pub fn remove_subscription(&self, topic: &TopicName) -> bool {
        let mut subs = self.lock_subscriptions();
        match subs.iter().position(|t| t == topic) {
            Some(i) => {
                subs.swap_remove(i);
                true
            }
            None => false,
        }
    }

    pub fn take_subscriptions(&self) -> Vec<TopicName> {
        std::mem::take(&mut *self.lock_subscriptions())
    }

    /// The `connection_info` object of `get_status` and the admin listings.
    pub fn info(&self) -> Value {
        json!({
            "client_id": &*self.client_id,
            "client_ip": self.ip.to_string(),
            "state": if self.close_reason().is_some() { "closing" } else { "connected" },
            "connected_at": rfc3339(self.connected_at),
            "age_seconds": self.started.elapsed().as_secs_f64(),
            "idle_time_seconds": self.idle_seconds(),
            "messages_sent": self.outbox.sent(),
            "messages_received": self.messages_received.load(Relaxed),
            "queue_depth": self.queue_depth(),
            "subscriptions": self.subscriptions().iter().map(TopicName::as_str).collect::<Vec<_>>(),
        })
    }
}

/// Open connections by internal id. Bounded by `limits.max_total_connections`: an entry exists
/// only while its connection holds a `ConnPermit`.
#[derive(Default)]
pub struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnShared>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnShared>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, conn: Arc<ConnShared>) {
        self.lock().insert(conn.id, conn);
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot, oldest first, filtered; at most `limit` entries.
    pub fn list(&self, limit: usize, filter: impl Fn(&ConnShared) -> bool) -> Vec<Arc<ConnShared>> {
        let mut all: Vec<Arc<ConnShared>> = self.lock().values().filter(|c| filter(c)).cloned().collect();
        all.sort_by_key(|c| c.id);
        all.truncate(limit);
        all
    }

    /// Every connection whose client id is `client_id` (ids set by an auth backend may repeat).
    pub fn find_client(&self, client_id: &str) -> Vec<Arc<ConnShared>> {
        self.lock()
            .values()
            .filter(|c| &*c.client_id == client_id)
            .cloned()
            .collect()
    }
}
