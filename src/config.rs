//! The configuration pipeline: TOML text -> `FileConfig` (serde, every key optional) -> `validate`
//! -> `Config` (typed, checked, trusted everywhere after).
//!
//! Validation collects every problem, not just the first, and each message names the key the
//! operator has to fix (`limits.max_total_connections must be at least 1, got 0`). Unknown keys
//! (typos) are errors too, reported with their full path.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::client_ip::TrustedProxies;
use crate::origin::OriginPolicy;
use crate::proxy::Upstream;
use crate::topic::TopicName;

/// Public listener address when none is configured.
pub const DEFAULT_SERVER_LISTEN: &str = "0.0.0.0:8080";
/// WebSocket path when none is configured.
pub const DEFAULT_WS_PATH: &str = "/ws";
/// Admin listener address when none is configured: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Largest accepted `POST /publish` body, in bytes.
pub const DEFAULT_MAX_PUBLISH_BYTES: i64 = 1024 * 1024;
/// Open WebSocket connections, all clients together.
pub const DEFAULT_MAX_TOTAL_CONNECTIONS: i64 = 50;
/// Open WebSocket connections from one client IP (IPv6: one /64).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: i64 = 5;
/// Client messages per connection per minute.
pub const DEFAULT_MAX_MESSAGE_RATE_PER_MINUTE: i64 = 30;
/// Topics one connection may subscribe to.
pub const DEFAULT_MAX_SUBSCRIPTIONS: i64 = 10;
/// Largest client message, in bytes (frames and reassembled messages).
pub const DEFAULT_MAX_MESSAGE_BYTES: i64 = 64 * 1024;
/// Accept-to-upgrade deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: &str = "10s";
/// No application message in either direction for this long closes the connection.
pub const DEFAULT_IDLE_TIMEOUT: &str = "300s";
/// A WebSocket Ping is sent this often.
pub const DEFAULT_HEARTBEAT_INTERVAL: &str = "30s";
/// Nothing received for this long means the peer is gone.
pub const DEFAULT_HEARTBEAT_TIMEOUT: &str = "60s";
/// Outbound queue bound per connection, in messages.
pub const DEFAULT_SEND_QUEUE_MESSAGES: i64 = 256;
/// Outbound queue bound per connection, in bytes of queued event payload.
pub const DEFAULT_SEND_QUEUE_BYTES: i64 = 1024 * 1024;
/// TCP connections on the public listener that have not (yet) become WebSockets.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: i64 = 256;
/// Longest topic name, in bytes.
pub const DEFAULT_MAX_NAME_LENGTH: i64 = 128;
/// Whole-response-headers deadline for proxied requests.
pub const DEFAULT_UPSTREAM_TIMEOUT: &str = "30s";
/// TCP connect deadline to the upstream.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: &str = "2s";
/// Deadline for the handshake authorization call (a slow auth backend refuses with 503).
pub const DEFAULT_AUTH_TIMEOUT: &str = "2s";
/// Longest time a graceful shutdown waits for connections to close.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10s";

/// Upper bound for byte-sized limits: nothing in a gateway needs a single message over 64 MiB.
const MAX_BYTES_CEILING: i64 = 64 * 1024 * 1024;

/// One problem found in a configuration, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", .0.iter().map(|e| e.0.as_str()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

impl LoadError {
    /// The individual problems (one for a read error).
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadError::Read { .. } => vec![self.to_string()],
            LoadError::Invalid(errors) => errors.iter().map(|e| e.0.clone()).collect(),
        }
    }
}

/// A secret (the admin token): compared in constant time, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Constant-time comparison: the time taken does not depend on where the inputs differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        // Length is not secret (it is fixed by the operator), but fold it in without branching early.
        let mut diff = expected.len() ^ candidate.len();
        for (i, b) in expected.iter().enumerate() {
            let c = candidate.get(i).copied().unwrap_or(0);
            diff |= usize::from(b ^ c);
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub limits: Limits,
    pub topics: TopicsConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    /// `None`: no backend; paths other than the WebSocket ones get 404.
    pub upstream: Option<UpstreamConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub ws_path: String,
    /// Opt-in echo endpoint for protocol conformance runs (Autobahn); same code path and limits.
    pub echo_path: Option<String>,
    /// Which browser origins may open a WebSocket (cross-site WebSocket hijacking).
    pub allowed_origins: OriginPolicy,
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// Runtime threads; 0 = one per CPU the process may use (see `Config::runtime_threads`).
    pub worker_threads: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub url: hyper::Uri,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Ask `GET {url}{auth_path}` before accepting each WebSocket handshake.
    pub auth_path: Option<String>,
    pub auth_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub max_publish_bytes: usize,
    pub token: Option<Secret>,
}

