//! Actions against real peers started by the test: an HTTP server (axum)
//! with an accepting, a failing (500) and a slow endpoint; a real SMTP
//! server (aiosmtpd, installed from PyPI into ~/.cache/saltpipe by
//! scripts/smtp-venv.sh); real commands. The events are the real 3008.5 bus
//! capture replayed through the whole pipeline, so every check also proves
//! the events still landed in the database whatever the actions did.

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use saltpipe::config::{Config, from_str_with_env};
use saltpipe::pipeline;
use saltpipe::source::file::FileSource;
use saltpipe::stats::Stats;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/salt-3008.5-bus.bin")
}

/// The failed returns in the capture (README of tests/fixtures): cmd.run
/// 'exit 3' and state.apply failing, on both minions.
fn failed_returns() -> BTreeSet<(String, String, i64)> {
    [
        ("cmd.run", "minion-1", 3),
        ("cmd.run", "minion-2", 3),
        ("state.apply", "minion-1", 2),
        ("state.apply", "minion-2", 2),
    ]
    .into_iter()
    .map(|(f, m, r)| (f.to_owned(), m.to_owned(), r))
    .collect()
}

#[derive(Default)]
struct Received {
    /// (path, body) in arrival order.
    posts: Mutex<Vec<(String, String)>>,
}

async fn endpoint(
    State(rx): State<Arc<Received>>,
    UrlPath(path): UrlPath<String>,
    body: String,
) -> StatusCode {
    rx.posts.lock().expect("lock").push((path.clone(), body));
    if path.starts_with("fail") {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if path.starts_with("slow") {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if path.starts_with("lag") {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if path.starts_with("bad") {
        return StatusCode::BAD_REQUEST;
    }
    StatusCode::OK
}

/// An HTTP server on a free loopback port; returns its base URL.
async fn http_server() -> (String, Arc<Received>) {
    let rx = Arc::new(Received::default());
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(endpoint))
        .with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), rx)
}

fn config(dir: &Path, actions: &str) -> Config {
    let text = format!(
        "[queue]\nurl = \"embedded://{d}/queue\"\n[sink]\nurl = \"sqlite://{d}/salt.db\"\n\
         [worker]\ndrain_timeout = \"8s\"\nbatch_timeout = \"50ms\"\n{actions}",
        d = dir.display()
    );
    from_str_with_env(&text, Path::new("test.toml"), &[]).expect("config")
}

/// Replays the capture through the whole pipeline with these actions.
async fn replay(cfg: &Config) -> Arc<Stats> {
    replay_file(cfg, fixture()).await
}

async fn replay_file(cfg: &Config, file: PathBuf) -> Arc<Stats> {
    let stats = Arc::new(Stats::default());
    pipeline::replay(
        cfg,
        Box::new(FileSource::new(file)),
        stats.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("replay");
    stats
}

fn returns_in_db(dir: &Path) -> i64 {
    let db = rusqlite::Connection::open(dir.join("salt.db")).expect("open db");
    db.query_row("SELECT COUNT(*) FROM salt_returns", [], |r| r.get(0))
        .expect("count")
}

fn outcome(stats: &Stats, action: &str, outcome: &str) -> u64 {
    stats
        .action(action)
        .outcomes()
        .iter()
        .find(|(o, _)| *o == outcome)
        .map(|(_, v)| *v)
        .unwrap_or(u64::MAX)
}

/// The events landed whatever the actions did: all kept events acked and
/// every return in salt_returns.
fn assert_all_written(stats: &Stats, dir: &Path) {
    let s = stats.snapshot();
    assert!(s.kept > 0);
    assert_eq!(s.acked, s.kept, "every kept event written and acked");
    assert_eq!(returns_in_db(dir), s.returns_written as i64);
    assert!(s.returns_written >= 4);
}

#[tokio::test]
async fn webhooks_post_templated_json_retry_give_up_and_never_block_the_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, rx) = http_server().await;
    let when = "when = { kind = \"job_return\", success = false }";
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[[actions]]
name = "ok"
{when}
body = '{{"text": {{{{ (fun ~ " failed on " ~ minion) | tojson }}}}, "fun": {{{{ fun | tojson }}}}, "minion": {{{{ minion | tojson }}}}, "retcode": {{{{ retcode | tojson }}}}, "jid": {{{{ data.jid | tojson }}}}}}'
webhook = {{ url = "{base}/ok", headers = {{ X-Token = "s3cret" }} }}

