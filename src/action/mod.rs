//! Actions: "do anything before the insert", such as send a mail or page
//! someone, for the events an operator cares about.
//!
//! Why the shape: an action talks to something slow and fallible (an HTTP
//! endpoint, an SMTP relay, a script), while the worker's job is to get
//! events into the database. So the worker only *offers* each batch's
//! matching events to a bounded queue per action ([`ActionSet::offer`],
//! never waiting); if that queue is full (`queue_size` events or
//! `queue_bytes` bytes) the action is dropped, counted and logged, and the
//! write goes on. A queued event is held as its raw bytes (its own copy, not
//! a slice of the batch), and its template context, a JSON tree ~15x the
//! wire size, is built only to render and send, one attempt at a time: 100
//! failing 1.5 MB returns once held 1.7 GB as contexts. Each action has its
//! own dispatcher task that applies, in order:
//!
//! 1. de-duplication: the same rendered `dedupe_key` within `dedupe_window`
//!    is sent once (a flapping state run pages once, not every minute). The
//!    key is unambiguous (each interpolated value carries its length, so
//!    `{{ fun }}/{{ minion }}` cannot confuse `a/b`+`c` with `a`+`b/c`), and
//!    only a successful send marks it: a send that failed for good frees the
//!    key for the next event;
//! 2. the rate limit: at most `rate_limit` sends per `rate_window` (an event
//!    storm must not send ten thousand mails);
//! 3. the send itself, under `timeout`, retried `retries` times with
//!    jittered exponential backoff.
//!
//! Events of one minion are sent in the order they were read (one in flight
//! per minion); different minions proceed in parallel up to `concurrency`.
//!
//! At shutdown the dispatchers get the drain time (`worker.drain_timeout`)
//! to send what they hold; what is left then is given up, counted per action
//! as `given_up` (in /metrics and the replay and stop summaries), never
//! dropped silently.
//!
//! Delivery is at most once per offer: an action offered before a crash
//! that redelivers the batch may be offered again after the restart (the
//! dedupe window does not survive a restart). Reloading the config (SIGHUP)
//! keeps each surviving action's dedupe and rate state, so a reload does
//! not re-send.

use crate::config::{ConfigError, human};
use crate::event::Event;
use crate::rules::MatcherConfig;
use crate::stats::{ActionCounters, Stats};
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "action-email")]
pub mod email;
#[cfg(feature = "action-exec")]
pub mod exec;
#[cfg(feature = "action-webhook")]
pub mod webhook;

/// One `[[actions]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// A unique name, used in logs and as the metrics label.
    pub name: String,
    /// Which events trigger it: the same conditions as `[[rules.rule]]`
    /// (tag, fun, minion, kind, success, retcode, outcome). Only kept
    /// events are offered: a rule that drops an event also silences its
    /// actions. `outcome = "no_return"` matches the worker's sweep: one
    /// `saltpipe/no_return/<jid>/<minion>` event per silent minion.
    #[serde(default)]
    pub when: MatcherConfig,
    /// Template of what is sent (the webhook's JSON body, the mail's text,
    /// the command's stdin). Default: the whole event as JSON.
    #[serde(default)]
    pub body: Option<String>,
    /// An HTTP POST.
    #[cfg(feature = "action-webhook")]
    #[serde(default)]
    pub webhook: Option<webhook::WebhookConfig>,
    #[cfg(not(feature = "action-webhook"))]
    #[serde(default)]
    pub webhook: Option<toml::Value>,
    /// A mail over SMTP.
    #[cfg(feature = "action-email")]
    #[serde(default)]
    pub email: Option<email::EmailConfig>,
    #[cfg(not(feature = "action-email"))]
    #[serde(default)]
    pub email: Option<toml::Value>,
    /// A command, the event as JSON on its stdin.
    #[cfg(feature = "action-exec")]
    #[serde(default)]
    pub exec: Option<exec::ExecConfig>,
    #[cfg(not(feature = "action-exec"))]
    #[serde(default)]
    pub exec: Option<toml::Value>,
    /// Limit for one attempt.
    #[serde(default = "defaults::timeout", deserialize_with = "human::duration")]
    pub timeout: Duration,
    /// Attempts after the first one fails.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// First wait before a retry; doubles up to `retry_max`.
    #[serde(default = "defaults::retry_min", deserialize_with = "human::duration")]
    pub retry_min: Duration,
    #[serde(default = "defaults::retry_max", deserialize_with = "human::duration")]
    pub retry_max: Duration,
    /// At most this many sends per `rate_window`; 0 means no limit.
    #[serde(default = "defaults::rate_limit")]
    pub rate_limit: u32,
    #[serde(
        default = "defaults::rate_window",
        deserialize_with = "human::duration"
    )]
    pub rate_window: Duration,
    /// Template of the de-duplication key, e.g. `"{{ fun }}/{{ minion }}"`;
    /// none: every event is sent.
    #[serde(default)]
    pub dedupe_key: Option<String>,
    #[serde(
        default = "defaults::dedupe_window",
        deserialize_with = "human::duration"
    )]
    pub dedupe_window: Duration,
    /// Events waiting for this action; past it, new ones are dropped (counted).
    #[serde(default = "defaults::queue_size")]
    pub queue_size: usize,
    /// Bytes (of the events as read) waiting or being sent for this action;
    /// past it, new ones are dropped (counted as `dropped`). Bounds the
    /// memory of a failing action whatever its events weigh.
    #[serde(default = "defaults::queue_bytes", deserialize_with = "human::size")]
    pub queue_bytes: u64,
    /// Sends in flight at once (one per minion at most, to keep its order).
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
}

