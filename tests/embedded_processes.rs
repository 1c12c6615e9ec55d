//! The embedded queue shared by two processes, as `saltpipe listen` and
//! `saltpipe work` share it on one host, with large returns: their
//! containers go to spill files (src/queue/embedded/spill.rs). This test
//! process writes, as the listener would; a real `saltpipe work` consumes,
//! stores and acks. Every return is stored once, the work process deletes
//! the spill files no row points into any more, and never the file the
//! writer (another process for it) still holds.

#[path = "common/brokers.rs"]
mod brokers;

use brokers::*;
use saltpipe::queue::embedded::Embedded;
use saltpipe::queue::{Message, Producer, SyncMode};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// 500 returns of 150 KB: 75 MB, more than one 64 MiB spill file.
const N: usize = 500;
const RETURN_BYTES: usize = 150_000;

fn spill_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("spill-"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_process_collects_spill_files_but_not_the_one_a_writer_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qdir = dir.path().join("queue");
    let producer = Embedded::open(&qdir, SyncMode::Normal)
        .await
        .expect("queue");
    let all: Vec<Message> = (0..N)
        .map(|i| {
            let jid = format!("2026120312{:010}", i / 10);
            let minion = format!("minion-{}", i % 10);
            Message {
                queue: Arc::from("default"),
                body: return_body_sized(&jid, &minion, Some(RETURN_BYTES)),
                key: minion,
                received_ms: i as i64,
            }
        })
        .collect();
    // In the listener's transactions of about 8 MiB.
    for batch in all.chunks(50) {
        producer.push(batch).await.expect("push");
    }
    let files = spill_files(&qdir);
    assert_eq!(
        files.len(),
        2,
        "75 MB fill one file and start a second: {files:?}"
    );

    let queue = queue_config(
        &format!("embedded://{}", qdir.display()),
        "x",
        &dir.path().join("spool"),
    );
    let db = dir.path().join("salt.db");
    let config = write_config(dir.path(), "work.toml", &queue, &db, "");
    let mut work = spawn_saltpipe("work", &config, &dir.path().join("work.log"));
    let stored = wait_for_returns(&db, N as u64, Duration::from_secs(120)).await;

    // The work process acked everything: the first file is no one's, the
    // second is still this process's writer's.
    let mut left = spill_files(&qdir);
    for _ in 0..100 {
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = spill_files(&qdir);
    }
    stop(&mut work);
    let log = std::fs::read_to_string(dir.path().join("work.log")).unwrap_or_default();
    assert_eq!(
        stored,
        (N as u64, N as u64),
        "each return once; work's log:\n{log}"
    );
    assert_eq!(left, files[1..], "the held file stays, the spent one goes");
    assert_eq!(producer.stored().await.expect("stored"), 0, "all acked");

    // Once the writer lets go, the next open of the queue deletes it.
    drop(producer);
    let _again = Embedded::open(&qdir, SyncMode::Normal)
        .await
        .expect("reopen");
    assert!(spill_files(&qdir).is_empty());
}
