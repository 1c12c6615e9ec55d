//! The SQL sinks alone: returns/s of `Sink::write` on the real local
//! servers, batches of the worker's default size, no queue in front, so
//! the figure is the sink's own (the end-to-end figure is
//! scripts/bench-sql-sinks.sh). A fresh database per backend, dropped after.
//!
//!   cargo bench --bench sql_sinks                 # 200,000 returns of ~1 KiB
//!   cargo bench --bench sql_sinks -- 500000 2000 100  # returns, batch size, return bytes
//!
//!   BENCH_ONLY=postgres cargo bench --bench sql_sinks  # one backend (mariadb, postgres, sqlite)
//!   BENCH_VARY=1 cargo bench --bench sql_sinks   # batch sizes vary (batch/2..=batch), like the worker's
//!   BENCH_WRITERS=2 cargo bench --bench sql_sinks   # two batches written at once
//!   BENCH_PREPARED=1 cargo bench --bench sql_sinks  # rows converted before the clock starts:
//!                                                   # the database's write alone (the worker's write stage)
//!   BENCH_STREAM=stream.bin cargo bench --bench sql_sinks  # instead of generated returns, the
//!       # events a `saltpipe-gen` stream keeps under the default rules, in stream order: the
//!       # same rows `saltpipe replay` of that stream writes (jobs and their targets too), so
//!       # with BENCH_PREPARED=1 this is the like-for-like write ceiling of
//!       # scripts/bench-sql-sinks.sh (the returns count is the stream's)
//!
//! Needs MariaDB on 127.0.0.1:3306 (root) and PostgreSQL on 127.0.0.1:5432 (trust).

use bytes::Bytes;
use futures_util::StreamExt;
use saltpipe::bus::encode::frame;
use saltpipe::event::Event;
use saltpipe::sink::{Record, Sink, SinkConfig, SinkUrl};
use std::sync::Arc;
use std::time::Instant;

fn ret(jid: &str, minion: &str, payload: &str) -> Record {
    let mut d = Vec::new();
    let s = |d: &mut Vec<u8>, k: &str, v: &str| {
        rmp::encode::write_str(d, k).expect("w");
        rmp::encode::write_str(d, v).expect("w");
    };
    rmp::encode::write_map_len(&mut d, 10).expect("w");
    s(&mut d, "cmd", "_return");
    s(&mut d, "id", minion);
    s(&mut d, "jid", jid);
    s(&mut d, "fun", "cmd.run");
    rmp::encode::write_str(&mut d, "fun_args").expect("w");
    rmp::encode::write_array_len(&mut d, 1).expect("w");
    rmp::encode::write_str(&mut d, "uptime").expect("w");
    s(&mut d, "return", payload);
    rmp::encode::write_str(&mut d, "retcode").expect("w");
    rmp::encode::write_uint(&mut d, 0).expect("w");
    rmp::encode::write_str(&mut d, "success").expect("w");
    rmp::encode::write_bool(&mut d, true).expect("w");
    s(&mut d, "user", "root");
    s(&mut d, "_stamp", "2026-11-25T12:00:00.123456+00:00");
    Record::new(
        Event::from_frame(&Bytes::from(frame(
            &format!("salt/job/{jid}/ret/{minion}"),
            &d,
        )))
        .expect("decode"),
        0,
    )
}

/// The events of a `saltpipe-gen` stream that the default rules keep, in
/// stream order, as the worker gets them from the queue.
fn stream_records(path: &str) -> Vec<Record> {
    use saltpipe::bus::framing::{Framed, Framer};
    use saltpipe::rules::{Decision, Rules, RulesConfig};
    let data = std::fs::read(path).expect("BENCH_STREAM: read the stream");
    let mut framer = Framer::new(64 << 20);
    framer.buffer_mut().extend_from_slice(&data);
    let mut rules = Rules::new(&RulesConfig::default());
    let mut records = Vec::new();
    while let Some(item) = framer.next_frame() {
        if let Framed::Frame(f) = item
            && let Ok(e) = Event::from_frame(&f)
            && matches!(rules.decide(&e), Decision::Keep { .. })
        {
            records.push(Record::new(e, 0));
        }
    }
    records
}

fn cmd(program: &str, args: &[&str]) {
    let ok = std::process::Command::new(program)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{program} {args:?}");
}

