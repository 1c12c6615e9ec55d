//! `saltpipe-gen sim`: a simulated fleet on a master's bus.
//!
//! Real fleets do not send 1 KB returns at a steady rate: a highstate of
//! 10,000 minions lands in seconds, each return a state run of tens to
//! hundreds of KB, with the master's own chatter around it (issue 16). This
//! writes that traffic, from a seed, so a benchmark can push it into a real
//! master (`--push <sock_dir>/master_event_pull.ipc`) and then check the
//! database against what was sent: the summary names every event by kind
//! and the (jid, minion) returns saltpipe's default rules store.
//!
//! A scenario is a few jobs over the fleet. Each job is announced (`new`
//! and `publish`, with its full minion list), then its returns arrive in a
//! random order interleaved with the other running jobs' returns. A fixed
//! set of minions (`--no-answer`) is down: targeted, never answering, so
//! the no-return tracking has something to find. While a long job runs the
//! CLI polls the pending minions with `saltutil.find_job`, and they answer;
//! auth and minion-start chatter is sprinkled in. None of that noise is
//! stored by the default rules; it is there for saltpipe to read and drop.
//!
//! Returns are made one at a time, just before they are written: memory
//! does not grow with the fleet beyond a few integers per minion.

use crate::output::Output;
use crate::shapes::{self, RetHead, State};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One `state.apply` to every minion: state runs of --min-size..--max-size
    /// (log-uniform), 5% failing with `success: false`, 3% with failed states
    /// under `success: true`; find_job polls; auth / start noise.
    Highstate,
    /// test.ping and a cmd.run to all, a highstate to half the fleet, a
    /// cmd.run to a tenth that fails on some; find_job polls, auth, start and
    /// presence noise.
    Mixed,
    /// Issue 16's first target: one cmd.run to every minion, each return
    /// --size bytes (100 KiB), everyone answers, no noise.
    Burst100k,
}

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    #[arg(long, value_enum, default_value_t = Scenario::Highstate)]
    scenario: Scenario,
    /// Minions in the fleet.
    #[arg(long, default_value_t = 10_000)]
    minions: u32,
    /// Events per second, 0 = as fast as the master (or file) takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Smallest state run / command output (highstate, mixed).
    #[arg(long, default_value = "20KiB")]
    min_size: bytesize::ByteSize,
    /// Largest state run / command output (highstate, mixed).
    #[arg(long, default_value = "500KiB")]
    max_size: bytesize::ByteSize,
    /// The size of each return frame in burst100k.
    #[arg(long, default_value = "100KiB")]
    size: bytesize::ByteSize,
    /// Fraction of minions that are down (targeted, never answer); default
    /// 0.02, 0 in burst100k.
    #[arg(long)]
    no_answer: Option<f64>,
    /// A find_job poll of the pending minions every this many returns of a
    /// job (0 = none); default 1000, none in burst100k.
    #[arg(long)]
    poll_every: Option<u64>,
    /// At most this many pending minions answer one find_job poll.
    #[arg(long, default_value_t = 500)]
    poll_answers: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Push into a master: its `<sock_dir>/master_event_pull.ipc`.
    #[arg(long, conflicts_with = "out")]
    push: Option<PathBuf>,
    /// Write the stream to a file instead ("-" for stdout).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// With --out: the 4-byte length before each frame.
    #[arg(long)]
    prefixed: bool,
    /// Also write the summary (JSON) here; it always goes to stderr.
    #[arg(long)]
    summary: Option<PathBuf>,
}

/// What the return value of a job looks like.
#[derive(Clone, Copy)]
enum Shape {
    Ping,
    /// Command output of a size in the range; `fail` of them exit 1.
    Text {
        min: u64,
        max: u64,
        fail: f64,
    },
    /// A frame of exactly this size.
    TextExact(u64),
    State {
        min: u64,
        max: u64,
        fail: f64,
        quiet_fail: f64,
    },
}

struct Job {
    jid: String,
    fun: &'static str,
    arg: Vec<&'static str>,
    shape: Shape,
    tgt_type: &'static str,
    /// Every targeted minion (indices into the fleet).
    targets: Vec<u32>,
    /// The answering ones, in the order they answer.
    order: Vec<u32>,
    next: usize,
    since_poll: u64,
    /// Starts once this many returns (of any job) were written.
    start_after: u64,
    /// Exact-size frames: payload bytes to add to reach the size.
    overhead: Option<usize>,
}

impl Job {
    fn remaining(&self) -> usize {
        self.order.len() - self.next
    }
}

