//! An existing returner database, made with the returner's own documented
//! DDL and already holding rows: saltpipe adds only what it needs (the
//! unique key on salt_returns (jid, id), the alter_time indexes), keeps
//! every row, and when duplicate rows block the unique key it stops with a
//! message saying so and how to clean them, deleting nothing itself.
//! Real MariaDB and PostgreSQL on loopback, a fresh database per test.

#![cfg(any(feature = "mysql", feature = "postgres"))]

mod common;

use common::Dbs;
use saltpipe::sink::{SinkConfig, SinkError, SinkUrl};

fn cfg(url: &str) -> SinkConfig {
    SinkConfig {
        url: SinkUrl::parse(url).expect("url"),
        ..SinkConfig::default()
    }
}

fn run(cmd: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{input}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `saltpipe schema --print URL` prints the DDL without touching anything;
/// `saltpipe schema URL` creates it.
#[test]
fn schema_command_prints_and_creates() {
    let bin = env!("CARGO_BIN_EXE_saltpipe");
    let print = |url: &str| {
        let out = std::process::Command::new(bin)
            .args(["schema", "--print", url])
            .output()
            .expect("saltpipe");
        assert!(out.status.success(), "{url}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    #[cfg(feature = "mysql")]
    {
        // An unreachable host: --print connects to nothing.
        let ddl = print("mysql://u:pw@192.0.2.1:1/salt");
        assert!(
            ddl.contains("CREATE TABLE IF NOT EXISTS `salt_returns`"),
            "{ddl}"
        );
        assert!(ddl.contains("UNIQUE KEY `salt_returns_jid_id` (`jid`, `id`)"));
        assert!(ddl.contains("utf8mb4"));
    }
    #[cfg(feature = "postgres")]
    {
        let ddl = print("postgres://u:pw@192.0.2.1:1/salt");
        assert!(ddl.contains("return jsonb NOT NULL"), "{ddl}");
        assert!(ddl.contains("CREATE UNIQUE INDEX IF NOT EXISTS salt_returns_jid_id"));
        assert!(ddl.contains("USING gin"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("salt.db");
    let out = std::process::Command::new(bin)
        .args(["schema", &format!("sqlite://{}", db.display())])
        .output()
        .expect("saltpipe");
    assert!(out.status.success());
    let c = rusqlite::Connection::open(&db).expect("open");
    let n: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN \
             ('jids', 'salt_returns', 'salt_events', 'saltpipe_dead_letters')",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 4);
}

#[cfg(feature = "mysql")]
mod mariadb {
    use super::*;

    /// The mysql returner's documented DDL, verbatim (3-byte utf8, no unique (jid, id)).
    const RETURNER_DDL: &str = "
CREATE TABLE `jids` (
  `jid` varchar(255) NOT NULL,
  `load` mediumtext NOT NULL,
  UNIQUE KEY `jid` (`jid`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;
CREATE TABLE `salt_returns` (
  `fun` varchar(50) NOT NULL,
  `jid` varchar(255) NOT NULL,
  `return` mediumtext NOT NULL,
  `id` varchar(255) NOT NULL,
  `success` varchar(10) NOT NULL,
  `full_ret` mediumtext NOT NULL,
  `alter_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  KEY `id` (`id`),
  KEY `jid` (`jid`),
  KEY `fun` (`fun`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;
CREATE TABLE `salt_events` (
`id` BIGINT NOT NULL AUTO_INCREMENT,
`tag` varchar(255) NOT NULL,
`data` mediumtext NOT NULL,
`alter_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
`master_id` varchar(255) NOT NULL,
PRIMARY KEY (`id`),
KEY `tag` (`tag`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;
";

    fn sql(db: &str, input: &str) -> String {
        run(
            "mysql",
            &["-h127.0.0.1", "-P3306", "-uroot", "-N", "-B", "-r", db],
            input,
        )
    }
    const ROW: &str = "INSERT INTO salt_returns (fun, jid, `return`, id, success, full_ret) \
                       VALUES ('test.ping', '1', 'true', 'm1', '1', '{}');";

    #[tokio::test]
    async fn adds_only_the_missing_keys_and_keeps_rows() {
        let db = Dbs::mysql("m");
        sql(&db.0, RETURNER_DDL);
        sql(&db.0, ROW);
        let sink = cfg(&db.mysql_url(3306)).build().await.expect("build");
        // 4-byte characters on a 3-byte utf8 table: written as JSON escapes.
        let data = {
            let mut d = Vec::new();
            rmp::encode::write_map_len(&mut d, 4).expect("w");
            for (k, v) in [
                ("jid", "2"),
                ("id", "m1"),
                ("fun", "cmd.run"),
                ("return", "ok 😀"),
            ] {
                rmp::encode::write_str(&mut d, k).expect("w");
                rmp::encode::write_str(&mut d, v).expect("w");
            }
            d
        };
        let frame = bytes::Bytes::from(saltpipe::bus::encode::frame("salt/job/2/ret/m1", &data));
        let rec = saltpipe::sink::Record::new(
            saltpipe::event::Event::from_frame(&frame).expect("decode"),
            0,
        );
        assert_eq!(sink.write(&[rec]).await.expect("write").returns, 1);
        let stored = sql(&db.0, "SELECT `return` FROM salt_returns WHERE jid = '2'");
        let back: String = serde_json::from_str(&stored).expect("json");
        assert_eq!(back, "ok 😀");
        let keys = sql(
            &db.0,
            "SELECT INDEX_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_NAME = 'salt_returns' GROUP BY INDEX_NAME ORDER BY INDEX_NAME",
        );
        assert_eq!(
            keys.lines().collect::<Vec<_>>(),
            [
                "fun",
                "id",
                "jid",
                "salt_returns_alter_time",
                "salt_returns_jid_id"
            ]
        );
        assert_eq!(sql(&db.0, "SELECT count(*) FROM salt_returns"), "2");
        // The charset is left alone (not ours to rebuild); a second start changes nothing.
        assert!(
            sql(&db.0, "SHOW CREATE TABLE salt_returns").contains("utf8mb3"),
            "table not rebuilt"
        );
        cfg(&db.mysql_url(3306))
            .build()
            .await
            .expect("second build");
    }

    #[tokio::test]
    async fn duplicates_stop_with_the_cleanup_and_nothing_is_deleted() {
        let db = Dbs::mysql("m");
        sql(&db.0, RETURNER_DDL);
        sql(&db.0, &format!("{ROW}{ROW}"));
        let err = match cfg(&db.mysql_url(3306)).build().await {
            Ok(_) => panic!("duplicates must stop the start"),
            Err(e) => e,
        };
        let SinkError::Fatal(msg) = &err else {
            panic!("{err:?}")
        };
        assert!(msg.contains("duplicate (jid, id)"), "{msg}");
        assert!(
            msg.contains(saltpipe::sink::mysql::DEDUPE_SQL),
            "gives the cleanup: {msg}"
        );
        assert_eq!(sql(&db.0, "SELECT count(*) FROM salt_returns"), "2");
        // The cleanup it gives works, keeps the duplicates aside, and then we start.
        sql(&db.0, saltpipe::sink::mysql::DEDUPE_SQL);
        cfg(&db.mysql_url(3306))
            .build()
            .await
            .expect("after cleanup");
        assert_eq!(sql(&db.0, "SELECT count(*) FROM salt_returns"), "1");
        assert_eq!(
            sql(&db.0, "SELECT count(*) FROM salt_returns_with_duplicates"),
            "2"
        );
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    /// pgjsonb's documented DDL, verbatim.
    const PGJSONB_DDL: &str = "
CREATE TABLE jids (
   jid varchar(255) NOT NULL primary key,
   load jsonb NOT NULL
);
CREATE INDEX idx_jids_jsonb on jids
       USING gin (load)
       WITH (fastupdate=on);
CREATE TABLE salt_returns (
  fun varchar(50) NOT NULL,
  jid varchar(255) NOT NULL,
  return jsonb NOT NULL,
  id varchar(255) NOT NULL,
  success varchar(10) NOT NULL,
  full_ret jsonb NOT NULL,
  alter_time TIMESTAMP WITH TIME ZONE DEFAULT NOW());
CREATE INDEX idx_salt_returns_id ON salt_returns (id);
CREATE INDEX idx_salt_returns_jid ON salt_returns (jid);
CREATE INDEX idx_salt_returns_fun ON salt_returns (fun);
CREATE INDEX idx_salt_returns_return ON salt_returns
    USING gin (return) with (fastupdate=on);
CREATE INDEX idx_salt_returns_full_ret ON salt_returns
    USING gin (full_ret) with (fastupdate=on);
CREATE SEQUENCE seq_salt_events_id;
CREATE TABLE salt_events (
    id BIGINT NOT NULL UNIQUE DEFAULT nextval('seq_salt_events_id'),
    tag varchar(255) NOT NULL,
    data jsonb NOT NULL,
    alter_time TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    master_id varchar(255) NOT NULL);
CREATE INDEX idx_salt_events_tag on
    salt_events (tag);
CREATE INDEX idx_salt_events_data ON salt_events
    USING gin (data) with (fastupdate=on);
";

    fn sql(db: &str, input: &str) -> String {
        run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                db,
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
            ],
            input,
        )
    }
    const ROW: &str = "INSERT INTO salt_returns (fun, jid, return, id, success, full_ret) \
                       VALUES ('test.ping', '1', 'true', 'm1', 'true', '{}');";

    #[tokio::test]
    async fn adds_only_the_missing_indexes_and_keeps_rows() {
        let db = Dbs::postgres("m");
        sql(&db.0, PGJSONB_DDL);
        sql(&db.0, ROW);
        cfg(&db.pg_url(5432)).build().await.expect("build");
        let idx = sql(
            &db.0,
            "SELECT indexname FROM pg_indexes WHERE tablename = 'salt_returns' ORDER BY indexname COLLATE \"C\"",
        );
        assert_eq!(
            idx.lines().collect::<Vec<_>>(),
            [
                "idx_salt_returns_full_ret",
                "idx_salt_returns_fun",
                "idx_salt_returns_id",
                "idx_salt_returns_jid",
                "idx_salt_returns_return",
                "salt_returns_alter_time",
                "salt_returns_jid_id"
            ]
        );
        assert_eq!(sql(&db.0, "SELECT count(*) FROM salt_returns"), "1");
        cfg(&db.pg_url(5432)).build().await.expect("second build");
    }

    #[tokio::test]
    async fn duplicates_stop_with_the_cleanup_and_nothing_is_deleted() {
        let db = Dbs::postgres("m");
        sql(&db.0, PGJSONB_DDL);
        sql(&db.0, &format!("{ROW}{ROW}"));
        let err = match cfg(&db.pg_url(5432)).build().await {
            Ok(_) => panic!("duplicates must stop the start"),
            Err(e) => e,
        };
        let SinkError::Fatal(msg) = &err else {
            panic!("{err:?}")
        };
        assert!(msg.contains("duplicate (jid, id)"), "{msg}");
        assert!(msg.contains(saltpipe::sink::postgres::DEDUPE_SQL), "{msg}");
        assert_eq!(sql(&db.0, "SELECT count(*) FROM salt_returns"), "2");
        sql(&db.0, saltpipe::sink::postgres::DEDUPE_SQL);
        cfg(&db.pg_url(5432)).build().await.expect("after cleanup");
        assert_eq!(sql(&db.0, "SELECT count(*) FROM salt_returns"), "1");
        assert_eq!(
            sql(&db.0, "SELECT count(*) FROM salt_returns_duplicates"),
            "1"
        );
    }

    /// TLS through rustls (ring): the server on this machine has ssl on.
    #[tokio::test]
    async fn tls_connection_with_sslmode_require() {
        let db = Dbs::postgres("m");
        let _sink = cfg(&format!("{}?sslmode=require", db.pg_url(5432)))
            .build()
            .await
            .expect("build over TLS");
        let n = sql(
            &db.0,
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = '{}' AND a.application_name = 'saltpipe' AND s.ssl",
                db.0
            ),
        );
        assert!(n.parse::<i64>().unwrap_or(0) >= 1, "TLS connections: {n}");
    }
}
