//! One memory budget for the whole process (`[memory] budget`).
//!
//! Operators size a daemon on a master by its worst case, and a highstate
//! of 10,000 minions is the worst case: a few seconds of returns of tens
//! to hundreds of KB each. Bounding each stage on its own (a pending limit
//! here, a batch size there) does not bound the process: the stages add up,
//! and each batch is held twice once converted to rows. So every byte of
//! event data that saltpipe holds in memory is charged to one budget, split
//! in three parts:
//!
//! | part       | what it holds                                              | when it is full                           |
//! |------------|------------------------------------------------------------|-------------------------------------------|
//! | `listener` | kept events read from the bus and not yet in the queue      | the newest are dropped, counted (the bus is never stalled: the master would cut saltpipe off and lose its whole buffer) |
//! | `worker`   | batches gathered, converted to rows, and being written     | the worker stops pulling; the durable queue holds the rest (back-pressure inside saltpipe, never on the bus) |
//! | `actions`  | events queued for webhooks, mails and commands              | the action is skipped for that event, counted; the event is still written |
//!
//! The listener's part is `source.pending_limit` (half of the budget
//! unless set: it is the one part that loses events when full, while the
//! worker's only waits), the actions' part an eighth of the budget when any action
//! is configured, and the worker gets the rest.
//!
//! The listener's part is the least it has, not the most: it may also use
//! whatever the worker's part leaves free (the two share one [`Pool`]),
//! and while it does, the worker admits nothing new. The queue writer
//! stalls now and then in a burst (an append that waits 0.1-0.4 s on a
//! busy disk or a busy core, docs/SCALE.md); with a fixed half the
//! listener dropped events while the worker, yielding to it, held half the
//! budget it did not need. Borrowing keeps the process's bound (listener
//! and worker together within their sum) and gives it to the one part that
//! would otherwise lose data. The actions' part lends nothing: dropping an
//! action is also a loss, and it is small. A part is a counter, not an
//! allocator: a [`Charge`] adds the bytes a stage holds and gives them back
//! when dropped, wherever the data goes (a committed batch, an aborted
//! write, an error path), so the figure cannot drift.
//!
//! The worker's part is a *high-water mark*: the gather stage waits
//! ([`Part::admit`]) until the part is below its limit before it pulls
//! more, and the stages after it charge what they really hold (the rows a
//! batch becomes, the statement a SQL sink builds from them) without
//! waiting, so they can never deadlock on memory the gatherer holds. The
//! part can therefore pass its limit by what one batch's conversion adds,
//! and a single event larger than the whole part is still let through,
//! alone. The budget is about event data: the program itself, the
//! runtime, the database drivers' buffers and the allocator's slack come
//! on top (docs/SCALE.md gives the measured total).
//!
//! Written by hand: a byte semaphore (tokio's `Semaphore`) would make the
//! conversion stage wait for memory the gatherer holds, and the listener
//! must never wait at all; what is needed is a counter with a wake-up.

use crate::config::{ConfigError, human};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::AcqRel, Ordering::Acquire};
use tokio::sync::Notify;

/// `[memory]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Event data the whole process holds in memory at most: the listener's
    /// backlog, the worker's batches and their rows, the actions' queues.
    /// Unset: [`DEFAULT_BUDGET`] (see [`MemoryConfig::total`]).
    #[serde(deserialize_with = "human::opt_size")]
    pub budget: Option<u64>,
}

/// The default budget. Measured (docs/SCALE.md): a 10,000-return burst of
/// 100 KB returns stays under 150 MB of RSS with it, and 1 KB events run
/// at full speed.
pub const DEFAULT_BUDGET: u64 = 64 << 20;
/// The smallest budget accepted: below it, batches get too small to keep
/// a database busy.
pub const MIN_BUDGET: u64 = 16 << 20;

impl MemoryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.budget.is_some_and(|b| b < MIN_BUDGET) {
            return Err(ConfigError::invalid(
                "memory.budget",
                format!("must be at least {} MiB", MIN_BUDGET >> 20),
            ));
        }
        Ok(())
    }

    /// The budget in force: as set; unset, the default, or twice
    /// `source.pending_limit` when that is set higher (a configuration from
    /// before the budget existed keeps its listener's limit and still
    /// leaves the worker its share).
    pub fn total(&self, pending_limit: Option<u64>) -> u64 {
        self.budget
            .unwrap_or_else(|| DEFAULT_BUDGET.max(pending_limit.unwrap_or(0).saturating_mul(2)))
    }
}

