//! Where events come from: the master's event bus (unix socket or TCP), or a
//! captured stream being replayed.
//!
//! The one rule of the bus: read it all the time. The master buffers for a
//! slow subscriber without limit, then cuts it off at 10,000 pending writes
//! or a 60-second stall and throws away everything buffered, with no replay
//! and no sign but the EOF. So the source never waits on the queue or the
//! sink: it frames, decodes and filters inline (cheap), hands kept events to
//! the queue writer through a bounded channel without waiting, and holds
//! what the channel cannot take yet in a backlog. Everything it kept and
//! the queue has not yet stored (backlog, channel, the writer's batch) is
//! charged to the listener's part of the memory budget
//! ([`crate::memory`], `source.pending_limit`), which may borrow what the
//! worker's part leaves free. Past both, the newest chunks wait on local
//! disk in an anonymous overflow file ([`overflow`], `source.overflow_limit`)
//! and go on in order when the writer has room. Only if that is full too
//! (the queue stopped taking writes for long) or the disk refuses does it
//! drop events, counted and logged at error, rather than stall the socket
//! and lose the master's whole buffer uncounted.

use crate::bus::framing::{Framed, Framer};
use crate::config::{ConfigError, human};
use crate::event::Event;
use crate::memory::{Charge, Part};
use crate::queue::Message;
use crate::rules::{Decision, Rules};
use crate::stats::{Stats, events};
use async_trait::async_trait;
use bytes::BytesMut;
use overflow::{Overflow, Spilled};
use serde::Deserialize;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod bus;
pub mod file;
pub mod overflow;

pub use bus::{Captured, capture, check};

/// The master's default publish socket.
pub const DEFAULT_SOCKET: &str = "/var/run/salt/master/master_event_pub.ipc";

/// `[source]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// The master's publish socket, `<sock_dir>/master_event_pub.ipc`.
    /// The default when neither `socket` nor `tcp` is given.
    pub socket: Option<PathBuf>,
    /// `host:port` of the publisher when the master runs `ipc_mode: tcp`
    /// (127.0.0.1:4512 by default there).
    pub tcp: Option<String>,
    /// First wait before reconnecting; doubles up to `reconnect_max`.
    #[serde(deserialize_with = "human::duration")]
    pub reconnect_min: Duration,
    #[serde(deserialize_with = "human::duration")]
    pub reconnect_max: Duration,
    /// Largest event accepted; larger ones are skipped and counted. The
    /// master caps events near `max_event_size` (1 MiB) unless raised.
    #[serde(deserialize_with = "human::size")]
    pub max_frame: u64,
    /// After a short read, wait this long before reading again, so a bus
    /// that trickles one event per write is read many events per wake-up
    /// (less CPU). At most 100ms; "0s" reads at once.
    #[serde(deserialize_with = "human::duration")]
    pub read_coalesce: Duration,
    /// Kept events held in memory until the queue has stored them (the
    /// listener's part of `[memory] budget`; half of it when not set; it
    /// may also borrow what the worker's part leaves free), before the
    /// reader moves them to the overflow file (or, without one, drops
    /// them, counted) instead of stalling the bus.
    #[serde(deserialize_with = "human::opt_size")]
    pub pending_limit: Option<u64>,
    /// Past `pending_limit`, kept events wait in an overflow file on local
    /// disk (the queue's directory, or the spool's with a broker) until the
    /// queue writer has room, up to this many bytes; only past it are they
    /// dropped (counted). "0" drops at once, as before it existed.
    #[serde(deserialize_with = "human::size")]
    pub overflow_limit: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            socket: None,
            tcp: None,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            read_coalesce: Duration::from_millis(10),
            max_frame: 64 << 20,
            pending_limit: None,
            overflow_limit: 1 << 30,
        }
    }
}

