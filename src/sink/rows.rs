//! From events to the rows of Salt's returner tables. Shared by every SQL sink.
//!
//! What Salt's mysql returner writes, and so what its readers expect:
//! * `jids (jid, load)`: the job's load as JSON, once per jid. We take it
//!   from the job's `new` event. A `salt-call` job has no `new` event; Salt's
//!   own job cache then saves the return itself as the load, and so do we,
//!   so a reader that joins `salt_returns` to `jids` still finds a row.
//! * `salt_returns (fun, jid, return, id, success, full_ret)`: `return` is the
//!   JSON of the return value, `full_ret` the JSON of the whole event data,
//!   `success` the event's success or false.
//! * `salt_events (tag, data, master_id)`: any other event the rules kept.
//!
//! And saltpipe's own, beside them (the returner tables stay exactly as
//! Salt's readers expect):
//! * `saltpipe_outcomes (jid, minion, outcome, fun, states_*, duration_ms,
//!   stamp)`: each return's real outcome ([`crate::outcome`]), written in
//!   the return's transaction; `no_return` rows come from the worker's
//!   sweep of `saltpipe_targets`, and a late real return replaces them.
//! * `saltpipe_targets (jid, minion, fun, stamp, closed)`: the minions a
//!   job's `new` event lists, so the sweep knows who should have answered.
//!
//! Differences we chose, since the returner's columns cannot hold them:
//! a multi-function job's `fun` (a list) is written comma-joined, the way
//! the command line takes it (`test.ping,test.echo`); its `success` (a map)
//! is true only if every function succeeded.
//!
//! A good return is never lost for a column width: the returner's `fun` is
//! varchar(50), and a multi-function job's joined list easily passes that,
//! which MySQL/PostgreSQL would refuse (and the worker dead-letter). It is
//! cut at 50 characters on a character boundary instead; the full list stays
//! in `full_ret` (and the job's load). Counted in [`adjusted`], logged.
//!
//! `salt_events` has no natural key, so a redelivered event would double a
//! row. Each row carries [`event_key`], a hash of (master_id, tag, data),
//! under a unique index in every backend: Salt stamps every event's data
//! with `_stamp` (microseconds), so two events with the same key are the same
//! event seen twice. Rows written by Salt's own `event_return` leave the
//! column NULL, which a unique index allows any number of times.

use super::{Record, SinkError};
use crate::event::Kind;
use crate::msgpack;
use crate::redact::KeyRedactor;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Width of the returner's `salt_returns.fun` column, in characters.
pub const FUN_WIDTH: usize = 50;

static FUN_TRUNCATED: AtomicU64 = AtomicU64::new(0);
static NUL_ESCAPED: AtomicU64 = AtomicU64::new(0);

/// Values changed (never refused) so a good event fits its column, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adjusted {
    /// `fun` values cut to [`FUN_WIDTH`] characters.
    pub fun_truncated: u64,
    /// Rows whose NUL characters PostgreSQL cannot store were written as the
    /// six characters `\u0000` (see the postgres sink).
    pub nul_escaped: u64,
}

/// The counts so far (process-wide).
pub fn adjusted() -> Adjusted {
    Adjusted {
        fun_truncated: FUN_TRUNCATED.load(Relaxed),
        nul_escaped: NUL_ESCAPED.load(Relaxed),
    }
}

/// Counts and logs a row whose NULs were escaped for PostgreSQL.
pub fn note_nul_escaped(tag: &str) {
    let n = NUL_ESCAPED.fetch_add(1, Relaxed) + 1;
    crate::log_limited!(
        warn,
        tag,
        total = n,
        "a NUL character, which PostgreSQL cannot store, was written as the text \\u0000"
    );
}

/// `fun` cut to the column's width on a character boundary, counted and logged.
fn fit_fun(fun: String, tag: &str) -> String {
    match fun.char_indices().nth(FUN_WIDTH) {
        None => fun,
        Some((cut, _)) => {
            let n = FUN_TRUNCATED.fetch_add(1, Relaxed) + 1;
            crate::log_limited!(
                warn,
                tag,
                fun = %fun,
                total = n,
                "fun is longer than the returner's varchar({FUN_WIDTH}): written cut \
                 (the full list stays in full_ret)"
            );
            let mut fun = fun;
            fun.truncate(cut);
            fun
        }
    }
}

/// The idempotency key of a `salt_events` row: 32 hex digits (128 bits) of
/// SHA-256 over the length-prefixed master_id and tag, then the data.
pub fn event_key(master_id: &str, tag: &str, data: &str) -> String {
    let mut h = Sha256::new();
    for part in [master_id, tag] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(data.as_bytes());
    let digest = h.finalize();
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// How a database spells a boolean in `salt_returns.success`, a varchar:
/// what the returner's Python driver made of `True`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolStyle {
    /// MySQLdb / PyMySQL: `1` and `0`.
    Digit,
    /// psycopg2: `true` and `false`.
    Word,
}

/// How one sink turns records into rows: its boolean style, and the most
/// JSON it takes in one column (`sink.max_return_size`). A record whose JSON
/// would be larger stops converting at that size and is dead-lettered with
/// the reason, instead of being built whole in memory first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowFormat {
    pub style: BoolStyle,
    pub max_json: usize,
    /// The `id` of a runner job's `salt_returns` row: the master's own id,
    /// as Salt's master job cache stores runner and orchestration jobs
    /// ([`crate::sink::SinkConfig::runner_id`]).
    pub runner_id: &'static str,
}

