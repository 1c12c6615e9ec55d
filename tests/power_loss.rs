//! Power loss: with `queue.sync = "full"`, is every queue ack preceded by
//! an fsync of the sink commit it acknowledges?
//!
//! This machine offers no way to cut power under a test (no device-mapper
//! for dm-flakey, and a loop device alone drops nothing), so the test proves
//! the order instead: it runs the real `saltpipe work` binary under
//! `strace -f`, on a queue filled beforehand, and walks the trace. A power
//! cut keeps exactly what was fsynced; an ack (the queue's fsynced delete)
//! that reached the disk while rows it acknowledged were only written (not
//! fsynced) to the sink's WAL is a batch a power cut loses from both. So:
//! at every fsync of the queue's files by a thread that is not a checkpoint
//! thread (i.e. an ack commit: `work` writes nothing else to the queue),
//! every earlier write to the sink's WAL must have been followed by an fsync
//! of it. The same walk over a run with `sink.sync = "normal"` (what the
//! SQLite sink always did before) must find such acks, or the check proves
//! nothing.

#[path = "common/brokers.rs"]
mod brokers;

use brokers::*;
use saltpipe::queue::embedded::Embedded;
use saltpipe::queue::{Producer, SyncMode};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const N: usize = 2000;

/// The syncs that matter, in trace order.
#[derive(Debug, PartialEq)]
enum Op {
    /// A sink commit's fsync of its WAL returned (by the writing thread).
    SinkCommitSynced,
    /// An ack's commit began its fsync of the queue's WAL.
    AckSyncStarts,
}

/// Runs `saltpipe work` under strace until the N returns are stored; returns
/// the trace.
async fn traced_work(dir: &Path, sink_sync: &str) -> String {
    let qdir = dir.join("queue");
    let q = Embedded::open(&qdir, SyncMode::Full).await.expect("queue");
    let batch: Vec<_> = (0..N).map(return_message).collect();
    q.push(&batch).await.expect("fill the queue");
    drop(q);
    let queue = queue_config(
        &format!("embedded://{}", qdir.display()),
        "x",
        &dir.join("spool"),
    );
    let db = dir.join("salt.db");
    let config = write_config(dir, "work.toml", &queue, &db, "");
    let trace = dir.join("trace.txt");
    let log = std::fs::File::create(dir.join("work.log")).expect("log");
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-y", "-s", "64", "-o"])
        .arg(&trace)
        .args(["-e", "trace=pwrite64,pwritev,write,fsync,fdatasync,prctl"])
        .arg(env!("CARGO_BIN_EXE_saltpipe"))
        .arg("work")
        .arg("--config")
        .arg(&config)
        .env("SALTPIPE_QUEUE_SYNC", "full")
        .env("SALTPIPE_SINK_SYNC", sink_sync)
        .env("SALTPIPE_METRICS_ENABLED", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("strace (apt-get install strace)");
    let got = wait_for_returns(&db, N as u64, Duration::from_secs(120)).await;
    // Give the last ack time to land before stopping.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGTERM to strace would only detach it: the traced saltpipe would run
    // on, orphaned. Stop saltpipe itself; strace ends with it.
    let traced = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok());
    let pid = traced.unwrap_or(child.id() as i32);
    stop_via(&mut child, pid);
    assert_eq!(got.0, N as u64, "all returns stored under strace");
    std::fs::read_to_string(&trace).expect("trace")
}

/// The offset argument of a `pwrite64(fd, buf, len, offset)`, if that is one.
fn offset(args: &str) -> Option<&str> {
    args.rsplit(", ")
        .next()
        .map(|o| o.trim_end_matches(" <unfinished ...>"))
        .and_then(|o| o.split(')').next())
}

