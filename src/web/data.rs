//! What each page shows, read with the pages' SQL (written once for every
//! backend, with [`Dialect`] for what differs).
//!
//! Time comes from the jid (`YYYYMMDDhhmmssffffff`, the master's clock), in
//! every backend the same string: range filters, the per-hour chart and
//! keyset pagination (`jid < ?` ordered by jid) all use the indexes on jid
//! and work the same on a database written by Salt's own returner, whose
//! only time column (`alter_time`) is when the row was written.
//!
//! Outcomes come from `saltpipe_outcomes` (ok / changed / failed /
//! no_return, judged by the states) where the table exists; on a database
//! with only Salt's returner tables they are derived from `success`
//! (`ok` or `failed`; `changed` and `no_return` cannot be told there).

use super::states::{self, StateRun};
use super::store::{Cell, Dialect, Param, Row, Store, StoreError};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// The most rows any list shows; every statement has a LIMIT.
pub const PAGE: usize = 50;
/// Minions the overview reads at most.
pub const MAX_MINIONS: usize = 20_000;
/// Minions (returns) one job page lists at most.
pub const MAX_JOB_MINIONS: usize = 5_000;
/// Failed state returns read for "failures by state" at most.
pub const MAX_FAILED_RETURNS: usize = 300;
/// Search looks for text in this many of the newest returns of the
/// period at most (a bounded scan: a substring has no index).
pub const TEXT_SCAN: usize = 10_000;
/// Search counts functions over this many of the newest jobs at most.
pub const MAX_JOBS_SCAN: usize = 20_000;

pub const OUTCOMES: [&str; 4] = ["ok", "changed", "failed", "no_return"];

/// `success` as each sink writes true.
const TRUE_WORDS: &str = "('1','true','True')";

/// The pages' reader.
pub struct Data {
    store: std::sync::Arc<dyn Store>,
    /// `saltpipe_outcomes` exists (else outcome comes from `success`).
    pub outcomes: bool,
    pub stale_after: Duration,
}

/// A jid for a point in time (UTC): the lower bound of range filters.
pub fn jid_at(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_micros(t).to_string();
    s.chars().filter(char::is_ascii_digit).collect()
}

/// "2026-11-25 12:49:27" from a jid; the jid itself if it is not a time.
pub fn jid_time(jid: &str) -> String {
    let b = jid.as_bytes();
    if b.len() >= 14 && b[..14].iter().all(u8::is_ascii_digit) {
        format!(
            "{}-{}-{} {}:{}:{}",
            &jid[0..4],
            &jid[4..6],
            &jid[6..8],
            &jid[8..10],
            &jid[10..12],
            &jid[12..14]
        )
    } else {
        jid.to_owned()
    }
}

/// A date or date-time from a form (`2026-11-25`, `2026-11-25T12:49`) as
/// a jid prefix; None if it is not one.
pub fn jid_from_input(s: &str) -> Option<String> {
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    let shape_ok = s
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '-' | 'T' | ':' | ' '));
    (shape_ok && (8..=14).contains(&digits.len())).then_some(digits)
}

