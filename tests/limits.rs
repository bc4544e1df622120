//! Every limit in `[limits]`, through the real daemon: what the client sees, and the counter.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

const UPGRADE_REQUEST: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// A raw TCP connection that completed the WebSocket handshake; returns it and the response head.
async fn raw_upgrade(addr: SocketAddr, extra_headers: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(UPGRADE_REQUEST).await.unwrap();
    s.write_all(extra_headers.as_bytes()).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = timeout(DEADLINE, s.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    (s, String::from_utf8(head).unwrap())
}

/// Connects from a given local address.
async fn client_from(srv: &TestServer, local: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(srv.public).await.unwrap();
    let (ws, _) = timeout(
        DEADLINE,
        tokio_tungstenite::client_async(srv.ws_url(), tokio_tungstenite::MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("connect timed out")?;
    Ok(ws)
}

/// Waits until the peer closes the TCP connection; returns how long it took.
async fn wait_eof(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("connection was not closed")
        {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => continue,
        }
    }
}

fn closed(s: &Value, reason: &str) -> u64 {
    s["metrics"]["closed_connections"][reason].as_u64().unwrap()
}

fn rejected(s: &Value, reason: &str) -> u64 {
    s["metrics"]["rejected_connections"][reason].as_u64().unwrap()
}

#[tokio::test]
async fn total_connection_cap_gives_exactly_50_and_503s() {
    let srv = start("[limits]\nmax_total_connections = 50\nmax_connections_per_ip = 100\n").await;
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        match timeout(DEADLINE, tokio_tungstenite::connect_async(srv.ws_url()))
            .await
            .unwrap()
        {
            Ok((ws, _)) => open.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert!(resp.headers().contains_key("retry-after"));
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body, json!({"error": "Maximum connections (50) reached"}));
                refused += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!((open.len(), refused), (50, 10));
    let s = srv.status().await;
    assert_eq!(rejected(&s, "total"), 10);

    // Closing 5 frees 5 slots.
    for mut ws in open.drain(..5) {
        ws.close(None).await.unwrap();
        while let Ok(Some(_)) = timeout(DEADLINE, ws.next()).await {}
    }
    srv.wait_status("5 slots freed", |s| s["metrics"]["total_connections"] == 45)
        .await;
    for _ in 0..5 {
        open.push(srv.client().await.0);
    }
    let err = tokio_tungstenite::connect_async(srv.ws_url()).await.unwrap_err();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 503));

    let (_, _, metrics) = http(srv.admin, Method::GET, "/metrics", &[], vec![]).await;
    let text = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        text.contains("wsgate_connections_rejected_total{reason=\"total\"} 11"),
        "{text}"
    );
}

#[tokio::test]
async fn per_ip_cap_gives_429_and_other_ips_still_get_in() {
    let srv = start("[limits]\nmax_connections_per_ip = 5\n").await;
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(
            client_from(&srv, "127.0.0.1")
                .await
                .expect("within the per-IP limit"),
        );
    }
    match client_from(&srv, "127.0.0.1").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(resp.headers().contains_key("retry-after"));
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"], "Maximum connections per IP (5) reached");
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    open.push(client_from(&srv, "127.0.0.2").await.expect("another IP gets in"));
    let s = srv.status().await;
    assert_eq!(rejected(&s, "per_ip"), 1);
    assert_eq!(
        s["metrics"]["connections_by_ip"],
        json!({"127.0.0.1": 5, "127.0.0.2": 1})
    );
}

#[tokio::test]
async fn rate_limit_gives_exactly_30_pongs_then_refusals() {
    let srv = start("").await;
    let (mut ws, _) = srv.client().await;
    for _ in 0..40 {
        send(&mut ws, r#"{"type":"ping"}"#).await;
    }
    let mut pongs = 0;
    let mut refused = 0;
    for _ in 0..40 {
        let r = recv_json(&mut ws).await;
        match r["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("rate_limit_exceeded") => {
                assert_eq!(
                    r["message"],
                    "Rate limit exceeded. Maximum 30 messages per minute."
                );
                assert!(r["timestamp"].is_string());
                refused += 1;
            }
            _ => panic!("unexpected {r}"),
        }
    }
    assert_eq!(pongs, 30);
    assert!(refused >= 1);
    let s = srv.status().await;
    assert_eq!(s["metrics"]["rate_limit_violations"], refused);
}

