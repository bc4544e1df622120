//! Connection admission (total and per-IP permits) and the per-connection message rate limiter.
//!
//! A `ConnPermit` is the only way to hold a connection slot, and it gives the slot back when it is
//! dropped: every exit path of a connection (close, error, timeout, kick, panic) releases it by
//! ownership, so the counts return exactly to zero after any churn.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::metrics::RejectReason;

/// The key per-IP limits count by: an IPv4 address, or an IPv6 /64 (one customer's allocation;
/// counting single IPv6 addresses would let one host use 2^64 of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey(IpAddr);

impl IpKey {
    pub fn new(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(_) => IpKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    IpKey(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
        }
    }
}

impl std::fmt::Display for IpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Admission control for WebSocket connections.
pub struct ConnLimiter {
    /// Open connections per IP key. Bounded: an entry exists only while it has a permit, and
    /// permits are bounded by `max_total`.
    state: Mutex<LimiterState>,
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
}

struct LimiterState {
    total: usize,
    per_ip: HashMap<IpKey, usize>,
}

/// Why a connection was not admitted, with the limit that applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total(usize),
    PerIp(usize),
}

impl Refusal {
    pub fn reason(self) -> RejectReason {
        match self {
            Refusal::Total(_) => RejectReason::Total,
            Refusal::PerIp(_) => RejectReason::PerIp,
        }
    }
}

/// One admitted connection's slot; released on drop.
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    key: IpKey,
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            state: Mutex::new(LimiterState {
                total: 0,
                per_ip: HashMap::new(),
            }),
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
        })
    }

    /// New limits apply to new admissions; connections already admitted keep their slot.
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Relaxed);
        self.max_per_ip.store(max_per_ip, Relaxed);
    }

    pub fn max_total(&self) -> usize {
        self.max_total.load(Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, LimiterState> {
        // A panic while holding this lock cannot leave the counts half-updated (each update is a
        // single statement), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `ip`, or says which limit refused it.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let key = IpKey::new(ip);
        let max_total = self.max_total.load(Relaxed);
        let max_per_ip = self.max_per_ip.load(Relaxed);
        let mut st = self.lock();
        if st.total >= max_total {
            return Err(Refusal::Total(max_total));
        }
        let n = st.per_ip.get(&key).copied().unwrap_or(0);
        if n >= max_per_ip {
            return Err(Refusal::PerIp(max_per_ip));
        }
        st.total += 1;
        st.per_ip.insert(key, n + 1);
        Ok(ConnPermit {
            limiter: Arc::clone(self),
            key,
        })
    }

    /// Open connections.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Distinct IP keys with an open connection.
    pub fn distinct_ips(&self) -> usize {
        self.lock().per_ip.len()
    }

    /// Open connections by IP key.
    pub fn by_ip(&self) -> Vec<(IpKey, usize)> {
        let mut v: Vec<_> = self.lock().per_ip.iter().map(|(k, n)| (*k, *n)).collect();
        v.sort();
        v
    }
}

impl std::fmt::Debug for ConnPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnPermit({})", self.key)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut st = self.limiter.lock();
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_ip.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.per_ip.remove(&self.key);
            }
        }
    }
}

/// What the rate limiter says about one client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allow,
    /// Refuse this message, keep the connection.
    Refuse,
    /// The client keeps flooding: close it.
    Disconnect,
}

/// Per-connection rate limiter: GCRA (a token bucket in one timestamp), `rate` messages per
/// minute with a burst of `rate`. Refusals are counted in a fixed one-minute window; a client
/// whose refusals in one window reach `rate` (it sent twice the limit) is disconnected.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time between two messages at the steady rate.
    interval: Duration,
    /// How far ahead of `now` the theoretical arrival time may run: the burst allowance.
    tolerance: Duration,
    /// Theoretical arrival time of the next message.
    tat: Instant,
    refused: u32,
    window_start: Instant,
    rate: u32,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl RateLimiter {
    pub fn new(per_minute: u32, now: Instant) -> RateLimiter {
        let rate = per_minute.max(1);
        let interval = RATE_WINDOW / rate;
        RateLimiter {
            interval,
            tolerance: RATE_WINDOW.saturating_sub(interval),
            tat: now,
            refused: 0,
            window_start: now,
            rate,
        }
    }

    pub fn check(&mut self, now: Instant) -> RateDecision {
        let tat = self.tat.max(now);
        if tat.saturating_duration_since(now) <= self.tolerance {
            self.tat = tat + self.interval;
            return RateDecision::Allow;
        }
        if now.saturating_duration_since(self.window_start) >= RATE_WINDOW {
            self.window_start = now;
            self.refused = 0;
        }
        self.refused += 1;
        if self.refused >= self.rate {
            RateDecision::Disconnect
        } else {
            RateDecision::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_and_per_ip_limits_and_release_on_drop() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refusal::PerIp(2));
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), Refusal::Total(3));
        drop(p1);
        assert_eq!(l.total(), 2);
        let _p4 = l.try_acquire(b).unwrap();
        assert_eq!(l.distinct_ips(), 2);
    }

    #[test]
    fn counts_return_to_zero() {
        let l = ConnLimiter::new(100, 100);
        let permits: Vec<_> = (0..50)
            .map(|i| l.try_acquire(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(l.total(), 50);
        drop(permits);
        assert_eq!(l.total(), 0);
        assert_eq!(l.distinct_ips(), 0);
    }

    #[test]
    fn ipv6_is_keyed_by_slash_64_and_mapped_v4_by_v4() {
        let a = IpKey::new("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = IpKey::new("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = IpKey::new("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            IpKey::new("::ffff:10.1.2.3".parse().unwrap()),
            IpKey::new("10.1.2.3".parse().unwrap())
        );
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn burst_of_rate_then_refuse_then_disconnect() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(30, t0);
        let decisions: Vec<_> = (0..40).map(|_| r.check(t0)).collect();
        assert_eq!(
            decisions.iter().filter(|d| **d == RateDecision::Allow).count(),
            30
        );
        assert_eq!(decisions[30..], [RateDecision::Refuse; 10]);
        // 20 more refusals within the window reach 30 refusals: twice the limit sent.
        let more: Vec<_> = (0..20).map(|_| r.check(t0)).collect();
        assert_eq!(*more.last().unwrap(), RateDecision::Disconnect);
        assert_eq!(more[..19], [RateDecision::Refuse; 19]);
    }

    #[test]
    fn tokens_refill_at_the_steady_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(60, t0);
        for _ in 0..60 {
            assert_eq!(r.check(t0), RateDecision::Allow);
        }
        assert_eq!(r.check(t0), RateDecision::Refuse);
        // One second later one more message is allowed (60/minute = 1/second).
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.check(t1), RateDecision::Allow);
        assert_eq!(r.check(t1), RateDecision::Refuse);
        // A minute of silence refills the whole burst.
        let t2 = t1 + Duration::from_secs(61);
        for _ in 0..60 {
            assert_eq!(r.check(t2), RateDecision::Allow);
        }
    }

    #[test]
    fn refusal_window_resets() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, t0);
        assert_eq!(r.check(t0), RateDecision::Allow);
        assert_eq!(r.check(t0), RateDecision::Allow);
        assert_eq!(r.check(t0), RateDecision::Refuse);
        // A new window: the earlier refusal no longer counts towards a disconnect.
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(r.check(t1), RateDecision::Allow);
        assert_eq!(r.check(t1), RateDecision::Allow);
        assert_eq!(r.check(t1), RateDecision::Refuse);
        assert_eq!(r.check(t1), RateDecision::Disconnect);
    }
}
