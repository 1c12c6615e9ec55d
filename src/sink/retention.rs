//! Retention: `[sink] keep = "30d"` (and `archive = true`), the returner's
//! `keep_jobs` / `archive_jobs` done without the returner's pitfalls.
//!
//! Salt's `clean_old_jobs` deletes everything older in one statement per
//! table: on a big `salt_returns` that is one long transaction holding locks
//! while the writers wait, with no index on `alter_time` to find the rows.
//! Here a background task asks the sink for small chunks (each its own short
//! transaction, found through the `alter_time` index every sink creates)
//! until nothing old is left, then sleeps. A failing database only delays
//! the next round: retention never stops the pipeline.

use super::{Sink, SinkConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Returns per chunk: small enough that one chunk's transaction is short.
pub const CHUNK: usize = 1000;

/// How often a round starts: often enough that rows leave close to `keep`,
/// rarely enough to cost nothing.
pub fn interval(keep: Duration) -> Duration {
    (keep / 100).clamp(Duration::from_secs(10), Duration::from_secs(3600))
}

/// One round: purge chunks until none is left (or `stop` fires). Returns
/// the rows moved.
pub async fn round(
    sink: &dyn Sink,
    keep: Duration,
    archive: bool,
    chunk: usize,
    stop: &CancellationToken,
) -> Result<u64, super::SinkError> {
    let mut total = 0;
    while !stop.is_cancelled() {
        let n = sink.purge_chunk(keep, archive, chunk).await?;
        if n == 0 {
            break;
        }
        total += n;
        // Give the writers the table between chunks.
        tokio::task::yield_now().await;
    }
    Ok(total)
}

/// Starts the retention task if `keep` is set; it ends when `stop` fires.
pub fn spawn(
    sink: Arc<dyn Sink>,
    cfg: &SinkConfig,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    let keep = cfg.keep?;
    let archive = cfg.archive;
    let every = interval(keep);
    tracing::info!(keep = ?keep, archive, every = ?every, "retention on");
    Some(tokio::spawn(async move {
        loop {
            match round(sink.as_ref(), keep, archive, CHUNK, &stop).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    rows = n,
                    archive,
                    "retention: {} old rows",
                    if archive { "archived" } else { "deleted" }
                ),
                Err(e) => tracing::warn!(error = %e, "retention round failed; next round later"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }))
}