async fn measure(name: &str, sink: Arc<dyn Sink>, records: &[Record], batch: usize, size: usize) {
    // BENCH_PREPARED=1: convert to rows first (the worker does that while
    // the previous batch is written), so only the write is timed.
    let prepared;
    let records = if std::env::var("BENCH_PREPARED").is_ok_and(|v| v == "1") {
        let mut r = records.to_vec();
        sink.prepare(&mut r, None);
        prepared = r;
        &prepared[..]
    } else {
        records
    };
    let started = Instant::now();
    // BENCH_VARY=1: batches of varying size (batch/2..=batch), as the
    // worker's are when returns, jobs and other events mix.
    let vary = std::env::var("BENCH_VARY").is_ok_and(|v| v == "1");
    let mut chunks = Vec::new();
    let mut rest = records;
    while !rest.is_empty() {
        let n = if vary {
            rand::random_range(batch / 2..=batch).max(1)
        } else {
            batch
        };
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        chunks.push(chunk);
    }
    // BENCH_WRITERS=n: n batches written at once, as a worker does with
    // `sink.writers` (default 1 here: the sink's own serial rate).
    let writers = std::env::var("BENCH_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    let transactions = chunks.len();
    let returns: u64 = futures_util::stream::iter(chunks)
        .map(|chunk| {
            let sink = sink.clone();
            async move { sink.write(chunk).await.expect("write").returns }
        })
        .buffer_unordered(writers.max(1))
        .fold(0u64, |a, n| async move { a + n })
        .await;
    // Closed inside the clock, as a replay's time includes it: SQLite's
    // sink checkpoints what is left in its WAL as it closes.
    drop(sink);
    let s = started.elapsed().as_secs_f64();
    let expected = records
        .iter()
        .filter(|r| r.event.kind == saltpipe::event::Kind::JobReturn)
        .count();
    assert_eq!(
        returns as usize, expected,
        "{name}: every return written once"
    );
    println!(
        "| {name} | {returns} | {size} | {batch} | {s:.2} | {:.0} | {:.1} |",
        returns as f64 / s,
        transactions as f64 * 10_000.0 / returns.max(1) as f64
    );
}

fn config(url: &str) -> SinkConfig {
    SinkConfig {
        url: SinkUrl::parse(url).expect("url"),
        master_id: Some("bench".into()),
        ..SinkConfig::default()
    }
}

#[tokio::main]
async fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<usize> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not: then
    // run once, small, to check it works.
    let test_mode = !raw.iter().any(|a| a == "--bench");
    let count = args
        .first()
        .copied()
        .unwrap_or(if test_mode { 3000 } else { 200_000 });
    let batch = args.get(1).copied().unwrap_or(2000);
    let payload = "x".repeat(args.get(2).copied().unwrap_or(800));
    let stream = std::env::var("BENCH_STREAM").ok();
    let records: Vec<Record> = match &stream {
        Some(path) => stream_records(path),
        None => (0..count)
            .map(|i| {
                ret(
                    &format!("2026112512{:010}", i / 100),
                    &format!("minion-{:05}", i % 100),
                    &payload,
                )
            })
            .collect(),
    };
    let db = format!("saltpipe_bench_{:012x}", rand::random::<u64>() >> 16);
    println!(
        "| sink | returns | return bytes | batch | seconds | returns/s | transactions per 10,000 returns |"
    );
    println!("|---|---|---|---|---|---|---|");
    // BENCH_ONLY=mariadb|postgres|sqlite: one backend, e.g. under a profiler.
    let only = std::env::var("BENCH_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    #[cfg(feature = "mysql")]
    if run("mariadb") {
        cmd(
            "mysql",
            &[
                "-h127.0.0.1",
                "-uroot",
                "-e",
                &format!("CREATE DATABASE {db}"),
            ],
        );
        let sink = config(&format!("mysql://root@127.0.0.1:3306/{db}"))
            .build()
            .await
            .expect("mariadb");
        measure("mariadb", sink, &records, batch, payload.len()).await;
        cmd(
            "mysql",
            &[
                "-h127.0.0.1",
                "-uroot",
                "-e",
                &format!("DROP DATABASE {db}"),
            ],
        );
    }
    #[cfg(feature = "postgres")]
    if run("postgres") {
        let pg = |sql: String| {
            cmd(
                "psql",
                &[
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "test",
                    "-qc",
                    &sql,
                ],
            )
        };
        // BENCH_PG_URL: an existing database of yours instead of a fresh one.
        let own = std::env::var("BENCH_PG_URL").ok();
        if own.is_none() {
            pg(format!("CREATE DATABASE {db}"));
        }
        let url = own
            .clone()
            .unwrap_or_else(|| format!("postgres://postgres@127.0.0.1:5432/{db}"));
        let sink = config(&url).build().await.expect("postgres");
        measure("postgres", sink, &records, batch, payload.len()).await;
        if own.is_none() {
            pg(format!("DROP DATABASE {db} WITH (FORCE)"));
        }
    }
    if !run("sqlite") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = config(&format!("sqlite://{}/salt.db", dir.path().display()))
        .build()
        .await
        .expect("sqlite");
    measure("sqlite", sink, &records, batch, payload.len()).await;
}
