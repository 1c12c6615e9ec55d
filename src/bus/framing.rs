//! Cutting the bus's byte stream into frames.
//!
//! Salt 3007, 3008 and 3006.0-3006.25 write bare msgpack maps back to back;
//! 3006.26+ puts a 4-byte big-endian length in front of each. One rule reads
//! both (see `shared/SALT.md`): a map marker starts a bare frame, anything
//! else is a length. Events are capped near 1 MiB by the master, so a real
//! length's first byte is 0x00 and never a map marker.
//!
//! The framer never trusts the stream: a frame larger than `max_frame` is
//! skipped without being buffered whole, and garbage is stepped over until
//! the next place that looks like the start of an event (`{"head": …` or
//! `{"body": …`), so one bad byte costs one counted rejection, not the
//! connection and everything the master had buffered for us.

use crate::msgpack::{self, Scan};
use bytes::{Buf, Bytes, BytesMut};

/// What the framer found next in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// One complete frame: the bytes of a msgpack map.
    Frame(Bytes),
    /// Bytes that could not be a frame were skipped.
    Garbage { skipped: usize, excerpt: String },
    /// A frame larger than the limit was (or is being) skipped.
    Oversized { len: usize },
}

#[derive(Debug)]
enum State {
    Normal,
    /// Throwing away the rest of an oversized length-prefixed frame.
    Discard {
        remaining: usize,
    },
    /// Lost sync inside an oversized bare frame: skip to the next frame start.
    Resync,
}

/// Incremental frame splitter: feed it bytes with [`Framer::buffer_mut`],
/// then drain it with [`Framer::next_frame`].
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    max_frame: usize,
    state: State,
}

/// Where a frame header would start: a map marker right before the key
/// `head` or `body`, which Salt always packs first.
const HEAD_KEY: &[u8] = b"\xa4head";
const BODY_KEY: &[u8] = b"\xa4body";

fn is_map_marker(b: u8) -> bool {
    matches!(b, 0x80..=0x8f | 0xde | 0xdf)
}

/// Short hex excerpt of bad bytes, for logs.
pub fn hex_excerpt(b: &[u8]) -> String {
    let mut s = String::with_capacity(3 * 16);
    for (i, x) in b.iter().take(16).enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{x:02x}"));
    }
    if b.len() > 16 {
        s.push_str(" …");
    }
    s
}

impl Framer {
    pub fn new(max_frame: usize) -> Self {
        Framer {
            buf: BytesMut::with_capacity(64 * 1024),
            max_frame: max_frame.max(64),
            state: State::Normal,
        }
    }

