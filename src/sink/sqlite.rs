//! The default sink: one SQLite file in the mysql returner's schema.
//!
//! rusqlite with a cached prepared statement per table: CRATES.md measured
//! it at twice sqlx's best multi-row path here (over 500k rows/s), and the
//! embedded queue links it anyway. WAL lets readers query while we write.
//!
//! Durability follows `sink.sync` (by default the queue's `queue.sync`):
//! `synchronous=NORMAL` makes a commit survive a crash of saltpipe, FULL
//! also a power cut (the WAL is fsynced before the commit returns). The
//! worker acks the queue only after the commit returns, so with both at
//! `full` every ack (the queue's fsynced delete) follows the fsync of the
//! rows it acks; a FULL queue with a NORMAL sink would fsync the delete of
//! rows that a power cut can still take back from the sink. Checked by
//! tests/power_loss.rs, which traces the real binary's fsyncs.

use super::rows::{self, BoolStyle, EventRow, ReturnRow, RowFormat, RowSet, Targets};
use super::{Closed, NoReturn, Record, Sink, SinkError, WriteReport};
use crate::queue::SyncMode;
use crate::redact::KeyRedactor;
use crate::wal::Checkpointer;
use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The returner's three tables, in SQLite's types, plus what we need:
/// a unique key on (jid, id), indexes on alter_time, the dead-letter table,
/// saltpipe's own `saltpipe_outcomes` and `saltpipe_targets` (see
/// [`rows`]; stamps are UTC text, `YYYY-MM-DD HH:MM:SS.ffffff`),
/// and `salt_events.saltpipe_key` (see [`rows::event_key`]), last so that a
/// column added to an older table lands in the same place.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jids (
    jid varchar(255) NOT NULL,
    load mediumtext NOT NULL,
    UNIQUE (jid)
);
CREATE TABLE IF NOT EXISTS salt_returns (
    fun varchar(50) NOT NULL,
    jid varchar(255) NOT NULL,
    "return" mediumtext NOT NULL,
    id varchar(255) NOT NULL,
    success varchar(10) NOT NULL,
    full_ret mediumtext NOT NULL,
    alter_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE UNIQUE INDEX IF NOT EXISTS salt_returns_jid_id ON salt_returns (jid, id);
CREATE INDEX IF NOT EXISTS salt_returns_id ON salt_returns (id);
CREATE INDEX IF NOT EXISTS salt_returns_fun ON salt_returns (fun);
CREATE INDEX IF NOT EXISTS salt_returns_alter_time ON salt_returns (alter_time);
CREATE TABLE IF NOT EXISTS salt_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tag varchar(255) NOT NULL,
    data mediumtext NOT NULL,
    alter_time TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    master_id varchar(255) NOT NULL,
    saltpipe_key char(32)
);
CREATE INDEX IF NOT EXISTS salt_events_tag ON salt_events (tag);
CREATE INDEX IF NOT EXISTS salt_events_alter_time ON salt_events (alter_time);
CREATE UNIQUE INDEX IF NOT EXISTS salt_events_saltpipe_key ON salt_events (saltpipe_key);
CREATE TABLE IF NOT EXISTS saltpipe_outcomes (
    jid varchar(255) NOT NULL,
    minion varchar(255) NOT NULL,
    outcome varchar(16) NOT NULL,
    fun varchar(50) NOT NULL,
    states_total integer,
    states_failed integer,
    states_changed integer,
    duration_ms integer,
    stamp TIMESTAMP NOT NULL,
    UNIQUE (jid, minion)
);
CREATE INDEX IF NOT EXISTS saltpipe_outcomes_minion_stamp ON saltpipe_outcomes (minion, stamp);
CREATE INDEX IF NOT EXISTS saltpipe_outcomes_outcome_stamp ON saltpipe_outcomes (outcome, stamp);
CREATE INDEX IF NOT EXISTS saltpipe_outcomes_stamp ON saltpipe_outcomes (stamp);
CREATE INDEX IF NOT EXISTS saltpipe_outcomes_minion_jid ON saltpipe_outcomes (minion, jid);
CREATE INDEX IF NOT EXISTS saltpipe_outcomes_outcome_jid ON saltpipe_outcomes (outcome, jid);
CREATE TABLE IF NOT EXISTS saltpipe_targets (
    jid varchar(255) NOT NULL,
    minion varchar(255) NOT NULL,
    fun varchar(50) NOT NULL,
    stamp TIMESTAMP NOT NULL,
    closed smallint NOT NULL DEFAULT 0,
    UNIQUE (jid, minion)
);
CREATE INDEX IF NOT EXISTS saltpipe_targets_open ON saltpipe_targets (closed, stamp);
CREATE TABLE IF NOT EXISTS saltpipe_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    failed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    tag varchar(255) NOT NULL,
    error text NOT NULL,
    body blob NOT NULL
);
"#;

