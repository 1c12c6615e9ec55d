//! The events the generator writes, packed as a 3008 master puts them on
//! the bus. The old stream modes' shapes (kept byte for byte: benches and
//! scripts compare against them) and the fleet simulator's.

use saltpipe::bus::encode::frame;

pub fn pack_str(out: &mut Vec<u8>, k: &str, v: &str) {
    let _ = rmp::encode::write_str(out, k);
    let _ = rmp::encode::write_str(out, v);
}

pub fn job_return(jid: &str, minion: &str, fun: &str, payload: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(payload.len() + 256);
    let _ = rmp::encode::write_map_len(&mut d, 11);
    pack_str(&mut d, "cmd", "_return");
    pack_str(&mut d, "id", minion);
    pack_str(&mut d, "jid", jid);
    pack_str(&mut d, "fun", fun);
    let _ = rmp::encode::write_str(&mut d, "fun_args");
    let _ = rmp::encode::write_array_len(&mut d, 1);
    let _ = rmp::encode::write_str(&mut d, "uptime");
    pack_str(&mut d, "return", payload);
    let _ = rmp::encode::write_str(&mut d, "retcode");
    let _ = rmp::encode::write_uint(&mut d, 0);
    let _ = rmp::encode::write_str(&mut d, "success");
    let _ = rmp::encode::write_bool(&mut d, true);
    pack_str(&mut d, "user", "root");
    pack_str(&mut d, "_stamp", "2026-11-25T12:00:00.123456+00:00");
    let _ = rmp::encode::write_str(&mut d, "ts");
    let _ = rmp::encode::write_uint(&mut d, 1_795_000_000);
    frame(&format!("salt/job/{jid}/ret/{minion}"), &d)
}

/// A failed state.apply return whose `return` is a map of state results
/// adding up to about `size` bytes.
pub fn state_return(jid: &str, minion: &str, size: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(size + 512);
    let _ = rmp::encode::write_map_len(&mut d, 10);
    pack_str(&mut d, "cmd", "_return");
    pack_str(&mut d, "id", minion);
    pack_str(&mut d, "jid", jid);
    pack_str(&mut d, "fun", "state.apply");
    let _ = rmp::encode::write_str(&mut d, "fun_args");
    let _ = rmp::encode::write_array_len(&mut d, 0);
    let _ = rmp::encode::write_str(&mut d, "return");
    let one = |n: usize, out: &mut Vec<u8>| {
        let _ = rmp::encode::write_str(
            out,
            &format!("file_|-/etc/app/conf.d/{n}.conf_|-/etc/app/conf.d/{n}.conf_|-managed"),
        );
        let _ = rmp::encode::write_map_len(out, 6);
        pack_str(out, "name", &format!("/etc/app/conf.d/{n}.conf"));
        let _ = rmp::encode::write_str(out, "result");
        let _ = rmp::encode::write_bool(out, false);
        pack_str(
            out,
            "comment",
            "Source file salt://app/conf.jinja not found",
        );
        let _ = rmp::encode::write_str(out, "changes");
        let _ = rmp::encode::write_map_len(out, 0);
        let _ = rmp::encode::write_str(out, "duration");
        let _ = rmp::encode::write_f64(out, 1.25);
        let _ = rmp::encode::write_str(out, "__run_num__");
        let _ = rmp::encode::write_uint(out, n as u64);
    };
    let mut probe = Vec::new();
    one(0, &mut probe);
    let states = (size / probe.len().max(1)).max(1);
    let _ = rmp::encode::write_map_len(&mut d, states as u32);
    for n in 0..states {
        one(n, &mut d);
    }
    let _ = rmp::encode::write_str(&mut d, "retcode");
    let _ = rmp::encode::write_uint(&mut d, 2);
    let _ = rmp::encode::write_str(&mut d, "success");
    let _ = rmp::encode::write_bool(&mut d, false);
    pack_str(&mut d, "user", "root");
    pack_str(&mut d, "_stamp", "2026-11-25T12:00:00.123456+00:00");
    frame(&format!("salt/job/{jid}/ret/{minion}"), &d)
}

pub fn job_new(jid: &str, fun: &str, minions: u64) -> Vec<u8> {
    let mut d = Vec::new();
    let _ = rmp::encode::write_map_len(&mut d, 9);
    pack_str(&mut d, "jid", jid);
    pack_str(&mut d, "fun", fun);
    let _ = rmp::encode::write_str(&mut d, "arg");
    let _ = rmp::encode::write_array_len(&mut d, 0);
    pack_str(&mut d, "tgt", "*");
    pack_str(&mut d, "tgt_type", "glob");
    pack_str(&mut d, "user", "root");
    let _ = rmp::encode::write_str(&mut d, "minions");
    let _ = rmp::encode::write_array_len(&mut d, minions.min(16) as u32);
    for m in 0..minions.min(16) {
        let _ = rmp::encode::write_str(&mut d, &format!("minion-{m}"));
    }
    let _ = rmp::encode::write_str(&mut d, "missing");
    let _ = rmp::encode::write_array_len(&mut d, 0);
    pack_str(&mut d, "_stamp", "2026-11-25T12:00:00.123456+00:00");
    d
}

