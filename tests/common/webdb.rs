//! The web pages' test database, filled through saltpipe itself: `saltpipe
//! replay` of the project's real-master bus captures (tests/fixtures) and
//! of crafted jobs carrying XSS probes in state ids, comments, changes and
//! a minion id, plus enough jobs to page through. The same fill on SQLite,
//! MariaDB and PostgreSQL (pgjsonb and the `postgres` text schema), so each
//! page test runs on every backend.

use super::{Dbs, my, pg, repo};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Escaping probes; a page must show them as text.
pub const PROBE_SCRIPT: &str = "<script>alert(1)</script>";
pub const PROBE_IMG: &str = "\"><img src=x onerror=alert(1)>";
/// A minion whose id is a probe.
pub const PROBE_MINION: &str = "\"><img src=x onerror=alert(2)>";
/// `test.ping` jobs added so the job list has more than one page.
pub const PING_JOBS: usize = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Mysql,
    Postgres,
    /// PostgreSQL with `[sink] schema = "postgres"` (the text tables).
    PostgresText,
}

pub const BACKENDS: [Backend; 4] = [
    Backend::Sqlite,
    Backend::Mysql,
    Backend::Postgres,
    Backend::PostgresText,
];

pub struct WebDb {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub url: String,
    /// The MariaDB/PostgreSQL database (dropped with this); none for SQLite.
    dbs: Option<Dbs>,
    /// The failing job of the crafted data.
    pub failing_jid: String,
}

/// A jid for `ago` before now (UTC, Salt's format).
pub fn jid_ago(ago: Duration) -> String {
    saltpipe::web::data::jid_at(SystemTime::now() - ago)
}

fn state(
    id: &str,
    name: &str,
    fun: &str,
    result: bool,
    comment: &str,
    changes: Value,
    n: u32,
) -> (String, Value) {
    let (module, f) = fun.split_once('.').unwrap_or((fun, ""));
    (
        format!("{module}_|-{id}_|-{name}_|-{f}"),
        json!({"__id__": id, "name": name, "result": result, "comment": comment,
               "changes": changes, "__run_num__": n, "duration": 1.25 + f64::from(n),
               "start_time": "12:00:00.000000"}),
    )
}

fn frame(tag: &str, data: &Value) -> Vec<u8> {
    let body = rmp_serde::to_vec_named(data).expect("msgpack");
    saltpipe::bus::encode::frame(tag, &body)
}

/// The crafted jobs as a bus capture; gives the failing job's jid.
pub fn crafted_capture(path: &Path) -> String {
    let mut out = Vec::new();
    let failing = jid_ago(Duration::from_secs(1800));
    let minions = ["web-1", "web-2", "db-1", PROBE_MINION];
    out.extend(frame(
        &format!("salt/job/{failing}/new"),
        &json!({"jid": failing, "fun": "state.apply", "arg": ["webapp", PROBE_SCRIPT],
                "tgt": "web* or db*", "tgt_type": "compound", "user": "alice", "minions": minions}),
    ));
    for m in minions {
        let states: Vec<(String, Value)> = match m {
            "web-1" => vec![state(
                "motd",
                "/etc/motd",
                "file.managed",
                true,
                "File is in the correct state",
                json!({}),
                0,
            )],
            "web-2" => vec![state(
                "motd",
                "/etc/motd",
                "file.managed",
                true,
                "File updated",
                json!({"diff": "+hello"}),
                0,
            )],
            _ => vec![
                state(
                    "motd",
                    "/etc/motd",
                    "file.managed",
                    true,
                    "File is in the correct state",
                    json!({}),
                    0,
                ),
                state(
                    "probe_state",
                    PROBE_SCRIPT,
                    "cmd.run",
                    false,
                    PROBE_SCRIPT,
                    json!({"stdout": PROBE_IMG}),
                    1,
                ),
                state(
                    "second",
                    "/bin/false",
                    "cmd.run",
                    false,
                    &format!("failed: {PROBE_IMG}"),
                    json!({}),
                    2,
                ),
            ],
        };
        let ret: serde_json::Map<String, Value> = states.into_iter().collect();
        let failed = m != "web-1" && m != "web-2";
        out.extend(frame(
            &format!("salt/job/{failing}/ret/{m}"),
            &json!({"cmd": "_return", "id": m, "jid": failing, "fun": "state.apply",
                    "fun_args": ["webapp"], "return": ret, "retcode": if failed { 2 } else { 0 },
                    "success": !failed, "out": "highstate"}),
        ));
    }
    for i in 0..PING_JOBS {
        let jid = jid_ago(Duration::from_secs(1200 - i as u64 * 10));
        out.extend(frame(
            &format!("salt/job/{jid}/new"),
            &json!({"jid": jid, "fun": "test.ping", "arg": [], "tgt": "web-1",
                    "tgt_type": "glob", "user": "root", "minions": ["web-1"]}),
        ));
        out.extend(frame(
            &format!("salt/job/{jid}/ret/web-1"),
            &json!({"cmd": "_return", "id": "web-1", "jid": jid, "fun": "test.ping",
                    "fun_args": [], "return": true, "retcode": 0, "success": true}),
        ));
    }
    std::fs::write(path, out).expect("write capture");
    failing
}

