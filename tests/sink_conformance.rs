//! One conformance suite for every SQL sink: the same cases run against
//! SQLite, MariaDB and PostgreSQL (the real servers on loopback, each test
//! in a database of its own with a random name, dropped afterwards).
//!
//! What a sink must do, whatever the backend: store each return once even
//! when a batch is delivered again; keep 4-byte UTF-8, 1 MiB returns,
//! multi-function jobs, salt-call returns and trimmed returns intact in the
//! returner's columns; let the worker put a refused row in the dead-letter
//! table while the rest of its batch lands; and purge old rows for
//! retention. And never lose a good return for a column: a multi-function
//! `fun` wider than the returner's varchar(50) is cut, a NUL character
//! (which PostgreSQL cannot store) is written as the text `\u0000`; store
//! each `salt_events` row once too, also in a table made by an older
//! version (the dedupe column is added).

mod common;

use async_trait::async_trait;
use bytes::Bytes;
use rmpv::Value as V;
use saltpipe::bus::encode::frame;
use saltpipe::event::Event;
use saltpipe::queue::{Consumer, Delivery, QueueError};
use saltpipe::sink::{Record, Sink, SinkConfig, SinkUrl};
use saltpipe::stats::Stats;
use saltpipe::worker::{Stop, Worker, WorkerConfig};
use serde_json::Value as J;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------- events

fn packed(data: Vec<(&str, V)>) -> Vec<u8> {
    let v = V::Map(data.into_iter().map(|(k, v)| (V::from(k), v)).collect());
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).expect("encode");
    out
}

fn record_raw(tag: &str, data: &[u8]) -> Record {
    Record::new(
        Event::from_frame(&Bytes::from(frame(tag, data))).expect("decode"),
        0,
    )
}

fn record(tag: &str, data: Vec<(&str, V)>) -> Record {
    record_raw(tag, &packed(data))
}

fn new_job(jid: &str, fun: &str) -> Record {
    new_job_for(jid, fun, &["m1", "m2"], "2026-11-25T12:00:00.000000+00:00")
}

fn ret(jid: &str, minion: &str, fun: &str, value: V) -> Record {
    record(
        &format!("salt/job/{jid}/ret/{minion}"),
        vec![
            ("cmd", V::from("_return")),
            ("id", V::from(minion)),
            ("jid", V::from(jid)),
            ("fun", V::from(fun)),
            ("fun_args", V::Array(vec![])),
            ("return", value),
            ("retcode", V::from(0)),
            ("success", V::from(true)),
            ("user", V::from("root")),
            ("_stamp", V::from("2026-11-25T12:00:00.100000+00:00")),
        ],
    )
}

fn jid() -> String {
    // 20 digits like Salt's, unique per call so tests never collide.
    format!("2026112512{:010}", rand::random::<u32>())
}

// ---------------------------------------------------------------- backends

/// One row of `salt_returns`, JSON columns parsed.
#[derive(Debug, Clone, PartialEq)]
struct ReturnRow {
    jid: String,
    id: String,
    fun: String,
    success: String,
    ret: J,
    full_ret: J,
}

/// One row of `saltpipe_outcomes`.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    jid: String,
    minion: String,
    outcome: String,
    fun: String,
    states: Option<(i64, i64, i64, i64)>,
    stamp: String,
}

const OUTCOME_COLUMNS: &str =
    "jid, minion, outcome, fun, states_total, states_failed, states_changed, duration_ms";

fn outcome_of(
    (jid, minion, outcome, fun): (String, String, String, String),
    (t, f, c, d): (Option<i64>, Option<i64>, Option<i64>, Option<i64>),
    stamp: String,
) -> Outcome {
    let states = t.map(|t| (t, f.unwrap_or(-1), c.unwrap_or(-1), d.unwrap_or(-1)));
    Outcome {
        jid,
        minion,
        outcome,
        fun,
        states,
        stamp,
    }
}

#[async_trait]
trait Backend: Send + Sync + Sized {
    /// A fresh, empty database of its own.
    async fn fresh() -> Self;
    fn url(&self) -> String;
    /// What a Python driver writes for True in `success`.
    fn true_word(&self) -> &'static str;
    async fn returns(&self) -> Vec<ReturnRow>;
    async fn jids(&self) -> Vec<(String, J)>;
    async fn dead_letters(&self) -> Vec<(String, String)>;
    async fn events(&self) -> Vec<(String, J)>;
    /// `saltpipe_outcomes`, ordered by jid and minion, stamps as
    /// `YYYY-MM-DD HH:MM:SS.ffffff` UTC.
    async fn outcomes(&self) -> Vec<Outcome>;
    /// Runs a statement (for test set-up, e.g. ageing rows).
    async fn exec(&self, sql: &str);
    /// Rows in `table` (which may go on with a `WHERE` clause).
    async fn count(&self, table: &str) -> i64;
    /// A record this backend's database itself refuses.
    fn refused_record(&self) -> Record;
    /// SQL that makes the rows written in the last day `days` old.
    fn age_sql(&self, table: &str, days: u32) -> String;
    /// Whether a NUL character is stored as the six characters `\u0000`.
    fn escapes_nul(&self) -> bool {
        false
    }
    /// `salt_events` and its archive as an older saltpipe (or Salt) made
    /// them, without `saltpipe_key`, one statement each; and a row as Salt's
    /// own event_return writes it.
    fn old_events_ddl(&self) -> Vec<&'static str>;
}

fn sink_config(url: &str) -> SinkConfig {
    SinkConfig {
        url: SinkUrl::parse(url).expect("url"),
        master_id: Some("conformance".into()),
        ..SinkConfig::default()
    }
}

async fn build(b: &impl Backend) -> Arc<dyn Sink> {
    sink_config(&b.url()).build().await.expect("build sink")
}

fn json(s: &str) -> J {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:.200}"))
}

