//! Redis Streams as the queue, for workers on other hosts.
//!
//! One stream per named queue (`<prefix>:<queue>`), one consumer group
//! (`<prefix>-workers`) that every worker joins under its own consumer name.
//! XREADGROUP hands each entry to one worker; the entry stays in the group's
//! pending list until the worker XACKs it after the sink committed. A worker
//! that dies leaves its entries pending: any live worker takes them over
//! with XAUTOCLAIM once they have been idle for `queue.redeliver_after`.
//!
//! Length-cap policy: acked entries are deleted (XACK and XDEL in one
//! MULTI), so a stream holds only what is not yet stored, and its length is
//! the backlog. There is no MAXLEN trimming by default, because trimming
//! drops the oldest entries whether acked or not, which loses events exactly
//! when workers fall behind. `queue.max_len` opts in to `MAXLEN ~ n` for
//! those who prefer a bounded Redis to a complete history; Redis's own
//! `maxmemory` policy should then be `noeviction`, or Redis may evict the
//! stream itself.
//!
//! Durability is Redis's: a push is "stored" once Redis has it in memory;
//! surviving a Redis crash needs `appendonly yes` (with `appendfsync
//! everysec` up to a second can be lost).
//!
//! Connections: pushes, acks and claims share a `ConnectionManager` (which
//! reconnects by itself); each consumer's blocking XREADGROUP gets its own
//! connection with no response timeout, because the client's default 500 ms
//! response timeout would fail any longer `BLOCK`, and a blocking read on a
//! shared multiplexed connection would hold up everyone's replies.

use super::{Consumer, Delivery, Message, Producer, QueueConfig, QueueError};
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Replies to big pushes can take a while; 500 ms (the client default) is too short.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn conn_err(e: redis::RedisError) -> QueueError {
    QueueError::Connection(format!("redis: {e}"))
}

/// The stream that holds one named queue.
pub fn stream_key(prefix: &str, queue: &str) -> String {
    format!("{prefix}:{queue}")
}

/// The consumer group every worker joins.
pub fn group_name(prefix: &str) -> String {
    format!("{prefix}-workers")
}

/// A connection to Redis: the producer, and the factory of consumers.
#[derive(Clone)]
pub struct RedisQueue {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    max_len: u64,
    redeliver_after: Duration,
}

impl RedisQueue {
    pub async fn connect(url: &str, cfg: &QueueConfig) -> Result<RedisQueue, QueueError> {
        let client = redis::Client::open(url).map_err(|e| QueueError::Config(e.to_string()))?;
        let mc = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            client.get_connection_manager_with_config(mc),
        )
        .await
        .map_err(|_| QueueError::Connection("redis: connect timed out".into()))?
        .map_err(conn_err)?;
        Ok(RedisQueue {
            client,
            conn,
            prefix: cfg.prefix.clone(),
            max_len: cfg.max_len,
            redeliver_after: cfg.redeliver_after,
        })
    }

    /// Joins the group on the stream of `queue` (creating both if needed).
    pub async fn consumer(&self, queue: &str) -> Result<RedisConsumer, QueueError> {
        let stream = stream_key(&self.prefix, queue);
        let group = group_name(&self.prefix);
        let mut conn = self.conn.clone();
        // "0": a group created after the listener already pushed still gets
        // everything; an existing group keeps its own position.
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(&group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(conn_err(e));
        }
        let blocking = self
            .client
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(CONNECT_TIMEOUT)),
            )
            .await
            .map_err(conn_err)?;
        Ok(RedisConsumer {
            conn,
            blocking,
            stream,
            group,
            name: format!(
                "{}-{}-{:08x}",
                hostname(),
                std::process::id(),
                rand::random::<u32>()
            ),
            handed: HashMap::new(),
            next_id: 1,
            claim_every: (self.redeliver_after / 4).max(Duration::from_millis(250)),
            redeliver_after: self.redeliver_after,
            next_claim: Instant::now(),
            claim_cursor: "0-0".into(),
            in_flight: false,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "host".into())
}

#[async_trait]
impl Producer for RedisQueue {
    async fn push(&self, batch: &[Message]) -> Result<(), QueueError> {
        if batch.is_empty() {
            return Ok(());
        }
        // MULTI/EXEC: all of the batch or none of it.
        let mut p = redis::pipe();
        p.atomic();
        for m in batch {
            let c = p.cmd("XADD").arg(stream_key(&self.prefix, &m.queue));
            if self.max_len > 0 {
                c.arg("MAXLEN").arg("~").arg(self.max_len);
            }
            c.arg("*")
                .arg("k")
                .arg(&m.key)
                .arg("t")
                .arg(m.received_ms)
                .arg("b")
                .arg(&m.body[..])
                .ignore();
        }
        let mut conn = self.conn.clone();
        p.query_async::<()>(&mut conn).await.map_err(conn_err)
    }
}

