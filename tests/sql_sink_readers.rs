//! Compatibility with Salt's real readers: after an end-to-end run with a
//! real master, Salt's own job-cache functions (saltext-mysql's for
//! MariaDB, Salt's pgjsonb returner's for PostgreSQL: get_load, get_jid,
//! get_jids, get_fun, get_minions), pointed at the database saltpipe wrote,
//! return the jobs and returns the master's own job cache
//! (`salt-run jobs.lookup_jid`) shows for those jids: minion jobs, and
//! runner jobs, orchestrations and wheel jobs, stored as the master job
//! cache stores them (one return with the master's id).

#![cfg(all(feature = "mysql", feature = "postgres"))]

mod common;

use common::{Dbs, Saltpipe, Sandbox, my, pg, repo, salt_venv, wait_for};
use serde_json::Value;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);
/// The sandbox master's `id` (scripts/salt-sandbox.py).
const MASTER_ID: &str = "saltpipe-sandbox-master";
/// An orchestration with a passing and a failing step.
const ORCH_SLS: &str = "step_ok:\n  salt.function:\n    - name: test.ping\n    - tgt: '*'\n\n\
                        step_fail:\n  salt.state:\n    - tgt: minion-1\n    - sls: failing\n";

/// The event data without `_stamp`: Salt's job cache keeps the `new`
/// event's, the bus's `ret` carries its own.
fn unstamped(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("_stamp");
    }
    v
}

fn config(
    dir: &std::path::Path,
    bus: &std::path::Path,
    name: &str,
    url: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[source]\nsocket = \"{}\"\n\n[queue]\nurl = \"embedded://{}\"\n\n\
             [worker]\nbatch_timeout = \"100ms\"\n\n[sink]\nurl = \"{url}\"\n\
             master_id = \"{MASTER_ID}\"\n",
            bus.display(),
            dir.join(format!("queue-{name}")).display(),
        ),
    )
    .expect("config");
    path
}

fn read(backend: &str, db: &str, jids: &[&str], funs: &[&str]) -> Value {
    let mut cmd = std::process::Command::new(salt_venv().join("bin/python"));
    cmd.arg(repo().join("scripts/salt-job-cache-read.py"))
        .args(["--backend", backend, "--db", db]);
    if backend == "pgjsonb" {
        cmd.args(["--user", "postgres"]);
    }
    for j in jids {
        cmd.args(["--jid", j]);
    }
    for f in funs {
        cmd.args(["--fun", f]);
    }
    let out = cmd.output().expect("python");
    assert!(
        out.status.success(),
        "{backend} reader: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reader json")
}