/// Where the bus is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for BusAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            BusAddress::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl SourceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.socket.is_some() && self.tcp.is_some() {
            return Err(ConfigError::invalid(
                "source",
                "give either `socket` or `tcp`, not both",
            ));
        }
        if let Some(t) = &self.tcp
            && !t
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Err(ConfigError::invalid(
                "source.tcp",
                format!("`{t}` is not host:port"),
            ));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(ConfigError::invalid(
                "source.reconnect_min",
                "must be above zero and not above reconnect_max",
            ));
        }
        if self.read_coalesce > Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "source.read_coalesce",
                "must be at most 100ms: the master cuts off a reader that falls behind",
            ));
        }
        if self.max_frame < 1024 || self.max_frame > 1 << 30 {
            return Err(ConfigError::invalid(
                "source.max_frame",
                "must be between 1KiB and 1GiB",
            ));
        }
        if self.pending_limit.is_some_and(|p| p < 1 << 20) {
            return Err(ConfigError::invalid(
                "source.pending_limit",
                "must be at least 1MiB",
            ));
        }
        if self.overflow_limit != 0 && self.overflow_limit < 1 << 20 {
            return Err(ConfigError::invalid(
                "source.overflow_limit",
                "must be 0 (no overflow file) or at least 1MiB",
            ));
        }
        Ok(())
    }

    /// The listener's part of the memory budget.
    pub fn pending_limit(&self, memory: &crate::memory::MemoryConfig) -> u64 {
        self.pending_limit.unwrap_or_else(|| memory.total(None) / 2)
    }

    pub fn address(&self) -> BusAddress {
        match (&self.tcp, &self.socket) {
            (Some(t), _) => BusAddress::Tcp(t.clone()),
            (None, Some(s)) => BusAddress::Unix(s.clone()),
            (None, None) => BusAddress::Unix(PathBuf::from(DEFAULT_SOCKET)),
        }
    }
}

/// Errors that end a source for good (transient bus errors are retried inside).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the queue writer has stopped")]
    QueueClosed,
    #[error("event bus: {0}")]
    Bus(String),
}

/// A stream of bus bytes.
#[async_trait]
pub trait Source: Send {
    /// Reads until the stream ends (a file) or `shutdown` fires (the bus),
    /// feeding `ingest`; returns after everything read was handed on.
    /// Takes `ingest` and drops it at the end, which closes the queue
    /// writer's channel.
    async fn run(&mut self, ingest: Ingest, shutdown: CancellationToken)
    -> Result<(), SourceError>;
}

/// Kept events on their way to the queue, with their charge to the
/// listener's part of the memory budget (given back once the queue has
/// stored them, or they are dropped).
#[derive(Debug)]
pub struct Chunk {
    pub messages: Vec<Message>,
    pub charge: Charge,
}

impl Chunk {
    /// Adds `other`'s messages and charge to this one.
    pub fn extend(&mut self, other: Chunk) {
        self.messages.extend(other.messages);
        self.charge.merge(other.charge);
    }
}

/// Framing, decoding, rules and the hand-off to the queue writer: the
/// listener's work for every byte read, whatever the source.
pub struct Ingest {
    framer: Framer,
    rules: Rules,
    stats: Arc<Stats>,
    max_frame: usize,
    outbox: Vec<Message>,
    outbox_bytes: usize,
    /// Sealed chunks not handed on yet, oldest first.
    backlog: VecDeque<Pending>,
    /// Where chunks past the memory part wait, if anywhere.
    overflow: Option<Overflow>,
    /// The listener's part of the memory budget.
    memory: Arc<Part>,
    tx: mpsc::Sender<Chunk>,
    /// New rules sent on reload (SIGHUP), applied before the next bytes.
    reload: Option<mpsc::UnboundedReceiver<Rules>>,
    /// The web pages' Live feed (`saltpipe run` with `[web] enabled`).
    live: Option<crate::web::live::LiveFeed>,
}

/// A sealed chunk waiting for room in the channel: in memory, or in the
/// overflow file.
#[derive(Debug)]
enum Pending {
    Held(Chunk),
    Spilled(Spilled),
}

/// Writes `chunk` to the overflow file, if there is one that takes it.
fn spill(overflow: Option<&mut Overflow>, stats: &Stats, chunk: &Chunk) -> Option<Spilled> {
    let overflow = overflow?;
    match overflow.spill(chunk) {
        Ok(spilled) => {
            events::OverflowSpilled {
                events: spilled.events,
                on_disk: overflow.held(),
            }
            .emit(stats);
            Some(spilled)
        }
        Err(error) => {
            events::OverflowRefused { error: &error }.emit(stats);
            None
        }
    }
}

/// Messages per chunk sent to the queue writer...
const CHUNK: usize = 512;
/// ...or bytes: the unit in which the listener's memory is charged, and
/// dropped when it is full (a chunk of 512 large returns would be 50 MB
/// kept or lost at once).
const CHUNK_BYTES: usize = 1 << 20;

