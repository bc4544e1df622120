//! The floor server: the least work a fan-out server can do, as a lower bound on CPU per
//! delivery. One thread (current-thread tokio runtime, i.e. one epoll loop), hand-made
//! handshake, and for each publish ONE pre-framed text frame written with one non-blocking
//! `write` per subscriber. Only what cannot be written at once is buffered (per connection) and
//! flushed by that connection's task when the socket is writable again.
//!
//! It speaks just enough of wsgate's protocol for the same generator to drive it:
//! - `GET /ws` upgrade, then `{"type":"subscribe","events":[...]}` -> `subscription_confirmed`;
//!   `GET /sub/<topic>` subscribes by path (Nchan style);
//! - `POST /publish` with `{"event_type":..,"message":{..}}` or an array of them ->
//!   `{"delivered":N}` / `{"delivered":[..]}`; subscribers get the message object with
//!   `event_type` and `timestamp` added, as from wsgate. The events of a batch that go to one topic
//!   are one publish: their frames are written to each subscriber with one write.
//!   `POST /pub/<topic>` sends the body as is.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::SystemTime;

use serde_json::Value;
use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::ws::{self, Reader};

/// Bytes a subscriber may have waiting before it is dropped as a slow consumer.
const MAX_PENDING: usize = 4 * 1024 * 1024;
const MAX_BODY: usize = 1024 * 1024;

struct Sub {
    id: u64,
    stream: TcpStream,
    /// Bytes not yet written (empty almost always).
    pending: RefCell<Vec<u8>>,
    wake: Notify,
    dead: Cell<bool>,
}