impl RowFormat {
    /// No size limit: for tests and tools that convert trusted data.
    pub const fn unlimited(style: BoolStyle) -> RowFormat {
        RowFormat {
            style,
            max_json: usize::MAX,
            runner_id: "master",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JidRow {
    pub jid: String,
    pub load: String,
    /// The minions a `new` event lists (None for a salt-call's load).
    pub targets: Option<Targets>,
}

/// `saltpipe_targets` rows of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// The job's `fun`, as `salt_returns.fun` would hold it.
    pub fun: String,
    /// When the job was announced ([`stamp`] form).
    pub stamp: String,
    pub minions: Vec<String>,
    /// On a master of masters, the syndic that forwarded this `new` (its
    /// `syndic/<id>/` tag prefix). The MoM's own `new` lists that syndic's
    /// id as a target, but a syndic is a relay that never returns as
    /// itself: its target row is written closed, so no `no_return` is
    /// recorded for it, whichever `new` comes first.
    pub relay: Option<String>,
}

/// The `saltpipe_outcomes` columns of a return besides jid, minion and fun.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRow {
    pub outcome: &'static str,
    /// Only for state runs: states run, failed, changed, and their summed
    /// `duration` (ms, rounded).
    pub states_total: Option<i64>,
    pub states_failed: Option<i64>,
    pub states_changed: Option<i64>,
    pub duration_ms: Option<i64>,
    /// The return's `_stamp` ([`stamp`] form).
    pub stamp: String,
}

impl OutcomeRow {
    pub fn of(summary: crate::outcome::Summary, stamp: String) -> OutcomeRow {
        let s = summary.states;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        OutcomeRow {
            outcome: summary.outcome.as_str(),
            states_total: s.map(|s| n(s.total)),
            states_failed: s.map(|s| n(s.failed)),
            states_changed: s.map(|s| n(s.changed)),
            duration_ms: s.map(|s| s.duration_ms.round().min(i64::MAX as f64) as i64),
            stamp,
        }
    }