/// A small state run of three states; the second fails when `failed`.
pub fn small_state_return(jid: &str, minion: &str, failed: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(1024);
    let _ = rmp::encode::write_map_len(&mut d, 7);
    pack_str(&mut d, "cmd", "_return");
    pack_str(&mut d, "id", minion);
    pack_str(&mut d, "jid", jid);
    pack_str(&mut d, "fun", "state.apply");
    let _ = rmp::encode::write_str(&mut d, "return");
    let _ = rmp::encode::write_map_len(&mut d, 3);
    for (n, id, ok) in [
        (0, "motd", true),
        (1, "app_config", !failed),
        (2, "app_service", true),
    ] {
        let _ = rmp::encode::write_str(&mut d, &format!("file_|-{id}_|-/etc/{id}_|-managed"));
        let _ = rmp::encode::write_map_len(&mut d, 6);
        pack_str(&mut d, "__id__", id);
        let _ = rmp::encode::write_str(&mut d, "result");
        let _ = rmp::encode::write_bool(&mut d, ok);
        pack_str(
            &mut d,
            "comment",
            if ok {
                "File is in the correct state"
            } else {
                "Source file salt://app/conf.jinja not found"
            },
        );
        let _ = rmp::encode::write_str(&mut d, "changes");
        let _ = rmp::encode::write_map_len(&mut d, 0);
        let _ = rmp::encode::write_str(&mut d, "duration");
        let _ = rmp::encode::write_f64(&mut d, 1.25);
        let _ = rmp::encode::write_str(&mut d, "__run_num__");
        let _ = rmp::encode::write_uint(&mut d, n);
    }
    let _ = rmp::encode::write_str(&mut d, "retcode");
    let _ = rmp::encode::write_uint(&mut d, if failed { 2 } else { 0 });
    let _ = rmp::encode::write_str(&mut d, "success");
    let _ = rmp::encode::write_bool(&mut d, !failed);
    frame(&format!("salt/job/{jid}/ret/{minion}"), &d)
}

// ---- the fleet simulator's events ------------------------------------

/// The `_stamp` the master puts on every event: now, in its format.
pub fn stamp() -> String {
    let s = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    // 2026-12-02T19:49:00.123456Z -> 2026-12-02T19:49:00.123456
    s.trim_end_matches('Z').to_owned()
}

fn pack_strs(out: &mut Vec<u8>, k: &str, vs: &[&str]) {
    let _ = rmp::encode::write_str(out, k);
    let _ = rmp::encode::write_array_len(out, vs.len() as u32);
    for v in vs {
        let _ = rmp::encode::write_str(out, v);
    }
}

/// `salt/job/<jid>/new` (and, with the same data, 3007+'s `publish`): the
/// job as published, with the full list of targeted minions, which is what
/// the no-return tracking compares the returns against.
pub fn job_announce(
    jid: &str,
    fun: &str,
    arg: &[&str],
    tgt_type: &str,
    minions: &[&str],
) -> Vec<u8> {
    let mut d = Vec::with_capacity(256 + minions.len() * 16);
    let _ = rmp::encode::write_map_len(&mut d, 9);
    pack_str(&mut d, "jid", jid);
    pack_str(&mut d, "fun", fun);
    pack_strs(&mut d, "arg", arg);
    if tgt_type == "list" {
        pack_strs(&mut d, "tgt", minions);
    } else {
        pack_str(&mut d, "tgt", "*");
    }
    pack_str(&mut d, "tgt_type", tgt_type);
    pack_str(&mut d, "user", "root");
    pack_strs(&mut d, "minions", minions);
    pack_strs(&mut d, "missing", &[]);
    pack_str(&mut d, "_stamp", &stamp());
    d
}

/// What every minion return carries before its `return` value.
pub struct RetHead<'a> {
    pub jid: &'a str,
    pub minion: &'a str,
    pub fun: &'a str,
    pub fun_args: &'a [&'a str],
    pub retcode: u64,
    pub success: bool,
    /// `Some("highstate")` for state runs, as Salt sets it.
    pub out: Option<&'a str>,
}

/// A minion return; `write_return` packs the `return` value.
pub fn minion_return(h: &RetHead, cap: usize, write_return: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut d = Vec::with_capacity(cap + 512);
    let _ = rmp::encode::write_map_len(&mut d, if h.out.is_some() { 11 } else { 10 });
    pack_str(&mut d, "cmd", "_return");
    pack_str(&mut d, "id", h.minion);
    pack_str(&mut d, "jid", h.jid);
    pack_str(&mut d, "fun", h.fun);
    pack_strs(&mut d, "fun_args", h.fun_args);
    let _ = rmp::encode::write_str(&mut d, "return");
    write_return(&mut d);
    let _ = rmp::encode::write_str(&mut d, "retcode");
    let _ = rmp::encode::write_uint(&mut d, h.retcode);
    let _ = rmp::encode::write_str(&mut d, "success");
    let _ = rmp::encode::write_bool(&mut d, h.success);
    if let Some(out) = h.out {
        pack_str(&mut d, "out", out);
    }
    pack_str(&mut d, "user", "root");
    pack_str(&mut d, "_stamp", &stamp());
    frame(&format!("salt/job/{}/ret/{}", h.jid, h.minion), &d)
}