/// What was sent; printed as JSON.
#[derive(Serialize, Default)]
pub struct Summary {
    scenario: Option<Scenario>,
    minions: u32,
    seed: u64,
    down_minions: usize,
    /// Events written, and by kind (job_new, job_publish, job_return,
    /// find_job_new, find_job_publish, find_job_return, auth, minion_start,
    /// presence).
    events: u64,
    events_by_kind: BTreeMap<&'static str, u64>,
    /// Bytes written (with the length prefixes when pushing).
    bytes: u64,
    /// Job returns (not find_job's) by function.
    returns_by_fun: BTreeMap<&'static str, u64>,
    /// Jobs announced (not find_job polls): the jids rows to expect.
    expected_jids: u64,
    /// Distinct (jid, minion) returns of those jobs: the salt_returns rows
    /// to expect with the default rules.
    expected_returns: u64,
    /// (jid, minion) targeted that never answered.
    no_answer: u64,
    /// Returns with failed states and `success: false` / `success: true`.
    failed_success_false: u64,
    failed_success_true: u64,
    return_bytes: u64,
    return_bytes_min: u64,
    return_bytes_max: u64,
    elapsed_s: f64,
    events_per_s: f64,
    mb_per_s: f64,
    /// Unix time (s) when the last event was out: the bench's lag origin.
    finished_unix: f64,
}

impl Summary {
    fn count(&mut self, kind: &'static str) {
        *self.events_by_kind.entry(kind).or_default() += 1;
    }
}

struct Sim {
    args: SimArgs,
    rng: StdRng,
    names: Vec<String>,
    text: String,
    out: Output,
    sum: Summary,
    fj_seq: u64,
}

