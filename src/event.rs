//! One bus event: its tag, its raw data, and a typed view of the few fields
//! we route, filter and store by.
//!
//! The raw bytes are the record of truth: they are what the queue carries and
//! what the sink transcodes, so nothing about the event (bin vs str, ext
//! types, big integers, bytes that are not UTF-8, keys we have never heard
//! of) is lost on the way. The typed view is read straight off those bytes
//! without building a tree, which keeps decode + rules above a million events
//! a second on one core.

use crate::msgpack::{self, Item, Reader, WalkError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What an event is, from its tag (and for a few, its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `salt/job/<jid>/new`: a job was published.
    JobNew,
    /// `salt/job/<jid>/publish` (3007+): repeats `new`.
    JobPublish,
    /// `salt/job/<jid>/ret/<minion>`: one minion's return.
    JobReturn,
    /// `salt/job/<jid>/prog/...`: state progress (state_events).
    JobProgress,
    /// `salt/job/<jid>/sub/<id>/error/<fun>`: a failure already in the return.
    JobSub,
    /// A bare 20-digit jid tag: the pre-3008 job announcement.
    JobLegacyAnnounce,
    /// `salt/run/<jid>/new`.
    RunnerNew,
    /// `salt/run/<jid>/ret`.
    RunnerReturn,
    /// Other `salt/run/...` events (args, progress).
    RunnerOther,
    /// `salt/wheel/<jid>/new`: a wheel job (WheelClient, salt-api's
    /// `wheel` client, `salt-key` with eauth) started.
    WheelNew,
    /// `salt/wheel/<jid>/ret`.
    WheelReturn,
    /// Other `salt/wheel/...` events.
    WheelOther,
    /// `salt/batch/...`.
    Batch,
    /// `salt/auth`.
    Auth,
    /// `salt/key`.
    Key,
    /// `minion/refresh/<id>`, `resource/refresh/<id>`.
    Refresh,
    /// `minion_start`, `salt/minion/<id>/start`.
    MinionStart,
    /// `salt/presence/...`.
    Presence,
    /// `_salt_error`.
    SaltError,
    /// A bare `<module>.<function>` tag: a state failure already in the return.
    StateFailure,
    /// Anything else, such as user events from `event.send`.
    Other,
}

impl Kind {
    pub const ALL: [Kind; 21] = [
        Kind::JobNew,
        Kind::JobPublish,
        Kind::JobReturn,
        Kind::JobProgress,
        Kind::JobSub,
        Kind::JobLegacyAnnounce,
        Kind::RunnerNew,
        Kind::RunnerReturn,
        Kind::RunnerOther,
        Kind::WheelNew,
        Kind::WheelReturn,
        Kind::WheelOther,
        Kind::Batch,
        Kind::Auth,
        Kind::Key,
        Kind::Refresh,
        Kind::MinionStart,
        Kind::Presence,
        Kind::SaltError,
        Kind::StateFailure,
        Kind::Other,
    ];

    /// Classifies a tag. Cheap: byte comparisons only.
    ///
    /// On a master of masters, a syndic forwards its own master's events
    /// under `syndic/<syndic id>/<tag>` (`new`, `publish`, auth, refresh;
    /// returns come up unprefixed): they are classified as the tag they
    /// wrap, so a syndic's local job is announced (its `jids` row, its real
    /// minion list) on the MoM too, and its chatter is redundant as usual.
    pub fn of_tag(tag: &str) -> Kind {
        let tag = strip_syndic(tag);
        if let Some(rest) = tag.strip_prefix("salt/job/") {
            let mut parts = rest.splitn(3, '/');
            let _jid = parts.next();
            return match parts.next() {
                Some("new") => Kind::JobNew,
                Some("publish") => Kind::JobPublish,
                Some("ret") => Kind::JobReturn,
                Some("prog") => Kind::JobProgress,
                Some("sub") => Kind::JobSub,
                _ => Kind::Other,
            };
        }
        if let Some(rest) = tag.strip_prefix("salt/run/") {
            return match rest.split('/').nth(1) {
                Some("new") => Kind::RunnerNew,
                Some("ret") => Kind::RunnerReturn,
                _ => Kind::RunnerOther,
            };
        }
        if let Some(rest) = tag.strip_prefix("salt/wheel/") {
            return match rest.split('/').nth(1) {
                Some("new") => Kind::WheelNew,
                Some("ret") => Kind::WheelReturn,
                _ => Kind::WheelOther,
            };
        }
        if tag.starts_with("salt/batch/") {
            return Kind::Batch;
        }
        if tag == "salt/auth" {
            return Kind::Auth;
        }
        if tag == "salt/key" || tag.starts_with("salt/key/") {
            return Kind::Key;
        }
        if tag.starts_with("minion/refresh/") || tag.starts_with("resource/refresh/") {
            return Kind::Refresh;
        }
        if tag == "minion_start" || (tag.starts_with("salt/minion/") && tag.ends_with("/start")) {
            return Kind::MinionStart;
        }
        if tag.starts_with("salt/presence/") {
            return Kind::Presence;
        }
        if tag == "_salt_error" {
            return Kind::SaltError;
        }
        if tag.len() == 20 && tag.bytes().all(|b| b.is_ascii_digit()) {
            return Kind::JobLegacyAnnounce;
        }
        if is_module_function(tag) {
            return Kind::StateFailure;
        }
        Kind::Other
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::JobNew => "job_new",
            Kind::JobPublish => "job_publish",
            Kind::JobReturn => "job_return",
            Kind::JobProgress => "job_progress",
            Kind::JobSub => "job_sub",
            Kind::JobLegacyAnnounce => "job_legacy_announce",
            Kind::RunnerNew => "runner_new",
            Kind::RunnerReturn => "runner_return",
            Kind::RunnerOther => "runner_other",
            Kind::WheelNew => "wheel_new",
            Kind::WheelReturn => "wheel_return",
            Kind::WheelOther => "wheel_other",
            Kind::Batch => "batch",
            Kind::Auth => "auth",
            Kind::Key => "key",
            Kind::Refresh => "refresh",
            Kind::MinionStart => "minion_start",
            Kind::Presence => "presence",
            Kind::SaltError => "salt_error",
            Kind::StateFailure => "state_failure",
            Kind::Other => "other",
        }
    }
}

