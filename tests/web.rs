//! `saltpipe web` over a database filled by saltpipe (real-master bus
//! captures plus crafted jobs with XSS probes): every page fetched over
//! HTTP on SQLite, MariaDB and PostgreSQL, the figures checked against SQL,
//! the probes shown as text, the security headers present; the CLI with
//! basic auth; a returner-only database; then a real browser
//! (chromium + chromedriver) clicking through the pages.

mod common;

use common::webdb::{self, BACKENDS, Backend, PROBE_IMG, PROBE_MINION, PROBE_SCRIPT, WebDb};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn web_config(text: &str) -> saltpipe::config::Config {
    let c: saltpipe::config::Config = toml::from_str(text).expect("config");
    c.validate().expect("valid");
    c
}

/// Serves `db` in this process on a free port.
async fn serve(db: &WebDb, web: &str) -> (SocketAddr, CancellationToken) {
    serve_with(db, web, None).await
}

/// The same, with a Live feed (as `saltpipe run` has).
async fn serve_with(
    db: &WebDb,
    web: &str,
    live: Option<saltpipe::web::live::LiveFeed>,
) -> (SocketAddr, CancellationToken) {
    let mut cfg = web_config(&webdb::config_text(
        db.dir.path(),
        &db.url,
        &format!("listen = \"127.0.0.1:0\"\n{web}"),
    ));
    cfg.web.enabled = true;
    let stop = CancellationToken::new();
    let (addr, _task) = saltpipe::web::serve(&cfg.web, &cfg.sink, live, stop.clone())
        .await
        .expect("serve");
    (addr, stop)
}

/// A kept return as the listener would offer it to the Live feed.
fn live_event(jid: &str, minion: &str) -> saltpipe::event::Event {
    let frame = common::return_frame(jid, minion, "x");
    saltpipe::event::Event::from_frame(&frame.into()).expect("an event")
}

struct Page {
    status: u16,
    csp: String,
    body: String,
}

async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Page {
    let r = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    let csp = r
        .headers()
        .get("content-security-policy")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let body = r.text().await.expect("body");
    Page { status, csp, body }
}

/// Every DB-sourced probe must be escaped: no raw tag survives, and the
/// escaped text is there when the page shows the value.
fn assert_escaped(path: &str, body: &str) {
    for raw in [
        "<script>alert",
        "<img src=x",
        "onerror=alert(1)>\"",
        "\"><img",
    ] {
        assert!(!body.contains(raw), "{path}: raw {raw:?} in the page");
    }
    assert!(!body.contains("<script"), "{path}: a script element");
}

/// How askama escapes text in HTML.
fn escaped(s: &str) -> String {
    s.replace('&', "&#38;")
        .replace('<', "&#60;")
        .replace('>', "&#62;")
        .replace('"', "&#34;")
        .replace('\'', "&#39;")
}

/// The number after `class="num c-{what}">` in the row of `jid`.
fn job_count(body: &str, jid: &str, what: &str) -> i64 {
    let row_start = body
        .find(&format!("data-jid=\"{jid}\""))
        .unwrap_or_else(|| panic!("job {jid} not listed"));
    let row = &body[row_start..];
    let row = &row[..row.find("</tr>").expect("row end")];
    let key = format!("c-{what}\">");
    let at = row.find(&key).expect("count cell") + key.len();
    row[at..]
        .split('<')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("a number")
}

