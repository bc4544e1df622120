//! The client JSON protocol, both ways: parsing what a client sends and building what the server
//! sends. The message shapes are a contract with an existing frontend; keep them exactly.

use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::topic::TopicName;

/// Unknown `type` values are echoed back in the error, cut to this many characters so that a
/// client cannot make the server reflect a large payload.
const MAX_ECHOED_TYPE_CHARS: usize = 64;

/// A client message that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Ping,
    GetStatus,
}

/// Parses one client text frame. The error is the `message` of the `error` reply.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, String> {
    let value: Value = serde_json::from_str(text).map_err(|_| "Invalid JSON format".to_owned())?;
    let Value::Object(mut obj) = value else {
        return Err("Message must be a JSON object".to_owned());
    };
    let kind = match obj.get("type") {
        None => return Err("Missing message type".to_owned()),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("Message type must be a string".to_owned()),
    };
    match kind {
        "subscribe" => Ok(ClientMessage::Subscribe(events(&mut obj)?)),
        "unsubscribe" => Ok(ClientMessage::Unsubscribe(events(&mut obj)?)),
        "ping" => Ok(ClientMessage::Ping),
        "get_status" => Ok(ClientMessage::GetStatus),
        other => {
            let shown: String = other.chars().take(MAX_ECHOED_TYPE_CHARS).collect();
            Err(format!("Unknown message type: {shown}"))
        }
    }
}

fn events(obj: &mut Map<String, Value>) -> Result<Vec<String>, String> {
    const WHAT: &str = "events must be a list of strings";
    match obj.remove("events") {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(WHAT.to_owned()),
            })
            .collect(),
        _ => Err(WHAT.to_owned()),
    }
}

/// Current time as RFC 3339 with milliseconds, UTC.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// RFC 3339 of a given time.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn text(v: Value) -> Utf8Bytes {
    Utf8Bytes::from(v.to_string())
}

/// What `connection_established` advertises about the connection's limits.
#[derive(Debug, Clone, Copy)]
pub struct AdvertisedLimits {
    pub max_subscriptions: usize,
    pub message_rate_limit: u32,
    pub idle_timeout_secs: u64,
}

pub fn connection_established(client_id: &str, limits: AdvertisedLimits) -> Utf8Bytes {
    // Whole minutes stay integers (the frontend shows them); a fractional timeout stays exact.
    let minutes: Value = if limits.idle_timeout_secs % 60 == 0 {
        json!(limits.idle_timeout_secs / 60)
    } else {
        json!(limits.idle_timeout_secs as f64 / 60.0)
    };
    text(json!({
        "type": "connection_established",
        "client_id": client_id,
        "server_time": timestamp(),
        "connection_limits": {
            "max_subscriptions": limits.max_subscriptions,
            "message_rate_limit": limits.message_rate_limit,
            "idle_timeout_minutes": minutes,
        }
    }))
}

pub fn subscription_confirmed(events: &[TopicName]) -> Utf8Bytes {
    text(json!({"type": "subscription_confirmed", "events": events_json(events), "timestamp": timestamp()}))
}

pub fn unsubscription_confirmed(events: &[TopicName]) -> Utf8Bytes {
    text(json!({"type": "unsubscription_confirmed", "events": events_json(events), "timestamp": timestamp()}))
}

fn events_json(events: &[TopicName]) -> Value {
    Value::Array(
        events
            .iter()
            .map(|t| Value::String(t.as_str().to_owned()))
            .collect(),
    )
}

pub fn error(message: &str) -> Utf8Bytes {
    text(json!({"type": "error", "message": message, "timestamp": timestamp()}))
}

pub fn invalid_event_type(name: &str) -> Utf8Bytes {
    let shown: String = name.chars().take(MAX_ECHOED_TYPE_CHARS * 4).collect();
    error(&format!("Invalid event type: {shown}"))
}

pub fn subscription_error(max: usize) -> Utf8Bytes {
    text(json!({
        "type": "subscription_error",
        "error": format!("Maximum subscriptions ({max}) reached"),
        "timestamp": timestamp(),
    }))
}

pub fn pong() -> Utf8Bytes {
    text(json!({"type": "pong", "timestamp": timestamp()}))
}

pub fn rate_limit_exceeded(per_minute: u32) -> Utf8Bytes {
    text(json!({
        "type": "rate_limit_exceeded",
        "message": format!("Rate limit exceeded. Maximum {per_minute} messages per minute."),
        "timestamp": timestamp(),
    }))
}

pub fn server_shutdown() -> Utf8Bytes {
    text(json!({"type": "server_shutdown", "message": "Server is shutting down", "timestamp": timestamp()}))
}

pub fn status(connection_info: Value, server_metrics: Value) -> Utf8Bytes {
    text(json!({
        "type": "status",
        "connection_info": connection_info,
        "server_metrics": server_metrics,
        "timestamp": timestamp(),
    }))
}

