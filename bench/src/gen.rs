//! The load generator: N subscriber connections over T topics, publishers at a fixed rate or as
//! fast as accepted, and a verdict that counts every event per connection.
//!
//! Single-threaded on purpose (a current-thread runtime, meant to be pinned to one core with
//! `taskset`): its own CPU% then says plainly when it, not the server, was the bottleneck.
//!
//! Honesty rules the code keeps:
//! - every published event carries a per-topic sequence number, the publisher's send time
//!   (unix ns) and its topic index; each connection checks topic and order and counts events;
//! - "expected" is computed from what the publishers had accepted (2xx) and from the connections
//!   that completed their subscription, never from what the server says it delivered (that is
//!   only cross-checked, as `delivered_mismatch`);
//! - every loop is bounded in count and in time.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::{sleep, sleep_until, timeout};

use crate::ws::{self, Reader};

/// Initial per-connection read buffer (grows if a frame does not fit).
const RECV_BUF: usize = 4096;
/// Attempts to open one subscriber connection before it counts as failed.
const CONNECT_ATTEMPTS: u32 = 3;
/// Error messages kept for the report (all errors are counted).
const KEPT_ERRORS: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    Wsgate,
    Floor,
    Nchan,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        match s {
            "wsgate" => Some(Target::Wsgate),
            "floor" => Some(Target::Floor),
            "nchan" => Some(Target::Nchan),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Target::Wsgate => "wsgate",
            Target::Floor => "floor",
            Target::Nchan => "nchan",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub target: Target,
    /// Scenario label and repetition number, copied into the result line.
    pub scenario: String,
    pub run: u32,
    /// WebSocket listener and publish endpoint (same address for Nchan).
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    /// The process whose CPU and RSS are measured (Nchan: the worker).
    pub server_pid: Option<u32>,
    pub conns: usize,
    pub topics: usize,
    /// Events to publish in all (fixed-rate mode); a cap in as-fast-as-possible mode.
    pub events: u64,
    /// Events per second in all; 0 = as fast as accepted.
    pub rate: f64,
    /// Publishing window in seconds (fixed rate: events/rate is used if shorter).
    pub secs: f64,
    /// Events per publish request (one topic per request).
    pub batch: usize,
    pub publishers: usize,
    /// Padding bytes in each event (the event is about 90 bytes + this on the wire).
    pub payload: usize,
    /// Idle time after the last subscription before RSS is read.
    pub settle: f64,
    /// As-fast-as-possible mode: at most `window` undelivered events per connection on average
    /// (keeps the server's per-connection queues from overflowing when the generator is slower).
    pub window: u64,
    /// How long to wait for outstanding deliveries after the last publish.
    pub drain: f64,
    /// Source addresses 127.0.0.1 ..= 127.0.0.<src_addrs>.
    pub src_addrs: u8,
    pub connect_concurrency: usize,
    /// How long to wait for the server to listen.
    pub ready_timeout: f64,
    pub connect_timeout: f64,
}

/// State all tasks of the (single-threaded) generator share.
struct Shared {
    received: Cell<u64>,
    errors: Cell<u64>,
    kept_errors: RefCell<Vec<String>>,
    closed: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    last_recv_ns: Cell<u64>,
    /// Per connection: the next sequence number it must see.
    next_seq: Vec<Cell<u64>>,
    ready: Cell<usize>,
    failed: Cell<usize>,
    /// Per topic: subscribers that completed their subscription.
    subs: Vec<Cell<u64>>,
    /// Per topic: events the server accepted (2xx).
    published: Vec<Cell<u64>>,
    /// Deliveries owed for publishes sent so far (incremented before sending).
    owed: Cell<u64>,
    setup_done: Notify,
    /// Window flow control (as-fast-as-possible mode).
    cap: u64,
    waiting: Cell<bool>,
    progress: Notify,
    pub_errors: Cell<u64>,
    delivered_mismatch: Cell<u64>,
    requests: Cell<u64>,
}

