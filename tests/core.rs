//! The core contract through the real daemon: the client protocol, topic fan-out, the publish
//! endpoint and the admin reports.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashSet;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const BASE: &str = "";

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| humantime::parse_rfc3339(s).is_ok())
}

#[tokio::test]
async fn connection_established_advertises_limits() {
    let srv = start(BASE).await;
    let (_ws, hello) = srv.client().await;
    assert!(hello["client_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(is_rfc3339(&hello["server_time"]), "{hello}");
    assert_eq!(
        hello["connection_limits"],
        json!({"max_subscriptions": 10, "message_rate_limit": 30, "idle_timeout_minutes": 5})
    );
}

#[tokio::test]
async fn every_row_of_the_protocol_table() {
    let srv = start(BASE).await;
    let (mut ws, _) = srv.client().await;

    let r = request(&mut ws, r#"{"type":"subscribe","events":["a","b"]}"#).await;
    assert_eq!(r["type"], "subscription_confirmed");
    assert_eq!(r["events"], json!(["a", "b"]));
    assert!(is_rfc3339(&r["timestamp"]));

    let r = request(&mut ws, r#"{"type":"unsubscribe","events":["a"]}"#).await;
    assert_eq!(r["type"], "unsubscription_confirmed");
    assert_eq!(r["events"], json!(["a"]));
    assert!(is_rfc3339(&r["timestamp"]));

    let r = request(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(r["type"], "pong");
    assert!(is_rfc3339(&r["timestamp"]));

    let r = request(&mut ws, r#"{"type":"get_status"}"#).await;
    assert_eq!(r["type"], "status");
    let info = &r["connection_info"];
    for key in [
        "client_id",
        "client_ip",
        "state",
        "connected_at",
        "idle_time_seconds",
        "messages_sent",
        "messages_received",
        "subscriptions",
    ] {
        assert!(info.get(key).is_some(), "connection_info lacks {key}: {r}");
    }
    assert_eq!(info["client_ip"], "127.0.0.1");
    assert_eq!(info["state"], "connected");
    assert_eq!(info["subscriptions"], json!(["b"]));
    assert_eq!(info["messages_received"], 4);
    let metrics = &r["server_metrics"];
    for key in [
        "total_connections",
        "connections_by_ip",
        "total_messages_sent",
        "total_broadcasts",
        "rate_limit_violations",
        "memory_usage_mb",
        "limits",
        "event_subscribers",
    ] {
        assert!(metrics.get(key).is_some(), "server_metrics lacks {key}: {r}");
    }
    assert_eq!(metrics["event_subscribers"], json!({"b": 1}));

    let r = request(&mut ws, "this is not json").await;
    assert_eq!(
        r,
        json!({"type": "error", "message": "Invalid JSON format", "timestamp": r["timestamp"]})
    );

    for (input, message) in [
        ("[1,2,3]", "Message must be a JSON object"),
        ("{}", "Missing message type"),
        (r#"{"type":"dance"}"#, "Unknown message type: dance"),
        (
            r#"{"type":"subscribe","events":"a"}"#,
            "events must be a list of strings",
        ),
        (
            r#"{"type":"subscribe","events":["a",2]}"#,
            "events must be a list of strings",
        ),
        (
            r#"{"type":"subscribe","events":["ok","bad name"]}"#,
            "Invalid event type: bad name",
        ),
    ] {
        let r = request(&mut ws, input).await;
        assert_eq!(r["type"], "error", "{input} -> {r}");
        assert_eq!(r["message"], message, "{input} -> {r}");
        assert!(is_rfc3339(&r["timestamp"]));
    }
    // All or nothing: "ok" was not subscribed by the failed request.
    let r = request(&mut ws, r#"{"type":"get_status"}"#).await;
    assert_eq!(r["connection_info"]["subscriptions"], json!(["b"]));

    // The connection is still usable after all that bad input.
    let r = request(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(r["type"], "pong");

    // A binary frame closes with 1003.
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    let (code, _) = expect_close(&mut ws).await.expect("close frame");
    assert_eq!(code, 1003);
}

#[tokio::test]
async fn max_subscriptions_gives_subscription_error_and_is_all_or_nothing() {
    let srv = start("[limits]\nmax_subscriptions = 3\n").await;
    let (mut ws, hello) = srv.client().await;
    assert_eq!(hello["connection_limits"]["max_subscriptions"], 3);
    let r = request(&mut ws, r#"{"type":"subscribe","events":["a","b"]}"#).await;
    assert_eq!(r["type"], "subscription_confirmed");
    // Re-subscribing to a held topic does not count twice.
    let r = request(&mut ws, r#"{"type":"subscribe","events":["a","b","c"]}"#).await;
    assert_eq!(r["type"], "subscription_confirmed");
    let r = request(&mut ws, r#"{"type":"subscribe","events":["d"]}"#).await;
    assert_eq!(r["type"], "subscription_error");
    assert_eq!(r["error"], "Maximum subscriptions (3) reached");
    let r = request(&mut ws, r#"{"type":"get_status"}"#).await;
    assert_eq!(r["connection_info"]["subscriptions"], json!(["a", "b", "c"]));
}

#[tokio::test]
async fn events_reach_only_their_subscribers_with_fields_added() {
    let srv = start(BASE).await;
    let (mut a, _) = srv.client().await;
    let (mut b, _) = srv.client().await;
    request(&mut a, r#"{"type":"subscribe","events":["cache_metrics"]}"#).await;
    request(&mut b, r#"{"type":"subscribe","events":["other"]}"#).await;

    let (code, body) = srv
        .publish(
            r#"{"event_type":"cache_metrics","message":{"type":"cache_metrics","data":{"hit_rate":0.9}}}"#,
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, json!({"delivered": 1}));
    let ev = recv_json(&mut a).await;
    assert_eq!(ev["type"], "cache_metrics");
    assert_eq!(ev["data"], json!({"hit_rate": 0.9}));
    assert_eq!(ev["event_type"], "cache_metrics");
    assert!(is_rfc3339(&ev["timestamp"]));

    // b must not have received it: the next thing b sees is its own pong.
    let (code, body) = srv.publish(r#"{"event_type":"other","message":{"n":1}}"#).await;
    assert_eq!((code, body), (StatusCode::OK, json!({"delivered": 1})));
    let first = recv_json(&mut b).await;
    assert_eq!(first["event_type"], "other", "b got a foreign event: {first}");
    let r = request(&mut b, r#"{"type":"ping"}"#).await;
    assert_eq!(r["type"], "pong");

    // Nobody listens: delivered 0.
    let (_, body) = srv.publish(r#"{"event_type":"nobody","message":{}}"#).await;
    assert_eq!(body, json!({"delivered": 0}));
}

#[tokio::test]
async fn batch_publish_applies_in_order() {
    let srv = start(BASE).await;
    let (mut a, _) = srv.client().await;
    request(&mut a, r#"{"type":"subscribe","events":["x"]}"#).await;
    let (code, body) = srv
        .publish(r#"[{"event_type":"x","message":{"n":1}},{"event_type":"y","message":{"n":2}},{"event_type":"x","message":{"n":3}}]"#)
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, json!({"delivered": [1, 0, 1]}));
    assert_eq!(recv_json(&mut a).await["n"], 1);
    assert_eq!(recv_json(&mut a).await["n"], 3);
}

#[tokio::test]
async fn every_publish_error() {
    let srv = start("[admin]\nmax_publish_bytes = 1024\n[topics]\nallowed = [\"x\"]\n").await;
    for (body, needle) in [
        ("{not json", "Invalid JSON"),
        (r#"{"message":{}}"#, "event_type is required"),
        (r#"{"event_type":5,"message":{}}"#, "event_type must be a string"),
        (r#"{"event_type":"bad name","message":{}}"#, "Invalid event type"),
        (r#"{"event_type":"y","message":{}}"#, "topics.allowed"),
        (
            r#"{"event_type":"x","message":[1]}"#,
            "message must be a JSON object",
        ),
        (
            r#"{"event_type":"x","message":"hi"}"#,
            "message must be a JSON object",
        ),
        (r#"{"event_type":"x"}"#, "message is required"),
        (r#"[{"event_type":"x","message":{}}, 7]"#, "[1]:"),
        ("42", "JSON object"),
    ] {
        let (code, v) = srv.publish(body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body} -> {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {v}"));
        assert!(msg.contains(needle), "{body} -> {msg}");
    }
    let big = format!(
        r#"{{"event_type":"x","message":{{"pad":"{}"}}}}"#,
        "a".repeat(2000)
    );
    let (code, v) = srv.publish(&big).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["error"].is_string());

    let (code, _, body) = common::http(srv.admin, Method::GET, "/publish", &[], vec![]).await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());

    let (code, v) = srv.get_json(srv.admin, "/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string());

    // A bad batch applies nothing: nothing was published.
    let metrics = srv.status().await;
    assert_eq!(metrics["metrics"]["total_broadcasts"], 0);
}

#[tokio::test]
async fn two_hundred_subscribers_get_fifty_events_each_in_order() {
    let srv = start("[limits]\nmax_total_connections = 300\nmax_connections_per_ip = 300\n").await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        let (mut ws, _) = srv.client().await;
        send(&mut ws, r#"{"type":"subscribe","events":["load"]}"#).await;
        clients.push(ws);
    }
    for ws in &mut clients {
        assert_eq!(recv_json(ws).await["type"], "subscription_confirmed");
    }
    for n in 0..50 {
        let (code, body) = srv
            .publish(&format!(r#"{{"event_type":"load","message":{{"n":{n}}}}}"#))
            .await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, json!({"delivered": 200}));
    }
    let readers = clients.into_iter().map(|mut ws| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..50 {
                got.push(recv_json(&mut ws).await["n"].as_u64().unwrap());
            }
            got
        })
    });
    for r in readers {
        let got = r.await.unwrap();
        assert_eq!(got, (0..50).collect::<Vec<u64>>());
    }
    let s = srv.status().await;
    assert_eq!(s["metrics"]["total_messages_sent"], 200 * 50);
    assert_eq!(s["metrics"]["total_broadcasts"], 50);
}

#[tokio::test]
async fn allowlist_limits_subscribe_and_publish() {
    let srv = start("[topics]\nallowed = [\"orchestration_status\", \"cache_metrics\"]\n").await;
    let (mut ws, _) = srv.client().await;
    let r = request(
        &mut ws,
        r#"{"type":"subscribe","events":["cache_metrics","secret"]}"#,
    )
    .await;
    assert_eq!(r["message"], "Invalid event type: secret");
    let r = request(&mut ws, r#"{"type":"subscribe","events":["cache_metrics"]}"#).await;
    assert_eq!(r["type"], "subscription_confirmed");
    let (code, _) = srv.publish(r#"{"event_type":"secret","message":{}}"#).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn client_ids_are_unique() {
    let srv = start("[limits]\nmax_connections_per_ip = 50\n").await;
    let mut ids = HashSet::new();
    let mut conns = Vec::new();
    for _ in 0..40 {
        let (ws, hello) = srv.client().await;
        assert!(
            ids.insert(hello["client_id"].as_str().unwrap().to_owned()),
            "duplicate id"
        );
        conns.push(ws);
    }
}

#[tokio::test]
async fn health_status_metrics_and_healthz() {
    let srv = start("[limits]\nmax_total_connections = 10\nmax_connections_per_ip = 10\n").await;
    let (code, h) = srv.get_json(srv.admin, "/health").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["connection_utilization"], "0/10");
    assert!(h["memory_usage_mb"].as_f64().unwrap() > 1.0, "{h}");
    assert!(h["uptime_seconds"].is_u64());

    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(srv.client().await.0);
    }
    let (_, h) = srv.get_json(srv.admin, "/health").await;
    assert_eq!(h["connection_utilization"], "5/10");

    let s = srv.status().await;
    assert_eq!(s["metrics"]["total_connections"], 5);
    assert_eq!(s["metrics"]["connections_by_ip"], json!({"127.0.0.1": 5}));
    assert_eq!(s["connections"].as_array().unwrap().len(), 5);
    let (_, limited) = srv.get_json(srv.admin, "/status?limit=2").await;
    assert_eq!(limited["connections"].as_array().unwrap().len(), 2);

    let (code, _, body) = common::http(srv.admin, Method::GET, "/metrics", &[], vec![]).await;
    assert_eq!(code, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("\nwsgate_connections 5\n"), "{text}");
    assert!(text.contains("wsgate_messages_published_total 0"));
    assert!(text.contains("wsgate_messages_delivered_total 0"));

    let (code, v) = srv.get_json(srv.public, "/healthz").await;
    assert_eq!((code, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (code, v) = srv.get_json(srv.public, "/elsewhere").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string());

    // Degraded at 90 % of the cap.
    for _ in 0..4 {
        conns.push(srv.client().await.0);
    }
    let (_, h) = srv.get_json(srv.admin, "/health").await;
    assert_eq!(h["status"], "degraded");
}

#[tokio::test]
async fn plain_get_on_the_ws_path_is_refused_with_json() {
    let srv = start(BASE).await;
    let (code, v) = srv.get_json(srv.public, "/ws").await;
    assert_eq!(code, StatusCode::UPGRADE_REQUIRED);
    assert!(v["error"].is_string());
}

#[tokio::test]
async fn disconnect_cleans_up_subscriptions() {
    let srv = start(BASE).await;
    let (mut ws, _) = srv.client().await;
    request(&mut ws, r#"{"type":"subscribe","events":["a","b"]}"#).await;
    let s = srv.status().await;
    assert_eq!(s["metrics"]["event_subscribers"], json!({"a": 1, "b": 1}));
    ws.close(None).await.unwrap();
    while let Ok(Some(_)) = tokio::time::timeout(DEADLINE, ws.next()).await {}
    srv.wait_status("cleanup", |s| {
        s["metrics"]["total_connections"] == 0 && s["metrics"]["event_subscribers"] == json!({})
    })
    .await;
}

#[tokio::test]
async fn a_client_close_gets_a_close_reply() {
    let srv = start(BASE).await;
    let (mut ws, _) = srv.client().await;
    ws.send(Message::Close(None)).await.unwrap();
    // The server must answer the closing handshake (an unclean TCP drop shows up as an error).
    let reply = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("no reply to close");
    assert!(matches!(reply, Some(Ok(Message::Close(_)))), "{reply:?}");
    srv.wait_status("closed", |s| s["metrics"]["closed_connections"]["client"] == 1)
        .await;
}