/// The syndic that forwarded an event to its master of masters: `<id>`
/// of `syndic/<id>/<tag>`.
pub fn syndic_of(tag: &str) -> Option<&str> {
    split_syndic(tag).map(|(id, _)| id)
}

/// `syndic/<id>/<tag>` -> `<tag>`; any other tag unchanged.
fn strip_syndic(tag: &str) -> &str {
    split_syndic(tag).map_or(tag, |(_, inner)| inner)
}

/// `syndic/<id>/<tag>` -> (`<id>`, `<tag>`).
fn split_syndic(tag: &str) -> Option<(&str, &str)> {
    tag.strip_prefix("syndic/")
        .and_then(|rest| rest.split_once('/'))
}

/// `pkg.install`, `state.apply`: one dot between two identifiers, no slash.
fn is_module_function(tag: &str) -> bool {
    let Some((m, f)) = tag.split_once('.') else {
        return false;
    };
    let ident =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ident(m) && ident(f)
}

/// The fields of the data map that rules, routing and sinks look at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields {
    pub jid: Option<String>,
    /// The minion id (`id`) of a return.
    pub minion: Option<String>,
    /// `fun`: one name, or several for a multi-function job.
    pub fun: Vec<String>,
    /// `success`; for multi-function returns, true only if all are.
    pub success: Option<bool>,
    /// `retcode`; for multi-function returns, the first non-zero one.
    pub retcode: Option<i64>,
    /// The data map had a `success` key.
    pub has_success: bool,
    /// The data map had `tgt` or `arg`, which only salt-call returns carry.
    pub has_target: bool,
}

/// Why a frame is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not a map with a body: {0}")]
    NoBody(&'static str),
    #[error("body has no \"\\n\\n\" between tag and data")]
    NoSeparator,
    #[error("tag is not UTF-8")]
    TagNotUtf8,
    #[error("data is not msgpack: {0}")]
    BadData(#[from] WalkError),
}

impl DecodeError {
    /// Label used in metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::NoBody(_) => "no_body",
            DecodeError::NoSeparator => "no_separator",
            DecodeError::TagNotUtf8 => "tag_not_utf8",
            DecodeError::BadData(_) => "bad_data",
        }
    }
}

