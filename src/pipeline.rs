//! Wiring the parts for each subcommand, and shutting them down in order.
//!
//! `run` = `listen` + `work` in one process. The order of shutdown is what
//! makes "lose nothing once read" hold:
//!
//! 1. the signal stops the source; it frames what it holds and hands every
//!    kept event to the queue writer;
//! 2. the queue writer stores all of them durably, then ends;
//! 3. only then are the workers told to stop: they drain what the queue
//!    holds (for at most `worker.drain_timeout`), commit, ack and end.
//!
//! Anything not written by then is still in the durable queue, and the next
//! start delivers it.
//!
//! In `run` and `replay` the listening half has a thread and a one-thread
//! runtime of its own ([`listen_apart`]), and `run` starts the threads of
//! the main runtime, which are the workers', at a lower CPU priority: a
//! listener that falls behind drops events, a worker only lags
//! ([`crate::priority`] says why and how).

use crate::action::{ActionError, Actions};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::memory::{Part, PartName};
use crate::queue::{Producer, QueueError};
use crate::rules::Rules;
use crate::sink::SinkError;
use crate::source::overflow::Overflow;
use crate::source::{Chunk, Ingest, Source, SourceError};
use crate::stats::Stats;
use crate::worker::{Stop, Worker, WorkerError};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("sink: {0}")]
    Sink(#[from] SinkError),
    #[error("source: {0}")]
    Source(#[from] SourceError),
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
    #[error("task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("actions: {0}")]
    Action(#[from] ActionError),
    #[error("the listener: {0}")]
    Listener(String),
}

/// What a running pipeline takes after it started (SIGHUP reloads).
#[derive(Default)]
pub struct Hooks {
    /// New rules for the listener.
    pub rules: Option<mpsc::UnboundedReceiver<Rules>>,
    /// The actions workers offer batches to; `None`: started from the config.
    pub actions: Option<Actions>,
    /// Scan the master's job cache at start and after each bus reconnect
    /// (`[backfill] enabled`, for processes that listen).
    pub backfill: bool,
    /// The web pages' Live feed, offered every kept event (`run` with `[web] enabled`).
    pub live: Option<crate::web::live::LiveFeed>,
}

/// Why a reload was refused (the running config stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "rules route to queue `{0}`, which this process does not consume yet; restart to add a queue"
    )]
    NewQueue(String),
    #[error("actions: {0}")]
    Action(#[from] ActionError),
    #[error("the listener has stopped")]
    ListenerGone,
}

/// The sending side of [`Hooks`]: applies a new config's rules and actions.
pub struct Reloader {
    rules: Option<mpsc::UnboundedSender<Rules>>,
    actions: Option<Actions>,
    queues: Vec<String>,
    stats: Arc<Stats>,
}

