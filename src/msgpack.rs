//! Just enough MessagePack to find, walk and transcode values without building them.
//!
//! Why by hand: the bus delivers bare msgpack maps back to back with no length
//! prefix, so the reader has to know where a value *ends* inside a partial
//! buffer before it can hand it to any decoder. `rmp` reads markers but has no
//! "length of the value starting here, or tell me you need more bytes" call,
//! and `rmp-serde`/`rmpv` fail (or allocate a whole tree) on a truncated value.
//! The same scanner then lets us pick the handful of fields we route on
//! (`fun`, `id`, `jid`, `success`, `retcode`) straight out of the raw data map
//! and transcode the stored columns to JSON in one pass, with our own policy
//! for the things JSON cannot say (bin, invalid UTF-8, ext types). The raw
//! msgpack bytes are what we queue, so nothing is lost by not decoding them.
//!
//! Everything here is iterative or depth-limited: no input can overflow the
//! stack or make us allocate more than the input's size.

use crate::outcome::StatesTally;
use crate::redact::KeyRedactor;
use base64::Engine as _;

/// Deepest nesting we transcode; Salt data is a few levels deep, a hostile
/// frame could be millions.
pub const MAX_DEPTH: usize = 256;

/// Result of looking for the end of a value at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The value occupies exactly this many bytes.
    Complete(usize),
    /// The buffer ends inside the value; `at_least` is a lower bound on the
    /// value's total length, known from headers read so far.
    Incomplete { at_least: usize },
    /// These bytes are not MessagePack (the reserved marker 0xc1).
    Invalid,
}

/// What a marker byte announces: header size, payload bytes, child values.
#[derive(Debug, Clone, Copy)]
enum Head {
    /// `header` bytes of header, then `payload` bytes, then `children` values.
    Sized {
        header: usize,
        payload: usize,
        children: u64,
    },
    /// The header itself is cut off: we need this many bytes to read it.
    Short(usize),
    Invalid,
}

#[inline]
fn be(buf: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = buf.get(at..at + n)?;
    Some(s.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// Reads the header of the value at `buf[at]`.
#[inline]
fn head(buf: &[u8], at: usize) -> Head {
    let Some(&m) = buf.get(at) else {
        return Head::Short(1);
    };
    let fixed = |header: usize| Head::Sized {
        header,
        payload: 0,
        children: 0,
    };
    // (length bytes, multiplier of children or 0 for payload, extra header bytes)
    let sized = |len_bytes: usize, kind: u8, extra: usize| -> Head {
        let Some(n) = be(buf, at + 1, len_bytes) else {
            return Head::Short(1 + len_bytes);
        };
        match kind {
            b'p' => Head::Sized {
                header: 1 + len_bytes + extra,
                payload: n as usize,
                children: 0,
            },
            b'a' => Head::Sized {
                header: 1 + len_bytes,
                payload: 0,
                children: n,
            },
            _ => Head::Sized {
                header: 1 + len_bytes,
                payload: 0,
                children: n * 2,
            },
        }
    };
    match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => fixed(1),
        0x80..=0x8f => Head::Sized {
            header: 1,
            payload: 0,
            children: u64::from(m & 0x0f) * 2,
        },
        0x90..=0x9f => Head::Sized {
            header: 1,
            payload: 0,
            children: u64::from(m & 0x0f),
        },
        0xa0..=0xbf => Head::Sized {
            header: 1,
            payload: usize::from(m & 0x1f),
            children: 0,
        },
        0xc1 => Head::Invalid,
        0xc4 | 0xd9 => sized(1, b'p', 0),
        0xc5 | 0xda => sized(2, b'p', 0),
        0xc6 | 0xdb => sized(4, b'p', 0),
        0xc7 => sized(1, b'p', 1),
        0xc8 => sized(2, b'p', 1),
        0xc9 => sized(4, b'p', 1),
        0xca => fixed(5),
        0xcb => fixed(9),
        0xcc | 0xd0 => fixed(2),
        0xcd | 0xd1 => fixed(3),
        0xce | 0xd2 => fixed(5),
        0xcf | 0xd3 => fixed(9),
        0xd4 => fixed(3),
        0xd5 => fixed(4),
        0xd6 => fixed(6),
        0xd7 => fixed(10),
        0xd8 => fixed(18),
        0xdc => sized(2, b'a', 0),
        0xdd => sized(4, b'a', 0),
        0xde => sized(2, b'm', 0),
        0xdf => sized(4, b'm', 0),
    }
}

/// Finds the length of the msgpack value that starts at `buf[0]`.
///
/// Runs in one pass with a counter instead of a stack, so deep nesting costs
/// nothing. A container that announces more children than there could be
/// bytes left in `limit` is reported as incomplete with a lower bound above
/// `limit`, which callers treat as "too large".
pub fn value_len(buf: &[u8]) -> Scan {
    let mut pos = 0usize;
    let mut pending: u64 = 1;
    while pending > 0 {
        match head(buf, pos) {
            Head::Invalid => return Scan::Invalid,
            Head::Short(n) => {
                return Scan::Incomplete {
                    at_least: pos.saturating_add(n).saturating_add(pending as usize - 1),
                };
            }
            Head::Sized {
                header,
                payload,
                children,
            } => {
                let end = pos.saturating_add(header).saturating_add(payload);
                pending = pending - 1 + children;
                if end > buf.len() {
                    return Scan::Incomplete {
                        at_least: end.saturating_add(pending.min(usize::MAX as u64) as usize),
                    };
                }
                pos = end;
            }
        }
    }
    Scan::Complete(pos)
}

/// A msgpack value's kind and, for scalars, its contents, read from a slice
/// that is known to hold the complete value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Item<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Ext(i8, &'a [u8]),
    Array(u32),
    Map(u32),
}

