//! wsgate-bench: fan-out benchmark harness for wsgate.
//!
//! ```text
//! wsgate-bench run --target wsgate|floor|nchan --ws ADDR --admin ADDR [--server-pid PID] [options]
//! wsgate-bench floor --listen ADDR --admin ADDR
//! wsgate-bench report RESULTS.jsonl
//! wsgate-bench free-ports N
//! ```
//! `bench/compare.sh` drives all of it; see BENCHMARKS.md.

#![recursion_limit = "256"]

mod floor;
mod gen;
mod report;
mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;

const USAGE: &str = "usage:
  wsgate-bench run --target wsgate|floor|nchan --ws ADDR --admin ADDR [--server-pid PID]
      [--scenario NAME] [--run N] [--conns N] [--topics N] [--events N] [--rate EVENTS_PER_S (0 = as fast as possible)]
      [--secs S] [--batch N] [--publishers N] [--payload BYTES] [--settle S] [--window N] [--drain S]
      [--src-addrs N] [--connect-concurrency N] [--ready-timeout S] [--connect-timeout S]
  wsgate-bench floor --listen ADDR --admin ADDR
  wsgate-bench report RESULTS.jsonl
  wsgate-bench free-ports N";

struct Args(HashMap<String, String>);

impl Args {
    fn parse(items: &[String]) -> Result<Args, String> {
        let mut m = HashMap::new();
        let mut it = items.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {k}"))?;
            let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            m.insert(key.to_owned(), v.clone());
        }
        Ok(Args(m))
    }
    fn get<T: std::str::FromStr>(&mut self, key: &str, default: Option<T>) -> Result<T, String> {
        match self.0.remove(key) {
            Some(v) => v.parse().map_err(|_| format!("--{key}: cannot parse {v:?}")),
            None => default.ok_or_else(|| format!("--{key} is required")),
        }
    }
    fn done(self) -> Result<(), String> {
        match self.0.keys().next() {
            Some(k) => Err(format!("unknown option --{k}")),
            None => Ok(()),
        }
    }
}

fn run_cmd(rest: &[String]) -> Result<i32, String> {
    let mut a = Args::parse(rest)?;
    let target: String = a.get("target", None)?;
    let target = gen::Target::parse(&target).ok_or("--target must be wsgate, floor or nchan")?;
    let o = gen::Opts {
        target,
        scenario: a.get("scenario", Some("adhoc".to_owned()))?,
        run: a.get("run", Some(1))?,
        ws: a.get::<SocketAddr>("ws", None)?,
        admin: a.get::<SocketAddr>("admin", None)?,
        server_pid: a.get::<String>("server-pid", Some(String::new()))?.parse().ok(),
        conns: a.get("conns", Some(100))?,
        topics: a.get("topics", Some(10))?,
        events: a.get("events", Some(1000))?,
        rate: a.get("rate", Some(100.0))?,
        secs: a.get("secs", Some(10.0))?,
        batch: a.get("batch", Some(1))?,
        publishers: a.get("publishers", Some(4))?,
        payload: a.get("payload", Some(64))?,
        settle: a.get("settle", Some(1.0))?,
        window: a.get("window", Some(64))?,
        drain: a.get("drain", Some(15.0))?,
        src_addrs: a.get("src-addrs", Some(16))?,
        connect_concurrency: a.get("connect-concurrency", Some(200))?,
        ready_timeout: a.get("ready-timeout", Some(15.0))?,
        connect_timeout: a.get("connect-timeout", Some(20.0))?,
    };
    a.done()?;
    for (k, addr) in [("ws", o.ws), ("admin", o.admin)] {
        match addr.ip() {
            std::net::IpAddr::V4(ip) if ip.is_loopback() => {}
            ip => {
                return Err(format!(
                    "--{k} {ip}: this harness only sends traffic to 127.0.0.0/8"
                ))
            }
        }
    }
    if o.topics == 0 {
        return Err("--topics must be at least 1".into());
    }
    let limit = ws::raise_nofile();
    let need = o.conns as u64 + o.publishers as u64 + 64;
    if need >= limit {
        return Err(format!(
            "{} connections need about {need} file descriptors; the limit is {limit}",
            o.conns
        ));
    }
    Ok(gen::run(o))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &argv[1..];
    let result: Result<i32, String> = match cmd.as_str() {
        "run" => run_cmd(rest),
        "floor" => (|| {
            let mut a = Args::parse(rest)?;
            let listen: SocketAddr = a.get("listen", None)?;
            let admin: SocketAddr = a.get("admin", None)?;
            a.done()?;
            ws::raise_nofile();
            floor::serve(listen, admin).map(|()| 0).map_err(|e| e.to_string())
        })(),
        "report" => (|| {
            let path = rest.first().ok_or("report needs a results file")?;
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            print!("{}", report::report(&text));
            Ok(0)
        })(),
        "free-ports" => (|| {
            let n: usize = rest
                .first()
                .and_then(|v| v.parse().ok())
                .ok_or("free-ports needs a count")?;
            // Bound together so that they differ; released at once (a small race we accept).
            let ls: Vec<std::net::TcpListener> = (0..n)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let ports: Vec<String> = ls
                .iter()
                .map(|l| l.local_addr().map(|a| a.port().to_string()).unwrap_or_default())
                .collect();
            println!("{}", ports.join(" "));
            Ok(0)
        })(),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("wsgate-bench: {e}");
            ExitCode::from(2)
        }
    }
}
