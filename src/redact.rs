//! Secrets kept out of every output: URLs shown without what they carry.
//!
//! Why one place: saltpipe is handed database and broker URLs that often
//! hold a password (in the user info, as `?password=`, or as a NATS token
//! `nats://TOKEN@host`), and webhook URLs whose path *is* the secret (Slack
//! `hooks.slack.com/services/T../B../XXXX`, Discord `/api/webhooks/<id>/<token>`,
//! Teams). Each of those reaches logs, `saltpipe validate`, error messages
//! and `top`. Every URL-carrying config type ([`SecretUrl`], the sink and
//! queue URL types) prints itself only through [`url`], so no code path can
//! show the raw text, whatever shape it has.
//!
//! Why by hand and lexical: the `url` crate (and sqlx's own parsers) refuse
//! exactly the URLs that leaked (`postgres://u:pw@db:99999/x`, a password
//! with an unescaped `/` or `#`), and a parser's idea of where the user info
//! ends is not the one a mistyped URL meant. So [`url`] reads the text
//! itself and, where it is ambiguous, shows less: when in doubt, only the
//! scheme. No crate does this (redaction crates wrap values in a type; they
//! do not take a string apart).
//!
//! The second half is about stored data: Salt's job loads and returns can
//! carry secrets of their own (an eauth `password` or `token` in a job's
//! `kwargs`, pillar passed on the command line as `pillar='{"db_password":
//! ...}'`). [`KeyRedactor`] replaces the value of every map key it names,
//! at any depth, by `"***"` in the event's msgpack before anything reads
//! it, so the stored `load`, `full_ret`, `salt_events.data`, the dead
//! letters and every action's payload get the same redacted text. It works
//! on the msgpack (through the walker's public [`Reader`]): an event
//! without such a key is left untouched and shared, not copied. The worker
//! does not walk every event for it, though: the JSON transcoder checks
//! each key it writes against the same [`KeyRedactor::matches`]
//! ([`msgpack::to_json_checked`]), and only an event it refuses is walked
//! here and redacted (on large returns, the separate walk was a fifth of
//! the worker's prepare stage).

use crate::msgpack::{self, Item, Reader, WalkError};
use std::borrow::Cow;

/// Query keys whose values are shown: settings, never credentials. Any
/// other key's value is shown as `***` (an allow list, so a secret under a
/// name we did not think of is hidden too).
const SAFE_QUERY_KEYS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "ssl-ca",
    "ssl-cert",
    "ssl-key",
    "tls",
    "insecure",
    "application_name",
    "connect_timeout",
    "connection_timeout",
    "statement-cache-capacity",
    "charset",
    "collation",
    "timezone",
    "socket",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "target_session_attrs",
    "heartbeat",
    "frame_max",
    "channel_max",
    "protocol",
    "db",
];

/// Schemes whose user info is `user[:password]`: the user name is shown.
/// For any other scheme the whole user info is hidden, as it may be a
/// token (`nats://TOKEN@host`).
const USER_SCHEMES: &[&str] = &["postgres", "postgresql", "mysql", "mariadb"];

/// Shown in place of a secret.
pub const MASK: &str = "***";

/// `s` as it may be shown: the password and token in the user info, the
/// value of every query key not in a short list of settings, the fragment,
/// and for `http(s)` the whole path and query (webhook URLs carry their
/// secret there) replaced by `***`. Text that is not a URL at all becomes
/// `***`; a URL whose parts cannot be told apart for sure (an `@` after
/// the host) becomes `scheme://***`.
pub fn url(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return MASK.to_owned();
    };
    let scheme_ok = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return MASK.to_owned();
    }
    let scheme = scheme.to_ascii_lowercase();
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    if tail.contains('@') {
        // An `@` past the host: a password holding `/`, `?` or `#`
        // unescaped, or something stranger. Nothing after the scheme is
        // known not to be part of it.
        return format!("{scheme}://{MASK}");
    }
    let mut out = format!("{scheme}://");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            if USER_SCHEMES.contains(&scheme.as_str()) {
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
            } else {
                // A broker's or webhook's user info may be a token alone,
                // itself holding a `:`: none of it is shown.
                out.push_str(MASK);
            }
            out.push('@');
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    if tail.is_empty() {
        return out;
    }
    if scheme == "http" || scheme == "https" {
        // Webhook URLs: the path and the query are the credential.
        if tail != "/" {
            out.push('/');
            out.push_str(MASK);
        } else {
            out.push('/');
        }
        return out;
    }
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((b, _)) => (b, true),
        None => (tail, false),
    };
    let (path, query) = match before_fragment.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (before_fragment, None),
    };
    out.push_str(path);
    if let Some(q) = query {
        out.push('?');
        let parts: Vec<Cow<'_, str>> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if SAFE_QUERY_KEYS.contains(&k.to_ascii_lowercase().as_str()) => {
                    Cow::Borrowed(kv)
                }
                Some((k, _)) if is_plain_key(k) => Cow::Owned(format!("{k}={MASK}")),
                _ if kv.is_empty() => Cow::Borrowed(""),
                _ => Cow::Borrowed(MASK),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    if fragment {
        out.push('#');
        out.push_str(MASK);
    }
    out
}

