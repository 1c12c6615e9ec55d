//! The listener's local spool in front of a broker, and the forwarder that
//! empties it into the broker.
//!
//! The master cuts a slow subscriber off and throws away what it buffered,
//! so `listen` must never wait on a broker that is slow, restarting or out
//! of reach. It therefore always writes to a local embedded queue (the
//! spool, `queue.spool`) exactly as `run` does, and one forwarder task per
//! named queue moves the spool's messages to the broker in order, acking
//! them in the spool only after the broker confirmed them. While the broker
//! is down the spool grows on local disk; when it is back the backlog
//! flows. Store-and-forward on every message (rather than only during an
//! outage) keeps one code path, keeps order, and leaves no window at the
//! switch-over where an event could be in neither place.
//!
//! A crash between the broker's confirm and the spool's ack forwards those
//! messages again on the next start: at least once, and the sinks' unique
//! keys keep each return once.

use super::embedded::Embedded;
use super::{Consumer, Message, Producer, QueueConfig, QueueError};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
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

/// The running forwarders; [`Forwarder::finish`] waits for them.
pub struct Forwarder {
    tasks: JoinSet<Result<(), QueueError>>,
    stop: CancellationToken,
}

/// Opens the spool and starts one forwarder per queue. Returns the spool,
/// for the listener to push into.
///
/// After `stop`, forwarders keep moving what the spool holds for at most
/// `drain` (`None`: until it is empty), then leave the rest for the next start.
pub async fn start(
    cfg: &QueueConfig,
    queues: Vec<String>,
    drain: Option<Duration>,
) -> Result<(Arc<dyn Producer>, Forwarder), QueueError> {
    let spool = Embedded::open(&cfg.spool, cfg.sync).await?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for q in queues {
        let consumer = spool.consumer(&q)?;
        tasks.spawn(forward(
            cfg.clone(),
            q,
            Box::new(consumer),
            stop.clone(),
            drain,
        ));
    }
    Ok((Arc::new(spool), Forwarder { tasks, stop }))
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
) -> Result<(), QueueError> {
    let name: Arc<str> = Arc::from(queue.as_str());
    let mut broker: Option<Arc<dyn Producer>> = None;
    let mut deadline: Option<Instant> = None;
    let mut failures = 0u32;
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
                    if failures > 0 {
                        tracing::info!(queue = %queue, url = %cfg.url, "broker reachable again; forwarding the spool");
                    }
                    failures = 0;
                    break;
                }
                Err(e) => {
                    failures += 1;
                    broker = None;
                    let delay = RETRY_MIN
                        .saturating_mul(1 << failures.min(10))
                        .min(RETRY_MAX);
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
