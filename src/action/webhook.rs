//! `webhook`: an HTTP POST of a JSON body built from the action's template.
//! Chat, paging and phone-call services all take one, so this one kind
//! covers them.
//!
//! reqwest with rustls on ring (no OpenSSL, no aws-lc-rs: two crypto
//! providers in one binary make rustls panic). A 2xx is success; 408, 429
//! and 5xx, connection errors and timeouts are retried; any other status
//! means the request itself is wrong and retrying cannot help.

use super::{Action, ActionError, Job, Templates};
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// `webhook = { url = "...", headers = { ... } }` in an `[[actions]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL to POST to.
    pub url: String,
    /// Extra headers, e.g. `{ Authorization = "Bearer ..." }`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `Content-Type`; with the default `application/json` the rendered
    /// body must be valid JSON (checked before sending).
    #[serde(default = "json")]
    pub content_type: String,
}

fn json() -> String {
    "application/json".into()
}

impl WebhookConfig {
    pub fn validate(&self) -> Result<(), String> {
        let u = url::Url::parse(&self.url).map_err(|e| format!("webhook.url: {e}"))?;
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
    url: String,
    headers: reqwest::header::HeaderMap,
    content_type: String,
    templates: Arc<Templates>,
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
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("saltpipe/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ActionError::Permanent(format!("http client: {e}")))?;
        Ok(Webhook {
            client,
            url: cfg.url.clone(),
            headers,
            content_type: cfg.content_type.clone(),
            templates,
        })
    }
}

#[async_trait]
impl Action for Webhook {
    async fn fire(&self, job: &Job) -> Result<(), ActionError> {
        let body = self.templates.render("body", &job.context)?;
        if self.content_type == "application/json"
            && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&body)
        {
            return Err(ActionError::Permanent(format!(
                "the body template did not render valid JSON ({e}); use the tojson filter for values"
            )));
        }
        let resp = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, &self.content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| ActionError::Retriable(format!("POST {}: {}", self.url, chain(&e))))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
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