impl Ingest {
    /// `memory`: the part of the budget this ingest's kept events are
    /// charged to until the queue stores them.
    pub fn new(
        cfg: &SourceConfig,
        rules: Rules,
        stats: Arc<Stats>,
        tx: mpsc::Sender<Chunk>,
        memory: Arc<Part>,
    ) -> Ingest {
        Ingest {
            framer: Framer::new(cfg.max_frame as usize),
            rules,
            stats,
            max_frame: cfg.max_frame as usize,
            outbox: Vec::with_capacity(CHUNK),
            outbox_bytes: 0,
            backlog: VecDeque::new(),
            overflow: None,
            memory,
            tx,
            reload: None,
            live: None,
        }
    }

    /// Offers every kept event to the Live page's feed (never waits).
    pub fn with_live(mut self, live: Option<crate::web::live::LiveFeed>) -> Ingest {
        self.live = live;
        self
    }

    /// Holds chunks past the memory part in `overflow` instead of dropping
    /// them (the bus reader; a file source and the backfill wait instead).
    pub fn with_overflow(mut self, overflow: Option<Overflow>) -> Ingest {
        self.overflow = overflow;
        self
    }

    /// Takes new rules from `rx` between two reads: every event read after
    /// the swap is judged by the new rules, every one before by the old.
    pub fn with_reload(mut self, rx: mpsc::UnboundedReceiver<Rules>) -> Ingest {
        self.reload = Some(rx);
        self
    }

    /// The buffer to read bus bytes into.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        self.framer.buffer_mut()
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Frames, decodes and filters everything buffered so far.
    pub fn process(&mut self, received_ms: i64) {
        if let Some(rx) = &mut self.reload {
            while let Ok(rules) = rx.try_recv() {
                self.rules = rules;
                tracing::info!("new rules in effect");
            }
        }
        while let Some(item) = self.framer.next_frame() {
            match item {
                Framed::Frame(frame) => {
                    self.stats.frames.fetch_add(1, Relaxed);
                    match Event::from_frame(&frame) {
                        Ok(event) => self.decide(event, received_ms),
                        Err(e) => events::FrameRejected {
                            reason: e.reason(),
                            skipped: frame.len(),
                            excerpt: &crate::bus::framing::hex_excerpt(&frame),
                        }
                        .emit(&self.stats),
                    }
                }
                Framed::Garbage { skipped, excerpt } => events::FrameRejected {
                    reason: "not_a_frame",
                    skipped,
                    excerpt: &excerpt,
                }
                .emit(&self.stats),
                Framed::Oversized { len } => events::FrameOversized {
                    len,
                    limit: self.max_frame,
                }
                .emit(&self.stats),
            }
        }
    }

    fn decide(&mut self, event: Event, received_ms: i64) {
        match self.rules.decide(&event) {
            Decision::Keep { queue } => {
                self.stats.kept.fetch_add(1, Relaxed);
                if let Some(live) = &self.live {
                    live.offer(&event, received_ms);
                }
                self.outbox_bytes += event.body.len();
                self.outbox.push(Message {
                    queue,
                    key: event.partition_key(),
                    body: event.body,
                    received_ms,
                });
                if self.outbox.len() >= CHUNK || self.outbox_bytes >= CHUNK_BYTES {
                    self.seal();
                }
            }
            Decision::Drop(reason) => self.stats.count_drop(reason),
        }
    }

    /// Closes the chunk being filled, charged to the memory part.
    fn seal(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let messages = std::mem::replace(&mut self.outbox, Vec::with_capacity(CHUNK));
        let charge = self.memory.charge(std::mem::take(&mut self.outbox_bytes));
        self.backlog
            .push_back(Pending::Held(Chunk { messages, charge }));
    }

