//! NATS JetStream as the queue, through async-nats.
//!
//! One file-backed stream per named queue (`<prefix>_<queue>`, subject
//! `<prefix>.<queue>`) with work-queue retention: a message is removed once
//! acked, so the stream holds only the backlog. Every worker of a queue
//! pulls from one durable pull consumer (`workers`), with explicit acks sent
//! after the sink committed. A message not acked within `ack_wait`
//! (`queue.redeliver_after`) is redelivered to any worker: that is how a dead
//! worker's messages come back.
//!
//! A push returns Ok once JetStream acknowledged every message (it has
//! stored them in the stream's file). As with RabbitMQ, a batch is not
//! atomic: a partly stored batch is pushed again whole, and the sinks'
//! unique keys absorb the repeats.
//!
//! Events travel packed: one NATS message holds up to 256 consecutive
//! events of a queue ([`super::pack`]), each with its key (minion id) and
//! receive time, so JetStream stores, delivers and takes an ack per
//! container instead of per event (that per-message cost made this path
//! 1.5-3.3x slower than the embedded queue). Packed messages carry the
//! header `Saltpipe-Pack: 1`; a message without it is an older listener's
//! single event, whose key and receive time ride in the headers
//! `Saltpipe-Key` and `Saltpipe-Received`, and still decodes. A container is
//! acked once the worker acked every event in it, so pull sizes and
//! `max_ack_pending` count containers ([`pack::prefetch_containers`]).

use super::pack::{self, Entry, Ledger};
use super::{Consumer, Delivery, Message, Producer, QueueConfig, QueueError};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::Mutex;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The durable consumer every worker of a queue shares.
pub const DURABLE: &str = "workers";
const KEY: &str = "Saltpipe-Key";
const RECEIVED: &str = "Saltpipe-Received";
/// Marks a packed message (its value is the format's version).
const PACKED: &str = "Saltpipe-Pack";

fn conn_err(e: impl std::fmt::Display) -> QueueError {
    QueueError::Connection(format!("nats: {e}"))
}

pub fn stream_name(prefix: &str, queue: &str) -> String {
    format!("{prefix}_{queue}")
}

pub fn subject(prefix: &str, queue: &str) -> String {
    format!("{prefix}.{queue}")
}

async fn connect(url: &str) -> Result<async_nats::Client, QueueError> {
    let (server, credentials) = split_credentials(url)?;
    let mut opts = async_nats::ConnectOptions::new();
    match credentials {
        Credentials::None => {}
        Credentials::Token(t) => opts = opts.token(t),
        Credentials::UserPassword(u, p) => opts = opts.user_and_password(u, p),
    }
    opts.connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None)
        .connect(server.as_str())
        .await
        .map_err(conn_err)
}

/// What the URL's user info held.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    None,
    Token(String),
    UserPassword(String, String),
}

/// The server URL without its user info, and the credentials it held
/// (taken as async-nats takes them: as written, not percent-decoded).
/// async-nats logs the server URL it dials at debug level, user info and
/// all; handed over through the connect options instead, a token or
/// password never reaches a log line.
fn split_credentials(url: &str) -> Result<(url::Url, Credentials), QueueError> {
    let mut u = url::Url::parse(url)
        .map_err(|e| QueueError::Config(format!("{}: {e}", crate::redact::url(url))))?;
    let user = u.username().to_owned();
    let credentials = match (user.is_empty(), u.password()) {
        (true, None) => Credentials::None,
        (false, None) => Credentials::Token(user),
        (_, Some(p)) => Credentials::UserPassword(user, p.to_owned()),
    };
    // Only fails for URLs that cannot have user info, which then had none.
    let _ = u.set_username("");
    let _ = u.set_password(None);
    Ok((u, credentials))
}

