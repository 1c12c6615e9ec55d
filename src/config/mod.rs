//! The TOML configuration: loading, environment overrides, validation.
//!
//! Each component owns its config struct (next to the code it configures,
//! as Vector does); this module only assembles them and decides where a
//! value comes from. Validation is pure (no socket, file or database is
//! touched) so `saltpipe validate --no-connect` can run anywhere, CI
//! included; building the running parts is where I/O happens.
//!
//! Three layers, later wins: built-in defaults (which work on a stock
//! master with no file at all), the file, then `SALTPIPE_<SECTION>_<KEY>`
//! environment variables, so secrets stay out of files and argv. Below
//! the file, the salt-master's own config ([`salt_master`]) fills what the
//! file leaves unset about the master: where its bus is, and its `id`.

use crate::action::ActionConfig;
use crate::backfill::BackfillConfig;
use crate::memory::{Budget, MemoryConfig};
use crate::ops::MetricsConfig;
use crate::queue::QueueConfig;
use crate::rules::RulesConfig;
use crate::sink::SinkConfig;
use crate::source::SourceConfig;
use crate::web::WebConfig;
use crate::worker::WorkerConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub mod env;
pub mod salt_master;

/// Where `saltpipe` looks for a config when none is named.
pub const DEFAULT_PATH: &str = "/etc/saltpipe/saltpipe.toml";

/// The whole configuration. Every section and key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where events come from: the master's event bus.
    pub source: SourceConfig,
    /// Which events are kept, and which queue each goes to.
    pub rules: RulesConfig,
    /// The durable queue between the listener and the workers.
    pub queue: QueueConfig,
    /// How workers batch, retry and shut down.
    pub worker: WorkerConfig,
    /// Where events are stored.
    pub sink: SinkConfig,
    /// Logging.
    pub log: LogConfig,
    /// The `/metrics` and `/health` listener.
    pub metrics: MetricsConfig,
    /// Webhooks, mails and commands for chosen events (`[[actions]]`).
    pub actions: Vec<ActionConfig>,
    /// Reading the master's job cache back (start-up, reconnects, `backfill`).
    pub backfill: BackfillConfig,
    /// The read-only web pages (`saltpipe web`, and `saltpipe run` when enabled).
    pub web: WebConfig,
    /// The memory budget of the whole process (event data held in memory).
    pub memory: MemoryConfig,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, or per module `info,saltpipe::sink=debug`.
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// `text` (readable lines) or `json` (one object per line).
    pub format: LogFormat,
}

impl LogConfig {
    /// `level` as a filter. Field values in it (`target[span{field=value}]`)
    /// match as plain text, not as regular expressions: the config fuzzer
    /// found a 244-byte `level` whose regex took 22 s to build.
    pub fn filter(&self) -> Result<tracing_subscriber::EnvFilter, String> {
        tracing_subscriber::EnvFilter::builder()
            .with_regex(false)
            .parse(&self.level)
            .map_err(|e| e.to_string())
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration problem, with where it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Where the config came from, for messages.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file read, if any.
    pub path: Option<PathBuf>,
    /// The salt-master's config, when it was read: what was taken from it.
    pub master: Option<salt_master::MasterOpts>,
}

/// Finds the file to read: the one named, else the default path if present.
pub fn resolve_path(named: Option<&Path>) -> Option<PathBuf> {
    match named {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let p = PathBuf::from(DEFAULT_PATH);
            p.exists().then_some(p)
        }
    }
}

/// Reads, merges and validates the configuration (no I/O beyond reading the
/// file and the master's config).
pub fn load(named: Option<&Path>) -> Result<Loaded, ConfigError> {
    load_with(named, None)
}

/// [`load`], with the master's config file named (`--master-config`,
/// over `[backfill] master_config`). A named master config must be
/// readable; the default one (`/etc/salt/master`) may be absent.
pub fn load_with(
    named: Option<&Path>,
    master_config: Option<&Path>,
) -> Result<Loaded, ConfigError> {
    let mut loaded = load_file(named)?;
    if let Some(m) = master_config {
        loaded.config.backfill.master_config = m.to_path_buf();
    }
    let path = loaded.config.backfill.master_config.clone();
    match salt_master::MasterOpts::load(&path) {
        Ok(m) => {
            apply_master(&mut loaded.config, &m);
            loaded.config.validate()?;
            loaded.master = Some(m);
        }
        Err(e) if e.is_not_found() && master_config.is_none() => {}
        Err(salt_master::MasterConfigError::Read { path, source }) => {
            return Err(ConfigError::Read { path, source });
        }
        Err(e) => {
            return Err(ConfigError::invalid(
                "backfill.master_config",
                e.to_string(),
            ));
        }
    }
    Ok(loaded)
}