[[actions]]
name = "failing"
{when}
retries = 2
retry_min = "10ms"
retry_max = "20ms"
webhook = {{ url = "{base}/fail" }}

[[actions]]
name = "refused"
{when}
retries = 5
retry_min = "10ms"
webhook = {{ url = "{base}/bad" }}

[[actions]]
name = "slow"
{when}
timeout = "300ms"
retries = 0
webhook = {{ url = "{base}/slow" }}

[[actions]]
name = "dedupe"
{when}
dedupe_key = "{{{{ minion }}}}"
webhook = {{ url = "{base}/dedupe" }}

[[actions]]
name = "rate"
{when}
rate_limit = 1
rate_window = "1h"
webhook = {{ url = "{base}/rate" }}
"#
        ),
    );
    let stats = replay(&cfg).await;
    assert_all_written(&stats, dir.path());

    let posts = rx.posts.lock().expect("lock").clone();
    let on = |p: &str| -> Vec<String> {
        posts
            .iter()
            .filter(|(path, _)| path == p)
            .map(|(_, b)| b.clone())
            .collect()
    };
    // Accepting endpoint: one POST per failed return, with the templated JSON.
    let ok = on("ok");
    let got: BTreeSet<(String, String, i64)> = ok
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_str(b).expect("JSON body");
            assert_eq!(
                v["text"],
                format!(
                    "{} failed on {}",
                    v["fun"].as_str().expect("fun"),
                    v["minion"].as_str().expect("minion")
                )
            );
            assert_eq!(
                v["jid"].as_str().map(str::len),
                Some(20),
                "data.* available: {b}"
            );
            (
                v["fun"].as_str().expect("fun").to_owned(),
                v["minion"].as_str().expect("minion").to_owned(),
                v["retcode"].as_i64().expect("retcode"),
            )
        })
        .collect();
    assert_eq!(ok.len(), 4, "{ok:?}");
    assert_eq!(got, failed_returns());
    // Per-minion order: each minion's cmd.run failure before its state.apply.
    for m in ["minion-1", "minion-2"] {
        let funs: Vec<String> = ok
            .iter()
            .map(|b| serde_json::from_str::<serde_json::Value>(b).expect("json"))
            .filter(|v| v["minion"] == m)
            .map(|v| v["fun"].as_str().expect("fun").to_owned())
            .collect();
        assert_eq!(funs, ["cmd.run", "state.apply"], "{m}");
    }
    assert_eq!(outcome(&stats, "ok", "sent"), 4);

    // 500: tried 1 + 2 retries per event, then counted as failed.
    assert_eq!(on("fail").len(), 12);
    assert_eq!(outcome(&stats, "failing", "failed"), 4);
    assert_eq!(outcome(&stats, "failing", "retried"), 8);
    assert_eq!(outcome(&stats, "failing", "sent"), 0);
    // 400: the request is wrong; retrying cannot help.
    assert_eq!(on("bad").len(), 4);
    assert_eq!(outcome(&stats, "refused", "failed"), 4);
    assert_eq!(outcome(&stats, "refused", "retried"), 0);
    // Slower than the timeout: failed, and the write was not held back (above).
    assert_eq!(outcome(&stats, "slow", "failed"), 4);
    // Dedupe by minion: one per minion.
    assert_eq!(on("dedupe").len(), 2);
    assert_eq!(outcome(&stats, "dedupe", "deduplicated"), 2);
    // One per hour.
    assert_eq!(on("rate").len(), 1);
    assert_eq!(outcome(&stats, "rate", "rate_limited"), 3);
}