/// The three parts of the budget (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartName {
    Listener,
    Worker,
    Actions,
}

impl PartName {
    pub const ALL: [PartName; 3] = [PartName::Listener, PartName::Worker, PartName::Actions];

    pub fn as_str(self) -> &'static str {
        match self {
            PartName::Listener => "listener",
            PartName::Worker => "worker",
            PartName::Actions => "actions",
        }
    }
}

/// The process's budget: one [`Part`] per [`PartName`].
#[derive(Debug)]
pub struct Budget {
    parts: [Arc<Part>; 3],
}

/// The listener's and the worker's parts together: what the listener may
/// borrow and the worker's admission must leave it (see the module docs).
#[derive(Debug)]
pub struct Pool {
    limit: usize,
    used: AtomicUsize,
    /// Woken whenever either part gives bytes back.
    freed: Notify,
}

impl Pool {
    fn used(&self) -> usize {
        self.used.load(Acquire)
    }

    fn room(&self) -> usize {
        self.limit.saturating_sub(self.used())
    }
}

impl Budget {
    /// Splits `total` as the module docs say. `listener` is the listener's
    /// part (`source.pending_limit`), `actions` whether any action runs.
    pub fn new(total: u64, listener: u64, actions: bool) -> Budget {
        let to = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let actions = if actions { total / 8 } else { 0 };
        let worker = total.saturating_sub(listener).saturating_sub(actions);
        // At least 1 MiB however the parts were set: a worker with
        // nothing would only ever let one event through at a time.
        let (listener, worker) = (to(listener), to(worker.max(1 << 20)));
        let pool = Arc::new(Pool {
            limit: listener.saturating_add(worker),
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        });
        Budget {
            parts: [
                Arc::new(Part::pooled(listener, pool.clone(), true)),
                Arc::new(Part::pooled(worker, pool, false)),
                Arc::new(Part::new(to(actions))),
            ],
        }
    }

    /// A budget large enough never to hold anything back (tools, tests).
    pub fn unlimited() -> Budget {
        let n = usize::MAX / 4;
        Budget {
            parts: [
                Arc::new(Part::new(n)),
                Arc::new(Part::new(n)),
                Arc::new(Part::new(n)),
            ],
        }
    }

    pub fn part(&self, name: PartName) -> &Arc<Part> {
        &self.parts[name as usize]
    }
}

/// One part of the budget: bytes in use against a limit.
#[derive(Debug)]
pub struct Part {
    limit: usize,
    used: AtomicUsize,
    /// The highest `used` seen.
    peak: AtomicUsize,
    /// Times a stage waited in [`Part::admit`] because the part was full.
    waits: AtomicU64,
    freed: Notify,
    /// The pool shared with the other part of the pair, if any.
    pool: Option<Arc<Pool>>,
    /// Whether this part may use the pool's free room past its own limit
    /// (the listener); the other part (the worker) must leave it.
    borrows: bool,
}

impl Part {
    fn new(limit: usize) -> Part {
        Part {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
            freed: Notify::new(),
            pool: None,
            borrows: false,
        }
    }

    fn pooled(limit: usize, pool: Arc<Pool>, borrows: bool) -> Part {
        Part {
            pool: Some(pool),
            borrows,
            ..Part::new(limit)
        }
    }

