//! The database away for 30 s while a real master's bus carries a steady
//! load: saltpipe keeps reading (never cut off by the master), holds and
//! retries, and afterwards every event is stored exactly once.
//!
//! The outage is made by a TCP proxy this test runs between saltpipe and the
//! shared server: cutting it drops saltpipe's connections and refuses new
//! ones, so only saltpipe sees the database go (the server itself, used by
//! others, is never stopped). MariaDB, then PostgreSQL, each in a fresh
//! database with a random name.

#![cfg(any(feature = "mysql", feature = "postgres"))]

mod common;

use common::{Dbs, Saltpipe, Sandbox, my, pg, wait_for};
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TCP proxy that can be cut (all connections dropped, new ones refused)
/// and restored.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, cs) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                };
                let mut held = cs.lock().expect("conns");
                for s in [&client, &server] {
                    if let Ok(s) = s.try_clone() {
                        held.push(s);
                    }
                }
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pipe(c2, s2);
                pipe(server, client);
            }
        });
        Proxy { port, cut, conns }
    }

    /// The database "goes away" for saltpipe: open connections die, new ones fail.
    fn cut(&self) {
        self.cut.store(true, SeqCst);
        for s in self.conns.lock().expect("conns").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, SeqCst);
    }
}

/// A numbered return frame (see `common::return_frame`).
fn return_frame(jid: &str, minion: &str, i: usize) -> Vec<u8> {
    common::return_frame(jid, minion, &format!("payload {i} 🧂"))
}

/// Returns per second pushed into the master for the whole run.
const RATE: usize = 100;
/// Seconds of load; the database is away from second 5 to second 35.
const SECONDS: usize = 45;
const OUTAGE_FROM: Duration = Duration::from_secs(5);
const OUTAGE: Duration = Duration::from_secs(30);

/// Runs the scenario against a database reached at `upstream`; `sink_url`
/// turns the proxy port into the sink URL; `count` runs a SQL count there.
fn outage(upstream: u16, sink_url: impl Fn(u16) -> String, count: impl Fn(&str) -> i64) {
    let proxy = Proxy::start(upstream);
    let sb = Sandbox::up(1);
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = work.path().join("saltpipe.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nsocket = \"{}\"\n\n[queue]\nurl = \"embedded://{}\"\n\n\
             [worker]\nbatch_timeout = \"100ms\"\nretry_max = \"2s\"\n\n[sink]\nurl = \"{}\"\n",
            sb.event_pub().display(),
            work.path().join("queue").display(),
            sink_url(proxy.port),
        ),
    )
    .expect("config");
    let sp = Saltpipe::start(&["run"], &cfg);
    sp.wait_log("connected to the event bus", 1, Duration::from_secs(60));

    // Steady load: RATE returns a second, pushed through the master's pull
    // socket so the master publishes them on its bus like any other event.
    let mut pull =
        std::os::unix::net::UnixStream::connect(sb.event_pull()).expect("connect pull socket");
    let start = Instant::now();
    let mut cut_done = false;
    let mut restored = false;
    let total = RATE * SECONDS;
    for i in 0..total {
        let due = start + Duration::from_millis((i * 1000 / RATE) as u64);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        if !cut_done && start.elapsed() >= OUTAGE_FROM {
            eprintln!("cutting the database off at {:?}", start.elapsed());
            proxy.cut();
            cut_done = true;
        }
        if cut_done && !restored && start.elapsed() >= OUTAGE_FROM + OUTAGE {
            eprintln!("restoring the database at {:?}", start.elapsed());
            proxy.restore();
            restored = true;
        }
        let f = return_frame(
            &format!("2026112512{:010}", i / 10),
            &format!("m{}", i % 10),
            i,
        );
        pull.write_all(&saltpipe::bus::encode::length_prefixed(&f))
            .expect("push");
    }
    pull.flush().expect("flush");
    assert!(cut_done && restored);

    wait_for("every return stored", Duration::from_secs(120), || {
        (count("SELECT count(*) FROM salt_returns") >= total as i64).then_some(())
    });
    assert!(
        sp.log_contains("holding the batch") > 0,
        "the outage was seen and retried: {:?}",
        sp.log
            .lock()
            .expect("log")
            .iter()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
    );
    // Never cut off: one connection to the bus for the whole run, no gap.
    assert_eq!(sp.log_contains("lost the event bus"), 0);
    assert_eq!(sp.log_contains("connected to the event bus"), 1);
    assert!(sp.terminate().success(), "clean exit");
    assert_eq!(count("SELECT count(*) FROM salt_returns"), total as i64);
    assert_eq!(
        count("SELECT count(*) FROM (SELECT DISTINCT jid, id FROM salt_returns) t"),
        total as i64,
        "exactly once"
    );
    assert_eq!(count("SELECT count(*) FROM saltpipe_dead_letters"), 0);
}

#[cfg(feature = "mysql")]
#[test]
fn mariadb_away_for_30s_under_load_loses_and_doubles_nothing() {
    let db = Dbs::mysql("f");
    outage(
        3306,
        |port| db.mysql_url(port),
        |sql| my(&db.0, sql).parse().unwrap_or(-1),
    );
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_away_for_30s_under_load_loses_and_doubles_nothing() {
    let db = Dbs::postgres("f");
    outage(
        5432,
        |port| db.pg_url(port),
        |sql| pg(&db.0, sql).parse().unwrap_or(-1),
    );
}

/// The database unreachable when saltpipe starts: the start goes on (the
/// reader must drain the bus), writes are retriable until the database
/// answers, then the schema is created and the batch lands.
async fn down_at_start(
    upstream: u16,
    sink_url: impl Fn(u16) -> String,
    count: impl Fn(&str) -> i64,
) {
    let proxy = Proxy::start(upstream);
    proxy.cut();
    let cfg = saltpipe::sink::SinkConfig {
        url: saltpipe::sink::SinkUrl::parse(&sink_url(proxy.port)).expect("url"),
        ..saltpipe::sink::SinkConfig::default()
    };
    assert!(
        matches!(
            cfg.build().await,
            Err(saltpipe::sink::SinkError::Retriable(_))
        ),
        "an unreachable database is a retriable condition"
    );
    let sink = cfg.build_or_defer().await.expect("start anyway");
    let rec = saltpipe::sink::Record::new(
        saltpipe::event::Event::from_frame(&bytes::Bytes::from(return_frame(
            "20261125120000000001",
            "m1",
            1,
        )))
        .expect("decode"),
        0,
    );
    let err = sink
        .write(std::slice::from_ref(&rec))
        .await
        .expect_err("still down");
    assert!(err.is_retriable(), "{err}");
    proxy.restore();
    assert_eq!(sink.write(&[rec]).await.expect("write").returns, 1);
    assert_eq!(count("SELECT count(*) FROM salt_returns"), 1);
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_down_at_start_is_waited_for() {
    let db = Dbs::mysql("f");
    down_at_start(
        3306,
        |port| db.mysql_url(port),
        |sql| my(&db.0, sql).parse().unwrap_or(-1),
    )
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_down_at_start_is_waited_for() {
    let db = Dbs::postgres("f");
    down_at_start(
        5432,
        |port| db.pg_url(port),
        |sql| pg(&db.0, sql).parse().unwrap_or(-1),
    )
    .await;
}
