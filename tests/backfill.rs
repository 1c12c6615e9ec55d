//! Backfill from the master's job cache (src/backfill/), end to end:
//! * a cache written by Salt's own `local_cache` (scripts/make-job-cache.py)
//!   imported by `saltpipe backfill --all`: every return once, a second run
//!   writes nothing, and the rows say what Salt's own readers say;
//! * a real master: jobs run while saltpipe is stopped are in the database
//!   after it starts again, exactly once, matching `jobs.lookup_jid`;
//! * the same jobs written from the bus and from the cache differ only in
//!   the fields docs/ARCHITECTURE.md lists.

mod common;

#[cfg(all(feature = "mysql", feature = "postgres"))]
use common::{Dbs, my, pg};
use common::{Saltpipe, Sandbox, count, open_db, salt_venv, wait_for, write_config};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

fn make_job_cache(args: &[&str]) -> Value {
    let out = common::output_ok(
        Command::new(salt_venv().join("bin/python"))
            .arg(common::repo().join("scripts/make-job-cache.py"))
            .args(args),
        &format!("make-job-cache.py {args:?}"),
    );
    serde_json::from_slice(&out.stdout).expect("json from make-job-cache.py")
}

/// Runs `saltpipe backfill ARGS --json` with `config`; returns (exit code, summary).
fn backfill(config: &Path, args: &[&str]) -> (i32, Value) {
    backfill_into(config, None, args)
}