impl Sub {
    /// One non-blocking write; only a remainder is buffered. Returns false if the subscriber is gone.
    fn send(&self, frame: &[u8]) -> bool {
        if self.dead.get() {
            return false;
        }
        let mut p = self.pending.borrow_mut();
        if !p.is_empty() {
            if p.len() + frame.len() > MAX_PENDING {
                self.dead.set(true);
                self.wake.notify_one();
                return false;
            }
            p.extend_from_slice(frame);
            return true;
        }
        // A plain `send(2)` on the borrowed descriptor, as wsgate's direct path does (tokio's
        // readiness bookkeeping buys nothing for a write that never waits); `flush` below goes
        // through tokio, so a full socket is still waited for properly.
        match SockRef::from(&self.stream).send(frame) {
            Ok(n) if n == frame.len() => return true,
            Ok(n) => p.extend_from_slice(&frame[n..]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => p.extend_from_slice(frame),
            Err(_) => {
                self.dead.set(true);
                self.wake.notify_one();
                return false;
            }
        }
        self.wake.notify_one();
        true
    }

    async fn flush(&self) -> io::Result<()> {
        loop {
            {
                let mut p = self.pending.borrow_mut();
                if p.is_empty() {
                    return Ok(());
                }
                match self.stream.try_write(&p) {
                    Ok(n) => {
                        p.drain(..n);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            self.stream.writable().await?;
        }
    }
}

#[derive(Default)]
struct State {
    topics: RefCell<HashMap<String, Vec<Rc<Sub>>>>,
    next_id: Cell<u64>,
}

impl State {
    fn subscribe(&self, topic: &str, sub: &Rc<Sub>) {
        let mut t = self.topics.borrow_mut();
        let list = t.entry(topic.to_owned()).or_default();
        if !list.iter().any(|s| s.id == sub.id) {
            list.push(Rc::clone(sub));
        }
    }

    fn remove(&self, id: u64, topics: &[String]) {
        let mut t = self.topics.borrow_mut();
        for name in topics {
            if let Some(list) = t.get_mut(name) {
                list.retain(|s| s.id != id);
                if list.is_empty() {
                    t.remove(name);
                }
            }
        }
    }

    /// Frames `payload` once and writes it to every subscriber of `topic`.
    fn publish(&self, topic: &str, payload: &[u8], frame: &mut Vec<u8>) -> usize {
        frame.clear();
        ws::server_frame(frame, ws::OP_TEXT, payload);
        self.fan_out(topic, frame)
    }

    /// One non-blocking write of `bytes` (one or more whole frames) per subscriber of `topic`.
    fn fan_out(&self, topic: &str, bytes: &[u8]) -> usize {
        let t = self.topics.borrow();
        let Some(list) = t.get(topic) else {
            return 0;
        };
        list.iter().filter(|s| s.send(bytes)).count()
    }
}

pub fn serve(listen: SocketAddr, admin: SocketAddr) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let st = Rc::new(State::default());
        let ws_l = TcpListener::bind(listen).await?;
        let admin_l = TcpListener::bind(admin).await?;
        eprintln!("floor: ws on {listen}, publish on {admin}");
        let st2 = Rc::clone(&st);
        tokio::task::spawn_local(async move {
            loop {
                match admin_l.accept().await {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        tokio::task::spawn_local(admin_conn(Rc::clone(&st2), s));
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        });
        loop {
            match ws_l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::task::spawn_local(ws_conn(Rc::clone(&st), s));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
}

async fn ws_conn(st: Rc<State>, mut stream: TcpStream) {
    let mut rd = Reader::new(1024);
    // The upgrade request.
    let end = loop {
        if let Some(e) = ws::head_end(rd.pending()) {
            break e;
        }
        if rd.end > 16 * 1024 {
            return;
        }
        match rd.fill(&stream).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    };
    let head = &rd.pending()[..end];
    let path = head
        .split(|&c| c == b' ')
        .nth(1)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let Some(key) = ws::header_value(head, "sec-websocket-key").map(<[u8]>::to_vec) else {
        let _ = stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    rd.consume(end);
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        ws::accept_key(&key)
    );
    if stream.write_all(resp.as_bytes()).await.is_err() {
        return;
    }
    let id = st.next_id.get();
    st.next_id.set(id + 1);
    let sub = Rc::new(Sub {
        id,
        stream,
        pending: RefCell::new(Vec::new()),
        wake: Notify::new(),
        dead: Cell::new(false),
    });
    let mut topics: Vec<String> = Vec::new();
    let mut out = Vec::new();
    if let Some(t) = path.strip_prefix("/sub/") {
        topics.push(t.to_owned());
        st.subscribe(t, &sub);
    } else {
        ws::server_frame(&mut out, ws::OP_TEXT, br#"{"type":"connection_established"}"#);
        sub.send(&out);
    }
    'conn: loop {
        tokio::select! {
            r = rd.fill(&sub.stream) => {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                loop {
                    if rd.pending().len() >= 2 && !ws::first_frame_masked(&rd) {
                        break 'conn; // clients must mask
                    }
                    let f = match rd.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => break 'conn,
                    };
                    match f.op {
                        ws::OP_TEXT => {
                            let v: Value = serde_json::from_slice(rd.payload(&f)).unwrap_or(Value::Null);
                            if v["type"] == "subscribe" {
                                let events: Vec<String> = v["events"]
                                    .as_array()
                                    .map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect())
                                    .unwrap_or_default();
                                for e in &events {
                                    st.subscribe(e, &sub);
                                    if !topics.contains(e) {
                                        topics.push(e.clone());
                                    }
                                }
                                let reply = serde_json::json!({"type": "subscription_confirmed", "events": events});
                                out.clear();
                                ws::server_frame(&mut out, ws::OP_TEXT, reply.to_string().as_bytes());
                                sub.send(&out);
                            }
                        }
                        ws::OP_PING => {
                            out.clear();
                            let p = rd.payload(&f).to_vec();
                            ws::server_frame(&mut out, ws::OP_PONG, &p);
                            sub.send(&out);
                        }
                        ws::OP_CLOSE => {
                            out.clear();
                            ws::server_frame(&mut out, ws::OP_CLOSE, &[0x03, 0xe8]);
                            sub.send(&out);
                            let _ = sub.flush().await;
                            break 'conn;
                        }
                        _ => {}
                    }
                }
            }
            () = sub.wake.notified() => {
                if sub.dead.get() || sub.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    sub.dead.set(true);
    st.remove(id, &topics);
}

fn http_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One event of a publish body: its topic and the message with event_type and timestamp added.
fn prepare_event(item: Value, stamp: &str) -> Result<(String, Vec<u8>), &'static str> {
    let Value::Object(mut obj) = item else {
        return Err("each event must be an object");
    };
    let Some(Value::String(topic)) = obj.remove("event_type") else {
        return Err("event_type is required");
    };
    let Some(Value::Object(mut msg)) = obj.remove("message") else {
        return Err("message must be an object");
    };
    msg.insert("event_type".to_owned(), Value::String(topic.clone()));
    msg.insert("timestamp".to_owned(), Value::String(stamp.to_owned()));
    let payload = serde_json::to_vec(&Value::Object(msg)).map_err(|_| "encode")?;
    Ok((topic, payload))
}

/// Publishes a batch: the frames of all its events for one topic are written to each of that
/// topic's subscribers with ONE write (a batch is one publish). Returns the count per event.
fn publish_batch(st: &State, events: Vec<(String, Vec<u8>)>, frame: &mut Vec<u8>) -> Vec<usize> {
    let mut counts = vec![0; events.len()];
    let mut done = vec![false; events.len()];
    for i in 0..events.len() {
        if done[i] {
            continue;
        }
        frame.clear();
        let mut members = Vec::new();
        for j in i..events.len() {
            if !done[j] && events[j].0 == events[i].0 {
                ws::server_frame(frame, ws::OP_TEXT, &events[j].1);
                done[j] = true;
                members.push(j);
            }
        }
        let n = st.fan_out(&events[i].0, frame);
        for j in members {
            counts[j] = n;
        }
    }
    counts
}

async fn admin_conn(st: Rc<State>, mut stream: TcpStream) {
    let mut rd = Reader::new(8192);
    let mut frame = Vec::with_capacity(1024);
    loop {
        let end = loop {
            if let Some(e) = ws::head_end(rd.pending()) {
                break e;
            }
            if rd.pending().len() > 16 * 1024 {
                return;
            }
            match rd.fill(&stream).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let head = &rd.pending()[..end];
        let mut parts = head.split(|&c| c == b' ');
        let method = parts.next().unwrap_or_default().to_vec();
        let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let len = ws::header_value(head, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if len > MAX_BODY {
            let _ = stream
                .write_all(&http_response("413 Payload Too Large", "{}"))
                .await;
            return;
        }
        rd.consume(end);
        while rd.pending().len() < len {
            match rd.fill(&stream).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let body = &rd.pending()[..len];
        let resp = if method != b"POST" {
            http_response("404 Not Found", r#"{"error":"not found"}"#)
        } else if let Some(topic) = path.strip_prefix("/pub/") {
            let n = st.publish(topic, body, &mut frame);
            http_response("200 OK", &format!(r#"{{"delivered":{n}}}"#))
        } else if path == "/publish" {
            let stamp = ws::rfc3339_millis(SystemTime::now());
            match serde_json::from_slice::<Value>(body) {
                Ok(Value::Array(items)) => {
                    // All or nothing, like wsgate: validate every event before sending any.
                    match items
                        .into_iter()
                        .map(|i| prepare_event(i, &stamp))
                        .collect::<Result<Vec<_>, _>>()
                    {
                        Ok(events) => {
                            let counts: Vec<String> = publish_batch(&st, events, &mut frame)
                                .iter()
                                .map(usize::to_string)
                                .collect();
                            http_response("200 OK", &format!(r#"{{"delivered":[{}]}}"#, counts.join(",")))
                        }
                        Err(e) => http_response("400 Bad Request", &format!(r#"{{"error":"{e}"}}"#)),
                    }
                }
                Ok(single) => match prepare_event(single, &stamp) {
                    Ok((topic, payload)) => {
                        let n = st.publish(&topic, &payload, &mut frame);
                        http_response("200 OK", &format!(r#"{{"delivered":{n}}}"#))
                    }
                    Err(e) => http_response("400 Bad Request", &format!(r#"{{"error":"{e}"}}"#)),
                },
                Err(_) => http_response("400 Bad Request", r#"{"error":"invalid JSON"}"#),
            }
        } else {
            http_response("404 Not Found", r#"{"error":"not found"}"#)
        };
        rd.consume(len);
        if stream.write_all(&resp).await.is_err() {
            return;
        }
    }
}
