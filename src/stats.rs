//! Counters for everything that happens to an event, and the internal events
//! that both log and count.
//!
//! Plain atomics rather than calls into the `metrics` registry on the hot
//! path: decode + rules runs at millions of events a second and a labelled
//! registry lookup per event would cost more than the work itself. The
//! `/metrics` endpoint and `replay`'s summary read these same counters, so
//! what an operator sees and what the tests assert are one set of numbers.
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

/// Every counter saltpipe keeps. Shared behind an `Arc`.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_read: AtomicU64,
    pub frames: AtomicU64,
    pub malformed: AtomicU64,
    pub garbage_bytes: AtomicU64,
    pub oversized: AtomicU64,
    pub kept: AtomicU64,
    pub dropped: [AtomicU64; DropReason::ALL.len()],
    pub overflow_dropped: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub queued: AtomicU64,
    /// Listener with a broker: events written to the local spool because
    /// the broker was down, slow or behind (the rest were published directly).
    pub spooled: AtomicU64,
    pub queue_errors: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub batches: AtomicU64,
    pub batch_events: AtomicU64,
    pub returns_written: AtomicU64,
    pub jids_written: AtomicU64,
    pub events_written: AtomicU64,
    pub rows_ignored: AtomicU64,
    pub sink_retries: AtomicU64,
    pub sink_failures: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Values hidden by `[sink] redact` (each key's value counts once).
    pub redacted: AtomicU64,
    /// Returns written, by outcome ([`Outcome::index`]); `no_return`:
    /// targeted minions the return-window sweep recorded as silent.
    pub outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Targets whose return window the sweep closed (returned or not).
    pub targets_closed: AtomicU64,
    pub sink_latency_us_total: AtomicU64,
    /// Milliseconds since the epoch of the oldest event not yet acknowledged, 0 if none.
    pub oldest_unacked_ms: AtomicI64,
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
    /// Config reloads that took effect, and those refused as invalid.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Backfill (src/backfill/): jobs (`new`) and returns read back from the
    /// master's job cache and fed to the rules, whether or not the sink
    /// already had them.
    pub backfilled_jobs: AtomicU64,
    pub backfilled_returns: AtomicU64,
    /// Job cache entries that could not be read or decoded (skipped).
    pub backfill_unreadable: AtomicU64,
    /// Scans that could not run: no job cache, or no permission.
    pub backfill_failures: AtomicU64,
    /// Log lines about bad bus input (malformed or oversized frames): a
    /// hostile writer must not be able to turn 1 MB of junk into 100,000
    /// log lines. The counters above still count every one.
    pub bad_input_log: LogLimit,
}

/// At most [`LogLimit::PER_WINDOW`] log lines per [`LogLimit::WINDOW`] for
/// one kind of report; the first line of the next window says how many were
/// left out. By hand: `tracing` has no rate limit, and this is ten lines.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// (window start, lines logged in it, reports suppressed since the last line).
    state: Mutex<Option<(std::time::Instant, u32, u64)>>,
}

impl LogLimit {
    pub const PER_WINDOW: u32 = 10;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

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

/// A copy of the counters at one moment, for printing and comparing.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub bytes_read: u64,
    pub frames: u64,
    pub malformed: u64,
    pub oversized: u64,
    pub kept: u64,
    pub dropped: BTreeMap<&'static str, u64>,
    pub overflow_dropped: u64,
    pub disconnects: u64,
    pub queued: u64,
    /// Of those, written to the listener's spool (broker queues only).
    pub spooled: u64,
    pub acked: u64,
    pub batches: u64,
    pub returns_written: u64,
    pub jids_written: u64,
    pub events_written: u64,
    pub rows_ignored: u64,
    pub sink_retries: u64,
    pub dead_letters: u64,
    pub redacted: u64,
    /// Returns by outcome, and silent minions (only outcomes that happened).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Total time spent in sink writes, ms.
    pub sink_busy_ms: u64,
    /// Read back from the master's job cache (backfill).
    pub backfilled_jobs: u64,
    pub backfilled_returns: u64,
    /// Action outcomes by action name (only outcomes that happened).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub actions: BTreeMap<String, BTreeMap<&'static str, u64>>,
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
            bytes_read: self.bytes_read.load(Relaxed),
            frames: self.frames.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            oversized: self.oversized.load(Relaxed),
            kept: self.kept.load(Relaxed),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.dropped[r.index()].load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            overflow_dropped: self.overflow_dropped.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            queued: self.queued.load(Relaxed),
            spooled: self.spooled.load(Relaxed),
            acked: self.acked.load(Relaxed),
            batches: self.batches.load(Relaxed),
            returns_written: self.returns_written.load(Relaxed),
            jids_written: self.jids_written.load(Relaxed),
            events_written: self.events_written.load(Relaxed),
            rows_ignored: self.rows_ignored.load(Relaxed),
            sink_retries: self.sink_retries.load(Relaxed),
            dead_letters: self.dead_letters.load(Relaxed),
            redacted: self.redacted.load(Relaxed),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.as_str(), self.outcomes[o.index()].load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            sink_busy_ms: self.sink_latency_us_total.load(Relaxed) / 1000,
            backfilled_jobs: self.backfilled_jobs.load(Relaxed),
            backfilled_returns: self.backfilled_returns.load(Relaxed),
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
        }
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
            if let Some(suppressed) = stats.bad_input_log.admit(std::time::Instant::now()) {
                tracing::warn!(
                    reason = self.reason,
                    skipped = self.skipped,
                    excerpt = self.excerpt,
                    suppressed,
                    "skipped malformed bus data (suppressed: reports left out of the log since the last line; every one is counted in saltpipe_frames_malformed_total)"
                );
            }
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
            if let Some(suppressed) = stats.bad_input_log.admit(std::time::Instant::now()) {
                tracing::error!(
                    len = self.len,
                    limit = self.limit,
                    suppressed,
                    "skipped an event larger than source.max_frame; raise it to keep such events"
                );
            }
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
            tracing::error!(
                dropped = self.dropped,
                pending_bytes = self.pending_bytes,
                "the queue cannot keep up with the bus; dropped kept events rather than stall the reader"
            );
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

    /// One event was refused for good and set aside with the reason.
    pub struct DeadLettered<'a> {
        pub tag: &'a str,
        pub error: &'a str,
    }

    impl DeadLettered<'_> {
        pub fn emit(&self, stats: &Stats) {
            stats.dead_letters.fetch_add(1, Relaxed);
            tracing::error!(
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
