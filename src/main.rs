//! The `saltpipe` command line. `anyhow` lives here and nowhere else: the
//! library's errors are typed; this file only turns them into messages and
//! exit codes.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use saltpipe::config::{self, Config, ConfigError, LogFormat};
use saltpipe::pipeline;
use saltpipe::source::{bus::BusSource, file::FileSource};
use saltpipe::stats::{Stats, events};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `println!` that hands stdout's error back instead of panicking, for
/// the functions that print a command's output (they return
/// `anyhow::Result`). A reader that stops early (`saltpipe replay --json |
/// head`) closes the pipe: that is [`StdoutClosed`], and `main` exits 0
/// without a word, as `cat` or ripgrep would; the work was done either way.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(stdout_error)?
    }};
}

/// Nobody reads stdout any more (EPIPE): not a failure of the command.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
struct StdoutClosed;

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// Exit codes, documented in `--help` and the README.
mod exit {
    pub const OK: u8 = 0;
    /// A runtime failure: I/O, a database that will not take the schema, ...
    pub const FAILURE: u8 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// The configuration is invalid.
    pub const CONFIG: u8 = 3;
    /// `validate`: a part named in the configuration cannot be reached.
    pub const UNREACHABLE: u8 = 4;
    /// `backfill`: the master's job cache cannot be read (missing, no permission).
    pub const NO_JOB_CACHE: u8 = 5;
}

