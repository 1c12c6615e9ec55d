//! `saltpipe work` processes against the real Redis, RabbitMQ and NATS:
//!
//! * two workers, one SIGKILLed in the middle of its batches: every return
//!   is stored exactly once (the survivor, or a restarted one, gets what the
//!   dead one held unacked);
//! * the broker goes away while events flow (a TCP proxy in front of it is
//!   cut and restored, so the shared broker itself is never stopped): the
//!   listener's spool and forwarder and the reconnecting worker lose nothing;
//! * what a previous run left in the listener's spool reaches the broker
//!   before anything published directly.
#![cfg_attr(
    not(all(feature = "redis", feature = "amqp", feature = "nats")),
    allow(unused)
)]

#[path = "common/brokers.rs"]
mod brokers;

use brokers::*;
use saltpipe::queue::embedded::Embedded;
use saltpipe::queue::{Producer, QueueConfig, forward};
use saltpipe::stats::Stats;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

const N: usize = 20000;

async fn sigkill_one_of_two_workers(broker: Broker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique_prefix();
    let db = dir.path().join("salt.db");
    let q = queue_config(&broker.url(), &prefix, &dir.path().join("spool"));
    // A consumer group / durable consumer must exist before the push for
    // Redis (group created at 0 either way) and NATS; create them by
    // starting the workers first.
    let cfg = write_config(dir.path(), "work.toml", &q, &db, "");
    let mut a = spawn_saltpipe("work", &cfg, &dir.path().join("a.log"));
    let mut b = spawn_saltpipe("work", &cfg, &dir.path().join("b.log"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let producer = q.producer().await.expect("producer");
    // Push while the workers write, as a listener would.
    let pusher = tokio::spawn(async move {
        for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
            let batch: Vec<_> = chunk.iter().map(|&i| return_message(i)).collect();
            producer.push(&batch).await.expect("push");
        }
    });
    // Kill A once writing is well under way: it is holding a batch.
    let partial = wait_for_returns(&db, 300, Duration::from_secs(60)).await;
    assert!(partial.0 > 0, "workers never wrote anything");
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let killed_at = stored_returns(&db).0;
    pusher.await.expect("pusher");
    let (rows, distinct) = wait_for_returns(&db, N as u64, Duration::from_secs(240)).await;
    stop(&mut b);
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default();
    cleanup(broker, &prefix, &["default"]).await;
    eprintln!(
        "{broker:?}: killed one worker at {killed_at}/{N} stored; survivor ended with {rows}"
    );
    assert_eq!(
        (rows, distinct),
        (N as u64, N as u64),
        "every return stored exactly once (killed at {killed_at}); survivor log:\n{log}"
    );
    assert!(
        killed_at < N as u64,
        "the kill came before the end ({killed_at})"
    );
}

/// The listener's queue side for queue `default`, as `listen` starts it.
async fn start_listener(q: &QueueConfig) -> (Arc<dyn Producer>, forward::Forwarder, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let (producer, forwarder) = forward::start(
        q,
        vec!["default".into()],
        Some(Duration::from_secs(60)),
        stats.clone(),
    )
    .await
    .expect("start the listener's queue side");
    (producer, forwarder, stats)
}

async fn broker_outage_loses_nothing(broker: Broker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique_prefix();
    let db = dir.path().join("salt.db");
    let proxy = Proxy::start(broker.addr()).await;
    let via = broker.url_via(&proxy.addr);
    let q = queue_config(&via, &prefix, &dir.path().join("spool"));
    let cfg = write_config(dir.path(), "work.toml", &q, &db, "");
    let mut worker = spawn_saltpipe("work", &cfg, &dir.path().join("work.log"));
    // The listening side in this process: direct publishing, spool and
    // forwarder, as `listen` runs them.
    let (spool, forwarder, stats) = start_listener(&q).await;
    let total = 4000;
    let mut during_outage = 0;
    for step in 0..40 {
        let batch: Vec<_> = (step * 100..(step + 1) * 100).map(return_message).collect();
        // Direct to the broker while it is up, else the spool: a push never
        // waits on the broker for more than DIRECT_TIMEOUT.
        tokio::time::timeout(Duration::from_secs(2), spool.push(&batch))
            .await
            .expect("the listener never waits long on the broker")
            .expect("spool push");
        if step == 10 {
            proxy.cut();
        }
        if step == 30 {
            during_outage = stored_returns(&db).0;
            proxy.restore();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    forwarder.finish().await.expect("forwarder drained");
    let spooled = stats.spooled.load(Relaxed);
    let (rows, distinct) = wait_for_returns(&db, total as u64, Duration::from_secs(240)).await;
    stop(&mut worker);
    let log = std::fs::read_to_string(dir.path().join("work.log")).unwrap_or_default();
    drop(proxy);
    eprintln!(
        "{broker:?}: {during_outage} stored when the broker came back; reconnections logged: {}",
        log.matches("reconnected").count()
    );
    cleanup(broker, &prefix, &["default"]).await;
    // Cut after 1,100 pushes: nothing pushed later can be stored before the restore.
    assert!(
        during_outage <= 1100,
        "the outage held events back ({during_outage})"
    );
    assert_eq!(
        (rows, distinct),
        (total as u64, total as u64),
        "nothing lost, nothing doubled; worker log:\n{log}"
    );
    // The 2,000 pushed during the cut can only have gone to the spool; the
    // 1,100 before it went straight to the broker once it was connected
    // (it connects in the background, so the first pushes may be spooled).
    assert!(
        (2000..total as u64).contains(&spooled),
        "spooled {spooled} of {total}"
    );
}

async fn spool_backlog_goes_before_direct_publishing(broker: Broker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique_prefix();
    let q = queue_config(&broker.url(), &prefix, &dir.path().join("spool"));
    let left = 300;
    let total = 1300;
    {
        // A previous listener stopped with the broker away.
        let spool = Embedded::open(&q.spool, q.sync).await.expect("spool");
        let batch: Vec<_> = (0..left).map(return_message).collect();
        spool.push(&batch).await.expect("spool push");
    }
    let mut consumer = q.consumer_with("default", 2000).await.expect("consumer");
    let (producer, forwarder, stats) = start_listener(&q).await;
    for step in 0..10 {
        let from = left + step * 100;
        let batch: Vec<_> = (from..from + 100).map(return_message).collect();
        producer.push(&batch).await.expect("push");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    forwarder.finish().await.expect("forwarder drained");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < total && tokio::time::Instant::now() < deadline {
        let got = consumer
            .pull(2000, 64 << 20, Duration::from_secs(1))
            .await
            .expect("pull");
        consumer
            .ack(&got.iter().map(|d| d.id).collect::<Vec<_>>())
            .await
            .expect("ack");
        seen.extend(got.into_iter().map(|d| d.received_ms));
    }
    cleanup(broker, &prefix, &["default"]).await;
    let spooled = stats.spooled.load(Relaxed);
    // `received_ms` is the message's number: the broker got 0..1300 in order.
    assert_eq!(
        seen,
        (0..total as i64).collect::<Vec<_>>(),
        "spooled {spooled}"
    );
    // While the old backlog waited, new events went behind it in the spool;
    // once it was forwarded, the rest went straight to the broker.
    assert!(spooled < (total - left) as u64, "spooled {spooled}");
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_spool_backlog_goes_before_direct_publishing() {
    spool_backlog_goes_before_direct_publishing(Broker::Redis).await
}
#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_spool_backlog_goes_before_direct_publishing() {
    spool_backlog_goes_before_direct_publishing(Broker::Amqp).await
}
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_spool_backlog_goes_before_direct_publishing() {
    spool_backlog_goes_before_direct_publishing(Broker::Nats).await
}
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigkill_one_of_two_workers() {
    sigkill_one_of_two_workers(Broker::Redis).await
}
#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_sigkill_one_of_two_workers() {
    sigkill_one_of_two_workers(Broker::Amqp).await
}
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sigkill_one_of_two_workers() {
    sigkill_one_of_two_workers(Broker::Nats).await
}
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_loses_nothing() {
    broker_outage_loses_nothing(Broker::Redis).await
}
#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_outage_loses_nothing() {
    broker_outage_loses_nothing(Broker::Amqp).await
}
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_loses_nothing() {
    broker_outage_loses_nothing(Broker::Nats).await
}
