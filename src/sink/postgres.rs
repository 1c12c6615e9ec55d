//! PostgreSQL: the tables of Salt's `pgjsonb` returner (jsonb columns,
//! `timestamptz`, GIN indexes), so Salt's job-cache functions and people's
//! SQL read what we write.
//!
//! Why it looks the way it does:
//! * One `INSERT ... SELECT FROM UNNEST($1::text[], ...)` per table per
//!   batch: six parameters whatever the batch size (no 65,535 bind limit to
//!   chunk around), one plan, and the server casts text to jsonb itself.
//!   Measured against COPY it needs no hand-written escaping and, unlike
//!   COPY, takes `ON CONFLICT DO NOTHING`, which makes redelivery harmless.
//! * `return` is taken from the parsed `full_ret` on the server
//!   (`full_ret -> 'return'`): jsonb parsing is the largest single cost of
//!   an insert here (perf: ~17% of the backend), and `return` is a copy of
//!   part of `full_ret`, so parsing it once saves that much again.
//! * jsonb cannot hold U+0000 (`\u0000` is refused) and text columns cannot
//!   hold a NUL byte. Rather than dead-letter a good return for it, a NUL is
//!   written as the six characters `\u0000` (in JSON the string escape
//!   `\\u0000`): nothing else changes, the position is kept, a reader sees
//!   what it was. Counted in `rows::adjusted`, logged. (MySQL and SQLite
//!   store the JSON text as it is.)
//! * `salt_events` rows carry `saltpipe_key` (`rows::event_key`) under a
//!   unique index: a redelivered event meets `ON CONFLICT DO NOTHING`.
//! * `success` is written `true`/`false`: psycopg2 sends a Python bool as
//!   the literal `true`, which the varchar column stores as that word.
//! * Error classes by SQLSTATE: connection (08), transaction rollback (40:
//!   deadlock, serialization), insufficient resources (53), operator
//!   intervention (57), lock not available: retried; data (22) and
//!   integrity (23): refused rows for the worker to isolate; access and
//!   missing tables (42, 28): fatal.

use super::rows::{self, ByTable, RowFormat};
use super::{Closed, NoReturn, Record, Sink, SinkConfig, SinkError, WriteReport};
use crate::redact::{KeyRedactor, SecretUrl};
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor};
use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

/// A `postgres://` URL, kept as written; shown without its password.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PgUrl {
    url: SecretUrl,
}

impl PgUrl {
    /// Checks the URL without connecting.
    pub fn parse(s: &str) -> Result<PgUrl, String> {
        let opts = PgConnectOptions::from_str(s)
            .map_err(|e| format!("bad PostgreSQL URL {}: {e}", crate::redact::url(s)))?;
        if opts.get_database().is_none_or(str::is_empty) {
            return Err(format!(
                "{}: name the database, e.g. postgres://salt@db.example:5432/salt",
                crate::redact::url(s)
            ));
        }
        Ok(PgUrl {
            url: SecretUrl::new(s),
        })
    }

    pub(crate) fn options(&self, password: Option<&str>) -> Result<PgConnectOptions, SinkError> {
        let o = PgConnectOptions::from_str(self.url.expose())
            .map_err(|e| SinkError::Fatal(format!("{self}: {e}")))?
            .application_name("saltpipe");
        Ok(match password {
            Some(p) => o.password(p),
            None => o,
        })
    }
}

/// Shown redacted, like every URL ([`SecretUrl`]).
impl std::fmt::Display for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.url.fmt(f)
    }
}

