//! One conformance suite for every queue backend: embedded SQLite, and the
//! real Redis, RabbitMQ and NATS JetStream on this machine (127.0.0.1).
//!
//! Each test uses its own random prefix (Redis keys, RabbitMQ queues, NATS
//! streams) and removes what it created, because other engineers run tests
//! against the same servers at the same time. The broker URLs can be moved
//! with SALTPIPE_TEST_REDIS, SALTPIPE_TEST_AMQP and SALTPIPE_TEST_NATS.
#![cfg_attr(
    not(all(feature = "redis", feature = "amqp", feature = "nats")),
    allow(unused)
)]

use bytes::Bytes;
use saltpipe::queue::{Consumer, Delivery, Message, QueueConfig, QueueUrl};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Embedded,
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "amqp")]
    Amqp,
    #[cfg(feature = "nats")]
    Nats,
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// A queue config with names no other test uses.
struct Fixture {
    cfg: QueueConfig,
    backend: Backend,
    queues: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(backend: Backend) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = match backend {
            Backend::Embedded => format!("embedded://{}", dir.path().join("q").display()),
            #[cfg(feature = "redis")]
            Backend::Redis => env_or("SALTPIPE_TEST_REDIS", "redis://127.0.0.1:6379"),
            #[cfg(feature = "amqp")]
            Backend::Amqp => env_or(
                "SALTPIPE_TEST_AMQP",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            #[cfg(feature = "nats")]
            Backend::Nats => env_or("SALTPIPE_TEST_NATS", "nats://127.0.0.1:4222"),
        };
        let cfg = QueueConfig {
            url: QueueUrl::parse(&url).expect("url"),
            prefix: format!("sptest-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff),
            redeliver_after: Duration::from_secs(1),
            spool: dir.path().join("spool"),
            ..QueueConfig::default()
        };
        Fixture {
            cfg,
            backend,
            queues: vec![],
            _dir: dir,
        }
    }

    /// A consumer that dies when dropped (no reconnecting wrapper).
    async fn consumer(&mut self, queue: &str) -> Box<dyn Consumer> {
        if !self.queues.iter().any(|q| q == queue) {
            self.queues.push(queue.to_owned());
        }
        match self.backend {
            Backend::Embedded => self.cfg.consumer(queue).await.expect("consumer"),
            #[allow(unreachable_patterns)]
            _ => self
                .cfg
                .broker_consumer(queue, 1000)
                .await
                .expect("broker consumer"),
        }
    }

    async fn push(&mut self, batch: &[Message]) {
        for m in batch {
            if !self.queues.iter().any(|q| **q == *m.queue) {
                self.queues.push(m.queue.to_string());
            }
        }
        let p = self.cfg.producer().await.expect("producer");
        p.push(batch).await.expect("push");
    }

    /// Removes what the test created on the shared servers.
    async fn cleanup(self) {
        let prefix = self.cfg.prefix.clone();
        match (self.backend, &self.cfg.url) {
            #[cfg(feature = "redis")]
            (Backend::Redis, QueueUrl::Redis { url }) => {
                let client = redis::Client::open(url.expose()).expect("redis client");
                let mut c = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("redis conn");
                for q in &self.queues {
                    let _: Result<(), _> = redis::cmd("DEL")
                        .arg(saltpipe::queue::redis::stream_key(&prefix, q))
                        .query_async(&mut c)
                        .await;
                }
            }
            #[cfg(feature = "amqp")]
            (Backend::Amqp, QueueUrl::Amqp { url }) => {
                let conn = lapin::Connection::connect(
                    url.expose(),
                    lapin::ConnectionProperties::default(),
                )
                .await
                .expect("amqp conn");
                let ch = conn.create_channel().await.expect("channel");
                for q in &self.queues {
                    let _ = ch
                        .queue_delete(
                            saltpipe::queue::amqp::queue_name(&prefix, q)
                                .as_str()
                                .into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
                let _ = conn.close(200, "done".into()).await;
            }
            #[cfg(feature = "nats")]
            (Backend::Nats, QueueUrl::Nats { url }) => {
                let client = async_nats::connect(url.expose()).await.expect("nats conn");
                let js = async_nats::jetstream::new(client);
                for q in &self.queues {
                    let _ = js
                        .delete_stream(saltpipe::queue::nats::stream_name(&prefix, q))
                        .await;
                }
            }
            _ => {}
        }
    }
}

fn msg(queue: &str, key: &str, seq: usize) -> Message {
    Message {
        queue: Arc::from(queue),
        key: key.to_owned(),
        body: Bytes::from(format!("test/{key}/{seq}\n\n\u{80}")),
        received_ms: seq as i64,
    }
}

/// Pulls until `n` messages arrived or `within` passed.
async fn pull_n(c: &mut dyn Consumer, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && tokio::time::Instant::now() < deadline {
        let got = c
            .pull(n - out.len(), usize::MAX, Duration::from_millis(200))
            .await
            .expect("pull");
        out.extend(got);
    }
    out
}

async fn push_pull_ack(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c = f.consumer("a").await;
    let batch: Vec<Message> = (0..50)
        .map(|i| msg(if i % 5 == 0 { "b" } else { "a" }, "m1", i))
        .collect();
    f.push(&batch).await;
    let got = pull_n(&mut *c, 40, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 40, "exactly the messages of queue a");
    assert!(
        got.iter().all(|d| d.received_ms % 5 != 0),
        "none of queue b"
    );
    assert_eq!(got[0].key, "m1", "the key travels");
    assert_eq!(
        got[0].body,
        msg("a", "m1", 1).body,
        "the body travels byte for byte"
    );
    assert_eq!(got[0].received_ms, 1, "the receive time travels");
    let extra = c
        .pull(10, usize::MAX, Duration::from_millis(300))
        .await
        .expect("pull");
    assert!(extra.is_empty(), "nothing more: {extra:?}");
    c.ack(&got.iter().map(|d| d.id).collect::<Vec<_>>())
        .await
        .expect("ack");
    let depth = c.depth().await.expect("depth");
    assert!(matches!(depth, Some(0) | None), "{depth:?}");
    // The other queue still holds its 10.
    let mut b = f.consumer("b").await;
    let got_b = pull_n(&mut *b, 10, Duration::from_secs(10)).await;
    assert_eq!(got_b.len(), 10);
    b.ack(&got_b.iter().map(|d| d.id).collect::<Vec<_>>())
        .await
        .expect("ack");
    drop((c, b));
    f.cleanup().await;
}

async fn order_per_key(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c = f.consumer("default").await;
    let keys = ["m0", "m1", "m2"];
    // Several pushes, keys interleaved.
    for chunk in 0..5 {
        let batch: Vec<Message> = (0..60)
            .map(|i| {
                let seq = chunk * 60 + i;
                msg("default", keys[seq % 3], seq)
            })
            .collect();
        f.push(&batch).await;
    }
    let got = pull_n(&mut *c, 300, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 300);
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for d in &got {
        per_key
            .entry(d.key.clone())
            .or_default()
            .push(d.received_ms);
    }
    assert_eq!(per_key.len(), 3);
    for (k, seqs) in &per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{k} out of order: {seqs:?}"
        );
        assert_eq!(seqs.len(), 100);
    }
    c.ack(&got.iter().map(|d| d.id).collect::<Vec<_>>())
        .await
        .expect("ack");
    drop(c);
    f.cleanup().await;
}

/// A consumer that dies holding unacked messages: they come back to the
/// next one (embedded: at reopen; RabbitMQ: when the connection closes;
/// Redis: XAUTOCLAIM after redeliver_after; NATS: after ack_wait), and the
/// acked ones never do.
async fn redelivery_after_consumer_death(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c1 = f.consumer("default").await;
    f.push(&(0..20).map(|i| msg("default", "m", i)).collect::<Vec<_>>())
        .await;
    let got = pull_n(&mut *c1, 20, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 20);
    let acked: Vec<u64> = got
        .iter()
        .filter(|d| d.received_ms < 12)
        .map(|d| d.id)
        .collect();
    c1.ack(&acked).await.expect("ack");
    drop(c1); // dies without acking the rest
    let mut c2 = f.consumer("default").await;
    // All 20 went in one container (every backend packs), acked only when
    // all its events are: the acked ones come back with the others.
    let again = pull_n(&mut *c2, 20, Duration::from_secs(20)).await;
    let again_set: BTreeSet<i64> = again.iter().map(|d| d.received_ms).collect();
    assert_eq!(
        again_set,
        (0..20).collect(),
        "the whole container comes back"
    );
    c2.ack(&again.iter().map(|d| d.id).collect::<Vec<_>>())
        .await
        .expect("ack");
    // And after the ack, nothing comes back even past the redelivery time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let none = c2
        .pull(100, usize::MAX, Duration::from_millis(500))
        .await
        .expect("pull");
    assert!(none.is_empty(), "acked messages came back: {none:?}");
    drop(c2);
    f.cleanup().await;
}

/// A pull abandoned while it waits (a worker's shutdown select drops it)
/// must not swallow the messages that arrive just then.
async fn cancelled_pull_loses_nothing(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c = f.consumer("default").await;
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        c.pull(100, usize::MAX, Duration::from_secs(2)),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the pull was still waiting when dropped"
    );
    f.push(&(0..10).map(|i| msg("default", "m", i)).collect::<Vec<_>>())
        .await;
    // Well within redeliver_after (1 s): not rescued by a redelivery.
    let got = pull_n(&mut *c, 10, Duration::from_millis(800)).await;
    let seqs: Vec<i64> = got.iter().map(|d| d.received_ms).collect();
    assert_eq!(
        seqs,
        (0..10).collect::<Vec<i64>>(),
        "all ten, in order, once"
    );
    c.ack(&got.iter().map(|d| d.id).collect::<Vec<_>>())
        .await
        .expect("ack");
    drop(c);
    f.cleanup().await;
}

