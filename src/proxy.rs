//! Owns the connection to the `[upstream]` backend: the streaming reverse proxy for plain
//! HTTP requests (`Upstream::forward`) and the handshake authorization call to
//! `upstream.auth_path` (`Upstream::authorize`).
//!
//! Plain `http://` only: the backend is expected on loopback or a private network, so no
//! TLS client is linked in (`Upstream::check_url` rejects anything else at startup).
//!
//! Bodies are never collected: request and response bodies stream frame by frame, so a
//! 100 MB upload or download costs a few buffers, not 100 MB. The one body that is read
//! into memory is the authorization response, capped at `MAX_AUTH_BODY`.
//!
//! Deadlines: `upstream.timeout` bounds the time until the upstream's response *headers*
//! arrive (this includes sending the request body, if the backend reads it all before
//! answering). After that, the response body is not cut by a total deadline (a long,
//! healthy download must work), but by an *idle* deadline of the same length: if the
//! upstream sends nothing for `timeout` while we wait for it, the body ends with an error
//! and the client sees a truncated response. Time spent waiting on a slow *client* does
//! not count, since the upstream body is only polled when the client can take more.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::http::{
    self, header, Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
    Version,
};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Error type of every body that crosses the proxy.
pub use crate::http::BoxError;

/// The body of proxied requests and responses (and of the JSON error responses).
pub use crate::http::Body as ProxyBody;

/// The authorization response body is read up to this many bytes; a larger one is
/// treated as `Unavailable` (see `Upstream::authorize`).
pub const MAX_AUTH_BODY: usize = 64 * 1024;

/// A `client_id` from the authorization response longer than this is ignored.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Idle pooled connections are closed after this long: shorter than the keep-alive
/// timeouts of common backends (gunicorn 2 s, uvicorn 5 s, nginx 75 s), so we rarely
/// reuse a connection the backend is closing at the same moment. Reconnecting over
/// loopback is cheap; under load connections are busy and stay pooled.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
const POOL_MAX_IDLE_PER_HOST: usize = 64;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What the caller knows about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ForwardCtx {
    /// The resolved client address (`client_ip::TrustedProxies::resolve`).
    pub client_ip: IpAddr,
    /// Whether the TCP peer is a trusted proxy. Only then are its `X-Forwarded-For`,
    /// `Forwarded`, `X-Forwarded-Proto` and `X-Forwarded-Host` kept.
    pub trusted_peer: bool,
    /// Scheme the client used to reach wsgate: `"http"` (wsgate does not terminate TLS).
    pub proto: &'static str,
    /// The request's `Host` (or HTTP/2 `:authority`), for `X-Forwarded-Host` / `Forwarded`.
    pub host: Option<HeaderValue>,
}

/// How a forwarded request ended (decided when the response headers arrive, or do not).
pub use crate::metrics::UpstreamOutcome as Outcome;

/// The backend's verdict on a WebSocket handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    /// 2xx. The optional JSON body may name the client and the topics it may use.
    Allow {
        client_id: Option<String>,
        topics: Option<Vec<String>>,
    },
    /// 401 or 403: refuse the handshake with this status.
    Deny(StatusCode),
    /// Any other status, a malformed verdict, connection failure or timeout.
    Unavailable,
}