/// Error reading a value that should have been complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("value is truncated")]
    Truncated,
    #[error("reserved msgpack marker 0xc1")]
    Invalid,
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("its JSON would be larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Only from a transcode given a [`KeyRedactor`]: the value holds a
    /// key whose value must be hidden first (the caller redacts the
    /// msgpack, then transcodes that).
    #[error("it holds a value to redact")]
    Secret,
}

/// A cursor over a complete msgpack buffer.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    /// The bytes read since `start`, an earlier [`Reader::position`].
    pub fn since(&self, start: usize) -> &'a [u8] {
        self.buf.get(start..self.pos).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WalkError> {
        let end = self.pos.checked_add(n).ok_or(WalkError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(WalkError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, WalkError> {
        let s = self.take(n)?;
        Ok(s.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// Reads one header (and a scalar's payload). For arrays and maps the
    /// children follow and must be read or skipped by the caller.
    #[inline]
    pub fn item(&mut self) -> Result<Item<'a>, WalkError> {
        let m = self.take(1)?[0];
        Ok(match m {
            0x00..=0x7f => Item::UInt(u64::from(m)),
            0xe0..=0xff => Item::Int(i64::from(m as i8)),
            0x80..=0x8f => Item::Map(u32::from(m & 0x0f)),
            0x90..=0x9f => Item::Array(u32::from(m & 0x0f)),
            0xa0..=0xbf => Item::Str(self.take(usize::from(m & 0x1f))?),
            0xc0 => Item::Nil,
            0xc1 => return Err(WalkError::Invalid),
            0xc2 => Item::Bool(false),
            0xc3 => Item::Bool(true),
            0xc4..=0xc6 => {
                let n = self.uint(1 << (m - 0xc4))? as usize;
                Item::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.uint(1 << (m - 0xc7))? as usize;
                let t = self.take(1)?[0] as i8;
                Item::Ext(t, self.take(n)?)
            }
            0xca => Item::Float(f64::from(f32::from_bits(self.uint(4)? as u32))),
            0xcb => Item::Float(f64::from_bits(self.uint(8)?)),
            0xcc..=0xcf => Item::UInt(self.uint(1 << (m - 0xcc))?),
            0xd0 => Item::Int(i64::from(self.uint(1)? as u8 as i8)),
            0xd1 => Item::Int(i64::from(self.uint(2)? as u16 as i16)),
            0xd2 => Item::Int(i64::from(self.uint(4)? as u32 as i32)),
            0xd3 => Item::Int(self.uint(8)? as i64),
            0xd4..=0xd8 => {
                let t = self.take(1)?[0] as i8;
                Item::Ext(t, self.take(1 << (m - 0xd4))?)
            }
            0xd9..=0xdb => {
                let n = self.uint(1 << (m - 0xd9))? as usize;
                Item::Str(self.take(n)?)
            }
            0xdc => Item::Array(self.uint(2)? as u32),
            0xdd => Item::Array(self.uint(4)? as u32),
            0xde => Item::Map(self.uint(2)? as u32),
            0xdf => Item::Map(self.uint(4)? as u32),
        })
    }

    /// Skips one whole value and returns its bytes.
    pub fn skip(&mut self) -> Result<&'a [u8], WalkError> {
        let start = self.pos;
        match value_len(&self.buf[self.pos..]) {
            Scan::Complete(n) => {
                self.pos += n;
                Ok(&self.buf[start..self.pos])
            }
            Scan::Incomplete { .. } => Err(WalkError::Truncated),
            Scan::Invalid => Err(WalkError::Invalid),
        }
    }
}

/// Calls `f(key, value_bytes)` for each entry of the map in `buf` whose key is
/// a string. Values are handed over as raw msgpack slices. Returns false if
/// `buf` is not a map.
pub fn for_each_entry<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(&'a [u8], &'a [u8]),
) -> Result<bool, WalkError> {
    let mut r = Reader::new(buf);
    let Item::Map(n) = r.item()? else {
        return Ok(false);
    };
    for _ in 0..n {
        // Skip the key whole: a container key must not leave its children behind.
        let key = r.skip()?;
        let value = r.skip()?;
        if let Ok(Item::Str(k) | Item::Bin(k)) = Reader::new(key).item() {
            f(k, value);
        }
    }
    Ok(true)
}

/// Reads a string or bin value as UTF-8 text, if it is one.
pub fn as_str(value: &[u8]) -> Option<&str> {
    match Reader::new(value).item().ok()? {
        Item::Str(s) | Item::Bin(s) => std::str::from_utf8(s).ok(),
        _ => None,
    }
}

/// How JSON cannot say what msgpack can, and what we write instead.
///
/// * bin, and str that is not valid UTF-8: `{"__bytes__": "<base64>"}`, so the
///   bytes survive a round trip and a reader can tell them from text;
/// * ext type 78 (Salt's datetime, `%Y%m%dT%H:%M:%S.%f`): the ISO-8601 string;
/// * other ext types: `{"__ext__": <type>, "data": "<base64>"}`;
/// * NaN and infinities: `null` (Python writes `NaN`, which is not JSON);
/// * map keys, which JSON allows only as strings (see [`write_key`]): text
///   keys as they are; nil, bool and number keys as their JSON text, as
///   Python's `json.dumps` does (`"1"`, `"true"`, `"null"`); keys that are
///   not valid UTF-8 as `"__bytes__:<base64>"` and container keys (an array
///   or map used as a key) as `"__msgpack__:<base64 of their msgpack>"`, so
///   two distinct keys never collide and no key's size depends on its depth.
///
/// Separators are Python's `json.dumps` defaults (`", "` and `": "`), not the
/// compact form: Salt's readers match on the stored text (`get_jids_filter`
/// drops find_job jobs with `load NOT LIKE '%"fun": "saltutil.find_job"%'`),
/// and so does people's SQL. Non-ASCII text is kept as UTF-8, not escaped.
///
/// The output is linear in the input (at most [`MAX_EXPANSION`] times its
/// size plus a constant) and never longer than `limit`: past it the
/// transcode stops with [`WalkError::TooLarge`] before allocating more.
pub fn to_json(value: &[u8], limit: usize) -> Result<String, WalkError> {
    to_json_checked(value, limit, None)
}

/// [`to_json`], refusing with [`WalkError::Secret`] a value that holds a
/// key `redact` hides (unless its value already is `"***"`).
///
/// The walk stops at the first such key, so `Secret` says nothing of the
/// rest of the value: the redactor, which goes on, may still find it nested
/// too deep to walk ([`KeyRedactor::redact_msgpack`] then fails, and the
/// worker stores the event nowhere).
///
/// Why inside the transcoder: checking the keys as they are written is
/// what lets the worker skip a separate walk of every event for
/// `[sink] redact` (a fifth of its prepare stage on large returns). Almost
/// no event holds such a key; the few that do are redacted in their
/// msgpack ([`KeyRedactor::redact_msgpack`]) and transcoded again, so the
/// stored text and every other reader of the event see the same `***`.
pub fn to_json_checked(
    value: &[u8],
    limit: usize,
    redact: Option<&KeyRedactor>,
) -> Result<String, WalkError> {
    let mut w = JsonWriter::new(value.len(), limit, redact);
    let mut r = Reader::new(value);
    w.value(&mut r, 0)?;
    w.finish()
}

/// Like [`to_json_checked`] for a map, also returning where the JSON of
/// one top-level field's value lies in the output, so a caller that needs
/// both the whole map and that field (`full_ret` and `return`) transcodes
/// once.
pub fn to_json_with_field(
    value: &[u8],
    field: &str,
    limit: usize,
    redact: Option<&KeyRedactor>,
    mut tally: Option<&mut StatesTally>,
) -> Result<(String, Option<std::ops::Range<usize>>), WalkError> {
    let mut w = JsonWriter::new(value.len(), limit, redact);
    let mut r = Reader::new(value);
    let save = r.clone();
    let Item::Map(n) = r.item()? else {
        r = save;
        w.value(&mut r, 0)?;
        return Ok((w.finish()?, None));
    };
    let mut range = None;
    w.out.push(b'{');
    for i in 0..n {
        let text = w.entry_key(&mut r, i, 1)?;
        let start = w.out.len();
        if range.is_none() && text == Some(field.as_bytes()) {
            let at = r.position();
            match tally.take() {
                Some(t) if !w.hides(text) => {
                    w.states(&mut r, 1, t)?;
                    t.span = Some(at..r.position());
                }
                _ => w.entry(&mut r, text, 1)?,
            }
            range = Some(start..w.out.len());
        } else {
            w.entry(&mut r, text, 1)?;
        }
    }
    w.out.push(b'}');
    Ok((w.finish()?, range))
}

/// The most JSON one byte of msgpack can become (a fixext1 of 3 bytes is
/// about 35 characters of `{"__ext__": ...}`); the fuzz targets check it.
pub const MAX_EXPANSION: usize = 16;

/// The JSON text being written, and the most it may grow to.
///
/// It is built as bytes, not as a `String`: every piece written is ASCII or
/// a run of text checked to be UTF-8 once (see [`write_json_text`]), so the
/// transcode never validates the same string twice; [`JsonWriter::finish`]
/// turns the bytes into the `String` with one fast check over the whole.
struct JsonWriter<'r> {
    out: Vec<u8>,
    limit: usize,
    /// Keys whose values may not be written ([`to_json_checked`]).
    redact: Option<&'r KeyRedactor>,
}

