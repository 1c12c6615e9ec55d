//! What judging a return's outcome costs, beside the rest of the worker's
//! prepare stage (the msgpack to JSON transcode of `rows_of`, which now
//! includes the outcome). Run: `cargo bench --bench outcome`.
//!
//! The `prepare per MB` group is issue 16's CPU per MB of large returns in
//! the worker, in MB/s of event body: the whole prepare stage of one
//! 1,000-state highstate return (decode, `[sink] redact`'s default keys,
//! rows), beside the msgpack to JSON transcode alone, which no writer of
//! Salt's returner schema can skip (`return` and `full_ret` are JSON text):
//! its floor. `cargo bench --bench outcome -- 'prepare per MB'`.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use saltpipe::bus::framing::{Framed, Framer};
use saltpipe::event::{Event, Kind};
use saltpipe::sink::Record;
use saltpipe::sink::rows::{self, BoolStyle, RowFormat, rows_of};
use std::hint::black_box;

mod common;

fn event(tag: &str, data: &[u8]) -> Event {
    Event::from_frame(&Bytes::from(saltpipe::bus::encode::frame(tag, data))).expect("event")
}

/// A 1 KB `cmd.run` return, as `saltpipe-gen` writes them.
fn plain() -> Event {
    event(
        "salt/job/20261125120000000001/ret/minion-00001",
        &common::small_return("20261125120000000001", "minion-00001"),
    )
}

/// A highstate of `n` states shaped like Salt's (file.managed results).
fn highstate(n: u32) -> Event {
    let mut d = Vec::new();
    let _ = rmp::encode::write_map_len(&mut d, 7);
    for (k, v) in [
        ("id", "minion-00001"),
        ("jid", "20261125120000000002"),
        ("fun", "state.apply"),
        ("_stamp", "2026-11-25T12:00:00.123456+00:00"),
    ] {
        let _ = rmp::encode::write_str(&mut d, k);
        let _ = rmp::encode::write_str(&mut d, v);
    }
    let _ = rmp::encode::write_str(&mut d, "retcode");
    let _ = rmp::encode::write_uint(&mut d, 0);
    let _ = rmp::encode::write_str(&mut d, "success");
    let _ = rmp::encode::write_bool(&mut d, true);
    let _ = rmp::encode::write_str(&mut d, "return");
    let _ = rmp::encode::write_map_len(&mut d, n);
    for i in 0..n {
        let _ = rmp::encode::write_str(
            &mut d,
            &format!("file_|-conf{i}_|-/etc/app/conf{i}_|-managed"),
        );
        let _ = rmp::encode::write_map_len(&mut d, 8);
        for (k, v) in [
            ("name", format!("/etc/app/conf{i}")),
            (
                "comment",
                "File /etc/app/conf is in the correct state".to_owned(),
            ),
            ("__sls__", "app".to_owned()),
            ("__id__", format!("conf{i}")),
            ("start_time", "12:00:00.123456".to_owned()),
        ] {
            let _ = rmp::encode::write_str(&mut d, k);
            let _ = rmp::encode::write_str(&mut d, &v);
        }
        let _ = rmp::encode::write_str(&mut d, "result");
        let _ = rmp::encode::write_bool(&mut d, true);
        let _ = rmp::encode::write_str(&mut d, "changes");
        let _ = rmp::encode::write_map_len(&mut d, 0);
        let _ = rmp::encode::write_str(&mut d, "duration");
        let _ = rmp::encode::write_f64(&mut d, 1.234);
    }
    event("salt/job/20261125120000000002/ret/minion-00001", &d)
}

/// The real `state.apply failing` return of the Salt 3008.5 capture.
fn real_state_return() -> Event {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/salt-3008.5-bus.bin"
    ))
    .expect("fixture");
    let mut f = Framer::new(1 << 20);
    f.buffer_mut().extend_from_slice(&bytes);
    while let Some(item) = f.next_frame() {
        if let Framed::Frame(frame) = item
            && let Ok(e) = Event::from_frame(&frame)
            && e.kind == Kind::JobReturn
            && e.fields.fun == ["state.apply"]
        {
            return e;
        }
    }
    panic!("no state.apply return in the fixture")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("outcome");
    g.throughput(Throughput::Elements(1));
    for (name, e) in [
        ("cmd.run 1 KB", plain()),
        ("real state.apply (3 states)", real_state_return()),
        ("highstate 100 states", highstate(100)),
    ] {
        g.bench_function(format!("of_return {name}"), |b| {
            b.iter(|| black_box(saltpipe::outcome::of_return(black_box(e.data()))))
        });
        let r = Record::new(e.clone(), 0);
        g.bench_function(format!("rows_of {name}"), |b| {
            b.iter(|| {
                black_box(rows_of(
                    black_box(&r),
                    RowFormat::unlimited(BoolStyle::Digit),
                ))
            })
        });
    }
    g.finish();

    let e = highstate(1000);
    let body = e.body.clone();
    let mut g = c.benchmark_group("prepare per MB");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("transcode alone (the floor)", |b| {
        b.iter(|| {
            black_box(saltpipe::msgpack::to_json_with_field(
                black_box(e.data()),
                "return",
                usize::MAX,
                None,
                None,
            ))
        })
    });
    let redact = saltpipe::redact::KeyRedactor::new(saltpipe::redact::DEFAULT_KEYS);
    g.bench_function("decode + redact + rows (the worker's prepare)", |b| {
        b.iter(|| {
            // As the worker's prepare stage does it: the rows are converted
            // with the keys checked; a record left unconverted would be
            // redacted and converted again (this one holds no secret).
            let e = Event::from_body(black_box(body.clone())).expect("event");
            let mut batch = [Record::new(e, 0)];
            rows::prepare(
                &mut batch,
                RowFormat::unlimited(BoolStyle::Digit),
                Some(&redact),
            );
            assert!(batch[0].rows.is_some());
            black_box(batch)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
