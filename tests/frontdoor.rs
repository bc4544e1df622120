//! The front door through the real daemon and a real upstream HTTP server: proxying, handshake
//! authorization, the Origin allowlist and trusted proxies.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A backend: echoes requests as JSON, counts streamed upload bytes, never answers `/slow`,
/// and decides `/ws/auth` by the `Cookie` header.
async fn upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let uploaded = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&uploaded);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let counter = Arc::clone(&counter);
                    async move { Ok::<_, Infallible>(backend(req, counter).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, uploaded)
}

type BackendBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn backend(req: Request<Incoming>, uploaded: Arc<AtomicU64>) -> Response<BackendBody> {
    let path = req.uri().path().to_owned();
    let headers: serde_json::Map<String, Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                Value::String(v.to_str().unwrap_or("").to_owned()),
            )
        })
        .collect();
    match path.as_str() {
        "/slow" => std::future::pending().await,
        "/ws/auth" => {
            let cookie = req
                .headers()
                .get("cookie")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match cookie {
                "user=ok" => json_resp(
                    200,
                    json!({"client_id": "u-42", "topics": ["a", "b"], "headers": headers}),
                ),
                "user=plain" => json_resp(200, json!({})),
                "user=slow" => std::future::pending().await,
                _ => json_resp(403, json!({"error": "no"})),
            }
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    n += data.len() as u64;
                    uploaded.store(n, Ordering::Relaxed);
                }
            }
            json_resp(200, json!({"received": n}))
        }
        "/download" => {
            // 64 MiB generated on the fly in 64 KiB chunks.
            let chunk = Bytes::from(vec![b'z'; 64 * 1024]);
            let s = stream::iter((0..1024).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))));
            Response::new(StreamBody::new(s).boxed())
        }
        _ => {
            let method = req.method().to_string();
            let query = req.uri().query().unwrap_or("").to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut resp = json_resp(
                200,
                json!({"method": method, "path": path, "query": query, "headers": headers,
                       "body": String::from_utf8_lossy(&body)}),
            );
            resp.headers_mut().insert("x-backend", "yes".parse().unwrap());
            resp.headers_mut()
                .insert("connection", "keep-alive, x-hop".parse().unwrap());
            resp.headers_mut().insert("x-hop", "secret".parse().unwrap());
            resp
        }
    }
}

fn json_resp(status: u16, v: Value) -> Response<BackendBody> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

async fn start_proxying(extra: &str) -> (TestServer, Arc<AtomicU64>) {
    let (addr, uploaded) = upstream().await;
    let srv = start(&format!(
        "[upstream]\nurl = \"http://{addr}\"\ntimeout = \"1s\"\nconnect_timeout = \"500ms\"\n{extra}"
    ))
    .await;
    (srv, uploaded)
}

#[tokio::test]
async fn get_and_post_pass_through_with_query_body_and_forwarded_headers() {
    let (srv, _) = start_proxying("").await;
    let (code, headers, body) = http(
        srv.public,
        Method::GET,
        "/api/items?x=1&y=two",
        &[("x-custom", "v")],
        vec![],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(headers["x-backend"], "yes");
    assert!(
        !headers.contains_key("x-hop"),
        "hop-by-hop header named by Connection leaked"
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["method"].as_str(), v["path"].as_str(), v["query"].as_str()),
        (Some("GET"), Some("/api/items"), Some("x=1&y=two"))
    );
    let h = &v["headers"];
    assert_eq!(h["x-custom"], "v");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], srv.public.to_string());
    assert!(h["forwarded"].as_str().unwrap().contains("for=127.0.0.1"), "{h}");

    let (code, _, body) = http(
        srv.public,
        Method::POST,
        "/api/create",
        &[("content-type", "text/plain")],
        b"hello upstream".to_vec(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["method"].as_str(), v["body"].as_str()),
        (Some("POST"), Some("hello upstream"))
    );

    let s = srv.status().await;
    assert_eq!(s["metrics"]["total_connections"], 0);
    let (_, _, m) = http(srv.admin, Method::GET, "/metrics", &[], vec![]).await;
    assert!(String::from_utf8_lossy(&m).contains("wsgate_upstream_requests_total{outcome=\"ok\"} 2"));
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504_and_websockets_are_unaffected() {
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let srv = start(&format!(
        "[upstream]\nurl = \"http://{gone}\"\nconnect_timeout = \"500ms\"\n"
    ))
    .await;
    let (code, _, body) = http(srv.public, Method::GET, "/x", &[], vec![]).await;
    assert_eq!(code, StatusCode::BAD_GATEWAY);
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());
    let (mut ws, _) = srv.client().await;
    assert_eq!(request(&mut ws, r#"{"type":"ping"}"#).await["type"], "pong");

    let (srv2, _) = start_proxying("").await;
    let (code, _, body) = http(srv2.public, Method::GET, "/slow", &[], vec![]).await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT);
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());
    let (code, _) = srv2.get_json(srv2.admin, "/health").await;
    assert_eq!(code, StatusCode::OK);
    let (_, _, m) = http(srv2.admin, Method::GET, "/metrics", &[], vec![]).await;
    assert!(String::from_utf8_lossy(&m).contains("wsgate_upstream_requests_total{outcome=\"timeout\"} 1"));
}

