//! The broker benchmark behind docs/BENCHMARKS.md "## Brokers (issue 4)".
//! Run it through `scripts/bench-brokers.sh`, which builds in release mode,
//! starts a sandbox master for the listener figures and cleans up.
//!
//! * `gen --out FILE --n N`: a bus byte stream of N distinct return events
//!   (the lead's `saltpipe-gen` was not on main yet; this is a small stand-in).
//! * `e2e --stream FILE --n N --url URL --workers W [--mysql URL]`:
//!   `saltpipe replay` of the stream through the queue at URL with W workers
//!   into a fresh SQLite sink, or with `--mysql mysql://user@host:port` into
//!   a fresh MariaDB database (created and dropped here); prints returns/s
//!   end to end (bus frames in, rows committed).
//! * `listen-cpu --pull SOCK --pub SOCK --url URL --rate R --secs S`:
//!   `saltpipe listen` on a real master while this pushes R return events/s
//!   into the master's `master_event_pull.ipc`; prints the listener's CPU
//!   (utime+stime from /proc) as % of one core and per 1,000 events/s.
//!
//! Every broker name carries a random prefix and is deleted afterwards.

use saltpipe::bus::encode::{frame, length_prefixed};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| {
        eprintln!("missing {name}");
        std::process::exit(2)
    })
}

/// A return event like a `test.ping`/`cmd.run` return, about 400 bytes.
/// `run` keeps jids of different runs apart (20 digits, like Salt's).
fn return_frame(i: u64, run: u32) -> Vec<u8> {
    let jid = format!("20261125{:06}{:06}", run % 1_000_000, i / 4);
    let minion = format!("minion-{:03}", i % 4);
    let mut d = Vec::new();
    let w = &mut d;
    let s = |w: &mut Vec<u8>, x: &str| {
        let _ = rmp::encode::write_str(w, x);
    };
    let _ = rmp::encode::write_map_len(w, 10);
    s(w, "cmd");
    s(w, "_return");
    s(w, "id");
    s(w, &minion);
    s(w, "jid");
    s(w, &jid);
    s(w, "fun");
    s(w, "cmd.run");
    s(w, "fun_args");
    let _ = rmp::encode::write_array_len(w, 1);
    s(w, "uptime");
    s(w, "return");
    s(
        w,
        " 12:00:01 up 42 days,  3:14,  0 users,  load average: 0.15, 0.10, 0.05 and some more output to make the return look like a real one",
    );
    s(w, "retcode");
    let _ = rmp::encode::write_uint(w, 0);
    s(w, "success");
    let _ = rmp::encode::write_bool(w, true);
    s(w, "_stamp");
    s(w, "2026-11-25T12:00:00.123456+00:00");
    s(w, "user");
    s(w, "root");
    frame(&format!("salt/job/{jid}/ret/{minion}"), &d)
}

fn prefix() -> String {
    format!("spbench-{:08x}", rand::random::<u32>())
}

fn bin() -> PathBuf {
    std::env::var_os("SALTPIPE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/saltpipe"))
}

fn count_returns(db: &Path) -> u64 {
    rusqlite::Connection::open(db)
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM salt_returns", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| n as u64)
        .unwrap_or(0)
}

async fn cleanup(url: &str, prefix: &str) {
    let queues = ["default"];
    if url.starts_with("redis") {
        if let Ok(c) = redis::Client::open(url)
            && let Ok(mut c) = c.get_multiplexed_async_connection().await
        {
            for q in queues {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(saltpipe::queue::redis::stream_key(prefix, q))
                    .query_async(&mut c)
                    .await;
            }
        }
    } else if url.starts_with("amqp") {
        if let Ok(conn) =
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
            && let Ok(ch) = conn.create_channel().await
        {
            for q in queues {
                let _ = ch
                    .queue_delete(
                        saltpipe::queue::amqp::queue_name(prefix, q).as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
        }
    } else if url.starts_with("nats")
        && let Ok(c) = async_nats::connect(url).await
    {
        let js = async_nats::jetstream::new(c);
        for q in queues {
            let _ = js
                .delete_stream(saltpipe::queue::nats::stream_name(prefix, q))
                .await;
        }
    }
}

fn gen_file(out: &Path, n: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).expect("create"));
    let base = rand::random::<u32>();
    for i in 0..n {
        f.write_all(&return_frame(i, base)).expect("write");
    }
    f.flush().expect("flush");
}

/// A MariaDB database of the benchmark's own: created, counted, dropped.
struct MyDb {
    server: String,
    name: String,
}

impl MyDb {
    async fn create(server: &str) -> MyDb {
        let name = format!("spbench_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let pool = sqlx::MySqlPool::connect(server)
            .await
            .expect("connect to MariaDB");
        // The name is ours (hex digits): nothing to inject.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
        MyDb {
            server: server.trim_end_matches('/').to_owned(),
            name,
        }
    }

    fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    async fn count_and_drop(self) -> u64 {
        let pool = sqlx::MySqlPool::connect(&self.server)
            .await
            .expect("connect to MariaDB");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.salt_returns",
            self.name
        )))
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {}",
            self.name
        )))
        .execute(&pool)
        .await;
        pool.close().await;
        n as u64
    }
}

