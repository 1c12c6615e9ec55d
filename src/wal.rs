//! Checkpoints a SQLite WAL database on its own thread, off the write path.
//!
//! In WAL mode every commit appends pages to the `-wal` file, and from time
//! to time a *checkpoint* copies them back into the database file. SQLite
//! does that by default inside the commit that pushes the WAL past 1,000
//! pages, on the committing thread: with batches of a few MB that is nearly
//! every commit of the sink and of the embedded queue, and profiles of a
//! full-speed replay put a quarter of all CPU time there (reading the WAL
//! back, writing the database, fsync), all of it on the one thread that the
//! whole pipeline waits for.
//!
//! So the writing connection turns the inline checkpoint down to a backstop
//! ([`BACKSTOP_PAGES`], so the WAL stays bounded even if this thread falls
//! behind or dies), and a [`Checkpointer`] with its own connection runs
//! `PRAGMA wal_checkpoint(PASSIVE)` once writers [`nudge`]d it about
//! [`CHECKPOINT_BYTES`] of commits, or [`IDLE_CHECK`] after a smaller one.
//! PASSIVE never waits for readers or writers, so it can only make a commit
//! cheaper, never block one. Durability is unchanged: a commit is durable
//! once it is in the WAL, whoever copies it later.
//!
//! SQLite has no background checkpointer of its own (its docs suggest this
//! very arrangement for applications that want one), hence this module.
//!
//! [`nudge`]: Checkpointer::nudge

use rusqlite::Connection;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// WAL size (pages) at which a commit checkpoints inline after all: the
/// bound on the WAL file (256 MiB with [`PAGE_SIZE`] pages) when the
/// background thread cannot keep up.
///
/// A passive checkpoint can only let the WAL start over if it finishes
/// before the writer's next transaction begins, and a writer with a backlog
/// begins the next one at once: under load the WAL grows until this
/// backstop fires, on the writer's thread. At 64 MiB it fired every few
/// batches (4.6% of a 1M-return replay's profile, all of it on the thread
/// the pipeline waits for); at 256 MiB the background thread catches up
/// first. With [`WAL_FILE_LIMIT`] this took the sink's own write of 1M
/// prepared rows from 67-68k to 71-92k rows/s with the same 4 MiB cache,
/// 97-101k with 16 MiB (docs/BENCHMARKS.md).
pub const BACKSTOP_PAGES: u32 = 16_384;

/// Page size for the databases saltpipe creates (the sink's and the
/// queue's): 16 KiB instead of SQLite's 4 KiB. Returns are 1-2 KiB rows, so
/// bigger pages mean 4x fewer WAL frames, page writes, checksums and b-tree
/// splits per batch: -26% CPU per return in a 200k-return replay A/B
/// (u+s 5.7 s -> 4.2 s), at ~10% more bytes written.
pub const PAGE_SIZE: u32 = 16_384;

/// Longest a commit waits for its checkpoint when little is written.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Bytes committed that start a checkpoint at once (SQLite's own default,
/// 1,000 pages of 4 KiB). A checkpoint per commit instead cost the
/// listener most of its CPU at a few thousand events a second, where the
/// queue commits every 20 ms: 50 checkpoints and fsyncs a second.
pub const CHECKPOINT_BYTES: usize = 4 * 1024 * 1024;

/// Largest `-wal` file kept on disk after the WAL starts over: the
/// backstop's size. Under a long burst the checkpointer may trail the
/// writer and the file grows past the backstop; without a limit SQLite
/// keeps the file at its high-water mark for good. Cutting it back below
/// what a burst needs is worse than keeping it: the next burst grows the
/// file again, new blocks and new page-cache pages instead of pages
/// overwritten in place (on the development VM a new page-cache page costs
/// ~16x a rewrite: 2 GB written to a new file 8.3 s, rewritten 0.44 s).
pub const WAL_FILE_LIMIT: i64 = BACKSTOP_PAGES as i64 * PAGE_SIZE as i64;

/// The set-up both of saltpipe's SQLite files share (the sink's and the
/// embedded queue's), on every connection: [`PAGE_SIZE`] (which only takes
/// effect while the file is new and empty: existing files keep the page size
/// they were made with), WAL, and the given `synchronous` level.
pub fn set_up(c: &Connection, synchronous: &str) -> rusqlite::Result<()> {
    c.pragma_update(None, "page_size", PAGE_SIZE)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", synchronous)
}

/// Sets a writing connection's inline checkpoint to the backstop and caps
/// the size the WAL file is cut back to: [`Checkpointer::start`] does it for
/// the writer it takes over from.
fn defer_inline_checkpoints(c: &Connection) -> rusqlite::Result<()> {
    c.pragma_update(None, "wal_autocheckpoint", BACKSTOP_PAGES)?;
    c.pragma_update(None, "journal_size_limit", WAL_FILE_LIMIT)
}

/// Why a [`Checkpointer`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open a checkpoint connection: {0}")]
    Open(#[from] rusqlite::Error),
    #[error("cannot start the checkpoint thread: {0}")]
    Spawn(std::io::Error),
}

#[derive(Default)]
struct Signal {
    /// Bytes committed since the last checkpoint started.
    pending: Mutex<usize>,
    wake: Condvar,
}