struct Sqlite {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Sqlite {
    fn query<T>(&self, sql: &str, f: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>) -> Vec<T> {
        let c = rusqlite::Connection::open(&self.path).expect("open");
        let mut st = c.prepare(sql).expect("prepare");
        st.query_map([], |r| f(r))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows")
    }
}

#[async_trait]
impl Backend for Sqlite {
    async fn fresh() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("salt.db");
        Sqlite { _dir: dir, path }
    }
    fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
    fn true_word(&self) -> &'static str {
        "1"
    }
    async fn returns(&self) -> Vec<ReturnRow> {
        self.query(
            r#"SELECT jid, id, fun, success, "return", full_ret FROM salt_returns ORDER BY jid, id"#,
            |r| {
                Ok(ReturnRow {
                    jid: r.get(0)?,
                    id: r.get(1)?,
                    fun: r.get(2)?,
                    success: r.get(3)?,
                    ret: json(&r.get::<_, String>(4)?),
                    full_ret: json(&r.get::<_, String>(5)?),
                })
            },
        )
    }
    async fn jids(&self) -> Vec<(String, J)> {
        self.query("SELECT jid, load FROM jids ORDER BY jid", |r| {
            Ok((r.get(0)?, json(&r.get::<_, String>(1)?)))
        })
    }
    async fn dead_letters(&self) -> Vec<(String, String)> {
        self.query(
            "SELECT tag, error FROM saltpipe_dead_letters ORDER BY id",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }
    async fn events(&self) -> Vec<(String, J)> {
        self.query("SELECT tag, data FROM salt_events ORDER BY id", |r| {
            Ok((r.get(0)?, json(&r.get::<_, String>(1)?)))
        })
    }
    async fn outcomes(&self) -> Vec<Outcome> {
        self.query(
            &format!("SELECT {OUTCOME_COLUMNS}, stamp FROM saltpipe_outcomes ORDER BY jid, minion"),
            |r| {
                Ok(outcome_of(
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?),
                    (r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?),
                    r.get(8)?,
                ))
            },
        )
    }
    async fn exec(&self, sql: &str) {
        let c = rusqlite::Connection::open(&self.path).expect("open");
        c.execute_batch(sql).expect("exec");
    }
    async fn count(&self, table: &str) -> i64 {
        self.query(&format!("SELECT count(*) FROM {table}"), |r| r.get(0))[0]
    }
    fn refused_record(&self) -> Record {
        // SQLite takes any text; what no backend can store is a value that
        // has no JSON form: msgpack nested deeper than the walker allows.
        let mut data = Vec::new();
        rmp::encode::write_map_len(&mut data, 3).expect("w");
        for (k, v) in [("jid", "1"), ("id", "bad")] {
            rmp::encode::write_str(&mut data, k).expect("w");
            rmp::encode::write_str(&mut data, v).expect("w");
        }
        rmp::encode::write_str(&mut data, "return").expect("w");
        for _ in 0..400 {
            rmp::encode::write_array_len(&mut data, 1).expect("w");
        }
        rmp::encode::write_nil(&mut data).expect("w");
        record_raw("salt/job/1/ret/bad", &data)
    }
    fn age_sql(&self, table: &str, days: u32) -> String {
        format!(
            "UPDATE {table} SET alter_time = datetime('now', '-{days} days') \
             WHERE alter_time > datetime('now', '-1 days')"
        )
    }
    fn old_events_ddl(&self) -> Vec<&'static str> {
        vec![
            "CREATE TABLE salt_events (id INTEGER PRIMARY KEY AUTOINCREMENT, \
             tag varchar(255) NOT NULL, data mediumtext NOT NULL, \
             alter_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP, master_id varchar(255) NOT NULL)",
            "CREATE TABLE salt_events_archive AS SELECT * FROM salt_events WHERE 0",
            "INSERT INTO salt_events (tag, data, master_id) VALUES ('salt/auth', '{\"x\": 0}', 'salt')",
        ]
    }
}

#[cfg(feature = "mysql")]
mod mysql_backend {
    use super::*;
    use crate::common::Dbs;
    use sqlx::Row;

    pub struct Mariadb {
        pub pool: sqlx::MySqlPool,
        pub db: Dbs,
    }

    #[async_trait]
    impl Backend for Mariadb {
        async fn fresh() -> Self {
            let db = Dbs::mysql("t");
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(2)
                .connect(&db.mysql_url(3306))
                .await
                .expect("connect");
            Mariadb { pool, db }
        }
        fn url(&self) -> String {
            self.db.mysql_url(3306)
        }
        fn true_word(&self) -> &'static str {
            "1"
        }
        async fn returns(&self) -> Vec<ReturnRow> {
            sqlx::query("SELECT jid, id, fun, success, `return`, full_ret FROM salt_returns ORDER BY jid, id")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| ReturnRow {
                    jid: r.get(0),
                    id: r.get(1),
                    fun: r.get(2),
                    success: r.get(3),
                    ret: json(r.get(4)),
                    full_ret: json(r.get(5)),
                })
                .collect()
        }
        async fn jids(&self) -> Vec<(String, J)> {
            sqlx::query("SELECT jid, `load` FROM jids ORDER BY jid")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| (r.get(0), json(r.get(1))))
                .collect()
        }
        async fn dead_letters(&self) -> Vec<(String, String)> {
            sqlx::query("SELECT tag, error FROM saltpipe_dead_letters ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        }
        async fn events(&self) -> Vec<(String, J)> {
            sqlx::query("SELECT tag, data FROM salt_events ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| (r.get(0), json(r.get(1))))
                .collect()
        }
        async fn outcomes(&self) -> Vec<Outcome> {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {OUTCOME_COLUMNS}, CAST(DATE_FORMAT(stamp, '%Y-%m-%d %H:%i:%s.%f') AS CHAR) \
                 FROM saltpipe_outcomes ORDER BY jid, minion"
            )))
            .fetch_all(&self.pool)
            .await
            .expect("select")
            .iter()
            .map(|r| {
                let n = |i: usize| r.get::<Option<i64>, _>(i);
                outcome_of((r.get(0), r.get(1), r.get(2), r.get(3)), (n(4), n(5), n(6), n(7)), r.get(8))
            })
            .collect()
        }
        async fn exec(&self, sql: &str) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&self.pool)
                .await
                .expect("exec");
        }
        async fn count(&self, table: &str) -> i64 {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
        fn refused_record(&self) -> Record {
            // The returner's id column is varchar(255): strict mode refuses more.
            let long = "m".repeat(300);
            ret("1", &long, "test.ping", V::from(true))
        }
        fn old_events_ddl(&self) -> Vec<&'static str> {
            vec![
                "CREATE TABLE `salt_events` (`id` BIGINT NOT NULL AUTO_INCREMENT, \
                 `tag` varchar(255) NOT NULL, `data` mediumtext NOT NULL, \
                 `alter_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP, \
                 `master_id` varchar(255) NOT NULL, PRIMARY KEY (`id`), KEY `tag` (`tag`)) \
                 ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
                "CREATE TABLE `salt_events_archive` LIKE `salt_events`",
                "INSERT INTO salt_events (tag, data, master_id) VALUES ('salt/auth', '{\"x\": 0}', 'salt')",
            ]
        }
        fn age_sql(&self, table: &str, days: u32) -> String {
            format!(
                "UPDATE {table} SET alter_time = NOW() - INTERVAL {days} DAY \
                 WHERE alter_time > NOW() - INTERVAL 1 DAY"
            )
        }
    }
}

