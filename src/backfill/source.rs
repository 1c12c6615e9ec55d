//! Feeding a scan into the pipeline: as a [`Source`] for `saltpipe
//! backfill`, and as [`Auto`], the scan `run` / `listen` make at start and
//! after every bus reconnect.
//!
//! The walk is blocking file I/O, so it runs on a blocking thread and hands
//! frames over in ~1 MiB chunks through a channel of two: the walk waits
//! when the pipeline is behind (a file can wait, unlike the bus), which
//! keeps memory bounded whatever the cache size.
//!
//! Where a reconnect scan starts: saltpipe keeps a small state file,
//! `backfill.state`, in its queue directory (the spool with a broker
//! queue), holding the last time it knew it was connected to the bus
//! (rewritten every [`HEARTBEAT`]). Chosen over asking the sink for its
//! newest row because `listen` with a broker has no sink; because the
//! newest row says nothing about a quiet bus (no jobs for hours is not a
//! gap); and because the job cache's mtimes and this file come from the
//! same clock, the master host's, where the database server's may differ.
//! The scan takes every job directory modified since that time minus
//! `[backfill] margin`; with no state file (the very first start) it takes
//! the last `margin` only: `saltpipe backfill --all` imports the history.

use super::scan::Kind;
use super::{BackfillConfig, BackfillError, ScanCounts, Scanner, Window};
use crate::source::{Ingest, Source, SourceError, now_ms};
use crate::stats::{Stats, events};
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bytes of frames handed over at once.
const CHUNK_BYTES: usize = 1 << 20;
/// How often the state file is rewritten while the bus is connected.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long after a scan that skipped half-written entries it runs again.
const RESCAN_AFTER: Duration = Duration::from_secs(5);

/// Runs `scanner` over `window` and feeds every frame to `ingest`, waiting
/// for the queue writer. Counts `backfilled_jobs` / `backfilled_returns`.
pub async fn feed(
    scanner: Scanner,
    window: Window,
    ingest: &mut Ingest,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) -> Result<ScanCounts, BackfillError> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(2);
    let st = stats.clone();
    let stop2 = stop.clone();
    let walk = tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4096);
        let r = scanner.scan(&window, &mut |frame, kind| {
            match kind {
                Kind::Job => st.backfilled_jobs.fetch_add(1, Relaxed),
                Kind::Return => st.backfilled_returns.fetch_add(1, Relaxed),
            };
            chunk.extend_from_slice(&frame);
            if chunk.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES + 4096));
                if stop2.is_cancelled() || tx.blocking_send(full).is_err() {
                    return false;
                }
            }
            true
        });
        if !chunk.is_empty() {
            let _ = tx.blocking_send(chunk);
        }
        r
    });
    let mut closed = false;
    while let Some(chunk) = rx.recv().await {
        ingest.buffer_mut().extend_from_slice(&chunk);
        ingest.process(now_ms());
        if ingest.flush_wait().await.is_err() {
            closed = true;
            break;
        }
    }
    drop(rx);
    let counts = walk.await.map_err(|e| BackfillError::Unreadable {
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    })??;
    if let Some(u) = (counts.unreadable > 0).then_some(counts.unreadable) {
        stats.backfill_unreadable.fetch_add(u, Relaxed);
    }
    if closed {
        return Err(BackfillError::QueueClosed);
    }
    Ok(counts)
}

/// `saltpipe backfill`: the job cache as a source that ends when the scan does.
pub struct JobCacheSource {
    scanner: Scanner,
    window: Window,
    /// What the scan found, for the summary.
    pub counts: Arc<std::sync::Mutex<Option<Result<ScanCounts, String>>>>,
}

impl JobCacheSource {
    pub fn new(scanner: Scanner, window: Window) -> JobCacheSource {
        JobCacheSource {
            scanner,
            window,
            counts: Default::default(),
        }
    }
}

#[async_trait]
impl Source for JobCacheSource {
    async fn run(
        &mut self,
        mut ingest: Ingest,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let stats = ingest.stats().clone();
        let r = feed(
            self.scanner.clone(),
            self.window.clone(),
            &mut ingest,
            &stats,
            &shutdown,
        )
        .await;
        let out = match r {
            Ok(c) => Ok(c),
            Err(BackfillError::QueueClosed) => return Err(SourceError::QueueClosed),
            Err(e) => {
                events::BackfillFailed {
                    error: &e,
                    quiet: true,
                }
                .emit(&stats);
                Err(e.to_string())
            }
        };
        if let Ok(mut g) = self.counts.lock() {
            *g = Some(out);
        }
        ingest.flush_wait().await
    }
}

