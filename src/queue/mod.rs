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

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod embedded;
pub mod forward;
#[cfg(feature = "nats")]
pub mod nats;
pub mod pack;
#[cfg(feature = "redis")]
pub mod redis;
pub mod resilient;

/// A kept event on its way into a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// True when the consumer has handed out everything it holds and the
    /// broker sends no more until some of it is acked (RabbitMQ's prefetch
    /// is full). A worker then closes its batch at once instead of waiting
    /// out `batch_timeout` for events that cannot come.
    fn starved(&self) -> bool {
        false
    }
    /// While a worker drains (shutdown, or a replay's end), how long a pull
    /// waits before the worker calls the queue empty. A broker's messages
    /// are on the wire for a moment, so zero would stop a worker with a
    /// full queue. The embedded queue answers from its own file, where
    /// everything the listener took is before the drain begins, so it
    /// needs no wait (it was a third of a second at the end of every
    /// replay: the last partial batch's timeout, then one empty pull).
    fn drain_wait(&self) -> Duration {
        DRAIN_WAIT
    }
}

/// A broker consumer's [`Consumer::drain_wait`].
pub const DRAIN_WAIT: Duration = Duration::from_millis(100);

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Which queue backend, and where: `embedded:///var/lib/saltpipe/queue`.
    pub url: QueueUrl,
    /// Embedded queue: `normal` survives a crash of saltpipe (the default);
    /// `full` also survives a power cut, at the cost of an fsync per write.
    pub sync: SyncMode,
    /// Brokers: the first part of every stream, queue and subject name
    /// (`<prefix>:<queue>` in Redis, `<prefix>.<queue>` in RabbitMQ and NATS).
    pub prefix: String,
    /// Brokers: a message handed to a worker and not acked for this long is
    /// given to another worker (Redis: XAUTOCLAIM idle time; NATS: ack_wait;
    /// RabbitMQ redelivers as soon as the worker's connection drops). Must
    /// exceed the longest batch write, or slow batches are written twice
    /// (harmlessly, but for nothing).
    #[serde(deserialize_with = "crate::config::human::duration")]
    pub redeliver_after: Duration,
    /// Brokers: events a worker should be able to hold unacked; 0 means
    /// what its stages hold, `worker.batch_max_events` x (`sink.writers` +
    /// 2): a batch being gathered, one converted and waiting, and those
    /// being written. RabbitMQ and NATS carry up to 256 events per message
    /// and count their prefetch in messages, so this becomes
    /// `ceil(prefetch / 256) + 4` messages, at most that many x 256 events
    /// (see [`pack::prefetch_containers`]).
    pub prefetch: u32,
    /// Redis only: cap each stream near this many entries (XADD MAXLEN ~);
    /// an entry holds up to 256 events.
    /// 0, the default, means no cap: trimming drops the oldest entries
    /// whether acked or not, i.e. it loses events when workers fall behind.
    /// Acked entries are deleted anyway, so the stream holds only the backlog.
    pub max_len: u64,
    /// Brokers: the listener's local durable spool (an embedded queue).
    /// While the broker is down, slow or behind, the bus is drained into it
    /// and a forwarder moves it to the broker, so a broker outage never
    /// stalls the reader; otherwise events go to the broker directly.
    pub spool: PathBuf,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: QueueUrl::Embedded {
                dir: PathBuf::from("/var/lib/saltpipe/queue"),
            },
            sync: SyncMode::Normal,
            prefix: "saltpipe".into(),
            redeliver_after: Duration::from_secs(60),
            prefetch: 0,
            max_len: 0,
            spool: PathBuf::from("/var/lib/saltpipe/spool"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    Normal,
    Full,
}

impl SyncMode {
    /// SQLite's `PRAGMA synchronous` level for it (the queue's and the sink's).
    pub fn pragma(self) -> &'static str {
        match self {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        }
    }
}

