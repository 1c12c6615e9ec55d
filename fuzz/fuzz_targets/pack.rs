//! The broker container decoder on arbitrary bytes: an error or entries,
//! and what decodes packs again to something that decodes the same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use saltpipe::queue::Message;
use saltpipe::queue::pack::{Limits, pack, unpack};

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = unpack(&Bytes::copy_from_slice(data)) else {
        return;
    };
    let messages: Vec<Message> = entries
        .iter()
        .map(|e| Message {
            queue: "default".into(),
            key: e.key.clone(),
            body: e.body.clone(),
            received_ms: e.received_ms,
        })
        .collect();
    let limits = Limits {
        events: entries.len(),
        bytes: usize::MAX,
    };
    let containers = pack(&messages, limits);
    assert_eq!(containers.len(), 1);
    let again =
        unpack(&Bytes::from(containers[0].data.clone())).expect("our own container decodes");
    assert_eq!(again.len(), entries.len());
    for (a, b) in again.iter().zip(&entries) {
        assert_eq!(
            (&a.key, a.received_ms, &a.body),
            (&b.key, b.received_ms, &b.body)
        );
    }
});
