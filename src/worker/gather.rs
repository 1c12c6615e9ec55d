//! The gather stage: pulls deliveries from the queue into batches, hands
//! them to the prepare stage, and acks what the write stage committed.
//!
//! One task owns the consumer, so pulling and acking never race: a broker's
//! consumer is not shareable, and an ack must not be sent on a connection
//! that a pull is reconnecting.

use super::{Batch, Stop, WorkerConfig, WorkerError};
use crate::backoff::Backoff;
use crate::memory::{Charge, Part};
use crate::queue::Consumer;
use crate::stats::Stats;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long an idle pull waits before checking for shutdown again.
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// ...and how long while batches whose acks are due are in flight, so a
/// committed batch is acked promptly even on a quiet queue.
const ACK_WAIT: Duration = Duration::from_millis(20);
/// How long a worker pauses when the listener is behind (see `pull_batch`).
const YIELD_WAIT: Duration = Duration::from_millis(20);
/// How often a worker asks its queue how deep it is (for `/metrics`).
const DEPTH_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Gather {
    pub consumer: Box<dyn Consumer>,
    pub cfg: WorkerConfig,
    pub stats: Arc<Stats>,
    pub stop: Stop,
    /// From the write stage: the ids of each committed batch, in batch order.
    pub committed: mpsc::UnboundedReceiver<Vec<u64>>,
    pub depth: DepthPoll,
    /// The worker's part of the memory budget (shared by every worker).
    pub memory: Arc<Part>,
    /// The listener's part (a limit of 0 in `work`, which has no
    /// listener): the worker yields while it fills.
    pub listener: Arc<Part>,
}

impl Gather {
    /// Gathers batches into `batches` (the prepare stage) until shutdown
    /// (then drains) or until the stages downstream end; then acks every
    /// commit they report until they are done.
    pub async fn run(mut self, batches: mpsc::Sender<Batch>) -> Result<(), WorkerError> {
        self.gather(&batches).await?;
        // No more batches: the stages downstream finish what they hold
        // (within the drain deadline) and close `committed`.
        drop(batches);
        while let Some(ids) = self.committed.recv().await {
            self.ack(&ids).await?;
        }
        Ok(())
    }

    async fn gather(&mut self, batches: &mpsc::Sender<Batch>) -> Result<(), WorkerError> {
        let max_bytes = batch_bytes(self.cfg.batch_max_bytes, &self.memory);
        // Batches handed on and not yet acked.
        let mut in_flight = 0usize;
        loop {
            self.depth.poll(self.consumer.as_mut(), &self.stats).await;
            while let Ok(ids) = self.committed.try_recv() {
                self.ack(&ids).await?;
                in_flight = in_flight.saturating_sub(1);
            }
            let draining = self.stop.token.is_cancelled();
            if self.stop.past_deadline() {
                return Ok(());
            }
            let batch = self.pull_batch(max_bytes, draining, in_flight).await?;
            if batch.deliveries.is_empty() {
                if draining {
                    if in_flight == 0 {
                        return Ok(());
                    }
                    // Nothing came, but batches are still being written: a
                    // broker holds back what our unacked messages keep out
                    // of the prefetch, so the queue is not known empty
                    // until they are acked. Wait for the writer, then look
                    // again (within the drain deadline).
                    let until = self.stop.deadline().unwrap_or_else(Instant::now);
                    match tokio::time::timeout_at(until, self.committed.recv()).await {
                        Ok(Some(ids)) => {
                            self.ack(&ids).await?;
                            in_flight = in_flight.saturating_sub(1);
                        }
                        // The writer ended (its result is the worker's), or
                        // the deadline passed: what is left stays queued.
                        Ok(None) | Err(_) => return Ok(()),
                    }
                }
                continue;
            }
            self.depth.newest_handed_ms = batch
                .deliveries
                .iter()
                .map(|d| d.received_ms)
                .max()
                .unwrap_or(0);
            // Hand over; while the stages downstream are busy, keep acking
            // what they finished.
            let mut pending = Some(batch);
            while let Some(b) = pending.take() {
                tokio::select! {
                    permit = batches.reserve() => match permit {
                        Ok(p) => {
                            p.send(b);
                            in_flight += 1;
                        }
                        // The prepare stage ended (an error, or the
                        // writer's): the worker's result is theirs.
                        Err(_) => return Ok(()),
                    },
                    Some(ids) = self.committed.recv() => {
                        self.ack(&ids).await?;
                        in_flight = in_flight.saturating_sub(1);
                        pending = Some(b);
                    }
                }
            }
        }
    }

