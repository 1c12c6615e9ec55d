//! Shared pieces of the integration tests: a real Salt master with minions
//! (through `scripts/salt-sandbox.py`), a running `saltpipe` process, and
//! polling helpers. Nothing here imitates Salt: the sandbox runs the real
//! salt-master and salt-minion from a virtualenv (`scripts/salt-venv.sh`).
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Salt release the tests run by default (scripts/salt-venv.sh's default).
pub const SALT_DEFAULT: &str = "3008.5";

/// The Salt virtualenv of [`SALT_DEFAULT`], installed on first use (cached
/// under ~/.cache).
pub fn salt_venv() -> PathBuf {
    salt_venv_of(SALT_DEFAULT)
}

/// The virtualenv of one Salt release (`3006.30`), installed on first use
/// by scripts/salt-venv.sh and cached under ~/.cache/saltpipe/salt-VERSION.
pub fn salt_venv_of(version: &str) -> PathBuf {
    static VENVS: OnceLock<Mutex<std::collections::HashMap<String, PathBuf>>> = OnceLock::new();
    let mut venvs = VENVS
        .get_or_init(Default::default)
        .lock()
        .expect("venv lock");
    if let Some(v) = venvs.get(version) {
        return v.clone();
    }
    let out = Command::new("bash")
        .arg(repo().join("scripts/salt-venv.sh"))
        .arg(version)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/salt-venv.sh");
    assert!(out.status.success(), "salt-venv.sh {version} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let venv = PathBuf::from(text.lines().last().expect("venv path").trim());
    venvs.insert(version.to_owned(), venv.clone());
    venv
}

/// A TCP port free on loopback just now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Polls `f` every 100 ms until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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

/// A throwaway master with minions on loopback; torn down on drop.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub info: Value,
}

impl Sandbox {
    pub fn up(minions: u32) -> Sandbox {
        Sandbox::up_with(minions, "ipc")
    }

    /// `ipc_mode` is `ipc` (unix sockets) or `tcp` (the bus on 127.0.0.1).
    pub fn up_with(minions: u32, ipc_mode: &str) -> Sandbox {
        Sandbox::up_line(minions, ipc_mode, SALT_DEFAULT)
    }

    /// A master and minions of the Salt release `version` (its own cached
    /// virtualenv); `ipc_mode` as in [`Sandbox::up_with`].
    pub fn up_line(minions: u32, ipc_mode: &str, version: &str) -> Sandbox {
        Sandbox::up_args(minions, ipc_mode, version, &[])
    }

    /// [`Sandbox::up_line`] with more `salt-sandbox.py up` arguments
    /// (`--master-opt KEY=VALUE`, `--master-d`, ...).
    pub fn up_args(minions: u32, ipc_mode: &str, version: &str, extra: &[&str]) -> Sandbox {
        let venv = salt_venv_of(version);
        let dir = tempfile::Builder::new()
            .prefix("saltpipe-sandbox-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new("python3")
            .arg(repo().join("scripts/salt-sandbox.py"))
            .args(["up", "--dir"])
            .arg(dir.path())
            .args([
                "--minions",
                &minions.to_string(),
                "--ipc-mode",
                ipc_mode,
                "--venv",
            ])
            .arg(&venv)
            .args(extra)
            .stderr(Stdio::inherit())
            .output()
            .expect("run salt-sandbox.py up");
        assert!(out.status.success(), "salt-sandbox up failed");
        let info: Value = serde_json::from_slice(&out.stdout).expect("sandbox json");
        Sandbox { dir, info }
    }

    /// The `[source]` line that reaches this master's bus: its socket, or
    /// with `ipc_mode: tcp` its TCP publisher.
    pub fn source_line(&self) -> String {
        match self.info["tcp_pub"].as_u64() {
            Some(port) => format!("tcp = \"127.0.0.1:{port}\""),
            None => format!("socket = \"{}\"", self.event_pub().display()),
        }
    }

    /// The Salt release this sandbox runs (`salt-master --version`).
    pub fn salt_version(&self) -> &str {
        self.info["salt_version"].as_str().unwrap_or("unknown")
    }

    pub fn event_pub(&self) -> PathBuf {
        PathBuf::from(self.info["event_pub"].as_str().expect("event_pub"))
    }

    pub fn event_pull(&self) -> PathBuf {
        PathBuf::from(self.info["event_pull"].as_str().expect("event_pull"))
    }

    fn run(&self, args: &[&str]) -> (ExitStatus, String) {
        let out = Command::new("python3")
            .arg(repo().join("scripts/salt-sandbox.py"))
            .args(&args[..1])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&args[1..])
            .stderr(Stdio::inherit())
            .output()
            .expect("run salt-sandbox.py");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Runs a `salt` job; returns (jid, the minions' returns). Salt's exit
    /// code is not checked: a failing job is a valid test subject.
    pub fn salt(&self, args: &[&str]) -> (String, Value) {
        let mut a = vec!["salt", "--"];
        a.extend_from_slice(args);
        let (_, out) = self.run(&a);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("salt {args:?}: {e}: {out}"));
        let jid = v["jid"]
            .as_str()
            .unwrap_or_else(|| panic!("no jid from salt {args:?}: {out}"));
        (jid.to_owned(), v["return"].clone())
    }

    /// [`Sandbox::salt`], or None when Salt printed no jid (no minion
    /// matched the target yet).
    pub fn try_salt(&self, args: &[&str]) -> Option<(String, Value)> {
        let mut a = vec!["salt", "--"];
        a.extend_from_slice(args);
        let (_, out) = self.run(&a);
        let v: Value = serde_json::from_str(&out).ok()?;
        Some((v["jid"].as_str()?.to_owned(), v["return"].clone()))
    }

    pub fn salt_async(&self, args: &[&str]) -> String {
        let mut a = vec!["salt", "--async", "--"];
        a.extend_from_slice(args);
        let (status, out) = self.run(&a);
        assert!(status.success(), "salt --async {args:?}: {out}");
        let v: Value = serde_json::from_str(&out).expect("json");
        v["jid"].as_str().expect("jid").to_owned()
    }

    pub fn salt_call(&self, minion: &str, args: &[&str]) -> Value {
        let mut a = vec!["salt-call", "--id", minion, "--"];
        a.extend_from_slice(args);
        let (_, out) = self.run(&a);
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    pub fn salt_run(&self, args: &[&str]) -> Value {
        let mut a = vec!["salt-run", "--"];
        a.extend_from_slice(args);
        let (_, out) = self.run(&a);
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    /// Runs a wheel function through Salt's `WheelClient` on this master's
    /// config; returns the job's full return (jid, fun, user, return,
    /// success).
    pub fn wheel(&self, args: &[&str]) -> Value {
        let mut a = vec!["wheel", "--"];
        a.extend_from_slice(args);
        let (status, out) = self.run(&a);
        assert!(status.success(), "wheel {args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("wheel {args:?}: {e}: {out}"))
    }

    pub fn stop_master(&self) {
        assert!(self.run(&["stop-master"]).0.success(), "stop-master");
    }

    pub fn start_master(&self) {
        assert!(self.run(&["start-master"]).0.success(), "start-master");
    }

    pub fn stop_minion(&self, id: &str) {
        assert!(
            self.run(&["stop-minion", "--id", id]).0.success(),
            "stop-minion"
        );
    }

    pub fn start_minion(&self, id: &str) {
        assert!(
            self.run(&["start-minion", "--id", id]).0.success(),
            "start-minion"
        );
    }

    /// Pushes frames into the master's event pull socket (4-byte length +
    /// frame, as Salt's own publishers do); the master publishes them on
    /// its bus like any other event.
    pub fn push_events(&self, frames: &[Vec<u8>]) {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(self.event_pull())
            .expect("connect pull socket");
        for f in frames {
            s.write_all(&saltpipe::bus::encode::length_prefixed(f))
                .expect("push");
        }
        s.flush().expect("flush");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// A running `saltpipe` process with its stderr collected.
pub struct Saltpipe {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Saltpipe {
    pub fn start(args: &[&str], config: &Path) -> Saltpipe {
        let mut a: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_ref()).collect();
        a.push("--config".as_ref());
        a.push(config.as_os_str());
        Saltpipe::start_env(&a, &[])
    }

    /// Runs `saltpipe ARGS` (no `--config` added) with these environment
    /// variables on top of the test's own.
    pub fn start_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Saltpipe {
        let mut child = Command::new(env!("CARGO_BIN_EXE_saltpipe"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn saltpipe");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[saltpipe] {line}");
                l.lock().expect("log lock").push(line);
            }
        });
        Saltpipe { child, log }
    }

    pub fn log_contains(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) {
        wait_for(&format!("log line {needle:?} x{count}"), timeout, || {
            (self.log_contains(needle) >= count).then_some(())
        });
    }

    /// SIGTERM, then wait for exit.
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        wait_exit(&mut self.child, Duration::from_secs(60))
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    wait_for("saltpipe to exit", timeout, || {
        child.try_wait().ok().flatten()
    })
}

impl Drop for Saltpipe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config for a run against `bus` with queue and sink in `dir`.
pub fn write_config(dir: &Path, bus: &Path, extra: &str) -> PathBuf {
    write_config_source(dir, &format!("socket = \"{}\"", bus.display()), extra)
}

/// Same, with the `[source]` address line given (`tcp = "127.0.0.1:4512"`).
pub fn write_config_source(dir: &Path, source: &str, extra: &str) -> PathBuf {
    let path = dir.join("saltpipe.toml");
    let text = format!(
        "[source]\n{source}\nreconnect_max = \"1s\"\n\n[queue]\nurl = \"embedded://{}\"\n\n[worker]\nbatch_timeout = \"100ms\"\n\n[sink]\nurl = \"sqlite://{}\"\n\n[metrics]\nenabled = false\n\n{extra}\n",
        dir.join("queue").display(),
        dir.join("salt.db").display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Opens the sink database read-only.
pub fn open_db(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        dir.join("salt.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open salt.db")
}

pub fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap_or(-1)
}

/// The first column of every row `sql` gives, as text.
pub fn strings(db: &rusqlite::Connection, sql: &str) -> Vec<String> {
    db.prepare(sql)
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// A return frame with a data map like a real `_return` from `test.echo`.
pub fn return_frame(jid: &str, minion: &str, ret: &str) -> Vec<u8> {
    let mut d = Vec::new();
    let fields: [(&str, &str); 5] = [
        ("cmd", "_return"),
        ("id", minion),
        ("jid", jid),
        ("fun", "test.echo"),
        ("user", "root"),
    ];
    let _ = rmp::encode::write_map_len(&mut d, fields.len() as u32 + 3);
    for (k, v) in fields {
        let _ = rmp::encode::write_str(&mut d, k);
        let _ = rmp::encode::write_str(&mut d, v);
    }
    let _ = rmp::encode::write_str(&mut d, "return");
    let _ = rmp::encode::write_str(&mut d, ret);
    let _ = rmp::encode::write_str(&mut d, "retcode");
    let _ = rmp::encode::write_uint(&mut d, 0);
    let _ = rmp::encode::write_str(&mut d, "success");
    let _ = rmp::encode::write_bool(&mut d, true);
    saltpipe::bus::encode::frame(&format!("salt/job/{jid}/ret/{minion}"), &d)
}

/// Runs `cmd` to its end; panics naming `what`, with its stderr, unless it
/// succeeded.
pub fn output_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs one SQL statement with a database's own command-line client.
pub fn sql_cli(program: &str, args: &[&str], sql: &str) -> String {
    let out = output_ok(Command::new(program).args(args).arg(sql), sql);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One statement in MariaDB (root, no password), tab-separated output.
pub fn my(db: &str, sql: &str) -> String {
    sql_cli(
        "mysql",
        &["-h127.0.0.1", "-uroot", "-N", "-B", db, "-e"],
        sql,
    )
}

/// One statement in PostgreSQL (postgres, trust), `|`-separated output.
pub fn pg(db: &str, sql: &str) -> String {
    sql_cli(
        "psql",
        &["-h", "127.0.0.1", "-U", "postgres", "-tA", "-d", db, "-c"],
        sql,
    )
}

/// The one throwaway-database fixture: a database with a random name in
/// MariaDB (utf8mb4) and/or PostgreSQL, on the loopback servers the test
/// setup starts, dropped when this goes (even if the test fails).
pub struct Dbs(pub String);

impl Dbs {
    fn named(prefix: &str) -> Dbs {
        Dbs(format!("saltpipe_{prefix}_{:016x}", rand::random::<u64>()))
    }

    /// In MariaDB only.
    pub fn mysql(prefix: &str) -> Dbs {
        let d = Dbs::named(prefix);
        my(
            "test",
            &format!("CREATE DATABASE {} CHARACTER SET utf8mb4", d.0),
        );
        d
    }

    /// In PostgreSQL only.
    pub fn postgres(prefix: &str) -> Dbs {
        let d = Dbs::named(prefix);
        pg("test", &format!("CREATE DATABASE {}", d.0));
        d
    }

    /// In both servers, under one name.
    pub fn both(prefix: &str) -> Dbs {
        let d = Dbs::mysql(prefix);
        pg("test", &format!("CREATE DATABASE {}", d.0));
        d
    }

    /// Its sink URL on MariaDB, through `port` (3306, or a proxy's).
    pub fn mysql_url(&self, port: u16) -> String {
        format!("mysql://root@127.0.0.1:{port}/{}", self.0)
    }

    /// Its sink URL on PostgreSQL, through `port` (5432, or a proxy's).
    pub fn pg_url(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{}", self.0)
    }
}

impl Drop for Dbs {
    fn drop(&mut self) {
        let _ = Command::new("mysql")
            .args(["-h127.0.0.1", "-uroot", "-e"])
            .arg(format!("DROP DATABASE IF EXISTS {}", self.0))
            .status();
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c"])
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0))
            .status();
    }
}
pub mod webdb;
