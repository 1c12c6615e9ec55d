//! Where events are stored: Salt's own returner tables, so the readers that
//! already know them (Salt's job-cache functions, Alcali, people's SQL) keep
//! working.
//!
//! Every SQL backend writes the same three tables of Salt's mysql returner
//! (`jids`, `salt_returns`, `salt_events`), plus a unique key on
//! `salt_returns (jid, id)` and an index on `alter_time`, and a dead-letter
//! table for rows the database refuses for good. The mapping from an event
//! to rows is shared ([`rows`]); a backend only says how to write them.
//!
//! A write is one transaction per batch and idempotent: a redelivered event
//! meets the unique key and is ignored, never doubled. Errors come back
//! classified ([`SinkError::is_retriable`]) so the worker knows whether to
//! hold the batch and retry, or to split it down to the bad row.

use crate::config::ConfigError;
use crate::event::Event;
use async_trait::async_trait;
use serde::{Deserialize, Deserializer};
use std::path::PathBuf;
use std::sync::Arc;

#[cfg(feature = "mysql")]
pub mod mysql;
pub mod pg_schema;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod retention;
pub mod rows;
pub mod sqlite;

/// One event to store, with what the queue knows about it.
#[derive(Debug, Clone)]
pub struct Record {
    pub event: Event,
    pub received_ms: i64,
    /// Its rows, converted ahead of the write by [`Sink::prepare`] (`None`:
    /// not yet, or the conversion failed and the write will say why).
    pub rows: Option<Arc<rows::RowSet>>,
}

impl Record {
    pub fn new(event: Event, received_ms: i64) -> Record {
        Record {
            event,
            received_ms,
            rows: None,
        }
    }
}

/// What a committed batch wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    pub returns: u64,
    pub jids: u64,
    pub events: u64,
    /// Rows that were already there (redelivery, or a job's second `new`).
    pub ignored: u64,
}

/// Sink failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The database is away, busy or overloaded: the same batch may pass later.
    #[error("retriable: {0}")]
    Retriable(String),
    /// The database refused the data itself. `index` names the record, when known.
    #[error("refused: {message}")]
    Permanent {
        message: String,
        index: Option<usize>,
    },
    /// Cannot work at all (bad URL, schema in the way): stop with this message.
    #[error("{0}")]
    Fatal(String),
}

impl SinkError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, SinkError::Retriable(_))
    }
}

/// A place to store batches.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The CPU half of a write, done ahead: converts each record into its
    /// rows (`Record::rows`), mostly the msgpack to JSON transcode. The
    /// worker calls it for the next batch while the current one is being
    /// written, so the conversion no longer adds to the database's one
    /// writer. Records it cannot convert are left as they are; `write`
    /// reports them.
    ///
    /// With `redact` ([`SinkConfig::redact`]), a record whose data holds a
    /// key to hide is left unconverted too: the worker then redacts its
    /// msgpack and prepares it again. So a record converted here is one
    /// the worker need not walk for secrets (see
    /// [`rows::rows_checked`]).
    fn prepare(&self, batch: &mut [Record], redact: Option<&crate::redact::KeyRedactor>) {
        let _ = (batch, redact);
    }
    /// Stores the batch in one transaction: all of it, or nothing.
    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError>;
    /// How many batches a worker may have in `write` at once, each in its
    /// own transaction ([`SinkConfig::writers`]). 1 keeps them one after
    /// the other.
    fn writers(&self) -> usize {
        1
    }
    /// The largest row the database takes (MySQL: under the server's
    /// `max_allowed_packet`, read at connect; PostgreSQL: jsonb's limit),
    /// if it has one below any return saltpipe reads: a larger one is
    /// dead-lettered with the reason. `validate` compares it with
    /// `source.max_frame` and `max_return_size`.
    fn row_limit(&self) -> Option<usize> {
        None
    }
    /// Sets aside one event the database refused (or that could not be
    /// decoded), with the reason: its tag and raw body, so nothing is lost.
    async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
    ) -> Result<(), SinkError>;
    /// Removes (or, with `archive`, moves to the `*_archive` tables) at most
    /// about `chunk` returns older than `older_than`, with their jobs, and
    /// as many events; returns how many rows it moved. The retention task
    /// calls it until it returns 0, so each call is one short transaction.
    async fn purge_chunk(
        &self,
        older_than: std::time::Duration,
        archive: bool,
        chunk: usize,
    ) -> Result<u64, SinkError> {
        let _ = (older_than, archive, chunk);
        Ok(0)
    }
    /// Closes the return window of jobs announced before `before` (a
    /// [`rows::stamp`]): every minion their `new` event targeted that has
    /// no row in `saltpipe_outcomes` gets a `no_return` row, and the
    /// targets are marked closed. At most `limit` targets per call, in one
    /// transaction; the worker calls it until it closes none. Idempotent
    /// and safe with several workers: the rows returned are those this call
    /// inserted (an action fires for each), not those a return or another
    /// worker got to first.
    async fn close_returns(&self, before: &str, limit: usize) -> Result<Closed, SinkError> {
        let _ = (before, limit);
        Ok(Closed::default())
    }
}