/// A decoded bus event.
#[derive(Debug, Clone)]
pub struct Event {
    /// `tag "\n\n" data`, exactly as on the bus: what we queue and store.
    pub body: Bytes,
    tag_len: usize,
    pub kind: Kind,
    pub fields: Fields,
    /// Where each top-level entry of the data map lies in `data()` (key,
    /// value), found by the one walk `from_body` makes anyway; None for
    /// kinds whose fields are not read. [`Event::field_raw`] looks here
    /// instead of walking the map again: with a 500 KB `return`, every
    /// walk of the map skips over all of it (three more walks per return
    /// in the worker before this).
    top: Option<TopEntries>,
}

/// [`Event`]'s top-level entries, in order.
type TopEntries = Box<[TopEntry]>;

/// The most top-level entries an event keeps the places of; a data map
/// with more is walked again by [`Event::field_raw`] instead.
const MAX_TOP_ENTRIES: usize = 64;

/// One top-level entry of an event's data map: where its key's text and
/// its value lie in `data()` (offset, length; u32 keeps an entry at 16
/// bytes, a dozen of them beside a 1 KB event: data over 4 GiB is not
/// indexed).
#[derive(Debug, Clone)]
struct TopEntry {
    key: (u32, u32),
    value: (u32, u32),
}

impl TopEntry {
    fn get(data: &[u8], (at, len): (u32, u32)) -> Option<&[u8]> {
        let at = at as usize;
        data.get(at..at.checked_add(len as usize)?)
    }
}

impl Event {
    /// Decodes one frame (a msgpack map with a `body` key).
    pub fn from_frame(frame: &Bytes) -> Result<Event, DecodeError> {
        let body = find_body(frame)?;
        Event::from_body(frame.slice_ref(body))
    }

    /// Decodes `tag "\n\n" data` (the form the queue carries).
    pub fn from_body(body: Bytes) -> Result<Event, DecodeError> {
        let sep = find_separator(&body).ok_or(DecodeError::NoSeparator)?;
        let tag = std::str::from_utf8(&body[..sep]).map_err(|_| DecodeError::TagNotUtf8)?;
        let kind = Kind::of_tag(tag);
        let data = &body[sep + 2..];
        let (fields, top) = read_fields(data, kind)?;
        Ok(Event {
            tag_len: sep,
            kind,
            fields,
            body,
            top,
        })
    }

    pub fn tag(&self) -> &str {
        // Checked to be UTF-8 in `from_body`; never panics.
        std::str::from_utf8(&self.body[..self.tag_len]).unwrap_or_default()
    }

    /// The raw msgpack data map.
    pub fn data(&self) -> &[u8] {
        &self.body[self.tag_len + 2..]
    }

    /// A 3006 syndic's forwarded bare-jid announcement
    /// (`syndic/<id>/<jid>`: the jid's minions, no function, no load): on
    /// its master of masters the only sign of the syndic's minions, so it
    /// is kept and stored as target rows, where a master's own bare-jid
    /// announcement is a repeat of its `new`.
    pub fn is_syndic_announcement(&self) -> bool {
        self.kind == Kind::JobLegacyAnnounce && syndic_of(self.tag()).is_some()
    }

    /// A return whose jid the master made up (the minion sent `jid: req`):
    /// `salt-call` returns and the minion scheduler's `return_job` returns.
    /// The master adds the target (`tgt`, `arg`) to them and saves the
    /// return as the job's load, since no `new` announced the job. (A
    /// salt-call return has no `success`; a scheduled one has: the target
    /// is what both have, and a published job's return never has.)
    pub fn is_salt_call_return(&self) -> bool {
        self.kind == Kind::JobReturn && self.fields.has_target
    }

    /// The key that groups events that must stay in order and that makes a
    /// return unique: `jid/minion` for returns, the jid for job events, the tag otherwise.
    pub fn partition_key(&self) -> String {
        match (&self.fields.minion, &self.fields.jid) {
            (Some(m), _) => m.clone(),
            (None, Some(j)) => j.clone(),
            _ => self.tag().to_owned(),
        }
    }

