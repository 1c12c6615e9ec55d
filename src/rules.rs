//! Which events are worth keeping, and which queue each one goes to.
//!
//! A master's bus is mostly noise for a results database: every running job
//! makes `saltutil.find_job` polls, 3007+ repeats each announcement as
//! `publish`, and auth, refresh, presence and start events come and go all
//! day. The decision for one event, in order:
//!
//! 1. the operator's rules (`[[rules.rule]]`), first match wins;
//! 2. the built-in redundancy filter (`drop_redundant`), with a reason per drop;
//! 3. the profile (`keep`): `jobs` keeps job announcements and returns,
//!    and runner and wheel jobs' returns (`salt-run`, orchestrations,
//!    WheelClient / salt-api wheel calls: Salt's master job cache stores
//!    both, and saltpipe stores them the same way; a rule
//!    `kind = "runner_return"` or `"wheel_return"` with `action = "drop"`
//!    drops them), optionally only for some functions
//!    (`funs`); `all` keeps everything
//!    left; `none` keeps only what a rule kept;
//! 4. a kept return whose (jid, minion) was already kept is dropped as a
//!    duplicate (multi-master and syndic setups deliver the same return
//!    more than once). The sink's unique key is the real guarantee; this
//!    window only saves the queue and the database the work.
//!
//! Patterns are fnmatch globs (`*`, `?`, `[...]`, `[!...]`), as Salt's own
//! targeting uses: the `glob` crate's `Pattern` matches with those semantics,
//! where `globset` would also read `{a,b}` and backslashes.

use crate::config::ConfigError;
use crate::event::{Event, Kind};
use crate::outcome::Outcome;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The queue used when a rule names none.
pub const DEFAULT_QUEUE: &str = "default";

/// `[rules]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// What is kept when no rule matched: `jobs`, `all` or `none`.
    pub keep: Profile,
    /// With `keep = "jobs"`: only job events whose function matches one of
    /// these globs. `funs = ["cmd.run"]` is the original project's profile.
    pub funs: Vec<Glob>,
    /// Drop the events that only repeat or poll (find_job, publish, batch,
    /// auth, refresh, presence, start, progress, state-failure duplicates).
    pub drop_redundant: bool,
    /// Drop a second return for a (jid, minion) already kept.
    pub dedupe_returns: bool,
    /// How many recent (jid, minion) pairs the duplicate check remembers.
    pub dedupe_window: usize,
    /// The operator's rules, first match wins.
    pub rule: Vec<RuleConfig>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            keep: Profile::Jobs,
            funs: vec![],
            drop_redundant: true,
            dedupe_returns: true,
            dedupe_window: 100_000,
            rule: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Jobs,
    All,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Keep,
    Drop,
}

/// One `[[rules.rule]]`: every condition given must hold.
///
/// The conditions are the fields of [`MatcherConfig`], written inline.
/// (serde cannot combine `flatten` with `deny_unknown_fields`, and a
/// misspelt condition silently matching everything is worse than a few
/// repeated lines.)
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    /// A name for logs and metrics.
    pub name: Option<String>,
    /// `keep` (the default) or `drop`.
    pub action: Action,
    /// Queue for events this rule keeps.
    pub queue: Option<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub tag: Vec<Glob>,
    #[serde(deserialize_with = "one_or_many")]
    pub fun: Vec<Glob>,
    #[serde(deserialize_with = "one_or_many")]
    pub minion: Vec<Glob>,
    #[serde(deserialize_with = "one_or_many")]
    pub kind: Vec<Kind>,
    pub success: Option<bool>,
    #[serde(deserialize_with = "one_or_many")]
    pub retcode: Vec<i64>,
    #[serde(deserialize_with = "one_or_many")]
    pub outcome: Vec<Outcome>,
}

impl RuleConfig {
    pub fn matcher(&self) -> MatcherConfig {
        MatcherConfig {
            tag: self.tag.clone(),
            fun: self.fun.clone(),
            minion: self.minion.clone(),
            kind: self.kind.clone(),
            success: self.success,
            retcode: self.retcode.clone(),
            outcome: self.outcome.clone(),
        }
    }
}

