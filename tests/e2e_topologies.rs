//! Salt topologies beyond one master, end to end with real Salt 3008.5
//! processes on loopback, and one saltpipe per master writing ONE MariaDB
//! database (docs/TOPOLOGIES.md draws each):
//!
//! * syndic: a master of masters (MoM) with one minion, one syndic node (its
//!   own master + `salt-syndic`) with two minions. A syndic minion's return
//!   reaches both masters' buses, so both saltpipes write it: the sink's
//!   `(jid, id)` unique key keeps one, and the duplicate is counted. Then
//!   with only the MoM's saltpipe left, a syndic's local job still gets its
//!   `jids` row, from the `syndic/<id>/salt/job/<jid>/new` the syndic
//!   forwards up.
//! * multi-master hot/hot: minions with `master: [a, b]` (b on 127.0.0.2),
//!   one saltpipe per master; master A stopped while jobs run from B, then
//!   started again.
//!
//! * multi-master failover (`master_type: failover`): the minions on master
//!   A, A stopped, the minions move to B by themselves, B's jobs land.
//!
//! Each topology is one test over one set-up (set-ups cost 20-40 s of
//! Salt start-up), its cases run in order inside it.

mod common;

use common::{Dbs, Saltpipe, Sandbox, free_port, my, wait_for};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

/// A saltpipe on `sb`'s bus writing into `sink`, stamping `master_id`,
/// its /metrics on `port`.
fn saltpipe_on(sb: &Sandbox, work: &Path, sink: &str, master_id: &str, port: u16) -> Saltpipe {
    let cfg = work.join("saltpipe.toml");
    let text = format!(
        "[source]\n{}\nreconnect_max = \"1s\"\n\n[queue]\nurl = \"embedded://{}\"\n\n\
         [worker]\nbatch_timeout = \"100ms\"\n\n[sink]\nurl = \"{sink}\"\nmaster_id = \"{master_id}\"\n\n\
         [metrics]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[rules.rule]]\ntag = \"saltpipe/topo/*\"\naction = \"keep\"\n",
        sb.source_line(),
        work.join("queue").display(),
    );
    std::fs::write(&cfg, text).expect("config");
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("connected to the event bus", 1, LONG);
    sp
}

