//! The write stage: each prepared batch in a task of its own, up to
//! `Sink::writers` at once, committed ids reported in batch order.
//!
//! A task per batch, not a future polled inside this loop: the MySQL and
//! PostgreSQL sinks' writes are socket I/O driven by polling, and a write
//! must keep moving whatever else the worker is doing (the prepare stage's
//! conversion of the next batch, an ack). SQLite writes on the blocking
//! pool either way.
//!
//! [`Store`] is the sink with the worker's failure policy: retriable errors
//! are retried with backoff for as long as it takes (within a shutdown's
//! drain deadline), a permanent error is narrowed to the row that caused it
//! (by the index the sink reports, else by halving), the rest is written and
//! that row goes to the dead-letter table with its error.

use super::prepare::Ready;
use super::{Stop, WorkerConfig, WorkerError};
use crate::backoff::Backoff;
use crate::outcome::Outcome;
use crate::sink::{Record, Sink, SinkError, WriteReport};
use crate::stats::{Stats, events};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

pub(super) struct Write {
    pub store: Arc<Store>,
    pub stop: Stop,
    /// From the prepare stage.
    pub ready: mpsc::Receiver<Ready>,
    /// To the gather stage, which acks.
    pub committed: mpsc::UnboundedSender<Vec<u64>>,
}

/// A batch's write, or None if shutdown's deadline came first.
type Commit = Result<Option<Vec<u64>>, WorkerError>;

impl Write {
    pub async fn run(mut self) -> Result<(), WorkerError> {
        let writers = self.store.sink.writers().max(1);
        // Aborted if this stage ends with an error: their batches stay
        // unacked and come back at the next start.
        let mut writing: FuturesOrdered<AbortOnDropHandle<Commit>> = FuturesOrdered::new();
        // Receive times of the oldest event of each batch being written.
        let mut oldest: VecDeque<i64> = VecDeque::new();
        let mut open = true;
        loop {
            if !open && writing.is_empty() {
                return Ok(());
            }
            tokio::select! {
                Some(done) = writing.next(), if !writing.is_empty() => {
                    oldest.pop_front();
                    self.note_oldest(&oldest);
                    // An error ends the worker at once. The gatherer may be
                    // gone after its own error; then the ids simply stay
                    // unacked.
                    if let Some(ids) = done.map_err(WorkerError::join)?? {
                        let _ = self.committed.send(ids);
                    }
                }
                ready = self.ready.recv(), if open && writing.len() < writers => match ready {
                    Some(ready) => {
                        oldest.push_back(ready.oldest);
                        self.note_oldest(&oldest);
                        let store = self.store.clone();
                        let stop = self.stop.clone();
                        writing.push_back(AbortOnDropHandle::new(tokio::spawn(async move {
                            store.commit(ready, &stop).await
                        })));
                    }
                    None => open = false,
                },
            }
        }
    }

    /// Publishes the receive time of the oldest event still being written
    /// (0: none), from the batches in flight.
    fn note_oldest(&self, writing: &VecDeque<i64>) {
        let t = writing.iter().copied().min().unwrap_or(0);
        self.store.stats.oldest_unacked_ms.store(t, Relaxed);
    }
}

/// The sink, with the worker's retry, isolation and dead-letter policy.
pub(super) struct Store {
    pub sink: Arc<dyn Sink>,
    pub cfg: WorkerConfig,
    pub stats: Arc<Stats>,
}

impl Store {
    fn backoff(&self) -> Backoff {
        Backoff::new(self.cfg.retry_min, self.cfg.retry_max)
    }

    /// Writes one prepared batch (retrying, splitting, dead-lettering).
    /// Returns the ids to ack, or None if shutdown's deadline came first.
    async fn commit(&self, ready: Ready, stop: &Stop) -> Commit {
        // `_charge` lives until the write ends, whichever way: then the
        // batch's memory is given back and the gatherer may pull again.
        let Ready {
            ids,
            records,
            charge: _charge,
            ..
        } = ready;
        let started = std::time::Instant::now();
        let Some(report) = self.write_all(&records, stop).await? else {
            tracing::warn!(
                events = ids.len(),
                "stopping with a batch unwritten; it stays queued for the next start"
            );
            return Ok(None);
        };
        let s = &self.stats;
        s.sink_latency_us_total
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        s.batches.fetch_add(1, Relaxed);
        s.batch_events.fetch_add(records.len() as u64, Relaxed);
        s.returns_written.fetch_add(report.returns, Relaxed);
        s.jids_written.fetch_add(report.jids, Relaxed);
        s.events_written.fetch_add(report.events, Relaxed);
        s.rows_ignored.fetch_add(report.ignored, Relaxed);
        count_outcomes(s, &records);
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
        let mut backoff = self.backoff();
        while let Some(part) = todo.pop() {
            if part.is_empty() {
                continue;
            }
            match self.sink.write(part).await {
                Ok(r) => {
                    backoff.reset();
                    total.returns += r.returns;
                    total.jids += r.jids;
                    total.events += r.events;
                    total.ignored += r.ignored;
                }
                Err(SinkError::Retriable(msg)) => {
                    let delay = backoff.fail();
                    events::SinkRetry {
                        error: &msg,
                        attempt: backoff.failures(),
                        events: part.len(),
                    }
                    .emit(&self.stats);
                    if !stop.pause(delay).await {
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
    pub async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
        stop: &Stop,
    ) -> Result<bool, WorkerError> {
        let mut backoff = self.backoff();
        loop {
            match self.sink.dead_letter(tag, body, error).await {
                Ok(()) => {
                    events::DeadLettered { tag, error }.emit(&self.stats);
                    return Ok(true);
                }
                Err(SinkError::Retriable(msg)) => {
                    let delay = backoff.fail();
                    tracing::warn!(error = %msg, attempt = backoff.failures(), "cannot write the dead-letter row yet; retrying");
                    if !stop.pause(delay).await {
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
                .then(|| crate::outcome::of_event_return(&r.event).outcome),
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
