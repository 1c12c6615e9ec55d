//! `webhook`: an HTTP POST of a JSON body built from the action's template.
//! Chat, paging and phone-call services all take one, so this one kind
//! covers them.
//!
//! reqwest with rustls on ring (no OpenSSL, no aws-lc-rs: two crypto
//! providers in one binary make rustls panic). A 2xx is success; 408, 429
//! and 5xx, connection errors and timeouts are retried; any other status
//! means the request itself is wrong and retrying cannot help.
//!
//! Redirects are not followed by default: a webhook URL and its headers
//! are credentials, and a redirect is the receiving side asking us to send
//! them somewhere else. `redirects = "same-host"` follows up to 5 redirects
//! that stay on the same scheme, host and port; custom headers therefore
//! never reach another host. The URL is a [`SecretUrl`]: Slack, Discord
//! and Teams put the secret in the path, so messages show only
//! `scheme://host/***`, and reqwest's own errors are stripped of the URL.

use super::{Action, ActionError, Job, Templates};
use crate::redact::SecretUrl;
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// `webhook = { url = "...", headers = { ... } }` in an `[[actions]]` table.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL to POST to (shown only as `scheme://host/***`).
    pub url: SecretUrl,
    /// Extra headers, e.g. `{ Authorization = "Bearer ..." }`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `Content-Type`; with the default `application/json` the rendered
    /// body must be valid JSON (checked before sending).
    #[serde(default = "json")]
    pub content_type: String,
    /// `none` (the default): a 3xx answer is a failure. `same-host`: follow
    /// up to 5 redirects that keep the scheme, host and port.
    #[serde(default)]
    pub redirects: Redirects,
}

/// Which redirects a webhook follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Redirects {
    #[default]
    None,
    SameHost,
}

impl Redirects {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Redirects::None => "none",
            Redirects::SameHost => "same-host",
        }
    }
}

/// Header values are credentials: only their names are shown.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("content_type", &self.content_type)
            .field("redirects", &self.redirects)
            .finish()
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

fn json() -> String {
    "application/json".into()
}

impl WebhookConfig {
    /// Whether the body is JSON (`application/json`, or any `+json` type):
    /// its template is then auto-escaped as JSON and checked before sending.
    pub fn is_json(&self) -> bool {
        is_json(&self.content_type)
    }

    pub fn validate(&self) -> Result<(), String> {
        let u = url::Url::parse(self.url.expose())
            .map_err(|e| format!("webhook.url `{}`: {e}", self.url))?;
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(format!("webhook.url: `{}` is not http(s)", self.url));
        }
        for (k, v) in &self.headers {
            reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("webhook.headers: `{k}` is not a header name"))?;
            reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| format!("webhook.headers.{k}: not a valid header value"))?;
        }
        Ok(())
    }
}

pub struct Webhook {
    client: reqwest::Client,
    url: SecretUrl,
    headers: reqwest::header::HeaderMap,
    content_type: String,
    redirects: Redirects,
    templates: Arc<Templates>,
}

/// Follows a redirect only to the same scheme, host and port, at most 5
/// times: the headers we send are never offered to another host.
fn same_host_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first();
        let same = first.is_some_and(|f| {
            let u = attempt.url();
            f.scheme() == u.scheme()
                && f.host_str() == u.host_str()
                && f.port_or_known_default() == u.port_or_known_default()
        });
        if !same || attempt.previous().len() > 5 {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

impl Webhook {
    pub fn new(
        cfg: &WebhookConfig,
        timeout: Duration,
        templates: Arc<Templates>,
    ) -> Result<Webhook, ActionError> {
        crate::tls::install_ring();
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| ActionError::Permanent(format!("header {k}: {e}")))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| ActionError::Permanent(format!("header {k}: {e}")))?;
            headers.insert(name, value);
        }
        let policy = match cfg.redirects {
            Redirects::None => reqwest::redirect::Policy::none(),
            Redirects::SameHost => same_host_redirects(),
        };
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(policy)
            .user_agent(concat!("saltpipe/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ActionError::Permanent(format!("http client: {e}")))?;
        Ok(Webhook {
            client,
            url: cfg.url.clone(),
            headers,
            content_type: cfg.content_type.clone(),
            redirects: cfg.redirects,
            templates,
        })
    }
}

#[async_trait]
impl Action for Webhook {
    async fn fire(&self, job: &Job) -> Result<(), ActionError> {
        let body = self.templates.render("body", &job.context)?;
        if is_json(&self.content_type)
            && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&body)
        {
            return Err(ActionError::Permanent(format!(
                "the body template did not render valid JSON ({e}); values are JSON already: write {{{{ minion }}}}, not \"{{{{ minion }}}}\""
            )));
        }
        let resp = self
            .client
            .post(self.url.expose())
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, &self.content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                ActionError::Retriable(format!("POST {}: {}", self.url, chain(&e.without_url())))
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            // Where it points may be a credential of its own: host only.
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(crate::redact::url)
                .unwrap_or_default();
            return Err(ActionError::Permanent(format!(
                "POST {}: HTTP {status} redirect to `{to}` not followed (webhook.redirects = \"{}\")",
                self.url,
                self.redirects.as_str()
            )));
        }
        let text: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        let msg = format!("POST {}: HTTP {status}: {text}", self.url);
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(ActionError::Retriable(msg))
        } else {
            Err(ActionError::Permanent(msg))
        }
    }
}

/// An error with its causes: reqwest's own message ("error sending
/// request") hides the useful part (connection refused, timed out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
