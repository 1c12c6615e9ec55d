//! Operations end to end, with a real Salt master (scripts/salt-sandbox.py)
//! and the real `saltpipe run` binary:
//!
//! * /metrics scraped while events flow, its counts checked against what
//!   was sent and what the database holds; /health;
//! * SIGHUP with changed rules and actions while events flow: every event
//!   read before the swap is judged by the old rules, every one after by
//!   the new, none lost and none stored or sent twice; an invalid config
//!   on SIGHUP is refused and the old one stays;
//! * `saltpipe top` draws those figures.
//!
//! And, without a master: the real 3008.5 capture replayed with the
//! listener up, its /metrics checked against the capture and the database.

mod common;

use axum::extract::{Path as UrlPath, State};
use common::free_port;
use saltpipe::ops::top::{Scrape, parse};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(url: &str) -> Option<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        saltpipe::tls::install_ring();
        let r = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        let code = r.status().as_u16();
        Some((code, r.text().await.ok()?))
    })
}

fn scrape(port: u16) -> Option<Scrape> {
    get(&format!("http://127.0.0.1:{port}/metrics")).map(|(_, t)| parse(&t))
}

fn metric(s: &Scrape, name: &str) -> f64 {
    s.sum(name)
}

/// A throwaway master + minions; torn down on drop.
struct Sandbox {
    dir: tempfile::TempDir,
    info: Value,
}

impl Sandbox {
    fn up() -> Sandbox {
        let out = Command::new("bash")
            .arg(repo().join("scripts/salt-venv.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("salt-venv.sh");
        assert!(out.status.success());
        let venv = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("venv")
            .trim()
            .to_owned();
        let dir = tempfile::Builder::new()
            .prefix("saltpipe-ops-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new("python3")
            .arg(repo().join("scripts/salt-sandbox.py"))
            .args(["up", "--dir"])
            .arg(dir.path())
            .args(["--minions", "2", "--venv", &venv])
            .stderr(Stdio::inherit())
            .output()
            .expect("salt-sandbox up");
        assert!(out.status.success(), "salt-sandbox up failed");
        let info: Value = serde_json::from_slice(&out.stdout).expect("sandbox json");
        Sandbox { dir, info }
    }

    fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.info[key].as_str().expect(key))
    }

    /// A `salt` job; returns its jid.
    fn salt(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(repo().join("scripts/salt-sandbox.py"))
            .args(["salt", "--dir"])
            .arg(self.dir.path())
            .arg("--")
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("salt");
        let v: Value = serde_json::from_slice(&out.stdout).expect("salt json");
        v["jid"].as_str().expect("jid").to_owned()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg(repo().join("scripts/salt-sandbox.py"))
            .args(["down", "--dir"])
            .arg(self.dir.path())
            .status();
    }
}

/// (path, JSON body) of each POST received.
type Posts = Arc<Mutex<Vec<(String, Value)>>>;

/// An HTTP server for the webhook actions, on its own runtime thread.
struct Hooks {
    port: u16,
    posts: Posts,
}

fn hook_server() -> Hooks {
    let posts: Posts = Arc::default();
    let p = posts.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            async fn h(
                State(p): State<Posts>,
                UrlPath(path): UrlPath<String>,
                body: String,
            ) -> &'static str {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                p.lock().expect("lock").push((path, v));
                "ok"
            }
            let app = axum::Router::new()
                .route("/{path}", axum::routing::post(h))
                .with_state(p);
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(l, app).await;
        });
    });
    Hooks { port, posts }
}

/// The running daemon; SIGKILLed on drop if a test failed midway.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Each thread of process `pid`: its name and nice value (/proc).
fn thread_nice(pid: u32) -> Vec<(String, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc tasks");
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // After the name in parentheses: state is field 3, nice field 19.
            let nice = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(16)?
                .parse()
                .ok()?;
            Some((name.trim().to_string(), nice))
        })
        .collect()
}

