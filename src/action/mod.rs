//! Actions: "do anything before the insert", such as send a mail or page
//! someone, for the events an operator cares about.
//!
//! Why the shape: an action talks to something slow and fallible (an HTTP
//! endpoint, an SMTP relay, a script), while the worker's job is to get
//! events into the database. So the worker only *offers* each batch's
//! matching events to a bounded queue per action ([`ActionSet::offer`],
//! never waiting); if that queue is full (`queue_size` events or
//! `queue_bytes` bytes) the action is dropped, counted and logged, and the
//! write goes on. A queued event is held as its raw bytes (its own copy, not
//! a slice of the batch), and its template context, a JSON tree ~15x the
//! wire size, is built only to render and send, one attempt at a time: 100
//! failing 1.5 MB returns once held 1.7 GB as contexts. Each action has its
//! own dispatcher task that applies, in order:
//!
//! 1. de-duplication: the same rendered `dedupe_key` within `dedupe_window`
//!    is sent once (a flapping state run pages once, not every minute). The
//!    key is unambiguous (each interpolated value carries its length, so
//!    `{{ fun }}/{{ minion }}` cannot confuse `a/b`+`c` with `a`+`b/c`), and
//!    only a successful send marks it: a send that failed for good frees the
//!    key for the next event;
//! 2. the rate limit: at most `rate_limit` sends per `rate_window` (an event
//!    storm must not send ten thousand mails);
//! 3. the send itself, under `timeout`, retried `retries` times with
//!    jittered exponential backoff.
//!
//! Events of one minion are sent in the order they were read (one in flight
//! per minion); different minions proceed in parallel up to `concurrency`.
//!
//! At shutdown the dispatchers get the drain time (`worker.drain_timeout`)
//! to send what they hold; what is left then is given up, counted per action
//! as `given_up` (in /metrics and the replay and stop summaries), never
//! dropped silently.
//!
//! Delivery is at most once per offer: an action offered before a crash
//! that redelivers the batch may be offered again after the restart (the
//! dedupe window does not survive a restart). Reloading the config (SIGHUP)
//! keeps each surviving action's dedupe and rate state, so a reload does
//! not re-send.

mod config;
mod dispatch;
mod limiter;
mod template;

#[cfg(feature = "action-email")]
pub mod email;
#[cfg(feature = "action-exec")]
pub mod exec;
#[cfg(feature = "action-webhook")]
pub mod webhook;

pub use config::{ActionConfig, ActionKind, validate_all};
pub use limiter::{Admit, Limiter};
pub use template::{DEFAULT_BODY, Job, Templates, context};

use crate::event::Event;
use crate::rules::MatcherConfig;
use crate::stats::{ActionCounters, Stats};
use async_trait::async_trait;
use dispatch::{Dispatcher, Offer};
use limiter::DedupeKey;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why an attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActionError {
    /// May pass on retry (a 5xx, a refused connection, a timeout).
    #[error("{0}")]
    Retriable(String),
    /// Will not pass on retry (a 4xx, a template error, no such command).
    #[error("{0}")]
    Permanent(String),
}

/// One kind of action: one attempt at sending one event.
#[async_trait]
pub trait Action: Send + Sync {
    async fn fire(&self, job: &Job) -> Result<(), ActionError>;
}

/// One running action as the workers see it.
struct Running {
    name: String,
    when: MatcherConfig,
    tx: mpsc::Sender<Offer>,
    counters: Arc<ActionCounters>,
    limiter: Arc<Mutex<Limiter>>,
    held: Arc<AtomicUsize>,
    queue_bytes: usize,
}

impl Running {
    /// Counts (and logs, rate-limited) an event this action refused.
    fn refuse(&self, e: &Event, why: &str) {
        let n = self.counters.dropped.fetch_add(1, Relaxed) + 1;
        crate::log_limited!(warn, action = %self.name, tag = e.tag(), dropped_total = n, queue_bytes = self.queue_bytes, "action queue full ({why}); dropped this action, the event is still written");
    }
}