/// Conditions on an event; shared by filter rules and action triggers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatcherConfig {
    /// Tag globs, any of which may match.
    #[serde(deserialize_with = "one_or_many")]
    pub tag: Vec<Glob>,
    /// Function globs; a multi-function job matches if any function does.
    #[serde(deserialize_with = "one_or_many")]
    pub fun: Vec<Glob>,
    /// Minion id globs.
    #[serde(deserialize_with = "one_or_many")]
    pub minion: Vec<Glob>,
    /// Event kinds (`job_return`, `job_new`, `runner_return`, `wheel_return`, ...).
    #[serde(deserialize_with = "one_or_many")]
    pub kind: Vec<Kind>,
    /// The return's `success`.
    pub success: Option<bool>,
    /// The return's `retcode`, any of these.
    #[serde(deserialize_with = "one_or_many")]
    pub retcode: Vec<i64>,
    /// The return's real outcome ([`crate::outcome`]), any of these:
    /// `ok`, `changed`, `failed` (also a failed state where Salt said
    /// success), `no_return`. Judged only when asked for. `no_return` is
    /// decided by the worker's return-window sweep, so only actions see it
    /// (as a `saltpipe/no_return/<jid>/<minion>` event), never the rules.
    #[serde(deserialize_with = "one_or_many")]
    pub outcome: Vec<Outcome>,
}

fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(t) => vec![t],
        OneOrMany::Many(v) => v,
    })
}

/// An fnmatch glob, checked when the config is read.
#[derive(Debug, Clone)]
pub struct Glob {
    pattern: glob::Pattern,
    /// `*` alone: skip the matcher.
    any: bool,
}

impl Glob {
    pub fn new(s: &str) -> Result<Glob, glob::PatternError> {
        Ok(Glob {
            pattern: glob::Pattern::new(s)?,
            any: s == "*",
        })
    }

    pub fn matches(&self, s: &str) -> bool {
        self.any || self.pattern.matches(s)
    }

    pub fn as_str(&self) -> &str {
        self.pattern.as_str()
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Glob::new(&s).map_err(|e| serde::de::Error::custom(format!("bad glob `{s}`: {e}")))
    }
}

impl MatcherConfig {
    /// True if every condition given holds for `e`.
    pub fn matches(&self, e: &Event) -> bool {
        (self.kind.is_empty() || self.kind.contains(&e.kind))
            && (self.tag.is_empty() || self.tag.iter().any(|g| g.matches(e.tag())))
            && (self.fun.is_empty()
                || e.fields
                    .fun
                    .iter()
                    .any(|f| self.fun.iter().any(|g| g.matches(f))))
            && (self.minion.is_empty()
                || e.fields
                    .minion
                    .as_deref()
                    .is_some_and(|m| self.minion.iter().any(|g| g.matches(m))))
            && self.success.is_none_or(|s| e.fields.success == Some(s))
            && (self.retcode.is_empty()
                || e.fields.retcode.is_some_and(|r| self.retcode.contains(&r)))
            && (self.outcome.is_empty()
                || crate::outcome::of_event(e).is_some_and(|o| self.outcome.contains(&o)))
    }

    pub fn is_empty(&self) -> bool {
        self.tag.is_empty()
            && self.fun.is_empty()
            && self.minion.is_empty()
            && self.kind.is_empty()
            && self.success.is_none()
            && self.retcode.is_empty()
            && self.outcome.is_empty()
    }
}

impl RulesConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, r) in self.rule.iter().enumerate() {
            let key = format!(
                "rules.rule[{i}]{}",
                r.name
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
            if r.matcher().is_empty() {
                return Err(ConfigError::invalid(
                    key,
                    "has no condition: it would match every event; give tag, fun, minion, kind, success, retcode or outcome",
                ));
            }
            if r.action == Action::Drop && r.queue.is_some() {
                return Err(ConfigError::invalid(key, "a drop rule cannot name a queue"));
            }
            if let Some(q) = &r.queue {
                validate_queue_name(q)
                    .map_err(|m| ConfigError::invalid(format!("{key}.queue"), m))?;
            }
        }
        if self.dedupe_returns && self.dedupe_window == 0 {
            return Err(ConfigError::invalid(
                "rules.dedupe_window",
                "must be at least 1 when dedupe_returns is on",
            ));
        }
        if !self.funs.is_empty() && self.keep != Profile::Jobs {
            return Err(ConfigError::invalid(
                "rules.funs",
                "only applies with keep = \"jobs\"",
            ));
        }
        Ok(())
    }

    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![DEFAULT_QUEUE.to_owned()];
        for r in &self.rule {
            if let Some(q) = &r.queue
                && !names.contains(q)
            {
                names.push(q.clone());
            }
        }
        names
    }
}