/// The pooled keep-alive client for the backend.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, ProxyBody>,
    base: Uri,
    timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Validates `upstream.url` for the config loader: `http://host[:port][/prefix]`.
    pub fn check_url(url: &Uri) -> Result<(), String> {
        match url.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "upstream.url: \"{url}\" uses {other}://, but wsgate speaks plain http:// to the backend (keep it on loopback or a private network)"
                ))
            }
            None => {
                return Err(format!(
                    "upstream.url: \"{url}\" has no scheme (expected e.g. \"http://127.0.0.1:8000\")"
                ))
            }
        }
        match url.authority() {
            None => return Err(format!("upstream.url: \"{url}\" has no host")),
            Some(a) if a.as_str().contains('@') => {
                return Err(format!("upstream.url: \"{url}\" must not contain user info"))
            }
            Some(_) => {}
        }
        if url.query().is_some() {
            return Err(format!("upstream.url: \"{url}\" must not have a query"));
        }
        Ok(())
    }

    /// Validates `upstream.auth_path` for the config loader: an absolute path (a query is
    /// allowed), appended to `upstream.url`.
    pub fn check_auth_path(path: &str) -> Result<(), String> {
        if !path.starts_with('/') {
            return Err(format!("upstream.auth_path: {path:?} must start with '/'"));
        }
        if path.parse::<http::uri::PathAndQuery>().is_err() || path.contains('#') {
            return Err(format!("upstream.auth_path: {path:?} is not a valid URL path"));
        }
        Ok(())
    }

    /// Builds the client. `base` should have passed `check_url`; if it did not, every
    /// request fails with 502 / `Unavailable` rather than a panic.
    pub fn new(base: Uri, timeout: Duration, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        // Plain http only: an https:// URL fails instead of silently sending cleartext.
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Upstream {
            client,
            base,
            timeout,
        }
    }

    /// The upstream URI for a request target: base scheme and authority, base path
    /// (without trailing `/`) as a prefix, then the client's path and query.
    fn target(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let prefix = self.base.path().trim_end_matches('/');
        let mut builder = Uri::builder();
        if let Some(scheme) = self.base.scheme() {
            builder = builder.scheme(scheme.clone());
        }
        if let Some(authority) = self.base.authority() {
            builder = builder.authority(authority.clone());
        }
        builder
            .path_and_query(format!("{prefix}{path_and_query}"))
            .build()
    }

    /// Proxies one plain HTTP request (not a WebSocket handshake: `Upgrade` is stripped
    /// like every hop-by-hop header, and an upstream `101` becomes a 502).
    ///
    /// Method, path, query, end-to-end headers and body pass through unchanged; `Host` is
    /// kept as the client sent it (hyper fills in the upstream's when absent).
    pub async fn forward(&self, req: Request<Incoming>, ctx: &ForwardCtx) -> (Response<ProxyBody>, Outcome) {
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = match self.target(path_and_query) {
            Ok(uri) => uri,
            Err(e) => {
                tracing::warn!(error = %e, base = %self.base, "cannot build upstream URI");
                return (
                    json_error(StatusCode::BAD_GATEWAY, "bad upstream address"),
                    Outcome::Error,
                );
            }
        };
        // The upstream leg is always HTTP/1.1, whatever the client spoke.
        parts.version = Version::HTTP_11;
        // Extensions are per-connection server state, meaningless to the client side.
        parts.extensions = Extensions::new();
        strip_hop_by_hop(&mut parts.headers);
        // `Expect: 100-continue` was answered on our hop by hyper; credentials meant for
        // a proxy are never for the backend.
        parts.headers.remove(header::EXPECT);
        parts.headers.remove(header::PROXY_AUTHORIZATION);
        set_forwarded_headers(&mut parts.headers, ctx);

        let body = body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync();
        let request = Request::from_parts(parts, body);
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_elapsed) => {
                tracing::warn!(timeout = ?self.timeout, "upstream response headers not received in time");
                return (
                    json_error(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
                    Outcome::Timeout,
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, source = ?e.source(), connect = e.is_connect(), "upstream request failed");
                return (
                    json_error(StatusCode::BAD_GATEWAY, "upstream unavailable"),
                    Outcome::Error,
                );
            }
            Ok(Ok(response)) => response,
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // We never ask for an upgrade, so this is a protocol violation.
            tracing::warn!("upstream answered 101 to a request without Upgrade");
            return (
                json_error(StatusCode::BAD_GATEWAY, "invalid upstream response"),
                Outcome::Error,
            );
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = IdleTimeoutBody::new(body, self.timeout).boxed_unsync();
        (Response::from_parts(parts, body), Outcome::Ok)
    }

    /// Asks the backend whether a WebSocket handshake may proceed (nginx `auth_request`
    /// style): `GET {url}{auth_path}` with the client's `Cookie`, `Authorization` and
    /// `Origin`, `X-Forwarded-For: <client_ip>` and `X-Original-URI: <path?query>`.
    ///
    /// `timeout` bounds the whole exchange, body included. 2xx allows; the body, if it is
    /// a JSON object, may carry `client_id` (ignored if empty, longer than
    /// `MAX_CLIENT_ID_LEN` bytes or containing control characters) and `topics`. A non-JSON
    /// or empty body is a plain Allow. Fail closed where a restriction could be lost: a
    /// `topics` that is present but not an array of strings, or a body over
    /// `MAX_AUTH_BODY`, gives `Unavailable`.
    pub async fn authorize(
        &self,
        parts: &http::request::Parts,
        client_ip: IpAddr,
        auth_path: &str,
        timeout: Duration,
    ) -> AuthDecision {
        match tokio::time::timeout(timeout, self.authorize_inner(parts, client_ip, auth_path)).await {
            Ok(decision) => decision,
            Err(_elapsed) => {
                tracing::warn!(?timeout, "authorization request timed out");
                AuthDecision::Unavailable
            }
        }
    }

    async fn authorize_inner(
        &self,
        parts: &http::request::Parts,
        client_ip: IpAddr,
        auth_path: &str,
    ) -> AuthDecision {
        let uri = match self.target(auth_path) {
            Ok(uri) => uri,
            Err(e) => {
                tracing::warn!(error = %e, auth_path, "cannot build authorization URI");
                return AuthDecision::Unavailable;
            }
        };
        let mut request = Request::new(empty_body());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        let headers = request.headers_mut();
        for name in [header::COOKIE, header::AUTHORIZATION, header::ORIGIN] {
            for value in parts.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(&client_ip.to_canonical().to_string()) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        let original = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        if let Ok(v) = HeaderValue::from_str(original) {
            headers.insert(X_ORIGINAL_URI, v);
        }

        let response = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, source = ?e.source(), "authorization request failed");
                return AuthDecision::Unavailable;
            }
        };
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return AuthDecision::Deny(status);
        }
        if !status.is_success() {
            tracing::warn!(%status, "authorization endpoint answered neither 2xx nor 401/403");
            return AuthDecision::Unavailable;
        }
        match Limited::new(response.into_body(), MAX_AUTH_BODY).collect().await {
            Ok(collected) => parse_auth_body(&collected.to_bytes()),
            Err(e) => {
                if e.is::<http_body_util::LengthLimitError>() {
                    tracing::warn!(limit = MAX_AUTH_BODY, "authorization response body too large");
                } else {
                    tracing::warn!(error = %e, "reading authorization response body failed");
                }
                AuthDecision::Unavailable
            }
        }
    }
}