impl Shared {
    fn error(&self, msg: impl FnOnce() -> String) {
        self.errors.set(self.errors.get() + 1);
        let mut kept = self.kept_errors.borrow_mut();
        if kept.len() < KEPT_ERRORS {
            kept.push(msg());
        }
    }
    fn outstanding(&self) -> u64 {
        self.owed.get().saturating_sub(self.received.get())
    }
    fn settled(&self) {
        if self.ready.get() + self.failed.get() == self.next_seq.len() {
            self.setup_done.notify_one();
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Lets connect() pick the source port with the full 4-tuple in view, so that 15k connections
/// and the TIME_WAIT sockets of earlier runs do not exhaust one source address's ports.
fn bind_address_no_port(sock: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn topic_name(t: usize) -> String {
    format!("t{t}")
}

async fn expect_text(stream: &TcpStream, rd: &mut Reader, word: &str) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(f) = rd.next_frame().map_err(io::Error::other)? {
            let p = rd.payload(&f);
            if f.op == ws::OP_TEXT && memchr::memmem::find(p, word.as_bytes()).is_some() {
                return Ok(());
            }
            return Err(io::Error::other(format!(
                "expected {word}, got op {} {:?}",
                f.op,
                String::from_utf8_lossy(&p[..p.len().min(200)])
            )));
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("no {word} within 30 s")));
        }
        if rd.fill(stream).await? == 0 {
            return Err(io::Error::other(format!("closed before {word}")));
        }
    }
}

/// Opens one subscriber: TCP from a 127.0.0.x source, the upgrade, and (wsgate protocol) the
/// subscribe exchange. Returns the stream and whatever was read past the last setup frame.
async fn open(o: &Opts, idx: usize, topic: usize) -> io::Result<(TcpStream, Reader)> {
    let src = Ipv4Addr::new(127, 0, 0, 1 + (idx % usize::from(o.src_addrs.max(1))) as u8);
    let sock = TcpSocket::new_v4()?;
    bind_address_no_port(&sock);
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    let mut stream = sock.connect(o.ws).await?;
    stream.set_nodelay(true)?;
    let path = match o.target {
        Target::Nchan => format!("/sub/{}", topic_name(topic)),
        _ => "/ws".to_owned(),
    };
    let key = ws::b64(&((idx as u128) << 64 | 0x5157_4745_4e42_u128).to_le_bytes());
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        o.ws
    );
    stream.write_all(req.as_bytes()).await?;
    let mut rd = Reader::new(RECV_BUF);
    let end = loop {
        if let Some(e) = ws::head_end(rd.pending()) {
            break e;
        }
        if rd.end > 16 * 1024 {
            return Err(io::Error::other("handshake response head too large"));
        }
        if rd.fill(&stream).await? == 0 {
            return Err(io::Error::other("closed during the handshake"));
        }
    };
    let head = &rd.pending()[..end];
    if !head.starts_with(b"HTTP/1.1 101") {
        let line = head.split(|&c| c == b'\r').next().unwrap_or_default();
        return Err(io::Error::other(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(line)
        )));
    }
    if ws::header_value(head, "sec-websocket-accept") != Some(ws::accept_key(key.as_bytes()).as_bytes()) {
        return Err(io::Error::other("wrong Sec-WebSocket-Accept"));
    }
    rd.consume(end);
    if o.target != Target::Nchan {
        expect_text(&stream, &mut rd, "connection_established").await?;
        let msg = format!(r#"{{"type":"subscribe","events":["{}"]}}"#, topic_name(topic));
        let mask = (idx as u32 | 1).to_le_bytes();
        stream
            .write_all(&ws::client_frame(ws::OP_TEXT, msg.as_bytes(), mask))
            .await?;
        expect_text(&stream, &mut rd, "subscription_confirmed").await?;
    }
    Ok((stream, rd))
}