/// A parsed queue URL: the scheme picks the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueUrl {
    /// `embedded:///path/to/dir`: SQLite on local disk.
    Embedded { dir: PathBuf },
    /// `redis://[user:pass@]host:port[/db]` (or `rediss://`): Redis Streams.
    #[cfg(feature = "redis")]
    Redis { url: crate::redact::SecretUrl },
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`): RabbitMQ.
    #[cfg(feature = "amqp")]
    Amqp { url: crate::redact::SecretUrl },
    /// `nats://[user:pass@]host:port` (or `tls://`): NATS JetStream.
    #[cfg(feature = "nats")]
    Nats { url: crate::redact::SecretUrl },
}

impl QueueUrl {
    pub fn parse(s: &str) -> Result<QueueUrl, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!(
                "`{}` is not a URL; write e.g. embedded:///var/lib/saltpipe/queue",
                crate::redact::url(s)
            )
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
            "redis" | "rediss" => {
                check_broker_url(s)?;
                #[cfg(feature = "redis")]
                return Ok(QueueUrl::Redis {
                    url: crate::redact::SecretUrl::new(s),
                });
                #[cfg(not(feature = "redis"))]
                return Err(missing_feature(scheme, "redis"));
            }
            "amqp" | "amqps" => {
                check_broker_url(s)?;
                #[cfg(feature = "amqp")]
                return Ok(QueueUrl::Amqp {
                    url: crate::redact::SecretUrl::new(s),
                });
                #[cfg(not(feature = "amqp"))]
                return Err(missing_feature(scheme, "amqp"));
            }
            "nats" | "tls" => {
                check_broker_url(s)?;
                #[cfg(feature = "nats")]
                return Ok(QueueUrl::Nats {
                    url: crate::redact::SecretUrl::new(s),
                });
                #[cfg(not(feature = "nats"))]
                return Err(missing_feature(scheme, "nats"));
            }
            _ => Err(format!(
                "unknown queue scheme in `{}`; known: embedded, redis, amqp, nats",
                crate::redact::url(s)
            )),
        }
    }

    /// Whether workers reach this queue over the network (anything but embedded).
    pub fn is_broker(&self) -> bool {
        !matches!(self, QueueUrl::Embedded { .. })
    }
}

#[allow(dead_code)]
fn missing_feature(scheme: &str, feature: &str) -> String {
    format!("`{scheme}://` needs a saltpipe built with the cargo feature `{feature}`")
}

