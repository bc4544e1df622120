//! Micro-benchmarks of the publish path: encoding an event once, and the hub's fan-out of it to
//! N subscriber queues (try_send of a refcounted clone each). Run: `cargo bench --bench hub`.
//! Benchmarks are not tests: nothing here asserts a time.

#![allow(clippy::unwrap_used)] // benchmark set-up: a failed unwrap is a broken benchmark

use std::sync::Arc;

use bytes::Bytes;
use divan::Bencher;
use serde_json::{json, Value};
use wsgate::hub::Hub;
use wsgate::protocol::encode_event;
use wsgate::registry::ConnShared;
use wsgate::topic::TopicName;

fn main() {
    divan::main();
}

fn topic() -> TopicName {
    TopicName::parse("bench_topic", 128).unwrap()
}

#[divan::bench]
fn encode_small_event(b: Bencher) {
    let t = topic();
    let Value::Object(msg) = json!({"type": "cache_metrics", "data": {"hit_rate": 0.9, "n": 12345}}) else {
        unreachable!()
    };
    b.bench(|| encode_event(&t, divan::black_box(msg.clone()), "2026-11-26T00:00:00.000Z", 64));
}

/// One publish to a topic with `n` subscribers, then each subscriber's queue is emptied (as its
/// connection task would) so that queues never fill.
#[divan::bench(args = [1, 100, 1_000, 10_000])]
fn fanout(b: Bencher, n: usize) {
    let hub = Hub::new(Arc::default());
    let t = topic();
    let conns: Vec<Arc<ConnShared>> = (0..n as u64)
        .map(|id| {
            ConnShared::new(
                id,
                id.to_string().into(),
                "127.0.0.1".parse().unwrap(),
                4,
                1 << 20,
            )
        })
        .collect();
    for c in &conns {
        hub.subscribe(&t, c);
    }
    let event = Bytes::from_static(
        br#"{"type":"x","data":{"hit_rate":0.9},"event_type":"bench_topic","timestamp":"2026-11-26T00:00:00.000Z"}"#,
    );
    // No socket is attached: this measures the hub and queue, not the kernel.
    b.counter(divan::counter::ItemsCount::new(n)).bench_local(|| {
        let delivered = hub.publish(&t, &event);
        for c in &conns {
            c.outbox.discard_unsent();
        }
        delivered
    });
}
