//! MariaDB / MySQL: the tables of Salt's mysql returner (`saltext-mysql`),
//! so its job-cache functions, Alcali and people's SQL read what we write.
//!
//! Why it looks the way it does:
//! * sqlx (pure Rust, rustls with ring: no OpenSSL) with a small pool.
//! * One transaction per batch, one multi-row `INSERT` per table and run of
//!   rows (runs are cut at the 65,535 bind-parameter limit and at half the
//!   server's `max_allowed_packet`).
//! * Statements of a few fixed row counts ([`pieces`]), so sqlx's
//!   prepared-statement cache serves every batch.
//! * JSON columns are bound as bytes, not strings ([`MysqlSink::bind_json`]):
//!   less server work per parameter. The text protocol costs the
//!   server more than prepared statements here, so those stay.
//! * `salt_events` rows carry `saltpipe_key` ([`rows::event_key`]) under a
//!   unique key, so a redelivered event is skipped like a return.
//! * Idempotent with `ON DUPLICATE KEY UPDATE jid = jid`, not `INSERT
//!   IGNORE`: IGNORE also turns a refused value (too long, bad UTF-8) into a
//!   warning and a silently truncated row; with strict mode and ON
//!   DUPLICATE KEY a bad value is a real error the worker can isolate and
//!   dead-letter, while a redelivered row is skipped. Duplicates are counted
//!   through a session variable bumped by the UPDATE clause, since sqlx
//!   always asks for "found rows" and affected-row counts cannot tell.
//! * `success` is written `1`/`0`, what MySQLdb and PyMySQL make of a bool
//!   (they escape `True` as `1`), so readers see what the returner wrote.
//! * Tables we create are utf8mb4; on a returner database made with the
//!   documented 3-byte `utf8`, 4-byte characters would be refused, so the
//!   JSON columns get them as `\uXXXX` escapes (same JSON, any charset).

use super::rows::{self, BoolStyle, ByTable, RowFormat};
use super::{Closed, NoReturn, Record, Sink, SinkConfig, SinkError, WriteReport};
use crate::redact::{KeyRedactor, SecretUrl};
use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::query_builder::Separated;
use sqlx::{AssertSqlSafe, Executor, MySql, QueryBuilder, Row};
use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

/// A `mysql://` (or `mariadb://`) URL, kept as written; shown without its password.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MysqlUrl {
    url: SecretUrl,
}

impl MysqlUrl {
    /// Checks the URL without connecting.
    pub fn parse(s: &str) -> Result<MysqlUrl, String> {
        let url = match s.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => s.to_owned(),
        };
        let opts = MySqlConnectOptions::from_str(&url)
            .map_err(|e| format!("bad MySQL URL {}: {e}", crate::redact::url(&url)))?;
        if opts.get_database().is_none_or(str::is_empty) {
            return Err(format!(
                "{}: name the database, e.g. mysql://salt@db.example:3306/salt",
                crate::redact::url(&url)
            ));
        }
        Ok(MysqlUrl {
            url: SecretUrl::new(url),
        })
    }

    pub(crate) fn options(&self, password: Option<&str>) -> Result<MySqlConnectOptions, SinkError> {
        let o = MySqlConnectOptions::from_str(self.url.expose())
            .map_err(|e| SinkError::Fatal(format!("{self}: {e}")))?;
        Ok(match password {
            Some(p) => o.password(p),
            None => o,
        })
    }
}

/// Shown redacted, like every URL ([`SecretUrl`]).
impl std::fmt::Display for MysqlUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.url.fmt(f)
    }
}

/// The returner's tables (utf8mb4), our additions, saltpipe's own
/// `saltpipe_outcomes` and `saltpipe_targets` (stamps in UTC: every
/// connection sets `time_zone = '+00:00'`), the dead-letter table.
/// Marks one target row closed: its window is over, or it is a syndic.
/// The most bytes of values one statement carries (a single larger row
/// still goes, alone, up to `row_max`). Each pooled connection keeps a
/// write buffer as large as the largest statement it sent, for good: at
/// half of a 16 MiB `max_allowed_packet`, four connections held 32 MiB
/// after a burst of big returns (docs/SCALE.md). A few MiB already carry
/// a thousand 1 KB rows or a dozen state runs per statement.
const STATEMENT_MAX: usize = 4 << 20;

const CLOSE_TARGET: &str =
    "UPDATE `saltpipe_targets` SET `closed` = 1 WHERE `jid` = ? AND `minion` = ?";

