//! The read-only query layer: one small trait, one implementation per
//! backend. The pages' SQL is written once (in `pages`), with `?`
//! placeholders and the few dialect differences asked of [`Dialect`];
//! a backend only runs one bounded, parameterised statement and hands back
//! rows of text and integers.
//!
//! Every statement runs read-only and under a timeout: SQLite is opened
//! with `SQLITE_OPEN_READ_ONLY` and interrupted by a progress handler past
//! its deadline; PostgreSQL sessions get `default_transaction_read_only`
//! and `statement_timeout`; MariaDB sessions `SET SESSION TRANSACTION READ
//! ONLY` and `max_statement_time`. So a page cannot write, and a slow query
//! cannot pin a connection (a read-only database user is enough anyway).

use crate::sink::SinkConfig;
use crate::sink::SinkUrl;
use std::sync::Arc;
use std::time::Duration;

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Text(String),
}

impl Cell {
    pub fn text(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Int(i) => i.to_string(),
            Cell::Text(s) => s.clone(),
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Cell::Int(i) => *i,
            Cell::Text(s) => s.trim().parse().unwrap_or(0),
            Cell::Null => 0,
        }
    }

    pub fn opt_int(&self) -> Option<i64> {
        match self {
            Cell::Null => None,
            c => Some(c.int()),
        }
    }
}

pub type Row = Vec<Cell>;

/// A bound parameter.
#[derive(Debug, Clone)]
pub enum Param {
    Int(i64),
    Text(String),
}

/// Why a page's query failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable or busy, or the statement timed out:
    /// the page may work on a reload.
    #[error("the database did not answer: {0}")]
    Retriable(String),
    /// A bad statement or schema (a bug, or a table that is not there).
    #[error("query failed: {0}")]
    Permanent(String),
    /// The database cannot be opened at all.
    #[error("{0}")]
    Fatal(String),
}

/// SQL that differs between backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Mysql,
    Postgres,
}

impl Dialect {
    /// A JSON text column's top-level string member `key` (a constant of
    /// the code, never user input) as text.
    pub fn json_text(self, col: &str, key: &'static str) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract({col}, '$.{key}')"),
            Dialect::Mysql => format!("JSON_UNQUOTE(JSON_EXTRACT({col}, '$.{key}'))"),
            // Cast first: the column is jsonb (pgjsonb schema) or text
            // (`[sink] schema = "postgres"`); on jsonb the cast is a no-op.
            Dialect::Postgres => format!("({col}::jsonb->>'{key}')"),
        }
    }

    /// A JSON column as text (jsonb in PostgreSQL).
    pub fn as_text(self, col: &str) -> String {
        match self {
            Dialect::Postgres => format!("{col}::text"),
            _ => col.to_owned(),
        }
    }

    /// Quoted `return` column (a keyword in MariaDB).
    pub fn ret(self) -> &'static str {
        match self {
            Dialect::Mysql => "`return`",
            _ => "\"return\"",
        }
    }

    /// Quoted `load` column (a keyword in MariaDB).
    pub fn load(self) -> &'static str {
        match self {
            Dialect::Mysql => "`load`",
            _ => "load",
        }
    }
}

/// Runs one read-only statement. `?` placeholders, in order.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    fn dialect(&self) -> Dialect;
    async fn rows(&self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError>;
}

/// Opens the configured sink's database for reading (I/O).
pub async fn open(sink: &SinkConfig, timeout: Duration) -> Result<Arc<dyn Store>, StoreError> {
    match &sink.url {
        SinkUrl::Sqlite { path } => Ok(Arc::new(sqlite::SqliteStore::open(path, timeout)?)),
        #[cfg(feature = "mysql")]
        SinkUrl::Mysql(u) => {
            let pw = sink
                .read_password()
                .map_err(|e| StoreError::Fatal(e.to_string()))?;
            let opts = u
                .options(pw.as_deref())
                .map_err(|e| StoreError::Fatal(e.to_string()))?;
            Ok(Arc::new(mysql::MysqlStore::connect(opts, timeout).await?))
        }
        #[cfg(feature = "postgres")]
        SinkUrl::Postgres(u) => {
            let pw = sink
                .read_password()
                .map_err(|e| StoreError::Fatal(e.to_string()))?;
            let opts = u
                .options(pw.as_deref())
                .map_err(|e| StoreError::Fatal(e.to_string()))?;
            Ok(Arc::new(postgres::PgStore::connect(opts, timeout).await?))
        }
    }
}

