//! The framer on arbitrary bytes split at arbitrary points: whatever comes
//! out as a frame is one whole valid frame, the buffer stays bounded, and
//! good frames behind any garbage all land.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use saltpipe::bus::encode::{frame_bytes, length_prefixed};
use saltpipe::bus::framing::{Framed, Framer};
use saltpipe::msgpack::{self, Scan};

const MAX_FRAME: usize = 4096;

fn run(chunks: impl Iterator<Item = Vec<u8>>) -> Vec<Bytes> {
    let mut f = Framer::new(MAX_FRAME);
    let mut frames = vec![];
    for c in chunks {
        f.buffer_mut().extend_from_slice(&c);
        while let Some(item) = f.next_frame() {
            if let Framed::Frame(b) = item {
                assert!(matches!(b[0], 0x81 | 0x82), "{b:x?}");
                assert_eq!(msgpack::value_len(&b), Scan::Complete(b.len()));
                assert!(b.len() <= MAX_FRAME);
                frames.push(b);
            }
        }
        // Never more than a frame's worth held (plus what one read added).
        assert!(f.buffered() <= 2 * MAX_FRAME + c.len(), "{}", f.buffered());
    }
    f.end_of_stream();
    while let Some(item) = f.next_frame() {
        if let Framed::Frame(b) = item {
            frames.push(b);
        }
    }
    frames
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, garbage)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    // 1. Arbitrary bytes in arbitrary reads.
    run(garbage.chunks(chunk).map(<[u8]>::to_vec));
    // 2. The same bytes as garbage, then good frames in the next read (the
    //    master writes each event whole): every one of them lands.
    let good: Vec<Vec<u8>> = (0..3)
        .map(|i| frame_bytes(&format!("salt/job/{i}/ret/m"), &[("fun", "test.ping")]))
        .collect();
    let mut tail = good[0].clone();
    tail.extend(length_prefixed(&good[1]));
    tail.extend(&good[2]);
    let reads = garbage
        .chunks(chunk)
        .map(<[u8]>::to_vec)
        .chain(std::iter::once(tail));
    let frames = run(reads);
    for g in &good {
        assert!(
            frames.iter().any(|f| f.as_ref() == g.as_slice()),
            "lost a good frame behind {garbage:x?}"
        );
    }
});
