//! Counters for everything that happens to an event, and the internal events
//! that both log and count.
//!
//! Plain atomics rather than calls into the `metrics` registry on the hot
//! path: decode + rules runs at millions of events a second and a labelled
//! registry lookup per event would cost more than the work itself. The
//! `/metrics` endpoint and `replay`'s summary read these same counters, so
//! what an operator sees and what the tests assert are one set of numbers.
//!
//! Each counter is declared once, in the [`stats!`] table below: its field,
//! its Prometheus name (and label), and its doc comment, which is also the
//! metric's help text. The table generates the field in [`Stats`], in
//! [`Snapshot`], in [`Stats::snapshot`], in the `/metrics` export
//! ([`Stats::counters`]) and in the summary's lines, so adding a counter is
//! one line here and a call where it happens.
//!
//! As in Vector, each noteworthy happening is one struct with an `emit`
//! that writes the log line and bumps the counter together, so the two can
//! never disagree.

use crate::outcome::Outcome;
use crate::rules::DropReason;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// One counter as `/metrics` exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// The Prometheus name.
    pub metric: &'static str,
    /// One `(name, value)` label, for counters that share a metric.
    pub label: Option<(&'static str, &'static str)>,
    /// The doc comment of its field.
    pub help: &'static str,
    pub value: u64,
}