/// The actions of one configuration, each with its dispatcher task.
#[derive(Default)]
pub struct ActionSet {
    running: Vec<Running>,
    /// The actions' part of the memory budget (none when the process
    /// started without actions and a reload added some: then each action's
    /// `queue_bytes` alone bounds it).
    memory: Option<Arc<crate::memory::Part>>,
}

impl ActionSet {
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Hands each event to every action it matches, without waiting.
    /// An action takes an event only while it holds fewer than
    /// `queue_size` events and `queue_bytes` bytes.
    pub fn offer<'a>(&self, events: impl IntoIterator<Item = &'a Event>) {
        if self.running.is_empty() {
            return;
        }
        for e in events {
            let mut job: Option<Offer> = None;
            // Whether the process's memory for actions was full for this
            // event (asked once, at its first matching action).
            let mut no_memory = false;
            let size = e.body.len();
            for r in &self.running {
                if !r.when.matches(e) {
                    continue;
                }
                if job.is_none() && !no_memory {
                    match self.charge(size) {
                        Some(charge) => job = Some(Offer::copy_of(e, charge)),
                        None => no_memory = true,
                    }
                }
                let Some(j) = &job else {
                    r.refuse(e, "memory.budget's actions part");
                    continue;
                };
                if r.held
                    .fetch_update(AcqRel, Acquire, |h| {
                        h.checked_add(size).filter(|n| *n <= r.queue_bytes)
                    })
                    .is_err()
                {
                    r.refuse(e, "queue_bytes");
                    continue;
                }
                if r.tx.try_send(j.clone()).is_err() {
                    r.held.fetch_sub(size, AcqRel);
                    r.refuse(e, "queue_size, or stopped");
                }
            }
        }
    }
}

impl ActionSet {
    /// `bytes` against the actions' part, if it has room.
    fn charge(&self, bytes: usize) -> Option<crate::memory::Charge> {
        match &self.memory {
            Some(part) => part.try_charge(bytes),
            None => Some(crate::memory::Charge::none()),
        }
    }
}

impl Offer {
    /// A copy of just this event: a slice of the batch's buffer would keep
    /// the whole container alive.
    fn copy_of(e: &Event, charge: crate::memory::Charge) -> Offer {
        let mut event = e.clone();
        event.body = bytes::Bytes::copy_from_slice(&e.body);
        Offer {
            key: e.fields.minion.clone().unwrap_or_else(|| e.partition_key()),
            event,
            _charge: Arc::new(charge),
        }
    }
}

/// The live actions, replaceable on reload. Cheap to clone.
#[derive(Clone, Default)]
pub struct Actions {
    current: Arc<RwLock<Arc<ActionSet>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    give_up: CancellationToken,
}

impl Actions {
    /// Starts the dispatchers for `cfgs` (needs a tokio runtime).
    pub fn start(cfgs: &[ActionConfig], stats: &Arc<Stats>) -> Result<Actions, ActionError> {
        let a = Actions::default();
        a.replace(cfgs, stats)?;
        Ok(a)
    }