    /// The raw msgpack of one top-level data field.
    pub fn field_raw(&self, name: &str) -> Option<&[u8]> {
        let data = self.data();
        if let Some(top) = &self.top {
            return top
                .iter()
                .find(|e| TopEntry::get(data, e.key) == Some(name.as_bytes()))
                .and_then(|e| TopEntry::get(data, e.value));
        }
        let mut found = None;
        let _ = msgpack::for_each_entry(data, |k, v| {
            if found.is_none() && k == name.as_bytes() {
                found = Some(v);
            }
        });
        found
    }
}

fn find_separator(body: &[u8]) -> Option<usize> {
    // Tags are short; the data that follows may hold "\n\n" too, so the
    // first occurrence is the separator.
    memchr::memchr_iter(b'\n', body).find(|&i| body.get(i + 1) == Some(&b'\n'))
}

fn find_body(frame: &[u8]) -> Result<&[u8], DecodeError> {
    let mut body = None;
    let is_map = msgpack::for_each_entry(frame, |k, v| {
        if k == b"body" {
            body = Some(v);
        }
    })
    .map_err(|_| DecodeError::NoBody("frame is not valid msgpack"))?;
    if !is_map {
        return Err(DecodeError::NoBody("frame is not a map"));
    }
    let v = body.ok_or(DecodeError::NoBody("no body key"))?;
    match Reader::new(v).item() {
        Ok(Item::Bin(b)) | Ok(Item::Str(b)) => Ok(b),
        _ => Err(DecodeError::NoBody("body is neither bin nor str")),
    }
}

/// The fields saltpipe reads, and where every top-level entry lies (for
/// the kinds whose fields are read).
fn read_fields(data: &[u8], kind: Kind) -> Result<(Fields, Option<TopEntries>), DecodeError> {
    let mut f = Fields::default();
    let interesting = !matches!(
        kind,
        Kind::Auth | Kind::Key | Kind::Presence | Kind::Refresh
    );
    if !interesting {
        // Still check that it is msgpack, so garbage is counted as such.
        let mut r = Reader::new(data);
        r.skip()?;
        return Ok((f, None));
    }
    // Offset and length of a sub-slice of `data` (for_each_entry hands
    // out sub-slices), or None past u32.
    let at = |s: &[u8]| {
        let start = (s.as_ptr() as usize).saturating_sub(data.as_ptr() as usize);
        Some((u32::try_from(start).ok()?, u32::try_from(s.len()).ok()?))
    };
    // Salt's data maps have a dozen keys; a map of many more (a hostile
    // frame's millions of one-byte entries) is not indexed, so the index
    // stays a few hundred bytes, allocated once at its size.
    let entries = match Reader::new(data).item() {
        Ok(Item::Map(n)) => n as usize,
        _ => 0,
    };
    let mut indexed = entries <= MAX_TOP_ENTRIES;
    let mut top = Vec::with_capacity(if indexed { entries } else { 0 });
    msgpack::for_each_entry(data, |k, v| {
        if indexed {
            match (at(k), at(v)) {
                (Some(key), Some(value)) => top.push(TopEntry { key, value }),
                _ => indexed = false,
            }
        }
        match k {
            b"jid" => f.jid = scalar_text(v),
            b"id" => f.minion = msgpack::as_str(v).map(str::to_owned),
            b"fun" => f.fun = str_or_list(v),
            b"success" => {
                f.has_success = true;
                f.success = bool_or_all(v);
            }
            b"retcode" => f.retcode = int_or_first_nonzero(v),
            b"tgt" | b"arg" => f.has_target = true,
            _ => {}
        }
    })?;
    Ok((f, indexed.then(|| top.into_boxed_slice())))
}

