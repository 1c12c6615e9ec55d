//! The durable queue between the listener and the workers.
//!
//! It is what lets the reader never wait on the database: the listener
//! pushes kept events here as fast as the bus delivers them; workers pull
//! batches, write them, and acknowledge only after the sink committed. An
//! event leaves the queue only by that acknowledgement, so a crash anywhere
//! after the push means redelivery, never loss (and the sinks' unique keys
//! make redelivery harmless).
//!
//! Backends sit behind two small traits, [`Producer`] and [`Consumer`]; the
//! URL's scheme picks one at the edge ([`QueueUrl`]). Adding a backend means
//! one module and one enum variant.

use crate::config::ConfigError;
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub mod embedded;

/// A kept event on its way into a queue.
#[derive(Debug, Clone)]
pub struct Message {
    /// The named queue it is routed to.
    pub queue: Arc<str>,
    /// Events with the same key stay in order (the minion id for returns).
    pub key: String,
    /// `tag "\n\n" msgpack data`, as read from the bus.
    pub body: Bytes,
    /// When the listener read it, ms since the epoch.
    pub received_ms: i64,
}

/// A message handed to a worker, to be acknowledged after it is stored.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The consumer's handle for [`Consumer::ack`].
    pub id: u64,
    pub key: String,
    pub body: Bytes,
    pub received_ms: i64,
}

/// Queue failures, classified for the caller's retry decision.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue storage: {0}")]
    Storage(String),
    #[error("queue connection: {0}")]
    Connection(String),
    #[error("queue {queue} is already consumed by another process (lock {path})")]
    Busy { queue: String, path: PathBuf },
    #[error("queue config: {0}")]
    Config(String),
}

impl QueueError {
    /// Whether trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, QueueError::Storage(_) | QueueError::Connection(_))
    }
}

/// The listener's side.
#[async_trait]
pub trait Producer: Send + Sync {
    /// Stores the messages durably, all or none, before returning Ok.
    async fn push(&self, batch: &[Message]) -> Result<(), QueueError>;
}

/// A worker's side, for one named queue.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Up to `max` messages (and about `max_bytes`), waiting at most `wait`
    /// for the first one. Messages handed out and not acked are not handed
    /// out again by this consumer; they return after a restart (or, for
    /// brokers, after the ack deadline).
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;
    /// Acknowledges stored messages; they are gone for good.
    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError>;
    /// Messages waiting (not counting those handed out), if the backend can tell.
    async fn depth(&mut self) -> Result<Option<u64>, QueueError>;
}

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Which queue backend, and where: `embedded:///var/lib/saltpipe/queue`.
    pub url: QueueUrl,
    /// Embedded queue: `normal` survives a crash of saltpipe (the default);
    /// `full` also survives a power cut, at the cost of an fsync per write.
    pub sync: SyncMode,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: QueueUrl::Embedded {
                dir: PathBuf::from("/var/lib/saltpipe/queue"),
            },
            sync: SyncMode::Normal,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    Normal,
    Full,
}

/// A parsed queue URL: the scheme picks the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueUrl {
    /// `embedded:///path/to/dir`: SQLite on local disk.
    Embedded { dir: PathBuf },
}

impl QueueUrl {
    pub fn parse(s: &str) -> Result<QueueUrl, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("`{s}` is not a URL; write e.g. embedded:///var/lib/saltpipe/queue")
        })?;
        match scheme {
            "embedded" => {
                if rest.is_empty() {
                    return Err(
                        "embedded:// needs a directory, e.g. embedded:///var/lib/saltpipe/queue"
                            .into(),
                    );
                }
                Ok(QueueUrl::Embedded {
                    dir: PathBuf::from(rest),
                })
            }
            other => Err(format!(
                "unknown queue scheme `{other}`; this build supports: embedded"
            )),
        }
    }
}

impl std::fmt::Display for QueueUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueUrl::Embedded { dir } => write!(f, "embedded://{}", dir.display()),
        }
    }
}

impl<'de> Deserialize<'de> for QueueUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        QueueUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Opens the producer side (I/O happens here).
    pub async fn producer(&self) -> Result<Arc<dyn Producer>, QueueError> {
        match &self.url {
            QueueUrl::Embedded { dir } => {
                Ok(Arc::new(embedded::Embedded::open(dir, self.sync).await?))
            }
        }
    }

    /// Opens a consumer of one named queue.
    pub async fn consumer(&self, queue: &str) -> Result<Box<dyn Consumer>, QueueError> {
        match &self.url {
            QueueUrl::Embedded { dir } => {
                let q = embedded::Embedded::open(dir, self.sync).await?;
                Ok(Box::new(q.consumer(queue)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            QueueUrl::parse("embedded:///var/q"),
            Ok(QueueUrl::Embedded {
                dir: "/var/q".into()
            })
        );
        assert_eq!(
            QueueUrl::parse("embedded://rel/q").map(|u| u.to_string()),
            Ok("embedded://rel/q".into())
        );
        assert!(QueueUrl::parse("embedded://").is_err());
        assert!(QueueUrl::parse("/var/q").is_err());
        assert!(QueueUrl::parse("kafka://x").unwrap_err().contains("kafka"));
    }
}