fn this_threads_nice() -> i64 {
    let me = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
    let fields = me.rsplit_once(')').expect("stat").1;
    fields
        .split_whitespace()
        .nth(16)
        .expect("nice")
        .parse()
        .expect("nice")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of our own child.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill");
}

fn config(dir: &Path, bus: &Path, metrics: u16, hooks: u16, version: u8) -> String {
    // v1 keeps the even events and posts them to /a; v2 keeps the odd ones
    // and posts to /b. Job returns are kept by both (the default profile).
    let (drop, hook) = if version == 1 {
        ("odd", "a")
    } else {
        ("even", "b")
    };
    format!(
        r#"
[source]
socket = "{bus}"
[queue]
url = "embedded://{d}/queue"
[sink]
url = "sqlite://{d}/salt.db"
[worker]
batch_timeout = "50ms"
drain_timeout = "10s"
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
level = "info"

[rules]
keep = "jobs"

[[rules.rule]]
name = "drop-{drop}"
action = "drop"
tag = "saltpipe/e2e/{drop}/*"

[[rules.rule]]
name = "keep-e2e"
tag = "saltpipe/e2e/*"

[[actions]]
name = "hook-{hook}"
when = {{ tag = "saltpipe/e2e/*" }}
rate_limit = 0
queue_size = 100000
body = '{{"tag": {{{{ tag | tojson }}}}}}'
webhook = {{ url = "http://127.0.0.1:{hooks}/{hook}" }}
"#,
        bus = bus.display(),
        d = dir.display(),
    )
}

/// Pushes events `from..to` on one connection: the master reads its pull
/// connections concurrently, so events pushed on several could be published
/// out of order under load, and this test relies on their order.
fn push(s: &mut std::os::unix::net::UnixStream, from: u64, to: u64) {
    for n in from..to {
        let parity = if n % 2 == 0 { "even" } else { "odd" };
        let tag = format!("saltpipe/e2e/{parity}/{n:06}");
        let f = saltpipe::bus::encode::frame_bytes(&tag, &[("n", &n.to_string())]);
        s.write_all(&saltpipe::bus::encode::length_prefixed(&f))
            .expect("push");
    }
    s.flush().expect("flush");
}

fn stored_e2e(dir: &Path) -> Vec<u64> {
    let db = rusqlite::Connection::open(dir.join("salt.db")).expect("db");
    let mut st = db
        .prepare("SELECT tag FROM salt_events WHERE tag LIKE 'saltpipe/e2e/%' ORDER BY tag")
        .expect("prepare");
    st.query_map([], |r| r.get::<_, String>(0))
        .expect("query")
        .map(|t| {
            t.expect("row")
                .rsplit('/')
                .next()
                .expect("n")
                .parse()
                .expect("number")
        })
        .collect()
}

fn count(dir: &Path, sql: &str) -> i64 {
    let db = rusqlite::Connection::open(dir.join("salt.db")).expect("db");
    db.query_row(sql, [], |r| r.get(0)).expect("count")
}