/// One state of a state run, as the highstate return map holds it.
pub struct State<'a> {
    pub n: u64,
    pub module: &'a str,
    pub id: &'a str,
    pub name: &'a str,
    pub fun: &'a str,
    pub sls: &'a str,
    pub result: bool,
    pub comment: &'a str,
    /// A file diff for `changes`, or nothing (no changes).
    pub diff: Option<&'a str>,
    pub duration_ms: f64,
}

pub fn pack_state(out: &mut Vec<u8>, s: &State) {
    let _ = rmp::encode::write_str(
        out,
        &format!("{}_|-{}_|-{}_|-{}", s.module, s.id, s.name, s.fun),
    );
    let _ = rmp::encode::write_map_len(out, 9);
    pack_str(out, "__id__", s.id);
    let _ = rmp::encode::write_str(out, "__run_num__");
    let _ = rmp::encode::write_uint(out, s.n);
    pack_str(out, "__sls__", s.sls);
    let _ = rmp::encode::write_str(out, "changes");
    match s.diff {
        Some(diff) => {
            let _ = rmp::encode::write_map_len(out, 1);
            pack_str(out, "diff", diff);
        }
        None => {
            let _ = rmp::encode::write_map_len(out, 0);
        }
    }
    pack_str(out, "comment", s.comment);
    let _ = rmp::encode::write_str(out, "duration");
    let _ = rmp::encode::write_f64(out, s.duration_ms);
    pack_str(out, "name", s.name);
    let _ = rmp::encode::write_str(out, "result");
    let _ = rmp::encode::write_bool(out, s.result);
    pack_str(out, "start_time", "19:49:00.123456");
}

/// A minion's answer to `saltutil.find_job`: the job it is still running.
pub fn find_job_return(fj: &str, minion: &str, running_jid: &str, running_fun: &str) -> Vec<u8> {
    let h = RetHead {
        jid: fj,
        minion,
        fun: "saltutil.find_job",
        fun_args: &[running_jid],
        retcode: 0,
        success: true,
        out: None,
    };
    minion_return(&h, 256, |d| {
        let _ = rmp::encode::write_map_len(d, 6);
        pack_str(d, "fun", running_fun);
        pack_str(d, "jid", running_jid);
        let _ = rmp::encode::write_str(d, "pid");
        let _ = rmp::encode::write_uint(d, 4242);
        pack_strs(d, "arg", &[]);
        pack_str(d, "tgt", "*");
        pack_str(d, "user", "root");
    })
}

/// `salt/auth`: a minion (re)authenticating, with its public key.
pub fn auth(minion: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(640);
    let _ = rmp::encode::write_map_len(&mut d, 5);
    let _ = rmp::encode::write_str(&mut d, "result");
    let _ = rmp::encode::write_bool(&mut d, true);
    pack_str(&mut d, "act", "accept");
    pack_str(&mut d, "id", minion);
    let key = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----",
        "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA".repeat(9)
    );
    pack_str(&mut d, "pub", &key);
    pack_str(&mut d, "_stamp", &stamp());
    frame("salt/auth", &d)
}

/// A minion (re)starting: Salt fires the pair `minion_start` and
/// `salt/minion/<id>/start` with the same data.
pub fn minion_start(minion: &str) -> [Vec<u8>; 2] {
    let mut d = Vec::with_capacity(256);
    let _ = rmp::encode::write_map_len(&mut d, 6);
    pack_str(&mut d, "cmd", "_minion_event");
    pack_str(
        &mut d,
        "data",
        &format!("Minion {minion} started at Wed Dec  2 19:49:00 2026"),
    );
    pack_str(&mut d, "id", minion);
    let _ = rmp::encode::write_str(&mut d, "pretag");
    let _ = rmp::encode::write_nil(&mut d);
    pack_str(&mut d, "tag", "minion_start");
    pack_str(&mut d, "_stamp", &stamp());
    [
        frame("minion_start", &d),
        frame(&format!("salt/minion/{minion}/start"), &d),
    ]
}

/// `salt/presence/present`: every connected minion.
pub fn presence(present: &[&str]) -> Vec<u8> {
    let mut d = Vec::with_capacity(64 + present.len() * 16);
    let _ = rmp::encode::write_map_len(&mut d, 2);
    pack_strs(&mut d, "present", present);
    pack_str(&mut d, "_stamp", &stamp());
    frame("salt/presence/present", &d)
}
