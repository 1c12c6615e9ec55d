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
//! `PRAGMA wal_checkpoint(PASSIVE)` whenever a writer [`nudge`]s it and at
//! least every [`IDLE_CHECK`]. PASSIVE never waits for readers or writers,
//! so it can only make a commit cheaper, never block one. Durability is
//! unchanged: a commit is durable once it is in the WAL, whoever copies it
//! later.
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
/// bound on the WAL file (64 MiB with [`PAGE_SIZE`] pages) when the
/// background thread cannot keep up.
pub const BACKSTOP_PAGES: u32 = 4_096;

/// Page size for the databases saltpipe creates (the sink's and the
/// queue's): 16 KiB instead of SQLite's 4 KiB. Returns are 1-2 KiB rows, so
/// bigger pages mean 4x fewer WAL frames, page writes, checksums and b-tree
/// splits per batch: -26% CPU per return in a 200k-return replay A/B
/// (u+s 5.7 s -> 4.2 s), at ~10% more bytes written.
pub const PAGE_SIZE: u32 = 16_384;

/// Longest pause between two checks when no writer nudges.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Largest `-wal` file kept on disk after the WAL starts over. Under a
/// long burst the checkpointer may trail the writer and the file grows past
/// the backstop (a 1M-return replay left 220 MB); without this limit SQLite
/// keeps the file at its high-water mark for good.
pub const WAL_FILE_LIMIT: i64 = 64 * 1024 * 1024;

/// Sets a writing connection's inline checkpoint to the backstop and caps
/// the size the WAL file is cut back to. Call it on every connection that
/// writes when a [`Checkpointer`] runs for the file.
pub fn defer_inline_checkpoints(c: &Connection) -> rusqlite::Result<()> {
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
    pending: Mutex<bool>,
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
    /// Opens a second connection to `db` and starts the thread. The file
    /// must already be in WAL mode (the writer's open does that).
    pub fn start(db: &Path) -> Result<Checkpointer, StartError> {
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

    /// Tells the thread that a commit just grew the WAL. Cheap; never blocks
    /// on the checkpoint itself.
    pub fn nudge(&self) {
        if let Ok(mut p) = self.signal.pending.lock() {
            *p = true;
            self.signal.wake.notify_one();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.nudge();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(conn: Connection, path: &Path, signal: &Signal, stop: &AtomicBool) {
    loop {
        let stopping = stop.load(Ordering::Acquire);
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
        let Ok(mut pending) = signal.pending.lock() else {
            return;
        };
        if !*pending {
            pending = match signal.wake.wait_timeout(pending, IDLE_CHECK) {
                Ok((p, _)) => p,
                Err(_) => return,
            };
        }
        *pending = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_pages(c: &Connection) -> i64 {
        // A checkpoint of nothing reports the WAL's size without copying.
        c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .expect("checkpoint")
    }

    #[test]
    fn commits_are_checkpointed_by_the_thread_and_the_wal_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("t.db");
        let w = Connection::open(&db).expect("open");
        w.pragma_update(None, "journal_mode", "WAL").expect("wal");
        defer_inline_checkpoints(&w).expect("pragma");
        w.execute_batch("CREATE TABLE t (v BLOB)").expect("table");
        let ck = Checkpointer::start(&db).expect("start");
        for _ in 0..20 {
            w.execute("INSERT INTO t VALUES (zeroblob(100000))", [])
                .expect("insert");
            ck.nudge();
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
    fn writers_keep_an_inline_backstop_and_a_wal_file_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("t.db");
        let w = Connection::open(&db).expect("open");
        w.pragma_update(None, "journal_mode", "WAL").expect("wal");
        defer_inline_checkpoints(&w).expect("pragma");
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