mod defaults {
    use std::time::Duration;
    pub fn timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn retries() -> u32 {
        3
    }
    pub fn retry_min() -> Duration {
        Duration::from_secs(1)
    }
    pub fn retry_max() -> Duration {
        Duration::from_secs(60)
    }
    pub fn rate_limit() -> u32 {
        60
    }
    pub fn rate_window() -> Duration {
        Duration::from_secs(60)
    }
    pub fn dedupe_window() -> Duration {
        Duration::from_secs(300)
    }
    pub fn queue_size() -> usize {
        1000
    }
    pub fn queue_bytes() -> u64 {
        64 << 20
    }
    pub fn concurrency() -> usize {
        4
    }
}

/// The default body: the whole event.
pub const DEFAULT_BODY: &str = "{{ event | tojson }}";

/// Why an attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActionError {
    /// May pass on retry (a 5xx, a refused connection, a timeout).
    #[error("{0}")]
    Retriable(String),
    /// Will not pass on retry (a 4xx, a template error, no such command).
    #[error("{0}")]
    Permanent(String),
}

/// One kind of action: one attempt at sending one event.
#[async_trait]
pub trait Action: Send + Sync {
    async fn fire(&self, job: &Job) -> Result<(), ActionError>;
}

/// An event handed from a worker to a dispatcher: its own copy of the raw
/// bytes, shared by every action it matches, so the worker never pays for
/// the template context and a waiting event costs its wire size (the JSON
/// context is ~15x that, and is only built to render and send).
#[derive(Debug, Clone)]
struct Offer {
    key: String,
    event: Event,
}

/// An event offered to an action, with its template context.
#[derive(Debug, Clone)]
pub struct Job {
    /// Events with the same key are sent in order: the minion id, or the
    /// event's partition key.
    pub key: String,
    /// The template context: `tag`, `kind`, `jid`, `minion`, `fun`, `funs`,
    /// `success`, `retcode`, `data` (the full data map), `event` (all of these).
    pub context: Arc<serde_json::Value>,
}

/// An action's templates, compiled once (when the config is checked).
///
/// A JSON body (a webhook whose content type is JSON) is auto-escaped as
/// JSON: `{{ minion }}` renders as a JSON string, so a minion id or return
/// holding `", "admin": true, "x": "` stays one value and cannot add keys.
/// `| tojson` output is already JSON and is left as it is; a value wrongly
/// put inside quotes (`"{{ minion }}"`) renders invalid JSON, which the
/// webhook refuses to send.
#[derive(Debug)]
pub struct Templates {
    env: minijinja::Environment<'static>,
}

