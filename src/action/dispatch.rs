//! One action's dispatcher task: takes offered events from its queue,
//! de-duplicates and rate-limits them, and sends them (one in flight per
//! minion, up to `concurrency`), retrying with [`crate::backoff::Backoff`].

use super::limiter::{Admit, DedupeKey, Limiter};
use super::template::{Job, context};
use super::{Action, ActionError};
use crate::event::Event;
use crate::stats::ActionCounters;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An event handed from a worker to a dispatcher: its own copy of the raw
/// bytes, shared by every action it matches, so the worker never pays for
/// the template context and a waiting event costs its wire size (the JSON
/// context is ~15x that, and is only built to render and send).
#[derive(Debug, Clone)]
pub(super) struct Offer {
    pub key: String,
    pub event: Event,
    /// The copy's bytes against the actions' part of the memory budget,
    /// given back when the last action holding it is done with it.
    pub _charge: Arc<crate::memory::Charge>,
}

/// What the dispatcher needs besides the queue.
pub(super) struct Dispatcher {
    pub name: String,
    pub action: Arc<dyn Action>,
    pub dedupe: Option<DedupeKey>,
    pub limiter: Arc<Mutex<Limiter>>,
    pub counters: Arc<ActionCounters>,
    /// Bytes of the events this action holds, offered and not yet done.
    pub held: Arc<AtomicUsize>,
    /// Fired when the shutdown budget is spent: what is left is given up.
    pub give_up: CancellationToken,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub queue_size: usize,
    pub concurrency: usize,
}

/// Bytes (as read) of events being sent at once by one action, unless a
/// single one is larger. A send builds the event's template context (a JSON
/// tree, then minijinja's copy of it to render: ~20-30x the wire size for a
/// state return), so `concurrency` sends of 1.5 MB returns held ~120 MB of
/// trees; small events (a few KiB) never reach this limit.
const SENDING_BYTES: usize = 2 << 20;

/// What one queued send holds: the event (its raw bytes, not its template
/// context, which is built for each attempt and dropped after it) and the
/// dedupe key it reserved.
struct Pending {
    offer: Offer,
    dedupe: Option<String>,
}

