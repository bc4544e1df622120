//! The public listener's routes: the WebSocket path (and the opt-in echo path), `/healthz` for
//! load-balancer probes, and everything else.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use crate::connection::Mode;
use crate::http::{json_error, json_response, Body};
use crate::listener::ConnInfo;
use crate::state::Gateway;
use crate::upgrade;

/// Routes one request on the public listener.
pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>, info: ConnInfo) -> Response<Body> {
    let config = gateway.config();
    let path = req.uri().path();
    let client_ip = info.peer.ip();
    if path == config.server.ws_path {
        return upgrade::accept(&gateway, req, info, client_ip, Mode::Client);
    }
    if config.server.echo_path.as_deref() == Some(path) {
        return upgrade::accept(&gateway, req, info, client_ip, Mode::Echo);
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
    json_error(StatusCode::NOT_FOUND, "Not found")
}
