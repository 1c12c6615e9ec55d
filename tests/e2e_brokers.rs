//! End to end with a real Salt master (scripts/salt-sandbox.py, two
//! minions): `saltpipe listen` on the master's bus, a broker in between, two
//! `saltpipe work` processes, routing by named queue, into MariaDB (the
//! loopback server; a database of its own per broker, dropped afterwards).
//! Run once per broker (Redis, RabbitMQ, NATS) against one master.
#![cfg_attr(
    not(all(
        feature = "redis",
        feature = "amqp",
        feature = "nats",
        feature = "mysql"
    )),
    allow(unused)
)]

#[path = "common/brokers.rs"]
mod brokers;
mod common;

use brokers::*;
use common::Dbs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv() -> String {
    let out = Command::new(repo().join("scripts/salt-venv.sh"))
        .output()
        .expect("run salt-venv.sh");
    assert!(
        out.status.success(),
        "salt-venv.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("venv path")
        .trim()
        .to_owned()
}

fn sandbox(dir: &Path, venv: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(repo().join("scripts/salt-sandbox.py"))
        .args(&args[..1])
        .arg("--dir")
        .arg(dir)
        .arg("--venv")
        .arg(venv)
        .args(&args[1..])
        .output()
        .expect("run salt-sandbox.py");
    assert!(
        out.status.success(),
        "salt-sandbox {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Stops the sandbox even if the test fails.
struct Sandbox {
    dir: PathBuf,
    venv: String,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg(repo().join("scripts/salt-sandbox.py"))
            .arg("down")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--venv")
            .arg(&self.venv)
            .output();
    }
}

/// One value from the loopback MariaDB, through the `mysql` client as the
/// other MariaDB tests do.
fn my_count(db: &str, sql: &str) -> u64 {
    // Before the first worker created the tables the query fails: 0.
    Command::new("mysql")
        .args(["-h127.0.0.1", "-uroot", "-N", "-B", db, "-e", sql])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// (rows, distinct (jid, id)) in `salt_returns`, once there are `n` or
/// `within` passed.
async fn wait_for_rows(db: &str, n: u64, within: Duration) -> (u64, u64) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let rows = my_count(db, "SELECT count(*) FROM salt_returns");
        if rows >= n || tokio::time::Instant::now() >= deadline {
            let distinct = my_count(db, "SELECT count(DISTINCT jid, id) FROM salt_returns");
            return (rows, distinct);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn one_broker(broker: Broker, sb: &Sandbox, event_pub: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique_prefix();
    let db = Dbs::mysql("e2e");
    let sink = db.mysql_url(3306);
    let q = queue_config(&broker.url(), &prefix, &dir.path().join("spool"));
    let routing = format!(
        "[source]\nsocket = \"{event_pub}\"\n[[rules.rule]]\nname = \"states\"\nfun = [\"state.*\"]\nqueue = \"state\"\n"
    );
    let listen_cfg = write_config_sink(dir.path(), "listen.toml", &q, &sink, &routing);
    // Worker 1 takes only `default`; worker 2 takes both queues.
    let w1 = write_worker_config(dir.path(), "w1.toml", &q, &sink, &routing, "[\"default\"]");
    let w2 = write_worker_config(
        dir.path(),
        "w2.toml",
        &q,
        &sink,
        &routing,
        "[\"default\", \"state\"]",
    );
    let mut listen = spawn_saltpipe("listen", &listen_cfg, &dir.path().join("listen.log"));
    let mut work1 = spawn_saltpipe("work", &w1, &dir.path().join("w1.log"));
    let mut work2 = spawn_saltpipe("work", &w2, &dir.path().join("w2.log"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pings = 5;
    for _ in 0..pings {
        sandbox(&sb.dir, &sb.venv, &["salt", "--", "*", "test.ping"]);
    }
    sandbox(
        &sb.dir,
        &sb.venv,
        &["salt", "--", "*", "state.apply", "passing"],
    );
    let jobs = pings + 1;
    let want = 2 * jobs as u64;
    let (rows, distinct) = wait_for_rows(&db.0, want, Duration::from_secs(60)).await;
    let jids = my_count(&db.0, "SELECT count(*) FROM jids");
    let state_rows = my_count(
        &db.0,
        "SELECT count(*) FROM salt_returns WHERE fun = 'state.apply'",
    );
    for c in [&mut listen, &mut work1, &mut work2] {
        stop(c);
    }
    let logs: String = ["listen.log", "w1.log", "w2.log"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n----\n");
    cleanup(broker, &prefix, &["default", "state"]).await;
    assert_eq!(
        (rows, distinct),
        (want, want),
        "{broker:?}: every return once\n{logs}"
    );
    assert_eq!(
        jids, jobs as u64,
        "{broker:?}: one jids row per job\n{logs}"
    );
    assert_eq!(
        state_rows, 2,
        "{broker:?}: the state run went through the `state` queue\n{logs}"
    );
    eprintln!(
        "{broker:?}: {rows} returns from {jids} jobs stored in MariaDB through listen + 2 workers"
    );
}

fn write_worker_config(
    dir: &Path,
    name: &str,
    q: &saltpipe::queue::QueueConfig,
    sink: &str,
    routing: &str,
    queues: &str,
) -> PathBuf {
    // write_config already writes a [worker] table: put `queues` into it.
    let p = write_config_sink(dir, name, q, sink, routing);
    let text = std::fs::read_to_string(&p).expect("read");
    let text = text.replacen("[worker]\n", &format!("[worker]\nqueues = {queues}\n"), 1);
    std::fs::write(&p, text).expect("write");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_two_workers_through_each_broker() {
    let venv = venv();
    let dir = tempfile::tempdir().expect("tempdir");
    let sb = Sandbox {
        dir: dir.path().join("sandbox"),
        venv,
    };
    let st = sandbox(&sb.dir, &sb.venv, &["up", "--minions", "2"]);
    let event_pub = st["event_pub"]
        .as_str()
        .expect("event_pub in sandbox.json")
        .to_owned();
    #[cfg(feature = "redis")]
    one_broker(Broker::Redis, &sb, &event_pub).await;
    #[cfg(feature = "amqp")]
    one_broker(Broker::Amqp, &sb, &event_pub).await;
    #[cfg(feature = "nats")]
    one_broker(Broker::Nats, &sb, &event_pub).await;
    let _ = &event_pub;
}