/// A pull dropped at its first await, while events of a container it
/// read earlier are still in hand (the worker's shutdown select drops pulls
/// like that), loses none of them: every event comes out once, in order.
async fn pull_dropped_with_events_in_hand_loses_nothing(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c = f.consumer("default").await;
    // 300 events in one push: containers of 256 and 44 where the queue packs.
    f.push(&(0..300).map(|i| msg("default", "m", i)).collect::<Vec<_>>())
        .await;
    let mut got = pull_n(&mut *c, 100, Duration::from_secs(10)).await;
    assert_eq!(seqs(&got), (0..100).collect::<Vec<i64>>());
    // A zero timeout polls the pull once, then drops it wherever it waits.
    if let Ok(r) = tokio::time::timeout(
        Duration::ZERO,
        c.pull(250, usize::MAX, Duration::from_secs(2)),
    )
    .await
    {
        got.extend(r.expect("pull"));
    }
    // Well within redeliver_after (1 s): not rescued by a redelivery.
    let rest = pull_n(&mut *c, 300 - got.len(), Duration::from_millis(800)).await;
    got.extend(rest);
    assert_eq!(
        seqs(&got),
        (0..300).collect::<Vec<i64>>(),
        "all, once, in order"
    );
    c.ack(&ids(&got)).await.expect("ack");
    drop(c);
    f.cleanup().await;
}

