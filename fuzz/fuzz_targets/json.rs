//! The msgpack walker and JSON transcoder: output is valid JSON, linear in
//! the input, never over the limit, and the field range is the field's JSON.
#![no_main]

#[path = "../common/json.rs"]
mod json_check;

use json_check::assert_json;
use libfuzzer_sys::fuzz_target;
use saltpipe::msgpack::{self, MAX_EXPANSION, Scan, WalkError};

fuzz_target!(|data: &[u8]| {
    let Scan::Complete(n) = msgpack::value_len(data) else {
        return;
    };
    let v = &data[..n];
    // decode then encode gives back a value of the same length (where the
    // encoder picks the same widths: compare lengths of re-scans only).
    if let Ok(decoded) = rmpv::decode::read_value(&mut &v[..]) {
        let mut again = vec![];
        rmpv::encode::write_value(&mut again, &decoded).expect("encode");
        assert_eq!(msgpack::value_len(&again), Scan::Complete(again.len()));
    }
    match msgpack::to_json(v, usize::MAX) {
        Ok(json) => {
            assert!(
                json.len() <= MAX_EXPANSION * v.len() + 64,
                "{} -> {}",
                v.len(),
                json.len()
            );
            assert_json(&json);
            // With a limit below its size it stops, and never writes more.
            if json.len() > 16 {
                let limit = json.len() / 2;
                assert!(matches!(
                    msgpack::to_json(v, limit),
                    Err(WalkError::TooLarge { .. })
                ));
            }
            if let Ok((whole, Some(range))) = msgpack::to_json_with_field(v, "return", usize::MAX) {
                assert_eq!(whole, json);
                assert_json(&whole[range]);
            }
        }
        Err(WalkError::TooDeep | WalkError::Invalid | WalkError::Truncated) => {}
        Err(e) => panic!("unlimited transcode failed: {e}"),
    }
});