/// What one [`Sink::close_returns`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closed {
    /// Targets whose window it closed (returned or not).
    pub targets: usize,
    /// The `no_return` rows it inserted.
    pub no_return: Vec<NoReturn>,
}

/// A targeted minion recorded as `no_return`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoReturn {
    pub jid: String,
    pub minion: String,
    pub fun: String,
    /// When the job was announced ([`rows::stamp`]).
    pub stamp: String,
}

/// `[sink]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// `sqlite:///var/lib/saltpipe/salt.db`.
    pub url: SinkUrl,
    /// Written into `salt_events.master_id`; the host name by default.
    pub master_id: Option<String>,
    /// The database password, when it is not in the URL. Best set from the
    /// environment (`SALTPIPE_SINK_PASSWORD`) or `password_file`.
    pub password: Option<Secret>,
    /// A file holding the database password (a trailing newline is ignored).
    pub password_file: Option<PathBuf>,
    /// Connections in the pool of a database server sink.
    pub pool_size: u32,
    /// Batches a worker writes at once, each in its own transaction on its
    /// own connection (acks still follow each batch's commit, in order).
    /// A database server runs one statement on one core: a second batch in
    /// flight keeps a second core busy. Default: 2 for MySQL/MariaDB and
    /// PostgreSQL (at most `pool_size`); SQLite has a single writer, so 1.
    pub writers: Option<u32>,
    /// Retention: delete rows older than this (`"30d"`), in small chunks by
    /// `alter_time`, like the returner's `keep_jobs`. Unset: keep everything.
    #[serde(deserialize_with = "crate::config::human::opt_duration")]
    pub keep: Option<std::time::Duration>,
    /// With `keep`: move old rows to `jids_archive`, `salt_returns_archive`
    /// and `salt_events_archive` instead of deleting them (`archive_jobs`).
    pub archive: bool,
    /// The most JSON one column of a row may hold (`full_ret`, `load`,
    /// `data`): an event whose JSON would be larger is dead-lettered with
    /// the reason, its conversion stopped at this size. 16 MiB is what the
    /// mysql returner's `mediumtext` columns hold.
    #[serde(deserialize_with = "crate::config::human::size")]
    pub max_return_size: u64,
    /// Map keys whose values are stored (and given to actions) as `"***"`,
    /// at any depth of an event's data; a name also matches keys ending in
    /// `_name` or `-name`, ignoring case. Unset: [`crate::redact::DEFAULT_KEYS`];
    /// `[]` turns it off.
    pub redact: Option<Vec<String>>,
    /// SQLite sink: `normal` (a commit survives a crash of saltpipe) or
    /// `full` (also a power cut: an fsync per commit). Unset: the queue's
    /// `queue.sync`, so that `full` there is not undone by acking a batch
    /// whose commit the next power cut takes back. Database servers decide
    /// this themselves (docs/ARCHITECTURE.md, "The delivery guarantee").
    pub sync: Option<crate::queue::SyncMode>,
    /// PostgreSQL only: `pgjsonb` (Salt's pgjsonb returner tables, the
    /// default) or `postgres` (the `postgres` returner's text tables, which
    /// Alcali reads); see [`pg_schema`].
    pub schema: pg_schema::PgSchema,
}

