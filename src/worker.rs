//! Workers: queue → batch → sink → ack.
//!
//! A batch closes on whichever comes first: `batch_max_events`,
//! `batch_max_bytes`, or `batch_timeout` after its first event (a deadline
//! that fires by itself, so a quiet bus never leaves events waiting, unlike
//! Salt's `event_return_queue_max_seconds`). One transaction per batch.
//!
//! Acks follow the commit, never precede it. A retriable failure holds the
//! batch and retries with jittered exponential backoff for as long as it
//! takes, while the queue keeps absorbing the bus. A permanent failure is
//! narrowed down to the row that caused it (by the index the sink reports,
//! or by halving), the rest is written, and that row goes to the dead-letter
//! table with its error, so one bad value never blocks the others.
//!
//! On shutdown a worker stops waiting for new events, drains what the queue
//! already holds for at most `drain_timeout`, commits, acks and returns;
//! whatever is left stays in the durable queue for the next start.
//!
//! A worker runs three stages at once: gathering batch N+2 from the queue,
//! decoding and converting batch N+1 into rows, writing batch N (and, for a
//! database server, batch N-1 too: `sink.writers` batches at once, each in
//! its own transaction). Acks still follow each batch's commit, in order.
//!
//! Actions (`[[actions]]`) are offered each batch as it is prepared for its
//! insert: a non-blocking hand-off to their own tasks, so they never hold
//! back the write (see [`crate::action`]).
//!
//! Who did not return is decided here, not in the listener: only the
//! database knows which targets a return reached, whichever listener or
//! worker wrote it. Each worker runs a small sweep every
//! `return_window / 10` (1-30 s) that asks the sink to close the windows of
//! jobs announced more than `return_window` ago ([`Sink::close_returns`]:
//! idempotent SQL, so several workers or a restart are harmless) and
//! offers one synthetic `saltpipe/no_return/<jid>/<minion>` event per
//! silent minion to the actions, so `when = { outcome = "no_return" }`
//! fires once per silent minion.

use crate::action::Actions;
use crate::config::{ConfigError, human};
use crate::event::Event;
use crate::outcome::Outcome;
use crate::queue::{Consumer, Delivery};
use crate::sink::{Record, Sink, SinkError, WriteReport};
use crate::stats::{Stats, events};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rand::Rng;
use serde::Deserialize;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Queues this worker consumes; empty means every queue the rules name.
    pub queues: Vec<String>,
    /// A batch closes at this many events...
    pub batch_max_events: usize,
    /// ...or this many bytes of event data...
    #[serde(deserialize_with = "human::size")]
    pub batch_max_bytes: u64,
    /// ...or this long after its first event.
    #[serde(deserialize_with = "human::duration")]
    pub batch_timeout: Duration,
    /// First wait before retrying a failed write; doubles up to `retry_max`.
    #[serde(deserialize_with = "human::duration")]
    pub retry_min: Duration,
    #[serde(deserialize_with = "human::duration")]
    pub retry_max: Duration,
    /// On shutdown, how long to keep writing what the queue already holds.
    #[serde(deserialize_with = "human::duration")]
    pub drain_timeout: Duration,
    /// Workers per queue in this process, each with its own consumer and
    /// batches. Brokers only: the embedded queue has one consumer per queue.
    pub concurrency: usize,
    /// How long after a job's announcement its targeted minions may
    /// return; then each one without a return is recorded as `no_return`
    /// (a later return still lands and replaces it).
    #[serde(deserialize_with = "human::duration")]
    pub return_window: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec![],
            batch_max_events: 2000,
            batch_max_bytes: 16 << 20,
            batch_timeout: Duration::from_millis(200),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            concurrency: 1,
            return_window: Duration::from_secs(300),
        }
    }
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_max_events == 0 || self.batch_max_events > 100_000 {
            return Err(ConfigError::invalid(
                "worker.batch_max_events",
                "must be between 1 and 100000",
            ));
        }
        if self.batch_max_bytes < 1024 {
            return Err(ConfigError::invalid(
                "worker.batch_max_bytes",
                "must be at least 1KiB",
            ));
        }
        if self.batch_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "worker.batch_timeout",
                "must be above zero",
            ));
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(ConfigError::invalid(
                "worker.retry_min",
                "must be above zero and not above retry_max",
            ));
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return Err(ConfigError::invalid(
                "worker.concurrency",
                "must be between 1 and 256",
            ));
        }
        if self.return_window < Duration::from_secs(1)
            || self.return_window > Duration::from_secs(30 * 86_400)
        {
            return Err(ConfigError::invalid(
                "worker.return_window",
                "must be between 1s and 30d",
            ));
        }
        for q in &self.queues {
            crate::rules::validate_queue_name(q)
                .map_err(|m| ConfigError::invalid("worker.queues", m))?;
        }
        Ok(())
    }
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue: {0}")]
    Queue(#[from] crate::queue::QueueError),
    #[error("sink: {0}")]
    Sink(SinkError),
}

/// When a worker should stop.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Fires when the worker should stop waiting for new events.
    pub token: CancellationToken,
    /// How long to keep draining after that; `None` drains until empty (replay).
    pub drain: Option<Duration>,
    /// Set the first time anyone notices the token fired: both stages of a
    /// worker must agree on one deadline.
    deadline: Arc<OnceLock<Instant>>,
}

impl Stop {
    pub fn new(token: CancellationToken, drain: Option<Duration>) -> Stop {
        Stop {
            token,
            drain,
            deadline: Arc::default(),
        }
    }