/// Queue names become table keys, stream names and subjects: keep them plain.
pub fn validate_queue_name(q: &str) -> Result<(), String> {
    if q.is_empty()
        || q.len() > 64
        || !q
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "queue name `{q}` must be 1-64 characters of letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

/// Why an event was not kept. Also a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    FindJob,
    PublishDuplicate,
    LegacyAnnounce,
    JobProgress,
    JobSub,
    StateFailure,
    Batch,
    Auth,
    Key,
    Refresh,
    MinionStart,
    Presence,
    DuplicateReturn,
    Rule,
    NotSelected,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        DropReason::FindJob,
        DropReason::PublishDuplicate,
        DropReason::LegacyAnnounce,
        DropReason::JobProgress,
        DropReason::JobSub,
        DropReason::StateFailure,
        DropReason::Batch,
        DropReason::Auth,
        DropReason::Key,
        DropReason::Refresh,
        DropReason::MinionStart,
        DropReason::Presence,
        DropReason::DuplicateReturn,
        DropReason::Rule,
        DropReason::NotSelected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::FindJob => "find_job",
            DropReason::PublishDuplicate => "publish_duplicate",
            DropReason::LegacyAnnounce => "legacy_announce",
            DropReason::JobProgress => "job_progress",
            DropReason::JobSub => "job_sub",
            DropReason::StateFailure => "state_failure_duplicate",
            DropReason::Batch => "batch",
            DropReason::Auth => "auth",
            DropReason::Key => "key",
            DropReason::Refresh => "refresh",
            DropReason::MinionStart => "minion_start",
            DropReason::Presence => "presence",
            DropReason::DuplicateReturn => "duplicate_return",
            DropReason::Rule => "rule",
            DropReason::NotSelected => "not_selected",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What to do with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Keep { queue: Arc<str> },
    Drop(DropReason),
}

struct Rule {
    action: Action,
    queue: Arc<str>,
    matcher: MatcherConfig,
}

/// The compiled rules plus the duplicate-return window.
pub struct Rules {
    rules: Vec<Rule>,
    profile: Profile,
    funs: Vec<Glob>,
    drop_redundant: bool,
    default_queue: Arc<str>,
    dedupe: Option<Dedupe>,
}

impl Rules {
    pub fn new(cfg: &RulesConfig) -> Rules {
        let default_queue: Arc<str> = Arc::from(DEFAULT_QUEUE);
        Rules {
            rules: cfg
                .rule
                .iter()
                .map(|r| Rule {
                    action: r.action,
                    queue: r
                        .queue
                        .as_deref()
                        .map(Arc::from)
                        .unwrap_or_else(|| default_queue.clone()),
                    matcher: r.matcher(),
                })
                .collect(),
            profile: cfg.keep,
            funs: cfg.funs.clone(),
            drop_redundant: cfg.drop_redundant,
            dedupe: cfg.dedupe_returns.then(|| Dedupe::new(cfg.dedupe_window)),
            default_queue,
        }
    }

    /// Decides for one event; remembers kept returns for the duplicate check.
    pub fn decide(&mut self, e: &Event) -> Decision {
        let decision = self.decide_without_dedupe(e);
        if let (Decision::Keep { .. }, Kind::JobReturn, Some(d)) =
            (&decision, e.kind, self.dedupe.as_mut())
            && let (Some(jid), Some(minion)) = (&e.fields.jid, &e.fields.minion)
            && !d.insert(jid, minion)
        {
            return Decision::Drop(DropReason::DuplicateReturn);
        }
        decision
    }

    /// Forgets a kept return that never reached the queue (dropped on
    /// overflow), so that a retransmit of it is kept instead of being
    /// dropped as a duplicate of an event that was lost.
    pub fn forget(&mut self, e: &Event) {
        if let (Kind::JobReturn, Some(d)) = (e.kind, self.dedupe.as_mut())
            && let (Some(jid), Some(minion)) = (&e.fields.jid, &e.fields.minion)
        {
            d.forget(jid, minion);
        }
    }