#[tokio::test]
async fn a_full_action_queue_drops_the_action_not_the_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, _rx) = http_server().await;
    let cfg = config(
        dir.path(),
        &format!(
            // Every return written, the capture's runner job's included.
            "[[actions]]\nname = \"tiny\"\nwhen = {{ kind = [\"job_return\", \"runner_return\"] }}\nqueue_size = 1\nconcurrency = 1\ntimeout = \"200ms\"\nretries = 0\nwebhook = {{ url = \"{base}/slow\" }}\n"
        ),
    );
    let stats = replay(&cfg).await;
    assert_all_written(&stats, dir.path());
    let returns = stats.snapshot().returns_written;
    let a = stats.action("tiny");
    let dropped = a.dropped.load(Relaxed);
    assert!(dropped >= 1, "a queue of 1 cannot hold a batch of returns");
    assert_eq!(
        a.sent.load(Relaxed) + a.failed.load(Relaxed) + dropped,
        returns,
        "every offered event is accounted for"
    );
}

#[tokio::test]
async fn exec_gets_the_event_on_stdin_and_is_killed_on_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One file per run: sends for different minions run concurrently.
    let out = dir.path().join("exec.out");
    std::fs::create_dir(&out).expect("out dir");
    let marker = format!("saltpipe-exec-test-{}", std::process::id());
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[[actions]]
name = "append"
when = {{ kind = "job_return", success = false }}
exec = {{ command = ["sh", "-c", "cat > \"$(mktemp \"$OUT/ev.XXXXXX\")\""], env = {{ OUT = "{out}" }} }}

[[actions]]
name = "hang"
when = {{ kind = "job_return", success = false }}
timeout = "300ms"
retries = 1
retry_min = "10ms"
exec = {{ command = ["sh", "-c", "sh -c 'sleep 30; true # {marker}'; true # {marker}"] }}

[[actions]]
name = "exit1"
when = {{ kind = "job_return", success = false }}
retries = 1
retry_min = "10ms"
exec = {{ command = ["sh", "-c", "echo nope >&2; exit 1"] }}

