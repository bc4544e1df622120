//! The accept loop both listeners share, and the serving of one HTTP/1 connection on it.
//!
//! - A bounded number of TCP connections is served at once (`max_pending_connections` on the
//!   public listener: handshakes in flight and plain HTTP; a fixed cap on the admin listener).
//!   Over the cap, a new connection is closed at once and counted, not queued.
//! - Running out of file descriptors (EMFILE/ENFILE) does not end the loop: it logs, counts,
//!   backs off and carries on.
//! - Every connection has an absolute deadline to send its first request head; headers dribbled
//!   one byte at a time do not extend it. Later request heads on a keep-alive connection are
//!   bounded by hyper's header-read timeout (which needs a timer, set here).
//! - On shutdown the loop stops accepting and every live HTTP connection is told to finish its
//!   current request and close; connections that became WebSockets left hyper's hands at the
//!   upgrade and are drained by their own tasks.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::enabled;
use crate::http::Body;
use crate::metrics::RejectReason;
use crate::state::Gateway;

/// Largest request head (request line and headers) either listener reads.
const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;
/// Accept-error back-off: starts here, doubles, and stops growing at `MAX_ACCEPT_BACKOFF`.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// How long an HTTP connection may take to finish its current request once the drain starts.
const HTTP_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// What the request handler knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The absolute deadline for the handshake (accept + `handshake_timeout`), if enabled.
    pub handshake_deadline: Option<Instant>,
}

/// Which listener this is, for the connection cap and the head deadline.
pub struct ListenerSpec {
    pub name: &'static str,
    pub max_connections: usize,
    /// The public listener's cap counts as `rejected{reason="pending"}` when hit.
    pub count_rejections: bool,
    /// Stops the accept loop and asks live HTTP connections to finish.
    pub stop: CancellationToken,
    /// Where connection tasks are tracked, so that shutdown can wait for them.
    pub tracker: TaskTracker,
}

/// Accepts until `spec.stop` is cancelled, serving each connection with `handler`.
pub async fn serve<H, F>(listener: TcpListener, gateway: Arc<Gateway>, spec: ListenerSpec, handler: H)
where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(spec.max_connections));
    let mut backoff = MIN_ACCEPT_BACKOFF;
    loop {
        let accepted = tokio::select! {
            () = spec.stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = MIN_ACCEPT_BACKOFF;
                x
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: the listener itself is fine.
                gateway.metrics.accept_errors.fetch_add(1, Relaxed);
                warn!(listener = spec.name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    () = spec.stop.cancelled() => break,
                    () = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if spec.count_rejections {
                gateway.metrics.rejected(RejectReason::Pending);
            }
            debug!(listener = spec.name, %peer, "connection cap reached; closing new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handshake_timeout = enabled(gateway.config().limits.handshake_timeout);
        let info = ConnInfo {
            peer,
            handshake_deadline: handshake_timeout.map(|t| Instant::now() + t),
        };
        let gw = Arc::clone(&gateway);
        let handler = handler.clone();
        let stop = spec.stop.clone();
        spec.tracker.spawn(async move {
            serve_connection(stream, info, handshake_timeout, gw, stop, handler).await;
            drop(slot);
        });
    }
    debug!(listener = spec.name, "stopped accepting");
}

async fn serve_connection<H, F>(
    stream: TcpStream,
    info: ConnInfo,
    head_timeout: Option<Duration>,
    gateway: Arc<Gateway>,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let seen_request = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&seen_request);
    let service = service_fn(move |req| {
        seen.store(true, Relaxed);
        let fut = handler(req, info);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES.max(8192))
        .max_headers(64)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut head_deadline = info.handshake_deadline;
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_timeout() && !seen_request.load(Relaxed) {
                        gateway.metrics.rejected(RejectReason::HandshakeTimeout);
                    }
                    debug!(peer = %info.peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            () = sleep_until(head_deadline.unwrap_or_else(Instant::now)), if head_deadline.is_some() => {
                if draining {
                    debug!(peer = %info.peer, "http connection did not finish within the drain grace; closing");
                    return;
                }
                if !seen_request.load(Relaxed) {
                    gateway.metrics.rejected(RejectReason::HandshakeTimeout);
                    debug!(peer = %info.peer, "no request head before the handshake deadline; closing");
                    return;
                }
                head_deadline = None;
            }
            () = stop.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
                head_deadline = Some(Instant::now() + HTTP_DRAIN_GRACE);
            }
        }
    }
}
