//! The worker against an in-memory queue and a scripted sink: test
//! doubles of our own traits, so batching, retry, bisection and ack
//! order can be checked deterministically with paused time.
use super::sweep::SWEEP_CHUNK;
use super::*;
use crate::bus::encode::frame_bytes;
use crate::event::Event;
use crate::queue::Delivery;
use crate::queue::QueueError;
use crate::sink::{Record, WriteReport};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Default)]
struct MemQueue {
    ready: Mutex<VecDeque<Delivery>>,
    acked: Mutex<Vec<u64>>,
    /// Says it holds a full prefetch whenever nothing is ready.
    starves: bool,
    /// Like a broker's prefetch: hands out nothing more while this many
    /// are unacked.
    prefetch: Option<usize>,
    unacked: Mutex<usize>,
}

struct MemConsumer(Arc<MemQueue>);

#[async_trait]
impl Consumer for MemConsumer {
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let got: Vec<Delivery> = {
            let mut q = self.0.ready.lock().expect("lock");
            let mut unacked = self.0.unacked.lock().expect("lock");
            let room = self
                .0
                .prefetch
                .map_or(usize::MAX, |p| p.saturating_sub(*unacked));
            let mut n = max.min(q.len()).min(room);
            // About `max_bytes`: at least one.
            let mut bytes = 0;
            if let Some(fit) = q.iter().take(n).position(|d| {
                bytes += d.body.len();
                bytes > max_bytes
            }) {
                n = fit.max(1);
            }
            *unacked += n;
            q.drain(..n).collect()
        };
        if got.is_empty() {
            tokio::time::sleep(wait).await;
        }
        Ok(got)
    }
    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        self.0.acked.lock().expect("lock").extend_from_slice(ids);
        let mut unacked = self.0.unacked.lock().expect("lock");
        *unacked = unacked.saturating_sub(ids.len());
        Ok(())
    }
    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        Ok(Some(self.0.ready.lock().expect("lock").len() as u64))
    }
    fn starved(&self) -> bool {
        self.0.starves && self.0.ready.lock().expect("lock").is_empty()
    }
}

/// Fails the first `busy` writes as retriable; refuses any batch holding
/// a tag in `poison` (naming the index only if `name_index`).
#[derive(Default)]
struct ScriptSink {
    busy: Mutex<u32>,
    poison: Vec<String>,
    name_index: bool,
    written: Mutex<Vec<Vec<String>>>,
    dead: Mutex<Vec<String>>,
}

#[async_trait]
impl Sink for ScriptSink {
    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
        {
            let mut b = self.busy.lock().expect("lock");
            if *b > 0 {
                *b -= 1;
                return Err(SinkError::Retriable("busy".into()));
            }
        }
        if let Some(i) = batch
            .iter()
            .position(|r| self.poison.iter().any(|p| p == r.event.tag()))
        {
            return Err(SinkError::Permanent {
                message: "bad value".into(),
                index: self.name_index.then_some(i),
            });
        }
        self.written
            .lock()
            .expect("lock")
            .push(batch.iter().map(|r| r.event.tag().to_owned()).collect());
        Ok(WriteReport {
            returns: batch.len() as u64,
            ..Default::default()
        })
    }
    async fn dead_letter(
        &self,
        tag: &str,
        _body: &bytes::Bytes,
        _error: &str,
    ) -> Result<(), SinkError> {
        self.dead.lock().expect("lock").push(tag.to_owned());
        Ok(())
    }
}

fn delivery(i: u64) -> Delivery {
    delivery_with(i, &[])
}

/// A return of jid `i` from minion `m`, with these fields besides.
fn delivery_with(i: u64, fields: &[(&str, &str)]) -> Delivery {
    let jid = i.to_string();
    let mut all = vec![("id", "m"), ("jid", jid.as_str())];
    all.extend_from_slice(fields);
    let f = frame_bytes(&format!("salt/job/{i}/ret/m"), &all);
    let e = Event::from_frame(&bytes::Bytes::from(f)).expect("event");
    Delivery {
        id: i,
        key: "m".into(),
        body: e.body,
        received_ms: 0,
    }
}