/// Declares the plain counters (see the module docs) and the rest of
/// [`Stats`]'s state, which is spelled out as written.
macro_rules! stats {
    (
        counters {
            $(
                $(#[doc = $doc:literal])+
                $field:ident => $metric:literal $([$lname:literal = $lvalue:literal])?;
            )+
        }
        state { $($state:tt)* }
    ) => {
        /// Every counter saltpipe keeps. Shared behind an `Arc`.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[doc = $doc])+ pub $field: AtomicU64, )+
            $($state)*
        }

        /// A copy of the counters at one moment, for printing and comparing.
        #[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
        pub struct Snapshot {
            $( $(#[doc = $doc])+ pub $field: u64, )+
            /// Events the rules dropped, by reason (only reasons that happened).
            pub dropped: BTreeMap<&'static str, u64>,
            /// Returns by outcome, and silent minions (only outcomes that happened).
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            pub outcomes: BTreeMap<&'static str, u64>,
            /// Action outcomes by action name (only outcomes that happened).
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            pub actions: BTreeMap<String, BTreeMap<&'static str, u64>>,
        }

        impl Stats {
    /// The memory budget in force: the one installed, else an unlimited one.
    pub fn budget(&self) -> &Arc<crate::memory::Budget> {
        self.memory
            .get_or_init(|| Arc::new(crate::memory::Budget::unlimited()))
    }

    /// Installs the process's budget; the first one installed stays (main
    /// installs it before anything starts; the pipeline's own calls are
    /// then no-ops).
    pub fn install_budget(&self, budget: crate::memory::Budget) -> &Arc<crate::memory::Budget> {
        let _ = self.memory.set(Arc::new(budget));
        self.budget()
    }

            /// Every plain counter, as `/metrics` exports it.
            pub fn counters(&self) -> Vec<Counter> {
                vec![$(
                    Counter {
                        metric: $metric,
                        label: stats!(@label $($lname, $lvalue)?),
                        help: concat!($($doc),+).trim_ascii(),
                        value: self.$field.load(Relaxed),
                    },
                )+]
            }

            fn plain_snapshot(&self) -> Snapshot {
                Snapshot {
                    $( $field: self.$field.load(Relaxed), )+
                    ..Snapshot::default()
                }
            }
        }

        impl Snapshot {
            /// `(field, value)` of every plain counter, in declaration order.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($field), self.$field), )+]
            }
        }
    };
    (@label $name:literal, $value:literal) => { Some(($name, $value)) };
    (@label) => { None };
}

stats! {
    counters {
        /// Bytes read from the event bus.
        bytes_read => "saltpipe_bus_bytes_read_total";
        /// Frames (events) read from the bus.
        frames => "saltpipe_frames_total";
        /// Bus data that was not an event, skipped.
        malformed => "saltpipe_frames_malformed_total";
        /// Bytes of bus data stepped over as not an event.
        garbage_bytes => "saltpipe_bus_garbage_bytes_total";
        /// Events over source.max_frame, skipped.
        oversized => "saltpipe_frames_oversized_total";
        /// Events the rules kept.
        kept => "saltpipe_events_kept_total";
        /// Kept events dropped because the queue could not keep up.
        overflow_dropped => "saltpipe_events_overflow_dropped_total";
        /// Kept events the listener moved to its overflow file on local disk because the queue was behind and its memory part full (read back in order when the queue has room; none lost).
        overflow_spilled => "saltpipe_events_overflow_spilled_total";
        /// Connections made to the event bus.
        connects => "saltpipe_bus_connects_total";
        /// Connections to the bus lost (each a possible gap).
        disconnects => "saltpipe_bus_disconnects_total";
        /// Events stored in the durable queue.
        queued => "saltpipe_queue_pushed_total";
        /// Events the listener kept in its local spool because the broker was down, slow or behind.
        spooled => "saltpipe_queue_spooled_total";
        /// Failed queue writes (retried).
        queue_errors => "saltpipe_queue_errors_total";
        /// Transactions the listener's queue writer stored.
        queue_writes => "saltpipe_queue_writes_total";
        /// Time the listener's queue writer spent storing them; divide by saltpipe_queue_writes_total for the mean. The reader's backlog grows while a write takes long.
        queue_write_us_total => "saltpipe_queue_write_microseconds_total";
        /// Events workers pulled from the queue.
        delivered => "saltpipe_events_delivered_total";
        /// Times a worker paused pulling (20 ms) because the listener's backlog was over half its part: a burst on the bus, which gets the CPU and the queue's write lock first.
        worker_yields => "saltpipe_worker_yields_total";
        /// Events written and acknowledged.
        acked => "saltpipe_events_acked_total";
        /// Batches written (one transaction each).
        batches => "saltpipe_batches_total";
        /// Events in all batches written; divide by saltpipe_batches_total for the mean batch size.
        batch_events => "saltpipe_batch_events_sum";
        /// Rows inserted, by table.
        returns_written => "saltpipe_rows_written_total" ["table" = "salt_returns"];
        /// Rows inserted, by table.
        jids_written => "saltpipe_rows_written_total" ["table" = "jids"];
        /// Rows inserted, by table.
        events_written => "saltpipe_rows_written_total" ["table" = "salt_events"];
        /// Rows already present (redelivery, duplicates).
        rows_ignored => "saltpipe_rows_ignored_total";
        /// Batch writes that failed and were retried.
        sink_retries => "saltpipe_sink_retries_total";
        /// Batch writes refused for good (narrowed down to one row).
        sink_failures => "saltpipe_sink_errors_total";
        /// Events set aside in the dead-letter table.
        dead_letters => "saltpipe_dead_letters_total";
        /// Values hidden as "***" by [sink] redact before storing and actions.
        redacted => "saltpipe_redacted_values_total";
        /// Targeted minions whose job's return window closed (returned or not).
        targets_closed => "saltpipe_targets_closed_total";
        /// Time spent writing batches; divide by saltpipe_batches_total for the mean.
        sink_latency_us_total => "saltpipe_sink_latency_microseconds_total";
        /// Jobs read back from the master's job cache and fed to the rules (the sink ignores those it has).
        backfilled_jobs => "saltpipe_backfilled_jobs_total";
        /// Returns read back from the master's job cache and fed to the rules (the sink ignores those it has).
        backfilled_returns => "saltpipe_backfilled_returns_total";
        /// Job cache entries that could not be read or decoded, skipped.
        backfill_unreadable => "saltpipe_backfill_unreadable_total";
        /// Job cache scans that could not run (no cache, no permission).
        backfill_failures => "saltpipe_backfill_failures_total";
        /// Configuration reloads (SIGHUP) applied.
        reloads => "saltpipe_config_reloads_total";
        /// Reloads refused (invalid config; the old one stays).
        reload_failures => "saltpipe_config_reload_failures_total";
        /// Live-page summaries a watcher lost because it fell behind (the feed never waits).
        web_live_dropped => "saltpipe_web_live_dropped_total";
    }
    state {
        /// Events the rules dropped, by [`DropReason::index`].
        pub dropped: [AtomicU64; DropReason::ALL.len()],
        /// Returns written, by outcome ([`Outcome::index`]); `no_return`:
        /// targeted minions the return-window sweep recorded as silent.
        pub outcomes: [AtomicU64; Outcome::ALL.len()],
        /// Milliseconds since the epoch of the oldest event not yet acknowledged, 0 if none.
        pub oldest_unacked_ms: AtomicI64,
        /// When the listener's queue write in progress began (ms since the
        /// epoch), 0 if none: an overflow says how long the queue has held
        /// the writer ([`events::QueueOverflow`]).
        pub queue_write_since_ms: AtomicI64,
        /// Bytes in the listener's overflow file not yet read back.
        pub overflow_bytes: AtomicU64,
        /// The most the overflow file has held since the start.
        pub overflow_peak_bytes: AtomicU64,
        /// The slowest queue write so far, in microseconds.
        pub queue_write_slowest_us: AtomicU64,
        /// Workers whose loop is running, and how many were started (for `/health`).
        pub workers_running: AtomicI64,
        pub workers_expected: AtomicI64,
        /// This process reads the bus (`run`, `listen`), so `/health` checks it.
        pub bus_expected: std::sync::atomic::AtomicBool,
        /// Messages waiting in each named queue, as last polled by its worker.
        pub queue_depths: Mutex<BTreeMap<String, u64>>,
        /// Received time (ms since the epoch) of the oldest message each worker
        /// last pulled while its queue still had a backlog; 0 when caught up.
        pub queue_oldest_ms: Mutex<BTreeMap<String, i64>>,
        /// Action outcomes by action name; survives a reload (SIGHUP).
        pub actions: Mutex<BTreeMap<String, Arc<ActionCounters>>>,
        /// The process's memory budget ([`crate::memory`]): installed once
        /// from the config by the pipeline; unlimited until then.
        pub memory: std::sync::OnceLock<Arc<crate::memory::Budget>>,
    }
}

/// At most [`LogLimit::PER_WINDOW`] log lines per [`LogLimit::WINDOW`] for
/// one kind of report; the first line of the next window says how many were
/// left out. By hand: `tracing` has no rate limit, and this is ten lines.
/// Used through [`log_limited!`](crate::log_limited), one per call site.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// (window start, lines logged in it, reports suppressed since the last line).
    state: Mutex<Option<(std::time::Instant, u32, u64)>>,
}