/// One worker's membership in the group, for one stream.
pub struct RedisConsumer {
    conn: ConnectionManager,
    blocking: MultiplexedConnection,
    stream: String,
    group: String,
    name: String,
    /// Our ids → stream entry ids, for what is handed out and not acked.
    handed: HashMap<u64, String>,
    next_id: u64,
    claim_every: Duration,
    redeliver_after: Duration,
    next_claim: Instant,
    claim_cursor: String,
    /// A read or claim was sent and its reply not yet taken in. If the pull
    /// was dropped meanwhile (the worker's shutdown select does that), Redis
    /// has put the entries in our pending list without our knowing; the
    /// next pull reads them back from there. Without this they would sit
    /// until another worker's XAUTOCLAIM, `redeliver_after` later.
    in_flight: bool,
}

impl RedisConsumer {
    fn deliver(&mut self, e: StreamId) -> Delivery {
        let id = self.next_id;
        self.next_id += 1;
        let field = |k: &str| e.map.get(k);
        let bytes = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => b.clone(),
            Some(Value::SimpleString(s)) => s.clone().into_bytes(),
            _ => Vec::new(),
        };
        // An entry someone else wrote with other fields gets an empty body:
        // the worker then dead-letters it as undecodable instead of choking.
        let key = String::from_utf8_lossy(&bytes(field("k"))).into_owned();
        let received_ms = std::str::from_utf8(&bytes(field("t")))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = Bytes::from(bytes(field("b")));
        self.handed.insert(id, e.id);
        Delivery {
            id,
            key,
            body,
            received_ms,
        }
    }

    /// Entries in our own pending list that we never handed out (see `in_flight`).
    async fn recover(&mut self) -> Result<Vec<Delivery>, QueueError> {
        let held: std::collections::HashSet<&String> = self.handed.values().collect();
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg("0")
            .query_async(&mut self.conn)
            .await
            .map_err(conn_err)?;
        let lost: Vec<StreamId> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| !held.contains(&e.id))
            .collect();
        Ok(lost.into_iter().map(|e| self.deliver(e)).collect())
    }

    /// Takes over entries another (dead) worker left pending too long.
    async fn claim(&mut self, max: usize) -> Result<Vec<Delivery>, QueueError> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(self.redeliver_after.as_millis() as u64)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.conn)
            .await
            .map_err(conn_err)?;
        if reply.next_stream_id == "0-0" {
            // Scanned the whole pending list: rest until the next round.
            self.next_claim = Instant::now() + self.claim_every;
        }
        self.claim_cursor = reply.next_stream_id;
        if !reply.claimed.is_empty() {
            tracing::info!(stream = %self.stream, entries = reply.claimed.len(), "took over entries left pending by another worker");
        }
        Ok(reply.claimed.into_iter().map(|e| self.deliver(e)).collect())
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn pull(
        &mut self,
        max: usize,
        _max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let max = max.max(1);
        if self.in_flight {
            let lost = self.recover().await?;
            self.in_flight = false;
            if !lost.is_empty() {
                return Ok(lost);
            }
        }
        if Instant::now() >= self.next_claim {
            self.in_flight = true;
            let claimed = self.claim(max).await?;
            self.in_flight = false;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max);
        // BLOCK 0 would mean forever: leave it out for a zero wait.
        let ms = wait.as_millis() as u64;
        if ms > 0 {
            c.arg("BLOCK").arg(ms);
        }
        c.arg("STREAMS").arg(&self.stream).arg(">");
        self.in_flight = true;
        let reply: Option<StreamReadReply> =
            c.query_async(&mut self.blocking).await.map_err(conn_err)?;
        self.in_flight = false;
        let entries: Vec<StreamId> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        Ok(entries.into_iter().map(|e| self.deliver(e)).collect())
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        let entries: Vec<String> = ids
            .iter()
            .filter_map(|id| self.handed.get(id).cloned())
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        p.atomic()
            .cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&entries)
            .ignore()
            .cmd("XDEL")
            .arg(&self.stream)
            .arg(&entries)
            .ignore();
        p.query_async::<()>(&mut self.conn)
            .await
            .map_err(conn_err)?;
        for id in ids {
            self.handed.remove(id);
        }
        Ok(())
    }

    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        let (len, pending): (u64, Value) = redis::pipe()
            .cmd("XLEN")
            .arg(&self.stream)
            .cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut self.conn)
            .await
            .map_err(conn_err)?;
        let pending = match pending {
            Value::Array(v) => match v.first() {
                Some(Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        };
        Ok(Some(len.saturating_sub(pending)))
    }
}