/// Fills from the master's config what saltpipe's own config left unset:
/// the bus address (`sock_dir` / `ipc_mode` / `tcp_master_pub_port`) and
/// `sink.master_id` (the master's `id`). The job cache's keys are read by
/// the backfill itself ([`crate::backfill::BackfillConfig::resolve`]).
pub fn apply_master(config: &mut Config, master: &salt_master::MasterOpts) {
    if config.source.socket.is_none() && config.source.tcp.is_none() {
        match master.bus_address() {
            crate::source::BusAddress::Unix(p) => config.source.socket = Some(p),
            crate::source::BusAddress::Tcp(a) => config.source.tcp = Some(a),
        }
    }
    if config.sink.master_id.is_none() {
        config.sink.master_id = master.id.clone();
    }
}

fn load_file(named: Option<&Path>) -> Result<Loaded, ConfigError> {
    let path = resolve_path(named);
    let text = match &path {
        Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?,
        None => String::new(),
    };
    let shown = path.clone().unwrap_or_else(|| PathBuf::from("<defaults>"));
    let config = from_str_with_env(&text, &shown, &env::from_process())?;
    Ok(Loaded {
        config,
        path,
        master: None,
    })
}

/// Parses `text` (reporting errors with line numbers), applies the
/// environment overrides in `vars`, and validates the result.
pub fn from_str_with_env(
    text: &str,
    path: &Path,
    vars: &[(String, String)],
) -> Result<Config, ConfigError> {
    // First on its own, so a mistake in the file is reported at its line.
    let from_file: Result<Config, _> = toml::from_str(text);
    let mut config = match from_file {
        Ok(c) => c,
        Err(e) => return Err(parse_error(path, text, &e)),
    };
    if !vars.is_empty() {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
        let applied = env::apply(&mut table, vars)?;
        config = Config::deserialize(table).map_err(|e| {
            let message = e.message().to_owned();
            let var = applied.join(", ");
            ConfigError::Env { var, message }
        })?;
    }
    // Defaults that follow another section: the SQLite sink is as durable
    // as the queue unless told otherwise (an ack must not outlive its commit).
    config.sink.sync.get_or_insert(config.queue.sync);
    config.validate()?;
    Ok(config)
}

fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => line_col(text, span.start),
        None => (0, 0),
    };
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message: e.message().trim().to_owned(),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

impl Config {
    /// Cross-field checks that types alone cannot express. Pure.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.source.validate()?;
        self.rules.validate()?;
        self.queue.validate()?;
        self.worker.validate()?;
        if self.worker.concurrency > 1 && !self.queue.url.is_broker() {
            return Err(ConfigError::invalid(
                "worker.concurrency",
                "the embedded queue has one consumer per queue; concurrency above 1 needs a broker queue (redis://, amqp://, nats://)",
            ));
        }
        self.sink.validate()?;
        self.metrics.validate()?;
        crate::action::validate_all(&self.actions)?;
        self.backfill.validate()?;
        self.web.validate()?;
        self.memory.validate()?;
        let pending = self.source.pending_limit(&self.memory);
        let total = self.memory_total();
        let actions = if self.actions.is_empty() {
            0
        } else {
            total / 8
        };
        if pending + actions + (4 << 20) > total {
            return Err(ConfigError::invalid(
                "source.pending_limit",
                format!(
                    "{} leaves the worker less than 4 MiB of `memory.budget` ({}){}; raise the budget or lower the limit",
                    bytesize::ByteSize::b(pending).display().iec(),
                    bytesize::ByteSize::b(total).display().iec(),
                    if actions > 0 {
                        " after the actions' eighth"
                    } else {
                        ""
                    },
                ),
            ));
        }
        if !self.log.level.is_empty() {
            self.log
                .filter()
                .map_err(|e| ConfigError::invalid("log.level", e))?;
        }
        Ok(())
    }

    /// The process's memory budget split into its parts ([`crate::memory`]):
    /// with `reads_bus` false (`work`), the listener's part goes to the
    /// worker.
    pub fn budget(&self, reads_bus: bool) -> Budget {
        let listener = if reads_bus {
            self.source.pending_limit(&self.memory)
        } else {
            0
        };
        Budget::new(self.memory_total(), listener, !self.actions.is_empty())
    }

    /// `memory.budget` in force ([`MemoryConfig::total`]).
    pub fn memory_total(&self) -> u64 {
        self.memory.total(self.source.pending_limit)
    }

    /// Names of every queue the rules can route to (always includes `default`).
    pub fn queue_names(&self) -> Vec<String> {
        self.rules.queue_names()
    }
}