#[tokio::test]
async fn a_flooding_client_is_closed_1008() {
    let srv = start("[limits]\nmax_message_rate_per_minute = 10\n").await;
    let (mut ws, _) = srv.client().await;
    // Twice the limit and more inside one window.
    for _ in 0..25 {
        if ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await.is_err() {
            break;
        }
    }
    let (code, reason) = expect_close(&mut ws).await.expect("close frame");
    assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded"));
    let s = srv
        .wait_status("closed", |s| s["metrics"]["total_connections"] == 0)
        .await;
    assert_eq!(closed(&s, "rate_limit"), 1);
}

#[tokio::test]
async fn an_oversized_message_closes_1009() {
    let srv = start("[limits]\nmax_message_bytes = 4096\n").await;
    let (mut ws, _) = srv.client().await;
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(10_000));
    let _ = ws.send(Message::Text(big.into())).await;
    let (code, _) = expect_close(&mut ws).await.expect("close frame");
    assert_eq!(code, 1009);
    let s = srv
        .wait_status("closed", |s| s["metrics"]["total_connections"] == 0)
        .await;
    assert_eq!(closed(&s, "too_big"), 1);
}

#[tokio::test]
async fn a_fragmented_message_over_the_cap_closes_1009() {
    let srv = start("[limits]\nmax_message_bytes = 4096\n").await;
    let (mut s, head) = raw_upgrade(srv.public, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Three masked continuation-less fragments of 2 KiB each: 6 KiB reassembled.
    let mut frames = Vec::new();
    for (i, opcode) in [0x1u8, 0x0, 0x0].iter().enumerate() {
        let fin = if i == 2 { 0x80 } else { 0 };
        frames.extend(masked_frame(fin | opcode, &[b'a'; 2048]));
    }
    let _ = s.write_all(&frames).await;
    let close = read_close_code(&mut s).await;
    assert_eq!(close, Some(1009));
}

/// A masked client frame with a zero mask (payload unchanged).
fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first_byte];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend([0, 0, 0, 0]);
    f.extend(payload);
    f
}

/// Reads server frames from a raw socket until a close frame; returns its code.
async fn read_close_code(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Parse complete frames in buf.
        loop {
            if buf.len() < 2 {
                break;
            }
            let opcode = buf[0] & 0x0f;
            let (len, hdr) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < hdr + len {
                break;
            }
            if opcode == 0x8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[hdr], buf[hdr + 1]]));
            }
            buf.drain(..hdr + len);
        }
        match timeout(DEADLINE, s.read(&mut chunk))
            .await
            .expect("no close frame in time")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn unmasked_client_frames_are_refused() {
    let srv = start("").await;
    let (mut s, _) = raw_upgrade(srv.public, "").await;
    let ping = br#"{"type":"ping"}"#;
    let mut frame = vec![0x81, ping.len() as u8];
    frame.extend(ping);
    s.write_all(&frame).await.unwrap();
    assert_eq!(read_close_code(&mut s).await, Some(1002));
}

#[tokio::test]
async fn permessage_deflate_is_never_negotiated() {
    let srv = start("").await;
    let (_s, head) = raw_upgrade(
        srv.public,
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-extensions"),
        "{head}"
    );
}

