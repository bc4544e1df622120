//! Test harness: starts the real daemon in-process on port 0 and gives real clients for it.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use wsgate::state::Gateway;
use wsgate::{Config, Daemon, DrainReport, Listeners};

/// Every wait in the tests is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestServer {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub daemon: Arc<Daemon>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<DrainReport>>,
}

/// Starts a daemon on `config_text` (TOML) with both listeners on 127.0.0.1:0.
pub async fn start(config_text: &str) -> TestServer {
    let config = Config::parse(config_text).expect("test config must be valid");
    start_with(config).await
}

pub async fn start_with(mut config: Config) -> TestServer {
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    let listeners = Listeners::bind(&config).await.expect("bind");
    let public = listeners.public_addr();
    let admin = listeners.admin_addr();
    let daemon = Arc::new(Daemon::new(config));
    let gateway = Arc::clone(daemon.gateway());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let d = Arc::clone(&daemon);
    let handle = tokio::spawn(async move { d.run(listeners, token.cancelled_owned()).await });
    TestServer {
        public,
        admin,
        gateway,
        daemon,
        shutdown,
        handle: Some(handle),
    }
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    /// Connects a client and reads its `connection_established`.
    pub async fn client(&self) -> (Ws, Value) {
        let (mut ws, _) = timeout(DEADLINE, tokio_tungstenite::connect_async(self.ws_url()))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        let hello = recv_json(&mut ws).await;
        assert_eq!(hello["type"], "connection_established", "{hello}");
        (ws, hello)
    }

    /// Publishes `body` (JSON text) on the admin listener.
    pub async fn publish(&self, body: &str) -> (StatusCode, Value) {
        let (status, _, bytes) = http(
            self.admin,
            Method::POST,
            "/publish",
            &[],
            body.as_bytes().to_vec(),
        )
        .await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn get_json(&self, addr: SocketAddr, path: &str) -> (StatusCode, Value) {
        let (status, _, bytes) = http(addr, Method::GET, path, &[], vec![]).await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn status(&self) -> Value {
        let (code, v) = self.get_json(self.admin, "/status?limit=1000").await;
        assert_eq!(code, StatusCode::OK, "{v}");
        v
    }

    /// Waits until `cond(status)` holds, polling `/status`.
    pub async fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let s = self.status().await;
            if cond(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last status: {s}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the drain and waits for the daemon to stop.
    pub async fn stop(mut self) -> DrainReport {
        self.shutdown.cancel();
        let handle = self.handle.take().unwrap();
        timeout(Duration::from_secs(30), handle)
            .await
            .expect("daemon did not stop")
            .expect("daemon task panicked")
    }

    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn wait_stopped(mut self) -> DrainReport {
        let handle = self.handle.take().unwrap();
        timeout(Duration::from_secs(30), handle)
            .await
            .expect("daemon did not stop")
            .expect("daemon task panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads the next text message as JSON, skipping control frames; panics after `DEADLINE`.
pub async fn recv_json(ws: &mut Ws) -> Value {
    loop {
        let msg = timeout(DEADLINE, ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("connection ended")
            .expect("read error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent invalid JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message: {other:?}"),
        }
    }
}

/// Sends a text message.
pub async fn send(ws: &mut Ws, text: &str) {
    timeout(DEADLINE, ws.send(Message::Text(text.into())))
        .await
        .expect("send timed out")
        .expect("send failed");
}

/// Sends `text` and returns the reply.
pub async fn request(ws: &mut Ws, text: &str) -> Value {
    send(ws, text).await;
    recv_json(ws).await
}

/// Reads until the server closes; returns the close code and reason (None: no close frame).
pub async fn expect_close(ws: &mut Ws) -> Option<(u16, String)> {
    loop {
        match timeout(DEADLINE, ws.next())
            .await
            .expect("timed out waiting for close")
        {
            Some(Ok(Message::Close(frame))) => {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// One HTTP/1.1 request over a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, hyper::HeaderMap, Bytes) {
    let fut = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let resp = sender.send_request(req).await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, headers, bytes)
    };
    timeout(DEADLINE, fut).await.expect("http request timed out")
}