/// A shell glob (`web*`, `db?`) as a LIKE pattern with `!` as the escape.
pub fn like_of_glob(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 2);
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '!' => {
                out.push('!');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A substring as a LIKE pattern (`%text%`).
pub fn like_containing(text: &str) -> String {
    format!("%{}%", like_of_glob(&text.replace(['*', '?'], "")))
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

#[derive(Debug, Clone)]
pub struct Latest {
    pub minion: String,
    /// ok / changed / failed / no_return / stale.
    pub outcome: String,
    pub jid: String,
    pub fun: String,
}

#[derive(Debug, Clone, Default)]
pub struct Overview {
    pub latest: Vec<Latest>,
    pub failed_funs: Vec<(String, i64)>,
    pub failed_states: Vec<(String, i64)>,
    /// (hour "YYYYMMDDhh", jobs, returns), oldest first, every hour present.
    pub hourly: Vec<(String, i64, i64)>,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub fun: String,
    pub target: String,
    pub user: String,
    pub minion: String,
    pub outcome: String,
    pub from: String,
    pub to: String,
    /// Keyset: only jobs with a jid below this.
    pub before: String,
}

#[derive(Debug, Clone, Default)]
pub struct JobRow {
    pub jid: String,
    pub fun: String,
    pub target: String,
    pub user: String,
    /// ok, changed, failed, no_return.
    pub counts: [i64; 4],
}

#[derive(Debug, Clone, Default)]
pub struct MinionResult {
    pub minion: String,
    pub fun: String,
    pub outcome: String,
    pub states_total: Option<i64>,
    pub states_failed: Option<i64>,
    pub states_changed: Option<i64>,
    pub duration_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct Job {
    pub jid: String,
    pub load: Option<serde_json::Value>,
    pub results: Vec<MinionResult>,
    pub no_return: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ReturnDetail {
    pub minion: String,
    pub jid: String,
    pub fun: String,
    pub run: Option<StateRun>,
    /// The return, pretty JSON.
    pub ret: String,
    /// The whole return event, pretty JSON.
    pub full_ret: String,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    pub rows: Vec<MinionResultAt>,
    pub more: bool,
}

#[derive(Debug, Clone, Default)]
pub struct MinionResultAt {
    pub jid: String,
    pub result: MinionResult,
}

#[derive(Debug, Clone, Default)]
pub struct Hits {
    pub minions: Vec<String>,
    /// (function, jobs of the period).
    pub funs: Vec<(String, i64)>,
    /// (jid, minion, fun) of returns whose text contains the query.
    pub returns: Vec<(String, String, String)>,
}

fn pretty(text: &str) -> (Option<serde_json::Value>, String) {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => {
            let p = serde_json::to_string_pretty(&v).unwrap_or_else(|_| text.to_owned());
            (Some(v), p)
        }
        Err(_) => (None, text.to_owned()),
    }
}

impl Data {
    /// Probes for saltpipe's own tables (I/O).
    pub async fn new(
        store: std::sync::Arc<dyn Store>,
        stale_after: Duration,
    ) -> Result<Data, StoreError> {
        let outcomes = match store
            .rows("SELECT COUNT(*) FROM saltpipe_outcomes WHERE 1 = 0", &[])
            .await
        {
            Ok(_) => true,
            Err(StoreError::Permanent(_)) => false,
            Err(e) => return Err(e),
        };
        // The returner tables must be there.
        store
            .rows("SELECT COUNT(*) FROM salt_returns WHERE 1 = 0", &[])
            .await?;
        Ok(Data {
            store,
            outcomes,
            stale_after,
        })
    }

    fn d(&self) -> Dialect {
        self.store.dialect()
    }

    async fn rows(&self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
        self.store.rows(sql, params).await
    }

    /// The outcome of a `salt_returns r` row when there is no outcome table.
    fn derived() -> String {
        format!("CASE WHEN r.success IN {TRUE_WORDS} THEN 'ok' ELSE 'failed' END")
    }

    /// The overview: its four reads run at once (each its own statement).
    pub async fn overview(&self, now: SystemTime) -> Result<Overview, StoreError> {
        let (latest, (failed_funs, failed_states), hourly) =
            tokio::try_join!(self.latest(now), self.failures(now), self.hourly(now))?;
        Ok(Overview {
            latest,
            failed_funs,
            failed_states,
            hourly,
        })
    }

    /// Every minion's latest outcome (stale: no job for `stale_after`).
    pub async fn latest(&self, now: SystemTime) -> Result<Vec<Latest>, StoreError> {
        let stale_before = jid_at(now - self.stale_after);
        let latest_sql = if self.outcomes && self.d() == Dialect::Postgres {
            // A loose index scan of (minion, jid) backwards: each step one
            // seek to the previous minion's newest row.
            format!(
                "WITH RECURSIVE m(minion, outcome, jid, fun) AS ( \
                   (SELECT minion, outcome, jid, fun FROM saltpipe_outcomes \
                    ORDER BY minion DESC, jid DESC LIMIT 1) \
                   UNION ALL \
                   SELECT n.minion, n.outcome, n.jid, n.fun FROM m, LATERAL \
                   (SELECT x.minion, x.outcome, x.jid, x.fun FROM saltpipe_outcomes x \
                    WHERE x.minion < m.minion ORDER BY x.minion DESC, x.jid DESC LIMIT 1) n) \
                 SELECT minion, outcome, jid, fun FROM m ORDER BY minion LIMIT {MAX_MINIONS}"
            )
        } else if self.outcomes {
            // A loose index scan of (minion, jid): one seek per minion for
            // the next minion, one for its newest jid, instead of a GROUP
            // BY over every row (2,000 minions: 4,000 seeks, not 1,000,000 rows).
            format!(
                "WITH RECURSIVE m(minion) AS ( \
                   SELECT (SELECT MIN(minion) FROM saltpipe_outcomes) \
                   UNION ALL \
                   SELECT (SELECT MIN(x.minion) FROM saltpipe_outcomes x WHERE x.minion > m.minion) \
                   FROM m WHERE m.minion IS NOT NULL) \
                 SELECT o.minion, o.outcome, o.jid, o.fun FROM m JOIN saltpipe_outcomes o \
                 ON o.minion = m.minion AND o.jid = \
                   (SELECT MAX(y.jid) FROM saltpipe_outcomes y WHERE y.minion = m.minion) \
                 ORDER BY o.minion LIMIT {MAX_MINIONS}"
            )
        } else {
            format!(
                "SELECT r.id, {}, r.jid, r.fun FROM salt_returns r \
                 JOIN (SELECT id, MAX(jid) AS jid FROM salt_returns GROUP BY id) l \
                 ON r.id = l.id AND r.jid = l.jid ORDER BY r.id LIMIT {MAX_MINIONS}",
                Self::derived()
            )
        };
        let mut latest: Vec<Latest> = self
            .rows(&latest_sql, &[])
            .await?
            .into_iter()
            .map(|r| Latest {
                minion: r[0].text(),
                outcome: r[1].text(),
                jid: r[2].text(),
                fun: r[3].text(),
            })
            .collect();
        for l in &mut latest {
            if l.jid < stale_before {
                l.outcome = "stale".into();
            }
        }
        Ok(latest)
    }

    /// Failures of the last 24 h by function and by state.
    #[allow(clippy::type_complexity)]
    pub async fn failures(
        &self,
        now: SystemTime,
    ) -> Result<(Vec<(String, i64)>, Vec<(String, i64)>), StoreError> {
        let day_ago = jid_at(now - Duration::from_secs(86_400));
        let until = jid_at(now + Duration::from_secs(86_400));
        let ret = self.d().ret();
        let (funs_sql, states_sql) = if self.outcomes {
            // Both read the failed rows only, through (outcome, jid).
            (
                "SELECT fun, COUNT(*) FROM saltpipe_outcomes WHERE outcome = 'failed' \
                 AND jid >= ? AND jid < ? GROUP BY fun ORDER BY COUNT(*) DESC, fun LIMIT 20"
                    .to_owned(),
                format!(
                    "SELECT {} FROM saltpipe_outcomes o JOIN salt_returns r ON r.jid = o.jid AND r.id = o.minion \
                     WHERE o.outcome = 'failed' AND o.jid >= ? AND o.jid < ? AND o.states_total IS NOT NULL \
                     ORDER BY o.jid DESC LIMIT {MAX_FAILED_RETURNS}",
                    self.d().as_text(&format!("r.{ret}"))
                ),
            )
        } else {
            (
                format!(
                    "SELECT fun, COUNT(*) FROM salt_returns WHERE jid >= ? AND jid < ? \
                     AND success NOT IN {TRUE_WORDS} GROUP BY fun ORDER BY COUNT(*) DESC, fun LIMIT 20"
                ),
                format!(
                    "SELECT {} FROM salt_returns r WHERE r.jid >= ? AND r.jid < ? \
                     AND r.success NOT IN {TRUE_WORDS} AND r.fun LIKE 'state.%' \
                     ORDER BY r.jid DESC LIMIT {MAX_FAILED_RETURNS}",
                    self.d().as_text(&format!("r.{ret}"))
                ),
            )
        };
        let range = [Param::Text(day_ago), Param::Text(until)];
        let (funs, states) =
            tokio::try_join!(self.rows(&funs_sql, &range), self.rows(&states_sql, &range))?;
        let failed_funs = funs
            .into_iter()
            .map(|r| (r[0].text(), r[1].int()))
            .collect();
        let mut by_state: HashMap<String, i64> = HashMap::new();
        for r in states {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&r[0].text()) else {
                continue;
            };
            if let Some(run) = states::parse(&v) {
                for s in run.states.iter().filter(|s| s.result == Some(false)) {
                    *by_state
                        .entry(format!("{} ({})", s.id, s.function))
                        .or_default() += 1;
                }
                if !run.errors.is_empty() {
                    *by_state.entry("render/compile error".into()).or_default() += 1;
                }
            }
        }
        let mut failed_states: Vec<(String, i64)> = by_state.into_iter().collect();
        failed_states.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        failed_states.truncate(20);
        Ok((failed_funs, failed_states))
    }

    /// Jobs and returns per hour of the last 48 h: (hour "YYYYMMDDhh",
    /// jobs, returns), oldest first, every hour present.
    pub async fn hourly(&self, now: SystemTime) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let hours: Vec<String> = (0..=48u64)
            .map(|h| {
                jid_at(now - Duration::from_secs((48 - h) * 3600))
                    .chars()
                    .take(10)
                    .collect()
            })
            .collect();
        let until = jid_at(now + Duration::from_secs(86_400));
        // One range count per hour over the jid index (the index's order,
        // no sort), not a GROUP BY on an expression of every row.
        let per_hour = |table: &str| {
            let arms: Vec<String> = (0..hours.len())
                .map(|i| format!("SELECT {i}, COUNT(*) FROM {table} WHERE jid >= ? AND jid < ?"))
                .collect();
            arms.join(" UNION ALL ")
        };
        let mut params = Vec::with_capacity(hours.len() * 2);
        for (i, h) in hours.iter().enumerate() {
            params.push(Param::Text(h.clone()));
            params.push(Param::Text(
                hours.get(i + 1).cloned().unwrap_or_else(|| until.clone()),
            ));
        }
        let (jobs_sql, returns_sql) = (per_hour("jids"), per_hour("salt_returns"));
        let (jobs, returns) = tokio::try_join!(
            self.rows(&jobs_sql, &params),
            self.rows(&returns_sql, &params)
        )?;
        let mut hourly: Vec<(String, i64, i64)> = hours.into_iter().map(|h| (h, 0, 0)).collect();
        for r in jobs {
            if let Some(h) = usize::try_from(r[0].int())
                .ok()
                .and_then(|i| hourly.get_mut(i))
            {
                h.1 = r[1].int();
            }
        }
        for r in returns {
            if let Some(h) = usize::try_from(r[0].int())
                .ok()
                .and_then(|i| hourly.get_mut(i))
            {
                h.2 = r[1].int();
            }
        }
        Ok(hourly)
    }

    pub async fn jobs(&self, f: &JobFilter) -> Result<(Vec<JobRow>, bool), StoreError> {
        let d = self.d();
        let load = format!("j.{}", d.load());
        let mut sql = format!(
            "SELECT j.jid, {}, {}, {} FROM jids j WHERE j.jid < ?",
            d.json_text(&load, "fun"),
            d.json_text(&load, "tgt"),
            d.json_text(&load, "user"),
        );
        let before = if f.before.is_empty() {
            "3".to_owned()
        } else {
            f.before.clone()
        };
        let mut params = vec![Param::Text(before)];
        if let Some(from) = jid_from_input(&f.from) {
            sql.push_str(" AND j.jid >= ?");
            params.push(Param::Text(from));
        }
        if let Some(to) = jid_from_input(&f.to) {
            // `to` is inclusive of the day or minute given.
            sql.push_str(" AND j.jid < ?");
            params.push(Param::Text(format!("{to}~")));
        }
        for (value, key) in [(&f.fun, "fun"), (&f.target, "tgt"), (&f.user, "user")] {
            if !value.is_empty() {
                sql.push_str(&format!(
                    " AND {} LIKE ? ESCAPE '!'",
                    d.json_text(&load, key)
                ));
                params.push(Param::Text(like_of_glob(value)));
            }
        }
        if !f.minion.is_empty() && !f.minion.contains(['*', '?']) {
            // One minion: a point lookup in (jid, id) per job.
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM salt_returns r WHERE r.jid = j.jid AND r.id = ?)",
            );
            params.push(Param::Text(f.minion.clone()));
        } else if !f.minion.is_empty() {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM salt_returns r WHERE r.jid = j.jid AND r.id LIKE ? ESCAPE '!')",
            );
            params.push(Param::Text(like_of_glob(&f.minion)));
        }
        if OUTCOMES.contains(&f.outcome.as_str()) {
            if self.outcomes {
                sql.push_str(" AND EXISTS (SELECT 1 FROM saltpipe_outcomes o WHERE o.jid = j.jid AND o.outcome = ?)");
                params.push(Param::Text(f.outcome.clone()));
            } else {
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM salt_returns r WHERE r.jid = j.jid AND {} = ?)",
                    Self::derived()
                ));
                params.push(Param::Text(f.outcome.clone()));
            }
        }
        sql.push_str(&format!(" ORDER BY j.jid DESC LIMIT {}", PAGE + 1));
        let mut rows: Vec<JobRow> = self
            .rows(&sql, &params)
            .await?
            .into_iter()
            .map(|r| JobRow {
                jid: r[0].text(),
                fun: r[1].text(),
                target: r[2].text(),
                user: r[3].text(),
                counts: [0; 4],
            })
            .collect();
        let more = rows.len() > PAGE;
        rows.truncate(PAGE);
        if !rows.is_empty() {
            let ph = placeholders(rows.len());
            let sql = if self.outcomes {
                format!(
                    "SELECT jid, outcome, COUNT(*) FROM saltpipe_outcomes WHERE jid IN ({ph}) GROUP BY jid, outcome"
                )
            } else {
                let o = Self::derived();
                format!(
                    "SELECT r.jid, {o}, COUNT(*) FROM salt_returns r WHERE r.jid IN ({ph}) GROUP BY r.jid, {o}"
                )
            };
            let ps: Vec<Param> = rows.iter().map(|r| Param::Text(r.jid.clone())).collect();
            let counts = self.rows(&sql, &ps).await?;
            let at: HashMap<String, usize> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| (r.jid.clone(), i))
                .collect();
            for c in counts {
                if let (Some(&i), Some(k)) = (
                    at.get(&c[0].text()),
                    OUTCOMES.iter().position(|o| *o == c[1].text()),
                ) {
                    rows[i].counts[k] = c[2].int();
                }
            }
        }
        Ok((rows, more))
    }

    pub async fn job(&self, jid: &str) -> Result<Job, StoreError> {
        let d = self.d();
        let p = [Param::Text(jid.to_owned())];
        let load = self
            .rows(
                &format!(
                    "SELECT {} FROM jids WHERE jid = ? LIMIT 1",
                    d.as_text(d.load())
                ),
                &p,
            )
            .await?
            .first()
            .and_then(|r| serde_json::from_str(&r[0].text()).ok());
        let sql = if self.outcomes {
            format!(
                "SELECT r.id, r.fun, COALESCE(o.outcome, {}), o.states_total, o.states_failed, o.states_changed, o.duration_ms \
                 FROM salt_returns r LEFT JOIN saltpipe_outcomes o ON o.jid = r.jid AND o.minion = r.id \
                 WHERE r.jid = ? ORDER BY r.id LIMIT {MAX_JOB_MINIONS}",
                Self::derived()
            )
        } else {
            format!(
                "SELECT r.id, r.fun, {}, NULL, NULL, NULL, NULL FROM salt_returns r \
                 WHERE r.jid = ? ORDER BY r.id LIMIT {MAX_JOB_MINIONS}",
                Self::derived()
            )
        };
        let mut results: Vec<MinionResult> = self
            .rows(&sql, &p)
            .await?
            .into_iter()
            .map(result_of)
            .collect();
        results.sort_by_key(|r| rank(&r.outcome));
        let no_return = if self.outcomes {
            self.rows(
                &format!(
                    "SELECT minion FROM saltpipe_outcomes WHERE jid = ? AND outcome = 'no_return' \
                     ORDER BY minion LIMIT {MAX_JOB_MINIONS}"
                ),
                &p,
            )
            .await?
            .into_iter()
            .map(|r| r[0].text())
            .collect()
        } else {
            Vec::new()
        };
        Ok(Job {
            jid: jid.to_owned(),
            load,
            results,
            no_return,
        })
    }

    /// One minion's return of one job, laid out.
    pub async fn detail(
        &self,
        jid: &str,
        minion: &str,
    ) -> Result<Option<ReturnDetail>, StoreError> {
        let d = self.d();
        let sql = format!(
            "SELECT fun, {}, {} FROM salt_returns WHERE jid = ? AND id = ? LIMIT 1",
            d.as_text(d.ret()),
            d.as_text("full_ret")
        );
        let rows = self
            .rows(
                &sql,
                &[Param::Text(jid.to_owned()), Param::Text(minion.to_owned())],
            )
            .await?;
        Ok(rows.into_iter().next().map(|r| detail_of(jid, minion, r)))
    }

    pub async fn history(
        &self,
        minion: &str,
        before: &str,
        limit: usize,
    ) -> Result<History, StoreError> {
        let sql = if self.outcomes {
            format!(
                "SELECT o.jid, o.minion, o.fun, o.outcome, o.states_total, o.states_failed, o.states_changed, o.duration_ms \
                 FROM saltpipe_outcomes o WHERE o.minion = ? AND o.jid < ? ORDER BY o.jid DESC LIMIT {}",
                limit + 1
            )
        } else {
            format!(
                "SELECT r.jid, r.id, r.fun, {}, NULL, NULL, NULL, NULL FROM salt_returns r \
                 WHERE r.id = ? AND r.jid < ? ORDER BY r.jid DESC LIMIT {}",
                Self::derived(),
                limit + 1
            )
        };
        let before = if before.is_empty() { "3" } else { before };
        let mut rows: Vec<MinionResultAt> = self
            .rows(
                &sql,
                &[
                    Param::Text(minion.to_owned()),
                    Param::Text(before.to_owned()),
                ],
            )
            .await?
            .into_iter()
            .map(|mut r| MinionResultAt {
                jid: r.remove(0).text(),
                result: result_of(r),
            })
            .collect();
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok(History { rows, more })
    }

    /// The minion's most recent highstate (or state.apply) return.
    pub async fn last_highstate(&self, minion: &str) -> Result<Option<ReturnDetail>, StoreError> {
        let d = self.d();
        let m = Param::Text(minion.to_owned());
        let (sql, params) = if self.outcomes {
            // The newest such jid from (minion, jid), read backwards, then
            // one row by (jid, id): never all of the minion's returns.
            let sql = format!(
                "SELECT r.fun, {}, {}, r.jid FROM salt_returns r WHERE r.id = ? AND r.jid = \
                 (SELECT MAX(o.jid) FROM saltpipe_outcomes o WHERE o.minion = ? \
                  AND o.fun IN ('state.highstate', 'state.apply')) LIMIT 1",
                d.as_text(&format!("r.{}", d.ret())),
                d.as_text("r.full_ret")
            );
            (sql, vec![m.clone(), m])
        } else {
            let sql = format!(
                "SELECT fun, {}, {}, jid FROM salt_returns WHERE id = ? \
                 AND fun IN ('state.highstate', 'state.apply') ORDER BY jid DESC LIMIT 1",
                d.as_text(d.ret()),
                d.as_text("full_ret")
            );
            (sql, vec![m])
        };
        let rows = self.rows(&sql, &params).await?;
        Ok(rows.into_iter().next().map(|mut r| {
            let jid = r.remove(3).text();
            detail_of(&jid, minion, r)
        }))
    }

    /// Functions named like `q`, and recent returns (since `since`, a jid)
    /// whose text (state ids, comments, output) contains it. (Minions are
    /// matched against the overview's list of every minion: [`minions_like`].)
    pub async fn search(&self, q: &str, since: &str) -> Result<Hits, StoreError> {
        let d = self.d();
        let pattern = if q.contains(['*', '?']) {
            like_of_glob(q)
        } else {
            like_containing(q)
        };
        // Functions: from the jobs of the period (the newest MAX_JOBS_SCAN).
        let funs_sql = format!(
            "SELECT f, COUNT(*) FROM (SELECT {} AS f FROM jids WHERE jid >= ? \
             ORDER BY jid DESC LIMIT {MAX_JOBS_SCAN}) x WHERE f LIKE ? ESCAPE '!' \
             GROUP BY f ORDER BY COUNT(*) DESC, f LIMIT {PAGE}",
            d.json_text(&format!("jids.{}", d.load()), "fun")
        );
        // Text: the newest TEXT_SCAN returns of the period, not all of them.
        let returns_sql = format!(
            "SELECT jid, id, fun FROM (SELECT jid, id, fun, {} AS t FROM salt_returns WHERE jid >= ? \
             ORDER BY jid DESC LIMIT {TEXT_SCAN}) x WHERE t LIKE ? ESCAPE '!' \
             ORDER BY jid DESC LIMIT {PAGE}",
            d.as_text(d.ret())
        );
        let in_period = [Param::Text(since.to_owned()), Param::Text(pattern)];
        let (funs, returns) = tokio::try_join!(
            self.rows(&funs_sql, &in_period),
            self.rows(&returns_sql, &in_period)
        )?;
        let funs = funs
            .into_iter()
            .map(|r| (r[0].text(), r[1].int()))
            .collect();
        let returns = returns
            .into_iter()
            .map(|r| (r[0].text(), r[1].text(), r[2].text()))
            .collect();
        Ok(Hits {
            minions: Vec::new(),
            funs,
            returns,
        })
    }
}

