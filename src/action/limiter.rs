//! An action's de-duplication window and rate limit, kept across reloads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

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
    pub(super) fn reconfigure(
        &mut self,
        rate_limit: u32,
        rate_window: Duration,
        dedupe_window: Duration,
    ) {
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
pub(super) struct DedupeKey {
    env: minijinja::Environment<'static>,
}

impl DedupeKey {
    pub(super) fn new(source: &str) -> Result<DedupeKey, String> {
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

    pub(super) fn render(&self, ctx: &serde_json::Value) -> Result<String, String> {
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