    /// The buffer to read more bytes into.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes held but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets a partial frame, e.g. after the connection dropped.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.state = State::Normal;
    }

    /// Position of the next plausible frame start at or after `from`:
    /// either a bare map `{"head"|"body": …`, or a length prefix before one.
    fn next_start(&self, from: usize) -> Option<usize> {
        let b = &self.buf[..];
        (from..b.len()).find_map(|i| {
            if frame_start(b, i) != Some(true) {
                return None;
            }
            // A length prefix may stand 4 bytes before the map.
            if i >= from + 4 && b[i - 4] == 0 {
                let len = u32::from_be_bytes([b[i - 4], b[i - 3], b[i - 2], b[i - 1]]) as usize;
                if len > 0 && len <= self.max_frame {
                    return Some(i - 4);
                }
            }
            Some(i)
        })
    }

    /// Skips to the next plausible frame start (or keeps the last few bytes,
    /// which could be the beginning of one) and reports what was skipped.
    fn skip_garbage(&mut self, at_least: usize) -> Framed {
        let cut = match self.next_start(at_least.max(1)) {
            Some(p) => p,
            None => self
                .buf
                .len()
                .saturating_sub(KEEP_TAIL)
                .max(at_least.min(self.buf.len())),
        };
        let excerpt = hex_excerpt(&self.buf[..cut.min(self.buf.len())]);
        self.buf.advance(cut);
        Framed::Garbage {
            skipped: cut,
            excerpt,
        }
    }

    /// Returns the next complete item, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Framed> {
        loop {
            match self.state {
                State::Discard { remaining } => {
                    let n = remaining.min(self.buf.len());
                    self.buf.advance(n);
                    if n < remaining {
                        self.state = State::Discard {
                            remaining: remaining - n,
                        };
                        return None;
                    }
                    self.state = State::Normal;
                    continue;
                }
                State::Resync => match self.next_start(0) {
                    Some(p) => {
                        self.buf.advance(p);
                        self.state = State::Normal;
                        continue;
                    }
                    None => {
                        let keep = KEEP_TAIL.min(self.buf.len());
                        let drop = self.buf.len() - keep;
                        self.buf.advance(drop);
                        return None;
                    }
                },
                State::Normal => {}
            }
            let first = *self.buf.first()?;
            if is_map_marker(first) {
                match frame_start(&self.buf, 0) {
                    None => return None,
                    Some(false) => return Some(self.skip_garbage(1)),
                    Some(true) => {}
                }
                match msgpack::value_len(&self.buf) {
                    Scan::Complete(n) if has_body(&self.buf[..n]) => {
                        return Some(Framed::Frame(self.buf.split_to(n).freeze()));
                    }
                    // A map, but not a frame: step over one byte only, so
                    // garbage that happens to parse cannot eat real frames.
                    Scan::Complete(_) => return Some(self.skip_garbage(1)),
                    Scan::Incomplete { at_least } => {
                        if at_least > self.max_frame {
                            // Too large to hold, and we cannot know where a
                            // bare frame ends without reading it all: drop
                            // what we have and look for the next start.
                            self.buf.clear();
                            self.state = State::Resync;
                            return Some(Framed::Oversized { len: at_least });
                        }
                        return None;
                    }
                    Scan::Invalid => return Some(self.skip_garbage(1)),
                }
            }
            // A length prefix: 0 < len <= 1 GiB, then a frame start.
            if self.buf.len() < 4 {
                return None;
            }
            let len =
                u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len == 0 || len > MAX_PLAUSIBLE_FRAME {
                return Some(self.skip_garbage(1));
            }
            match frame_start(&self.buf, 4) {
                None => return None,
                Some(false) => return Some(self.skip_garbage(1)),
                Some(true) => {}
            }
            // Check the length against the map behind it with the bytes we
            // have, so a bogus prefix is found at once rather than after
            // waiting for `len` bytes to arrive.
            let end = self.buf.len().min(4 + len);
            match msgpack::value_len(&self.buf[4..end]) {
                Scan::Complete(n) if n == len && has_body(&self.buf[4..end]) => {}
                Scan::Incomplete { at_least } if at_least <= len => {
                    // Only call it oversized once the map itself says it is
                    // longer than we keep; until then it may be a bogus
                    // prefix in front of small frames.
                    if len > self.max_frame && at_least > self.max_frame {
                        self.buf.advance(4);
                        self.state = State::Discard { remaining: len };
                        return Some(Framed::Oversized { len });
                    }
                    return None;
                }
                // A bogus length: step over one byte rather than `len`, so a
                // wrong prefix cannot swallow the good frames behind it.
                _ => return Some(self.skip_garbage(1)),
            }
            self.buf.advance(4);
            return Some(Framed::Frame(self.buf.split_to(len).freeze()));
        }
    }
}

/// Bytes kept when skipping: the longest frame start we must recognise
/// (a length, a map32 header, a 5-byte key) could begin in them.
const KEEP_TAIL: usize = 13;

/// Lengths above this are never a frame (the largest `max_frame` allowed).
const MAX_PLAUSIBLE_FRAME: usize = 1 << 30;