impl Templates {
    /// Compiles `(name, source)` pairs; the error names the template.
    pub fn new(sources: &[(&'static str, String)]) -> Result<Templates, String> {
        Templates::with_json_body(sources, false)
    }

    /// Like [`Templates::new`]; with `json_body`, the `body` template
    /// auto-escapes every value as JSON.
    pub fn with_json_body(
        sources: &[(&'static str, String)],
        json_body: bool,
    ) -> Result<Templates, String> {
        let mut env = minijinja::Environment::new();
        env.set_auto_escape_callback(move |name| {
            if json_body && name == "body" {
                minijinja::AutoEscape::Json
            } else {
                minijinja::AutoEscape::None
            }
        });
        for (name, src) in sources {
            env.add_template_owned(*name, src.clone())
                .map_err(|e| format!("{name} template: {e}"))?;
        }
        Ok(Templates { env })
    }

    /// Renders one template; a rendering error is permanent for this event.
    pub fn render(&self, name: &str, ctx: &serde_json::Value) -> Result<String, ActionError> {
        let t = self
            .env
            .get_template(name)
            .map_err(|e| ActionError::Permanent(format!("{name} template: {e}")))?;
        t.render(minijinja::Value::from_serialize(ctx))
            .map_err(|e| ActionError::Permanent(format!("{name} template: {e}")))
    }

    pub fn has(&self, name: &str) -> bool {
        self.env.get_template(name).is_ok()
    }
}

impl ActionConfig {
    /// Pure checks, templates included (compiling touches nothing outside).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let invalid = |m: String| ConfigError::invalid(key, m);
        let kinds = [
            self.webhook.is_some(),
            self.email.is_some(),
            self.exec.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(invalid(
                "give exactly one of `webhook`, `email` or `exec`".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout must be above zero".into()));
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(invalid(
                "retry_min must be above zero and not above retry_max".into(),
            ));
        }
        if self.rate_limit > 0 && self.rate_window.is_zero() {
            return Err(invalid("rate_window must be above zero".into()));
        }
        if self.queue_size == 0 || self.concurrency == 0 {
            return Err(invalid(
                "queue_size and concurrency must be at least 1".into(),
            ));
        }
        if self.queue_bytes < 1024 {
            return Err(invalid("queue_bytes must be at least 1KiB".into()));
        }
        self.templates().map_err(invalid)?;
        #[cfg(feature = "action-webhook")]
        if let Some(w) = &self.webhook {
            w.validate().map_err(invalid)?;
        }
        #[cfg(not(feature = "action-webhook"))]
        if self.webhook.is_some() {
            return Err(invalid(
                "this build has no webhook actions (cargo feature action-webhook)".into(),
            ));
        }
        #[cfg(feature = "action-email")]
        if let Some(e) = &self.email {
            e.validate().map_err(invalid)?;
        }
        #[cfg(not(feature = "action-email"))]
        if self.email.is_some() {
            return Err(invalid(
                "this build has no email actions (cargo feature action-email)".into(),
            ));
        }
        #[cfg(feature = "action-exec")]
        if let Some(x) = &self.exec {
            x.validate().map_err(invalid)?;
        }
        #[cfg(not(feature = "action-exec"))]
        if self.exec.is_some() {
            return Err(invalid(
                "this build has no exec actions (cargo feature action-exec)".into(),
            ));
        }
        Ok(())
    }

    fn templates(&self) -> Result<Templates, String> {
        let mut t = vec![(
            "body",
            self.body.clone().unwrap_or_else(|| DEFAULT_BODY.into()),
        )];
        if let Some(k) = &self.dedupe_key {
            t.push(("dedupe_key", k.clone()));
        }
        #[cfg(feature = "action-email")]
        if let Some(e) = &self.email {
            t.push(("subject", e.subject.clone()));
        }
        #[cfg(feature = "action-webhook")]
        let json_body = self.webhook.as_ref().is_some_and(|w| w.is_json());
        #[cfg(not(feature = "action-webhook"))]
        let json_body = false;
        Templates::with_json_body(&t, json_body)
    }

    /// Builds the sender (no I/O: clients connect on first use).
    fn build_action(&self, templates: Arc<Templates>) -> Result<Arc<dyn Action>, ActionError> {
        #[cfg(feature = "action-webhook")]
        if let Some(w) = &self.webhook {
            return Ok(Arc::new(webhook::Webhook::new(w, self.timeout, templates)?));
        }
        #[cfg(feature = "action-email")]
        if let Some(e) = &self.email {
            return Ok(Arc::new(email::Email::new(e, self.timeout, templates)?));
        }
        #[cfg(feature = "action-exec")]
        if let Some(x) = &self.exec {
            return Ok(Arc::new(exec::Exec::new(x, templates)));
        }
        let _ = templates;
        Err(ActionError::Permanent(format!(
            "action {}: no kind this build supports",
            self.name
        )))
    }
}

/// Checks the `[[actions]]` list.
pub fn validate_all(actions: &[ActionConfig]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for (i, a) in actions.iter().enumerate() {
        let key = format!("actions[{i}] ({})", a.name);
        if a.name.is_empty() {
            return Err(ConfigError::invalid(
                format!("actions[{i}]"),
                "needs a name",
            ));
        }
        if !names.insert(a.name.as_str()) {
            return Err(ConfigError::invalid(key, "another action has this name"));
        }
        a.validate(&key)?;
    }
    Ok(())
}

/// The most JSON of an event's data put into a template context: a larger
/// event, or one nested deeper than serde_json reads (128 levels; the
/// transcode allows 256), gets `data: null` (its fields are still there).
const CONTEXT_MAX_JSON: usize = 16 << 20;

/// The template context of one event.
pub fn context(e: &Event) -> serde_json::Value {
    let data = crate::msgpack::to_json(e.data(), CONTEXT_MAX_JSON)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let f = &e.fields;
    let fields = serde_json::json!({
        "tag": e.tag(),
        "kind": e.kind.as_str(),
        "jid": f.jid,
        "minion": f.minion,
        "fun": f.fun.join(","),
        "funs": f.fun,
        "success": f.success,
        "retcode": f.retcode,
        "outcome": crate::outcome::of_event(e).map(|o| o.as_str()),
        "data": data,
    });
    let mut top = fields.clone();
    if let serde_json::Value::Object(m) = &mut top {
        m.insert("event".into(), fields);
    }
    top
}

/// How a new event fared against the dedupe window and the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Send,
    Duplicate,
    RateLimited,
}

/// Dedupe window and rate limit of one action. Kept across reloads.
///
/// A key is *reserved* while its event waits or is being sent (a second
/// event with the key meanwhile is a duplicate) and only *marked* as sent
/// for `dedupe_window` once a send succeeded: a send that failed for good
/// releases the key, so the next event with it goes out instead of being
/// suppressed for the whole window behind a page nobody received.
#[derive(Debug)]
pub struct Limiter {
    rate_limit: u32,
    rate_window: Duration,
    dedupe_window: Duration,
    sent: VecDeque<Instant>,
    seen: HashMap<String, Instant>,
    seen_order: VecDeque<(Instant, String)>,
    reserved: HashSet<String>,
}

impl Limiter {
    pub fn new(rate_limit: u32, rate_window: Duration, dedupe_window: Duration) -> Limiter {
        Limiter {
            rate_limit,
            rate_window,
            dedupe_window,
            sent: VecDeque::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            reserved: HashSet::new(),
        }
    }

    /// Takes the new settings, keeping what was seen and sent.
    fn reconfigure(&mut self, rate_limit: u32, rate_window: Duration, dedupe_window: Duration) {
        self.rate_limit = rate_limit;
        self.rate_window = rate_window;
        self.dedupe_window = dedupe_window;
    }

    /// Decides for one event; `key` is its dedupe key, if any. A duplicate
    /// does not use up the rate; a rate-limited event reserves nothing (so
    /// the next one after the window still goes). On [`Admit::Send`] the key
    /// is reserved until [`Limiter::settle`].
    pub fn admit(&mut self, key: Option<&str>, now: Instant) -> Admit {
        while let Some((t, _)) = self.seen_order.front() {
            if now.duration_since(*t) < self.dedupe_window {
                break;
            }
            if let Some((t, k)) = self.seen_order.pop_front()
                && self.seen.get(&k) == Some(&t)
            {
                self.seen.remove(&k);
            }
        }
        if let Some(k) = key
            && (self.seen.contains_key(k) || self.reserved.contains(k))
        {
            return Admit::Duplicate;
        }
        if self.rate_limit > 0 {
            while self
                .sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.rate_window)
            {
                self.sent.pop_front();
            }
            if self.sent.len() >= self.rate_limit as usize {
                return Admit::RateLimited;
            }
            self.sent.push_back(now);
        }
        if let Some(k) = key {
            self.reserved.insert(k.to_owned());
        }
        Admit::Send
    }

    /// The end of an admitted event: `sent` marks its key for the window,
    /// otherwise the key is free again.
    pub fn settle(&mut self, key: Option<&str>, sent: bool, now: Instant) {
        let Some(k) = key else {
            return;
        };
        self.reserved.remove(k);
        if sent {
            self.seen.insert(k.to_owned(), now);
            self.seen_order.push_back((now, k.to_owned()));
        }
    }
}

/// The `dedupe_key` template, rendered so that different events cannot
/// share a key by accident: every interpolated value is written with its
/// length in front (`{{ fun }}/{{ minion }}` with fun `a/b`, minion `c`
/// renders `3:a/b/1:c`; with fun `a`, minion `b/c` it renders `1:a/3:b/c`),
/// and the result is kept as a SHA-256 digest, so a key built from big
/// values costs the window 64 bytes. minijinja's formatter hook does the
/// escaping; a separate environment keeps it away from the body templates.
struct DedupeKey {
    env: minijinja::Environment<'static>,
}

impl DedupeKey {
    fn new(source: &str) -> Result<DedupeKey, String> {
        let mut env = minijinja::Environment::new();
        env.set_formatter(|out, _state, value| {
            let s = if value.is_undefined() {
                String::new()
            } else {
                value.to_string()
            };
            write!(out, "{}:{s}", s.len()).map_err(|e| {
                minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string())
            })
        });
        env.add_template_owned("dedupe_key", source.to_owned())
            .map_err(|e| format!("dedupe_key template: {e}"))?;
        Ok(DedupeKey { env })
    }

    fn render(&self, ctx: &serde_json::Value) -> Result<String, String> {
        use sha2::Digest;
        let text = self
            .env
            .get_template("dedupe_key")
            .and_then(|t| t.render(minijinja::Value::from_serialize(ctx)))
            .map_err(|e| format!("dedupe_key template: {e}"))?;
        let digest = sha2::Sha256::digest(text.as_bytes());
        Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// What the dispatcher needs besides the queue.
struct Dispatcher {
    name: String,
    action: Arc<dyn Action>,
    dedupe: Option<DedupeKey>,
    limiter: Arc<Mutex<Limiter>>,
    counters: Arc<ActionCounters>,
    /// Bytes of the events this action holds, offered and not yet done.
    held: Arc<AtomicUsize>,
    /// Fired when the shutdown budget is spent: what is left is given up.
    give_up: CancellationToken,
    timeout: Duration,
    retries: u32,
    retry_min: Duration,
    retry_max: Duration,
    queue_size: usize,
    concurrency: usize,
}

/// One running action as the workers see it.
struct Running {
    name: String,
    when: MatcherConfig,
    tx: mpsc::Sender<Offer>,
    counters: Arc<ActionCounters>,
    limiter: Arc<Mutex<Limiter>>,
    held: Arc<AtomicUsize>,
    queue_bytes: usize,
}

impl Running {
    /// Counts (and logs, at powers of two) an event this action refused.
    fn refuse(&self, e: &Event, why: &str) {
        let n = self.counters.dropped.fetch_add(1, Relaxed) + 1;
        // Loud once, then at powers of two: a storm must not flood the log.
        if n.is_power_of_two() {
            tracing::warn!(action = %self.name, tag = e.tag(), dropped_total = n, queue_bytes = self.queue_bytes, "action queue full ({why}); dropped this action, the event is still written");
        }
    }
}

/// The actions of one configuration, each with its dispatcher task.
#[derive(Default)]
pub struct ActionSet {
    running: Vec<Running>,
}

impl ActionSet {
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Hands each event to every action it matches, without waiting.
    /// An action takes an event only while it holds fewer than
    /// `queue_size` events and `queue_bytes` bytes.
    pub fn offer<'a>(&self, events: impl IntoIterator<Item = &'a Event>) {
        if self.running.is_empty() {
            return;
        }
        for e in events {
            let mut job: Option<Offer> = None;
            let size = e.body.len();
            for r in &self.running {
                if !r.when.matches(e) {
                    continue;
                }
                if r.held
                    .fetch_update(AcqRel, Acquire, |h| {
                        h.checked_add(size).filter(|n| *n <= r.queue_bytes)
                    })
                    .is_err()
                {
                    r.refuse(e, "queue_bytes");
                    continue;
                }
                let j = job
                    .get_or_insert_with(|| {
                        // A copy of just this event: a slice of the batch's
                        // buffer would keep the whole container alive.
                        let mut event = e.clone();
                        event.body = bytes::Bytes::copy_from_slice(&e.body);
                        Offer {
                            key: e.fields.minion.clone().unwrap_or_else(|| e.partition_key()),
                            event,
                        }
                    })
                    .clone();
                if r.tx.try_send(j).is_err() {
                    r.held.fetch_sub(size, AcqRel);
                    r.refuse(e, "queue_size, or stopped");
                }
            }
        }
    }
}

/// The live actions, replaceable on reload. Cheap to clone.
#[derive(Clone, Default)]
pub struct Actions {
    current: Arc<RwLock<Arc<ActionSet>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    give_up: CancellationToken,
}

impl Actions {
    /// Starts the dispatchers for `cfgs` (needs a tokio runtime).
    pub fn start(cfgs: &[ActionConfig], stats: &Arc<Stats>) -> Result<Actions, ActionError> {
        let a = Actions::default();
        a.replace(cfgs, stats)?;
        Ok(a)
    }

    /// The set to offer a batch to.
    pub fn current(&self) -> Arc<ActionSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in new actions. Actions that keep their name keep their
    /// dedupe and rate state; the old dispatchers finish what they hold.
    pub fn replace(&self, cfgs: &[ActionConfig], stats: &Arc<Stats>) -> Result<(), ActionError> {
        let old = self.current();
        let mut running = Vec::with_capacity(cfgs.len());
        let mut handles = Vec::new();
        for c in cfgs {
            let templates = Arc::new(c.templates().map_err(ActionError::Permanent)?);
            let action = c.build_action(templates)?;
            let dedupe = c
                .dedupe_key
                .as_deref()
                .map(DedupeKey::new)
                .transpose()
                .map_err(ActionError::Permanent)?;
            let limiter = match old.running.iter().find(|r| r.name == c.name) {
                Some(r) => {
                    r.limiter
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .reconfigure(c.rate_limit, c.rate_window, c.dedupe_window);
                    r.limiter.clone()
                }
                None => Arc::new(Mutex::new(Limiter::new(
                    c.rate_limit,
                    c.rate_window,
                    c.dedupe_window,
                ))),
            };
            let counters = stats.action(&c.name);
            let held = Arc::new(AtomicUsize::new(0));
            let (tx, rx) = mpsc::channel(c.queue_size);
            let d = Dispatcher {
                name: c.name.clone(),
                action,
                dedupe,
                limiter: limiter.clone(),
                counters: counters.clone(),
                held: held.clone(),
                give_up: self.give_up.clone(),
                timeout: c.timeout,
                retries: c.retries,
                retry_min: c.retry_min,
                retry_max: c.retry_max,
                queue_size: c.queue_size,
                concurrency: c.concurrency,
            };
            handles.push(tokio::spawn(d.dispatch(rx)));
            running.push(Running {
                name: c.name.clone(),
                when: c.when.clone(),
                tx,
                counters,
                limiter,
                held,
                queue_bytes: usize::try_from(c.queue_bytes).unwrap_or(usize::MAX),
            });
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ActionSet { running });
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|h| !h.is_finished());
        tasks.extend(handles);
        Ok(())
    }

    /// Stops offering and lets the dispatchers send what they hold for at
    /// most `timeout`; then gives up the rest (aborting sends in flight),
    /// counted per action as `given_up`.
    pub async fn shutdown(&self, timeout: Duration) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ActionSet::default());
        let mut tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = Instant::now() + timeout;
        for t in tasks.iter_mut() {
            if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
                break;
            }
        }
        if tasks.iter().any(|t| !t.is_finished()) {
            tracing::warn!(
                drain_ms = timeout.as_millis() as u64,
                "actions still queued or in flight at the end of the drain time; giving them up (counted as given_up)"
            );
            self.give_up.cancel();
            for t in tasks.into_iter().filter(|t| !t.is_finished()) {
                let _ = t.await;
            }
        }
    }
}