impl Reloader {
    /// Hooks for a process that listens (`listen`), works (`work`), or both,
    /// and the reloader that feeds them. Starts the actions when it works.
    pub fn new(
        cfg: &Config,
        stats: &Arc<Stats>,
        listens: bool,
        works: bool,
    ) -> Result<(Hooks, Reloader), PipelineError> {
        // Before the actions start: they take their part of it.
        stats.install_budget(cfg.budget(listens));
        let (tx, rx) = if listens {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let actions = if works {
            Some(Actions::start(&cfg.actions, stats)?)
        } else {
            None
        };
        let queues = if works && !cfg.worker.queues.is_empty() {
            cfg.worker.queues.clone()
        } else {
            cfg.queue_names()
        };
        Ok((
            Hooks {
                rules: rx,
                actions: actions.clone(),
                backfill: listens && cfg.backfill.enabled,
                live: None,
            },
            Reloader {
                rules: tx,
                actions,
                queues,
                stats: stats.clone(),
            },
        ))
    }

    /// Applies the rules and actions of `cfg` (already validated). Other
    /// sections take effect at the next start.
    pub fn apply(&self, cfg: &Config) -> Result<(), ReloadError> {
        if self.rules.is_some() && self.actions.is_some() {
            // In `run`, a rule routing to a queue no worker reads would strand events.
            if let Some(q) = cfg
                .queue_names()
                .into_iter()
                .find(|q| !self.queues.contains(q))
            {
                return Err(ReloadError::NewQueue(q));
            }
        }
        if let Some(a) = &self.actions {
            a.replace(&cfg.actions, &self.stats)?;
        }
        if let Some(tx) = &self.rules {
            tx.send(Rules::new(&cfg.rules))
                .map_err(|_| ReloadError::ListenerGone)?;
        }
        Ok(())
    }
}

/// `saltpipe run`: listens and works in one process until `shutdown`.
pub async fn run(
    cfg: &Config,
    source: Box<dyn Source>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), PipelineError> {
    stats.install_budget(cfg.budget(true));
    listen_and_work(
        cfg,
        source,
        stats,
        shutdown,
        Some(cfg.worker.drain_timeout),
        hooks,
    )
    .await
}

/// `saltpipe replay` and `saltpipe backfill`: a source that ends, through
/// the whole pipeline; workers write until the queue is empty.
pub async fn replay(
    cfg: &Config,
    source: Box<dyn Source>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    stats.install_budget(cfg.budget(true));
    listen_and_work(cfg, source, stats, shutdown, None, Hooks::default()).await
}

/// `saltpipe listen`: the bus → rules → the queue the config names, until
/// `shutdown`.
pub async fn listen(
    cfg: &Config,
    source: Box<dyn Source>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), PipelineError> {
    stats.install_budget(cfg.budget(true));
    let drain = Some(cfg.worker.drain_timeout);
    to_queue(cfg, source, stats, shutdown, drain, hooks).await
}

/// A source that ends, into the queue only (`saltpipe backfill` while a
/// running saltpipe consumes the queue): forwarders drain until the spool
/// is empty.
pub async fn feed(
    cfg: &Config,
    source: Box<dyn Source>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    stats.install_budget(cfg.budget(true));
    to_queue(cfg, source, stats, shutdown, None, Hooks::default()).await
}

/// `saltpipe work`: the queue → the sink (and actions) until `shutdown`,
/// or until a worker fails.
pub async fn work(
    cfg: &Config,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), PipelineError> {
    stats.install_budget(cfg.budget(false));
    let drain = Some(cfg.worker.drain_timeout);
    let mut workers = Workers::start(cfg, stats, drain, hooks.actions).await?;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = workers.first_failure() => {}
    }
    workers.finish().await
}

/// `run` and `replay`: listen and work in one process.
///
/// `drain` is how long workers keep writing after the source ended: the
/// configured `drain_timeout` for `run`, `None` (until the queue is empty)
/// for `replay`.
async fn listen_and_work(
    cfg: &Config,
    source: Box<dyn Source>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    drain: Option<Duration>,
    hooks: Hooks,
) -> Result<(), PipelineError> {
    let mut hooks = hooks;
    let mut workers = Workers::start(cfg, stats.clone(), drain, hooks.actions.take()).await?;
    // A worker that dies (fatal sink error) stops the whole process: keep
    // its error and stop listening, in order; what was read is safe in the queue.
    let listening = listen_apart(cfg, source, stats, shutdown.clone(), drain, hooks);
    tokio::pin!(listening);
    let listened = loop {
        tokio::select! {
            r = &mut listening => break r,
            _ = workers.first_failure() => shutdown.cancel(),
        }
    };
    // A worker's error comes first: it is why listening stopped.
    let worked = workers.finish().await;
    worked.and(listened)
}