#[tokio::test]
async fn handshake_deadline_is_absolute() {
    let srv = start("[limits]\nhandshake_timeout = \"500ms\"\n").await;
    // Half a request line.
    let mut half = TcpStream::connect(srv.public).await.unwrap();
    half.write_all(b"GET /w").await.unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(srv.public).await.unwrap();
    // Headers dribbled one byte every 100 ms: does not extend the deadline.
    let mut dribble = TcpStream::connect(srv.public).await.unwrap();
    let dribbler = tokio::spawn(async move {
        let start = Instant::now();
        for b in UPGRADE_REQUEST.iter() {
            if dribble.write_all(&[*b]).await.is_err() {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the dribbling client was never cut off");
    });
    let t_half = wait_eof(&mut half).await;
    let t_silent = wait_eof(&mut silent).await;
    assert!(t_half < Duration::from_secs(3), "{t_half:?}");
    assert!(t_silent < Duration::from_secs(3), "{t_silent:?}");
    let t_dribble = timeout(DEADLINE, dribbler).await.unwrap().unwrap();
    assert!(t_dribble < Duration::from_secs(3), "{t_dribble:?}");
    let s = srv.status().await;
    assert!(
        rejected(&s, "handshake_timeout") >= 3,
        "{}",
        s["metrics"]["rejected_connections"]
    );
}

#[tokio::test]
async fn pending_connection_cap_closes_extra_sockets() {
    let srv = start("[limits]\nmax_pending_connections = 2\nhandshake_timeout = \"5s\"\n").await;
    let _a = TcpStream::connect(srv.public).await.unwrap();
    let _b = TcpStream::connect(srv.public).await.unwrap();
    // Give the accept loop a moment to take both before the third arrives (bounded wait below).
    let mut third;
    let deadline = Instant::now() + DEADLINE;
    loop {
        third = TcpStream::connect(srv.public).await.unwrap();
        let mut byte = [0u8; 1];
        match timeout(Duration::from_millis(500), third.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => assert!(Instant::now() < deadline, "third socket never refused"),
        }
    }
    let s = srv.status().await;
    assert!(rejected(&s, "pending") >= 1);
}

#[tokio::test]
async fn a_dead_peer_is_dropped_within_interval_plus_timeout() {
    let srv = start("[limits]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"600ms\"\n").await;
    let (_silent, head) = raw_upgrade(srv.public, "").await;
    assert!(head.starts_with("HTTP/1.1 101"));
    srv.wait_status("connected", |s| s["metrics"]["total_connections"] == 1)
        .await;
    let start = Instant::now();
    let s = srv
        .wait_status("dead peer dropped", |s| s["metrics"]["total_connections"] == 0)
        .await;
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    assert_eq!(closed(&s, "dead_peer"), 1);
    assert_eq!(s["connections"], json!([]));
}

#[tokio::test]
async fn idle_clients_are_closed_but_busy_ones_are_not() {
    let srv = start(
        "[limits]\nidle_timeout = \"1s\"\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"1s\"\n",
    )
    .await;
    let (mut idle, _) = srv.client().await;
    let (mut busy, _) = srv.client().await;
    request(&mut busy, r#"{"type":"subscribe","events":["tick"]}"#).await;
    let start = Instant::now();
    // The idle client keeps reading (so tungstenite answers the server's pings) but sends nothing.
    let idle_reader = tokio::spawn(async move { expect_close(&mut idle).await });
    // The busy client receives an event every 300 ms for 2.5 s.
    while start.elapsed() < Duration::from_millis(2500) {
        let (code, _) = srv.publish(r#"{"event_type":"tick","message":{}}"#).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(recv_json(&mut busy).await["event_type"], "tick");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, reason) = timeout(DEADLINE, idle_reader)
        .await
        .unwrap()
        .unwrap()
        .expect("close frame");
    assert_eq!((code, reason.as_str()), (1000, "idle timeout"));
    let r = request(&mut busy, r#"{"type":"ping"}"#).await;
    assert_eq!(r["type"], "pong", "the busy client must still be open");
    let s = srv.status().await;
    assert_eq!(closed(&s, "idle"), 1);
}

#[tokio::test]
async fn a_slow_consumer_is_cut_and_the_others_get_everything() {
    let srv = start(
        "[limits]\nmax_connections_per_ip = 10\nsend_queue_messages = 256\nsend_queue_bytes = 1048576\n",
    )
    .await;
    let (_, health) = srv.get_json(srv.admin, "/health").await;
    let rss_before = health["memory_usage_mb"].as_f64().unwrap();

    let (mut stalled, _) = srv.client().await;
    request(&mut stalled, r#"{"type":"subscribe","events":["big"]}"#).await;
    let (mut normal, _) = srv.client().await;
    request(&mut normal, r#"{"type":"subscribe","events":["big"]}"#).await;

    const EVENTS: usize = 1500;
    let reader = tokio::spawn(async move {
        let mut next = 0;
        while next < EVENTS {
            let ev = recv_json(&mut normal).await;
            assert_eq!(ev["n"], next, "out of order");
            next += 1;
        }
        (next, normal)
    });
    let pad = "x".repeat(16 * 1024);
    for batch in 0..EVENTS / 10 {
        let events: Vec<String> = (0..10)
            .map(|i| {
                format!(
                    r#"{{"event_type":"big","message":{{"n":{},"pad":"{pad}"}}}}"#,
                    batch * 10 + i
                )
            })
            .collect();
        let (code, _) = srv.publish(&format!("[{}]", events.join(","))).await;
        assert_eq!(code, StatusCode::OK);
    }
    let (received, _normal) = timeout(Duration::from_secs(30), reader).await.unwrap().unwrap();
    assert_eq!(received, EVENTS);
    let s = srv
        .wait_status("stalled client cut", |s| {
            s["metrics"]["total_connections"] == 1 && s["metrics"]["closed_connections"]["slow_consumer"] == 1
        })
        .await;
    assert_eq!(closed(&s, "slow_consumer"), 1, "{}", s["metrics"]);
    assert!(s["metrics"]["send_queue_full"].as_u64().unwrap() >= 1);
    let rss_after = s["metrics"]["memory_usage_mb"].as_f64().unwrap();
    // 1,500 x 16 KiB = 24 MiB went out; what stays resident must be far less than that.
    assert!(
        rss_after - rss_before < 20.0,
        "RSS grew from {rss_before} to {rss_after} MiB"
    );
    drop(stalled);
}

#[tokio::test]
async fn churn_leaves_nothing_behind() {
    let srv = start("[limits]\nmax_total_connections = 1000\nmax_connections_per_ip = 1000\n").await;
    let url = srv.ws_url();
    let mut tasks = Vec::new();
    for worker in 0..20 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
                ws.send(Message::Text(
                    format!(r#"{{"type":"subscribe","events":["t{}"]}}"#, i % 7).into(),
                ))
                .await
                .unwrap();
                // Wait for the confirmation so the subscription really exists.
                loop {
                    let m = timeout(DEADLINE, ws.next()).await.unwrap().unwrap().unwrap();
                    if m.to_text().unwrap().contains("subscription_confirmed") {
                        break;
                    }
                }
                if (worker * 50 + i) % 3 == 0 {
                    drop(ws); // aborted: no close frame
                } else {
                    ws.close(None).await.unwrap();
                    while let Ok(Some(Ok(_))) = timeout(DEADLINE, ws.next()).await {}
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = srv
        .wait_status("everything released", |s| {
            s["metrics"]["total_connections"] == 0
                && s["metrics"]["connections_by_ip"] == json!({})
                && s["metrics"]["event_subscribers"] == json!({})
        })
        .await;
    assert_eq!(s["metrics"]["connections_opened"], 1000);
    assert_eq!(srv.gateway.hub.subscription_count(), 0);
    assert_eq!(srv.gateway.registry.len(), 0);
}

#[tokio::test]
async fn frames_sent_together_with_the_handshake_are_not_lost() {
    let srv = start("").await;
    let mut s = TcpStream::connect(srv.public).await.unwrap();
    let mut bytes = UPGRADE_REQUEST.to_vec();
    bytes.extend_from_slice(b"\r\n");
    bytes.extend(masked_frame(0x81, br#"{"type":"ping"}"#));
    s.write_all(&bytes).await.unwrap();
    // Read until the pong's text appears after the 101 and connection_established.
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(r#""type":"pong""#) {
        let n = timeout(DEADLINE, s.read(&mut chunk))
            .await
            .expect("no pong")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
}