fn check_broker_url(s: &str) -> Result<(), String> {
    let u = url::Url::parse(s).map_err(|e| format!("`{}` is not a valid URL: {e}", redact(s)))?;
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{}` names no host", redact(s)));
    }
    Ok(())
}

/// The URL as it may be shown: see [`crate::redact::url`], the one place
/// that decides.
pub fn redact(s: &str) -> String {
    crate::redact::url(s)
}

impl std::fmt::Display for QueueUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueUrl::Embedded { dir } => write!(f, "embedded://{}", dir.display()),
            #[cfg(feature = "redis")]
            QueueUrl::Redis { url } => url.fmt(f),
            #[cfg(feature = "amqp")]
            QueueUrl::Amqp { url } => url.fmt(f),
            #[cfg(feature = "nats")]
            QueueUrl::Nats { url } => url.fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for QueueUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = crate::redact::secret_string(d)?;
        QueueUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::rules::validate_queue_name(&self.prefix)
            .map_err(|m| ConfigError::invalid("queue.prefix", m))?;
        if self.redeliver_after < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "queue.redeliver_after",
                "must be at least 1s",
            ));
        }
        if self.url.is_broker() && self.spool.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "queue.spool",
                "a broker queue needs a local spool directory",
            ));
        }
        if let QueueUrl::Embedded { dir } = &self.url
            && dir == &self.spool
        {
            return Err(ConfigError::invalid(
                "queue.spool",
                "must not be the embedded queue's own directory",
            ));
        }
        Ok(())
    }

    /// Opens the producer side (I/O happens here). For a broker this is
    /// the broker itself; `listen` puts the spool in front (see [`forward`]).
    pub async fn producer(&self) -> Result<Arc<dyn Producer>, QueueError> {
        match &self.url {
            QueueUrl::Embedded { dir } => {
                Ok(Arc::new(embedded::Embedded::open(dir, self.sync).await?))
            }
            #[cfg(feature = "redis")]
            QueueUrl::Redis { url } => Ok(Arc::new(
                redis::RedisQueue::connect(url.expose(), self).await?,
            )),
            #[cfg(feature = "amqp")]
            QueueUrl::Amqp { url } => Ok(Arc::new(
                amqp::AmqpProducer::connect(url.expose(), self).await?,
            )),
            #[cfg(feature = "nats")]
            QueueUrl::Nats { url } => Ok(Arc::new(
                nats::NatsProducer::connect(url.expose(), self).await?,
            )),
        }
    }

    /// Opens a consumer of one named queue.
    pub async fn consumer(&self, queue: &str) -> Result<Box<dyn Consumer>, QueueError> {
        self.consumer_with(queue, 0).await
    }

    /// Opens a consumer of one named queue; `hold` (the events the worker's
    /// stages hold at once) sizes a broker's prefetch when `prefetch` is 0.
    /// A broker consumer reconnects by itself (see [`resilient`]), so a
    /// broker outage pauses workers instead of stopping them.
    pub async fn consumer_with(
        &self,
        queue: &str,
        hold: usize,
    ) -> Result<Box<dyn Consumer>, QueueError> {
        match &self.url {
            QueueUrl::Embedded { dir } => {
                let q = embedded::Embedded::open(dir, self.sync).await?;
                Ok(Box::new(q.consumer(queue)?))
            }
            #[allow(unreachable_patterns)]
            _ => {
                let prefetch = if self.prefetch > 0 {
                    self.prefetch
                } else {
                    hold.clamp(1, u32::MAX as usize) as u32
                };
                Ok(Box::new(
                    resilient::Resilient::start(self.clone(), queue.to_owned(), prefetch).await,
                ))
            }
        }
    }

    /// A direct consumer of a broker, without reconnection (used by
    /// [`resilient::Resilient`], and by tests that need a consumer to die).
    pub async fn broker_consumer(
        &self,
        queue: &str,
        prefetch: u32,
    ) -> Result<Box<dyn Consumer>, QueueError> {
        let _ = (queue, prefetch);
        match &self.url {
            QueueUrl::Embedded { .. } => Err(QueueError::Config(
                "broker_consumer called for the embedded queue".into(),
            )),
            #[cfg(feature = "redis")]
            QueueUrl::Redis { url } => Ok(Box::new(
                redis::RedisQueue::connect(url.expose(), self)
                    .await?
                    .consumer(queue)
                    .await?,
            )),
            #[cfg(feature = "amqp")]
            QueueUrl::Amqp { url } => Ok(Box::new(
                amqp::AmqpConsumer::connect(url.expose(), self, queue, prefetch).await?,
            )),
            #[cfg(feature = "nats")]
            QueueUrl::Nats { url } => Ok(Box::new(
                nats::NatsConsumer::connect(url.expose(), self, queue, prefetch).await?,
            )),
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

    #[cfg(all(feature = "redis", feature = "amqp", feature = "nats"))]
    #[test]
    fn broker_urls_parse_and_hide_passwords() {
        let u = QueueUrl::parse("redis://:s3cret@10.0.0.1:6379/2").expect("redis");
        assert!(u.is_broker());
        assert!(!u.to_string().contains("s3cret"), "{u}");
        let u = QueueUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("amqp");
        assert_eq!(u.to_string(), "amqp://***@127.0.0.1:5672/%2f");
        let u = QueueUrl::parse("nats://127.0.0.1:4222").expect("nats");
        assert_eq!(u.to_string(), "nats://127.0.0.1:4222");
        assert!(QueueUrl::parse("redis://").is_err(), "no host");
        assert!(QueueUrl::parse("amqp://:5672").is_err(), "no host");
        assert!(!QueueUrl::parse("embedded:///q").expect("e").is_broker());
    }

    #[test]
    fn validation() {
        let mut c = QueueConfig::default();
        assert!(c.validate().is_ok());
        c.prefix = "has space".into();
        assert!(c.validate().is_err());
        c.prefix = "ok".into();
        c.redeliver_after = Duration::from_millis(10);
        assert!(c.validate().is_err());
    }
}