    /// The set to offer a batch to.
    pub fn current(&self) -> Arc<ActionSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in new actions. Actions that keep their name keep their
    /// dedupe and rate state; the old dispatchers finish what they hold.
    pub fn replace(&self, cfgs: &[ActionConfig], stats: &Arc<Stats>) -> Result<(), ActionError> {
        let old = self.current();
        let mut running = Vec::with_capacity(cfgs.len());
        let mut handles = Vec::new();
        for c in cfgs {
            let templates = Arc::new(c.templates().map_err(ActionError::Permanent)?);
            let action = c.build_action(templates)?;
            let dedupe = c
                .dedupe_key
                .as_deref()
                .map(DedupeKey::new)
                .transpose()
                .map_err(ActionError::Permanent)?;
            let limiter = match old.running.iter().find(|r| r.name == c.name) {
                Some(r) => {
                    r.limiter
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .reconfigure(c.rate_limit, c.rate_window, c.dedupe_window);
                    r.limiter.clone()
                }
                None => Arc::new(Mutex::new(Limiter::new(
                    c.rate_limit,
                    c.rate_window,
                    c.dedupe_window,
                ))),
            };
            let counters = stats.action(&c.name);
            let held = Arc::new(AtomicUsize::new(0));
            let (tx, rx) = mpsc::channel(c.queue_size);
            let d = Dispatcher {
                name: c.name.clone(),
                action,
                dedupe,
                limiter: limiter.clone(),
                counters: counters.clone(),
                held: held.clone(),
                give_up: self.give_up.clone(),
                timeout: c.timeout,
                retries: c.retries,
                retry_min: c.retry_min,
                retry_max: c.retry_max,
                queue_size: c.queue_size,
                concurrency: c.concurrency,
            };
            handles.push(tokio::spawn(d.dispatch(rx)));
            running.push(Running {
                name: c.name.clone(),
                when: c.when.clone(),
                tx,
                counters,
                limiter,
                held,
                queue_bytes: usize::try_from(c.queue_bytes).unwrap_or(usize::MAX),
            });
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ActionSet {
            running,
            memory: Some(
                stats
                    .budget()
                    .part(crate::memory::PartName::Actions)
                    .clone(),
            )
            .filter(|p| p.limit() > 0),
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|h| !h.is_finished());
        tasks.extend(handles);
        Ok(())
    }

    /// Stops offering and lets the dispatchers send what they hold for at
    /// most `timeout`; then gives up the rest (aborting sends in flight),
    /// counted per action as `given_up`.
    pub async fn shutdown(&self, timeout: Duration) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ActionSet::default());
        let mut tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = Instant::now() + timeout;
        for t in tasks.iter_mut() {
            if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
                break;
            }
        }
        if tasks.iter().any(|t| !t.is_finished()) {
            tracing::warn!(
                drain_ms = timeout.as_millis() as u64,
                "actions still queued or in flight at the end of the drain time; giving them up (counted as given_up)"
            );
            self.give_up.cancel();
            for t in tasks.into_iter().filter(|t| !t.is_finished()) {
                let _ = t.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_allows_n_per_window() {
        let mut l = Limiter::new(3, Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        let got: Vec<Admit> = (0..5).map(|_| l.admit(None, Instant::now())).collect();
        assert_eq!(
            got,
            [
                Admit::Send,
                Admit::Send,
                Admit::Send,
                Admit::RateLimited,
                Admit::RateLimited
            ]
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(l.admit(None, Instant::now()), Admit::RateLimited);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(Instant::now().duration_since(t0), Duration::from_secs(60));
        assert_eq!(l.admit(None, Instant::now()), Admit::Send);
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_sends_a_key_once_per_window() {
        let mut l = Limiter::new(0, Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        assert_eq!(
            l.admit(Some("a"), Instant::now()),
            Admit::Duplicate,
            "reserved while the first one is being sent"
        );
        l.settle(Some("a"), true, Instant::now());
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
        assert_eq!(l.admit(Some("b"), Instant::now()), Admit::Send);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_send_does_not_suppress_the_next_one() {
        let mut l = Limiter::new(0, Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        l.settle(Some("a"), false, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            l.admit(Some("a"), Instant::now()),
            Admit::Send,
            "nothing was delivered for `a`: the next event must go"
        );
        l.settle(Some("a"), true, Instant::now());
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
    }

    #[test]
    fn dedupe_keys_are_not_ambiguous() {
        let k = DedupeKey::new("{{ fun }}/{{ minion }}").expect("template");
        let key = |fun: &str, minion: &str| {
            k.render(&serde_json::json!({ "fun": fun, "minion": minion }))
                .expect("render")
        };
        assert_ne!(key("a/b", "c"), key("a", "b/c"));
        assert_ne!(key("a", "1:b"), key("a:1", "b"));
        assert_eq!(key("a", "b"), key("a", "b"));
        assert_eq!(key("a", "b").len(), 64, "a SHA-256 digest");
        // Missing values are empty, and still not confused with the separator.
        let k = DedupeKey::new("{{ nope }}/{{ fun }}").expect("template");
        let a = k
            .render(&serde_json::json!({ "fun": "/x" }))
            .expect("render");
        let k2 = DedupeKey::new("{{ nope }}/{{ fun }}").expect("template");
        let b = k2
            .render(&serde_json::json!({ "nope": "/", "fun": "x" }))
            .expect("render");
        assert_ne!(a, b);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_do_not_use_up_the_rate() {
        let mut l = Limiter::new(2, Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        l.settle(Some("a"), true, Instant::now());
        for _ in 0..10 {
            assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
        }
        assert_eq!(l.admit(Some("b"), Instant::now()), Admit::Send);
        assert_eq!(l.admit(Some("c"), Instant::now()), Admit::RateLimited);
        // Rate-limited keys are not remembered: "c" goes once the window passes.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(l.admit(Some("c"), Instant::now()), Admit::Send);
    }

    /// Records each send; fails the first `fail` attempts of every event.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<String>>,
        fail_first: u32,
        attempts: Mutex<HashMap<String, u32>>,
        delay: Duration,
        /// Tags starting with this are refused for good.
        refuse: Option<&'static str>,
        /// Sends running now, and the most at once.
        running: AtomicUsize,
        most: AtomicUsize,
    }

    #[async_trait]
    impl Action for Recorder {
        async fn fire(&self, job: &Job) -> Result<(), ActionError> {
            let id = job.context["tag"].as_str().unwrap_or_default().to_owned();
            let n = {
                let mut a = self.attempts.lock().expect("lock");
                let n = a.entry(id.clone()).or_default();
                *n += 1;
                *n
            };
            let now = self.running.fetch_add(1, AcqRel) + 1;
            self.most.fetch_max(now, AcqRel);
            tokio::time::sleep(self.delay).await;
            self.running.fetch_sub(1, AcqRel);
            if self.refuse.is_some_and(|p| id.starts_with(p)) {
                return Err(ActionError::Permanent("refused".into()));
            }
            if n <= self.fail_first {
                return Err(ActionError::Retriable("not yet".into()));
            }
            self.sent.lock().expect("lock").push(id);
            Ok(())
        }
    }

    fn dispatcher(
        rec: Arc<Recorder>,
        retries: u32,
        concurrency: usize,
    ) -> (Dispatcher, Arc<ActionCounters>) {
        let counters = Arc::new(ActionCounters::default());
        (
            Dispatcher {
                name: "t".into(),
                action: rec,
                dedupe: None,
                held: Arc::new(AtomicUsize::new(0)),
                give_up: CancellationToken::new(),
                limiter: Arc::new(Mutex::new(Limiter::new(
                    0,
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                ))),
                counters: counters.clone(),
                timeout: Duration::from_secs(5),
                retries,
                retry_min: Duration::from_secs(1),
                retry_max: Duration::from_secs(10),
                queue_size: 100,
                concurrency,
            },
            counters,
        )
    }

    fn event(tag: &str) -> Event {
        let frame = crate::bus::encode::frame_bytes(tag, &[("fun", "f")]);
        Event::from_frame(&bytes::Bytes::from(frame)).expect("event")
    }

    fn job(key: &str, tag: &str) -> Offer {
        let mut offer = Offer::copy_of(&event(tag), crate::memory::Charge::none());
        offer.key = key.into();
        offer
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_send_frees_its_dedupe_key_and_a_sent_one_holds_it() {
        let rec = Arc::new(Recorder {
            refuse: Some("refused"),
            ..Recorder::default()
        });
        let (mut d, counters) = dispatcher(rec.clone(), 0, 4);
        d.dedupe = Some(DedupeKey::new("{{ fun }}").expect("template"));
        let (tx, rx) = mpsc::channel(100);
        let task = tokio::spawn(d.dispatch(rx));
        // All five render the same key (fun "f"); each waits for the last to end.
        for (i, tag) in ["refused/1", "refused/2", "a", "b", "c"].iter().enumerate() {
            tx.send(job(&format!("m{i}"), tag)).await.expect("send");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        drop(tx);
        task.await.expect("dispatcher");
        assert_eq!(*rec.sent.lock().expect("lock"), ["a"]);
        assert_eq!(counters.failed.load(Relaxed), 2);
        assert_eq!(counters.sent.load(Relaxed), 1);
        assert_eq!(counters.deduplicated.load(Relaxed), 2, "b and c");
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_left_when_the_drain_time_ends_is_given_up_and_counted() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_secs(3),
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 0, 2);
        let give_up = d.give_up.clone();
        let held = d.held.clone();
        let (tx, rx) = mpsc::channel(100);
        for i in 0..10 {
            let o = job(&format!("m{i}"), &format!("t{i}"));
            held.fetch_add(o.event.body.len(), AcqRel);
            tx.send(o).await.expect("send");
        }
        drop(tx);
        let task = tokio::spawn(d.dispatch(rx));
        // Two at a time, 3 s each: 4 sent by 7 s, 2 more in flight, 4 waiting.
        tokio::time::sleep(Duration::from_secs(7)).await;
        give_up.cancel();
        task.await.expect("dispatcher");
        assert_eq!(counters.sent.load(Relaxed), 4);
        assert_eq!(counters.given_up.load(Relaxed), 6);
        assert_eq!(rec.sent.lock().expect("lock").len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn big_events_are_sent_one_at_a_time_small_ones_in_parallel() {
        for (size, most) in [(3 << 20, 1), (1 << 10, 4)] {
            let rec = Arc::new(Recorder {
                delay: Duration::from_secs(1),
                ..Recorder::default()
            });
            let (d, counters) = dispatcher(rec.clone(), 0, 4);
            let (tx, rx) = mpsc::channel(100);
            let task = tokio::spawn(d.dispatch(rx));
            let payload = "x".repeat(size);
            for i in 0..8 {
                let frame = crate::bus::encode::frame_bytes(&format!("t{i}"), &[("p", &payload)]);
                let event = Event::from_frame(&bytes::Bytes::from(frame)).expect("event");
                let mut offer = Offer::copy_of(&event, crate::memory::Charge::none());
                offer.key = format!("m{i}");
                tx.send(offer).await.expect("send");
            }
            drop(tx);
            task.await.expect("dispatcher");
            assert_eq!(counters.sent.load(Relaxed), 8);
            assert_eq!(rec.most.load(Relaxed), most, "events of {size} bytes");
        }
    }

    /// A return of about 100 KB.
    fn big(i: usize) -> Event {
        let payload = "x".repeat(100_000);
        let frame = crate::bus::encode::frame_bytes(
            &format!("salt/job/{i}/ret/m"),
            &[("id", "m"), ("jid", "1"), ("return", &payload)],
        );
        Event::from_frame(&bytes::Bytes::from(frame)).expect("event")
    }

    /// One action matching everything, nobody dispatching: its set, its
    /// queue, its counters and the bytes it holds.
    fn one_action(
        queue_bytes: usize,
        memory: Option<Arc<crate::memory::Part>>,
    ) -> (
        ActionSet,
        mpsc::Receiver<Offer>,
        Arc<ActionCounters>,
        Arc<AtomicUsize>,
    ) {
        let (tx, rx) = mpsc::channel(100);
        let counters = Arc::new(ActionCounters::default());
        let held = Arc::new(AtomicUsize::new(0));
        let set = ActionSet {
            running: vec![Running {
                name: "t".into(),
                when: MatcherConfig::default(),
                tx,
                counters: counters.clone(),
                limiter: Arc::new(Mutex::new(Limiter::new(
                    0,
                    Duration::from_secs(1),
                    Duration::from_secs(1),
                ))),
                held: held.clone(),
                queue_bytes,
            }],
            memory,
        };
        (set, rx, counters, held)
    }

    #[test]
    fn the_process_budget_bounds_the_actions_and_is_given_back() {
        let part = crate::memory::Part::standalone(250_000);
        let (set, rx, counters, _) = one_action(usize::MAX, Some(part.clone()));
        let events: Vec<Event> = (0..5).map(big).collect();
        set.offer(&events);
        assert_eq!(counters.dropped.load(Relaxed), 3, "2 x 100 KB fit, not 3");
        assert_eq!(part.used(), 2 * events[0].body.len());
        // The dispatcher done with them (here: the queue dropped): all back.
        drop(rx);
        assert_eq!(part.used(), 0);
    }

    #[test]
    fn an_action_holds_at_most_queue_bytes() {
        let (set, mut rx, counters, held) = one_action(350_000, None);
        let events: Vec<Event> = (0..5).map(big).collect();
        set.offer(&events);
        assert_eq!(counters.dropped.load(Relaxed), 2, "3 x 100 KB fit, not 4");
        let size = events[0].body.len();
        assert_eq!(held.load(Relaxed), 3 * size);
        let first = rx.try_recv().expect("queued");
        assert_eq!(first.event.body, events[0].body);
        // Its own copy: holding it does not hold the batch's buffer.
        assert_ne!(first.event.body.as_ptr(), events[0].body.as_ptr());
        // Room again once the dispatcher is done with one.
        held.fetch_sub(size, AcqRel);
        set.offer(&events[..1]);
        assert_eq!(counters.dropped.load(Relaxed), 2);
        assert_eq!(held.load(Relaxed), 3 * size);
    }

    #[tokio::test(start_paused = true)]
    async fn per_minion_order_is_kept_under_retries() {
        let rec = Arc::new(Recorder {
            fail_first: 1,
            delay: Duration::from_millis(10),
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 3, 4);
        let (tx, rx) = mpsc::channel(100);
        let task = tokio::spawn(d.dispatch(rx));
        for i in 0..5 {
            tx.send(job("m1", &format!("m1-{i}"))).await.expect("send");
            tx.send(job("m2", &format!("m2-{i}"))).await.expect("send");
        }
        drop(tx);
        task.await.expect("dispatcher");
        let sent = rec.sent.lock().expect("lock").clone();
        assert_eq!(sent.len(), 10);
        for m in ["m1", "m2"] {
            let order: Vec<&String> = sent.iter().filter(|s| s.starts_with(m)).collect();
            let want: Vec<String> = (0..5).map(|i| format!("{m}-{i}")).collect();
            assert_eq!(order, want.iter().collect::<Vec<_>>(), "{m} order");
        }
        assert_eq!(counters.sent.load(Relaxed), 10);
        assert_eq!(counters.retried.load(Relaxed), 10);
        assert_eq!(counters.failed.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_retries_and_counts_it() {
        let rec = Arc::new(Recorder {
            fail_first: 100,
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 2, 1);
        let (tx, rx) = mpsc::channel(10);
        let task = tokio::spawn(d.dispatch(rx));
        tx.send(job("m", "x")).await.expect("send");
        drop(tx);
        task.await.expect("dispatcher");
        assert_eq!(rec.attempts.lock().expect("lock")["x"], 3);
        assert_eq!(counters.failed.load(Relaxed), 1);
        assert_eq!(counters.retried.load(Relaxed), 2);
        assert_eq!(counters.sent.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_action_times_out_and_is_retried() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_secs(30),
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 1, 1);
        let (tx, rx) = mpsc::channel(10);
        let task = tokio::spawn(d.dispatch(rx));
        tx.send(job("m", "x")).await.expect("send");
        drop(tx);
        task.await.expect("dispatcher");
        assert_eq!(rec.attempts.lock().expect("lock")["x"], 2);
        assert_eq!(counters.failed.load(Relaxed), 1);
        assert_eq!(counters.sent.load(Relaxed), 0);
    }

    #[test]
    fn config_checks() {
        let parse = |t: &str| crate::config::from_str_with_env(t, std::path::Path::new("t"), &[]);
        let err = parse("[[actions]]\nname = \"a\"\n").expect_err("no kind");
        assert!(err.to_string().contains("exactly one"), "{err}");
        let err = parse(
            "[[actions]]\nname = \"a\"\nbody = \"{{ fun \"\nexec = { command = [\"/bin/true\"] }\n",
        )
        .expect_err("bad template");
        assert!(err.to_string().contains("body template"), "{err}");
        let err = parse(
            "[[actions]]\nname = \"a\"\nexec = { command = [\"/bin/true\"] }\n[[actions]]\nname = \"a\"\nexec = { command = [\"/bin/true\"] }\n",
        )
        .expect_err("duplicate");
        assert!(err.to_string().contains("another action"), "{err}");
        parse("[[actions]]\nname = \"a\"\nwhen = { fun = \"state.*\", success = false }\ndedupe_key = \"{{ fun }}/{{ minion }}\"\nexec = { command = [\"/bin/true\"] }\n").expect("good");
    }
}
