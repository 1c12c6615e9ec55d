//! `saltpipe-gen`: writes a synthetic bus stream for benchmarks.
//!
//! Job returns shaped like a real `cmd.run` return (the fields and types a
//! 3008 master puts on the bus), each about `--size` bytes, every one a new
//! (jid, minion) pair so none is dropped as a duplicate. Optionally mixed
//! with the noise a real bus carries (`new`/`publish` per job, find_job
//! polls, auth), so the rules have something to drop.
//!
//! The output is what `saltpipe capture` writes: bare frames back to back,
//! or with `--prefixed` the 4-byte length of 3006.26+ and the master's pull
//! socket (which is also what `--push` sends to a live master).

use clap::Parser;
use saltpipe::bus::encode::{frame, length_prefixed};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Generate a synthetic Salt event-bus stream of job returns")]
struct Args {
    /// Number of job returns.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Approximate size of each frame in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Minions per job: each job gets a `new` (and `publish`) then this many returns.
    #[arg(long, default_value_t = 100)]
    minions: u64,
    /// Also write the noise a real bus carries: new/publish per job, a find_job
    /// round every 10 jobs, an auth event every 50.
    #[arg(long)]
    noise: bool,
    /// 4-byte big-endian length before each frame (Salt 3006.26+, the pull socket).
    #[arg(long)]
    prefixed: bool,
    /// Failed `state.apply` returns instead of `cmd.run`: the return is a map
    /// of state results (many small keys, as a real highstate), each
    /// `result: false`, with `success: false` and `retcode: 2`. Their JSON
    /// tree is many times their wire size, which is what actions build.
    #[arg(long)]
    failed_states: bool,
    /// A fleet for the web pages' benchmark: this many minions in all, each
    /// job targeting `--minions` of them in turn; jids spread over the last
    /// `--days` days up to now, every job announced (`new`), one job in
    /// five a `state.apply` whose returns fail on one minion in twenty.
    #[arg(long, default_value_t = 0)]
    fleet: u64,
    /// With `--fleet`: the days the jobs are spread over.
    #[arg(long, default_value_t = 7)]
    days: u64,
    /// Output file ("-" for stdout).
    #[arg(long, short)]
    out: PathBuf,
}

fn pack_str(out: &mut Vec<u8>, k: &str, v: &str) {
    let _ = rmp::encode::write_str(out, k);
    let _ = rmp::encode::write_str(out, v);
}

fn job_return(jid: &str, minion: &str, fun: &str, payload: &str) -> Vec<u8> {
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
fn state_return(jid: &str, minion: &str, size: usize) -> Vec<u8> {
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

fn job_new(jid: &str, fun: &str, minions: u64) -> Vec<u8> {
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
fn small_state_return(jid: &str, minion: &str, failed: bool) -> Vec<u8> {
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

/// `--fleet`: see [`Args::fleet`].
fn fleet(args: &Args, put: &mut dyn FnMut(Vec<u8>) -> std::io::Result<()>) -> std::io::Result<()> {
    let minions = args.minions.clamp(1, args.fleet);
    let jobs = args.count.div_ceil(minions).max(1);
    let span = std::time::Duration::from_secs(args.days.max(1) * 86_400);
    let start = std::time::SystemTime::now() - span;
    let step = span / u32::try_from(jobs).unwrap_or(u32::MAX);
    let mut written = 0u64;
    for job in 0..jobs {
        let jid = saltpipe::web::data::jid_at(start + step * u32::try_from(job).unwrap_or(0));
        let state = job.is_multiple_of(5);
        let fun = if state { "state.apply" } else { "cmd.run" };
        put(frame(
            &format!("salt/job/{jid}/new"),
            &job_new(&jid, fun, 0),
        ))?;
        for i in 0..minions {
            if written >= args.count {
                return Ok(());
            }
            let m = (job * minions + i) % args.fleet;
            let minion = format!("minion-{m:05}");
            put(if state {
                small_state_return(&jid, &minion, m.is_multiple_of(20))
            } else {
                job_return(&jid, &minion, "cmd.run", "ok")
            })?;
            written += 1;
        }
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let sink: Box<dyn Write> = if args.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&args.out)?)
    };
    let mut w = std::io::BufWriter::with_capacity(1 << 20, sink);
    let minions = args.minions.max(1);
    // Size the payload so the whole frame lands near --size.
    let overhead = job_return("20261125120000000000", "minion-00000", "cmd.run", "").len();
    let payload: String = "x".repeat(args.size.saturating_sub(overhead).max(1));
    let mut put = |f: Vec<u8>| -> std::io::Result<()> {
        if args.prefixed {
            w.write_all(&length_prefixed(&f))
        } else {
            w.write_all(&f)
        }
    };
    if args.fleet > 0 {
        fleet(&args, &mut put)?;
        return w.flush();
    }
    let mut written = 0u64;
    let mut job = 0u64;
    while written < args.count {
        let jid = format!("2026112512{:010}", job);
        if args.noise {
            let new = job_new(&jid, "cmd.run", minions);
            put(frame(&format!("salt/job/{jid}/new"), &new))?;
            put(frame(&format!("salt/job/{jid}/publish"), &new))?;
            if job.is_multiple_of(10) {
                let fj = format!("2026112513{:010}", job);
                let new = job_new(&fj, "saltutil.find_job", 1);
                put(frame(&format!("salt/job/{fj}/new"), &new))?;
                put(job_return(&fj, "minion-0", "saltutil.find_job", "{}"))?;
            }
            if job.is_multiple_of(50) {
                let mut d = Vec::new();
                let _ = rmp::encode::write_map_len(&mut d, 2);
                pack_str(&mut d, "id", "minion-0");
                pack_str(&mut d, "act", "accept");
                put(frame("salt/auth", &d))?;
            }
        }
        for m in 0..minions {
            if written >= args.count {
                break;
            }
            let minion = format!("minion-{m:05}");
            if args.failed_states {
                put(state_return(&jid, &minion, args.size))?;
            } else {
                put(job_return(&jid, &minion, "cmd.run", &payload))?;
            }
            written += 1;
        }
        job += 1;
    }
    w.flush()
}