async fn ensure_stream(
    js: &jetstream::Context,
    prefix: &str,
    queue: &str,
) -> Result<stream::Stream, QueueError> {
    js.get_or_create_stream(stream::Config {
        name: stream_name(prefix, queue),
        subjects: vec![subject(prefix, queue)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .map_err(conn_err)
}

/// The listener's side.
pub struct NatsProducer {
    js: jetstream::Context,
    prefix: String,
    ready: Mutex<HashSet<String>>,
    limits: pack::Limits,
}

impl NatsProducer {
    pub async fn connect(url: &str, cfg: &QueueConfig) -> Result<NatsProducer, QueueError> {
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, connect(url))
            .await
            .map_err(|_| conn_err("connect timed out"))??;
        // A message over the server's max_payload (1 MiB by default) is
        // refused: keep containers well under it (headers and framing ride
        // along). A single larger event still goes alone, and is refused as
        // it was before packing.
        let max_payload = client.server_info().max_payload;
        let limits = pack::Limits {
            bytes: pack::LIMITS.bytes.min(max_payload / 2).max(1),
            ..pack::LIMITS
        };
        Ok(NatsProducer {
            js: jetstream::new(client),
            prefix: cfg.prefix.clone(),
            ready: Mutex::new(HashSet::new()),
            limits,
        })
    }
}

#[async_trait]
impl Producer for NatsProducer {
    async fn push(&self, batch: &[Message]) -> Result<(), QueueError> {
        {
            // A publish to a subject no stream captures is not stored:
            // create each queue's stream before its first message.
            let mut ready = self.ready.lock().await;
            for m in batch {
                if !ready.contains(&*m.queue) {
                    ensure_stream(&self.js, &self.prefix, &m.queue).await?;
                    ready.insert(m.queue.to_string());
                }
            }
        }
        // Containers go out one after another without waiting (JetStream
        // stores them in publish order), then all acks are awaited.
        let containers = pack::pack(batch, self.limits);
        let mut acks = Vec::with_capacity(containers.len());
        for c in containers {
            let mut h = HeaderMap::new();
            h.insert(PACKED, "1");
            let ack = self
                .js
                .publish_with_headers(subject(&self.prefix, &c.queue), h, c.data.into())
                .await
                .map_err(conn_err)?;
            acks.push(ack);
        }
        for a in acks {
            a.await
                .map_err(|e| QueueError::Storage(format!("nats: not stored: {e}")))?;
        }
        Ok(())
    }
}

/// One worker's pulls from a queue's durable consumer.
///
/// It keeps one continuous pull open (a few containers buffered ahead),
/// rather than a request per pull: a request that ended early would leave
/// messages on their way to nobody until `ack_wait` sent them elsewhere.
pub struct NatsConsumer {
    client: async_nats::Client,
    consumer: consumer::Consumer<consumer::pull::Config>,
    messages: consumer::pull::Stream,
    /// The containers held and their events not yet handed out.
    ledger: Ledger<jetstream::Message>,
    stream: String,
}

impl NatsConsumer {
    /// `prefetch` is in events; pulls and `max_ack_pending` count messages
    /// (containers).
    pub async fn connect(
        url: &str,
        cfg: &QueueConfig,
        queue: &str,
        prefetch: u32,
    ) -> Result<NatsConsumer, QueueError> {
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, connect(url))
            .await
            .map_err(|_| conn_err("connect timed out"))??;
        let js = jetstream::new(client.clone());
        let stream = ensure_stream(&js, &cfg.prefix, queue).await?;
        let containers = pack::prefetch_containers(prefetch);
        let consumer = stream
            .get_or_create_consumer(
                DURABLE,
                consumer::pull::Config {
                    durable_name: Some(DURABLE.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: cfg.redeliver_after,
                    // Room for many workers each holding a full batch.
                    max_ack_pending: (i64::from(containers) * 64).max(1_000),
                    ..Default::default()
                },
            )
            .await
            .map_err(conn_err)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(containers as usize)
            .messages()
            .await
            .map_err(conn_err)?;
        Ok(NatsConsumer {
            client,
            consumer,
            messages,
            ledger: Ledger::default(),
            stream: stream_name(&cfg.prefix, queue),
        })
    }
}

/// One broker message (kept, to ack it later) and its events.
fn unpack(m: jetstream::Message, stream: &str) -> (jetstream::Message, Vec<Entry>) {
    let header = |k: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(k))
            .map(|v| v.as_str().to_owned())
    };
    let packed = header(PACKED).is_some();
    let entries = pack::entries(
        packed,
        m.payload.clone(),
        |body| Entry {
            key: header(KEY).unwrap_or_default(),
            received_ms: header(RECEIVED).and_then(|s| s.parse().ok()).unwrap_or(0),
            body,
        },
        stream,
    );
    (m, entries)
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let NatsConsumer {
            messages,
            ledger,
            stream,
            ..
        } = self;
        pack::pull_from(
            ledger,
            &mut messages.map(|r| r.map_err(conn_err)),
            |m| unpack(m, stream),
            || conn_err("the pull stream ended"),
            max,
            max_bytes,
            wait,
        )
        .await
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        // A container is acked at the broker only once all its events are.
        self.ledger.mark(ids);
        let mut sent = Vec::new();
        for (first, m) in self.ledger.complete() {
            m.ack().await.map_err(conn_err)?;
            sent.push(first);
        }
        if sent.is_empty() {
            return Ok(());
        }
        // Acks are plain publishes: make sure they left before saying so.
        self.client.flush().await.map_err(conn_err)?;
        self.ledger.forget(&sent);
        Ok(())
    }

    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        let info = self.consumer.info().await.map_err(conn_err)?;
        // JetStream counts containers; the gauge is in events.
        Ok(Some(self.ledger.estimate(info.num_pending)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        let (u, c) = split_credentials("nats://tok@127.0.0.1:4222").expect("token");
        assert_eq!(u.as_str(), "nats://127.0.0.1:4222");
        assert_eq!(c, Credentials::Token("tok".into()));
        let (u, c) = split_credentials("tls://u:p@h:4222").expect("user");
        assert_eq!(u.as_str(), "tls://h:4222");
        assert_eq!(c, Credentials::UserPassword("u".into(), "p".into()));
        let (u, c) = split_credentials("nats://h:4222").expect("none");
        assert_eq!(u.as_str(), "nats://h:4222");
        assert_eq!(c, Credentials::None);
    }
}
