//! Event views and the row conversion on arbitrary bodies: a typed view or
//! an error, rows that are valid JSON, never a panic.
#![no_main]

use bytes::Bytes;
#[path = "../common/json.rs"]
mod json_check;

use json_check::assert_json;
use libfuzzer_sys::fuzz_target;
use saltpipe::event::Event;
use saltpipe::sink::Record;
use saltpipe::sink::rows::{BoolStyle, RowFormat, RowSet, rows_of};

fuzz_target!(|data: &[u8]| {
    let Ok(e) = Event::from_body(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = e.partition_key();
    let _ = e.tag();
    let _ = e.field_raw("return");
    let _ = saltpipe::action::context(&e);
    let r = Record::new(e, 0);
    let fmt = RowFormat {
        style: BoolStyle::Digit,
        max_json: 1 << 20,
        runner_id: "master",
    };
    if let Ok(rows) = rows_of(&r, fmt) {
        let json = |s: &str| {
            assert!(s.len() <= 1 << 20);
            assert_json(s);
        };
        match rows {
            RowSet::Job(j) => json(&j.load),
            RowSet::Return(ret, job) => {
                json(&ret.full_ret);
                json(ret.ret());
                if let Some(j) = job {
                    json(&j.load);
                }
            }
            RowSet::Event(ev) => json(&ev.data),
            // A syndic's forwarded bare-jid announcement: the jid is the
            // tag's last part.
            RowSet::Targets { jid, .. } => assert!(!jid.contains('/')),
        }
    }
});
