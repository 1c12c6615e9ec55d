//! The listener's path to a broker: publish directly while the broker keeps
//! up, and spool to local disk whenever it does not.
//!
//! The master cuts a slow subscriber off and throws away what it buffered,
//! so `listen` must never wait long on a broker that is slow, restarting or
//! out of reach. [`Spooled`] is the producer the listener writes to:
//!
//! * while the broker answers quickly and nothing waits in the spool, a
//!   batch is published straight to the broker and counts as stored once
//!   the broker confirmed it (as it did once the spool committed it);
//! * when the broker fails, does not answer within [`DIRECT_TIMEOUT`], or
//!   a batch is so large that the writer has fallen behind, the batch goes
//!   into a local embedded queue (the spool, `queue.spool`) instead, and
//!   every batch after it too until one forwarder task per named queue has
//!   moved the spool's backlog to the broker in order. Spool messages are
//!   acked only after the broker confirmed them.
//!
//! Order holds because a batch is only published directly when the spool
//! is empty, i.e. when everything spooled before it is confirmed by the
//! broker. The direct path exists for the listener's CPU: writing every
//! event to SQLite, reading it back and deleting it cost more than the
//! broker client itself (docs/BENCHMARKS.md, "The listener's CPU"). An
//! event is in memory until one of the two confirms it, exactly as long as
//! before.
//!
//! A crash between the broker's confirm and the spool's ack forwards those
//! messages again on the next start, and a direct publish that timed out
//! may have reached the broker before its batch was spooled: at least
//! once, and the sinks' unique keys keep each return once.

