//! Alcali (latenighttales/alcali, the Salt web UI most users who keep
//! returns in SQL run) reads the returner tables with its own queries. Its
//! job list, job detail, failed-job count and highstate conformity, taken
//! from its source and run here as the SQL its Django models send plus the
//! Python its models run on the rows, against saltpipe's MariaDB and both
//! PostgreSQL schemas (`[sink] schema = "pgjsonb"` and `"postgres"`, the
//! `postgres` returner's text tables Alcali documents for PostgreSQL).
//!
//! The data: the real Salt 3008.5 bus capture (tests/fixtures), replayed by
//! `saltpipe replay`, plus one passing highstate on minion-2 (the capture's
//! only state run is `state.apply failing`, which Alcali skips as a run
//! with arguments). No Salt process: the capture is the master's bus.

mod common;

use common::{Dbs, pg, sql_cli};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;

/// One backend: how to run a statement, and the sink it is.
struct Backend {
    name: &'static str,
    db: String,
    mysql: bool,
}

impl Backend {
    fn q(&self, sql: &str) -> String {
        if self.mysql {
            // -r: values as stored (batch mode alone escapes backslashes).
            sql_cli(
                "mysql",
                &["-h127.0.0.1", "-uroot", "-N", "-B", "-r", &self.db, "-e"],
                sql,
            )
        } else {
            pg(&self.db, sql)
        }
    }

    fn lines(&self, sql: &str) -> BTreeSet<String> {
        self.q(sql).lines().map(str::to_owned).collect()
    }

    /// `SaltReturns.loaded_ret()`: `json.loads(full_ret)`.
    fn loaded_ret(&self, jid: &str, id: &str) -> Value {
        let text = self.q(&format!(
            "SELECT full_ret FROM salt_returns WHERE jid = '{jid}' AND id = '{id}'"
        ));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: full_ret {e}: {text}", self.name))
    }

    /// `Jids.user()`: `json.loads(load)["user"]`, else "".
    fn user(&self, jid: &str) -> String {
        // Quoted as Django quotes it (`load` is a MySQL keyword).
        let load = if self.mysql { "`load`" } else { "\"load\"" };
        let text = self.q(&format!("SELECT {load} FROM jids WHERE jid = '{jid}'"));
        let load: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: no jids row for {jid} ({e})", self.name));
        load["user"].as_str().unwrap_or("").to_owned()
    }
}

/// The capture plus a passing highstate (`state.apply` with no argument)
/// of minion-2, announced and returned.
fn capture_with_a_highstate(dir: &Path) -> std::path::PathBuf {
    let jid = "20991231000000000001";
    let new = json!({
        "jid": jid, "fun": "state.apply", "arg": [], "tgt": "minion-2", "tgt_type": "glob",
        "user": "root", "minions": ["minion-2"], "missing": [],
        "_stamp": "2026-12-02T12:00:00.000000+00:00"
    });
    let ret = json!({
        "cmd": "_return", "id": "minion-2", "jid": jid, "fun": "state.apply", "fun_args": [],
        "return": {
            "cmd_|-passing_step_|-true_|-run": {"result": true, "changes": {}, "comment": "ok",
                                                "name": "true", "__run_num__": 0},
            "cmd_|-echo_step_|-echo hello_|-run": {"result": true, "changes": {}, "comment": "ok",
                                                   "name": "echo hello", "__run_num__": 1}
        },
        "retcode": 0, "success": true, "out": "highstate", "user": "root",
        "_stamp": "2026-12-02T12:00:01.000000+00:00"
    });
    let mut bytes =
        std::fs::read(common::repo().join("tests/fixtures/salt-3008.5-bus.bin")).expect("capture");
    for (tag, data) in [
        (format!("salt/job/{jid}/new"), new),
        (format!("salt/job/{jid}/ret/minion-2"), ret),
    ] {
        let data = rmp_serde::to_vec_named(&data).expect("msgpack");
        bytes.extend(saltpipe::bus::encode::frame(&tag, &data));
    }
    let path = dir.join("capture.bin");
    std::fs::write(&path, bytes).expect("write capture");
    path
}