async fn subscriber(sh: Rc<Shared>, o: Rc<Opts>, idx: usize, sem: Rc<Semaphore>) {
    let topic = idx % o.topics;
    let permit = sem.acquire().await;
    let mut attempt = 0;
    let (mut stream, mut rd) = loop {
        attempt += 1;
        let r = match timeout(secs(o.connect_timeout), open(&o, idx, topic)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::other("connect + subscribe timed out")),
        };
        match r {
            Ok(v) => break v,
            Err(e) if attempt >= CONNECT_ATTEMPTS => {
                sh.error(|| format!("conn {idx}: {e}"));
                sh.failed.set(sh.failed.get() + 1);
                sh.settled();
                return;
            }
            Err(_) => sleep(Duration::from_millis(50 * u64::from(attempt))).await,
        }
    };
    drop(permit);
    sh.subs[topic].set(sh.subs[topic].get() + 1);
    sh.ready.set(sh.ready.get() + 1);
    sh.settled();

    let tp = topic as u64;
    let mut now = ws::now_ns();
    loop {
        loop {
            let f = match rd.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    sh.error(|| format!("conn {idx}: bad frame: {e}"));
                    sh.closed.set(sh.closed.get() + 1);
                    return;
                }
            };
            match f.op {
                ws::OP_TEXT if f.fin => {
                    let p = rd.payload(&f);
                    let (seq, ts, t) = (
                        ws::field_u64(p, b"\"seq\":"),
                        ws::field_u64(p, b"\"ts\":"),
                        ws::field_u64(p, b"\"tp\":"),
                    );
                    let (Some(seq), Some(ts), Some(t)) = (seq, ts, t) else {
                        let s = String::from_utf8_lossy(&p[..p.len().min(200)]).into_owned();
                        sh.error(|| format!("conn {idx}: unexpected message {s}"));
                        continue;
                    };
                    if t != tp {
                        sh.error(|| format!("conn {idx}: event of topic {t} on a topic-{tp} subscription"));
                        continue;
                    }
                    let want = sh.next_seq[idx].get();
                    if seq < want {
                        sh.error(|| format!("conn {idx}: seq {seq} again or out of order (want {want})"));
                        continue;
                    }
                    if seq > want {
                        sh.error(|| format!("conn {idx}: seq gap: got {seq}, want {want}"));
                    }
                    sh.next_seq[idx].set(seq + 1);
                    sh.received.set(sh.received.get() + 1);
                    sh.hist
                        .borrow_mut()
                        .saturating_record(now.saturating_sub(ts).max(1));
                    sh.last_recv_ns.set(now);
                }
                ws::OP_PING => {
                    let payload = rd.payload(&f).to_vec();
                    let pong = ws::client_frame(ws::OP_PONG, &payload, [7, 7, 7, 7]);
                    if stream.write_all(&pong).await.is_err() {
                        break;
                    }
                }
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let p = rd.payload(&f);
                    let s = String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned();
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    sh.error(|| format!("conn {idx}: server closed with {code} {s:?}"));
                    sh.closed.set(sh.closed.get() + 1);
                    return;
                }
                op => sh.error(|| format!("conn {idx}: unexpected frame op {op} fin {}", f.fin)),
            }
        }
        if sh.waiting.get() && sh.outstanding() <= sh.cap / 2 {
            sh.waiting.set(false);
            sh.progress.notify_waiters();
        }
        match rd.fill(&stream).await {
            Ok(0) | Err(_) => {
                sh.error(|| format!("conn {idx}: connection lost"));
                sh.closed.set(sh.closed.get() + 1);
                return;
            }
            Ok(_) => now = ws::now_ns(),
        }
    }
}

/// A keep-alive HTTP/1.1 client connection, one request at a time.
struct HttpConn {
    s: TcpStream,
    rd: Reader,
    out: Vec<u8>,
    addr: SocketAddr,
    host: String,
    /// The last response said `Connection: close` (nginx does so every `keepalive_requests`):
    /// open a new connection before the next request.
    reopen: bool,
}