#[cfg(feature = "postgres")]
mod pg_backend {
    use super::*;
    use crate::common::Dbs;
    use sqlx::Row;

    pub struct Pg {
        pub pool: sqlx::PgPool,
        pub db: Dbs,
    }

    #[async_trait]
    impl Backend for Pg {
        async fn fresh() -> Self {
            let db = Dbs::postgres("t");
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&db.pg_url(5432))
                .await
                .expect("connect");
            Pg { pool, db }
        }
        fn url(&self) -> String {
            self.db.pg_url(5432)
        }
        fn true_word(&self) -> &'static str {
            "true"
        }
        async fn returns(&self) -> Vec<ReturnRow> {
            sqlx::query("SELECT jid, id, fun, success, return::text, full_ret::text FROM salt_returns ORDER BY jid, id")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| ReturnRow {
                    jid: r.get(0),
                    id: r.get(1),
                    fun: r.get(2),
                    success: r.get(3),
                    ret: json(r.get(4)),
                    full_ret: json(r.get(5)),
                })
                .collect()
        }
        async fn jids(&self) -> Vec<(String, J)> {
            sqlx::query("SELECT jid, load::text FROM jids ORDER BY jid")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| (r.get(0), json(r.get(1))))
                .collect()
        }
        async fn dead_letters(&self) -> Vec<(String, String)> {
            sqlx::query("SELECT tag, error FROM saltpipe_dead_letters ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        }
        async fn events(&self) -> Vec<(String, J)> {
            sqlx::query("SELECT tag, data::text FROM salt_events ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .expect("select")
                .iter()
                .map(|r| (r.get(0), json(r.get(1))))
                .collect()
        }
        async fn outcomes(&self) -> Vec<Outcome> {
            sqlx::query(
                "SELECT jid, minion, outcome, fun, states_total::int8, states_failed::int8, \
                 states_changed::int8, duration_ms, \
                 to_char(stamp AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
                 FROM saltpipe_outcomes ORDER BY jid, minion",
            )
            .fetch_all(&self.pool)
            .await
            .expect("select")
            .iter()
            .map(|r| {
                let n = |i: usize| r.get::<Option<i64>, _>(i);
                outcome_of(
                    (r.get(0), r.get(1), r.get(2), r.get(3)),
                    (n(4), n(5), n(6), n(7)),
                    r.get(8),
                )
            })
            .collect()
        }
        async fn exec(&self, sql: &str) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&self.pool)
                .await
                .expect("exec");
        }
        async fn count(&self, table: &str) -> i64 {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
        fn refused_record(&self) -> Record {
            // The returner's id column is varchar(255): PostgreSQL refuses more.
            let long = "m".repeat(300);
            ret("1", &long, "test.ping", V::from(true))
        }
        fn escapes_nul(&self) -> bool {
            true
        }
        fn old_events_ddl(&self) -> Vec<&'static str> {
            vec![
                "CREATE SEQUENCE seq_salt_events_id",
                "CREATE TABLE salt_events (id BIGINT NOT NULL UNIQUE DEFAULT nextval('seq_salt_events_id'), \
                 tag varchar(255) NOT NULL, data jsonb NOT NULL, \
                 alter_time TIMESTAMP WITH TIME ZONE DEFAULT NOW(), master_id varchar(255) NOT NULL)",
                "CREATE TABLE salt_events_archive (LIKE salt_events INCLUDING DEFAULTS)",
                "INSERT INTO salt_events (tag, data, master_id) VALUES ('salt/auth', '{\"x\": 0}', 'salt')",
            ]
        }
        fn age_sql(&self, table: &str, days: u32) -> String {
            format!(
                "UPDATE {table} SET alter_time = now() - interval '{days} days' \
                 WHERE alter_time > now() - interval '1 day'"
            )
        }
    }
}

// ---------------------------------------------------------------- the cases

async fn redelivery_stores_each_return_once<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let batch = vec![
        new_job(&j, "test.ping"),
        ret(&j, "m1", "test.ping", V::from(true)),
        ret(&j, "m2", "test.ping", V::from(true)),
    ];
    let first = sink.write(&batch).await.expect("write");
    assert_eq!((first.returns, first.jids, first.ignored), (2, 1, 0));
    // The worker died before acking: the queue delivers the batch again,
    // and once more in a batch of its own with a duplicate inside.
    let again = sink.write(&batch).await.expect("rewrite");
    assert_eq!((again.returns, again.jids, again.ignored), (0, 0, 3));
    let mut twice = batch.clone();
    twice.extend(batch.clone());
    let third = sink.write(&twice).await.expect("rewrite twice");
    assert_eq!(third.returns, 0);
    let rows = b.returns().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["m1", "m2"]
    );
    assert!(rows.iter().all(|r| r.success == b.true_word()));
    assert!(rows.iter().all(|r| r.ret == J::Bool(true)));
    assert_eq!(rows[0].full_ret["fun"], "test.ping");
    let jids = b.jids().await;
    assert_eq!(jids.len(), 1);
    assert_eq!(jids[0].0, j);
    assert_eq!(jids[0].1["minions"], serde_json::json!(["m1", "m2"]));
    // A second sink on the same database (a restart) finds the schema in place.
    let sink2 = build(&b).await;
    assert_eq!(sink2.write(&batch).await.expect("write").returns, 0);
}

async fn four_byte_utf8_survives<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let text = "emoji 😀, music 𝄞, CJK 𠜎, accents é";
    sink.write(&[ret(&j, "m😀", "cmd.run", V::from(text))])
        .await
        .expect("write");
    let rows = b.returns().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].ret, J::String(text.into()));
    assert_eq!(rows[0].full_ret["return"], text);
    assert_eq!(rows[0].id, "m😀");
}