fn listed_jids(body: &str) -> Vec<String> {
    body.split("data-jid=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap_or_default().to_owned())
        .collect()
}

fn next_link(body: &str) -> Option<String> {
    let at = body.find("id=\"next\" rel=\"next\" href=\"")?;
    let rest = &body[at + "id=\"next\" rel=\"next\" href=\"".len()..];
    Some(
        rest.split('"')
            .next()?
            .replace("&#38;", "&")
            .replace("&amp;", "&"),
    )
}

fn shown_count(body: &str, outcome: &str) -> i64 {
    let key = format!("id=\"count-{outcome}\">");
    let at = body.find(&key).expect("count") + key.len();
    body[at..]
        .split('<')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("number")
}

const LATEST: &str = "FROM saltpipe_outcomes o JOIN (SELECT minion, MAX(jid) AS jid FROM saltpipe_outcomes GROUP BY minion) l ON o.minion = l.minion AND o.jid = l.jid";

async fn pages_on(backend: Backend) {
    let db = WebDb::fill(backend);
    let (addr, stop) = serve(&db, "").await;
    let client = reqwest::Client::new();
    let failing = db.failing_jid.clone();

    // Overview: minions by latest outcome, as SQL counts them.
    let p = get(&client, addr, "/").await;
    assert_eq!(p.status, 200);
    assert_eq!(p.csp, saltpipe::web::CSP, "{backend:?}: CSP on /");
    assert_escaped("/", &p.body);
    for o in ["ok", "changed", "failed", "no_return"] {
        let want = db.count(&format!("SELECT COUNT(*) {LATEST} WHERE o.outcome = '{o}'"));
        assert_eq!(shown_count(&p.body, o), want, "{backend:?}: {o} minions");
    }
    assert!(
        shown_count(&p.body, "failed") >= 2,
        "db-1 and the probe minion at least"
    );
    assert!(
        p.body.contains("cmd.run") && p.body.contains("probe_state"),
        "failures by state"
    );
    assert!(p.body.contains("<svg"), "the hourly chart");
    let csv = get(&client, addr, "/data/hourly.csv").await;
    assert!(csv.body.starts_with("hour,jobs,returns\n"));
    let jobs_in_csv: i64 = csv
        .body
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.parse::<i64>().ok())
        .sum();
    assert_eq!(
        jobs_in_csv,
        1 + webdb::PING_JOBS as i64,
        "{backend:?}: crafted jobs of the last 48 h"
    );

    // Jobs: keyset pages cover every job once, newest first, counts as SQL.
    let mut seen = Vec::new();
    let mut path = "/jobs".to_owned();
    let mut pages = 0;
    loop {
        let p = get(&client, addr, &path).await;
        assert_eq!(p.status, 200, "{path}");
        assert_eq!(p.csp, saltpipe::web::CSP);
        assert_escaped(&path, &p.body);
        seen.extend(listed_jids(&p.body));
        pages += 1;
        match next_link(&p.body) {
            Some(n) => path = n,
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert!(pages >= 2, "{backend:?}: more than one page");
    assert_eq!(seen.len() as i64, db.count("SELECT COUNT(*) FROM jids"));
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        seen.len(),
        "no job twice"
    );
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first");
    let p = get(&client, addr, "/jobs?outcome=failed").await;
    let failed_jobs = listed_jids(&p.body);
    assert_eq!(
        failed_jobs.len() as i64,
        db.count("SELECT COUNT(DISTINCT jid) FROM saltpipe_outcomes WHERE outcome = 'failed'")
    );
    for jid in &failed_jobs {
        for o in ["ok", "changed", "failed", "no_return"] {
            let want = db.count(&format!(
                "SELECT COUNT(*) FROM saltpipe_outcomes WHERE jid = '{jid}' AND outcome = '{o}'"
            ));
            assert_eq!(
                job_count(&p.body, jid, o),
                want,
                "{backend:?}: job {jid} {o}"
            );
        }
    }
    assert_eq!(job_count(&p.body, &failing, "failed"), 2);
    assert_eq!(job_count(&p.body, &failing, "changed"), 1);
    let p = get(&client, addr, "/jobs?fun=state.*&user=alice&minion=db-*").await;
    assert_eq!(
        listed_jids(&p.body),
        vec![failing.clone()],
        "{backend:?}: filters"
    );
    let p = get(&client, addr, "/jobs?fun=test.ping&target=web-1").await;
    assert_eq!(listed_jids(&p.body).len(), 50, "a full first page of pings");

    // Job: failures first, the state table, probes as text.
    let p = get(&client, addr, &format!("/job/{failing}")).await;
    assert_eq!(p.status, 200);
    assert_eq!(p.csp, saltpipe::web::CSP);
    assert_escaped("/job", &p.body);
    assert!(
        p.body.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
            || p.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{backend:?}: the probe as text"
    );
    let first_state = p.body.find("id=\"state-1\"").expect("a state table");
    let row1 = &p.body[first_state..first_state + 400];
    assert!(row1.contains("st-failed"), "a failure first: {row1}");
    assert!(p.body.contains("Raw return"));
    let shown = p.body.matches("class=\"result-link\"").count() as i64;
    assert_eq!(
        shown,
        db.count(&format!(
            "SELECT COUNT(*) FROM salt_returns WHERE jid = '{failing}'"
        ))
    );

    // Minion (the probe id too), search, unknown pages.
    let enc = saltpipe::web::enc(PROBE_MINION);
    for path in [
        "/minion/db-1".to_owned(),
        format!("/minion/{enc}"),
        format!("/job/{failing}?minion={enc}"),
        "/search?q=probe_state".to_owned(),
        format!("/search?q={}", saltpipe::web::enc(PROBE_SCRIPT)),
        format!("/search?q={failing}"),
        "/data/minion/db-1/timeline.csv".to_owned(),
    ] {
        let p = get(&client, addr, &path).await;
        assert_eq!(p.status, 200, "{backend:?}: {path}");
        assert_eq!(p.csp, saltpipe::web::CSP, "{path}");
        if !path.contains(".csv") {
            assert_escaped(&path, &p.body);
        }
    }
    let p = get(&client, addr, "/minion/db-1").await;
    assert_eq!(
        p.body.matches("class=\"job-link").count() as i64,
        db.count("SELECT COUNT(*) FROM saltpipe_outcomes WHERE minion = 'db-1'")
    );
    assert!(p.body.contains("Last highstate"));
    let p = get(&client, addr, "/search?q=probe_state").await;
    assert!(p.body.contains(&failing), "{backend:?}: search by state id");
    let p = get(&client, addr, "/search?q=db-").await;
    assert!(p.body.contains("/minion/db-1"), "search by minion");
    let p = get(&client, addr, "/nope").await;
    assert_eq!(p.status, 404);
    assert_eq!(p.csp, saltpipe::web::CSP);

    // Nothing changes state: only GET/HEAD.
    let r = client
        .post(format!("http://{addr}/jobs"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 405);
    let p = get(&client, addr, &format!("/job/{failing}?minion=db-1")).await;
    assert!(
        p.body.contains(&escaped(PROBE_IMG)),
        "{backend:?}: the img probe as text"
    );
    let p = get(&client, addr, &format!("/minion/{enc}")).await;
    assert!(
        p.body.contains(&escaped(PROBE_MINION)),
        "{backend:?}: the minion id as text"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_on_every_backend() {
    saltpipe::tls::install_ring();
    for b in BACKENDS {
        eprintln!("--- {b:?}");
        pages_on(b).await;
    }
}

/// A database with only Salt's returner tables: outcome from `success`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returner_only_database() {
    saltpipe::tls::install_ring();
    let db = WebDb::fill(Backend::Sqlite);
    db.exec("DROP TABLE saltpipe_outcomes; DROP TABLE saltpipe_targets;");
    let (addr, stop) = serve(&db, "").await;
    let client = reqwest::Client::new();
    let p = get(&client, addr, "/").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("derived from <code>success</code>"));
    let latest_failed = db.count(
        "SELECT COUNT(*) FROM salt_returns r JOIN (SELECT id, MAX(jid) AS jid FROM salt_returns GROUP BY id) l \
         ON r.id = l.id AND r.jid = l.jid WHERE r.success NOT IN ('1','true','True')",
    );
    assert_eq!(shown_count(&p.body, "failed"), latest_failed);
    assert_eq!(shown_count(&p.body, "changed"), 0);
    let p = get(&client, addr, "/jobs?outcome=failed").await;
    assert!(listed_jids(&p.body).contains(&db.failing_jid));
    assert_eq!(job_count(&p.body, &db.failing_jid, "failed"), 2);
    for path in [
        format!("/job/{}", db.failing_jid),
        "/minion/db-1".into(),
        "/search?q=probe".into(),
    ] {
        let p = get(&client, addr, &path).await;
        assert_eq!(p.status, 200, "{path}");
        assert_escaped(&path, &p.body);
    }
    stop.cancel();
}

/// The Live page's events, read from an open server-sent-events response
/// until `want` is in them (or the test's timeout).
async fn sse_until(resp: &mut reqwest::Response, seen: &mut String, want: &str) {
    let read = async {
        while !seen.contains(want) {
            match resp.chunk().await.expect("an SSE chunk") {
                Some(c) => seen.push_str(&String::from_utf8_lossy(&c)),
                None => panic!("the SSE stream ended; got {seen:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("{want:?} not in the Live feed: {seen:?}"));
}

/// The pages served by `saltpipe run` (`[web] enabled = true`): a return
/// written to the bus socket reaches an open Live stream as it is kept,
/// then the job pages and the overview's ingest figures; SIGTERM ends the
/// open stream and the process cleanly. `saltpipe web` says Live is
/// unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_pages_and_live() {
    use std::io::Write as _;
    saltpipe::tls::install_ring();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus_path = dir.path().join("master_event_pub.ipc");
    let bus = std::os::unix::net::UnixListener::bind(&bus_path).expect("bus socket");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let cfg = common::write_config(
        dir.path(),
        &bus_path,
        &format!("[web]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nstale_after = \"3650d\"\n"),
    );
    let sp = common::Saltpipe::start(&["run"], &cfg);
    let (mut publisher, _) = bus.accept().expect("saltpipe connects to the bus");
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    // The pages start once the sink's tables exist.
    sp.wait_log("serving the web pages", 1, Duration::from_secs(30));

    let p = client
        .get(format!("{base}/live"))
        .send()
        .await
        .expect("live");
    assert_eq!(p.status().as_u16(), 200);
    let body = p.text().await.expect("body");
    assert!(body.contains("id=\"live-rows\""), "{body}");
    assert!(body.contains("<script src=\"/assets/live.js\"></script>"));
    let js = client
        .get(format!("{base}/assets/live.js"))
        .send()
        .await
        .expect("js");
    assert_eq!(js.status().as_u16(), 200);
    assert!(js.text().await.expect("js").contains("EventSource"));

    // Subscribed once the response has started; then a return on the bus.
    let mut live = client
        .get(format!("{base}/live/events"))
        .send()
        .await
        .expect("events");
    assert_eq!(live.status().as_u16(), 200);
    assert_eq!(
        live.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let jid = "20261202120000123456";
    publisher
        .write_all(&common::return_frame(jid, "live-m1", "hello"))
        .expect("publish");
    let mut seen = String::new();
    sse_until(&mut live, &mut seen, "live-m1").await;
    let line = seen
        .lines()
        .find(|l| l.contains("live-m1"))
        .and_then(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let e: serde_json::Value = serde_json::from_str(line).expect("a JSON summary");
    assert_eq!(e["tag"], format!("salt/job/{jid}/ret/live-m1"));
    assert_eq!(e["jid"], jid);
    assert_eq!(e["minion"], "live-m1");
    assert_eq!(e["fun"], "test.echo");
    assert_eq!(e["outcome"], "ok");

    // The same return through the queue into the sink, on the pages.
    let db = common::open_db(dir.path());
    common::wait_for("the return in the sink", Duration::from_secs(20), || {
        (common::count(
            &db,
            "SELECT COUNT(*) FROM salt_returns WHERE id = 'live-m1'",
        ) == 1)
            .then_some(())
    });
    let minion = client
        .get(format!("{base}/minion/live-m1"))
        .send()
        .await
        .expect("minion")
        .text()
        .await
        .expect("body");
    assert!(
        minion.contains(&format!("/job/{jid}?minion=live-m1")),
        "{minion}"
    );
    let overview = client
        .get(format!("{base}/"))
        .send()
        .await
        .expect("overview")
        .text()
        .await
        .expect("body");
    assert_eq!(shown_count(&overview, "ok"), 1, "{overview}");
    let figure = |id: &str| -> u64 {
        let at = overview
            .find(&format!("id=\"ingest-{id}\">"))
            .unwrap_or_else(|| panic!("no ingest figure {id}: {overview}"));
        overview[at..]
            .split(['>', '<'])
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("a number")
    };
    assert_eq!(figure("kept"), 1);
    assert_eq!(figure("frames"), 1);
    assert_eq!(figure("returns"), 1);
    assert_eq!(figure("overflow-spilled"), 0, "nothing waited on disk");

    // A second event while the stream is open, then SIGTERM with it open.
    publisher
        .write_all(&common::return_frame(
            "20261202120000123457",
            "live-m2",
            "x",
        ))
        .expect("publish");
    sse_until(&mut live, &mut seen, "live-m2").await;
    assert!(
        sp.terminate().success(),
        "saltpipe run exits 0 with a Live page open"
    );
    drop(live);

    // `saltpipe web` alone (no ingest): Live says it is unavailable.
    let mut wcfg = web_config(&webdb::config_text(
        dir.path(),
        &format!("sqlite://{}", dir.path().join("salt.db").display()),
        "listen = \"127.0.0.1:0\"",
    ));
    wcfg.web.enabled = true;
    let stop = CancellationToken::new();
    let (addr, _task) = saltpipe::web::serve(&wcfg.web, &wcfg.sink, None, stop.clone())
        .await
        .expect("serve");
    let p = get(&client, addr, "/live").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("id=\"live-unavailable\""), "{}", p.body);
    assert!(
        !p.body.contains("<script"),
        "no script where there is no feed"
    );
    assert_eq!(get(&client, addr, "/live/events").await.status, 404);
    let p = get(&client, addr, "/").await;
    assert!(!p.body.contains("ingest-kept"), "no ingest figures");
    assert_eq!(shown_count(&p.body, "ok"), 2);
    stop.cancel();
}

/// `saltpipe web` from the command line, behind basic auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_with_basic_auth() {
    saltpipe::tls::install_ring();
    let db = WebDb::fill(Backend::Sqlite);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let secret = db.dir.path().join("web.secret");
    std::fs::write(&secret, "pa55word\n").expect("secret");
    let cfg = db.dir.path().join("cli.toml");
    std::fs::write(
        &cfg,
        webdb::config_text(
            db.dir.path(),
            &db.url,
            &format!("listen = \"127.0.0.1:{port}\"\nauth = \"basic\"\nuser = \"ops\"\nsecret_file = \"{}\"", secret.display()),
        ),
    )
    .expect("config");
    let sp = common::Saltpipe::start(&["web"], &cfg);
    sp.wait_log("serving the web pages", 1, Duration::from_secs(30));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/jobs");
    let r = client.get(&url).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("www-authenticate").is_some());
    assert!(r.headers().get("content-security-policy").is_some());
    let r = client
        .get(&url)
        .basic_auth("ops", Some("wrong"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let r = client
        .get(&url)
        .basic_auth("ops", Some("pa55word"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(sp.log_contains("pa55word"), 0, "the secret is not logged");
    assert!(sp.terminate().success());
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Option<Driver> {
    let bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new(bin)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let d = Driver { child, port };
    common::wait_for("chromedriver", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    Some(d)
}

/// A chromedriver command outside the W3C set (browser log, CDP), by
/// plain HTTP on the session.
async fn driver_cmd(
    port: u16,
    sid: &str,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/session/{sid}/{path}"))
        .json(&body)
        .send()
        .await
        .expect("chromedriver")
        .json()
        .await
        .expect("json")
}

/// The console since the last call: fails on any error (CSP violations,
/// script errors, failed loads show there).
async fn assert_quiet_console(port: u16, sid: &str, page: &str) {
    let log = driver_cmd(port, sid, "se/log", serde_json::json!({"type": "browser"})).await;
    let entries = log["value"].as_array().cloned().unwrap_or_default();
    let bad: Vec<_> = entries
        .iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .collect();
    assert!(bad.is_empty(), "{page}: console: {bad:?}");
}

/// Waits (up to 10 s) until the browser's URL query contains `part`: a
/// click on a link or a submit button returns before its navigation ends.
async fn wait_query(c: &fantoccini::Client, part: &str) {
    for _ in 0..100 {
        let url = c.current_url().await.expect("url");
        if url.query().unwrap_or_default().contains(part) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the page never reached a URL with {part:?}");
}

/// Clicks the element `css` finds (a link or a button).
async fn click(c: &fantoccini::Client, css: &str) {
    c.find(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// The path of the page the browser shows.
async fn path(c: &fantoccini::Client) -> String {
    c.current_url().await.expect("url").path().to_owned()
}

async fn shot(c: &fantoccini::Client, name: &str) {
    let dir = common::repo().join("target/web-screenshots");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write png");
}

/// A real browser: every page, the click path overview -> failed minion ->
/// failed job -> failing state, paging and filtering the job list, no
/// console error, no alert (a probe that ran would open one and fail the
/// next command), screenshots under target/web-screenshots/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_walk() {
    use fantoccini::Locator::Css;
    saltpipe::tls::install_ring();
    let Some(driver) = chromedriver() else {
        eprintln!(
            "SKIPPED browser_walk: chromedriver not found; install Debian's chromium and chromium-driver (scripts/test.sh does)"
        );
        return;
    };
    let db = WebDb::fill(Backend::Sqlite);
    let feed = saltpipe::web::live::LiveFeed::new(std::sync::Arc::default());
    let (addr, stop) = serve_with(&db, "", Some(feed.clone())).await;
    let base = format!("http://{addr}");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]}),
    );
    caps.insert(
        "goog:loggingPrefs".into(),
        serde_json::json!({"browser": "ALL"}),
    );
    let c =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a chromium session");
    let sid = c.session_id().await.expect("session").expect("an id");
    let failing = db.failing_jid.clone();
    let enc = saltpipe::web::enc(PROBE_MINION);

    // Every page, light theme, 1280 px.
    for (name, path) in [
        ("overview", "/".to_owned()),
        ("jobs", "/jobs".to_owned()),
        ("job", format!("/job/{failing}?minion=db-1")),
        ("minion", "/minion/db-1".to_owned()),
        ("minion-probe", format!("/minion/{enc}")),
        ("search", "/search?q=probe_state".to_owned()),
    ] {
        c.goto(&format!("{base}{path}")).await.expect("goto");
        let h1 = c
            .find(Css("h1"))
            .await
            .expect("a heading")
            .text()
            .await
            .expect("text");
        assert!(!h1.is_empty(), "{path}");
        let css_applied = c
            .execute("return getComputedStyle(document.body).marginTop", vec![])
            .await
            .expect("js");
        assert_eq!(css_applied, "0px", "{path}: the stylesheet loaded");
        assert_quiet_console(driver.port, &sid, &path).await;
        shot(&c, name).await;
    }

    // The click path.
    c.goto(&base).await.expect("goto");
    click(&c, "section[aria-labelledby='m-failed'] a.minion-link").await;
    assert!(path(&c).await.starts_with("/minion/"));
    click(&c, "a.o-link-failed").await;
    assert!(path(&c).await.starts_with("/job/"));
    let state = c
        .find(Css("tr.st-failed a.state-link"))
        .await
        .expect("a failing state");
    state.click().await.expect("click");
    let target = c
        .execute("return document.querySelector(':target').className", vec![])
        .await
        .expect("js");
    assert_eq!(target, "st-failed", "the failing state is the target");
    shot(&c, "failing-state").await;
    assert_quiet_console(driver.port, &sid, "click path").await;

    // Page through the jobs and filter them.
    c.goto(&format!("{base}/jobs")).await.expect("goto");
    let first: Vec<_> = c.find_all(Css("tr[data-jid]")).await.expect("rows");
    assert_eq!(first.len(), 50);
    click(&c, "#next").await;
    wait_query(&c, "before=").await;
    let second = c.find_all(Css("tr[data-jid]")).await.expect("rows").len() as i64;
    assert_eq!(second, db.count("SELECT COUNT(*) FROM jids") - 50);
    c.goto(&format!("{base}/jobs")).await.expect("goto");
    c.find(Css("input[name='fun']"))
        .await
        .expect("fun")
        .send_keys("state.*")
        .await
        .expect("type");
    c.find(Css("select[name='outcome']"))
        .await
        .expect("select")
        .select_by_value("failed")
        .await
        .expect("select");
    click(&c, "form.filters button").await;
    // A click does not wait for the navigation it starts: count the rows
    // of the filtered page, not of the one before it.
    wait_query(&c, "outcome=failed").await;
    let rows = c.find_all(Css("tr[data-jid]")).await.expect("rows").len() as i64;
    assert_eq!(
        rows,
        db.count("SELECT COUNT(DISTINCT o.jid) FROM saltpipe_outcomes o WHERE o.outcome = 'failed' AND o.fun LIKE 'state.%'")
    );
    assert!(
        c.current_url()
            .await
            .expect("url")
            .query()
            .unwrap_or_default()
            .contains("outcome=failed"),
        "filters in the URL"
    );
    shot(&c, "jobs-filtered").await;

    // Live: events offered to the feed appear (as text), pause holds them,
    // resume shows them; the script runs under the CSP without a complaint.
    c.goto(&format!("{base}/live")).await.expect("goto");
    let rows = || async { c.find_all(Css("#live-rows tr")).await.expect("rows").len() };
    let mut n = 0;
    for i in 0..200 {
        // Until the page's EventSource has subscribed, offers go nowhere.
        feed.offer(
            &live_event(&format!("2026120212000000{i:04}"), PROBE_MINION),
            saltpipe::source::now_ms(),
        );
        n = rows().await;
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(n > 0, "a live event shown");
    let first = c
        .find(Css("#live-rows tr td:nth-child(3)"))
        .await
        .expect("minion cell")
        .text()
        .await
        .expect("text");
    assert_eq!(first, PROBE_MINION, "shown as text");
    click(&c, "#live-pause").await;
    feed.offer(
        &live_event("20261202120000009999", "held-m"),
        saltpipe::source::now_ms(),
    );
    let status = c.find(Css("#live-status")).await.expect("status");
    let mut said = String::new();
    for _ in 0..100 {
        said = status.text().await.expect("text");
        if said.contains("1 new held") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(said.contains("Paused, 1 new held"), "{said}");
    assert_eq!(rows().await, n, "nothing added while paused");
    shot(&c, "live").await;
    click(&c, "#live-pause").await;
    assert_eq!(rows().await, n + 1, "the held event shown on resume");
    assert_quiet_console(driver.port, &sid, "/live").await;

    // Dark theme and a phone.
    driver_cmd(
        driver.port,
        &sid,
        "goog/cdp/execute",
        serde_json::json!({"cmd": "Emulation.setEmulatedMedia", "params": {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}}),
    )
    .await;
    c.goto(&format!("{base}/job/{failing}?minion=db-1"))
        .await
        .expect("goto");
    let bg = c
        .execute(
            "return getComputedStyle(document.body).backgroundColor",
            vec![],
        )
        .await
        .expect("js");
    assert_eq!(bg, "rgb(13, 17, 23)", "the dark theme follows the system");
    shot(&c, "job-dark").await;
    c.goto(&base).await.expect("goto");
    shot(&c, "overview-dark").await;
    c.set_window_size(390, 844).await.expect("resize");
    c.goto(&base).await.expect("goto");
    let overflow = c
        .execute(
            "const w = window.innerWidth; const wide = [...document.querySelectorAll('body *')].filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > w + 1).map(e => e.tagName + '.' + e.className); return wide;",
            vec![],
        )
        .await
        .expect("js");
    assert_eq!(
        overflow,
        serde_json::json!([]),
        "no horizontal scrolling on a phone (outside tables)"
    );
    shot(&c, "overview-phone").await;
    assert_quiet_console(driver.port, &sid, "dark/phone").await;
    c.close().await.expect("close");
    stop.cancel();
}