/// The listening half of `run` and `replay` ([`to_queue`]) on a thread
/// and a one-thread runtime of its own (see the module docs): what it
/// starts, the bus reader's thread and the embedded queue's blocking
/// writes, runs on threads it creates, so they keep its priority whatever
/// the main runtime's threads run at. One thread is enough: `listen`
/// runs the same code on one (src/main.rs). Returns its result once it
/// ended.
async fn listen_apart(
    cfg: &Config,
    source: Box<dyn Source>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    drain: Option<Duration>,
    hooks: Hooks,
) -> Result<(), PipelineError> {
    let cfg = cfg.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("saltpipe-listen".into())
        .spawn(move || {
            // Its blocking threads (the bus reader, the queue's writes) by
            // the same name, so an operator's `top -H` tells them apart.
            let result = match tokio::runtime::Builder::new_current_thread()
                .thread_name("saltpipe-listen")
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(to_queue(&cfg, source, stats, shutdown, drain, hooks)),
                Err(e) => Err(PipelineError::Listener(format!(
                    "cannot start its runtime: {e}"
                ))),
            };
            // The receiver is gone only if `run` itself was dropped.
            let _ = tx.send(result);
        })
        .map_err(|e| PipelineError::Listener(format!("cannot start its thread: {e}")))?;
    rx.await.unwrap_or_else(|_| {
        Err(PipelineError::Listener(
            "its thread ended without a result (see the log)".into(),
        ))
    })
}

/// The workers of one process, one per queue it consumes (times
/// `worker.concurrency`), with what shares their sink: the retention task
/// and the actions.
struct Workers {
    set: JoinSet<Result<(), WorkerError>>,
    /// Tells the workers to stop waiting for new events and drain.
    stop: CancellationToken,
    retention: Option<tokio::task::JoinHandle<()>>,
    actions: Actions,
    /// How long actions may still send at the end.
    actions_drain: Duration,
    /// The first worker's error; it stops the process.
    failed: Option<PipelineError>,
}

impl Workers {
    /// Builds the sink (or defers its connection) and starts everything.
    /// Actions are started from the config unless a reloader brought them.
    async fn start(
        cfg: &Config,
        stats: Arc<Stats>,
        drain: Option<Duration>,
        actions: Option<Actions>,
    ) -> Result<Workers, PipelineError> {
        let actions = match actions {
            Some(a) => a,
            None => Actions::start(&cfg.actions, &stats)?,
        };
        let sink = cfg.sink.build_or_defer().await?;
        let stop = CancellationToken::new();
        let retention = crate::sink::retention::spawn(sink.clone(), &cfg.sink, stop.clone());
        let queues = if cfg.worker.queues.is_empty() {
            cfg.queue_names()
        } else {
            cfg.worker.queues.clone()
        };
        let redact = Arc::new(cfg.sink.redactor());
        let mut set = JoinSet::new();
        for q in queues {
            for _ in 0..cfg.worker.concurrency.max(1) {
                // What its stages hold at once: the batch being gathered,
                // one waiting to be converted, one converted, and those
                // being written.
                let hold = cfg.worker.batch_max_events * (sink.writers() + 3);
                let consumer = cfg.queue.consumer_with(&q, hold).await?;
                let w = Worker::new(consumer, sink.clone(), cfg.worker.clone(), stats.clone())
                    .with_queue_name(&q)
                    .with_redact(redact.clone())
                    .with_actions(actions.clone());
                stats.workers_expected.fetch_add(1, Relaxed);
                set.spawn(w.run(Stop::new(stop.clone(), drain)));
            }
        }
        Ok(Workers {
            set,
            stop,
            retention,
            actions,
            actions_drain: drain.unwrap_or(cfg.worker.drain_timeout),
            failed: None,
        })
    }

    /// Returns when a worker fails (and keeps its error); never while they
    /// all run. Cancel-safe.
    async fn first_failure(&mut self) {
        loop {
            match self.set.join_next().await {
                None => std::future::pending::<()>().await,
                Some(r) => {
                    if let Err(e) = flatten(r) {
                        tracing::error!(error = %e, "a worker stopped; shutting down");
                        self.failed.get_or_insert(e);
                        return;
                    }
                }
            }
        }
    }