impl<'r> JsonWriter<'r> {
    fn new(input: usize, limit: usize, redact: Option<&'r KeyRedactor>) -> JsonWriter<'r> {
        let guess = input.saturating_add(input / 4).saturating_add(16);
        JsonWriter {
            out: Vec::with_capacity(guess.min(limit)),
            limit,
            redact: redact.filter(|r| !r.is_empty()),
        }
    }

    /// The text written. Every piece pushed was ASCII or checked UTF-8, so
    /// the check cannot fail; were it ever to, the value is refused as
    /// invalid rather than stored as broken text.
    fn finish(self) -> Result<String, WalkError> {
        String::from_utf8(self.out).map_err(|_| WalkError::Invalid)
    }

    /// Refuses to write `more` bytes past the limit, before they are written.
    #[inline]
    fn room(&self, more: usize) -> Result<(), WalkError> {
        if self.out.len().saturating_add(more) > self.limit {
            return Err(WalkError::TooLarge { limit: self.limit });
        }
        Ok(())
    }

    /// Writes the `n` entries of a map whose header `r` has just read.
    fn map(&mut self, r: &mut Reader<'_>, n: u32, depth: usize) -> Result<(), WalkError> {
        self.out.push(b'{');
        for i in 0..n {
            let text = self.entry_key(r, i, depth)?;
            self.entry(r, text, depth)?;
        }
        self.out.push(b'}');
        Ok(())
    }

    /// Whether the value under this key may not be written.
    #[inline]
    fn hides(&self, key: Option<&[u8]>) -> bool {
        matches!((self.redact, key), (Some(r), Some(k)) if r.matches(k))
    }

    /// Appends the JSON of a map entry's value, whose key's text is `key`.
    ///
    /// This and the two helpers below are forced inline: they sit in the
    /// transcoder's recursion, and left to the compiler the worker's
    /// prepare stage ran 5-10% slower (`cargo bench --bench outcome --
    /// 'prepare per MB'`, alternated).
    #[inline(always)]
    fn entry(
        &mut self,
        r: &mut Reader<'_>,
        key: Option<&[u8]>,
        depth: usize,
    ) -> Result<(), WalkError> {
        if !self.hides(key) {
            return self.value(r, depth);
        }
        // Already hidden (this is the redacted msgpack, or the value was
        // `***` to begin with), or to be hidden first.
        if r.skip()? != crate::redact::MASK_MSGPACK {
            return Err(WalkError::Secret);
        }
        self.out.extend_from_slice(b"\"***\"");
        Ok(())
    }

    /// [`JsonWriter::value`] for a return's `return`, also counting its
    /// states into `t` as their fields are written (a highstate's states
    /// are most of a large return: walking them again for the outcome was
    /// a fifth of the worker's prepare stage).
    fn states(
        &mut self,
        r: &mut Reader<'_>,
        depth: usize,
        t: &mut StatesTally,
    ) -> Result<(), WalkError> {
        let Some(n) = self.open_map(r, depth)? else {
            t.not_a_state();
            return self.value(r, depth);
        };
        for i in 0..n {
            let text = self.entry_key(r, i, depth + 1)?;
            let state = t.state(text);
            if state
                && !self.hides(text)
                && let Some(m) = self.open_map(r, depth + 1)?
            {
                for j in 0..m {
                    let key = self.entry_key(r, j, depth + 2)?;
                    let start = r.position();
                    self.entry(r, key, depth + 2)?;
                    t.field(key, r.since(start));
                }
                self.out.push(b'}');
                self.room(0)?;
                t.end_state();
                continue;
            }
            if state {
                t.not_a_state();
            }
            self.entry(r, text, depth + 1)?;
        }
        self.out.push(b'}');
        self.room(0)
    }

    /// If the next value is a map, checks it as [`JsonWriter::value`]
    /// would, reads its header and writes `{`, giving its length; else
    /// leaves `r` where it is.
    #[inline(always)]
    fn open_map(&mut self, r: &mut Reader<'_>, depth: usize) -> Result<Option<u32>, WalkError> {
        let mut peek = r.clone();
        let Item::Map(n) = peek.item()? else {
            return Ok(None);
        };
        if depth > MAX_DEPTH {
            return Err(WalkError::TooDeep);
        }
        self.room((peek.position() - r.position()).saturating_sub(9))?;
        *r = peek;
        self.out.push(b'{');
        Ok(Some(n))
    }

    /// Writes the `i`th key of a map (after a separator unless it is the
    /// first) and the `: ` after it; gives the key's text as [`JsonWriter::key`].
    /// `depth` is the key's own depth in the whole value (that of its map's
    /// entries), for the secrets check of a key that is a container.
    #[inline(always)]
    fn entry_key<'a>(
        &mut self,
        r: &mut Reader<'a>,
        i: u32,
        depth: usize,
    ) -> Result<Option<&'a [u8]>, WalkError> {
        if i > 0 {
            self.out.extend_from_slice(b", ");
        }
        let text = self.key(r, depth)?;
        self.out.extend_from_slice(b": ");
        Ok(text)
    }

    /// Appends the JSON of the next value in `r`.
    fn value(&mut self, r: &mut Reader<'_>, depth: usize) -> Result<(), WalkError> {
        if depth > MAX_DEPTH {
            return Err(WalkError::TooDeep);
        }
        // A value's JSON is never shorter than its msgpack (less its
        // header), and at most a few times longer: refuse one that cannot
        // fit before writing it, and stop after one that did not.
        let before = r.position();
        let item = r.item()?;
        self.room((r.position() - before).saturating_sub(9))?;
        let out = &mut self.out;
        match item {
            Item::Nil => out.extend_from_slice(b"null"),
            Item::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
            Item::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
            Item::UInt(u) => out.extend_from_slice(itoa::Buffer::new().format(u).as_bytes()),
            Item::Float(f) => write_float(out, f),
            Item::Str(s) => {
                if !write_json_text(out, s) {
                    write_bytes(out, s);
                }
            }
            Item::Bin(b) => write_bytes(out, b),
            Item::Ext(t, data) => write_ext(out, t, data),
            Item::Array(n) => {
                out.push(b'[');
                for i in 0..n {
                    if i > 0 {
                        self.out.extend_from_slice(b", ");
                    }
                    self.value(r, depth + 1)?;
                }
                self.out.push(b']');
            }
            Item::Map(n) => self.map(r, n, depth + 1)?,
        }
        self.room(0)
    }

    /// Writes the next value in `r` as a JSON object key: always one JSON
    /// string, of a size linear in the key's own bytes whatever it holds
    /// (a key that is itself a map of maps is not rendered as JSON and
    /// quoted again at every level: that doubled the output per level).
    ///
    /// Returns the key's text when it is a str (or bin) key: the one kind
    /// `[sink] redact` and the captured field are matched against.
    fn key<'a>(&mut self, r: &mut Reader<'a>, depth: usize) -> Result<Option<&'a [u8]>, WalkError> {
        let start = r.position();
        let save = r.clone();
        let item = r.item()?;
        self.room((r.position() - start).saturating_sub(9))?;
        match item {
            Item::Str(s) | Item::Bin(s) => {
                if !write_json_text(&mut self.out, s) {
                    self.marked_key("__bytes__:", s);
                }
                self.room(0)?;
                return Ok(Some(s));
            }
            Item::Array(_) | Item::Map(_) => {
                *r = save;
                let raw = r.skip()?;
                // Written as its msgpack's base64: a secret inside it would
                // be stored as it is, so it is looked into (rare: a key
                // that is a map or a list), at its depth in the whole
                // value, as the redactor's walk of the whole counts it: the
                // two agree on what is nested too deep (the `json` fuzz
                // target checks it).
                if let Some(redact) = self.redact
                    && redact.redact_msgpack_at(raw, depth)?.is_some()
                {
                    return Err(WalkError::Secret);
                }
                self.room(raw.len())?;
                self.marked_key("__msgpack__:", raw);
            }
            scalar => {
                // nil, bool, numbers: their JSON text, as Python's json
                // does; an ext: its JSON form, which holds quotes, quoted
                // once. Keys like these are rare: a scratch buffer is fine.
                let mut inner = Vec::new();
                match scalar {
                    Item::Nil => inner.extend_from_slice(b"null"),
                    Item::Bool(b) => inner.extend_from_slice(if b { b"true" } else { b"false" }),
                    Item::Int(i) => {
                        inner.extend_from_slice(itoa::Buffer::new().format(i).as_bytes())
                    }
                    Item::UInt(u) => {
                        inner.extend_from_slice(itoa::Buffer::new().format(u).as_bytes())
                    }
                    Item::Float(f) => write_float(&mut inner, f),
                    Item::Ext(t, data) => write_ext(&mut inner, t, data),
                    _ => {}
                }
                // `inner` is ASCII or escaped UTF-8 text, so this holds.
                if !write_json_text(&mut self.out, &inner) {
                    self.marked_key("__bytes__:", &inner);
                }
            }
        }
        self.room(0)?;
        Ok(None)
    }

    /// `"<mark><base64 of bytes>"`: a key JSON cannot hold as text.
    fn marked_key(&mut self, mark: &str, bytes: &[u8]) {
        self.out.push(b'"');
        self.out.extend_from_slice(mark.as_bytes());
        encode_base64(&mut self.out, bytes);
        self.out.push(b'"');
    }
}