    /// One part on its own, outside any budget: for a stage bounded by
    /// other means that must not take from the budget's parts (the
    /// backfill's ingest, which waits for its queue writer anyway).
    pub fn standalone(limit: usize) -> Arc<Part> {
        Arc::new(Part::new(limit))
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Acquire)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Acquire)
    }

    pub fn waits(&self) -> u64 {
        self.waits.load(Acquire)
    }

    /// Bytes that may still be charged before the limit: the part's own
    /// room, or what the pool can still lend for a part that borrows; for
    /// the other part of a pool, no more than the pool has free.
    pub fn room(&self) -> usize {
        let own = self.limit.saturating_sub(self.used());
        match &self.pool {
            Some(pool) if self.borrows => own.max(pool.room()),
            Some(pool) => own.min(pool.room()),
            None => own,
        }
    }

    /// Whether the part holds more than half its own limit: for the
    /// listener's, a queue writer behind a burst, when the worker yields
    /// (src/worker). Never for a part with a limit of 0 (`work` has no
    /// listener).
    pub fn past_half(&self) -> bool {
        self.limit > 0 && self.used() > self.limit / 2
    }

    /// The pool this part may borrow from, if it borrows.
    fn lender(&self) -> Option<&Pool> {
        self.pool.as_deref().filter(|_| self.borrows)
    }

    /// Whether the part holds more than it may: past its own limit and,
    /// for a part that borrows, past what the pool has.
    pub fn over(&self) -> bool {
        self.used() > self.limit && self.lender().is_none_or(|pool| pool.used() > pool.limit)
    }

    /// Waits until the part has room (it may still be nearly full: the
    /// caller charges what it then takes, see the module docs).
    pub async fn admit(&self) {
        let mut counted = false;
        loop {
            // Interest first, so a release in between still wakes us; a
            // pooled part is also woken by the other part's releases.
            let freed = match &self.pool {
                Some(pool) => pool.freed.notified(),
                None => self.freed.notified(),
            };
            if self.room() > 0 {
                return;
            }
            if !counted {
                self.waits.fetch_add(1, AcqRel);
                counted = true;
            }
            freed.await;
        }
    }

    /// Charges `bytes` whatever the part holds (stages after admission).
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.add(bytes);
        Charge {
            part: Some(self.clone()),
            bytes,
        }
    }

    /// Charges `bytes` only if that keeps the part within its limit (or
    /// within what the pool can lend it), or if the part holds nothing (one
    /// event larger than the part goes through alone rather than never):
    /// for the stages that must not wait, the listener and the actions.
    pub fn try_charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        let lendable = self.lender().map_or(0, Pool::room);
        self.used
            .fetch_update(AcqRel, Acquire, |u| {
                u.checked_add(bytes)
                    .filter(|n| *n <= self.limit || u == 0 || bytes <= lendable)
            })
            .ok()
            .map(|before| {
                self.added(before.saturating_add(bytes), bytes);
                Charge {
                    part: Some(self.clone()),
                    bytes,
                }
            })
    }

    fn add(&self, bytes: usize) {
        let now = self.used.fetch_add(bytes, AcqRel).saturating_add(bytes);
        self.added(now, bytes);
    }

    /// After `bytes` were added to `used`, now `now`: the peak and the pool.
    fn added(&self, now: usize, bytes: usize) {
        self.peak.fetch_max(now, AcqRel);
        if let Some(pool) = &self.pool {
            pool.used.fetch_add(bytes, AcqRel);
        }
    }

    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, AcqRel);
        self.freed.notify_waiters();
        if let Some(pool) = &self.pool {
            pool.used.fetch_sub(bytes, AcqRel);
            pool.freed.notify_waiters();
        }
    }
}

/// Bytes charged to a part, given back when dropped.
#[derive(Debug, Default)]
pub struct Charge {
    part: Option<Arc<Part>>,
    bytes: usize,
}