/// The queue URL to run with: `embedded` means a fresh queue in `dir`.
fn queue_url(url: String, dir: &std::path::Path) -> String {
    if url == "embedded" {
        format!("embedded://{}", dir.join("queue").display())
    } else {
        url
    }
}

async fn e2e(args: &[String]) {
    let stream = need(args, "--stream");
    let n: u64 = need(args, "--n").parse().expect("--n");
    let url = need(args, "--url");
    let workers = need(args, "--workers");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = prefix();
    let url = queue_url(url, dir.path());
    let db = dir.path().join("salt.db");
    let mysql = match arg(args, "--mysql") {
        Some(server) => Some(MyDb::create(&server).await),
        None => None,
    };
    let sink = match &mysql {
        Some(m) => m.url(),
        None => format!("sqlite://{}", db.display()),
    };
    let started = Instant::now();
    let out = Command::new(bin())
        .args(["replay", &stream, "--json"])
        .env("SALTPIPE_QUEUE_URL", &url)
        .env("SALTPIPE_QUEUE_PREFIX", &p)
        .env("SALTPIPE_QUEUE_SPOOL", dir.path().join("spool"))
        .env("SALTPIPE_WORKER_CONCURRENCY", &workers)
        .env("SALTPIPE_SINK_URL", &sink)
        .env("SALTPIPE_RULES_DEDUPE_RETURNS", "false")
        .env("SALTPIPE_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .output()
        .expect("run saltpipe replay");
    let secs = started.elapsed().as_secs_f64();
    let (stored, sink_name) = match mysql {
        Some(m) => (m.count_and_drop().await, "mariadb"),
        None => (count_returns(&db), "sqlite"),
    };
    cleanup(&url, &p).await;
    if !out.status.success() {
        eprintln!("replay failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let shown = saltpipe::queue::redact(&url);
    let scheme = shown.split("://").next().unwrap_or("?");
    println!(
        "| {scheme} | {sink_name} | {workers} | {n} | {stored} | {secs:.2} | {:.0} |",
        stored as f64 / secs
    );
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name; utime, stime are 14, 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

async fn listen_cpu(args: &[String]) {
    let pull = need(args, "--pull");
    let publ = need(args, "--pub");
    let url = need(args, "--url");
    let rate: u64 = need(args, "--rate").parse().expect("--rate");
    let secs: u64 = need(args, "--secs").parse().expect("--secs");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = prefix();
    let url = queue_url(url, dir.path());
    let log = std::fs::File::create(dir.path().join("listen.log")).expect("log");
    let mut child = Command::new(bin())
        .arg("listen")
        .env("SALTPIPE_SOURCE_SOCKET", &publ)
        .env("SALTPIPE_QUEUE_URL", &url)
        .env("SALTPIPE_QUEUE_PREFIX", &p)
        .env("SALTPIPE_QUEUE_SPOOL", dir.path().join("spool"))
        .env("SALTPIPE_RULES_DEDUPE_RETURNS", "false")
        .env("SALTPIPE_LOG_LEVEL", "info")
        .stderr(log)
        .spawn()
        .expect("spawn listen");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sock = tokio::net::UnixStream::connect(&pull)
        .await
        .expect("connect master_event_pull.ipc");
    let base = rand::random::<u32>();
    // Ticks of 10 ms, rate/100 events each.
    let per_tick = (rate / 100).max(1);
    let t0 = cpu_ticks(child.id());
    let started = Instant::now();
    let mut i = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    use tokio::io::AsyncWriteExt;
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let mut buf = Vec::new();
        for _ in 0..per_tick {
            buf.extend_from_slice(&length_prefixed(&return_frame(i, base)));
            i += 1;
        }
        sock.write_all(&buf).await.expect("push");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let t1 = cpu_ticks(child.id());
    // Let the forwarder finish, then stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("listen.log")).unwrap_or_default();
    let kept = log
        .rsplit("kept: ")
        .next()
        .and_then(|s| s.split(',').next())
        .unwrap_or("?")
        .to_owned();
    cleanup(&url, &p).await;
    let hz = 100.0; // USER_HZ on Linux
    let cpu = (t1 - t0) as f64 / hz / elapsed * 100.0;
    let achieved = i as f64 / elapsed;
    let shown = saltpipe::queue::redact(&url);
    let scheme = shown.split("://").next().unwrap_or("?");
    println!(
        "| {scheme} | {rate} | {achieved:.0} | {kept} | {cpu:.1}% | {:.2}% |",
        cpu / (achieved / 1000.0)
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("gen") => {
            let out = PathBuf::from(need(&args, "--out"));
            let n: u64 = need(&args, "--n").parse().expect("--n");
            gen_file(&out, n);
        }
        Some("e2e") => e2e(&args).await,
        Some("listen-cpu") => listen_cpu(&args).await,
        _ => {
            eprintln!("usage: bench_brokers gen|e2e|listen-cpu ... (see the file header)");
            std::process::exit(2);
        }
    }
}
