//! The `wsgate` binary itself: command line, exit codes, signals (drain, reload), logs, and the
//! accept loop surviving file-descriptor exhaustion.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::time::{timeout, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// A running `wsgate` process with its stderr (the log) captured line by line.
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    public: SocketAddr,
    admin: SocketAddr,
}

impl Proc {
    /// Starts `wsgate --config path` (through `sh -c` with `prefix` when given, e.g. a ulimit)
    /// and waits for its "listening" line to learn the bound ports.
    #[allow(clippy::zombie_processes)] // the child is waited for in `Proc`'s Drop
    async fn start(path: &Path, prefix: Option<&str>) -> Proc {
        let mut cmd = match prefix {
            Some(p) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{p}; exec \"$0\" --config \"$1\""))
                    .arg(BIN)
                    .arg(path);
                c
            }
            None => {
                let mut c = Command::new(BIN);
                c.arg("--config").arg(path);
                c
            }
        };
        cmd.env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        // Owned by `Proc` from here on, so a failed assertion below still kills the child.
        let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut proc = Proc {
            child,
            log,
            public: unbound,
            admin: unbound,
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let found = proc
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("wsgate listening"))
                .cloned();
            if let Some(line) = found {
                let addrs: Vec<SocketAddr> = line
                    .split(|c: char| c.is_whitespace() || c == '"' || c == '=' || c == ',')
                    .filter_map(|t| t.parse().ok())
                    .collect();
                assert_eq!(addrs.len(), 2, "cannot read the addresses from {line}");
                proc.public = addrs[0];
                proc.admin = addrs[1];
                return proc;
            }
            assert!(
                Instant::now() < deadline,
                "wsgate did not start: {:?}",
                proc.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for exit; returns the exit code and how long it took.
    async fn wait_exit(&mut self) -> (Option<i32>, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), start.elapsed());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "wsgate did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {:?}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    async fn client(&self) -> (Ws, Value) {
        let (mut ws, _) = timeout(
            DEADLINE,
            tokio_tungstenite::connect_async(format!("ws://{}/ws", self.public)),
        )
        .await
        .unwrap()
        .unwrap();
        let hello = recv_json(&mut ws).await;
        (ws, hello)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("wsgate.toml");
    // Both listeners on port 0, merged into the body's own tables when it has them.
    let mut text = body.to_owned();
    for table in ["[server]\n", "[admin]\n"] {
        let line = format!("{table}listen = \"127.0.0.1:0\"\n");
        text = if text.contains(table) {
            text.replacen(table, &line, 1)
        } else {
            format!("{line}{text}")
        };
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("WSGATE_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn help_version_and_check() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/wsgate.toml");
    let out = run(&["--config", shipped, "--check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn config_errors_exit_64_naming_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[limits]\nmax_total_connections = 0\nmax_total_conections = 5\n[log]\nformat = \"xml\"\n",
    )
    .unwrap();
    for extra in [&["--check"][..], &[][..]] {
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(64));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("limits.max_total_connections must be at least 1, got 0"),
            "{err}"
        );
        assert!(err.contains("unknown key limits.max_total_conections"), "{err}");
        assert!(err.contains("log.format"), "{err}");
    }
    // WSGATE_CONFIG is the fallback.
    let out = Command::new(BIN)
        .arg("--check")
        .env("WSGATE_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // A missing file is a config problem too.
    let out = run(&["--config", "/nonexistent/wsgate.toml", "--check"]);
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn sigterm_drains_three_clients_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[shutdown]\ndrain_timeout = \"5s\"\nclose_spread = \"500ms\"\n",
    );
    let mut p = Proc::start(&path, None).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(p.client().await.0);
    }
    p.signal("TERM");
    for ws in &mut clients {
        let bye = recv_json(ws).await;
        assert_eq!(bye["type"], "server_shutdown");
        let (code, _) = expect_close(ws).await.expect("close frame");
        assert_eq!(code, 1001);
    }
    let (code, took) = p.wait_exit().await;
    assert_eq!(code, Some(0), "{}", p.log_text());
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(p.log_text().contains("drain complete"), "{}", p.log_text());
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[shutdown]\ndrain_timeout = \"60s\"\nclose_spread = \"50s\"\n",
    );
    let mut p = Proc::start(&path, None).await;
    let (_ws, _) = p.client().await;
    p.signal("TERM");
    p.wait_log("draining").await;
    p.signal("INT");
    let (code, took) = p.wait_exit().await;
    assert_eq!(code, Some(130));
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn sighup_reloads_a_valid_config_and_keeps_running_on_an_invalid_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[limits]\nmax_subscriptions = 10\n");
    let p = Proc::start(&path, None).await;
    let (mut before, hello) = p.client().await;
    assert_eq!(hello["connection_limits"]["max_subscriptions"], 10);

    write_config(
        dir.path(),
        "[limits]\nmax_subscriptions = 4\n[log]\nlevel = \"debug\"\n",
    );
    p.signal("HUP");
    p.wait_log("configuration reloaded").await;
    assert_eq!(request(&mut before, r#"{"type":"ping"}"#).await["type"], "pong");
    let (_after, hello) = p.client().await;
    assert_eq!(hello["connection_limits"]["max_subscriptions"], 4);

    write_config(
        dir.path(),
        "[limits]\nmax_subscriptions = 0\nmax_total_connections = -1\n",
    );
    p.signal("HUP");
    let line = p.wait_log("reload rejected").await;
    assert!(
        p.log_text()
            .contains("limits.max_subscriptions must be at least 1, got 0"),
        "{line}"
    );
    assert!(p
        .log_text()
        .contains("limits.max_total_connections must be at least 1, got -1"));
    let (_third, hello) = p.client().await;
    assert_eq!(
        hello["connection_limits"]["max_subscriptions"], 4,
        "the old config stays in force"
    );
    assert_eq!(request(&mut before, r#"{"type":"ping"}"#).await["type"], "pong");
}

#[tokio::test]
async fn json_logs_parse_line_by_line_and_never_contain_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "super-secret-admin-token-4711";
    let path = write_config(
        dir.path(),
        &format!("[admin]\ntoken = \"{token}\"\n[log]\nformat = \"json\"\nlevel = \"trace\"\n"),
    );
    let mut p = Proc::start(&path, None).await;
    let (mut ws, _) = p.client().await;
    request(&mut ws, r#"{"type":"subscribe","events":["x"]}"#).await;
    let bearer = format!("Bearer {token}");
    let (code, _, _) = http(
        p.admin,
        Method::POST,
        "/publish",
        &[("authorization", &bearer)],
        br#"{"event_type":"x","message":{}}"#.to_vec(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, _, _) = http(
        p.admin,
        Method::POST,
        "/publish",
        &[("authorization", "Bearer nope")],
        vec![],
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    recv_json(&mut ws).await;
    drop(ws);
    p.signal("TERM");
    p.wait_exit().await;
    let text = p.log_text();
    assert!(!text.contains(token), "the admin token leaked into the log");
    let lines: Vec<String> = p.log.lock().unwrap().clone();
    assert!(lines.len() > 5);
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
    // One span per connection carries its id and IP.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"span\"") && l.contains("\"ip\":\"127.0.0.1\"")),
        "{text}"
    );
}

#[tokio::test]
async fn the_accept_loop_survives_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[limits]\nmax_total_connections = 1000\nmax_connections_per_ip = 1000\nmax_pending_connections = 1000\n",
    );
    // A small descriptor limit for the daemon only.
    let p = Proc::start(&path, Some("ulimit -n 64")).await;
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(Ok(s)) = timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(p.public)).await {
            held.push(s);
        }
    }
    p.wait_log("accept failed").await;
    drop(held);
    // Once descriptors are free again, the daemon serves as before.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let ok = timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(format!("ws://{}/ws", p.public)),
        )
        .await;
        if matches!(ok, Ok(Ok(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "daemon did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, metrics) = http(p.admin, Method::GET, "/metrics", &[], vec![]).await;
    let text = String::from_utf8_lossy(&metrics).to_string();
    let errors: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("wsgate_accept_errors_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(errors > 0, "{text}");
}

/// Every connection's socket is closed when it ends, whichever way (the descriptor now lives
/// with the connection's shared state, so a lingering reference would keep it open).
#[tokio::test]
async fn closed_connections_give_their_descriptors_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[limits]\nmax_total_connections = 100\nmax_connections_per_ip = 100\n",
    );
    let p = Proc::start(&path, None).await;
    let fd_dir = format!("/proc/{}/fd", p.child.id());
    let fds = || std::fs::read_dir(&fd_dir).unwrap().count();
    let baseline = fds();
    let mut clients = Vec::new();
    for _ in 0..60 {
        let (mut ws, _) = p.client().await;
        send(&mut ws, r#"{"type":"subscribe","events":["t"]}"#).await;
        assert_eq!(recv_json(&mut ws).await["type"], "subscription_confirmed");
        clients.push(ws);
    }
    assert!(
        fds() >= baseline + 60,
        "{} descriptors for 60 connections",
        fds() - baseline
    );
    for (i, mut ws) in clients.into_iter().enumerate() {
        if i % 3 == 0 {
            drop(ws); // aborted: no close frame
        } else {
            ws.close(None).await.unwrap();
        }
    }
    let deadline = Instant::now() + DEADLINE;
    while fds() > baseline {
        assert!(
            Instant::now() < deadline,
            "{} descriptors still open after every client left",
            fds() - baseline
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `server.worker_threads = 1` runs the daemon on one thread (tokio's single-threaded runtime);
/// 2 gives the main thread and two workers. Either way it serves clients and publishes.
#[tokio::test]
async fn worker_threads_chooses_the_runtime() {
    for (workers, threads) in [(1, 1), (2, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &format!("[server]\nworker_threads = {workers}\n"));
        let p = Proc::start(&path, None).await;
        p.wait_log(&format!("threads={workers}")).await;
        let tasks = std::fs::read_dir(format!("/proc/{}/task", p.child.id()))
            .unwrap()
            .count();
        assert_eq!(tasks, threads, "threads with worker_threads = {workers}");
        let (mut ws, _) = p.client().await;
        request(&mut ws, r#"{"type":"subscribe","events":["x"]}"#).await;
        let (code, _, _) = http(
            p.admin,
            Method::POST,
            "/publish",
            &[],
            br#"{"event_type":"x","message":{"n":1}}"#.to_vec(),
        )
        .await;
        assert_eq!(code, StatusCode::OK);
        let event = recv_json(&mut ws).await;
        assert_eq!(
            (event["event_type"].as_str(), event["n"].as_i64()),
            (Some("x"), Some(1))
        );
    }
}