const AFTER_HELP: &str = "\
Exit codes:
  0  success (and after SIGTERM/SIGINT: drained and stopped cleanly; and when
     stdout's reader stops early, as `| head` does)
  1  runtime failure (I/O, database, queue)
  2  bad command-line usage
  3  invalid configuration (the message names the key and, for the file, the line)
  4  validate: a source, queue or sink in the configuration cannot be reached
  5  backfill: the master's job cache cannot be read (missing, or no permission)

Configuration: --config FILE, else $SALTPIPE_CONFIG, else /etc/saltpipe/saltpipe.toml if it
exists, else built-in defaults that work on a stock master. Any key can be overridden with
SALTPIPE_<SECTION>_<KEY>, e.g. SALTPIPE_SINK_URL=sqlite:///tmp/salt.db.";

#[derive(Parser)]
#[command(name = "saltpipe", version, about = "Keeps the job results a SaltStack master sees: event bus -> rules -> durable queue -> batched SQL", after_help = AFTER_HELP)]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, short = 'c', global = true, env = "SALTPIPE_CONFIG")]
    config: Option<PathBuf>,
    /// The salt-master's config (default /etc/salt/master, with master.d/*.conf
    /// and its includes): where the bus, job cache and master id are, unless
    /// saltpipe's own config says.
    #[arg(long, global = true, env = "SALTPIPE_MASTER_CONFIG")]
    master_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Listen to the bus, queue and write, all in this process (the embedded default).
    ///
    /// Reads the master's event bus, keeps what the rules keep, stores it in
    /// the durable queue and writes it to the sink in batches. SIGTERM or
    /// SIGINT: stop reading, store what was read, drain and commit, exit 0.
    Run,
    /// Only listen: bus -> rules -> queue. Pair with `work` processes.
    Listen,
    /// Only work: queue -> sink, for the queues in `worker.queues` (default: all).
    Work,
    /// Check the configuration; then try to reach the bus, queue and sink.
    ///
    /// Prints what would run and exits 0, or names the key (and line) that
    /// is wrong and exits 3; exits 4 if a part cannot be reached.
    Validate {
        /// Only check the configuration; touch no socket, file or database.
        #[arg(long)]
        no_connect: bool,
    },
    /// Write the raw bus stream to a file, for bug reports and `replay`.
    Capture {
        /// Where to write (created or truncated).
        #[arg(long, short)]
        out: PathBuf,
        /// Stop after this long (e.g. 30s, 5m); default: until SIGINT/SIGTERM.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Stop after this many frames.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print (or create) the sink's tables: Salt's returner schema plus
    /// saltpipe's keys, indexes and dead-letter table.
    Schema {
        /// Only print the DDL for URL (default: the configured sink); touch nothing.
        #[arg(long)]
        print: bool,
        /// A sink URL (sqlite://, mysql://, postgres://); default: `sink.url`.
        url: Option<String>,
    },
    /// Push a captured stream through the pipeline (rules, queue, sink) as
    /// fast as it goes, and print what was kept, dropped (by reason) and written.
    Replay {
        /// A file written by `saltpipe capture` (or any bus byte stream).
        file: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import the master's job cache: every job and return it still keeps
    /// (24h by default), through the rules, queue and sink, as if read from
    /// the bus. What the sink already has is left as it is.
    ///
    /// Prints what it found, what was already stored and what it wrote.
    /// While another saltpipe consumes the same embedded queue, the jobs are
    /// queued for it to write. Exit 0 when done, 5 if the job cache cannot
    /// be read.
    Backfill {
        /// Only jobs written in the last DURATION (e.g. 24h, 90m); default: --all.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "all")]
        since: Option<Duration>,
        /// The whole job cache (the default).
        #[arg(long)]
        all: bool,
        /// Only this job.
        #[arg(long)]
        jid: Option<String>,
        /// Read and count only: no queue, no database.
        #[arg(long)]
        dry_run: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the read-only web pages over the configured sink ([web] listen).
    Web,
    /// A live view of a running saltpipe: rates, backlog, errors, actions.
    ///
    /// Reads its /metrics page ([metrics] listen of the config, or --url).
    Top {
        /// The /metrics URL; default: from [metrics] listen in the config.
        #[arg(long)]
        url: Option<String>,
        /// Time between two screens.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many screens (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
}

/// Caps glibc's malloc at two arenas, before any thread starts. By default
/// glibc gives every thread that allocates (tokio workers, the blocking
/// SQLite threads) an arena of its own, up to 8 per core, and keeps freed
/// memory in each: ~18 MB of RSS in a full-speed replay, measured against
/// `MALLOC_ARENA_MAX=2`, for no speed gained (saltpipe's threads hand
/// buffers to each other; they do not allocate in parallel much). mimalloc
/// was tried instead and held 160+ MB.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called first
    // thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    saltpipe::tls::install_ring();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let loaded = match config::load_with(cli.config.as_deref(), cli.master_config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("saltpipe: invalid configuration: {e}");
            return ExitCode::from(match e {
                ConfigError::Read { .. } => exit::FAILURE,
                _ => exit::CONFIG,
            });
        }
    };
    init_logging(&loaded.config);
    // `listen` runs on one thread: its async work (the queue writer, the
    // forwarders) is a few wake-ups per read, and hand-offs between worker
    // threads cost it more CPU than the work itself. The bus reader has its
    // own thread (src/source/bus.rs) and SQLite its blocking pool.
    let mut builder = if matches!(cli.command, Command::Listen) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // `run` beside a master: the workers' threads (this runtime's) yield
    // the cores to the listener's and the master's in a burst; the
    // listener has a thread of its own (saltpipe::pipeline::listen_apart).
    if matches!(cli.command, Command::Run) {
        builder.on_thread_start(saltpipe::priority::lower_priority());
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("saltpipe: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = runtime.block_on(dispatch(cli.command, loaded));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.is::<StdoutClosed>() => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("saltpipe: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn init_logging(cfg: &Config) {
    // RUST_LOG first; field values as plain text either way (LogConfig::filter).
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .try_from_env()
        .or_else(|_| cfg.log.filter())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    // Colours only for a person at a terminal; journald and files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Serves /metrics and /health until `shutdown`, if enabled. A listener
/// that cannot bind is logged, not fatal: a second saltpipe on the host
/// (listen + work with one config) must not stop the pipeline.
async fn serve_metrics(
    cfg: &Config,
    stats: &Arc<Stats>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // A busy port costs the figures, not the events: keep running, loudly.
    if cfg.metrics.enabled
        && let Err(e) = saltpipe::ops::serve(&cfg.metrics, stats.clone(), shutdown.clone()).await
    {
        tracing::error!(error = %e, "running without /metrics and /health");
    }
    Ok(())
}

/// `saltpipe run` with `[web] enabled = true`: the pages too, once the
/// sink's tables exist (the pipeline creates them). Like /metrics, a
/// listener that cannot start is logged, not fatal.
async fn serve_web(
    cfg: &Config,
    live: saltpipe::web::live::LiveFeed,
    shutdown: &CancellationToken,
) {
    let (web, sink, stop) = (cfg.web.clone(), cfg.sink.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            match saltpipe::web::serve(&web, &sink, Some(live.clone()), stop.clone()).await {
                Ok(_) => return,
                Err(saltpipe::web::WebError::Store(e)) if !stop.is_cancelled() => {
                    tracing::debug!(error = %e, "web pages: the sink is not ready yet");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "running without the web pages");
                    return;
                }
            }
        }
    });
}

/// `saltpipe web`: only the pages, until SIGTERM/SIGINT.
async fn web(cfg: &Config) -> anyhow::Result<u8> {
    let shutdown = shutdown_on_signals()?;
    let (addr, task) = saltpipe::web::serve(&cfg.web, &cfg.sink, None, shutdown).await?;
    // Where to point a browser, for whoever started it; a stdout nobody
    // reads (closed, or `| head` done) must not stop a server.
    {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stdout().lock(),
            "saltpipe web: http://{addr}/ (sink {})",
            cfg.sink.url
        );
    }
    task.await.context("the web server task")?;
    Ok(exit::OK)
}

/// On SIGHUP: re-read the config; apply its rules and actions if it is
/// valid, else keep the running ones and log why.
fn reload_on_sighup(
    path: Option<PathBuf>,
    reloader: pipeline::Reloader,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let shown = path
                .as_ref()
                .map_or_else(|| "built-in defaults".into(), |p| p.display().to_string());
            match config::load(path.as_deref()) {
                Ok(l) => match reloader.apply(&l.config) {
                    Ok(()) => events::ConfigReloaded {
                        config: &shown,
                        rules: l.config.rules.rule.len(),
                        actions: l.config.actions.len(),
                    }
                    .emit(&stats),
                    Err(e) => events::ReloadRefused {
                        config: &shown,
                        error: &e,
                        invalid: false,
                    }
                    .emit(&stats),
                },
                Err(e) => events::ReloadRefused {
                    config: &shown,
                    error: &e,
                    invalid: true,
                }
                .emit(&stats),
            }
        }
    });
    Ok(())
}

