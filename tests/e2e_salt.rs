//! End to end against real salt-masters with two minions on loopback, one
//! per Salt release line (the newest 3006 LTS, 3007 and 3008 on PyPI, each
//! in its own cached virtualenv) and per bus transport (`ipc_mode: ipc`,
//! the unix socket, and `tcp`): `saltpipe run` into SQLite, the same real
//! job mix on each, then the rows checked exactly; a master restart under a
//! running saltpipe; and a SIGKILL with a backlog in the embedded queue.
//!
//! The job mix is written once ([`job_mix`]) and instantiated per line by
//! `salt_line!`, ripgrep's `rgtest!` style: one master per line, and a line
//! that fails names itself in the test name. What differs between the lines
//! (framing, socket mode, `_stamp`, extra tags) is listed in
//! docs/TOPOLOGIES.md.

mod common;

use common::{Saltpipe, Sandbox, count, open_db, wait_for, write_config, write_config_source};
use rusqlite::params;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

/// (fun, success column, full_ret) of the row for (jid, minion).
fn row(db: &rusqlite::Connection, jid: &str, minion: &str) -> (String, String, String, Value) {
    db.query_row(
        r#"SELECT fun, success, "return", full_ret FROM salt_returns WHERE jid = ?1 AND id = ?2"#,
        params![jid, minion],
        |r| {
            let full: String = r.get(3)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                serde_json::from_str(&full).unwrap_or(Value::Null),
            ))
        },
    )
    .unwrap_or_else(|e| panic!("no row for {jid}/{minion}: {e}"))
}