/// Bytes (as read) of events being sent at once by one action, unless a
/// single one is larger. A send builds the event's template context (a JSON
/// tree, then minijinja's copy of it to render: ~20-30x the wire size for a
/// state return), so `concurrency` sends of 1.5 MB returns held ~120 MB of
/// trees; small events (a few KiB) never reach this limit.
const SENDING_BYTES: usize = 2 << 20;

/// What one queued send holds: the event (its raw bytes, not its template
/// context, which is built for each attempt and dropped after it) and the
/// dedupe key it reserved.
struct Pending {
    offer: Offer,
    dedupe: Option<String>,
}

impl Dispatcher {
    async fn dispatch(self, mut rx: mpsc::Receiver<Offer>) {
        let this = Arc::new(self);
        let mut waiting: HashMap<String, VecDeque<Pending>> = HashMap::new();
        let mut pending = 0usize;
        let mut busy: HashSet<String> = HashSet::new();
        let mut inflight: JoinSet<bool> = JoinSet::new();
        // What each send holds, found again even if the send panicked.
        let mut held_by: HashMap<tokio::task::Id, (String, Option<String>, usize)> = HashMap::new();
        let mut open = true;
        // Bytes (as read) of the events being sent: see SENDING_BYTES.
        let mut sending = 0usize;
        loop {
            // Start what may start: one per key, `concurrency` in all, and
            // past SENDING_BYTES only one.
            if inflight.len() < this.concurrency {
                let ready: Vec<String> = waiting
                    .keys()
                    .filter(|k| !busy.contains(*k))
                    .take(this.concurrency - inflight.len())
                    .cloned()
                    .collect();
                for key in ready {
                    let Some(q) = waiting.get_mut(&key) else {
                        continue;
                    };
                    let size = q.front().map_or(0, |p| p.offer.event.body.len());
                    if !inflight.is_empty() && sending + size > SENDING_BYTES {
                        break;
                    }
                    let Some(p) = q.pop_front() else {
                        continue;
                    };
                    if q.is_empty() {
                        waiting.remove(&key);
                    }
                    pending -= 1;
                    busy.insert(key.clone());
                    sending += size;
                    let t = this.clone();
                    let offer = p.offer;
                    let handle = inflight.spawn(async move { t.send(&offer).await });
                    held_by.insert(handle.id(), (key, p.dedupe, size));
                }
            }
            if !open && pending == 0 && inflight.is_empty() {
                return;
            }
            tokio::select! {
                _ = this.give_up.cancelled() => {
                    this.give_up_all(&mut rx, pending, inflight).await;
                    return;
                }
                r = rx.recv(), if open && pending < this.queue_size => match r {
                    Some(offer) => match this.admit(&offer) {
                        Some(dedupe) => {
                            pending += 1;
                            waiting.entry(offer.key.clone()).or_default().push_back(Pending { offer, dedupe });
                        }
                        None => {
                            this.held.fetch_sub(offer.event.body.len(), AcqRel);
                        }
                    },
                    None => open = false,
                },
                Some(done) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                    let (id, sent) = match done {
                        Ok((id, sent)) => (id, sent),
                        Err(e) => {
                            self_failed(&this, &e);
                            (e.id(), false)
                        }
                    };
                    if let Some((key, dedupe, size)) = held_by.remove(&id) {
                        busy.remove(&key);
                        sending -= size;
                        this.held.fetch_sub(size, AcqRel);
                        this.limiter
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .settle(dedupe.as_deref(), sent, Instant::now());
                    }
                }
                else => return,
            }
        }
    }

    /// The shutdown budget is spent: counts as `given_up` what is still
    /// queued (here and in the channel) and the sends in flight, which are
    /// aborted (a send that finished meanwhile counted itself).
    async fn give_up_all(
        &self,
        rx: &mut mpsc::Receiver<Offer>,
        pending: usize,
        mut inflight: JoinSet<bool>,
    ) {
        rx.close();
        let mut n = pending as u64;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        inflight.abort_all();
        while let Some(r) = inflight.join_next().await {
            match r {
                Ok(_) => {}
                Err(e) if e.is_cancelled() => n += 1,
                Err(e) => self_failed(self, &e),
            }
        }
        if n > 0 {
            self.counters.given_up.fetch_add(n, Relaxed);
            tracing::warn!(action = %self.name, given_up = n, "stopping: actions not sent within the drain time were given up");
        }
    }

    /// Dedupe and rate limit; counts what it turns away. `Some(key)`: send
    /// it, holding the dedupe key (if any) until the send ends.
    fn admit(&self, offer: &Offer) -> Option<Option<String>> {
        // The context only lives while the key is rendered.
        let key = self.dedupe.as_ref().and_then(|d| {
            match d.render(&context(&offer.event)) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::warn!(action = %self.name, error = %e, "cannot render the dedupe key; sending without de-duplication");
                    None
                }
            }
        });
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(key.as_deref(), Instant::now());
        match verdict {
            Admit::Send => Some(key),
            Admit::Duplicate => {
                self.counters.deduplicated.fetch_add(1, Relaxed);
                tracing::debug!(action = %self.name, key = ?key, "duplicate within the dedupe window; not sent");
                None
            }
            Admit::RateLimited => {
                let n = self.counters.rate_limited.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(action = %self.name, rate_limited_total = n, "action over its rate limit; not sent");
                }
                None
            }
        }
    }

    /// One event: attempts with backoff until sent or out of retries.
    /// True if it was sent. The template context is built for each attempt
    /// and dropped before the wait for the next one: a queue of failing
    /// sends holds raw events, not their (much larger) JSON trees.
    async fn send(&self, offer: &Offer) -> bool {
        let mut backoff = crate::backoff::Backoff::new(self.retry_min, self.retry_max);
        loop {
            let attempt = backoff.failures();
            let job = Job {
                key: offer.key.clone(),
                context: Arc::new(context(&offer.event)),
            };
            let result = match tokio::time::timeout(self.timeout, self.action.fire(&job)).await {
                Ok(r) => r,
                Err(_) => Err(ActionError::Retriable(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ))),
            };
            drop(job);
            match result {
                Ok(()) => {
                    self.counters.sent.fetch_add(1, Relaxed);
                    tracing::debug!(action = %self.name, key = %offer.key, "action sent");
                    return true;
                }
                Err(ActionError::Retriable(e)) if attempt < self.retries => {
                    self.counters.retried.fetch_add(1, Relaxed);
                    let delay = backoff.fail();
                    tracing::warn!(action = %self.name, key = %offer.key, error = %e, attempt = attempt + 1, delay_ms = delay.as_millis() as u64, "action failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    self.counters.failed.fetch_add(1, Relaxed);
                    tracing::error!(action = %self.name, key = %offer.key, error = %e, attempts = attempt + 1, "action failed; giving up (the event is still written)");
                    return false;
                }
            }
        }
    }
}

