//! Backfill: what the master kept in its job cache, fed through the same
//! rules → queue → sink path as the bus.
//!
//! Why: Salt's bus has no replay. Whatever the master published while
//! saltpipe was not connected (an upgrade, a crash, a reboot of either) never
//! reaches a subscriber. But the master's default job cache (`local_cache`,
//! `<cachedir>/jobs`) keeps every job's load and every minion's return for
//! `keep_jobs_seconds` (24 h by default). Reading it back turns "gone" into
//! "kept, as long as the master kept it".
//!
//! How, and why that way:
//! * The cache is turned into the very events the bus would have carried
//!   (`salt/job/<jid>/new` from `.load.p` + `.minions*.p`,
//!   `salt/job/<jid>/ret/<minion>` from `<minion>/return.p` + `out.p`), as
//!   bus frames, and handed to the same [`crate::source::Ingest`]. So rules,
//!   queue, worker, sink and actions need nothing new, and a backfilled row
//!   can differ from a bus-written one only in the fields the cache does not
//!   keep (listed in docs/ARCHITECTURE.md and tested field by field).
//! * The sink's unique keys (`salt_returns (jid, id)`, `jids.jid`) make a
//!   second copy a no-op, so a scan may overlap what the bus delivered: we
//!   scan a window with a safety margin instead of asking the database row
//!   by row.
//! * Read only: the scanner opens files for reading and lists directories;
//!   it never writes, locks, renames or deletes anything under the cache.
//!   Salt writes `return.p` through an atomic rename, so a file under its
//!   final name is whole; a minion directory without `return.p`, or a job
//!   without `.load.p`, is being written: skipped, counted, and retried by
//!   the next scan.
//! * Bounded memory: the walk is a stream (one job directory at a time,
//!   frames handed on in chunks of about 1 MiB through a small channel that
//!   waits for the queue writer), whatever the size of the cache.

use crate::config::salt_master::{self, MasterOpts};
use crate::config::{ConfigError, human};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod scan;
pub mod source;

pub use scan::{ScanCounts, Scanner, Window};
pub use source::{Auto, JobCacheSource};

/// Salt's default master config file.
pub const DEFAULT_MASTER_CONFIG: &str = salt_master::DEFAULT_PATH;

/// `[backfill]`: reading the master's job cache back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// `run` / `listen`: scan the job cache at start and after every bus
    /// reconnect, and feed what was written while saltpipe was away.
    pub enabled: bool,
    /// The `jobs` directory of the master's job cache. Default:
    /// `<root_dir><cachedir>/jobs` from `master_config`, else
    /// `/var/cache/salt/master/jobs`.
    pub job_cache_dir: Option<PathBuf>,
    /// How far before the last moment saltpipe was known to be reading the
    /// bus a start-up or reconnect scan begins: covers events read but not
    /// yet queued at a crash, and clocks that disagree a little.
    #[serde(deserialize_with = "human::duration")]
    pub margin: Duration,
    /// The master's config file (with the files it includes), read when
    /// readable for where its bus, job cache and name are
    /// ([`crate::config::salt_master`]); `--master-config` sets it too.
    pub master_config: PathBuf,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            enabled: true,
            job_cache_dir: None,
            margin: Duration::from_secs(300),
            master_config: PathBuf::from(DEFAULT_MASTER_CONFIG),
        }
    }
}

impl BackfillConfig {
    /// Pure checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(d) = &self.job_cache_dir
            && !d.is_absolute()
        {
            return Err(ConfigError::invalid(
                "backfill.job_cache_dir",
                "must be an absolute path (the master's <cachedir>/jobs)",
            ));
        }
        if self.master_config.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "backfill.master_config",
                "must name the master's config file (default /etc/salt/master)",
            ));
        }
        if self.margin > Duration::from_secs(7 * 86_400) {
            return Err(ConfigError::invalid(
                "backfill.margin",
                "must be at most 7d (the master keeps jobs 24h by default)",
            ));
        }
        Ok(())
    }

    /// Where the job cache is and how it is laid out: reads the master's
    /// config (the only I/O here). A missing or unreadable master config is
    /// not an error: Salt's defaults apply.
    pub fn resolve(&self) -> JobCache {
        let opts = match MasterOpts::load(&self.master_config) {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "master config not readable; using Salt's defaults");
                MasterOpts::default()
            }
        };
        let jobs_dir = self
            .job_cache_dir
            .clone()
            .unwrap_or_else(|| opts.jobs_dir());
        JobCache {
            jobs_dir,
            hash_type: opts.hash_type.unwrap_or_else(|| "sha256".into()),
            master_job_cache_off: opts.job_cache == Some(false),
        }
    }
}

