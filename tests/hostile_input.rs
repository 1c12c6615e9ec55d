//! A crafted stream, as anyone in the master's group can push through
//! `master_event_pull.ipc`, replayed by the real binary under a 4 GB
//! address-space limit: it exits 0, every good frame around the poison
//! lands, the poison is counted or dead-lettered, no stored row is larger
//! than `sink.max_return_size`, and the log stays short (issue 11).

mod common;

use rmpv::Value as V;
use saltpipe::bus::encode::{frame, length_prefixed};
use std::process::Command;

fn pack(v: &V) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("encode");
    out
}

/// A return of `test.ping` from `minion` for job `jid`.
fn good_return(jid: &str, minion: &str) -> Vec<u8> {
    let data = V::Map(vec![
        (V::from("jid"), V::from(jid)),
        (V::from("id"), V::from(minion)),
        (V::from("fun"), V::from("test.ping")),
        (V::from("return"), V::from(true)),
        (V::from("retcode"), V::from(0)),
        (V::from("success"), V::from(true)),
    ]);
    frame(&format!("salt/job/{jid}/ret/{minion}"), &pack(&data))
}

/// A return whose `return` holds `value` (raw msgpack).
fn return_with(jid: &str, minion: &str, value: &[u8]) -> Vec<u8> {
    let mut data = vec![0x84];
    for (k, v) in [("jid", jid), ("id", minion), ("fun", "cmd.run")] {
        data.extend(pack(&V::from(k)));
        data.extend(pack(&V::from(v)));
    }
    data.extend(pack(&V::from("return")));
    data.extend(value);
    frame(&format!("salt/job/{jid}/ret/{minion}"), &data)
}

/// `{{{...: 1}: 1}: 1}`: a map used as a key, `depth` levels deep.
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

const JID: &str = "20261202120000000001";

#[test]
fn a_crafted_stream_lands_every_good_frame_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stream = vec![];
    let mut good = 0;
    let mut push_good = |stream: &mut Vec<u8>, n: usize| {
        for _ in 0..n {
            good += 1;
            let f = good_return(JID, &format!("good{good}"));
            stream.extend(if good % 2 == 0 {
                length_prefixed(&f)
            } else {
                f
            });
        }
    };
    push_good(&mut stream, 5);
    // 1. A 455-byte frame whose key nests maps 30 deep (was a 2 GiB
    //    allocation and an abort, again at every restart).
    let poison_key = return_with(
        JID,
        "nested",
        &[&[0x81][..], &nested_key(30), &[0x01]].concat(),
    );
    stream.extend(&poison_key);
    push_good(&mut stream, 5);
    // 2. A 10-byte header announcing a 48 MB head.
    stream.extend([
        0x82, 0xa4, b'h', b'e', b'a', b'd', 0xc6, 0x03, 0x00, 0x00, 0x00,
    ]);
    push_good(&mut stream, 1000);
    // 3. A 1 GiB length prefix in front of a map that agrees with it.
    let mut agreeing = ((1u32 << 30) - 16).to_be_bytes().to_vec();
    agreeing.extend([
        0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y', 0xc6,
    ]);
    agreeing.extend(((1u32 << 30) - 16 - 17).to_be_bytes());
    stream.extend(&agreeing);
    push_good(&mut stream, 1000);
    // 4. A frame cut short.
    let cut = good_return(JID, "cut");
    stream.extend(&cut[..cut.len() / 2]);
    push_good(&mut stream, 5);
    // 5. Non-UTF-8 keys that a lossy conversion made equal.
    stream.extend(return_with(
        JID,
        "badkeys",
        &[0x82, 0xa1, 0xff, 0x01, 0xa1, 0xfe, 0x02],
    ));
    push_good(&mut stream, 5);
    // 6. 1 MB of junk.
    let mut x: u32 = 12345;
    stream.extend((0..1 << 20).map(|_| {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (x >> 16) as u8
    }));
    push_good(&mut stream, 5);
    // 7. A return whose JSON is over sink.max_return_size (64 KiB here).
    stream.extend(return_with(
        JID,
        "huge",
        &pack(&V::from("y".repeat(200_000))),
    ));
    push_good(&mut stream, 5);
    let path = dir.path().join("crafted.bin");
    std::fs::write(&path, &stream).expect("write");

    let db = dir.path().join("s.db");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_saltpipe"));
    cmd.args(["replay", "--json"])
        .arg(&path)
        .env_remove("SALTPIPE_CONFIG")
        .env(
            "SALTPIPE_QUEUE_URL",
            format!("embedded://{}", dir.path().join("q").display()),
        )
        .env("SALTPIPE_SINK_URL", format!("sqlite://{}", db.display()))
        .env("SALTPIPE_SINK_MAX_RETURN_SIZE", "64KiB");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("replay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");

    // Every good frame landed, and the two odd-but-valid returns too.
    let c = rusqlite::Connection::open(&db).expect("open sink");
    let ids = common::strings(&c, "SELECT id FROM salt_returns ORDER BY id");
    assert_eq!(
        ids.iter().filter(|i| i.starts_with("good")).count(),
        good,
        "{v}"
    );
    assert!(ids.contains(&"nested".to_owned()), "{ids:?}");
    assert!(ids.contains(&"badkeys".to_owned()), "{ids:?}");
    assert!(
        !ids.contains(&"huge".to_owned()),
        "over the limit: not a row"
    );
    assert!(!ids.contains(&"cut".to_owned()));
    // The keys stayed distinct, and no row is over the limit.
    let badkeys: String = c
        .query_row(
            "SELECT \"return\" FROM salt_returns WHERE id = 'badkeys'",
            [],
            |r| r.get(0),
        )
        .expect("badkeys");
    assert_eq!(badkeys, r#"{"__bytes__:/w==": 1, "__bytes__:/g==": 2}"#);
    let largest: i64 = c
        .query_row("SELECT max(length(full_ret)) FROM salt_returns", [], |r| {
            r.get(0)
        })
        .expect("max");
    assert!(largest <= 64 * 1024, "{largest}");
    // The over-size return is a dead letter, with the reason.
    let (tag, error): (String, String) = c
        .query_row("SELECT tag, error FROM saltpipe_dead_letters", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("one dead letter");
    assert_eq!(tag, format!("salt/job/{JID}/ret/huge"));
    assert!(error.contains("larger than 65536 bytes"), "{error}");
    // The poison was counted, and logged briefly.
    assert!(v["malformed"].as_u64().expect("malformed") >= 4, "{v}");
    assert_eq!(v["oversized"], 1, "{v}");
    let lines = stderr.lines().count();
    assert!(lines < 50, "{lines} log lines:\n{stderr}");
}