/// Cancels the token on SIGTERM or SIGINT; a second signal exits at once.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: no more reading; storing and writing what was read");
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now; queued events are delivered at the next start");
        std::process::exit(130);
    });
    Ok(token)
}

/// What a daemon subcommand (`run`, `listen`, `work`) sets up before its
/// pipeline starts: signals, counters, /metrics, and SIGHUP reloads.
struct Daemon {
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    hooks: pipeline::Hooks,
}

impl Daemon {
    async fn start(
        loaded: &config::Loaded,
        listens: bool,
        works: bool,
        ops_stop: &CancellationToken,
    ) -> anyhow::Result<Daemon> {
        let cfg = &loaded.config;
        let shutdown = shutdown_on_signals()?;
        let stats = Arc::new(Stats::default());
        stats
            .bus_expected
            .store(listens, std::sync::atomic::Ordering::Relaxed);
        // Before /metrics can be scraped: the first budget installed stays.
        stats.install_budget(cfg.budget(listens));
        serve_metrics(cfg, &stats, ops_stop).await?;
        let (hooks, reloader) = pipeline::Reloader::new(cfg, &stats, listens, works)?;
        reload_on_sighup(loaded.path.clone(), reloader, stats.clone())?;
        Ok(Daemon {
            shutdown,
            stats,
            hooks,
        })
    }
}