/// A thread that checkpoints one WAL database. Stops (after one last
/// checkpoint) when dropped.
pub struct Checkpointer {
    signal: Arc<Signal>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Hands `writer`'s checkpoints of `db` to a new thread: turns its
    /// inline checkpoint down to the backstop ([`defer_inline_checkpoints`]),
    /// opens a second connection and starts the thread. The file must
    /// already be in WAL mode ([`set_up`]).
    pub fn start(db: &Path, writer: &Connection) -> Result<Checkpointer, StartError> {
        defer_inline_checkpoints(writer)?;
        let conn = Connection::open(db)?;
        // The checkpoint itself takes no lock that a writer waits on, but
        // opening may race a writer's schema change: wait rather than fail.
        conn.busy_timeout(Duration::from_secs(5))?;
        let signal = Arc::new(Signal::default());
        let stop = Arc::new(AtomicBool::new(false));
        let name = db
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let thread = std::thread::Builder::new()
            .name(format!("ckpt-{name}"))
            .spawn({
                let signal = signal.clone();
                let stop = stop.clone();
                let path = db.to_path_buf();
                move || run(conn, &path, &signal, &stop)
            })
            .map_err(StartError::Spawn)?;
        Ok(Checkpointer {
            signal,
            stop,
            thread: Some(thread),
        })
    }

    /// Tells the thread that a commit just added about `bytes` to the WAL.
    /// Cheap; never blocks on the checkpoint itself.
    pub fn nudge(&self, bytes: usize) {
        if let Ok(mut p) = self.signal.pending.lock() {
            let before = *p;
            *p = p.saturating_add(bytes.max(1));
            if before < CHECKPOINT_BYTES && *p >= CHECKPOINT_BYTES {
                self.signal.wake.notify_one();
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.signal.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(conn: Connection, path: &Path, signal: &Signal, stop: &AtomicBool) {
    loop {
        let stopping = wait_for_work(signal, stop);
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((log, done)) => tracing::trace!(db = %path.display(), log, done, "checkpoint"),
            // A failed checkpoint loses nothing (the pages stay in the WAL
            // and the writer's backstop still bounds it): log and go on.
            Err(e) => tracing::debug!(db = %path.display(), error = %e, "checkpoint failed"),
        }
        if stopping {
            return;
        }
    }
}

/// Sleeps until [`CHECKPOINT_BYTES`] were committed, or until a quiet
/// [`IDLE_CHECK`] passed with anything committed at all, or until stop
/// (returns true: one last checkpoint, then the thread ends).
fn wait_for_work(signal: &Signal, stop: &AtomicBool) -> bool {
    let Ok(mut pending) = signal.pending.lock() else {
        return true;
    };
    loop {
        if stop.load(Ordering::Acquire) {
            return true;
        }
        if *pending >= CHECKPOINT_BYTES {
            break;
        }
        let (p, waited) = match signal.wake.wait_timeout(pending, IDLE_CHECK) {
            Ok(r) => r,
            Err(_) => return true,
        };
        pending = p;
        if waited.timed_out() && *pending > 0 {
            break;
        }
    }
    *pending = 0;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh WAL file with one table, and its writing connection.
    fn wal_db(dir: &tempfile::TempDir) -> (std::path::PathBuf, Connection) {
        let db = dir.path().join("t.db");
        let w = Connection::open(&db).expect("open");
        set_up(&w, "NORMAL").expect("set up");
        w.execute_batch("CREATE TABLE t (v BLOB)").expect("table");
        (db, w)
    }

    fn wal_pages(c: &Connection) -> i64 {
        // A checkpoint of nothing reports the WAL's size without copying.
        c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .expect("checkpoint")
    }

    #[test]
    fn commits_are_checkpointed_by_the_thread_and_the_wal_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, w) = wal_db(&dir);
        let ck = Checkpointer::start(&db, &w).expect("start");
        for _ in 0..20 {
            w.execute("INSERT INTO t VALUES (zeroblob(100000))", [])
                .expect("insert");
            ck.nudge(100_000);
        }
        // Stopping runs a last checkpoint, so every frame is in the database
        // file and the next write starts the WAL over.
        drop(ck);
        let size = std::fs::metadata(&db).expect("db").len();
        assert!(size > 2_000_000, "database file holds the rows: {size}");
        let probe = Connection::open(&db).expect("probe");
        let before = std::fs::metadata(dir.path().join("t.db-wal"))
            .expect("wal")
            .len();
        w.execute("INSERT INTO t VALUES (zeroblob(10))", [])
            .expect("insert");
        assert!(
            wal_pages(&probe) < 10,
            "the WAL restarted from its beginning after a full checkpoint (file {before} bytes)"
        );
        let n: i64 = probe
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 21);
    }

    #[test]
    fn a_small_commit_is_checkpointed_after_a_quiet_second() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, w) = wal_db(&dir);
        let ck = Checkpointer::start(&db, &w).expect("start");
        w.execute("INSERT INTO t VALUES (zeroblob(200000))", [])
            .expect("insert");
        ck.nudge(200_000);
        // Far below CHECKPOINT_BYTES: only the idle timer copies it into the
        // database file. Waits up to 10 s (IDLE_CHECK is 1 s) before failing.
        let size = || std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size() < 200_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(size() >= 200_000, "checkpointed by the timer: {}", size());
    }

    #[test]
    fn starting_leaves_the_writer_an_inline_backstop_and_a_wal_file_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, w) = wal_db(&dir);
        let _ck = Checkpointer::start(&db, &w).expect("start");
        let pages: u32 = w
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .expect("read back");
        assert_eq!(pages, BACKSTOP_PAGES);
        let limit: i64 = w
            .query_row("PRAGMA journal_size_limit", [], |r| r.get(0))
            .expect("read back");
        assert_eq!(limit, WAL_FILE_LIMIT);
    }
}