fn cfg(max_events: usize) -> WorkerConfig {
    WorkerConfig {
        batch_max_events: max_events,
        batch_timeout: Duration::from_millis(200),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        ..Default::default()
    }
}

async fn run(
    queue: Arc<MemQueue>,
    sink: Arc<dyn Sink>,
    cfg: WorkerConfig,
    drain: Option<Duration>,
) -> Arc<Stats> {
    let stats = Arc::new(Stats::default());
    let token = CancellationToken::new();
    let w = Worker::new(Box::new(MemConsumer(queue)), sink, cfg, stats.clone());
    let t = token.clone();
    let h = tokio::spawn(w.run(Stop::new(t, drain)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    token.cancel();
    h.await.expect("join").expect("worker");
    stats
}

#[tokio::test(start_paused = true)]
async fn batches_close_on_count_and_everything_is_acked_after_writing() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=25).map(delivery));
    let sink = Arc::new(ScriptSink::default());
    let stats = run(q.clone(), sink.clone(), cfg(10), None).await;
    let sizes: Vec<usize> = sink
        .written
        .lock()
        .expect("lock")
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![10, 10, 5]);
    let mut acked = q.acked.lock().expect("lock").clone();
    acked.sort();
    assert_eq!(acked, (1..=25).collect::<Vec<_>>());
    assert_eq!(stats.snapshot().batches, 3);
}

#[tokio::test(start_paused = true)]
async fn written_returns_are_counted_by_outcome() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=3).map(delivery));
    // A return Salt calls failed, and a job announcement (no outcome).
    let mut data = Vec::new();
    let _ = rmp::encode::write_map_len(&mut data, 3);
    for (k, v) in [("id", "m"), ("jid", "4")] {
        let _ = rmp::encode::write_str(&mut data, k);
        let _ = rmp::encode::write_str(&mut data, v);
    }
    let _ = rmp::encode::write_str(&mut data, "retcode");
    let _ = rmp::encode::write_uint(&mut data, 1);
    for (id, tag) in [(4, "salt/job/4/ret/m"), (5, "salt/job/5/new")] {
        let f = crate::bus::encode::frame(tag, &data);
        let e = Event::from_frame(&bytes::Bytes::from(f)).expect("event");
        q.ready.lock().expect("lock").push_back(Delivery {
            id,
            key: "m".into(),
            body: e.body,
            received_ms: 0,
        });
    }
    let sink = Arc::new(ScriptSink::default());
    let stats = run(q, sink, cfg(10), None).await;
    let o = stats.snapshot().outcomes;
    assert_eq!(
        (o.get("ok"), o.get("failed")),
        (Some(&3), Some(&1)),
        "{:?}",
        stats.snapshot()
    );
    assert_eq!(o.len(), 2);
}

#[test]
fn the_return_window_is_checked_and_read_from_toml() {
    let cfg: crate::config::Config =
        toml::from_str("[worker]\nreturn_window = \"90s\"\n").expect("parses");
    assert_eq!(cfg.worker.return_window, Duration::from_secs(90));
    assert!(cfg.worker.validate().is_ok());
    assert_eq!(
        WorkerConfig::default().return_window,
        Duration::from_secs(300)
    );
    for bad in [
        Duration::ZERO,
        Duration::from_millis(500),
        Duration::from_secs(31 * 86_400),
    ] {
        let c = WorkerConfig {
            return_window: bad,
            ..Default::default()
        };
        assert!(c.validate().is_err(), "{bad:?}");
    }
}

