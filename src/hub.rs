//! The hub: topic -> subscribers, and the fan-out of one encoded event to them.
//!
//! The hub is the one place that owns each topic's order: a topic lives in exactly one shard and
//! every publish to it happens under that shard's lock, so two publishes to one topic reach every
//! subscriber's queue in the same order (and a future per-topic sequence number and history will
//! be assigned right here, ordered against resumes by the same lock).
//!
//! The lock is a `std::sync::Mutex`: nothing under it awaits. Fan-out hands each subscriber's
//! outbox the same bytes, encoded once: one non-blocking `send(2)` to an idle socket, or a
//! refcounted clone queued behind a backlog (see `outbox.rs`); a subscriber whose queue is full is
//! kicked as a slow consumer, never waited for. The lock is held across those non-blocking writes
//! on purpose: it is what orders two publishes to one topic alike for every subscriber. Sharding
//! keeps publishes to different topics from contending.
//!
//! Whatever produces events (the local publish endpoint today, a broker subscription tomorrow)
//! calls `Hub::publish`; connections only ever see their queue, so the source can change without
//! touching the connection code.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use crate::metrics::Metrics;
use crate::outbox::Push;
use crate::registry::ConnShared;
use crate::topic::TopicName;

/// Enough shards that publishes to different topics rarely meet on two cores, few enough that a
/// listing of all topics stays cheap.
const SHARDS: usize = 64;

/// Fan-out warms this many subscribers' outboxes before writing to them. Between two events on
/// a topic its subscribers' memory goes cold, and the first touch of each one (a page walk and
/// a cache miss) was the largest user-space cost of a delivery in scenario (b): it stalled the
/// loop once per subscriber, in series, between two `send(2)` calls. Touching a group first
/// lets those misses overlap; the group is small enough that the sends that follow still find
/// the lines in cache. Measured: BENCHMARKS.md, "group warm-up".
const WARM_AHEAD: usize = 16;

struct Topic {
    subscribers: Vec<Arc<ConnShared>>,
    /// Events published to this topic since it was created (the future resume sequence).
    seq: u64,
}