    /// The moment draining must end, once shutdown has begun.
    fn deadline(&self) -> Option<Instant> {
        if !self.token.is_cancelled() {
            return None;
        }
        Some(*self.deadline.get_or_init(|| match self.drain {
            Some(d) => Instant::now() + d,
            None => Instant::now() + Duration::from_secs(86400 * 365),
        }))
    }

    fn past_deadline(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Sleeps before retry `attempt`; false (at once) if that would pass the
    /// drain deadline.
    async fn backoff(&self, cfg: &WorkerConfig, attempt: u32) -> bool {
        let base = cfg
            .retry_min
            .saturating_mul(1u32 << attempt.min(16).saturating_sub(1));
        let delay = base
            .min(cfg.retry_max)
            .mul_f64(rand::rng().random_range(0.5..1.0));
        let until = Instant::now() + delay;
        if self.deadline().is_some_and(|d| until > d) {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until) => true,
            // Shutdown began during the sleep: re-check against the deadline.
            _ = self.token.cancelled(), if !self.token.is_cancelled() => {
                tokio::time::sleep_until(until.min(self.deadline().unwrap_or(until))).await;
                !self.past_deadline()
            }
        }
    }
}

/// One worker: one consumer, one sink.
///
/// Two stages run side by side so the queue and the database work at the
/// same time: this task pulls batches and acks the ones the writer
/// committed; the writer task converts and stores them. At most
/// `Sink::writers` batches are being written and one more waits, converted.
pub struct Worker {
    consumer: Box<dyn Consumer>,
    writer: Writer,
    /// The queue's name, for its depth figure.
    queue: Option<String>,
}

/// The storing stage: sink, retries, dead letters.
struct Writer {
    sink: Arc<dyn Sink>,
    cfg: WorkerConfig,
    stats: Arc<Stats>,
    /// Offered each batch before its insert, never waited for.
    actions: Option<Actions>,
    /// `[sink] redact`: applied as each event is decoded.
    redact: Option<Arc<crate::redact::KeyRedactor>>,
}

/// How often a worker asks its queue how deep it is (for `/metrics`).
const DEPTH_EVERY: Duration = Duration::from_secs(1);

/// Counts a running worker for `/health`, uncounted however it ends.
struct Alive(Arc<Stats>);

impl Alive {
    fn new(stats: &Arc<Stats>) -> Alive {
        stats.workers_running.fetch_add(1, Relaxed);
        Alive(stats.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.workers_running.fetch_sub(1, Relaxed);
    }
}

/// Publishes the queue's depth and the age of its oldest waiting event.
struct DepthPoll {
    queue: Option<String>,
    last: Option<Instant>,
    /// Newest receive time of the last batch handed on: what still waits
    /// is at least this recent, which bounds the oldest event's age.
    newest_handed_ms: i64,
}

impl DepthPoll {
    async fn poll(&mut self, consumer: &mut dyn Consumer, stats: &Stats) {
        let Some(q) = &self.queue else {
            return;
        };
        if self.last.is_some_and(|t| t.elapsed() < DEPTH_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        if let Ok(Some(d)) = consumer.depth().await {
            let oldest = match (d, stats.oldest_unacked_ms.load(Relaxed)) {
                (0, _) => 0,
                (_, 0) => self.newest_handed_ms,
                (_, t) => t,
            };
            stats.set_queue_depth(q, d, oldest);
        }
    }
}

/// How long an idle pull waits before checking for shutdown again.
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// ...and how long while the writer has batches whose acks are due, so a
/// committed batch is acked promptly even on a quiet queue.
const ACK_WAIT: Duration = Duration::from_millis(20);
/// While draining, how long a pull waits before calling the queue empty: a
/// broker's messages are on the wire for a moment, so zero would stop a
/// worker with a full queue.
const DRAIN_WAIT: Duration = Duration::from_millis(100);

impl Worker {
    pub fn new(
        consumer: Box<dyn Consumer>,
        sink: Arc<dyn Sink>,
        cfg: WorkerConfig,
        stats: Arc<Stats>,
    ) -> Worker {
        Worker {
            consumer,
            writer: Writer {
                sink,
                cfg,
                stats,
                actions: None,
                redact: None,
            },
            queue: None,
        }
    }

    /// Hides these keys' values in every event before actions and the sink see it.
    pub fn with_redact(mut self, redact: Arc<crate::redact::KeyRedactor>) -> Worker {
        self.writer.redact = (!redact.is_empty()).then_some(redact);
        self
    }

    /// Offers each batch's events to these actions before writing it.
    pub fn with_actions(mut self, actions: Actions) -> Worker {
        self.writer.actions = Some(actions);
        self
    }

    /// Names the queue, so its depth and age are published.
    pub fn with_queue_name(mut self, queue: &str) -> Worker {
        self.queue = Some(queue.to_owned());
        self
    }