/// pgjsonb's DDL (made idempotent), our additions, the dead-letter table.
/// Marks one target row closed: its window is over, or it is a syndic.
const CLOSE_TARGET: &str = "UPDATE saltpipe_targets SET closed = 1 WHERE jid = $1 AND minion = $2";

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS jids (
   jid varchar(255) NOT NULL primary key,
   load jsonb NOT NULL
)",
    "CREATE INDEX IF NOT EXISTS idx_jids_jsonb ON jids USING gin (load) WITH (fastupdate=on)",
    "CREATE TABLE IF NOT EXISTS salt_returns (
  fun varchar(50) NOT NULL,
  jid varchar(255) NOT NULL,
  return jsonb NOT NULL,
  id varchar(255) NOT NULL,
  success varchar(10) NOT NULL,
  full_ret jsonb NOT NULL,
  alter_time TIMESTAMP WITH TIME ZONE DEFAULT NOW()
)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_id ON salt_returns (id)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_jid ON salt_returns (jid)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_fun ON salt_returns (fun)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_return ON salt_returns USING gin (return) WITH (fastupdate=on)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_full_ret ON salt_returns USING gin (full_ret) WITH (fastupdate=on)",
    "CREATE SEQUENCE IF NOT EXISTS seq_salt_events_id",
    "CREATE TABLE IF NOT EXISTS salt_events (
    id BIGINT NOT NULL UNIQUE DEFAULT nextval('seq_salt_events_id'),
    tag varchar(255) NOT NULL,
    data jsonb NOT NULL,
    alter_time TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    master_id varchar(255) NOT NULL,
    saltpipe_key varchar(32)
)",
    "CREATE INDEX IF NOT EXISTS idx_salt_events_tag ON salt_events (tag)",
    "CREATE INDEX IF NOT EXISTS idx_salt_events_data ON salt_events USING gin (data) WITH (fastupdate=on)",
    // saltpipe's additions: these are all an existing pgjsonb database gets.
    "CREATE UNIQUE INDEX IF NOT EXISTS salt_returns_jid_id ON salt_returns (jid, id)",
    "CREATE INDEX IF NOT EXISTS salt_returns_alter_time ON salt_returns (alter_time)",
    "CREATE INDEX IF NOT EXISTS salt_events_alter_time ON salt_events (alter_time)",
    // The dedupe key of salt_events (rows::event_key), last in the table;
    // added to an existing table (instant: nullable, no default), and to its
    // archive, which takes the live rows with SELECT *.
    "ALTER TABLE salt_events ADD COLUMN IF NOT EXISTS saltpipe_key varchar(32)",
    "CREATE UNIQUE INDEX IF NOT EXISTS salt_events_saltpipe_key ON salt_events (saltpipe_key)",
    "DO $$ BEGIN IF to_regclass('salt_events_archive') IS NOT NULL THEN \
     ALTER TABLE salt_events_archive ADD COLUMN IF NOT EXISTS saltpipe_key varchar(32); END IF; END $$",
    "CREATE TABLE IF NOT EXISTS saltpipe_outcomes (
    jid varchar(255) NOT NULL,
    minion varchar(255) NOT NULL,
    outcome varchar(16) NOT NULL,
    fun varchar(50) NOT NULL,
    states_total integer,
    states_failed integer,
    states_changed integer,
    duration_ms bigint,
    stamp timestamptz NOT NULL,
    UNIQUE (jid, minion)
)",
    "CREATE INDEX IF NOT EXISTS saltpipe_outcomes_minion_stamp ON saltpipe_outcomes (minion, stamp)",
    "CREATE INDEX IF NOT EXISTS saltpipe_outcomes_outcome_stamp ON saltpipe_outcomes (outcome, stamp)",
    "CREATE INDEX IF NOT EXISTS saltpipe_outcomes_stamp ON saltpipe_outcomes (stamp)",
    "CREATE INDEX IF NOT EXISTS saltpipe_outcomes_minion_jid ON saltpipe_outcomes (minion, jid)",
    "CREATE INDEX IF NOT EXISTS saltpipe_outcomes_outcome_jid ON saltpipe_outcomes (outcome, jid)",
    "CREATE TABLE IF NOT EXISTS saltpipe_targets (
    jid varchar(255) NOT NULL,
    minion varchar(255) NOT NULL,
    fun varchar(50) NOT NULL,
    stamp timestamptz NOT NULL,
    closed smallint NOT NULL DEFAULT 0,
    UNIQUE (jid, minion)
)",
    "CREATE INDEX IF NOT EXISTS saltpipe_targets_open ON saltpipe_targets (closed, stamp)",
    "CREATE TABLE IF NOT EXISTS saltpipe_dead_letters (
    id bigserial PRIMARY KEY,
    failed_at timestamptz DEFAULT now(),
    tag text NOT NULL,
    error text NOT NULL,
    body bytea NOT NULL
)",
];

