//! Which of Salt's two PostgreSQL returner schemas the PostgreSQL sink
//! writes (`[sink] schema`): `pgjsonb` (jsonb columns, GIN indexes: what
//! Salt recommends, and what its pgjsonb job-cache functions read) or
//! `postgres`, the older `postgres` returner's text columns, which is what
//! Alcali (the Salt web UI most SQL users run) reads on PostgreSQL: its
//! models are Django `TextField`s that it `json.loads`, which a jsonb
//! column (decoded to a dict by psycopg2) breaks.
//!
//! Kept apart from `postgres.rs` (which writes both: the same statements,
//! the server casting its jsonb values to text on assignment) so the DDL
//! of each schema is read in one place.
//!
//! The `postgres` schema differs from what Salt's `postgres` returner
//! writes in one column on purpose: `success` is `1`/`0`, as the mysql
//! returner writes it, because Alcali counts failed jobs with
//! `success = '0'`; psycopg2 makes the returner's Python bool `true` /
//! `false`, which Alcali never counts as failed. JSON columns hold
//! PostgreSQL's jsonb text form (keys ordered by length, then bytes;
//! `", "` and `": "` separators): the same values, parsed by any reader.

use serde::Deserialize;

/// `[sink] schema`: the PostgreSQL returner schema to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgSchema {
    /// Salt's `pgjsonb` returner tables (the default).
    #[default]
    Pgjsonb,
    /// Salt's `postgres` returner tables (text), for Alcali.
    Postgres,
}

impl PgSchema {
    pub fn as_str(self) -> &'static str {
        match self {
            PgSchema::Pgjsonb => "pgjsonb",
            PgSchema::Postgres => "postgres",
        }
    }

    /// How the `success` column writes a boolean.
    pub fn bool_style(self) -> super::rows::BoolStyle {
        match self {
            PgSchema::Pgjsonb => super::rows::BoolStyle::Word,
            PgSchema::Postgres => super::rows::BoolStyle::Digit,
        }
    }

    /// The DDL to run, in order: for `postgres`, the text tables, then
    /// every statement of pgjsonb's list that is saltpipe's own (unique
    /// and alter_time indexes, the events' dedupe key, the outcome, target
    /// and dead-letter tables): all of `pgjsonb` that neither creates a
    /// jsonb table nor a GIN index.
    pub fn ddl(self, pgjsonb: &[&'static str]) -> Vec<&'static str> {
        match self {
            PgSchema::Pgjsonb => pgjsonb.to_vec(),
            PgSchema::Postgres => TEXT_TABLES
                .iter()
                .copied()
                .chain(pgjsonb.iter().copied().filter(|s| !is_jsonb_only(s)))
                .collect(),
        }
    }
}

/// A statement of the pgjsonb list that only makes sense with jsonb columns.
fn is_jsonb_only(ddl: &str) -> bool {
    ddl.contains(" jsonb") || ddl.contains("USING gin")
}

/// Salt's `postgres` returner tables (salt/returners/postgres.py), made
/// idempotent, and `salt_events` with saltpipe's dedupe key; `jids.jid`
/// is varchar(255) like the other returners' (the returner's varchar(20)
/// cannot hold a `<jid>_<n>` jid).
const TEXT_TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS jids (
  jid varchar(255) PRIMARY KEY,
  load text NOT NULL
)",
    "CREATE TABLE IF NOT EXISTS salt_returns (
  fun varchar(50) NOT NULL,
  jid varchar(255) NOT NULL,
  return text NOT NULL,
  full_ret text,
  id varchar(255) NOT NULL,
  success varchar(10) NOT NULL,
  alter_time TIMESTAMP WITH TIME ZONE DEFAULT now()
)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_id ON salt_returns (id)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_jid ON salt_returns (jid)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_fun ON salt_returns (fun)",
    "CREATE INDEX IF NOT EXISTS idx_salt_returns_updated ON salt_returns (alter_time)",
    "CREATE SEQUENCE IF NOT EXISTS seq_salt_events_id",
    "CREATE TABLE IF NOT EXISTS salt_events (
  id BIGINT NOT NULL UNIQUE DEFAULT nextval('seq_salt_events_id'),
  tag varchar(255) NOT NULL,
  data text NOT NULL,
  alter_time TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  master_id varchar(255) NOT NULL,
  saltpipe_key varchar(32)
)",
    "CREATE INDEX IF NOT EXISTS idx_salt_events_tag ON salt_events (tag)",
];

/// The header `saltpipe schema --print` shows for the `postgres` schema.
pub const TEXT_HEADER: &str = "-- saltpipe: Salt's postgres returner tables (text columns, for Alcali;\n\
     -- success written 1/0), plus a unique index on salt_returns (jid, id),\n\
     -- alter_time indexes, a dedupe key on salt_events, a dead-letter table,\n\
     -- and saltpipe_outcomes / saltpipe_targets. Every statement is IF NOT\n\
     -- EXISTS: on an existing postgres-returner database only the additions\n\
     -- are created.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_ddl_has_no_jsonb_and_keeps_saltpipes_additions() {
        let pgjsonb = [
            "CREATE TABLE IF NOT EXISTS jids (jid varchar(255), load jsonb NOT NULL)",
            "CREATE INDEX IF NOT EXISTS idx_jids_jsonb ON jids USING gin (load)",
            "CREATE UNIQUE INDEX IF NOT EXISTS salt_returns_jid_id ON salt_returns (jid, id)",
            "CREATE TABLE IF NOT EXISTS saltpipe_targets (jid varchar(255))",
        ];
        let ddl = PgSchema::Postgres.ddl(&pgjsonb);
        assert!(
            ddl.iter()
                .all(|s| !s.contains("jsonb") && !s.contains("gin"))
        );
        assert_eq!(ddl.len(), TEXT_TABLES.len() + 2);
        assert!(ddl.ends_with(&[pgjsonb[2], pgjsonb[3]]));
        assert_eq!(PgSchema::Pgjsonb.ddl(&pgjsonb), pgjsonb.to_vec());
    }
}