impl HttpConn {
    async fn connect(addr: SocketAddr) -> io::Result<HttpConn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(HttpConn {
            s,
            rd: Reader::new(4096),
            out: Vec::with_capacity(4096),
            addr,
            host: addr.to_string(),
            reopen: false,
        })
    }

    async fn post(&mut self, path: &str, body: &[u8], accept: &str) -> io::Result<(u16, Vec<u8>)> {
        if self.reopen {
            *self = HttpConn::connect(self.addr).await?;
        }
        self.out.clear();
        write!(
            self.out,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: {accept}\r\n\
             Content-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )?;
        self.out.extend_from_slice(body);
        self.s.write_all(&self.out).await?;
        let head = loop {
            if let Some(e) = ws::head_end(self.rd.pending()) {
                break e;
            }
            if self.rd.fill(&self.s).await? == 0 {
                return Err(io::Error::other("publish connection closed"));
            }
        };
        let h = &self.rd.pending()[..head];
        let status = h
            .get(9..12)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| io::Error::other("bad status line"))?;
        self.reopen = ws::header_value(h, "connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        let chunked =
            ws::header_value(h, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
        let len = ws::header_value(h, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<usize>().ok());
        self.rd.consume(head);
        let mut body = Vec::new();
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = memchr::memmem::find(self.rd.pending(), b"\r\n") {
                        break i;
                    }
                    if self.rd.fill(&self.s).await? == 0 {
                        return Err(io::Error::other("closed in a chunked body"));
                    }
                };
                let size_text = String::from_utf8_lossy(&self.rd.pending()[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::other("bad chunk size"))?;
                self.rd.consume(line_end + 2);
                while self.rd.pending().len() < size + 2 {
                    if self.rd.fill(&self.s).await? == 0 {
                        return Err(io::Error::other("closed in a chunk"));
                    }
                }
                body.extend_from_slice(&self.rd.pending()[..size]);
                self.rd.consume(size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let len = len.unwrap_or(0);
            while self.rd.pending().len() < len {
                if self.rd.fill(&self.s).await? == 0 {
                    return Err(io::Error::other("closed in a body"));
                }
            }
            body.extend_from_slice(&self.rd.pending()[..len]);
            self.rd.consume(len);
        }
        Ok((status, body))
    }
}

/// Appends one event object: sequence, send time, topic index, padding; for Nchan also the
/// two fields wsgate adds, so that every server delivers frames of the same size.
fn event_json(out: &mut Vec<u8>, o: &Opts, seq: u64, ts: u64, tp: usize, pad: &str, stamp: &str) {
    let _ = write!(out, r#"{{"seq":{seq},"ts":{ts},"tp":{tp},"pad":"{pad}""#);
    if o.target == Target::Nchan {
        let _ = write!(out, r#","event_type":"t{tp}","timestamp":"{stamp}""#);
    }
    out.push(b'}');
}

/// The numbers in `"delivered":[a,b,...]` or `"delivered":n`.
fn delivered_counts(body: &[u8]) -> Vec<u64> {
    let Some(i) = memchr::memmem::find(body, b"\"delivered\":") else {
        return Vec::new();
    };
    let rest = &body[i + 12..];
    let end = rest.iter().position(|&c| c == b'}').unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

struct Plan {
    t0: Instant,
    deadline: Instant,
    /// Seconds between two publish requests (all publishers together); 0 = as fast as accepted.
    interval: f64,
    /// Publish requests in all (fixed rate), or a cap.
    requests: u64,
}

async fn publisher(sh: Rc<Shared>, o: Rc<Opts>, p: usize, plan: Rc<Plan>) {
    let np = o.publishers.max(1);
    let mine: Vec<usize> = (0..o.topics).filter(|t| t % np == p).collect();
    if mine.is_empty() {
        return;
    }
    let mut conn = match HttpConn::connect(o.admin).await {
        Ok(c) => c,
        Err(e) => {
            sh.pub_errors.set(sh.pub_errors.get() + 1);
            sh.error(|| format!("publisher {p}: {e}"));
            return;
        }
    };
    let pad = "x".repeat(o.payload);
    let stamp = ws::rfc3339_millis(SystemTime::now());
    let mut seq = vec![0u64; o.topics];
    let mut body = Vec::with_capacity(256 * o.batch.max(1));
    let mut i: u64 = 0;
    let mut k = p as u64; // global request index (fixed rate)
    loop {
        if k >= plan.requests || Instant::now() >= plan.deadline {
            break;
        }
        if plan.interval > 0.0 {
            sleep_until((plan.t0 + secs(k as f64 * plan.interval)).into()).await;
        } else if sh.cap > 0 {
            while sh.outstanding() > sh.cap && Instant::now() < plan.deadline {
                sh.waiting.set(true);
                let _ = timeout(Duration::from_millis(100), sh.progress.notified()).await;
            }
        }
        if Instant::now() >= plan.deadline {
            break;
        }
        let t = mine[(i % mine.len() as u64) as usize];
        let n = o.batch.max(1) as u64;
        let subs = sh.subs[t].get();
        sh.owed.set(sh.owed.get() + n * subs);
        let ok = if o.target == Target::Nchan {
            // Nchan has no batch endpoint: a batch is n requests on the keep-alive connection.
            let path = format!("/pub/{}", topic_name(t));
            let mut ok = true;
            for j in 0..n {
                body.clear();
                event_json(&mut body, &o, seq[t] + j, ws::now_ns(), t, &pad, &stamp);
                sh.requests.set(sh.requests.get() + 1);
                match conn.post(&path, &body, "text/json").await {
                    Ok((200..=299, resp)) => {
                        if ws::field_u64(&resp, b"\"subscribers\":") != Some(subs) {
                            sh.delivered_mismatch.set(sh.delivered_mismatch.get() + 1);
                        }
                        sh.published[t].set(sh.published[t].get() + 1);
                    }
                    r => {
                        let r = format!("{r:?}");
                        sh.error(|| format!("publisher {p}: {}", &r[..r.len().min(300)]));
                        ok = false;
                        break;
                    }
                }
            }
            ok
        } else {
            body.clear();
            let ts = ws::now_ns();
            if o.batch > 1 {
                body.push(b'[');
            }
            for j in 0..n {
                if j > 0 {
                    body.push(b',');
                }
                let _ = write!(body, r#"{{"event_type":"{}","message":"#, topic_name(t));
                event_json(&mut body, &o, seq[t] + j, ts, t, &pad, &stamp);
                body.push(b'}');
            }
            if o.batch > 1 {
                body.push(b']');
            }
            sh.requests.set(sh.requests.get() + 1);
            match conn.post("/publish", &body, "application/json").await {
                Ok((200, resp)) => {
                    let counts = delivered_counts(&resp);
                    if counts.len() as u64 != n || counts.iter().any(|&c| c != subs) {
                        sh.delivered_mismatch.set(sh.delivered_mismatch.get() + 1);
                    }
                    sh.published[t].set(sh.published[t].get() + n);
                    true
                }
                r => {
                    let r = format!("{r:?}");
                    sh.error(|| format!("publisher {p}: {}", &r[..r.len().min(300)]));
                    false
                }
            }
        };
        if !ok {
            sh.pub_errors.set(sh.pub_errors.get() + 1);
            return;
        }
        seq[t] += n;
        i += 1;
        k += np as u64;
    }
}

async fn wait_listening(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        sleep(Duration::from_millis(50)).await;
    }
    false
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 1000.0 * 10.0).round() / 10.0
}

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

/// Runs one measurement; prints one JSON line on stdout (and a summary on stderr).
/// Returns the process exit code: 0 when every expected event arrived in order, 3 otherwise.
pub fn run(o: Opts) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run_async(o))
}