/// Interprets a 2xx authorization body.
fn parse_auth_body(body: &[u8]) -> AuthDecision {
    let allow_plain = AuthDecision::Allow {
        client_id: None,
        topics: None,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return allow_plain;
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return allow_plain;
    };
    let client_id = match map.get("client_id") {
        Some(serde_json::Value::String(id)) if valid_client_id(id) => Some(id.clone()),
        Some(serde_json::Value::Null) | None => None,
        Some(other) => {
            tracing::warn!(client_id = %other, "ignoring invalid client_id from authorization endpoint");
            None
        }
    };
    let topics = match map.get("topics") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Array(items)) => {
            let mut topics = Vec::with_capacity(items.len());
            for item in items {
                let serde_json::Value::String(t) = item else {
                    tracing::warn!("authorization endpoint sent a non-string topic");
                    return AuthDecision::Unavailable;
                };
                topics.push(t.clone());
            }
            Some(topics)
        }
        Some(_) => {
            tracing::warn!("authorization endpoint sent topics that is not an array");
            return AuthDecision::Unavailable;
        }
    };
    AuthDecision::Allow { client_id, topics }
}

fn valid_client_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CLIENT_ID_LEN && !id.chars().any(char::is_control)
}

pub use crate::http::json_error;

fn empty_body() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1: `Connection` and every header it
/// names, plus `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding` and
/// `Upgrade`. hyper re-frames the body itself on each hop. The list named by `Connection`
/// is bounded by hyper's header-size limit.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-For`, `Forwarded`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `X-Real-IP`.
///
/// The rightmost `X-Forwarded-For` / `Forwarded` element is always the client address
/// wsgate resolved (and keyed its limits on), so a backend that trusts only wsgate reads
/// the rightmost element. What a trusted peer sent is kept to the left of it; an untrusted
/// peer's values are discarded so a client cannot plant a fake address for the backend.
/// `X-Forwarded-Proto`/`-Host` from a trusted peer are kept too (a TLS-terminating proxy in
/// front knows the client used https; we only know our own hop was http).
/// `X-Real-IP` is always overwritten with the client address for the same reason.
fn set_forwarded_headers(headers: &mut HeaderMap, ctx: &ForwardCtx) {
    let ip = ctx.client_ip.to_canonical();
    let ip_text = ip.to_string();

    let xff = append_element(headers, &X_FORWARDED_FOR, ctx.trusted_peer, &ip_text);
    headers.remove(&X_FORWARDED_FOR);
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }

    let mut element = match ip {
        IpAddr::V4(_) => format!("for={ip_text}"),
        // RFC 7239 §6: IPv6 nodes are bracketed, and so must be quoted.
        IpAddr::V6(_) => format!("for=\"[{ip_text}]\""),
    };
    if is_token(ctx.proto) {
        element.push_str(";proto=");
        element.push_str(ctx.proto);
    }
    if let Some(host) = ctx.host.as_ref().and_then(|h| h.to_str().ok()) {
        element.push_str(";host=");
        push_token_or_quoted(&mut element, host);
    }
    let forwarded = append_element(headers, &FORWARDED, ctx.trusted_peer, &element);
    headers.remove(&FORWARDED);
    if let Some(v) = forwarded {
        headers.insert(FORWARDED, v);
    }

    if !(ctx.trusted_peer && headers.contains_key(&X_FORWARDED_PROTO)) {
        match HeaderValue::from_str(ctx.proto) {
            Ok(v) => {
                headers.insert(X_FORWARDED_PROTO, v);
            }
            Err(_) => {
                headers.remove(&X_FORWARDED_PROTO);
            }
        }
    }
    if !(ctx.trusted_peer && headers.contains_key(&X_FORWARDED_HOST)) {
        match &ctx.host {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&ip_text) {
        headers.insert(X_REAL_IP, v);
    }
}