impl Dispatcher {
    pub(super) async fn dispatch(self, mut rx: mpsc::Receiver<Offer>) {
        let this = Arc::new(self);
        let mut waiting: HashMap<String, VecDeque<Pending>> = HashMap::new();
        let mut pending = 0usize;
        let mut busy: HashSet<String> = HashSet::new();
        let mut inflight: JoinSet<bool> = JoinSet::new();
        // What each send holds, found again even if the send panicked.
        let mut held_by: HashMap<tokio::task::Id, (String, Option<String>, usize)> = HashMap::new();
        let mut open = true;
        // Bytes (as read) of the events being sent: see SENDING_BYTES.
        let mut sending = 0usize;
        loop {
            // Start what may start: one per key, `concurrency` in all, and
            // past SENDING_BYTES only one.
            if inflight.len() < this.concurrency {
                let ready: Vec<String> = waiting
                    .keys()
                    .filter(|k| !busy.contains(*k))
                    .take(this.concurrency - inflight.len())
                    .cloned()
                    .collect();
                for key in ready {
                    let Some(q) = waiting.get_mut(&key) else {
                        continue;
                    };
                    let size = q.front().map_or(0, |p| p.offer.event.body.len());
                    if !inflight.is_empty() && sending + size > SENDING_BYTES {
                        break;
                    }
                    let Some(p) = q.pop_front() else {
                        continue;
                    };
                    if q.is_empty() {
                        waiting.remove(&key);
                    }
                    pending -= 1;
                    busy.insert(key.clone());
                    sending += size;
                    let t = this.clone();
                    let offer = p.offer;
                    let handle = inflight.spawn(async move { t.send(&offer).await });
                    held_by.insert(handle.id(), (key, p.dedupe, size));
                }
            }
            if !open && pending == 0 && inflight.is_empty() {
                return;
            }
            tokio::select! {
                _ = this.give_up.cancelled() => {
                    this.give_up_all(&mut rx, pending, inflight).await;
                    return;
                }
                r = rx.recv(), if open && pending < this.queue_size => match r {
                    Some(offer) => match this.admit(&offer) {
                        Some(dedupe) => {
                            pending += 1;
                            waiting.entry(offer.key.clone()).or_default().push_back(Pending { offer, dedupe });
                        }
                        None => {
                            this.held.fetch_sub(offer.event.body.len(), AcqRel);
                        }
                    },
                    None => open = false,
                },
                Some(done) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                    let (id, sent) = match done {
                        Ok((id, sent)) => (id, sent),
                        Err(e) => {
                            self_failed(&this, &e);
                            (e.id(), false)
                        }
                    };
                    if let Some((key, dedupe, size)) = held_by.remove(&id) {
                        busy.remove(&key);
                        sending -= size;
                        this.held.fetch_sub(size, AcqRel);
                        this.limiter
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .settle(dedupe.as_deref(), sent, Instant::now());
                    }
                }
                else => return,
            }
        }
    }

    /// The shutdown budget is spent: counts as `given_up` what is still
    /// queued (here and in the channel) and the sends in flight, which are
    /// aborted (a send that finished meanwhile counted itself).
    async fn give_up_all(
        &self,
        rx: &mut mpsc::Receiver<Offer>,
        pending: usize,
        mut inflight: JoinSet<bool>,
    ) {
        rx.close();
        let mut n = pending as u64;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        inflight.abort_all();
        while let Some(r) = inflight.join_next().await {
            match r {
                Ok(_) => {}
                Err(e) if e.is_cancelled() => n += 1,
                Err(e) => self_failed(self, &e),
            }
        }
        if n > 0 {
            self.counters.given_up.fetch_add(n, Relaxed);
            tracing::warn!(action = %self.name, given_up = n, "stopping: actions not sent within the drain time were given up");
        }
    }

    /// Dedupe and rate limit; counts what it turns away. `Some(key)`: send
    /// it, holding the dedupe key (if any) until the send ends.
    fn admit(&self, offer: &Offer) -> Option<Option<String>> {
        // The context only lives while the key is rendered.
        let key = self.dedupe.as_ref().and_then(|d| {
            match d.render(&context(&offer.event)) {
                Ok(k) => Some(k),
                Err(e) => {
                    crate::log_limited!(warn, action = %self.name, error = %e, "cannot render the dedupe key; sending without de-duplication");
                    None
                }
            }
        });
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(key.as_deref(), Instant::now());
        match verdict {
            Admit::Send => Some(key),
            Admit::Duplicate => {
                self.counters.deduplicated.fetch_add(1, Relaxed);
                tracing::debug!(action = %self.name, key = ?key, "duplicate within the dedupe window; not sent");
                None
            }
            Admit::RateLimited => {
                let n = self.counters.rate_limited.fetch_add(1, Relaxed) + 1;
                crate::log_limited!(warn, action = %self.name, rate_limited_total = n, "action over its rate limit; not sent");
                None
            }
        }
    }

    /// One event: attempts with backoff until sent or out of retries.
    /// True if it was sent. The template context is built for each attempt
    /// and dropped before the wait for the next one: a queue of failing
    /// sends holds raw events, not their (much larger) JSON trees.
    async fn send(&self, offer: &Offer) -> bool {
        let mut backoff = crate::backoff::Backoff::new(self.retry_min, self.retry_max);
        loop {
            let attempt = backoff.failures();
            let job = Job {
                key: offer.key.clone(),
                context: Arc::new(context(&offer.event)),
            };
            let result = match tokio::time::timeout(self.timeout, self.action.fire(&job)).await {
                Ok(r) => r,
                Err(_) => Err(ActionError::Retriable(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ))),
            };
            drop(job);
            match result {
                Ok(()) => {
                    self.counters.sent.fetch_add(1, Relaxed);
                    tracing::debug!(action = %self.name, key = %offer.key, "action sent");
                    return true;
                }
                Err(ActionError::Retriable(e)) if attempt < self.retries => {
                    self.counters.retried.fetch_add(1, Relaxed);
                    let delay = backoff.fail();
                    crate::log_limited!(warn, action = %self.name, key = %offer.key, error = %e, attempt = attempt + 1, delay_ms = delay.as_millis() as u64, "action failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    self.counters.failed.fetch_add(1, Relaxed);
                    crate::log_limited!(error, action = %self.name, key = %offer.key, error = %e, attempts = attempt + 1, "action failed; giving up (the event is still written)");
                    return false;
                }
            }
        }
    }
}

/// A send that panicked: counted as failed, its minion's next events go on.
fn self_failed(d: &Dispatcher, e: &tokio::task::JoinError) {
    d.counters.failed.fetch_add(1, Relaxed);
    crate::log_limited!(error, action = %d.name, error = %e, "an action send crashed; counted as failed");
}
