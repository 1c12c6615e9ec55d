//! The Live page's feed: a summary of every kept event, as it is kept,
//! for whoever watches, through server-sent events.
//!
//! Why a lossy broadcast: the feed must never slow ingest. The listener
//! offers each kept event to a bounded `tokio::sync::broadcast` channel,
//! which never waits: a watcher that falls behind loses the oldest
//! summaries (counted in `saltpipe_web_live_dropped_total`), never the
//! listener's time. With no watcher connected the offer is one atomic load
//! and nothing is built. A summary is small and bounded (time, tag, jid,
//! minion, function, outcome, each cut to a limit), so the channel's memory
//! is bounded too; the outcome is judged from the return only when it is
//! small ([`JUDGE_LIMIT`]), else from `success` / `retcode`, so a huge
//! highstate costs the listener no more with a watcher than without.
//!
//! Only a process that ingests (`saltpipe run`) has a feed; `saltpipe web`
//! says so on the page.

use crate::event::{Event, Kind};
use crate::stats::Stats;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tokio::sync::broadcast;

/// Summaries a watcher may fall behind by before it loses the oldest.
pub const CAPACITY: usize = 1024;
/// Watchers connected at once at most (each holds a receiver).
pub const MAX_WATCHERS: usize = 32;
/// Returns up to this size are judged in full (ok / changed / failed).
pub const JUDGE_LIMIT: usize = 64 * 1024;
/// Longest text a summary field keeps (characters).
const FIELD_LIMIT: usize = 200;

/// What the Live page shows of one kept event.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// When the listener read it, RFC 3339 UTC with milliseconds.
    pub time: String,
    pub tag: String,
    pub jid: String,
    pub minion: String,
    pub fun: String,
    /// ok / changed / failed for returns, empty for other events.
    pub outcome: String,
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(FIELD_LIMIT) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl Summary {
    /// The summary of a kept event read at `received_ms`.
    pub fn of(event: &Event, received_ms: i64) -> Summary {
        let f = &event.fields;
        let is_return = matches!(
            event.kind,
            Kind::JobReturn | Kind::RunnerReturn | Kind::WheelReturn
        );
        let outcome = if !is_return {
            String::new()
        } else if event.data().len() <= JUDGE_LIMIT {
            crate::outcome::of_event(event)
                .map(|o| o.as_str().to_owned())
                .unwrap_or_default()
        } else if f.success == Some(false) || f.retcode.is_some_and(|c| c != 0) {
            "failed".to_owned()
        } else {
            "ok".to_owned()
        };
        let time = u64::try_from(received_ms)
            .ok()
            .map(|ms| {
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                )
                .to_string()
            })
            .unwrap_or_default();
        Summary {
            time,
            tag: cut(event.tag()),
            jid: cut(f.jid.as_deref().unwrap_or_default()),
            minion: cut(f.minion.as_deref().unwrap_or_default()),
            fun: cut(&f.fun.join(",")),
            outcome,
        }
    }
}

/// The sending side, held by the listener (cheap to clone), and the way
/// the web pages subscribe.
#[derive(Clone)]
pub struct LiveFeed {
    tx: broadcast::Sender<Arc<Summary>>,
    watchers: Arc<AtomicUsize>,
    stats: Arc<Stats>,
}

impl LiveFeed {
    pub fn new(stats: Arc<Stats>) -> LiveFeed {
        let (tx, _) = broadcast::channel(CAPACITY);
        LiveFeed {
            tx,
            watchers: Arc::default(),
            stats,
        }
    }

    /// Offers a kept event; never waits. Builds nothing when no one watches.
    pub fn offer(&self, event: &Event, received_ms: i64) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        // An error means the last watcher just left: nothing to do.
        let _ = self.tx.send(Arc::new(Summary::of(event, received_ms)));
    }

    /// A new watcher, or None past [`MAX_WATCHERS`].
    pub fn watch(&self) -> Option<Watcher> {
        let n = self.watchers.fetch_add(1, Relaxed);
        if n >= MAX_WATCHERS {
            self.watchers.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Watcher {
            rx: self.tx.subscribe(),
            watchers: self.watchers.clone(),
            stats: self.stats.clone(),
        })
    }

    /// The counters of the process that ingests (the overview's figures).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