/// The syncs of a trace, ignoring what the checkpoint threads do and the
/// sync SQLite makes after writing a new WAL's header (a pwrite at offset
/// 0): what is left is one sync per commit of a writing thread. In `work`
/// the only commits to the queue are acks.
fn ops(trace: &str) -> Vec<Op> {
    let mut checkpointers: HashSet<&str> = HashSet::new();
    // tid -> (call, fd path) of a call strace shows as unfinished.
    let mut unfinished: HashMap<&str, (String, String)> = HashMap::new();
    // (tid, file) whose next sync is a new WAL header's.
    let mut header: HashSet<(&str, String)> = HashSet::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("prctl(PR_SET_NAME") && rest.contains("\"ckpt-") {
            checkpointers.insert(tid);
            continue;
        }
        if checkpointers.contains(tid) {
            continue;
        }
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let name = resumed.split_whitespace().next().unwrap_or_default();
            if let Some((call, path)) = unfinished.remove(tid)
                && call == name
                && (call == "fsync" || call == "fdatasync")
                && path.ends_with("/salt.db-wal")
            {
                out.push(Op::SinkCommitSynced);
            }
            continue;
        }
        let Some((call, args)) = rest.split_once('(') else {
            continue;
        };
        let path = args
            .split_once('<')
            .and_then(|(_, p)| p.split_once('>'))
            .map(|(p, _)| p.to_owned())
            .unwrap_or_default();
        let sink = path.ends_with("/salt.db-wal");
        let queue = path.contains("/queue/") && path.ends_with(".db-wal");
        if !(sink || queue) {
            continue;
        }
        let done = !rest.ends_with("<unfinished ...>");
        if call.starts_with("pwrite") {
            if offset(args) == Some("0") {
                header.insert((tid, path));
            }
            continue;
        }
        if call != "fsync" && call != "fdatasync" {
            continue;
        }
        if header.remove(&(tid, path.clone())) {
            continue;
        }
        if queue {
            out.push(Op::AckSyncStarts);
        } else if done {
            out.push(Op::SinkCommitSynced);
        } else {
            unfinished.insert(tid, (call.to_owned(), path));
        }
    }
    out
}

/// (acks, of which began before as many sink commits were fsynced). The
/// worker acks batches in order, each after its commit returned, so the
/// k-th ack acknowledges at most the first k batches: if commits are
/// fsynced before they return, k of them were fsynced by then.
fn early_acks(ops: &[Op]) -> (usize, usize) {
    let (mut synced, mut acks, mut early) = (0, 0, 0);
    for op in ops {
        match op {
            Op::SinkCommitSynced => synced += 1,
            Op::AckSyncStarts => {
                acks += 1;
                if synced < acks {
                    early += 1;
                }
            }
        }
    }
    (acks, early)
}

#[tokio::test]
async fn with_sync_full_every_ack_follows_an_fsync_of_the_sink_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = traced_work(dir.path(), "full").await;
    let ops = ops(&trace);
    let commits = ops.iter().filter(|o| **o == Op::SinkCommitSynced).count();
    let (acks, early) = early_acks(&ops);
    // 2,000 returns in batches of at most 200 (10 commits), in containers
    // of 256 events (a queue row is deleted once all of it is acked: 8).
    eprintln!("sink.sync = full: {commits} sink commits fsynced, {acks} acks, {early} early");
    assert!(commits >= 10, "sink commits fsynced: {commits}");
    assert!(acks >= 8, "ack commits traced: {acks}");
    assert_eq!(early, 0, "acks ahead of the sink's fsyncs");

    // The check has teeth: a sink at synchronous=NORMAL (the old default
    // whatever the queue said) acks rows that only sit in its page cache.
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = traced_work(dir.path(), "normal").await;
    let (acks, early) = early_acks(&self::ops(&trace));
    eprintln!("sink.sync = normal: {acks} acks, {early} early");
    assert!(acks >= 8, "ack commits traced: {acks}");
    assert!(
        early >= acks / 2,
        "{early} of {acks} acks ahead of the sink's fsyncs"
    );
}