fn replay(capture: &Path, work: &Path, url: &str, schema: &str) {
    let queue = format!("embedded://{}", work.join("queue").display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["replay", "--json"])
        .arg(capture)
        .env("SALTPIPE_QUEUE_URL", &queue)
        .env("SALTPIPE_SINK_URL", url)
        .env("SALTPIPE_SINK_SCHEMA", schema)
        .env("SALTPIPE_SINK_MASTER_ID", "alcali-master")
        .env("SALTPIPE_METRICS_ENABLED", "false")
        .output()
        .expect("replay");
    assert!(
        out.status.success(),
        "replay into {url} ({schema}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `Minions.last_highstate()` then `Minions.conformity()`: the newest (by
/// jid) `state.apply`/`state.highstate` return of the minion run without
/// arguments (or with test=True); conformity is whether every state's
/// `result` is true; None when there is no such run.
fn conformity(b: &Backend, minion: &str) -> Option<bool> {
    let mut jids: Vec<String> = b
        .lines(&format!(
            "SELECT jid FROM salt_returns WHERE fun <> 'saltutil.find_job' \
             AND (fun = 'state.apply' OR fun = 'state.highstate') AND id = '{minion}'"
        ))
        .into_iter()
        .collect();
    jids.sort_unstable_by(|a, b| b.cmp(a));
    let last = jids.iter().map(|j| b.loaded_ret(j, minion)).find(|ret| {
        let args = &ret["fun_args"];
        args.as_array().is_none_or(|a| a.is_empty())
            || args[0] == json!({"test": true})
            || args[0] == "test=True"
    })?;
    let states = last["return"].as_object()?;
    Some(
        states
            .values()
            .all(|s| s["result"].as_bool().unwrap_or(false)),
    )
}

#[test]
fn alcalis_queries_find_the_same_jobs_on_mariadb_and_both_postgresql_schemas() {
    let work = tempfile::tempdir().expect("tmp");
    let capture = capture_with_a_highstate(work.path());
    let (both, text) = (Dbs::both("alcali"), Dbs::postgres("alcali_text"));
    let backends = [
        (
            both.mysql_url(3306),
            "pgjsonb",
            Backend {
                name: "mariadb",
                db: both.0.clone(),
                mysql: true,
            },
        ),
        (
            both.pg_url(5432),
            "pgjsonb",
            Backend {
                name: "pgjsonb",
                db: both.0.clone(),
                mysql: false,
            },
        ),
        (
            text.pg_url(5432),
            "postgres",
            Backend {
                name: "postgres",
                db: text.0.clone(),
                mysql: false,
            },
        ),
    ];
    for (i, (url, schema, _)) in backends.iter().enumerate() {
        let dir = work.path().join(i.to_string());
        std::fs::create_dir_all(&dir).expect("dir");
        replay(&capture, &dir, url, schema);
    }
    // The text schema is text: Alcali's TextFields.
    assert_eq!(
        pg(
            &text.0,
            "SELECT string_agg(table_name || '.' || column_name || '=' || data_type, ',' \
             ORDER BY table_name, column_name) FROM information_schema.columns \
             WHERE column_name IN ('load', 'return', 'full_ret', 'data') \
             AND table_name IN ('jids', 'salt_returns', 'salt_events')"
        ),
        "jids.load=text,salt_events.data=text,salt_returns.full_ret=text,salt_returns.return=text"
    );

    let mut lists = Vec::new();
    for (_, _, b) in &backends {
        // Job list (SaltReturnsList): the newest 50 returns but find_job.
        let list = b.lines(
            "SELECT concat_ws(' ', jid, id, fun) FROM salt_returns \
             WHERE NOT (fun = 'saltutil.find_job') ORDER BY alter_time DESC LIMIT 50",
        );
        assert_eq!(list.len(), 16, "{}: {list:?}", b.name);
        // Each row's user (SaltReturns.user(), through its jids row).
        let users: BTreeSet<String> = list
            .iter()
            .map(|l| b.user(l.split(' ').next().expect("jid")))
            .collect();
        assert_eq!(
            users,
            ["", "root"].iter().map(|s| s.to_string()).collect(),
            "{}: published jobs by root, salt-call ones without a user",
            b.name
        );

        // Job detail (SaltReturnsListJid, SaltReturnsRetrieve, job_rendered):
        // the `echo hi` job's two returns, arguments and return value.
        let echo: Vec<String> = list
            .iter()
            .filter(|l| l.ends_with(" cmd.run"))
            .map(|l| l.split(' ').next().expect("jid").to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|j| b.loaded_ret(j, "minion-1")["return"] == "hi")
            .collect();
        assert_eq!(echo.len(), 1, "{}", b.name);
        let detail = b.lines(&format!(
            "SELECT id FROM salt_returns WHERE NOT (fun = 'saltutil.find_job') \
             AND jid = '{}' ORDER BY alter_time DESC",
            echo[0]
        ));
        assert_eq!(
            detail.into_iter().collect::<Vec<_>>(),
            ["minion-1", "minion-2"]
        );
        let ret = b.loaded_ret(&echo[0], "minion-2");
        assert_eq!(
            (&ret["fun_args"], &ret["return"], &ret["success"]),
            (&json!(["echo hi"]), &json!("hi"), &json!(true))
        );

        // Failed-job count (graph_data): per day, returns and those with
        // success = '0'.
        let failed = |success: &str| {
            b.q(&format!(
                "SELECT concat_ws(' ', count(jid), count(CASE WHEN success = '{success}' THEN success END)) \
                 FROM salt_returns WHERE NOT (fun = 'saltutil.find_job') GROUP BY date(alter_time)"
            ))
        };
        // exit 3 x2, the failing state run x2, the two salt-call returns
        // (no `success`: false, as Salt's returners store them).
        if b.name == "pgjsonb" {
            // pgjsonb stores `success` as Salt's pgjsonb returner does
            // (true/false): Alcali's success = '0' counts no failure there,
            // which is why the `postgres` schema writes 1/0.
            assert_eq!(failed("0"), "16 0", "{}", b.name);
            assert_eq!(failed("false"), "16 6", "{}", b.name);
        } else {
            assert_eq!(failed("0"), "16 6", "{}", b.name);
        }

        // Highstate conformity (Minions.conformity): minion-1 only ran a
        // state with arguments (unknown), minion-2's highstate passed.
        assert_eq!(conformity(b, "minion-1"), None, "{}", b.name);
        assert_eq!(conformity(b, "minion-2"), Some(true), "{}", b.name);
        lists.push(list);
    }
    // The same jobs, whichever database Alcali reads.
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[0], lists[2]);
}
