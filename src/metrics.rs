//! Process-wide counters and histograms, and their Prometheus text rendering.
//!
//! Everything is a relaxed atomic: counters are read for reporting only and never used to make a
//! decision, so no ordering between them is needed. The fan-out path counts once per publish
//! (`delivered += n`), never once per subscriber.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a WebSocket handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Total,
    PerIp,
    Pending,
    HandshakeTimeout,
    BadHandshake,
    Origin,
    Auth,
    AuthUnavailable,
    ShuttingDown,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Total,
        RejectReason::PerIp,
        RejectReason::Pending,
        RejectReason::HandshakeTimeout,
        RejectReason::BadHandshake,
        RejectReason::Origin,
        RejectReason::Auth,
        RejectReason::AuthUnavailable,
        RejectReason::ShuttingDown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::Total => "total",
            RejectReason::PerIp => "per_ip",
            RejectReason::Pending => "pending",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::BadHandshake => "bad_handshake",
            RejectReason::Origin => "origin",
            RejectReason::Auth => "auth",
            RejectReason::AuthUnavailable => "auth_unavailable",
            RejectReason::ShuttingDown => "shutting_down",
        }
    }
}

/// Why an established WebSocket connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The client closed or went away (close frame, EOF, reset).
    Client = 1,
    Idle,
    DeadPeer,
    SlowConsumer,
    RateLimit,
    TooBig,
    /// A protocol violation: bad frame, binary message, unmasked frame.
    Protocol,
    Shutdown,
    Kicked,
    /// An I/O error on our side, or a write that timed out.
    Error,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Client,
        CloseReason::Idle,
        CloseReason::DeadPeer,
        CloseReason::SlowConsumer,
        CloseReason::RateLimit,
        CloseReason::TooBig,
        CloseReason::Protocol,
        CloseReason::Shutdown,
        CloseReason::Kicked,
        CloseReason::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Idle => "idle",
            CloseReason::DeadPeer => "dead_peer",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::RateLimit => "rate_limit",
            CloseReason::TooBig => "too_big",
            CloseReason::Protocol => "protocol",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Kicked => "kicked",
            CloseReason::Error => "error",
        }
    }

    pub fn from_u8(v: u8) -> Option<CloseReason> {
        CloseReason::ALL.into_iter().find(|r| *r as u8 == v)
    }

    fn index(self) -> usize {
        self as usize - 1
    }
}

/// How a proxied request to the upstream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    Ok,
    Error,
    Timeout,
}

impl UpstreamOutcome {
    pub const ALL: [UpstreamOutcome; 3] = [
        UpstreamOutcome::Ok,
        UpstreamOutcome::Error,
        UpstreamOutcome::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamOutcome::Ok => "ok",
            UpstreamOutcome::Error => "error",
            UpstreamOutcome::Timeout => "timeout",
        }
    }
}

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS_SECONDS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A fixed-bucket latency histogram (Prometheus semantics: cumulative on rendering).
#[derive(Default)]
pub struct Histogram {
    /// Per-bucket counts, not cumulative; the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS_SECONDS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS_SECONDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS_SECONDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, le) in BUCKETS_SECONDS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS_SECONDS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_nanos.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {}", self.count.load(Relaxed));
    }
}

/// The process's counters.
#[derive(Default)]
pub struct Metrics {
    pub connections_opened: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    closed: [AtomicU64; CloseReason::ALL.len()],
    pub messages_received: AtomicU64,
    pub rate_limit_violations: AtomicU64,
    pub messages_published: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub send_queue_full: AtomicU64,
    pub accept_errors: AtomicU64,
    upstream: [AtomicU64; UpstreamOutcome::ALL.len()],
    pub publish_duration: Histogram,
    pub fanout_duration: Histogram,
}

/// Gauges that live elsewhere, sampled at render time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub connections: usize,
    pub connections_max: usize,
    pub connected_ips: usize,
    pub subscriptions: usize,
    pub topics: usize,
    pub resident_memory_bytes: u64,
    pub open_fds: u64,
}

impl Metrics {
    pub fn rejected(&self, reason: RejectReason) {
        let i = RejectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.rejected[i].fetch_add(1, Relaxed);
    }