    /// Stops the workers, waits for their drain, then the retention task,
    /// then gives the actions their drain time. The first error wins.
    async fn finish(mut self) -> Result<(), PipelineError> {
        self.stop.cancel();
        while let Some(r) = self.set.join_next().await {
            if let Err(e) = flatten(r) {
                self.failed.get_or_insert(e);
            }
        }
        if let Some(r) = self.retention {
            // It saw the cancellation; a chunk in flight is one short transaction.
            let _ = r.await;
        }
        self.actions.shutdown(self.actions_drain).await;
        self.failed.map_or(Ok(()), Err)
    }
}

fn flatten(
    r: Result<Result<(), WorkerError>, tokio::task::JoinError>,
) -> Result<(), PipelineError> {
    r.map_err(PipelineError::from)
        .and_then(|r| r.map_err(PipelineError::from))
}

/// The listening half with the queue the config names: straight into the
/// embedded queue, or, for a broker, to the broker directly while it keeps
/// up and into the local spool otherwise, with forwarders emptying the
/// spool into the broker (see [`crate::queue::forward`]). `drain` bounds how long
/// the forwarders keep emptying the spool after the source ended.
async fn to_queue(
    cfg: &Config,
    source: Box<dyn Source>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    drain: Option<Duration>,
    hooks: Hooks,
) -> Result<(), PipelineError> {
    if !cfg.queue.url.is_broker() {
        let producer = cfg.queue.producer().await?;
        return into_queue(cfg, source, producer, stats, shutdown, hooks).await;
    }
    let (spooled, forwarder) =
        crate::queue::forward::start(&cfg.queue, cfg.queue_names(), drain, stats.clone()).await?;
    let listened = into_queue(cfg, source, spooled, stats, shutdown, hooks).await;
    let forwarded = forwarder.finish().await;
    listened.and(forwarded.map_err(PipelineError::from))
}

/// Chunks in flight between the reader and the queue writer. Few: the
/// queue writer takes up to [`WRITE_BATCH`] at a time anyway, a bus reader
/// keeps what does not fit in its own bounded backlog, and a file source
/// waits; every chunk in flight pins its read buffers (16 chunks held ~8 MB
/// more at the peak of a 1M-return replay than 4).
const CHANNEL_CHUNKS: usize = 4;
/// Messages the writer puts in one queue transaction at most...
pub const WRITE_BATCH: usize = 4096;
/// ...and bytes (a transaction of 4,096 large returns would hold 400 MB).
pub const WRITE_BYTES: usize = 8 << 20;
/// What the backfill's reader may hold on its way to the queue: it waits
/// for its queue writer (it is not the bus), so this only sizes its chunks'
/// accounting; it never drops.
const BACKFILL_MEMORY: usize = 16 << 20;
/// How long the writer waits for more messages before storing a small batch.
const WRITE_LINGER: Duration = Duration::from_millis(20);

/// Stores every chunk it receives, retrying failures, until the channel
/// closes. After `give_up` fires, a push that keeps failing is abandoned
/// (logged with the count) so shutdown cannot hang forever on a dead disk.
async fn queue_writer(
    mut rx: mpsc::Receiver<Chunk>,
    producer: Arc<dyn Producer>,
    stats: Arc<Stats>,
    give_up: CancellationToken,
) {
    while let Some(mut batch) = rx.recv().await {
        // Linger a moment for more: at a few thousand events a second they
        // trickle in a few at a time, and one queue transaction per handful
        // cost the listener most of its CPU (see docs/BENCHMARKS.md).
        let linger = tokio::time::sleep(WRITE_LINGER);
        tokio::pin!(linger);
        while batch.messages.len() < WRITE_BATCH && batch.charge.bytes() < WRITE_BYTES {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(more) => batch.extend(more),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = std::time::Instant::now();
            stats
                .queue_write_since_ms
                .store(crate::source::now_ms(), Relaxed);
            let pushed = producer.push(&batch.messages).await;
            stats.queue_write_since_ms.store(0, Relaxed);
            match pushed {
                Ok(()) => {
                    stats.queued.fetch_add(batch.messages.len() as u64, Relaxed);
                    crate::stats::events::QueueWritten {
                        took: started.elapsed(),
                    }
                    .emit(&stats);
                    break;
                }
                Err(e) => {
                    stats.queue_errors.fetch_add(1, Relaxed);
                    if give_up.is_cancelled() {
                        tracing::error!(error = %e, lost = batch.messages.len(), "cannot store events in the queue at shutdown; they are lost");
                        break;
                    }
                    tracing::error!(error = %e, events = batch.messages.len(), "cannot store events in the queue; retrying (the reader keeps draining the bus)");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.fail()) => {}
                        _ = give_up.cancelled() => {}
                    }
                }
            }
        }
    }
}

