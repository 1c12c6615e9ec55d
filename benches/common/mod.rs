//! What several benches feed: one definition of the ~1 KB `cmd.run` return
//! (the shape `saltpipe-gen` writes, less `fun_args` and `ts`), so their
//! figures stay comparable.

/// The data map of a ~1 KB `cmd.run` return of `minion` for `jid`.
pub fn small_return(jid: &str, minion: &str) -> Vec<u8> {
    let payload = "x".repeat(760);
    let mut d = Vec::new();
    let _ = rmp::encode::write_map_len(&mut d, 9);
    for (k, v) in [
        ("cmd", "_return"),
        ("id", minion),
        ("jid", jid),
        ("fun", "cmd.run"),
        ("return", payload.as_str()),
        ("user", "root"),
        ("_stamp", "2026-11-25T12:00:00.123456+00:00"),
    ] {
        let _ = rmp::encode::write_str(&mut d, k);
        let _ = rmp::encode::write_str(&mut d, v);
    }
    let _ = rmp::encode::write_str(&mut d, "retcode");
    let _ = rmp::encode::write_uint(&mut d, 0);
    let _ = rmp::encode::write_str(&mut d, "success");
    let _ = rmp::encode::write_bool(&mut d, true);
    d
}
