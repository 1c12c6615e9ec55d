//! Writing frames in the bus's wire format.
//!
//! The daemon only reads the bus; this exists for the benchmark generator,
//! the tests and anyone who wants to push synthetic events into a master's
//! `master_event_pull.ipc` (which wants the 4-byte length prefix).

/// Writes `{"head": {}, "body": <bin: tag "\n\n" data>}`, Salt's frame, where
/// `data` is an already packed msgpack map.
pub fn frame(tag: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(tag.len() + 2 + data.len());
    body.extend_from_slice(tag.as_bytes());
    body.extend_from_slice(b"\n\n");
    body.extend_from_slice(data);
    let mut out = Vec::with_capacity(body.len() + 20);
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut out, 2);
    let _ = rmp::encode::write_str(&mut out, "head");
    let _ = rmp::encode::write_map_len(&mut out, 0);
    let _ = rmp::encode::write_str(&mut out, "body");
    let _ = rmp::encode::write_bin(&mut out, &body);
    out
}

/// A frame whose data map has string values only: handy in tests.
pub fn frame_bytes(tag: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut data = Vec::new();
    let _ = rmp::encode::write_map_len(&mut data, fields.len() as u32);
    for (k, v) in fields {
        let _ = rmp::encode::write_str(&mut data, k);
        let _ = rmp::encode::write_str(&mut data, v);
    }
    frame(tag, &data)
}

/// The same frame with the 4-byte big-endian length that Salt 3006.26+ and
/// the master's pull socket use.
pub fn length_prefixed(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    out
}