/// The DDL, as `saltpipe schema --print` shows it.
pub fn schema_ddl(schema: super::pg_schema::PgSchema) -> String {
    if schema == super::pg_schema::PgSchema::Postgres {
        let mut s = String::from(super::pg_schema::TEXT_HEADER);
        for t in schema.ddl(SCHEMA) {
            s.push_str(t);
            s.push_str(";\n");
        }
        return s;
    }
    let mut s = String::from(
        "-- saltpipe: Salt's pgjsonb returner tables, plus a unique index on\n\
         -- salt_returns (jid, id), alter_time indexes, a dedupe key on salt_events,\n\
         -- a dead-letter table, and saltpipe_outcomes / saltpipe_targets (outcome of\n\
         -- each return, who did not return; see docs/ARCHITECTURE.md).\n\
         -- Every statement is IF NOT EXISTS: on an existing pgjsonb database only\n\
         -- the additions are created.\n",
    );
    for t in SCHEMA {
        s.push_str(t);
        s.push_str(";\n");
    }
    s
}

/// How to clean duplicates that block the unique index (keeps the first of each).
pub const DEDUPE_SQL: &str = "CREATE TABLE salt_returns_duplicates AS SELECT a.* FROM salt_returns a \
JOIN salt_returns b ON a.jid = b.jid AND a.id = b.id AND a.ctid > b.ctid; \
DELETE FROM salt_returns a USING salt_returns b WHERE a.jid = b.jid AND a.id = b.id AND a.ctid > b.ctid;";

/// jsonb's size limit, a little under.
const JSONB_MAX: usize = 255 << 20;
/// Values per statement: far below the 1 GiB message limit, and small
/// enough that the write buffer each pooled connection keeps (as large as
/// the largest statement it sent, for good) stays small: at 64 MiB, a
/// burst of big returns left ~200 MB of RSS (docs/SCALE.md). 4 MiB still
/// carries a couple of thousand 1 KB rows per statement.
const STATEMENT_BYTES: usize = 4 << 20;

pub struct PgSink {
    pool: PgPool,
    master_id: String,
    format: RowFormat,
    /// Batches written at once (`sink.writers`).
    writers: usize,
}