    /// The outcome row of a return event (a minion's or a runner's), stamped
    /// with the return's `_stamp`, else its receive time.
    /// `tally`: the states its transcode counted, if it did.
    fn of_return(
        e: &crate::event::Event,
        received_ms: i64,
        tally: Option<&crate::outcome::StatesTally>,
    ) -> OutcomeRow {
        let salt_stamp = e.field_raw("_stamp").and_then(msgpack::as_str);
        OutcomeRow::of(
            crate::outcome::of_event_return_tallied(e, tally),
            stamp(salt_stamp, received_ms),
        )
    }
}

/// A time as saltpipe's own tables store it: `YYYY-MM-DD HH:MM:SS.ffffff`,
/// UTC, which SQLite compares as text and MySQL and PostgreSQL read as a
/// timestamp. From Salt's `_stamp` (ISO-8601, `+00:00` from 3008 on, the
/// fraction optional) when it is one, else from `fallback_ms` (when
/// saltpipe received the event).
pub fn stamp(salt_stamp: Option<&str>, fallback_ms: i64) -> String {
    let parsed = salt_stamp.and_then(|s| {
        let s = s.trim();
        let s = s
            .strip_suffix("+00:00")
            .or_else(|| s.strip_suffix('Z'))
            .unwrap_or(s);
        humantime::parse_rfc3339_weak(s).ok()
    });
    let t = parsed.unwrap_or_else(|| {
        std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(u64::try_from(fallback_ms).unwrap_or(0))
    });
    stamp_of(t)
}

/// [`stamp`] of a `SystemTime`.
pub fn stamp_of(t: std::time::SystemTime) -> String {
    // "2026-12-02T12:00:00.123456Z" -> "2026-12-02 12:00:00.123456"
    let mut s = humantime::format_rfc3339_micros(t).to_string();
    s.pop();
    s.replace_range(10..11, " ");
    s
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnRow {
    pub fun: String,
    pub jid: String,
    /// Where `return` lies in `full_ret` (None: the return has none, so
    /// `null`): kept as a range rather than a second copy, which halves a
    /// prepared batch's memory. Read it with [`ReturnRow::ret`].
    pub ret_at: Option<std::ops::Range<usize>>,
    pub id: String,
    pub success: String,
    pub full_ret: String,
    /// Its `saltpipe_outcomes` row.
    pub outcome: OutcomeRow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub tag: String,
    pub data: String,
}

/// The rows of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
// Each RowSet lives behind an Arc (`Record::rows`), one allocation per
// record: boxing the return's rows would add a second.
#[allow(clippy::large_enum_variant)]
pub enum RowSet {
    Job(JidRow),
    Return(ReturnRow, Option<JidRow>),
    Event(EventRow),
    /// Target rows without a `jids` row: a 3006 syndic's forwarded
    /// announcement (`syndic/<id>/<jid>`: `minions` and `_stamp`, no
    /// function, no load), the only sign on a 3006 MoM's bus of the
    /// syndic's minions and of its relay row to close.
    Targets {
        jid: String,
        targets: Targets,
    },
}

impl RowSet {
    /// The bytes its strings hold (for the memory budget; the few fixed
    /// fields are left out).
    pub fn heap_bytes(&self) -> usize {
        let targets = |t: &Targets| {
            t.fun.len() + t.stamp.len() + t.minions.iter().map(String::len).sum::<usize>()
        };
        let job = |j: &JidRow| j.jid.len() + j.load.len() + j.targets.as_ref().map_or(0, targets);
        match self {
            RowSet::Job(j) => job(j),
            RowSet::Targets { jid, targets: t } => jid.len() + targets(t),
            RowSet::Return(r, j) => {
                r.fun.len()
                    + r.jid.len()
                    + r.id.len()
                    + r.success.len()
                    + r.full_ret.len()
                    + r.outcome.stamp.len()
                    + j.as_ref().map_or(0, job)
            }
            RowSet::Event(e) => e.tag.len() + e.data.len(),
        }
    }
}

/// Why a record cannot become rows (a permanent error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot convert {tag} to JSON: {error}")]
pub struct RowError {
    pub tag: String,
    pub error: msgpack::WalkError,
}

/// The first step of each SQL sink's `write`: the rows of a batch (what
/// [`prepare`] did not already convert), naming the first record that
/// cannot be converted.
pub fn convert(batch: &[Record], fmt: RowFormat) -> Result<Vec<Arc<RowSet>>, SinkError> {
    batch
        .iter()
        .enumerate()
        .map(|(i, r)| match &r.rows {
            Some(rows) => Ok(rows.clone()),
            None => rows_of(r, fmt)
                .map(Arc::new)
                .map_err(|e| SinkError::Permanent {
                    message: e.to_string(),
                    index: Some(i),
                }),
        })
        .collect()
}

/// [`crate::sink::Sink::prepare`] for the three SQL sinks, in their boolean
/// style: converts each record not converted yet. A record that does not
/// convert is left alone; its `write` converts it again and reports the
/// error against it.
///
/// With `redact`, a record is only converted when its data holds no value
/// `redact` hides (see [`rows_checked`]); the others are left for the
/// caller to redact first.
pub fn prepare(batch: &mut [Record], fmt: RowFormat, redact: Option<&KeyRedactor>) {
    for r in batch.iter_mut().filter(|r| r.rows.is_none()) {
        r.rows = rows_checked(r, fmt, redact).ok().map(Arc::new);
    }
}

/// Converts one record.
pub fn rows_of(record: &Record, fmt: RowFormat) -> Result<RowSet, RowError> {
    rows_checked(record, fmt, None)
}

/// Converts one record, or with `redact` refuses ([`WalkError::Secret`])
/// one whose data holds a value `redact` hides: then `Ok` also says the
/// event needs no redaction, which the worker's prepare stage relies on
/// instead of walking every event a second time.
///
/// [`WalkError::Secret`]: msgpack::WalkError::Secret
pub fn rows_checked(
    record: &Record,
    fmt: RowFormat,
    redact: Option<&KeyRedactor>,
) -> Result<RowSet, RowError> {
    let rows = rows_in(record, fmt, redact)?;
    // The one kind of rows built without transcoding the whole data.
    if let (RowSet::Targets { .. }, Some(r)) = (&rows, redact)
        && let Ok(Some(_)) = r.redact_msgpack(record.event.data())
    {
        return Err(RowError {
            tag: record.event.tag().to_owned(),
            error: msgpack::WalkError::Secret,
        });
    }
    Ok(rows)
}

fn rows_in(
    record: &Record,
    fmt: RowFormat,
    redact: Option<&KeyRedactor>,
) -> Result<RowSet, RowError> {
    let style = fmt.style;
    let e = &record.event;
    let err = |error| RowError {
        tag: e.tag().to_owned(),
        error,
    };
    let data_json = || msgpack::to_json_checked(e.data(), fmt.max_json, redact).map_err(err);
    match (e.kind, &e.fields.jid, &e.fields.minion) {
        (Kind::JobNew, Some(jid), _) => Ok(RowSet::Job(JidRow {
            jid: jid.clone(),
            load: data_json()?,
            targets: Some(targets_of(record)),
        })),
        (Kind::JobReturn, Some(jid), Some(id)) => {
            // The outcome's states are counted as `return` is written.
            let mut tally = crate::outcome::StatesTally::default();
            let (full_ret, range) = msgpack::to_json_with_field(
                e.data(),
                "return",
                fmt.max_json,
                redact,
                Some(&mut tally),
            )
            .map_err(err)?;
            let ok = e.fields.success.unwrap_or(false);
            let success = success_text(style, ok);
            let job = e.is_salt_call_return().then(|| JidRow {
                jid: jid.clone(),
                load: full_ret.clone(),
                targets: None,
            });
            let outcome = OutcomeRow::of_return(e, record.received_ms, Some(&tally));
            Ok(RowSet::Return(
                ReturnRow {
                    fun: fit_fun(e.fields.fun.join(","), e.tag()),
                    jid: jid.clone(),
                    ret_at: range,
                    id: id.clone(),
                    success: success.to_owned(),
                    full_ret,
                    outcome,
                },
                job,
            ))
        }
        (Kind::RunnerReturn | Kind::WheelReturn, Some(jid), _) => {
            runner_rows(record, jid, fmt, redact)
        }
        // `syndic/<id>/<jid>`: its jid is the tag's last part.
        _ if e.is_syndic_announcement() => Ok(RowSet::Targets {
            jid: e.tag().rsplit('/').next().unwrap_or_default().to_owned(),
            targets: targets_of(record),
        }),
        _ => Ok(RowSet::Event(EventRow {
            tag: e.tag().to_owned(),
            data: data_json()?,
        })),
    }
}

/// The `success` column's text for a boolean, in the sink's style.
fn success_text(style: BoolStyle, ok: bool) -> &'static str {
    match (style, ok) {
        (BoolStyle::Digit, true) => "1",
        (BoolStyle::Digit, false) => "0",
        (BoolStyle::Word, true) => "true",
        (BoolStyle::Word, false) => "false",
    }
}

/// A runner job (`salt-run`, orchestrations: `salt/run/<jid>/ret`) or a
/// wheel job (`salt/wheel/<jid>/ret`: both run through the same
/// `SyncClientMixin.low`) as Salt's master job cache stores it
/// (`salt/client/mixins.py` calls
/// `salt.utils.job.store_job` with `{id, tgt, jid, return}`, where `id`
/// and `tgt` are the master's id and `return` is the whole event data, and
/// `store_job` adds `fun` and `user`): that load is both the `jids` row and
/// the `salt_returns` row's `full_ret`, its `return` the event data. So
/// `jobs.lookup_jid` and readers joining the two tables find it; its
/// outcome is the event's (`success` is false when an orchestration step
/// failed).
fn runner_rows(
    record: &Record,
    jid: &str,
    fmt: RowFormat,
    redact: Option<&KeyRedactor>,
) -> Result<RowSet, RowError> {
    let e = &record.event;
    let err = |error| RowError {
        tag: e.tag().to_owned(),
        error,
    };
    let data = msgpack::to_json_checked(e.data(), fmt.max_json, redact).map_err(err)?;
    let id = serde_json::to_string(fmt.runner_id).unwrap_or_else(|_| "\"master\"".into());
    let jid_json = serde_json::to_string(jid).unwrap_or_else(|_| "\"\"".into());
    let mut full_ret = format!("{{\"id\": {id}, \"tgt\": {id}, \"jid\": {jid_json}, \"return\": ");
    let start = full_ret.len();
    full_ret.push_str(&data);
    let range = start..full_ret.len();
    let fun = e.fields.fun.join(",");
    for (key, raw) in [("fun", e.field_raw("fun")), ("user", e.field_raw("user"))] {
        if let Some(v) = raw.and_then(msgpack::as_str) {
            let v = serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
            full_ret.push_str(&format!(", \"{key}\": {v}"));
        }
    }
    full_ret.push('}');
    if full_ret.len() > fmt.max_json {
        return Err(err(msgpack::WalkError::TooLarge {
            limit: fmt.max_json,
        }));
    }
    let ok = e.fields.success.unwrap_or(false);
    let success = success_text(fmt.style, ok);
    let outcome = OutcomeRow::of_return(e, record.received_ms, None);
    Ok(RowSet::Return(
        ReturnRow {
            fun: fit_fun(fun, e.tag()),
            jid: jid.to_owned(),
            ret_at: Some(range),
            id: fmt.runner_id.to_owned(),
            success: success.to_owned(),
            full_ret: full_ret.clone(),
            outcome,
        },
        Some(JidRow {
            jid: jid.to_owned(),
            load: full_ret,
            targets: None,
        }),
    ))
}

/// The targets a `new` event lists: `minions` (strings; anything else in
/// the list is skipped), its `fun` and `_stamp`. The list's size is bounded
/// by the event's, which the source already limits (`source.max_frame`).
fn targets_of(record: &Record) -> Targets {
    let e = &record.event;
    let (mut minions, mut salt_stamp) = (Vec::new(), None);
    let _ = msgpack::for_each_entry(e.data(), |k, v| match k {
        b"minions" => {
            let mut r = msgpack::Reader::new(v);
            if let Ok(msgpack::Item::Array(n)) = r.item() {
                for _ in 0..n {
                    match r.skip().map(msgpack::as_str) {
                        Ok(Some(m)) => minions.push(m.to_owned()),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            }
        }
        b"_stamp" => salt_stamp = msgpack::as_str(v),
        _ => {}
    });
    minions.sort_unstable();
    minions.dedup();
    Targets {
        fun: fit_fun(e.fields.fun.join(","), e.tag()),
        stamp: stamp(salt_stamp, record.received_ms),
        minions,
        relay: crate::event::syndic_of(e.tag()).map(str::to_owned),
    }
}

/// A batch's rows split by table, each row with the index of its record, so
/// a refusal found before sending can name the record (the worker then
/// dead-letters exactly that one).
#[derive(Debug, Default)]
pub struct ByTable<'a> {
    pub jids: Vec<(usize, &'a JidRow)>,
    pub returns: Vec<(usize, &'a ReturnRow)>,
    pub events: Vec<(usize, &'a EventRow)>,
    /// One `saltpipe_targets` row per (job, minion) a `new` event lists.
    pub targets: Vec<TargetRef<'a>>,
    /// Target rows to close as they are written: (jid, syndic id) of each
    /// syndic-forwarded `new` ([`Targets::relay`]); their rows are in
    /// `targets` too, so the row exists before it is closed.
    pub relays: Vec<TargetRef<'a>>,
}

/// One `saltpipe_targets` row, borrowed from its job's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRef<'a> {
    pub jid: &'a str,
    pub minion: &'a str,
    pub fun: &'a str,
    pub stamp: &'a str,
}

impl<'a> ByTable<'a> {
    pub fn of(sets: &'a [Arc<RowSet>]) -> ByTable<'a> {
        let mut t = ByTable::default();
        for (i, s) in sets.iter().enumerate() {
            match &**s {
                RowSet::Job(j) => {
                    t.jids.push((i, j));
                    if let Some(g) = &j.targets {
                        t.push_targets(&j.jid, g);
                    }
                }
                RowSet::Targets { jid, targets } => t.push_targets(jid, targets),
                RowSet::Return(r, j) => {
                    t.returns.push((i, r));
                    if let Some(j) = j {
                        t.jids.push((i, j));
                    }
                }
                RowSet::Event(e) => t.events.push((i, e)),
            }
        }
        t
    }

    fn push_targets(&mut self, jid: &'a str, g: &'a Targets) {
        let target = |m| TargetRef {
            jid,
            minion: m,
            fun: &g.fun,
            stamp: &g.stamp,
        };
        self.targets.extend(g.minions.iter().map(|m| target(m)));
        if let Some(relay) = &g.relay {
            self.targets.push(target(relay));
            self.relays.push(target(relay));
        }
    }
}

impl JidRow {
    pub fn bytes(&self) -> usize {
        self.jid.len() + self.load.len()
    }
}

impl ReturnRow {
    /// The `return` column: the JSON of the return's `return` field.
    pub fn ret(&self) -> &str {
        self.ret_at
            .clone()
            .and_then(|r| self.full_ret.get(r))
            .unwrap_or("null")
    }

    pub fn bytes(&self) -> usize {
        self.fun.len()
            + self.jid.len()
            + self.ret().len()
            + self.id.len()
            + self.success.len()
            + self.full_ret.len()
    }
}

impl EventRow {
    pub fn bytes(&self) -> usize {
        self.tag.len() + self.data.len()
    }
}

/// Cuts `rows` into runs that one statement can carry: at most `max_rows`
/// rows (the bind-parameter limit divided by the columns) and about
/// `max_bytes` of values (the server's packet limit). A single row is
/// always its own run, however big: the caller checks single rows first.
pub fn runs<T>(
    rows: &[T],
    max_rows: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, r) in rows.iter().enumerate() {
        let b = size(r);
        if i > start && (i - start >= max_rows || bytes + b > max_bytes) {
            out.push(&rows[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::encode::frame;
    use crate::event::Event;
    use bytes::Bytes;
    use rmpv::Value as V;
    use std::sync::Arc;

    fn record(tag: &str, data: Vec<(&str, V)>) -> Record {
        let v = V::Map(data.into_iter().map(|(k, v)| (V::from(k), v)).collect());
        let mut packed = Vec::new();
        rmpv::encode::write_value(&mut packed, &v).expect("encode");
        Record::new(
            Event::from_frame(&Bytes::from(frame(tag, &packed))).expect("decode"),
            0,
        )
    }

    #[test]
    fn long_fun_is_cut_on_a_char_boundary() {
        let short = "test.ping,test.echo".to_owned();
        assert_eq!(fit_fun(short.clone(), "t"), short);
        let exact = "a".repeat(FUN_WIDTH);
        assert_eq!(fit_fun(exact.clone(), "t"), exact);
        let long = "é".repeat(FUN_WIDTH + 5);
        let cut = fit_fun(long, "t");
        assert_eq!(cut.chars().count(), FUN_WIDTH);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn event_keys_tell_events_apart() {
        let k = event_key("m", "a/b", "{}");
        assert_eq!(k.len(), 32);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(k, event_key("m", "a/b", "{}"));
        assert_ne!(k, event_key("m2", "a/b", "{}"));
        assert_ne!(k, event_key("m", "a/b2", "{}"));
        assert_ne!(k, event_key("m", "a/b", "{ }"));
        // Length prefixes: moving bytes between fields changes the key.
        assert_ne!(event_key("ab", "c", "{}"), event_key("a", "bc", "{}"));
    }

    #[test]
    fn runs_respect_rows_and_bytes() {
        let v: Vec<usize> = vec![1, 1, 1, 1, 1];
        let r = runs(&v, 2, 100, |x| *x);
        assert_eq!(r.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![2, 2, 1]);
        let v: Vec<usize> = vec![5, 5, 20, 1];
        let r = runs(&v, 100, 10, |x| *x);
        assert_eq!(r.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![2, 1, 1]);
        assert!(runs(&Vec::<usize>::new(), 2, 2, |x| *x).is_empty());
    }

    #[test]
    fn stamps_are_utc_text_from_salt_or_the_receive_time() {
        let want = "2026-12-02 12:00:01.250000";
        assert_eq!(stamp(Some("2026-12-02T12:00:01.250000+00:00"), 0), want);
        assert_eq!(stamp(Some("2026-12-02T12:00:01.25"), 0), want);
        assert_eq!(
            stamp(Some("2026-12-02T12:00:01"), 0),
            "2026-12-02 12:00:01.000000"
        );
        // Not a time: when saltpipe received it.
        let ms = 1_764_676_801_250; // 2025-12-02T12:00:01.25Z
        assert_eq!(stamp(Some("yesterday"), ms), "2025-12-02 12:00:01.250000");
        assert_eq!(stamp(None, ms), "2025-12-02 12:00:01.250000");
        assert!(stamp(None, -5).starts_with("1970-01-01 00:00:00"));
    }

    #[test]
    fn a_new_event_lists_its_targets_and_a_return_its_outcome() {
        let r = record(
            "salt/job/7/new",
            vec![
                ("jid", V::from("7")),
                ("fun", V::from("state.apply")),
                (
                    "minions",
                    V::Array(vec![
                        V::from("m2"),
                        V::from("m1"),
                        V::from(5),
                        V::from("m1"),
                    ]),
                ),
                ("missing", V::Array(vec![V::from("gone")])),
                ("_stamp", V::from("2026-12-02T12:00:00.000001+00:00")),
            ],
        );
        let set = Arc::new(rows_of(&r, RowFormat::unlimited(BoolStyle::Digit)).expect("rows"));
        let RowSet::Job(j) = &*set else { panic!() };
        let t = j.targets.as_ref().expect("targets");
        assert_eq!(t.minions, vec!["m1", "m2"], "strings only, once each");
        assert_eq!(t.fun, "state.apply");
        assert_eq!(t.stamp, "2026-12-02 12:00:00.000001");
        let sets = [set];
        let by = ByTable::of(&sets);
        assert_eq!(by.targets.len(), 2);
        assert_eq!(by.targets[0].jid, "7");

        let states = V::Map(vec![(
            V::from("cmd_|-x_|-false_|-run"),
            V::Map(vec![
                (V::from("result"), V::from(false)),
                (V::from("changes"), V::Map(vec![])),
                (V::from("duration"), V::F64(2.6)),
            ]),
        )]);
        let r = record(
            "salt/job/7/ret/m1",
            vec![
                ("jid", V::from("7")),
                ("id", V::from("m1")),
                ("fun", V::from("state.apply")),
                ("return", states),
                ("retcode", V::from(0)),
                ("success", V::from(true)),
            ],
        );
        let RowSet::Return(row, _) =
            rows_of(&r, RowFormat::unlimited(BoolStyle::Digit)).expect("rows")
        else {
            panic!()
        };
        assert_eq!(
            row.success, "1",
            "the returner's column says what Salt said"
        );
        assert_eq!(row.outcome.outcome, "failed");
        assert_eq!(
            (
                row.outcome.states_total,
                row.outcome.states_failed,
                row.outcome.duration_ms
            ),
            (Some(1), Some(1), Some(3))
        );
        assert!(
            row.outcome.stamp.starts_with("1970-01-01"),
            "no _stamp: the receive time"
        );
    }

    #[test]
    fn job_new_becomes_a_jid_row() {
        let r = record(
            "salt/job/1/new",
            vec![("jid", V::from("1")), ("fun", V::from("test.ping"))],
        );
        let RowSet::Job(j) = rows_of(&r, RowFormat::unlimited(BoolStyle::Digit)).expect("rows")
        else {
            panic!()
        };
        assert_eq!(j.jid, "1");
        let load: serde_json::Value = serde_json::from_str(&j.load).expect("json");
        assert_eq!(load["fun"], "test.ping");
    }

    #[test]
    fn return_row_matches_the_returner() {
        let r = record(
            "salt/job/1/ret/m1",
            vec![
                ("jid", V::from("1")),
                ("id", V::from("m1")),
                ("fun", V::from("cmd.run")),
                ("return", V::from("hi")),
                ("retcode", V::from(0)),
                ("success", V::from(true)),
            ],
        );
        let RowSet::Return(row, job) =
            rows_of(&r, RowFormat::unlimited(BoolStyle::Digit)).expect("rows")
        else {
            panic!()
        };
        assert!(job.is_none());
        assert_eq!(row.fun, "cmd.run");
        assert_eq!(row.ret(), "\"hi\"");
        assert_eq!(row.success, "1");
        let full: serde_json::Value = serde_json::from_str(&row.full_ret).expect("json");
        assert_eq!(full["retcode"], 0);
        let RowSet::Return(row, _) =
            rows_of(&r, RowFormat::unlimited(BoolStyle::Word)).expect("rows")
        else {
            panic!()
        };
        assert_eq!(row.success, "true");
    }

    #[test]
    fn runner_job_is_stored_as_the_masters_job_cache_stores_it() {
        let r = record(
            "salt/run/20261202120000000001/ret",
            vec![
                ("fun", V::from("runner.state.orchestrate")),
                ("jid", V::from("20261202120000000001")),
                ("user", V::from("root")),
                ("return", V::Map(vec![(V::from("retcode"), V::from(1))])),
                ("success", V::from(false)),
            ],
        );
        let fmt = RowFormat {
            runner_id: "salt1_master",
            ..RowFormat::unlimited(BoolStyle::Digit)
        };
        let RowSet::Return(row, Some(job)) = rows_of(&r, fmt).expect("rows") else {
            panic!()
        };
        assert_eq!(row.id, "salt1_master");
        assert_eq!(row.fun, "runner.state.orchestrate");
        assert_eq!(row.success, "0");
        assert_eq!(row.outcome.outcome, "failed");
        let data = "{\"fun\": \"runner.state.orchestrate\", \"jid\": \"20261202120000000001\", \"user\": \"root\", \"return\": {\"retcode\": 1}, \"success\": false}";
        assert_eq!(row.ret(), data);
        assert_eq!(
            row.full_ret,
            format!(
                "{{\"id\": \"salt1_master\", \"tgt\": \"salt1_master\", \"jid\": \"20261202120000000001\", \"return\": {data}, \"fun\": \"runner.state.orchestrate\", \"user\": \"root\"}}"
            )
        );
        assert_eq!(job.load, row.full_ret);
        assert_eq!(job.jid, "20261202120000000001");
    }

    #[test]
    fn with_redact_only_records_without_secrets_are_converted() {
        let redact = KeyRedactor::new(crate::redact::DEFAULT_KEYS);
        let fmt = RowFormat::unlimited(BoolStyle::Digit);
        let ret = |id: &str, ret: V| {
            record(
                &format!("salt/job/20261204120000000001/ret/{id}"),
                vec![
                    ("id", V::from(id)),
                    ("jid", V::from("20261204120000000001")),
                    ("fun", V::from("test.echo")),
                    ("return", ret),
                ],
            )
        };
        let secret = V::Map(vec![(V::from("db_password"), V::from("hunter2"))]);
        let mut batch = vec![
            ret("clean", V::from("ok")),
            ret("secret", secret.clone()),
            // A value already hidden is not a secret.
            ret("hidden", V::Map(vec![(V::from("token"), V::from("***"))])),
            // The one kind of rows not transcoded from the whole data.
            record(
                "syndic/syndic-1/20261204120000000001",
                vec![
                    ("minions", V::Array(vec![V::from("m1")])),
                    ("token", V::from("t0k")),
                ],
            ),
            record(
                "syndic/syndic-1/20261204120000000002",
                vec![("minions", V::Array(vec![V::from("m1")]))],
            ),
        ];
        prepare(&mut batch, fmt, Some(&redact));
        let converted: Vec<bool> = batch.iter().map(|r| r.rows.is_some()).collect();
        assert_eq!(converted, [true, false, true, false, true]);
        let Some(RowSet::Return(row, _)) = batch[2].rows.as_deref() else {
            panic!("{:?}", batch[2].rows)
        };
        assert_eq!(row.ret(), r#"{"token": "***"}"#);
        // Without the redactor (a write converting what prepare left) the
        // same record converts: the check is prepare's alone.
        assert!(rows_of(&batch[1], fmt).is_ok());
        assert!(matches!(
            rows_checked(&batch[1], fmt, Some(&redact)),
            Err(RowError {
                error: msgpack::WalkError::Secret,
                ..
            })
        ));
    }

    #[test]
    fn a_3006_syndics_forwarded_announcement_is_targets_only() {
        let r = record(
            "syndic/syndic-1/20261203132535670172",
            vec![
                ("minions", V::Array(vec![V::from("s-m2"), V::from("s-m1")])),
                ("_stamp", V::from("2026-12-03T13:25:35.902999")),
            ],
        );
        let Ok(RowSet::Targets { jid, targets }) =
            rows_of(&r, RowFormat::unlimited(BoolStyle::Digit))
        else {
            panic!()
        };
        assert_eq!(jid, "20261203132535670172");
        assert_eq!(targets.minions, ["s-m1", "s-m2"]);
        assert_eq!(targets.relay.as_deref(), Some("syndic-1"));
        assert_eq!(targets.stamp, "2026-12-03 13:25:35.902999");
        // The master's own bare-jid announcement stays an event.
        let own = record("20261203132535670172", vec![]);
        assert!(matches!(
            rows_of(&own, RowFormat::unlimited(BoolStyle::Digit)),
            Ok(RowSet::Event(_))
        ));
    }

    #[test]
    fn wheel_job_is_stored_as_the_masters_job_cache_stores_it() {
        // salt/client/mixins.py's `low` stores a wheel job exactly as a
        // runner job: store_job with {id, tgt, jid, return}.
        let r = record(
            "salt/wheel/20261202120000000002/ret",
            vec![
                ("fun", V::from("wheel.key.list_all")),
                ("jid", V::from("20261202120000000002")),
                ("user", V::from("root")),
                ("return", V::Map(vec![])),
                ("success", V::from(true)),
            ],
        );
        let fmt = RowFormat {
            runner_id: "salt1_master",
            ..RowFormat::unlimited(BoolStyle::Word)
        };
        let RowSet::Return(row, Some(job)) = rows_of(&r, fmt).expect("rows") else {
            panic!()
        };
        assert_eq!(
            (row.id.as_str(), row.fun.as_str(), row.success.as_str()),
            ("salt1_master", "wheel.key.list_all", "true")
        );
        assert_eq!(row.outcome.outcome, "ok");
        let data = "{\"fun\": \"wheel.key.list_all\", \"jid\": \"20261202120000000002\", \"user\": \"root\", \"return\": {}, \"success\": true}";
        assert_eq!(row.ret(), data);
        assert_eq!(
            row.full_ret,
            format!(
                "{{\"id\": \"salt1_master\", \"tgt\": \"salt1_master\", \"jid\": \"20261202120000000002\", \"return\": {data}, \"fun\": \"wheel.key.list_all\", \"user\": \"root\"}}"
            )
        );
        assert_eq!(job.load, row.full_ret);
        // Its `new` is an event like a runner's (the profile does not keep it).
        let new = record(
            "salt/wheel/20261202120000000002/new",
            vec![("fun", V::from("wheel.key.list_all"))],
        );
        assert!(matches!(
            rows_of(&new, RowFormat::unlimited(BoolStyle::Word)),
            Ok(RowSet::Event(_))
        ));
    }

    #[test]
    fn salt_call_return_also_writes_its_load() {
        let r = record(
            "salt/job/2/ret/m1",
            vec![
                ("jid", V::from("2")),
                ("id", V::from("m1")),
                ("fun", V::from("test.ping")),
                ("return", V::from(true)),
                ("tgt", V::from("m1")),
                ("arg", V::Array(vec![])),
            ],
        );
        let RowSet::Return(row, Some(job)) =
            rows_of(&r, RowFormat::unlimited(BoolStyle::Digit)).expect("rows")
        else {
            panic!()
        };
        assert_eq!(
            row.success, "0",
            "no success key: written as false, like the returner"
        );
        assert_eq!(job.load, row.full_ret);
    }

    #[test]
    fn multi_function_and_other_events() {
        let r = record(
            "salt/job/3/ret/m1",
            vec![
                ("jid", V::from("3")),
                ("id", V::from("m1")),
                (
                    "fun",
                    V::Array(vec![V::from("test.ping"), V::from("test.echo")]),
                ),
                (
                    "success",
                    V::Map(vec![
                        (V::from("test.ping"), V::from(true)),
                        (V::from("test.echo"), V::from(true)),
                    ]),
                ),
            ],
        );
        let RowSet::Return(row, _) =
            rows_of(&r, RowFormat::unlimited(BoolStyle::Digit)).expect("rows")
        else {
            panic!()
        };
        assert_eq!(row.fun, "test.ping,test.echo");
        assert_eq!(row.success, "1");
        assert_eq!(row.ret(), "null");
        let r = record("my/event", vec![("x", V::from(1))]);
        assert_eq!(
            rows_of(&r, RowFormat::unlimited(BoolStyle::Digit)).expect("rows"),
            RowSet::Event(EventRow {
                tag: "my/event".into(),
                data: "{\"x\": 1}".into()
            })
        );
    }

    #[test]
    fn json_over_max_return_size_is_refused_with_the_reason() {
        let r = record(
            "salt/job/20261125120000000001/ret/m1",
            vec![
                ("jid", V::from("20261125120000000001")),
                ("id", V::from("m1")),
                ("fun", V::from("cmd.run")),
                ("return", V::from("x".repeat(50_000))),
            ],
        );
        let fmt = RowFormat {
            max_json: 10_000,
            ..RowFormat::unlimited(BoolStyle::Digit)
        };
        let err = rows_of(&r, fmt).expect_err("too large");
        assert!(matches!(
            err.error,
            msgpack::WalkError::TooLarge { limit: 10_000 }
        ));
        assert!(err.to_string().contains("larger than 10000 bytes"), "{err}");
        // The write names it, so the worker dead-letters it alone.
        match convert(std::slice::from_ref(&r), fmt) {
            Err(crate::sink::SinkError::Permanent { index, .. }) => assert_eq!(index, Some(0)),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let bigger = RowFormat {
            max_json: 100_000,
            ..fmt
        };
        assert!(rows_of(&r, bigger).is_ok());
    }

    #[test]
    fn prepared_rows_are_the_rows_write_converts() {
        let good = record(
            "salt/job/4/ret/m1",
            vec![
                ("jid", V::from("4")),
                ("id", V::from("m1")),
                ("fun", V::from("test.ping")),
                ("return", V::from(true)),
                ("success", V::from(true)),
            ],
        );
        // Nested past the walker's depth: no JSON form, so no rows.
        let mut deep = V::from(1);
        for _ in 0..300 {
            deep = V::Array(vec![deep]);
        }
        let bad = record("my/deep", vec![("x", deep)]);
        let plain = vec![good.clone(), bad.clone()];
        let mut ready = plain.clone();
        prepare(&mut ready, RowFormat::unlimited(BoolStyle::Word), None);
        assert!(ready[0].rows.is_some(), "a good record is converted ahead");
        assert!(ready[1].rows.is_none(), "a bad one is left for the write");
        let ahead = convert(&ready[..1], RowFormat::unlimited(BoolStyle::Word)).expect("rows");
        let inline = convert(&plain[..1], RowFormat::unlimited(BoolStyle::Word)).expect("rows");
        assert_eq!(ahead, inline);
        // The write still names the record it cannot store.
        match convert(&ready, RowFormat::unlimited(BoolStyle::Word)) {
            Err(crate::sink::SinkError::Permanent { index, .. }) => assert_eq!(index, Some(1)),
            other => panic!("expected a refusal of record 1, got {other:?}"),
        }
    }
}
