//! `Gateway`: the state every task shares (config, hub, connection table, limits, counters,
//! shutdown), and the reports built from it (`/health`, the status metrics).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hyper::StatusCode;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::limits::ConnLimiter;
use crate::metrics::{self, Gauges, Metrics};
use crate::protocol::timestamp;
use crate::proxy::Upstream;
use crate::registry::Registry;

/// `/health` reports `degraded` at or above this share of `max_total_connections`.
const DEGRADED_UTILIZATION: f64 = 0.9;

pub struct Gateway {
    /// The current config. Replaced whole on reload; readers clone the `Arc` and never hold the
    /// lock across an `.await`.
    config: RwLock<Arc<Config>>,
    /// The backend client (pooled), rebuilt when `[upstream]` changes on reload.
    upstream: RwLock<Option<Arc<Upstream>>>,
    pub hub: Hub,
    pub registry: Registry,
    pub limiter: Arc<ConnLimiter>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// Cancelled when the drain starts.
    pub shutdown: CancellationToken,
    /// Every connection task (HTTP and WebSocket), so that the drain can wait for all of them.
    pub tracker: TaskTracker,
    next_conn_id: AtomicU64,
    /// Random per process: client ids are unique for the life of the process and not guessable
    /// from a counter alone.
    id_nonce: u32,
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(config: Config) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::default());
        Arc::new(Gateway {
            limiter: ConnLimiter::new(
                config.limits.max_total_connections,
                config.limits.max_connections_per_ip,
            ),
            upstream: RwLock::new(build_upstream(&config)),
            config: RwLock::new(Arc::new(config)),
            hub: Hub::new(Arc::clone(&metrics)),
            registry: Registry::default(),
            metrics,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_conn_id: AtomicU64::new(1),
            id_nonce: RandomState::new().hash_one(std::process::id()) as u32,
            draining: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Swaps in a new (already validated) config. Returns what could not take effect.
    pub fn apply_config(&self, new: Config) -> Vec<String> {
        let old = self.config();
        let mut notes = Vec::new();
        // Keys read once at startup: a change is reported, not applied.
        let mut restart_only = |key: &str, before: String, after: String| {
            if before != after {
                notes.push(format!(
                    "{key} changed ({before} -> {after}): restart wsgate for it to take effect"
                ));
            }
        };
        restart_only(
            "server.listen",
            old.server.listen.to_string(),
            new.server.listen.to_string(),
        );
        restart_only(
            "admin.listen",
            old.admin.listen.to_string(),
            new.admin.listen.to_string(),
        );
        restart_only(
            "server.worker_threads",
            old.server.worker_threads.to_string(),
            new.server.worker_threads.to_string(),
        );
        restart_only(
            "limits.max_pending_connections",
            old.limits.max_pending_connections.to_string(),
            new.limits.max_pending_connections.to_string(),
        );
        self.limiter.set_limits(
            new.limits.max_total_connections,
            new.limits.max_connections_per_ip,
        );
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        notes
    }

    pub fn upstream(&self) -> Option<Arc<Upstream>> {
        self.upstream.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A new internal connection id and the client id shown to the client.
    pub fn next_ids(&self) -> (u64, String) {
        let id = self.next_conn_id.fetch_add(1, Relaxed);
        (id, format!("{:08x}-{id}", self.id_nonce))
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Relaxed);
        self.shutdown.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            connections: self.limiter.total(),
            connections_max: self.limiter.max_total(),
            connected_ips: self.limiter.distinct_ips(),
            subscriptions: self.hub.subscription_count(),
            topics: self.hub.topic_count(),
            resident_memory_bytes: metrics::resident_memory_bytes(),
            open_fds: metrics::open_fds(),
        }
    }

    /// `GET /health` (and the status code `/healthz` uses).
    pub fn health(&self) -> (StatusCode, Value) {
        let total = self.limiter.total();
        let max = self.limiter.max_total();
        let (code, status) = if self.is_draining() {
            (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
        } else if total as f64 >= max as f64 * DEGRADED_UTILIZATION {
            (StatusCode::OK, "degraded")
        } else {
            (StatusCode::OK, "healthy")
        };
        (
            code,
            json!({
                "status": status,
                "connection_utilization": format!("{total}/{max}"),
                "memory_usage_mb": memory_mb(),
                "uptime_seconds": self.started.elapsed().as_secs(),
                "timestamp": timestamp(),
            }),
        )
    }

    /// The `metrics` object of `GET /status`, also the `server_metrics` of `get_status`.
    pub fn server_metrics(&self) -> Value {
        let config = self.config();
        let l = &config.limits;
        let by_ip: Map<String, Value> = self
            .limiter
            .by_ip()
            .into_iter()
            .map(|(k, n)| (k.to_string(), n.into()))
            .collect();
        let subscribers: Map<String, Value> = self
            .hub
            .subscriber_counts()
            .into_iter()
            .map(|(t, n)| (t.as_str().to_owned(), n.into()))
            .collect();
        let m = &self.metrics;
        json!({
            "total_connections": self.limiter.total(),
            "connections_by_ip": by_ip,
            "total_messages_sent": m.messages_delivered.load(Relaxed),
            "total_broadcasts": m.messages_published.load(Relaxed),
            "total_messages_received": m.messages_received.load(Relaxed),
            "rate_limit_violations": m.rate_limit_violations.load(Relaxed),
            "send_queue_full": m.send_queue_full.load(Relaxed),
            "connections_opened": m.connections_opened.load(Relaxed),
            "rejected_connections": m.rejected_by_reason(),
            "closed_connections": m.closed_by_reason(),
            "memory_usage_mb": memory_mb(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "limits": {
                "max_total_connections": l.max_total_connections,
                "max_connections_per_ip": l.max_connections_per_ip,
                "max_message_rate_per_minute": l.max_message_rate_per_minute,
                "max_subscriptions": l.max_subscriptions,
                "max_message_bytes": l.max_message_bytes,
                "handshake_timeout_seconds": l.handshake_timeout.as_secs_f64(),
                "idle_timeout_seconds": l.idle_timeout.as_secs_f64(),
                "heartbeat_interval_seconds": l.heartbeat_interval.as_secs_f64(),
                "heartbeat_timeout_seconds": l.heartbeat_timeout.as_secs_f64(),
                "send_queue_messages": l.send_queue_messages,
                "send_queue_bytes": l.send_queue_bytes,
                "max_pending_connections": l.max_pending_connections,
            },
            "event_subscribers": subscribers,
        })
    }
}

fn build_upstream(config: &Config) -> Option<Arc<Upstream>> {
    config
        .upstream
        .as_ref()
        .map(|u| Arc::new(Upstream::new(u.url.clone(), u.timeout, u.connect_timeout)))
}

/// Resident memory in MiB, two decimals.
fn memory_mb() -> f64 {
    (metrics::resident_memory_bytes() as f64 / (1024.0 * 1024.0) * 100.0).round() / 100.0
}