/// Closes return windows as scripted.
#[derive(Default)]
struct SweepSink {
    rounds: Mutex<VecDeque<crate::sink::Closed>>,
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl Sink for SweepSink {
    async fn write(&self, _: &[Record]) -> Result<WriteReport, SinkError> {
        Ok(WriteReport::default())
    }
    async fn dead_letter(&self, _: &str, _: &bytes::Bytes, _: &str) -> Result<(), SinkError> {
        Ok(())
    }
    async fn close_returns(
        &self,
        before: &str,
        _limit: usize,
    ) -> Result<crate::sink::Closed, SinkError> {
        self.calls.lock().expect("lock").push(before.to_owned());
        Ok(self
            .rounds
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or_default())
    }
}

#[tokio::test(start_paused = true)]
async fn the_sweep_closes_windows_and_counts_silent_minions() {
    let sink = Arc::new(SweepSink::default());
    let silent = |m: &str| crate::sink::NoReturn {
        jid: "20261202120000000000".into(),
        minion: m.into(),
        fun: "state.apply".into(),
        stamp: "2026-12-02 12:00:00.000000".into(),
    };
    sink.rounds.lock().expect("lock").extend([
        crate::sink::Closed {
            targets: SWEEP_CHUNK,
            no_return: vec![silent("m1")],
        },
        // The rest of the same round: fewer than a chunk ends it.
        crate::sink::Closed {
            targets: 3,
            no_return: vec![silent("m2"), silent("m3")],
        },
    ]);
    let mut c = cfg(10);
    c.return_window = Duration::from_secs(10);
    let stats = run(Arc::new(MemQueue::default()), sink.clone(), c, None).await;
    assert_eq!(stats.snapshot().outcomes.get("no_return"), Some(&3));
    assert_eq!(stats.targets_closed.load(Relaxed), SWEEP_CHUNK as u64 + 3);
    // Every second (window / 10) over the run's 5 s of paused time; a
    // full chunk asks again at once.
    let calls = sink.calls.lock().expect("lock").clone();
    assert!(calls.len() >= 4, "{calls:?}");
    assert_eq!(calls[0], calls[1], "the same round");
    assert_eq!(calls[0].len(), "2026-12-02 12:00:00.000000".len());
}

/// Takes two batches at once; the first one is slow to write.
#[derive(Default)]
struct TwoWriters {
    now: Mutex<(usize, usize)>,
    finished: Mutex<Vec<u64>>,
}

#[async_trait]
impl Sink for TwoWriters {
    fn writers(&self) -> usize {
        2
    }
    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
        {
            let mut n = self.now.lock().expect("lock");
            n.0 += 1;
            n.1 = n.1.max(n.0);
        }
        // Tags are `salt/job/<i>/ret/m`: the batch's first delivery.
        let first: u64 = batch[0]
            .event
            .tag()
            .split('/')
            .nth(2)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        if first == 1 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.now.lock().expect("lock").0 -= 1;
        self.finished.lock().expect("lock").push(first);
        Ok(WriteReport {
            returns: batch.len() as u64,
            ..Default::default()
        })
    }
    async fn dead_letter(&self, _: &str, _: &bytes::Bytes, _: &str) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_sink_with_two_writers_takes_two_batches_at_once_and_acks_stay_in_order() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=30).map(delivery));
    let sink = Arc::new(TwoWriters::default());
    run(q.clone(), sink.clone(), cfg(10), None).await;
    assert_eq!(sink.now.lock().expect("lock").1, 2, "two writes at once");
    assert_eq!(
        *sink.finished.lock().expect("lock"),
        vec![11, 1, 21],
        "the second batch committed while the slow first one was written; the \
         third waited: at most two batches are held unacked"
    );
    assert_eq!(
        *q.acked.lock().expect("lock"),
        (1..=30).collect::<Vec<_>>(),
        "acks in batch order all the same"
    );
}

#[tokio::test(start_paused = true)]
async fn draining_waits_for_acks_when_the_prefetch_holds_the_rest_back() {
    // A broker hands out one batch's worth until it is acked: when the
    // drain starts, a pull comes back empty while batches are still
    // being written, and that is not an empty queue.
    let q = Arc::new(MemQueue {
        prefetch: Some(10),
        ..Default::default()
    });
    q.ready.lock().expect("lock").extend((1..=45).map(delivery));
    let stats = Arc::new(Stats::default());
    let token = CancellationToken::new();
    token.cancel();
    let sink: Arc<dyn Sink> = Arc::new(ScriptSink::default());
    let w = Worker::new(
        Box::new(MemConsumer(q.clone())),
        sink,
        cfg(10),
        stats.clone(),
    );
    w.run(Stop::new(token, None)).await.expect("worker");
    let mut acked = q.acked.lock().expect("lock").clone();
    acked.sort();
    assert_eq!(acked, (1..=45).collect::<Vec<_>>(), "drained to the end");
    assert!(q.ready.lock().expect("lock").is_empty());
}