/// Logs like `tracing::<level>!`, at most [`LogLimit::PER_WINDOW`] lines per
/// [`LogLimit::WINDOW`] from this call site, each with the field
/// `suppressed`: the reports left out of the log since the line before.
///
/// For every report that input can trigger once per event (a bad frame, a
/// dropped chunk, an undecodable message, an action turned away): a storm
/// of them must not become a storm of log lines (a hostile writer turning
/// 1 MB of junk into 100,000 lines, a full disk filled further by its own
/// complaints). Each report is still counted in full by its metric.
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::stats::LogLimit = $crate::stats::LogLimit::new();
        if let Some(suppressed) = LIMIT.admit(::std::time::Instant::now()) {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

impl LogLimit {
    pub const PER_WINDOW: u32 = 10;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

    pub const fn new() -> LogLimit {
        LogLimit {
            state: Mutex::new(None),
        }
    }

    /// `Some(n)`: log this report, saying that `n` before it were not;
    /// `None`: leave it out (it is counted for the next line).
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, lines, suppressed) = g.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= Self::WINDOW {
            *start = now;
            *lines = 0;
        }
        if *lines >= Self::PER_WINDOW {
            *suppressed += 1;
            return None;
        }
        *lines += 1;
        Some(std::mem::take(suppressed))
    }
}

