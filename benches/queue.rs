//! The embedded queue's write path alone, beside its physical ceiling: MB/s
//! of `Producer::push` of events of one size in the listener's batches
//! (8 MiB or 4,096 events, its largest transaction), and of the same bytes
//! appended to a plain file with one gathered `write(2)` per batch (one
//! copy into the page cache, nothing else: the least any durable queue on
//! this disk can cost). Both run alternately, a fresh directory each round, so
//! the ratio is measured in one run (docs/BENCHMARKS.md, docs/SCALE.md).
//!
//!   cargo bench --bench queue                    # 100 KiB events, 512 MiB a round, 3 rounds
//!   cargo bench --bench queue -- 1024 256 5      # event bytes, MiB a round, rounds
//!
//! The CPU column is the process's user+system seconds over the round
//! (getrusage), which for the queue includes its checkpoint thread.

use bytes::Bytes;
use saltpipe::pipeline::{WRITE_BATCH, WRITE_BYTES};
use saltpipe::queue::embedded::Embedded;
use saltpipe::queue::{Message, Producer, SyncMode};
use std::io::{IoSlice, Write};
use std::sync::Arc;
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

/// Event bodies of `size` bytes: a return tag and msgpack-ish filler that
/// varies per event (so nothing below could dedupe it).
fn batches(size: usize, total: usize) -> Vec<Vec<Message>> {
    let count = total / size.max(1);
    // The queue writer's largest transaction.
    let per = (WRITE_BYTES / size.max(1)).clamp(1, WRITE_BATCH);
    let queue: Arc<str> = Arc::from("default");
    (0..count)
        .map(|i| {
            let mut body =
                format!("salt/job/20261203{i:012}/ret/minion-{:05}\n\n", i % 10_000).into_bytes();
            let seed = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            body.extend(
                (0..size.saturating_sub(body.len()))
                    .map(|k| (seed.rotate_left((k % 64) as u32) as u8) ^ (k as u8)),
            );
            Message {
                queue: queue.clone(),
                key: format!("minion-{:05}", i % 10_000),
                body: Bytes::from(body),
                received_ms: i as i64,
            }
        })
        .collect::<Vec<_>>()
        .chunks(per)
        .map(<[Message]>::to_vec)
        .collect()
}

struct Round {
    seconds: f64,
    cpu: f64,
}

async fn queue_round(data: &[Vec<Message>]) -> Round {
    let dir = tempfile::tempdir_in(".").expect("tempdir");
    let q = Embedded::open(dir.path(), SyncMode::Normal)
        .await
        .expect("open");
    let (t, c) = (Instant::now(), cpu_seconds());
    for b in data {
        q.push(b).await.expect("push");
    }
    let r = Round {
        seconds: t.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - c,
    };
    drop(q);
    r
}

fn file_round(data: &[Vec<Message>]) -> Round {
    let dir = tempfile::tempdir_in(".").expect("tempdir");
    let mut f = std::fs::File::create(dir.path().join("append")).expect("create");
    let (t, c) = (Instant::now(), cpu_seconds());
    for b in data {
        // One gathered write per transaction: the one copy, and the fewest
        // system calls.
        let mut slices: Vec<IoSlice<'_>> = b.iter().map(|m| IoSlice::new(&m.body)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = f.write_vectored(rest).expect("write");
            IoSlice::advance_slices(&mut rest, n);
        }
    }
    Round {
        seconds: t.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - c,
    }
}

#[tokio::main]
async fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<usize> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not: then
    // run once, small, to check it works.
    let test_mode = !raw.iter().any(|a| a == "--bench");
    let size = args.first().copied().unwrap_or(100 << 10);
    let mib = args
        .get(1)
        .copied()
        .unwrap_or(if test_mode { 8 } else { 512 });
    let rounds = args
        .get(2)
        .copied()
        .unwrap_or(if test_mode { 1 } else { 3 });
    let data = batches(size, mib << 20);
    let bytes: usize = data.iter().flatten().map(|m| m.body.len()).sum();
    let mb = bytes as f64 / 1e6;
    println!("| round | path | event bytes | MB | seconds | MB/s | CPU s per 100 MB |");
    println!("|---|---|---|---|---|---|---|");
    let row = |round: usize, path: &str, r: &Round| {
        println!(
            "| {round} | {path} | {size} | {mb:.0} | {:.2} | {:.0} | {:.3} |",
            r.seconds,
            mb / r.seconds,
            r.cpu / mb * 100.0
        )
    };
    for round in 1..=rounds {
        row(round, "embedded queue push", &queue_round(&data).await);
        row(round, "write(2) to a file (ceiling)", &file_round(&data));
    }
}
