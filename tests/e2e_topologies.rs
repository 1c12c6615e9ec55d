//! Salt topologies beyond one master, end to end with real Salt processes
//! on loopback, and one saltpipe per master and per database server writing
//! ONE MariaDB database and ONE PostgreSQL database (the fixture's `Dbs`,
//! one name on both servers); every assertion is made on both
//! (docs/TOPOLOGIES.md draws each):
//!
//! * syndic: a master of masters (MoM) with one minion, one syndic node (its
//!   own master + `salt-syndic`) with two minions. A syndic minion's return
//!   reaches both masters' buses, so both saltpipes of a server write it:
//!   the sink's `(jid, id)` unique key keeps one, and the duplicate is
//!   counted. Then with only the MoM's saltpipes left, a syndic's local job
//!   still gets its `jids` row, from the `syndic/<id>/salt/job/<jid>/new`
//!   the syndic forwards up. Run on Salt 3008.5 and on the 3006 LTS line
//!   (one body, [`syndic_tree`], two tests; 3006's runs beside the rest of
//!   the suite, scripts/test.sh).
//! * multi-master hot/hot: minions with `master: [a, b]` (b on 127.0.0.2),
//!   one saltpipe per master and server; master A stopped while jobs run
//!   from B, then started again.
//! * multi-master failover (`master_type: failover`): the minions on master
//!   A, A stopped, the minions move to B by themselves, B's jobs land.
//!
//! Each topology is one test over one set-up (set-ups cost 20-40 s of
//! Salt start-up), its cases run in order inside it.

mod common;

use common::{Dbs, Saltpipe, Sandbox, free_port, my, pg, wait_for};
use std::io::{Read, Write};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

/// The fixture's database on one server, with the helper queries written
/// once for both: SQL is given in MariaDB's spelling (backquoted
/// `return` / `load`) and run as is on MariaDB, with double quotes on
/// PostgreSQL; lists are aggregated by [`Db::joined`].
struct Db {
    name: String,
    url: String,
    pg: bool,
}

impl Db {
    /// The fixture's database in MariaDB and in PostgreSQL, each with the
    /// schema created once, before two saltpipes start on it.
    fn both(dbs: &Dbs) -> [Db; 2] {
        let d = [
            Db {
                name: dbs.0.clone(),
                url: dbs.mysql_url(3306),
                pg: false,
            },
            Db {
                name: dbs.0.clone(),
                url: dbs.pg_url(5432),
                pg: true,
            },
        ];
        for db in &d {
            create_schema(&db.url);
        }
        d
    }

    fn server(&self) -> &'static str {
        if self.pg { "postgresql" } else { "mariadb" }
    }

    /// The `success` column's text for true (pgjsonb writes `true`).
    fn yes(&self) -> &'static str {
        if self.pg { "true" } else { "1" }
    }

    fn q(&self, sql: &str) -> String {
        if self.pg {
            pg(&self.name, &sql.replace('`', "\""))
        } else {
            my(&self.name, sql)
        }
    }

    fn n(&self, sql: &str) -> u64 {
        self.q(sql)
            .parse()
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.server()))
    }

    /// `expr` of the rows `from_where` selects, ordered by `order`,
    /// comma-joined ('' when none).
    fn joined(&self, expr: &str, order: &str, from_where: &str) -> String {
        if self.pg {
            self.q(&format!(
                "SELECT coalesce(string_agg(({expr})::text, ',' ORDER BY {order}), '') {from_where}"
            ))
        } else {
            self.q(&format!(
                "SELECT coalesce(group_concat({expr} ORDER BY {order}), '') {from_where}"
            ))
        }
    }

    /// The minions with a return for `jid`, sorted, comma-joined.
    fn returned(&self, jid: &str) -> String {
        self.joined(
            "id",
            "id",
            &format!("FROM salt_returns WHERE jid = '{jid}'"),
        )
    }

    fn has_jid(&self, jid: &str) -> bool {
        self.n(&format!("SELECT count(*) FROM jids WHERE jid = '{jid}'")) == 1
    }

    /// No (jid, minion) stored twice.
    fn each_return_once(&self) {
        assert_eq!(
            self.n("SELECT count(*) FROM salt_returns"),
            self.n("SELECT count(*) FROM (SELECT DISTINCT jid, id FROM salt_returns) d"),
            "{}",
            self.server()
        );
    }
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