async fn dispatch(command: Command, loaded: config::Loaded) -> anyhow::Result<u8> {
    // The metrics listener outlives the pipeline's own shutdown token, so
    // /health can say "stopping" until the very end.
    let ops_stop = CancellationToken::new();
    let _ops_guard = ops_stop.clone().drop_guard();
    let cfg = &loaded.config;
    match command {
        Command::Run => {
            let mut d = Daemon::start(&loaded, true, true, &ops_stop).await?;
            if cfg.web.enabled {
                let live = saltpipe::web::live::LiveFeed::new(d.stats.clone());
                d.hooks.live = Some(live.clone());
                serve_web(cfg, live, &ops_stop).await;
            }
            tracing::info!(source = %cfg.source.address(), queue = %cfg.queue.url, sink = %cfg.sink.url, actions = cfg.actions.len(), "saltpipe run");
            let source = Box::new(BusSource::new(&cfg.source));
            pipeline::run(cfg, source, d.stats.clone(), d.shutdown, d.hooks).await?;
            tracing::info!(summary = %d.stats.snapshot(), "stopped");
            Ok(exit::OK)
        }
        Command::Listen => {
            let d = Daemon::start(&loaded, true, false, &ops_stop).await?;
            tracing::info!(source = %cfg.source.address(), queue = %cfg.queue.url, "saltpipe listen");
            let source = Box::new(BusSource::new(&cfg.source));
            pipeline::listen(cfg, source, d.stats.clone(), d.shutdown, d.hooks).await?;
            tracing::info!(summary = %d.stats.snapshot(), "stopped");
            Ok(exit::OK)
        }
        Command::Work => {
            let d = Daemon::start(&loaded, false, true, &ops_stop).await?;
            tracing::info!(queue = %cfg.queue.url, sink = %cfg.sink.url, actions = cfg.actions.len(), "saltpipe work");
            pipeline::work(cfg, d.stats.clone(), d.shutdown, d.hooks).await?;
            tracing::info!(summary = %d.stats.snapshot(), "stopped");
            Ok(exit::OK)
        }
        Command::Top {
            url,
            interval,
            count,
        } => {
            let url = url.unwrap_or_else(|| format!("http://{}/metrics", cfg.metrics.listen));
            saltpipe::ops::top::run(&url, interval, count).await?;
            Ok(exit::OK)
        }
        Command::Web => web(cfg).await,
        Command::Validate { no_connect } => {
            validate(cfg, loaded.path.clone(), loaded.master.as_ref(), no_connect).await
        }
        Command::Capture {
            out,
            duration,
            count,
        } => capture(cfg, out, duration, count).await,
        Command::Replay { file, json } => replay(cfg, file, json).await,
        Command::Backfill {
            since,
            all: _,
            jid,
            dry_run,
            json,
        } => backfill(cfg, since, jid, dry_run, json).await,
        Command::Schema { print, url } => schema(cfg.clone(), print, url).await,
    }
}