/// Encodes a published event once for every subscriber, as a complete WebSocket text frame:
/// the publisher's object with `event_type` and `timestamp` added (or overwritten in place).
/// Server frames are unmasked, so the frame is the same bytes for every connection: each
/// subscriber's socket gets a refcounted clone, written as is.
///
/// One allocation, sized from `size_hint` (the event's size as published): the JSON is written
/// behind room for the longest frame header, and the header goes right in front of it, so the
/// payload is neither regrown nor copied into a frame afterwards.
pub fn encode_event(
    topic: &TopicName,
    mut message: Map<String, Value>,
    timestamp: &str,
    size_hint: usize,
) -> Bytes {
    const HEADER_ROOM: usize = 10;
    message.insert("event_type".to_owned(), Value::String(topic.as_str().to_owned()));
    message.insert("timestamp".to_owned(), Value::String(timestamp.to_owned()));
    let value = Value::Object(message);
    let extra = HEADER_ROOM + 64 + topic.as_str().len() + timestamp.len();
    let mut buf = Vec::with_capacity(size_hint.saturating_add(extra));
    buf.resize(HEADER_ROOM, 0);
    if serde_json::to_writer(&mut buf, &value).is_err() {
        // Unreachable (a `Value` with string keys into a `Vec` cannot fail); stay well-formed.
        buf.truncate(HEADER_ROOM);
        buf.extend_from_slice(value.to_string().as_bytes());
    }
    let (header, n) = frame_header(0x1, buf.len() - HEADER_ROOM);
    let start = HEADER_ROOM - n;
    buf[start..HEADER_ROOM].copy_from_slice(&header[..n]);
    Bytes::from(buf).slice(start..)
}

/// A final, unmasked text frame carrying `payload` (RFC 6455 section 5.2).
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(0x1, payload)
}

/// A final, unmasked binary frame (the echo endpoint's replies).
pub fn binary_frame(payload: &[u8]) -> Bytes {
    frame(0x2, payload)
}

/// An empty ping frame (the heartbeat).
pub fn ping_frame() -> Bytes {
    Bytes::from_static(&[0x89, 0x00])
}

/// Whether `buf`, a run of whole unmasked frames as the server writes them, holds a close frame.
/// (The outbox refuses events once a close frame is queued: nothing may follow it on the wire.)
pub fn holds_close_frame(mut buf: &[u8]) -> bool {
    const OP_CLOSE: u8 = 0x8;
    while let [b0, b1, rest @ ..] = buf {
        if b0 & 0x0F == OP_CLOSE {
            return true;
        }
        let (len, rest) = match (b1 & 0x7F, rest) {
            (126, [a, b, rest @ ..]) => (u64::from(u16::from_be_bytes([*a, *b])), rest),
            (127, [a, b, c, d, e, f, g, h, rest @ ..]) => {
                (u64::from_be_bytes([*a, *b, *c, *d, *e, *f, *g, *h]), rest)
            }
            (n @ 0..=125, rest) => (u64::from(n), rest),
            _ => return false,
        };
        buf = usize::try_from(len)
            .ok()
            .and_then(|l| rest.get(l..))
            .unwrap_or(&[]);
    }
    false
}

/// A final, unmasked frame: server frames are never masked, so they are the same bytes for
/// every connection.
fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let (header, n) = frame_header(opcode, payload.len());
    let mut frame = Vec::with_capacity(n + payload.len());
    frame.extend_from_slice(&header[..n]);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// The header of a final, unmasked frame with a payload of `len` bytes: the first 2, 4 or 10
