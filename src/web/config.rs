//! `[web]`: where the pages listen and who may read them.
//!
//! The pages show every minion id, function, argument and return the sink
//! holds: the same information as the database itself. So the listener is
//! loopback by default, and `validate()` refuses a non-loopback address
//! without access control. The secret (a bearer token, or a basic-auth
//! password) is never written inline in the config, which ends up in
//! backups, tickets and `validate` output: it is read from a file or an
//! environment variable, at `build()` time (I/O), never at `validate()`.

use crate::config::ConfigError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The default `[web] listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// `[web]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the pages from `saltpipe run` too (`saltpipe web` always does).
    pub enabled: bool,
    /// Where; loopback by default.
    pub listen: SocketAddr,
    /// Access control: `none`, `bearer` or `basic`.
    pub auth: AuthKind,
    /// `basic`: the user name.
    pub user: Option<String>,
    /// A file holding the token (`bearer`) or password (`basic`); a
    /// trailing newline is ignored.
    pub secret_file: Option<PathBuf>,
    /// An environment variable holding the token or password.
    pub secret_env: Option<String>,
    /// A minion whose latest job is older than this is shown as stale.
    #[serde(deserialize_with = "crate::config::human::duration")]
    pub stale_after: Duration,
    /// The longest one query of a page may run before it is cancelled.
    #[serde(deserialize_with = "crate::config::human::duration")]
    pub query_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    None,
    Bearer,
    Basic,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            auth: AuthKind::None,
            user: None,
            secret_file: None,
            secret_env: None,
            stale_after: Duration::from_secs(7 * 86_400),
            query_timeout: Duration::from_secs(5),
        }
    }
}

/// What a request must carry, read by [`WebConfig::access`].
#[derive(Clone)]
pub enum Access {
    Open,
    /// The whole expected `Authorization` header value.
    Header(String),
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Open => "Open",
            Access::Header(_) => "Header(***)",
        })
    }
}

impl WebConfig {
    /// Pure checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let has_secret = self.secret_file.is_some() || self.secret_env.is_some();
        match self.auth {
            AuthKind::None => {
                if !self.listen.ip().is_loopback() {
                    return Err(ConfigError::invalid(
                        "web.auth",
                        format!(
                            "{} is not a loopback address: the pages show every job and return; set auth = \"bearer\" or \"basic\" with secret_file or secret_env",
                            self.listen
                        ),
                    ));
                }
                if has_secret || self.user.is_some() {
                    return Err(ConfigError::invalid(
                        "web.auth",
                        "user/secret_file/secret_env are set but auth is \"none\"",
                    ));
                }
            }
            AuthKind::Bearer | AuthKind::Basic => {
                if self.secret_file.is_some() == self.secret_env.is_some() {
                    return Err(ConfigError::invalid(
                        "web.secret_file",
                        "set exactly one of secret_file and secret_env (the secret is never written in the config)",
                    ));
                }
                if self.auth == AuthKind::Basic
                    && self
                        .user
                        .as_deref()
                        .is_none_or(|u| u.is_empty() || u.contains(':'))
                {
                    return Err(ConfigError::invalid(
                        "web.user",
                        "basic auth needs a user name without ':'",
                    ));
                }
                if self.auth == AuthKind::Bearer && self.user.is_some() {
                    return Err(ConfigError::invalid(
                        "web.user",
                        "a user name is for auth = \"basic\"",
                    ));
                }
            }
        }
        if self.query_timeout.is_zero() || self.query_timeout > Duration::from_secs(300) {
            return Err(ConfigError::invalid(
                "web.query_timeout",
                "must be between 1ms and 5m",
            ));
        }
        if self.stale_after < Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "web.stale_after",
                "must be at least 1m",
            ));
        }
        Ok(())
    }

    /// Reads the secret (I/O) and gives what each request must carry.
    pub fn access(&self) -> Result<Access, String> {
        use base64::Engine as _;
        let secret = match (&self.secret_file, &self.secret_env) {
            (Some(f), _) => std::fs::read_to_string(f)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                .map_err(|e| format!("cannot read web.secret_file {}: {e}", f.display()))?,
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("web.secret_env: the variable {var} is not set"))?,
            (None, None) => return Ok(Access::Open),
        };
        if secret.is_empty() {
            return Err("web: the secret is empty".into());
        }
        Ok(Access::Header(match self.auth {
            AuthKind::None => return Ok(Access::Open),
            AuthKind::Bearer => format!("Bearer {secret}"),
            AuthKind::Basic => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{secret}",
                    self.user.as_deref().unwrap_or_default()
                ))
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> WebConfig {
        toml::from_str(text).expect("parse")
    }

    #[test]
    fn defaults_are_loopback_and_off() {
        let c = WebConfig::default();
        assert!(!c.enabled);
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        c.validate().expect("valid");
    }

    #[test]
    fn public_listen_needs_auth() {
        let c = parse("listen = \"0.0.0.0:8080\"");
        let e = c.validate().expect_err("refused").to_string();
        assert!(e.contains("web.auth"), "{e}");
        parse("listen = \"0.0.0.0:8080\"\nauth = \"bearer\"\nsecret_env = \"T\"")
            .validate()
            .expect("valid");
    }

    #[test]
    fn secret_from_exactly_one_place() {
        assert!(parse("auth = \"bearer\"").validate().is_err());
        assert!(
            parse("auth = \"bearer\"\nsecret_env = \"A\"\nsecret_file = \"/x\"")
                .validate()
                .is_err()
        );
        assert!(
            parse("auth = \"basic\"\nsecret_env = \"A\"")
                .validate()
                .is_err(),
            "basic needs a user"
        );
        // An inline secret is not even a key.
        assert!(toml::from_str::<WebConfig>("secret = \"x\"").is_err());
    }

    #[test]
    fn basic_header_from_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").expect("write");
        let c = WebConfig {
            auth: AuthKind::Basic,
            user: Some("ops".into()),
            secret_file: Some(f),
            ..WebConfig::default()
        };
        c.validate().expect("valid");
        match c.access().expect("read") {
            Access::Header(h) => assert_eq!(h, "Basic b3BzOnMzY3JldA=="),
            Access::Open => panic!("open"),
        }
        assert_eq!(format!("{:?}", c.access().expect("read")), "Header(***)");
    }
}