/// A job cache, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCache {
    /// `<cachedir>/jobs`.
    pub jobs_dir: PathBuf,
    /// The master's `hash_type` (names jid directories).
    pub hash_type: String,
    /// The master config says `job_cache: False`: it keeps no returns.
    pub master_job_cache_off: bool,
}

impl JobCache {
    pub fn at(jobs_dir: impl Into<PathBuf>) -> JobCache {
        JobCache {
            jobs_dir: jobs_dir.into(),
            hash_type: "sha256".into(),
            master_job_cache_off: false,
        }
    }

    /// The directory of one jid (`salt.utils.jid.jid_dir`), if saltpipe
    /// knows the master's `hash_type`; `None` means "search for it".
    pub fn jid_dir(&self, jid: &str) -> Option<PathBuf> {
        let hex = salt_master::hash_hex(&self.hash_type, jid.as_bytes())?;
        Some(self.jobs_dir.join(&hex[..2]).join(&hex[2..]))
    }
}

/// Why a scan could not run at all (a bad file inside is skipped, not an error).
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The job cache is missing or unreadable: permanent until an operator
    /// fixes it; the rest of saltpipe runs on.
    #[error("cannot read the job cache at {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The queue writer went away (shutdown): fatal for this scan only.
    #[error("the queue writer has stopped")]
    QueueClosed,
}

impl BackfillError {
    /// True if a later scan may succeed without anyone fixing anything.
    pub fn is_retriable(&self) -> bool {
        match self {
            BackfillError::Unreadable { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ),
            BackfillError::QueueClosed => false,
        }
    }
}

/// A path for messages.
pub(crate) fn shown(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_key() {
        let c = BackfillConfig {
            job_cache_dir: Some("relative/jobs".into()),
            ..Default::default()
        };
        let e = c.validate().expect_err("relative");
        assert!(e.to_string().contains("backfill.job_cache_dir"), "{e}");
        let c = BackfillConfig {
            margin: Duration::from_secs(8 * 86_400),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        BackfillConfig::default().validate().expect("defaults");
    }

    #[test]
    fn resolve_reads_the_master_config_and_job_cache_dir_wins() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = dir.path().join("master");
        std::fs::write(
            &m,
            "root_dir: /srv/root\ncachedir: /var/cache/salt/master\nhash_type: md5\njob_cache: False\n",
        )
        .expect("write");
        let c = BackfillConfig {
            master_config: m.clone(),
            ..Default::default()
        };
        let jc = c.resolve();
        assert_eq!(
            jc.jobs_dir,
            PathBuf::from("/srv/root/var/cache/salt/master/jobs")
        );
        assert_eq!(jc.hash_type, "md5");
        assert!(jc.master_job_cache_off);
        let c = BackfillConfig {
            master_config: m,
            job_cache_dir: Some("/x/jobs".into()),
            ..Default::default()
        };
        assert_eq!(c.resolve().jobs_dir, PathBuf::from("/x/jobs"));
        let c = BackfillConfig {
            master_config: dir.path().join("absent"),
            ..Default::default()
        };
        assert_eq!(
            c.resolve(),
            JobCache::at("/var/cache/salt/master/jobs"),
            "Salt's defaults when the master config cannot be read"
        );
    }

    #[test]
    fn jid_dir_is_salts() {
        // salt.utils.jid.jid_dir("20261202121314123456", "/j", "sha256")
        let jc = JobCache::at("/j");
        let d = jc.jid_dir("20261202121314123456").expect("sha256");
        let hex = salt_master::hash_hex("sha256", b"20261202121314123456").expect("hex");
        assert_eq!(d, PathBuf::from(format!("/j/{}/{}", &hex[..2], &hex[2..])));
        assert_eq!(hex.len(), 64);
    }
}
