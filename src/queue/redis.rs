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
//! when workers fall behind. `queue.max_len` opts in to `MAXLEN ~ n` (n
//! entries, i.e. containers of up to 256 events) for
//! those who prefer a bounded Redis to a complete history; Redis's own
//! `maxmemory` policy should then be `noeviction`, or Redis may evict the
//! stream itself.
//!
//! Durability is Redis's: a push is "stored" once Redis has it in memory;
//! surviving a Redis crash needs `appendonly yes` (with `appendfsync
//! everysec` up to a second can be lost).
//!
//! Events travel packed, as with RabbitMQ and NATS: one stream entry (the
//! container in field `b`, marked by a field `p`) holds up to 256
//! consecutive events of the queue ([`super::pack`]),
//! so Redis stores, hands out and deletes one entry per container instead
//! of per event. An entry is XACKed and deleted once the worker acked
//! every event in it. Entries without `p` (fields `k`, `t` and `b`) are an
//! older listener's single events and still decode. Reads and claims ask
//! for `ceil(max / 256)` entries, so a worker holds about a batch per pull
//! rather than up to 256 batches.
//!
//! Connections: pushes, acks and claims share a `ConnectionManager` (which
//! reconnects by itself); each consumer's blocking XREADGROUP gets its own
//! connection with no response timeout, because the client's default 500 ms
//! response timeout would fail any longer `BLOCK`, and a blocking read on a
//! shared multiplexed connection would hold up everyone's replies.

use super::pack::{self, Entry, Ledger};
use super::{Consumer, Delivery, Message, Producer, QueueConfig, QueueError};
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Value};
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
            ledger: Ledger::default(),
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
        for c in pack::pack(batch, pack::LIMITS) {
            let cmd = p.cmd("XADD").arg(stream_key(&self.prefix, &c.queue));
            if self.max_len > 0 {
                cmd.arg("MAXLEN").arg("~").arg(self.max_len);
            }
            // The container rides in `b`, where single events rode, so an
            // older worker that cannot read it dead-letters its bytes rather
            // than an empty body; `p` (the format's version) marks it.
            cmd.arg("*")
                .arg("p")
                .arg(1)
                .arg("b")
                .arg(&c.data[..])
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
    /// The entries held (by stream entry id) and their events not yet handed out.
    ledger: Ledger<String>,
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
    /// Unpacks one stream entry into the ledger.
    fn take(&mut self, e: StreamId) {
        let field = |k: &str| e.map.get(k);
        let bytes = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => b.clone(),
            Some(Value::SimpleString(s)) => s.clone().into_bytes(),
            _ => Vec::new(),
        };
        let packed = field("p").is_some();
        let body = Bytes::from(bytes(field("b")));
        // An entry someone else wrote with other fields gets an empty body:
        // the worker then dead-letters it as undecodable instead of choking.
        let entries = pack::entries(
            packed,
            body,
            |body| Entry {
                key: String::from_utf8_lossy(&bytes(field("k"))).into_owned(),
                received_ms: std::str::from_utf8(&bytes(field("t")))
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                body,
            },
            &self.stream,
        );
        self.ledger.take(e.id, entries);
    }

    /// Entries per read or claim for a pull of up to `max` events.
    fn count(max: usize) -> usize {
        max.div_ceil(pack::LIMITS.events).max(1)
    }

    /// Entries in our own pending list that we never took in (see
    /// `in_flight`); returns how many.
    async fn recover(&mut self) -> Result<usize, QueueError> {
        let held: std::collections::HashSet<&String> = self.ledger.held().collect();
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
        let n = lost.len();
        for e in lost {
            self.take(e);
        }
        Ok(n)
    }

    /// Takes over entries another (dead) worker left pending too long;
    /// returns how many.
    async fn claim(&mut self, count: usize) -> Result<usize, QueueError> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(self.redeliver_after.as_millis() as u64)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(count)
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
        let n = reply.claimed.len();
        for e in reply.claimed {
            self.take(e);
        }
        Ok(n)
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let max = max.max(1);
        let mut out = Vec::new();
        let mut bytes = 0;
        // First what an earlier pull unpacked and had no room for.
        self.ledger.hand_out(&mut out, &mut bytes, max, max_bytes);
        if !out.is_empty() {
            return Ok(out);
        }
        let count = Self::count(max);
        if self.in_flight {
            let lost = self.recover().await?;
            self.in_flight = false;
            if lost > 0 {
                self.ledger.hand_out(&mut out, &mut bytes, max, max_bytes);
                return Ok(out);
            }
        }
        if Instant::now() >= self.next_claim {
            self.in_flight = true;
            let claimed = self.claim(count).await?;
            self.in_flight = false;
            if claimed > 0 {
                self.ledger.hand_out(&mut out, &mut bytes, max, max_bytes);
                return Ok(out);
            }
        }
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count);
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
        for e in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            self.take(e);
        }
        self.ledger.hand_out(&mut out, &mut bytes, max, max_bytes);
        Ok(out)
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        // An entry is acked and deleted only once all its events are.
        self.ledger.mark(ids);
        let (firsts, entries): (Vec<u64>, Vec<String>) =
            self.ledger.complete().map(|(f, e)| (f, e.clone())).unzip();
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
        self.ledger.forget(&firsts);
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
        // The stream counts containers; the gauge is in events.
        Ok(Some(self.ledger.estimate(len.saturating_sub(pending))))
    }
}