#[test]
fn metrics_health_top_and_sighup_with_a_real_master() {
    let salt = Sandbox::up();
    let work = tempfile::tempdir().expect("tempdir");
    let hooks = hook_server();
    let mport = free_port();
    let cfg_path = work.path().join("saltpipe.toml");
    let bus = salt.path("event_pub");
    let pull = salt.path("event_pull");
    std::fs::write(&cfg_path, config(work.path(), &bus, mport, hooks.port, 1)).expect("config");
    let log = std::fs::File::create(work.path().join("saltpipe.log")).expect("log");
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_saltpipe"))
            .args(["run", "--config"])
            .arg(&cfg_path)
            .stderr(log)
            .spawn()
            .expect("saltpipe run"),
    );
    // Healthy once it reads the bus and its worker runs.
    wait_for("/health 200", Duration::from_secs(20), || {
        get(&format!("http://127.0.0.1:{mport}/health")).filter(|(c, _)| *c == 200)
    });

    // Real jobs: their returns land and /metrics counts them.
    let jids: Vec<String> = (0..2).map(|_| salt.salt(&["*", "test.ping"])).collect();

    // Events flow while the config changes under SIGHUP.
    let total: u64 = 1200;
    let pusher = {
        let pull = pull.clone();
        std::thread::spawn(move || {
            let mut s =
                std::os::unix::net::UnixStream::connect(&pull).expect("connect pull socket");
            for chunk in 0..(total / 20) {
                push(&mut s, chunk * 20, chunk * 20 + 20);
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // An invalid config first: refused, the running one stays.
    std::fs::write(&cfg_path, "[rules]\nkeep = \"sometimes\"\n").expect("bad config");
    signal(&daemon.0, libc::SIGHUP);
    wait_for("reload refused", Duration::from_secs(10), || {
        scrape(mport).filter(|s| metric(s, "saltpipe_config_reload_failures_total") >= 1.0)
    });
    std::fs::write(&cfg_path, config(work.path(), &bus, mport, hooks.port, 2)).expect("config v2");
    signal(&daemon.0, libc::SIGHUP);
    wait_for("reload applied", Duration::from_secs(10), || {
        scrape(mport).filter(|s| metric(s, "saltpipe_config_reloads_total") >= 1.0)
    });
    pusher.join().expect("pusher");

    // Everything read, written and posted.
    let s = wait_for(
        "all events written and posted",
        Duration::from_secs(60),
        || {
            let s = scrape(mport)?;
            let dropped_rule = s.get("saltpipe_events_dropped_total", &[("reason", "rule")])?;
            let kept_e2e = stored_e2e(work.path()).len() as f64;
            let posted = hooks.posts.lock().expect("lock").len() as f64;
            // The depth gauge is refreshed at most once a second by the
            // worker: wait for it too rather than catch a stale value.
            (kept_e2e + dropped_rule >= total as f64
                && metric(&s, "saltpipe_events_acked_total")
                    == metric(&s, "saltpipe_events_kept_total")
                && metric(&s, "saltpipe_queue_depth") == 0.0
                && posted >= kept_e2e)
                .then_some(s)
        },
    );

    // SIGHUP: one cut K. Before it the old rule (keep even), after it the new (keep odd).
    let stored = stored_e2e(work.path());
    let unique: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(unique.len(), stored.len(), "no event stored twice");
    // The cut is the first event read after the swap: find the one that explains the set.
    let want = |k: u64| -> BTreeSet<u64> {
        (0..total)
            .filter(|n| if *n < k { n % 2 == 0 } else { n % 2 == 1 })
            .collect()
    };
    let k = (0..=total).find(|k| want(*k) == unique);
    let Some(k) = k else {
        panic!(
            "no single cut explains what was kept (an event lost, or judged by the wrong rules): {unique:?}"
        );
    };
    assert!(
        k > 0 && k < total - 1,
        "the cut fell while events flowed: {k}"
    );
    let dropped_rule = s
        .get("saltpipe_events_dropped_total", &[("reason", "rule")])
        .expect("dropped");
    assert_eq!(
        dropped_rule as u64 + unique.len() as u64,
        total,
        "every pushed event kept or dropped by a rule"
    );

    // Actions: each kept event posted exactly once, to /a before the swap and /b after.
    let posts = hooks.posts.lock().expect("lock").clone();
    let num = |v: &Value| -> u64 {
        v["tag"]
            .as_str()
            .expect("tag")
            .rsplit('/')
            .next()
            .expect("n")
            .parse()
            .expect("n")
    };
    let a: Vec<u64> = posts
        .iter()
        .filter(|(p, _)| p == "a")
        .map(|(_, v)| num(v))
        .collect();
    let b: Vec<u64> = posts
        .iter()
        .filter(|(p, _)| p == "b")
        .map(|(_, v)| num(v))
        .collect();
    let mut all: Vec<u64> = a.iter().chain(&b).copied().collect();
    all.sort();
    let all_set: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), all_set.len(), "no action sent twice");
    assert_eq!(all_set, unique, "every kept event's action sent");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both the old and the new action ran"
    );
    assert!(
        a.iter().max() < b.iter().min(),
        "old action before the swap, new after"
    );

    // /metrics against what was sent and what the database holds.
    let returns = count(work.path(), "SELECT COUNT(*) FROM salt_returns");
    for jid in &jids {
        assert_eq!(
            count(
                work.path(),
                &format!("SELECT COUNT(*) FROM salt_returns WHERE jid = '{jid}'")
            ),
            2
        );
    }
    assert_eq!(
        s.get("saltpipe_rows_written_total", &[("table", "salt_returns")]),
        Some(returns as f64)
    );
    assert_eq!(
        s.get("saltpipe_rows_written_total", &[("table", "salt_events")]),
        Some(count(work.path(), "SELECT COUNT(*) FROM salt_events") as f64)
    );
    assert_eq!(
        s.get("saltpipe_rows_written_total", &[("table", "jids")]),
        Some(count(work.path(), "SELECT COUNT(*) FROM jids") as f64)
    );
    let sent_a = s
        .get(
            "saltpipe_action_results_total",
            &[("action", "hook-a"), ("outcome", "sent")],
        )
        .expect("hook-a");
    let sent_b = s
        .get(
            "saltpipe_action_results_total",
            &[("action", "hook-b"), ("outcome", "sent")],
        )
        .expect("hook-b");
    assert_eq!(sent_a as usize, a.len());
    assert_eq!(sent_b as usize, b.len());
    assert!(
        metric(&s, "saltpipe_frames_total") >= total as f64 + 8.0,
        "pushed events plus the jobs' events"
    );
    assert_eq!(metric(&s, "saltpipe_bus_connected"), 1.0);
    assert_eq!(metric(&s, "saltpipe_queue_depth"), 0.0);
    assert!(metric(&s, "saltpipe_batches_total") >= 1.0);
    assert_eq!(metric(&s, "saltpipe_events_overflow_dropped_total"), 0.0);

    // The bus comes first: the listener's threads (its own, the bus
    // reader's, the queue writes') run at the priority saltpipe was started
    // with, the workers' (the main runtime's) ten nice steps below.
    let ours = this_threads_nice();
    let threads = thread_nice(daemon.0.id());
    let listen: Vec<i64> = threads
        .iter()
        .filter(|(n, _)| n == "saltpipe-listen")
        .map(|t| t.1)
        .collect();
    let workers: Vec<i64> = threads
        .iter()
        .filter(|(n, _)| n == "tokio-rt-worker")
        .map(|t| t.1)
        .collect();
    assert!(
        listen.len() >= 2,
        "the listener and its bus reader: {threads:?}"
    );
    assert!(listen.iter().all(|n| *n == ours), "{threads:?}");
    assert!(!workers.is_empty(), "{threads:?}");
    assert!(
        workers.iter().all(|n| *n == (ours + 10).min(19)),
        "{threads:?}"
    );

    // saltpipe top draws them.
    let top = Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["top", "--count", "2", "--interval", "300ms", "--url"])
        .arg(format!("http://127.0.0.1:{mport}/metrics"))
        .output()
        .expect("top");
    assert!(top.status.success());
    let screen = String::from_utf8_lossy(&top.stdout);
    assert!(screen.contains("bus: connected"), "{screen}");
    assert!(screen.contains("hook-b"), "{screen}");
    assert!(screen.contains("queue default"), "{screen}");

    // SIGTERM: drained, exit 0; /health goes with it.
    signal(&daemon.0, libc::SIGTERM);
    let status = wait_for("exit", Duration::from_secs(30), || {
        daemon.0.try_wait().expect("wait")
    });
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn health_reports_a_missing_bus() {
    let work = tempfile::tempdir().expect("tempdir");
    let mport = free_port();
    let cfg_path = work.path().join("saltpipe.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[source]\nsocket = \"{d}/no-such.ipc\"\n[queue]\nurl = \"embedded://{d}/q\"\n[sink]\nurl = \"sqlite://{d}/s.db\"\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n",
            d = work.path().display()
        ),
    )
    .expect("config");
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_saltpipe"))
            .args(["run", "--config"])
            .arg(&cfg_path)
            .stderr(Stdio::null())
            .spawn()
            .expect("run"),
    );
    // The listener comes up before the workers: wait until they run too.
    let (code, body) = wait_for(
        "/health with the worker running",
        Duration::from_secs(20),
        || {
            get(&format!("http://127.0.0.1:{mport}/health")).filter(|(_, body)| {
                serde_json::from_str::<Value>(body).is_ok_and(|v| v["workers_running"] == 1)
            })
        },
    );
    assert_eq!(code, 503, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["status"], "unhealthy");
    assert!(v["reasons"].to_string().contains("event bus"), "{body}");
    assert_eq!(v["workers_running"], 1);
    signal(&daemon.0, libc::SIGTERM);
    let status = wait_for("exit", Duration::from_secs(30), || {
        daemon.0.try_wait().expect("wait")
    });
    assert!(status.success());
}