pub struct SqliteSink {
    conn: Arc<Mutex<Connection>>,
    /// Copies committed WAL pages into the database off the write path.
    checkpointer: Arc<Checkpointer>,
    master_id: Arc<str>,
    path: PathBuf,
    format: RowFormat,
}

/// Marks one target row closed: its window is over, or it is a syndic.
const CLOSE_TARGET: &str = "UPDATE saltpipe_targets SET closed = 1 WHERE jid = ?1 AND minion = ?2";

/// Page cache of the writing connection, in KiB: a default batch (2,000
/// returns of ~2 KiB with their index entries) fits, so a commit does not
/// spill pages to the WAL halfway, and the upper levels of the four
/// indexes stay cached instead of being read back from the OS per row.
/// Measured on the sink's own write of 1M prepared rows (BENCH_PREPARED=1
/// benches/sql_sinks.rs, alternated): 4 MiB 59-91k rows/s, 8 MiB 62-87k,
/// 16 MiB 72-92k; a full replay's peak RSS is ~90 MB at 8 MiB and ~110 MB
/// at 16 MiB, over the 100 MB budget, hence 8.
const CACHE_KIB: i64 = 8 * 1024;

/// Busy, locked, I/O, full disk: conditions that pass. Anything else is the data.
fn classify(e: rusqlite::Error) -> SinkError {
    let retriable = matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory
        )
    );
    if retriable {
        SinkError::Retriable(e.to_string())
    } else {
        SinkError::Permanent {
            message: e.to_string(),
            index: None,
        }
    }
}

enum OpenError {
    Busy(rusqlite::Error),
    Fatal(SinkError),
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Opens the file in WAL mode and creates what is missing of the schema.
fn open_blocking(p: &Path, sync: SyncMode) -> Result<Connection, OpenError> {
    let fatal = |e: rusqlite::Error| {
        if is_busy(&e) {
            OpenError::Busy(e)
        } else {
            OpenError::Fatal(SinkError::Fatal(format!("{}: {e}", p.display())))
        }
    };
    let c = Connection::open(p).map_err(fatal)?;
    c.busy_timeout(Duration::from_secs(10)).map_err(fatal)?;
    crate::wal::set_up(&c, sync.pragma()).map_err(fatal)?;
    c.pragma_update(None, "cache_size", -CACHE_KIB)
        .map_err(fatal)?;
    add_missing_columns(&c).map_err(fatal)?;
    c.execute_batch(SCHEMA).map_err(|e| {
        if is_busy(&e) {
            return OpenError::Busy(e);
        }
        OpenError::Fatal(SinkError::Fatal(format!(
            "{}: cannot create the schema: {e}. If duplicate (jid, id) rows exist, remove them \
             (keep the oldest: DELETE FROM salt_returns WHERE rowid NOT IN (SELECT min(rowid) FROM salt_returns GROUP BY jid, id)) \
             and start again",
            p.display()
        )))
    })?;
    Ok(c)
}

/// What `CREATE TABLE IF NOT EXISTS` cannot give a database made by an
/// older saltpipe: `salt_events.saltpipe_key` (before SCHEMA indexes it),
/// also in an existing archive table, whose `SELECT *` copies must match.
fn add_missing_columns(c: &Connection) -> rusqlite::Result<()> {
    for table in ["salt_events", "salt_events_archive"] {
        let cols: Vec<String> = c
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if !cols.is_empty() && !cols.iter().any(|n| n == "saltpipe_key") {
            tracing::info!(table, "adding the missing column saltpipe_key");
            c.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN saltpipe_key char(32)"
            ))?;
        }
    }
    Ok(())
}