/// A saltpipe on one master's bus writing into one database, stamping
/// `master_id`, its /metrics on `port`.
struct Pipe {
    sp: Saltpipe,
    port: u16,
    work: tempfile::TempDir,
}

impl Pipe {
    fn on(sb: &Sandbox, db: &Db, master_id: &str) -> Pipe {
        let work = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let cfg = work.path().join("saltpipe.toml");
        let text = format!(
            "[source]\n{}\nreconnect_max = \"1s\"\n\n[queue]\nurl = \"embedded://{}\"\n\n\
             [worker]\nbatch_timeout = \"100ms\"\n\n[sink]\nurl = \"{}\"\nmaster_id = \"{master_id}\"\n\n\
             [metrics]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n\n\
             [[rules.rule]]\ntag = \"saltpipe/topo/*\"\naction = \"keep\"\n",
            sb.source_line(),
            work.path().join("queue").display(),
            db.url,
        );
        std::fs::write(&cfg, text).expect("config");
        let sp = Saltpipe::start(&["run"], &cfg);
        sp.wait_log("connected to the event bus", 1, LONG);
        Pipe { sp, port, work }
    }

    /// One saltpipe on `sb` per database of `dbs`, in their order.
    fn each(sb: &Sandbox, dbs: &[Db; 2], master_id: &str) -> [Pipe; 2] {
        [
            Pipe::on(sb, &dbs[0], master_id),
            Pipe::on(sb, &dbs[1], master_id),
        ]
    }

    fn metric(&self, name: &str, labels: &str) -> u64 {
        metric(self.port, name, labels)
    }

    /// `saltpipe backfill --jid JID` from `sb`'s job cache (found through
    /// its master config) with this saltpipe's config: the job goes into
    /// the embedded queue this saltpipe is consuming, and it writes it.
    fn backfill(&self, sb: &Sandbox, jid: &str) {
        let out = common::output_ok(
            std::process::Command::new(env!("CARGO_BIN_EXE_saltpipe"))
                .arg("backfill")
                .arg("--config")
                .arg(self.work.path().join("saltpipe.toml"))
                .arg("--master-config")
                .arg(sb.dir.path().join("etc/master"))
                .args(["--jid", jid, "--json"]),
            "saltpipe backfill",
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            (
                &report["found"]["jobs"],
                &report["queued_for_running_saltpipe"]
            ),
            (&serde_json::json!(1), &serde_json::json!(true)),
            "{report}"
        );
    }