/// Resource limits. A zero duration means that timer is disabled.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_total_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_message_rate_per_minute: u32,
    pub max_subscriptions: usize,
    pub max_message_bytes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub send_queue_messages: usize,
    pub send_queue_bytes: usize,
    pub max_pending_connections: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopicsConfig {
    pub max_name_length: usize,
    /// `None`: any valid name.
    pub allowed: Option<BTreeSet<TopicName>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownConfig {
    pub drain_timeout: Duration,
    /// Goodbyes are spread over this window so that clients do not all reconnect at once.
    pub close_spread: Duration,
}

/// Returns `Some(d)` for an enabled timer, `None` for `"0s"`.
pub fn enabled(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

// ---------------------------------------------------------------------------------------------
// The file form: every key optional, numbers as i64 so that a negative value gets our message
// rather than a serde type error.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileConfig {
    server: FileServer,
    admin: FileAdmin,
    limits: FileLimits,
    topics: FileTopics,
    log: FileLog,
    shutdown: FileShutdown,
    upstream: Option<FileUpstream>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileUpstream {
    url: Option<String>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    auth_path: Option<String>,
    auth_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileServer {
    listen: Option<String>,
    ws_path: Option<String>,
    echo_path: Option<String>,
    allowed_origins: Option<Vec<String>>,
    trusted_proxies: Option<Vec<String>>,
    worker_threads: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileAdmin {
    listen: Option<String>,
    max_publish_bytes: Option<i64>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileLimits {
    max_total_connections: Option<i64>,
    max_connections_per_ip: Option<i64>,
    max_message_rate_per_minute: Option<i64>,
    max_subscriptions: Option<i64>,
    max_message_bytes: Option<i64>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    heartbeat_interval: Option<String>,
    heartbeat_timeout: Option<String>,
    send_queue_messages: Option<i64>,
    send_queue_bytes: Option<i64>,
    max_pending_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileTopics {
    max_name_length: Option<i64>,
    allowed: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileShutdown {
    drain_timeout: Option<String>,
    close_spread: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        // The built-in defaults are valid by construction; a unit test checks this.
        Config::parse("").unwrap_or_else(|e| unreachable!("built-in defaults are invalid: {e}"))
    }
}

impl Config {
    /// How many runtime threads to run: `server.worker_threads`, or when that is 0, one per CPU
    /// this process may use (`available_parallelism` follows the CPU affinity mask and the
    /// cgroup CPU quota, so a daemon pinned to one core or given one CPU in a container counts 1).
    pub fn runtime_threads(&self) -> usize {
        match self.server.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text, collecting every problem.
    pub fn parse(text: &str) -> Result<Config, LoadError> {
        let mut unknown = Vec::new();
        let de = toml::Deserializer::parse(text)
            .map_err(|e| LoadError::Invalid(vec![ConfigError(format!("invalid TOML: {e}"))]))?;
        let file: FileConfig = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
            .map_err(|e| LoadError::Invalid(vec![ConfigError(format!("invalid config: {e}"))]))?;
        let mut v = Validator::default();
        for key in unknown {
            v.err(format!(
                "unknown key {key} (check the spelling; see config/wsgate.toml)"
            ));
        }
        let config = v.config(file);
        match config {
            Some(c) if v.errors.is_empty() => Ok(c),
            _ => Err(LoadError::Invalid(v.errors)),
        }
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    fn err(&mut self, msg: String) {
        self.errors.push(ConfigError(msg));
    }

    fn int(&mut self, key: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> usize {
        let v = value.unwrap_or(default);
        if v < min {
            self.err(format!("{key} must be at least {min}, got {v}"));
            return usize::try_from(min).unwrap_or(1);
        }
        if v > max {
            self.err(format!("{key} must be at most {max}, got {v}"));
            return usize::try_from(max).unwrap_or(1);
        }
        usize::try_from(v).unwrap_or(0)
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: &str) -> Duration {
        let text = value.unwrap_or(default);
        match parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.err(format!(
                    "{key} must be a duration like \"30s\", \"500ms\" or \"5m\", got {text:?} ({e})"
                ));
                Duration::ZERO
            }
        }
    }

    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> Option<SocketAddr> {
        let text = value.unwrap_or(default);
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(format!(
                    "{key} must be an IP address and port like \"127.0.0.1:9090\", got {text:?}"
                ));
                None
            }
        }
    }

    fn path(&mut self, key: &str, value: &str) {
        if !value.starts_with('/') || value.len() > 256 || value.contains(['?', '#', ' ']) {
            self.err(format!(
                "{key} must be an absolute URL path like \"/ws\" (no query, no spaces), got {value:?}"
            ));
        }
    }

    fn config(&mut self, f: FileConfig) -> Option<Config> {
        // [server]
        let listen = self.addr("server.listen", f.server.listen.as_deref(), DEFAULT_SERVER_LISTEN);
        let ws_path = f.server.ws_path.unwrap_or_else(|| DEFAULT_WS_PATH.to_owned());
        self.path("server.ws_path", &ws_path);
        if ws_path == "/healthz" {
            self.err("server.ws_path must not be \"/healthz\" (the load-balancer probe)".into());
        }
        if let Some(echo) = &f.server.echo_path {
            self.path("server.echo_path", echo);
            if *echo == ws_path || echo == "/healthz" {
                self.err(format!(
                    "server.echo_path must differ from server.ws_path and \"/healthz\", got {echo:?}"
                ));
            }
        }

        let worker_threads = self.int("server.worker_threads", f.server.worker_threads, 0, 0, 1024);

        let allowed_origins =
            OriginPolicy::parse(f.server.allowed_origins.as_deref()).unwrap_or_else(|errs| {
                errs.into_iter().for_each(|e| self.err(e));
                OriginPolicy::allow_any()
            });
        let trusted_proxies = TrustedProxies::parse(f.server.trusted_proxies.as_deref().unwrap_or_default())
            .unwrap_or_else(|errs| {
                errs.into_iter().for_each(|e| self.err(e));
                TrustedProxies::default()
            });

        // [upstream]
        let upstream = f.upstream.and_then(|u| self.upstream(u));

        // [admin]
        let admin_listen = self.addr("admin.listen", f.admin.listen.as_deref(), DEFAULT_ADMIN_LISTEN);
        let max_publish_bytes = self.int(
            "admin.max_publish_bytes",
            f.admin.max_publish_bytes,
            DEFAULT_MAX_PUBLISH_BYTES,
            64,
            MAX_BYTES_CEILING,
        );
        let token = match (f.admin.token, f.admin.token_file) {
            (Some(_), Some(_)) => {
                self.err("admin.token and admin.token_file are exclusive: set only one".into());
                None
            }
            (Some(t), None) => self.token("admin.token", t),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(t) => self.token("admin.token_file", t.trim_end_matches(['\n', '\r']).to_owned()),
                Err(e) => {
                    self.err(format!("admin.token_file: cannot read {}: {e}", path.display()));
                    None
                }
            },
            (None, None) => None,
        };
        if let Some(a) = admin_listen {
            if !a.ip().is_loopback() && token.is_none() {
                self.err(format!(
                    "admin.listen is {a}, not a loopback address: set admin.token or admin.token_file \
                     so that publishing and status need a bearer token"
                ));
            }
        }

        // [limits]
        let l = f.limits;
        let max_message_bytes = self.int(
            "limits.max_message_bytes",
            l.max_message_bytes,
            DEFAULT_MAX_MESSAGE_BYTES,
            // A close frame's reason alone may be 123 bytes; below that the protocol breaks.
            128,
            MAX_BYTES_CEILING,
        );
        let limits = Limits {
            max_total_connections: self.int(
                "limits.max_total_connections",
                l.max_total_connections,
                DEFAULT_MAX_TOTAL_CONNECTIONS,
                1,
                10_000_000,
            ),
            max_connections_per_ip: self.int(
                "limits.max_connections_per_ip",
                l.max_connections_per_ip,
                DEFAULT_MAX_CONNECTIONS_PER_IP,
                1,
                10_000_000,
            ),
            max_message_rate_per_minute: u32::try_from(self.int(
                "limits.max_message_rate_per_minute",
                l.max_message_rate_per_minute,
                DEFAULT_MAX_MESSAGE_RATE_PER_MINUTE,
                1,
                600_000,
            ))
            .unwrap_or(1),
            max_subscriptions: self.int(
                "limits.max_subscriptions",
                l.max_subscriptions,
                DEFAULT_MAX_SUBSCRIPTIONS,
                1,
                100_000,
            ),
            max_message_bytes,
            handshake_timeout: self.duration(
                "limits.handshake_timeout",
                l.handshake_timeout.as_deref(),
                DEFAULT_HANDSHAKE_TIMEOUT,
            ),
            idle_timeout: self.duration(
                "limits.idle_timeout",
                l.idle_timeout.as_deref(),
                DEFAULT_IDLE_TIMEOUT,
            ),
            heartbeat_interval: self.duration(
                "limits.heartbeat_interval",
                l.heartbeat_interval.as_deref(),
                DEFAULT_HEARTBEAT_INTERVAL,
            ),
            heartbeat_timeout: self.duration(
                "limits.heartbeat_timeout",
                l.heartbeat_timeout.as_deref(),
                DEFAULT_HEARTBEAT_TIMEOUT,
            ),
            send_queue_messages: self.int(
                "limits.send_queue_messages",
                l.send_queue_messages,
                DEFAULT_SEND_QUEUE_MESSAGES,
                1,
                1_000_000,
            ),
            send_queue_bytes: self.int(
                "limits.send_queue_bytes",
                l.send_queue_bytes,
                DEFAULT_SEND_QUEUE_BYTES,
                1024,
                1024 * 1024 * 1024,
            ),
            max_pending_connections: self.int(
                "limits.max_pending_connections",
                l.max_pending_connections,
                DEFAULT_MAX_PENDING_CONNECTIONS,
                1,
                1_000_000,
            ),
        };
        if let (Some(i), Some(t)) = (
            enabled(limits.heartbeat_interval),
            enabled(limits.heartbeat_timeout),
        ) {
            if t <= i {
                self.err(format!(
                    "limits.heartbeat_timeout ({}) must be longer than limits.heartbeat_interval ({}), \
                     or a healthy peer would be declared dead between two pings",
                    humantime::format_duration(t),
                    humantime::format_duration(i)
                ));
            }
        }

        // [topics]
        let max_name_length = self.int(
            "topics.max_name_length",
            f.topics.max_name_length,
            DEFAULT_MAX_NAME_LENGTH,
            1,
            1024,
        );
        let allowed = f.topics.allowed.map(|names| {
            let mut set = BTreeSet::new();
            for (i, name) in names.iter().enumerate() {
                match TopicName::parse(name, max_name_length) {
                    Ok(t) => {
                        set.insert(t);
                    }
                    Err(e) => self.err(format!("topics.allowed[{i}]: {e}")),
                }
            }
            set
        });

        // [log]
        let level = f.log.level.unwrap_or_else(|| "info".to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            self.err(format!(
                "log.level must be a level (error, warn, info, debug, trace) or a filter directive, \
                 got {level:?} ({e})"
            ));
        }
        let format = match f.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                self.err(format!("log.format must be \"text\" or \"json\", got {other:?}"));
                LogFormat::Text
            }
        };

        // [shutdown]
        let drain_timeout = self.duration(
            "shutdown.drain_timeout",
            f.shutdown.drain_timeout.as_deref(),
            DEFAULT_DRAIN_TIMEOUT,
        );
        let default_spread = humantime::format_duration(drain_timeout / 2).to_string();
        let close_spread = self.duration(
            "shutdown.close_spread",
            f.shutdown.close_spread.as_deref(),
            &default_spread,
        );
        if close_spread > drain_timeout {
            self.err(format!(
                "shutdown.close_spread ({}) must not exceed shutdown.drain_timeout ({})",
                humantime::format_duration(close_spread),
                humantime::format_duration(drain_timeout)
            ));
        }

        Some(Config {
            server: ServerConfig {
                listen: listen?,
                ws_path,
                echo_path: f.server.echo_path,
                allowed_origins,
                trusted_proxies,
                worker_threads,
            },
            upstream,
            admin: AdminConfig {
                listen: admin_listen?,
                max_publish_bytes,
                token,
            },
            limits,
            topics: TopicsConfig {
                max_name_length,
                allowed,
            },
            log: LogConfig { level, format },
            shutdown: ShutdownConfig {
                drain_timeout,
                close_spread,
            },
        })
    }

    fn upstream(&mut self, u: FileUpstream) -> Option<UpstreamConfig> {
        let Some(text) = u.url else {
            self.err(
                "upstream.url is required when [upstream] is present (e.g. \"http://127.0.0.1:8000\")".into(),
            );
            return None;
        };
        let url = match text.parse::<hyper::Uri>() {
            Ok(url) => url,
            Err(_) => {
                self.err(format!(
                    "upstream.url: {text:?} is not a URL (expected e.g. \"http://127.0.0.1:8000\")"
                ));
                return None;
            }
        };
        if let Err(e) = Upstream::check_url(&url) {
            self.err(e);
        }
        if let Some(path) = &u.auth_path {
            if let Err(e) = Upstream::check_auth_path(path) {
                self.err(e);
            }
        }
        let timeout = self.duration("upstream.timeout", u.timeout.as_deref(), DEFAULT_UPSTREAM_TIMEOUT);
        let connect_timeout = self.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        );
        let auth_timeout = self.duration(
            "upstream.auth_timeout",
            u.auth_timeout.as_deref(),
            DEFAULT_AUTH_TIMEOUT,
        );
        for (key, d) in [
            ("upstream.timeout", timeout),
            ("upstream.connect_timeout", connect_timeout),
            ("upstream.auth_timeout", auth_timeout),
        ] {
            if d.is_zero() {
                self.err(format!("{key} must be longer than 0s"));
            }
        }
        Some(UpstreamConfig {
            url,
            timeout,
            connect_timeout,
            auth_path: u.auth_path,
            auth_timeout,
        })
    }

    fn token(&mut self, key: &str, token: String) -> Option<Secret> {
        if token.len() < 16 {
            // Never echo the value: it is a secret even when it is a bad one.
            self.err(format!("{key} must be at least 16 characters long"));
            return None;
        }
        if token.chars().any(|c| c.is_control() || c == ' ') {
            self.err(format!("{key} must not contain spaces or control characters"));
            return None;
        }
        Some(Secret(token))
    }
}

/// Parses `"30s"`, `"500ms"`, `"5m"`, `"1h 30m"`; `"0s"` (or `"0"`) is zero, which disables a timer.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(_) => vec![],
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn worker_threads_defaults_to_one_per_cpu_and_is_bounded() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.worker_threads, 0);
        assert!(c.runtime_threads() >= 1);
        let c = Config::parse("[server]\nworker_threads = 3\n").unwrap();
        assert_eq!(c.runtime_threads(), 3);
        let e = errors("[server]\nworker_threads = 5000\n");
        assert_eq!(e, ["server.worker_threads must be at most 1024, got 5000"]);
    }

    #[test]
    fn defaults_are_the_documented_production_values() {
        let c = Config::default();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.server.ws_path, "/ws");
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.admin.max_publish_bytes, 1_048_576);
        assert_eq!(c.limits.max_total_connections, 50);
        assert_eq!(c.limits.max_connections_per_ip, 5);
        assert_eq!(c.limits.max_message_rate_per_minute, 30);
        assert_eq!(c.limits.max_subscriptions, 10);
        assert_eq!(c.limits.max_message_bytes, 65_536);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.limits.heartbeat_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.send_queue_messages, 256);
        assert_eq!(c.topics.max_name_length, 128);
        assert!(c.topics.allowed.is_none());
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(10));
    }

    #[test]
    fn shipped_config_parses_and_matches_the_defaults() {
        let text = include_str!("../config/wsgate.toml");
        let shipped = Config::parse(text).expect("config/wsgate.toml must be valid");
        let defaults = Config::default();
        assert_eq!(shipped.server, defaults.server);
        assert_eq!(shipped.limits, defaults.limits);
        assert_eq!(shipped.topics, defaults.topics);
        assert_eq!(shipped.log, defaults.log);
        assert_eq!(shipped.shutdown, defaults.shutdown);
        assert_eq!(shipped.admin.listen, defaults.admin.listen);
        assert_eq!(shipped.admin.max_publish_bytes, defaults.admin.max_publish_bytes);
    }

    #[test]
    fn zero_total_connections_names_the_key() {
        assert_eq!(
            errors("[limits]\nmax_total_connections = 0\n"),
            vec!["limits.max_total_connections must be at least 1, got 0"]
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let e = errors(
            "[limits]\nmax_total_connections = -3\nmax_subscriptions = 0\nidle_timeout = \"soon\"\n\
             [log]\nformat = \"xml\"\n",
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].starts_with("limits.max_total_connections must be at least 1, got -3"));
        assert!(e[1].starts_with("limits.max_subscriptions must be at least 1, got 0"));
        assert!(e[2].starts_with("limits.idle_timeout must be a duration"));
        assert!(e[3].starts_with("log.format must be"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_table() {
        let e = errors("[limits]\nmax_total_conections = 5\n[bogus]\nx = 1\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.starts_with("unknown key limits.max_total_conections")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.starts_with("unknown key bogus")), "{e:?}");
    }

    #[test]
    fn durations_parse_and_zero_disables() {
        let c = Config::parse("[limits]\nidle_timeout = \"0s\"\nhandshake_timeout = \"500ms\"\n").unwrap();
        assert_eq!(enabled(c.limits.idle_timeout), None);
        assert_eq!(c.limits.handshake_timeout, Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
    }

    #[test]
    fn heartbeat_timeout_must_exceed_interval() {
        let e = errors("[limits]\nheartbeat_interval = \"30s\"\nheartbeat_timeout = \"30s\"\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("limits.heartbeat_timeout"), "{e:?}");
    }

    #[test]
    fn bad_addresses_and_paths_are_named() {
        let e = errors("[server]\nlisten = \"localhost\"\nws_path = \"ws\"\n");
        assert!(e[0].starts_with("server.listen must be"), "{e:?}");
        assert!(e[1].starts_with("server.ws_path must be"), "{e:?}");
    }

    #[test]
    fn allowed_topics_are_validated() {
        let e = errors("[topics]\nallowed = [\"ok\", \"not ok\"]\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("topics.allowed[1]:"), "{e:?}");
        let c = Config::parse("[topics]\nallowed = [\"a\", \"b\"]\n").unwrap();
        assert_eq!(c.topics.allowed.unwrap().len(), 2);
    }

    #[test]
    fn wrong_types_are_reported() {
        let e = errors("[limits]\nmax_total_connections = \"fifty\"\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("max_total_connections"), "{e:?}");
    }

    #[test]
    fn public_admin_listener_needs_a_token_and_the_token_never_leaks() {
        let e = errors("[admin]\nlisten = \"0.0.0.0:9090\"\n");
        assert!(e[0].starts_with("admin.listen is 0.0.0.0:9090"), "{e:?}");
        let c =
            Config::parse("[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"s3cr3t-s3cr3t-s3cr3t\"\n").unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr3t"), "token leaked into Debug output");
        let short = errors("[admin]\ntoken = \"tiny-secret\"\n");
        assert!(!short[0].contains("tiny-secret"), "{short:?}");
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let text = format!("[admin]\ntoken_file = {:?}\n", path.display().to_string());
        let c = Config::parse(&text).unwrap();
        assert!(c.admin.token.unwrap().matches(b"abcdefghijklmnopqrstuvwxyz"));
    }

    #[test]
    fn front_door_keys_are_validated_and_named() {
        let e = errors(
            "[server]\nallowed_origins = [\"app.example.com\"]\ntrusted_proxies = [\"10.0.0.0/33\"]\n\
             [upstream]\nurl = \"https://backend\"\nauth_path = \"ws/auth\"\ntimeout = \"0s\"\n",
        );
        assert!(
            e.iter().any(|m| m.starts_with("server.allowed_origins[0]")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|m| m.starts_with("server.trusted_proxies[0]")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.starts_with("upstream.url")), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("upstream.auth_path")), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("upstream.timeout")), "{e:?}");
        let c =
            Config::parse("[upstream]\nurl = \"http://127.0.0.1:8000\"\nauth_path = \"/ws/auth\"\n").unwrap();
        let u = c.upstream.unwrap();
        assert_eq!(u.timeout, Duration::from_secs(30));
        assert_eq!(u.connect_timeout, Duration::from_secs(2));
        assert_eq!(u.auth_path.as_deref(), Some("/ws/auth"));
        assert!(Config::default().upstream.is_none());
        assert!(Config::default().server.allowed_origins.allows_any());
    }

    #[test]
    fn secret_compare() {
        let s = Secret("0123456789abcdef".into());
        assert!(s.matches(b"0123456789abcdef"));
        assert!(!s.matches(b"0123456789abcdeF"));
        assert!(!s.matches(b"0123456789abcde"));
        assert!(!s.matches(b"0123456789abcdef0"));
        assert!(!s.matches(b""));
    }
}