/// A worker on `q` writing into `sink`, counting into `stats`, in a task
/// of its own, until the token it returns is cancelled.
fn start(
    q: &Arc<MemQueue>,
    sink: Arc<dyn Sink>,
    cfg: WorkerConfig,
    stats: Arc<Stats>,
) -> (
    tokio::task::JoinHandle<Result<(), WorkerError>>,
    CancellationToken,
) {
    let token = CancellationToken::new();
    let w = Worker::new(Box::new(MemConsumer(q.clone())), sink, cfg, stats);
    (tokio::spawn(w.run(Stop::new(token.clone(), None))), token)
}

#[tokio::test(start_paused = true)]
async fn a_lone_event_is_written_by_the_timer_on_a_quiet_queue() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").push_back(delivery(1));
    let sink = Arc::new(ScriptSink::default());
    let (h, token) = start(&q, sink.clone(), cfg(1000), Arc::default());
    // Well before any shutdown: the batch timer (200 ms) fires by itself.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sink.written.lock().expect("lock").len(), 1);
    assert_eq!(*q.acked.lock().expect("lock"), vec![1]);
    token.cancel();
    h.await.expect("join").expect("worker");
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_is_written_at_the_stop_without_waiting_out_its_timer() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=3).map(delivery));
    let sink = Arc::new(ScriptSink::default());
    let hour = WorkerConfig {
        batch_timeout: Duration::from_secs(3600),
        ..cfg(1000)
    };
    let (h, token) = start(&q, sink.clone(), hour, Arc::default());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        sink.written.lock().expect("lock").is_empty(),
        "the batch waits for more"
    );
    token.cancel();
    // Before, the gatherer waited out the hour (the end of every replay
    // and every shutdown took up to `batch_timeout` more).
    tokio::time::timeout(Duration::from_secs(1), h)
        .await
        .expect("the stop drains the partial batch at once")
        .expect("join")
        .expect("worker");
    assert_eq!(sink.written.lock().expect("lock").len(), 1);
    assert_eq!(*q.acked.lock().expect("lock"), vec![1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_starved_consumer_closes_the_batch_without_waiting_for_the_timer() {
    let q = Arc::new(MemQueue {
        starves: true,
        ..Default::default()
    });
    q.ready.lock().expect("lock").extend((1..=3).map(delivery));
    let sink = Arc::new(ScriptSink::default());
    let (h, token) = start(&q, sink.clone(), cfg(1000), Arc::default());
    // Far less than the 200 ms batch timeout (the ack follows within
    // ACK_WAIT): nothing more can come before an ack, so waiting for
    // the timer would only stall.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(sink.written.lock().expect("lock").len(), 1);
    assert_eq!(*q.acked.lock().expect("lock"), vec![1, 2, 3]);
    token.cancel();
    h.await.expect("join").expect("worker");
}

#[tokio::test(start_paused = true)]
async fn retriable_errors_hold_the_batch_and_ack_only_after_success() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=5).map(delivery));
    let sink = Arc::new(ScriptSink {
        busy: Mutex::new(3),
        ..Default::default()
    });
    let stats = run(q.clone(), sink.clone(), cfg(10), None).await;
    assert_eq!(sink.written.lock().expect("lock").len(), 1);
    assert_eq!(q.acked.lock().expect("lock").len(), 5);
    assert_eq!(stats.snapshot().sink_retries, 3);
}