/// A query key worth showing: a name, not a stray piece of a value.
fn is_plain_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 64
        && k.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
}

/// The key names `[sink] redact` holds when it is not set: the credentials
/// Salt itself can carry in a job's load (`salt/client` pops `eauth`,
/// `username`, `password` and `token` into the publish; the master keeps
/// `kwargs` in the saved load) plus the usual names of secrets in pillar.
pub const DEFAULT_KEYS: &[&str] = &[
    "password",
    "passwd",
    "token",
    "secret",
    "private_key",
    "api_key",
    "apikey",
    "client_secret",
    "secret_key",
    "access_key",
];

/// msgpack of the string `***`, written in place of a redacted value.
pub const MASK_MSGPACK: &[u8] = &[0xa3, b'*', b'*', b'*'];

/// Replaces the values of chosen map keys, at any depth, by `"***"`.
///
/// A key matches a name when it equals it or ends with `_name` or `-name`,
/// ignoring case: `password` also hides `db_password` and `DB-Password`.
#[derive(Debug, Clone, Default)]
pub struct KeyRedactor {
    names: Vec<String>,
    /// The shortest name's length: no shorter key can match.
    shortest: usize,
    /// Which lowercase last two bytes a name ends with, one bit per pair
    /// (`[b'r', b'd']` for `password`), used when every name has two
    /// bytes or more: most keys are ruled out by one
    /// lookup instead of a comparison with every name. In a 1,000-state
    /// highstate nearly every key (`result`, `comment`, `duration`, ...)
    /// is, and the comparisons were a fifth of the worker's prepare stage.
    tails: Vec<u64>,
}

/// The bit of [`KeyRedactor::tails`] for a key or name ending in `a`, `b`.
fn tail_bit(a: u8, b: u8) -> (usize, u64) {
    let i = usize::from(a.to_ascii_lowercase()) << 8 | usize::from(b.to_ascii_lowercase());
    (i / 64, 1 << (i % 64))
}