/// What happened to the events one action was offered.
#[derive(Debug, Default)]
pub struct ActionCounters {
    /// Delivered (HTTP 2xx, mail accepted, command exited 0).
    pub sent: AtomicU64,
    /// Given up after the last retry.
    pub failed: AtomicU64,
    /// Attempts that failed and were tried again.
    pub retried: AtomicU64,
    /// Not queued: the action's queue was full, `queue_size` events or
    /// `queue_bytes` bytes (the write never waits).
    pub dropped: AtomicU64,
    /// Skipped: over the action's rate limit.
    pub rate_limited: AtomicU64,
    /// Skipped: same de-duplication key within the window.
    pub deduplicated: AtomicU64,
    /// Still queued or in flight when the drain time at shutdown ran out.
    pub given_up: AtomicU64,
}

impl ActionCounters {
    /// (outcome label, value) pairs, for metrics and summaries.
    pub fn outcomes(&self) -> [(&'static str, u64); 7] {
        [
            ("sent", self.sent.load(Relaxed)),
            ("failed", self.failed.load(Relaxed)),
            ("retried", self.retried.load(Relaxed)),
            ("dropped", self.dropped.load(Relaxed)),
            ("rate_limited", self.rate_limited.load(Relaxed)),
            ("deduplicated", self.deduplicated.load(Relaxed)),
            ("given_up", self.given_up.load(Relaxed)),
        ]
    }
}

impl Stats {
    pub fn count_drop(&self, reason: DropReason) {
        self.dropped[reason.index()].fetch_add(1, Relaxed);
    }

    /// The counters of one action, created on first use.
    pub fn action(&self, name: &str) -> Arc<ActionCounters> {
        let mut map = self.actions.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    /// True while a bus connection is open (connects and disconnects pair up).
    pub fn bus_connected(&self) -> bool {
        self.connects.load(Relaxed) > self.disconnects.load(Relaxed)
    }

    pub fn set_queue_depth(&self, queue: &str, depth: u64, oldest_ms: i64) {
        let mut d = self.queue_depths.lock().unwrap_or_else(|p| p.into_inner());
        d.insert(queue.to_owned(), depth);
        drop(d);
        let mut o = self
            .queue_oldest_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        o.insert(queue.to_owned(), oldest_ms);
    }

    pub fn count_outcome(&self, outcome: Outcome, n: u64) {
        self.outcomes[outcome.index()].fetch_add(n, Relaxed);
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            dropped: DropReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.dropped[r.index()].load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.as_str(), self.outcomes[o.index()].load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            actions: self
                .actions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(name, a)| {
                    let o = a.outcomes().into_iter().filter(|(_, n)| *n > 0).collect();
                    (name.clone(), o)
                })
                .collect(),
            ..self.plain_snapshot()
        }
    }
}

/// The summary as readable text: one `name value` pair per counter that is
/// not zero, then drops by reason, outcomes, and actions.
impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .counters()
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let group = |name: &str, m: &BTreeMap<&'static str, u64>| {
            let inner: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
            format!("{name} ({})", inner.join(", "))
        };
        if !self.dropped.is_empty() {
            parts.push(group("dropped", &self.dropped));
        }
        if !self.outcomes.is_empty() {
            parts.push(group("outcomes", &self.outcomes));
        }
        for (name, a) in &self.actions {
            parts.push(group(&format!("action {name}"), a));
        }
        if parts.is_empty() {
            return f.write_str("nothing happened");
        }
        f.write_str(&parts.join(", "))
    }
}