/// Two consumers of one queue share the work (brokers only): every message
/// reaches exactly one of them.
async fn competing_consumers(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c1 = f.consumer("default").await;
    let mut c2 = f.consumer("default").await;
    f.push(&(0..200).map(|i| msg("default", "m", i)).collect::<Vec<_>>())
        .await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < 200 && tokio::time::Instant::now() < deadline {
        for c in [&mut c1, &mut c2] {
            let got = c
                .pull(30, usize::MAX, Duration::from_millis(100))
                .await
                .expect("pull");
            c.ack(&got.iter().map(|d| d.id).collect::<Vec<_>>())
                .await
                .expect("ack");
            seen.extend(got.iter().map(|d| d.received_ms));
        }
    }
    seen.sort();
    assert_eq!(seen, (0..200).collect::<Vec<i64>>(), "each exactly once");
    drop((c1, c2));
    f.cleanup().await;
}

fn seqs(got: &[Delivery]) -> Vec<i64> {
    got.iter().map(|d| d.received_ms).collect()
}

fn ids(got: &[Delivery]) -> Vec<u64> {
    got.iter().map(|d| d.id).collect()
}

/// A container bigger than a pull's `max` is handed out over several pulls,
/// in order, each within `max`; once all are acked nothing comes back.
async fn container_split_across_pulls(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c = f.consumer("default").await;
    // 300 events in one push: containers of 256 and 44.
    f.push(&(0..300).map(|i| msg("default", "m", i)).collect::<Vec<_>>())
        .await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 300 && tokio::time::Instant::now() < deadline {
        let part = c
            .pull(70, usize::MAX, Duration::from_millis(200))
            .await
            .expect("pull");
        assert!(part.len() <= 70, "a pull stays within max: {}", part.len());
        c.ack(&ids(&part)).await.expect("ack");
        got.extend(part);
    }
    assert_eq!(
        seqs(&got),
        (0..300).collect::<Vec<i64>>(),
        "all, once, in order"
    );
    let distinct: BTreeSet<u64> = got.iter().map(|d| d.id).collect();
    assert_eq!(distinct.len(), 300, "every event has its own id");
    drop(c);
    let c2 = f.consumer("default").await;
    nothing_comes_back(c2).await;
    f.cleanup().await;
}

