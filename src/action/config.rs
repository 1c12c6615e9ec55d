//! `[[actions]]`: what an action does (its [`ActionKind`]), when, and the
//! limits of its queue, retries, rate and de-duplication. `validate` is pure
//! (templates are compiled, nothing is contacted); building the sender does
//! no I/O either: clients connect on first use.
// A build with no action kind (the fuzz targets' `default-features = false`)
// has an empty `ActionKind`: its matches have no arms, and what follows them
// cannot run, which is right: no action can be configured there.
#![cfg_attr(
    not(any(
        feature = "action-webhook",
        feature = "action-email",
        feature = "action-exec"
    )),
    allow(unreachable_code, unused_mut, unused_variables)
)]

#[cfg(feature = "action-email")]
use super::email;
#[cfg(feature = "action-exec")]
use super::exec;
#[cfg(feature = "action-webhook")]
use super::webhook;
use super::{Action, ActionError, DEFAULT_BODY, Templates};
use crate::config::{ConfigError, human};
use crate::rules::MatcherConfig;
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// One `[[actions]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawActionConfig")]
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
    /// What it does: exactly one of `webhook`, `email` or `exec`.
    pub kind: ActionKind,
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

/// What an action does.
#[derive(Debug, Clone)]
pub enum ActionKind {
    /// An HTTP POST.
    #[cfg(feature = "action-webhook")]
    Webhook(webhook::WebhookConfig),
    /// A mail over SMTP.
    #[cfg(feature = "action-email")]
    Email(email::EmailConfig),
    /// A command, the event as JSON on its stdin.
    #[cfg(feature = "action-exec")]
    Exec(exec::ExecConfig),
}

impl TryFrom<RawActionConfig> for ActionConfig {
    type Error = String;

    fn try_from(r: RawActionConfig) -> Result<ActionConfig, String> {
        let given = [
            ("webhook", r.webhook.is_some()),
            ("email", r.email.is_some()),
            ("exec", r.exec.is_some()),
        ];
        if given.iter().filter(|(_, g)| *g).count() != 1 {
            return Err(format!(
                "action `{}`: give exactly one of `webhook`, `email` or `exec`",
                r.name
            ));
        }
        let missing = |k: &str| {
            format!(
                "action `{}`: this build has no {k} actions (cargo feature action-{k})",
                r.name
            )
        };
        #[allow(unused_mut)]
        let mut kind = None;
        #[cfg(feature = "action-webhook")]
        if let Some(w) = r.webhook {
            kind = Some(ActionKind::Webhook(w));
        }
        #[cfg(feature = "action-email")]
        if let Some(e) = r.email {
            kind = Some(ActionKind::Email(e));
        }
        #[cfg(feature = "action-exec")]
        if let Some(x) = r.exec {
            kind = Some(ActionKind::Exec(x));
        }
        let Some(kind) = kind else {
            let (k, _) = given.iter().find(|(_, g)| *g).unwrap_or(&("webhook", true));
            return Err(missing(k));
        };
        Ok(ActionConfig {
            name: r.name,
            when: r.when,
            body: r.body,
            kind,
            timeout: r.timeout,
            retries: r.retries,
            retry_min: r.retry_min,
            retry_max: r.retry_max,
            rate_limit: r.rate_limit,
            rate_window: r.rate_window,
            dedupe_key: r.dedupe_key,
            dedupe_window: r.dedupe_window,
            queue_size: r.queue_size,
            queue_bytes: r.queue_bytes,
            concurrency: r.concurrency,
        })
    }
}