/// The scan at start and after every bus reconnect (`run`, `listen`).
pub struct Auto {
    cfg: BackfillConfig,
    max_file: u64,
    state: PathBuf,
}

impl Auto {
    /// `state_dir`: the queue directory (or the broker spool).
    pub fn new(cfg: &BackfillConfig, max_file: u64, state_dir: PathBuf) -> Auto {
        Auto {
            cfg: cfg.clone(),
            max_file,
            state: state_dir.join("backfill.state"),
        }
    }

    /// The last time a previous run knew it was connected, if recorded.
    fn last_connected(&self) -> Option<SystemTime> {
        let text = std::fs::read_to_string(&self.state).ok()?;
        let secs: u64 = text.trim().parse().ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn record(&self, t: SystemTime) {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Write then rename, so a crash mid-write never leaves a torn file.
        let tmp = self.state.with_extension("state.tmp");
        let r = std::fs::create_dir_all(self.state.parent().unwrap_or(&self.state))
            .and_then(|()| std::fs::write(&tmp, format!("{secs}\n")))
            .and_then(|()| std::fs::rename(&tmp, &self.state));
        if let Err(e) = r {
            tracing::debug!(path = %self.state.display(), error = %e, "cannot record the backfill state");
        }
    }

    /// Watches the bus connection (through `stats`) until `shutdown`,
    /// scanning after each new connection. Never fails: a job cache that
    /// cannot be read is logged once per scan and counted.
    pub async fn run(self, mut ingest: Ingest, stats: Arc<Stats>, shutdown: CancellationToken) {
        let cache = self.cfg.resolve();
        if cache.master_job_cache_off {
            tracing::warn!(master_config = %self.cfg.master_config.display(), "backfill: the master has job_cache: False, so it keeps no returns to read back; backfill is off");
            return;
        }
        let mut last_seen = self.last_connected();
        let mut seen_connects = 0;
        let mut last_record = None::<SystemTime>;
        let mut rescan: Option<(tokio::time::Instant, Window)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = SystemTime::now();
            let connects = stats.connects.load(Relaxed);
            let mut window = None;
            if connects > seen_connects && stats.bus_connected() {
                seen_connects = connects;
                let since = match last_seen {
                    Some(t) => t.checked_sub(self.cfg.margin).unwrap_or(t),
                    None => now.checked_sub(self.cfg.margin).unwrap_or(now),
                };
                window = Some(Window {
                    since: Some(since),
                    jid: None,
                });
            } else if let Some((at, _)) = &rescan
                && tokio::time::Instant::now() >= *at
            {
                window = rescan.take().map(|(_, w)| w);
            }
            if stats.bus_connected() {
                last_seen = Some(now);
                if last_record
                    .is_none_or(|t| now.duration_since(t).unwrap_or_default() >= HEARTBEAT)
                {
                    self.record(now);
                    last_record = Some(now);
                }
            }
            let Some(window) = window else { continue };
            let since = window.since.map(super::scan::stamp).unwrap_or_default();
            let scanner = Scanner::new(cache.clone(), self.max_file);
            let started = std::time::Instant::now();
            match feed(scanner, window.clone(), &mut ingest, &stats, &shutdown).await {
                Ok(c) => {
                    tracing::info!(
                        job_cache = %cache.jobs_dir.display(),
                        since = %since,
                        jobs = c.jobs,
                        returns = c.returns,
                        skipped = c.skipped,
                        unreadable = c.unreadable,
                        seconds = started.elapsed().as_secs_f64(),
                        "backfill: fed the job cache's jobs written since the last time saltpipe was connected (the sink ignores those it has)"
                    );
                    if c.skipped > 0 {
                        rescan = Some((tokio::time::Instant::now() + RESCAN_AFTER, window));
                    }
                }
                Err(BackfillError::QueueClosed) => break,
                Err(e) => events::BackfillFailed {
                    error: &e,
                    quiet: false,
                }
                .emit(&stats),
            }
        }
        if stats.bus_connected() {
            self.record(SystemTime::now());
        }
        let _ = ingest.flush_wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::scan::tests::{job, load, ret};
    use crate::rules::Rules;
    use crate::source::{Chunk, SourceConfig};

    /// `Auto` running on its own task with a fresh `Ingest` and counters:
    /// the counters, what the ingest hands on, its stop token and task.
    fn start_auto(
        cfg: &BackfillConfig,
        queue: &std::path::Path,
    ) -> (
        Arc<Stats>,
        mpsc::Receiver<Chunk>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(8);
        let ingest = Ingest::new(
            &SourceConfig::default(),
            Rules::new(&Default::default()),
            stats.clone(),
            tx,
            crate::memory::Part::standalone(16 << 20),
        );
        let stop = CancellationToken::new();
        let auto = Auto::new(cfg, 1 << 20, queue.to_path_buf());
        let task = tokio::spawn(auto.run(ingest, stats.clone(), stop.clone()));
        (stats, rx, stop, task)
    }

    async fn returns_in(rx: &mut mpsc::Receiver<Chunk>, n: usize) -> usize {
        let mut got = 0;
        while got < n {
            let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("events in time")
                .expect("channel open");
            got += chunk
                .messages
                .iter()
                .filter(|m| m.key.contains('m'))
                .count();
        }
        got
    }

    #[tokio::test]
    async fn scans_at_each_new_connection_and_records_the_state() {
        let cache = tempfile::tempdir().expect("tmp");
        let queue = tempfile::tempdir().expect("tmp");
        let jid = "20261202120000000009";
        job(
            cache.path(),
            jid,
            &load(jid, "test.ping"),
            &["m"],
            &[("m", Some(ret(0, true)))],
        );
        let cfg = BackfillConfig {
            job_cache_dir: Some(cache.path().to_path_buf()),
            margin: Duration::from_secs(600),
            ..Default::default()
        };
        let (stats, mut rx, stop, task) = start_auto(&cfg, queue.path());

        // Not connected yet: no scan.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(stats.backfilled_returns.load(Relaxed), 0);
        // Connected: one scan (the job's new + its return).
        stats.connects.fetch_add(1, Relaxed);
        assert_eq!(returns_in(&mut rx, 1).await, 1);
        assert_eq!(stats.backfilled_jobs.load(Relaxed), 1);
        let state = queue.path().join("backfill.state");
        let recorded: u64 = std::fs::read_to_string(&state)
            .expect("state file")
            .trim()
            .parse()
            .expect("secs");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("now")
            .as_secs();
        assert!(now.abs_diff(recorded) <= 2, "{recorded} vs {now}");
        // Lost and found again: a second scan.
        stats.disconnects.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            stats.backfilled_returns.load(Relaxed),
            1,
            "no scan while away"
        );
        stats.connects.fetch_add(1, Relaxed);
        // Scanned again; the rules' duplicate window drops what this
        // process already queued (the sink would ignore it anyway).
        for _ in 0..100 {
            if stats.backfilled_returns.load(Relaxed) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(stats.backfilled_returns.load(Relaxed), 2);
        stop.cancel();
        task.await.expect("auto ends on shutdown");
    }

    #[tokio::test]
    async fn an_unreadable_cache_is_counted_and_saltpipe_runs_on() {
        let queue = tempfile::tempdir().expect("tmp");
        let cfg = BackfillConfig {
            job_cache_dir: Some("/nonexistent/saltpipe/jobs".into()),
            ..Default::default()
        };
        let (stats, _rx, stop, task) = start_auto(&cfg, queue.path());
        stats.connects.fetch_add(1, Relaxed);
        for _ in 0..100 {
            if stats.backfill_failures.load(Relaxed) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(stats.backfill_failures.load(Relaxed), 1);
        assert!(!task.is_finished(), "the watcher keeps running");
        stop.cancel();
        task.await.expect("ends");
    }

    #[test]
    fn a_later_start_scans_from_the_recorded_time() {
        let queue = tempfile::tempdir().expect("tmp");
        let auto = Auto::new(
            &BackfillConfig::default(),
            1 << 20,
            queue.path().to_path_buf(),
        );
        assert_eq!(auto.last_connected(), None, "first start: no state");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_610_967);
        auto.record(t);
        assert_eq!(auto.last_connected(), Some(t));
        std::fs::write(queue.path().join("backfill.state"), "garbage").expect("w");
        assert_eq!(auto.last_connected(), None, "a torn file is ignored");
    }
}