    /// SIGTERM; it must exit cleanly.
    fn stop(self) {
        assert!(self.sp.terminate().success());
    }
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

#[test]
fn syndic_tree_3008() {
    syndic_tree("3008.5");
}

/// The 3006 LTS line: its syndic forwards returns the same way, but of a
/// job only the bare-jid announcement `syndic/<id>/<jid>` (no `new`), and
/// its `_stamp`s carry no timezone (docs/TOPOLOGIES.md).
#[test]
fn syndic_tree_3006() {
    syndic_tree("3006.30");
}

/// The syndic tree on Salt `version`, a saltpipe on each master for each
/// database server.
fn syndic_tree(version: &str) {
    let mom = Sandbox::up_args(
        1,
        "ipc",
        version,
        &[
            "--prefix",
            "mom-minion",
            "--master-opt",
            "order_masters=true",
            "--master-opt",
            "id=mom",
        ],
    );
    assert_eq!(mom.salt_version(), version, "the line asked for");
    let mom_dir = mom.dir.path().to_str().expect("utf-8 path").to_owned();
    let syn = Sandbox::up_args(
        2,
        "ipc",
        version,
        &[
            "--prefix",
            "syn-minion",
            "--master-opt",
            "id=syndic-1",
            "--syndic-of",
            &mom_dir,
        ],
    );
    let fixture = Dbs::both("topo_syndic");
    let dbs = Db::both(&fixture);
    let on_mom = Pipe::each(&mom, &dbs, "mom");
    let on_syn = Pipe::each(&syn, &dbs, "syndic-1");

    // A job from the MoM (to its minion and through the syndic to the
    // syndic's two), a job local to the syndic's master, a salt-call on a
    // syndic minion.
    // (--async: the MoM's CLI would wait for the syndic id it lists as a
    // target, which never answers, and a find_job round: ~15 s.)
    let from_mom = mom.salt_async(&["*", "cmd.run", "echo from-mom"]);
    let (local, r) = syn.salt(&["*", "cmd.run", "echo local"]);
    assert_eq!(r.as_object().map(|m| m.len()), Some(2), "{r}");
    syn.salt_call("syn-minion-1", &["test.echo", "called"]);

    let echo_call = "FROM salt_returns WHERE fun = 'test.echo' AND id = 'syn-minion-1'";
    wait_for(
        "every return of the three jobs in both databases",
        LONG,
        || {
            dbs.iter()
                .all(|db| {
                    db.returned(&from_mom) == "mom-minion-1,syn-minion-1,syn-minion-2"
                        && db.returned(&local) == "syn-minion-1,syn-minion-2"
                        && db.n(&format!("SELECT count(*) {echo_call}")) == 1
                })
                .then_some(())
        },
    );
    for (i, db) in dbs.iter().enumerate() {
        let (pm, ps) = (&on_mom[i], &on_syn[i]);
        let server = db.server();
        let call = db.q(&format!("SELECT jid {echo_call}"));
        // Both saltpipes of a server wrote each syndic minion's return (5
        // of them): one row each, the second copy counted as already
        // present. Wait for the slower saltpipe's copies before counting.
        let written = || {
            pm.metric("saltpipe_rows_written_total", "salt_returns")
                + ps.metric("saltpipe_rows_written_total", "salt_returns")
        };
        let ignored = || {
            pm.metric("saltpipe_rows_ignored_total", "")
                + ps.metric("saltpipe_rows_ignored_total", "")
        };
        wait_for(
            &format!("{server}: both copies of the 5 syndic-minion returns"),
            LONG,
            || {
                let drained = [pm, ps].iter().all(|p| {
                    p.metric("saltpipe_events_kept_total", "")
                        == p.metric("saltpipe_events_acked_total", "")
                });
                (drained && written() + ignored() >= 6 + 5).then_some(())
            },
        );
        assert_eq!(written(), 6, "{server}: each (jid, minion) inserted once");
        assert!(
            ignored() >= 5,
            "{server}: the second copy of each syndic-minion return refused as present"
        );
        db.each_return_once();
        // The MoM's job, the syndic's local job, the salt-call: each a
        // jids row.
        for jid in [&from_mom, &local, &call] {
            assert!(db.has_jid(jid), "{server}: jids row for {jid}");
        }
        // The forwarded returns are understood as the minion's own.
        assert_eq!(
            db.q(&format!(
                "SELECT concat(fun, ' ', success, ' ', `return`) FROM salt_returns \
                 WHERE jid = '{from_mom}' AND id = 'syn-minion-2'"
            )),
            format!("cmd.run {} \"from-mom\"", db.yes()),
            "{server}"
        );
        // The MoM's job targets its minion and the syndic's id (its `new`),
        // and the syndic's minions (the syndic's `new`). The syndic's own
        // row is a relay's, written closed (no no_return is ever recorded
        // for it) when the syndic's forwarded announcement lands: on 3008
        // `syndic/syndic-1/salt/job/<jid>/new`, on 3006 (which forwards
        // no `new`) the bare-jid `syndic/syndic-1/<jid>`.
        let targets = format!("FROM saltpipe_targets WHERE jid = '{from_mom}'");
        assert_eq!(
            db.joined("minion", "minion", &targets),
            "mom-minion-1,syn-minion-1,syn-minion-2,syndic-1",
            "{server}"
        );
        assert_eq!(
            db.n(&format!("SELECT closed {targets} AND minion = 'syndic-1'")),
            1,
            "{server}: the syndic's relay row closed"
        );
        // The syndic is a target of the MoM's job, never a returner;
        // find_job polls are not stored.
        assert_eq!(
            db.n(
                "SELECT count(*) FROM salt_returns WHERE id = 'syndic-1' OR fun LIKE '%find_job%'"
            ),
            0,
            "{server}"
        );
    }

    // Only the MoM's saltpipes left: a job local to the syndic still has
    // its returns and its jids row with the syndic's real minion list (on
    // 3008 from the forwarded syndic/syndic-1/salt/job/<jid>/new).
    for p in on_syn {
        p.stop();
    }
    let (mom_only, _) = syn.salt(&["syn-minion-2", "test.echo", "mom-only"]);
    wait_for(
        "the syndic-local job's return through the MoM's saltpipes",
        LONG,
        || {
            dbs.iter()
                .all(|db| db.returned(&mom_only) == "syn-minion-2")
                .then_some(())
        },
    );
    if version.starts_with("3006") {
        // 3006's syndic forwards of its local jobs only the bare-jid
        // announcement (`syndic/<id>/<jid>`: minions, no function) and
        // sends the job's load inside its return batch, which the MoM
        // writes to its job cache, never to its bus: nothing the MoM's bus
        // carried says what the job was (and all it carried before the
        // return is written by now). The MoM's job cache has the
        // load: `saltpipe backfill` (and the read-back at each start and
        // reconnect) writes the jids row from it.
        for db in &dbs {
            assert!(!db.has_jid(&mom_only), "{}", db.server());
        }
        for p in &on_mom {
            p.backfill(&mom, &mom_only);
        }
    }
    wait_for("the syndic-local job's jids row", LONG, || {
        dbs.iter().all(|db| db.has_jid(&mom_only)).then_some(())
    });
    for db in &dbs {
        let load = db.q(&format!("SELECT `load` FROM jids WHERE jid = '{mom_only}'"));
        let load: serde_json::Value = serde_json::from_str(&load).expect("load json");
        assert_eq!(
            load["minions"],
            serde_json::json!(["syn-minion-2"]),
            "{}: {load}",
            db.server()
        );
        assert_eq!(load["fun"], "test.echo", "{}", db.server());
    }
    for p in on_mom {
        p.stop();
    }
}

/// Two masters sharing one key pair: B on 127.0.0.2 with no minions of its
/// own, A with two minions connected to both (`a_opts`: more of
/// `salt-sandbox.py up`'s options for A), on each a saltpipe per database
/// server, into one fresh database on each server. Fields drop in order:
/// saltpipes, databases, masters.
struct TwoMasters {
    on_a: [Pipe; 2],
    on_b: [Pipe; 2],
    dbs: [Db; 2],
    _fixture: Dbs,
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
    let fixture = Dbs::both(db_prefix);
    let dbs = Db::both(&fixture);
    TwoMasters {
        on_a: Pipe::each(&a, &dbs, "master-a"),
        on_b: Pipe::each(&b, &dbs, "master-b"),
        dbs,
        _fixture: fixture,
        a,
        b,
    }
}

#[test]
fn multi_master_hot_hot_into_one_database() {
    // Master B first (no minions of its own), on 127.0.0.2; then master A,
    // whose two minions connect to both and which takes B's key pair.
    let TwoMasters {
        on_a,
        on_b,
        dbs,
        a,
        b,
        _fixture,
    } = two_masters("topo_multi", &[]);
    let both = "minion-1,minion-2";
    let events = "FROM salt_events WHERE tag LIKE 'saltpipe/topo/%'";

    // A job from each master, an event on each master's bus.
    let (from_a, _) = a.salt(&["*", "cmd.run", "echo from-a"]);
    let (from_b, _) = b.salt(&["*", "cmd.run", "echo from-b"]);
    a.salt_run(&["event.send", "saltpipe/topo/on-a"]);
    b.salt_run(&["event.send", "saltpipe/topo/on-b"]);
    wait_for(
        "both jobs' returns and both events in both databases",
        LONG,
        || {
            dbs.iter()
                .all(|db| {
                    db.returned(&from_a) == both
                        && db.returned(&from_b) == both
                        && db.n(&format!("SELECT count(*) {events}")) == 2
                })
                .then_some(())
        },
    );
    for db in &dbs {
        let server = db.server();
        assert!(db.has_jid(&from_a) && db.has_jid(&from_b), "{server}");
        assert_eq!(
            db.q(&format!(
                "SELECT `return` FROM salt_returns WHERE jid = '{from_b}' AND id = 'minion-2'"
            )),
            "\"from-b\"",
            "{server}"
        );
        // salt_events.master_id: the master whose bus carried the event.
        assert_eq!(
            db.joined("concat(tag, '=', master_id)", "tag", events),
            "saltpipe/topo/on-a=master-a,saltpipe/topo/on-b=master-b",
            "{server}"
        );
    }

    // Master A goes away while jobs run from B, and comes back.
    let slow = b.salt_async(&["*", "cmd.run", "sleep 3; echo during"]);
    a.stop_master();
    for p in &on_a {
        p.sp.wait_log("lost the event bus", 1, LONG);
    }
    let (while_down, _) = b.salt(&["*", "test.echo", "while-a-down"]);
    a.start_master();
    for p in &on_a {
        p.sp.wait_log("connected to the event bus", 2, LONG);
    }
    let (a_back, _) = a.salt(&["*", "test.echo", "a-back"]);
    wait_for(
        "every job's returns after A's restart, in both databases",
        LONG,
        || {
            dbs.iter()
                .all(|db| {
                    [&slow, &while_down, &a_back]
                        .iter()
                        .all(|j| db.returned(j) == both && db.has_jid(j))
                })
                .then_some(())
        },
    );
    for p in on_a.into_iter().chain(on_b) {
        p.stop();
    }
    for db in &dbs {
        // Each return once; none from a find_job poll.
        db.each_return_once();
        for jid in [&from_a, &from_b, &slow, &while_down, &a_back] {
            assert_eq!(
                db.n(&format!(
                    "SELECT count(*) FROM salt_returns WHERE jid = '{jid}'"
                )),
                2,
                "{}: {jid}",
                db.server()
            );
        }
        assert_eq!(
            db.n("SELECT count(*) FROM salt_returns WHERE fun LIKE '%find_job%'"),
            0,
            "{}",
            db.server()
        );
    }
}

#[test]
fn multi_master_failover_into_one_database() {
    // Both masters on the same ports on their own addresses (a failover
    // minion has one master_port for its whole list).
    let TwoMasters {
        on_a,
        on_b,
        dbs,
        a,
        b,
        _fixture,
    } = two_masters("topo_failover", &["--minion-opt", "master_type=failover"]);
    let both = "minion-1,minion-2";

    let (before, _) = a.salt(&["*", "cmd.run", "echo before"]);
    wait_for("the job from A in both databases", LONG, || {
        dbs.iter()
            .all(|db| db.returned(&before) == both)
            .then_some(())
    });
    // A goes away: the minions move to B by themselves.
    a.stop_master();
    wait_for("the minions to fail over to B", LONG, || {
        b.try_salt(&["-t", "3", "*", "test.ping"])
            .filter(|(_, r)| r.as_object().is_some_and(|m| m.len() == 2))
    });
    let (after, _) = b.salt(&["*", "cmd.run", "echo after"]);
    b.salt_run(&["event.send", "saltpipe/topo/failed-over"]);
    let event = "FROM salt_events WHERE tag = 'saltpipe/topo/failed-over'";
    wait_for(
        "the job from B and its event in both databases",
        LONG,
        || {
            dbs.iter()
                .all(|db| {
                    db.returned(&after) == both && db.joined("master_id", "id", event) == "master-b"
                })
                .then_some(())
        },
    );
    for p in on_b.into_iter().chain(on_a) {
        p.stop();
    }
    for db in &dbs {
        assert!(db.has_jid(&before) && db.has_jid(&after), "{}", db.server());
        assert_eq!(
            db.joined(
                "`return`",
                "id, jid",
                &format!("FROM salt_returns WHERE jid IN ('{before}', '{after}')")
            ),
            r#""before","after","before","after""#,
            "{}",
            db.server()
        );
        db.each_return_once();
    }
}
