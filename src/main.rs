//! The `wsgate` binary: CLI -> config (exit 64 when invalid) -> logging -> bind -> run, with
//! signals: SIGTERM/SIGINT drain (a second one exits at once), SIGHUP reloads the config file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use wsgate::logging::{self, LogHandle};
use wsgate::notify::sd_notify;
use wsgate::{Config, Daemon, Listeners};

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
/// Exit code when a second signal interrupts the drain.
const EXIT_INTERRUPTED: i32 = 130;

/// A WebSocket gateway: bounded, topic-selective fan-out in front of a backend.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML). Without it (and without WSGATE_CONFIG) the built-in defaults are used.
    #[arg(long, short = 'c', env = "WSGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print every problem, and exit (0 when valid).
    #[arg(long, short = 't')]
    check: bool,
}

fn load(cli: &Cli) -> Result<Config, ExitCode> {
    let result = match &cli.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    result.map_err(|e| {
        let source = cli
            .config
            .as_ref()
            .map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string());
        eprintln!("wsgate: invalid configuration in {source}:");
        for problem in e.problems() {
            eprintln!("  - {problem}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cli.check {
        let source = cli
            .config
            .as_ref()
            .map_or("built-in defaults".into(), |p| p.display().to_string());
        println!("wsgate: configuration OK ({source})");
        return ExitCode::SUCCESS;
    }
    let log = logging::init(&config.log);
    // One thread: tokio's single-threaded scheduler, on this thread. A multi-threaded runtime
    // with one worker still runs two threads, and on a single CPU that only adds work: a second
    // thread makes the kernel reference-count the socket's file on every send (a shared
    // descriptor table), and the work-stealing scheduler keeps statistics and wakes peers.
    // Measured in scenario (b) pinned to one core: about 5 % less CPU per delivery
    // (BENCHMARKS.md, "one thread on one CPU"). The in-process tests run the daemon this way too.
    let threads = config.runtime_threads();
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(threads, "runtime started");
    match runtime.block_on(serve(cli, config, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli, config: Config, log: LogHandle) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await.context("cannot bind")?;
    let daemon = Daemon::new(config);
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    sd_notify("READY=1");
    let run = daemon.run(listeners, shutdown.clone().cancelled_owned());
    tokio::pin!(run);
    loop {
        tokio::select! {
            report = &mut run => {
                info!(cut_off = report.cut_off, "wsgate stopped");
                return Ok(());
            }
            _ = term.recv() => on_stop_signal(&shutdown, "SIGTERM"),
            _ = int.recv() => on_stop_signal(&shutdown, "SIGINT"),
            _ = hup.recv() => reload(&cli, &daemon, &log),
        }
    }
}

fn on_stop_signal(shutdown: &CancellationToken, name: &str) {
    if shutdown.is_cancelled() {
        warn!(signal = name, "second stop signal: exiting at once");
        std::process::exit(EXIT_INTERRUPTED);
    }
    info!(
        signal = name,
        "stop signal: draining (send it again to exit at once)"
    );
    sd_notify("STOPPING=1");
    shutdown.cancel();
}

fn reload(cli: &Cli, daemon: &Daemon, log: &LogHandle) {
    let Some(path) = &cli.config else {
        warn!("SIGHUP: no config file to reload (started on the built-in defaults)");
        return;
    };
    sd_notify("RELOADING=1");
    match Config::load(path) {
        Ok(config) => {
            let level = config.log.level.clone();
            for note in daemon.reload(config) {
                warn!("{note}");
            }
            if let Err(e) = log.set_level(&level) {
                warn!(error = %e, "log level not changed");
            }
            info!(config = %path.display(), "configuration reloaded");
        }
        Err(e) => {
            for problem in e.problems() {
                error!(problem = %problem, "configuration reload rejected; keeping the running configuration");
            }
        }
    }
    sd_notify("READY=1");
}
