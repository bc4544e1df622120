//! wsgate: a WebSocket gateway daemon. It terminates client WebSockets, enforces resource limits
//! on them, and fans out events that a backend publishes on a local HTTP endpoint to the clients
//! subscribed to each topic, and only to them.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | `main.rs` | the binary: CLI, config load (exit 64 on a bad one), signals, logging, sd_notify |
//! | `lib.rs` | `Daemon` / `run`: start both listeners, drain on shutdown |
//! | `config.rs` | TOML -> validated `Config`; every error names its key |
//! | `topic.rs` | `TopicName`, checked once at the edge |
//! | `protocol.rs` | the client JSON messages, in and out; event encoding |
//! | `hub.rs` | topic -> subscribers; fan-out that never waits; per-topic order |
//! | `registry.rs` | the open-connection table; `ConnShared`, a connection's outside face |
//! | `outbox.rs` | a connection's bounded queue of pre-framed events |
//! | `connection.rs` | one task per WebSocket: the `select!` loop, timers, cleanup |
//! | `upgrade.rs` | the handshake: checks, admission, 101, spawning the connection task |
//! | `limits.rs` | connection permits (total, per IP) and the message rate limiter |
//! | `listener.rs` | the accept loop and HTTP/1 serving shared by both listeners |
//! | `public.rs` | routes of the public listener |
//! | `admin.rs` | routes of the admin listener (health, status, metrics, connections) |
//! | `publish.rs` | `POST /publish` |
//! | `state.rs` | `Gateway`, the state all tasks share, and the reports built from it |
//! | `metrics.rs` | counters, histograms, Prometheus rendering |
//! | `http.rs` | body type and JSON responses |
//! | `logging.rs` | tracing setup (text or JSON), reloadable level |
//! | `notify.rs` | systemd `sd_notify`, std-only |

pub mod admin;
pub mod client_ip;
pub mod config;
pub mod connection;
pub mod http;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod origin;
pub mod outbox;
pub mod protocol;
pub mod proxy;
pub mod public;
pub mod publish;
pub mod registry;
pub mod state;
pub mod topic;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
use listener::ListenerSpec;
use state::Gateway;

/// Admin connections served at once (it is a local, trusted listener: a small fixed cap).
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// How long admin requests in flight may take to finish once the drain is over.
const ADMIN_STOP_GRACE: Duration = Duration::from_secs(1);

/// The two bound listeners. The caller binds them (tests bind port 0) so that a bind error is
/// reported before anything starts.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses of `config`.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let public = TcpListener::bind(config.server.listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("server.listen {}: {e}", config.server.listen))
        })?;
        let admin = TcpListener::bind(config.admin.listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("admin.listen {}: {e}", config.admin.listen))
        })?;
        Ok(Listeners { public, admin })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections (WebSocket and HTTP) still open when the drain deadline expired.
    pub cut_off: usize,
}

/// A daemon instance: its shared state, and the handle to reload it.
pub struct Daemon {
    gateway: Arc<Gateway>,
}

impl Daemon {
    pub fn new(config: Config) -> Daemon {
        Daemon {
            gateway: Gateway::new(config),
        }
    }

    /// The shared state (for reports and tests).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Applies a new, validated config. Returns what needs a restart to take effect.
    pub fn reload(&self, config: Config) -> Vec<String> {
        self.gateway.apply_config(config)
    }

    /// Serves until `shutdown` resolves, then drains: the public listener stops accepting, every
    /// WebSocket client gets what is queued for it, `server_shutdown` and a 1001 close (spread
    /// over `shutdown.close_spread`), and this returns once all connections are gone or
    /// `shutdown.drain_timeout` has passed. The admin listener answers (health 503, publish
    /// 503) until the end of the drain.
    pub async fn run(&self, listeners: Listeners, shutdown: impl Future<Output = ()>) -> DrainReport {
        let gw = &self.gateway;
        let admin_stop = CancellationToken::new();
        let admin_tracker = TaskTracker::new();
        let config = gw.config();
        info!(public = %listeners.public_addr(), admin = %listeners.admin_addr(), "wsgate listening");

        let public_gw = Arc::clone(gw);
        let public = tokio::spawn(listener::serve(
            listeners.public,
            Arc::clone(gw),
            ListenerSpec {
                name: "public",
                max_connections: config.limits.max_pending_connections,
                count_rejections: true,
                stop: gw.shutdown.clone(),
                tracker: gw.tracker.clone(),
            },
            move |req, info| public::handle(Arc::clone(&public_gw), req, info),
        ));
        let admin_gw = Arc::clone(gw);
        let admin = tokio::spawn(listener::serve(
            listeners.admin,
            Arc::clone(gw),
            ListenerSpec {
                name: "admin",
                max_connections: ADMIN_MAX_CONNECTIONS,
                count_rejections: false,
                stop: admin_stop.clone(),
                tracker: admin_tracker.clone(),
            },
            move |req, _info| admin::handle(Arc::clone(&admin_gw), req),
        ));

        shutdown.await;
        gw.start_draining();
        let drain = gw.config().shutdown.drain_timeout;
        info!(
            connections = gw.registry.len(),
            drain_timeout = ?drain,
            "draining: no new connections; closing existing ones"
        );
        let _ = public.await;
        gw.tracker.close();
        let cut_off = match tokio::time::timeout(drain, gw.tracker.wait()).await {
            Ok(()) => {
                info!("drain complete: all connections closed");
                0
            }
            Err(_) => {
                let left = gw.tracker.len();
                warn!(
                    cut_off = left,
                    websockets = gw.registry.len(),
                    "drain timeout expired; cutting off the connections still open"
                );
                left
            }
        };
        admin_stop.cancel();
        let _ = admin.await;
        admin_tracker.close();
        let _ = tokio::time::timeout(ADMIN_STOP_GRACE, admin_tracker.wait()).await;
        DrainReport { cut_off }
    }
}

/// Runs a daemon on `config` and `listeners` until `shutdown` resolves, then drains.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> DrainReport {
    Daemon::new(config).run(listeners, shutdown).await
}
