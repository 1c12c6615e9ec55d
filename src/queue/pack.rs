//! Several events in one broker message (or one embedded queue row): the
//! container codec, and the bookkeeping a consumer needs to hand the events
//! out one by one.
//!
//! Why: RabbitMQ and NATS cost per *message* (a persistent publish, a
//! confirm, a delivery, an ack), Redis per stream entry, and our events
//! are small (~350 B-2 KB). One AMQP or NATS message per event made those
//! paths 1.5-7x slower than the embedded queue (and the embedded queue
//! itself pays SQLite per row: see [`super::embedded`]). The producers therefore put up to
//! [`Limits::events`] consecutive events of one queue (and about
//! [`Limits::bytes`]) into one message, and the consumers unpack it into
//! several [`Delivery`]s.
//!
//! The format is MessagePack, written and read with `rmp` (already used for
//! the bus): an array of `[key (str), received_ms (int), body (bin)]`
//! arrays, in queue order. A hand-made framing would save nothing and need
//! its own review; `rmp`'s low-level calls (rather than `rmp-serde`) let
//! the decoder hand out each body as a zero-copy slice of the message.
//! Packed messages are marked (AMQP `content_type`, NATS header, Redis
//! field name), so
//! single-event messages already in a broker from an older listener still
//! decode as before.
//!
//! Acks: a broker message is acked only when every event unpacked from it
//! has been acked by the worker ([`Ledger`]). A consumer that dies holding
//! part of a container gets the whole container redelivered; the sinks'
//! unique keys make the repeats harmless.
//!
//! Input from a broker is never trusted: [`unpack`] checks every length
//! against what is left before reading or allocating, and never panics. A
//! container that does not decode is logged here and becomes one delivery
//! carrying its raw bytes, which the worker cannot read as an event and
//! dead-letters (counted there, like any undecodable message): it is kept
//! aside and acked, and other messages' events are not held up. (Our
//! containers start with an array marker, never a valid tag; only bytes
//! someone else published with our marker could read as an event.)

use super::{Delivery, Message, QueueError};
use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// AMQP `content_type` of a packed message.
pub const CONTENT_TYPE: &str = "application/vnd.saltpipe.pack.v1+msgpack";

/// How big a container may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Events per container.
    pub events: usize,
    /// About this many bytes per container (keys, bodies and framing). A
    /// single event larger than this goes alone.
    pub bytes: usize,
}

/// 256 events: at ~350-byte events the broker's per-message cost is already
/// spread thin (a 90 KB message); more would only make a redelivered
/// container and a worker's prefetch coarser. 512 KiB keeps 2 KB events at
/// 256 a container and stays under NATS's default 1 MiB `max_payload`.
pub const LIMITS: Limits = Limits {
    events: 256,
    bytes: 512 << 10,
};

/// The broker's prefetch (in messages) for a worker that asked to hold
/// `events` events unacked (by default what its stages hold: the batch
/// being gathered, one converted and waiting, and `sink.writers` being
/// written): whole containers for that many events, plus four split at
/// batch boundaries. With room for fewer batches than the worker holds,
/// gathering stalls until an ack (measured: RabbitMQ, 1 worker holding 3
/// batches, prefetch for 2 batches 21-33k returns/s, for 3 batches 80k/s).
/// Counting containers times [`LIMITS`]`.events` bounds what a worker
/// holds, instead of `events` x 256 had the event count been used as the
/// message count.
pub fn prefetch_containers(events: u32) -> u32 {
    events.div_ceil(LIMITS.events as u32) + 4
}

/// Framing bytes one event adds besides its key and body (array, int, str
/// and bin headers), at most.
const ENTRY_OVERHEAD: usize = 1 + 9 + 5 + 5;
/// The smallest possible entry: fixarray, fixstr "", fixint, bin8 of 0.
const MIN_ENTRY: usize = 1 + 1 + 1 + 2;

/// One broker message's worth of events, all for `queue`.
#[derive(Debug)]
pub struct Container {
    pub queue: Arc<str>,
    /// How many events it holds.
    pub events: usize,
    pub data: Vec<u8>,
}