async fn validate(
    cfg: &Config,
    path: Option<PathBuf>,
    master: Option<&config::salt_master::MasterOpts>,
    no_connect: bool,
) -> anyhow::Result<u8> {
    let from = path.map_or_else(
        || "built-in defaults".to_owned(),
        |p| p.display().to_string(),
    );
    outln!("configuration OK ({from})");
    // What the master's own config said (saltpipe's config wins over it).
    if let Some(m) = master {
        let files: Vec<String> = m.files.iter().map(|f| f.display().to_string()).collect();
        outln!("  master config: {}", files.join(", "));
        for line in m.taken() {
            outln!("    {line}");
        }
    }
    outln!("  source: {}", cfg.source.address());
    outln!(
        "  queue:  {} (queues: {})",
        cfg.queue.url,
        cfg.queue_names().join(", ")
    );
    outln!("  sink:   {}", cfg.sink.url);
    outln!(
        "  rules:  keep {:?}, {} rule(s), drop_redundant {}, dedupe_returns {}",
        cfg.rules.keep,
        cfg.rules.rule.len(),
        cfg.rules.drop_redundant,
        cfg.rules.dedupe_returns
    );
    if cfg.metrics.enabled {
        outln!(
            "  metrics: http://{}/metrics and /health",
            cfg.metrics.listen
        );
    } else {
        outln!("  metrics: off");
    }
    outln!(
        "  web: http://{}/ ({}, auth {:?})",
        cfg.web.listen,
        if cfg.web.enabled {
            "saltpipe run and saltpipe web"
        } else {
            "saltpipe web only"
        },
        cfg.web.auth
    );
    let names: Vec<&str> = cfg.actions.iter().map(|a| a.name.as_str()).collect();
    outln!("  actions: {} ({})", names.len(), names.join(", "));
    if cfg.backfill.enabled {
        let at = cfg.backfill.job_cache_dir.as_ref().map_or_else(
            || format!("from {}", cfg.backfill.master_config.display()),
            |d| d.display().to_string(),
        );
        outln!(
            "  backfill: at start and reconnect, job cache {at}, margin {}",
            humantime::format_duration(cfg.backfill.margin)
        );
    } else {
        outln!("  backfill: off");
    }
    let budget = cfg.budget(true);
    let mib = |p| budget.part(p).limit() as f64 / f64::from(1 << 20);
    outln!(
        "  memory: {:.0} MiB of event data (listener {:.1}, worker {:.1}, actions {:.1})",
        cfg.memory_total() as f64 / f64::from(1 << 20),
        mib(saltpipe::memory::PartName::Listener),
        mib(saltpipe::memory::PartName::Worker),
        mib(saltpipe::memory::PartName::Actions),
    );
    if no_connect {
        return Ok(exit::OK);
    }
    // Not a failure: without it saltpipe runs, only gaps stay unfilled.
    if cfg.backfill.enabled {
        let jobs = cfg.backfill.resolve().jobs_dir;
        match std::fs::read_dir(&jobs) {
            Ok(_) => outln!("can read the job cache at {}", jobs.display()),
            Err(e) => outln!(
                "cannot read the job cache at {}: {e} (backfill will not fill gaps)",
                jobs.display()
            ),
        }
    }
    let mut ok = true;
    match saltpipe::source::check(&cfg.source).await {
        Ok(()) => outln!("reached the bus at {}", cfg.source.address()),
        Err(e) => {
            ok = false;
            outln!("cannot reach the bus at {}: {e}", cfg.source.address());
        }
    }
    match cfg.queue.producer().await {
        Ok(_) => outln!("opened the queue at {}", cfg.queue.url),
        Err(e) => {
            ok = false;
            outln!("cannot open the queue at {}: {e}", cfg.queue.url);
        }
    }
    match cfg.sink.build().await {
        Ok(sink) => {
            outln!("opened the sink at {} (schema present)", cfg.sink.url);
            // Not a failure: such a return is dead-lettered with its reason.
            let largest = cfg.source.max_frame.min(cfg.sink.max_return_size);
            if let Some(limit) = sink.row_limit().filter(|l| (*l as u64) < largest) {
                outln!(
                    "warning: the database takes rows of at most {limit} bytes (MySQL: under its \
                     max_allowed_packet), less than source.max_frame / sink.max_return_size \
                     ({largest} bytes): a larger return is dead-lettered; raise the server's \
                     max_allowed_packet to store it"
                );
            }
        }
        Err(e) => {
            ok = false;
            outln!("cannot open the sink at {}: {e}", cfg.sink.url);
        }
    }
    Ok(if ok { exit::OK } else { exit::UNREACHABLE })
}

async fn schema(mut cfg: Config, print: bool, url: Option<String>) -> anyhow::Result<u8> {
    if let Some(u) = url {
        match saltpipe::sink::SinkUrl::parse(&u) {
            Ok(u) => cfg.sink.url = u,
            Err(e) => {
                eprintln!("saltpipe: {e}");
                return Ok(exit::CONFIG);
            }
        }
    }
    if print {
        outln!("{}", cfg.sink.schema_ddl());
        return Ok(exit::OK);
    }
    cfg.sink.build().await?;
    outln!("schema present at {}", cfg.sink.url);
    Ok(exit::OK)
}