/// Appends base64 of `bytes` (the `base64` crate writes into a `String`
/// only; its slice encoder into our spare capacity does the same here).
fn encode_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let engine = &base64::engine::general_purpose::STANDARD;
    let at = out.len();
    let n = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    out.resize(at + n, 0);
    let written = engine.encode_slice(bytes, &mut out[at..]).unwrap_or(0);
    out.truncate(at + written);
}

fn write_float(out: &mut Vec<u8>, f: f64) {
    if f.is_finite() {
        // The shortest text that round-trips, as serde_json writes it
        // (serde_json calls this same formatter).
        out.extend_from_slice(zmij::Buffer::new().format_finite(f).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// Appends `s` as a JSON string literal if it is UTF-8 text, and returns
/// true; returns false and appends nothing if it is not.
///
/// One pass does both jobs, because most of Salt's strings are short ASCII
/// (state ids, comments, keys) and a separate UTF-8 check per string cost a
/// tenth of the transcode: eight bytes at a time are skipped while none
/// needs an escape and none is non-ASCII; the first non-ASCII byte checks
/// the rest of the string as UTF-8 once, and from there only escapes stop
/// the skip (UTF-8's multibyte sequences never hold an ASCII byte).
fn write_json_text(out: &mut Vec<u8>, s: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mark = out.len();
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut high = HIGH;
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        if let Some(word) = s.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
            // The lowest flagged byte is exact (see `escape_mask`), so the
            // skip goes straight to it.
            let hits = escape_mask(w) | (w & high);
            if hits == 0 {
                i += 8;
                continue;
            }
            i += (hits.trailing_zeros() / 8) as usize;
        }
        let b = s[i];
        if b >= 0x80 {
            if high != 0 {
                if std::str::from_utf8(&s[i..]).is_err() {
                    out.truncate(mark);
                    return false;
                }
                high = 0;
            }
            i += 1;
            continue;
        }
        // Python's json.dumps (ensure_ascii=False, as salt.utils.json.dumps
        // calls it): these short forms, \u00XX for the other controls.
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ],
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(esc);
        i += 1;
        start = i;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
    true
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Which of the eight bytes in `w` are a control character, `"` or `\\`:
/// a byte's high bit is set in the mask where it matches (SWAR). Bytes of
/// 0x80 and above never match, so UTF-8 passes through. A borrow can flag
/// a byte above a true match, never below one: the lowest flag is exact.
#[inline]
fn escape_mask(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    below_space | has_zero(w ^ (ONES * b'"' as u64)) | has_zero(w ^ (ONES * b'\\' as u64))
}

fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(b"{\"__bytes__\": \"");
    encode_base64(out, b);
    out.extend_from_slice(b"\"}");
}

fn write_ext(out: &mut Vec<u8>, t: i8, data: &[u8]) {
    if t == 78
        && let Some(iso) = std::str::from_utf8(data).ok().and_then(salt_datetime_iso)
    {
        write_json_text(out, iso.as_bytes());
        return;
    }
    out.extend_from_slice(b"{\"__ext__\": ");
    out.extend_from_slice(itoa::Buffer::new().format(t).as_bytes());
    out.extend_from_slice(b", \"data\": \"");
    encode_base64(out, data);
    out.extend_from_slice(b"\"}");
}

/// Turns Salt's packed datetime `20261125T12:00:01.123456` into
/// `2026-11-25T12:00:01.123456`.
fn salt_datetime_iso(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.len() < 17 || b[8] != b'T' || !b[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(format!("{}-{}-{}{}", &s[0..4], &s[4..6], &s[6..8], &s[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encode");
        out
    }

    #[test]
    fn value_len_matches_encoded_length_for_every_kind() {
        use rmpv::Value as V;
        let values = vec![
            V::Nil,
            V::Boolean(true),
            V::from(5),
            V::from(-3),
            V::from(300),
            V::from(-300),
            V::from(70000),
            V::from(u64::MAX),
            V::from(i64::MIN),
            V::F32(1.5),
            V::F64(2.25),
            V::from("x".repeat(31)),
            V::from("x".repeat(300)),
            V::from("x".repeat(70000)),
            V::Binary(vec![1; 300]),
            V::Ext(78, b"20261125T12:00:00.000001".to_vec()),
            V::Ext(5, vec![1]),
            V::Ext(5, vec![1; 16]),
            V::Ext(5, vec![1; 17]),
            V::Array((0..20).map(V::from).collect()),
            V::Map((0..20).map(|i| (V::from(i), V::from("v"))).collect()),
        ];
        for v in values {
            let b = enc(&v);
            assert_eq!(value_len(&b), Scan::Complete(b.len()), "{v:?}");
            for cut in 0..b.len() {
                assert!(
                    matches!(value_len(&b[..cut]), Scan::Incomplete { at_least } if at_least > cut),
                    "{v:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn huge_declared_container_is_incomplete_not_a_hang() {
        let b = [0xdf, 0xff, 0xff, 0xff, 0xff];
        match value_len(&b) {
            Scan::Incomplete { at_least } => assert!(at_least > 1_000_000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reserved_marker_is_invalid() {
        assert_eq!(value_len(&[0xc1]), Scan::Invalid);
        assert_eq!(value_len(&[0x92, 0x01, 0xc1]), Scan::Invalid);
    }

    #[test]
    fn strings_escape_as_python_json_dumps_does() {
        // What `json.dumps(s, ensure_ascii=False)` writes, for every ASCII
        // byte alone and at each position of a long run (the 8-byte skip).
        let python = |b: u8| match b {
            b'"' => "\\\"".to_string(),
            b'\\' => "\\\\".to_string(),
            b'\n' => "\\n".to_string(),
            b'\r' => "\\r".to_string(),
            b'\t' => "\\t".to_string(),
            0x08 => "\\b".to_string(),
            0x0c => "\\f".to_string(),
            0..=0x1f => format!("\\u{b:04x}"),
            _ => (b as char).to_string(),
        };
        for b in 0u8..0x80 {
            for at in 0..20 {
                let mut text = "é".repeat(3) + &"a".repeat(at);
                text.push(b as char);
                text.push_str("zzzzzzzzzz");
                let mut out = Vec::new();
                assert!(write_json_text(&mut out, text.as_bytes()));
                let out = String::from_utf8(out).expect("utf-8");
                let want = format!(
                    "\"{}{}{}zzzzzzzzzz\"",
                    "é".repeat(3),
                    "a".repeat(at),
                    python(b)
                );
                assert_eq!(out, want, "byte {b:#x} after {at} bytes");
            }
        }
        let mut out = Vec::new();
        assert!(write_json_text(
            &mut out,
            "🧂 \u{2028} \u{7f}\u{80}".as_bytes()
        ));
        let out = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            out, "\"🧂 \u{2028} \u{7f}\u{80}\"",
            "non-ASCII and DEL as they are"
        );
    }

    #[test]
    fn json_policy() {
        use rmpv::Value as V;
        let v = V::Map(vec![
            (V::from("s"), V::from("a\"b\n\u{1F600}")),
            (V::from("b"), V::Binary(b"\xff\x00".to_vec())),
            (V::from(1), V::from(true)),
            (V::from("dt"), V::Ext(78, b"20261125T12:00:01.5".to_vec())),
            (V::from("e"), V::Ext(3, vec![7])),
            (V::from("f"), V::F64(f64::NAN)),
            (V::from("big"), V::from(u64::MAX)),
            (
                V::from("l"),
                V::Array(vec![V::Nil, V::F64(0.1), V::from(-7)]),
            ),
        ]);
        let json = to_json(&enc(&v), usize::MAX).expect("json");
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid json");
        assert_eq!(parsed["s"], "a\"b\n\u{1F600}");
        assert_eq!(parsed["b"]["__bytes__"], "/wA=");
        assert_eq!(parsed["1"], true);
        assert_eq!(parsed["dt"], "2026-11-25T12:00:01.5");
        assert_eq!(parsed["e"]["__ext__"], 3);
        assert!(parsed["f"].is_null());
        assert_eq!(parsed["big"], u64::MAX);
        assert_eq!(parsed["l"], serde_json::json!([null, 0.1, -7]));
    }

    #[test]
    fn invalid_utf8_str_becomes_bytes_marker() {
        let mut b = vec![0xa2, 0xc3, 0x28];
        let json = to_json(&b, usize::MAX).expect("json");
        assert_eq!(json, r#"{"__bytes__": "wyg="}"#);
        b[0] = 0xc1;
        assert!(to_json(&b, usize::MAX).is_err());
    }

    #[test]
    fn field_range_points_at_the_field_json() {
        use rmpv::Value as V;
        let v = V::Map(vec![
            (V::from("id"), V::from("m")),
            (
                V::from("return"),
                V::Map(vec![(V::from("a"), V::Array(vec![V::from(1), V::Nil]))]),
            ),
            (V::from("x"), V::from(2)),
        ]);
        let (json, range) =
            to_json_with_field(&enc(&v), "return", usize::MAX, None, None).expect("json");
        assert_eq!(json, to_json(&enc(&v), usize::MAX).expect("json"));
        assert_eq!(&json[range.expect("found")], r#"{"a": [1, null]}"#);
        let (_, none) = to_json_with_field(&enc(&v), "nope", usize::MAX, None, None).expect("json");
        assert!(none.is_none());
        let (json, none) =
            to_json_with_field(&enc(&V::from(5)), "return", usize::MAX, None, None).expect("json");
        assert_eq!((json.as_str(), none), ("5", None));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut b = vec![0x91; 100_000];
        b.push(0xc0);
        assert_eq!(value_len(&b), Scan::Complete(b.len()));
        assert_eq!(to_json(&b, usize::MAX), Err(WalkError::TooDeep));
    }

    #[test]
    fn entries_and_strings() {
        use rmpv::Value as V;
        let v = V::Map(vec![
            (V::from("fun"), V::from("cmd.run")),
            (V::from("return"), V::Map(vec![(V::from("a"), V::from(1))])),
        ]);
        let b = enc(&v);
        let mut seen = vec![];
        assert!(for_each_entry(&b, |k, val| seen.push((k.to_vec(), val.to_vec()))).expect("walk"));
        assert_eq!(seen.len(), 2);
        assert_eq!(as_str(&seen[0].1), Some("cmd.run"));
        assert_eq!(
            to_json(&seen[1].1, usize::MAX).expect("json"),
            r#"{"a": 1}"#
        );
    }

    /// A map used as a key, nested `depth` levels: `{{{...: 1}: 1}: 1}`.
    fn nested_key(depth: usize) -> Vec<u8> {
        let mut b = vec![0xc0];
        for _ in 0..depth {
            let mut m = vec![0x81];
            m.extend(&b);
            m.push(0x01);
            b = m;
        }
        b
    }

    #[test]
    fn container_keys_are_written_in_linear_size() {
        // 30 levels was a 2 GiB allocation (the key's JSON quoted again at
        // every level); now each level adds a few bytes.
        for depth in [1, 22, 30, 200] {
            let b = nested_key(depth);
            let json = to_json(&b, usize::MAX).expect("json");
            assert!(
                json.len() <= MAX_EXPANSION * b.len() + 64,
                "{depth}: {}",
                json.len()
            );
            let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid json");
            let key = parsed
                .as_object()
                .expect("map")
                .keys()
                .next()
                .expect("key")
                .clone();
            if depth > 1 {
                let raw = key.strip_prefix("__msgpack__:").expect("marked");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .expect("base64");
                assert_eq!(bytes, b[1..b.len() - 1], "the key's own msgpack, lossless");
            }
        }
    }

    #[test]
    fn distinct_keys_stay_distinct() {
        use rmpv::Value as V;
        // Two invalid-UTF-8 keys that a lossy conversion turned into the
        // same "\u{fffd}" text, a bin key, a str key, and scalar keys.
        let mut b = vec![0x87, 0xa1, 0xff, 0x01, 0xa1, 0xfe, 0x02];
        for (k, v) in [
            (V::Binary(vec![0xfd]), V::from(3)),
            (V::from("t"), V::from(4)),
            (V::from(7), V::from(5)),
            (V::Nil, V::from(6)),
            (V::Array(vec![V::from(1)]), V::from(7)),
        ] {
            b.extend(enc(&k));
            b.extend(enc(&v));
        }
        let json = to_json(&b, usize::MAX).expect("json");
        let parsed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&json).expect("valid json");
        assert_eq!(parsed.len(), 7, "{json}");
        assert_eq!(parsed["__bytes__:/w=="], 1);
        assert_eq!(parsed["__bytes__:/g=="], 2);
        assert_eq!(parsed["__bytes__:/Q=="], 3);
        assert_eq!(parsed["7"], 5);
        assert_eq!(parsed["null"], 6);
        assert_eq!(parsed["__msgpack__:kQE="], 7);
    }

    #[test]
    fn output_over_the_limit_is_an_error_not_an_allocation() {
        use rmpv::Value as V;
        let v = V::Map(vec![(V::from("return"), V::from("x".repeat(10_000)))]);
        let b = enc(&v);
        assert_eq!(to_json(&b, 1000), Err(WalkError::TooLarge { limit: 1000 }));
        assert_eq!(
            to_json_with_field(&b, "return", 1000, None, None).map(|_| ()),
            Err(WalkError::TooLarge { limit: 1000 })
        );
        let json = to_json(&b, 10_100).expect("fits");
        assert!(json.len() <= 10_100);
        // Many small values: checked as they are written, too.
        let many = V::Array((0..10_000).map(|_| V::Nil).collect());
        assert_eq!(
            to_json(&enc(&many), 5000),
            Err(WalkError::TooLarge { limit: 5000 })
        );
    }

    proptest::proptest! {
        #[test]
        fn text_is_escaped_as_python_or_refused(
            prefix in 0usize..20,
            body in proptest::collection::vec(proptest::prop_oneof![
                proptest::num::u8::ANY,
                proptest::sample::select(vec![b'a', b'"', b'\\', b'\n', 0x01, 0xc3, 0xa9, 0xe2, 0x80]),
            ], 0..64),
        ) {
            // The fused scan against the plain definition: UTF-8 or not,
            // then each char escaped as json.dumps(ensure_ascii=False) does.
            let mut s = vec![b'x'; prefix];
            s.extend_from_slice(&body);
            let mut out = b"kept".to_vec();
            let ok = write_json_text(&mut out, &s);
            match std::str::from_utf8(&s) {
                Ok(text) => {
                    let mut want = String::from("kept\"");
                    for c in text.chars() {
                        match c {
                            '"' => want.push_str("\\\""),
                            '\\' => want.push_str("\\\\"),
                            '\n' => want.push_str("\\n"),
                            '\r' => want.push_str("\\r"),
                            '\t' => want.push_str("\\t"),
                            '\u{8}' => want.push_str("\\b"),
                            '\u{c}' => want.push_str("\\f"),
                            c if (c as u32) < 0x20 => want.push_str(&format!("\\u{:04x}", c as u32)),
                            c => want.push(c),
                        }
                    }
                    want.push('"');
                    proptest::prop_assert!(ok);
                    proptest::prop_assert_eq!(String::from_utf8(out).expect("utf-8"), want);
                }
                Err(_) => {
                    proptest::prop_assert!(!ok);
                    proptest::prop_assert_eq!(out, b"kept".to_vec());
                }
            }
        }

        #[test]
        fn json_is_valid_and_linear_in_the_input(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Scan::Complete(n) = value_len(&data) {
                let v = &data[..n];
                if let Ok(json) = to_json(v, usize::MAX) {
                    proptest::prop_assert!(json.len() <= MAX_EXPANSION * v.len() + 64, "{} bytes -> {}", v.len(), json.len());
                    proptest::prop_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{}", json);
                }
            }
        }
    }
}