/// The real capture, replayed with the pipeline's counters served: the
/// scrape matches the capture (44 frames) and the database.
#[tokio::test]
async fn metrics_of_a_replayed_capture_match_the_capture_and_the_database() {
    use saltpipe::stats::Stats;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = saltpipe::config::from_str_with_env(
        &format!(
            "[queue]\nurl = \"embedded://{d}/q\"\n[sink]\nurl = \"sqlite://{d}/s.db\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            d = dir.path().display()
        ),
        Path::new("t"),
        &[],
    )
    .expect("config");
    let stats = Arc::new(Stats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, server) = saltpipe::ops::serve(&cfg.metrics, stats.clone(), stop.clone())
        .await
        .expect("serve");
    saltpipe::pipeline::replay(
        &cfg,
        Box::new(saltpipe::source::file::FileSource::new(
            repo().join("tests/fixtures/salt-3008.5-bus.bin"),
        )),
        stats.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("replay");
    saltpipe::tls::install_ring();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    let s = parse(&text);
    let db = rusqlite::Connection::open(dir.path().join("s.db")).expect("db");
    let rows = |t: &str| -> f64 {
        db.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .expect("count") as f64
    };
    // tests/fixtures/README.md: 44 frames, 12053 bytes.
    assert_eq!(s.get("saltpipe_frames_total", &[]), Some(44.0));
    assert_eq!(s.get("saltpipe_bus_bytes_read_total", &[]), Some(12053.0));
    let kept = metric(&s, "saltpipe_events_kept_total");
    assert_eq!(
        kept + metric(&s, "saltpipe_events_dropped_total")
            + metric(&s, "saltpipe_frames_malformed_total"),
        44.0
    );
    assert_eq!(metric(&s, "saltpipe_events_acked_total"), kept);
    assert_eq!(
        s.get("saltpipe_rows_written_total", &[("table", "salt_returns")]),
        Some(rows("salt_returns"))
    );
    assert_eq!(
        s.get("saltpipe_rows_written_total", &[("table", "jids")]),
        Some(rows("jids"))
    );
    assert_eq!(
        s.get("saltpipe_rows_written_total", &[("table", "salt_events")]),
        Some(rows("salt_events"))
    );
    // The capture's find_job rounds are dropped as such (two rounds: frames 15-18 and 43-44).
    assert!(
        s.get("saltpipe_events_dropped_total", &[("reason", "find_job")])
            .expect("find_job")
            >= 3.0
    );
    assert_eq!(metric(&s, "saltpipe_batch_events_sum"), kept);
    stop.cancel();
    server.await.expect("server");
}