/// `existing lines joined by ", "` + `, element` when `keep`, else just `element`.
fn append_element(headers: &HeaderMap, name: &HeaderName, keep: bool, element: &str) -> Option<HeaderValue> {
    let mut joined: Vec<u8> = Vec::new();
    if keep {
        for line in headers.get_all(name) {
            let line = line.as_bytes();
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(trimmed);
        }
    }
    if !joined.is_empty() {
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(element.as_bytes());
    HeaderValue::from_bytes(&joined)
        .or_else(|_| HeaderValue::from_str(element))
        .ok()
}

/// RFC 9110 §5.6.2 token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Appends `value` as a token, or as a quoted-string with `"` and `\` escaped.
fn push_token_or_quoted(out: &mut String, value: &str) {
    if is_token(value) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Error raised when the upstream response body stalls for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream response body idle for more than {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

/// Wraps the upstream response body: fails the body if the upstream sends nothing for
/// `idle` while we are waiting for it. The timer runs only while a poll is pending on the
/// upstream, so a slow client (which simply polls less often) never trips it.
struct IdleTimeoutBody {
    inner: Incoming,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    failed: bool,
}

impl IdleTimeoutBody {
    fn new(inner: Incoming, idle: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            idle,
            // Allocated once and reset per wait, not once per chunk.
            sleep: Box::pin(tokio::time::sleep(idle)),
            armed: false,
            failed: false,
        }
    }
}

impl Body for IdleTimeoutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|r| r.map_err(|e| -> BoxError { Box::new(e) })))
            }
            Poll::Pending => {
                if !this.armed {
                    this.armed = true;
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.failed = true;
                        Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(this.idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use http_body_util::StreamBody;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::net::TcpListener;

    /// Every test step is bounded: a hang fails the test instead of stalling CI.
    const DEADLINE: Duration = Duration::from_secs(60);
    const MB: u64 = 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    static CHUNK_BYTES: [u8; CHUNK] = [b'x'; CHUNK];

    fn full(b: impl Into<Bytes>) -> ProxyBody {
        http_body_util::Full::new(b.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync()
    }

    /// Serves `handler` on 127.0.0.1:0 until the test's runtime is dropped.
    async fn serve<F, Fut>(handler: F) -> SocketAddr
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// The gateway side: forwards every request to `upstream`, with the outcome in a
    /// response header for the test to read.
    async fn serve_front(upstream: Upstream, client_ip: IpAddr, trusted_peer: bool) -> SocketAddr {
        let upstream = Arc::new(upstream);
        serve(move |req: Request<Incoming>| {
            let upstream = upstream.clone();
            async move {
                let ctx = ForwardCtx {
                    client_ip,
                    trusted_peer,
                    proto: "http",
                    host: req.headers().get(header::HOST).cloned(),
                };
                let (mut resp, outcome) = upstream.forward(req, &ctx).await;
                resp.headers_mut()
                    .insert("x-test-outcome", HeaderValue::from_static(outcome.label()));
                resp
            }
        })
        .await
    }

    fn upstream_at(addr: SocketAddr, timeout: Duration) -> Upstream {
        let base: Uri = format!("http://{addr}").parse().unwrap();
        Upstream::check_url(&base).unwrap();
        Upstream::new(base, timeout, Duration::from_secs(2))
    }

    fn test_client() -> Client<HttpConnector, ProxyBody> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn send(req: Request<ProxyBody>) -> Response<Incoming> {
        tokio::time::timeout(DEADLINE, test_client().request(req))
            .await
            .expect("request deadline")
            .expect("request")
    }

    async fn body_bytes(resp: Response<Incoming>) -> Bytes {
        tokio::time::timeout(DEADLINE, resp.into_body().collect())
            .await
            .expect("body deadline")
            .expect("body")
            .to_bytes()
    }

    async fn body_json(resp: Response<Incoming>) -> serde_json::Value {
        serde_json::from_slice(&body_bytes(resp).await).expect("json body")
    }

    /// Upstream that echoes what it received as JSON.
    async fn echo_upstream() -> SocketAddr {
        serve(|req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let headers: Vec<(String, String)> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let echo = serde_json::json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            Response::new(full(echo.to_string()))
        })
        .await
    }

    /// All values of header `name` in an echo.
    fn echoed(echo: &serde_json::Value, name: &str) -> Vec<String> {
        echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|pair| pair[0] == name)
            .map(|pair| pair[1].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn get_and_post_pass_through() {
        let up = echo_upstream().await;
        let front = serve_front(upstream_at(up, DEADLINE), "203.0.113.7".parse().unwrap(), false).await;

        let resp = send(
            Request::get(format!("http://{front}/path/x?q=1&r=two%20words"))
                .header("x-custom", "a")
                .header("x-custom", "b")
                .body(empty_body())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-test-outcome"], "ok");
        let echo = body_json(resp).await;
        assert_eq!(echo["method"], "GET");
        assert_eq!(echo["uri"], "/path/x?q=1&r=two%20words");
        assert_eq!(echoed(&echo, "x-custom"), ["a", "b"]);
        assert_eq!(echo["body"], "");

        let resp = send(
            Request::post(format!("http://{front}/submit?id=7"))
                .header(header::CONTENT_TYPE, "text/plain")
                .body(full("hello world"))
                .unwrap(),
        )
        .await;
        let echo = body_json(resp).await;
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["uri"], "/submit?id=7");
        assert_eq!(echo["body"], "hello world");
        assert_eq!(echoed(&echo, "content-type"), ["text/plain"]);
        assert_eq!(echoed(&echo, "content-length"), ["11"]);
    }

    #[tokio::test]
    async fn base_path_is_a_prefix() {
        let up = echo_upstream().await;
        let base: Uri = format!("http://{up}/api/").parse().unwrap();
        let front = serve_front(
            Upstream::new(base, DEADLINE, DEADLINE),
            Ipv4Addr::LOCALHOST.into(),
            false,
        )
        .await;
        let resp = send(
            Request::get(format!("http://{front}/v1/items?x=1"))
                .body(empty_body())
                .unwrap(),
        )
        .await;
        assert_eq!(body_json(resp).await["uri"], "/api/v1/items?x=1");
    }

    #[tokio::test]
    async fn response_status_and_headers_pass_through() {
        let up = serve(|_req: Request<Incoming>| async move {
            Response::builder()
                .status(StatusCode::CREATED)
                .header("x-custom", "yes")
                .header(header::SET_COOKIE, "a=1")
                .header(header::SET_COOKIE, "b=2")
                .header(header::CONNECTION, "x-hop")
                .header("x-hop", "secret")
                .header("keep-alive", "timeout=5")
                .body(full("created"))
                .unwrap()
        })
        .await;
        let front = serve_front(upstream_at(up, DEADLINE), Ipv4Addr::LOCALHOST.into(), false).await;
        let resp = send(
            Request::get(format!("http://{front}/"))
                .body(empty_body())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let h = resp.headers();
        assert_eq!(h["x-custom"], "yes");
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(h.get("x-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(body_bytes(resp).await, "created");
    }

    fn hop_by_hop_request(front: SocketAddr) -> Request<ProxyBody> {
        Request::get(format!("http://{front}/h"))
            .header(header::HOST, "app.example.com:8080")
            .header(header::CONNECTION, "X-Drop-Me, keep-alive")
            .header("x-drop-me", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header(header::TE, "trailers")
            .header(header::TRAILER, "x-t")
            .header(header::UPGRADE, "h2c")
            .header(header::PROXY_AUTHORIZATION, "Basic Zm9vOmJhcg==")
            .header("x-forwarded-for", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6;proto=https")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("x-real-ip", "6.6.6.6")
            .header(header::AUTHORIZATION, "Bearer end-to-end")
            .body(empty_body())
            .unwrap()
    }

    #[tokio::test]
    async fn hop_by_hop_stripped_and_forwarded_headers_set_for_untrusted_peer() {
        let up = echo_upstream().await;
        let front = serve_front(upstream_at(up, DEADLINE), "203.0.113.7".parse().unwrap(), false).await;
        let echo = body_json(send(hop_by_hop_request(front)).await).await;
        for gone in [
            "x-drop-me",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
        ] {
            assert!(echoed(&echo, gone).is_empty(), "{gone} was forwarded: {echo}");
        }
        // hyper's client may add its own `connection: keep-alive`, never the client's list.
        assert!(echoed(&echo, "connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("x-drop-me")));
        assert_eq!(echoed(&echo, "authorization"), ["Bearer end-to-end"]);
        assert_eq!(echoed(&echo, "host"), ["app.example.com:8080"]);
        // The untrusted client's forwarding headers are replaced, not appended to.
        assert_eq!(echoed(&echo, "x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(
            echoed(&echo, "forwarded"),
            ["for=203.0.113.7;proto=http;host=\"app.example.com:8080\""]
        );
        assert_eq!(echoed(&echo, "x-forwarded-proto"), ["http"]);
        assert_eq!(echoed(&echo, "x-forwarded-host"), ["app.example.com:8080"]);
        assert_eq!(echoed(&echo, "x-real-ip"), ["203.0.113.7"]);
    }

    #[tokio::test]
    async fn trusted_peer_forwarding_headers_are_kept_and_appended() {
        let up = echo_upstream().await;
        let front = serve_front(upstream_at(up, DEADLINE), "2001:db8::1".parse().unwrap(), true).await;
        let echo = body_json(send(hop_by_hop_request(front)).await).await;
        assert_eq!(echoed(&echo, "x-forwarded-for"), ["6.6.6.6, 2001:db8::1"]);
        assert_eq!(
            echoed(&echo, "forwarded"),
            ["for=6.6.6.6;proto=https, for=\"[2001:db8::1]\";proto=http;host=\"app.example.com:8080\""]
        );
        assert_eq!(echoed(&echo, "x-forwarded-proto"), ["https"]);
        assert_eq!(echoed(&echo, "x-forwarded-host"), ["evil.example"]);
        assert_eq!(echoed(&echo, "x-real-ip"), ["2001:db8::1"]);
    }

    /// A port on which nothing listens: bind, read the port, close.
    async fn dead_port() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn bad_gateway_when_nothing_listens() {
        let front = serve_front(
            upstream_at(dead_port().await, DEADLINE),
            Ipv4Addr::LOCALHOST.into(),
            false,
        )
        .await;
        let resp = send(
            Request::get(format!("http://{front}/"))
                .body(empty_body())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()["x-test-outcome"], "error");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let json = body_json(resp).await;
        assert!(json["error"].is_string(), "{json}");
    }

    #[tokio::test]
    async fn gateway_timeout_when_upstream_never_answers() {
        // The kernel completes the TCP handshake from the backlog; nobody ever reads.
        let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = silent.local_addr().unwrap();
        let front = serve_front(
            upstream_at(addr, Duration::from_millis(300)),
            Ipv4Addr::LOCALHOST.into(),
            false,
        )
        .await;
        let started = std::time::Instant::now();
        let resp = send(
            Request::get(format!("http://{front}/"))
                .body(empty_body())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(resp.headers()["x-test-outcome"], "timeout");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(body_json(resp).await["error"].is_string());
        drop(silent);
    }

    #[tokio::test]
    async fn stalled_response_body_is_cut_by_idle_timeout() {
        // Headers arrive at once, then the body never progresses.
        let up = serve(|_req: Request<Incoming>| async move {
            let body = StreamBody::new(stream::pending::<Result<Frame<Bytes>, BoxError>>());
            Response::new(body.boxed_unsync())
        })
        .await;
        let front = serve_front(
            upstream_at(up, Duration::from_millis(300)),
            Ipv4Addr::LOCALHOST.into(),
            false,
        )
        .await;
        let resp = send(
            Request::get(format!("http://{front}/"))
                .body(empty_body())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let res = tokio::time::timeout(DEADLINE, resp.into_body().collect())
            .await
            .expect("deadline");
        assert!(res.is_err(), "a stalled body must end in an error, not hang");
    }

    fn peak_rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// A body of `total` bytes made on the fly. `produced` counts what it handed out and
    /// `max_ahead` records how far it ever got ahead of `consumed` (the far end's count):
    /// were the body buffered anywhere in between, that gap would reach `total`.
    fn generated_body(
        total: u64,
        produced: Arc<AtomicU64>,
        consumed: Arc<AtomicU64>,
        max_ahead: Arc<AtomicU64>,
    ) -> ProxyBody {
        let chunks = stream::unfold(0u64, move |sent| {
            let (produced, consumed, max_ahead) = (produced.clone(), consumed.clone(), max_ahead.clone());
            async move {
                if sent >= total {
                    return None;
                }
                let n = (total - sent).min(CHUNK as u64);
                let ahead = sent.saturating_sub(consumed.load(Ordering::Relaxed));
                max_ahead.fetch_max(ahead, Ordering::Relaxed);
                produced.fetch_add(n, Ordering::Relaxed);
                let chunk = Bytes::from_static(&CHUNK_BYTES[..n as usize]);
                Some((Ok::<_, BoxError>(Frame::data(chunk)), sent + n))
            }
        });
        StreamBody::new(chunks).boxed_unsync()
    }

    /// Reads `body` to the end frame by frame, counting into `consumed`.
    async fn drain<B>(body: B, consumed: &AtomicU64) -> u64
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        let mut body = body;
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body frame").into_data() {
                n += data.len() as u64;
                consumed.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        n
    }

    /// Bound on the producer's lead over the consumer: socket buffers on two loopback
    /// hops plus hyper's buffers, far below the 100 MB a buffering proxy would show.
    const MAX_IN_FLIGHT: u64 = 48 * MB;

    #[tokio::test]
    async fn large_upload_streams_in_bounded_memory() {
        const TOTAL: u64 = 100 * MB;
        let consumed = Arc::new(AtomicU64::new(0));
        let up_consumed = consumed.clone();
        let up = serve(move |req: Request<Incoming>| {
            let consumed = up_consumed.clone();
            async move {
                let n = drain(req.into_body(), &consumed).await;
                Response::new(full(n.to_string()))
            }
        })
        .await;
        let front = serve_front(upstream_at(up, DEADLINE), Ipv4Addr::LOCALHOST.into(), false).await;
        let (produced, max_ahead) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let body = generated_body(TOTAL, produced.clone(), consumed.clone(), max_ahead.clone());
        let started = std::time::Instant::now();
        let resp = send(
            Request::post(format!("http://{front}/upload"))
                .body(body)
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_bytes(resp).await, TOTAL.to_string());
        let ahead = max_ahead.load(Ordering::Relaxed);
        eprintln!(
            "upload: {} MB in {:?}, producer at most {} KiB ahead of the upstream, peak RSS {:?} KiB",
            TOTAL / MB,
            started.elapsed(),
            ahead / 1024,
            peak_rss_kib()
        );
        assert!(
            ahead < MAX_IN_FLIGHT,
            "request body was buffered: {ahead} bytes in flight"
        );
    }

    #[tokio::test]
    async fn large_download_streams_in_bounded_memory() {
        const TOTAL: u64 = 100 * MB;
        let consumed = Arc::new(AtomicU64::new(0));
        let (produced, max_ahead) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (p, c, m) = (produced.clone(), consumed.clone(), max_ahead.clone());
        let up = serve(move |_req: Request<Incoming>| {
            let body = generated_body(TOTAL, p.clone(), c.clone(), m.clone());
            async move { Response::new(body) }
        })
        .await;
        let front = serve_front(upstream_at(up, DEADLINE), Ipv4Addr::LOCALHOST.into(), false).await;
        let started = std::time::Instant::now();
        let resp = send(
            Request::get(format!("http://{front}/download"))
                .body(empty_body())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let n = tokio::time::timeout(DEADLINE, drain(resp.into_body(), &consumed))
            .await
            .expect("download deadline");
        assert_eq!(n, TOTAL);
        let ahead = max_ahead.load(Ordering::Relaxed);
        eprintln!(
            "download: {} MB in {:?}, producer at most {} KiB ahead of the client, peak RSS {:?} KiB",
            TOTAL / MB,
            started.elapsed(),
            ahead / 1024,
            peak_rss_kib()
        );
        assert!(
            ahead < MAX_IN_FLIGHT,
            "response body was buffered: {ahead} bytes in flight"
        );
    }

    /// Auth endpoint whose answer is picked by the `case` in `X-Original-URI`; it records
    /// the headers of the last request it saw.
    async fn auth_upstream(seen: Arc<Mutex<Option<(String, HeaderMap)>>>) -> SocketAddr {
        serve(move |req: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                let original = req
                    .headers()
                    .get("x-original-uri")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                *seen.lock().unwrap() =
                    Some((format!("{} {}", req.method(), req.uri()), req.headers().clone()));
                let case = original.split("case=").nth(1).unwrap_or("");
                let (status, body) = match case {
                    "full" => (200, r#"{"client_id":"u-42","topics":["a","b"]}"#.to_string()),
                    "empty" => (200, String::new()),
                    "html" => (200, "<html>ok</html>".to_string()),
                    "bad-id" => (200, format!(r#"{{"client_id":"{}"}}"#, "x".repeat(129))),
                    "ctrl-id" => (200, r#"{"client_id":"a\nb","topics":[]}"#.to_string()),
                    "empty-id" => (200, r#"{"client_id":""}"#.to_string()),
                    "bad-topics" => (200, r#"{"topics":["a",1]}"#.to_string()),
                    "huge" => (
                        200,
                        format!(r#"{{"client_id":"u","pad":"{}"}}"#, "x".repeat(MAX_AUTH_BODY)),
                    ),
                    "403" => (403, String::new()),
                    "401" => (401, String::new()),
                    "500" => (500, String::new()),
                    "302" => (302, String::new()),
                    _ => (404, String::new()),
                };
                Response::builder().status(status).body(full(body)).unwrap()
            }
        })
        .await
    }

    fn handshake(uri: &str) -> http::request::Parts {
        Request::get(uri)
            .header(header::COOKIE, "session=abc")
            .header(header::AUTHORIZATION, "Bearer t0k")
            .header(header::ORIGIN, "https://app.example.com")
            .header("x-not-forwarded", "1")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[tokio::test]
    async fn authorize_table() {
        let seen = Arc::new(Mutex::new(None));
        let up = upstream_at(auth_upstream(seen.clone()).await, DEADLINE);
        let ip: IpAddr = "::ffff:198.51.100.4".parse().unwrap();
        let allow = |id: Option<&str>, topics: Option<&[&str]>| AuthDecision::Allow {
            client_id: id.map(String::from),
            topics: topics.map(|t| t.iter().map(|s| s.to_string()).collect()),
        };
        let cases = [
            ("full", allow(Some("u-42"), Some(&["a", "b"]))),
            ("empty", allow(None, None)),
            ("html", allow(None, None)),
            ("bad-id", allow(None, None)),
            ("ctrl-id", allow(None, Some(&[]))),
            ("empty-id", allow(None, None)),
            ("bad-topics", AuthDecision::Unavailable),
            ("huge", AuthDecision::Unavailable),
            ("403", AuthDecision::Deny(StatusCode::FORBIDDEN)),
            ("401", AuthDecision::Deny(StatusCode::UNAUTHORIZED)),
            ("500", AuthDecision::Unavailable),
            ("302", AuthDecision::Unavailable),
        ];
        for (case, want) in cases {
            let parts = handshake(&format!("/ws?room=1&case={case}"));
            let got = up
                .authorize(&parts, ip, "/ws/auth", Duration::from_secs(10))
                .await;
            assert_eq!(got, want, "case {case}");
        }
        let (line, headers) = seen.lock().unwrap().take().unwrap();
        assert_eq!(line, "GET /ws/auth");
        assert_eq!(headers[header::COOKIE], "session=abc");
        assert_eq!(headers[header::AUTHORIZATION], "Bearer t0k");
        assert_eq!(headers[header::ORIGIN], "https://app.example.com");
        assert_eq!(headers["x-forwarded-for"], "198.51.100.4");
        assert_eq!(headers["x-original-uri"], "/ws?room=1&case=302");
        assert!(headers.get("x-not-forwarded").is_none());
    }

    #[tokio::test]
    async fn authorize_timeout_and_refusal_are_unavailable() {
        let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let up = upstream_at(silent.local_addr().unwrap(), DEADLINE);
        let parts = handshake("/ws");
        let started = std::time::Instant::now();
        let got = up
            .authorize(
                &parts,
                Ipv4Addr::LOCALHOST.into(),
                "/ws/auth",
                Duration::from_millis(200),
            )
            .await;
        assert_eq!(got, AuthDecision::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(10));

        let up = upstream_at(dead_port().await, DEADLINE);
        let got = tokio::time::timeout(
            DEADLINE,
            up.authorize(
                &parts,
                Ipv4Addr::LOCALHOST.into(),
                "/ws/auth",
                Duration::from_secs(5),
            ),
        )
        .await
        .expect("deadline");
        assert_eq!(got, AuthDecision::Unavailable);
        drop(silent);
    }

    #[test]
    fn config_checks_name_the_key() {
        let ok: Uri = "http://127.0.0.1:8000".parse().unwrap();
        assert!(Upstream::check_url(&ok).is_ok());
        for bad in [
            "https://backend:8443",
            "/relative",
            "http://u:p@host",
            "http://h/?q=1",
        ] {
            let uri: Uri = bad.parse().unwrap();
            let err = Upstream::check_url(&uri).unwrap_err();
            assert!(err.starts_with("upstream.url: "), "{err}");
        }
        assert!(Upstream::check_auth_path("/ws/auth").is_ok());
        assert!(Upstream::check_auth_path("ws/auth")
            .unwrap_err()
            .starts_with("upstream.auth_path: "));
        assert!(Upstream::check_auth_path("/a b").is_err());
    }

    #[test]
    fn forwarded_element_quoting() {
        let mut s = String::new();
        push_token_or_quoted(&mut s, "example.com");
        assert_eq!(s, "example.com");
        s.clear();
        push_token_or_quoted(&mut s, "a\"b\\c:1");
        assert_eq!(s, "\"a\\\"b\\\\c:1\"");
    }
}