/// `sink.max_return_size` by default: MySQL's `mediumtext`.
pub const DEFAULT_MAX_RETURN_SIZE: usize = (16 << 20) - 1;

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            url: SinkUrl::Sqlite {
                path: PathBuf::from("/var/lib/saltpipe/salt.db"),
            },
            master_id: None,
            password: None,
            password_file: None,
            pool_size: 4,
            writers: None,
            keep: None,
            archive: false,
            max_return_size: DEFAULT_MAX_RETURN_SIZE as u64,
            redact: None,
            sync: None,
            schema: pg_schema::PgSchema::default(),
        }
    }
}

/// A password: kept out of `Debug` output, logs and error messages (even
/// a value of the wrong type is not echoed).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::redact::secret_string(d).map(Secret)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A parsed sink URL: the scheme picks the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkUrl {
    /// `sqlite:///absolute/path.db` or `sqlite://relative/path.db`.
    Sqlite { path: PathBuf },
    /// `mysql://user:pass@host:port/db?ssl-mode=...` (`mariadb://` too).
    #[cfg(feature = "mysql")]
    Mysql(mysql::MysqlUrl),
    /// `postgres://user:pass@host:port/db?sslmode=...`.
    #[cfg(feature = "postgres")]
    Postgres(postgres::PgUrl),
}

impl SinkUrl {
    pub fn parse(s: &str) -> Result<SinkUrl, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!(
                "`{}` is not a URL; write e.g. sqlite:///var/lib/saltpipe/salt.db",
                crate::redact::url(s)
            )
        })?;
        match scheme {
            "sqlite" => {
                let path = rest.split('?').next().unwrap_or_default();
                if path.is_empty() {
                    return Err(
                        "sqlite:// needs a file, e.g. sqlite:///var/lib/saltpipe/salt.db".into(),
                    );
                }
                Ok(SinkUrl::Sqlite {
                    path: PathBuf::from(path),
                })
            }
            #[cfg(feature = "mysql")]
            "mysql" | "mariadb" => mysql::MysqlUrl::parse(s).map(SinkUrl::Mysql),
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => postgres::PgUrl::parse(s).map(SinkUrl::Postgres),
            _ => Err(format!(
                "unknown sink scheme in `{}`; this build supports: {}",
                crate::redact::url(s),
                SUPPORTED.join(", ")
            )),
        }
    }
}

/// The sink schemes compiled into this build.
const SUPPORTED: &[&str] = &[
    "sqlite",
    #[cfg(feature = "mysql")]
    "mysql (mariadb)",
    #[cfg(feature = "postgres")]
    "postgres",
];

