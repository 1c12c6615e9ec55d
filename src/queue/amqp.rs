//! RabbitMQ (AMQP 0-9-1) as the queue, through lapin.
//!
//! One durable queue per named queue (`<prefix>.<queue>`), published to
//! through the default exchange. What makes it lossless:
//!
//! * durable queues and persistent messages (delivery mode 2), so a broker
//!   restart keeps them;
//! * publisher confirms: a push returns Ok only after the broker confirmed
//!   every message of the batch (and `mandatory`, so a message that no
//!   queue took comes back as an error instead of vanishing);
//! * manual acks, sent only after the sink committed; the broker gives
//!   unacked messages to another worker as soon as the holder's channel
//!   closes (its process died or lost the connection);
//! * a prefetch (from `queue.prefetch`, by default what the worker's stages
//!   hold: the batch gathered, one waiting, those being written) so a worker
//!   holds that and no more.
//!
//! A confirm is per message, so a batch is not atomic: if the broker
//! confirmed half of it and then failed, the listener pushes the whole batch
//! again and the first half is queued twice. The sinks' unique keys make
//! that harmless; it is the usual at-least-once of brokers.
//!
//! Events travel packed: one AMQP message holds up to 256 consecutive
//! events of a queue ([`super::pack`]), each with its key (minion id) and
//! receive time, so a publish, a confirm, a delivery and an ack are paid per
//! container instead of per event (that per-message cost made this path
//! 3-7x slower than the embedded queue). Packed messages carry
//! `content_type` [`pack::CONTENT_TYPE`]; a message without it is an older
//! listener's single event, whose key and receive time ride in the headers
//! `k` and `t`, and still decodes. A container is acked once the worker
//! acked every event in it, so the prefetch counts containers: it is set
//! from `queue.prefetch` (events) by [`pack::prefetch_containers`].

use super::pack::{self, Entry, Ledger};
use super::{Consumer, Delivery, Message, Producer, QueueConfig, QueueError};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;
use tokio::sync::Mutex;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn conn_err(e: lapin::Error) -> QueueError {
    QueueError::Connection(format!("amqp: {e}"))
}

/// The broker queue that holds one named queue.
pub fn queue_name(prefix: &str, queue: &str) -> String {
    format!("{prefix}.{queue}")
}

async fn connect(url: &str) -> Result<Connection, QueueError> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| QueueError::Connection("amqp: connect timed out".into()))?
    .map_err(conn_err)
}

async fn declare(channel: &Channel, name: &str) -> Result<lapin::Queue, QueueError> {
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(conn_err)
}

/// The listener's side: one connection, one confirming channel.
pub struct AmqpProducer {
    _conn: Connection,
    channel: Channel,
    prefix: String,
    declared: Mutex<HashSet<String>>,
}

impl AmqpProducer {
    pub async fn connect(url: &str, cfg: &QueueConfig) -> Result<AmqpProducer, QueueError> {
        let conn = connect(url).await?;
        let channel = conn.create_channel().await.map_err(conn_err)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(conn_err)?;
        Ok(AmqpProducer {
            _conn: conn,
            channel,
            prefix: cfg.prefix.clone(),
            declared: Mutex::new(HashSet::new()),
        })
    }
}