    pub fn rejected_count(&self, reason: RejectReason) -> u64 {
        let i = RejectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.rejected[i].load(Relaxed)
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()].load(Relaxed)
    }

    pub fn upstream(&self, outcome: UpstreamOutcome) {
        let i = UpstreamOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.upstream[i].fetch_add(1, Relaxed);
    }

    pub fn rejected_by_reason(&self) -> serde_json::Map<String, serde_json::Value> {
        RejectReason::ALL
            .iter()
            .map(|r| (r.label().to_owned(), self.rejected_count(*r).into()))
            .collect()
    }

    pub fn closed_by_reason(&self) -> serde_json::Map<String, serde_json::Value> {
        CloseReason::ALL
            .iter()
            .map(|r| (r.label().to_owned(), self.closed_count(*r).into()))
            .collect()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        };
        gauge(
            &mut out,
            "wsgate_connections",
            "Open WebSocket connections.",
            g.connections as u64,
        );
        gauge(
            &mut out,
            "wsgate_connections_max",
            "Configured limits.max_total_connections.",
            g.connections_max as u64,
        );
        gauge(
            &mut out,
            "wsgate_connected_ips",
            "Distinct client IPs (IPv6 by /64) with an open connection.",
            g.connected_ips as u64,
        );
        gauge(
            &mut out,
            "wsgate_subscriptions",
            "Topic subscriptions over all connections.",
            g.subscriptions as u64,
        );
        gauge(
            &mut out,
            "wsgate_topics",
            "Topics with at least one subscriber.",
            g.topics as u64,
        );
        counter(
            &mut out,
            "wsgate_connections_opened_total",
            "WebSocket connections accepted.",
            &self.connections_opened,
        );
        let _ = writeln!(
            out,
            "# HELP wsgate_connections_rejected_total WebSocket handshakes refused, by reason.\n\
             # TYPE wsgate_connections_rejected_total counter"
        );
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "wsgate_connections_rejected_total{{reason=\"{}\"}} {}",
                r.label(),
                self.rejected[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP wsgate_connections_closed_total WebSocket connections closed, by reason.\n\
             # TYPE wsgate_connections_closed_total counter"
        );
        for r in CloseReason::ALL {
            let _ = writeln!(
                out,
                "wsgate_connections_closed_total{{reason=\"{}\"}} {}",
                r.label(),
                self.closed[r.index()].load(Relaxed)
            );
        }
        counter(
            &mut out,
            "wsgate_messages_received_total",
            "Client messages received.",
            &self.messages_received,
        );
        counter(
            &mut out,
            "wsgate_rate_limit_violations_total",
            "Client messages refused by the per-connection rate limit.",
            &self.rate_limit_violations,
        );
        counter(
            &mut out,
            "wsgate_messages_published_total",
            "Events accepted by the publish endpoint.",
            &self.messages_published,
        );
        counter(
            &mut out,
            "wsgate_messages_delivered_total",
            "Event deliveries queued to subscribers.",
            &self.messages_delivered,
        );
        counter(
            &mut out,
            "wsgate_send_queue_full_total",
            "Deliveries refused because a subscriber's send queue was full (slow consumer).",
            &self.send_queue_full,
        );
        counter(
            &mut out,
            "wsgate_accept_errors_total",
            "Errors accepting TCP connections (e.g. out of file descriptors).",
            &self.accept_errors,
        );
        let _ = writeln!(
            out,
            "# HELP wsgate_upstream_requests_total Requests proxied to the upstream, by outcome.\n\
             # TYPE wsgate_upstream_requests_total counter"
        );
        for (i, o) in UpstreamOutcome::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "wsgate_upstream_requests_total{{outcome=\"{}\"}} {}",
                o.label(),
                self.upstream[i].load(Relaxed)
            );
        }
        self.publish_duration.render(
            &mut out,
            "wsgate_publish_duration_seconds",
            "Time to handle a publish request, from body read to response.",
        );
        self.fanout_duration.render(
            &mut out,
            "wsgate_fanout_duration_seconds",
            "Time to queue one event to all of its topic's subscribers.",
        );
        gauge(
            &mut out,
            "wsgate_process_resident_memory_bytes",
            "Resident memory of the process.",
            g.resident_memory_bytes,
        );
        gauge(
            &mut out,
            "wsgate_process_open_fds",
            "Open file descriptors of the process.",
            g.open_fds,
        );
        out
    }
}

/// The process's resident memory in bytes, read from /proc (0 where /proc is not available).
pub fn resident_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The number of open file descriptors of the process (0 where /proc is not available).
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.00005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn close_reason_roundtrips_through_u8() {
        for r in CloseReason::ALL {
            assert_eq!(CloseReason::from_u8(r as u8), Some(r));
        }
        assert_eq!(CloseReason::from_u8(0), None);
    }

    #[test]
    fn rss_is_read_from_proc() {
        assert!(resident_memory_bytes() > 0);
        assert!(open_fds() > 0);
    }
}