#[test]
fn salts_job_cache_functions_read_what_saltpipe_wrote() {
    let dbs = Dbs::both("r");
    let db = dbs.0.clone();

    let sb = Sandbox::up(2);
    let work = tempfile::tempdir().expect("tempdir");
    let bus = sb.event_pub();
    let to_my = Saltpipe::start(
        &["run"],
        &config(
            work.path(),
            &bus,
            "mysql",
            &format!("mysql://root@127.0.0.1:3306/{db}"),
        ),
    );
    let to_pg = Saltpipe::start(
        &["run"],
        &config(
            work.path(),
            &bus,
            "pg",
            &format!("postgres://postgres@127.0.0.1:5432/{db}"),
        ),
    );
    to_my.wait_log("connected to the event bus", 1, LONG);
    to_pg.wait_log("connected to the event bus", 1, LONG);

    let (ping, _) = sb.salt(&["*", "test.ping"]);
    let (echo, _) = sb.salt(&["*", "cmd.run", "echo héllo 😀"]);
    let (multi, _) = sb.salt(&["*", "test.ping,test.echo", ",", "hello"]);
    let jids = [ping.as_str(), echo.as_str(), multi.as_str()];
    // Runner jobs: a plain runner and an orchestration with a failing step.
    let orch = sb.dir.path().join("srv/salt/orch");
    std::fs::create_dir_all(&orch).expect("orch dir");
    std::fs::write(orch.join("fail.sls"), ORCH_SLS).expect("orch sls");
    sb.salt_run(&["test.arg", "a", "b=1"]);
    sb.salt_run(&["state.orchestrate", "orch.fail"]);
    // A wheel job, through Salt's own WheelClient (as salt-api's `wheel`
    // client runs one): Salt's job cache records it like a runner job.
    let wheel = sb.wheel(&["key.list_all"]);
    let wheel_jid = wheel["jid"].as_str().expect("wheel jid").to_owned();
    assert_eq!(wheel["fun"], "wheel.key.list_all", "{wheel}");
    for (name, count) in [
        (
            "mysql",
            Box::new(|| my(&db, "SELECT count(*) FROM salt_returns")) as Box<dyn Fn() -> String>,
        ),
        (
            "pg",
            Box::new(|| pg(&db, "SELECT count(*) FROM salt_returns")),
        ),
    ] {
        // 6 minion returns, 2 orchestration steps' returns, 2 runner jobs,
        // 1 wheel job.
        wait_for(&format!("11 returns in {name}"), LONG, || {
            (count().parse::<i64>().unwrap_or(0) >= 11).then_some(())
        });
    }
    assert!(to_my.terminate().success());
    assert!(to_pg.terminate().success());

    let runner_jid = |fun: &str| {
        my(
            &db,
            &format!("SELECT jid FROM salt_returns WHERE fun = '{fun}'"),
        )
    };
    let arg_jid = runner_jid("runner.test.arg");
    let orch_jid = runner_jid("runner.state.orchestrate");
    assert_eq!(
        pg(
            &db,
            &format!("SELECT id FROM salt_returns WHERE jid = '{arg_jid}'")
        ),
        MASTER_ID
    );
    let wheel_row =
        format!("SELECT concat(id, ' ', fun) FROM salt_returns WHERE jid = '{wheel_jid}'");
    assert_eq!(
        my(&db, &wheel_row),
        format!("{MASTER_ID} wheel.key.list_all")
    );
    assert_eq!(
        pg(&db, &wheel_row),
        format!("{MASTER_ID} wheel.key.list_all")
    );
    // saltpipe's outcome: a failed orchestration step fails the orchestration.
    for (jid, want) in [(&arg_jid, "ok"), (&orch_jid, "failed"), (&wheel_jid, "ok")] {
        let q = format!(
            "SELECT outcome FROM saltpipe_outcomes WHERE jid = '{jid}' AND minion = '{MASTER_ID}'"
        );
        assert_eq!(my(&db, &q), want, "mysql outcome of {jid}");
        assert_eq!(pg(&db, &q), want, "pg outcome of {jid}");
    }
    let arg_lookup = sb.salt_run(&["jobs.lookup_jid", &arg_jid]);
    // The master's own job cache has the wheel job, under its id.
    let wheel_lookup = sb.salt_run(&["jobs.lookup_jid", &wheel_jid]);
    assert_eq!(
        wheel_lookup[MASTER_ID]["fun"], "wheel.key.list_all",
        "Salt's job cache records wheel jobs: {wheel_lookup}"
    );
    for (backend, dbname) in [("mysql", &db), ("pgjsonb", &db)] {
        let r = read(backend, dbname, &[&arg_jid, &orch_jid, &wheel_jid], &[]);
        // A master job (runner, wheel) reads back as the master's one
        // return, equal to what Salt's own job cache gives.
        let as_salt_stores_it = |jid: &str, lookup: &Value, what: &str| {
            let got = r["jid"][jid]
                .as_object()
                .unwrap_or_else(|| panic!("get_jid of a {what} job"));
            assert_eq!(got.len(), 1, "{backend}: one return, the master's: {got:?}");
            assert_eq!(
                unstamped(&got[MASTER_ID]["return"]),
                unstamped(&lookup[MASTER_ID]),
                "{backend}: get_jid({what} job) vs jobs.lookup_jid"
            );
        };
        as_salt_stores_it(&arg_jid, &arg_lookup, "runner");
        assert_eq!(r["load"][&arg_jid]["fun"], "runner.test.arg", "{backend}");
        assert_eq!(r["load"][&arg_jid]["user"], "root", "{backend}");
        let orch = &r["jid"][&orch_jid][MASTER_ID]["return"];
        assert_eq!(orch["success"], false, "{backend}: {orch}");
        assert_eq!(orch["fun"], "runner.state.orchestrate");
        assert!(r["jids"].get(&orch_jid).is_some(), "{backend}: get_jids()");
        as_salt_stores_it(&wheel_jid, &wheel_lookup, "wheel");
        assert_eq!(
            r["jid"][&wheel_jid][MASTER_ID]["return"]["return"], wheel["return"],
            "{backend}: the wheel function's own return"
        );
        assert_eq!(
            r["load"][&wheel_jid]["fun"], "wheel.key.list_all",
            "{backend}"
        );
        assert!(r["jids"].get(&wheel_jid).is_some(), "{backend}: get_jids()");
    }

    // What the master's own job cache says.
    let lookup: Vec<Value> = jids
        .iter()
        .map(|j| sb.salt_run(&["jobs.lookup_jid", j]))
        .collect();
    for (backend, dbname) in [("mysql", &db), ("pgjsonb", &db)] {
        let r = read(backend, dbname, &jids, &["test.ping", "cmd.run"]);
        for (jid, master) in jids.iter().zip(&lookup) {
            let master = master.as_object().expect("lookup_jid map");
            assert_eq!(master.len(), 2, "{jid}: {master:?}");
            let got = r["jid"][jid]
                .as_object()
                .unwrap_or_else(|| panic!("{backend}: get_jid({jid}) = {}", r["jid"][jid]));
            assert_eq!(got.len(), master.len(), "{backend} {jid}");
            for (minion, ret) in master {
                assert_eq!(
                    &got[minion]["return"], ret,
                    "{backend}: get_jid({jid})[{minion}] vs jobs.lookup_jid"
                );
                assert_eq!(got[minion]["jid"], *jid);
            }
            let load = &r["load"][jid];
            assert_eq!(load["jid"], *jid, "{backend}: get_load({jid}) = {load}");
            assert!(
                r["jids"].get(jid).is_some(),
                "{backend}: get_jids() lacks {jid}"
            );
        }
        assert_eq!(r["load"][&echo]["fun"], "cmd.run");
        assert_eq!(
            r["load"][&multi]["fun"],
            serde_json::json!(["test.ping", "test.echo"])
        );
        assert_eq!(r["jids"][&echo]["Function"], "cmd.run");
        // The runner jobs' returns carry the master's id, as when Salt's
        // own master_job_cache writes them: get_minions lists it too.
        assert_eq!(
            r["minions"],
            serde_json::json!(["minion-1", "minion-2", MASTER_ID]),
            "{backend}: get_minions()"
        );
        for f in ["test.ping", "cmd.run"] {
            let latest = r["fun"][f].as_object().expect("get_fun map");
            assert_eq!(latest.len(), 2, "{backend}: get_fun({f}) = {latest:?}");
        }
        assert_eq!(r["fun"]["cmd.run"]["minion-1"]["jid"], echo);
    }
}