#[async_trait]
impl Producer for AmqpProducer {
    async fn push(&self, batch: &[Message]) -> Result<(), QueueError> {
        {
            // The default exchange drops messages for a queue that does not
            // exist yet: declare each one before its first message.
            let mut declared = self.declared.lock().await;
            for m in batch {
                if !declared.contains(&*m.queue) {
                    declare(&self.channel, &queue_name(&self.prefix, &m.queue)).await?;
                    declared.insert(m.queue.to_string());
                }
            }
        }
        // The batch's containers (consecutive events of one queue, in
        // order) all published at once, then all confirms: awaiting
        // each publish in turn cost a round of wake-ups between this task
        // and lapin's I/O thread per message, most of the listener's CPU.
        // Order holds: lapin queues a publish's frames (and numbers its
        // confirm) synchronously on its first poll, and `in_order` polls
        // them first in batch order.
        let containers = pack::pack(batch, pack::LIMITS);
        let publishes: Vec<_> = containers
            .iter()
            .map(|c| {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from(pack::CONTENT_TYPE));
                Box::pin(self.channel.basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue_name(&self.prefix, &c.queue)),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &c.data,
                    props,
                ))
            })
            .collect();
        let confirms = in_order(publishes).await.map_err(conn_err)?;
        let confirms = in_order(confirms).await.map_err(conn_err)?;
        for c in confirms {
            match c {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(QueueError::Storage(
                        "amqp: the broker returned a message no queue took".into(),
                    ));
                }
                Confirmation::Nack(_) => {
                    return Err(QueueError::Storage(
                        "amqp: the broker refused a message (nack)".into(),
                    ));
                }
                Confirmation::NotRequested => {
                    return Err(QueueError::Storage(
                        "amqp: publisher confirms are not on".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs `futs` together and returns their outputs in order, or the first
/// error. Every pass polls them in order, so the first poll of each (where
/// lapin queues a publish) happens in the order given, which
/// `join_all` does not promise for large sets.
async fn in_order<F, T>(futs: Vec<F>) -> Result<Vec<T>, lapin::Error>
where
    F: std::future::Future<Output = Result<T, lapin::Error>> + Unpin,
{
    let mut slots: Vec<(F, Option<T>)> = futs.into_iter().map(|f| (f, None)).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in slots.iter_mut() {
            if out.is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    std::task::Poll::Ready(Ok(v)) => *out = Some(v),
                    std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Ok(()))
        }
    })
    .await?;
    Ok(slots.into_iter().filter_map(|(_, out)| out).collect())
}

/// A worker's consumer of one broker queue.
pub struct AmqpConsumer {
    _conn: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    queue: String,
    /// The containers held (by delivery tag) and their events not yet handed out.
    ledger: Ledger<u64>,
    /// The channel's prefetch, in containers.
    prefetch: usize,
}

impl AmqpConsumer {
    /// `prefetch` is in events; the broker's is in messages (containers).
    pub async fn connect(
        url: &str,
        cfg: &QueueConfig,
        queue: &str,
        prefetch: u32,
    ) -> Result<AmqpConsumer, QueueError> {
        let conn = connect(url).await?;
        let channel = conn.create_channel().await.map_err(conn_err)?;
        let name = queue_name(&cfg.prefix, queue);
        declare(&channel, &name).await?;
        let containers = pack::prefetch_containers(prefetch).clamp(1, u16::MAX as u32) as u16;
        channel
            .basic_qos(containers, BasicQosOptions::default())
            .await
            .map_err(conn_err)?;
        let consumer = channel
            .basic_consume(
                ShortString::from(name.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(conn_err)?;
        Ok(AmqpConsumer {
            _conn: conn,
            channel,
            consumer,
            queue: name,
            ledger: Ledger::default(),
            prefetch: usize::from(containers),
        })
    }
}

/// One broker message's delivery tag and events.
fn unpack(d: lapin::message::Delivery, queue: &str) -> (u64, Vec<Entry>) {
    let tag = d.delivery_tag;
    let props = d.properties;
    let packed = props
        .content_type()
        .as_ref()
        .is_some_and(|c| c.as_str() == pack::CONTENT_TYPE);
    let entries = pack::entries(
        packed,
        Bytes::from(d.data),
        |body| single(&props, body),
        queue,
    );
    (tag, entries)
}

/// An older listener's message: one event, key and time in headers.
fn single(props: &BasicProperties, body: Bytes) -> Entry {
    let headers = props.headers().as_ref();
    let key = headers
        .and_then(|h| h.inner().get("k"))
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        })
        .unwrap_or_default();
    let received_ms = headers
        .and_then(|h| h.inner().get("t"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);
    Entry {
        key,
        received_ms,
        body,
    }
}

// Dropping the last handle of a lapin connection closes it, so the broker
// hands what a dropped consumer held to another worker at once.
fn closed() -> QueueError {
    QueueError::Connection("amqp: the consumer was cancelled or the channel closed".into())
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let AmqpConsumer {
            consumer,
            ledger,
            queue,
            ..
        } = self;
        pack::pull_from(
            ledger,
            &mut consumer.map(|r| r.map_err(conn_err)),
            |d| unpack(d, queue),
            closed,
            max,
            max_bytes,
            wait,
        )
        .await
    }

    // Containers are as small as the listener's batches (a few events when
    // it publishes directly at a low rate), so a prefetch of a few dozen
    // containers can hold fewer events than a batch: without this the
    // worker waited out the batch timeout on every batch (37k/s instead of
    // 104k/s in the broker benchmark).
    fn starved(&self) -> bool {
        self.ledger.buffered().0 == 0 && self.ledger.holding() >= self.prefetch
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        // A container is acked at the broker only once all its events are.
        self.ledger.mark(ids);
        let done: Vec<(u64, u64)> = self.ledger.complete().map(|(f, t)| (f, *t)).collect();
        let Some(last) = done.iter().map(|&(_, t)| t).max() else {
            return Ok(());
        };
        let tags: BTreeSet<u64> = done.iter().map(|&(_, t)| t).collect();
        // One "multiple" ack when the complete containers are everything
        // held up to the last of them (the usual case), else one each.
        let covers_all = self
            .ledger
            .held()
            .filter(|&&t| t <= last)
            .all(|t| tags.contains(t));
        if covers_all {
            self.channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(conn_err)?;
        } else {
            for &t in &tags {
                self.channel
                    .basic_ack(t, BasicAckOptions::default())
                    .await
                    .map_err(conn_err)?;
            }
        }
        let firsts: Vec<u64> = done.iter().map(|&(f, _)| f).collect();
        self.ledger.forget(&firsts);
        Ok(())
    }

    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        let q = self
            .channel
            .queue_declare(
                ShortString::from(self.queue.as_str()),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(conn_err)?;
        // RabbitMQ counts containers; the gauge is in events.
        Ok(Some(self.ledger.estimate(u64::from(q.message_count()))))
    }
}
