//! The return-window sweep: records `no_return` for each targeted minion
//! that did not answer within `worker.return_window` (see the module docs
//! of [`crate::worker`]).

use crate::action::Actions;
use crate::event::Event;
use crate::outcome::Outcome;
use crate::sink::{Sink, SinkError};
use crate::stats::Stats;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// The return-window sweep of one worker (see the module docs).
pub(super) struct Sweep {
    pub sink: Arc<dyn Sink>,
    pub window: Duration,
    pub stats: Arc<Stats>,
    pub actions: Option<Actions>,
}

/// Targets closed per transaction.
pub(super) const SWEEP_CHUNK: usize = 1000;

impl Sweep {
    fn every(&self) -> Duration {
        (self.window / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// Runs the sweep in its own task until `stop`; the task ends when the
    /// handle is dropped (when the worker's `run` ends, however it ends).
    pub fn spawn(self, stop: CancellationToken) -> AbortOnDropHandle<()> {
        AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(self.every()) => {}
                }
                if let Err(e) = self.round().await {
                    tracing::warn!(error = %e, "closing return windows failed; trying again later");
                }
            }
        }))
    }

    /// Closes every window due now, in chunks; returns the minions recorded silent.
    pub(super) async fn round(&self) -> Result<usize, SinkError> {
        let due = std::time::SystemTime::now()
            .checked_sub(self.window)
            .unwrap_or(std::time::UNIX_EPOCH);
        let before = crate::sink::rows::stamp_of(due);
        let mut silent = 0;
        loop {
            let closed = self.sink.close_returns(&before, SWEEP_CHUNK).await?;
            self.stats
                .targets_closed
                .fetch_add(closed.targets as u64, Relaxed);
            if !closed.no_return.is_empty() {
                let n = closed.no_return.len();
                silent += n;
                self.stats.count_outcome(Outcome::NoReturn, n as u64);
                tracing::info!(
                    minions = n,
                    "return window closed without a return: recorded no_return"
                );
                if let Some(actions) = &self.actions {
                    let events: Vec<Event> = closed
                        .no_return
                        .iter()
                        .filter_map(|m| {
                            crate::outcome::no_return_event(&m.jid, &m.minion, &m.fun, &m.stamp)
                        })
                        .collect();
                    actions.current().offer(events.iter());
                }
            }
            if closed.targets < SWEEP_CHUNK {
                return Ok(silent);
            }
        }
    }
}