fn scalar_text(v: &[u8]) -> Option<String> {
    match Reader::new(v).item().ok()? {
        Item::Str(s) | Item::Bin(s) => std::str::from_utf8(s).ok().map(str::to_owned),
        Item::UInt(u) => Some(u.to_string()),
        Item::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn str_or_list(v: &[u8]) -> Vec<String> {
    let mut r = Reader::new(v);
    match r.item() {
        Ok(Item::Str(s)) | Ok(Item::Bin(s)) => vec![String::from_utf8_lossy(s).into_owned()],
        Ok(Item::Array(n)) => (0..n)
            .filter_map(|_| match r.item() {
                Ok(Item::Str(s)) | Ok(Item::Bin(s)) => {
                    Some(String::from_utf8_lossy(s).into_owned())
                }
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

fn bool_or_all(v: &[u8]) -> Option<bool> {
    let mut r = Reader::new(v);
    match r.item().ok()? {
        Item::Bool(b) => Some(b),
        Item::Map(n) => {
            let mut all = true;
            for _ in 0..n {
                r.skip().ok()?;
                match r.item().ok()? {
                    Item::Bool(b) => all &= b,
                    _ => return None,
                }
            }
            Some(all)
        }
        _ => None,
    }
}

fn int_of(item: Item<'_>) -> Option<i64> {
    match item {
        Item::Int(i) => Some(i),
        Item::UInt(u) => i64::try_from(u).ok(),
        _ => None,
    }
}

fn int_or_first_nonzero(v: &[u8]) -> Option<i64> {
    let mut r = Reader::new(v);
    match r.item().ok()? {
        Item::Map(n) => {
            let mut out = Some(0);
            for _ in 0..n {
                r.skip().ok()?;
                let value = r.skip().ok()?;
                let code = int_of(Reader::new(value).item().ok()?);
                if out == Some(0) && code.is_some_and(|c| c != 0) {
                    out = code;
                }
            }
            out
        }
        other => int_of(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::encode::frame;
    use rmpv::Value as V;

    fn packed(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encode");
        out
    }

    fn ev(tag: &str, data: V) -> Event {
        let f = Bytes::from(frame(tag, &packed(&data)));
        Event::from_frame(&f).expect("decode")
    }

    fn map(entries: Vec<(&str, V)>) -> V {
        V::Map(entries.into_iter().map(|(k, v)| (V::from(k), v)).collect())
    }

    #[test]
    fn tags_classify() {
        let cases = [
            ("salt/job/20261125120000123456/new", Kind::JobNew),
            ("salt/job/20261125120000123456/publish", Kind::JobPublish),
            (
                "salt/job/20261125120000123456/ret/minion-1",
                Kind::JobReturn,
            ),
            ("salt/job/20261125120000123456_123/ret/m/x", Kind::JobReturn),
            ("salt/job/20261125120000123456/prog/m/0", Kind::JobProgress),
            (
                "salt/job/20261125120000123456/sub/m/error/state.apply",
                Kind::JobSub,
            ),
            ("20261125120000123456", Kind::JobLegacyAnnounce),
            ("salt/run/20261125120000123456/new", Kind::RunnerNew),
            ("salt/run/20261125120000123456/ret", Kind::RunnerReturn),
            ("salt/run/20261125120000123456/args", Kind::RunnerOther),
            ("salt/wheel/20261125120000123456/new", Kind::WheelNew),
            ("salt/wheel/20261125120000123456/ret", Kind::WheelReturn),
            ("salt/wheel/20261125120000123456/progress", Kind::WheelOther),
            // Forwarded by a syndic to its master of masters.
            ("syndic/s1/salt/job/20261125120000123456/new", Kind::JobNew),
            (
                "syndic/s1/salt/job/20261125120000123456/publish",
                Kind::JobPublish,
            ),
            ("syndic/s1/salt/auth", Kind::Auth),
            ("syndic/s1/minion/refresh/m1", Kind::Refresh),
            ("syndic/s1", Kind::Other),
            ("salt/batch/20261125120000123456/start", Kind::Batch),
            ("salt/auth", Kind::Auth),
            ("salt/key", Kind::Key),
            ("minion/refresh/m1", Kind::Refresh),
            ("resource/refresh/m1", Kind::Refresh),
            ("minion_start", Kind::MinionStart),
            ("salt/minion/m1/start", Kind::MinionStart),
            ("salt/presence/present", Kind::Presence),
            ("_salt_error", Kind::SaltError),
            ("state.apply", Kind::StateFailure),
            ("my/custom/event", Kind::Other),
            ("", Kind::Other),
        ];
        for (tag, kind) in cases {
            assert_eq!(Kind::of_tag(tag), kind, "{tag}");
        }
    }

    /// `field_raw` answers from the entries `from_body` recorded exactly as
    /// a walk of the map would: the first entry of that name, a value of
    /// any kind, none for a missing name or for data that is not a map.
    #[test]
    fn field_raw_is_the_first_entry_of_that_name() {
        let walk = |e: &Event, name: &str| {
            let mut found = None;
            let _ = crate::msgpack::for_each_entry(e.data(), |k, v| {
                if found.is_none() && k == name.as_bytes() {
                    found = Some(v.to_vec());
                }
            });
            found
        };
        let data = V::Map(vec![
            (V::from("id"), V::from("m1")),
            (V::from(7), V::from("int key")),
            (V::from("return"), V::Map(vec![(V::from("a"), V::from(1))])),
            (V::from("return"), V::from("second")),
            (V::from("_stamp"), V::from("2026-12-03T12:00:00.000000")),
        ]);
        let mut wide: Vec<(V, V)> = (0..100)
            .map(|i| (V::from(format!("k{i}")), V::from(i)))
            .collect();
        wide.push((V::from("return"), V::from("last")));
        for e in [
            ev("salt/job/20261203120000000000/ret/m1", data.clone()),
            // More entries than are indexed: walked instead, same answers.
            ev("salt/job/20261203120000000000/ret/m1", V::Map(wide)),
            ev("salt/auth", data),
            ev("salt/job/20261203120000000000/ret/m1", V::from("not a map")),
        ] {
            for name in ["id", "return", "_stamp", "missing", "7", "", "k0", "k99"] {
                assert_eq!(
                    e.field_raw(name).map(<[u8]>::to_vec),
                    walk(&e, name),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn plain_return() {
        let e = ev(
            "salt/job/20261125120000123456/ret/minion-1",
            map(vec![
                ("cmd", V::from("_return")),
                ("id", V::from("minion-1")),
                ("jid", V::from("20261125120000123456")),
                ("fun", V::from("cmd.run")),
                ("fun_args", V::Array(vec![V::from("exit 3")])),
                ("return", V::from("")),
                ("retcode", V::from(3)),
                ("success", V::from(false)),
            ]),
        );
        assert_eq!(e.kind, Kind::JobReturn);
        assert_eq!(e.tag(), "salt/job/20261125120000123456/ret/minion-1");
        assert_eq!(e.fields.minion.as_deref(), Some("minion-1"));
        assert_eq!(e.fields.jid.as_deref(), Some("20261125120000123456"));
        assert_eq!(e.fields.fun, vec!["cmd.run"]);
        assert_eq!(e.fields.success, Some(false));
        assert_eq!(e.fields.retcode, Some(3));
        assert!(!e.is_salt_call_return());
        assert_eq!(
            crate::msgpack::as_str(e.field_raw("fun").expect("fun")),
            Some("cmd.run")
        );
    }

    #[test]
    fn multi_function_return() {
        let e = ev(
            "salt/job/1/ret/m",
            map(vec![
                ("id", V::from("m")),
                (
                    "fun",
                    V::Array(vec![V::from("test.ping"), V::from("test.echo")]),
                ),
                (
                    "success",
                    map(vec![
                        ("test.ping", V::from(true)),
                        ("test.echo", V::from(true)),
                    ]),
                ),
                (
                    "retcode",
                    map(vec![("test.ping", V::from(0)), ("test.echo", V::from(2))]),
                ),
            ]),
        );
        assert_eq!(e.fields.fun, vec!["test.ping", "test.echo"]);
        assert_eq!(e.fields.success, Some(true));
        assert_eq!(e.fields.retcode, Some(2));
    }

    #[test]
    fn salt_call_return_has_no_success() {
        let e = ev(
            "salt/job/1/ret/m",
            map(vec![
                ("id", V::from("m")),
                ("fun", V::from("test.ping")),
                ("return", V::from(true)),
                ("retcode", V::from(0)),
                ("arg", V::Array(vec![])),
                ("tgt", V::from("m")),
                ("tgt_type", V::from("glob")),
            ]),
        );
        assert!(e.is_salt_call_return());
        assert_eq!(e.fields.success, None);
    }

    #[test]
    fn scheduled_return_job_is_a_master_made_jid_too() {
        // As a 3008.5 minion's scheduler sends it with `return_job`.
        let e = ev(
            "salt/job/1/ret/m",
            map(vec![
                ("id", V::from("m")),
                ("fun", V::from("test.echo")),
                ("return", V::from("scheduled")),
                ("retcode", V::from(0)),
                ("success", V::from(true)),
                ("schedule", V::from("sched")),
                ("arg", V::Array(vec![V::from("scheduled")])),
                ("tgt", V::from("m")),
                ("tgt_type", V::from("glob")),
            ]),
        );
        assert!(e.is_salt_call_return());
        assert_eq!(e.fields.success, Some(true));
    }

    #[test]
    fn odd_values_do_not_break_the_view() {
        let e = ev(
            "salt/job/1/ret/m",
            map(vec![
                ("id", V::Binary(b"m".to_vec())),
                ("jid", V::from(12345)),
                ("return", V::Binary(b"\xff\xfe".to_vec())),
                ("when", V::Ext(78, b"20261125T12:00:00.1".to_vec())),
                ("big", V::from("18446744073709551616")),
                ("success", V::from("yes")),
            ]),
        );
        assert_eq!(e.fields.minion.as_deref(), Some("m"));
        assert_eq!(e.fields.jid.as_deref(), Some("12345"));
        assert_eq!(e.fields.success, None);
        assert!(e.fields.has_success);
    }

    #[test]
    fn body_as_str_and_extra_head_keys() {
        // Old publishers pack the body as a msgpack str holding raw bytes.
        let data = packed(&map(vec![("id", V::from("m"))]));
        let mut body = b"salt/job/1/ret/m\n\n".to_vec();
        body.extend(&data);
        let mut f = Vec::new();
        let _ = rmp::encode::write_map_len(&mut f, 2);
        let _ = rmp::encode::write_str(&mut f, "head");
        f.extend(packed(&map(vec![("x", V::from(1))])));
        let _ = rmp::encode::write_str(&mut f, "body");
        let _ = rmp::encode::write_str_len(&mut f, body.len() as u32);
        f.extend(&body);
        let e = Event::from_frame(&Bytes::from(f)).expect("decode");
        assert_eq!(e.tag(), "salt/job/1/ret/m");
        assert_eq!(e.fields.minion.as_deref(), Some("m"));

        let v = V::Map(vec![(
            V::from("body"),
            V::Binary(b"salt/auth\n\n\x80".to_vec()),
        )]);
        let e = Event::from_frame(&Bytes::from(packed(&v))).expect("decode");
        assert_eq!(e.kind, Kind::Auth);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            packed(&V::from(1)),
            packed(&map(vec![("head", map(vec![]))])),
            packed(&map(vec![("body", V::from(5))])),
            packed(&map(vec![("body", V::Binary(b"no separator".to_vec()))])),
            packed(&map(vec![(
                "body",
                V::Binary(b"\xff\xfe\n\n\x80".to_vec()),
            )])),
            packed(&map(vec![(
                "body",
                V::Binary(b"salt/job/1/ret/m\n\n\xc1".to_vec()),
            )])),
            packed(&map(vec![(
                "body",
                V::Binary(b"salt/job/1/ret/m\n\n\x82\xa2id".to_vec()),
            )])),
        ];
        for c in cases {
            assert!(Event::from_frame(&Bytes::from(c.clone())).is_err(), "{c:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, decoding and converting give a value or an
        /// error, never a panic.
        #[test]
        fn arbitrary_bodies_never_panic(tag in "[a-z/]{0,12}", data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut body = tag.into_bytes();
            body.extend_from_slice(b"\n\n");
            body.extend_from_slice(&data);
            if let Ok(e) = Event::from_body(Bytes::from(body)) {
                let _ = e.partition_key();
                let r = crate::sink::Record::new(e, 0);
                let _ = crate::sink::rows::rows_of(&r, crate::sink::rows::RowFormat::unlimited(crate::sink::rows::BoolStyle::Digit));
            }
            let _ = crate::msgpack::to_json(&data, usize::MAX);
            let _ = crate::msgpack::to_json_with_field(&data, "return", usize::MAX, None, None);
        }
    }
}