    /// One batch: pulls until it is full or due, or nothing more comes.
    async fn pull_batch(
        &mut self,
        max_bytes: usize,
        mut draining: bool,
        in_flight: usize,
    ) -> Result<Batch, WorkerError> {
        let mut batch = Batch {
            deliveries: Vec::new(),
            charge: Charge::none(),
        };
        let mut bytes = 0usize;
        let mut closes_at: Option<Instant> = None;
        loop {
            let room = self.cfg.batch_max_events - batch.deliveries.len();
            if room == 0
                || bytes >= max_bytes
                || (!batch.deliveries.is_empty() && self.consumer.starved())
            {
                return Ok(batch);
            }
            // The bus first: while the listener's backlog is over half its
            // part (the queue writer behind a burst), pulling more would
            // take the CPU and the queue's write lock from the queue writer,
            // and a full backlog drops events. The queue holds what waits.
            if !draining && self.listener.past_half() {
                if batch.deliveries.is_empty() {
                    self.stats.worker_yields.fetch_add(1, Relaxed);
                    tokio::time::sleep(YIELD_WAIT).await;
                }
                return Ok(batch);
            }
            // The worker's memory is full (batches converting and being
            // written): close this batch, or, with none, wait for a write
            // to finish. The queue holds the rest, durably.
            if self.memory.room() == 0 {
                if !batch.deliveries.is_empty() {
                    return Ok(batch);
                }
                tokio::select! {
                    _ = self.memory.admit() => {}
                    // Back to the caller now and then: acks, shutdown.
                    _ = tokio::time::sleep(IDLE_WAIT) => return Ok(batch),
                }
            }
            let max_pull = (max_bytes - bytes).min(self.memory.room()).max(1);
            // While draining, a partial batch does not wait out its
            // timeout either: whatever the queue holds comes at once.
            let wait = match closes_at {
                Some(t) if draining => t
                    .saturating_duration_since(Instant::now())
                    .min(self.consumer.drain_wait()),
                Some(t) => t.saturating_duration_since(Instant::now()),
                None if draining => self.consumer.drain_wait(),
                None if in_flight > 0 => ACK_WAIT,
                None => IDLE_WAIT,
            };
            let got = if draining {
                self.consumer.pull(room, max_pull, wait).await?
            } else {
                tokio::select! {
                    _ = self.stop.token.cancelled() => {
                        if closes_at.is_none() {
                            return Ok(batch);
                        }
                        // A partial batch does not wait out its timeout
                        // once the stop comes (up to `batch_timeout` added
                        // to every shutdown and to the end of every
                        // replay): it drains, as above.
                        draining = true;
                        continue;
                    }
                    r = self.consumer.pull(room, max_pull, wait) => r?,
                }
            };
            if got.is_empty() {
                // Nothing came: the batch is due, or there is none.
                if closes_at.is_none_or(|t| Instant::now() >= t) || draining {
                    return Ok(batch);
                }
                continue;
            }
            if closes_at.is_none() {
                closes_at = Some(Instant::now() + self.cfg.batch_timeout);
            }
            let got_bytes = got.iter().map(|d| d.body.len()).sum::<usize>();
            bytes += got_bytes;
            batch.charge.merge(self.memory.charge(got_bytes));
            self.stats.delivered.fetch_add(got.len() as u64, Relaxed);
            batch.deliveries.extend(got);
        }
    }

    /// Acks, retrying: an ack that never lands only means a harmless redelivery.
    async fn ack(&mut self, ids: &[u64]) -> Result<(), WorkerError> {
        let mut backoff = Backoff::new(self.cfg.retry_min, self.cfg.retry_max);
        loop {
            match self.consumer.ack(ids).await {
                Ok(()) => {
                    self.stats.acked.fetch_add(ids.len() as u64, Relaxed);
                    return Ok(());
                }
                Err(e) if e.is_retriable() => {
                    let delay = backoff.fail();
                    tracing::warn!(error = %e, attempt = backoff.failures(), "ack failed; retrying (the rows are committed, a redelivery would be ignored)");
                    if !self.stop.pause(delay).await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A batch's size in bytes: `batch_max_bytes`, and at most an eighth of
/// the worker's memory, so that the batches a worker holds at once (one
/// gathering, one converting, one ready, `writers` being written, each
/// converted batch holding its events about three times over: raw, rows,
/// statement) stay near the part's limit instead of several times it.
fn batch_bytes(batch_max_bytes: u64, memory: &Part) -> usize {
    let configured = usize::try_from(batch_max_bytes).unwrap_or(usize::MAX);
    configured.min((memory.limit() / 8).max(64 << 10))
}

/// Publishes the queue's depth and the age of its oldest waiting event.
pub(super) struct DepthPoll {
    queue: Option<String>,
    last: Option<Instant>,
    /// Newest receive time of the last batch handed on: what still waits
    /// is at least this recent, which bounds the oldest event's age.
    newest_handed_ms: i64,
}

impl DepthPoll {
    pub fn new(queue: Option<String>) -> DepthPoll {
        DepthPoll {
            queue,
            last: None,
            newest_handed_ms: 0,
        }
    }

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