/// Whether a complete map has a `body` key holding bin or str.
fn has_body(map: &[u8]) -> bool {
    let mut ok = false;
    let _ = msgpack::for_each_entry(map, |k, v| {
        if k == b"body" {
            ok = matches!(v.first(), Some(0xa0..=0xbf | 0xc4..=0xc6 | 0xd9..=0xdb));
        }
    });
    ok
}

/// Whether a frame starts at `b[at]`: a map whose first key is "head" or
/// "body", as Salt packs every frame. None: not enough bytes to tell.
fn frame_start(b: &[u8], at: usize) -> Option<bool> {
    // Salt's frame has two keys; an encoder writes that as a fixmap, so a
    // map16/map32 header is never a frame start (and is common in garbage).
    let m = *b.get(at)?;
    let header = match m {
        0x81..=0x84 => 1,
        _ => return Some(false),
    };
    let key = b.get(at + header..at + header + HEAD_KEY.len());
    match key {
        Some(k) => Some(k == HEAD_KEY || k == BODY_KEY),
        None => {
            // Check the bytes we have: a mismatch already says no.
            let have = b.get(at + header..).unwrap_or_default();
            if HEAD_KEY.starts_with(have) || BODY_KEY.starts_with(have) {
                None
            } else {
                Some(false)
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::encode::{frame_bytes, length_prefixed};

    fn drain(f: &mut Framer) -> Vec<Framed> {
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    fn feed_all(input: &[u8], chunk: usize, max: usize) -> Vec<Framed> {
        let mut f = Framer::new(max);
        let mut out = vec![];
        for c in input.chunks(chunk.max(1)) {
            f.buffer_mut().extend_from_slice(c);
            out.extend(drain(&mut f));
        }
        out
    }

    fn frames_of(items: &[Framed]) -> Vec<Bytes> {
        items
            .iter()
            .filter_map(|i| match i {
                Framed::Frame(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn bare_frames_split_at_every_byte_boundary() {
        let a = frame_bytes("salt/job/1/ret/m1", &[("fun", "test.ping")]);
        let b = frame_bytes("salt/job/2/new", &[("fun", "cmd.run")]);
        let mut all = a.clone();
        all.extend_from_slice(&b);
        for split in 0..=all.len() {
            let mut f = Framer::new(1 << 20);
            f.buffer_mut().extend_from_slice(&all[..split]);
            let mut got = drain(&mut f);
            f.buffer_mut().extend_from_slice(&all[split..]);
            got.extend(drain(&mut f));
            assert_eq!(
                frames_of(&got),
                vec![Bytes::from(a.clone()), Bytes::from(b.clone())],
                "split {split}"
            );
            assert_eq!(got.len(), 2);
        }
    }

    #[test]
    fn length_prefixed_frames_split_at_every_byte_boundary() {
        let a = frame_bytes("salt/job/1/ret/m1", &[("fun", "test.ping")]);
        let b = frame_bytes("salt/auth", &[("id", "m2")]);
        let mut all = length_prefixed(&a);
        all.extend(length_prefixed(&b));
        for split in 0..=all.len() {
            let mut f = Framer::new(1 << 20);
            f.buffer_mut().extend_from_slice(&all[..split]);
            let mut got = drain(&mut f);
            f.buffer_mut().extend_from_slice(&all[split..]);
            got.extend(drain(&mut f));
            assert_eq!(
                frames_of(&got),
                vec![Bytes::from(a.clone()), Bytes::from(b.clone())],
                "split {split}"
            );
        }
    }

    #[test]
    fn byte_by_byte_feed() {
        let a = frame_bytes("salt/job/1/ret/m1", &[("fun", "test.ping")]);
        let mut all = a.repeat(3);
        all.extend(length_prefixed(&a));
        let got = feed_all(&all, 1, 1 << 20);
        assert_eq!(frames_of(&got).len(), 4);
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn frames_of_several_megabytes() {
        let big = "x".repeat(6 << 20);
        let a = frame_bytes("salt/job/1/ret/m1", &[("return", big.as_str())]);
        let b = frame_bytes("salt/job/1/ret/m2", &[("fun", "test.ping")]);
        let mut all = a.clone();
        all.extend(length_prefixed(&a));
        all.extend(&b);
        let got = feed_all(&all, 64 * 1024, 16 << 20);
        assert_eq!(
            frames_of(&got),
            vec![Bytes::from(a.clone()), Bytes::from(a), Bytes::from(b)]
        );
    }

    #[test]
    fn garbage_between_frames_is_skipped_and_reported() {
        let a = frame_bytes("salt/job/1/ret/m1", &[("fun", "test.ping")]);
        let b = frame_bytes("salt/job/2/ret/m1", &[("fun", "test.ping")]);
        for garbage in [
            &b"\xc1\xc1\xc1"[..],
            b"hello world",
            b"\x81\xa3foo\x01",
            b"\xff\xff\xff\xff\xff\xff\xff",
            b"\x00\x00\x00\x05\xc1abcd",
            b"\x93\x01\x02",
        ] {
            let mut all = a.clone();
            all.extend_from_slice(garbage);
            all.extend(&b);
            all.extend(length_prefixed(&a));
            for chunk in [1, 7, 4096] {
                let got = feed_all(&all, chunk, 1 << 20);
                let frames = frames_of(&got);
                // A garbage map that parses is a "frame" here; decoding rejects it later.
                let real: Vec<_> = frames
                    .iter()
                    .filter(|f| f.windows(4).any(|w| w == b"body"))
                    .collect();
                assert_eq!(real.len(), 3, "garbage {garbage:?} chunk {chunk}: {got:?}");
                let bad = got.len() - real.len();
                assert!(bad >= 1, "garbage {garbage:?} not reported");
            }
        }
    }

    #[test]
    fn oversized_frames_are_skipped_without_buffering_them_whole() {
        let big = "y".repeat(3 << 20);
        let a = frame_bytes("salt/job/1/ret/m1", &[("return", big.as_str())]);
        let b = frame_bytes("salt/job/2/ret/m1", &[("fun", "test.ping")]);
        for prefixed in [false, true] {
            let mut all = if prefixed {
                length_prefixed(&a)
            } else {
                a.clone()
            };
            all.extend(if prefixed {
                length_prefixed(&b)
            } else {
                b.clone()
            });
            let mut f = Framer::new(1 << 20);
            let mut got = vec![];
            let mut peak = 0;
            for c in all.chunks(64 * 1024) {
                f.buffer_mut().extend_from_slice(c);
                peak = peak.max(f.buffered());
                got.extend(drain(&mut f));
            }
            assert!(peak < 2 << 20, "buffered {peak}");
            assert!(matches!(got[0], Framed::Oversized { .. }), "{got:?}");
            assert_eq!(frames_of(&got), vec![Bytes::from(b.clone())]);
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), chunk in 1usize..300) {
            // Whatever comes out as a frame is one whole msgpack map.
            for item in feed_all(&data, chunk, 512) {
                if let Framed::Frame(f) = item {
                    proptest::prop_assert!(is_map_marker(f[0]));
                    proptest::prop_assert_eq!(msgpack::value_len(&f), Scan::Complete(f.len()));
                }
            }
        }

        #[test]
        fn good_frames_survive_garbage_prefix(garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..64), chunk in 1usize..100) {
            let a = frame_bytes("salt/job/9/ret/m", &[("fun", "test.ping")]);
            let mut all = garbage.clone();
            all.extend(&a);
            all.extend(&a);
            all.extend(&a);
            let got = feed_all(&all, chunk, 1 << 20);
            let n = frames_of(&got).iter().filter(|f| f.as_ref() == a.as_slice()).count();
            // Garbage may swallow at most the first frame it runs into.
            proptest::prop_assert!(n >= 2, "{:?}", got);
        }
    }
}
