//! `email`: a mail over SMTP, with STARTTLS or implicit TLS and
//! authentication.
//!
//! lettre on tokio with rustls on ring. The subject and the text are
//! templates. Transient SMTP replies (4xx) and connection errors are
//! retried; permanent ones (5xx: unknown recipient, auth refused) are not.
//!
//! Credentials never go over plain text to another machine: `validate`
//! refuses `tls = "none"` with a username unless the relay is on loopback.

use super::{Action, ActionError, Job, Templates};
use async_trait::async_trait;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `email = { host = "smtp.example.com", from = "...", to = ["..."] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub host: String,
    /// Default: 587 for `starttls`, 465 for `tls`, 25 for `none`.
    #[serde(default)]
    pub port: Option<u16>,
    /// `starttls` (the default), `tls` (implicit TLS), or `none` (only for
    /// a relay on loopback).
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub username: Option<String>,
    /// The password; better `password_file`, so it stays out of the config.
    #[serde(default)]
    pub password: Option<crate::sink::Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    pub from: String,
    pub to: Vec<String>,
    /// Subject template.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// A PEM CA certificate to trust besides the public roots (a relay with
    /// a private CA or a self-signed certificate).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_subject() -> String {
    "saltpipe: {{ tag }}".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Starttls,
    Tls,
    None,
}

impl EmailConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.host.is_empty() {
            return Err("email.host is empty".into());
        }
        self.from
            .parse::<Mailbox>()
            .map_err(|e| format!("email.from `{}`: {e}", self.from))?;
        if self.to.is_empty() {
            return Err("email.to needs at least one address".into());
        }
        for t in &self.to {
            t.parse::<Mailbox>()
                .map_err(|e| format!("email.to `{t}`: {e}"))?;
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err("email: give password or password_file, not both".into());
        }
        if self.ca_file.is_some() && self.tls == TlsMode::None {
            return Err("email.ca_file needs tls = \"starttls\" or \"tls\"".into());
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            return Err("email: a password needs a username".into());
        }
        if self.tls == TlsMode::None && self.username.is_some() && !is_loopback(&self.host) {
            return Err(format!(
                "email.tls = \"none\" with email.username would send the credentials in clear text to {}; use tls = \"starttls\" or \"tls\" (\"none\" is only for a relay on loopback)",
                self.host
            ));
        }
        Ok(())
    }
}

/// `localhost` or a loopback address: the only places plain SMTP with a
/// password may go (nothing on the wire to read).
fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    templates: Arc<Templates>,
}

fn perm(e: impl std::fmt::Display) -> ActionError {
    ActionError::Permanent(e.to_string())
}

impl Email {
    pub fn new(
        cfg: &EmailConfig,
        timeout: Duration,
        templates: Arc<Templates>,
    ) -> Result<Email, ActionError> {
        crate::tls::install_ring();
        let builder = match cfg.tls {
            TlsMode::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&cfg.host).map_err(perm)?
            }
            TlsMode::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&cfg.host).map_err(perm)?,
            TlsMode::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host),
        };
        let port = cfg.port.unwrap_or(match cfg.tls {
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
            TlsMode::None => 25,
        });
        let mut builder = builder.port(port).timeout(Some(timeout));
        if let Some(ca) = &cfg.ca_file {
            use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
            let pem = std::fs::read(ca)
                .map_err(|e| perm(format!("email.ca_file {}: {e}", ca.display())))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| perm(format!("email.ca_file {}: {e}", ca.display())))?;
            let params = TlsParameters::builder(cfg.host.clone())
                .add_root_certificate(cert)
                .build_rustls()
                .map_err(perm)?;
            builder = match cfg.tls {
                TlsMode::Starttls => builder.tls(Tls::Required(params)),
                TlsMode::Tls => builder.tls(Tls::Wrapper(params)),
                TlsMode::None => builder,
            };
        }
        if let Some(user) = &cfg.username {
            let password = match (&cfg.password, &cfg.password_file) {
                (Some(p), _) => p.0.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| perm(format!("email.password_file {}: {e}", f.display())))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
                (None, None) => String::new(),
            };
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Email {
            transport: builder.build(),
            from: cfg.from.parse().map_err(perm)?,
            to: cfg
                .to
                .iter()
                .map(|t| t.parse())
                .collect::<Result<_, _>>()
                .map_err(perm)?,
            templates,
        })
    }
}

#[async_trait]
impl Action for Email {
    async fn fire(&self, job: &Job) -> Result<(), ActionError> {
        let subject = self.templates.render("subject", &job.context)?;
        // Subjects are one line: a template that spills newlines would break the header.
        let subject = subject.replace(['\r', '\n'], " ");
        let text = self.templates.render("body", &job.context)?;
        let mut m = Message::builder().from(self.from.clone()).subject(subject);
        for t in &self.to {
            m = m.to(t.clone());
        }
        let message = m.body(text).map_err(perm)?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(ActionError::Permanent(format!("smtp: {e}"))),
            Err(e) => Err(ActionError::Retriable(format!("smtp: {e}"))),
        }
    }
}
