//! One retry schedule for every place that waits before trying again: the
//! bus reconnect, the queue consumers' reconnect, the listener's direct
//! publish and spool forwarder, the worker's sink and ack retries, and the
//! actions.
//!
//! Jittered exponential: the n-th consecutive failure waits
//! `min * 2^(n-1)`, capped at `max`, times a random factor in [0.5, 1).
//! The jitter matters when many saltpipe processes (one per master, several
//! workers) lose the same database or broker at once: without it they all
//! come back in the same millisecond, and keep doing so. A success resets
//! the schedule. By hand rather than a crate (`backoff`, `backon`): those
//! wrap the operation in a retry loop, and each of our callers has its own
//! loop with its own shutdown and drain-deadline logic; what they share is
//! only this arithmetic.

use rand::Rng;
use std::time::Duration;

/// The retry schedule of one thing that fails and is tried again.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// `min`: the first wait; doubles per consecutive failure up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }

    /// Records a failure; returns how long to wait before the next try.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.ceiling().mul_f64(rand::rng().random_range(0.5..1.0))
    }

    /// The wait before jitter for the failures so far: `min * 2^(n-1)`,
    /// at most `max` (and `min` before the first failure).
    pub fn ceiling(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(30);
        self.min.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// A success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_min_up_to_max_with_jitter_below_the_ceiling() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let mut b = Backoff::new(min, max);
        let expected = [100, 200, 400, 800, 1000, 1000];
        for ceiling in expected {
            let wait = b.fail();
            let ceiling = Duration::from_millis(ceiling);
            assert_eq!(b.ceiling(), ceiling);
            assert!(
                wait >= ceiling / 2 && wait < ceiling,
                "{wait:?} vs {ceiling:?}"
            );
        }
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.ceiling(), min);
    }

    #[test]
    fn a_long_outage_neither_overflows_nor_passes_max() {
        let max = Duration::from_secs(30);
        let mut b = Backoff::new(Duration::from_secs(1), max);
        for _ in 0..10_000 {
            assert!(b.fail() < max);
        }
        assert_eq!(b.ceiling(), max);
    }
}