async fn run_async(o: Opts) -> i32 {
    let o = Rc::new(o);
    let topics = o.topics.max(1);
    if !wait_listening(o.ws, secs(o.ready_timeout)).await
        || !wait_listening(o.admin, secs(o.ready_timeout)).await
    {
        eprintln!(
            "server not listening on {} / {} within {} s",
            o.ws, o.admin, o.ready_timeout
        );
        return 4;
    }
    let fast = o.rate <= 0.0;
    let sh = Rc::new(Shared {
        received: Cell::new(0),
        errors: Cell::new(0),
        kept_errors: RefCell::new(Vec::new()),
        closed: Cell::new(0),
        hist: RefCell::new(Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram")),
        last_recv_ns: Cell::new(0),
        next_seq: (0..o.conns).map(|_| Cell::new(0)).collect(),
        ready: Cell::new(0),
        failed: Cell::new(0),
        subs: (0..topics).map(|_| Cell::new(0)).collect(),
        published: (0..topics).map(|_| Cell::new(0)).collect(),
        owed: Cell::new(0),
        setup_done: Notify::new(),
        cap: if fast { o.window * o.conns as u64 } else { 0 },
        waiting: Cell::new(false),
        progress: Notify::new(),
        pub_errors: Cell::new(0),
        delivered_mismatch: Cell::new(0),
        requests: Cell::new(0),
    });
    let pid = o.server_pid;
    let rss = || pid.and_then(|p| ws::vm_rss_kib(p).ok());
    let rss_base = rss();

    // Connect and subscribe.
    let t_conn = Instant::now();
    if o.conns > 0 {
        let sem = Rc::new(Semaphore::new(o.connect_concurrency.max(1)));
        for idx in 0..o.conns {
            tokio::task::spawn_local(subscriber(Rc::clone(&sh), Rc::clone(&o), idx, Rc::clone(&sem)));
        }
        let phase = secs(60.0 + o.conns as f64 / 50.0);
        if timeout(phase, sh.setup_done.notified()).await.is_err() {
            sh.error(|| format!("connect phase not done within {phase:?}"));
        }
    }
    let connect_s = t_conn.elapsed().as_secs_f64();
    eprintln!(
        "[{} {} #{}] {} of {} connections subscribed in {:.2} s ({} failed)",
        o.scenario,
        o.target.name(),
        o.run,
        sh.ready.get(),
        o.conns,
        connect_s,
        sh.failed.get()
    );
    sleep(secs(o.settle)).await;
    let rss_conn = rss();

    // Publish.
    let ticks = ws::clock_ticks_per_sec();
    let cpu0 = pid.and_then(|p| ws::cpu_ticks(p).ok());
    let gen0 = ws::self_cpu_ns();
    let mach0 = ws::machine_ticks().ok();
    let t0 = Instant::now();
    let t0_ns = ws::now_ns();
    let batch = o.batch.max(1) as u64;
    let (interval, requests, window) = if fast {
        (0.0, o.events.div_ceil(batch), o.secs)
    } else {
        let requests = o.events.div_ceil(batch);
        let interval = batch as f64 / o.rate;
        // Generous slack for a server that falls behind, still bounded.
        (interval, requests, requests as f64 * interval * 1.5 + 5.0)
    };
    let plan = Rc::new(Plan {
        t0,
        deadline: t0 + secs(window),
        interval,
        requests,
    });
    if o.events > 0 {
        let handles: Vec<_> = (0..o.publishers.max(1))
            .map(|p| tokio::task::spawn_local(publisher(Rc::clone(&sh), Rc::clone(&o), p, Rc::clone(&plan))))
            .collect();
        for h in handles {
            let _ = h.await;
        }
    }
    let pub_s = t0.elapsed().as_secs_f64();
    let published: u64 = sh.published.iter().map(Cell::get).sum();
    let expected: u64 = (0..topics)
        .map(|t| sh.published[t].get() * sh.subs[t].get())
        .sum();

    // Drain: wait until every expected event arrived, bounded.
    let drain_deadline = Instant::now() + secs(o.drain);
    while sh.received.get() < expected && Instant::now() < drain_deadline {
        sleep(Duration::from_millis(2)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let gen1 = ws::self_cpu_ns();
    let cpu1 = pid.and_then(|p| ws::cpu_ticks(p).ok());
    let mach1 = ws::machine_ticks().ok();

    let received = sh.received.get();
    let deliver_s = if received > 0 {
        (sh.last_recv_ns.get().saturating_sub(t0_ns)) as f64 / 1e9
    } else {
        pub_s
    };
    let ratio = if expected > 0 {
        received as f64 / expected as f64
    } else if sh.pub_errors.get() == 0 {
        1.0
    } else {
        0.0
    };
    let ok = received == expected
        && sh.errors.get() == 0
        && sh.pub_errors.get() == 0
        && sh.failed.get() == 0
        && sh.ready.get() == o.conns
        && (o.events == 0 || published > 0);
    let h = sh.hist.borrow();
    let (srv_user_s, srv_sys_s) = match (cpu0, cpu1) {
        (Some(a), Some(b)) => (
            (b.0 - a.0) as f64 / ticks as f64,
            (b.1 - a.1) as f64 / ticks as f64,
        ),
        _ => (f64::NAN, f64::NAN),
    };
    let per = |s: f64, n: u64| {
        if n > 0 {
            round(s * 1e9 / n as f64, 1)
        } else {
            f64::NAN
        }
    };
    let gen_cpu = (gen1.0 + gen1.1 - gen0.0 - gen0.1) as f64 / 1e9;
    // Everything else the machine did meanwhile (other processes, the kernel's own threads), in %
    // of one CPU: a busy neighbour makes throughput and latency figures unreliable.
    let (other_cpu_pct, steal_pct) = match (mach0, mach1) {
        (Some(a), Some(b)) => {
            let busy = (b.0 - a.0) as f64 / ticks as f64;
            let other = busy
                - gen_cpu
                - if srv_user_s.is_finite() {
                    srv_user_s + srv_sys_s
                } else {
                    0.0
                };
            (
                round(other.max(0.0) / wall * 100.0, 1),
                round((b.1 - a.1) as f64 / ticks as f64 / wall * 100.0, 1),
            )
        }
        _ => (f64::NAN, f64::NAN),
    };
    let rss_per_conn = match (rss_base, rss_conn) {
        (Some(a), Some(b)) if o.conns > 0 => Some(round((b as f64 - a as f64) * 1024.0 / o.conns as f64, 0)),
        _ => None,
    };
    let v = json!({
        "scenario": o.scenario,
        "target": o.target.name(),
        "run": o.run,
        "conns": o.conns,
        "topics": o.topics,
        "batch": batch,
        "rate": o.rate,
        "ready": sh.ready.get(),
        "failed_conns": sh.failed.get(),
        "connect_s": round(connect_s, 3),
        "rss_base_kib": rss_base,
        "rss_conn_kib": rss_conn,
        "rss_per_conn_b": rss_per_conn,
        "published": published,
        "requests": sh.requests.get(),
        "pub_errors": sh.pub_errors.get(),
        "delivered_mismatch": sh.delivered_mismatch.get(),
        "expected": expected,
        "received": received,
        "errors": sh.errors.get(),
        "closed": sh.closed.get(),
        "ratio": ratio,
        "ok": ok,
        "pub_s": round(pub_s, 3),
        "deliver_s": round(deliver_s, 3),
        "publishes_per_s": if pub_s > 0.0 { round(published as f64 / pub_s, 1) } else { 0.0 },
        "deliveries_per_s": if deliver_s > 0.0 { round(received as f64 / deliver_s, 1) } else { 0.0 },
        "lat_p50_us": us(h.value_at_quantile(0.5)),
        "lat_p99_us": us(h.value_at_quantile(0.99)),
        "lat_p999_us": us(h.value_at_quantile(0.999)),
        "lat_max_us": us(h.max()),
        "srv_user_s": srv_user_s,
        "srv_sys_s": srv_sys_s,
        "srv_cpu_pct": round((srv_user_s + srv_sys_s) / wall * 100.0, 1),
        "cpu_ns_per_delivery": per(srv_user_s + srv_sys_s, received),
        "user_ns_per_delivery": per(srv_user_s, received),
        "sys_ns_per_delivery": per(srv_sys_s, received),
        "cpu_ns_per_publish": per(srv_user_s + srv_sys_s, published),
        // Without a publish phase there is nothing to compare the generator's CPU with.
        "gen_cpu_pct": if o.events > 0 { round(gen_cpu / wall * 100.0, 1) } else { f64::NAN },
        "other_cpu_pct": other_cpu_pct,
        "steal_pct": steal_pct,
        "wall_s": round(wall, 3),
        "kept_errors": *sh.kept_errors.borrow(),
    });
    // NaN is not JSON: serde_json writes null, which the report treats as "no figure".
    println!("{v}");
    let mut summary = String::new();
    let _ = write!(
        summary,
        "[{} {} #{}] delivered {}/{} ({:.6}) errors {} closed {} pub_errors {} | {:.0} deliveries/s | \
         p50 {} us p99 {} us max {} us | server {:.1} ns/delivery (user {:.1}, sys {:.1}), {:.0}% CPU | \
         generator {:.0}% CPU | others {:.0}% CPU | rss/conn {:?} B",
        o.scenario,
        o.target.name(),
        o.run,
        received,
        expected,
        ratio,
        sh.errors.get(),
        sh.closed.get(),
        sh.pub_errors.get(),
        v["deliveries_per_s"].as_f64().unwrap_or(0.0),
        v["lat_p50_us"],
        v["lat_p99_us"],
        v["lat_max_us"],
        v["cpu_ns_per_delivery"].as_f64().unwrap_or(f64::NAN),
        v["user_ns_per_delivery"].as_f64().unwrap_or(f64::NAN),
        v["sys_ns_per_delivery"].as_f64().unwrap_or(f64::NAN),
        v["srv_cpu_pct"].as_f64().unwrap_or(f64::NAN),
        v["gen_cpu_pct"].as_f64().unwrap_or(f64::NAN),
        other_cpu_pct,
        rss_per_conn
    );
    eprintln!("{summary}");
    for e in sh.kept_errors.borrow().iter() {
        eprintln!("  error: {e}");
    }
    let _ = io::stdout().flush();
    if ok {
        0
    } else {
        3
    }
}