/// The same, with the sink URL overridden (`SALTPIPE_SINK_URL`).
fn backfill_into(config: &Path, sink: Option<&str>, args: &[&str]) -> (i32, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_saltpipe"));
    if let Some(url) = sink {
        cmd.env("SALTPIPE_SINK_URL", url);
    }
    let out = cmd
        .arg("backfill")
        .args(args)
        .arg("--json")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run saltpipe backfill");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "summary: {e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn json_col(db: &rusqlite::Connection, sql: &str, args: &[&str]) -> Vec<Value> {
    let mut st = db.prepare(sql).expect("prepare");
    st.query_map(rusqlite::params_from_iter(args.iter()), |r| {
        r.get::<_, String>(0)
    })
    .expect("query")
    .map(|r| serde_json::from_str(&r.expect("row")).expect("json column"))
    .collect()
}

/// `salt_returns` rows of one job by minion: (fun, success, return, full_ret).
fn returns_of(
    db: &rusqlite::Connection,
    jid: &str,
) -> BTreeMap<String, (String, String, Value, Value)> {
    let mut st = db
        .prepare(r#"SELECT id, fun, success, "return", full_ret FROM salt_returns WHERE jid = ?1"#)
        .expect("prepare");
    let rows = st
        .query_map([jid], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })
        .expect("query");
    let mut out = BTreeMap::new();
    for r in rows {
        let (id, fun, success, ret, full) = r.expect("row");
        let prev = out.insert(
            id.clone(),
            (
                fun,
                success,
                serde_json::from_str(&ret).expect("return json"),
                serde_json::from_str(&full).expect("full_ret json"),
            ),
        );
        assert!(prev.is_none(), "two rows for {jid}/{id}");
    }
    out
}

#[test]
fn backfill_all_of_a_salt_written_cache_stores_every_return_once_as_salt_reads_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let cachedir = work.path().join("cache");
    let written = make_job_cache(&[
        "write",
        "--cachedir",
        cachedir.to_str().expect("utf8"),
        "--returns",
        "5000",
        "--minions",
        "10",
    ]);
    assert_eq!(written["returns"], 5000);
    // Salt's own reader (local_cache.get_jids / get_jid) sees what was written.
    let salt = make_job_cache(&["read", "--cachedir", cachedir.to_str().expect("utf8")]);
    let jids = salt["jids"].as_object().expect("jids");
    assert_eq!(jids.len(), 500);
    let salt_returns: usize = jids
        .values()
        .map(|j| j["returns"].as_object().expect("returns").len())
        .sum();
    assert_eq!(salt_returns, 5000, "local_cache.get_jid reads every return");

    let cfg = write_config(
        work.path(),
        Path::new("/nonexistent.ipc"),
        &format!(
            "[backfill]\njob_cache_dir = \"{}\"\n",
            cachedir.join("jobs").display()
        ),
    );
    let (code, first) = backfill(&cfg, &["--all"]);
    assert_eq!(code, 0, "{first}");
    assert_eq!(first["found"]["returns"], 5000, "{first}");
    assert_eq!(first["found"]["jobs"], 500, "{first}");
    assert_eq!(first["written"]["returns"], 5000, "{first}");
    assert_eq!(first["written"]["jobs"], 500, "{first}");
    let db = open_db(work.path());
    assert_eq!(count(&db, "SELECT count(*) FROM salt_returns"), 5000);
    assert_eq!(
        count(
            &db,
            "SELECT count(DISTINCT jid || '/' || id) FROM salt_returns"
        ),
        5000
    );

    let (code, second) = backfill(&cfg, &["--all"]);
    assert_eq!(code, 0, "{second}");
    assert_eq!(second["found"]["returns"], 5000, "{second}");
    assert_eq!(
        second["written"]["returns"], 0,
        "second run writes nothing: {second}"
    );
    assert_eq!(second["written"]["jobs"], 0, "{second}");
    assert_eq!(second["already_stored"], 5500, "{second}");
    assert_eq!(count(&db, "SELECT count(*) FROM salt_returns"), 5000);

    // Every stored row says what Salt's reader says.
    for (jid, job) in jids {
        let load = &job["load"];
        let stored = json_col(&db, "SELECT load FROM jids WHERE jid = ?1", &[jid]);
        assert_eq!(stored.len(), 1, "one jids row for {jid}");
        let stored = &stored[0];
        for k in ["fun", "arg", "tgt", "tgt_type", "user", "jid"] {
            assert_eq!(stored[k], load[k], "{jid} load {k}");
        }
        assert_eq!(stored["minions"], load["Minions"], "{jid} minions");
        let rows = returns_of(&db, jid);
        let salt_rets = job["returns"].as_object().expect("returns");
        assert_eq!(
            rows.keys().collect::<BTreeSet<_>>(),
            salt_rets.keys().collect::<BTreeSet<_>>(),
            "{jid} minions"
        );
        for (minion, sr) in salt_rets {
            let (fun, _success, ret, full) = &rows[minion];
            assert_eq!(ret, &sr["return"], "{jid}/{minion} return");
            assert_eq!(full["retcode"], sr["retcode"], "{jid}/{minion} retcode");
            assert_eq!(full["success"], sr["success"], "{jid}/{minion} success");
            assert_eq!(full["out"], sr["out"], "{jid}/{minion} out");
            let joined = match &load["fun"] {
                Value::Array(f) => f
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                f => f.as_str().expect("fun").to_owned(),
            };
            assert_eq!(fun, &joined, "{jid}/{minion} fun");
        }
    }

    // --jid and --dry-run touch only what they say.
    let one = jids.keys().next().expect("a jid");
    let (code, dry) = backfill(&cfg, &["--jid", one, "--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(dry["found"]["returns"], 10, "{dry}");
    assert_eq!(dry["found"]["jobs"], 1, "{dry}");
    assert_eq!(dry["written"]["returns"], 0, "{dry}");
}

#[cfg(all(feature = "mysql", feature = "postgres"))]
#[test]
fn backfill_into_mariadb_and_postgresql_writes_each_return_once() {
    let work = tempfile::tempdir().expect("tempdir");
    let cachedir = work.path().join("cache");
    make_job_cache(&[
        "write",
        "--cachedir",
        cachedir.to_str().expect("utf8"),
        "--returns",
        "400",
        "--minions",
        "10",
    ]);
    let dbs = Dbs::both("bf");
    let db = dbs.0.clone();
    let cfg = write_config(
        work.path(),
        Path::new("/nonexistent.ipc"),
        &format!(
            "[backfill]\njob_cache_dir = \"{}\"\n",
            cachedir.join("jobs").display()
        ),
    );
    let urls = [
        ("mysql", format!("mysql://root@127.0.0.1:3306/{db}")),
        (
            "postgres",
            format!("postgres://postgres@127.0.0.1:5432/{db}"),
        ),
    ];
    for (name, url) in &urls {
        let (code, first) = backfill_into(&cfg, Some(url), &["--all"]);
        assert_eq!(code, 0, "{name}: {first}");
        assert_eq!(first["written"]["returns"], 400, "{name}: {first}");
        assert_eq!(first["written"]["jobs"], 40, "{name}: {first}");
        let (code, second) = backfill_into(&cfg, Some(url), &["--all"]);
        assert_eq!(code, 0, "{name}: {second}");
        assert_eq!(second["written"]["returns"], 0, "{name}: {second}");
        assert_eq!(second["already_stored"], 440, "{name}: {second}");
    }
    let q = "SELECT count(*), count(DISTINCT jid, id) FROM salt_returns";
    assert_eq!(my(&db, q), "400\t400");
    let q = "SELECT count(*), count(DISTINCT (jid, id)) FROM salt_returns";
    assert_eq!(pg(&db, q), "400|400");
    assert_eq!(my(&db, "SELECT count(*) FROM jids"), "40");
    assert_eq!(pg(&db, "SELECT count(*) FROM jids"), "40");
}

#[test]
fn a_missing_job_cache_is_one_clear_error_and_exit_5() {
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        work.path(),
        Path::new("/nonexistent.ipc"),
        "[backfill]\njob_cache_dir = \"/nonexistent/saltpipe-test/jobs\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["backfill", "--all", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the job cache at /nonexistent/saltpipe-test/jobs"),
        "{err}"
    );
    assert!(
        !work.path().join("salt.db").exists(),
        "no database is created for nothing"
    );
}

/// Jobs to run: (name, salt args).
const JOBS: &[(&str, &[&str])] = &[
    ("ping", &["*", "test.ping"]),
    ("cmd", &["*", "cmd.run", "echo hi; exit 3"]),
    ("failing", &["*", "state.apply", "failing"]),
    ("test_true", &["*", "state.apply", "passing", "test=True"]),
    ("multi", &["*", "test.ping,test.echo", ",", "hello"]),
];

fn run_jobs(sb: &Sandbox) -> Vec<(String, String)> {
    JOBS.iter()
        .map(|(name, args)| (name.to_string(), sb.salt(args).0))
        .collect()
}

fn sandbox_config(work: &Path, sb: &Sandbox, margin: &str) -> std::path::PathBuf {
    write_config(
        work,
        &sb.event_pub(),
        &format!(
            "[backfill]\nmaster_config = \"{}\"\nmargin = \"{margin}\"\n",
            sb.dir.path().join("etc/master").display()
        ),
    )
}

#[test]
fn jobs_run_while_saltpipe_was_stopped_are_in_the_database_after_it_starts() {
    let sb = Sandbox::up(2);
    let work = tempfile::tempdir().expect("tempdir");
    // A margin of 1s: the window must come from the state file, not the margin.
    let cfg = sandbox_config(work.path(), &sb, "1s");
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("connected to the event bus", 1, LONG);
    sp.wait_log("backfill: fed", 1, LONG);
    let (before, _) = sb.salt(&["*", "test.ping"]);
    let db = open_db(work.path());
    wait_for("the bus-written ping", LONG, || {
        (count(
            &db,
            &format!("SELECT count(*) FROM salt_returns WHERE jid = '{before}'"),
        ) == 2)
            .then_some(())
    });
    assert!(sp.terminate().success());

    let jobs = run_jobs(&sb);
    let call = sb.salt_call("minion-1", &["test.echo", "from-salt-call"]);
    assert_eq!(call["local"], "from-salt-call");

    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("backfill: fed", 1, LONG);
    let expected = 2 + 2 * JOBS.len() as i64 + 1;
    // From `before` on: the sandbox's own readiness pings, just before it,
    // are in the job cache too, and inside the window when saltpipe's
    // first run was short; backfilling them is right, and not counted here.
    let since = format!("FROM salt_returns WHERE jid >= '{before}'");
    wait_for("every return run while saltpipe was stopped", LONG, || {
        (count(&db, &format!("SELECT count(*) {since}")) >= expected).then_some(())
    });
    // Let anything doubled arrive before counting.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count(&db, &format!("SELECT count(*) {since}")), expected);
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(DISTINCT jid || '/' || id) {since}")
        ),
        expected
    );
    let all: BTreeSet<String> = ["minion-1", "minion-2"].map(String::from).into();
    for (name, jid) in &jobs {
        let rows = returns_of(&db, jid);
        assert_eq!(
            rows.keys().cloned().collect::<BTreeSet<_>>(),
            all,
            "{name} {jid}"
        );
        assert_eq!(
            count(
                &db,
                &format!("SELECT count(*) FROM jids WHERE jid = '{jid}'")
            ),
            1,
            "{name}: one jids row"
        );
        // What the master believes it has.
        let lookup = sb.salt_run(&["jobs.lookup_jid", jid]);
        for (minion, (_, _, ret, _)) in &rows {
            assert_eq!(
                ret, &lookup[minion],
                "{name} {jid} {minion} vs jobs.lookup_jid"
            );
        }
    }
    // The salt-call job (no `new` on the bus) has its return and its jids row.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM salt_returns WHERE fun = 'test.echo' AND id = 'minion-1'"
        ),
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jids j JOIN salt_returns r ON r.jid = j.jid WHERE r.fun = 'test.echo'"
        ),
        1
    );
    assert!(sp.log_contains("backfill: fed") >= 1);
    assert!(sp.terminate().success());
}