/// Topic registry and fan-out. Bounded: a topic exists only while it has a subscriber, and
/// subscriptions are bounded by connections × `max_subscriptions`.
pub struct Hub {
    shards: Box<[Mutex<HashMap<TopicName, Topic>>]>,
    hasher: RandomState,
    subscriptions: AtomicUsize,
    topics: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            subscriptions: AtomicUsize::new(0),
            topics: AtomicUsize::new(0),
            metrics,
        }
    }

    fn shard(&self, topic: &str) -> MutexGuard<'_, HashMap<TopicName, Topic>> {
        let i = (self.hasher.hash_one(topic) as usize) % SHARDS;
        // Every update under this lock is complete before anything could panic, so a poisoned
        // lock still guards a consistent map.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `conn` to `topic`'s subscribers. The caller makes sure it is not there already.
    pub fn subscribe(&self, topic: &TopicName, conn: &Arc<ConnShared>) {
        let mut shard = self.shard(topic.as_str());
        let entry = shard.entry(topic.clone()).or_insert_with(|| {
            self.topics.fetch_add(1, Relaxed);
            Topic {
                subscribers: Vec::new(),
                seq: 0,
            }
        });
        entry.subscribers.push(Arc::clone(conn));
        self.subscriptions.fetch_add(1, Relaxed);
    }

    /// Removes connection `id` from `topic`; drops the topic when nobody is left.
    pub fn unsubscribe(&self, topic: &TopicName, id: u64) {
        let mut shard = self.shard(topic.as_str());
        let Some(entry) = shard.get_mut(topic.as_str()) else {
            return;
        };
        if let Some(i) = entry.subscribers.iter().position(|c| c.id == id) {
            entry.subscribers.swap_remove(i);
            self.subscriptions.fetch_sub(1, Relaxed);
        }
        if entry.subscribers.is_empty() {
            shard.remove(topic.as_str());
            self.topics.fetch_sub(1, Relaxed);
        }
    }

    /// Delivers `frame` (an event already encoded as a complete WebSocket frame, see
    /// `protocol::encode_event`) to every subscriber of `topic`: written at once to idle
    /// sockets, queued behind a backlog otherwise. Returns how many connections it reached.
    /// Never waits for a subscriber.
    pub fn publish(&self, topic: &TopicName, frame: &Bytes) -> usize {
        let start = Instant::now();
        let delivered = self.fan_out(topic, frame, start, None);
        self.metrics.fanout_duration.observe(start.elapsed());
        delivered
    }

    /// Delivers a batch in order. Each subscriber gets all of its events of the batch in one
    /// write: the events are queued first, then every touched connection is flushed once.
    pub fn publish_batch(&self, events: &[(TopicName, Bytes)]) -> Vec<usize> {
        let start = Instant::now();
        let mut touched: Vec<Arc<ConnShared>> = Vec::new();
        let delivered = events
            .iter()
            .map(|(topic, frame)| self.fan_out(topic, frame, start, Some(&mut touched)))
            .collect();
        // `touched` holds each connection the batch queued for once (see `Push::Batched`).
        for conn in &touched {
            conn.outbox.flush_now();
        }
        self.metrics.fanout_duration.observe(start.elapsed());
        delivered
    }

    /// Hands `frame` to each subscriber of `topic` (queued only, when collecting `touched`).
    fn fan_out(
        &self,
        topic: &TopicName,
        frame: &Bytes,
        now: Instant,
        mut touched: Option<&mut Vec<Arc<ConnShared>>>,
    ) -> usize {
        let mut delivered = 0;
        let mut full = 0;
        let now_ms = crate::registry::clock_ms(now);
        {
            let mut shard = self.shard(topic.as_str());
            if let Some(entry) = shard.get_mut(topic.as_str()) {
                entry.seq += 1;
                let deferred = touched.is_some();
                for group in entry.subscribers.chunks(WARM_AHEAD) {
                    for conn in group {
                        conn.outbox.warm();
                    }
                    for conn in group {
                        match conn.try_deliver(frame, now_ms, deferred) {
                            Push::Written | Push::Queued => delivered += 1,
                            Push::Batched => {
                                delivered += 1;
                                // Once per connection per batch, however many events it gets.
                                if let Some(t) = touched.as_mut() {
                                    t.push(Arc::clone(conn));
                                }
                            }
                            Push::Full => full += 1,
                            Push::Closed => {}
                        }
                    }
                }
            }
        }
        // Counted once per event, not per subscriber.
        self.metrics.messages_published.fetch_add(1, Relaxed);
        self.metrics
            .messages_delivered
            .fetch_add(delivered as u64, Relaxed);
        if full > 0 {
            self.metrics.send_queue_full.fetch_add(full, Relaxed);
        }
        delivered
    }

    /// Subscribers per topic, sorted by topic name.
    pub fn subscriber_counts(&self) -> Vec<(TopicName, usize)> {
        let mut out = Vec::with_capacity(self.topics.load(Relaxed));
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.iter().map(|(t, e)| (t.clone(), e.subscribers.len())));
        }
        out.sort();
        out
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.load(Relaxed)
    }

    pub fn topic_count(&self) -> usize {
        self.topics.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> TopicName {
        TopicName::parse(s, 128).unwrap()
    }

    fn conn(id: u64, queue: usize) -> Arc<ConnShared> {
        ConnShared::new(
            id,
            format!("c{id}").into(),
            "127.0.0.1".parse().unwrap(),
            queue,
            1 << 20,
        )
    }

    /// Everything queued for `c` (no socket is attached in these tests), as strings.
    fn drain(c: &ConnShared) -> Vec<String> {
        c.outbox
            .take_all()
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    fn ev(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    #[test]
    fn publish_reaches_only_subscribers_in_order() {
        let hub = Hub::new(Arc::default());
        let a = conn(1, 16);
        let b = conn(2, 16);
        hub.subscribe(&topic("x"), &a);
        hub.subscribe(&topic("y"), &b);
        assert_eq!(hub.publish(&topic("x"), &ev("1")), 1);
        assert_eq!(hub.publish(&topic("x"), &ev("2")), 1);
        assert_eq!(hub.publish(&topic("z"), &ev("3")), 0);
        assert_eq!(drain(&a), ["1", "2"]);
        assert!(drain(&b).is_empty());
    }

    #[test]
    fn full_queue_kicks_slow_consumer_without_blocking_others() {
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(Arc::clone(&metrics));
        let slow = conn(1, 2);
        let fast = conn(2, 100);
        hub.subscribe(&topic("t"), &slow);
        hub.subscribe(&topic("t"), &fast);
        let counts: Vec<_> = (0..5)
            .map(|i| hub.publish(&topic("t"), &ev(&i.to_string())))
            .collect();
        assert_eq!(counts, [2, 2, 1, 1, 1]);
        assert_eq!(
            slow.close_reason(),
            Some(crate::metrics::CloseReason::SlowConsumer)
        );
        assert_eq!(drain(&fast), ["0", "1", "2", "3", "4"]);
        assert_eq!(metrics.send_queue_full.load(Relaxed), 1);
    }

    #[test]
    fn a_connection_told_to_close_gets_no_more_events() {
        let hub = Hub::new(Arc::default());
        let a = conn(1, 16);
        let b = conn(2, 16);
        hub.subscribe(&topic("t"), &a);
        hub.subscribe(&topic("t"), &b);
        assert_eq!(hub.publish(&topic("t"), &ev("1")), 2);
        a.kick(crate::metrics::CloseReason::Kicked);
        assert_eq!(hub.publish(&topic("t"), &ev("2")), 1);
        assert_eq!(drain(&a), ["1"]);
        assert_eq!(drain(&b), ["1", "2"]);
        assert_eq!((a.outbox.sent(), b.outbox.sent()), (1, 2));
    }

    /// More subscribers than one warm-up group: every one gets every event, in order.
    #[test]
    fn fan_out_reaches_every_subscriber_across_groups() {
        let hub = Hub::new(Arc::default());
        let conns: Vec<_> = (0..(3 * WARM_AHEAD as u64 + 5)).map(|i| conn(i, 16)).collect();
        for c in &conns {
            hub.subscribe(&topic("t"), c);
        }
        assert_eq!(hub.publish(&topic("t"), &ev("1")), conns.len());
        assert_eq!(hub.publish(&topic("t"), &ev("2")), conns.len());
        for c in &conns {
            assert_eq!(drain(c), ["1", "2"], "connection {}", c.id);
        }
    }

    #[test]
    fn byte_budget_is_enforced() {
        let hub = Hub::new(Arc::default());
        let c = ConnShared::new(1, "c".into(), "127.0.0.1".parse().unwrap(), 100, 1000);
        hub.subscribe(&topic("t"), &c);
        let big = ev(&"x".repeat(600));
        assert_eq!(hub.publish(&topic("t"), &big), 1);
        assert_eq!(hub.publish(&topic("t"), &big), 0);
        assert_eq!(c.close_reason(), Some(crate::metrics::CloseReason::SlowConsumer));
    }

    #[test]
    fn batch_publish_keeps_order_across_topics_and_counts_each_event() {
        let hub = Hub::new(Arc::default());
        let a = conn(1, 16);
        let b = conn(2, 16);
        hub.subscribe(&topic("x"), &a);
        hub.subscribe(&topic("y"), &a);
        hub.subscribe(&topic("y"), &b);
        let counts = hub.publish_batch(&[
            (topic("x"), ev("1")),
            (topic("y"), ev("2")),
            (topic("z"), ev("3")),
            (topic("x"), ev("4")),
        ]);
        assert_eq!(counts, [1, 2, 0, 1]);
        assert_eq!(drain(&a), ["1", "2", "4"]);
        assert_eq!(drain(&b), ["2"]);
    }

    /// A subscriber with a real socket behind it (and the client end, to read what arrived).
    async fn attached(id: u64, queue: usize, bytes: usize) -> (Arc<ConnShared>, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let c = ConnShared::new(id, "c".into(), "127.0.0.1".parse().unwrap(), queue, bytes);
        c.outbox.attach(server);
        (c, client)
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_queue_is_not_a_slow_consumer() {
        use tokio::io::AsyncReadExt;
        let hub = Hub::new(Arc::default());
        let (c, mut client) = attached(1, 16, 1 << 20).await;
        hub.subscribe(&topic("t"), &c);
        let events: Vec<_> = (0..100).map(|i| (topic("t"), ev(&format!("<{i:03}>")))).collect();
        assert_eq!(hub.publish_batch(&events), vec![1; 100]);
        assert_eq!(c.close_reason(), None, "an idle reader is not a slow consumer");
        let mut got = vec![0u8; 500];
        client.read_exact(&mut got).await.unwrap();
        let expected: String = (0..100).map(|i| format!("<{i:03}>")).collect();
        assert_eq!(String::from_utf8_lossy(&got), expected);

        // One event over the whole byte budget goes through on an empty queue, in a batch as
        // when published alone.
        let (c, _client) = attached(2, 16, 1000).await;
        hub.subscribe(&topic("big"), &c);
        let big = ev(&"x".repeat(2000));
        assert_eq!(hub.publish(&topic("big"), &big), 1);
        assert_eq!(hub.publish_batch(&[(topic("big"), big)]), vec![1]);
        assert_eq!(c.close_reason(), None);
    }

    #[test]
    fn unsubscribe_removes_empty_topics() {
        let hub = Hub::new(Arc::default());
        let a = conn(1, 4);
        let b = conn(2, 4);
        hub.subscribe(&topic("x"), &a);
        hub.subscribe(&topic("x"), &b);
        assert_eq!(hub.subscriber_counts(), vec![(topic("x"), 2)]);
        hub.unsubscribe(&topic("x"), 1);
        hub.unsubscribe(&topic("x"), 1);
        assert_eq!(hub.subscription_count(), 1);
        hub.unsubscribe(&topic("x"), 2);
        assert_eq!(hub.topic_count(), 0);
        assert_eq!(hub.subscription_count(), 0);
        assert!(hub.subscriber_counts().is_empty());
    }
}