/// Shown in logs and `validate`: the password is never printed.
impl std::fmt::Display for SinkUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkUrl::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            #[cfg(feature = "mysql")]
            SinkUrl::Mysql(u) => u.fmt(f),
            #[cfg(feature = "postgres")]
            SinkUrl::Postgres(u) => u.fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for SinkUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = crate::redact::secret_string(d)?;
        SinkUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl SinkConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(m) = &self.master_id
            && (m.is_empty() || m.len() > 255)
        {
            return Err(ConfigError::invalid(
                "sink.master_id",
                "must be 1-255 characters",
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(ConfigError::invalid(
                "sink.password_file",
                "set either password or password_file, not both",
            ));
        }
        if self.schema != pg_schema::PgSchema::default() && !self.is_postgres() {
            return Err(ConfigError::invalid(
                "sink.schema",
                "chooses between PostgreSQL schemas: only with a postgres:// sink URL",
            ));
        }
        if self.max_return_size < 1024 {
            return Err(ConfigError::invalid(
                "sink.max_return_size",
                "must be at least 1KiB",
            ));
        }
        if self.pool_size == 0 || self.pool_size > 256 {
            return Err(ConfigError::invalid(
                "sink.pool_size",
                "must be between 1 and 256",
            ));
        }
        match (self.writers, &self.url) {
            (Some(0), _) => {
                return Err(ConfigError::invalid("sink.writers", "must be at least 1"));
            }
            (Some(n), SinkUrl::Sqlite { .. }) if n > 1 => {
                return Err(ConfigError::invalid(
                    "sink.writers",
                    "SQLite allows one writer at a time: leave it unset or 1",
                ));
            }
            (Some(n), _) if n > self.pool_size => {
                return Err(ConfigError::invalid(
                    "sink.writers",
                    "must not exceed sink.pool_size: each writer needs a connection",
                ));
            }
            _ => {}
        }
        if let Some(keep) = self.keep
            && keep < std::time::Duration::from_secs(60)
        {
            return Err(ConfigError::invalid(
                "sink.keep",
                "must be at least 1m (e.g. \"30d\")",
            ));
        }
        if self.archive && self.keep.is_none() {
            return Err(ConfigError::invalid(
                "sink.archive",
                "archive moves rows older than `keep`: set keep too",
            ));
        }
        if let Some(names) = &self.redact
            && names.iter().any(|n| n.is_empty() || n.len() > 128)
        {
            return Err(ConfigError::invalid(
                "sink.redact",
                "each key name must be 1-128 characters",
            ));
        }
        Ok(())
    }

    /// The password from `password` or `password_file` (read here: I/O).
    pub fn read_password(&self) -> Result<Option<String>, SinkError> {
        if let Some(p) = &self.password {
            return Ok(Some(p.0.clone()));
        }
        match &self.password_file {
            None => Ok(None),
            Some(f) => std::fs::read_to_string(f)
                .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|e| {
                    SinkError::Fatal(format!(
                        "cannot read sink.password_file {}: {e}",
                        f.display()
                    ))
                }),
        }
    }

    /// [`SinkConfig::writers`], with its default for the backend.
    pub fn writers(&self) -> usize {
        let default = match self.url {
            SinkUrl::Sqlite { .. } => 1,
            #[allow(unreachable_patterns)]
            _ => 2u32.min(self.pool_size),
        };
        self.writers.unwrap_or(default).max(1) as usize
    }

    /// `max_return_size` as a length in bytes.
    pub fn max_json(&self) -> usize {
        usize::try_from(self.max_return_size).unwrap_or(usize::MAX)
    }

    /// What [`SinkConfig::redact`] hides.
    pub fn redactor(&self) -> crate::redact::KeyRedactor {
        match &self.redact {
            Some(names) => crate::redact::KeyRedactor::new(names),
            None => crate::redact::KeyRedactor::new(crate::redact::DEFAULT_KEYS),
        }
    }

    pub fn master_id(&self) -> String {
        self.master_id.clone().unwrap_or_else(hostname)
    }

    /// The `id` Salt's master job cache gives a runner job's return: the
    /// master's `id` (`master_id`, or from the master's config), else
    /// Salt's default for a master, `<host>_master`. Interned: a process
    /// builds a sink or two, and every row format of them copies this.
    pub fn runner_id(&self) -> &'static str {
        static IDS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
        let id = self
            .master_id
            .clone()
            .unwrap_or_else(|| format!("{}_master", hostname()));
        let mut ids = IDS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = ids.iter().find(|k| **k == id) {
            return known;
        }
        let leaked: &'static str = Box::leak(id.into_boxed_str());
        ids.push(leaked);
        leaked
    }

    /// Connects and creates the schema where missing (I/O happens here).
    pub async fn build(&self) -> Result<Arc<dyn Sink>, SinkError> {
        match &self.url {
            SinkUrl::Sqlite { path } => Ok(Arc::new(
                sqlite::SqliteSink::open(
                    path,
                    self.master_id(),
                    self.sync.unwrap_or(crate::queue::SyncMode::Normal),
                )
                .await?
                .with_max_json(self.max_json())
                .with_runner_id(self.runner_id()),
            )),
            #[cfg(feature = "mysql")]
            SinkUrl::Mysql(u) => Ok(Arc::new(
                mysql::MysqlSink::connect(u, self.read_password()?, self).await?,
            )),
            #[cfg(feature = "postgres")]
            SinkUrl::Postgres(u) => Ok(Arc::new(
                postgres::PgSink::connect(u, self.read_password()?, self).await?,
            )),
        }
    }

    /// For `run` and `work`: like [`SinkConfig::build`], but a database that
    /// cannot be reached yet does not stop the start. The reader must start
    /// draining the bus whatever the database is doing; the returned sink
    /// connects (and creates the schema) on first use, and until then every
    /// write is retriable, so the worker holds its batch while the queue
    /// absorbs the bus. Errors that waiting cannot fix (bad password,
    /// duplicate rows in the way) still stop the start.
    pub async fn build_or_defer(&self) -> Result<Arc<dyn Sink>, SinkError> {
        match self.build().await {
            Err(SinkError::Retriable(m)) => {
                tracing::warn!(sink = %self.url, error = %m, "the database is not reachable yet; reading and queueing anyway, connecting when it is");
                Ok(Arc::new(Deferred {
                    cfg: self.clone(),
                    inner: tokio::sync::OnceCell::new(),
                }))
            }
            other => other,
        }
    }

    /// The DDL `build` runs for this URL, for `saltpipe schema --print`.
    pub fn schema_ddl(&self) -> String {
        match &self.url {
            SinkUrl::Sqlite { .. } => sqlite::SCHEMA.trim().to_owned(),
            #[cfg(feature = "mysql")]
            SinkUrl::Mysql(_) => mysql::schema_ddl(),
            #[cfg(feature = "postgres")]
            SinkUrl::Postgres(_) => postgres::schema_ddl(self.schema),
        }
    }

    /// Whether the sink is PostgreSQL.
    fn is_postgres(&self) -> bool {
        match &self.url {
            #[cfg(feature = "postgres")]
            SinkUrl::Postgres(_) => true,
            _ => false,
        }
    }
}

