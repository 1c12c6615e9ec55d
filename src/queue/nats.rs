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
//! The key (minion id) and receive time ride in message headers.

use super::{Consumer, Delivery, Message, Producer, QueueConfig, QueueError};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::Mutex;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The durable consumer every worker of a queue shares.
pub const DURABLE: &str = "workers";
const KEY: &str = "Saltpipe-Key";
const RECEIVED: &str = "Saltpipe-Received";

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
    async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None)
        .connect(url)
        .await
        .map_err(conn_err)
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
}

impl NatsProducer {
    pub async fn connect(url: &str, cfg: &QueueConfig) -> Result<NatsProducer, QueueError> {
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, connect(url))
            .await
            .map_err(|_| conn_err("connect timed out"))??;
        Ok(NatsProducer {
            js: jetstream::new(client),
            prefix: cfg.prefix.clone(),
            ready: Mutex::new(HashSet::new()),
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
        let mut acks = Vec::with_capacity(batch.len());
        for m in batch {
            let mut h = HeaderMap::new();
            h.insert(KEY, m.key.as_str());
            h.insert(RECEIVED, m.received_ms.to_string().as_str());
            let ack = self
                .js
                .publish_with_headers(subject(&self.prefix, &m.queue), h, m.body.clone())
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
/// It keeps one continuous pull open (`prefetch` messages buffered ahead),
/// rather than a request per pull: a request that ended early would leave
/// messages on their way to nobody until `ack_wait` sent them elsewhere.
pub struct NatsConsumer {
    client: async_nats::Client,
    consumer: consumer::Consumer<consumer::pull::Config>,
    messages: consumer::pull::Stream,
    handed: HashMap<u64, jetstream::Message>,
    next_id: u64,
}

impl NatsConsumer {
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
        let consumer = stream
            .get_or_create_consumer(
                DURABLE,
                consumer::pull::Config {
                    durable_name: Some(DURABLE.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: cfg.redeliver_after,
                    // Room for many workers each holding a full batch.
                    max_ack_pending: (i64::from(prefetch) * 64).max(10_000),
                    ..Default::default()
                },
            )
            .await
            .map_err(conn_err)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(prefetch.max(1) as usize)
            .messages()
            .await
            .map_err(conn_err)?;
        Ok(NatsConsumer {
            client,
            consumer,
            messages,
            handed: HashMap::new(),
            next_id: 1,
        })
    }
}

impl NatsConsumer {
    fn convert(&mut self, m: jetstream::Message) -> Delivery {
        let header = |k: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(k))
                .map(|v| v.as_str().to_owned())
        };
        let id = self.next_id;
        self.next_id += 1;
        let d = Delivery {
            id,
            key: header(KEY).unwrap_or_default(),
            received_ms: header(RECEIVED).and_then(|s| s.parse().ok()).unwrap_or(0),
            body: m.payload.clone(),
        };
        self.handed.insert(id, m);
        d
    }
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let first = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(vec![]),
            Ok(None) => return Err(conn_err("the pull stream ended")),
            Ok(Some(r)) => r.map_err(conn_err)?,
        };
        let mut out = vec![self.convert(first)];
        let mut bytes = out[0].body.len();
        // Then whatever already arrived, without waiting.
        while out.len() < max && bytes < max_bytes {
            match self.messages.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    let d = self.convert(m);
                    bytes += d.body.len();
                    out.push(d);
                }
                Some(Some(Err(e))) => return Err(conn_err(e)),
                Some(None) => return Err(conn_err("the pull stream ended")),
                None => break,
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        let mut sent = Vec::new();
        for id in ids {
            if let Some(m) = self.handed.get(id) {
                m.ack().await.map_err(conn_err)?;
                sent.push(*id);
            }
        }
        // Acks are plain publishes: make sure they left before saying so.
        self.client.flush().await.map_err(conn_err)?;
        for id in sent {
            self.handed.remove(&id);
        }
        Ok(())
    }

    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        let info = self.consumer.info().await.map_err(conn_err)?;
        Ok(Some(info.num_pending))
    }
}
