//! Shared by the broker integration tests: broker URLs with unique names,
//! return events in the bus's format, `saltpipe work` child processes, a
//! TCP proxy that simulates a broker outage for saltpipe only, and cleanup
//! of what a test created on the shared servers.
#![cfg_attr(
    not(all(feature = "redis", feature = "amqp", feature = "nats")),
    allow(unused)
)]
#![allow(dead_code)]

use bytes::Bytes;
use saltpipe::queue::{Message, QueueConfig, QueueUrl};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Broker {
    Redis,
    Amqp,
    Nats,
}

impl Broker {
    pub fn url(self) -> String {
        let var = |v: &str, d: &str| std::env::var(v).unwrap_or_else(|_| d.to_owned());
        match self {
            Broker::Redis => var("SALTPIPE_TEST_REDIS", "redis://127.0.0.1:6379"),
            Broker::Amqp => var(
                "SALTPIPE_TEST_AMQP",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            Broker::Nats => var("SALTPIPE_TEST_NATS", "nats://127.0.0.1:4222"),
        }
    }

    /// `host:port` of the broker, for the proxy.
    pub fn addr(self) -> String {
        let u = url::Url::parse(&self.url()).expect("url");
        format!(
            "{}:{}",
            u.host_str().expect("host"),
            u.port_or_known_default().unwrap_or(match self {
                Broker::Redis => 6379,
                Broker::Amqp => 5672,
                Broker::Nats => 4222,
            })
        )
    }

    /// The broker URL pointed at `addr` instead.
    pub fn url_via(self, addr: &str) -> String {
        let mut u = url::Url::parse(&self.url()).expect("url");
        let (h, p) = addr.rsplit_once(':').expect("host:port");
        u.set_host(Some(h)).expect("host");
        u.set_port(Some(p.parse().expect("port"))).expect("port");
        u.to_string()
    }
}

pub fn unique_prefix() -> String {
    format!("sptest-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

pub fn queue_config(url: &str, prefix: &str, spool: &Path) -> QueueConfig {
    QueueConfig {
        url: QueueUrl::parse(url).expect("url"),
        prefix: prefix.to_owned(),
        redeliver_after: Duration::from_secs(2),
        spool: spool.to_path_buf(),
        ..QueueConfig::default()
    }
}

/// A `salt/job/<jid>/ret/<minion>` event body as the bus carries it.
pub fn return_body(jid: &str, minion: &str) -> Bytes {
    return_body_sized(jid, minion, None)
}

/// [`return_body`] whose `return` is a string of `return_bytes` bytes
/// (`true` with None): a large state run's size.
pub fn return_body_sized(jid: &str, minion: &str, return_bytes: Option<usize>) -> Bytes {
    let mut d = Vec::new();
    let w = &mut d;
    let s = |w: &mut Vec<u8>, x: &str| rmp::encode::write_str(w, x).expect("write");
    rmp::encode::write_map_len(w, 9).expect("map");
    s(w, "cmd");
    s(w, "_return");
    s(w, "id");
    s(w, minion);
    s(w, "jid");
    s(w, jid);
    s(w, "fun");
    s(w, "test.ping");
    s(w, "fun_args");
    rmp::encode::write_array_len(w, 0).expect("arr");
    s(w, "return");
    match return_bytes {
        None => rmp::encode::write_bool(w, true).expect("bool"),
        Some(n) => s(w, &"x".repeat(n)),
    }
    s(w, "retcode");
    rmp::encode::write_uint(w, 0).expect("int");
    s(w, "success");
    rmp::encode::write_bool(w, true).expect("bool");
    s(w, "_stamp");
    s(w, "2026-11-25T12:00:00.000000+00:00");
    let mut body = format!("salt/job/{jid}/ret/{minion}\n\n").into_bytes();
    body.extend_from_slice(&d);
    Bytes::from(body)
}

/// Return number `i`: a distinct (jid, minion) pair, 4 minions.
pub fn return_message(i: usize) -> Message {
    let jid = format!("2026112512{:010}", i / 4);
    let minion = format!("minion-{}", i % 4);
    Message {
        queue: Arc::from("default"),
        body: return_body(&jid, &minion),
        key: minion,
        received_ms: i as i64,
    }
}

/// Writes a config for `saltpipe work` / `listen` and returns its path.
pub fn write_config(
    dir: &Path,
    name: &str,
    queue: &QueueConfig,
    sink_db: &Path,
    extra: &str,
) -> PathBuf {
    let sink = format!("sqlite://{}", sink_db.display());
    write_config_sink(dir, name, queue, &sink, extra)
}

/// [`write_config`] with any sink URL (MariaDB, PostgreSQL).
pub fn write_config_sink(
    dir: &Path,
    name: &str,
    queue: &QueueConfig,
    sink_url: &str,
    extra: &str,
) -> PathBuf {
    let url = match &queue.url {
        QueueUrl::Embedded { dir } => format!("embedded://{}", dir.display()),
        #[allow(unreachable_patterns)]
        _ => raw_url(queue),
    };
    let text = format!(
        "[queue]\nurl = \"{url}\"\nprefix = \"{}\"\nredeliver_after = \"{}s\"\nspool = \"{}\"\n\
         [worker]\nbatch_max_events = 200\nbatch_timeout = \"50ms\"\ndrain_timeout = \"5s\"\n\
         [sink]\nurl = \"{sink_url}\"\n[log]\nlevel = \"info\"\n{extra}",
        queue.prefix,
        queue.redeliver_after.as_secs(),
        queue.spool.display(),
    );
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// The URL with its password, which Display hides.
fn raw_url(q: &QueueConfig) -> String {
    match &q.url {
        #[cfg(feature = "redis")]
        QueueUrl::Redis { url } => url.expose().to_owned(),
        #[cfg(feature = "amqp")]
        QueueUrl::Amqp { url } => url.expose().to_owned(),
        #[cfg(feature = "nats")]
        QueueUrl::Nats { url } => url.expose().to_owned(),
        other => other.to_string(),
    }
}

/// Starts `saltpipe <cmd> --config <config>`, logs to `<log>`.
pub fn spawn_saltpipe(cmd: &str, config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .arg(cmd)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn saltpipe")
}

/// Stops a child with SIGTERM and waits for it (SIGKILL after 20 s).
pub fn stop(child: &mut Child) {
    let pid = child.id() as i32;
    stop_via(child, pid);
}

/// SIGTERM to `pid` (the child itself, or a process it runs, as strace's
/// traced program), then waits up to 20 s for `child` to end; SIGKILL to
/// both after that.
pub fn stop_via(child: &mut Child, pid: i32) {
    // SAFETY: plain kill(2) on our own child's pid, or its own child's.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Returns stored in the SQLite sink: (rows, distinct (jid, id) pairs).
pub fn stored_returns(db: &Path) -> (u64, u64) {
    let Ok(c) = rusqlite::Connection::open(db) else {
        return (0, 0);
    };
    let _ = c.busy_timeout(Duration::from_secs(5));
    c.query_row(
        "SELECT count(*), count(DISTINCT jid || '/' || id) FROM salt_returns",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap_or((0, 0))
}

/// Waits until `db` holds `n` returns or `within` passed; returns the last count.
pub async fn wait_for_returns(db: &Path, n: u64, within: Duration) -> (u64, u64) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = stored_returns(db);
        if got.0 >= n || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy in front of a broker: `cut` drops every connection and
/// refuses new ones until `restore`, which is a broker outage as saltpipe
/// sees it, without disturbing anyone else using the broker.
pub struct Proxy {
    pub addr: String,
    down: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let down = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (d, c, s) = (down.clone(), conns.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = c.lock().expect("lock").clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            down,
            conns,
            stop,
        }
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        let mut t = self.conns.lock().expect("lock");
        t.cancel();
        *t = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.lock().expect("lock").cancel();
    }
}

/// Removes the streams / queues a test created under `prefix`.
pub async fn cleanup(broker: Broker, prefix: &str, queues: &[&str]) {
    match broker {
        #[cfg(feature = "redis")]
        Broker::Redis => {
            let Ok(client) = redis::Client::open(broker.url()) else {
                return;
            };
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                for q in queues {
                    let _: Result<(), _> = redis::cmd("DEL")
                        .arg(saltpipe::queue::redis::stream_key(prefix, q))
                        .query_async(&mut c)
                        .await;
                }
            }
        }
        #[cfg(feature = "amqp")]
        Broker::Amqp => {
            if let Ok(conn) =
                lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default())
                    .await
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
                let _ = conn.close(200, "done".into()).await;
            }
        }
        #[cfg(feature = "nats")]
        Broker::Nats => {
            if let Ok(client) = async_nats::connect(broker.url()).await {
                let js = async_nats::jetstream::new(client);
                for q in queues {
                    let _ = js
                        .delete_stream(saltpipe::queue::nats::stream_name(prefix, q))
                        .await;
                }
            }
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
}