    pub async fn run(self, stop: Stop) -> Result<(), WorkerError> {
        let Worker {
            mut consumer,
            writer,
            queue,
        } = self;
        let _alive = Alive::new(&writer.stats);
        let _sweep = Sweep {
            sink: writer.sink.clone(),
            window: writer.cfg.return_window,
            stats: writer.stats.clone(),
            actions: writer.actions.clone(),
        }
        .spawn(stop.token.clone());
        let mut depth = DepthPoll {
            queue,
            last: None,
            newest_handed_ms: 0,
        };
        let cfg = writer.cfg.clone();
        let stats = writer.stats.clone();
        let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<Delivery>>(1);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Vec<u64>>();
        let writer_stop = stop.clone();
        let mut write_task = tokio::spawn(async move {
            // Batch N+1 is decoded and converted here while batch N is
            // written (the database works on its own thread or server):
            // without the overlap the conversion added to the writer's
            // time, which bounds the whole pipeline. A database server
            // also takes several batches at once (`Sink::writers`), each
            // in its own transaction: one statement runs on one of its
            // cores. Acks still go out in batch order.
            let writers = writer.sink.writers().max(1);
            let mut writing = FuturesOrdered::new();
            // Receive times of the oldest event of each batch being written.
            let mut oldest: VecDeque<i64> = VecDeque::new();
            let mut next: Option<Ready> = None;
            let mut open = true;
            loop {
                if writing.len() < writers
                    && let Some(ready) = next.take()
                {
                    oldest.push_back(ready.oldest);
                    writer.note_oldest(&oldest);
                    writing.push_back(writer.commit(ready, &writer_stop));
                    continue;
                }
                if !open && next.is_none() && writing.is_empty() {
                    return Ok::<(), WorkerError>(());
                }
                tokio::select! {
                    Some(done) = writing.next(), if !writing.is_empty() => {
                        oldest.pop_front();
                        writer.note_oldest(&oldest);
                        // An error ends the worker at once: the batches
                        // still being written stay unacked and come back
                        // at the next start. The gatherer may be gone
                        // after an error; then the ids simply stay unacked.
                        if let Some(ids) = done? {
                            let _ = done_tx.send(ids);
                        }
                    }
                    batch = batch_rx.recv(), if open && next.is_none() => match batch {
                        Some(batch) => match writer.prepare(batch, &writer_stop).await? {
                            Some(ready) => next = Some(ready),
                            // Shutdown's deadline came while dead-lettering.
                            None => open = false,
                        },
                        None => open = false,
                    },
                }
            }
        });
        let gathered = Worker::gather(
            consumer.as_mut(),
            &cfg,
            &stats,
            &stop,
            &batch_tx,
            &mut done_rx,
            &mut write_task,
            &mut depth,
        )
        .await;
        drop(batch_tx);
        let written = match gathered {
            // The writer already ended (with an error); its result is in `gathered`.
            Err(GatherEnd::WriterEnded(r)) => r,
            other => {
                let r = (&mut write_task)
                    .await
                    .map_err(|e| WorkerError::Sink(SinkError::Fatal(e.to_string())));
                if let Err(GatherEnd::Queue(e)) = other {
                    return Err(e.into());
                }
                r.and_then(|r| r)
            }
        };
        while let Ok(ids) = done_rx.try_recv() {
            ack(consumer.as_mut(), &cfg, &stats, &stop, &ids).await?;
        }
        written
    }

    /// Pulls batches and hands them to the writer until shutdown (then
    /// drains) or until the writer ends.
    // The two stages' shared state, spelled out: bundling it would only hide it.
    #[allow(clippy::too_many_arguments)]
    async fn gather(
        consumer: &mut dyn Consumer,
        cfg: &WorkerConfig,
        stats: &Stats,
        stop: &Stop,
        batch_tx: &mpsc::Sender<Vec<Delivery>>,
        done_rx: &mut mpsc::UnboundedReceiver<Vec<u64>>,
        write_task: &mut tokio::task::JoinHandle<Result<(), WorkerError>>,
        depth: &mut DepthPoll,
    ) -> Result<(), GatherEnd> {
        let max_bytes = cfg.batch_max_bytes as usize;
        // Batches handed to the writer and not yet acked.
        let mut in_flight = 0usize;
        loop {
            depth.poll(&mut *consumer, stats).await;
            while let Ok(ids) = done_rx.try_recv() {
                ack(&mut *consumer, cfg, stats, stop, &ids).await?;
                in_flight = in_flight.saturating_sub(1);
            }
            let draining = stop.token.is_cancelled();
            if stop.past_deadline() {
                return Ok(());
            }
            let mut batch: Vec<Delivery> = Vec::new();
            let mut bytes = 0usize;
            let mut closes_at: Option<Instant> = None;
            loop {
                let room = cfg.batch_max_events - batch.len();
                if room == 0 || bytes >= max_bytes || (!batch.is_empty() && consumer.starved()) {
                    break;
                }
                let wait = match closes_at {
                    Some(t) => t.saturating_duration_since(Instant::now()),
                    None if draining => DRAIN_WAIT,
                    None if in_flight > 0 => ACK_WAIT,
                    None => IDLE_WAIT,
                };
                let got = if closes_at.is_none() && !draining {
                    tokio::select! {
                        _ = stop.token.cancelled() => break,
                        r = consumer.pull(room, max_bytes - bytes, wait) => r?,
                    }
                } else {
                    consumer.pull(room, max_bytes - bytes, wait).await?
                };
                if got.is_empty() {
                    // Nothing came: the batch is due, or there is none.
                    if closes_at.is_none_or(|t| Instant::now() >= t) || draining {
                        break;
                    }
                    continue;
                }
                if closes_at.is_none() {
                    closes_at = Some(Instant::now() + cfg.batch_timeout);
                }
                bytes += got.iter().map(|d| d.body.len()).sum::<usize>();
                stats.delivered.fetch_add(got.len() as u64, Relaxed);
                batch.extend(got);
            }
            if batch.is_empty() {
                if draining {
                    if in_flight == 0 {
                        return Ok(());
                    }
                    // Nothing came, but batches are still being written: a
                    // broker holds back what our unacked messages keep out
                    // of the prefetch, so the queue is not known empty
                    // until they are acked. Wait for the writer, then look
                    // again (within the drain deadline).
                    let until = stop.deadline().unwrap_or_else(Instant::now);
                    match tokio::time::timeout_at(until, done_rx.recv()).await {
                        Ok(Some(ids)) => {
                            ack(&mut *consumer, cfg, stats, stop, &ids).await?;
                            in_flight = in_flight.saturating_sub(1);
                        }
                        // The writer ended (its result is the worker's), or
                        // the deadline passed: what is left stays queued.
                        Ok(None) | Err(_) => return Ok(()),
                    }
                }
                continue;
            }
            depth.newest_handed_ms = batch.iter().map(|d| d.received_ms).max().unwrap_or(0);
            // Hand over; while the writer is busy, keep acking what it finished.
            let mut pending = Some(batch);
            while let Some(b) = pending.take() {
                tokio::select! {
                    permit = batch_tx.reserve() => match permit {
                        Ok(p) => {
                            p.send(b);
                            in_flight += 1;
                        }
                        Err(_) => return Err(GatherEnd::WriterEnded(writer_result(write_task).await)),
                    },
                    Some(ids) = done_rx.recv() => {
                        ack(&mut *consumer, cfg, stats, stop, &ids).await?;
                        in_flight = in_flight.saturating_sub(1);
                        pending = Some(b);
                    }
                    r = &mut *write_task => {
                        return Err(GatherEnd::WriterEnded(r.map_err(|e| WorkerError::Sink(SinkError::Fatal(e.to_string()))).and_then(|r| r)));
                    }
                }
            }
        }
    }
}

/// A batch decoded and converted, waiting for its write.
struct Ready {
    /// Every delivery's id, the dead-lettered ones too: all are acked
    /// once the rest is written.
    ids: Vec<u64>,
    oldest: i64,
    records: Vec<Record>,
}

/// Why gathering stopped early.
enum GatherEnd {
    Queue(crate::queue::QueueError),
    WriterEnded(Result<(), WorkerError>),
}

impl From<crate::queue::QueueError> for GatherEnd {
    fn from(e: crate::queue::QueueError) -> Self {
        GatherEnd::Queue(e)
    }
}

impl From<WorkerError> for GatherEnd {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Queue(q) => GatherEnd::Queue(q),
            other => GatherEnd::WriterEnded(Err(other)),
        }
    }
}