/// Where `run` / `listen` keep local state (the backfill's marks, the
/// overflow file): the queue directory, or the local spool with a broker
/// queue.
pub fn local_dir(cfg: &Config) -> std::path::PathBuf {
    match &cfg.queue.url {
        crate::queue::QueueUrl::Embedded { dir } => dir.clone(),
        #[allow(unreachable_patterns)]
        _ => cfg.queue.spool.clone(),
    }
}

/// Source → rules → `producer`, taking new rules from `reload` while it
/// runs, and, with `backfill`, scanning the job cache at start and after
/// each reconnect. Returns when the source ends (end of file, or
/// `shutdown`) and everything it kept is in the queue.
async fn into_queue(
    cfg: &Config,
    mut source: Box<dyn Source>,
    producer: Arc<dyn Producer>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), PipelineError> {
    let Hooks {
        rules: reload,
        backfill,
        live,
        ..
    } = hooks;
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let give_up = CancellationToken::new();
    // Backfill has a channel and queue writer of its own: a large scan waits
    // for its writer instead of filling the bus reader's channel (whose
    // reader never waits, and would drop past `pending_limit`).
    let auto = backfill.then(|| {
        let (btx, brx) = mpsc::channel(CHANNEL_CHUNKS);
        let writer = tokio::spawn(queue_writer(
            brx,
            producer.clone(),
            stats.clone(),
            give_up.clone(),
        ));
        let ingest = Ingest::new(
            &cfg.source,
            Rules::new(&cfg.rules),
            stats.clone(),
            btx,
            Part::standalone(BACKFILL_MEMORY),
        );
        let auto = crate::backfill::Auto::new(&cfg.backfill, cfg.source.max_frame, local_dir(cfg));
        let scan = tokio::spawn(auto.run(ingest, stats.clone(), shutdown.clone()));
        (scan, writer)
    });
    let writer = tokio::spawn(queue_writer(rx, producer, stats.clone(), give_up.clone()));
    let memory = stats.budget().part(PartName::Listener).clone();
    let overflow = (cfg.source.overflow_limit > 0)
        .then(|| Overflow::new(local_dir(cfg), cfg.source.overflow_limit));
    if let Some(o) = &overflow {
        o.check_room();
    }
    let mut ingest = Ingest::new(&cfg.source, Rules::new(&cfg.rules), stats, tx, memory)
        .with_live(live)
        .with_overflow(overflow);
    if let Some(rx) = reload {
        ingest = ingest.with_reload(rx);
    }
    // `run` drops `ingest` when it ends, closing the writer's channel.
    let result = source.run(ingest, shutdown).await;
    // Give a failing queue the drain time to recover before giving up.
    let deadline = tokio::time::sleep(cfg.worker.drain_timeout);
    tokio::pin!(deadline);
    let writers = async {
        writer.await?;
        if let Some((scan, writer)) = auto {
            scan.await?;
            writer.await?;
        }
        Ok::<(), tokio::task::JoinError>(())
    };
    tokio::pin!(writers);
    tokio::select! {
        r = &mut writers => r?,
        _ = &mut deadline => {
            give_up.cancel();
            writers.await?;
        }
    }
    result.map_err(Into::into)
}