/// Peak resident memory of this test process while `f` runs, minus the resident memory before.
async fn rss_growth_during<F: std::future::Future>(f: F) -> (F::Output, u64) {
    let before = wsgate::metrics::resident_memory_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    let p = Arc::clone(&peak);
    let sampler = tokio::spawn(async move {
        loop {
            p.fetch_max(wsgate::metrics::resident_memory_bytes(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let out = f.await;
    sampler.abort();
    (out, peak.load(Ordering::Relaxed).saturating_sub(before))
}

#[tokio::test]
async fn large_bodies_stream_in_bounded_memory() {
    let (srv, uploaded) = start_proxying("").await;
    const TOTAL: u64 = 64 * 1024 * 1024;
    // Upload 64 MiB generated on the fly.
    let ((), growth_up) = rss_growth_during(async {
        let stream = tokio::net::TcpStream::connect(srv.public).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
        let s = stream::iter(
            (0..TOTAL / (64 * 1024)).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
        );
        let req = Request::post("/upload")
            .header("host", "x")
            .body(StreamBody::new(s))
            .unwrap();
        let resp = timeout(Duration::from_secs(60), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["received"], TOTAL);
    })
    .await;
    assert_eq!(uploaded.load(Ordering::Relaxed), TOTAL);
    // Download 64 MiB, counting without keeping it.
    let (n, growth_down) = rss_growth_during(async {
        let stream = tokio::net::TcpStream::connect(srv.public).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/download")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = timeout(Duration::from_secs(60), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(f) = timeout(Duration::from_secs(10), body.frame()).await.unwrap() {
            if let Ok(d) = f.unwrap().into_data() {
                n += d.len() as u64;
            }
        }
        n
    })
    .await;
    assert_eq!(n, TOTAL);
    // Buffering a whole body would add 64 MiB; streaming adds socket and channel buffers.
    assert!(growth_up < 32 << 20, "upload grew RSS by {} MiB", growth_up >> 20);
    assert!(
        growth_down < 32 << 20,
        "download grew RSS by {} MiB",
        growth_down >> 20
    );
}

async fn ws_with_headers(srv: &TestServer, headers: &[(&str, &str)]) -> Result<(Ws, Value), (u16, Value)> {
    let mut req = srv.ws_url().into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match timeout(DEADLINE, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
    {
        Ok((mut ws, _)) => {
            let hello = recv_json(&mut ws).await;
            Ok((ws, hello))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

#[tokio::test]
async fn backend_authorizes_handshakes() {
    let (srv, _) = start_proxying("auth_path = \"/ws/auth\"\nauth_timeout = \"500ms\"\n").await;
    // 200 with client_id and topics.
    let (mut ws, hello) = ws_with_headers(&srv, &[("cookie", "user=ok")]).await.unwrap();
    assert_eq!(hello["client_id"], "u-42");
    let r = request(&mut ws, r#"{"type":"subscribe","events":["a","c"]}"#).await;
    assert_eq!(
        r["message"], "Invalid event type: c",
        "topics outside the grant are refused"
    );
    let r = request(&mut ws, r#"{"type":"subscribe","events":["a","b"]}"#).await;
    assert_eq!(r["type"], "subscription_confirmed");
    // 200 with no restriction.
    let (mut ws2, hello2) = ws_with_headers(&srv, &[("cookie", "user=plain")]).await.unwrap();
    assert_ne!(hello2["client_id"], "u-42");
    assert_eq!(
        request(&mut ws2, r#"{"type":"subscribe","events":["anything"]}"#).await["type"],
        "subscription_confirmed"
    );
    // 403 passes through.
    let (code, body) = ws_with_headers(&srv, &[("cookie", "user=bad")])
        .await
        .unwrap_err();
    assert_eq!(code, 403);
    assert!(body["error"].is_string());
    // A slow auth backend: 503, existing connections untouched.
    let (code, body) = ws_with_headers(&srv, &[("cookie", "user=slow")])
        .await
        .unwrap_err();
    assert_eq!(code, 503);
    assert!(body["error"].is_string());
    assert_eq!(request(&mut ws, r#"{"type":"ping"}"#).await["type"], "pong");
    let s = srv.status().await;
    assert_eq!(s["metrics"]["rejected_connections"]["auth"], 1);
    assert_eq!(s["metrics"]["rejected_connections"]["auth_unavailable"], 1);
    // Refused handshakes hold no slot.
    assert_eq!(s["metrics"]["total_connections"], 2);
}

#[tokio::test]
async fn origin_allowlist_through_the_daemon() {
    let srv = start(
        "[server]\nallowed_origins = [\"https://app.example.com\", \"https://*.example.org\"]\n\
         [limits]\nmax_connections_per_ip = 50\n",
    )
    .await;
    for (origin, ok) in [
        (Some("https://app.example.com"), true),
        (Some("HTTPS://APP.EXAMPLE.COM"), true),
        (Some("https://a.example.org"), true),
        (Some("https://example.org"), false),
        (Some("https://evilexample.org"), false),
        (Some("https://app.example.com.evil.net"), false),
        (Some("http://app.example.com"), false),
        (Some("https://app.example.com:8443"), false),
        (Some("null"), false),
        (None, true),
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
        let result = ws_with_headers(&srv, &headers).await;
        match (result, ok) {
            (Ok(_), true) => {}
            (Err((403, body)), false) => assert!(body["error"].is_string()),
            (r, _) => panic!(
                "origin {origin:?}: expected ok={ok}, got {:?}",
                r.map(|_| ()).map_err(|e| e.0)
            ),
        }
    }
    let s = srv.status().await;
    assert_eq!(s["metrics"]["rejected_connections"]["origin"], 6);
}

async fn ws_from(srv: &TestServer, local: &str, xff: &str) -> Result<(Ws, Value), u16> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(srv.public).await.unwrap();
    let mut req = srv.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("x-forwarded-for", xff.parse().unwrap());
    match tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await {
        Ok((mut ws, _)) => {
            let hello = recv_json(&mut ws).await;
            Ok((ws, hello))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected {e}"),
    }
}

#[tokio::test]
async fn trusted_proxies_decide_whose_forwarded_for_counts() {
    let srv =
        start("[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[limits]\nmax_connections_per_ip = 2\n").await;
    let mut keep = Vec::new();
    // Through the trusted proxy (127.0.0.1): the client is the forwarded address.
    let (mut ws, _) = ws_from(&srv, "127.0.0.1", "198.51.100.9, 203.0.113.7")
        .await
        .unwrap();
    let r = request(&mut ws, r#"{"type":"get_status"}"#).await;
    assert_eq!(r["connection_info"]["client_ip"], "203.0.113.7");
    keep.push(ws);
    keep.push(ws_from(&srv, "127.0.0.1", "203.0.113.7").await.unwrap().0);
    assert_eq!(ws_from(&srv, "127.0.0.1", "203.0.113.7").await.unwrap_err(), 429);
    // Another forwarded client through the same proxy still gets in.
    keep.push(ws_from(&srv, "127.0.0.1", "203.0.113.8").await.unwrap().0);
    // An untrusted peer's header is ignored: spoofing new addresses does not dodge its limit.
    keep.push(ws_from(&srv, "127.0.0.2", "192.0.2.1").await.unwrap().0);
    keep.push(ws_from(&srv, "127.0.0.2", "192.0.2.2").await.unwrap().0);
    assert_eq!(ws_from(&srv, "127.0.0.2", "192.0.2.3").await.unwrap_err(), 429);
    let s = srv.status().await;
    assert_eq!(
        s["metrics"]["connections_by_ip"],
        json!({"127.0.0.2": 2, "203.0.113.7": 2, "203.0.113.8": 1})
    );
}

#[tokio::test]
async fn upgrades_on_other_paths_are_not_proxied() {
    let (srv, _) = start_proxying("").await;
    let mut req = format!("ws://{}/other", srv.public)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-test", "1".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
}