async fn writer_result(
    task: &mut tokio::task::JoinHandle<Result<(), WorkerError>>,
) -> Result<(), WorkerError> {
    task.await
        .map_err(|e| WorkerError::Sink(SinkError::Fatal(e.to_string())))
        .and_then(|r| r)
}

/// Acks, retrying: an ack that never lands only means a harmless redelivery.
async fn ack(
    consumer: &mut dyn Consumer,
    cfg: &WorkerConfig,
    stats: &Stats,
    stop: &Stop,
    ids: &[u64],
) -> Result<(), WorkerError> {
    let mut attempt = 0;
    loop {
        match consumer.ack(ids).await {
            Ok(()) => {
                stats.acked.fetch_add(ids.len() as u64, Relaxed);
                return Ok(());
            }
            Err(e) if e.is_retriable() => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "ack failed; retrying (the rows are committed, a redelivery would be ignored)");
                if !stop.backoff(cfg, attempt).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Writer {
    /// The CPU half of a batch: decodes it (dead-lettering what does not
    /// decode), offers it to the actions, and has the sink convert it to
    /// rows. None if shutdown's deadline came while dead-lettering.
    async fn prepare(
        &self,
        batch: Vec<Delivery>,
        stop: &Stop,
    ) -> Result<Option<Ready>, WorkerError> {
        let ids: Vec<u64> = batch.iter().map(|d| d.id).collect();
        let oldest = batch.iter().map(|d| d.received_ms).min().unwrap_or(0);
        let mut records = Vec::with_capacity(batch.len());
        for d in batch {
            match Event::from_body(d.body.clone()) {
                Ok(event) => records.push(Record::new(self.redacted(event), d.received_ms)),
                Err(e) => {
                    // The queue gave back bytes we did not put there: keep them aside.
                    tracing::error!(error = %e, key = %d.key, "undecodable message in the queue; dead-lettering it");
                    let error = format!("undecodable queue message: {e}");
                    if !self
                        .dead_letter("saltpipe/undecodable", &d.body, &error, stop)
                        .await?
                    {
                        return Ok(None);
                    }
                }
            }
        }
        if let Some(actions) = &self.actions {
            // Before the insert, as the original project did, but only a
            // hand-off: a slow or full action never delays the write.
            actions.current().offer(records.iter().map(|r| &r.event));
        }
        self.sink.prepare(&mut records);
        Ok(Some(Ready {
            ids,
            oldest,
            records,
        }))
    }

    /// The event with `[sink] redact`'s keys hidden, counted.
    fn redacted(&self, event: Event) -> Event {
        let Some(r) = &self.redact else {
            return event;
        };
        let (event, n) = r.event(event);
        if n > 0 {
            self.stats.redacted.fetch_add(n, Relaxed);
        }
        event
    }

    /// Publishes the receive time of the oldest event still being written
    /// (0: none), from the batches in flight, oldest batch first.
    fn note_oldest(&self, writing: &VecDeque<i64>) {
        let t = writing.iter().copied().min().unwrap_or(0);
        self.stats.oldest_unacked_ms.store(t, Relaxed);
    }

    /// Writes one prepared batch (retrying, splitting, dead-lettering).
    /// Returns the ids to ack, or None if shutdown's deadline came first.
    async fn commit(&self, ready: Ready, stop: &Stop) -> Result<Option<Vec<u64>>, WorkerError> {
        let Ready { ids, records, .. } = ready;
        let started = std::time::Instant::now();
        let Some(report) = self.write_all(&records, stop).await? else {
            tracing::warn!(
                events = ids.len(),
                "stopping with a batch unwritten; it stays queued for the next start"
            );
            return Ok(None);
        };
        self.stats
            .sink_latency_us_total
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        self.stats.batches.fetch_add(1, Relaxed);
        self.stats
            .batch_events
            .fetch_add(records.len() as u64, Relaxed);
        self.stats
            .returns_written
            .fetch_add(report.returns, Relaxed);
        self.stats.jids_written.fetch_add(report.jids, Relaxed);
        self.stats.events_written.fetch_add(report.events, Relaxed);
        self.stats.rows_ignored.fetch_add(report.ignored, Relaxed);
        count_outcomes(&self.stats, &records);
        Ok(Some(ids))
    }

    /// Writes `records`, retrying retriable errors and isolating refused rows.
    /// Returns None if shutdown's deadline passed while the sink was failing.
    async fn write_all(
        &self,
        records: &[Record],
        stop: &Stop,
    ) -> Result<Option<WriteReport>, WorkerError> {
        let mut total = WriteReport::default();
        // Slices still to write; refused rows are carved out of them.
        let mut todo: Vec<&[Record]> = vec![records];
        let mut attempt = 0u32;
        while let Some(part) = todo.pop() {
            if part.is_empty() {
                continue;
            }
            match self.sink.write(part).await {
                Ok(r) => {
                    attempt = 0;
                    total.returns += r.returns;
                    total.jids += r.jids;
                    total.events += r.events;
                    total.ignored += r.ignored;
                }
                Err(SinkError::Retriable(msg)) => {
                    attempt += 1;
                    events::SinkRetry {
                        error: &msg,
                        attempt,
                        events: part.len(),
                    }
                    .emit(&self.stats);
                    if !stop.backoff(&self.cfg, attempt).await {
                        return Ok(None);
                    }
                    todo.push(part);
                }
                Err(SinkError::Permanent { message, index }) => {
                    self.stats.sink_failures.fetch_add(1, Relaxed);
                    match (index, part.len()) {
                        (_, 1) => {
                            if !self.dead_letter_record(&part[0], &message, stop).await? {
                                return Ok(None);
                            }
                        }
                        (Some(i), _) if i < part.len() => {
                            if !self.dead_letter_record(&part[i], &message, stop).await? {
                                return Ok(None);
                            }
                            todo.push(&part[i + 1..]);
                            todo.push(&part[..i]);
                        }
                        _ => {
                            let (a, b) = part.split_at(part.len() / 2);
                            todo.push(b);
                            todo.push(a);
                        }
                    }
                }
                Err(e @ SinkError::Fatal(_)) => return Err(WorkerError::Sink(e)),
            }
        }
        Ok(Some(total))
    }

    async fn dead_letter_record(
        &self,
        r: &Record,
        error: &str,
        stop: &Stop,
    ) -> Result<bool, WorkerError> {
        self.dead_letter(r.event.tag(), &r.event.body, error, stop)
            .await
    }

    /// Stores one refused event aside; false if shutdown's deadline passed first.
    async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
        stop: &Stop,
    ) -> Result<bool, WorkerError> {
        let mut attempt = 0;
        loop {
            match self.sink.dead_letter(tag, body, error).await {
                Ok(()) => {
                    events::DeadLettered { tag, error }.emit(&self.stats);
                    return Ok(true);
                }
                Err(SinkError::Retriable(msg)) => {
                    attempt += 1;
                    tracing::warn!(error = %msg, attempt, "cannot write the dead-letter row yet; retrying");
                    if !stop.backoff(&self.cfg, attempt).await {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(WorkerError::Sink(e)),
            }
        }
    }
}

/// Counts the outcomes of a committed batch's returns.
fn count_outcomes(stats: &Stats, records: &[Record]) {
    let mut n = [0u64; Outcome::ALL.len()];
    for r in records {
        let o = match r.rows.as_deref() {
            Some(crate::sink::rows::RowSet::Return(row, _)) => Outcome::ALL
                .into_iter()
                .find(|o| o.as_str() == row.outcome.outcome),
            Some(_) => None,
            // Not converted ahead (a sink that converts in `write`): judge it here.
            None => (r.event.kind == crate::event::Kind::JobReturn)
                .then(|| crate::outcome::of_return(r.event.data()).outcome),
        };
        if let Some(o) = o {
            n[o.index()] += 1;
        }
    }
    for o in Outcome::ALL {
        if n[o.index()] > 0 {
            stats.count_outcome(o, n[o.index()]);
        }
    }
}

/// The return-window sweep of one worker (see the module docs).
struct Sweep {
    sink: Arc<dyn Sink>,
    window: Duration,
    stats: Arc<Stats>,
    actions: Option<Actions>,
}

/// Targets closed per transaction.
const SWEEP_CHUNK: usize = 1000;

/// Aborts the task when the worker's `run` ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Sweep {
    fn every(&self) -> Duration {
        (self.window / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    fn spawn(self, stop: CancellationToken) -> AbortOnDrop {
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(self.every()) => {}
                }
                if let Err(e) = self.round().await {
                    tracing::warn!(error = %e, "closing return windows failed; trying again later");
                }
            }
        }))
    }

    /// Closes every window due now, in chunks; returns the minions recorded silent.
    async fn round(&self) -> Result<usize, SinkError> {
        let due = std::time::SystemTime::now()
            .checked_sub(self.window)
            .unwrap_or(std::time::UNIX_EPOCH);
        let before = crate::sink::rows::stamp_of(due);
        let mut silent = 0;
        loop {
            let closed = self.sink.close_returns(&before, SWEEP_CHUNK).await?;
            self.stats
                .targets_closed
                .fetch_add(closed.targets as u64, Relaxed);
            if !closed.no_return.is_empty() {
                let n = closed.no_return.len();
                silent += n;
                self.stats.count_outcome(Outcome::NoReturn, n as u64);
                tracing::info!(
                    minions = n,
                    "return window closed without a return: recorded no_return"
                );
                if let Some(actions) = &self.actions {
                    let events: Vec<Event> = closed
                        .no_return
                        .iter()
                        .filter_map(|m| {
                            crate::outcome::no_return_event(&m.jid, &m.minion, &m.fun, &m.stamp)
                        })
                        .collect();
                    actions.current().offer(events.iter());
                }
            }
            if closed.targets < SWEEP_CHUNK {
                return Ok(silent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The worker against an in-memory queue and a scripted sink: test
    //! doubles of our own traits, so batching, retry, bisection and ack
    //! order can be checked deterministically with paused time.
    use super::*;
    use crate::bus::encode::frame_bytes;
    use crate::queue::QueueError;
    use async_trait::async_trait;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    #[derive(Default)]
    struct MemQueue {
        ready: Mutex<VecDeque<Delivery>>,
        acked: Mutex<Vec<u64>>,
        /// Says it holds a full prefetch whenever nothing is ready.
        starves: bool,
        /// Like a broker's prefetch: hands out nothing more while this many
        /// are unacked.
        prefetch: Option<usize>,
        unacked: Mutex<usize>,
    }

    struct MemConsumer(Arc<MemQueue>);

    #[async_trait]
    impl Consumer for MemConsumer {
        async fn pull(
            &mut self,
            max: usize,
            _max_bytes: usize,
            wait: Duration,
        ) -> Result<Vec<Delivery>, QueueError> {
            let got: Vec<Delivery> = {
                let mut q = self.0.ready.lock().expect("lock");
                let mut unacked = self.0.unacked.lock().expect("lock");
                let room = self
                    .0
                    .prefetch
                    .map_or(usize::MAX, |p| p.saturating_sub(*unacked));
                let n = max.min(q.len()).min(room);
                *unacked += n;
                q.drain(..n).collect()
            };
            if got.is_empty() {
                tokio::time::sleep(wait).await;
            }
            Ok(got)
        }
        async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
            self.0.acked.lock().expect("lock").extend_from_slice(ids);
            let mut unacked = self.0.unacked.lock().expect("lock");
            *unacked = unacked.saturating_sub(ids.len());
            Ok(())
        }
        async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
            Ok(Some(self.0.ready.lock().expect("lock").len() as u64))
        }
        fn starved(&self) -> bool {
            self.0.starves && self.0.ready.lock().expect("lock").is_empty()
        }
    }

    /// Fails the first `busy` writes as retriable; refuses any batch holding
    /// a tag in `poison` (naming the index only if `name_index`).
    #[derive(Default)]
    struct ScriptSink {
        busy: Mutex<u32>,
        poison: Vec<String>,
        name_index: bool,
        written: Mutex<Vec<Vec<String>>>,
        dead: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Sink for ScriptSink {
        async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
            {
                let mut b = self.busy.lock().expect("lock");
                if *b > 0 {
                    *b -= 1;
                    return Err(SinkError::Retriable("busy".into()));
                }
            }
            if let Some(i) = batch
                .iter()
                .position(|r| self.poison.iter().any(|p| p == r.event.tag()))
            {
                return Err(SinkError::Permanent {
                    message: "bad value".into(),
                    index: self.name_index.then_some(i),
                });
            }
            self.written
                .lock()
                .expect("lock")
                .push(batch.iter().map(|r| r.event.tag().to_owned()).collect());
            Ok(WriteReport {
                returns: batch.len() as u64,
                ..Default::default()
            })
        }
        async fn dead_letter(
            &self,
            tag: &str,
            _body: &bytes::Bytes,
            _error: &str,
        ) -> Result<(), SinkError> {
            self.dead.lock().expect("lock").push(tag.to_owned());
            Ok(())
        }
    }

    fn delivery(i: u64) -> Delivery {
        let f = frame_bytes(
            &format!("salt/job/{i}/ret/m"),
            &[("id", "m"), ("jid", &i.to_string())],
        );
        let e = Event::from_frame(&bytes::Bytes::from(f)).expect("event");
        Delivery {
            id: i,
            key: "m".into(),
            body: e.body,
            received_ms: 0,
        }
    }

    fn cfg(max_events: usize) -> WorkerConfig {
        WorkerConfig {
            batch_max_events: max_events,
            batch_timeout: Duration::from_millis(200),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..Default::default()
        }
    }

    async fn run(
        queue: Arc<MemQueue>,
        sink: Arc<dyn Sink>,
        cfg: WorkerConfig,
        drain: Option<Duration>,
    ) -> Arc<Stats> {
        let stats = Arc::new(Stats::default());
        let token = CancellationToken::new();
        let w = Worker::new(Box::new(MemConsumer(queue)), sink, cfg, stats.clone());
        let t = token.clone();
        let h = tokio::spawn(w.run(Stop::new(t, drain)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        token.cancel();
        h.await.expect("join").expect("worker");
        stats
    }

    #[tokio::test(start_paused = true)]
    async fn batches_close_on_count_and_everything_is_acked_after_writing() {
        let q = Arc::new(MemQueue::default());
        q.ready.lock().expect("lock").extend((1..=25).map(delivery));
        let sink = Arc::new(ScriptSink::default());
        let stats = run(q.clone(), sink.clone(), cfg(10), None).await;
        let sizes: Vec<usize> = sink
            .written
            .lock()
            .expect("lock")
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        let mut acked = q.acked.lock().expect("lock").clone();
        acked.sort();
        assert_eq!(acked, (1..=25).collect::<Vec<_>>());
        assert_eq!(stats.snapshot().batches, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn written_returns_are_counted_by_outcome() {
        let q = Arc::new(MemQueue::default());
        q.ready.lock().expect("lock").extend((1..=3).map(delivery));
        // A return Salt calls failed, and a job announcement (no outcome).
        let mut data = Vec::new();
        let _ = rmp::encode::write_map_len(&mut data, 3);
        for (k, v) in [("id", "m"), ("jid", "4")] {
            let _ = rmp::encode::write_str(&mut data, k);
            let _ = rmp::encode::write_str(&mut data, v);
        }
        let _ = rmp::encode::write_str(&mut data, "retcode");
        let _ = rmp::encode::write_uint(&mut data, 1);
        for (id, tag) in [(4, "salt/job/4/ret/m"), (5, "salt/job/5/new")] {
            let f = crate::bus::encode::frame(tag, &data);
            let e = Event::from_frame(&bytes::Bytes::from(f)).expect("event");
            q.ready.lock().expect("lock").push_back(Delivery {
                id,
                key: "m".into(),
                body: e.body,
                received_ms: 0,
            });
        }
        let sink = Arc::new(ScriptSink::default());
        let stats = run(q, sink, cfg(10), None).await;
        let o = stats.snapshot().outcomes;
        assert_eq!(
            (o.get("ok"), o.get("failed")),
            (Some(&3), Some(&1)),
            "{:?}",
            stats.snapshot()
        );
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn the_return_window_is_checked_and_read_from_toml() {
        let cfg: crate::config::Config =
            toml::from_str("[worker]\nreturn_window = \"90s\"\n").expect("parses");
        assert_eq!(cfg.worker.return_window, Duration::from_secs(90));
        assert!(cfg.worker.validate().is_ok());
        assert_eq!(
            WorkerConfig::default().return_window,
            Duration::from_secs(300)
        );
        for bad in [
            Duration::ZERO,
            Duration::from_millis(500),
            Duration::from_secs(31 * 86_400),
        ] {
            let c = WorkerConfig {
                return_window: bad,
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{bad:?}");
        }
    }

    /// Closes return windows as scripted.
    #[derive(Default)]
    struct SweepSink {
        rounds: Mutex<VecDeque<crate::sink::Closed>>,
        calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Sink for SweepSink {
        async fn write(&self, _: &[Record]) -> Result<WriteReport, SinkError> {
            Ok(WriteReport::default())
        }
        async fn dead_letter(&self, _: &str, _: &bytes::Bytes, _: &str) -> Result<(), SinkError> {
            Ok(())
        }
        async fn close_returns(
            &self,
            before: &str,
            _limit: usize,
        ) -> Result<crate::sink::Closed, SinkError> {
            self.calls.lock().expect("lock").push(before.to_owned());
            Ok(self
                .rounds
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or_default())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_closes_windows_and_counts_silent_minions() {
        let sink = Arc::new(SweepSink::default());
        let silent = |m: &str| crate::sink::NoReturn {
            jid: "20261202120000000000".into(),
            minion: m.into(),
            fun: "state.apply".into(),
            stamp: "2026-12-02 12:00:00.000000".into(),
        };
        sink.rounds.lock().expect("lock").extend([
            crate::sink::Closed {
                targets: SWEEP_CHUNK,
                no_return: vec![silent("m1")],
            },
            // The rest of the same round: fewer than a chunk ends it.
            crate::sink::Closed {
                targets: 3,
                no_return: vec![silent("m2"), silent("m3")],
            },
        ]);
        let mut c = cfg(10);
        c.return_window = Duration::from_secs(10);
        let stats = run(Arc::new(MemQueue::default()), sink.clone(), c, None).await;
        assert_eq!(stats.snapshot().outcomes.get("no_return"), Some(&3));
        assert_eq!(stats.targets_closed.load(Relaxed), SWEEP_CHUNK as u64 + 3);
        // Every second (window / 10) over the run's 5 s of paused time; a
        // full chunk asks again at once.
        let calls = sink.calls.lock().expect("lock").clone();
        assert!(calls.len() >= 4, "{calls:?}");
        assert_eq!(calls[0], calls[1], "the same round");
        assert_eq!(calls[0].len(), "2026-12-02 12:00:00.000000".len());
    }

    /// Takes two batches at once; the first one is slow to write.
    #[derive(Default)]
    struct TwoWriters {
        now: Mutex<(usize, usize)>,
        finished: Mutex<Vec<u64>>,
    }

    #[async_trait]
    impl Sink for TwoWriters {
        fn writers(&self) -> usize {
            2
        }
        async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
            {
                let mut n = self.now.lock().expect("lock");
                n.0 += 1;
                n.1 = n.1.max(n.0);
            }
            // Tags are `salt/job/<i>/ret/m`: the batch's first delivery.
            let first: u64 = batch[0]
                .event
                .tag()
                .split('/')
                .nth(2)
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            if first == 1 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            self.now.lock().expect("lock").0 -= 1;
            self.finished.lock().expect("lock").push(first);
            Ok(WriteReport {
                returns: batch.len() as u64,
                ..Default::default()
            })
        }
        async fn dead_letter(&self, _: &str, _: &bytes::Bytes, _: &str) -> Result<(), SinkError> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sink_with_two_writers_takes_two_batches_at_once_and_acks_stay_in_order() {
        let q = Arc::new(MemQueue::default());
        q.ready.lock().expect("lock").extend((1..=30).map(delivery));
        let sink = Arc::new(TwoWriters::default());
        run(q.clone(), sink.clone(), cfg(10), None).await;
        assert_eq!(sink.now.lock().expect("lock").1, 2, "two writes at once");
        assert_eq!(
            *sink.finished.lock().expect("lock"),
            vec![11, 1, 21],
            "the second batch committed while the slow first one was written; the \
             third waited: at most two batches are held unacked"
        );
        assert_eq!(
            *q.acked.lock().expect("lock"),
            (1..=30).collect::<Vec<_>>(),
            "acks in batch order all the same"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn draining_waits_for_acks_when_the_prefetch_holds_the_rest_back() {
        // A broker hands out one batch's worth until it is acked: when the
        // drain starts, a pull comes back empty while batches are still
        // being written, and that is not an empty queue.
        let q = Arc::new(MemQueue {
            prefetch: Some(10),
            ..Default::default()
        });
        q.ready.lock().expect("lock").extend((1..=45).map(delivery));
        let stats = Arc::new(Stats::default());
        let token = CancellationToken::new();
        token.cancel();
        let sink: Arc<dyn Sink> = Arc::new(ScriptSink::default());
        let w = Worker::new(
            Box::new(MemConsumer(q.clone())),
            sink,
            cfg(10),
            stats.clone(),
        );
        w.run(Stop::new(token, None)).await.expect("worker");
        let mut acked = q.acked.lock().expect("lock").clone();
        acked.sort();
        assert_eq!(acked, (1..=45).collect::<Vec<_>>(), "drained to the end");
        assert!(q.ready.lock().expect("lock").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_event_is_written_by_the_timer_on_a_quiet_queue() {
        let q = Arc::new(MemQueue::default());
        q.ready.lock().expect("lock").push_back(delivery(1));
        let sink = Arc::new(ScriptSink::default());
        let stats = Arc::new(Stats::default());
        let token = CancellationToken::new();
        let w = Worker::new(
            Box::new(MemConsumer(q.clone())),
            sink.clone(),
            cfg(1000),
            stats.clone(),
        );
        let h = tokio::spawn(w.run(Stop::new(token.clone(), None)));
        // Well before any shutdown: the batch timer (200 ms) fires by itself.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(sink.written.lock().expect("lock").len(), 1);
        assert_eq!(*q.acked.lock().expect("lock"), vec![1]);
        token.cancel();
        h.await.expect("join").expect("worker");
    }

    #[tokio::test(start_paused = true)]
    async fn a_starved_consumer_closes_the_batch_without_waiting_for_the_timer() {
        let q = Arc::new(MemQueue {
            starves: true,
            ..Default::default()
        });
        q.ready.lock().expect("lock").extend((1..=3).map(delivery));
        let sink = Arc::new(ScriptSink::default());
        let token = CancellationToken::new();
        let w = Worker::new(
            Box::new(MemConsumer(q.clone())),
            sink.clone(),
            cfg(1000),
            Arc::new(Stats::default()),
        );
        let h = tokio::spawn(w.run(Stop::new(token.clone(), None)));
        // Far less than the 200 ms batch timeout (the ack follows within
        // ACK_WAIT): nothing more can come before an ack, so waiting for
        // the timer would only stall.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(sink.written.lock().expect("lock").len(), 1);
        assert_eq!(*q.acked.lock().expect("lock"), vec![1, 2, 3]);
        token.cancel();
        h.await.expect("join").expect("worker");
    }

    #[tokio::test(start_paused = true)]
    async fn retriable_errors_hold_the_batch_and_ack_only_after_success() {
        let q = Arc::new(MemQueue::default());
        q.ready.lock().expect("lock").extend((1..=5).map(delivery));
        let sink = Arc::new(ScriptSink {
            busy: Mutex::new(3),
            ..Default::default()
        });
        let stats = run(q.clone(), sink.clone(), cfg(10), None).await;
        assert_eq!(sink.written.lock().expect("lock").len(), 1);
        assert_eq!(q.acked.lock().expect("lock").len(), 5);
        assert_eq!(stats.snapshot().sink_retries, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_row_is_dead_lettered_and_the_rest_lands() {
        for name_index in [true, false] {
            let q = Arc::new(MemQueue::default());
            q.ready.lock().expect("lock").extend((1..=9).map(delivery));
            let sink = Arc::new(ScriptSink {
                poison: vec!["salt/job/4/ret/m".into()],
                name_index,
                ..Default::default()
            });
            let stats = run(q.clone(), sink.clone(), cfg(100), None).await;
            let mut landed: Vec<String> = sink.written.lock().expect("lock").concat();
            landed.sort();
            assert_eq!(landed.len(), 8, "name_index {name_index}");
            assert!(!landed.contains(&"salt/job/4/ret/m".to_string()));
            assert_eq!(*sink.dead.lock().expect("lock"), vec!["salt/job/4/ret/m"]);
            assert_eq!(
                q.acked.lock().expect("lock").len(),
                9,
                "the dead-lettered row is acked too"
            );
            assert_eq!(stats.snapshot().dead_letters, 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_with_the_sink_down_leaves_the_batch_unacked() {
        let q = Arc::new(MemQueue::default());
        q.ready.lock().expect("lock").extend((1..=3).map(delivery));
        let sink = Arc::new(ScriptSink {
            busy: Mutex::new(u32::MAX),
            ..Default::default()
        });
        run(
            q.clone(),
            sink.clone(),
            cfg(10),
            Some(Duration::from_secs(2)),
        )
        .await;
        assert!(sink.written.lock().expect("lock").is_empty());
        assert!(
            q.acked.lock().expect("lock").is_empty(),
            "nothing acked that was not written"
        );
    }
}