/// A send that panicked: counted as failed, its minion's next events go on.
fn self_failed(d: &Dispatcher, e: &tokio::task::JoinError) {
    d.counters.failed.fetch_add(1, Relaxed);
    tracing::error!(action = %d.name, error = %e, "an action send crashed; counted as failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_allows_n_per_window() {
        let mut l = Limiter::new(3, Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        let got: Vec<Admit> = (0..5).map(|_| l.admit(None, Instant::now())).collect();
        assert_eq!(
            got,
            [
                Admit::Send,
                Admit::Send,
                Admit::Send,
                Admit::RateLimited,
                Admit::RateLimited
            ]
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(l.admit(None, Instant::now()), Admit::RateLimited);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(Instant::now().duration_since(t0), Duration::from_secs(60));
        assert_eq!(l.admit(None, Instant::now()), Admit::Send);
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_sends_a_key_once_per_window() {
        let mut l = Limiter::new(0, Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        assert_eq!(
            l.admit(Some("a"), Instant::now()),
            Admit::Duplicate,
            "reserved while the first one is being sent"
        );
        l.settle(Some("a"), true, Instant::now());
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
        assert_eq!(l.admit(Some("b"), Instant::now()), Admit::Send);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_send_does_not_suppress_the_next_one() {
        let mut l = Limiter::new(0, Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        l.settle(Some("a"), false, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            l.admit(Some("a"), Instant::now()),
            Admit::Send,
            "nothing was delivered for `a`: the next event must go"
        );
        l.settle(Some("a"), true, Instant::now());
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
    }

    #[test]
    fn dedupe_keys_are_not_ambiguous() {
        let k = DedupeKey::new("{{ fun }}/{{ minion }}").expect("template");
        let key = |fun: &str, minion: &str| {
            k.render(&serde_json::json!({ "fun": fun, "minion": minion }))
                .expect("render")
        };
        assert_ne!(key("a/b", "c"), key("a", "b/c"));
        assert_ne!(key("a", "1:b"), key("a:1", "b"));
        assert_eq!(key("a", "b"), key("a", "b"));
        assert_eq!(key("a", "b").len(), 64, "a SHA-256 digest");
        // Missing values are empty, and still not confused with the separator.
        let k = DedupeKey::new("{{ nope }}/{{ fun }}").expect("template");
        let a = k
            .render(&serde_json::json!({ "fun": "/x" }))
            .expect("render");
        let k2 = DedupeKey::new("{{ nope }}/{{ fun }}").expect("template");
        let b = k2
            .render(&serde_json::json!({ "nope": "/", "fun": "x" }))
            .expect("render");
        assert_ne!(a, b);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_do_not_use_up_the_rate() {
        let mut l = Limiter::new(2, Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Send);
        l.settle(Some("a"), true, Instant::now());
        for _ in 0..10 {
            assert_eq!(l.admit(Some("a"), Instant::now()), Admit::Duplicate);
        }
        assert_eq!(l.admit(Some("b"), Instant::now()), Admit::Send);
        assert_eq!(l.admit(Some("c"), Instant::now()), Admit::RateLimited);
        // Rate-limited keys are not remembered: "c" goes once the window passes.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(l.admit(Some("c"), Instant::now()), Admit::Send);
    }

    /// Records each send; fails the first `fail` attempts of every event.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<String>>,
        fail_first: u32,
        attempts: Mutex<HashMap<String, u32>>,
        delay: Duration,
        /// Tags starting with this are refused for good.
        refuse: Option<&'static str>,
        /// Sends running now, and the most at once.
        running: AtomicUsize,
        most: AtomicUsize,
    }

    #[async_trait]
    impl Action for Recorder {
        async fn fire(&self, job: &Job) -> Result<(), ActionError> {
            let id = job.context["tag"].as_str().unwrap_or_default().to_owned();
            let n = {
                let mut a = self.attempts.lock().expect("lock");
                let n = a.entry(id.clone()).or_default();
                *n += 1;
                *n
            };
            let now = self.running.fetch_add(1, AcqRel) + 1;
            self.most.fetch_max(now, AcqRel);
            tokio::time::sleep(self.delay).await;
            self.running.fetch_sub(1, AcqRel);
            if self.refuse.is_some_and(|p| id.starts_with(p)) {
                return Err(ActionError::Permanent("refused".into()));
            }
            if n <= self.fail_first {
                return Err(ActionError::Retriable("not yet".into()));
            }
            self.sent.lock().expect("lock").push(id);
            Ok(())
        }
    }

    fn dispatcher(
        rec: Arc<Recorder>,
        retries: u32,
        concurrency: usize,
    ) -> (Dispatcher, Arc<ActionCounters>) {
        let counters = Arc::new(ActionCounters::default());
        (
            Dispatcher {
                name: "t".into(),
                action: rec,
                dedupe: None,
                held: Arc::new(AtomicUsize::new(0)),
                give_up: CancellationToken::new(),
                limiter: Arc::new(Mutex::new(Limiter::new(
                    0,
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                ))),
                counters: counters.clone(),
                timeout: Duration::from_secs(5),
                retries,
                retry_min: Duration::from_secs(1),
                retry_max: Duration::from_secs(10),
                queue_size: 100,
                concurrency,
            },
            counters,
        )
    }

    fn event(tag: &str) -> Event {
        let frame = crate::bus::encode::frame_bytes(tag, &[("fun", "f")]);
        Event::from_frame(&bytes::Bytes::from(frame)).expect("event")
    }

    fn job(key: &str, tag: &str) -> Offer {
        Offer {
            key: key.into(),
            event: event(tag),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_send_frees_its_dedupe_key_and_a_sent_one_holds_it() {
        let rec = Arc::new(Recorder {
            refuse: Some("refused"),
            ..Recorder::default()
        });
        let (mut d, counters) = dispatcher(rec.clone(), 0, 4);
        d.dedupe = Some(DedupeKey::new("{{ fun }}").expect("template"));
        let (tx, rx) = mpsc::channel(100);
        let task = tokio::spawn(d.dispatch(rx));
        // All five render the same key (fun "f"); each waits for the last to end.
        for (i, tag) in ["refused/1", "refused/2", "a", "b", "c"].iter().enumerate() {
            tx.send(job(&format!("m{i}"), tag)).await.expect("send");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        drop(tx);
        task.await.expect("dispatcher");
        assert_eq!(*rec.sent.lock().expect("lock"), ["a"]);
        assert_eq!(counters.failed.load(Relaxed), 2);
        assert_eq!(counters.sent.load(Relaxed), 1);
        assert_eq!(counters.deduplicated.load(Relaxed), 2, "b and c");
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_left_when_the_drain_time_ends_is_given_up_and_counted() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_secs(3),
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 0, 2);
        let give_up = d.give_up.clone();
        let held = d.held.clone();
        let (tx, rx) = mpsc::channel(100);
        for i in 0..10 {
            let o = job(&format!("m{i}"), &format!("t{i}"));
            held.fetch_add(o.event.body.len(), AcqRel);
            tx.send(o).await.expect("send");
        }
        drop(tx);
        let task = tokio::spawn(d.dispatch(rx));
        // Two at a time, 3 s each: 4 sent by 7 s, 2 more in flight, 4 waiting.
        tokio::time::sleep(Duration::from_secs(7)).await;
        give_up.cancel();
        task.await.expect("dispatcher");
        assert_eq!(counters.sent.load(Relaxed), 4);
        assert_eq!(counters.given_up.load(Relaxed), 6);
        assert_eq!(rec.sent.lock().expect("lock").len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn big_events_are_sent_one_at_a_time_small_ones_in_parallel() {
        for (size, most) in [(3 << 20, 1), (1 << 10, 4)] {
            let rec = Arc::new(Recorder {
                delay: Duration::from_secs(1),
                ..Recorder::default()
            });
            let (d, counters) = dispatcher(rec.clone(), 0, 4);
            let (tx, rx) = mpsc::channel(100);
            let task = tokio::spawn(d.dispatch(rx));
            let payload = "x".repeat(size);
            for i in 0..8 {
                let frame = crate::bus::encode::frame_bytes(&format!("t{i}"), &[("p", &payload)]);
                let event = Event::from_frame(&bytes::Bytes::from(frame)).expect("event");
                tx.send(Offer {
                    key: format!("m{i}"),
                    event,
                })
                .await
                .expect("send");
            }
            drop(tx);
            task.await.expect("dispatcher");
            assert_eq!(counters.sent.load(Relaxed), 8);
            assert_eq!(rec.most.load(Relaxed), most, "events of {size} bytes");
        }
    }

    #[test]
    fn an_action_holds_at_most_queue_bytes() {
        let (tx, mut rx) = mpsc::channel(100);
        let counters = Arc::new(ActionCounters::default());
        let held = Arc::new(AtomicUsize::new(0));
        let big = |i: usize| {
            let payload = "x".repeat(100_000);
            let frame = crate::bus::encode::frame_bytes(
                &format!("salt/job/{i}/ret/m"),
                &[("id", "m"), ("jid", "1"), ("return", &payload)],
            );
            Event::from_frame(&bytes::Bytes::from(frame)).expect("event")
        };
        let set = ActionSet {
            running: vec![Running {
                name: "t".into(),
                when: MatcherConfig::default(),
                tx,
                counters: counters.clone(),
                limiter: Arc::new(Mutex::new(Limiter::new(
                    0,
                    Duration::from_secs(1),
                    Duration::from_secs(1),
                ))),
                held: held.clone(),
                queue_bytes: 350_000,
            }],
        };
        let events: Vec<Event> = (0..5).map(big).collect();
        set.offer(&events);
        assert_eq!(counters.dropped.load(Relaxed), 2, "3 x 100 KB fit, not 4");
        let size = events[0].body.len();
        assert_eq!(held.load(Relaxed), 3 * size);
        let first = rx.try_recv().expect("queued");
        assert_eq!(first.event.body, events[0].body);
        // Its own copy: holding it does not hold the batch's buffer.
        assert_ne!(first.event.body.as_ptr(), events[0].body.as_ptr());
        // Room again once the dispatcher is done with one.
        held.fetch_sub(size, AcqRel);
        set.offer(&events[..1]);
        assert_eq!(counters.dropped.load(Relaxed), 2);
        assert_eq!(held.load(Relaxed), 3 * size);
    }

    #[tokio::test(start_paused = true)]
    async fn per_minion_order_is_kept_under_retries() {
        let rec = Arc::new(Recorder {
            fail_first: 1,
            delay: Duration::from_millis(10),
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 3, 4);
        let (tx, rx) = mpsc::channel(100);
        let task = tokio::spawn(d.dispatch(rx));
        for i in 0..5 {
            tx.send(job("m1", &format!("m1-{i}"))).await.expect("send");
            tx.send(job("m2", &format!("m2-{i}"))).await.expect("send");
        }
        drop(tx);
        task.await.expect("dispatcher");
        let sent = rec.sent.lock().expect("lock").clone();
        assert_eq!(sent.len(), 10);
        for m in ["m1", "m2"] {
            let order: Vec<&String> = sent.iter().filter(|s| s.starts_with(m)).collect();
            let want: Vec<String> = (0..5).map(|i| format!("{m}-{i}")).collect();
            assert_eq!(order, want.iter().collect::<Vec<_>>(), "{m} order");
        }
        assert_eq!(counters.sent.load(Relaxed), 10);
        assert_eq!(counters.retried.load(Relaxed), 10);
        assert_eq!(counters.failed.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_retries_and_counts_it() {
        let rec = Arc::new(Recorder {
            fail_first: 100,
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 2, 1);
        let (tx, rx) = mpsc::channel(10);
        let task = tokio::spawn(d.dispatch(rx));
        tx.send(job("m", "x")).await.expect("send");
        drop(tx);
        task.await.expect("dispatcher");
        assert_eq!(rec.attempts.lock().expect("lock")["x"], 3);
        assert_eq!(counters.failed.load(Relaxed), 1);
        assert_eq!(counters.retried.load(Relaxed), 2);
        assert_eq!(counters.sent.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_action_times_out_and_is_retried() {
        let rec = Arc::new(Recorder {
            delay: Duration::from_secs(30),
            ..Recorder::default()
        });
        let (d, counters) = dispatcher(rec.clone(), 1, 1);
        let (tx, rx) = mpsc::channel(10);
        let task = tokio::spawn(d.dispatch(rx));
        tx.send(job("m", "x")).await.expect("send");
        drop(tx);
        task.await.expect("dispatcher");
        assert_eq!(rec.attempts.lock().expect("lock")["x"], 2);
        assert_eq!(counters.failed.load(Relaxed), 1);
        assert_eq!(counters.sent.load(Relaxed), 0);
    }

    #[test]
    fn config_checks() {
        let parse = |t: &str| crate::config::from_str_with_env(t, std::path::Path::new("t"), &[]);
        let err = parse("[[actions]]\nname = \"a\"\n").expect_err("no kind");
        assert!(err.to_string().contains("exactly one"), "{err}");
        let err = parse(
            "[[actions]]\nname = \"a\"\nbody = \"{{ fun \"\nexec = { command = [\"/bin/true\"] }\n",
        )
        .expect_err("bad template");
        assert!(err.to_string().contains("body template"), "{err}");
        let err = parse(
            "[[actions]]\nname = \"a\"\nexec = { command = [\"/bin/true\"] }\n[[actions]]\nname = \"a\"\nexec = { command = [\"/bin/true\"] }\n",
        )
        .expect_err("duplicate");
        assert!(err.to_string().contains("another action"), "{err}");
        parse("[[actions]]\nname = \"a\"\nwhen = { fun = \"state.*\", success = false }\ndedupe_key = \"{{ fun }}/{{ minion }}\"\nexec = { command = [\"/bin/true\"] }\n").expect("good");
    }
}