/// Keys of a JSON object.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn backfilled_rows_differ_from_bus_rows_only_in_the_documented_fields() {
    let sb = Sandbox::up(2);
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = sandbox_config(work.path(), &sb, "5m");
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("connected to the event bus", 1, LONG);
    let jobs = run_jobs(&sb);
    let db = open_db(work.path());
    let expected = 2 * JOBS.len() as i64;
    wait_for("the bus-written returns", LONG, || {
        (count(&db, "SELECT count(*) FROM salt_returns") >= expected).then_some(())
    });
    assert!(sp.terminate().success());

    // The same jobs from the job cache into a second database.
    let other = tempfile::tempdir().expect("tempdir");
    let cfg2 = sandbox_config(other.path(), &sb, "5m");
    let (code, summary) = backfill(&cfg2, &["--all"]);
    assert_eq!(code, 0, "{summary}");
    let db2 = open_db(other.path());

    for (name, jid) in &jobs {
        let bus = returns_of(&db, jid);
        let cache = returns_of(&db2, jid);
        assert_eq!(bus.len(), 2, "{name}");
        assert_eq!(
            bus.keys().collect::<Vec<_>>(),
            cache.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (minion, (bfun, bsucc, bret, bfull)) in &bus {
            let (cfun, csucc, cret, cfull) = &cache[minion];
            assert_eq!(bfun, cfun, "{name} fun");
            assert_eq!(bsucc, csucc, "{name} success");
            assert_eq!(bret, cret, "{name} return");
            // full_ret: every key the bus had, with the same value, except
            // the documented ones: `_stamp` (from return.p's mtime), `ts`
            // (not in the cache).
            for k in keys(bfull) {
                match k.as_str() {
                    "_stamp" => assert!(cfull["_stamp"].is_string(), "{name} _stamp"),
                    "ts" => assert!(cfull.get("ts").is_none(), "{name} ts"),
                    _ => assert_eq!(bfull[&k], cfull[&k], "{name} {minion} full_ret.{k}"),
                }
            }
            let extra: Vec<String> = keys(cfull).difference(&keys(bfull)).cloned().collect();
            assert!(extra.is_empty(), "{name}: backfill added {extra:?}");
        }
        // jids.load: same but `_stamp` (.load.p's mtime) and `missing` (not kept).
        let bl = &json_col(&db, "SELECT load FROM jids WHERE jid = ?1", &[jid])[0];
        let cl = &json_col(&db2, "SELECT load FROM jids WHERE jid = ?1", &[jid])[0];
        for k in keys(bl) {
            match k.as_str() {
                "_stamp" => assert!(cl["_stamp"].is_string()),
                "missing" => assert!(cl.get("missing").is_none()),
                _ => assert_eq!(bl[&k], cl[&k], "{name} load.{k}"),
            }
        }
        let extra: Vec<String> = keys(cl).difference(&keys(bl)).cloned().collect();
        assert!(
            extra.is_empty(),
            "{name}: backfill added {extra:?} to the load"
        );
    }
}

