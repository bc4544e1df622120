//! `Outbox`: one connection's bounded outbound queue of pre-framed events.
//!
//! Why not a `tokio::sync::mpsc` channel: a bounded channel allocates its first block of slots
//! (32 x 32 bytes here) when it is created, for every connection, idle or not; it has no byte
//! bound; and its consumer takes items one lock at a time. This queue allocates nothing until an
//! event arrives, gives its memory back when it drains after a burst, bounds both messages and
//! bytes, and lets the connection take a whole batch under one lock.
//!
//! The lock is a `std::sync::Mutex` held for a few instructions and never across an `.await`.
//! The publisher wakes the consumer only on the empty -> non-empty transition: a consumer that
//! is busy writing will find the rest when it comes back for more.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

/// After a burst, a drained queue keeps at most this many slots allocated.
const RETAINED_SLOTS: usize = 8;

/// Result of offering an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Over the message or byte bound: nothing was queued.
    Full,
    /// The consumer is gone or closing: nothing was queued.
    Closed,
}

pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    max_messages: usize,
    max_bytes: usize,
}

struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
}

impl Outbox {
    pub fn new(max_messages: usize, max_bytes: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            ready: Notify::new(),
            max_messages: max_messages.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under the lock completes before anything could panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` without waiting. One frame larger than the whole byte budget still goes
    /// through on an empty queue (the publish body cap bounds it).
    pub fn push(&self, frame: &Bytes) -> Push {
        let mut st = self.lock();
        if st.closed {
            return Push::Closed;
        }
        let len = frame.len();
        if st.queue.len() >= self.max_messages || (!st.queue.is_empty() && st.bytes + len > self.max_bytes) {
            return Push::Full;
        }
        st.queue.push_back(frame.clone());
        st.bytes += len;
        let was_empty = st.queue.len() == 1;
        drop(st);
        if was_empty {
            self.ready.notify_one();
        }
        Push::Queued
    }

    /// Resolves when the queue may have something (a stored wake-up makes this cancel-safe).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Moves up to `max_messages` frames / about `max_bytes` (at least one frame) into `out`.
    /// Returns whether frames remain queued.
    pub fn take_batch(&self, out: &mut VecDeque<Bytes>, max_messages: usize, max_bytes: usize) -> bool {
        let mut st = self.lock();
        let mut taken_bytes = 0;
        let mut taken = 0;
        while taken < max_messages && (taken == 0 || taken_bytes < max_bytes) {
            let Some(frame) = st.queue.pop_front() else { break };
            taken_bytes += frame.len();
            taken += 1;
            out.push_back(frame);
        }
        st.bytes -= taken_bytes;
        if st.queue.is_empty() && st.queue.capacity() > RETAINED_SLOTS {
            st.queue.shrink_to(RETAINED_SLOTS);
        }
        !st.queue.is_empty()
    }

    /// Refuses further frames and drops what is queued (the connection is closing).
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.queue = VecDeque::new();
        st.bytes = 0;
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn bounds_messages_and_bytes() {
        let o = Outbox::new(3, 100);
        assert_eq!(o.push(&frame(10)), Push::Queued);
        assert_eq!(o.push(&frame(10)), Push::Queued);
        assert_eq!(o.push(&frame(10)), Push::Queued);
        assert_eq!(o.push(&frame(1)), Push::Full);
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
    fn batches_are_bounded_and_keep_order() {
        let o = Outbox::new(100, 1000);
        for i in 0..10u8 {
            o.push(&Bytes::from(vec![i; 10]));
        }
        let mut out = VecDeque::new();
        assert!(o.take_batch(&mut out, 4, 1000));
        assert_eq!(out.iter().map(|b| b[0]).collect::<Vec<_>>(), [0, 1, 2, 3]);
        out.clear();
        assert!(o.take_batch(&mut out, 100, 25));
        assert_eq!(out.len(), 3, "stops once the byte budget is reached");
        out.clear();
        assert!(!o.take_batch(&mut out, 100, 1000));
        assert_eq!(out.len(), 3);
        // All bytes were accounted back: the full budget is free again.
        assert_eq!(o.push(&frame(1000)), Push::Queued);
    }

    #[test]
    fn closed_refuses_and_frees() {
        let o = Outbox::new(10, 1000);
        o.push(&frame(10));
        o.close();
        assert!(o.is_empty());
        assert_eq!(o.push(&frame(10)), Push::Closed);
    }

    #[tokio::test]
    async fn wakes_on_first_frame_only_and_the_wakeup_is_stored() {
        let o = Outbox::new(10, 1000);
        o.push(&frame(1));
        o.push(&frame(1));
        // The stored permit resolves at once even though nobody was waiting at push time.
        tokio::time::timeout(std::time::Duration::from_secs(1), o.ready())
            .await
            .unwrap();
        let mut out = VecDeque::new();
        o.take_batch(&mut out, 10, 1000);
        assert_eq!(out.len(), 2);
        // No second permit was stored for the second push.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), o.ready())
                .await
                .is_err()
        );
    }
}