/// `[[actions]]` as written: the kind is one of three keys. Only serde
/// sees this; it becomes an [`ActionConfig`] with an [`ActionKind`]. The
/// keys of kinds this build leaves out are still read, so the error can
/// name the missing cargo feature instead of "unknown field".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActionConfig {
    name: String,
    #[serde(default)]
    when: MatcherConfig,
    #[serde(default)]
    body: Option<String>,
    #[cfg(feature = "action-webhook")]
    #[serde(default)]
    webhook: Option<webhook::WebhookConfig>,
    #[cfg(not(feature = "action-webhook"))]
    #[serde(default)]
    webhook: Option<toml::Value>,
    #[cfg(feature = "action-email")]
    #[serde(default)]
    email: Option<email::EmailConfig>,
    #[cfg(not(feature = "action-email"))]
    #[serde(default)]
    email: Option<toml::Value>,
    #[cfg(feature = "action-exec")]
    #[serde(default)]
    exec: Option<exec::ExecConfig>,
    #[cfg(not(feature = "action-exec"))]
    #[serde(default)]
    exec: Option<toml::Value>,
    #[serde(default = "defaults::timeout", deserialize_with = "human::duration")]
    timeout: Duration,
    #[serde(default = "defaults::retries")]
    retries: u32,
    #[serde(default = "defaults::retry_min", deserialize_with = "human::duration")]
    retry_min: Duration,
    #[serde(default = "defaults::retry_max", deserialize_with = "human::duration")]
    retry_max: Duration,
    #[serde(default = "defaults::rate_limit")]
    rate_limit: u32,
    #[serde(
        default = "defaults::rate_window",
        deserialize_with = "human::duration"
    )]
    rate_window: Duration,
    #[serde(default)]
    dedupe_key: Option<String>,
    #[serde(
        default = "defaults::dedupe_window",
        deserialize_with = "human::duration"
    )]
    dedupe_window: Duration,
    #[serde(default = "defaults::queue_size")]
    queue_size: usize,
    #[serde(default = "defaults::queue_bytes", deserialize_with = "human::size")]
    queue_bytes: u64,
    #[serde(default = "defaults::concurrency")]
    concurrency: usize,
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

impl ActionConfig {
    /// Pure checks, templates included (compiling touches nothing outside).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let invalid = |m: String| ConfigError::invalid(key, m);
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
        match self.kind {
            #[cfg(feature = "action-webhook")]
            ActionKind::Webhook(ref w) => w.validate().map_err(invalid)?,
            #[cfg(feature = "action-email")]
            ActionKind::Email(ref e) => e.validate().map_err(invalid)?,
            #[cfg(feature = "action-exec")]
            ActionKind::Exec(ref x) => x.validate().map_err(invalid)?,
        }
        Ok(())
    }

    pub(super) fn templates(&self) -> Result<Templates, String> {
        let mut t = vec![(
            "body",
            self.body.clone().unwrap_or_else(|| DEFAULT_BODY.into()),
        )];
        if let Some(k) = &self.dedupe_key {
            t.push(("dedupe_key", k.clone()));
        }
        let mut json_body = false;
        match self.kind {
            #[cfg(feature = "action-webhook")]
            ActionKind::Webhook(ref w) => json_body = w.is_json(),
            #[cfg(feature = "action-email")]
            ActionKind::Email(ref e) => t.push(("subject", e.subject.clone())),
            #[cfg(feature = "action-exec")]
            ActionKind::Exec(_) => {}
        }
        Templates::with_json_body(&t, json_body)
    }

    /// Builds the sender (no I/O: clients connect on first use).
    pub(super) fn build_action(
        &self,
        templates: Arc<Templates>,
    ) -> Result<Arc<dyn Action>, ActionError> {
        Ok(match self.kind {
            #[cfg(feature = "action-webhook")]
            ActionKind::Webhook(ref w) => {
                Arc::new(webhook::Webhook::new(w, self.timeout, templates)?)
            }
            #[cfg(feature = "action-email")]
            ActionKind::Email(ref e) => Arc::new(email::Email::new(e, self.timeout, templates)?),
            #[cfg(feature = "action-exec")]
            ActionKind::Exec(ref x) => Arc::new(exec::Exec::new(x, templates)),
        })
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
