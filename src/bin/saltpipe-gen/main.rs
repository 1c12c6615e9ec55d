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
//! socket.
//!
//! `saltpipe-gen sim` is the fleet simulator (sim.rs): a scenario of jobs
//! over N minions, pushed into a live master's pull socket or written to a
//! file, with a summary of what was sent.

mod output;
mod shapes;
mod sim;

use clap::{CommandFactory, Parser, Subcommand};
use saltpipe::bus::encode::{frame, length_prefixed};
use shapes::{job_new, job_return, pack_str, small_state_return, state_return};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    about = "Generate a synthetic Salt event-bus stream of job returns",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
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
    #[arg(long, short, required = true)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Mode {
    /// A simulated fleet (highstate bursts, mixed jobs, the 100 KiB burst),
    /// pushed into a master's master_event_pull.ipc or written to a file.
    Sim(sim::SimArgs),
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
    if let Some(Mode::Sim(sim)) = args.mode {
        return sim::run(sim);
    }
    let Some(out) = &args.out else {
        Args::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--out is required",
            )
            .exit()
    };
    let sink: Box<dyn Write> = if out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(out)?)
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