    fn decide_without_dedupe(&self, e: &Event) -> Decision {
        for r in &self.rules {
            if r.matcher.matches(e) {
                return match r.action {
                    Action::Keep => Decision::Keep {
                        queue: r.queue.clone(),
                    },
                    Action::Drop => Decision::Drop(DropReason::Rule),
                };
            }
        }
        if self.drop_redundant
            && let Some(reason) = redundant(e)
        {
            return Decision::Drop(reason);
        }
        let keep = match self.profile {
            Profile::All => true,
            Profile::None => false,
            Profile::Jobs => {
                (matches!(
                    e.kind,
                    Kind::JobNew | Kind::JobReturn | Kind::RunnerReturn | Kind::WheelReturn
                ) || e.is_syndic_announcement())
                    && (self.funs.is_empty()
                        || e.fields
                            .fun
                            .iter()
                            .any(|f| self.funs.iter().any(|g| g.matches(f))))
            }
        };
        if keep {
            Decision::Keep {
                queue: self.default_queue.clone(),
            }
        } else {
            Decision::Drop(DropReason::NotSelected)
        }
    }
}

/// The built-in redundancy filter (`shared/SALT.md`, "What is redundant").
fn redundant(e: &Event) -> Option<DropReason> {
    Some(match e.kind {
        Kind::JobNew | Kind::JobReturn | Kind::JobPublish
            if e.fields.fun.iter().any(|f| f == "saltutil.find_job") =>
        {
            DropReason::FindJob
        }
        Kind::JobPublish => DropReason::PublishDuplicate,
        // A 3006 syndic's forwarded announcement is no repeat on its MoM.
        Kind::JobLegacyAnnounce if !e.is_syndic_announcement() => DropReason::LegacyAnnounce,
        Kind::JobProgress => DropReason::JobProgress,
        Kind::JobSub => DropReason::JobSub,
        Kind::StateFailure => DropReason::StateFailure,
        Kind::Batch => DropReason::Batch,
        Kind::Auth => DropReason::Auth,
        Kind::Key => DropReason::Key,
        Kind::Refresh => DropReason::Refresh,
        Kind::MinionStart => DropReason::MinionStart,
        Kind::Presence => DropReason::Presence,
        _ => return None,
    })
}

/// The keys are already SipHash values: hashing them again would only cost time.
#[derive(Default, Clone, Copy)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A fixed-size memory of recent (jid, minion) pairs, oldest forgotten first.
/// Stores 64-bit hashes, not strings: 100,000 pairs cost about 4 MB.
///
/// A pair can be forgotten again ([`Rules::forget`]) when its event never
/// reached the queue, so that the master's retransmit is kept. Each entry
/// carries the sequence number of its insertion, so the stale slot a
/// forgotten pair leaves in `order` cannot evict a later insertion of it.
struct Dedupe {
    seen: HashMap<u64, u64, std::hash::BuildHasherDefault<Prehashed>>,
    order: VecDeque<(u64, u64)>,
    next: u64,
    cap: usize,
}

impl Dedupe {
    fn new(cap: usize) -> Dedupe {
        Dedupe {
            seen: HashMap::with_capacity_and_hasher(cap.min(1 << 20), Default::default()),
            order: VecDeque::with_capacity(cap.min(1 << 20)),
            next: 0,
            cap: cap.max(1),
        }
    }