mod sqlite {
    use super::*;
    use rusqlite::{OpenFlags, types::ValueRef};
    use std::path::Path;
    use std::sync::Mutex;

    /// A few read-only connections, each used by one blocking task at a time.
    pub struct SqliteStore {
        conns: Vec<Mutex<rusqlite::Connection>>,
        interrupts: Vec<Arc<rusqlite::InterruptHandle>>,
        next: std::sync::atomic::AtomicUsize,
        timeout: Duration,
    }

    const CONNECTIONS: usize = 4;

    impl SqliteStore {
        pub fn open(path: &Path, timeout: Duration) -> Result<Arc<SqliteStore>, StoreError> {
            let mut conns = Vec::with_capacity(CONNECTIONS);
            let mut interrupts = Vec::with_capacity(CONNECTIONS);
            for _ in 0..CONNECTIONS {
                let c = rusqlite::Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| {
                    StoreError::Fatal(format!("cannot open {} read-only: {e}", path.display()))
                })?;
                c.busy_timeout(timeout)
                    .map_err(|e| StoreError::Fatal(e.to_string()))?;
                c.set_prepared_statement_cache_capacity(64);
                interrupts.push(Arc::new(c.get_interrupt_handle()));
                conns.push(Mutex::new(c));
            }
            Ok(Arc::new(SqliteStore {
                conns,
                interrupts,
                next: Default::default(),
                timeout,
            }))
        }
    }

    fn run(c: &rusqlite::Connection, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
        let err = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::OperationInterrupted) => {
                StoreError::Retriable("the query timed out".into())
            }
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Retriable(e.to_string())
            }
            _ => StoreError::Permanent(e.to_string()),
        };
        let mut st = c.prepare_cached(sql).map_err(err)?;
        let n = st.column_count();
        let ps: Vec<rusqlite::types::Value> = params
            .iter()
            .map(|p| match p {
                Param::Int(i) => rusqlite::types::Value::Integer(*i),
                Param::Text(s) => rusqlite::types::Value::Text(s.clone()),
            })
            .collect();
        let mut rows = st
            .query(rusqlite::params_from_iter(ps.iter()))
            .map_err(err)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(err)? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                row.push(match r.get_ref(i).map_err(err)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Real(f) => Cell::Int(f as i64),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Cell::Text(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            out.push(row);
        }
        Ok(out)
    }

    #[async_trait::async_trait]
    impl Store for Arc<SqliteStore> {
        fn dialect(&self) -> Dialect {
            Dialect::Sqlite
        }

        async fn rows(&self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
            let me = self.clone();
            let sql = sql.to_owned();
            let params = params.to_vec();
            let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % CONNECTIONS;
            let interrupt = self.interrupts[i].clone();
            // The statement timeout: past it, the running statement is
            // interrupted (SQLITE_INTERRUPT) from here.
            let timer = tokio::spawn({
                let timeout = self.timeout;
                async move {
                    tokio::time::sleep(timeout).await;
                    interrupt.interrupt();
                }
            });
            let r = tokio::task::spawn_blocking(move || {
                let c = me.conns[i]
                    .lock()
                    .map_err(|_| StoreError::Fatal("a reader panicked".into()))?;
                run(&c, &sql, &params)
            })
            .await
            .map_err(|e| StoreError::Fatal(e.to_string()))?;
            timer.abort();
            r
        }
    }
}

/// `?` placeholders as PostgreSQL's `$1, $2, ...` (the pages' SQL has no
/// `?` anywhere else).
#[cfg(feature = "postgres")]
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for ch in sql.chars() {
        if ch == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(any(feature = "mysql", feature = "postgres"))]
fn classify(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(d) => {
            let m = d.message().to_owned();
            // PostgreSQL 57014: canceled (statement_timeout); MariaDB 1969:
            // max_statement_time exceeded.
            if d.code().as_deref() == Some("57014") || m.contains("max_statement_time") {
                StoreError::Retriable(format!("the query timed out: {m}"))
            } else {
                StoreError::Permanent(m)
            }
        }
        e @ (sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed) => {
            StoreError::Retriable(e.to_string())
        }
        e => StoreError::Permanent(e.to_string()),
    }
}

