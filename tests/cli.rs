//! The command line's contract: exit codes, error messages that name the
//! key and line, every example config valid, replay of real captures.

mod common;

use std::process::Command;

fn saltpipe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(args)
        .env_remove("SALTPIPE_CONFIG")
        .output()
        .expect("run saltpipe")
}

#[test]
fn every_example_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("examples") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "toml") {
            let out = saltpipe(&[
                "validate",
                "--no-connect",
                "--config",
                p.to_str().expect("utf8 path"),
            ]);
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n > 0);
}

#[test]
fn invalid_config_exits_3_naming_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[worker]\nbatch_max_events = 10\nbatch_timeout = \"whenever\"\n",
    )
    .expect("write");
    let out = saltpipe(&[
        "validate",
        "--no-connect",
        "--config",
        p.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(err.contains("not a duration"), "{err}");

    std::fs::write(&p, "[sink]\nurl = \"postgress://x\"\n").expect("write");
    let out = saltpipe(&[
        "validate",
        "--no-connect",
        "--config",
        p.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgress"));
}

#[test]
fn bad_environment_override_names_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["validate", "--no-connect"])
        .env("SALTPIPE_WORKER_BATCH_MAX_EVENTS", "lots")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SALTPIPE_WORKER_BATCH_MAX_EVENTS"));
}

#[test]
fn usage_errors_exit_2_and_unreachable_parts_exit_4() {
    assert_eq!(saltpipe(&["no-such-command"]).status.code(), Some(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        format!(
            "[source]\nsocket = \"{0}/missing.ipc\"\n[queue]\nurl = \"embedded://{0}/q\"\n[sink]\nurl = \"sqlite://{0}/s.db\"\n",
            dir.path().display()
        ),
    )
    .expect("write");
    let out = saltpipe(&["validate", "--config", p.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cannot reach the bus"), "{text}");
    assert!(text.contains("opened the sink"), "{text}");
}

#[test]
fn validate_warns_when_mariadb_takes_smaller_rows_than_saltpipe_reads() {
    let db = common::Dbs::mysql("validate");
    let packet: u64 = common::my(&db.0, "SELECT @@max_allowed_packet")
        .trim()
        .parse()
        .expect("a number");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    let config = |max_return_size: &str| {
        format!(
            "[queue]\nurl = \"embedded://{0}/q\"\n[sink]\nurl = \"{1}\"\nmax_return_size = \"{max_return_size}\"\n",
            dir.path().display(),
            db.mysql_url(3306)
        )
    };
    let validate = |text: String| {
        std::fs::write(&p, text).expect("write");
        let out = saltpipe(&["validate", "--config", p.to_str().expect("utf8")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The server's packet leaves rows of 64 KiB less.
    let text = validate(config(&format!("{}MiB", (packet >> 20) + 1)));
    assert!(text.contains("opened the sink"), "{text}");
    let limit = packet - (64 << 10);
    assert!(
        text.contains(&format!(
            "warning: the database takes rows of at most {limit} bytes"
        )),
        "{text}"
    );
    let text = validate(config("1MiB"));
    assert!(text.contains("opened the sink"), "{text}");
    assert!(!text.contains("warning"), "{text}");
}

/// `saltpipe replay --json FILE` with its queue and sink at the given
/// paths; the summary, after checking the exit status.
fn replay_json(
    file: &std::path::Path,
    queue: &std::path::Path,
    sink: &std::path::Path,
) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_saltpipe"))
        .args(["replay", "--json"])
        .arg(file)
        .env(
            "SALTPIPE_QUEUE_URL",
            format!("embedded://{}", queue.display()),
        )
        .env("SALTPIPE_SINK_URL", format!("sqlite://{}", sink.display()))
        .output()
        .expect("replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json summary")
}

#[test]
fn replay_of_real_captures_keeps_jobs_and_drops_noise_by_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/salt-3008.5-bus.bin");
    let v = replay_json(&fixture, &dir.path().join("q"), &dir.path().join("s.db"));
    // 44 frames: see tests/fixtures/README.md for what each is.
    assert_eq!(v["frames"], 44);
    assert_eq!(v["malformed"], 0);
    assert_eq!(v["kept"], 23);
    assert_eq!(v["dropped"]["find_job"], 5);
    assert_eq!(v["dropped"]["publish_duplicate"], 8);
    assert_eq!(v["dropped"]["auth"], 2);
    assert_eq!(v["dropped"]["refresh"], 4);
    // The runner job's `new` (its `ret` is kept: a jids row and a return
    // under the master's id, as Salt's master job cache stores it).
    assert_eq!(v["dropped"]["not_selected"], 2);
    assert_eq!(v["returns_written"], 15);
    assert_eq!(v["jids_written"], 11);

    // 3006.29 frames carry a length prefix; its bare-jid announcements are redundant.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/salt-3006.29-bus.bin");
    let v = replay_json(&fixture, &dir.path().join("q2"), &dir.path().join("s2.db"));
    assert_eq!(v["frames"], 8);
    assert_eq!(v["dropped"]["legacy_announce"], 2);
    assert_eq!(v["returns_written"], 4);
}

#[test]
fn replay_of_a_damaged_stream_counts_rejections_and_keeps_good_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/salt-3008.5-bus.bin"),
    )
    .expect("fixture");
    // Garbage in front, in the middle (between frames), a frame whose body
    // is not msgpack, and a truncated frame at the end.
    let mut damaged = b"\xff\xfe garbage \xc1\xc1".to_vec();
    damaged.extend_from_slice(&good);
    damaged.extend_from_slice(b"\x00\x00\x00\x03abc");
    damaged.extend_from_slice(&saltpipe::bus::encode::frame(
        "salt/job/1/ret/x",
        b"\xc1\xc1",
    ));
    damaged.extend_from_slice(&good[..good.len() / 3]);
    let p = dir.path().join("damaged.bin");
    std::fs::write(&p, &damaged).expect("write");
    let v = replay_json(&p, &dir.path().join("q"), &dir.path().join("s.db"));
    assert!(v["malformed"].as_u64().expect("malformed") >= 3, "{v}");
    // All 15 returns of the intact copy land (14 minion returns and the
    // runner job's); the partial copy repeats some of them, which the
    // duplicate check and the unique key absorb.
    assert_eq!(v["returns_written"], 15, "{v}");
    assert!(
        v["dropped"]["duplicate_return"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
}

/// Runs `cmd` with nobody reading its stdout (as `| head` leaves it once
/// done) and checks it ended with exit 0, without a panic or a word about
/// the pipe.
fn quiet_with_stdout_closed(cmd: &mut Command) {
    use std::process::Stdio;
    let mut child = cmd
        .env_remove("SALTPIPE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn saltpipe");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("pipe") && !lower.contains("stdout"),
        "{stderr}"
    );
}

/// A reader that stops early (`saltpipe replay --json | head`) closes the
/// pipe before the summary is written: the replay's work is done, so the
/// exit is 0 and quiet, never a panic about stdout.
#[test]
fn a_closed_stdout_is_not_a_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/salt-3008.5-bus.bin");
    quiet_with_stdout_closed(
        Command::new(env!("CARGO_BIN_EXE_saltpipe"))
            .args(["replay", "--json"])
            .arg(&fixture)
            .env(
                "SALTPIPE_QUEUE_URL",
                format!("embedded://{}", dir.path().join("q").display()),
            )
            .env(
                "SALTPIPE_SINK_URL",
                format!("sqlite://{}", dir.path().join("s.db").display()),
            ),
    );
    // The work itself was done.
    let db = rusqlite::Connection::open(dir.path().join("s.db")).expect("open");
    let n: i64 = db
        .query_row("SELECT count(*) FROM salt_returns", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 15);
}

/// `saltpipe top --count N | head`: the view ends when its reader does,
/// with exit 0 and no error (here drawing the "cannot scrape" screen of a
/// closed port, which needs no running saltpipe).
#[test]
fn top_ends_quietly_when_its_reader_does() {
    quiet_with_stdout_closed(
        Command::new(env!("CARGO_BIN_EXE_saltpipe"))
            .args(["top", "--count", "50", "--interval", "50ms", "--url"])
            .arg(format!("http://127.0.0.1:{}/metrics", common::free_port())),
    );
}