#[tokio::test(start_paused = true)]
async fn a_refused_row_is_dead_lettered_and_the_rest_lands() {
    for name_index in [true, false] {
        let q = Arc::new(MemQueue::default());
        q.ready.lock().expect("lock").extend((1..=9).map(delivery));
        let sink = Arc::new(ScriptSink {
            poison: vec!["salt/job/4/ret/m".into()],
            name_index,
            ..Default::default()
        });
        let stats = run(q.clone(), sink.clone(), cfg(100), None).await;
        let mut landed: Vec<String> = sink.written.lock().expect("lock").concat();
        landed.sort();
        assert_eq!(landed.len(), 8, "name_index {name_index}");
        assert!(!landed.contains(&"salt/job/4/ret/m".to_string()));
        assert_eq!(*sink.dead.lock().expect("lock"), vec!["salt/job/4/ret/m"]);
        assert_eq!(
            q.acked.lock().expect("lock").len(),
            9,
            "the dead-lettered row is acked too"
        );
        assert_eq!(stats.snapshot().dead_letters, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_the_sink_down_leaves_the_batch_unacked() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=3).map(delivery));
    let sink = Arc::new(ScriptSink {
        busy: Mutex::new(u32::MAX),
        ..Default::default()
    });
    run(
        q.clone(),
        sink.clone(),
        cfg(10),
        Some(Duration::from_secs(2)),
    )
    .await;
    assert!(sink.written.lock().expect("lock").is_empty());
    assert!(
        q.acked.lock().expect("lock").is_empty(),
        "nothing acked that was not written"
    );
}

/// Takes a second per batch (long beside a debug build's conversion of the
/// next one), and up to twenty batches at once: without the
/// memory budget a worker would hold twenty.
struct SlowSink;

#[async_trait]
impl Sink for SlowSink {
    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(WriteReport {
            returns: batch.len() as u64,
            ..Default::default()
        })
    }
    async fn dead_letter(&self, _: &str, _: &bytes::Bytes, _: &str) -> Result<(), SinkError> {
        Ok(())
    }
    fn writers(&self) -> usize {
        20
    }
}

// In real time: with paused time the clock jumps while the prepare stage
// converts on the blocking pool, so every write would end at once.
#[tokio::test]
async fn a_slow_sink_holds_the_worker_to_its_memory_part_and_all_of_it_comes_back() {
    let payload = "x".repeat(100_000);
    let big = |i: u64| delivery_with(i, &[("return", &payload)]);
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=24).map(big));
    let one = big(1).body.len();
    let stats = Arc::new(Stats::default());
    // 1 MiB for the worker: about ten of these returns.
    let part = stats
        .install_budget(crate::memory::Budget::new(1 << 20, 0, false))
        .part(crate::memory::PartName::Worker)
        .clone();
    // Shut down from the start: drains the queue, then ends.
    let token = CancellationToken::new();
    token.cancel();
    let w = Worker::new(
        Box::new(MemConsumer(q.clone())),
        Arc::new(SlowSink),
        cfg(10),
        stats,
    );
    w.run(Stop::new(token, None)).await.expect("worker");
    assert_eq!(
        q.acked.lock().expect("lock").len(),
        24,
        "everything written"
    );
    assert!(part.waits() > 0, "the gatherer waited for memory");
    assert!(
        part.peak() <= part.limit() + 2 * one,
        "peak {} over the limit {} by more than a batch",
        part.peak(),
        part.limit()
    );
    assert_eq!(part.used(), 0, "every batch's memory given back");
}

#[tokio::test(start_paused = true)]
async fn the_worker_pulls_nothing_while_the_listener_is_past_half_its_part() {
    let q = Arc::new(MemQueue::default());
    q.ready.lock().expect("lock").extend((1..=3).map(delivery));
    let sink = Arc::new(ScriptSink::default());
    let stats = Arc::new(Stats::default());
    let listener = stats
        .install_budget(crate::memory::Budget::new(64 << 20, 32 << 20, false))
        .part(crate::memory::PartName::Listener)
        .clone();
    // A burst: the listener's backlog (its queue writer behind) is past
    // half its 32 MiB.
    let backlog = listener.charge(20 << 20);
    let (h, token) = start(&q, sink.clone(), cfg(1000), stats.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(q.ready.lock().expect("lock").len(), 3, "nothing pulled");
    assert!(stats.worker_yields.load(Relaxed) > 0);
    // The queue writer caught up: the worker goes on.
    drop(backlog);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*q.acked.lock().expect("lock"), vec![1, 2, 3]);
    assert_eq!(sink.written.lock().expect("lock").len(), 1);
    token.cancel();
    h.await.expect("join").expect("worker");
}
