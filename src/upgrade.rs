//! The WebSocket handshake: check the request, admit it against the connection limits, answer
//! 101, and hand the upgraded socket to its own connection task.
//!
//! Everything a client can be refused for is decided here, before the upgrade, with an HTTP
//! status and a JSON body it can read. permessage-deflate is never negotiated (a compression bomb
//! would defeat the message size limit), so no `Sec-WebSocket-Extensions` is ever answered.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info_span, warn, Instrument};

use crate::connection::{self, ConnSetup, Mode};
use crate::http::{full, json_error, Body};
use crate::limits::Refusal;
use crate::listener::ConnInfo;
use crate::metrics::RejectReason;
use crate::outbox::SharedSocket;
use crate::proxy::AuthDecision;
use crate::registry::ConnShared;
use crate::state::Gateway;
use crate::topic::TopicName;

/// Seconds a refused client is asked to wait before retrying.
const RETRY_AFTER_SECS: &str = "5";

/// Handles a request on the WebSocket (or echo) path.
pub async fn accept(
    gateway: &Arc<Gateway>,
    req: Request<Incoming>,
    info: ConnInfo,
    client_ip: IpAddr,
    mode: Mode,
) -> Response<Body> {
    if gateway.is_draining() {
        gateway.metrics.rejected(RejectReason::ShuttingDown);
        return with_retry_after(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Server is shutting down",
        ));
    }
    let key = match check_handshake(&req) {
        Ok(key) => key,
        Err(resp) => {
            gateway.metrics.rejected(RejectReason::BadHandshake);
            return resp;
        }
    };
    let config = gateway.config();
    if !config
        .server
        .allowed_origins
        .allows(req.headers().get(header::ORIGIN))
    {
        gateway.metrics.rejected(RejectReason::Origin);
        debug!(%client_ip, origin = ?req.headers().get(header::ORIGIN), "origin not allowed");
        return json_error(StatusCode::FORBIDDEN, "Origin not allowed");
    }
    let permit = match gateway.limiter.try_acquire(client_ip) {
        Ok(p) => p,
        Err(refusal) => {
            gateway.metrics.rejected(refusal.reason());
            debug!(%client_ip, ?refusal, "connection refused");
            let resp = match refusal {
                Refusal::Total(max) => json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("Maximum connections ({max}) reached"),
                ),
                Refusal::PerIp(max) => json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!("Maximum connections per IP ({max}) reached"),
                ),
            };
            return with_retry_after(resp);
        }
    };

    let (parts, body) = req.into_parts();
    let mut admitted = Admitted::default();
    if let (Some(upstream), Some(u)) = (gateway.upstream(), config.upstream.as_ref()) {
        if let Some(auth_path) = &u.auth_path {
            match upstream
                .authorize(&parts, client_ip, auth_path, u.auth_timeout)
                .await
            {
                AuthDecision::Allow { client_id, topics } => {
                    admitted.client_id = client_id;
                    admitted.topics = topics.map(|names| {
                        let max = config.topics.max_name_length;
                        // Names the backend grants that are not valid topics can never be
                        // subscribed to anyway; drop them.
                        Arc::new(
                            names
                                .iter()
                                .filter_map(|n| TopicName::parse(n, max).ok())
                                .collect(),
                        )
                    });
                }
                AuthDecision::Deny(status) => {
                    gateway.metrics.rejected(RejectReason::Auth);
                    debug!(%client_ip, %status, "handshake denied by the backend");
                    let message = if status == StatusCode::UNAUTHORIZED {
                        "Unauthorized"
                    } else {
                        "Forbidden"
                    };
                    return json_error(status, message);
                }
                AuthDecision::Unavailable => {
                    gateway.metrics.rejected(RejectReason::AuthUnavailable);
                    return with_retry_after(json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Authorization backend unavailable",
                    ));
                }
            }
        }
    }
    let req = Request::from_parts(parts, body);

    let (id, generated_id) = gateway.next_ids();
    let client_id = admitted.client_id.unwrap_or(generated_id);
    let limits = &config.limits;
    let shared = ConnShared::new(
        id,
        client_id.into_boxed_str(),
        client_ip,
        limits.send_queue_messages,
        limits.send_queue_bytes,
    );
    let ws_config = connection::ws_config(limits);
    let span = info_span!("conn", id = %shared.client_id, ip = %client_ip);
    let gw = Arc::clone(gateway);
    let deadline = info.handshake_deadline;
    // Taken out here so that the request itself (a few hundred bytes of headers) is not kept
    // alive inside every connection task for its whole life.
    let mut req = req;
    let upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    let conn_span = span.clone();
    // Two tasks: this one waits for the upgrade, then hands the socket to a new task that runs
    // the connection. The long-lived task then holds only what a connection needs, not the
    // handshake's state (which would stay allocated inside it for the connection's life).
    gateway.tracker.spawn(
        async move {
            let upgraded = match deadline {
                Some(d) => match timeout_at(d, upgrade).await {
                    Ok(r) => r,
                    Err(_) => {
                        gw.metrics.rejected(RejectReason::HandshakeTimeout);
                        debug!("upgrade not completed before the handshake deadline");
                        return;
                    }
                },
                None => upgrade.await,
            };
            let upgraded = match upgraded {
                Ok(u) => u,
                Err(e) => {
                    debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let setup = ConnSetup {
                gateway: gw,
                config,
                shared,
                permit,
                mode,
                allowed_topics: admitted.topics,
            };
            // Take the TcpStream back out of hyper's type-erased wrapper. It is shared: the
            // connection's outbox writes to it (publishers write through it directly), and
            // tungstenite reads from it (its own writes are routed into the outbox).
            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                // Only if the listener ever served something other than a plain TCP stream.
                warn!("upgraded connection is not a TcpStream; dropping it");
                return;
            };
            setup.shared.outbox.attach(parts.io.into_inner());
            let socket = SharedSocket::new(Arc::clone(&setup.shared));
            let ws = if parts.read_buf.is_empty() {
                WebSocketStream::from_raw_socket(socket, Role::Server, Some(ws_config)).await
            } else {
                // The client sent frames right behind its request: keep them.
                WebSocketStream::from_partially_read(
                    socket,
                    parts.read_buf.to_vec(),
                    Role::Server,
                    Some(ws_config),
                )
                .await
            };
            let tracker = setup.gateway.tracker.clone();
            tracker.spawn(connection::run(ws, setup).instrument(conn_span));
        }
        .instrument(span),
    );

    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// What the backend's authorization granted.
#[derive(Default)]
struct Admitted {
    client_id: Option<String>,
    topics: Option<Arc<BTreeSet<TopicName>>>,
}

fn with_retry_after(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    resp
}

/// Checks an RFC 6455 opening handshake; returns the client's key.
fn check_handshake(req: &Request<Incoming>) -> Result<HeaderValue, Response<Body>> {
    let h = req.headers();
    let upgrade_ok = has_token(h, &header::UPGRADE, "websocket");
    let connection_ok = has_token(h, &header::CONNECTION, "upgrade");
    if req.method() != Method::GET || !upgrade_ok || !connection_ok {
        let mut resp = json_error(
            StatusCode::UPGRADE_REQUIRED,
            "This endpoint only accepts WebSocket upgrades (GET with Upgrade: websocket)",
        );
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Err(resp);
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        let mut resp = json_error(
            StatusCode::UPGRADE_REQUIRED,
            "Unsupported WebSocket version (13 required)",
        );
        resp.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Err(resp);
    }
    match h.get(header::SEC_WEBSOCKET_KEY) {
        // A key is 16 random bytes in base64: 24 characters.
        Some(k) if k.len() == 24 => Ok(k.clone()),
        _ => Err(json_error(
            StatusCode::BAD_REQUEST,
            "Missing or invalid Sec-WebSocket-Key",
        )),
    }
}

/// Whether a comma-separated header (any of its lines) contains `token`, case-insensitively.
fn has_token(h: &HeaderMap, name: &header::HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}