/// One counter's value (summed over its label sets matching `labels`)
/// from a saltpipe's /metrics.
fn metric(port: u16, name: &str, labels: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("metrics request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics read");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn q(db: &Dbs, sql: &str) -> String {
    my(&db.0, sql)
}

fn n(db: &Dbs, sql: &str) -> u64 {
    q(db, sql).parse().unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The minions with a return for `jid`, sorted, comma-joined.
fn returned(db: &Dbs, jid: &str) -> String {
    q(
        db,
        &format!(
            "SELECT coalesce(group_concat(id ORDER BY id), '') FROM salt_returns WHERE jid = '{jid}'"
        ),
    )
}

fn has_jid(db: &Dbs, jid: &str) -> bool {
    n(
        db,
        &format!("SELECT count(*) FROM jids WHERE jid = '{jid}'"),
    ) == 1
}

/// Creates the schema once, before two saltpipes start on the same database.
fn create_schema(url: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["schema", url])
        .output()
        .expect("saltpipe schema");
    assert!(
        out.status.success(),
        "saltpipe schema: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn syndic_tree_into_one_database() {
    let mom = Sandbox::up_args(
        1,
        "ipc",
        common::SALT_DEFAULT,
        &[
            "--prefix",
            "mom-minion",
            "--master-opt",
            "order_masters=true",
            "--master-opt",
            "id=mom",
        ],
    );
    let mom_dir = mom.dir.path().to_str().expect("utf-8 path").to_owned();
    let syn = Sandbox::up_args(
        2,
        "ipc",
        common::SALT_DEFAULT,
        &[
            "--prefix",
            "syn-minion",
            "--master-opt",
            "id=syndic-1",
            "--syndic-of",
            &mom_dir,
        ],
    );
    let db = Dbs::mysql("topo_syndic");
    let url = db.mysql_url(3306);
    create_schema(&url);
    let (w_mom, w_syn) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let (p_mom, p_syn) = (free_port(), free_port());
    let sp_mom = saltpipe_on(&mom, w_mom.path(), &url, "mom", p_mom);
    let sp_syn = saltpipe_on(&syn, w_syn.path(), &url, "syndic-1", p_syn);

    // A job from the MoM (to its minion and through the syndic to the
    // syndic's two), a job local to the syndic's master, a salt-call on a
    // syndic minion.
    // (--async: the MoM's CLI would wait for the syndic id it lists as a
    // target, which never answers, and a find_job round: ~15 s.)
    let from_mom = mom.salt_async(&["*", "cmd.run", "echo from-mom"]);
    let (local, r) = syn.salt(&["*", "cmd.run", "echo local"]);
    assert_eq!(r.as_object().map(|m| m.len()), Some(2), "{r}");
    syn.salt_call("syn-minion-1", &["test.echo", "called"]);

    wait_for("every return of the three jobs", LONG, || {
        (returned(&db, &from_mom) == "mom-minion-1,syn-minion-1,syn-minion-2"
            && returned(&db, &local) == "syn-minion-1,syn-minion-2"
            && n(
                &db,
                "SELECT count(*) FROM salt_returns WHERE fun = 'test.echo' AND id = 'syn-minion-1'",
            ) == 1)
            .then_some(())
    });
    let call = q(
        &db,
        "SELECT jid FROM salt_returns WHERE fun = 'test.echo' AND id = 'syn-minion-1'",
    );
    // Both saltpipes wrote each syndic minion's return (5 of them): one row
    // each, the second copy counted as already present. Wait for the
    // slower saltpipe's copies before counting.
    wait_for("both copies of the 5 syndic-minion returns", LONG, || {
        let drained = [p_mom, p_syn].iter().all(|&p| {
            metric(p, "saltpipe_events_kept_total", "")
                == metric(p, "saltpipe_events_acked_total", "")
        });
        let written = metric(p_mom, "saltpipe_rows_written_total", "salt_returns")
            + metric(p_syn, "saltpipe_rows_written_total", "salt_returns");
        let ignored = metric(p_mom, "saltpipe_rows_ignored_total", "")
            + metric(p_syn, "saltpipe_rows_ignored_total", "");
        (drained && written + ignored >= 6 + 5).then_some(())
    });
    let written = metric(p_mom, "saltpipe_rows_written_total", "salt_returns")
        + metric(p_syn, "saltpipe_rows_written_total", "salt_returns");
    assert_eq!(written, 6, "each (jid, minion) inserted once over both");
    assert!(
        metric(p_mom, "saltpipe_rows_ignored_total", "")
            + metric(p_syn, "saltpipe_rows_ignored_total", "")
            >= 5,
        "the second copy of each syndic-minion return refused as present"
    );
    each_return_once(&db);
    // The MoM's job, the syndic's local job, the salt-call: each a jids row.
    for jid in [&from_mom, &local, &call] {
        assert!(has_jid(&db, jid), "jids row for {jid}");
    }
    // The forwarded returns are understood as the minion's own.
    assert_eq!(
        q(
            &db,
            &format!(
                "SELECT concat(fun, ' ', success, ' ', `return`) FROM salt_returns \
                 WHERE jid = '{from_mom}' AND id = 'syn-minion-2'"
            )
        ),
        "cmd.run 1 \"from-mom\""
    );
    // The syndic is a target of the MoM's job, never a returner; find_job
    // polls are not stored.
    assert_eq!(
        n(
            &db,
            "SELECT count(*) FROM salt_returns WHERE id = 'syndic-1' OR fun LIKE '%find_job%'"
        ),
        0
    );

    // Only the MoM's saltpipe left: a job local to the syndic still has
    // its jids row (from the forwarded syndic/syndic-1/salt/job/<jid>/new,
    // with the syndic's real minion list) and its returns.
    assert!(sp_syn.terminate().success());
    let (mom_only, _) = syn.salt(&["syn-minion-2", "test.echo", "mom-only"]);
    wait_for(
        "the syndic-local job seen by the MoM's saltpipe",
        LONG,
        || (has_jid(&db, &mom_only) && returned(&db, &mom_only) == "syn-minion-2").then_some(()),
    );
    let load = q(
        &db,
        &format!("SELECT `load` FROM jids WHERE jid = '{mom_only}'"),
    );
    let load: serde_json::Value = serde_json::from_str(&load).expect("load json");
    assert_eq!(
        load["minions"],
        serde_json::json!(["syn-minion-2"]),
        "{load}"
    );
    assert_eq!(load["fun"], "test.echo");
    assert!(sp_mom.terminate().success());
}

/// No (jid, minion) stored twice.
fn each_return_once(db: &Dbs) {
    assert_eq!(
        n(db, "SELECT count(*) FROM salt_returns"),
        n(
            db,
            "SELECT count(*) FROM (SELECT DISTINCT jid, id FROM salt_returns) d"
        )
    );
}

/// Two masters sharing one key pair: B on 127.0.0.2 with no minions of its
/// own, A with two minions connected to both (`a_opts`: more of
/// `salt-sandbox.py up`'s options for A), a saltpipe on each into one fresh
/// MariaDB database. Fields drop in order: saltpipes, database, masters.
struct TwoMasters {
    sp_a: Saltpipe,
    sp_b: Saltpipe,
    _work: [tempfile::TempDir; 2],
    db: Dbs,
    a: Sandbox,
    b: Sandbox,
}

fn two_masters(db_prefix: &str, a_opts: &[&str]) -> TwoMasters {
    let b = Sandbox::up_args(
        0,
        "ipc",
        common::SALT_DEFAULT,
        &["--interface", "127.0.0.2", "--master-opt", "id=master-b"],
    );
    let b_dir = b.dir.path().to_str().expect("utf-8 path").to_owned();
    let mut args = vec!["--master-opt", "id=master-a", "--peer", &b_dir];
    args.extend_from_slice(a_opts);
    let a = Sandbox::up_args(2, "ipc", common::SALT_DEFAULT, &args);
    let db = Dbs::mysql(db_prefix);
    let url = db.mysql_url(3306);
    create_schema(&url);
    let work = [
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    ];
    TwoMasters {
        sp_a: saltpipe_on(&a, work[0].path(), &url, "master-a", free_port()),
        sp_b: saltpipe_on(&b, work[1].path(), &url, "master-b", free_port()),
        _work: work,
        db,
        a,
        b,
    }
}

#[test]
fn multi_master_hot_hot_into_one_database() {
    // Master B first (no minions of its own), on 127.0.0.2; then master A,
    // whose two minions connect to both and which takes B's key pair.
    let TwoMasters {
        sp_a,
        sp_b,
        db,
        a,
        b,
        ..
    } = two_masters("topo_multi", &[]);
    let both = "minion-1,minion-2";

    // A job from each master, an event on each master's bus.
    let (from_a, _) = a.salt(&["*", "cmd.run", "echo from-a"]);
    let (from_b, _) = b.salt(&["*", "cmd.run", "echo from-b"]);
    a.salt_run(&["event.send", "saltpipe/topo/on-a"]);
    b.salt_run(&["event.send", "saltpipe/topo/on-b"]);
    wait_for("both jobs' returns and both events", LONG, || {
        (returned(&db, &from_a) == both
            && returned(&db, &from_b) == both
            && n(
                &db,
                "SELECT count(*) FROM salt_events WHERE tag LIKE 'saltpipe/topo/%'",
            ) == 2)
            .then_some(())
    });
    assert!(has_jid(&db, &from_a) && has_jid(&db, &from_b));
    assert_eq!(
        q(
            &db,
            &format!(
                "SELECT `return` FROM salt_returns WHERE jid = '{from_b}' AND id = 'minion-2'"
            )
        ),
        "\"from-b\""
    );
    // salt_events.master_id: the master whose bus carried the event.
    assert_eq!(
        q(
            &db,
            "SELECT group_concat(concat(tag, '=', master_id) ORDER BY tag) FROM salt_events \
             WHERE tag LIKE 'saltpipe/topo/%'"
        ),
        "saltpipe/topo/on-a=master-a,saltpipe/topo/on-b=master-b"
    );

    // Master A goes away while jobs run from B, and comes back.
    let slow = b.salt_async(&["*", "cmd.run", "sleep 3; echo during"]);
    a.stop_master();
    sp_a.wait_log("lost the event bus", 1, LONG);
    let (while_down, _) = b.salt(&["*", "test.echo", "while-a-down"]);
    a.start_master();
    sp_a.wait_log("connected to the event bus", 2, LONG);
    let (a_back, _) = a.salt(&["*", "test.echo", "a-back"]);
    wait_for("every job's returns after A's restart", LONG, || {
        [&slow, &while_down, &a_back]
            .iter()
            .all(|j| returned(&db, j) == both && has_jid(&db, j))
            .then_some(())
    });
    assert!(sp_a.terminate().success());
    assert!(sp_b.terminate().success());
    // Each return once; none from a find_job poll.
    each_return_once(&db);
    for jid in [&from_a, &from_b, &slow, &while_down, &a_back] {
        assert_eq!(
            n(
                &db,
                &format!("SELECT count(*) FROM salt_returns WHERE jid = '{jid}'")
            ),
            2,
            "{jid}"
        );
    }
    assert_eq!(
        n(
            &db,
            "SELECT count(*) FROM salt_returns WHERE fun LIKE '%find_job%'"
        ),
        0
    );
}

#[test]
fn multi_master_failover_into_one_database() {
    // Both masters on the same ports on their own addresses (a failover
    // minion has one master_port for its whole list).
    let TwoMasters {
        sp_a,
        sp_b,
        db,
        a,
        b,
        ..
    } = two_masters("topo_failover", &["--minion-opt", "master_type=failover"]);
    let both = "minion-1,minion-2";

    let (before, _) = a.salt(&["*", "cmd.run", "echo before"]);
    wait_for("the job from A", LONG, || {
        (returned(&db, &before) == both).then_some(())
    });
    // A goes away: the minions move to B by themselves.
    a.stop_master();
    wait_for("the minions to fail over to B", LONG, || {
        b.try_salt(&["-t", "3", "*", "test.ping"])
            .filter(|(_, r)| r.as_object().is_some_and(|m| m.len() == 2))
    });
    let (after, _) = b.salt(&["*", "cmd.run", "echo after"]);
    b.salt_run(&["event.send", "saltpipe/topo/failed-over"]);
    wait_for("the job from B and its event", LONG, || {
        (returned(&db, &after) == both
            && q(
                &db,
                "SELECT coalesce(group_concat(master_id), '') FROM salt_events \
                 WHERE tag = 'saltpipe/topo/failed-over'",
            ) == "master-b")
            .then_some(())
    });
    assert!(has_jid(&db, &before) && has_jid(&db, &after));
    assert_eq!(
        q(
            &db,
            &format!(
                "SELECT group_concat(`return` ORDER BY id, jid) FROM salt_returns WHERE jid IN ('{before}', '{after}')"
            )
        ),
        r#""before","after","before","after""#
    );
    assert!(sp_b.terminate().success());
    assert!(sp_a.terminate().success());
    each_return_once(&db);
}