#[test]
fn sigkill_and_restart_in_a_loop_while_jobs_run_leaves_exactly_the_cached_returns() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let sb = Arc::new(Sandbox::up(2));
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = sandbox_config(work.path(), &sb, "30s");

    // Jobs all along, published whether saltpipe is up or not.
    let running = Arc::new(AtomicBool::new(true));
    let jids = Arc::new(Mutex::new(Vec::new()));
    let jobs = {
        let (sb, running, jids) = (sb.clone(), running.clone(), jids.clone());
        std::thread::spawn(move || {
            let mut i = 0u32;
            while running.load(Ordering::Relaxed) {
                let arg = format!("echo {i}");
                let jid = if i.is_multiple_of(2) {
                    sb.salt_async(&["*", "test.ping"])
                } else {
                    sb.salt_async(&["*", "cmd.run", &arg])
                };
                jids.lock().expect("jids").push(jid);
                i += 1;
            }
        })
    };
    // SIGKILL every few seconds for ~40 s.
    let started = std::time::Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(40) {
        let sp = Saltpipe::start(&["run"], &cfg);
        std::thread::sleep(Duration::from_millis(2000 + 700 * (round % 4)));
        sp.kill();
        std::thread::sleep(Duration::from_millis(500 + 300 * (round % 3)));
        round += 1;
    }
    running.store(false, Ordering::Relaxed);
    jobs.join().expect("jobs thread");
    let jids = jids.lock().expect("jids").clone();
    assert!(jids.len() >= 4, "only {} jobs ran", jids.len());
    // Let the last returns reach the master's cache, then one clean run.
    std::thread::sleep(Duration::from_secs(3));
    let cachedir = sb.dir.path().join("root/var/cache/salt/master");
    let mut args = vec!["read", "--cachedir", cachedir.to_str().expect("utf8")];
    for j in &jids {
        args.extend(["--jid", j.as_str()]);
    }
    let cache = make_job_cache(&args);
    let mut want = BTreeSet::new();
    for (jid, job) in cache["jids"].as_object().expect("jids") {
        for minion in job["returns"].as_object().expect("returns").keys() {
            want.insert((jid.clone(), minion.clone()));
        }
    }
    assert!(want.len() >= 8, "{} returns in the cache", want.len());
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("backfill: fed", 1, LONG);
    let db = open_db(work.path());
    let stored = || {
        let mut st = db
            .prepare("SELECT jid, id FROM salt_returns")
            .expect("prepare");
        st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .expect("query")
            .map(|r| r.expect("row"))
            .filter(|k| jids.contains(&k.0))
            .collect::<Vec<_>>()
    };
    wait_for("every cached return stored", LONG, || {
        (stored().len() >= want.len()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let rows = stored();
    let got: BTreeSet<_> = rows.iter().cloned().collect();
    assert_eq!(rows.len(), got.len(), "a return doubled");
    assert_eq!(
        got, want,
        "the database holds exactly what the job cache holds"
    );
    assert!(sp.terminate().success());
}

#[test]
fn validate_shows_backfill_and_whether_the_job_cache_is_readable() {
    let work = tempfile::tempdir().expect("tempdir");
    let jobs = work.path().join("jobs");
    std::fs::create_dir_all(&jobs).expect("mkdir");
    let cfg = write_config(
        work.path(),
        Path::new("/nonexistent.ipc"),
        &format!(
            "[backfill]\njob_cache_dir = \"{}\"\nmargin = \"10m\"\n",
            jobs.display()
        ),
    );
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_saltpipe"))
            .arg("validate")
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("validate");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = run(&["--no-connect"]);
    assert!(
        text.contains(&format!(
            "backfill: at start and reconnect, job cache {}, margin 10m",
            jobs.display()
        )),
        "{text}"
    );
    assert!(!text.contains("can read the job cache"), "no I/O: {text}");
    let text = run(&[]);
    assert!(
        text.contains(&format!("can read the job cache at {}", jobs.display())),
        "{text}"
    );
}
