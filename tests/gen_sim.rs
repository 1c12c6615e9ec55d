//! `saltpipe-gen sim` writes what its summary says it wrote: the fleet
//! benchmark (scripts/bench-fleet.sh) counts lost and doubled rows against
//! that summary, so it must be exact. No master here: the stream goes to a
//! file, is read back frame by frame, then replayed through saltpipe into
//! SQLite, whose rows must be the summary's expected jids and returns.

mod common;

use saltpipe::bus::framing::{Framed, Framer};
use saltpipe::event::{Event, Kind};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;

fn sim(dir: &std::path::Path, extra: &[&str]) -> (std::path::PathBuf, serde_json::Value) {
    let out = dir.join("stream.bin");
    let summary = dir.join("summary.json");
    common::output_ok(
        Command::new(env!("CARGO_BIN_EXE_saltpipe-gen"))
            .args(["sim", "--out"])
            .arg(&out)
            .arg("--summary")
            .arg(&summary)
            .args(extra),
        "saltpipe-gen sim",
    );
    let s = serde_json::from_str(&std::fs::read_to_string(&summary).expect("summary"))
        .expect("summary is JSON");
    (out, s)
}

fn events(path: &std::path::Path) -> Vec<Event> {
    let mut f = Framer::new(64 << 20);
    f.buffer_mut()
        .extend_from_slice(&std::fs::read(path).expect("stream"));
    f.end_of_stream();
    let mut out = Vec::new();
    while let Some(x) = f.next_frame() {
        match x {
            Framed::Frame(b) => out.push(Event::from_frame(&b).expect("decodes")),
            other => panic!("not a clean stream: {other:?}"),
        }
    }
    out
}