async fn capture(
    cfg: &Config,
    out: PathBuf,
    duration: Option<Duration>,
    count: Option<u64>,
) -> anyhow::Result<u8> {
    let shutdown = shutdown_on_signals()?;
    if let Some(d) = duration {
        let t = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            t.cancel();
        });
    }
    let n = saltpipe::source::capture(&cfg.source, &out, count, shutdown)
        .await
        .with_context(|| format!("capturing to {}", out.display()))?;
    eprintln!(
        "captured {} bytes, {} frames to {}",
        n.bytes,
        n.frames,
        out.display()
    );
    Ok(exit::OK)
}

async fn replay(cfg: &Config, file: PathBuf, json: bool) -> anyhow::Result<u8> {
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let source = Box::new(FileSource::new(file.clone()));
    pipeline::replay(cfg, source, stats.clone(), CancellationToken::new()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let s = stats.snapshot();
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["seconds"] = serde_json::json!(elapsed);
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let rate = |n: u64| {
            if elapsed > 0.0 {
                n as f64 / elapsed
            } else {
                0.0
            }
        };
        outln!("replayed {} in {elapsed:.2}s", file.display());
        outln!(
            "  read:     {} frames, {} bytes ({:.0} frames/s)",
            s.frames,
            s.bytes_read,
            rate(s.frames)
        );
        outln!(
            "  rejected: {} malformed, {} oversized",
            s.malformed,
            s.oversized
        );
        outln!("  kept:     {}", s.kept);
        outln!("  dropped:  {}", s.dropped.values().sum::<u64>());
        for (reason, n) in &s.dropped {
            outln!("    {reason:<24} {n}");
        }
        outln!(
            "  wrote:    {} returns, {} jids, {} events; {} already present; {} dead-lettered",
            s.returns_written,
            s.jids_written,
            s.events_written,
            s.rows_ignored,
            s.dead_letters
        );
        let per10k = if s.kept > 0 {
            s.batches as f64 * 10_000.0 / s.kept as f64
        } else {
            0.0
        };
        for (name, outcomes) in &s.actions {
            let o: Vec<String> = outcomes.iter().map(|(k, n)| format!("{n} {k}")).collect();
            outln!("  action {name}: {}", o.join(", "));
        }
        outln!(
            "  batches:  {} ({per10k:.1} transactions per 10,000 events); {:.0} events/s end to end",
            s.batches,
            rate(s.acked)
        );
        outln!(
            "  sink:     {:.2}s busy writing",
            s.sink_latency_us_total as f64 / 1e6
        );
    }
    Ok(exit::OK)
}

