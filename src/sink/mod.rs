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

pub mod rows;
pub mod sqlite;

/// One event to store, with what the queue knows about it.
#[derive(Debug, Clone)]
pub struct Record {
    pub event: Event,
    pub received_ms: i64,
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
    /// Stores the batch in one transaction: all of it, or nothing.
    async fn write(&self, batch: &[Record]) -> Result<WriteReport, SinkError>;
    /// Sets aside one event the database refused (or that could not be
    /// decoded), with the reason: its tag and raw body, so nothing is lost.
    async fn dead_letter(
        &self,
        tag: &str,
        body: &bytes::Bytes,
        error: &str,
    ) -> Result<(), SinkError>;
}

/// `[sink]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// `sqlite:///var/lib/saltpipe/salt.db`.
    pub url: SinkUrl,
    /// Written into `salt_events.master_id`; the host name by default.
    pub master_id: Option<String>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            url: SinkUrl::Sqlite {
                path: PathBuf::from("/var/lib/saltpipe/salt.db"),
            },
            master_id: None,
        }
    }
}

/// A parsed sink URL: the scheme picks the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkUrl {
    /// `sqlite:///absolute/path.db` or `sqlite://relative/path.db`.
    Sqlite { path: PathBuf },
}

impl SinkUrl {
    pub fn parse(s: &str) -> Result<SinkUrl, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("`{s}` is not a URL; write e.g. sqlite:///var/lib/saltpipe/salt.db")
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
            other => Err(format!(
                "unknown sink scheme `{other}`; this build supports: sqlite"
            )),
        }
    }
}

impl std::fmt::Display for SinkUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkUrl::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for SinkUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
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
        Ok(())
    }

    pub fn master_id(&self) -> String {
        self.master_id.clone().unwrap_or_else(hostname)
    }

    /// Connects and creates the schema where missing (I/O happens here).
    pub async fn build(&self) -> Result<Arc<dyn Sink>, SinkError> {
        match &self.url {
            SinkUrl::Sqlite { path } => Ok(Arc::new(
                sqlite::SqliteSink::open(path, self.master_id()).await?,
            )),
        }
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
        assert!(SinkUrl::parse("oracle://x").unwrap_err().contains("oracle"));
    }
}