const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS `jids` (
  `jid` varchar(255) NOT NULL,
  `load` mediumtext NOT NULL,
  UNIQUE KEY `jid` (`jid`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS `salt_returns` (
  `fun` varchar(50) NOT NULL,
  `jid` varchar(255) NOT NULL,
  `return` mediumtext NOT NULL,
  `id` varchar(255) NOT NULL,
  `success` varchar(10) NOT NULL,
  `full_ret` mediumtext NOT NULL,
  `alter_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  KEY `id` (`id`),
  KEY `jid` (`jid`),
  KEY `fun` (`fun`),
  UNIQUE KEY `salt_returns_jid_id` (`jid`, `id`),
  KEY `salt_returns_alter_time` (`alter_time`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS `salt_events` (
  `id` BIGINT NOT NULL AUTO_INCREMENT,
  `tag` varchar(255) NOT NULL,
  `data` mediumtext NOT NULL,
  `alter_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  `master_id` varchar(255) NOT NULL,
  `saltpipe_key` char(32) CHARACTER SET ascii NULL,
  PRIMARY KEY (`id`),
  KEY `tag` (`tag`),
  KEY `salt_events_alter_time` (`alter_time`),
  UNIQUE KEY `salt_events_saltpipe_key` (`saltpipe_key`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS `saltpipe_outcomes` (
  `jid` varchar(255) NOT NULL,
  `minion` varchar(255) NOT NULL,
  `outcome` varchar(16) CHARACTER SET ascii NOT NULL,
  `fun` varchar(50) NOT NULL,
  `states_total` INT NULL,
  `states_failed` INT NULL,
  `states_changed` INT NULL,
  `duration_ms` BIGINT NULL,
  `stamp` DATETIME(6) NOT NULL,
  UNIQUE KEY `saltpipe_outcomes_jid_minion` (`jid`, `minion`),
  KEY `saltpipe_outcomes_minion_stamp` (`minion`, `stamp`),
  KEY `saltpipe_outcomes_outcome_stamp` (`outcome`, `stamp`),
  KEY `saltpipe_outcomes_stamp` (`stamp`),
  KEY `saltpipe_outcomes_minion_jid` (`minion`, `jid`),
  KEY `saltpipe_outcomes_outcome_jid` (`outcome`, `jid`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS `saltpipe_targets` (
  `jid` varchar(255) NOT NULL,
  `minion` varchar(255) NOT NULL,
  `fun` varchar(50) NOT NULL,
  `stamp` DATETIME(6) NOT NULL,
  `closed` TINYINT NOT NULL DEFAULT 0,
  UNIQUE KEY `saltpipe_targets_jid_minion` (`jid`, `minion`),
  KEY `saltpipe_targets_open` (`closed`, `stamp`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS `saltpipe_dead_letters` (
  `id` BIGINT NOT NULL AUTO_INCREMENT,
  `failed_at` TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  `tag` varchar(255) NOT NULL,
  `error` text NOT NULL,
  `body` longblob NOT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
];

/// What an existing returner database may lack: (table, columns, unique, DDL).
const ADDITIONS: &[(&str, &str, bool, &str)] = &[
    (
        "jids",
        "jid",
        true,
        "ALTER TABLE `jids` ADD UNIQUE KEY `jid` (`jid`)",
    ),
    (
        "salt_returns",
        "jid,id",
        true,
        "ALTER TABLE `salt_returns` ADD UNIQUE KEY `salt_returns_jid_id` (`jid`, `id`)",
    ),
    (
        "salt_returns",
        "alter_time",
        false,
        "ALTER TABLE `salt_returns` ADD KEY `salt_returns_alter_time` (`alter_time`)",
    ),
    (
        "salt_events",
        "alter_time",
        false,
        "ALTER TABLE `salt_events` ADD KEY `salt_events_alter_time` (`alter_time`)",
    ),
    (
        "salt_events",
        "saltpipe_key",
        true,
        "ALTER TABLE `salt_events` ADD UNIQUE KEY `salt_events_saltpipe_key` (`saltpipe_key`)",
    ),
    // The web pages' latest outcome per minion and a minion's history.
    (
        "saltpipe_outcomes",
        "minion,jid",
        false,
        "ALTER TABLE `saltpipe_outcomes` ADD KEY `saltpipe_outcomes_minion_jid` (`minion`, `jid`)",
    ),
    // The overview's failures of the last 24 h (failed rows only).
    (
        "saltpipe_outcomes",
        "outcome,jid",
        false,
        "ALTER TABLE `saltpipe_outcomes` ADD KEY `saltpipe_outcomes_outcome_jid` (`outcome`, `jid`)",
    ),
];

/// Columns an existing database may lack, added before [`ADDITIONS`] index
/// them: (table, column, DDL). The archive table too, if retention made it,
/// since it takes the live table's rows with `SELECT *`. The column goes
/// last (an instant ADD COLUMN in MariaDB 10.3+), where new tables have it.
const COLUMNS: &[(&str, &str, &str)] = &[
    (
        "salt_events",
        "saltpipe_key",
        "ALTER TABLE `salt_events` ADD COLUMN `saltpipe_key` char(32) CHARACTER SET ascii NULL",
    ),
    (
        "salt_events_archive",
        "saltpipe_key",
        "ALTER TABLE `salt_events_archive` ADD COLUMN `saltpipe_key` char(32) CHARACTER SET ascii NULL",
    ),
];

/// The DDL, as `saltpipe schema --print` shows it.
pub fn schema_ddl() -> String {
    let mut s = String::from(
        "-- saltpipe: Salt's mysql returner tables (utf8mb4), plus a unique key on\n\
         -- salt_returns (jid, id), alter_time indexes, a dedupe key on salt_events,\n\
         -- a dead-letter table and saltpipe_outcomes / saltpipe_targets (outcome of\n\
         -- each return, who did not return; see docs/ARCHITECTURE.md).\n\
         -- On an existing returner database saltpipe only adds what is missing:\n",
    );
    for ddl in COLUMNS
        .iter()
        .map(|c| c.2)
        .chain(ADDITIONS.iter().map(|a| a.3))
    {
        s.push_str("--   ");
        s.push_str(ddl);
        s.push_str(";\n");
    }
    for t in TABLES {
        s.push_str(t);
        s.push_str(";\n");
    }
    s
}

/// How to clean duplicates that block the unique key, without losing a row.
pub const DEDUPE_SQL: &str = "CREATE TABLE salt_returns_dedup LIKE salt_returns; \
ALTER TABLE salt_returns_dedup ADD UNIQUE KEY salt_returns_jid_id (jid, id); \
INSERT IGNORE INTO salt_returns_dedup SELECT * FROM salt_returns ORDER BY alter_time; \
RENAME TABLE salt_returns TO salt_returns_with_duplicates, salt_returns_dedup TO salt_returns;";

/// Largest value a `mediumtext` holds.
const MEDIUMTEXT_MAX: usize = (1 << 24) - 1;
/// MySQL's bind-parameter limit per statement.
const MAX_PARAMS: usize = 65_535;

pub struct MysqlSink {
    pool: MySqlPool,
    master_id: String,
    format: RowFormat,
    /// Batches written at once (`sink.writers`).
    writers: usize,
    /// Bytes of values per statement: half of `max_allowed_packet`, at most
    /// [`STATEMENT_MAX`].
    statement_bytes: usize,
    /// Largest row a statement can carry at all.
    row_max: usize,
    /// The JSON columns are 3-byte `utf8`: escape 4-byte characters.
    escape_astral: bool,
}

/// Server conditions that pass: the same batch may succeed later.
fn retriable_number(n: u16) -> bool {
    matches!(
        n,
        1021 // disk full
        | 1037 | 1038 | 1041 // out of memory
        | 1040 // too many connections
        | 1053 // server shutdown
        | 1114 // table full
        | 1152 | 1153 | 1154 | 1156 | 1157 | 1158 | 1159 | 1160 | 1161 // net errors
        | 1180 | 1181 // commit/rollback failed
        | 1203 // max_user_connections
        | 1205 // lock wait timeout
        | 1213 // deadlock
        | 1290 | 1836 // read-only (failover in progress)
        | 1927 // MariaDB: connection killed
        | 2002 | 2003 | 2006 | 2013 | 2055 // client: can't connect, gone away, lost
        | 3024 | 1969 // statement timeout
    )
}

/// Sorts an sqlx error into the worker's three cases.
pub(crate) fn classify(e: sqlx::Error) -> SinkError {
    match &e {
        sqlx::Error::Database(db) => {
            let number = db
                .try_downcast_ref::<MySqlDatabaseError>()
                .map(|m| m.number())
                .unwrap_or(0);
            if retriable_number(number) {
                SinkError::Retriable(e.to_string())
            } else if matches!(number, 1044 | 1045 | 1142 | 1146 | 1054) {
                // Access denied, table or column gone: no batch will pass.
                SinkError::Fatal(format!("MySQL: {e}"))
            } else {
                SinkError::Permanent {
                    message: e.to_string(),
                    index: None,
                }
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => SinkError::Retriable(e.to_string()),
        sqlx::Error::Configuration(_) => SinkError::Fatal(e.to_string()),
        _ => SinkError::Permanent {
            message: e.to_string(),
            index: None,
        },
    }
}

/// Makes a JSON text safe for a 3-byte `utf8` column: characters outside the
/// BMP (which only occur inside JSON strings) become surrogate-pair escapes.
pub fn escape_astral(json: &str) -> Cow<'_, str> {
    if json.chars().all(|c| (c as u32) < 0x10000) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if (c as u32) < 0x10000 {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    Cow::Owned(out)
}

impl MysqlSink {
    /// Connects, creates what is missing, and checks the rest.
    pub async fn connect(
        url: &MysqlUrl,
        password: Option<String>,
        cfg: &SinkConfig,
    ) -> Result<MysqlSink, SinkError> {
        let opts = url.options(password.as_deref())?;
        let pool = MySqlPoolOptions::new()
            .max_connections(cfg.pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // Refuse bad values instead of truncating them, whatever the server default.
                    conn.execute(
                        "SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES'), \
                         time_zone = '+00:00'",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            // Refused or unreachable: retriable (the caller may wait for it);
            // wrong password or no such database: fatal.
            .map_err(|e| match classify(e) {
                SinkError::Retriable(m) => {
                    SinkError::Retriable(format!("cannot connect to {url}: {m}"))
                }
                SinkError::Permanent { message, .. } | SinkError::Fatal(message) => {
                    SinkError::Fatal(format!("cannot connect to {url}: {message}"))
                }
            })?;
        let fatal = |what: &str, e: sqlx::Error| SinkError::Fatal(format!("{url}: {what}: {e}"));
        for t in TABLES {
            pool.execute(*t)
                .await
                .map_err(|e| fatal("creating the schema", e))?;
        }
        for (table, column, ddl) in COLUMNS {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.TABLES t WHERE t.TABLE_SCHEMA = DATABASE() \
                 AND t.TABLE_NAME = ? AND NOT EXISTS (SELECT 1 FROM information_schema.COLUMNS c \
                 WHERE c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME AND c.COLUMN_NAME = ?)",
            )
            .bind(table)
            .bind(column)
            .fetch_one(&pool)
            .await
            .map_err(|e| fatal("reading the columns", e))?;
            if n > 0 {
                tracing::info!(table, column, "adding a missing column: {ddl}");
                pool.execute(*ddl).await.map_err(|e| fatal(ddl, e))?;
            }
        }
        for (table, cols, unique, ddl) in ADDITIONS {
            if has_index(&pool, table, cols, *unique)
                .await
                .map_err(|e| fatal("reading the indexes", e))?
            {
                continue;
            }
            tracing::info!(table, columns = cols, "adding a missing index: {ddl}");
            if let Err(e) = pool.execute(*ddl).await {
                let dup = matches!(&e, sqlx::Error::Database(d)
                    if d.try_downcast_ref::<MySqlDatabaseError>().is_some_and(|m| m.number() == 1062));
                return Err(if dup && *table == "salt_returns" {
                    SinkError::Fatal(format!(
                        "{url}: salt_returns holds duplicate (jid, id) rows, so the unique key \
                         that makes redelivery safe cannot be added ({e}). saltpipe deletes \
                         nothing by itself. Find them with: SELECT jid, id, COUNT(*) FROM \
                         salt_returns GROUP BY jid, id HAVING COUNT(*) > 1; keep one of each \
                         (the old table is kept aside) with: {DEDUPE_SQL} then start again"
                    ))
                } else {
                    fatal(ddl, e)
                });
            }
        }
        let max_packet: u64 = sqlx::query_scalar("SELECT @@max_allowed_packet")
            .fetch_one(&pool)
            .await
            .map_err(|e| fatal("reading max_allowed_packet", e))?;
        let max_packet = usize::try_from(max_packet).unwrap_or(usize::MAX);
        let charsets: Vec<String> = sqlx::query_scalar(
            "SELECT CHARACTER_SET_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND COLUMN_NAME IN ('load', 'return', 'full_ret', 'data') \
             AND TABLE_NAME IN ('jids', 'salt_returns', 'salt_events')",
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| fatal("reading the column charsets", e))?;
        let escape_astral = charsets.iter().any(|c| c != "utf8mb4");
        if escape_astral {
            tracing::warn!(
                "{url}: the returner tables use a 3-byte utf8 charset: 4-byte characters are \
                 written as JSON \\u escapes; ALTER TABLE ... CONVERT TO CHARACTER SET utf8mb4 \
                 stores them as they are"
            );
        }
        Ok(MysqlSink {
            pool,
            format: RowFormat {
                style: BoolStyle::Digit,
                max_json: cfg.max_json(),
                runner_id: cfg.runner_id(),
            },
            master_id: cfg.master_id(),
            writers: cfg.writers(),
            statement_bytes: (max_packet / 2).clamp(64 << 10, STATEMENT_MAX),
            row_max: max_packet.saturating_sub(64 << 10).min(MEDIUMTEXT_MAX * 2),
            escape_astral,
        })
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    fn json<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if self.escape_astral {
            escape_astral(s)
        } else {
            Cow::Borrowed(s)
        }
    }

    /// Binds a JSON column's text as bytes (a binary-typed parameter): the
    /// server then skips the per-parameter character-set scan of a string
    /// parameter (`my_string_metadata_get`, 9% of mariadbd in `perf`) and
    /// only checks the bytes once, converting them into the column's
    /// charset, still strictly: ill-formed text would be refused as before.
    /// Measured: -14% server CPU per row (docs/BENCHMARKS.md).
    fn bind_json(&self, b: &mut Separated<'_, MySql, &'static str>, s: &str) {
        match self.json(s) {
            Cow::Borrowed(s) => b.push_bind(s.as_bytes()),
            Cow::Owned(s) => b.push_bind(s.into_bytes()),
        };
    }

    /// Refuses, before sending, a row no statement could carry (naming it).
    fn check_sizes(&self, t: &ByTable<'_>) -> Result<(), SinkError> {
        let refuse = |i: usize, what: &str, n: usize, max: usize| SinkError::Permanent {
            message: format!("{what} is {n} bytes; this MySQL server takes at most {max}"),
            index: Some(i),
        };
        for (i, j) in &t.jids {
            if j.load.len() > MEDIUMTEXT_MAX {
                return Err(refuse(*i, "the job load", j.load.len(), MEDIUMTEXT_MAX));
            }
            if j.bytes() > self.row_max {
                return Err(refuse(*i, "the job row", j.bytes(), self.row_max));
            }
        }
        for (i, r) in &t.returns {
            for (what, v) in [("the return", r.ret()), ("full_ret", r.full_ret.as_str())] {
                if v.len() > MEDIUMTEXT_MAX {
                    return Err(refuse(*i, what, v.len(), MEDIUMTEXT_MAX));
                }
            }
            if r.bytes() > self.row_max {
                return Err(refuse(*i, "the return row", r.bytes(), self.row_max));
            }
        }
        for (i, e) in &t.events {
            if e.data.len() > MEDIUMTEXT_MAX {
                return Err(refuse(*i, "the event data", e.data.len(), MEDIUMTEXT_MAX));
            }
            if e.bytes() > self.row_max {
                return Err(refuse(*i, "the event row", e.bytes(), self.row_max));
            }
        }
        Ok(())
    }
}

/// Whether `table` has an index on exactly `cols` (comma-separated, in order).
async fn has_index(
    pool: &MySqlPool,
    table: &str,
    cols: &str,
    unique: bool,
) -> Result<bool, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT CAST(GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX SEPARATOR ',') AS CHAR) AS cols, \
         MIN(NON_UNIQUE) AS non_unique \
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? \
         GROUP BY INDEX_NAME",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    for r in rows {
        let c: String = r.try_get("cols")?;
        let non_unique: i64 = r.try_get("non_unique")?;
        if c == cols && (!unique || non_unique == 0) {
            return Ok(true);
        }
        // A longer index starting with these columns serves retention too.
        if !unique && c.starts_with(&format!("{cols},")) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Rows per statement: powers of two, then one remainder under
/// [`PIECE_MIN`]. sqlx keeps a prepared statement per SQL text and
/// connection; a statement of any row count the batch happened to have
/// (the worker's batches vary with the mix of returns, jobs and events)
/// meant a fresh server-side prepare of up to 65,535 placeholders nearly
/// every batch, and the cache evicting the others. With these sizes a few
/// statements per table serve every batch, prepared once per connection.
fn pieces<T>(run: &[T], max_rows: usize) -> Vec<&[T]> {
    let top = if max_rows == 0 {
        1
    } else {
        1 << max_rows.ilog2()
    };
    let mut out = Vec::new();
    let mut rest = run;
    let mut size = top;
    while !rest.is_empty() {
        while size > PIECE_MIN && size > rest.len() {
            size /= 2;
        }
        let n = if size > PIECE_MIN || rest.len() >= size {
            size.min(rest.len())
        } else {
            rest.len()
        };
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// Runs a built statement in the batch's (or purge chunk's) transaction:
/// the rows it affected, or its error classified.
async fn execute(
    q: &mut QueryBuilder<MySql>,
    tx: &mut sqlx::MySqlConnection,
) -> Result<u64, SinkError> {
    Ok(q.build()
        .execute(tx)
        .await
        .map_err(classify)?
        .rows_affected())
}

/// A statement whose bind buffer is sized for its rows up front: `bytes`
/// of values in `params` parameters. sqlx grows the buffer by doubling
/// otherwise, copying every JSON text already bound at each step (2% of
/// `run`'s CPU with large returns).
fn presized(sql: &str, params: usize, bytes: usize) -> QueryBuilder<MySql> {
    let mut args = sqlx::mysql::MySqlArguments::default();
    // A length prefix of at most 9 bytes before each value.
    sqlx::Arguments::reserve(
        &mut args,
        params,
        bytes.saturating_add(params.saturating_mul(9)),
    );
    QueryBuilder::with_arguments(sql, args)
}

/// Below this many rows, one statement of the exact count (cheap to prepare).
const PIECE_MIN: usize = 32;

/// The clause that makes an insert idempotent and counts what it skipped in
/// a session variable (sqlx asks for "found rows", so affected-row counts
/// cannot tell a skipped duplicate from an insert).
fn on_duplicate(column: &str, var: &str) -> String {
    format!(
        " ON DUPLICATE KEY UPDATE `{column}` = IF((@{var} := @{var} + 1) > 0, `{column}`, `{column}`)"
    )
}

#[async_trait]
impl Sink for MysqlSink {
    fn writers(&self) -> usize {
        self.writers
    }

    fn row_limit(&self) -> Option<usize> {
        Some(self.row_max)
    }

    fn prepare(&self, batch: &mut [Record], redact: Option<&KeyRedactor>) {
        rows::prepare(batch, self.format, redact)
    }

    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
        let sets = rows::convert(batch, self.format)?;
        let t = ByTable::of(&sets);
        self.check_sizes(&t)?;
        let keys: Vec<String> = t
            .events
            .iter()
            .map(|(_, e)| rows::event_key(&self.master_id, &e.tag, &e.data))
            .collect();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query("SET @saltpipe_dj = 0, @saltpipe_dr = 0, @saltpipe_de = 0")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let (mut jids, mut returns, mut events) = (0, 0, 0);
        let jid_dup = on_duplicate("jid", "saltpipe_dj");
        for run in rows::runs(&t.jids, MAX_PARAMS / 2, self.statement_bytes, |(_, j)| {
            j.bytes()
        }) {
            for piece in pieces(run, MAX_PARAMS / 2) {
                let mut q = presized(
                    "INSERT INTO `jids` (`jid`, `load`) ",
                    piece.len() * 2,
                    piece.iter().map(|(_, j)| j.bytes()).sum(),
                );
                q.push_values(piece, |mut b, (_, j)| {
                    b.push_bind(j.jid.as_str());
                    self.bind_json(&mut b, &j.load);
                });
                q.push(&jid_dup);
                jids += execute(&mut q, &mut tx).await?;
            }
        }
        let ret_dup = on_duplicate("jid", "saltpipe_dr");
        for run in rows::runs(
            &t.returns,
            MAX_PARAMS / 6,
            self.statement_bytes,
            |(_, r)| r.bytes(),
        ) {
            for piece in pieces(run, MAX_PARAMS / 6) {
                let mut q = presized(
                    "INSERT INTO `salt_returns` (`fun`, `jid`, `return`, `id`, `success`, `full_ret`) ",
                    piece.len() * 6,
                    piece.iter().map(|(_, r)| r.bytes()).sum(),
                );
                q.push_values(piece, |mut b, (_, r)| {
                    b.push_bind(r.fun.as_str()).push_bind(r.jid.as_str());
                    self.bind_json(&mut b, r.ret());
                    b.push_bind(r.id.as_str()).push_bind(r.success.as_str());
                    self.bind_json(&mut b, &r.full_ret);
                });
                q.push(&ret_dup);
                returns += execute(&mut q, &mut tx).await?;
            }
        }
        // Outcomes: a real return replaces a `no_return` row (a late
        // return), never another real one (first write wins, as in
        // salt_returns). `outcome` is assigned last: MySQL evaluates the
        // assignments in order, and the others test the old value.
        let keep_unless_no_return =
            |c: &str| format!("`{c}` = IF(`outcome` = 'no_return', VALUES(`{c}`), `{c}`)");
        let out_dup = format!(
            " ON DUPLICATE KEY UPDATE {}",
            [
                "fun",
                "states_total",
                "states_failed",
                "states_changed",
                "duration_ms",
                "stamp",
                "outcome",
            ]
            .map(keep_unless_no_return)
            .join(", ")
        );
        for run in rows::runs(
            &t.returns,
            MAX_PARAMS / 9,
            self.statement_bytes,
            |(_, r)| r.jid.len() + r.id.len() + r.fun.len() + 64,
        ) {
            for piece in pieces(run, MAX_PARAMS / 9) {
                let mut q = QueryBuilder::<MySql>::new(
                    "INSERT INTO `saltpipe_outcomes` (`jid`, `minion`, `outcome`, `fun`, \
                     `states_total`, `states_failed`, `states_changed`, `duration_ms`, `stamp`) ",
                );
                q.push_values(piece, |mut b, (_, r)| {
                    let o = &r.outcome;
                    b.push_bind(r.jid.as_str())
                        .push_bind(r.id.as_str())
                        .push_bind(o.outcome)
                        .push_bind(r.fun.as_str())
                        .push_bind(o.states_total)
                        .push_bind(o.states_failed)
                        .push_bind(o.states_changed)
                        .push_bind(o.duration_ms)
                        .push_bind(o.stamp.as_str());
                });
                q.push(&out_dup);
                execute(&mut q, &mut tx).await?;
            }
        }
        for run in rows::runs(&t.targets, MAX_PARAMS / 4, self.statement_bytes, |g| {
            g.jid.len() + g.minion.len() + g.fun.len() + 32
        }) {
            for piece in pieces(run, MAX_PARAMS / 4) {
                let mut q = QueryBuilder::<MySql>::new(
                    "INSERT INTO `saltpipe_targets` (`jid`, `minion`, `fun`, `stamp`) ",
                );
                q.push_values(piece, |mut b, g| {
                    b.push_bind(g.jid)
                        .push_bind(g.minion)
                        .push_bind(g.fun)
                        .push_bind(g.stamp);
                });
                q.push(" ON DUPLICATE KEY UPDATE `jid` = `jid`");
                execute(&mut q, &mut tx).await?;
            }
        }
        for r in &t.relays {
            sqlx::query(CLOSE_TARGET)
                .bind(r.jid)
                .bind(r.minion)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }
        let keyed: Vec<(&rows::EventRow, &str)> = t
            .events
            .iter()
            .zip(&keys)
            .map(|((_, e), k)| (*e, k.as_str()))
            .collect();
        let ev_dup = on_duplicate("id", "saltpipe_de");
        for run in rows::runs(&keyed, MAX_PARAMS / 4, self.statement_bytes, |(e, _)| {
            e.bytes()
        }) {
            for piece in pieces(run, MAX_PARAMS / 4) {
                let mut q = QueryBuilder::<MySql>::new(
                    "INSERT INTO `salt_events` (`tag`, `data`, `master_id`, `saltpipe_key`) ",
                );
                q.push_values(piece, |mut b, (e, k)| {
                    b.push_bind(e.tag.as_str());
                    self.bind_json(&mut b, &e.data);
                    b.push_bind(self.master_id.as_str()).push_bind(*k);
                });
                q.push(&ev_dup);
                events += execute(&mut q, &mut tx).await?;
            }
        }
        let (dj, dr, de): (i64, i64, i64) = sqlx::query_as(
            "SELECT CAST(@saltpipe_dj AS SIGNED), CAST(@saltpipe_dr AS SIGNED), \
             CAST(@saltpipe_de AS SIGNED)",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        let (dj, dr, de) = (dj.max(0) as u64, dr.max(0) as u64, de.max(0) as u64);
        // With "found rows", a skipped duplicate still counts as affected.
        Ok(WriteReport {
            jids: jids.saturating_sub(dj),
            returns: returns.saturating_sub(dr),
            events: events.saturating_sub(de),
            ignored: dj + dr + de,
        })
    }

    async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
    ) -> Result<(), SinkError> {
        let tag: String = tag.chars().take(255).collect();
        sqlx::query("INSERT INTO `saltpipe_dead_letters` (`tag`, `error`, `body`) VALUES (?, ?, ?)")
            .bind(tag)
            .bind(error)
            .bind(&body[..])
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    async fn close_returns(&self, before: &str, limit: usize) -> Result<Closed, SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // FOR UPDATE: a second worker sweeping at the same time waits for
        // these targets, then finds them closed (a locking read sees the
        // latest commit). Not SKIP LOCKED: MariaDB before 10.6 lacks it.
        let due: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT t.`jid`, t.`minion`, t.`fun`, \
             CAST(DATE_FORMAT(t.`stamp`, '%Y-%m-%d %H:%i:%s.%f') AS CHAR), \
             EXISTS (SELECT 1 FROM `saltpipe_outcomes` o WHERE o.`jid` = t.`jid` AND o.`minion` = t.`minion`) \
             FROM `saltpipe_targets` t WHERE t.`closed` = 0 AND t.`stamp` < ? \
             ORDER BY t.`stamp` LIMIT ? FOR UPDATE",
        )
        .bind(before)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        let mut closed = Closed::default();
        for (jid, minion, fun, stamp, returned) in due {
            closed.targets += 1;
            sqlx::query(CLOSE_TARGET)
                .bind(&jid)
                .bind(&minion)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            if returned != 0 {
                continue;
            }
            // A return committed since the SELECT wins: the NOT EXISTS
            // skips the row (and the key makes a race with one harmless).
            let n = sqlx::query(
                "INSERT INTO `saltpipe_outcomes` (`jid`, `minion`, `outcome`, `fun`, `stamp`) \
                 SELECT ?, ?, 'no_return', ?, ? FROM DUAL WHERE NOT EXISTS \
                 (SELECT 1 FROM `saltpipe_outcomes` WHERE `jid` = ? AND `minion` = ?) \
                 ON DUPLICATE KEY UPDATE `jid` = `jid`",
            )
            .bind(&jid)
            .bind(&minion)
            .bind(&fun)
            .bind(&stamp)
            .bind(&jid)
            .bind(&minion)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
            if n > 0 {
                closed.no_return.push(NoReturn {
                    jid,
                    minion,
                    fun,
                    stamp,
                });
            }
        }
        tx.commit().await.map_err(classify)?;
        Ok(closed)
    }

    async fn purge_chunk(
        &self,
        older_than: Duration,
        archive: bool,
        chunk: usize,
    ) -> Result<u64, SinkError> {
        let secs = older_than.as_secs() as i64;
        let mut tx = self.pool.begin().await.map_err(classify)?;
        if archive {
            for t in [
                "jids",
                "salt_returns",
                "salt_events",
                "saltpipe_outcomes",
                "saltpipe_targets",
            ] {
                tx.execute(AssertSqlSafe(format!(
                    "CREATE TABLE IF NOT EXISTS `{t}_archive` LIKE `{t}`"
                )))
                .await
                .map_err(classify)?;
            }
        }
        // Exact chunks by key, oldest first: ties on alter_time (thousands
        // of rows share a second) never widen a chunk. salt_returns has no
        // primary key in the returner's schema; (jid, id) is our unique key.
        let mut moved = 0;
        let keys: Vec<(String, String)> = sqlx::query_as(
            "SELECT `jid`, `id` FROM `salt_returns` WHERE `alter_time` < NOW() - INTERVAL ? SECOND \
             ORDER BY `alter_time` LIMIT ?",
        )
        .bind(secs)
        .bind(chunk as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        if !keys.is_empty() {
            let mut jobs: Vec<&str> = keys.iter().map(|(j, _)| j.as_str()).collect();
            jobs.sort_unstable();
            jobs.dedup();
            let in_jobs = |prefix: &str| {
                let mut q = QueryBuilder::<MySql>::new(prefix);
                q.push(" WHERE `jid` IN (");
                let mut sep = q.separated(", ");
                for j in &jobs {
                    sep.push_bind(*j);
                }
                q.push(")");
                q
            };
            if archive {
                execute(
                    &mut in_jobs("INSERT IGNORE INTO `jids_archive` SELECT * FROM `jids`"),
                    &mut tx,
                )
                .await?;
            }
            moved += execute(&mut in_jobs("DELETE FROM `jids`"), &mut tx).await?;
            let by_key = |prefix: &str| {
                let mut q = QueryBuilder::<MySql>::new(prefix);
                q.push(" WHERE (`jid`, `id`) IN (");
                let mut sep = q.separated(", ");
                for (j, i) in &keys {
                    sep.push("(");
                    sep.push_bind_unseparated(j.as_str());
                    sep.push_unseparated(", ");
                    sep.push_bind_unseparated(i.as_str());
                    sep.push_unseparated(")");
                }
                q.push(")");
                q
            };
            if archive {
                execute(
                    &mut by_key(
                        "INSERT IGNORE INTO `salt_returns_archive` SELECT * FROM `salt_returns`",
                    ),
                    &mut tx,
                )
                .await?;
            }
            moved += execute(&mut by_key("DELETE FROM `salt_returns`"), &mut tx).await?;
        }
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT `id` FROM `salt_events` WHERE `alter_time` < NOW() - INTERVAL ? SECOND \
             ORDER BY `alter_time` LIMIT ?",
        )
        .bind(secs)
        .bind(chunk as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        if !ids.is_empty() {
            let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            if archive {
                tx.execute(AssertSqlSafe(format!(
                    "INSERT IGNORE INTO `salt_events_archive` SELECT * FROM `salt_events` WHERE `id` IN ({list})"
                )))
                .await
                .map_err(classify)?;
            }
            moved += tx
                .execute(AssertSqlSafe(format!(
                    "DELETE FROM `salt_events` WHERE `id` IN ({list})"
                )))
                .await
                .map_err(classify)?
                .rows_affected();
        }
        // saltpipe's own tables age by their stamp (sessions are in UTC); a
        // target goes only once its window was closed.
        for (t, only) in [
            ("saltpipe_outcomes", ""),
            ("saltpipe_targets", "`closed` = 1 AND "),
        ] {
            let keys: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT `jid`, `minion` FROM `{t}` WHERE {only}`stamp` < NOW(6) - INTERVAL ? SECOND \
                 ORDER BY `stamp` LIMIT ?"
            )))
            .bind(secs)
            .bind(chunk as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
            if keys.is_empty() {
                continue;
            }
            let by_key = |prefix: String| {
                let mut q = QueryBuilder::<MySql>::new(prefix);
                q.push(" WHERE (`jid`, `minion`) IN (");
                let mut sep = q.separated(", ");
                for (j, m) in &keys {
                    sep.push("(");
                    sep.push_bind_unseparated(j.as_str());
                    sep.push_unseparated(", ");
                    sep.push_bind_unseparated(m.as_str());
                    sep.push_unseparated(")");
                }
                q.push(")");
                q
            };
            if archive {
                execute(
                    &mut by_key(format!(
                        "INSERT IGNORE INTO `{t}_archive` SELECT * FROM `{t}`"
                    )),
                    &mut tx,
                )
                .await?;
            }
            moved += execute(&mut by_key(format!("DELETE FROM `{t}`")), &mut tx).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_the_password() {
        let u = MysqlUrl::parse("mysql://salt:s3cret@db:3306/salt?ssl-mode=required").expect("url");
        assert!(!u.to_string().contains("s3cret"), "{u}");
        assert!(!format!("{u:?}").contains("s3cret"), "{u:?}");
        assert!(u.to_string().contains("db:3306/salt"), "{u}");
        let m = MysqlUrl::parse("mariadb://salt@db/salt").expect("mariadb");
        assert!(m.to_string().starts_with("mysql://"), "{m}");
        assert!(MysqlUrl::parse("mysql://db:3306").is_err(), "no database");
        assert!(MysqlUrl::parse("mysql://db/salt?ssl-mode=sometimes").is_err());
    }

    #[test]
    fn astral_characters_become_json_escapes() {
        assert!(matches!(escape_astral("{\"a\":\"é\"}"), Cow::Borrowed(_)));
        let s = escape_astral("\"x😀y\"");
        assert_eq!(s, "\"x\\ud83d\\ude00y\"");
        let back: String = serde_json::from_str(&s).expect("json");
        assert_eq!(back, "x😀y");
    }

    #[test]
    fn pieces_have_few_sizes() {
        let v: Vec<u32> = (0..2000).collect();
        let p = pieces(&v, 10_922);
        assert_eq!(
            p.iter().map(|s| s.len()).collect::<Vec<_>>(),
            [1024, 512, 256, 128, 64, 16]
        );
        assert_eq!(p.concat(), v, "in order, every row once");
        let p = pieces(&v[..100], 64);
        assert_eq!(p.iter().map(|s| s.len()).collect::<Vec<_>>(), [64, 32, 4]);
        let p = pieces(&v, 300);
        assert_eq!(
            p.iter()
                .map(|s| s.len())
                .collect::<Vec<_>>()
                .iter()
                .sum::<usize>(),
            2000
        );
        assert!(p.iter().all(|s| s.len() <= 256));
        assert_eq!(pieces(&v[..5], 10_922).len(), 1);
        assert!(pieces(&v[..0], 8).is_empty());
    }

    #[test]
    fn errors_are_classified() {
        assert!(retriable_number(1213) && retriable_number(1205) && retriable_number(2006));
        assert!(!retriable_number(1406) && !retriable_number(1366));
        assert!(classify(sqlx::Error::PoolTimedOut).is_retriable());
    }
}
