//! A broker consumer that survives the broker going away.
//!
//! Workers run on other hosts than the broker, and brokers restart. Without
//! this, a lost connection would end `saltpipe work` with an error; with it,
//! the worker logs, waits with backoff, reconnects and carries on, and the
//! broker redelivers whatever was handed out and not acked.
//!
//! The subtle part is acks across a reconnection. A batch pulled on the old
//! connection may be committed after the new one is up, and AMQP delivery
//! tags start again at 1 on every channel: acking "tag 5" on the new channel
//! would ack a message nobody stored. So every id carries the connection's
//! generation in its top 16 bits, and acks for an older generation are
//! dropped: the broker redelivers those messages and the sinks' unique keys
//! ignore the repeat.

use super::{Consumer, Delivery, QueueConfig, QueueError};
use crate::backoff::Backoff;
use async_trait::async_trait;
use std::time::Duration;
use tokio::time::Instant;

const GEN_SHIFT: u32 = 48;
const LOCAL_MASK: u64 = (1 << GEN_SHIFT) - 1;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Reconnecting wrapper around a broker consumer.
pub struct Resilient {
    cfg: QueueConfig,
    queue: String,
    prefetch: u32,
    inner: Option<Box<dyn Consumer>>,
    generation: u64,
    backoff: Backoff,
    next_try: Instant,
}

impl Resilient {
    /// Connects once now; if that fails, the first pulls keep trying.
    pub async fn start(cfg: QueueConfig, queue: String, prefetch: u32) -> Resilient {
        let mut r = Resilient {
            cfg,
            queue,
            prefetch,
            inner: None,
            generation: 0,
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
            next_try: Instant::now(),
        };
        r.connect().await;
        r
    }

    async fn connect(&mut self) {
        match self.cfg.broker_consumer(&self.queue, self.prefetch).await {
            Ok(c) => {
                if self.backoff.failures() > 0 {
                    tracing::info!(queue = %self.queue, url = %self.cfg.url, "reconnected to the queue");
                }
                self.inner = Some(c);
                self.generation = (self.generation + 1) & 0xffff;
                self.backoff.reset();
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, e: QueueError) {
        self.inner = None;
        let delay = self.backoff.fail();
        self.next_try = Instant::now() + delay;
        tracing::warn!(queue = %self.queue, url = %self.cfg.url, error = %e, retry_in = ?delay, "queue unreachable; workers wait, nothing acked is lost");
    }
}

#[async_trait]
impl Consumer for Resilient {
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        if self.inner.is_none() {
            let now = Instant::now();
            if now < self.next_try {
                tokio::time::sleep_until(self.next_try.min(now + wait)).await;
                return Ok(vec![]);
            }
            self.connect().await;
        }
        let Some(inner) = self.inner.as_mut() else {
            return Ok(vec![]);
        };
        match inner.pull(max, max_bytes, wait).await {
            Ok(mut got) => {
                let g = self.generation << GEN_SHIFT;
                for d in &mut got {
                    d.id = g | (d.id & LOCAL_MASK);
                }
                Ok(got)
            }
            Err(e) if e.is_retriable() => {
                self.failed(e);
                Ok(vec![])
            }
            Err(e) => Err(e),
        }
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        let current: Vec<u64> = ids
            .iter()
            .filter(|id| *id >> GEN_SHIFT == self.generation)
            .map(|id| id & LOCAL_MASK)
            .collect();
        if current.len() < ids.len() {
            tracing::info!(
                queue = %self.queue,
                stale = ids.len() - current.len(),
                "not acking messages from before a reconnection; the broker redelivers them and the sink ignores the repeats"
            );
        }
        let Some(inner) = self.inner.as_mut() else {
            return Ok(());
        };
        if current.is_empty() {
            return Ok(());
        }
        match inner.ack(&current).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_retriable() => {
                // The ids belonged to this connection; after it, they are stale.
                self.failed(e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        match self.inner.as_mut() {
            Some(inner) => inner.depth().await,
            None => Ok(None),
        }
    }

    fn starved(&self) -> bool {
        self.inner.as_ref().is_some_and(|c| c.starved())
    }

    fn drain_wait(&self) -> Duration {
        // Between connections it is a broker's consumer all the same.
        self.inner
            .as_ref()
            .map_or(super::DRAIN_WAIT, |c| c.drain_wait())
    }
}
