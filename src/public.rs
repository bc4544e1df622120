//! The public listener's routes: the WebSocket path (and the opt-in echo path), `/healthz` for
//! load-balancer probes, and everything else, which goes to the upstream backend when one is
//! configured (404 JSON otherwise).
//!
//! WebSocket upgrade requests on other paths are not proxied: wsgate is the WebSocket front
//! door, and tunnelling arbitrary upgrades to the backend would bypass every limit it exists to
//! enforce. They get 404 JSON.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use crate::connection::Mode;
use crate::http::{json_error, json_response, Body};
use crate::listener::ConnInfo;
use crate::proxy::ForwardCtx;
use crate::state::Gateway;
use crate::upgrade;

/// Routes one request on the public listener.
pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>, info: ConnInfo) -> Response<Body> {
    let config = gateway.config();
    let peer = info.peer.ip();
    // Every per-IP limit, log line and forwarded header uses this address.
    let client_ip = config.server.trusted_proxies.resolve(peer, req.headers());
    let path = req.uri().path();
    if path == config.server.ws_path {
        return upgrade::accept(&gateway, req, info, client_ip, Mode::Client).await;
    }
    if config.server.echo_path.as_deref() == Some(path) {
        return upgrade::accept(&gateway, req, info, client_ip, Mode::Echo).await;
    }
    if path == "/healthz" {
        return if gateway.is_draining() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "shutting_down"}),
            )
        } else {
            json_response(StatusCode::OK, &json!({"status": "ok"}))
        };
    }
    let Some(upstream) = gateway.upstream() else {
        return json_error(StatusCode::NOT_FOUND, "Not found");
    };
    if req.headers().contains_key(header::UPGRADE) {
        return json_error(
            StatusCode::NOT_FOUND,
            "WebSocket upgrades are served on the WebSocket path only",
        );
    }
    let ctx = ForwardCtx {
        client_ip,
        trusted_peer: config.server.trusted_proxies.contains(peer),
        proto: "http",
        host: req.headers().get(header::HOST).cloned(),
    };
    let (resp, outcome) = upstream.forward(req, &ctx).await;
    gateway.metrics.upstream(outcome);
    resp
}