/// Puts a batch into containers, each holding consecutive messages of one
/// queue. Each queue's order is kept (its containers come out in its order,
/// each a run of its messages); queues are grouped first, because
/// alternating routes (a `state` queue beside `default`) would otherwise cut
/// the containers down to a few events each, and a broker's prefetch, which
/// counts containers, with them.
pub fn pack(batch: &[Message], limits: Limits) -> Vec<Container> {
    let first = batch.first().map(|m| &m.queue);
    if batch.iter().all(|m| Some(&m.queue) == first) {
        return pack_runs(batch, limits);
    }
    let mut grouped = batch.to_vec();
    // Stable: each queue's messages stay in their order.
    grouped.sort_by(|a, b| a.queue.cmp(&b.queue));
    pack_runs(&grouped, limits)
}

fn pack_runs(batch: &[Message], limits: Limits) -> Vec<Container> {
    // At least one event per container, or the loop would make no progress.
    let max_events = limits.events.max(1);
    let mut out: Vec<Container> = Vec::new();
    let mut start = 0;
    while start < batch.len() {
        let queue = &batch[start].queue;
        let mut end = start;
        let mut bytes = 0usize;
        while end < batch.len() && batch[end].queue == *queue && end - start < max_events {
            let size = entry_size(&batch[end]);
            if end > start && bytes + size > limits.bytes {
                break;
            }
            bytes += size;
            end += 1;
        }
        out.push(encode(queue.clone(), &batch[start..end], bytes));
        start = end;
    }
    out
}

fn entry_size(m: &Message) -> usize {
    m.key.len() + m.body.len() + ENTRY_OVERHEAD
}

fn encode(queue: Arc<str>, run: &[Message], size: usize) -> Container {
    use rmp::encode::{write_array_len, write_bin, write_sint, write_str};
    let mut data = Vec::with_capacity(size + 5);
    // Writing into a Vec cannot fail (rmp's error type covers io writers),
    // and lengths are below u32::MAX: a broker message is far smaller.
    let _ = write_array_len(&mut data, run.len() as u32);
    for m in run {
        let _ = write_array_len(&mut data, 3);
        let _ = write_str(&mut data, &m.key);
        let _ = write_sint(&mut data, m.received_ms);
        let _ = write_bin(&mut data, &m.body);
    }
    Container {
        queue,
        events: run.len(),
        data,
    }
}

/// One event taken out of a container (or out of an old single-event message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub received_ms: i64,
    pub body: Bytes,
}

/// Why a container did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("not a container: {0}")]
    Format(String),
    #[error("container truncated: {0} needs {1} bytes, {2} left")]
    Truncated(&'static str, usize, usize),
    #[error("container holds no events")]
    Empty,
    #[error("{0} bytes after the last event")]
    Trailing(usize),
}

fn format_err(what: &str, e: impl std::fmt::Display) -> PackError {
    PackError::Format(format!("{what}: {e}"))
}