    /// Hands what it can to the queue writer without waiting, oldest
    /// first (reading a spilled chunk back only when the channel has room
    /// for it). While the memory part is past its limit (the queue has not
    /// stored anything for a while), moves the newest chunks still in
    /// memory to the overflow file, or, when there is none or it refuses,
    /// drops them (counted) instead of blocking; a chunk that is all the
    /// part holds stays, so one event larger than the part still goes
    /// through.
    pub fn flush_nowait(&mut self) -> Result<(), SourceError> {
        self.seal();
        while self.tx.capacity() > 0 {
            let Some(next) = self.backlog.pop_front() else {
                break;
            };
            let Some(chunk) = self.take(next) else {
                continue;
            };
            match self.tx.try_send(chunk) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(chunk)) => {
                    self.backlog.push_front(Pending::Held(chunk));
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(SourceError::QueueClosed),
            }
        }
        while self.memory.over() {
            let Some(at) = self
                .backlog
                .iter()
                .rposition(|p| matches!(p, Pending::Held(_)))
            else {
                break;
            };
            let Pending::Held(chunk) = &self.backlog[at] else {
                break;
            };
            if chunk.charge.bytes() >= self.memory.used() {
                break;
            }
            match spill(self.overflow.as_mut(), &self.stats, chunk) {
                // Dropping the held chunk releases its charge.
                Some(spilled) => self.backlog[at] = Pending::Spilled(spilled),
                None => {
                    if let Some(Pending::Held(chunk)) = self.backlog.remove(at) {
                        self.drop_chunk(chunk);
                    }
                }
            }
        }
        Ok(())
    }

    /// The chunk to hand on: held, or read back from the overflow file
    /// (`None`, counted as lost, if it does not read back).
    fn take(&mut self, pending: Pending) -> Option<Chunk> {
        let spilled = match pending {
            Pending::Held(chunk) => return Some(chunk),
            Pending::Spilled(spilled) => spilled,
        };
        let events = spilled.events;
        let overflow = self.overflow.as_mut()?;
        let read = overflow.read_back(spilled, &self.memory);
        self.stats.overflow_bytes.store(overflow.held(), Relaxed);
        if let Some(episode) = overflow.take_finished() {
            events::OverflowEmptied { episode }.emit(&self.stats);
        }
        match read {
            Ok(chunk) => Some(chunk),
            Err(error) => {
                events::OverflowUnreadable {
                    lost: events,
                    error: &error,
                }
                .emit(&self.stats);
                None
            }
        }
    }

    /// Drops a kept chunk the queue cannot take in time (counted).
    fn drop_chunk(&mut self, chunk: Chunk) {
        // These never reach the queue: the duplicate window must not
        // drop the master's retransmit of them as already kept.
        for m in &chunk.messages {
            if let Ok(e) = Event::from_body(m.body.clone()) {
                self.rules.forget(&e);
            }
        }
        let dropped = chunk.messages.len();
        drop(chunk);
        events::QueueOverflow {
            dropped,
            pending_bytes: self.memory.used(),
        }
        .emit(&self.stats);
    }

    /// True if kept events wait for room in the channel.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Hands everything on, waiting for room: for files and shutdown.
    pub async fn flush_wait(&mut self) -> Result<(), SourceError> {
        self.seal();
        while let Some(next) = self.backlog.pop_front() {
            let Some(chunk) = self.take(next) else {
                continue;
            };
            self.tx
                .send(chunk)
                .await
                .map_err(|_| SourceError::QueueClosed)?;
        }
        Ok(())
    }

    /// The stream ended (EOF or a dropped connection): takes the complete
    /// frames still held, then forgets a partial one; returns its size.
    pub fn end_stream(&mut self, received_ms: i64) -> usize {
        self.framer.end_of_stream();
        self.process(received_ms);
        let n = self.framer.buffered();
        self.framer.reset();
        n
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::encode::frame_bytes;
    use crate::rules::DropReason;

    fn ret(jid: &str) -> Vec<u8> {
        frame_bytes(
            &format!("salt/job/{jid}/ret/m1"),
            &[("jid", jid), ("id", "m1"), ("fun", "test.ping")],
        )
    }

    fn feed(ingest: &mut Ingest, frame: &[u8]) {
        ingest.buffer_mut().extend_from_slice(frame);
        ingest.process(0);
        ingest.flush_nowait().expect("queue writer alive");
    }

    #[test]
    fn a_return_dropped_on_overflow_is_kept_when_the_master_sends_it_again() {
        let cfg = SourceConfig::default();
        let rules = Rules::new(&crate::rules::RulesConfig::default());
        let stats = Arc::new(Stats::default());
        // Room for one chunk in the listener's memory, and nobody taking it
        // yet: the queue is stuck.
        let (tx, mut rx) = mpsc::channel(1);
        let memory = Part::standalone(1);
        let mut ingest = Ingest::new(&cfg, rules, stats.clone(), tx, memory);
        feed(&mut ingest, &ret("1"));
        feed(&mut ingest, &ret("2"));
        assert_eq!(stats.overflow_dropped.load(Relaxed), 1, "jid 2 was lost");
        // The queue recovers; the master retransmits both.
        let first = rx.try_recv().expect("jid 1 was handed on");
        assert_eq!(first.messages.len(), 1);
        // Stored: its memory is given back.
        drop(first);
        feed(&mut ingest, &ret("1"));
        feed(&mut ingest, &ret("2"));
        let dup = DropReason::DuplicateReturn.index();
        assert_eq!(
            stats.dropped[dup].load(Relaxed),
            1,
            "jid 1 was queued: its copy is a duplicate"
        );
        let again = rx.try_recv().expect("the retransmit of jid 2 was kept");
        let e = Event::from_body(again.messages[0].body.clone()).expect("event");
        assert_eq!(e.fields.jid.as_deref(), Some("2"));
        assert_eq!(stats.kept.load(Relaxed), 3);
    }

    fn jid_of(m: &Message) -> String {
        let e = Event::from_body(m.body.clone()).expect("event");
        e.fields.jid.clone().unwrap_or_default()
    }

    /// A queue stuck while 50 returns arrive, each its own chunk, with room
    /// in memory for one: the rest wait in the overflow file.
    fn stuck_queue(
        overflow_limit: u64,
    ) -> (
        Ingest,
        mpsc::Receiver<Chunk>,
        Arc<Stats>,
        Arc<Part>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(1);
        let memory = Part::standalone(1);
        let rules = Rules::new(&crate::rules::RulesConfig::default());
        let mut ingest = Ingest::new(
            &SourceConfig::default(),
            rules,
            stats.clone(),
            tx,
            memory.clone(),
        )
        .with_overflow(Some(Overflow::new(
            dir.path().to_path_buf(),
            overflow_limit,
        )));
        for jid in 1..=50 {
            feed(&mut ingest, &ret(&jid.to_string()));
        }
        (ingest, rx, stats, memory, dir)
    }

    #[test]
    fn past_its_part_the_listener_holds_kept_events_on_disk_and_hands_them_on_in_order() {
        let (mut ingest, mut rx, stats, memory, _dir) = stuck_queue(1 << 20);
        assert_eq!(stats.overflow_dropped.load(Relaxed), 0);
        // One in the channel (all the part holds), 49 on disk.
        assert_eq!(stats.overflow_spilled.load(Relaxed), 49);
        assert!(stats.overflow_bytes.load(Relaxed) > 0);
        let one = memory.used();
        // The queue recovers: everything comes out once, in order, and
        // memory never holds more than the channel and the held chunk.
        let mut got = Vec::new();
        for _ in 0..200 {
            while let Ok(chunk) = rx.try_recv() {
                got.extend(chunk.messages.iter().map(jid_of));
            }
            assert!(memory.used() <= 2 * one, "{} > 2 x {one}", memory.used());
            ingest.flush_nowait().expect("queue writer alive");
            if got.len() == 50 {
                break;
            }
        }
        let want: Vec<String> = (1..=50).map(|j: u32| j.to_string()).collect();
        assert_eq!(got, want);
        assert_eq!(stats.overflow_bytes.load(Relaxed), 0, "the file is empty");
        assert!(!ingest.has_backlog());
    }

    #[tokio::test]
    async fn at_shutdown_what_is_on_disk_is_handed_on_too() {
        let (mut ingest, mut rx, stats, _memory, _dir) = stuck_queue(1 << 20);
        let taker = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(chunk) = rx.recv().await {
                got.extend(chunk.messages.iter().map(jid_of));
            }
            got
        });
        ingest.flush_wait().await.expect("queue writer alive");
        drop(ingest);
        let got = taker.await.expect("taker");
        assert_eq!(got.len(), 50);
        assert_eq!(stats.overflow_dropped.load(Relaxed), 0);
    }

    #[test]
    fn past_the_overflow_limit_kept_events_are_dropped_and_counted() {
        // Room on disk for about one return.
        let (_ingest, _rx, stats, _memory, _dir) = stuck_queue(150);
        let spilled = stats.overflow_spilled.load(Relaxed);
        let dropped = stats.overflow_dropped.load(Relaxed);
        assert!(spilled >= 1, "{spilled}");
        assert_eq!(spilled + dropped, 49, "every return is on disk or counted");
        assert!(dropped >= 40, "{dropped}");
    }
}
