//! Decode + rules on one core: framing, tag split, typed view, rule decision.
//! Target (issue 2): at least 1,000,000 events/s. Run: `cargo bench --bench ingest`.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use saltpipe::bus::framing::{Framed, Framer};
use saltpipe::event::Event;
use saltpipe::rules::{Decision, Rules, RulesConfig};
use std::hint::black_box;

mod common;

/// 10,000 return frames of about 1 KB, as `saltpipe-gen` writes them.
fn stream() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..10_000u32 {
        let jid = format!("2026112512{:010}", i / 100);
        let minion = format!("minion-{:05}", i % 100);
        out.extend(saltpipe::bus::encode::frame(
            &format!("salt/job/{jid}/ret/{minion}"),
            &common::small_return(&jid, &minion),
        ));
    }
    out
}

fn bench(c: &mut Criterion) {
    let data = stream();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(10_000));
    // One rule set for the whole run, as in the daemon: after the first
    // pass every return is a duplicate, which costs the same lookup.
    let mut rules = Rules::new(&RulesConfig::default());
    g.bench_function("frame+decode+rules (10k returns, 1 KB)", |b| {
        b.iter(|| {
            let mut f = Framer::new(1 << 20);
            f.buffer_mut().extend_from_slice(&data);
            let mut decided = 0u32;
            while let Some(item) = f.next_frame() {
                if let Framed::Frame(frame) = item
                    && let Ok(e) = Event::from_frame(black_box(&frame))
                {
                    black_box(matches!(rules.decide(&e), Decision::Keep { .. }));
                    decided += 1;
                }
            }
            assert_eq!(decided, 10_000);
        })
    });
    g.bench_function("frame only", |b| {
        b.iter(|| {
            let mut f = Framer::new(1 << 20);
            f.buffer_mut().extend_from_slice(&data);
            let mut n = 0u32;
            while let Some(Framed::Frame(frame)) = f.next_frame() {
                black_box(Bytes::clone(&frame));
                n += 1;
            }
            assert_eq!(n, 10_000);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