/// Decodes a container. Bodies are slices of `data` (no copy).
pub fn unpack(data: &Bytes) -> Result<Vec<Entry>, PackError> {
    use rmp::decode::{read_array_len, read_bin_len, read_int, read_str_len};
    let mut rd: &[u8] = data;
    let n = read_array_len(&mut rd).map_err(|e| format_err("container", e))? as usize;
    if n == 0 {
        // We never write one, and acking it would need a delivery anyway.
        return Err(PackError::Empty);
    }
    // A hostile count must not make us allocate: every entry takes bytes.
    if n > rd.len() / MIN_ENTRY {
        return Err(PackError::Truncated(
            "event count",
            n.saturating_mul(MIN_ENTRY),
            rd.len(),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let fields = read_array_len(&mut rd).map_err(|e| format_err("event", e))?;
        if fields != 3 {
            return Err(PackError::Format(format!(
                "an event has {fields} fields, not 3"
            )));
        }
        let len = read_str_len(&mut rd).map_err(|e| format_err("key", e))? as usize;
        let key = take(&mut rd, len, "key")?;
        let key = std::str::from_utf8(key)
            .map_err(|e| format_err("key", e))?
            .to_owned();
        let received_ms: i64 = read_int(&mut rd).map_err(|e| format_err("received_ms", e))?;
        let len = read_bin_len(&mut rd).map_err(|e| format_err("body", e))? as usize;
        let start = data.len() - rd.len();
        take(&mut rd, len, "body")?;
        out.push(Entry {
            key,
            received_ms,
            body: data.slice(start..start + len),
        });
    }
    if !rd.is_empty() {
        return Err(PackError::Trailing(rd.len()));
    }
    Ok(out)
}

fn take<'a>(rd: &mut &'a [u8], len: usize, what: &'static str) -> Result<&'a [u8], PackError> {
    if rd.len() < len {
        return Err(PackError::Truncated(what, len, rd.len()));
    }
    let (head, rest) = rd.split_at(len);
    *rd = rest;
    Ok(head)
}

/// The events of one broker message: unpacked if `packed`, else the single
/// event `single` builds from the message's headers (an older listener's
/// message). A container that does not decode is logged and handed on as
/// one event with its raw bytes, for the worker to dead-letter.
pub fn entries(
    packed: bool,
    body: Bytes,
    single: impl FnOnce(Bytes) -> Entry,
    source: &str,
) -> Vec<Entry> {
    if !packed {
        return vec![single(body)];
    }
    match unpack(&body) {
        Ok(entries) => entries,
        Err(e) => {
            crate::log_limited!(error, queue = %source, error = %e, bytes = body.len(), "undecodable container in the queue; handing it on whole to be dead-lettered");
            vec![Entry {
                key: String::new(),
                received_ms: 0,
                body,
            }]
        }
    }
}

/// A consumer's account of the broker messages it holds: their events not
/// yet handed out, and which handed-out events are acked. `H` is what the
/// broker needs to ack a message (an AMQP delivery tag, a NATS message).
///
/// Every event gets a local id, counting up from 1 (so it fits the low 48
/// bits [`super::resilient`] leaves for it); one message's events get
/// consecutive ids, and the message is keyed by its first.
pub struct Ledger<H> {
    next_id: u64,
    /// Unpacked and not yet handed out, in queue order.
    ready: VecDeque<Delivery>,
    bytes_ready: usize,
    /// Messages taken and not yet acked at the broker, by first id.
    held: BTreeMap<u64, Held<H>>,
    /// First ids of held messages whose every event is acked.
    done: BTreeSet<u64>,
    /// Messages and events taken so far, for [`Ledger::estimate`].
    taken: (u64, u64),
}

struct Held<H> {
    handle: H,
    /// Per event, whether the worker acked it.
    acked: Vec<bool>,
    left: usize,
}

impl<H> Default for Ledger<H> {
    fn default() -> Self {
        Ledger {
            next_id: 1,
            ready: VecDeque::new(),
            bytes_ready: 0,
            held: BTreeMap::new(),
            done: BTreeSet::new(),
            taken: (0, 0),
        }
    }
}

impl<H> Ledger<H> {
    /// Takes in one broker message and its events (at least one).
    pub fn take(&mut self, handle: H, entries: Vec<Entry>) {
        let first = self.next_id;
        let n = entries.len();
        self.next_id += n as u64;
        self.taken.0 += 1;
        self.taken.1 += n as u64;
        for (i, e) in entries.into_iter().enumerate() {
            self.bytes_ready += e.body.len();
            self.ready.push_back(Delivery {
                id: first + i as u64,
                key: e.key,
                body: e.body,
                received_ms: e.received_ms,
            });
        }
        if n == 0 {
            // Nothing to wait for: ack it with the next batch.
            self.done.insert(first);
        }
        self.held.insert(
            first,
            Held {
                handle,
                acked: vec![false; n],
                left: n,
            },
        );
    }

    /// Whether a pull that has `count` events and `bytes` bytes may take more.
    pub fn room(count: usize, bytes: usize, max: usize, max_bytes: usize) -> bool {
        count < max && (count == 0 || bytes < max_bytes)
    }

    /// Moves buffered events into `out` while [`Ledger::room`] allows.
    pub fn hand_out(
        &mut self,
        out: &mut Vec<Delivery>,
        bytes: &mut usize,
        max: usize,
        max_bytes: usize,
    ) {
        while Self::room(out.len(), *bytes, max, max_bytes) {
            let Some(d) = self.ready.pop_front() else {
                break;
            };
            *bytes += d.body.len();
            self.bytes_ready -= d.body.len();
            out.push(d);
        }
    }

    /// Broker messages taken and not yet acked at the broker.
    pub fn holding(&self) -> usize {
        self.held.len()
    }

    /// Events unpacked and not yet handed out.
    pub fn buffered(&self) -> (usize, usize) {
        (self.ready.len(), self.bytes_ready)
    }

    /// Events waiting, for a broker that counts `messages` waiting: at the
    /// mean size of the messages taken so far (1 before the first), plus
    /// those unpacked here and not handed out. An estimate: the broker
    /// knows only its message count.
    pub fn estimate(&self, messages: u64) -> u64 {
        let (m, e) = self.taken;
        let per = if m == 0 { 1.0 } else { e as f64 / m as f64 };
        (messages as f64 * per).round() as u64 + self.ready.len() as u64
    }

    /// Records the worker's acks (unknown and repeated ids are ignored).
    pub fn mark(&mut self, ids: &[u64]) {
        for &id in ids {
            let Some((&first, held)) = self.held.range_mut(..=id).next_back() else {
                continue;
            };
            let Some(slot) = usize::try_from(id - first)
                .ok()
                .and_then(|i| held.acked.get_mut(i))
            else {
                continue;
            };
            if !*slot {
                *slot = true;
                held.left -= 1;
                if held.left == 0 {
                    self.done.insert(first);
                }
            }
        }
    }

    /// Messages whose every event is acked, by first id: to ack at the
    /// broker, then [`Ledger::forget`].
    pub fn complete(&self) -> impl Iterator<Item = (u64, &H)> {
        self.done
            .iter()
            .filter_map(|f| self.held.get(f).map(|h| (*f, &h.handle)))
    }

    /// Handles of every message held (acked or not), in the order taken.
    pub fn held(&self) -> impl Iterator<Item = &H> {
        self.held.values().map(|h| &h.handle)
    }

    /// Drops messages the broker has acked.
    pub fn forget(&mut self, firsts: &[u64]) {
        for f in firsts {
            self.held.remove(f);
            self.done.remove(f);
        }
    }
}

/// One pull from a broker that pushes whole containers at its consumer
/// (RabbitMQ's `basic_consume`, NATS's continuous pull): first what the
/// ledger still buffers; if that is nothing, up to `wait` for one message;
/// then whatever already arrived, without waiting. `unpack` turns a message
/// into its handle and events; the stream ending is `ended()`.
pub async fn pull_from<H, M, S>(
    ledger: &mut Ledger<H>,
    stream: &mut S,
    mut unpack: impl FnMut(M) -> (H, Vec<Entry>),
    ended: fn() -> QueueError,
    max: usize,
    max_bytes: usize,
    wait: std::time::Duration,
) -> Result<Vec<Delivery>, QueueError>
where
    S: Stream<Item = Result<M, QueueError>> + Unpin,
{
    let mut out = Vec::new();
    let mut bytes = 0;
    ledger.hand_out(&mut out, &mut bytes, max, max_bytes);
    if out.is_empty() {
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Ok(out),
            Ok(None) => return Err(ended()),
            Ok(Some(m)) => {
                let (handle, entries) = unpack(m?);
                ledger.take(handle, entries);
            }
        }
        ledger.hand_out(&mut out, &mut bytes, max, max_bytes);
    }
    while Ledger::<H>::room(out.len(), bytes, max, max_bytes) {
        match stream.next().now_or_never() {
            Some(Some(m)) => {
                let (handle, entries) = unpack(m?);
                ledger.take(handle, entries);
                ledger.hand_out(&mut out, &mut bytes, max, max_bytes);
            }
            Some(None) => return Err(ended()),
            None => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(queue: &str, key: &str, seq: i64, body_len: usize) -> Message {
        let mut body = format!("salt/job/{seq}/ret/{key}\n\n").into_bytes();
        body.resize(body.len().max(body_len), 0xa5);
        Message {
            queue: Arc::from(queue),
            key: key.to_owned(),
            body: Bytes::from(body),
            received_ms: seq,
        }
    }

    fn roundtrip(batch: &[Message], limits: Limits) -> Vec<(Arc<str>, Vec<Entry>)> {
        pack(batch, limits)
            .into_iter()
            .map(|c| {
                let entries = unpack(&Bytes::from(c.data)).expect("decodes");
                assert_eq!(entries.len(), c.events);
                (c.queue, entries)
            })
            .collect()
    }

    #[test]
    fn round_trip_keeps_everything_in_order() {
        let mut batch: Vec<Message> = (0..600)
            .map(|i| {
                msg(
                    "default",
                    &format!("m{}", i % 7),
                    i,
                    300 + (i as usize % 50),
                )
            })
            .collect();
        batch.push(Message {
            key: "ünï/cödé".into(),
            received_ms: -1,
            ..msg("default", "x", 0, 10)
        });
        batch.push(Message {
            key: String::new(),
            received_ms: i64::MAX,
            body: Bytes::new(),
            ..msg("default", "", 0, 0)
        });
        let got = roundtrip(&batch, LIMITS);
        assert_eq!(
            got.iter().map(|(_, e)| e.len()).collect::<Vec<_>>(),
            vec![256, 256, 90],
            "split by count"
        );
        let flat: Vec<Entry> = got.into_iter().flat_map(|(_, e)| e).collect();
        let want: Vec<Entry> = batch
            .iter()
            .map(|m| Entry {
                key: m.key.clone(),
                received_ms: m.received_ms,
                body: m.body.clone(),
            })
            .collect();
        assert_eq!(flat, want);
    }

    #[test]
    fn groups_each_queue_in_its_order() {
        let batch = vec![
            msg("a", "m", 0, 10),
            msg("a", "m", 1, 10),
            msg("b", "m", 2, 10),
            msg("a", "m", 3, 10),
        ];
        let got = roundtrip(&batch, LIMITS);
        let shape: Vec<(&str, Vec<i64>)> = got
            .iter()
            .map(|(q, e)| (&**q, e.iter().map(|e| e.received_ms).collect()))
            .collect();
        assert_eq!(shape, vec![("a", vec![0, 1, 3]), ("b", vec![2])]);
    }

    #[test]
    fn split_by_bytes_and_a_big_event_goes_alone() {
        let limits = Limits {
            events: 256,
            bytes: 1 << 20,
        };
        let mut batch: Vec<Message> = (0..10).map(|i| msg("q", "m", i, 200_000)).collect();
        batch.insert(3, msg("q", "m", 100, 20 << 20));
        let got = roundtrip(&batch, limits);
        let sizes: Vec<usize> = got.iter().map(|(_, e)| e.len()).collect();
        assert_eq!(sizes, vec![3, 1, 5, 2], "~1 MiB each, the 20 MB one alone");
        assert_eq!(got[1].1[0].body.len(), 20 << 20);
        assert!(
            pack(&[], LIMITS).is_empty(),
            "nothing to pack, no container"
        );
        let zero = Limits {
            events: 0,
            bytes: 0,
        };
        assert_eq!(
            pack(&batch[..3], zero).len(),
            3,
            "degenerate limits: one each"
        );
    }

    #[test]
    fn malformed_containers_are_errors_not_panics() {
        let good = Bytes::from(
            pack(&[msg("q", "m", 1, 50), msg("q", "n", 2, 50)], LIMITS)
                .remove(0)
                .data,
        );
        // Every truncation, and every single-byte corruption, fails or
        // decodes; none panics.
        for cut in 0..good.len() {
            assert!(unpack(&good.slice(..cut)).is_err(), "cut at {cut}");
        }
        for i in 0..good.len() {
            for b in [0x00, 0x7f, 0x90, 0xc1, 0xdd, 0xff] {
                let mut bad = good.to_vec();
                bad[i] = b;
                let _ = unpack(&Bytes::from(bad));
            }
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert_eq!(unpack(&Bytes::from(trailing)), Err(PackError::Trailing(1)));
        assert_eq!(unpack(&Bytes::from_static(&[0x90])), Err(PackError::Empty));
        assert!(unpack(&Bytes::new()).is_err());
        // A huge announced count on a tiny message: refused before allocating.
        assert!(matches!(
            unpack(&Bytes::from_static(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x93])),
            Err(PackError::Truncated(..))
        ));
        // A huge announced body.
        assert!(matches!(
            unpack(&Bytes::from_static(&[
                0x91, 0x93, 0xa0, 0x00, 0xc6, 0xff, 0xff, 0xff, 0xff
            ])),
            Err(PackError::Truncated("body", ..))
        ));
        // Someone else's msgpack.
        assert!(unpack(&Bytes::from_static(b"\x91\x92\xa1k\x01")).is_err());
        assert!(unpack(&Bytes::from_static(b"\x91\x93\xa1\xff\x01\xc4\x00")).is_err());
    }

    #[test]
    fn a_bad_container_becomes_one_delivery_of_its_bytes() {
        let raw = Bytes::from_static(b"\x92\x93garbage");
        let got = entries(true, raw.clone(), |_| unreachable!(), "q");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, raw);
        let single = entries(
            false,
            Bytes::from_static(b"old"),
            |b| Entry {
                key: "m".into(),
                received_ms: 7,
                body: b,
            },
            "q",
        );
        assert_eq!(single[0].key, "m");
        assert_eq!(single[0].body, Bytes::from_static(b"old"));
    }

    fn entry(i: i64) -> Entry {
        Entry {
            key: "m".into(),
            received_ms: i,
            body: Bytes::from(vec![0u8; 10]),
        }
    }

    #[test]
    fn ledger_acks_a_message_only_when_all_its_events_are() {
        let mut l: Ledger<&str> = Ledger::default();
        l.take("A", (0..5).map(entry).collect());
        l.take("B", (5..7).map(entry).collect());
        let (mut out, mut bytes) = (Vec::new(), 0);
        l.hand_out(&mut out, &mut bytes, 3, usize::MAX);
        assert_eq!(out.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(l.buffered(), (4, 40), "the rest waits for the next pull");
        l.mark(&[1, 2, 3, 3, 99, 0]);
        assert_eq!(l.complete().count(), 0, "A is not fully acked");
        let (mut out, mut bytes) = (Vec::new(), 0);
        l.hand_out(&mut out, &mut bytes, 100, 25);
        assert_eq!(
            out.iter().map(|d| d.id).collect::<Vec<_>>(),
            vec![4, 5, 6],
            "bytes limit: stops once past 25"
        );
        l.mark(&[6]);
        assert_eq!(l.complete().count(), 0, "B has 7 left");
        l.mark(&[4, 5]);
        assert_eq!(
            l.complete().map(|(f, h)| (f, *h)).collect::<Vec<_>>(),
            vec![(1, "A")]
        );
        l.forget(&[1]);
        assert_eq!(l.held().copied().collect::<Vec<_>>(), vec!["B"]);
        l.hand_out(&mut out, &mut bytes, 100, usize::MAX);
        l.mark(&[7]);
        assert_eq!(
            l.complete().map(|(f, h)| (f, *h)).collect::<Vec<_>>(),
            vec![(6, "B")]
        );
        l.forget(&[6]);
        l.mark(&[7]);
        assert_eq!(
            l.complete().count(),
            0,
            "a repeated ack after forget is ignored"
        );
        assert_eq!(l.held().count(), 0);
        assert_eq!(l.estimate(10), 35, "3.5 events a message so far");
    }

    #[test]
    fn prefetch_in_containers() {
        assert_eq!(prefetch_containers(1), 5);
        assert_eq!(prefetch_containers(0), 4);
        // Three default batches (SQLite: one written), four (two written).
        assert_eq!(prefetch_containers(6000), 28);
        assert_eq!(prefetch_containers(8000), 36);
    }
}
