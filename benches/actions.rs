//! What actions cost the worker: `ActionSet::offer` for one batch of 2000
//! return events, the only action work done on the write path.
//!
//!     cargo bench --bench actions
//!
//! Cases: no action configured; an action whose `when` matches nothing (the
//! common case: most events are not failures); an action matching every
//! event (each one's template context built from its msgpack data and
//! handed to the dispatcher). The dispatcher runs an `exec` of `true` under
//! a rate limit of 1 per hour, so after the first event it only counts.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use saltpipe::action::{ActionConfig, Actions};
use saltpipe::event::Event;
use saltpipe::stats::Stats;
use std::hint::black_box;
use std::sync::Arc;

const BATCH: usize = 2000;

fn return_event(i: usize) -> Event {
    let mut d = Vec::new();
    let w = &mut d;
    rmp::encode::write_map_len(w, 9).expect("map");
    for (k, v) in [
        ("id", format!("minion-{}", i % 50)),
        ("fun", "state.apply".to_owned()),
        ("jid", format!("2026112512{:010}", i)),
        ("_stamp", "2026-11-25T12:49:27.280803+00:00".to_owned()),
        ("return", "x".repeat(600)),
    ] {
        rmp::encode::write_str(w, k).expect("k");
        rmp::encode::write_str(w, &v).expect("v");
    }
    rmp::encode::write_str(w, "retcode").expect("k");
    rmp::encode::write_sint(w, 0).expect("v");
    rmp::encode::write_str(w, "success").expect("k");
    rmp::encode::write_bool(w, true).expect("v");
    rmp::encode::write_str(w, "fun_args").expect("k");
    rmp::encode::write_array_len(w, 1).expect("v");
    rmp::encode::write_str(w, "failing").expect("v");
    rmp::encode::write_str(w, "user").expect("k");
    rmp::encode::write_str(w, "root").expect("v");
    let tag = format!("salt/job/2026112512{:010}/ret/minion-{}", i, i % 50);
    let mut body = tag.into_bytes();
    body.extend_from_slice(b"\n\n");
    body.extend_from_slice(&d);
    Event::from_body(body.into()).expect("event")
}

fn actions(toml: &str) -> Vec<ActionConfig> {
    #[derive(serde::Deserialize)]
    struct T {
        actions: Vec<ActionConfig>,
    }
    toml::from_str::<T>(toml).expect("actions").actions
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let events: Vec<Event> = (0..BATCH).map(return_event).collect();
    let stats = Arc::new(Stats::default());
    let exec = "exec = { command = [\"true\"] }\nrate_limit = 1\nrate_window = \"1h\"\nqueue_size = 100000\n";
    let none = Actions::start(&[], &stats).expect("none");
    let miss = Actions::start(
        &actions(&format!(
            "[[actions]]\nname = \"miss\"\nwhen = {{ success = false }}\n{exec}"
        )),
        &stats,
    )
    .expect("miss");
    let hit = Actions::start(
        &actions(&format!(
            "[[actions]]\nname = \"hit\"\nwhen = {{ fun = \"state.*\" }}\n{exec}"
        )),
        &stats,
    )
    .expect("hit");
    let mut g = c.benchmark_group("offer_batch_2000");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("no_actions", |b| {
        b.iter(|| none.current().offer(black_box(&events)))
    });
    g.bench_function("action_matching_none", |b| {
        b.iter(|| miss.current().offer(black_box(&events)))
    });
    g.bench_function("action_matching_all", |b| {
        b.iter(|| hit.current().offer(black_box(&events)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