async fn one_mib_return<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let big: String = "0123456789abcdef".repeat(65536);
    assert_eq!(big.len(), 1 << 20);
    let batch = vec![
        ret(&j, "m1", "cmd.run", V::from(big.as_str())),
        ret(&j, "m2", "cmd.run", V::from("small")),
    ];
    assert_eq!(sink.write(&batch).await.expect("write").returns, 2);
    let rows = b.returns().await;
    assert_eq!(rows[0].ret.as_str().map(str::len), Some(1 << 20));
    assert_eq!(rows[0].ret, J::String(big));
    assert_eq!(rows[1].ret, J::String("small".into()));
}

async fn multi_function_job<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let funs = V::Array(vec![V::from("test.ping"), V::from("test.echo")]);
    let r = record(
        &format!("salt/job/{j}/ret/m1"),
        vec![
            ("id", V::from("m1")),
            ("jid", V::from(j.as_str())),
            ("fun", funs.clone()),
            (
                "fun_args",
                V::Array(vec![V::Array(vec![]), V::Array(vec![V::from("hi")])]),
            ),
            (
                "return",
                V::Map(vec![
                    (V::from("test.ping"), V::from(true)),
                    (V::from("test.echo"), V::from("hi")),
                ]),
            ),
            (
                "success",
                V::Map(vec![
                    (V::from("test.ping"), V::from(true)),
                    (V::from("test.echo"), V::from(true)),
                ]),
            ),
        ],
    );
    let new = record(
        &format!("salt/job/{j}/new"),
        vec![("jid", V::from(j.as_str())), ("fun", funs)],
    );
    sink.write(&[new, r]).await.expect("write");
    let rows = b.returns().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].fun, "test.ping,test.echo");
    assert_eq!(rows[0].success, b.true_word());
    assert_eq!(rows[0].ret["test.echo"], "hi");
    assert_eq!(
        rows[0].full_ret["fun"],
        serde_json::json!(["test.ping", "test.echo"])
    );
    assert_eq!(
        b.jids().await[0].1["fun"],
        serde_json::json!(["test.ping", "test.echo"])
    );
}

async fn salt_call_return<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let r = record(
        &format!("salt/job/{j}/ret/m1"),
        vec![
            ("cmd", V::from("_return")),
            ("id", V::from("m1")),
            ("jid", V::from(j.as_str())),
            ("fun", V::from("test.ping")),
            ("fun_args", V::Array(vec![])),
            ("return", V::from(true)),
            ("retcode", V::from(0)),
            ("arg", V::Array(vec![])),
            ("tgt", V::from("m1")),
            ("tgt_type", V::from("glob")),
        ],
    );
    sink.write(&[r]).await.expect("write");
    let rows = b.returns().await;
    assert_eq!(rows.len(), 1);
    let f = if b.true_word() == "1" { "0" } else { "false" };
    assert_eq!(rows[0].success, f, "no success key: written as false");
    // No `new` event: the return itself is the job's load, like Salt's job cache.
    let jids = b.jids().await;
    assert_eq!(jids.len(), 1);
    assert_eq!(jids[0].1, rows[0].full_ret);
}

async fn trimmed_return<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    sink.write(&[ret(&j, "m1", "cmd.run", V::from("VALUE_TRIMMED"))])
        .await
        .expect("write");
    let rows = b.returns().await;
    assert_eq!(rows[0].ret, J::String("VALUE_TRIMMED".into()));
    assert_eq!(rows[0].full_ret["return"], "VALUE_TRIMMED");
}

async fn events_are_stored_once<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let e1 = record(
        "salt/auth",
        vec![
            ("id", V::from("m1")),
            ("_stamp", V::from("2026-11-25T12:00:00.000001")),
        ],
    );
    let e2 = record(
        "salt/auth",
        vec![
            ("id", V::from("m1")),
            ("_stamp", V::from("2026-11-25T12:00:00.000002")),
        ],
    );
    let first = sink
        .write(&[e1.clone(), e2.clone(), e1.clone()])
        .await
        .expect("write");
    assert_eq!(
        (first.events, first.ignored),
        (2, 1),
        "a duplicate inside the batch"
    );
    // Redelivered, alone and with new events around it.
    let again = sink
        .write(&[e2.clone(), e1.clone()])
        .await
        .expect("rewrite");
    assert_eq!((again.events, again.ignored), (0, 2));
    let e3 = record("my/event", vec![("x", V::from(3))]);
    let mixed = sink
        .write(&[e1, e3, ret(&jid(), "m1", "test.ping", V::from(true))])
        .await
        .expect("mixed");
    assert_eq!((mixed.events, mixed.returns, mixed.ignored), (1, 1, 1));
    let events = b.events().await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].1["_stamp"], "2026-11-25T12:00:00.000001");
    assert_eq!(events[2].0, "my/event");
}

async fn older_events_table_gets_the_key<B: Backend>() {
    let b = B::fresh().await;
    for ddl in b.old_events_ddl() {
        b.exec(ddl).await;
    }
    let sink = build(&b).await;
    let e = record("my/event", vec![("x", V::from(1))]);
    assert_eq!(
        sink.write(std::slice::from_ref(&e))
            .await
            .expect("write")
            .events,
        1
    );
    assert_eq!(sink.write(&[e]).await.expect("rewrite").ignored, 1);
    // Salt's own event_return rows (no key) are kept, and more may come.
    b.exec(b.old_events_ddl().last().expect("row")).await;
    assert_eq!(b.count("salt_events").await, 3);
    // Retention's archive (made before the column existed) takes the rows.
    b.exec(&b.age_sql("salt_events", 42)).await;
    let keep = Duration::from_secs(30 * 86400);
    assert_eq!(sink.purge_chunk(keep, true, 10).await.expect("chunk"), 3);
    assert_eq!(b.count("salt_events_archive").await, 3);
    // A second start finds everything in place.
    build(&b).await;
}

async fn long_fun_is_cut_not_refused<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let names: Vec<String> = (0..8).map(|i| format!("test.echo_é{i}")).collect();
    let joined = names.join(",");
    assert!(joined.chars().count() > 50);
    let funs = V::Array(names.iter().map(|n| V::from(n.as_str())).collect());
    let r = record(
        &format!("salt/job/{j}/ret/m1"),
        vec![
            ("id", V::from("m1")),
            ("jid", V::from(j.as_str())),
            ("fun", funs),
            ("return", V::Map(vec![])),
            ("success", V::from(true)),
        ],
    );
    assert_eq!(sink.write(&[r]).await.expect("write").returns, 1);
    let rows = b.returns().await;
    assert_eq!(rows.len(), 1);
    let cut: String = joined.chars().take(50).collect();
    assert_eq!(rows[0].fun, cut);
    assert_eq!(
        rows[0].full_ret["fun"],
        serde_json::json!(names),
        "the full list kept"
    );
    assert!(saltpipe::sink::rows::adjusted().fun_truncated >= 1);
}