fn replay(config: &Path, file: &Path) {
    super::output_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_saltpipe"))
            .arg("--config")
            .arg(config)
            .arg("replay")
            .arg(file),
        &format!("replay {}", file.display()),
    );
}

/// The config of a saltpipe writing to (and serving) `url`.
pub fn config_text(dir: &Path, url: &str, web: &str) -> String {
    format!(
        "[queue]\nurl = \"embedded://{}\"\n\n[worker]\nbatch_timeout = \"100ms\"\n\n[sink]\nurl = \"{url}\"\n\n[metrics]\nenabled = false\n\n[web]\nstale_after = \"3650d\"\n{web}\n",
        dir.join("queue").display()
    )
}

impl WebDb {
    /// A fresh database of `backend`, filled.
    pub fn fill(backend: Backend) -> WebDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, dbs) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("salt.db").display()),
                None,
            ),
            Backend::Mysql => {
                let d = Dbs::mysql("web");
                (d.mysql_url(3306), Some(d))
            }
            Backend::Postgres | Backend::PostgresText => {
                let d = Dbs::postgres("web");
                (d.pg_url(5432), Some(d))
            }
        };
        let config = dir.path().join("saltpipe.toml");
        let mut text = config_text(dir.path(), &url, "");
        if backend == Backend::PostgresText {
            text = text.replace("[sink]\n", "[sink]\nschema = \"postgres\"\n");
        }
        std::fs::write(&config, text).expect("config");
        for f in ["salt-3006.29-bus.bin", "salt-3008.5-bus.bin"] {
            replay(&config, &repo().join("tests/fixtures").join(f));
        }
        let crafted = dir.path().join("crafted.bin");
        let failing_jid = crafted_capture(&crafted);
        replay(&config, &crafted);
        WebDb {
            backend,
            dir,
            url,
            dbs,
            failing_jid,
        }
    }

    /// The MariaDB/PostgreSQL database's name.
    fn db(&self) -> &str {
        self.dbs.as_ref().map_or("", |d| d.0.as_str())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("saltpipe.toml")
    }

    /// One integer from SQL, asked of the database with its own client.
    pub fn count(&self, sql: &str) -> i64 {
        let text = match self.backend {
            Backend::Sqlite => {
                let c = rusqlite::Connection::open_with_flags(
                    self.dir.path().join("salt.db"),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .expect("open");
                return c.query_row(sql, [], |r| r.get(0)).expect(sql);
            }
            Backend::Mysql => my(self.db(), sql),
            Backend::Postgres | Backend::PostgresText => pg(self.db(), sql),
        };
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql}: {text}"))
    }

    /// Statements that change the database (test set-up only).
    pub fn exec(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let c = rusqlite::Connection::open(self.dir.path().join("salt.db")).expect("open");
                c.execute_batch(sql).expect(sql);
            }
            Backend::Mysql => {
                my(self.db(), sql);
            }
            Backend::Postgres | Backend::PostgresText => {
                pg(self.db(), sql);
            }
        }
    }
}
