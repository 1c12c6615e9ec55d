//! What `[sink] redact` adds per event: the walk that looks for secret keys
//! (nothing found, the usual case) next to the msgpack -> JSON transcode the
//! sink does anyway. Run: `cargo bench --bench redact`; figures in
//! docs/BENCHMARKS.md ("[sink] redact").

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use saltpipe::redact::{DEFAULT_KEYS, KeyRedactor};
use std::hint::black_box;

mod common;

/// The data map of a ~1 KB `cmd.run` return, as `saltpipe-gen` writes it.
fn small_return() -> Vec<u8> {
    common::small_return("20261125120000000001", "minion-00001")
}

/// A `state.apply` return with 50 states, each a map of 9 keys with a
/// nested `changes`: many small keys, the walk's worst ordinary case.
fn state_return() -> Vec<u8> {
    let mut states = serde_json::Map::new();
    for i in 0..50 {
        states.insert(
            format!("file_|-conf-{i}_|-/etc/app/{i}.conf_|-managed"),
            serde_json::json!({
                "name": format!("/etc/app/{i}.conf"), "result": true,
                "changes": {"diff": "--- \n+++ \n@@ -1 +1 @@\n-a\n+b\n", "mode": "0644"},
                "comment": "File /etc/app/x.conf updated", "__run_num__": i,
                "start_time": "12:00:00.000000", "duration": 1.25,
                "__id__": format!("conf-{i}"), "__sls__": "app",
            }),
        );
    }
    let data = serde_json::json!({
        "cmd": "_return", "id": "minion-00001", "jid": "20261125120000000001",
        "fun": "state.apply", "fun_args": ["app"], "return": states,
        "retcode": 0, "success": true, "out": "highstate",
    });
    rmp_serde::to_vec_named(&data).expect("msgpack")
}

fn bench(c: &mut Criterion) {
    let r = KeyRedactor::new(DEFAULT_KEYS);
    for (name, data) in [
        ("1 KB cmd.run return", small_return()),
        ("state.apply return, 50 states", state_return()),
    ] {
        let mut g = c.benchmark_group(format!("redact/{name} ({} B)", data.len()));
        g.throughput(Throughput::Elements(1));
        g.bench_function("walk, nothing to hide", |b| {
            b.iter(|| black_box(r.redact_msgpack(black_box(&data)).expect("walk")))
        });
        g.bench_function("transcode to JSON (the sink's own work)", |b| {
            b.iter(|| {
                black_box(saltpipe::msgpack::to_json(black_box(&data), usize::MAX).expect("json"))
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