/// Internal events: each logs and counts in one place.
pub mod events {
    use super::*;

    /// Bytes on the bus that were not a frame.
    pub struct FrameRejected<'a> {
        pub reason: &'a str,
        pub skipped: usize,
        pub excerpt: &'a str,
    }

    impl FrameRejected<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.malformed.fetch_add(1, Relaxed);
            stats.garbage_bytes.fetch_add(self.skipped as u64, Relaxed);
            crate::log_limited!(
                warn,
                reason = self.reason,
                skipped = self.skipped,
                excerpt = self.excerpt,
                "skipped malformed bus data (suppressed: reports left out of the log since the last line; every one is counted in saltpipe_frames_malformed_total)"
            );
        }
    }

    /// A frame over `max_frame` was skipped.
    pub struct FrameOversized {
        pub len: usize,
        pub limit: usize,
    }

    impl FrameOversized {
        pub fn emit(&self, stats: &Stats) {
            stats.oversized.fetch_add(1, Relaxed);
            crate::log_limited!(
                error,
                len = self.len,
                limit = self.limit,
                "skipped an event larger than source.max_frame; raise it to keep such events"
            );
        }
    }

    /// The connection to the bus ended: anything the master had buffered is gone.
    pub struct BusDisconnected<'a> {
        pub address: &'a str,
        pub error: Option<&'a str>,
        pub partial_bytes: usize,
    }

    impl BusDisconnected<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.disconnects.fetch_add(1, Relaxed);
            tracing::warn!(
                address = self.address,
                error = self.error.unwrap_or("end of stream"),
                partial_bytes = self.partial_bytes,
                "lost the event bus: events published until we reconnect are not seen (possible gap)"
            );
        }
    }

    pub struct BusConnected<'a> {
        pub address: &'a str,
    }

    impl BusConnected<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.connects.fetch_add(1, Relaxed);
            tracing::info!(address = self.address, "connected to the event bus");
        }
    }

    /// The queue writer fell behind the bus by more than `pending_limit`.
    pub struct QueueOverflow {
        pub dropped: usize,
        pub pending_bytes: usize,
    }

    impl QueueOverflow {
        pub fn emit(&self, stats: &Stats) {
            stats
                .overflow_dropped
                .fetch_add(self.dropped as u64, Relaxed);
            // Whether the queue's writer is inside one long write, and the
            // longest so far: what to look at first when this happens.
            let since = stats.queue_write_since_ms.load(Relaxed);
            let write_running_ms = if since > 0 {
                (crate::source::now_ms() - since).max(0)
            } else {
                0
            };
            crate::log_limited!(
                error,
                dropped = self.dropped,
                pending_bytes = self.pending_bytes,
                write_running_ms,
                slowest_write_ms = stats.queue_write_slowest_us.load(Relaxed) / 1000,
                "the queue cannot keep up with the bus; dropped kept events rather than stall the reader (every one is counted in saltpipe_events_overflow_dropped_total)"
            );
        }
    }

    /// The queue was behind and the listener's part full: a chunk of kept
    /// events went to the overflow file instead of being dropped.
    pub struct OverflowSpilled {
        pub events: usize,
        /// Bytes in the file now.
        pub on_disk: u64,
    }

    impl OverflowSpilled {
        pub fn emit(&self, stats: &Stats) {
            stats
                .overflow_spilled
                .fetch_add(self.events as u64, Relaxed);
            stats.overflow_bytes.store(self.on_disk, Relaxed);
            stats.overflow_peak_bytes.fetch_max(self.on_disk, Relaxed);
            crate::log_limited!(
                warn,
                events = self.events,
                on_disk_bytes = self.on_disk,
                "the queue is behind the bus and the listener's memory part is full; holding kept events in the overflow file until the queue has room (counted in saltpipe_events_overflow_spilled_total)"
            );
        }
    }

    /// The overflow file has been read back whole: the queue caught up.
    pub struct OverflowEmptied {
        pub episode: crate::source::overflow::Episode,
    }

    impl OverflowEmptied {
        pub fn emit(&self, _stats: &Stats) {
            let e = &self.episode;
            let secs = e.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
            tracing::info!(
                events = e.events,
                peak_bytes = e.peak_bytes,
                seconds = format_args!("{secs:.1}"),
                "the queue caught up: every event held in the overflow file is handed on, and the file is freed"
            );
        }
    }

    /// The overflow file could not take a chunk (full, or the disk
    /// refused); the chunk is dropped ([`QueueOverflow`]).
    pub struct OverflowRefused<'a> {
        pub error: &'a crate::source::overflow::OverflowError,
    }

    impl OverflowRefused<'_> {
        pub fn emit(&self, _stats: &Stats) {
            crate::log_limited!(error, error = %self.error, "cannot hold kept events in the overflow file");
        }
    }

    /// A chunk in the overflow file did not read back: its events are lost.
    pub struct OverflowUnreadable<'a> {
        pub lost: usize,
        pub error: &'a crate::source::overflow::OverflowError,
    }

    impl OverflowUnreadable<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.overflow_dropped.fetch_add(self.lost as u64, Relaxed);
            crate::log_limited!(error, lost = self.lost, error = %self.error, "kept events in the overflow file did not read back; they are lost (counted in saltpipe_events_overflow_dropped_total)");
        }
    }

    /// The listener's queue writer stored one transaction.
    pub struct QueueWritten {
        pub took: std::time::Duration,
    }

    impl QueueWritten {
        pub fn emit(&self, stats: &Stats) {
            let us = u64::try_from(self.took.as_micros()).unwrap_or(u64::MAX);
            stats.queue_writes.fetch_add(1, Relaxed);
            stats.queue_write_us_total.fetch_add(us, Relaxed);
            stats.queue_write_slowest_us.fetch_max(us, Relaxed);
        }
    }

    /// A batch write failed in a way that may pass on retry.
    pub struct SinkRetry<'a> {
        pub error: &'a str,
        pub attempt: u32,
        pub events: usize,
    }

    impl SinkRetry<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.sink_retries.fetch_add(1, Relaxed);
            tracing::warn!(
                error = self.error,
                attempt = self.attempt,
                events = self.events,
                "sink write failed, holding the batch and retrying"
            );
        }
    }

    /// SIGHUP: the new rules and actions took effect.
    pub struct ConfigReloaded<'a> {
        pub config: &'a str,
        pub rules: usize,
        pub actions: usize,
    }

    impl ConfigReloaded<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.reloads.fetch_add(1, Relaxed);
            tracing::info!(
                config = self.config,
                rules = self.rules,
                actions = self.actions,
                "SIGHUP: rules and actions reloaded (other settings change at restart)"
            );
        }
    }

    /// SIGHUP: the file did not load, or the running pipeline refused it.
    pub struct ReloadRefused<'a> {
        pub config: &'a str,
        pub error: &'a dyn std::fmt::Display,
        /// The file itself is invalid (else: valid, but not applicable live).
        pub invalid: bool,
    }

    impl ReloadRefused<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.reload_failures.fetch_add(1, Relaxed);
            let why = if self.invalid {
                "SIGHUP: the config is invalid; the running rules and actions stay"
            } else {
                "SIGHUP: reload refused; the running rules and actions stay"
            };
            tracing::error!(config = self.config, error = %self.error, "{why}");
        }
    }

    /// A scan of the master's job cache could not run.
    pub struct BackfillFailed<'a> {
        pub error: &'a dyn std::fmt::Display,
        /// Logged by the caller (`saltpipe backfill` prints it instead).
        pub quiet: bool,
    }

    impl BackfillFailed<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.backfill_failures.fetch_add(1, Relaxed);
            if !self.quiet {
                tracing::error!(error = %self.error, "backfill: cannot read the master's job cache; returns published while saltpipe was away are not recovered (set [backfill] job_cache_dir, give saltpipe read access, or enabled = false)");
            }
        }
    }

    /// One event was refused for good and set aside with the reason.
    pub struct DeadLettered<'a> {
        pub tag: &'a str,
        pub error: &'a str,
    }

    impl DeadLettered<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.dead_letters.fetch_add(1, Relaxed);
            crate::log_limited!(
                error,
                tag = self.tag,
                error = self.error,
                "event refused by the sink, stored in the dead-letter table"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn bad_input_logs_at_most_ten_lines_per_window_and_says_what_it_left_out() {
        let l = LogLimit::default();
        let t0 = Instant::now();
        let logged: Vec<u64> = (0..10_000)
            .filter_map(|i| l.admit(t0 + Duration::from_micros(i)))
            .collect();
        assert_eq!(logged, vec![0; 10], "ten lines in the first window");
        // The next window's first line says how many were left out.
        assert_eq!(
            l.admit(t0 + LogLimit::WINDOW + Duration::from_secs(1)),
            Some(9_990)
        );
        assert_eq!(
            l.admit(t0 + LogLimit::WINDOW + Duration::from_secs(2)),
            Some(0)
        );
    }

    #[test]
    fn a_log_limited_call_site_logs_ten_lines_of_a_storm() {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Lines::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1000 {
                crate::log_limited!(warn, event = i, "refused");
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), LogLimit::PER_WINDOW as usize, "{text}");
        assert!(lines[0].contains("suppressed=0") && lines[0].contains("event=0"));
        assert!(lines[9].contains("event=9"), "{text}");
    }

    #[test]
    fn every_counter_has_its_own_metric_and_help_and_reaches_the_snapshot() {
        let stats = Stats::default();
        let counters = stats.counters();
        let mut seen = std::collections::BTreeSet::new();
        for c in &counters {
            assert!(c.metric.starts_with("saltpipe_"), "{c:?}");
            assert!(!c.help.is_empty() && !c.help.starts_with(' '), "{c:?}");
            assert!(seen.insert((c.metric, c.label)), "declared twice: {c:?}");
        }
        stats.returns_written.store(7, Relaxed);
        stats.jids_written.store(2, Relaxed);
        let rows: Vec<_> = stats
            .counters()
            .into_iter()
            .filter(|c| c.metric == "saltpipe_rows_written_total")
            .map(|c| (c.label, c.value))
            .collect();
        assert_eq!(rows.len(), 3);
        assert!(rows.contains(&(Some(("table", "salt_returns")), 7)));
        let snap = stats.snapshot();
        assert_eq!(snap.counters().len(), counters.len());
        assert_eq!((snap.returns_written, snap.jids_written), (7, 2));
    }

    #[test]
    fn the_summary_reads_as_a_line_of_what_happened() {
        let stats = Stats::default();
        assert_eq!(stats.snapshot().to_string(), "nothing happened");
        stats.frames.store(10, Relaxed);
        stats.kept.store(4, Relaxed);
        stats.count_drop(DropReason::ALL[0]);
        stats.count_outcome(Outcome::Failed, 1);
        stats.action("page").sent.store(2, Relaxed);
        let line = stats.snapshot().to_string();
        assert_eq!(
            line,
            format!(
                "frames 10, kept 4, dropped ({} 1), outcomes (failed 1), action page (sent 2)",
                DropReason::ALL[0].as_str()
            )
        );
    }

    #[test]
    fn counters_count_every_report_the_log_leaves_out() {
        let stats = Stats::default();
        for _ in 0..1000 {
            events::FrameRejected {
                reason: "not_a_frame",
                skipped: 1,
                excerpt: "c1",
            }
            .emit(&stats);
        }
        assert_eq!(stats.malformed.load(Relaxed), 1000);
        assert_eq!(stats.garbage_bytes.load(Relaxed), 1000);
    }
}