/// After the broker's redelivery time, nothing acked is handed out again.
async fn nothing_comes_back(mut c: Box<dyn Consumer>) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let none = c
        .pull(1000, usize::MAX, Duration::from_millis(500))
        .await
        .expect("pull");
    assert!(none.is_empty(), "acked events came back: {:?}", seqs(&none));
}

/// Acking part of a container acks nothing at the broker: a consumer that
/// dies then gives the whole container back. A container whose events are
/// all acked is gone even if the next one was only partly acked.
async fn partial_ack_keeps_the_container(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c1 = f.consumer("default").await;
    f.push(&(0..300).map(|i| msg("default", "m", i)).collect::<Vec<_>>())
        .await;
    // The first container whole (256) and 4 of the second: all acked.
    let first = pull_n(&mut *c1, 260, Duration::from_secs(10)).await;
    assert_eq!(seqs(&first), (0..260).collect::<Vec<i64>>());
    c1.ack(&ids(&first)).await.expect("ack");
    // 20 more of the second, not acked; then the consumer dies.
    let held = pull_n(&mut *c1, 20, Duration::from_secs(10)).await;
    assert_eq!(seqs(&held), (260..280).collect::<Vec<i64>>());
    drop(c1);
    let mut c2 = f.consumer("default").await;
    let again = pull_n(&mut *c2, 44, Duration::from_secs(20)).await;
    assert_eq!(
        seqs(&again),
        (256..300).collect::<Vec<i64>>(),
        "the second container comes back whole, its 4 acked events too; the first does not"
    );
    c2.ack(&ids(&again)).await.expect("ack");
    nothing_comes_back(c2).await;
    f.cleanup().await;
}

/// Messages as a listener before packing wrote them (one event each, key
/// and time in headers), and a container that does not decode, sit in the
/// broker among packed ones: the old ones decode as before, the bad one is
/// handed on as one delivery of its raw bytes (the worker dead-letters it),
/// and every one of them can be acked.
async fn old_and_malformed_messages(backend: Backend) {
    let mut f = Fixture::new(backend);
    let mut c = f.consumer("default").await;
    f.push(&[msg("default", "m", 0), msg("default", "m", 1)])
        .await;
    let old1 = msg("default", "old", 2);
    let old2 = msg("default", "old", 3);
    let garbage = Bytes::from_static(b"\x92\x93\xa1m\x04");
    raw_publish(&f, &old1, false).await;
    raw_publish(
        &f,
        &Message {
            body: garbage.clone(),
            ..msg("default", "bad", 99)
        },
        true,
    )
    .await;
    raw_publish(&f, &old2, false).await;
    f.push(&[msg("default", "m", 5)]).await;
    let got = pull_n(&mut *c, 6, Duration::from_secs(10)).await;
    let shape: Vec<(&str, i64)> = got
        .iter()
        .map(|d| (d.key.as_str(), d.received_ms))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("m", 0),
            ("m", 1),
            ("old", 2),
            ("", 0),
            ("old", 3),
            ("m", 5)
        ]
    );
    assert_eq!(
        got[2].body, old1.body,
        "an old message's body, byte for byte"
    );
    assert_eq!(got[3].body, garbage, "the bad container's raw bytes");
    c.ack(&ids(&got)).await.expect("ack");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let none = c
        .pull(100, usize::MAX, Duration::from_millis(500))
        .await
        .expect("pull");
    assert!(none.is_empty(), "acked messages came back: {none:?}");
    drop(c);
    f.cleanup().await;
}