async fn nul_in_a_return_is_kept<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let r = ret(&j, "m1", "cmd.run", V::from("nul \u{0} inside"));
    let e = record("my/event", vec![("k\u{0}", V::from("v\u{0}"))]);
    let w = sink.write(&[r, e]).await.expect("write");
    assert_eq!((w.returns, w.events), (1, 1));
    let rows = b.returns().await;
    let (text, key, value) = if b.escapes_nul() {
        ("nul \\u0000 inside", "k\\u0000", "v\\u0000")
    } else {
        ("nul \u{0} inside", "k\u{0}", "v\u{0}")
    };
    assert_eq!(rows[0].ret, J::String(text.into()));
    assert_eq!(rows[0].full_ret["return"], text);
    assert_eq!(b.events().await[0].1[key], value);
    if b.escapes_nul() {
        assert!(saltpipe::sink::rows::adjusted().nul_escaped >= 2);
    }
}

/// A queue of fixed deliveries, so the real worker runs against the sink.
struct Fixed {
    items: VecDeque<Delivery>,
    acked: Arc<std::sync::Mutex<Vec<u64>>>,
}

#[async_trait]
impl Consumer for Fixed {
    async fn pull(
        &mut self,
        max: usize,
        _max_bytes: usize,
        _wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let n = max.min(self.items.len());
        Ok(self.items.drain(..n).collect())
    }
    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        self.acked.lock().expect("lock").extend_from_slice(ids);
        Ok(())
    }
    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        Ok(Some(self.items.len() as u64))
    }
}

/// Runs a worker (with `redact`, if given) over `records` as one queue's
/// deliveries until they are all written; gives how many were acked, and
/// the worker's counters.
async fn work(
    records: &[Record],
    sink: Arc<dyn Sink>,
    redact: Option<saltpipe::redact::KeyRedactor>,
) -> (usize, Arc<Stats>) {
    let items: VecDeque<Delivery> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Delivery {
            id: i as u64,
            key: String::new(),
            body: r.event.body.clone(),
            received_ms: 0,
        })
        .collect();
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let consumer = Fixed {
        items,
        acked: acked.clone(),
    };
    let stats = Arc::new(Stats::default());
    let token = CancellationToken::new();
    token.cancel();
    let cfg = WorkerConfig {
        retry_min: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    let mut worker = Worker::new(Box::new(consumer), sink, cfg, stats.clone());
    if let Some(r) = redact {
        worker = worker.with_redact(Arc::new(r));
    }
    worker.run(Stop::new(token, None)).await.expect("worker");
    let n = acked.lock().expect("lock").len();
    (n, stats)
}

async fn refused_row_is_dead_lettered_and_the_rest_land<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let mut records: Vec<Record> = (0..9)
        .map(|i| ret(&j, &format!("m{i}"), "test.ping", V::from(true)))
        .collect();
    records.insert(5, b.refused_record());
    records.push(record("my/own/event", vec![("x", V::from(1))]));
    let (acked, stats) = work(&records, sink, None).await;
    assert_eq!(acked, 11, "all acked");
    assert_eq!(stats.dead_letters.load(Relaxed), 1);
    assert_eq!(stats.returns_written.load(Relaxed), 9);
    let rows = b.returns().await;
    assert_eq!(rows.len(), 9, "every good return landed");
    assert_eq!(b.events().await.len(), 1);
    let dead = b.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.contains("/ret/"), "{dead:?}");
    assert!(!dead[0].1.is_empty());
}

/// With `[sink] redact`, an event the redactor cannot walk whole (a
/// password, then a list nested past the limit) is stored nowhere: its
/// dead letter has its tag and why, and none of its bytes; the batch's
/// other returns land.
async fn an_event_redact_cannot_walk_is_dead_lettered_without_its_bytes<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let mut deep = V::from(1);
    for _ in 0..300 {
        deep = V::Array(vec![deep]);
    }
    let mut records: Vec<Record> = (0..4)
        .map(|i| ret(&j, &format!("m{i}"), "test.ping", V::from(true)))
        .collect();
    records.insert(
        2,
        ret(
            &j,
            "deep",
            "test.echo",
            V::Map(vec![
                (V::from("password"), V::from("S3cret9")),
                (V::from("d"), deep),
            ]),
        ),
    );
    let redact = saltpipe::redact::KeyRedactor::new(saltpipe::redact::DEFAULT_KEYS);
    let (acked, stats) = work(&records, sink, Some(redact)).await;
    assert_eq!(acked, 5, "all acked");
    assert_eq!(stats.dead_letters.load(Relaxed), 1);
    assert_eq!(b.returns().await.len(), 4, "every other return landed");
    let dead = b.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.ends_with("/ret/deep"), "{dead:?}");
    assert!(dead[0].1.contains("cannot be checked"), "{dead:?}");
    assert!(!dead[0].1.contains("S3cret9"), "{dead:?}");
    assert_eq!(
        b.count("saltpipe_dead_letters WHERE length(body) = 0")
            .await,
        1,
        "its bytes are not kept"
    );
}