    fn key(jid: &str, minion: &str) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        jid.hash(&mut h);
        minion.hash(&mut h);
        h.finish()
    }

    /// True if the pair was new.
    fn insert(&mut self, jid: &str, minion: &str) -> bool {
        let k = Dedupe::key(jid, minion);
        if self.seen.contains_key(&k) {
            return false;
        }
        let seq = self.next;
        self.next += 1;
        self.seen.insert(k, seq);
        self.order.push_back((k, seq));
        // Stale slots of forgotten pairs count towards the cap too, so
        // `order` stays bounded; they only make the window a little shorter.
        while self.order.len() > self.cap {
            let Some((old, s)) = self.order.pop_front() else {
                break;
            };
            if self.seen.get(&old) == Some(&s) {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// Forgets the pair, if remembered.
    fn forget(&mut self, jid: &str, minion: &str) {
        self.seen.remove(&Dedupe::key(jid, minion));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::encode::{frame, frame_bytes};
    use bytes::Bytes;

    fn ev(tag: &str, fields: &[(&str, &str)]) -> Event {
        Event::from_frame(&Bytes::from(frame_bytes(tag, fields))).expect("decode")
    }

    fn ret(jid: &str, minion: &str, fun: &str) -> Event {
        ev(
            &format!("salt/job/{jid}/ret/{minion}"),
            &[("jid", jid), ("id", minion), ("fun", fun)],
        )
    }

    fn rules(toml_text: &str) -> Rules {
        let cfg: crate::config::Config = toml::from_str(toml_text).expect("config");
        cfg.rules.validate().expect("valid");
        Rules::new(&cfg.rules)
    }

    fn keep(q: &str) -> Decision {
        Decision::Keep {
            queue: Arc::from(q),
        }
    }

    #[test]
    fn default_profile_keeps_jobs_and_drops_noise_by_reason() {
        let mut r = rules("");
        assert_eq!(r.decide(&ret("1", "m1", "test.ping")), keep("default"));
        assert_eq!(
            r.decide(&ev("salt/job/1/new", &[("jid", "1"), ("fun", "test.ping")])),
            keep("default")
        );
        let drops = [
            (
                ev("salt/job/2/new", &[("fun", "saltutil.find_job")]),
                DropReason::FindJob,
            ),
            (
                ev("salt/job/2/publish", &[("fun", "saltutil.find_job")]),
                DropReason::FindJob,
            ),
            (ret("2", "m1", "saltutil.find_job"), DropReason::FindJob),
            (
                ev("salt/job/1/publish", &[("fun", "test.ping")]),
                DropReason::PublishDuplicate,
            ),
            (ev("20261125120000123456", &[]), DropReason::LegacyAnnounce),
            (ev("salt/job/1/prog/m1/0", &[]), DropReason::JobProgress),
            (
                ev("salt/job/1/sub/m1/error/state.apply", &[]),
                DropReason::JobSub,
            ),
            (ev("state.apply", &[]), DropReason::StateFailure),
            (ev("salt/batch/1/start", &[]), DropReason::Batch),
            (ev("salt/auth", &[("id", "m1")]), DropReason::Auth),
            (ev("salt/key", &[]), DropReason::Key),
            (ev("minion/refresh/m1", &[]), DropReason::Refresh),
            (ev("minion_start", &[]), DropReason::MinionStart),
            (ev("salt/minion/m1/start", &[]), DropReason::MinionStart),
            (ev("salt/presence/present", &[]), DropReason::Presence),
            (
                ev("salt/run/1/new", &[("fun", "runner.test.arg")]),
                DropReason::NotSelected,
            ),
            (ev("my/event", &[]), DropReason::NotSelected),
        ];
        for (e, reason) in drops {
            assert_eq!(r.decide(&e), Decision::Drop(reason), "{}", e.tag());
        }
    }

    #[test]
    fn runner_returns_are_jobs_unless_a_rule_drops_them() {
        let run = ev(
            "salt/run/20261202120000000001/ret",
            &[
                ("jid", "20261202120000000001"),
                ("fun", "runner.state.orchestrate"),
            ],
        );
        assert_eq!(rules("").decide(&run), keep("default"));
        let mut r = rules("[[rules.rule]]\nkind = \"runner_return\"\naction = \"drop\"\n");
        assert_eq!(r.decide(&run), Decision::Drop(DropReason::Rule));
        assert_eq!(r.decide(&ret("1", "m1", "test.ping")), keep("default"));
    }

    #[test]
    fn a_syndics_forwarded_bare_jid_announcement_is_kept_on_its_mom() {
        // Salt 3006: the only sign of a syndic's minions on the MoM.
        let mut r = rules("");
        let fwd = ev("syndic/syndic-1/20261203132535670172", &[]);
        assert_eq!(r.decide(&fwd), keep("default"));
        let own = ev("20261203132535670172", &[]);
        assert_eq!(r.decide(&own), Decision::Drop(DropReason::LegacyAnnounce));
        let mut r = rules("[rules]\ndrop_redundant = false\n");
        assert_eq!(r.decide(&own), Decision::Drop(DropReason::NotSelected));
    }

    #[test]
    fn wheel_returns_are_jobs_unless_a_rule_drops_them() {
        let wheel = ev(
            "salt/wheel/20261202120000000002/ret",
            &[("jid", "20261202120000000002"), ("fun", "wheel.key.accept")],
        );
        let new = ev(
            "salt/wheel/20261202120000000002/new",
            &[("fun", "wheel.key.accept")],
        );
        assert_eq!(rules("").decide(&wheel), keep("default"));
        assert_eq!(
            rules("").decide(&new),
            Decision::Drop(DropReason::NotSelected)
        );
        let mut r = rules("[[rules.rule]]\nkind = \"wheel_return\"\naction = \"drop\"\n");
        assert_eq!(r.decide(&wheel), Decision::Drop(DropReason::Rule));
        let run = ev(
            "salt/run/3/ret",
            &[("jid", "3"), ("fun", "runner.test.arg")],
        );
        assert_eq!(r.decide(&run), keep("default"));
    }

    #[test]
    fn second_return_for_same_jid_and_minion_is_dropped() {
        let mut r = rules("");
        assert_eq!(r.decide(&ret("1", "m1", "test.ping")), keep("default"));
        assert_eq!(r.decide(&ret("1", "m2", "test.ping")), keep("default"));
        assert_eq!(
            r.decide(&ret("1", "m1", "test.ping")),
            Decision::Drop(DropReason::DuplicateReturn)
        );
        assert_eq!(r.decide(&ret("2", "m1", "test.ping")), keep("default"));
    }

    #[test]
    fn dedupe_window_forgets_oldest() {
        let mut r = rules("[rules]\ndedupe_window = 2\n");
        for j in ["1", "2", "3"] {
            assert_eq!(r.decide(&ret(j, "m", "f")), keep("default"));
        }
        assert_eq!(
            r.decide(&ret("3", "m", "f")),
            Decision::Drop(DropReason::DuplicateReturn)
        );
        assert_eq!(r.decide(&ret("1", "m", "f")), keep("default"));
    }

    #[test]
    fn a_forgotten_return_is_kept_again_and_its_stale_slot_evicts_nothing() {
        let mut r = rules("[rules]\ndedupe_window = 3\n");
        assert_eq!(r.decide(&ret("1", "m", "f")), keep("default"));
        r.forget(&ret("1", "m", "f"));
        // The retransmit of a forgotten return is kept, and remembered.
        assert_eq!(r.decide(&ret("1", "m", "f")), keep("default"));
        assert_eq!(
            r.decide(&ret("1", "m", "f")),
            Decision::Drop(DropReason::DuplicateReturn)
        );
        // Pushing the forgotten slot out of the window must not forget the
        // pair's later insertion: slots (1, stale), (1), 2, 3 -> the stale one goes.
        assert_eq!(r.decide(&ret("2", "m", "f")), keep("default"));
        assert_eq!(r.decide(&ret("3", "m", "f")), keep("default"));
        assert_eq!(
            r.decide(&ret("1", "m", "f")),
            Decision::Drop(DropReason::DuplicateReturn)
        );
        // Forgetting what is not a return, or not remembered, changes nothing.
        r.forget(&ev("salt/job/9/new", &[("jid", "9")]));
        r.forget(&ret("7", "m", "f"));
        assert_eq!(
            r.decide(&ret("2", "m", "f")),
            Decision::Drop(DropReason::DuplicateReturn)
        );
    }

    #[test]
    fn original_profile_is_one_line() {
        let mut r = rules("rules.funs = [\"cmd.run\"]\n");
        assert_eq!(r.decide(&ret("1", "m", "cmd.run")), keep("default"));
        assert_eq!(
            r.decide(&ret("1", "m", "test.ping")),
            Decision::Drop(DropReason::NotSelected)
        );
        assert_eq!(
            r.decide(&ev("salt/job/1/new", &[("fun", "cmd.run")])),
            keep("default")
        );
    }

    #[test]
    fn rules_route_and_drop_first_match_wins() {
        let mut r = rules(
            r#"
            [[rules.rule]]
            action = "drop"
            fun = "test.*"
            minion = ["web?", "db[0-9]"]
            [[rules.rule]]
            queue = "state"
            fun = ["state.*"]
            [[rules.rule]]
            queue = "failures"
            kind = "job_return"
            success = false
            [[rules.rule]]
            queue = "failures"
            retcode = [3, 4]
            "#,
        );
        assert_eq!(
            r.decide(&ret("1", "web1", "test.ping")),
            Decision::Drop(DropReason::Rule)
        );
        assert_eq!(
            r.decide(&ret("1", "db7", "test.echo")),
            Decision::Drop(DropReason::Rule)
        );
        assert_eq!(r.decide(&ret("1", "web10", "test.ping")), keep("default"));
        assert_eq!(r.decide(&ret("2", "m", "state.apply")), keep("state"));
        let failed = ev(
            "salt/job/3/ret/m",
            &[("id", "m"), ("jid", "3"), ("fun", "cmd.run")],
        );
        assert_eq!(
            r.decide(&failed),
            keep("default"),
            "success unknown is not false"
        );
    }

    #[test]
    fn rules_route_by_the_real_outcome() {
        let mut r = rules(
            r#"
            [[rules.rule]]
            queue = "failures"
            outcome = "failed"
            [[rules.rule]]
            queue = "changes"
            outcome = ["changed"]
            "#,
        );
        let state_ret = |jid: &str, result: bool, changes: bool| {
            let mut states = Vec::new();
            let _ = rmp::encode::write_map_len(&mut states, 1);
            let _ = rmp::encode::write_str(&mut states, "file_|-f_|-/tmp/f_|-managed");
            let _ = rmp::encode::write_map_len(&mut states, 2);
            let _ = rmp::encode::write_str(&mut states, "result");
            let _ = rmp::encode::write_bool(&mut states, result);
            let _ = rmp::encode::write_str(&mut states, "changes");
            let _ = rmp::encode::write_map_len(&mut states, u32::from(changes));
            if changes {
                let _ = rmp::encode::write_str(&mut states, "diff");
                let _ = rmp::encode::write_str(&mut states, "new");
            }
            let mut data = Vec::new();
            let _ = rmp::encode::write_map_len(&mut data, 6);
            for (k, v) in [("id", "m"), ("jid", jid), ("fun", "state.apply")] {
                let _ = rmp::encode::write_str(&mut data, k);
                let _ = rmp::encode::write_str(&mut data, v);
            }
            let _ = rmp::encode::write_str(&mut data, "success");
            let _ = rmp::encode::write_bool(&mut data, true);
            let _ = rmp::encode::write_str(&mut data, "retcode");
            let _ = rmp::encode::write_uint(&mut data, 0);
            let _ = rmp::encode::write_str(&mut data, "return");
            data.extend(states);
            let f = Bytes::from(frame(&format!("salt/job/{jid}/ret/m"), &data));
            Event::from_frame(&f).expect("decode")
        };
        // Salt says success; a state failed.
        assert_eq!(r.decide(&state_ret("1", false, false)), keep("failures"));
        assert_eq!(r.decide(&state_ret("2", true, true)), keep("changes"));
        assert_eq!(r.decide(&state_ret("3", true, false)), keep("default"));
        // Not a return: no outcome, no match.
        assert_eq!(
            r.decide(&ev("salt/job/4/new", &[("fun", "state.apply")])),
            keep("default")
        );
        let cfg: crate::config::Config =
            toml::from_str("[[rules.rule]]\noutcome = \"no_return\"\nqueue = \"x\"\n")
                .expect("parses");
        assert!(cfg.rules.validate().is_ok(), "outcome alone is a condition");
        assert!(
            toml::from_str::<crate::config::Config>("[[rules.rule]]\noutcome = \"broken\"\n")
                .is_err()
        );
    }

    #[test]
    fn invalid_rules_are_refused() {
        for bad in [
            "[[rules.rule]]\naction = \"keep\"\n",
            "[[rules.rule]]\naction = \"drop\"\nqueue = \"x\"\nfun = \"a\"\n",
            "[[rules.rule]]\nqueue = \"bad name\"\nfun = \"a\"\n",
            "[rules]\nkeep = \"all\"\nfuns = [\"cmd.run\"]\n",
        ] {
            let cfg: crate::config::Config = toml::from_str(bad).expect("parses");
            assert!(cfg.rules.validate().is_err(), "{bad}");
        }
        assert!(toml::from_str::<crate::config::Config>("[[rules.rule]]\nfun = \"[\"\n").is_err());
        assert!(
            toml::from_str::<crate::config::Config>("[[rules.rule]]\nkind = \"nope\"\n").is_err()
        );
    }

    #[test]
    fn fnmatch_semantics() {
        let g = Glob::new("salt/job/*/ret/*").expect("glob");
        assert!(g.matches("salt/job/1/ret/m1"));
        assert!(!g.matches("salt/job/1/new"));
        let g = Glob::new("{a,b}").expect("glob");
        assert!(g.matches("{a,b}"), "braces are literal, as in fnmatch");
    }
}