/// Serde helpers for human durations ("250ms", "30d") and sizes ("16MiB").
pub mod human {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write e.g. \"250ms\", \"5s\", \"30d\""
            ))
        })
    }

    pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration(d).map(Some)
    }

    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => s
                .parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`{s}` is not a size ({e}); write e.g. \"16MiB\" or a number of bytes"
                    ))
                }),
        }
    }

    pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        size(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        from_str_with_env(text, Path::new("t.toml"), &[])
    }

    #[test]
    fn field_values_in_the_log_level_are_plain_text_not_regexes() {
        // Found by the config fuzzer (fuzz/corpus/config/slow-log-level-1):
        // built as a regex, this field value took 22 s.
        let level = "ipqueu[pp{formmra =m#pRRm#pRRRRRRRRRRRRRRRRHRRRRRRRRRRRORRRRRRRRRRRRRRRRRRRRRRRRhhhhhhRRRRRRhhhhhhhhhjhhhhhhlhh~~~~~~~~~~~~~~~~RrR....+.L...........~~RrR....+.............. }#mrate_wndo0.M5ppp".to_owned();
        let log = LogConfig {
            level,
            ..Default::default()
        };
        // Refused at once: an invalid directive (before, its field value
        // was first built as a regex, for 22 s).
        let parsed = log.filter();
        assert!(parsed.is_err(), "{parsed:?}");
        let plain = LogConfig {
            level: "info,saltpipe::sink=debug".into(),
            ..Default::default()
        };
        assert!(plain.filter().is_ok());
        let bad = LogConfig {
            level: "saltpipe=loud".into(),
            ..Default::default()
        };
        assert!(bad.filter().is_err(), "an unknown level is refused");
    }

    #[test]
    fn the_memory_budget_splits_and_old_pending_limits_still_start() {
        use crate::memory::PartName::*;
        let mib = |n: u64| n << 20;
        let d = parse("").expect("defaults").budget(true);
        assert_eq!(d.part(Listener).limit() as u64, mib(32));
        assert_eq!(d.part(Worker).limit() as u64, mib(32));
        // A config from before the budget, with the old example's limit:
        // the budget grows to leave the worker its half.
        let old = parse("[source]\npending_limit = \"64MiB\"\n").expect("still valid");
        assert_eq!(old.memory_total(), mib(128));
        assert_eq!(old.budget(true).part(Worker).limit() as u64, mib(64));
        // `work` reads no bus: the listener's half goes to the worker.
        assert_eq!(old.budget(false).part(Worker).limit() as u64, mib(128));
        // Set both, inconsistently: refused, naming the key.
        let e = parse("[source]\npending_limit = \"64MiB\"\n[memory]\nbudget = \"64MiB\"\n")
            .expect_err("no room for the worker");
        assert!(e.to_string().contains("source.pending_limit"), "{e}");
        assert!(
            parse("[memory]\nbudget = \"8MiB\"\n").is_err(),
            "under the minimum"
        );
    }

    #[test]
    fn the_overflow_file_is_off_or_at_least_a_mebibyte() {
        let c = parse("[source]\noverflow_limit = \"0\"\n").expect("0 turns it off");
        assert_eq!(c.source.overflow_limit, 0);
        assert_eq!(parse("").expect("defaults").source.overflow_limit, 1 << 30);
        let err = parse("[source]\noverflow_limit = \"64KiB\"\n").expect_err("too small");
        assert!(err.to_string().contains("source.overflow_limit"), "{err}");
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = parse("").expect("defaults");
        assert_eq!(
            c.source.address(),
            crate::source::BusAddress::Unix("/var/run/salt/master/master_event_pub.ipc".into())
        );
        assert_eq!(
            c.queue.url.to_string(),
            "embedded:///var/lib/saltpipe/queue"
        );
        assert_eq!(c.sink.url.to_string(), "sqlite:///var/lib/saltpipe/salt.db");
    }

    #[test]
    fn the_sqlite_sink_is_as_durable_as_the_queue_unless_told() {
        use crate::queue::SyncMode;
        assert_eq!(
            parse("").expect("defaults").sink.sync,
            Some(SyncMode::Normal)
        );
        let c = parse("[queue]\nsync = \"full\"\n").expect("full queue");
        assert_eq!(c.sink.sync, Some(SyncMode::Full));
        let c = parse("[queue]\nsync = \"full\"\n[sink]\nsync = \"normal\"\n").expect("both");
        assert_eq!(c.sink.sync, Some(SyncMode::Normal));
        let c = from_str_with_env(
            "",
            Path::new("t.toml"),
            &[("SALTPIPE_QUEUE_SYNC".into(), "full".into())],
        )
        .expect("from the environment");
        assert_eq!(c.sink.sync, Some(SyncMode::Full));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            parse("[sink]\nurl = \"sqlite:///tmp/x.db\"\nbatch = 3\n").expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.starts_with("t.toml:3:"), "{msg}");
        assert!(msg.contains("batch"), "{msg}");
    }

    #[test]
    fn bad_value_is_named_with_its_line() {
        let err = parse("[worker]\n\nbatch_timeout = \"soon\"\n").expect_err("bad duration");
        let msg = err.to_string();
        assert!(msg.starts_with("t.toml:3:"), "{msg}");
        assert!(msg.contains("not a duration"), "{msg}");
        let err = parse("[queue]\nurl = \"kafka://x\"\n").expect_err("bad scheme");
        assert!(err.to_string().contains("kafka"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let vars = vec![
            (
                "SALTPIPE_SINK_URL".to_string(),
                "sqlite:///tmp/env.db".to_string(),
            ),
            (
                "SALTPIPE_WORKER_BATCH_MAX_EVENTS".to_string(),
                "77".to_string(),
            ),
        ];
        let c = from_str_with_env(
            "[sink]\nurl = \"sqlite:///tmp/file.db\"\n",
            Path::new("t"),
            &vars,
        )
        .expect("env");
        assert_eq!(c.sink.url.to_string(), "sqlite:///tmp/env.db");
        assert_eq!(c.worker.batch_max_events, 77);
    }

    #[test]
    fn metrics_listen_from_env() {
        let vars = vec![(
            "SALTPIPE_METRICS_LISTEN".to_string(),
            "127.0.0.1:9274".to_string(),
        )];
        let c = from_str_with_env("", Path::new("t"), &vars).expect("env");
        assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9274");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let vars = vec![(
            "SALTPIPE_WORKER_BATCH_TIMEOUT".to_string(),
            "never".to_string(),
        )];
        let err = from_str_with_env("", Path::new("t"), &vars).expect_err("bad env");
        assert!(
            err.to_string().contains("SALTPIPE_WORKER_BATCH_TIMEOUT"),
            "{err}"
        );
    }

    #[test]
    fn concurrency_needs_a_broker() {
        let err = parse("[worker]\nconcurrency = 4\n").expect_err("embedded");
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
        #[cfg(feature = "redis")]
        parse("[queue]\nurl = \"redis://127.0.0.1:6379\"\n[worker]\nconcurrency = 4\n")
            .expect("broker");
    }

    #[test]
    fn socket_and_tcp_together_are_refused() {
        let err = parse("[source]\ntcp = \"127.0.0.1:4512\"\nsocket = \"/x\"\n").expect_err("both");
        assert!(err.to_string().contains("source"), "{err}");
    }

    #[test]
    fn examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let p = entry.expect("entry").path();
            if p.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&p).expect("read");
                from_str_with_env(&text, &p, &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