async fn retention_purges_and_archives_in_chunks<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let old = jid();
    let fresh = jid();
    // 25 old returns in three ages (42, 41, 40 days), so chunks have an order.
    let mut batch = vec![new_job(&old, "test.ping")];
    batch.extend((0..10).map(|i| ret(&old, &format!("m{i}"), "test.ping", V::from(true))));
    batch.push(record("old/event", vec![("x", V::from(1))]));
    sink.write(&batch).await.expect("write old");
    b.exec(&b.age_sql("salt_returns", 42)).await;
    b.exec(&b.age_sql("salt_events", 42)).await;
    let batch: Vec<Record> = (10..20)
        .map(|i| ret(&old, &format!("m{i}"), "test.ping", V::from(true)))
        .collect();
    sink.write(&batch).await.expect("write old");
    b.exec(&b.age_sql("salt_returns", 41)).await;
    let batch: Vec<Record> = (20..25)
        .map(|i| ret(&old, &format!("m{i}"), "test.ping", V::from(true)))
        .collect();
    sink.write(&batch).await.expect("write old");
    b.exec(&b.age_sql("salt_returns", 40)).await;
    sink.write(&[
        new_job(&fresh, "test.ping"),
        ret(&fresh, "m1", "test.ping", V::from(true)),
        record("new/event", vec![("x", V::from(2))]),
    ])
    .await
    .expect("write new");
    let keep = Duration::from_secs(30 * 86400);
    // Small chunks: several transactions, each moving at most ~10 returns.
    let first = sink.purge_chunk(keep, true, 10).await.expect("chunk");
    assert_eq!(
        first,
        10 + 1 + 1,
        "one chunk: the 10 oldest returns, their job, 1 event"
    );
    assert_eq!(b.returns().await.len(), 15 + 1);
    let stop = CancellationToken::new();
    let rest = saltpipe::sink::retention::round(sink.as_ref(), keep, true, 10, &stop)
        .await
        .expect("round");
    assert_eq!(first + rest, 25 + 1 + 1, "25 returns, 1 job, 1 event");
    let rows = b.returns().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].jid, fresh);
    assert_eq!(b.jids().await.len(), 1);
    assert_eq!(b.events().await.len(), 1);
    // Moved, not lost.
    assert_eq!(b.count("salt_returns_archive").await, 25);
    assert_eq!(b.count("jids_archive").await, 1);
    assert_eq!(b.count("salt_events_archive").await, 1);
    // Nothing younger than `keep` goes.
    assert_eq!(sink.purge_chunk(keep, true, 10).await.expect("chunk"), 0);
}

/// A return of `fun` from `minion` with these states (each `(result,
/// changes?)`) and what Salt said: the states decide.
fn state_ret(jid: &str, minion: &str, states: &[(V, bool)], retcode: i64, success: bool) -> Record {
    let states = V::Map(
        states
            .iter()
            .enumerate()
            .map(|(i, (result, changed))| {
                let changes = if *changed {
                    V::Map(vec![(V::from("diff"), V::from("new file"))])
                } else {
                    V::Map(vec![])
                };
                (
                    V::from(format!("file_|-s{i}_|-/tmp/s{i}_|-managed")),
                    V::Map(vec![
                        (V::from("result"), result.clone()),
                        (V::from("changes"), changes),
                        (V::from("comment"), V::from("c")),
                        (V::from("duration"), V::F64(1.5)),
                        (V::from("__run_num__"), V::from(i as u64)),
                    ]),
                )
            })
            .collect(),
    );
    record(
        &format!("salt/job/{jid}/ret/{minion}"),
        vec![
            ("cmd", V::from("_return")),
            ("id", V::from(minion)),
            ("jid", V::from(jid)),
            ("fun", V::from("state.apply")),
            ("fun_args", V::Array(vec![])),
            ("return", states),
            ("retcode", V::from(retcode)),
            ("success", V::from(success)),
            ("out", V::from("highstate")),
            ("_stamp", V::from("2026-11-25T12:00:00.100000+00:00")),
        ],
    )
}

fn new_job_for(jid: &str, fun: &str, minions: &[&str], stamp: &str) -> Record {
    new_job_tagged(&format!("salt/job/{jid}/new"), jid, fun, minions, stamp)
}

/// The same `new` as a syndic forwards it to its master of masters.
fn syndic_new_job(syndic: &str, jid: &str, fun: &str, minions: &[&str], stamp: &str) -> Record {
    new_job_tagged(
        &format!("syndic/{syndic}/salt/job/{jid}/new"),
        jid,
        fun,
        minions,
        stamp,
    )
}

fn new_job_tagged(tag: &str, jid: &str, fun: &str, minions: &[&str], stamp: &str) -> Record {
    record(
        tag,
        vec![
            ("jid", V::from(jid)),
            ("fun", V::from(fun)),
            ("arg", V::Array(vec![])),
            ("tgt", V::from("*")),
            ("tgt_type", V::from("glob")),
            ("user", V::from("root")),
            (
                "minions",
                V::Array(minions.iter().map(|m| V::from(*m)).collect()),
            ),
            ("_stamp", V::from(stamp)),
        ],
    )
}

async fn outcomes_are_written_with_each_return<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let (j, k) = (jid(), jid());
    let t = V::from(true);
    let batch = vec![
        new_job_for(
            &j,
            "state.apply",
            &["m1", "m2", "m3"],
            "2026-11-25T12:00:00.000000+00:00",
        ),
        // A failing state under success true and retcode 0.
        state_ret(
            &j,
            "m1",
            &[(t.clone(), true), (V::from(false), false)],
            0,
            true,
        ),
        // test=True: result None with pending changes.
        state_ret(&j, "m2", &[(V::Nil, true), (t.clone(), false)], 0, true),
        state_ret(&j, "m3", &[(t.clone(), false)], 0, true),
        ret(&k, "m1", "test.ping", t.clone()),
    ];
    let first = sink.write(&batch).await.expect("write");
    assert_eq!(first.returns, 4);
    // Redelivered: nothing doubles, nothing changes.
    sink.write(&batch).await.expect("rewrite");
    let mut want = vec![
        Outcome {
            jid: j.clone(),
            minion: "m1".into(),
            outcome: "failed".into(),
            fun: "state.apply".into(),
            states: Some((2, 1, 1, 3)),
            stamp: "2026-11-25 12:00:00.100000".into(),
        },
        Outcome {
            jid: j.clone(),
            minion: "m2".into(),
            outcome: "changed".into(),
            fun: "state.apply".into(),
            states: Some((2, 0, 1, 3)),
            stamp: "2026-11-25 12:00:00.100000".into(),
        },
        Outcome {
            jid: j.clone(),
            minion: "m3".into(),
            outcome: "ok".into(),
            fun: "state.apply".into(),
            states: Some((1, 0, 0, 2)),
            stamp: "2026-11-25 12:00:00.100000".into(),
        },
        Outcome {
            jid: k.clone(),
            minion: "m1".into(),
            outcome: "ok".into(),
            fun: "test.ping".into(),
            states: None,
            stamp: "2026-11-25 12:00:00.100000".into(),
        },
    ];
    want.sort_by(|a, b| (&a.jid, &a.minion).cmp(&(&b.jid, &b.minion)));
    assert_eq!(b.outcomes().await, want);
    // One return twice in a fresh batch (two masters): stored once, no error.
    let d = jid();
    let dup = state_ret(&d, "m1", &[(V::from(false), false)], 2, false);
    sink.write(&[dup.clone(), dup])
        .await
        .expect("write a batch with a duplicate");
    let o = b.outcomes().await;
    assert_eq!(o.iter().filter(|o| o.jid == d).count(), 1, "{o:?}");
    // The returner's columns still say what Salt said.
    let rows: Vec<_> = b
        .returns()
        .await
        .into_iter()
        .filter(|r| r.jid != d)
        .collect();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.success == b.true_word()), "{rows:?}");
    assert_eq!(b.count("saltpipe_targets").await, 3);
}

