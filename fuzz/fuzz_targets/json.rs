//! The msgpack walker and JSON transcoder: output is valid JSON, linear in
//! the input, never over the limit, and the field range is the field's JSON;
//! the worker's checked transcode agrees with the plain one and the redactor.
#![no_main]

#[path = "../common/json.rs"]
mod json_check;

use json_check::assert_json;
use libfuzzer_sys::fuzz_target;
use saltpipe::msgpack::{self, MAX_EXPANSION, Scan, WalkError};

fn redactor() -> saltpipe::redact::KeyRedactor {
    saltpipe::redact::KeyRedactor::new(saltpipe::redact::DEFAULT_KEYS)
}

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
            // The worker's transcode: `[sink] redact`'s keys checked and a
            // return's states counted as it writes. It gives the same text,
            // or refuses data whose hidden values are not yet `***`, and
            // then transcodes the redactor's output.
            let mut tally = saltpipe::outcome::StatesTally::default();
            match msgpack::to_json_with_field(
                v,
                "return",
                usize::MAX,
                Some(&redactor()),
                Some(&mut tally),
            ) {
                Ok((whole, range)) => {
                    assert_eq!(whole, json);
                    if let Some(range) = range {
                        assert_json(&whole[range]);
                    }
                }
                // The transcode stops at the first value to hide; the
                // redactor goes on through the rest, which may be nested
                // too deep for it (through a key that is a container: the
                // plain transcode does not look inside those). Then the
                // worker stores the event nowhere, its dead letter without
                // its bytes.
                Err(WalkError::Secret) => match redactor().redact_msgpack(v) {
                    Ok(Some((hidden, _))) => {
                        let checked =
                            msgpack::to_json_checked(&hidden, usize::MAX, Some(&redactor()));
                        assert_eq!(checked, msgpack::to_json(&hidden, usize::MAX));
                    }
                    Ok(None) => panic!("the transcode found a value to hide, the redactor none"),
                    Err(e) => assert_eq!(e, WalkError::TooDeep),
                },
                // A key that is a deeply nested container: the plain
                // transcode writes its bytes, but the redactor cannot look
                // inside it. The worker then stores the event as the
                // redactor left it, as it did before the check moved here.
                Err(e) => assert_eq!(
                    redactor().redact_msgpack(v).err(),
                    Some(e),
                    "the checked transcode failed where the plain one and the redactor did not"
                ),
            }
        }
        Err(WalkError::TooDeep | WalkError::Invalid | WalkError::Truncated) => {}
        Err(e) => panic!("unlimited transcode failed: {e}"),
    }
});