/// The minions named like `q` (a substring, or a glob with `*`/`?`;
/// ASCII case ignored), at most [`PAGE`], from a sorted list of all.
pub fn minions_like<'a>(q: &str, all: impl Iterator<Item = &'a str>) -> Vec<String> {
    let opts = glob::MatchOptions {
        case_sensitive: false,
        ..Default::default()
    };
    let pattern = if q.contains(['*', '?']) {
        glob::Pattern::new(q).ok()
    } else {
        None
    };
    let needle = q.to_ascii_lowercase();
    all.filter(|m| match &pattern {
        Some(p) => p.matches_with(m, opts),
        None => m.to_ascii_lowercase().contains(&needle),
    })
    .take(PAGE)
    .map(str::to_owned)
    .collect()
}

/// Failed first, then no_return, changed, ok.
pub fn rank(outcome: &str) -> u8 {
    match outcome {
        "failed" => 0,
        "no_return" => 1,
        "stale" => 2,
        "changed" => 3,
        _ => 4,
    }
}

/// (minion, fun, outcome, states_total, states_failed, states_changed, duration_ms)
fn result_of(r: Row) -> MinionResult {
    let c = |i: usize| r.get(i).cloned().unwrap_or(Cell::Null);
    MinionResult {
        minion: c(0).text(),
        fun: c(1).text(),
        outcome: c(2).text(),
        states_total: c(3).opt_int(),
        states_failed: c(4).opt_int(),
        states_changed: c(5).opt_int(),
        duration_ms: c(6).opt_int(),
    }
}