async fn silent_minions_get_no_return_and_a_late_return_replaces_it<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let (old, recent) = (jid(), jid());
    let now = saltpipe::sink::rows::stamp_of(std::time::SystemTime::now());
    let now_iso = format!("{}+00:00", now.replacen(' ', "T", 1));
    let batch = vec![
        new_job_for(
            &old,
            "state.apply",
            &["m1", "m2", "m3"],
            "2026-11-25T12:00:00.000000+00:00",
        ),
        state_ret(&old, "m1", &[(V::from(true), false)], 0, true),
        new_job_for(&recent, "test.ping", &["m1", "m9"], &now_iso),
    ];
    sink.write(&batch).await.expect("write");
    // The window of `old` has closed; that of `recent` has not.
    let before =
        saltpipe::sink::rows::stamp_of(std::time::SystemTime::now() - Duration::from_secs(300));
    let closed = sink.close_returns(&before, 2).await.expect("close");
    assert_eq!(closed.targets, 2, "at most `limit` targets per call");
    let closed2 = sink.close_returns(&before, 2).await.expect("close");
    assert_eq!(closed2.targets, 1);
    let mut silent: Vec<_> = closed
        .no_return
        .iter()
        .chain(&closed2.no_return)
        .map(|n| {
            (
                n.jid.clone(),
                n.minion.clone(),
                n.fun.clone(),
                n.stamp.clone(),
            )
        })
        .collect();
    silent.sort();
    let at = "2026-11-25 12:00:00.000000".to_owned();
    assert_eq!(
        silent,
        vec![
            (old.clone(), "m2".into(), "state.apply".into(), at.clone()),
            (old.clone(), "m3".into(), "state.apply".into(), at.clone()),
        ]
    );
    // Again, and with the targets reopened (a second worker, a restart):
    // nothing new, nothing doubled.
    assert_eq!(
        sink.close_returns(&before, 100).await.expect("close"),
        Default::default()
    );
    b.exec("UPDATE saltpipe_targets SET closed = 0").await;
    let again = sink.close_returns(&before, 100).await.expect("close");
    assert_eq!((again.targets, again.no_return.len()), (3, 0));
    let outcomes = b.outcomes().await;
    let of = |m: &str| {
        outcomes
            .iter()
            .find(|o| o.jid == old && o.minion == m)
            .map(|o| (o.outcome.clone(), o.stamp.clone()))
    };
    assert_eq!(of("m1").map(|o| o.0), Some("ok".into()));
    assert_eq!(of("m2"), Some(("no_return".into(), at.clone())));
    assert_eq!(
        outcomes.len(),
        3,
        "the recent job's window is still open: {outcomes:?}"
    );
    // m2 answers late: its return lands and replaces no_return.
    let late = state_ret(&old, "m2", &[(V::from(false), false)], 2, false);
    assert_eq!(sink.write(&[late]).await.expect("write").returns, 1);
    let outcomes = b.outcomes().await;
    let m2 = outcomes
        .iter()
        .find(|o| o.jid == old && o.minion == "m2")
        .expect("m2");
    assert_eq!(
        (m2.outcome.as_str(), m2.states, m2.stamp.as_str()),
        ("failed", Some((1, 1, 0, 2)), "2026-11-25 12:00:00.100000")
    );
    assert_eq!(b.returns().await.len(), 2);
    // A real outcome is never replaced by another copy.
    let other = state_ret(&old, "m2", &[(V::from(true), false)], 0, true);
    sink.write(&[other]).await.expect("write");
    let outcomes = b.outcomes().await;
    let m2 = outcomes
        .iter()
        .find(|o| o.jid == old && o.minion == "m2")
        .expect("m2");
    assert_eq!(m2.outcome, "failed");
}

/// On a master of masters the MoM's `new` lists the syndic's id, the
/// syndic's forwarded `new` its real minions: silent minions get
/// `no_return`, the syndic (a relay) never does, whichever `new` is
/// written first, in one batch or two.
async fn a_syndic_listed_as_a_target_gets_no_no_return<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let (first, second) = (jid(), jid());
    let at = "2026-11-25T12:00:00.000000+00:00";
    let mom = |j: &str| new_job_for(j, "test.ping", &["m1", "syn-1"], at);
    let syn = |j: &str| syndic_new_job("syn-1", j, "test.ping", &["s-m1", "s-m2"], at);
    sink.write(&[mom(&first), syn(&first)])
        .await
        .expect("write");
    sink.write(&[syn(&second)]).await.expect("write");
    sink.write(&[mom(&second)]).await.expect("write");
    let before =
        saltpipe::sink::rows::stamp_of(std::time::SystemTime::now() - Duration::from_secs(300));
    let closed = sink.close_returns(&before, 100).await.expect("close");
    let mut silent: Vec<_> = closed
        .no_return
        .iter()
        .map(|n| (n.jid.clone(), n.minion.clone()))
        .collect();
    silent.sort();
    let mut want: Vec<_> = [&first, &second]
        .iter()
        .flat_map(|j| ["m1", "s-m1", "s-m2"].map(|m| ((*j).clone(), m.to_owned())))
        .collect();
    want.sort();
    assert_eq!(silent, want);
    assert!(
        b.outcomes().await.iter().all(|o| o.minion != "syn-1"),
        "no outcome row for the syndic"
    );
}

/// Salt 3006's syndic forwards no `new` of a job, only its bare-jid
/// announcement (`syndic/<id>/<jid>`: minions and a `_stamp` without
/// timezone): the syndic's minions become targets and its relay row is
/// closed, with no `jids` row (the announcement has no load).
async fn a_3006_syndics_forwarded_announcement_closes_its_relay_row<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let j = jid();
    let mom = new_job_for(
        &j,
        "test.ping",
        &["m1", "syn-1"],
        "2026-11-25T12:00:00.000000+00:00",
    );
    let announce = record(
        &format!("syndic/syn-1/{j}"),
        vec![
            ("minions", V::Array(vec![V::from("s-m1"), V::from("s-m2")])),
            ("_stamp", V::from("2026-11-25T12:00:00.000100")),
        ],
    );
    sink.write(&[mom, announce]).await.expect("write");
    assert_eq!(b.count("jids").await, 1, "the MoM's new only");
    let before =
        saltpipe::sink::rows::stamp_of(std::time::SystemTime::now() - Duration::from_secs(300));
    let closed = sink.close_returns(&before, 100).await.expect("close");
    let mut silent: Vec<_> = closed.no_return.iter().map(|n| n.minion.clone()).collect();
    silent.sort();
    assert_eq!(silent, ["m1", "s-m1", "s-m2"]);
    assert!(
        b.outcomes().await.iter().all(|o| o.minion != "syn-1"),
        "no outcome row for the syndic"
    );
}

