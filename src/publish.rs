//! `POST /publish`: the local endpoint the backend pushes events to.
//!
//! The body is read under a byte cap (413 beyond it) and a deadline, parsed and validated whole
//! (a batch is all-or-nothing), then each event is encoded once and handed to the hub in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use bytes::Bytes;

use crate::http::{json_error, json_response, Body};
use crate::protocol::{encode_event, timestamp};
use crate::state::Gateway;
use crate::topic::TopicName;

/// A publish body must arrive within this long (a slow upload cannot hold a slot forever).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// One validated event of a publish request.
struct Event {
    topic: TopicName,
    message: Map<String, Value>,
}

pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let resp = publish(&gateway, req).await;
    gateway.metrics.publish_duration.observe(started.elapsed());
    resp
}

async fn publish(gateway: &Gateway, req: Request<Incoming>) -> Response<Body> {
    if gateway.is_draining() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "Server is shutting down");
    }
    let config = gateway.config();
    let max = config.admin.max_publish_bytes;
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Request body exceeds {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large();
    }
    let body =
        match tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(req.into_body(), max).collect()).await {
            Err(_) => return json_error(StatusCode::REQUEST_TIMEOUT, "Request body not received in time"),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Ok(Err(_)) => return json_error(StatusCode::BAD_REQUEST, "Could not read the request body"),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("Invalid JSON: {e}")),
    };
    let max_len = config.topics.max_name_length;
    let allowed = config.topics.allowed.as_ref();
    match value {
        Value::Array(items) => {
            let mut events = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match validate(item, max_len, allowed) {
                    Ok(e) => events.push(e),
                    Err(msg) => return json_error(StatusCode::BAD_REQUEST, &format!("[{i}]: {msg}")),
                }
            }
            let ts = timestamp();
            let size_hint = body.len() / events.len().max(1);
            let encoded: Vec<(TopicName, Bytes)> = events
                .into_iter()
                .map(|e| {
                    let frame = encode_event(&e.topic, e.message, &ts, size_hint);
                    (e.topic, frame)
                })
                .collect();
            let delivered = gateway.hub.publish_batch(&encoded);
            json_response(StatusCode::OK, &json!({ "delivered": delivered }))
        }
        single => match validate(single, max_len, allowed) {
            Ok(e) => {
                let n = deliver(gateway, e, &timestamp(), body.len());
                json_response(StatusCode::OK, &json!({ "delivered": n }))
            }
            Err(msg) => json_error(StatusCode::BAD_REQUEST, &msg),
        },
    }
}

fn validate(
    item: Value,
    max_len: usize,
    allowed: Option<&std::collections::BTreeSet<TopicName>>,
) -> Result<Event, String> {
    let Value::Object(mut obj) = item else {
        return Err("each event must be a JSON object with event_type and message".to_owned());
    };
    let topic = match obj.get("event_type") {
        None | Some(Value::Null) => return Err("event_type is required".to_owned()),
        Some(Value::String(s)) => match TopicName::parse(s, max_len) {
            Ok(t) => t,
            Err(e) => return Err(format!("Invalid event type: {e}")),
        },
        Some(_) => return Err("event_type must be a string".to_owned()),
    };
    if allowed.is_some_and(|a| !a.contains(&topic)) {
        return Err(format!("Invalid event type: {topic} is not in topics.allowed"));
    }
    let message = match obj.remove("message") {
        Some(Value::Object(m)) => m,
        None => return Err("message is required".to_owned()),
        Some(_) => return Err("message must be a JSON object".to_owned()),
    };
    Ok(Event { topic, message })
}

fn deliver(gateway: &Gateway, event: Event, ts: &str, size_hint: usize) -> usize {
    let encoded = encode_event(&event.topic, event.message, ts, size_hint);
    gateway.hub.publish(&event.topic, &encoded)
}