/// Sorts an sqlx error into the worker's three cases.
pub(crate) fn classify(e: sqlx::Error) -> SinkError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let class = code.get(..2).unwrap_or("");
            if matches!(class, "08" | "40" | "53" | "57" | "58")
                || matches!(code.as_str(), "55P03" | "55006")
            {
                SinkError::Retriable(e.to_string())
            } else if matches!(class, "42" | "28" | "3D") {
                SinkError::Fatal(format!("PostgreSQL: {e}"))
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

/// JSON text jsonb takes: every `\u0000` escape becomes `\\u0000` (the six
/// characters); a `\\` pair is skipped whole so `\\u0000` text stays as it is.
fn pg_json(s: &str) -> Cow<'_, str> {
    let b = s.as_bytes();
    if memchr::memmem::find(b, b"\\u0000").is_none() {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    let (mut at, mut copied) = (0, 0);
    while let Some(off) = memchr::memchr(b'\\', &b[at..]) {
        let p = at + off;
        if b[p + 1..].starts_with(b"u0000") {
            out.push_str(&s[copied..p]);
            out.push_str("\\\\u0000");
            copied = p + 6;
            at = p + 6;
        } else {
            // An escape is two bytes (`\u` is followed by hex digits only).
            at = (p + 2).min(b.len());
        }
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

/// Text a varchar column takes: a NUL byte becomes the six characters `\u0000`.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\\u0000"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Whether any of the values had to change.
fn changed(values: &[Cow<'_, str>]) -> bool {
    values.iter().any(|v| matches!(v, Cow::Owned(_)))
}

/// PostgreSQL text cannot hold NUL: the dead-letter row must still land.
fn no_nul(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

impl PgSink {
    /// Connects and creates what is missing.
    pub async fn connect(
        url: &PgUrl,
        password: Option<String>,
        cfg: &SinkConfig,
    ) -> Result<PgSink, SinkError> {
        let opts = url.options(password.as_deref())?;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.pool_size)
            .acquire_timeout(Duration::from_secs(10))
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
        for ddl in cfg.schema.ddl(SCHEMA) {
            if let Err(e) = pool.execute(ddl).await {
                let dup =
                    matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"));
                return Err(SinkError::Fatal(if dup {
                    format!(
                        "{url}: salt_returns holds duplicate (jid, id) rows, so the unique index \
                         that makes redelivery safe cannot be created ({e}). saltpipe deletes \
                         nothing by itself. Find them with: SELECT jid, id, count(*) FROM \
                         salt_returns GROUP BY jid, id HAVING count(*) > 1; keep one of each \
                         (the others are copied aside first) with: {DEDUPE_SQL} then start again"
                    )
                } else {
                    format!("{url}: creating the schema ({ddl}): {e}")
                }));
            }
        }
        Ok(PgSink {
            pool,
            format: RowFormat {
                style: cfg.schema.bool_style(),
                max_json: cfg.max_json(),
                runner_id: cfg.runner_id(),
            },
            master_id: cfg.master_id(),
            writers: cfg.writers(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Refuses, before sending, a value jsonb cannot hold (naming its record).
fn check_sizes(t: &ByTable<'_>) -> Result<(), SinkError> {
    let refuse = |i: usize, what: &str, n: usize| SinkError::Permanent {
        message: format!("{what} is {n} bytes; jsonb holds at most {JSONB_MAX}"),
        index: Some(i),
    };
    for (i, j) in &t.jids {
        if j.load.len() > JSONB_MAX {
            return Err(refuse(*i, "the job load", j.load.len()));
        }
    }
    for (i, r) in &t.returns {
        // `return` is part of `full_ret`, so this bounds both.
        if r.full_ret.len() > JSONB_MAX {
            return Err(refuse(*i, "the return", r.full_ret.len()));
        }
    }
    for (i, e) in &t.events {
        if e.data.len() > JSONB_MAX {
            return Err(refuse(*i, "the event data", e.data.len()));
        }
    }
    Ok(())
}

#[async_trait]
impl Sink for PgSink {
    fn writers(&self) -> usize {
        self.writers
    }

    fn row_limit(&self) -> Option<usize> {
        Some(JSONB_MAX)
    }

    fn prepare(&self, batch: &mut [Record], redact: Option<&KeyRedactor>) {
        rows::prepare(batch, self.format, redact)
    }

    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
        let sets = rows::convert(batch, self.format)?;
        let t = ByTable::of(&sets);
        check_sizes(&t)?;
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut report = WriteReport::default();
        for run in rows::runs(&t.jids, usize::MAX, STATEMENT_BYTES, |(_, j)| j.bytes()) {
            let mut jid = Vec::with_capacity(run.len());
            let mut load = Vec::with_capacity(run.len());
            for (_, j) in run {
                let row = [pg_text(&j.jid), pg_json(&j.load)];
                if changed(&row) {
                    rows::note_nul_escaped(&format!("salt/job/{}/new", j.jid));
                }
                let [a, b] = row;
                jid.push(a);
                load.push(b);
            }
            let n = sqlx::query(
                "INSERT INTO jids (jid, load) SELECT j, l::jsonb \
                 FROM UNNEST($1::text[], $2::text[]) AS t(j, l) ON CONFLICT DO NOTHING",
            )
            .bind(jid)
            .bind(load)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
            report.jids += n;
            report.ignored += run.len() as u64 - n.min(run.len() as u64);
        }
        for run in rows::runs(&t.returns, usize::MAX, STATEMENT_BYTES, |(_, r)| r.bytes()) {
            let mut cols: [Vec<Cow<'_, str>>; 5] = Default::default();
            for (_, r) in run {
                let row = [
                    pg_text(&r.fun),
                    pg_text(&r.jid),
                    pg_text(&r.id),
                    Cow::Borrowed(r.success.as_str()),
                    pg_json(&r.full_ret),
                ];
                if changed(&row) {
                    rows::note_nul_escaped(&format!("salt/job/{}/ret/{}", r.jid, r.id));
                }
                for (c, v) in cols.iter_mut().zip(row) {
                    c.push(v);
                }
            }
            let [fun, jid, id, success, full_ret] = cols;
            // `return` is `full_ret`'s "return" (rows::rows_of takes it from
            // there too, "null" when absent), so jsonb parses the text once;
            // OFFSET 0 keeps the planner from inlining the cast twice.
            let n = sqlx::query(
                "INSERT INTO salt_returns (fun, jid, return, id, success, full_ret) \
                 SELECT f, j, COALESCE(fr -> 'return', 'null'::jsonb), i, s, fr \
                 FROM (SELECT f, j, i, s, fr::jsonb AS fr \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                 AS t(f, j, i, s, fr) OFFSET 0) AS x ON CONFLICT DO NOTHING",
            )
            .bind(fun)
            .bind(jid)
            .bind(id)
            .bind(success)
            .bind(full_ret)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
            report.returns += n;
            report.ignored += run.len() as u64 - n.min(run.len() as u64);
        }
        // Outcomes: a real return replaces a `no_return` row (a late
        // return), never another real one (first write wins). Stamps are
        // UTC text ([`rows::stamp`]), read here as UTC.
        // Once per (jid, minion): ON CONFLICT DO UPDATE refuses to touch a
        // row twice in one statement (a return delivered twice in a batch,
        // e.g. from two masters).
        let mut seen = std::collections::HashSet::new();
        let outcomes: Vec<_> = t
            .returns
            .iter()
            .filter(|(_, r)| seen.insert((r.jid.as_str(), r.id.as_str())))
            .collect();
        for run in rows::runs(&outcomes, usize::MAX, STATEMENT_BYTES, |(_, r)| {
            r.jid.len() + r.id.len() + r.fun.len() + 64
        }) {
            let mut text: [Vec<Cow<'_, str>>; 5] = Default::default();
            let mut nums: [Vec<Option<i64>>; 4] = Default::default();
            for (_, r) in run {
                let o = &r.outcome;
                for (c, v) in text.iter_mut().zip([
                    pg_text(&r.jid),
                    pg_text(&r.id),
                    Cow::Borrowed(o.outcome),
                    pg_text(&r.fun),
                    Cow::Borrowed(o.stamp.as_str()),
                ]) {
                    c.push(v);
                }
                for (c, v) in nums.iter_mut().zip([
                    o.states_total,
                    o.states_failed,
                    o.states_changed,
                    o.duration_ms,
                ]) {
                    c.push(v);
                }
            }
            let [jid, minion, outcome, fun, stamp] = text;
            let [total, failed, changed, duration] = nums;
            sqlx::query(
                "INSERT INTO saltpipe_outcomes AS o (jid, minion, outcome, fun, states_total, \
                 states_failed, states_changed, duration_ms, stamp) \
                 SELECT j, m, oc, f, st, sf, sc, d, (s || '+00')::timestamptz \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], \
                 $6::int8[], $7::int8[], $8::int8[], $9::text[]) AS t(j, m, oc, f, st, sf, sc, d, s) \
                 ON CONFLICT (jid, minion) DO UPDATE SET outcome = excluded.outcome, \
                 fun = excluded.fun, states_total = excluded.states_total, \
                 states_failed = excluded.states_failed, states_changed = excluded.states_changed, \
                 duration_ms = excluded.duration_ms, stamp = excluded.stamp \
                 WHERE o.outcome = 'no_return'",
            )
            .bind(jid)
            .bind(minion)
            .bind(outcome)
            .bind(fun)
            .bind(total)
            .bind(failed)
            .bind(changed)
            .bind(duration)
            .bind(stamp)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        for run in rows::runs(&t.targets, usize::MAX, STATEMENT_BYTES, |g| {
            g.jid.len() + g.minion.len() + g.fun.len() + 32
        }) {
            let mut cols: [Vec<Cow<'_, str>>; 4] = Default::default();
            for g in run {
                for (c, v) in cols.iter_mut().zip([
                    pg_text(g.jid),
                    pg_text(g.minion),
                    pg_text(g.fun),
                    Cow::Borrowed(g.stamp),
                ]) {
                    c.push(v);
                }
            }
            let [jid, minion, fun, stamp] = cols;
            sqlx::query(
                "INSERT INTO saltpipe_targets (jid, minion, fun, stamp) \
                 SELECT j, m, f, (s || '+00')::timestamptz \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS t(j, m, f, s) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(jid)
            .bind(minion)
            .bind(fun)
            .bind(stamp)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        for r in &t.relays {
            sqlx::query(CLOSE_TARGET)
                .bind(r.jid)
                .bind(r.minion)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }
        for run in rows::runs(&t.events, usize::MAX, STATEMENT_BYTES, |(_, e)| e.bytes()) {
            let mut tag = Vec::with_capacity(run.len());
            let mut data = Vec::with_capacity(run.len());
            let mut key = Vec::with_capacity(run.len());
            for (_, e) in run {
                // The key is of the event as it came, before any NUL escaping.
                key.push(rows::event_key(&self.master_id, &e.tag, &e.data));
                let row = [pg_text(&e.tag), pg_json(&e.data)];
                if changed(&row) {
                    rows::note_nul_escaped(&e.tag);
                }
                let [a, b] = row;
                tag.push(a);
                data.push(b);
            }
            let n = sqlx::query(
                "INSERT INTO salt_events (tag, data, master_id, saltpipe_key) \
                 SELECT t, d::jsonb, $3, k FROM UNNEST($1::text[], $2::text[], $4::text[]) \
                 AS x(t, d, k) ON CONFLICT DO NOTHING",
            )
            .bind(tag)
            .bind(data)
            .bind(pg_text(&self.master_id))
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
            report.events += n;
            report.ignored += run.len() as u64 - n.min(run.len() as u64);
        }
        tx.commit().await.map_err(classify)?;
        Ok(report)
    }

    async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
    ) -> Result<(), SinkError> {
        sqlx::query("INSERT INTO saltpipe_dead_letters (tag, error, body) VALUES ($1, $2, $3)")
            .bind(no_nul(tag))
            .bind(no_nul(error))
            .bind(&body[..])
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    async fn close_returns(&self, before: &str, limit: usize) -> Result<Closed, SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // SKIP LOCKED: workers sweeping at once take different targets.
        let due: Vec<(String, String, String, String, bool)> = sqlx::query_as(
            "SELECT t.jid, t.minion, t.fun, \
             to_char(t.stamp AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
             EXISTS (SELECT 1 FROM saltpipe_outcomes o WHERE o.jid = t.jid AND o.minion = t.minion) \
             FROM saltpipe_targets t WHERE t.closed = 0 AND t.stamp < ($1 || '+00')::timestamptz \
             ORDER BY t.stamp LIMIT $2 FOR UPDATE OF t SKIP LOCKED",
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
            if returned {
                continue;
            }
            let n = sqlx::query(
                "INSERT INTO saltpipe_outcomes (jid, minion, outcome, fun, stamp) \
                 VALUES ($1, $2, 'no_return', $3, ($4 || '+00')::timestamptz) ON CONFLICT DO NOTHING",
            )
            .bind(&jid)
            .bind(&minion)
            .bind(&fun)
            .bind(&stamp)
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
        let secs = older_than.as_secs().to_string();
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
                    "CREATE TABLE IF NOT EXISTS {t}_archive (LIKE {t} INCLUDING DEFAULTS)"
                )))
                .await
                .map_err(classify)?;
            }
        }
        // Exact chunks by row identity (ctid), oldest first: ties on
        // alter_time (thousands of rows share a second) never widen a chunk.
        let cutoff = "alter_time < now() - ($1::text || ' seconds')::interval";
        let (aj, ar, ae) = if archive {
            (
                ", aj AS (INSERT INTO jids_archive SELECT * FROM dj)",
                ", ar AS (INSERT INTO salt_returns_archive SELECT * FROM dr)",
                ", ae AS (INSERT INTO salt_events_archive SELECT * FROM de)",
            )
        } else {
            ("", "", "")
        };
        let returns: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "WITH c AS (SELECT ctid AS t, jid FROM salt_returns WHERE {cutoff} ORDER BY alter_time LIMIT $2), \
             dj AS (DELETE FROM jids WHERE jid IN (SELECT jid FROM c) RETURNING *){aj}, \
             dr AS (DELETE FROM salt_returns WHERE ctid IN (SELECT t FROM c) RETURNING *){ar} \
             SELECT (SELECT count(*) FROM dj) + (SELECT count(*) FROM dr)"
        )))
        .bind(&secs)
        .bind(chunk as i64)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        let events: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "WITH c AS (SELECT ctid AS t FROM salt_events WHERE {cutoff} ORDER BY alter_time LIMIT $2), \
             de AS (DELETE FROM salt_events WHERE ctid IN (SELECT t FROM c) RETURNING *){ae} \
             SELECT count(*) FROM de"
        )))
        .bind(&secs)
        .bind(chunk as i64)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        // saltpipe's own tables age by their stamp; a target goes only once
        // its window was closed.
        let mut own = 0i64;
        for (t, only) in [
            ("saltpipe_outcomes", ""),
            ("saltpipe_targets", "closed = 1 AND "),
        ] {
            let a = if archive {
                format!(", a AS (INSERT INTO {t}_archive SELECT * FROM d)")
            } else {
                String::new()
            };
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "WITH c AS (SELECT ctid AS t FROM {t} WHERE {only}stamp < now() - ($1::text || ' seconds')::interval \
                 ORDER BY stamp LIMIT $2), d AS (DELETE FROM {t} WHERE ctid IN (SELECT t FROM c) RETURNING *){a} \
                 SELECT count(*) FROM d"
            )))
            .bind(&secs)
            .bind(chunk as i64)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
            own += n;
        }
        let moved = (returns + events + own).max(0) as u64;
        tx.commit().await.map_err(classify)?;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_the_password() {
        let u =
            PgUrl::parse("postgres://salt:s3cret@db:5432/salt?sslmode=verify-full").expect("url");
        assert!(!u.to_string().contains("s3cret"), "{u}");
        assert!(!format!("{u:?}").contains("s3cret"), "{u:?}");
        assert!(PgUrl::parse("postgres://db:5432").is_err(), "no database");
        assert!(PgUrl::parse("postgres://db/salt?sslmode=sometimes").is_err());
    }

    #[test]
    fn nul_becomes_visible_text() {
        assert!(matches!(pg_json("{\"a\": \"b\"}"), Cow::Borrowed(_)));
        let j = pg_json(r#"{"a\u0000": "x\u0000y\\u0000z\\\u0000", "b": "\u00001"}"#);
        assert_eq!(
            j,
            r#"{"a\\u0000": "x\\u0000y\\u0000z\\\\u0000", "b": "\\u00001"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&j).expect("json");
        assert_eq!(v["b"], "\\u00001");
        assert_eq!(pg_text("a\0b"), "a\\u0000b");
        assert!(matches!(pg_text("ab"), Cow::Borrowed(_)));
    }

    #[test]
    fn errors_are_classified() {
        assert!(classify(sqlx::Error::PoolTimedOut).is_retriable());
        assert!(!classify(sqlx::Error::RowNotFound).is_retriable());
    }
}