async fn sweepers_at_once_record_each_silent_minion_once<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let other = build(&b).await;
    let j = jid();
    let minions: Vec<String> = (0..60).map(|i| format!("m{i:02}")).collect();
    let refs: Vec<&str> = minions.iter().map(String::as_str).collect();
    sink.write(&[new_job_for(
        &j,
        "test.ping",
        &refs,
        "2026-11-25T12:00:00+00:00",
    )])
    .await
    .expect("write");
    let before = saltpipe::sink::rows::stamp_of(std::time::SystemTime::now());
    let sweep = |s: Arc<dyn Sink>, before: String| async move {
        let mut mine = Vec::new();
        loop {
            let c = s.close_returns(&before, 7).await.expect("close");
            mine.extend(c.no_return.into_iter().map(|n| n.minion));
            if c.targets == 0 {
                return mine;
            }
        }
    };
    let (a, c) = tokio::join!(
        tokio::spawn(sweep(sink.clone(), before.clone())),
        tokio::spawn(sweep(other.clone(), before.clone()))
    );
    let mut all: Vec<String> = a.expect("a").into_iter().chain(c.expect("c")).collect();
    all.sort();
    assert_eq!(all, minions, "each silent minion reported exactly once");
    assert_eq!(b.count("saltpipe_outcomes").await, 60);
}

async fn retention_purges_and_archives_outcomes_and_closed_targets<B: Backend>() {
    let b = B::fresh().await;
    let sink = build(&b).await;
    let (old, new) = (jid(), jid());
    let now = saltpipe::sink::rows::stamp_of(std::time::SystemTime::now());
    let now_iso = format!("{}+00:00", now.replacen(' ', "T", 1));
    let mut recent = state_ret(&new, "m1", &[(V::from(true), false)], 0, true);
    recent = {
        // The same return, stamped now.
        let e = &recent.event;
        let json = saltpipe::msgpack::to_json(e.data(), usize::MAX).expect("json");
        let mut v: serde_json::Value = serde_json::from_str(&json).expect("json");
        v["_stamp"] = J::from(now_iso.clone());
        record_raw(e.tag(), &rmp_serde::to_vec_named(&v).expect("pack"))
    };
    sink.write(&[
        new_job_for(
            &old,
            "test.ping",
            &["m1", "m2"],
            "2020-01-01T00:00:00+00:00",
        ),
        state_ret(&old, "m1", &[(V::from(true), false)], 0, true),
        new_job_for(&new, "test.ping", &["m1"], &now_iso),
        recent,
    ])
    .await
    .expect("write");
    // Close the old job's window: m2 is silent.
    let closed = sink
        .close_returns("2020-01-02 00:00:00.000000", 100)
        .await
        .expect("close");
    assert_eq!(closed.no_return.len(), 1);
    assert_eq!(b.count("saltpipe_outcomes").await, 3);
    let keep = Duration::from_secs(86_400);
    let stop = CancellationToken::new();
    let moved = saltpipe::sink::retention::round(sink.as_ref(), keep, true, 1, &stop)
        .await
        .expect("purge");
    assert!(
        moved >= 4,
        "two outcomes and two closed targets, at least: {moved}"
    );
    let left = b.outcomes().await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].jid, new);
    assert_eq!(
        b.count("saltpipe_targets").await,
        1,
        "the open, recent target stays"
    );
    assert_eq!(b.count("saltpipe_outcomes_archive").await, 2);
    assert_eq!(b.count("saltpipe_targets_archive").await, 2);
}

// ---------------------------------------------------------------- wiring

macro_rules! conformance {
    ($modname:ident, $backend:ty $(, $cfg:meta)?) => {
        $(#[$cfg])?
        mod $modname {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redelivery_stores_each_return_once() {
                super::redelivery_stores_each_return_once::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn four_byte_utf8_survives() {
                super::four_byte_utf8_survives::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_mib_return() {
                super::one_mib_return::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_function_job() {
                super::multi_function_job::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn salt_call_return() {
                super::salt_call_return::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trimmed_return() {
                super::trimmed_return::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn refused_row_is_dead_lettered_and_the_rest_land() {
                super::refused_row_is_dead_lettered_and_the_rest_land::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_event_redact_cannot_walk_is_dead_lettered_without_its_bytes() {
                super::an_event_redact_cannot_walk_is_dead_lettered_without_its_bytes::<$backend>()
                    .await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retention_purges_and_archives_in_chunks() {
                super::retention_purges_and_archives_in_chunks::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn events_are_stored_once() {
                super::events_are_stored_once::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn older_events_table_gets_the_key() {
                super::older_events_table_gets_the_key::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn long_fun_is_cut_not_refused() {
                super::long_fun_is_cut_not_refused::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn outcomes_are_written_with_each_return() {
                super::outcomes_are_written_with_each_return::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn silent_minions_get_no_return_and_a_late_return_replaces_it() {
                super::silent_minions_get_no_return_and_a_late_return_replaces_it::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_syndic_listed_as_a_target_gets_no_no_return() {
                super::a_syndic_listed_as_a_target_gets_no_no_return::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_3006_syndics_forwarded_announcement_closes_its_relay_row() {
                super::a_3006_syndics_forwarded_announcement_closes_its_relay_row::<$backend>()
                    .await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sweepers_at_once_record_each_silent_minion_once() {
                super::sweepers_at_once_record_each_silent_minion_once::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retention_purges_and_archives_outcomes_and_closed_targets() {
                super::retention_purges_and_archives_outcomes_and_closed_targets::<$backend>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nul_in_a_return_is_kept() {
                super::nul_in_a_return_is_kept::<$backend>().await
            }
        }
    };
}

conformance!(sqlite, Sqlite);
conformance!(mariadb, mysql_backend::Mariadb, cfg(feature = "mysql"));
conformance!(postgres, pg_backend::Pg, cfg(feature = "postgres"));