/// Decodes any column the pages select into a [`Cell`]: integers of every
/// width, text (and bytes as lossy text).
#[cfg(any(feature = "mysql", feature = "postgres"))]
macro_rules! cell_of {
    ($row:expr, $i:expr) => {{
        use sqlx::Row as _;
        let r = $row;
        if let Ok(v) = r.try_get::<Option<i64>, _>($i) {
            v.map_or(Cell::Null, Cell::Int)
        } else if let Ok(v) = r.try_get::<Option<i32>, _>($i) {
            v.map_or(Cell::Null, |v| Cell::Int(v.into()))
        } else if let Ok(v) = r.try_get::<Option<i16>, _>($i) {
            v.map_or(Cell::Null, |v| Cell::Int(v.into()))
        } else if let Ok(v) = r.try_get::<Option<String>, _>($i) {
            v.map_or(Cell::Null, Cell::Text)
        } else if let Ok(v) = r.try_get::<Option<Vec<u8>>, _>($i) {
            v.map_or(Cell::Null, |b| {
                Cell::Text(String::from_utf8_lossy(&b).into_owned())
            })
        } else if let Ok(v) = r.try_get::<Option<f64>, _>($i) {
            v.map_or(Cell::Null, |f| Cell::Int(f as i64))
        } else {
            Cell::Null
        }
    }};
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

    pub struct PgStore {
        pool: PgPool,
    }

    impl PgStore {
        pub async fn connect(
            opts: PgConnectOptions,
            timeout: Duration,
        ) -> Result<PgStore, StoreError> {
            let opts = opts.application_name("saltpipe-web").options([
                ("default_transaction_read_only", "on".to_owned()),
                ("statement_timeout", format!("{}", timeout.as_millis())),
            ]);
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(timeout)
                .connect_with(opts)
                .await
                .map_err(|e| StoreError::Fatal(format!("cannot connect: {}", classify(e))))?;
            Ok(PgStore { pool })
        }
    }

    #[async_trait::async_trait]
    impl Store for PgStore {
        fn dialect(&self) -> Dialect {
            Dialect::Postgres
        }

        async fn rows(&self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
            let sql = numbered(sql);
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for p in params {
                q = match p {
                    Param::Int(i) => q.bind(*i),
                    Param::Text(s) => q.bind(s.clone()),
                };
            }
            let rows = q.fetch_all(&self.pool).await.map_err(classify)?;
            Ok(rows
                .iter()
                .map(|r| {
                    use sqlx::Row as _;
                    (0..r.len()).map(|i| cell_of!(r, i)).collect()
                })
                .collect())
        }
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use sqlx::Executor as _;
    use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};

    pub struct MysqlStore {
        pool: MySqlPool,
    }

    impl MysqlStore {
        pub async fn connect(
            opts: MySqlConnectOptions,
            timeout: Duration,
        ) -> Result<MysqlStore, StoreError> {
            let secs = timeout.as_secs_f64();
            let pool = MySqlPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(timeout)
                .after_connect(move |c, _| {
                    Box::pin(async move {
                        c.execute("SET SESSION TRANSACTION READ ONLY").await?;
                        c.execute("SET SESSION time_zone = '+00:00'").await?;
                        c.execute(sqlx::AssertSqlSafe(format!(
                            "SET SESSION max_statement_time = {secs:.3}"
                        )))
                        .await?;
                        Ok(())
                    })
                })
                .connect_with(opts)
                .await
                .map_err(|e| StoreError::Fatal(format!("cannot connect: {}", classify(e))))?;
            Ok(MysqlStore { pool })
        }
    }

    #[async_trait::async_trait]
    impl Store for MysqlStore {
        fn dialect(&self) -> Dialect {
            Dialect::Mysql
        }

        async fn rows(&self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
            for p in params {
                q = match p {
                    Param::Int(i) => q.bind(*i),
                    Param::Text(s) => q.bind(s.clone()),
                };
            }
            let rows = q.fetch_all(&self.pool).await.map_err(classify)?;
            Ok(rows
                .iter()
                .map(|r| {
                    use sqlx::Row as _;
                    (0..r.len()).map(|i| cell_of!(r, i)).collect()
                })
                .collect())
        }
    }
}