/// What a watcher gets next.
#[derive(Debug)]
pub enum Seen {
    Event(Arc<Summary>),
    /// It fell behind: this many summaries were lost to it (counted).
    Skipped(u64),
}

/// One connected watcher.
pub struct Watcher {
    rx: broadcast::Receiver<Arc<Summary>>,
    watchers: Arc<AtomicUsize>,
    stats: Arc<Stats>,
}

impl Watcher {
    /// The next summary, or how many it lost by falling behind (counted
    /// in the stats); None when the feed is gone.
    pub async fn next(&mut self) -> Option<Seen> {
        match self.rx.recv().await {
            Ok(s) => Some(Seen::Event(s)),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.stats.web_live_dropped.fetch_add(n, Relaxed);
                Some(Seen::Skipped(n))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ret(jid: &str, minion: &str, success: bool) -> Event {
        let mut d = Vec::new();
        let _ = rmp::encode::write_map_len(&mut d, 5);
        for (k, v) in [("id", minion), ("jid", jid), ("fun", "test.ping")] {
            let _ = rmp::encode::write_str(&mut d, k);
            let _ = rmp::encode::write_str(&mut d, v);
        }
        let _ = rmp::encode::write_str(&mut d, "return");
        let _ = rmp::encode::write_bool(&mut d, success);
        let _ = rmp::encode::write_str(&mut d, "success");
        let _ = rmp::encode::write_bool(&mut d, success);
        let mut body = format!("salt/job/{jid}/ret/{minion}\n\n").into_bytes();
        body.extend_from_slice(&d);
        Event::from_body(body.into()).expect("event")
    }

    #[tokio::test]
    async fn summaries_reach_watchers_and_lag_is_counted() {
        let stats = Arc::new(Stats::default());
        let feed = LiveFeed::new(stats.clone());
        // No watcher: nothing is sent (and nothing built).
        feed.offer(&ret("20261202120000000000", "m1", true), 0);
        let mut w = feed.watch().expect("watcher");
        feed.offer(
            &ret("20261202120000000001", "m<2>", false),
            1_764_000_000_000,
        );
        let Some(Seen::Event(s)) = w.next().await else {
            panic!("no summary")
        };
        assert_eq!(s.minion, "m<2>");
        assert_eq!(s.jid, "20261202120000000001");
        assert_eq!(s.fun, "test.ping");
        assert_eq!(s.outcome, "failed");
        assert_eq!(s.time, "2025-11-24T16:00:00.000Z");
        // A watcher that falls behind loses the oldest, counted.
        for i in 0..CAPACITY + 10 {
            feed.offer(&ret(&format!("2026120212000000{i:04}"), "m", true), 0);
        }
        assert!(matches!(w.next().await, Some(Seen::Skipped(10))));
        let Some(Seen::Event(s)) = w.next().await else {
            panic!("no summary")
        };
        assert_eq!(s.outcome, "ok");
        assert_eq!(stats.web_live_dropped.load(Relaxed), 10);
    }

    #[test]
    fn watchers_are_bounded() {
        let feed = LiveFeed::new(Arc::new(Stats::default()));
        let held: Vec<Watcher> = (0..MAX_WATCHERS).filter_map(|_| feed.watch()).collect();
        assert_eq!(held.len(), MAX_WATCHERS);
        assert!(feed.watch().is_none());
        drop(held);
        assert!(feed.watch().is_some());
    }

    #[test]
    fn long_fields_are_cut() {
        let long = "x".repeat(1000);
        let s = cut(&long);
        assert_eq!(s.chars().count(), FIELD_LIMIT + 1);
    }
}