use super::embedded::Embedded;
use super::{Consumer, Message, Producer, QueueConfig, QueueError};
use crate::backoff::Backoff;
use crate::stats::Stats;
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::Duration;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Messages moved per broker push.
const FORWARD_BATCH: usize = 2000;
const FORWARD_BYTES: usize = 16 << 20;
/// How long an idle forwarder waits for the spool before looking at `stop`.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// After moving a small batch, wait this long before the next: at a few
/// thousand events a second the queue writer commits every few tens of ms,
/// and a broker round trip plus a spool read and delete for each of those
/// cost the listener more CPU than the messages themselves. A full batch
/// (a backlog) goes on at once.
const FORWARD_LINGER: Duration = Duration::from_millis(100);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A push the broker neither confirms nor refuses (a dead peer behind a
/// silent network) is abandoned after this and tried again.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// A direct publish that takes longer than this is
/// abandoned and its batch spooled: the bus reader buffers in memory
/// meanwhile, so this bounds that buffer. A healthy broker confirms a
/// listener's batch in a few milliseconds.
pub const DIRECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A batch this large means the queue writer has fallen behind the bus
/// (it gathers what arrived during the previous push): spool it, since the
/// spool takes a burst at disk speed and the broker may not.
const DIRECT_MAX: usize = 2048;
/// After the direct path failed, publish through the spool for at least
/// this long (doubling up to `DIRECT_RETRY_MAX` while it keeps failing).
const DIRECT_RETRY_MIN: Duration = Duration::from_secs(1);
const DIRECT_RETRY_MAX: Duration = Duration::from_secs(30);

/// The running forwarders; [`Forwarder::finish`] waits for them.
pub struct Forwarder {
    tasks: JoinSet<Result<(), QueueError>>,
    stop: CancellationToken,
}

/// Opens the spool and starts one forwarder per queue. Returns the
/// producer for the listener to push into ([`Spooled`]).
///
/// After `stop`, forwarders keep moving what the spool holds for at most
/// `drain` (`None`: until it is empty), then leave the rest for the next start.
pub async fn start(
    cfg: &QueueConfig,
    queues: Vec<String>,
    drain: Option<Duration>,
    stats: Arc<Stats>,
) -> Result<(Arc<dyn Producer>, Forwarder), QueueError> {
    let spool = Embedded::open(&cfg.spool, cfg.sync).await?;
    let backlog = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for q in queues {
        let mut consumer = spool.consumer(&q)?;
        // What a previous run left in the spool goes before anything new.
        backlog.fetch_add(consumer.depth().await?.unwrap_or(0), SeqCst);
        tasks.spawn(forward(
            cfg.clone(),
            q,
            Box::new(consumer),
            stop.clone(),
            drain,
            backlog.clone(),
        ));
    }
    let producer = Spooled {
        cfg: cfg.clone(),
        spool,
        backlog,
        direct: tokio::sync::Mutex::new(Direct {
            broker: None,
            connecting: None,
            backoff: Backoff::new(DIRECT_RETRY_MIN, DIRECT_RETRY_MAX),
            not_before: Instant::now(),
        }),
        stats,
    };
    Ok((Arc::new(producer), Forwarder { tasks, stop }))
}

/// The listener's producer when the queue is a broker: see the module docs.
pub struct Spooled {
    cfg: QueueConfig,
    spool: Embedded,
    /// Messages in the spool not yet confirmed by the broker. Direct
    /// publishing waits for zero, which is what keeps order.
    backlog: Arc<AtomicU64>,
    direct: tokio::sync::Mutex<Direct>,
    stats: Arc<Stats>,
}

struct Direct {
    broker: Option<Arc<dyn Producer>>,
    /// A connection being made in the background: connecting to an
    /// unreachable broker can take seconds, and the writer must not wait.
    connecting: Option<JoinHandle<Result<Arc<dyn Producer>, QueueError>>>,
    backoff: Backoff,
    /// No direct publish (nor connection attempt) before this.
    not_before: Instant,
}

impl Direct {
    /// The connected broker, if there is one now; starts connecting if not.
    async fn broker(&mut self, cfg: &QueueConfig) -> Result<Option<Arc<dyn Producer>>, QueueError> {
        if let Some(p) = &self.broker {
            return Ok(Some(p.clone()));
        }
        match self.connecting.take() {
            Some(task) if task.is_finished() => {
                let p = task
                    .await
                    .map_err(|e| QueueError::Connection(format!("connecting: {e}")))??;
                self.broker = Some(p.clone());
                Ok(Some(p))
            }
            Some(task) => {
                self.connecting = Some(task);
                Ok(None)
            }
            None => {
                let cfg = cfg.clone();
                self.connecting = Some(tokio::spawn(async move { cfg.producer().await }));
                Ok(None)
            }
        }
    }

    fn failed(&mut self, url: &impl std::fmt::Display, e: &QueueError, events: usize) {
        self.broker = None;
        let pause = self.backoff.fail();
        self.not_before = Instant::now() + pause;
        tracing::warn!(url = %url, error = %e, events, spool_for = ?pause, "cannot publish to the broker directly; spooling to local disk (the forwarder delivers it later)");
    }
}

impl Spooled {
    /// Publishes `batch` straight to the broker if that is the right thing
    /// to do now; false means it must be spooled.
    async fn try_direct(&self, batch: &[Message]) -> bool {
        if batch.len() > DIRECT_MAX || self.backlog.load(SeqCst) > 0 {
            return false;
        }
        // Only the queue writer pushes, so this lock is never contended; it
        // is here because `push` takes `&self`.
        let mut d = self.direct.lock().await;
        if Instant::now() < d.not_before {
            return false;
        }
        let broker = match d.broker(&self.cfg).await {
            Ok(Some(p)) => p,
            Ok(None) => return false,
            Err(e) => {
                d.failed(&self.cfg.url, &e, batch.len());
                return false;
            }
        };
        let result = tokio::time::timeout(DIRECT_TIMEOUT, broker.push(batch))
            .await
            .unwrap_or_else(|_| {
                Err(QueueError::Connection(format!(
                    "the broker did not confirm within {DIRECT_TIMEOUT:?}"
                )))
            });
        match result {
            Ok(()) => {
                if d.backoff.failures() > 0 {
                    tracing::info!(url = %self.cfg.url, "publishing straight to the broker again");
                }
                d.backoff.reset();
                true
            }
            Err(e) => {
                d.failed(&self.cfg.url, &e, batch.len());
                false
            }
        }
    }
}

#[async_trait]
impl Producer for Spooled {
    async fn push(&self, batch: &[Message]) -> Result<(), QueueError> {
        if self.try_direct(batch).await {
            return Ok(());
        }
        // Counted before the write so a forwarder that moves these at once
        // cannot take the backlog below zero.
        self.backlog.fetch_add(batch.len() as u64, SeqCst);
        match self.spool.push(batch).await {
            Ok(()) => {
                self.stats.spooled.fetch_add(batch.len() as u64, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.backlog.fetch_sub(batch.len() as u64, SeqCst);
                Err(e)
            }
        }
    }
}

impl Forwarder {
    /// Tells the forwarders the listener stopped (all it read is in the
    /// spool) and waits for them to drain.
    pub async fn finish(mut self) -> Result<(), QueueError> {
        self.stop.cancel();
        let mut first = None;
        while let Some(r) = self.tasks.join_next().await {
            let r = r.map_err(|e| QueueError::Storage(format!("forwarder task: {e}")));
            if let Err(e) = r.and_then(|r| r)
                && first.is_none()
            {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

async fn forward(
    cfg: QueueConfig,
    queue: String,
    mut spool: Box<dyn Consumer>,
    stop: CancellationToken,
    drain: Option<Duration>,
    backlog: Arc<AtomicU64>,
) -> Result<(), QueueError> {
    let name: Arc<str> = Arc::from(queue.as_str());
    let mut broker: Option<Arc<dyn Producer>> = None;
    let mut deadline: Option<Instant> = None;
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        if stop.is_cancelled() && deadline.is_none() {
            deadline = Some(drain.map_or_else(far_future, |d| Instant::now() + d));
        }
        let wait = if stop.is_cancelled() {
            Duration::ZERO
        } else {
            IDLE_WAIT
        };
        let got = tokio::select! {
            r = spool.pull(FORWARD_BATCH, FORWARD_BYTES, wait) => r?,
            _ = stop.cancelled(), if deadline.is_none() => continue,
        };
        if got.is_empty() {
            if stop.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        let ids: Vec<u64> = got.iter().map(|d| d.id).collect();
        let batch: Vec<Message> = got
            .into_iter()
            .map(|d| Message {
                queue: name.clone(),
                key: d.key,
                body: d.body,
                received_ms: d.received_ms,
            })
            .collect();
        loop {
            let attempt = async {
                let p = match &broker {
                    Some(p) => p.clone(),
                    None => {
                        let p = cfg.producer().await?;
                        broker = Some(p.clone());
                        p
                    }
                };
                p.push(&batch).await
            };
            let result = tokio::time::timeout(PUSH_TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(QueueError::Connection(
                        "the broker did not confirm in time".into(),
                    ))
                });
            match result {
                Ok(()) => {
                    if backoff.failures() > 0 {
                        tracing::info!(queue = %queue, url = %cfg.url, "broker reachable again; forwarding the spool");
                    }
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    broker = None;
                    let delay = backoff.fail();
                    tracing::warn!(queue = %queue, url = %cfg.url, error = %e, events = batch.len(), retry_in = ?delay, "cannot forward to the broker; the listener keeps spooling to local disk");
                    if deadline.is_some_and(|d| Instant::now() + delay > d) {
                        tracing::warn!(queue = %queue, "stopping with the spool not empty; it is forwarded at the next start");
                        return Ok(());
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
        spool.ack(&ids).await?;
        // Saturating: a spool left by an older version may hold queues no
        // forwarder reads, or the count may have started low.
        let _ = backlog.fetch_update(SeqCst, SeqCst, |n| Some(n.saturating_sub(ids.len() as u64)));
        if ids.len() < FORWARD_BATCH && !stop.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(FORWARD_LINGER) => {}
                _ = stop.cancelled() => {}
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}