/// `saltpipe backfill`: the job cache → rules → queue → sink, once.
async fn backfill(
    cfg: &Config,
    since: Option<Duration>,
    jid: Option<String>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<u8> {
    use saltpipe::backfill::{JobCacheSource, ScanCounts, Scanner, Window};
    use std::io::IsTerminal as _;
    use std::sync::atomic::Ordering::Relaxed;
    let cache = cfg.backfill.resolve();
    // No job cache: say so before opening a queue or a database for nothing.
    if let Err(e) = std::fs::read_dir(&cache.jobs_dir) {
        eprintln!(
            "saltpipe: backfill: cannot read the job cache at {}: {e} (set [backfill] job_cache_dir or master_config, or run as the master's user)",
            cache.jobs_dir.display()
        );
        return Ok(exit::NO_JOB_CACHE);
    }
    let window = Window {
        since: since.and_then(|d| std::time::SystemTime::now().checked_sub(d)),
        jid,
    };
    let scanner = Scanner::new(cache.clone(), cfg.source.max_frame);
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let shutdown = shutdown_on_signals()?;
    // A progress line on a terminal (no progress-bar crate in the
    // project's dependency set: one line rewritten in place).
    let progress = (!json && std::io::stderr().is_terminal()).then(|| {
        let s = stats.clone();
        let stop = CancellationToken::new();
        let t = stop.clone();
        let h = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    _ = tick.tick() => {}
                }
                eprint!(
                    "\rbackfill: read {} jobs, {} returns; wrote {} returns   ",
                    s.backfilled_jobs.load(Relaxed),
                    s.backfilled_returns.load(Relaxed),
                    s.returns_written.load(Relaxed)
                );
            }
            eprintln!();
        });
        (stop, h)
    });
    let mut queued_only = false;
    let counts: Result<ScanCounts, String> = if dry_run {
        let st = stats.clone();
        tokio::task::spawn_blocking(move || {
            scanner.scan(&window, &mut |_, kind| {
                let c = match kind {
                    saltpipe::backfill::scan::Kind::Job => &st.backfilled_jobs,
                    saltpipe::backfill::scan::Kind::Return => &st.backfilled_returns,
                };
                c.fetch_add(1, Relaxed);
                true
            })
        })
        .await?
        .map_err(|e| e.to_string())
    } else {
        let source = JobCacheSource::new(scanner.clone(), window.clone());
        let found = source.counts.clone();
        let r = pipeline::replay(cfg, Box::new(source), stats.clone(), shutdown.clone()).await;
        let found = match r {
            Ok(()) => found,
            Err(pipeline::PipelineError::Queue(saltpipe::queue::QueueError::Busy { .. })) => {
                // A running saltpipe consumes this queue: hand it the jobs.
                queued_only = true;
                let source = JobCacheSource::new(scanner, window);
                let found = source.counts.clone();
                pipeline::feed(cfg, Box::new(source), stats.clone(), shutdown).await?;
                found
            }
            Err(e) => return Err(e.into()),
        };
        let taken = found.lock().map(|mut g| g.take()).ok().flatten();
        taken.unwrap_or_else(|| Err("the scan did not finish".into()))
    };
    if let Some((stop, h)) = progress {
        stop.cancel();
        let _ = h.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let s = stats.snapshot();
    let code = match &counts {
        Ok(_) => exit::OK,
        Err(e) => {
            eprintln!(
                "saltpipe: backfill: {e} (set [backfill] job_cache_dir or master_config, or run as the master's user)"
            );
            exit::NO_JOB_CACHE
        }
    };
    let c = counts.unwrap_or_default();
    let summary = serde_json::json!({
        "job_cache": cache.jobs_dir,
        "dry_run": dry_run,
        "queued_for_running_saltpipe": queued_only,
        "found": { "jobs": c.jobs, "returns": c.returns },
        "skipped_being_written": c.skipped,
        "unreadable": c.unreadable,
        "dropped_by_rules": s.dropped.values().sum::<u64>(),
        "written": { "jobs": s.jids_written, "returns": s.returns_written },
        "already_stored": s.rows_ignored,
        "dead_lettered": s.dead_letters,
        "seconds": seconds,
        "exit_code": code,
    });
    // Written in one piece, and a closed pipe (`| head`) is not an error.
    let mut text = String::new();
    if json {
        text = serde_json::to_string_pretty(&summary)? + "\n";
    } else {
        use std::fmt::Write as _;
        let _ = writeln!(
            text,
            "backfill from {} in {seconds:.2}s",
            cache.jobs_dir.display()
        );
        let _ = writeln!(
            text,
            "  found:          {} jobs, {} returns",
            c.jobs, c.returns
        );
        if c.skipped + c.unreadable > 0 {
            let _ = writeln!(
                text,
                "  skipped:        {} being written, {} unreadable",
                c.skipped, c.unreadable
            );
        }
        if code == exit::OK && dry_run {
            let _ = writeln!(text, "  dry run: nothing queued or written");
        } else if code == exit::OK && queued_only {
            let _ = writeln!(
                text,
                "  queued:         {} events, for the running saltpipe to write",
                s.queued
            );
        } else if code == exit::OK {
            let _ = writeln!(
                text,
                "  written:        {} jobs, {} returns",
                s.jids_written, s.returns_written
            );
            let _ = writeln!(
                text,
                "  already stored: {} rows; dropped by rules: {}; dead-lettered: {}",
                s.rows_ignored,
                s.dropped.values().sum::<u64>(),
                s.dead_letters
            );
        }
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    Ok(code)
}