/// bytes of the array, as the second value says.
fn frame_header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    const FIN: u8 = 0x80;
    let mut h = [0u8; 10];
    h[0] = FIN | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_a_close_frame_among_server_frames() {
        let close = Bytes::from_static(&[0x88, 0x02, 0x03, 0xE8]);
        assert!(holds_close_frame(&close));
        assert!(!holds_close_frame(&ping_frame()));
        assert!(!holds_close_frame(&text_frame(&[b'x'; 300])));
        assert!(!holds_close_frame(&text_frame(&vec![b'x'; 70_000])));
        for before in [
            ping_frame(),
            text_frame(b"hi"),
            text_frame(&[b'x'; 300]),
            text_frame(&vec![b'x'; 70_000]),
        ] {
            let mut run = before.to_vec();
            run.extend_from_slice(&close);
            assert!(
                holds_close_frame(&run),
                "close after a {}-byte frame",
                before.len()
            );
        }
        assert!(!holds_close_frame(&[]));
        assert!(!holds_close_frame(&[0x81]));
    }

    proptest! {
        #[test]
        fn close_frame_scan_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = holds_close_frame(&buf);
        }
    }

    fn err(text: &str) -> String {
        parse_client_message(text).unwrap_err()
    }

    #[test]
    fn parses_every_message_type() {
        assert_eq!(
            parse_client_message(r#"{"type":"subscribe","events":["a","b"]}"#),
            Ok(ClientMessage::Subscribe(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse_client_message(r#"{"type":"unsubscribe","events":["a"]}"#),
            Ok(ClientMessage::Unsubscribe(vec!["a".into()]))
        );
        assert_eq!(
            parse_client_message(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            parse_client_message(r#"{"type":"get_status","x":1}"#),
            Ok(ClientMessage::GetStatus)
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(err("not json"), "Invalid JSON format");
        assert_eq!(err("{\"type\":"), "Invalid JSON format");
        assert_eq!(err("[1,2]"), "Message must be a JSON object");
        assert_eq!(err("\"ping\""), "Message must be a JSON object");
        assert_eq!(err("{}"), "Missing message type");
        assert_eq!(err(r#"{"type":5}"#), "Message type must be a string");
        assert_eq!(err(r#"{"type":"dance"}"#), "Unknown message type: dance");
        assert_eq!(err(r#"{"type":"subscribe"}"#), "events must be a list of strings");
        assert_eq!(
            err(r#"{"type":"subscribe","events":"a"}"#),
            "events must be a list of strings"
        );
        assert_eq!(
            err(r#"{"type":"subscribe","events":["a",1]}"#),
            "events must be a list of strings"
        );
    }

    #[test]
    fn unknown_type_echo_is_bounded() {
        let long = "x".repeat(10_000);
        let e = err(&format!(r#"{{"type":"{long}"}}"#));
        assert_eq!(e.len(), "Unknown message type: ".len() + MAX_ECHOED_TYPE_CHARS);
    }

    #[test]
    fn event_keeps_publisher_fields_in_order_and_adds_two() {
        let topic = TopicName::parse("cache_metrics", 128).unwrap();
        let msg: Value =
            serde_json::from_str(r#"{"type":"cache_metrics","data":{"hit_rate":0.9},"timestamp":"old"}"#)
                .unwrap();
        let Value::Object(map) = msg else { unreachable!() };
        let out = encode_event(&topic, map, "2026-01-01T00:00:00.000Z", 0);
        assert_eq!(&out[..2], &[0x81, (out.len() - 2) as u8]);
        assert_eq!(
            std::str::from_utf8(&out[2..]).unwrap(),
            r#"{"type":"cache_metrics","data":{"hit_rate":0.9},"timestamp":"2026-01-01T00:00:00.000Z","event_type":"cache_metrics"}"#
        );
    }

    /// Whatever the size (each header length) and whatever the hint, the event frame is the
    /// plain frame of the JSON text.
    #[test]
    fn event_frames_match_the_plain_encoding_at_every_length() {
        let topic = TopicName::parse("t", 128).unwrap();
        for pad in [0usize, 60, 200, 70_000] {
            for hint in [0usize, 10, 100_000] {
                let msg = json!({"data": "x".repeat(pad)});
                let Value::Object(map) = msg else { unreachable!() };
                let out = encode_event(&topic, map.clone(), "ts", hint);
                let mut expected = map;
                expected.insert("event_type".into(), json!("t"));
                expected.insert("timestamp".into(), json!("ts"));
                let plain = text_frame(Value::Object(expected).to_string().as_bytes());
                assert_eq!(out, plain, "pad {pad}, hint {hint}");
            }
        }
    }

    #[test]
    fn frames_use_the_three_length_encodings() {
        for (len, header) in [
            (0usize, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65_535, vec![0x81, 126, 0xff, 0xff]),
            (65_536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let f = text_frame(&vec![b'a'; len]);
            assert_eq!(&f[..header.len()], &header[..], "len {len}");
            assert_eq!(f.len(), header.len() + len);
        }
    }

    #[test]
    fn idle_minutes_are_integers_when_whole() {
        let limits = AdvertisedLimits {
            max_subscriptions: 10,
            message_rate_limit: 30,
            idle_timeout_secs: 300,
        };
        let v: Value = serde_json::from_str(connection_established("c1", limits).as_str()).unwrap();
        assert_eq!(v["connection_limits"]["idle_timeout_minutes"], json!(5));
        assert_eq!(v["connection_limits"]["max_subscriptions"], json!(10));
        assert_eq!(v["connection_limits"]["message_rate_limit"], json!(30));
        assert_eq!(v["type"], "connection_established");
        assert_eq!(v["client_id"], "c1");
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in any::<String>()) {
            let _ = parse_client_message(&s);
        }

        #[test]
        fn arbitrary_json_shapes_never_panic(kind in prop_oneof![Just("subscribe".to_owned()), Just("unsubscribe".to_owned()), Just("ping".to_owned()), ".*"],
                                             events in proptest::collection::vec(any::<String>(), 0..5)) {
            let v = json!({"type": kind, "events": events});
            let parsed = parse_client_message(&v.to_string());
            if kind == "subscribe" {
                prop_assert_eq!(parsed, Ok(ClientMessage::Subscribe(events)));
            }
        }
    }
}