fn n(s: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(s, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// The state results of a highstate return: (how many, how many failed).
fn states(e: &Event) -> (usize, usize) {
    let ret: serde_json::Value =
        rmp_serde::from_slice(e.field_raw("return").expect("return")).expect("msgpack");
    let map = ret.as_object().expect("a state run is a map");
    let failed = map.values().filter(|s| s["result"] == false).count();
    (map.len(), failed)
}

#[test]
fn mixed_stream_matches_its_summary_and_replays_to_the_expected_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1,500 minions: enough for a find_job poll (every 1,000 returns of a job).
    let (stream, s) = sim(
        dir.path(),
        &[
            "--scenario",
            "mixed",
            "--minions",
            "1500",
            "--min-size",
            "2KiB",
            "--max-size",
            "16KiB",
            "--seed",
            "7",
        ],
    );
    let evs = events(&stream);
    assert_eq!(evs.len() as u64, n(&s, &["events"]));
    assert_eq!(
        std::fs::metadata(&stream).expect("stream").len(),
        n(&s, &["bytes"])
    );

    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    let mut announced: HashMap<String, HashSet<String>> = HashMap::new();
    let mut returned: HashSet<(String, String)> = HashSet::new();
    let (mut fail_false, mut fail_true, mut state_runs) = (0, 0, 0);
    for e in &evs {
        let find_job = e
            .fields
            .fun
            .first()
            .is_some_and(|f| f == "saltutil.find_job");
        let kind = match (e.kind, find_job) {
            (Kind::JobNew, false) => "job_new",
            (Kind::JobNew, true) => "find_job_new",
            (Kind::JobPublish, false) => "job_publish",
            (Kind::JobPublish, true) => "find_job_publish",
            (Kind::JobReturn, false) => "job_return",
            (Kind::JobReturn, true) => "find_job_return",
            (Kind::Auth, _) => "auth",
            (Kind::MinionStart, _) => "minion_start",
            (Kind::Presence, _) => "presence",
            (k, _) => panic!("unexpected kind {k:?}: {}", e.tag()),
        };
        *by_kind.entry(kind).or_default() += 1;
        let jid = || e.fields.jid.clone().expect("job events carry a jid");
        match kind {
            "job_new" => {
                let minions: Vec<String> =
                    rmp_serde::from_slice(e.field_raw("minions").expect("minions"))
                        .expect("a list");
                announced.insert(jid(), minions.into_iter().collect());
            }
            "job_return" => {
                let (jid, minion) = (jid(), e.fields.minion.clone().expect("id"));
                assert!(
                    announced.get(&jid).is_some_and(|m| m.contains(&minion)),
                    "a return from {minion} for {jid}, which was not announced to it"
                );
                assert!(returned.insert((jid, minion)), "a doubled return");
                if e.fields.fun[0] == "state.apply" {
                    state_runs += 1;
                    let (count, failed) = states(e);
                    assert!(count > 0);
                    match (failed > 0, e.fields.success) {
                        (true, Some(false)) => fail_false += 1,
                        (true, Some(true)) => fail_true += 1,
                        (false, Some(true)) => {}
                        other => panic!("a state run with {other:?}"),
                    }
                }
            }
            _ => {}
        }
    }
    let want: BTreeMap<&str, u64> = s["events_by_kind"]
        .as_object()
        .expect("events_by_kind")
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(by_kind, want);
    for k in [
        "find_job_new",
        "find_job_return",
        "auth",
        "minion_start",
        "presence",
    ] {
        assert!(
            by_kind.get(k).copied().unwrap_or(0) > 0,
            "no {k} in the mix"
        );
    }
    assert_eq!(announced.len() as u64, n(&s, &["expected_jids"]));
    assert_eq!(returned.len() as u64, n(&s, &["expected_returns"]));
    let targeted: usize = announced.values().map(HashSet::len).sum();
    assert_eq!(
        (targeted - returned.len()) as u64,
        n(&s, &["no_answer"]),
        "targeted minions that never answered"
    );
    assert!(n(&s, &["no_answer"]) > 0);
    assert_eq!(state_runs, n(&s, &["returns_by_fun", "state.apply"]));
    assert_eq!(fail_false, n(&s, &["failed_success_false"]));
    assert_eq!(fail_true, n(&s, &["failed_success_true"]));
    assert!(fail_false > 0 && fail_true > 0);

    // Through saltpipe's default rules into SQLite: every announced job and
    // every return, nothing of the noise.
    let db = dir.path().join("salt.db");
    let run = Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["replay", "--json"])
        .arg(&stream)
        .env_remove("SALTPIPE_CONFIG")
        .env(
            "SALTPIPE_QUEUE_URL",
            format!("embedded://{}", dir.path().join("queue").display()),
        )
        .env("SALTPIPE_SINK_URL", format!("sqlite://{}", db.display()))
        .env("SALTPIPE_BACKFILL_ENABLED", "false")
        .env("SALTPIPE_METRICS_ENABLED", "false")
        .output()
        .expect("run saltpipe replay");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let c = rusqlite::Connection::open(&db).expect("sqlite");
    let q = |sql: &str| -> u64 { c.query_row(sql, [], |r| r.get::<_, i64>(0)).expect(sql) as u64 };
    assert_eq!(
        q("SELECT COUNT(*) FROM salt_returns"),
        n(&s, &["expected_returns"])
    );
    assert_eq!(q("SELECT COUNT(*) FROM jids"), n(&s, &["expected_jids"]));
}

#[test]
fn burst100k_frames_are_the_size_asked_and_the_seed_repeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--scenario", "burst100k", "--minions", "50", "--seed", "3"];
    let (stream, s) = sim(dir.path(), &args);
    let evs = events(&stream);
    let rets: Vec<&Event> = evs.iter().filter(|e| e.kind == Kind::JobReturn).collect();
    assert_eq!(rets.len(), 50);
    assert_eq!(n(&s, &["no_answer"]), 0);
    for e in &rets {
        let frame = saltpipe::bus::encode::frame(e.tag(), e.data());
        assert_eq!(frame.len(), 100 * 1024, "{}", e.tag());
    }
    assert_eq!(n(&s, &["return_bytes_min"]), 100 * 1024);
    assert_eq!(n(&s, &["return_bytes_max"]), 100 * 1024);
    // The same seed, the same returns (the `_stamp`s are the clock's).
    let again = tempfile::tempdir().expect("tempdir");
    let (stream2, _) = sim(again.path(), &args);
    let order = |p: &std::path::Path| -> Vec<String> {
        events(p)
            .iter()
            .filter_map(|e| e.fields.minion.clone())
            .collect()
    };
    assert_eq!(order(&stream), order(&stream2));
}