fn minions_of(db: &rusqlite::Connection, jid: &str) -> BTreeSet<String> {
    let mut st = db
        .prepare("SELECT id FROM salt_returns WHERE jid = ?1")
        .expect("prepare");
    st.query_map([jid], |r| r.get::<_, String>(0))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

fn has_jid(db: &rusqlite::Connection, jid: &str) -> bool {
    count(
        db,
        &format!("SELECT count(*) FROM jids WHERE jid = '{jid}'"),
    ) == 1
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// One test per Salt release line and bus transport, all running [`job_mix`].
macro_rules! salt_line {
    ($name:ident, $version:expr, $ipc_mode:expr) => {
        #[test]
        fn $name() {
            job_mix($version, $ipc_mode);
        }
    };
}

salt_line!(salt_3008_ipc, "3008.5", "ipc");
salt_line!(salt_3008_tcp, "3008.5", "tcp");
salt_line!(salt_3007_ipc, "3007.17", "ipc");
// 3006.26+ put a 4-byte length before each frame (on TCP too: the framing
// is one code path for both transports, so 3006 over TCP is not run again).
salt_line!(salt_3006_ipc, "3006.30", "ipc");

/// The job mix on a real master of Salt `version` with two minions: every
/// job's rows exactly once and exactly as Salt's returner would write them,
/// a master restart under a running saltpipe, a job to a stopped minion.
fn job_mix(version: &str, ipc_mode: &str) {
    let sb = Sandbox::up_line(2, ipc_mode, version);
    assert_eq!(
        sb.salt_version(),
        version,
        "the sandbox runs the line asked for"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = write_config_source(work.path(), &sb.source_line(), "");
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("connected to the event bus", 1, LONG);

    let (ping, _) = sb.salt(&["*", "test.ping"]);
    let (echo, _) = sb.salt(&["*", "cmd.run", "echo hi"]);
    let (exit3, _) = sb.salt(&["*", "cmd.run", "exit 3"]);
    // Longer than the master's 5 s timeout: the CLI polls with saltutil.find_job.
    let (sleep, _) = sb.salt(&["minion-1", "cmd.run", "sleep 12"]);
    let (state, _) = sb.salt(&["*", "state.apply", "failing"]);
    let (multi, _) = sb.salt(&["*", "test.ping,test.echo", ",", "hello"]);
    sb.salt_call("minion-1", &["test.ping"]);

    let all = set(&["minion-1", "minion-2"]);
    let db = open_db(work.path());
    wait_for("the first 12 returns", LONG, || {
        (count(&db, "SELECT count(*) FROM salt_returns") >= 12).then_some(())
    });

    // Each job's returns, once per minion.
    for jid in [&ping, &echo, &exit3, &state, &multi] {
        assert_eq!(minions_of(&db, jid), all, "returns of {jid}");
        assert!(has_jid(&db, jid), "jids row for {jid}");
    }
    assert_eq!(minions_of(&db, &sleep), set(&["minion-1"]));
    assert!(has_jid(&db, &sleep));

    let (fun, success, ret, full) = row(&db, &echo, "minion-1");
    assert_eq!(
        (fun.as_str(), success.as_str(), ret.as_str()),
        ("cmd.run", "1", "\"hi\"")
    );
    assert_eq!(full["retcode"], 0);
    assert_eq!(full["success"], true);

    let (_, success, _, full) = row(&db, &exit3, "minion-2");
    assert_eq!(success, "0");
    assert_eq!(full["retcode"], 3);
    assert_eq!(full["success"], false);

    let (fun, success, ret, full) = row(&db, &state, "minion-1");
    assert_eq!((fun.as_str(), success.as_str()), ("state.apply", "0"));
    assert_ne!(
        full["retcode"], 0,
        "a failing state run has a non-zero retcode"
    );
    let ret: Value = serde_json::from_str(&ret).expect("return json");
    assert!(
        ret.as_object()
            .is_some_and(|m| m.keys().any(|k| k.contains("_|-"))),
        "state return keyed mod_|-id_|-name_|-fun: {ret}"
    );

    let (fun, success, ret, _) = row(&db, &multi, "minion-2");
    assert_eq!(
        (fun.as_str(), success.as_str()),
        ("test.ping,test.echo", "1")
    );
    let ret: Value = serde_json::from_str(&ret).expect("return json");
    assert_eq!(ret["test.echo"], "hello");

    let (_, _, ret, full) = row(&db, &sleep, "minion-1");
    assert_eq!(ret, "\"\"");
    assert_eq!(full["fun_args"][0], "sleep 12");

    // The salt-call return: no `new` event, so its load is the return itself.
    let call_jid: String = db
        .query_row(
            "SELECT jid FROM salt_returns WHERE id = 'minion-1' AND fun = 'test.ping' AND jid <> ?1",
            [&ping],
            |r| r.get(0),
        )
        .expect("salt-call return");
    assert!(has_jid(&db, &call_jid), "salt-call job has a jids row");
    let (_, success, _, full) = row(&db, &call_jid, "minion-1");
    assert_eq!(
        success, "0",
        "no `success` key: stored as false, like Salt's returner"
    );
    assert_eq!(full["return"], true);

    // The master goes away and comes back: saltpipe reconnects by itself.
    sb.stop_master();
    sp.wait_log("lost the event bus", 1, LONG);
    sb.start_master();
    sp.wait_log("connected to the event bus", 2, LONG);
    let (after, _) = sb.salt(&["*", "test.ping"]);
    wait_for("the job after the restart", LONG, || {
        (minions_of(&db, &after) == all).then_some(())
    });

    // A job to a stopped minion: announced (jids), never returned.
    sb.stop_minion("minion-2");
    let (down, _) = sb.salt(&["minion-2", "test.ping"]);
    wait_for("the down job's jids row", LONG, || {
        has_jid(&db, &down).then_some(())
    });

    let status = sp.terminate();
    assert!(status.success(), "saltpipe exits 0 on SIGTERM: {status:?}");

    let db = open_db(work.path());
    assert!(minions_of(&db, &down).is_empty());
    // No duplicates, and no find_job anywhere. (The sandbox itself pings
    // the minions while it restarts the master, so test.ping jobs beyond
    // ours may be there; every other return is one of ours.)
    let total = count(&db, "SELECT count(*) FROM salt_returns");
    assert!(total >= 14, "{total} returns");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT DISTINCT jid, id FROM salt_returns)"
        ),
        total
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM salt_returns WHERE fun <> 'test.ping'"
        ),
        9
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM salt_returns WHERE jid NOT IN (SELECT jid FROM jids)"
        ),
        0,
        "every return's job has a jids row"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM salt_returns WHERE fun LIKE '%find_job%'"
        ),
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jids WHERE load LIKE '%saltutil.find_job%'"
        ),
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM salt_events"), 0);
}

/// A numbered return frame (see `common::return_frame`).
fn return_frame(jid: &str, minion: &str, i: usize) -> Vec<u8> {
    common::return_frame(jid, minion, &format!("payload {i} café 🧂"))
}

