//! Workers: queue → batch → sink → ack, as three stages joined by channels.
//!
//! ```text
//!            Vec<Delivery>             Ready                 committed ids
//! Gather ──────────────────▶ Prepare ─────────▶ Write ───────────────────▶ Gather
//! (gather.rs)   cap 1      (prepare.rs) cap 1  (write.rs)    (acks them, in order)
//! ```
//!
//! - [`gather::Gather`] pulls deliveries from the queue into batches and
//!   acks what the writer committed. A batch closes on whichever comes
//!   first: `batch_max_events`, `batch_max_bytes`, or `batch_timeout`
//!   after its first event (a deadline that fires by itself, so a quiet bus
//!   never leaves events waiting, unlike Salt's
//!   `event_return_queue_max_seconds`).
//! - [`prepare::Prepare`] decodes a batch (dead-lettering what does not
//!   decode), has the sink convert it into rows and hides `[sink]
//!   redact`'s keys (checked as the rows are transcoded, so an event
//!   without them is walked once), on the blocking pool: it is pure CPU,
//!   and on a runtime thread it would hold up the tasks that drive the
//!   database's sockets. Then it offers the batch to the actions (a
//!   non-blocking hand-off: a slow action never holds back the write).
//! - [`write::Write`] writes each prepared batch in its own task, up to
//!   `Sink::writers` at once (a database server runs one statement on one
//!   core; a second batch keeps a second core busy), retrying retriable
//!   errors with backoff for as long as it takes and narrowing a permanent
//!   error down to the row that caused it (by the index the sink reports,
//!   or by halving), which goes to the dead-letter table so one bad value
//!   never blocks the others. Commits are reported in batch order.
//!
//! So the queue, the conversion of batch N+1 and the database's write of
//! batch N (and N-1) happen at the same time, on every sink: the write
//! futures live in tasks of their own, polled while the next batch
//! converts. Each channel holds one batch and the prepare stage takes a
//! batch only when the writer has room for it, so a worker holds at most
//! `writers + 3` batches in memory (writing, one ready, one waiting to be
//! converted, one being gathered).
//!
//! Acks follow the commit, never precede it: a crash anywhere before the
//! ack means the batch comes back after the restart, and the sinks' unique
//! keys make the second write a no-op.
//!
//! On shutdown ([`Stop`]) the gatherer stops waiting for new events and
//! drains what the queue already holds for at most `drain_timeout`; the
//! stages finish what they hold within that deadline, the commits are
//! acked, and whatever is left stays in the durable queue for the next
//! start.
//!
//! Who did not return is decided here, not in the listener: only the
//! database knows which targets a return reached, whichever listener or
//! worker wrote it. Each worker runs a small sweep ([`sweep`]) every
//! `return_window / 10` (1-30 s) that asks the sink to close the windows of
//! jobs announced more than `return_window` ago ([`Sink::close_returns`]:
//! idempotent SQL, so several workers or a restart are harmless) and
//! offers one synthetic `saltpipe/no_return/<jid>/<minion>` event per
//! silent minion to the actions, so `when = { outcome = "no_return" }`
//! fires once per silent minion.

mod config;
mod gather;
mod prepare;
mod sweep;
mod write;

pub use config::WorkerConfig;

use crate::action::Actions;
use crate::queue::Consumer;
use crate::sink::{Sink, SinkError};
use crate::stats::Stats;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A gathered batch, and the memory it is charged against the worker's
/// part (carried through the stages, given back when its write ends).
pub(super) struct Batch {
    pub deliveries: Vec<crate::queue::Delivery>,
    pub charge: crate::memory::Charge,
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue: {0}")]
    Queue(#[from] crate::queue::QueueError),
    #[error("sink: {0}")]
    Sink(SinkError),
}

impl WorkerError {
    /// A stage's task panicked or was cancelled.
    fn join(e: tokio::task::JoinError) -> WorkerError {
        WorkerError::Sink(SinkError::Fatal(format!("worker stage ended: {e}")))
    }
}

/// When a worker should stop.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Fires when the worker should stop waiting for new events.
    pub token: CancellationToken,
    /// How long to keep draining after that; `None` drains until empty (replay).
    pub drain: Option<Duration>,
    /// Set the first time anyone notices the token fired: every stage of a
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

    /// Sleeps `delay` before a retry; false (at once) if that would pass
    /// the drain deadline.
    async fn pause(&self, delay: Duration) -> bool {
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

/// One worker: one consumer, one sink, three stages.
pub struct Worker {
    consumer: Box<dyn Consumer>,
    sink: Arc<dyn Sink>,
    cfg: WorkerConfig,
    stats: Arc<Stats>,
    /// Offered each batch before its insert, never waited for.
    actions: Option<Actions>,
    /// `[sink] redact`: applied before the actions and the write see a batch.
    redact: Option<Arc<crate::redact::KeyRedactor>>,
    /// The queue's name, for its depth figure.
    queue: Option<String>,
}

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
            actions: None,
            redact: None,
            queue: None,
        }
    }

    /// Hides these keys' values in every event before actions and the sink see it.
    pub fn with_redact(mut self, redact: Arc<crate::redact::KeyRedactor>) -> Worker {
        self.redact = (!redact.is_empty()).then_some(redact);
        self
    }

    /// Offers each batch's events to these actions before writing it.
    pub fn with_actions(mut self, actions: Actions) -> Worker {
        self.actions = Some(actions);
        self
    }

    /// Names the queue, so its depth and age are published.
    pub fn with_queue_name(mut self, queue: &str) -> Worker {
        self.queue = Some(queue.to_owned());
        self
    }

    /// Runs the three stages (and the return-window sweep) until `stop`
    /// and the drain are done, or a stage fails; the first error wins.
    pub async fn run(self, stop: Stop) -> Result<(), WorkerError> {
        let Worker {
            consumer,
            sink,
            cfg,
            stats,
            actions,
            redact,
            queue,
        } = self;
        let _alive = Alive::new(&stats);
        let _sweep = sweep::Sweep {
            sink: sink.clone(),
            window: cfg.return_window,
            stats: stats.clone(),
            actions: actions.clone(),
        }
        .spawn(stop.token.clone());
        let store = Arc::new(write::Store {
            sink,
            cfg: cfg.clone(),
            stats: stats.clone(),
        });
        let (batches, to_prepare) = mpsc::channel(1);
        let (ready, to_write) = mpsc::channel(1);
        let (committed, to_ack) = mpsc::unbounded_channel();
        let prepare = tokio::spawn(
            prepare::Prepare {
                store: store.clone(),
                actions,
                redact,
                stop: stop.clone(),
                batches: to_prepare,
                ready,
            }
            .run(),
        );
        let write = tokio::spawn(
            write::Write {
                store,
                stop: stop.clone(),
                ready: to_write,
                committed,
            }
            .run(),
        );
        let budget = stats.budget();
        let memory = budget.part(crate::memory::PartName::Worker).clone();
        let listener = budget.part(crate::memory::PartName::Listener).clone();
        let gathered = gather::Gather {
            consumer,
            cfg,
            memory,
            listener,
            stats,
            stop,
            committed: to_ack,
            depth: gather::DepthPoll::new(queue),
        }
        .run(batches)
        .await;
        // Gather returns once the stages downstream are done (or it failed
        // itself, which closes their input): their errors come first, they
        // are the cause of the gatherer's end.
        let prepared = prepare.await.map_err(WorkerError::join).and_then(|r| r);
        let written = write.await.map_err(WorkerError::join).and_then(|r| r);
        written.and(prepared).and(gathered)
    }
}

#[cfg(test)]
mod tests;
