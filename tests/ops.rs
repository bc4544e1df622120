//! Operations through the real daemon in-process: connection management, the admin token, the
//! Prometheus exposition, drain behaviour seen from clients, and reload of limits.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashSet;

use common::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};
use wsgate::Config;

#[tokio::test]
async fn kick_by_client_id_and_list_connections() {
    let srv = start("").await;
    let (mut a, hello_a) = srv.client().await;
    let (mut b, _) = srv.client().await;
    request(&mut a, r#"{"type":"subscribe","events":["t1"]}"#).await;
    request(&mut b, r#"{"type":"subscribe","events":["t2"]}"#).await;

    let (code, list) = srv.get_json(srv.admin, "/connections").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["total"], 2);
    let first = &list["connections"][0];
    for key in [
        "client_id",
        "client_ip",
        "state",
        "age_seconds",
        "idle_time_seconds",
        "subscriptions",
        "queue_depth",
        "messages_sent",
        "messages_received",
    ] {
        assert!(first.get(key).is_some(), "{key} missing: {first}");
    }
    let (_, by_topic) = srv.get_json(srv.admin, "/connections?topic=t1").await;
    assert_eq!(by_topic["returned"], 1);
    assert_eq!(by_topic["connections"][0]["client_id"], hello_a["client_id"]);
    let (_, by_ip) = srv.get_json(srv.admin, "/connections?ip=127.0.0.9").await;
    assert_eq!(by_ip["returned"], 0);
    let (_, limited) = srv.get_json(srv.admin, "/connections?limit=1").await;
    assert_eq!(limited["returned"], 1);
    let (code, _) = srv.get_json(srv.admin, "/connections?limit=abc").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);

    let id = hello_a["client_id"].as_str().unwrap();
    let (code, _, body) = http(
        srv.admin,
        Method::DELETE,
        &format!("/connections/{id}"),
        &[],
        vec![],
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (code, reason) = expect_close(&mut a).await.expect("close frame");
    assert_eq!((code, reason.as_str()), (1008, "disconnected by operator"));
    let s = srv
        .wait_status("kicked", |s| s["metrics"]["total_connections"] == 1)
        .await;
    assert_eq!(s["metrics"]["closed_connections"]["kicked"], 1);

    let (code, _, body) = http(srv.admin, Method::DELETE, "/connections/nobody", &[], vec![]).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());
    assert_eq!(request(&mut b, r#"{"type":"ping"}"#).await["type"], "pong");
}

#[tokio::test]
async fn admin_token_guards_publish_status_and_connections_only() {
    let token = "0123456789abcdef-token";
    let srv = start(&format!("[admin]\ntoken = \"{token}\"\n")).await;
    let body = br#"{"event_type":"a","message":{}}"#.to_vec();
    let bearer = format!("Bearer {token}");
    for (method, path) in [
        (Method::POST, "/publish"),
        (Method::GET, "/status"),
        (Method::GET, "/connections"),
        (Method::DELETE, "/connections/x"),
    ] {
        for headers in [
            vec![],
            vec![("authorization", "Bearer wrong-token-wrong-token")],
            vec![("authorization", token)],
        ] {
            let (code, _, resp) = http(srv.admin, method.clone(), path, &headers, body.clone()).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{method} {path} {headers:?}");
            let v: Value = serde_json::from_slice(&resp).unwrap();
            assert!(v["error"].is_string());
            assert!(!String::from_utf8_lossy(&resp).contains(token));
        }
    }
    let (code, _, _) = http(
        srv.admin,
        Method::POST,
        "/publish",
        &[("authorization", &bearer)],
        body,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, _, _) = http(
        srv.admin,
        Method::GET,
        "/status",
        &[("authorization", &bearer)],
        vec![],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    for path in ["/health", "/metrics"] {
        let (code, _, _) = http(srv.admin, Method::GET, path, &[], vec![]).await;
        assert_eq!(code, StatusCode::OK, "{path} must stay open");
    }
}

/// Checks Prometheus text exposition format 0.0.4 line by line.
fn check_prometheus(text: &str) -> HashSet<String> {
    let mut typed: HashSet<String> = HashSet::new();
    let mut samples = HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(
                rest.split_once(' ').is_some_and(|(_, h)| !h.is_empty()),
                "HELP without text: {line}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_owned()), "TYPE repeated: {line}");
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && name.starts_with("wsgate_"),
            "bad name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels: {line}"
                );
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(*b)))
            .unwrap_or(name);
        assert!(typed.contains(base), "sample before its TYPE: {line}");
        samples.insert(name.to_owned());
    }
    samples
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_the_traffic() {
    let srv = start("").await;
    let (mut ws, _) = srv.client().await;
    request(&mut ws, r#"{"type":"subscribe","events":["m"]}"#).await;
    for _ in 0..3 {
        srv.publish(r#"{"event_type":"m","message":{}}"#).await;
        recv_json(&mut ws).await;
    }
    let (code, headers, body) = http(srv.admin, Method::GET, "/metrics", &[], vec![]).await;
    assert_eq!(code, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    let names = check_prometheus(&text);
    for required in [
        "wsgate_connections",
        "wsgate_connected_ips",
        "wsgate_connections_opened_total",
        "wsgate_connections_rejected_total",
        "wsgate_connections_closed_total",
        "wsgate_messages_received_total",
        "wsgate_rate_limit_violations_total",
        "wsgate_messages_published_total",
        "wsgate_messages_delivered_total",
        "wsgate_send_queue_full_total",
        "wsgate_publish_duration_seconds_bucket",
        "wsgate_fanout_duration_seconds_bucket",
        "wsgate_process_resident_memory_bytes",
        "wsgate_process_open_fds",
    ] {
        assert!(names.contains(required), "{required} missing");
    }
    assert!(text.contains("\nwsgate_messages_published_total 3\n"));
    assert!(text.contains("\nwsgate_messages_delivered_total 3\n"));
    assert!(text.contains("\nwsgate_publish_duration_seconds_count 3\n"));
    assert!(text.contains("\nwsgate_messages_received_total 1\n"));
}

#[tokio::test]
async fn drain_says_goodbye_after_queued_events_then_closes_1001() {
    let srv = start("[shutdown]\ndrain_timeout = \"5s\"\nclose_spread = \"300ms\"\n").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = srv.client().await;
        request(&mut ws, r#"{"type":"subscribe","events":["q"]}"#).await;
        clients.push(ws);
    }
    srv.publish(r#"{"event_type":"q","message":{"last":true}}"#).await;
    let started = Instant::now();
    srv.begin_shutdown();
    // While draining: health 503, publish 503.
    let (code, h) = srv.get_json(srv.admin, "/health").await;
    assert_eq!(
        (code, h["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down"))
    );
    let (code, _) = srv.publish(r#"{"event_type":"q","message":{}}"#).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    for ws in &mut clients {
        assert_eq!(
            recv_json(ws).await["last"],
            true,
            "queued event must come before the goodbye"
        );
        let bye = recv_json(ws).await;
        assert_eq!(bye["type"], "server_shutdown");
        assert_eq!(bye["message"], "Server is shutting down");
        assert!(bye["timestamp"].is_string());
        let (code, _) = expect_close(ws).await.expect("close frame");
        assert_eq!(code, 1001);
    }
    let report = srv.wait_stopped().await;
    assert_eq!(report.cut_off, 0);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn drain_deadline_cuts_off_clients_that_never_answer() {
    let srv = start("[shutdown]\ndrain_timeout = \"300ms\"\nclose_spread = \"0s\"\n").await;
    // A raw client that completes the handshake and then never reads nor answers the close.
    let mut s = tokio::net::TcpStream::connect(srv.public).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    srv.wait_status("connected", |s| s["metrics"]["total_connections"] == 1)
        .await;
    let started = Instant::now();
    srv.begin_shutdown();
    let report = timeout(DEADLINE, srv.wait_stopped()).await.unwrap();
    assert!(report.cut_off >= 1, "{report:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn goodbyes_are_spread_over_the_window() {
    let srv = start(
        "[limits]\nmax_connections_per_ip = 20\n[shutdown]\ndrain_timeout = \"5s\"\nclose_spread = \"1s\"\n",
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(srv.client().await.0);
    }
    let started = Instant::now();
    srv.begin_shutdown();
    let mut at = Vec::new();
    for ws in &mut clients {
        assert_eq!(recv_json(ws).await["type"], "server_shutdown");
    }
    for ws in &mut clients {
        expect_close(ws).await;
        at.push(started.elapsed());
    }
    // Reading in order only gives upper bounds; the last goodbye must come late in the window
    // and the drain must not have closed everyone at once.
    let last = at.iter().max().unwrap();
    assert!(*last > std::time::Duration::from_millis(500), "{at:?}");
}

#[tokio::test]
async fn reload_applies_new_limits_to_new_connections_only() {
    let srv = start("[limits]\nmax_subscriptions = 10\n").await;
    let (mut before, hello) = srv.client().await;
    assert_eq!(hello["connection_limits"]["max_subscriptions"], 10);
    let same_listeners = |text: &str| {
        let mut c = Config::parse(text).unwrap();
        c.server.listen = "127.0.0.1:0".parse().unwrap();
        c.admin.listen = "127.0.0.1:0".parse().unwrap();
        c
    };
    let notes = srv.daemon.reload(same_listeners(
        "[limits]\nmax_subscriptions = 3\nmax_total_connections = 60\n",
    ));
    assert!(notes.is_empty(), "{notes:?}");
    let (_after, hello) = srv.client().await;
    assert_eq!(hello["connection_limits"]["max_subscriptions"], 3);
    // The earlier connection keeps the limits it was told about.
    let r = request(
        &mut before,
        r#"{"type":"subscribe","events":["a","b","c","d","e"]}"#,
    )
    .await;
    assert_eq!(r["type"], "subscription_confirmed");
    let (_, h) = srv.get_json(srv.admin, "/health").await;
    assert_eq!(h["connection_utilization"], "2/60");
    let mut moved = same_listeners("");
    moved.server.listen = "127.0.0.1:1".parse().unwrap();
    let notes = srv.daemon.reload(moved);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("server.listen changed"), "{notes:?}");
    assert_eq!(
        json!(request(&mut before, r#"{"type":"ping"}"#).await["type"]),
        "pong"
    );
}
