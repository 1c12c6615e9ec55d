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
//! * a prefetch (`queue.prefetch`, by default the worker's batch size) so a
//!   worker holds a batch's worth and no more.
//!
//! A confirm is per message, so a batch is not atomic: if the broker
//! confirmed half of it and then failed, the listener pushes the whole batch
//! again and the first half is queued twice. The sinks' unique keys make
//! that harmless; it is the usual at-least-once of brokers.
//!
//! The key (minion id) and receive time ride in message headers.

use super::{Consumer, Delivery, Message, Producer, QueueConfig, QueueError};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
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
        // All publishes of the batch at once, then all confirms: awaiting
        // each publish in turn cost a round of wake-ups between this task
        // and lapin's I/O thread per message, most of the listener's CPU.
        // Order holds: lapin queues a publish's frames (and numbers its
        // confirm) synchronously on its first poll, and `in_order` polls
        // them first in batch order.
        let publishes: Vec<_> = batch
            .iter()
            .map(|m| {
                let mut headers = FieldTable::default();
                headers.insert("k".into(), AMQPValue::LongString(m.key.as_str().into()));
                headers.insert("t".into(), AMQPValue::LongLongInt(m.received_ms));
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers);
                Box::pin(self.channel.basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue_name(&self.prefix, &m.queue)),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &m.body,
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
    /// Delivery tags handed out and not acked.
    outstanding: BTreeSet<u64>,
}

impl AmqpConsumer {
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
        channel
            .basic_qos(
                prefetch.clamp(1, u16::MAX as u32) as u16,
                BasicQosOptions::default(),
            )
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
            outstanding: BTreeSet::new(),
        })
    }

    fn convert(&mut self, d: lapin::message::Delivery) -> Delivery {
        let headers = d.properties.headers().as_ref();
        let key = headers
            .and_then(|h| h.inner().get("k"))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
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
        self.outstanding.insert(d.delivery_tag);
        Delivery {
            id: d.delivery_tag,
            key,
            body: Bytes::from(d.data),
            received_ms,
        }
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
        let first = match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) => return Ok(vec![]),
            Ok(None) => return Err(closed()),
            Ok(Some(r)) => r.map_err(conn_err)?,
        };
        let mut out = vec![self.convert(first)];
        let mut bytes = out[0].body.len();
        // Then whatever already arrived, without waiting.
        while out.len() < max && bytes < max_bytes {
            match self.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    let d = self.convert(d);
                    bytes += d.body.len();
                    out.push(d);
                }
                Some(Some(Err(e))) => return Err(conn_err(e)),
                Some(None) => return Err(closed()),
                None => break,
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        let ids: BTreeSet<u64> = ids
            .iter()
            .copied()
            .filter(|id| self.outstanding.contains(id))
            .collect();
        let Some(&last) = ids.last() else {
            return Ok(());
        };
        // One "multiple" ack when the batch is everything held up to its
        // last tag (the usual case), else one ack per message.
        let covers_all = self.outstanding.range(..=last).all(|t| ids.contains(t));
        if covers_all {
            self.channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(conn_err)?;
        } else {
            for &t in &ids {
                self.channel
                    .basic_ack(t, BasicAckOptions::default())
                    .await
                    .map_err(conn_err)?;
            }
        }
        for t in ids {
            self.outstanding.remove(&t);
        }
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
        Ok(Some(u64::from(q.message_count())))
    }
}
