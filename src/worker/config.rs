//! `[worker]`: how batches close, how long failures are retried, how long a
//! shutdown drains, and how long targeted minions may take to return.

use crate::config::{ConfigError, human};
use serde::Deserialize;
use std::time::Duration;

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Queues this worker consumes; empty means every queue the rules name.
    pub queues: Vec<String>,
    /// A batch closes at this many events...
    pub batch_max_events: usize,
    /// ...or this many bytes of event data...
    #[serde(deserialize_with = "human::size")]
    pub batch_max_bytes: u64,
    /// ...or this long after its first event.
    #[serde(deserialize_with = "human::duration")]
    pub batch_timeout: Duration,
    /// First wait before retrying a failed write; doubles up to `retry_max`.
    #[serde(deserialize_with = "human::duration")]
    pub retry_min: Duration,
    #[serde(deserialize_with = "human::duration")]
    pub retry_max: Duration,
    /// On shutdown, how long to keep writing what the queue already holds.
    #[serde(deserialize_with = "human::duration")]
    pub drain_timeout: Duration,
    /// Workers per queue in this process, each with its own consumer and
    /// batches. Brokers only: the embedded queue has one consumer per queue.
    pub concurrency: usize,
    /// How long after a job's announcement its targeted minions may
    /// return; then each one without a return is recorded as `no_return`
    /// (a later return still lands and replaces it).
    #[serde(deserialize_with = "human::duration")]
    pub return_window: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec![],
            batch_max_events: 2000,
            batch_max_bytes: 16 << 20,
            batch_timeout: Duration::from_millis(200),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            concurrency: 1,
            return_window: Duration::from_secs(300),
        }
    }
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_max_events == 0 || self.batch_max_events > 100_000 {
            return Err(ConfigError::invalid(
                "worker.batch_max_events",
                "must be between 1 and 100000",
            ));
        }
        if self.batch_max_bytes < 1024 {
            return Err(ConfigError::invalid(
                "worker.batch_max_bytes",
                "must be at least 1KiB",
            ));
        }
        if self.batch_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "worker.batch_timeout",
                "must be above zero",
            ));
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(ConfigError::invalid(
                "worker.retry_min",
                "must be above zero and not above retry_max",
            ));
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return Err(ConfigError::invalid(
                "worker.concurrency",
                "must be between 1 and 256",
            ));
        }
        if self.return_window < Duration::from_secs(1)
            || self.return_window > Duration::from_secs(30 * 86_400)
        {
            return Err(ConfigError::invalid(
                "worker.return_window",
                "must be between 1s and 30d",
            ));
        }
        for q in &self.queues {
            crate::rules::validate_queue_name(q)
                .map_err(|m| ConfigError::invalid("worker.queues", m))?;
        }
        Ok(())
    }
}