#[test]
fn sigkill_with_a_backlog_loses_nothing_and_doubles_nothing() {
    const N: usize = 3000;
    let sb = Sandbox::up(1);
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(work.path(), &sb.event_pub(), "");
    let cfg_text = std::fs::read_to_string(&cfg).expect("read config");
    // Tighter retries so the worker notices soon after the lock goes.
    let cfg_text = cfg_text.replace("[worker]\n", "[worker]\nretry_max = \"500ms\"\n");
    std::fs::write(&cfg, cfg_text).expect("config");
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("connected to the event bus", 1, LONG);

    // Hold the sink's write lock: the worker's batches fail (retriable) and
    // everything the bus delivers piles up in the durable queue.
    let locker = rusqlite::Connection::open(work.path().join("salt.db")).expect("open sink");
    locker
        .busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("lock the sink");

    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            return_frame(
                &format!("2026112512{:010}", i / 10),
                &format!("m{}", i % 10),
                i,
            )
        })
        .collect();
    sb.push_events(&frames);

    let queue = rusqlite::Connection::open(work.path().join("queue/queue.db")).expect("open queue");
    wait_for("the backlog in the queue", LONG, || {
        (count(&queue, "SELECT coalesce(sum(events), 0) FROM containers") == N as i64).then_some(())
    });
    sp.kill();
    locker.execute_batch("ROLLBACK").expect("unlock");
    drop(locker);

    let sp = Saltpipe::start(&["run"], &cfg);
    let db = open_db(work.path());
    wait_for("every queued return stored", LONG, || {
        (count(&db, "SELECT count(*) FROM salt_returns") >= N as i64).then_some(())
    });
    wait_for("the queue to empty", LONG, || {
        (count(&queue, "SELECT count(*) FROM containers") == 0).then_some(())
    });
    assert!(sp.terminate().success());
    assert_eq!(count(&db, "SELECT count(*) FROM salt_returns"), N as i64);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT DISTINCT jid, id FROM salt_returns)"
        ),
        N as i64
    );
    let ret: String = db
        .query_row(
            r#"SELECT "return" FROM salt_returns WHERE jid = '20261125120000000007' AND id = 'm1'"#,
            [],
            |r| r.get(0),
        )
        .expect("row 71");
    assert_eq!(ret, "\"payload 71 café 🧂\"");
}

/// The queue stops taking writes (its write lock held from outside) while
/// a burst of large returns crosses a real master's bus, far more than the
/// listener's memory: what memory cannot hold waits in the overflow file,
/// and once the queue takes writes again every return is stored, once, and
/// none was dropped.
#[test]
fn a_stuck_queue_holds_a_burst_in_the_overflow_file_and_loses_nothing() {
    const N: usize = 400;
    let sb = Sandbox::up(0);
    let work = tempfile::tempdir().expect("tempdir");
    // The smallest budget: the listener has 1 MiB of its own and borrows
    // the rest of 16; the burst is 40 MB.
    let cfg = write_config(
        work.path(),
        &sb.event_pub(),
        "[memory]\nbudget = \"16MiB\"\n",
    );
    let args = [
        std::ffi::OsStr::new("run"),
        "--config".as_ref(),
        cfg.as_os_str(),
    ];
    let sp = Saltpipe::start_env(&args, &[("SALTPIPE_SOURCE_PENDING_LIMIT", "1MiB")]);
    sp.wait_log("connected to the event bus", 1, LONG);

    let queue = rusqlite::Connection::open(work.path().join("queue/queue.db")).expect("open queue");
    queue
        .execute_batch("BEGIN IMMEDIATE")
        .expect("hold the queue's write lock");

    let big = "x".repeat(100_000);
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| common::return_frame("20261206000000000001", &format!("m{i:03}"), &big))
        .collect();
    sb.push_events(&frames);
    sp.wait_log("holding kept events in the overflow file", 1, LONG);
    // Let the master publish the rest of the burst while the queue is stuck.
    std::thread::sleep(Duration::from_secs(3));
    queue.execute_batch("ROLLBACK").expect("let the queue go");
    drop(queue);

    let db = open_db(work.path());
    wait_for("every return stored", LONG, || {
        (count(&db, "SELECT count(*) FROM salt_returns") >= N as i64).then_some(())
    });
    // The file was read back whole and freed, and nothing was dropped.
    sp.wait_log("the queue caught up", 1, LONG);
    assert_eq!(sp.log_contains("dropped kept events"), 0);
    assert!(sp.terminate().success());
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT DISTINCT jid, id FROM salt_returns)"
        ),
        N as i64
    );
    assert_eq!(count(&db, "SELECT count(*) FROM salt_returns"), N as i64);
}