impl SqliteSink {
    pub async fn open(
        path: &Path,
        master_id: String,
        sync: SyncMode,
    ) -> Result<SqliteSink, SinkError> {
        let path = path.to_path_buf();
        let p = path.clone();
        let (conn, checkpointer) = tokio::task::spawn_blocking(
            move || -> Result<(Connection, Checkpointer), SinkError> {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        SinkError::Fatal(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                // Another process opening the same file at the same moment (two
                // `work` processes starting together) holds the lock while it
                // switches to WAL or creates the schema: wait for it, briefly.
                let started = std::time::Instant::now();
                loop {
                    match open_blocking(&p, sync) {
                        Err(OpenError::Busy(e)) if started.elapsed() < Duration::from_secs(30) => {
                            tracing::debug!(error = %e, "sqlite sink busy at open; retrying");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(OpenError::Busy(e)) => {
                            return Err(SinkError::Fatal(format!("{}: {e}", p.display())));
                        }
                        Err(OpenError::Fatal(e)) => return Err(e),
                        Ok(c) => {
                            let ck = Checkpointer::start(&p, &c)
                                .map_err(|e| SinkError::Fatal(format!("{}: {e}", p.display())))?;
                            return Ok((c, ck));
                        }
                    }
                }
            },
        )
        .await
        .map_err(|e| SinkError::Fatal(e.to_string()))??;
        Ok(SqliteSink {
            conn: Arc::new(Mutex::new(conn)),
            checkpointer: Arc::new(checkpointer),
            master_id: Arc::from(master_id),
            path,
            format: RowFormat {
                style: BoolStyle::Digit,
                max_json: super::DEFAULT_MAX_RETURN_SIZE,
                runner_id: "master",
            },
        })
    }

    /// The `id` of runner jobs' rows ([`RowFormat::runner_id`]).
    pub fn with_runner_id(mut self, runner_id: &'static str) -> SqliteSink {
        self.format.runner_id = runner_id;
        self
    }

    /// The most JSON one column may hold (`sink.max_return_size`).
    pub fn with_max_json(mut self, max_json: usize) -> SqliteSink {
        self.format.max_json = max_json;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn write_blocking(
    c: &mut Connection,
    sets: &[Arc<RowSet>],
    master_id: &str,
) -> Result<WriteReport, SinkError> {
    let tx = c.transaction().map_err(classify)?;
    let mut report = WriteReport::default();
    {
        let mut jid_st = tx
            .prepare_cached("INSERT OR IGNORE INTO jids (jid, load) VALUES (?1, ?2)")
            .map_err(classify)?;
        let mut ret_st = tx
            .prepare_cached(
                r#"INSERT OR IGNORE INTO salt_returns (fun, jid, "return", id, success, full_ret) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#,
            )
            .map_err(classify)?;
        let mut out_st = tx
            .prepare_cached(
                "INSERT INTO saltpipe_outcomes (jid, minion, outcome, fun, states_total, \
                 states_failed, states_changed, duration_ms, stamp) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (jid, minion) DO UPDATE SET outcome = excluded.outcome, \
                 fun = excluded.fun, states_total = excluded.states_total, \
                 states_failed = excluded.states_failed, states_changed = excluded.states_changed, \
                 duration_ms = excluded.duration_ms, stamp = excluded.stamp \
                 WHERE saltpipe_outcomes.outcome = 'no_return'",
            )
            .map_err(classify)?;
        let mut target_st = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO saltpipe_targets (jid, minion, fun, stamp) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(classify)?;
        let mut close_st = tx.prepare_cached(CLOSE_TARGET).map_err(classify)?;
        let mut ev_st = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO salt_events (tag, data, master_id, saltpipe_key) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(classify)?;
        let at = |index: usize| {
            move |e: rusqlite::Error| match classify(e) {
                SinkError::Permanent { message, .. } => SinkError::Permanent {
                    message,
                    index: Some(index),
                },
                other => other,
            }
        };
        // A job's `jids` row (a `new`'s load, or none for a 3006 syndic's
        // forwarded announcement) and its target rows.
        let mut job = |jid: &str,
                       load: Option<&str>,
                       t: Option<&Targets>,
                       report: &mut WriteReport,
                       i: usize|
         -> Result<(), SinkError> {
            if let Some(load) = load {
                match jid_st.execute(params![jid, load]).map_err(at(i))? {
                    0 => report.ignored += 1,
                    _ => report.jids += 1,
                }
            }
            let Some(t) = t else { return Ok(()) };
            for m in &t.minions {
                target_st
                    .execute(params![jid, m, t.fun, t.stamp])
                    .map_err(at(i))?;
            }
            // A syndic: its row written closed (rows::Targets::relay).
            if let Some(relay) = &t.relay {
                target_st
                    .execute(params![jid, relay, t.fun, t.stamp])
                    .map_err(at(i))?;
                close_st.execute(params![jid, relay]).map_err(at(i))?;
            }
            Ok(())
        };
        for (i, set) in sets.iter().enumerate() {
            match &**set {
                RowSet::Job(j) => job(&j.jid, Some(&j.load), j.targets.as_ref(), &mut report, i)?,
                RowSet::Targets { jid, targets: t } => job(jid, None, Some(t), &mut report, i)?,
                RowSet::Return(r, j) => {
                    let ReturnRow {
                        fun,
                        jid,
                        id,
                        success,
                        full_ret,
                        ..
                    } = r;
                    match ret_st
                        .execute(params![fun, jid, r.ret(), id, success, full_ret])
                        .map_err(at(i))?
                    {
                        0 => report.ignored += 1,
                        _ => report.returns += 1,
                    }
                    let o = &r.outcome;
                    out_st
                        .execute(params![
                            jid,
                            id,
                            o.outcome,
                            fun,
                            o.states_total,
                            o.states_failed,
                            o.states_changed,
                            o.duration_ms,
                            o.stamp
                        ])
                        .map_err(at(i))?;
                    if let Some(j) = j {
                        job(&j.jid, Some(&j.load), j.targets.as_ref(), &mut report, i)?;
                    }
                }
                RowSet::Event(EventRow { tag, data }) => {
                    let key = rows::event_key(master_id, tag, data);
                    match ev_st
                        .execute(params![tag, data, master_id, key])
                        .map_err(at(i))?
                    {
                        0 => report.ignored += 1,
                        _ => report.events += 1,
                    }
                }
            }
        }
    }
    tx.commit().map_err(classify)?;
    Ok(report)
}

/// [`Sink::close_returns`] in one immediate transaction (SQLite has one
/// writer: a second sweeper waits, then sees the targets closed).
fn close_blocking(c: &mut Connection, before: &str, limit: usize) -> rusqlite::Result<Closed> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut closed = Closed::default();
    {
        let mut st = tx.prepare_cached(
            "SELECT t.jid, t.minion, t.fun, t.stamp, EXISTS (SELECT 1 FROM saltpipe_outcomes o \
             WHERE o.jid = t.jid AND o.minion = t.minion) FROM saltpipe_targets t \
             WHERE t.closed = 0 AND t.stamp < ?1 ORDER BY t.stamp LIMIT ?2",
        )?;
        let due: Vec<(NoReturn, bool)> = st
            .query_map(params![before, limit as i64], |r| {
                Ok((
                    NoReturn {
                        jid: r.get(0)?,
                        minion: r.get(1)?,
                        fun: r.get(2)?,
                        stamp: r.get(3)?,
                    },
                    r.get(4)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO saltpipe_outcomes (jid, minion, outcome, fun, stamp) \
             VALUES (?1, ?2, 'no_return', ?3, ?4) ON CONFLICT (jid, minion) DO NOTHING",
        )?;
        let mut close = tx.prepare_cached(CLOSE_TARGET)?;
        for (n, returned) in due {
            closed.targets += 1;
            close.execute(params![n.jid, n.minion])?;
            if !returned && insert.execute(params![n.jid, n.minion, n.fun, n.stamp])? == 1 {
                closed.no_return.push(n);
            }
        }
    }
    tx.commit()?;
    Ok(closed)
}

#[async_trait]
impl Sink for SqliteSink {
    fn prepare(&self, batch: &mut [Record], redact: Option<&KeyRedactor>) {
        rows::prepare(batch, self.format, redact)
    }

    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
        let sets = rows::convert(batch, self.format)?;
        // A return is stored about twice (`return` and `full_ret`).
        let wal_bytes = 2 * batch.iter().map(|r| r.event.body.len()).sum::<usize>();
        let conn = self.conn.clone();
        let master_id = self.master_id.clone();
        let checkpointer = self.checkpointer.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| SinkError::Fatal("sqlite connection poisoned".into()))?;
            let report = write_blocking(&mut c, &sets, &master_id)?;
            checkpointer.nudge(wal_bytes);
            Ok(report)
        })
        .await
        .map_err(|e| SinkError::Retriable(e.to_string()))?
    }

    async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
    ) -> Result<(), SinkError> {
        let conn = self.conn.clone();
        let tag = tag.to_owned();
        let body = body.clone();
        let error = error.to_owned();
        tokio::task::spawn_blocking(move || {
            let c = conn
                .lock()
                .map_err(|_| SinkError::Fatal("sqlite connection poisoned".into()))?;
            c.execute(
                "INSERT INTO saltpipe_dead_letters (tag, error, body) VALUES (?1, ?2, ?3)",
                params![tag, error, &body[..]],
            )
            .map(|_| ())
            .map_err(classify)
        })
        .await
        .map_err(|e| SinkError::Retriable(e.to_string()))?
    }

    async fn close_returns(&self, before: &str, limit: usize) -> Result<Closed, SinkError> {
        let conn = self.conn.clone();
        let before = before.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| SinkError::Fatal("sqlite connection poisoned".into()))?;
            close_blocking(&mut c, &before, limit).map_err(classify)
        })
        .await
        .map_err(|e| SinkError::Retriable(e.to_string()))?
    }

    async fn purge_chunk(
        &self,
        older_than: Duration,
        archive: bool,
        chunk: usize,
    ) -> Result<u64, SinkError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| SinkError::Fatal("sqlite connection poisoned".into()))?;
            purge_blocking(&mut c, older_than, archive, chunk).map_err(classify)
        })
        .await
        .map_err(|e| SinkError::Retriable(e.to_string()))?
    }
}

