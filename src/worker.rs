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

use crate::config::{ConfigError, human};
use crate::event::Event;
use crate::queue::{Consumer, Delivery};
use crate::sink::{Record, Sink, SinkError, WriteReport};
use crate::stats::{Stats, events};
use rand::Rng;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
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
}

/// One worker: one consumer, one sink.
pub struct Worker {
    consumer: Box<dyn Consumer>,
    sink: Arc<dyn Sink>,
    cfg: WorkerConfig,
    stats: Arc<Stats>,
}

/// How long an idle pull waits before checking for shutdown again.
const IDLE_WAIT: Duration = Duration::from_millis(500);

impl Worker {
    pub fn new(
        consumer: Box<dyn Consumer>,
        sink: Arc<dyn Sink>,
        cfg: WorkerConfig,
        stats: Arc<Stats>,
    ) -> Worker {
        Worker {
            consumer,
            sink,
            cfg,
            stats,
        }
    }

    pub async fn run(mut self, stop: Stop) -> Result<(), WorkerError> {
        let max_bytes = self.cfg.batch_max_bytes as usize;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let draining = stop.token.is_cancelled();
            if draining && drain_deadline.is_none() {
                drain_deadline = Some(stop.drain.map_or_else(far_future, |d| Instant::now() + d));
            }
            if drain_deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
            // Gather one batch.
            let mut batch: Vec<Delivery> = Vec::new();
            let mut bytes = 0usize;
            let mut closes_at: Option<Instant> = None;
            loop {
                let room = self.cfg.batch_max_events - batch.len();
                if room == 0 || bytes >= max_bytes {
                    break;
                }
                let wait = match closes_at {
                    Some(t) => t.saturating_duration_since(Instant::now()),
                    None if draining => Duration::ZERO,
                    None => IDLE_WAIT,
                };
                let got = if closes_at.is_none() && !draining {
                    tokio::select! {
                        _ = stop.token.cancelled() => break,
                        r = self.consumer.pull(room, max_bytes - bytes, wait) => r?,
                    }
                } else {
                    self.consumer.pull(room, max_bytes - bytes, wait).await?
                };
                if got.is_empty() {
                    if closes_at.is_some_and(|t| Instant::now() >= t)
                        || draining
                        || closes_at.is_none()
                    {
                        break;
                    }
                    continue;
                }
                if closes_at.is_none() {
                    closes_at = Some(Instant::now() + self.cfg.batch_timeout);
                }
                bytes += got.iter().map(|d| d.body.len()).sum::<usize>();
                self.stats.delivered.fetch_add(got.len() as u64, Relaxed);
                batch.extend(got);
            }
            if batch.is_empty() {
                if draining {
                    return Ok(());
                }
                continue;
            }
            self.flush(batch, &stop, drain_deadline).await?;
        }
    }

    /// Writes one batch (retrying, splitting, dead-lettering) and acks it.
    async fn flush(
        &mut self,
        batch: Vec<Delivery>,
        stop: &Stop,
        drain_deadline: Option<Instant>,
    ) -> Result<(), WorkerError> {
        let ids: Vec<u64> = batch.iter().map(|d| d.id).collect();
        let oldest = batch.iter().map(|d| d.received_ms).min().unwrap_or(0);
        self.stats.oldest_unacked_ms.store(oldest, Relaxed);
        let mut records = Vec::with_capacity(batch.len());
        for d in batch {
            match Event::from_body(d.body.clone()) {
                Ok(event) => records.push(Record {
                    event,
                    received_ms: d.received_ms,
                }),
                Err(e) => {
                    // The queue gave back bytes we did not put there: keep them aside.
                    tracing::error!(error = %e, key = %d.key, "undecodable message in the queue; dead-lettering it");
                    let error = format!("undecodable queue message: {e}");
                    if !self
                        .dead_letter(
                            "saltpipe/undecodable",
                            &d.body,
                            &error,
                            stop,
                            drain_deadline,
                        )
                        .await?
                    {
                        return Ok(());
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        let report = self.write_all(&records, stop, drain_deadline).await?;
        let Some(report) = report else {
            // Shutdown while the sink was down: leave the batch in the queue.
            tracing::warn!(
                events = ids.len(),
                "stopping with a batch unwritten; it stays queued for the next start"
            );
            return Ok(());
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
        self.ack(&ids, stop, drain_deadline).await?;
        self.stats.acked.fetch_add(ids.len() as u64, Relaxed);
        self.stats.oldest_unacked_ms.store(0, Relaxed);
        Ok(())
    }

    /// Acks, retrying: an ack that never lands only means a harmless redelivery.
    async fn ack(
        &mut self,
        ids: &[u64],
        stop: &Stop,
        drain_deadline: Option<Instant>,
    ) -> Result<(), WorkerError> {
        let mut attempt = 0;
        loop {
            match self.consumer.ack(ids).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retriable() => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "ack failed; retrying (the rows are committed, a redelivery would be ignored)");
                    if !self.backoff(attempt, stop, drain_deadline).await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sleeps before retry `attempt`; false if the drain deadline passed.
    async fn backoff(&self, attempt: u32, stop: &Stop, drain_deadline: Option<Instant>) -> bool {
        let base = self
            .cfg
            .retry_min
            .saturating_mul(1u32 << attempt.min(16).saturating_sub(1));
        let delay = base
            .min(self.cfg.retry_max)
            .mul_f64(rand::rng().random_range(0.5..1.0));
        let until = Instant::now() + delay;
        let deadline = match (stop.token.is_cancelled(), drain_deadline, stop.drain) {
            (true, Some(d), _) => Some(d),
            (true, None, Some(d)) => Some(Instant::now() + d),
            _ => None,
        };
        if deadline.is_some_and(|d| until > d) {
            return false;
        }
        tokio::time::sleep_until(until).await;
        true
    }

    /// Writes `records`, retrying retriable errors and isolating refused rows.
    /// Returns None if shutdown's deadline passed while the sink was failing.
    async fn write_all(
        &mut self,
        records: &[Record],
        stop: &Stop,
        drain_deadline: Option<Instant>,
    ) -> Result<Option<WriteReport>, WorkerError> {
        let mut total = WriteReport::default();
        // Work list of slices still to write; refused rows are carved out.
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
                        delay_ms: self.cfg.retry_min.as_millis() as u64,
                        events: part.len(),
                    }
                    .emit(&self.stats);
                    if !self.backoff(attempt, stop, drain_deadline).await {
                        return Ok(None);
                    }
                    todo.push(part);
                }
                Err(SinkError::Permanent { message, index }) => {
                    self.stats.sink_failures.fetch_add(1, Relaxed);
                    match (index, part.len()) {
                        (_, 1) => {
                            if !self
                                .dead_letter_record(&part[0], &message, stop, drain_deadline)
                                .await?
                            {
                                return Ok(None);
                            }
                        }
                        (Some(i), _) if i < part.len() => {
                            if !self
                                .dead_letter_record(&part[i], &message, stop, drain_deadline)
                                .await?
                            {
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
        &mut self,
        r: &Record,
        error: &str,
        stop: &Stop,
        drain_deadline: Option<Instant>,
    ) -> Result<bool, WorkerError> {
        self.dead_letter(r.event.tag(), &r.event.body, error, stop, drain_deadline)
            .await
    }

    /// Stores one refused event aside; false if shutdown's deadline passed first.
    async fn dead_letter(
        &mut self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
        stop: &Stop,
        drain_deadline: Option<Instant>,
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
                    if !self.backoff(attempt, stop, drain_deadline).await {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(WorkerError::Sink(e)),
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}