/// A master whose own config moves the bus, the job cache and its id away
/// from Salt's defaults (in `master.d/*.conf`, read through Salt's
/// `default_include`), and a saltpipe with no config file (only where to
/// queue and store, from the environment): `--master-config` is all it
/// needs to find the bus, read back the job cache (named with sha512) and
/// stamp `salt_events.master_id`.
#[test]
fn zero_config_from_the_masters_own_config() {
    let sb = Sandbox::up_args(
        1,
        "ipc",
        common::SALT_DEFAULT,
        &[
            "--master-d",
            "--master-opt",
            "sock_dir=/srv/sp-sock",
            "--master-opt",
            "cachedir=/srv/sp-cache",
            "--master-opt",
            "hash_type=sha512",
            "--master-opt",
            "id=topo-master",
        ],
    );
    let root = sb.dir.path().join("root");
    let master_config = sb.dir.path().join("etc/master");
    let master_config = master_config.to_str().expect("utf-8 path");
    // Before saltpipe runs: only the master's job cache will have it.
    let (before, _) = sb.salt(&["*", "cmd.run", "echo before"]);

    let work = tempfile::tempdir().expect("tempdir");
    let queue = format!("embedded://{}", work.path().join("queue").display());
    let sink = format!("sqlite://{}", work.path().join("salt.db").display());
    let env = [
        ("SALTPIPE_QUEUE_URL", queue.as_str()),
        ("SALTPIPE_SINK_URL", sink.as_str()),
        ("SALTPIPE_METRICS_ENABLED", "false"),
        ("SALTPIPE_RULES_KEEP", "all"),
    ];

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["validate", "--master-config", master_config])
        .envs(env)
        .output()
        .expect("validate");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "validate: {text}");
    let sock = root.join("srv/sp-sock/master_event_pub.ipc");
    for want in [
        "sock_dir = /srv/sp-sock (".to_owned(),
        "cachedir = /srv/sp-cache (".to_owned(),
        "hash_type = sha512 (".to_owned(),
        "id = topo-master (".to_owned(),
        "master.d/sandbox.conf)".to_owned(),
        format!("reached the bus at unix:{}", sock.display()),
        format!(
            "can read the job cache at {}",
            root.join("srv/sp-cache/jobs").display()
        ),
    ] {
        assert!(text.contains(&want), "validate lacks {want:?}:\n{text}");
    }

    let sp = Saltpipe::start_env(&["run", "--master-config", master_config], &env);
    sp.wait_log("connected to the event bus", 1, LONG);
    let (live, _) = sb.salt(&["*", "cmd.run", "echo live"]);
    let db = open_db(work.path());
    wait_for("the backfilled and the live return", LONG, || {
        (!minions_of(&db, &before).is_empty() && !minions_of(&db, &live).is_empty()).then_some(())
    });
    assert_eq!(row(&db, &before, "minion-1").2, "\"before\"");
    assert_eq!(row(&db, &live, "minion-1").2, "\"live\"");
    assert!(has_jid(&db, &before) && has_jid(&db, &live));
    // The same master (one master per test binary run where it can be
    // shared) also runs the minion scheduler's job.
    scheduled_job_lands_like_any_return(&sb, &db);
    // A custom event (rules.keep = "all" stores it in salt_events).
    sb.salt_call("minion-1", &["event.send", "saltpipe/topo/zero-config"]);
    wait_for("the custom event in salt_events", LONG, || {
        (count(&db, "SELECT count(*) FROM salt_events") > 0).then_some(())
    });
    assert!(sp.terminate().success());
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM salt_events WHERE master_id <> 'topo-master'"
        ),
        0,
        "salt_events.master_id is the master's id"
    );
}

/// A job the minion's scheduler runs with `return_job` sends its return to
/// the master like a salt-call (a jid the master makes up, no `new`): it
/// lands with its `jids` row, the load being the return as Salt's job cache
/// saves it.
fn scheduled_job_lands_like_any_return(sb: &Sandbox, db: &rusqlite::Connection) {
    sb.salt(&[
        "minion-1",
        "schedule.add",
        "saltpipe-sched",
        "function=test.echo",
        "job_args=['scheduled']",
        "seconds=1",
        "return_job=True",
    ]);
    let jid: String = wait_for("a scheduled return", LONG, || {
        db.query_row(
            r#"SELECT jid FROM salt_returns WHERE id = 'minion-1' AND fun = 'test.echo' AND "return" = '"scheduled"'"#,
            [],
            |r| r.get(0),
        )
        .ok()
    });
    sb.salt(&["minion-1", "schedule.delete", "saltpipe-sched"]);
    let (_, _, _, full) = row(db, &jid, "minion-1");
    assert_eq!(full["schedule"], "saltpipe-sched", "{full}");
    assert_eq!(full["fun_args"][0], "scheduled");
    wait_for("the scheduled job's jids row", LONG, || {
        has_jid(db, &jid).then_some(())
    });
}