/// One retention chunk in one transaction: the `chunk` oldest returns older
/// than `older_than` with their jobs, and as many events.
fn purge_blocking(
    c: &mut Connection,
    older_than: Duration,
    archive: bool,
    chunk: usize,
) -> rusqlite::Result<u64> {
    let age = format!("-{} seconds", older_than.as_secs());
    let tx = c.transaction()?;
    if archive {
        for t in ["jids", "salt_returns", "salt_events"]
            .iter()
            .chain(OWN_TABLES)
        {
            tx.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {t}_archive AS SELECT * FROM {t} WHERE 0"
            ))?;
        }
    }
    let mut moved = 0u64;
    for table in ["salt_returns", "salt_events"] {
        // Exact chunks by rowid, oldest first: ties on alter_time (thousands
        // of rows share a second) never widen a chunk.
        let ids: Vec<i64> = {
            let mut st = tx.prepare(&format!(
                "SELECT rowid FROM {table} WHERE alter_time < datetime('now', ?1) \
                 ORDER BY alter_time LIMIT ?2"
            ))?;
            st.query_map(params![age, chunk as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        if ids.is_empty() {
            continue;
        }
        let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let cond = format!("rowid IN ({list})");
        if table == "salt_returns" {
            let jobs = format!("jid IN (SELECT jid FROM salt_returns WHERE {cond})");
            if archive {
                tx.execute(
                    &format!("INSERT INTO jids_archive SELECT * FROM jids WHERE {jobs}"),
                    [],
                )?;
            }
            moved += tx.execute(&format!("DELETE FROM jids WHERE {jobs}"), [])? as u64;
        }
        if archive {
            tx.execute(
                &format!("INSERT INTO {table}_archive SELECT * FROM {table} WHERE {cond}"),
                [],
            )?;
        }
        moved += tx.execute(&format!("DELETE FROM {table} WHERE {cond}"), [])? as u64;
    }
    // saltpipe's own tables age by their stamp (Salt's time of the return
    // or announcement); a target goes only once its window was closed.
    let cutoff = rows::stamp_of(
        std::time::SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(std::time::UNIX_EPOCH),
    );
    for (table, only) in OWN_TABLES.iter().zip(["", "closed = 1 AND "]) {
        let cond = format!(
            "rowid IN (SELECT rowid FROM {table} WHERE {only}stamp < ?1 ORDER BY stamp LIMIT ?2)"
        );
        if archive {
            tx.execute(
                &format!("INSERT INTO {table}_archive SELECT * FROM {table} WHERE {cond}"),
                params![cutoff, chunk as i64],
            )?;
        }
        moved += tx.execute(
            &format!("DELETE FROM {table} WHERE {cond}"),
            params![cutoff, chunk as i64],
        )? as u64;
    }
    tx.commit()?;
    Ok(moved)
}

/// saltpipe's own tables, which retention purges (and archives) too.
const OWN_TABLES: &[&str] = &["saltpipe_outcomes", "saltpipe_targets"];

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_writer_syncs_as_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (sync, level) in [(SyncMode::Normal, 1), (SyncMode::Full, 2)] {
            let path = dir.path().join(format!("{level}.db"));
            let sink = SqliteSink::open(&path, "m".into(), sync)
                .await
                .expect("open");
            let got: i64 = sink
                .conn
                .lock()
                .expect("lock")
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("pragma");
            assert_eq!(got, level, "{sync:?}");
        }
    }
}