/// Publishes one message straight to the broker: as an older listener did
/// (`packed` false), or with the packed marker around `m.body` as is.
async fn raw_publish(f: &Fixture, m: &Message, packed: bool) {
    match &f.cfg.url {
        #[cfg(feature = "amqp")]
        QueueUrl::Amqp { url } => {
            use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
            use lapin::types::{AMQPValue, FieldTable};
            let conn =
                lapin::Connection::connect(url.expose(), lapin::ConnectionProperties::default())
                    .await
                    .expect("amqp conn");
            let ch = conn.create_channel().await.expect("channel");
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirms");
            let mut props = lapin::BasicProperties::default().with_delivery_mode(2);
            if packed {
                props = props.with_content_type(saltpipe::queue::pack::CONTENT_TYPE.into());
            } else {
                let mut h = FieldTable::default();
                h.insert("k".into(), AMQPValue::LongString(m.key.as_str().into()));
                h.insert("t".into(), AMQPValue::LongLongInt(m.received_ms));
                props = props.with_headers(h);
            }
            let confirm = ch
                .basic_publish(
                    "".into(),
                    saltpipe::queue::amqp::queue_name(&f.cfg.prefix, &m.queue)
                        .as_str()
                        .into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &m.body,
                    props,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirm.is_ack(), "{confirm:?}");
            let _ = conn.close(200, "done".into()).await;
        }
        #[cfg(feature = "nats")]
        QueueUrl::Nats { url } => {
            let client = async_nats::connect(url.expose()).await.expect("nats conn");
            let js = async_nats::jetstream::new(client);
            let mut h = async_nats::HeaderMap::new();
            if packed {
                h.insert("Saltpipe-Pack", "1");
            } else {
                h.insert("Saltpipe-Key", m.key.as_str());
                h.insert("Saltpipe-Received", m.received_ms.to_string().as_str());
            }
            js.publish_with_headers(
                saltpipe::queue::nats::subject(&f.cfg.prefix, &m.queue),
                h,
                m.body.clone(),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
        }
        #[cfg(feature = "redis")]
        QueueUrl::Redis { url } => {
            let client = redis::Client::open(url.expose()).expect("redis client");
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .expect("redis conn");
            let mut cmd = redis::cmd("XADD");
            cmd.arg(saltpipe::queue::redis::stream_key(&f.cfg.prefix, &m.queue))
                .arg("*");
            if packed {
                cmd.arg("p").arg(1).arg("b").arg(&m.body[..]);
            } else {
                cmd.arg("k")
                    .arg(&m.key)
                    .arg("t")
                    .arg(m.received_ms)
                    .arg("b")
                    .arg(&m.body[..]);
            }
            let _: String = cmd.query_async(&mut c).await.expect("xadd");
        }
        _ => panic!("raw_publish is for the brokers"),
    }
}

/// RabbitMQ's prefetch counts containers, and a listener publishing
/// directly makes small ones: once the consumer holds a full prefetch it
/// says so (`starved`), so the worker closes its batch instead of waiting
/// out the batch timeout; an ack lets the rest come.
#[cfg(feature = "amqp")]
#[tokio::test]
async fn amqp_full_prefetch_of_small_containers_is_starved() {
    let mut f = Fixture::new(Backend::Amqp);
    let mut c = f.consumer("default").await;
    // One event per push: one container each. The fixture's consumer asks
    // to hold 1,000 events, i.e. ceil(1000 / 256) + 4 = 8 containers.
    for i in 0..20 {
        f.push(&[msg("default", "m", i)]).await;
    }
    let held = pull_n(&mut *c, 8, Duration::from_secs(10)).await;
    assert_eq!(seqs(&held), (0..8).collect::<Vec<i64>>());
    let more = c
        .pull(1000, usize::MAX, Duration::from_millis(500))
        .await
        .expect("pull");
    assert!(
        more.is_empty(),
        "the broker kept to the prefetch: {:?}",
        seqs(&more)
    );
    assert!(
        c.starved(),
        "a full prefetch with nothing buffered is starved"
    );
    c.ack(&ids(&held)).await.expect("ack");
    assert!(!c.starved(), "acking frees the prefetch");
    // The next eight, then (after their ack) the last four.
    for want in [8..16, 16..20] {
        let rest = pull_n(
            &mut *c,
            (want.end - want.start) as usize,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(seqs(&rest), want.collect::<Vec<i64>>());
        c.ack(&ids(&rest)).await.expect("ack");
    }
    drop(c);
    f.cleanup().await;
}

macro_rules! packed {
    ($modname:ident, $backend:expr, $feature:literal) => {
        #[cfg(feature = $feature)]
        mod $modname {
            use super::*;
            #[tokio::test]
            async fn container_split_across_pulls() {
                super::container_split_across_pulls($backend).await
            }
            #[tokio::test]
            async fn partial_ack_keeps_the_container() {
                super::partial_ack_keeps_the_container($backend).await
            }
            #[tokio::test]
            async fn old_and_malformed_messages() {
                super::old_and_malformed_messages($backend).await
            }
        }
    };
}

packed!(redis_packed, Backend::Redis, "redis");
packed!(rabbitmq_packed, Backend::Amqp, "amqp");
packed!(nats_packed, Backend::Nats, "nats");

macro_rules! conformance {
    ($modname:ident, $backend:expr, $feature:literal) => {
        #[cfg(feature = $feature)]
        mod $modname {
            use super::*;
            #[tokio::test]
            async fn push_pull_ack() {
                super::push_pull_ack($backend).await
            }
            #[tokio::test]
            async fn order_per_key() {
                super::order_per_key($backend).await
            }
            #[tokio::test]
            async fn redelivery_after_consumer_death() {
                super::redelivery_after_consumer_death($backend).await
            }
            #[tokio::test]
            async fn cancelled_pull_loses_nothing() {
                super::cancelled_pull_loses_nothing($backend).await
            }
            #[tokio::test]
            async fn pull_dropped_with_events_in_hand_loses_nothing() {
                super::pull_dropped_with_events_in_hand_loses_nothing($backend).await
            }
        }
    };
}

// The embedded queue is always built; the feature named is a default one.
mod embedded {
    use super::*;
    #[tokio::test]
    async fn push_pull_ack() {
        super::push_pull_ack(Backend::Embedded).await
    }
    #[tokio::test]
    async fn order_per_key() {
        super::order_per_key(Backend::Embedded).await
    }
    #[tokio::test]
    async fn redelivery_after_consumer_death() {
        super::redelivery_after_consumer_death(Backend::Embedded).await
    }
    #[tokio::test]
    async fn cancelled_pull_loses_nothing() {
        super::cancelled_pull_loses_nothing(Backend::Embedded).await
    }
    #[tokio::test]
    async fn pull_dropped_with_events_in_hand_loses_nothing() {
        super::pull_dropped_with_events_in_hand_loses_nothing(Backend::Embedded).await
    }
    #[tokio::test]
    async fn container_split_across_pulls() {
        super::container_split_across_pulls(Backend::Embedded).await
    }
    #[tokio::test]
    async fn partial_ack_keeps_the_container() {
        super::partial_ack_keeps_the_container(Backend::Embedded).await
    }
}
conformance!(redis_streams, Backend::Redis, "redis");
conformance!(rabbitmq, Backend::Amqp, "amqp");
conformance!(nats_jetstream, Backend::Nats, "nats");

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_competing_consumers() {
    competing_consumers(Backend::Redis).await
}
#[cfg(feature = "amqp")]
#[tokio::test]
async fn amqp_competing_consumers() {
    competing_consumers(Backend::Amqp).await
}
#[cfg(feature = "nats")]
#[tokio::test]
async fn nats_competing_consumers() {
    competing_consumers(Backend::Nats).await
}
