//! The admin listener (local by default): every endpoint it serves.
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | POST | `/publish` | token | publish one event or a batch (see `publish`) |
//! | GET | `/health` | open | healthy / degraded / shutting_down (503) |
//! | GET | `/status?limit=N` | token | server metrics and up to N connections (default 100) |
//! | GET | `/metrics` | open | Prometheus text format |
//! | GET | `/connections?limit=N&topic=T&ip=A` | token | connections, filtered |
//! | DELETE | `/connections/{client_id}` | token | close that client (1008) |
//!
//! "token" means `Authorization: Bearer <admin.token>` when a token is configured; probes and
//! scrapers (`/health`, `/metrics`) stay open.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::http::{full, json_error, json_response, Body};
use crate::metrics::CloseReason;
use crate::protocol::timestamp;
use crate::publish;
use crate::state::Gateway;

/// Default and largest number of connections a listing returns.
const DEFAULT_LIST_LIMIT: usize = 100;
const MAX_LIST_LIMIT: usize = 10_000;

pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let (allowed, needs_token): (&str, bool) = match path.as_str() {
        "/publish" => ("POST", true),
        "/health" | "/metrics" => ("GET", false),
        "/status" | "/connections" => ("GET", true),
        p if p.starts_with("/connections/") => ("DELETE", true),
        _ => return json_error(StatusCode::NOT_FOUND, "Not found"),
    };
    if method.as_str() != allowed {
        let mut resp = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("Method not allowed; use {allowed}"),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
        return resp;
    }
    if needs_token && !authorized(&gateway, &req) {
        let mut resp = json_error(StatusCode::UNAUTHORIZED, "Missing or invalid bearer token");
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    match (method, path.as_str()) {
        (Method::POST, "/publish") => publish::handle(gateway, req).await,
        (_, "/health") => {
            let (code, body) = gateway.health();
            json_response(code, &body)
        }
        (_, "/metrics") => {
            let text = gateway.metrics.render(&gateway.gauges());
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (_, "/status") => status(&gateway, &query),
        (_, "/connections") => list_connections(&gateway, &query),
        (_, p) => kick(&gateway, p.trim_start_matches("/connections/")),
    }
}

fn authorized(gateway: &Gateway, req: &Request<Incoming>) -> bool {
    let config = gateway.config();
    let Some(token) = &config.admin.token else {
        return true;
    };
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|given| token.matches(given))
}

/// Query parameters, percent-decoded; unknown ones are ignored.
fn query_params(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_limit(v: &str) -> Result<usize, Response<Body>> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n <= MAX_LIST_LIMIT)
        .ok_or_else(|| {
            json_error(
                StatusCode::BAD_REQUEST,
                &format!("limit must be a whole number from 0 to {MAX_LIST_LIMIT}"),
            )
        })
}

fn status(gateway: &Gateway, query: &str) -> Response<Body> {
    let mut limit = DEFAULT_LIST_LIMIT;
    for (k, v) in query_params(query) {
        if k == "limit" {
            match parse_limit(&v) {
                Ok(n) => limit = n,
                Err(resp) => return resp,
            }
        }
    }
    let (_, health) = gateway.health();
    let conns: Vec<Value> = gateway
        .registry
        .list(limit, |_| true)
        .iter()
        .map(|c| c.info())
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "status": health["status"],
            "metrics": gateway.server_metrics(),
            "connections": conns,
            "timestamp": timestamp(),
        }),
    )
}

fn list_connections(gateway: &Gateway, query: &str) -> Response<Body> {
    let mut limit = DEFAULT_LIST_LIMIT;
    let mut topic: Option<String> = None;
    let mut ip: Option<IpAddr> = None;
    for (k, v) in query_params(query) {
        match k.as_str() {
            "limit" => match parse_limit(&v) {
                Ok(n) => limit = n,
                Err(resp) => return resp,
            },
            "topic" => topic = Some(v),
            "ip" => match v.parse() {
                Ok(a) => ip = Some(a),
                Err(_) => return json_error(StatusCode::BAD_REQUEST, "ip must be an IP address"),
            },
            _ => {}
        }
    }
    let conns = gateway.registry.list(limit, |c| {
        ip.is_none_or(|a| c.ip == a)
            && topic
                .as_deref()
                .is_none_or(|t| c.subscriptions().iter().any(|s| s.as_str() == t))
    });
    let list: Vec<Value> = conns.iter().map(|c| c.info()).collect();
    json_response(
        StatusCode::OK,
        &json!({ "total": gateway.registry.len(), "returned": list.len(), "connections": list, "timestamp": timestamp() }),
    )
}

fn kick(gateway: &Gateway, client_id: &str) -> Response<Body> {
    let id = percent_decode(client_id);
    let found = gateway.registry.find_client(&id);
    if found.is_empty() {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!("No connection with client_id {id:?}"),
        );
    }
    for conn in &found {
        conn.kick(CloseReason::Kicked);
    }
    json_response(
        StatusCode::OK,
        &json!({ "disconnected": found.len(), "client_id": id }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_never_panics_and_decodes() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }
}