/// (fun, return, full_ret)
fn detail_of(jid: &str, minion: &str, r: Row) -> ReturnDetail {
    let (value, ret) = pretty(&r[1].text());
    let (_, full_ret) = pretty(&r[2].text());
    ReturnDetail {
        minion: minion.to_owned(),
        jid: jid.to_owned(),
        fun: r[0].text(),
        run: value.as_ref().and_then(states::parse),
        ret,
        full_ret,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_escaped_like_patterns() {
        assert_eq!(like_of_glob("web*"), "web%");
        assert_eq!(like_of_glob("db?_1%!"), "db_!_1!%!!");
        assert_eq!(like_containing("a_b"), "%a!_b%");
    }

    #[test]
    fn minions_by_substring_or_glob() {
        let all = ["db-1", "Web-1", "web-2", "x[1]"];
        let m = |q: &str| minions_like(q, all.iter().copied());
        assert_eq!(m("web"), ["Web-1", "web-2"]);
        assert_eq!(m("w*-2"), ["web-2"]);
        assert_eq!(m("db-?"), ["db-1"]);
        assert_eq!(m("[1]"), ["x[1]"]);
    }

    #[test]
    fn jids_and_times() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        assert_eq!(jid_at(t), "20251124160000000000");
        assert_eq!(jid_time("20251124160000000000"), "2025-11-24 16:00:00");
        assert_eq!(jid_time("req"), "req");
        assert_eq!(jid_from_input("2025-11-24").as_deref(), Some("20251124"));
        assert_eq!(
            jid_from_input("2025-11-24T16:30").as_deref(),
            Some("202511241630")
        );
        assert_eq!(jid_from_input("x' OR 1=1"), None);
    }
}