impl Charge {
    /// A charge of nothing, to merge others into.
    pub fn none() -> Charge {
        Charge::default()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes over `other`'s bytes (same part, or this one was empty).
    pub fn merge(&mut self, mut other: Charge) {
        match (&self.part, other.part.take()) {
            (_, None) => {}
            (None, Some(p)) => {
                self.part = Some(p);
                self.bytes = other.bytes;
            }
            (Some(mine), Some(p)) if Arc::ptr_eq(mine, &p) => self.bytes += other.bytes,
            // Another part's charge: give it back rather than mix parts.
            (Some(_), Some(p)) => p.release(other.bytes),
        }
        other.bytes = 0;
    }

    /// Sets the charge to `bytes` (what a stage really holds, once known),
    /// without waiting.
    pub fn resize(&mut self, bytes: usize) {
        let Some(part) = &self.part else {
            return;
        };
        if bytes > self.bytes {
            part.add(bytes - self.bytes);
        } else {
            part.release(self.bytes - bytes);
        }
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(p) = &self.part {
            p.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_parts_add_up_to_the_budget() {
        let b = Budget::new(96 << 20, 32 << 20, true);
        let sum: usize = PartName::ALL.iter().map(|p| b.part(*p).limit()).sum();
        assert_eq!(sum, 96 << 20);
        assert_eq!(b.part(PartName::Actions).limit(), 12 << 20);
        assert_eq!(b.part(PartName::Worker).limit(), 52 << 20);
        let none = Budget::new(96 << 20, 32 << 20, false);
        assert_eq!(none.part(PartName::Worker).limit(), 64 << 20);
    }

    #[test]
    fn a_charge_is_given_back_when_dropped_and_resized_in_place() {
        let b = Budget::new(64 << 20, 16 << 20, false);
        let w = b.part(PartName::Worker);
        let mut c = w.charge(1000);
        c.merge(w.charge(500));
        assert_eq!(w.used(), 1500);
        c.resize(4000);
        assert_eq!(w.used(), 4000);
        c.resize(10);
        assert_eq!(w.used(), 10);
        drop(c);
        assert_eq!(w.used(), 0);
        assert_eq!(w.peak(), 4000);
    }

    #[test]
    fn try_charge_refuses_past_the_limit_and_charge_does_not() {
        let b = Budget::new(16 << 20, 1000, false);
        let (l, w) = (b.part(PartName::Listener), b.part(PartName::Worker));
        // A full worker part: nothing to lend.
        let _full = w.charge(w.limit());
        let a = l.try_charge(600).expect("room");
        assert!(l.try_charge(600).is_none(), "600 + 600 > 1000");
        let forced = l.charge(600);
        assert_eq!(l.used(), 1200);
        drop((a, forced));
        assert_eq!(l.used(), 0);
        let alone = l
            .try_charge(5000)
            .expect("larger than the part, but it is empty");
        assert!(l.try_charge(1).is_none());
        drop(alone);
    }

    #[tokio::test]
    async fn admit_waits_until_something_is_given_back() {
        let b = Budget::new(16 << 20, 0, false);
        let w = b.part(PartName::Worker).clone();
        let held = w.charge(w.limit());
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "full: the gatherer waits");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when the batch was released")
            .expect("task");
        assert_eq!(w.waits(), 1);
    }

    #[test]
    fn the_listener_borrows_what_the_worker_leaves_free_and_the_worker_waits_for_it() {
        let b = Budget::new(64 << 20, 32 << 20, false);
        let (l, w) = (b.part(PartName::Listener), b.part(PartName::Worker));
        // The worker holds 8 of its 32 MiB: the listener may go to 56.
        let batch = w.charge(8 << 20);
        let own = l.charge(32 << 20);
        assert!(!l.over(), "exactly its own part");
        let borrowed = l.charge(20 << 20);
        assert!(!l.over(), "52 MiB: within what the worker leaves free");
        assert_eq!(l.room(), 4 << 20);
        assert_eq!(w.room(), 4 << 20, "the worker must leave the loan alone");
        let more = l.try_charge(8 << 20);
        assert!(more.is_none(), "60 MiB would pass the pool");
        let past = l.charge(8 << 20);
        assert!(l.over(), "60 MiB: past the pool, the listener drops");
        drop(past);
        // The worker's own use never counts against the listener's own part.
        drop(borrowed);
        let filled = w.charge(40 << 20);
        assert!(!l.over(), "its own 32 MiB, whatever the worker holds");
        assert_eq!(l.room(), 0);
        assert!(l.try_charge(1).is_none());
        drop((own, filled, batch));
        assert_eq!(
            (l.used(), w.used(), l.room(), w.room()),
            (0, 0, 64 << 20, 32 << 20)
        );
        assert_eq!(l.peak(), 60 << 20, "the peak shows the loan");
    }

    #[tokio::test]
    async fn the_worker_is_admitted_again_when_the_listener_gives_its_loan_back() {
        let b = Budget::new(64 << 20, 32 << 20, false);
        let (l, w) = (
            b.part(PartName::Listener).clone(),
            b.part(PartName::Worker).clone(),
        );
        let loan = l.charge(64 << 20);
        assert_eq!(w.room(), 0, "the worker holds nothing but the pool is full");
        let waiter = tokio::spawn(async move { w.admit().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the loan keeps the worker out");
        drop(loan);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the listener's release")
            .expect("task");
    }

    #[test]
    fn the_actions_part_neither_lends_nor_borrows() {
        let b = Budget::new(64 << 20, 32 << 20, true);
        let (l, a) = (b.part(PartName::Listener), b.part(PartName::Actions));
        assert_eq!(a.limit(), 8 << 20);
        let held = l.charge(56 << 20);
        assert!(!l.over(), "the worker's 24 MiB lent");
        let more = l.charge(1);
        assert!(l.over(), "nothing from the actions' part");
        assert_eq!(a.room(), 8 << 20);
        let first = a.try_charge(4 << 20).expect("room");
        assert!(
            a.try_charge(5 << 20).is_none(),
            "the actions keep their own limit"
        );
        drop((held, more, first));
    }

    #[test]
    fn a_merge_of_another_parts_charge_gives_it_back() {
        let b = Budget::new(64 << 20, 16 << 20, false);
        let (l, w) = (b.part(PartName::Listener), b.part(PartName::Worker));
        let mut c = w.charge(10);
        c.merge(l.charge(20));
        assert_eq!((l.used(), w.used(), c.bytes()), (0, 10, 10));
    }
}