/// A sink built on first use: see [`SinkConfig::build_or_defer`].
struct Deferred {
    cfg: SinkConfig,
    inner: tokio::sync::OnceCell<Arc<dyn Sink>>,
}

impl Deferred {
    async fn get(&self) -> Result<&Arc<dyn Sink>, SinkError> {
        self.inner.get_or_try_init(|| self.cfg.build()).await
    }
}

#[async_trait]
impl Sink for Deferred {
    fn prepare(&self, batch: &mut [Record], redact: Option<&crate::redact::KeyRedactor>) {
        // Before the first connection `write` converts the rows itself.
        if let Some(s) = self.inner.get() {
            s.prepare(batch, redact)
        }
    }

    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError> {
        self.get().await?.write(batch).await
    }

    fn writers(&self) -> usize {
        self.cfg.writers()
    }

    fn row_limit(&self) -> Option<usize> {
        self.inner.get().and_then(|s| s.row_limit())
    }

    async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
    ) -> Result<(), SinkError> {
        self.get().await?.dead_letter(tag, body, error).await
    }

    async fn purge_chunk(
        &self,
        older_than: std::time::Duration,
        archive: bool,
        chunk: usize,
    ) -> Result<u64, SinkError> {
        self.get()
            .await?
            .purge_chunk(older_than, archive, chunk)
            .await
    }

    async fn close_returns(&self, before: &str, limit: usize) -> Result<Closed, SinkError> {
        self.get().await?.close_returns(before, limit).await
    }
}