pub fn run(args: SimArgs) -> std::io::Result<()> {
    if args.min_size > args.max_size {
        return Err(bad("--min-size is larger than --max-size"));
    }
    if args.minions == 0 {
        return Err(bad("--minions must be at least 1"));
    }
    let out = match (&args.push, &args.out) {
        (Some(sock), None) => Output::push(sock, args.rate)?,
        (None, Some(path)) => Output::file(path, args.prefixed, args.rate)?,
        _ => return Err(bad("give --push SOCKET or --out FILE")),
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let width = args.minions.to_string().len().max(5);
    let names = (1..=args.minions)
        .map(|n| format!("fleet-{n:0width$}"))
        .collect();
    let text = text_pool(&mut rng);
    let mut sim = Sim {
        sum: Summary {
            scenario: Some(args.scenario),
            minions: args.minions,
            seed: args.seed,
            return_bytes_min: u64::MAX,
            ..Summary::default()
        },
        args,
        rng,
        names,
        text,
        out,
        fj_seq: 0,
    };
    sim.scenario()?;
    let Sim {
        out, mut sum, args, ..
    } = sim;
    sum.events = out.events;
    sum.bytes = out.bytes;
    let elapsed = out.finish()?.as_secs_f64();
    sum.finished_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if sum.return_bytes_min == u64::MAX {
        sum.return_bytes_min = 0;
    }
    sum.elapsed_s = elapsed;
    sum.events_per_s = sum.events as f64 / elapsed.max(1e-9);
    sum.mb_per_s = sum.bytes as f64 / 1e6 / elapsed.max(1e-9);
    let json = serde_json::to_string(&sum).map_err(std::io::Error::other)?;
    eprintln!("{json}");
    if let Some(path) = &args.summary {
        std::fs::write(path, json + "\n")?;
    }
    Ok(())
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// About 1 MiB of log-like lines that command outputs and diffs are cut from.
fn text_pool(rng: &mut StdRng) -> String {
    const WORDS: [&str; 16] = [
        "starting",
        "service",
        "nginx",
        "config",
        "reloaded",
        "worker",
        "pid",
        "ok",
        "listening",
        "on",
        "port",
        "8080",
        "cache",
        "warmed",
        "in",
        "ms",
    ];
    let mut s = String::with_capacity(1 << 20);
    let mut line = 0u64;
    while s.len() < (1 << 20) {
        line += 1;
        s.push_str(&format!(
            "Dec  2 19:{:02}:{:02} app[{}]:",
            line % 60,
            (line * 7) % 60,
            1000 + line % 900
        ));
        for _ in 0..rng.random_range(4..14) {
            s.push(' ');
            s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
        s.push('\n');
    }
    s
}

/// A log-uniform size in [min, max]: most runs small, a long tail of big ones.
fn log_uniform(rng: &mut StdRng, min: u64, max: u64) -> u64 {
    if max <= min {
        return min;
    }
    let (a, b) = ((min.max(1) as f64).ln(), (max as f64).ln());
    rng.random_range(a..=b)
        .exp()
        .round()
        .clamp(min as f64, max as f64) as u64
}

impl Sim {
    fn no_answer(&self) -> f64 {
        let default = if self.args.scenario == Scenario::Burst100k {
            0.0
        } else {
            0.02
        };
        self.args.no_answer.unwrap_or(default).clamp(0.0, 1.0)
    }

    fn put(&mut self, kind: &'static str, frame: &[u8]) -> std::io::Result<()> {
        self.sum.count(kind);
        self.out.put(frame)
    }

    /// A cut of the text pool of `len` bytes (repeated if longer).
    fn text(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            let from = self.rng.random_range(0..self.text.len() / 2);
            let take = (len - s.len()).min(self.text.len() - from);
            s.push_str(&self.text[from..from + take]);
        }
        s
    }

    fn scenario(&mut self) -> std::io::Result<()> {
        let n = self.args.minions;
        let all: Vec<u32> = (0..n).collect();
        let mut down = all.clone();
        down.shuffle(&mut self.rng);
        down.truncate((n as f64 * self.no_answer()).round() as usize);
        down.sort_unstable();
        self.sum.down_minions = down.len();
        let (min, max) = (self.args.min_size.as_u64(), self.args.max_size.as_u64());
        let base = std::time::SystemTime::now();
        let mut jobs = Vec::new();
        let mut job =
            |fun, arg: Vec<&'static str>, shape, share: f64, start_after, rng: &mut StdRng| {
                let jid = saltpipe::web::data::jid_at(
                    base + std::time::Duration::from_millis(jobs.len() as u64),
                );
                let mut targets = all.clone();
                let tgt_type = if share < 1.0 {
                    targets.shuffle(rng);
                    targets.truncate(((n as f64 * share).round() as usize).max(1));
                    targets.sort_unstable();
                    "list"
                } else {
                    "glob"
                };
                let mut order: Vec<u32> = targets
                    .iter()
                    .copied()
                    .filter(|m| down.binary_search(m).is_err())
                    .collect();
                order.shuffle(rng);
                jobs.push(Job {
                    jid,
                    fun,
                    arg,
                    shape,
                    tgt_type,
                    targets,
                    order,
                    next: 0,
                    since_poll: 0,
                    start_after,
                    overhead: None,
                });
            };
        let rng = &mut self.rng;
        let (auth, starts, presence) = match self.args.scenario {
            Scenario::Burst100k => {
                let size = self.args.size.as_u64();
                job(
                    "cmd.run",
                    vec!["cat /var/log/app.log"],
                    Shape::TextExact(size),
                    1.0,
                    0,
                    rng,
                );
                (0.0, 0.0, false)
            }
            Scenario::Highstate => {
                let shape = Shape::State {
                    min,
                    max,
                    fail: 0.05,
                    quiet_fail: 0.03,
                };
                job("state.apply", vec![], shape, 1.0, 0, rng);
                (0.01, 0.005, false)
            }
            Scenario::Mixed => {
                let small = Shape::Text {
                    min: min / 20,
                    max: max / 20,
                    fail: 0.0,
                };
                let state = Shape::State {
                    min,
                    max,
                    fail: 0.05,
                    quiet_fail: 0.03,
                };
                let failing = Shape::Text {
                    min: 512,
                    max: 8192,
                    fail: 0.2,
                };
                let n = u64::from(n);
                job("test.ping", vec![], Shape::Ping, 1.0, 0, rng);
                job("cmd.run", vec!["uptime"], small, 1.0, n / 4, rng);
                job("state.apply", vec![], state, 0.5, n / 2, rng);
                job(
                    "cmd.run",
                    vec!["systemctl restart app"],
                    failing,
                    0.1,
                    n,
                    rng,
                );
                (0.05, 0.02, true)
            }
        };
        // Chatter before the jobs: minions (re)connecting.
        let chatter = (
            (f64::from(n) * auth).round() as u32,
            (f64::from(n) * starts).round() as u32,
        );
        for _ in 0..chatter.0 {
            let m = self.rng.random_range(0..n) as usize;
            let f = shapes::auth(&self.names[m]);
            self.put("auth", &f)?;
        }
        for _ in 0..chatter.1 {
            let m = self.rng.random_range(0..n) as usize;
            for f in shapes::minion_start(&self.names[m]) {
                self.put("minion_start", &f)?;
            }
        }
        if presence {
            let up: Vec<&str> = (0..n)
                .filter(|m| down.binary_search(m).is_err())
                .map(|m| self.names[m as usize].as_str())
                .collect();
            let f = shapes::presence(&up);
            self.put("presence", &f)?;
        }
        self.drive(jobs, auth / 10.0)
    }

    /// Announces each job when its turn comes, then writes the returns of
    /// the running jobs in a random interleaving, with polls and noise.
    fn drive(&mut self, mut waiting: Vec<Job>, noise: f64) -> std::io::Result<()> {
        waiting.reverse();
        let mut running: Vec<Job> = Vec::new();
        let mut written = 0u64;
        let default = if self.args.scenario == Scenario::Burst100k {
            0
        } else {
            1000
        };
        let poll_every = self.args.poll_every.unwrap_or(default);
        loop {
            while let Some(j) = waiting.last() {
                if j.start_after > written && !running.is_empty() {
                    break;
                }
                if let Some(j) = waiting.pop() {
                    self.announce(&j)?;
                    running.push(j);
                }
            }
            running.retain(|j| j.remaining() > 0);
            let total: usize = running.iter().map(Job::remaining).sum();
            if total == 0 {
                if waiting.is_empty() {
                    return Ok(());
                }
                continue;
            }
            // Pick a job in proportion to what it has left to return.
            let mut pick = self.rng.random_range(0..total);
            let mut i = 0;
            while pick >= running[i].remaining() {
                pick -= running[i].remaining();
                i += 1;
            }
            let j = &mut running[i];
            let m = j.order[j.next];
            j.next += 1;
            j.since_poll += 1;
            self.job_return(j, m)?;
            written += 1;
            let j = &mut running[i];
            if poll_every > 0
                && j.since_poll >= poll_every
                && j.remaining() > 0
                && !matches!(j.shape, Shape::Ping)
            {
                j.since_poll = 0;
                let j = &running[i];
                self.poll(j)?;
            }
            if noise > 0.0 && self.rng.random_bool(noise.min(1.0)) {
                let m = self.rng.random_range(0..self.args.minions) as usize;
                let f = shapes::auth(&self.names[m]);
                self.put("auth", &f)?;
            }
        }
    }

    fn announce(&mut self, j: &Job) -> std::io::Result<()> {
        let minions: Vec<&str> = j
            .targets
            .iter()
            .map(|&m| self.names[m as usize].as_str())
            .collect();
        let d = shapes::job_announce(&j.jid, j.fun, &j.arg, j.tgt_type, &minions);
        let new = saltpipe::bus::encode::frame(&format!("salt/job/{}/new", j.jid), &d);
        let publish = saltpipe::bus::encode::frame(&format!("salt/job/{}/publish", j.jid), &d);
        self.sum.expected_jids += 1;
        self.sum.no_answer += (j.targets.len() - j.order.len()) as u64;
        self.put("job_new", &new)?;
        self.put("job_publish", &publish)
    }

    /// The CLI asking the pending minions whether they still run the job.
    fn poll(&mut self, j: &Job) -> std::io::Result<()> {
        self.fj_seq += 1;
        let fj = format!("{}{:06}", &j.jid[..14], (self.fj_seq * 7919) % 1_000_000);
        let answered: std::collections::HashSet<u32> = j.order[..j.next].iter().copied().collect();
        let pending: Vec<&str> = j
            .targets
            .iter()
            .filter(|m| !answered.contains(m))
            .map(|&m| self.names[m as usize].as_str())
            .collect();
        let d = shapes::job_announce(&fj, "saltutil.find_job", &[&j.jid], "list", &pending);
        let new = saltpipe::bus::encode::frame(&format!("salt/job/{fj}/new"), &d);
        let publish = saltpipe::bus::encode::frame(&format!("salt/job/{fj}/publish"), &d);
        self.put("find_job_new", &new)?;
        self.put("find_job_publish", &publish)?;
        let still: Vec<u32> = j.order[j.next..]
            .iter()
            .take(self.args.poll_answers)
            .copied()
            .collect();
        for m in still {
            let f = shapes::find_job_return(&fj, &self.names[m as usize], &j.jid, j.fun);
            self.put("find_job_return", &f)?;
        }
        Ok(())
    }

    fn job_return(&mut self, j: &mut Job, m: u32) -> std::io::Result<()> {
        let minion = self.names[m as usize].clone();
        let mut h = RetHead {
            jid: &j.jid,
            minion: &minion,
            fun: j.fun,
            fun_args: &j.arg,
            retcode: 0,
            success: true,
            out: None,
        };
        let f = match j.shape {
            Shape::Ping => shapes::minion_return(&h, 0, |d| {
                let _ = rmp::encode::write_bool(d, true);
            }),
            Shape::Text { min, max, fail } => {
                let len = log_uniform(&mut self.rng, min, max) as usize;
                let out = self.text(len);
                if self.rng.random_bool(fail) {
                    h.retcode = 1;
                    h.success = false;
                }
                shapes::minion_return(&h, len, |d| {
                    let _ = rmp::encode::write_str(d, &out);
                })
            }
            Shape::TextExact(size) => {
                let size = size as usize;
                // The head's size, measured once with a payload as long as
                // the real ones (so the msgpack length headers match).
                let overhead = match j.overhead {
                    Some(o) => o,
                    None => {
                        let probe = "x".repeat(size.max(70_000));
                        let f = shapes::minion_return(&h, size, |d| {
                            let _ = rmp::encode::write_str(d, &probe);
                        });
                        let o = f.len() - probe.len();
                        j.overhead = Some(o);
                        o
                    }
                };
                let out = self.text(size.saturating_sub(overhead).max(1));
                shapes::minion_return(&h, size, |d| {
                    let _ = rmp::encode::write_str(d, &out);
                })
            }
            Shape::State {
                min,
                max,
                fail,
                quiet_fail,
            } => {
                let size = log_uniform(&mut self.rng, min, max) as usize;
                let roll: f64 = self.rng.random();
                let failed = roll < fail + quiet_fail;
                if roll < fail {
                    h.retcode = 2;
                    h.success = false;
                    self.sum.failed_success_false += 1;
                } else if failed {
                    self.sum.failed_success_true += 1;
                }
                h.out = Some("highstate");
                let states = self.state_run(size, failed);
                shapes::minion_return(&h, size, |d| {
                    d.extend_from_slice(&states);
                })
            }
        };
        self.sum.expected_returns += 1;
        *self.sum.returns_by_fun.entry(j.fun).or_default() += 1;
        let len = f.len() as u64;
        self.sum.return_bytes += len;
        self.sum.return_bytes_min = self.sum.return_bytes_min.min(len);
        self.sum.return_bytes_max = self.sum.return_bytes_max.max(len);
        self.put("job_return", &f)
    }

    /// The packed `return` map of a state run of about `size` bytes; with
    /// `failed`, one to three states have `result: false`.
    fn state_run(&mut self, size: usize, failed: bool) -> Vec<u8> {
        const KINDS: [(&str, &str, &str); 6] = [
            (
                "pkg",
                "installed",
                "The following packages were installed/updated: {}",
            ),
            ("file", "managed", "File {} updated"),
            (
                "service",
                "running",
                "Service {} is already enabled, and is running",
            ),
            ("cmd", "run", "Command \"{}\" run"),
            ("user", "present", "User {} is present and up to date"),
            (
                "file",
                "directory",
                "The directory {} is in the correct state",
            ),
        ];
        let mut body = Vec::with_capacity(size + 4096);
        let fails: Vec<u64> = if failed {
            // Among the first states, which every run of any size has.
            let within = (size as u64 / 1000).clamp(1, 40);
            (0..self.rng.random_range(1..=3))
                .map(|_| self.rng.random_range(0..within))
                .collect()
        } else {
            Vec::new()
        };
        let mut n = 0u64;
        while n == 0 || body.len() < size.saturating_sub(256) {
            let (module, fun, comment) = KINDS[(n % 6) as usize];
            let id = format!("{module}_{n}");
            let name = format!("/srv/app/{module}/{n}");
            let result = !fails.contains(&n);
            let comment = if result {
                comment.replace("{}", &name)
            } else {
                format!(
                    "One or more requisite failed: {id} ({name}): Source file salt://app/{n}.jinja not found"
                )
            };
            let diff = if module == "file" && fun == "managed" && n % 4 == 1 {
                let len = self.rng.random_range(200..4000).min(size / 4 + 64);
                Some(format!("--- \n+++ \n@@ -1,3 +1,3 @@\n{}", self.text(len)))
            } else {
                None
            };
            let s = State {
                n,
                module,
                id: &id,
                name: &name,
                fun,
                sls: "app",
                result,
                comment: &comment,
                diff: diff.as_deref(),
                duration_ms: 1.0 + (n % 97) as f64 * 3.7,
            };
            shapes::pack_state(&mut body, &s);
            n += 1;
        }
        let mut d = Vec::with_capacity(body.len() + 5);
        let _ = rmp::encode::write_map_len(&mut d, n as u32);
        d.extend_from_slice(&body);
        d
    }
}