[[actions]]
name = "missing"
when = {{ kind = "job_return", success = false }}
exec = {{ command = ["/nonexistent/saltpipe-page"] }}
"#,
            out = out.display()
        ),
    );
    let stats = replay(&cfg).await;
    assert_all_written(&stats, dir.path());

    let runs: Vec<String> = std::fs::read_dir(&out)
        .expect("exec output")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).expect("read"))
        .collect();
    assert_eq!(runs.len(), 4, "one run per failed return");
    let got: BTreeSet<(String, String, i64)> = runs
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("event JSON on stdin");
            assert!(v["tag"].as_str().expect("tag").starts_with("salt/job/"));
            (
                v["fun"].as_str().expect("fun").to_owned(),
                v["minion"].as_str().expect("minion").to_owned(),
                v["data"]["retcode"].as_i64().expect("full data"),
            )
        })
        .collect();
    assert_eq!(got, failed_returns());
    assert_eq!(outcome(&stats, "append", "sent"), 4);

    assert_eq!(outcome(&stats, "hang", "failed"), 4);
    assert_eq!(outcome(&stats, "hang", "retried"), 4);
    // Killed, with the shell's own child: nothing left behind once the
    // SIGKILLs are delivered (asynchronous, hence the short wait).
    let left = || {
        std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter(|p| {
                std::fs::read(p.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while left() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        left(),
        0,
        "timed-out commands and their children were killed"
    );

    assert_eq!(outcome(&stats, "exit1", "failed"), 4);
    assert_eq!(outcome(&stats, "exit1", "retried"), 4);
    assert_eq!(outcome(&stats, "missing", "failed"), 4);
    assert_eq!(outcome(&stats, "missing", "retried"), 0);
}

/// A real SMTP server (aiosmtpd) on loopback, requiring AUTH.
struct Smtp {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Smtp {
    fn start(user: &str, password: &str) -> Smtp {
        Smtp::start_with(user, password, &[])
    }

    fn start_with(user: &str, password: &str, extra: &[&std::ffi::OsStr]) -> Smtp {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let venv = std::process::Command::new("bash")
            .arg(root.join("scripts/smtp-venv.sh"))
            .output()
            .expect("smtp-venv.sh");
        assert!(
            venv.status.success(),
            "{}",
            String::from_utf8_lossy(&venv.stderr)
        );
        let venv = String::from_utf8_lossy(&venv.stdout)
            .lines()
            .last()
            .expect("venv path")
            .to_owned();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new(Path::new(&venv).join("bin/python"))
            .arg(root.join("scripts/smtp-sink.py"))
            .args(["--dir"])
            .arg(dir.path())
            .args(["--user", user, "--password", password])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("smtp-sink.py");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("port line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("port JSON");
        let port = v["port"].as_u64().expect("port") as u16;
        Smtp { child, port, dir }
    }

    fn messages(&self) -> Vec<String> {
        let mut m: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .map(|e| std::fs::read_to_string(e.path()).expect("eml"))
            .collect();
        m.sort();
        m
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn email_over_real_smtp_with_auth() {
    let smtp = Smtp::start("saltpipe", "pa55");
    let dir = tempfile::tempdir().expect("tempdir");
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "pa55\n").expect("pw");
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[[actions]]
name = "mail"
when = {{ kind = "job_return", success = false }}
body = "Job {{{{ jid }}}}: {{{{ fun }}}} on {{{{ minion }}}} returned {{{{ retcode }}}}"
email = {{ host = "127.0.0.1", port = {port}, tls = "none", username = "saltpipe", password_file = "{pw}", from = "saltpipe <saltpipe@example.org>", to = ["ops@example.org", "oncall@example.org"], subject = "{{{{ fun }}}} failed on {{{{ minion }}}}" }}

[[actions]]
name = "bad-password"
timeout = "2s"
when = {{ kind = "job_return", success = false }}
retries = 2
retry_min = "10ms"
email = {{ host = "127.0.0.1", port = {port}, tls = "none", username = "saltpipe", password = "wrong", from = "saltpipe@example.org", to = ["ops@example.org"] }}
"#,
            port = smtp.port,
            pw = pwfile.display()
        ),
    );
    let stats = replay(&cfg).await;
    assert_all_written(&stats, dir.path());
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    let subjects: BTreeSet<String> = msgs
        .iter()
        .filter_map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        })
        .collect();
    let want: BTreeSet<String> = failed_returns()
        .into_iter()
        .map(|(f, m, _)| format!("{f} failed on {m}"))
        .collect();
    assert_eq!(subjects, want);
    assert!(
        msgs.iter()
            .all(|m| m.contains("To: ops@example.org, oncall@example.org")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("state.apply on minion-1 returned 2")),
        "{msgs:?}"
    );
    assert_eq!(outcome(&stats, "mail", "sent"), 4);
    // A refused login is permanent: no retries.
    assert_eq!(outcome(&stats, "bad-password", "failed"), 4);
    assert_eq!(outcome(&stats, "bad-password", "retried"), 0);
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, via
/// openssl. Returns (ca, cert, key).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = "set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=saltpipe-test-ca -keyout ca.key -out ca.pem
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr
printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > leaf.ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile leaf.ext -out cert.pem";
    let st = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl");
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

#[tokio::test]
async fn email_over_starttls_and_implicit_tls_with_a_private_ca() {
    // The untrusted action's aborted handshakes make aiosmtpd print tracebacks: expected.
    let certs = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = private_ca(certs.path());
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("saltpipe::action=info")
        .try_init();
    for mode in ["starttls", "tls"] {
        let smtp = Smtp::start_with(
            "saltpipe",
            "pa55",
            &[
                "--tls".as_ref(),
                mode.as_ref(),
                "--cert".as_ref(),
                cert.as_os_str(),
                "--key".as_ref(),
                key.as_os_str(),
            ],
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(
            dir.path(),
            &format!(
                r#"
[[actions]]
name = "mail"
when = {{ kind = "job_return", success = false }}
email = {{ host = "127.0.0.1", port = {port}, tls = "{mode}", ca_file = "{ca}", username = "saltpipe", password = "pa55", from = "saltpipe@example.org", to = ["ops@example.org"] }}

[[actions]]
name = "untrusted"
when = {{ kind = "job_return", success = false }}
retries = 0
timeout = "3s"
email = {{ host = "127.0.0.1", port = {port}, tls = "{mode}", username = "saltpipe", password = "pa55", from = "saltpipe@example.org", to = ["ops@example.org"] }}
"#,
                port = smtp.port,
                ca = ca.display()
            ),
        );
        let stats = replay(&cfg).await;
        assert_all_written(&stats, dir.path());
        assert_eq!(smtp.messages().len(), 4, "{mode}");
        assert_eq!(outcome(&stats, "mail", "sent"), 4, "{mode}");
        // Without the CA the certificate is refused: nothing sent in clear.
        assert_eq!(outcome(&stats, "untrusted", "sent"), 0, "{mode}");
        assert_eq!(outcome(&stats, "untrusted", "failed"), 4, "{mode}");
    }
}

/// `n` failed returns of one job, each from its own minion, as a bus stream.
fn failed_returns_file(dir: &Path, n: usize) -> PathBuf {
    let mut out = Vec::new();
    for i in 0..n {
        let minion = format!("m{i}");
        let data = [
            ("jid", "20261202120000000001"),
            ("id", minion.as_str()),
            ("fun", "state.apply"),
        ];
        let mut map = Vec::new();
        let _ = rmp::encode::write_map_len(&mut map, data.len() as u32 + 1);
        for (k, v) in data {
            let _ = rmp::encode::write_str(&mut map, k);
            let _ = rmp::encode::write_str(&mut map, v);
        }
        let _ = rmp::encode::write_str(&mut map, "success");
        let _ = rmp::encode::write_bool(&mut map, false);
        out.extend(saltpipe::bus::encode::frame(
            &format!("salt/job/20261202120000000001/ret/{minion}"),
            &map,
        ));
    }
    let path = dir.join("failed.bin");
    std::fs::write(&path, out).expect("write stream");
    path
}

#[tokio::test]
async fn actions_queued_at_the_end_of_a_replay_are_sent_or_counted_as_given_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, rx) = http_server().await;
    let stream = failed_returns_file(dir.path(), 100);
    let action = format!(
        "[[actions]]\nname = \"lag\"\nrate_limit = 0\nwhen = {{ kind = \"job_return\", success = false }}\nwebhook = {{ url = \"{base}/lag\" }}\n"
    );
    // 100 sends of 200 ms, 4 at a time: ~5 s, well inside the drain time.
    let mut cfg = config(&dir.path().join("a"), &action);
    cfg.worker.drain_timeout = Duration::from_secs(30);
    let stats = replay_file(&cfg, stream.clone()).await;
    assert_eq!(stats.snapshot().returns_written, 100);
    assert_eq!(outcome(&stats, "lag", "sent"), 100);
    assert_eq!(outcome(&stats, "lag", "given_up"), 0);
    assert_eq!(rx.posts.lock().expect("lock").len(), 100);

    // A drain time too short for them (~5 s of sends): what is not sent by
    // then is given up and counted.
    let mut cfg = config(&dir.path().join("b"), &action);
    cfg.worker.drain_timeout = Duration::from_millis(1500);
    let stats = replay_file(&cfg, stream).await;
    assert_eq!(stats.snapshot().returns_written, 100);
    let sent = outcome(&stats, "lag", "sent");
    let given_up = outcome(&stats, "lag", "given_up");
    assert!(given_up > 0 && sent > 0, "sent {sent}, given up {given_up}");
    assert_eq!(sent + given_up, 100, "every offered event accounted for");
    let summary = &stats.snapshot().actions["lag"];
    assert_eq!(
        summary.get("given_up"),
        Some(&given_up),
        "in the replay summary"
    );
}