/// The machine's host name, for `master_id`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            SinkUrl::parse("sqlite:///var/x.db"),
            Ok(SinkUrl::Sqlite {
                path: "/var/x.db".into()
            })
        );
        assert_eq!(
            SinkUrl::parse("sqlite://x.db").map(|u| u.to_string()),
            Ok("sqlite://x.db".into())
        );
        assert!(SinkUrl::parse("sqlite://").is_err());
        #[cfg(feature = "mysql")]
        assert!(matches!(
            SinkUrl::parse("mysql://u:p@h/db"),
            Ok(SinkUrl::Mysql(_))
        ));
        #[cfg(feature = "postgres")]
        assert!(matches!(
            SinkUrl::parse("postgresql://u@h/db"),
            Ok(SinkUrl::Postgres(_))
        ));
        assert!(SinkUrl::parse("oracle://x").unwrap_err().contains("oracle"));
    }

    /// The TLS modes that check the server's name are taken from the URL,
    /// and shown (they are settings, not secrets).
    #[cfg(all(feature = "mysql", feature = "postgres"))]
    #[test]
    fn tls_verification_modes_in_the_url() {
        let pg =
            "postgres://salt:pw@db.example:5432/salt?sslmode=verify-full&sslrootcert=/etc/ca.pem";
        let u = SinkUrl::parse(pg).expect("verify-full");
        assert_eq!(
            u.to_string(),
            "postgres://salt:***@db.example:5432/salt?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        );
        let my = "mysql://salt@db.example:3306/salt?ssl-mode=VERIFY_IDENTITY&ssl-ca=/etc/ca.pem";
        let u = SinkUrl::parse(my).expect("VERIFY_IDENTITY");
        assert_eq!(u.to_string(), my);
        let err = SinkUrl::parse("postgres://u@db/salt?sslmode=verify-everything")
            .expect_err("unknown mode");
        assert!(
            err.contains("sslmode") || err.contains("verify-everything"),
            "{err}"
        );
    }

    #[test]
    fn passwords_from_config_env_or_file_and_never_shown() {
        use crate::config::from_str_with_env;
        use std::path::Path;
        let vars = vec![("SALTPIPE_SINK_PASSWORD".to_string(), "s3cret".to_string())];
        let c = from_str_with_env("", Path::new("t"), &vars).expect("env password");
        assert_eq!(
            c.sink.read_password().expect("read").as_deref(),
            Some("s3cret")
        );
        assert!(!format!("{:?}", c.sink).contains("s3cret"));
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").expect("write");
        let c = from_str_with_env(
            &format!("[sink]\npassword_file = \"{}\"\n", f.display()),
            Path::new("t"),
            &[],
        )
        .expect("file");
        assert_eq!(
            c.sink.read_password().expect("read").as_deref(),
            Some("from-file")
        );
        let both = from_str_with_env(
            &format!(
                "[sink]\npassword = \"x\"\npassword_file = \"{}\"\n",
                f.display()
            ),
            Path::new("t"),
            &[],
        );
        assert!(both.is_err());
        let missing = SinkConfig {
            password_file: Some(dir.path().join("nope")),
            ..SinkConfig::default()
        };
        assert!(matches!(missing.read_password(), Err(SinkError::Fatal(_))));
    }

    #[test]
    fn retention_settings_are_checked() {
        use crate::config::from_str_with_env;
        use std::path::Path;
        let ok = from_str_with_env(
            "[sink]\nkeep = \"30d\"\narchive = true\n",
            Path::new("t"),
            &[],
        )
        .expect("keep");
        assert_eq!(
            ok.sink.keep,
            Some(std::time::Duration::from_secs(30 * 86400))
        );
        assert!(from_str_with_env("[sink]\narchive = true\n", Path::new("t"), &[]).is_err());
        assert!(from_str_with_env("[sink]\nkeep = \"5s\"\n", Path::new("t"), &[]).is_err());
        assert!(from_str_with_env("[sink]\npool_size = 0\n", Path::new("t"), &[]).is_err());
    }

    #[test]
    fn writers_default_per_backend_and_are_checked() {
        use crate::config::from_str_with_env;
        use std::path::Path;
        let load = |toml: &str| from_str_with_env(toml, Path::new("t"), &[]);
        assert_eq!(load("").expect("default").sink.writers(), 1, "SQLite");
        #[cfg(feature = "postgres")]
        {
            let pg = "[sink]\nurl = \"postgres://p@127.0.0.1/t\"\n";
            assert_eq!(load(pg).expect("pg").sink.writers(), 2);
            let one = format!("{pg}pool_size = 1\n");
            assert_eq!(load(&one).expect("pool of 1").sink.writers(), 1);
            let err = load(&format!("{pg}pool_size = 2\nwriters = 3\n"))
                .expect_err("more writers than connections")
                .to_string();
            assert!(err.contains("sink.writers"), "{err}");
        }
        let err = load("[sink]\nwriters = 2\n")
            .expect_err("SQLite has one writer")
            .to_string();
        assert!(err.contains("one writer"), "{err}");
        assert!(load("[sink]\nwriters = 0\n").is_err());
    }
}