impl KeyRedactor {
    pub fn new<S: AsRef<str>>(names: &[S]) -> KeyRedactor {
        let names: Vec<String> = names
            .iter()
            .map(|n| n.as_ref().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        let shortest = names.iter().map(String::len).min().unwrap_or(0);
        let mut tails = vec![0u64; 65_536 / 64];
        for n in names.iter().map(String::as_bytes).filter(|n| n.len() >= 2) {
            let (word, bit) = tail_bit(n[n.len() - 2], n[n.len() - 1]);
            tails[word] |= bit;
        }
        KeyRedactor {
            names,
            shortest,
            tails,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether the value under this map key is hidden. Compares bytes
    /// without allocating: it runs for every key of every event.
    pub fn matches(&self, key: &[u8]) -> bool {
        if key.len() < self.shortest.max(1) {
            return false;
        }
        // Every name has two bytes or more (a one-letter name leaves the
        // table out), and so, by the check above, has the key.
        if self.shortest >= 2 {
            let (word, bit) = tail_bit(key[key.len() - 2], key[key.len() - 1]);
            if self.tails.get(word).is_none_or(|w| w & bit == 0) {
                return false;
            }
        }
        self.names.iter().any(|n| {
            let n = n.as_bytes();
            let Some(cut) = key.len().checked_sub(n.len()) else {
                return false;
            };
            key[cut..].eq_ignore_ascii_case(n) && (cut == 0 || matches!(key[cut - 1], b'_' | b'-'))
        })
    }

    /// The msgpack `data` with every matching key's value replaced, and how
    /// many were; `None` when nothing matched, or every match already was
    /// `***` (the caller keeps `data`).
    pub fn redact_msgpack(&self, data: &[u8]) -> Result<Option<(Vec<u8>, u64)>, WalkError> {
        self.redact_msgpack_at(data, 0)
    }

    /// [`KeyRedactor::redact_msgpack`] for a value found `depth` levels
    /// down in a larger one: its nesting counts from there against
    /// [`msgpack::MAX_DEPTH`], as it would in a walk of the whole.
    pub(crate) fn redact_msgpack_at(
        &self,
        data: &[u8],
        depth: usize,
    ) -> Result<Option<(Vec<u8>, u64)>, WalkError> {
        if self.names.is_empty() {
            return Ok(None);
        }
        let mut hidden = Vec::new();
        let mut r = Reader::new(data);
        self.collect(&mut r, depth, &mut hidden)?;
        if hidden.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(data.len());
        let mut at = 0;
        for range in &hidden {
            out.extend_from_slice(data.get(at..range.start).ok_or(WalkError::Truncated)?);
            out.extend_from_slice(MASK_MSGPACK);
            at = range.end;
        }
        out.extend_from_slice(data.get(at..).ok_or(WalkError::Truncated)?);
        Ok(Some((out, hidden.len() as u64)))
    }

    /// Finds the byte ranges of the values to hide, in order, never nested.
    fn collect(
        &self,
        r: &mut Reader<'_>,
        depth: usize,
        hidden: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<(), WalkError> {
        if depth > msgpack::MAX_DEPTH {
            return Err(WalkError::TooDeep);
        }
        match r.item()? {
            Item::Array(n) => {
                for _ in 0..n {
                    self.collect(r, depth + 1, hidden)?;
                }
            }
            Item::Map(n) => {
                for _ in 0..n {
                    let key_at = r.clone();
                    let name = match r.item()? {
                        Item::Str(s) | Item::Bin(s) => Some(s),
                        Item::Map(_) | Item::Array(_) => {
                            // A map or array used as a key: look inside it too.
                            *r = key_at;
                            self.collect(r, depth + 1, hidden)?;
                            None
                        }
                        _ => None,
                    };
                    let start = r.position();
                    if name.is_some_and(|k| self.matches(k)) {
                        // A value already `***` has nothing left to hide:
                        // not counted, and the data is not copied for it.
                        if r.skip()? != MASK_MSGPACK {
                            hidden.push(start..r.position());
                        }
                    } else {
                        self.collect(r, depth + 1, hidden)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The event with its secrets hidden and how many were, or None when
    /// it has none; an error when its data cannot be walked whole (nested
    /// too deep, or damaged), so whether it holds a secret is not known.
    pub fn redacted(
        &self,
        e: &crate::event::Event,
    ) -> Result<Option<(crate::event::Event, u64)>, WalkError> {
        let Some((new_data, n)) = self.redact_msgpack(e.data())? else {
            return Ok(None);
        };
        let tag = e.tag();
        let mut body = Vec::with_capacity(tag.len() + 2 + new_data.len());
        body.extend_from_slice(tag.as_bytes());
        body.extend_from_slice(b"\n\n");
        body.extend_from_slice(&new_data);
        // Only values were replaced, by a valid one: it decodes as the
        // original did. Were it not to, nothing could be stored safely.
        let redacted = crate::event::Event::from_body(bytes::Bytes::from(body))
            .map_err(|_| WalkError::Invalid)?;
        Ok(Some((redacted, n)))
    }
}

/// A URL that may carry a secret: the raw text is only reachable through
/// [`SecretUrl::expose`]; `Debug` and `Display` show [`url`]'s form.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(s: impl Into<String>) -> SecretUrl {
        SecretUrl(s.into())
    }

    /// The URL as written, for the client that connects with it. Never
    /// format this into a message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&url(&self.0))
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", url(&self.0))
    }
}

impl<'de> serde::Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        secret_string(d).map(SecretUrl)
    }
}

/// Deserializes a string without ever echoing the value in an error: a
/// password written as a bare number (`password = 12345`) would otherwise
/// come back in serde's "invalid type: integer `12345`" message.
pub fn secret_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<String, E> {
            Err(not_a_string())
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<String, E> {
            Err(not_a_string())
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
            Err(not_a_string())
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
            Err(not_a_string())
        }
    }
    fn not_a_string<E: serde::de::Error>() -> E {
        E::custom("expected a string (put the value in quotes); the value is not shown")
    }
    d.deserialize_string(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_shape() {
        let cases = [
            // Does not parse (port out of range): still redacted.
            (
                "postgres://salt:pw@db:99999/salt",
                "postgres://salt:***@db:99999/salt",
            ),
            (
                "mysql://salt:pw@db:99999/salt",
                "mysql://salt:***@db:99999/salt",
            ),
            (
                "postgres://salt@db/salt?password=pw&sslmode=verify-full",
                "postgres://salt@db/salt?password=***&sslmode=verify-full",
            ),
            (
                "mysql://salt@db/salt?pass=pw&token=pw&secret=pw&key=pw&sig=pw&ssl-mode=VERIFY_IDENTITY",
                "mysql://salt@db/salt?pass=***&token=***&secret=***&key=***&sig=***&ssl-mode=VERIFY_IDENTITY",
            ),
            ("nats://tok@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
            ("nats://u:pw@h:4222", "nats://***@h:4222"),
            (
                "redis://:pw@127.0.0.1:6379/0",
                "redis://***@127.0.0.1:6379/0",
            ),
            ("amqp://guest:pw@h:5672/%2f", "amqp://***@h:5672/%2f"),
            (
                "https://hooks.slack.com/services/T000/B000/XXXX",
                "https://hooks.slack.com/***",
            ),
            (
                "https://discord.com/api/webhooks/123/tok",
                "https://discord.com/***",
            ),
            (
                "https://x.webhook.office.com/webhookb2/a@b/IncomingWebhook/c/d",
                "https://***",
            ),
            ("https://h.example/?code=pw", "https://h.example/***"),
            ("https://h.example/", "https://h.example/"),
            ("https://h.example", "https://h.example"),
            // A password with an unescaped `/`: the `@` comes after the host.
            ("redis://u:p/w@h:6379", "redis://***"),
            ("postgres://salt:p#w@db/salt", "postgres://***"),
            ("postgres://salt:p?w@db/salt", "postgres://***"),
            ("postgres://db/salt#frag", "postgres://db/salt#***"),
            ("postgres://db/salt?bare", "postgres://db/salt?***"),
            ("salt:pw@db/salt", "***"),
            ("sa:pw@x://y", "***"),
        ];
        for (raw, want) in cases {
            assert_eq!(url(raw), want, "{raw}");
        }
    }

    /// The definition [`KeyRedactor::matches`] must keep, without its
    /// shortcuts: the key equals a name, or ends with `_name` / `-name`,
    /// ignoring ASCII case.
    fn matches_by_definition(names: &[&str], key: &[u8]) -> bool {
        let key = key.to_ascii_lowercase();
        names.iter().map(|n| n.to_ascii_lowercase()).any(|n| {
            let n = n.as_bytes();
            key == n || (key.ends_with(n) && matches!(key[key.len() - n.len() - 1], b'_' | b'-'))
        })
    }

    #[test]
    fn key_matching_keeps_its_definition() {
        let sets: [&[&str]; 3] = [DEFAULT_KEYS, &["k", "pw"], &["x-y"]];
        let keys: &[&[u8]] = &[
            b"",
            b"k",
            b"K",
            b"pw",
            b"PW",
            b"apw",
            b"a_pw",
            b"a-Pw",
            b"_pw",
            b"password",
            b"db_Password",
            b"DB-PASSWORD",
            b"passwordx",
            b"xpassword",
            b"token",
            b"tokens",
            b"api_key",
            b"apikey",
            b"my_apikey",
            b"result",
            b"comment",
            b"duration",
            b"a_k",
            b"ak",
            b"x-y",
            b"a_x-y",
            b"ax-y",
            b"\xff_pw",
            b"secret_key",
            b"my-secret",
        ];
        for names in sets {
            let r = KeyRedactor::new(names);
            for key in keys {
                assert_eq!(
                    r.matches(key),
                    matches_by_definition(names, key),
                    "{names:?} {:?}",
                    String::from_utf8_lossy(key)
                );
            }
        }
        assert!(!KeyRedactor::default().matches(b"password"));
    }

    #[test]
    fn secret_url_never_formats_raw() {
        let u = SecretUrl::new("nats://tok@h:4222");
        assert_eq!(u.to_string(), "nats://***@h:4222");
        assert_eq!(format!("{u:?}"), "\"nats://***@h:4222\"");
        assert_eq!(u.expose(), "nats://tok@h:4222");
    }

    #[test]
    fn a_number_given_as_a_secret_is_not_echoed() {
        #[derive(serde::Deserialize, Debug)]
        struct T {
            #[allow(dead_code)]
            #[serde(deserialize_with = "secret_string")]
            p: String,
        }
        // What saltpipe shows of a TOML error is its message (the config
        // module adds the line and column itself, never the line's text).
        let err = toml::from_str::<T>("p = 7364519").expect_err("number");
        assert!(!err.message().contains("7364519"), "{err}");
        assert!(toml::from_str::<T>("p = \"7364519\"").is_ok());
    }

    /// `1` inside `levels` one-element lists.
    fn nested(levels: usize) -> rmpv::Value {
        (0..levels).fold(rmpv::Value::from(1), |v, _| rmpv::Value::Array(vec![v]))
    }

    fn mp(v: &rmpv::Value) -> Vec<u8> {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, v).expect("encode");
        b
    }

    #[test]
    fn keys_are_hidden_at_any_depth_and_counted() {
        use rmpv::Value as V;
        let s = |x: &str| V::from(x);
        let data = V::Map(vec![
            (s("fun"), s("state.apply")),
            (s("password"), s("hunter2")),
            (
                s("arg"),
                V::Array(vec![V::Map(vec![
                    (s("pillar"), V::Map(vec![(s("DB_Password"), s("hunter3"))])),
                    (s("__kwarg__"), V::Boolean(true)),
                ])]),
            ),
            (
                s("kwargs"),
                V::Map(vec![(s("token"), V::Map(vec![(s("a"), s("hunter4"))]))]),
            ),
            (s("passwords_file"), s("/etc/x")),
            (s("keyword"), s("kept")),
        ]);
        let r = KeyRedactor::new(DEFAULT_KEYS);
        let (out, n) = r
            .redact_msgpack(&mp(&data))
            .expect("walk")
            .expect("something hidden");
        assert_eq!(n, 3);
        let json = crate::msgpack::to_json(&out, usize::MAX).expect("json");
        for secret in ["hunter2", "hunter3", "hunter4"] {
            assert!(!json.contains(secret), "{json}");
        }
        assert!(json.contains(r#""password": "***""#), "{json}");
        assert!(json.contains(r#""DB_Password": "***""#), "{json}");
        assert!(json.contains(r#""passwords_file": "/etc/x""#), "{json}");
        assert!(json.contains(r#""keyword": "kept""#), "{json}");
        // Nothing to hide: nothing copied.
        let plain = mp(&V::Map(vec![(s("fun"), s("test.ping"))]));
        assert!(r.redact_msgpack(&plain).expect("walk").is_none());
        // A value already hidden is not hidden again, nor counted.
        let masked = mp(&V::Map(vec![(s("password"), s("***"))]));
        assert!(r.redact_msgpack(&masked).expect("walk").is_none());
        assert!(
            KeyRedactor::new::<&str>(&[])
                .redact_msgpack(&mp(&data))
                .expect("walk")
                .is_none()
        );
    }

    #[test]
    fn a_map_used_as_a_key_is_looked_into() {
        use rmpv::Value as V;
        let key = V::Map(vec![(V::from("token"), V::from("hunter5"))]);
        let data = V::Map(vec![(key, V::from("v")), (V::from("k"), V::from("kept"))]);
        let r = KeyRedactor::new(DEFAULT_KEYS);
        let (out, n) = r.redact_msgpack(&mp(&data)).expect("walk").expect("hidden");
        assert_eq!(n, 1);
        let back = rmpv::decode::read_value(&mut out.as_slice()).expect("msgpack");
        let text = format!("{back}");
        assert!(!text.contains("hunter5") && text.contains("kept"), "{text}");
    }

    #[test]
    fn truncated_data_is_an_error_not_a_panic() {
        let r = KeyRedactor::new(DEFAULT_KEYS);
        assert!(r.redact_msgpack(&[0x81, 0xa8]).is_err());
        assert!(r.redact_msgpack(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    /// Everything but the secret is lower case, the secret holds upper
    /// case letters (and URL punctuation): any upper case letter in the
    /// output is a piece of the secret.
    fn secret() -> impl Strategy<Value = String> {
        "[A-Z]{1,4}([A-Z@:/?#&=%!$+;,]{0,12})[A-Z]{1,4}"
    }

    fn host() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9.-]{0,12}"
    }

    /// Msgpack values whose keys are often ones `[sink] redact` hides,
    /// whose values are sometimes `***` already, and whose keys are
    /// sometimes maps (which the redactor looks into).
    fn value() -> impl Strategy<Value = rmpv::Value> {
        use rmpv::Value as V;
        let leaf = prop_oneof![
            Just(V::from("***")),
            Just(V::from("kept")),
            Just(V::Nil),
            any::<i64>().prop_map(V::from),
            any::<bool>().prop_map(V::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let key = prop_oneof![
                prop::sample::select(vec![
                    "password", "DB-Token", "name", "return", "***", "pass"
                ])
                .prop_map(V::from),
                any::<u8>().prop_map(V::from),
                prop::collection::vec((Just(V::from("token")), inner.clone()), 1..2)
                    .prop_map(V::Map),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(V::Array),
                prop::collection::vec((key, inner), 0..4).prop_map(V::Map),
            ]
        })
    }

    #[test]
    fn a_key_too_deep_for_the_redactor_is_refused_by_the_checked_transcode_too() {
        // Bytes as the plain transcode writes them, but not walkable by the
        // redactor: the checked transcode says so rather than storing them
        // unchecked (the worker then keeps the event as the redactor left
        // it, as before the check moved into the transcoder).
        use rmpv::Value as V;
        let key = nested(300);
        let data = mp(&V::Map(vec![(key, V::from("v"))]));
        let r = KeyRedactor::new(DEFAULT_KEYS);
        assert!(msgpack::to_json(&data, usize::MAX).is_ok());
        assert_eq!(r.redact_msgpack(&data).err(), Some(WalkError::TooDeep));
        assert_eq!(
            msgpack::to_json_checked(&data, usize::MAX, Some(&r)).err(),
            Some(WalkError::TooDeep)
        );
    }

    #[test]
    fn a_secret_in_a_key_near_the_depth_limit_is_judged_as_the_redactor_judges_it() {
        // A map used as a key holds a password and a deep list. The
        // checked transcode looks into the key at the key's own depth in
        // the event, as the redactor's walk does: where the redactor gives
        // up (too deep), so does the checked transcode, instead of asking
        // for a redaction that cannot be made.
        use rmpv::Value as V;
        let r = KeyRedactor::new(DEFAULT_KEYS);
        for levels in 245..262 {
            let deep = nested(levels);
            let key = V::Map(vec![
                (V::from("password"), V::from("x")),
                (V::from("d"), deep),
            ]);
            for data in [
                mp(&V::Map(vec![(key.clone(), V::from("v"))])),
                mp(&V::Map(vec![(
                    V::from("return"),
                    V::Map(vec![(
                        V::from("a_|-b_|-c_|-d"),
                        V::Map(vec![(key.clone(), V::from(1))]),
                    )]),
                )])),
            ] {
                let checked = msgpack::to_json_checked(&data, usize::MAX, Some(&r));
                let with_field = msgpack::to_json_with_field(
                    &data,
                    "return",
                    usize::MAX,
                    Some(&r),
                    Some(&mut crate::outcome::StatesTally::default()),
                )
                .map(|(json, _)| json);
                for got in [checked, with_field] {
                    match (got, r.redact_msgpack(&data)) {
                        (Err(WalkError::Secret), Ok(Some(_))) => {}
                        (Err(e), Err(f)) => assert_eq!(e, f, "{levels} levels"),
                        (got, walk) => {
                            panic!("{levels} levels: {got:?} but the redactor gave {walk:?}")
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_secret_before_a_part_too_deep_is_found_but_cannot_be_hidden() {
        // The checked transcode stops at the password; the redactor goes
        // on and gives up on the list nested past the limit. The worker
        // then stores the event nowhere (worker::prepare): neither answer
        // lets it store the bytes.
        use rmpv::Value as V;
        let deep = nested(300);
        let data = mp(&V::Map(vec![
            (V::from("password"), V::from("x")),
            (V::from("d"), deep),
        ]));
        let r = KeyRedactor::new(DEFAULT_KEYS);
        assert_eq!(
            msgpack::to_json_checked(&data, usize::MAX, Some(&r)),
            Err(WalkError::Secret)
        );
        assert_eq!(r.redact_msgpack(&data).err(), Some(WalkError::TooDeep));
        assert_eq!(msgpack::to_json(&data, usize::MAX), Err(WalkError::TooDeep));
    }

    proptest! {
        /// The check the transcoder makes as it writes (what lets the
        /// worker skip its own walk for secrets) agrees with the redactor:
        /// a value it transcodes has nothing left to hide, and one it
        /// refuses transcodes once the redactor has been over it.
        #[test]
        fn the_transcoders_check_agrees_with_the_redactor(v in value()) {
            let r = KeyRedactor::new(DEFAULT_KEYS);
            let data = mp(&v);
            let checked = msgpack::to_json_checked(&data, usize::MAX, Some(&r));
            match (checked, r.redact_msgpack(&data).expect("walk")) {
                (Ok(json), None) => {
                    prop_assert_eq!(json, msgpack::to_json(&data, usize::MAX).expect("json"));
                }
                (Err(WalkError::Secret), Some((redacted, _))) => {
                    prop_assert_ne!(&redacted, &data);
                    prop_assert_eq!(
                        msgpack::to_json_checked(&redacted, usize::MAX, Some(&r)),
                        msgpack::to_json(&redacted, usize::MAX)
                    );
                }
                (other, hidden) => prop_assert!(false, "{other:?} but the redactor gave {hidden:?}"),
            }
        }

        #[test]
        fn key_matching_keeps_its_definition_for_any_key(
            key in "(([a-zA-Z_-]{0,6})(PassWord|passwd|token|api_key|_|-|ey|rd|n)?){0,3}",
        ) {
            let r = KeyRedactor::new(DEFAULT_KEYS);
            prop_assert_eq!(r.matches(key.as_bytes()), matches_by_definition(DEFAULT_KEYS, key.as_bytes()));
        }

        #[test]
        fn a_password_never_survives(
            scheme in prop::sample::select(vec![
                "postgres", "postgresql", "mysql", "mariadb", "redis", "rediss",
                "amqp", "amqps", "nats", "tls", "http", "https",
            ]),
            user in "[a-z]{0,8}",
            pw in secret(),
            host in host(),
            port in prop::option::of(0u32..200_000),
            path in "(/[a-z0-9_]{0,8}){0,2}",
            shape in 0..5u8,
            extra in "(&[a-z_-]{1,8}=[a-z0-9]{0,6}){0,2}",
        ) {
            // A lone user name of a database URL is a user name, shown.
            prop_assume!(shape != 1 || !USER_SCHEMES.contains(&scheme));
            // Only webhooks carry a secret in the path.
            prop_assume!(shape != 4 || scheme.starts_with("http"));
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let raw = match shape {
                0 => format!("{scheme}://{user}:{pw}@{host}{port}{path}"),
                1 => format!("{scheme}://{pw}@{host}{port}{path}"),
                2 => format!("{scheme}://{user}@{host}{port}{path}?password={pw}{extra}"),
                3 => format!("{scheme}://{host}{port}{path}?sslmode=require{extra}&token={pw}"),
                _ => format!("{scheme}://{host}{port}/services/{pw}"),
            };
            let shown = url(&raw);
            prop_assert!(
                !shown.chars().any(|c| c.is_ascii_uppercase()),
                "{raw} shown as {shown}"
            );
        }

        #[test]
        fn any_text_with_a_secret_marker_never_shows_it(raw in "\\PC{0,40}", pw in secret()) {
            // Whatever surrounds it, a secret placed where a password goes.
            let s = format!("{raw}:{pw}@{raw}");
            let shown = url(&s);
            prop_assert!(!shown.contains(&pw), "{s} shown as {shown}");
        }
    }
}
