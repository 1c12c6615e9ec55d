//! The default queue: SQLite on local disk, through rusqlite.
//!
//! Why SQLite: it is the most tested embedded store there is, it gives
//! atomic batched appends and deletes in WAL mode at hundreds of thousands
//! of rows a second, it bounds its own memory (a page cache of a few MB
//! whatever the backlog), several processes on one host can share a file
//! (`saltpipe listen` and `saltpipe work` side by side), and an operator
//! can look inside with the `sqlite3` shell. redb and fjall are fine stores
//! too, but neither brings all of that, and the sink already links SQLite.
//!
//! Layout: one table, `messages(id, queue, key, received_ms, body)`, with an
//! index on (queue, id). Ids come from AUTOINCREMENT so they never go back
//! even when the table empties, which lets a consumer keep a cursor. A
//! consumer hands rows out in id order and deletes them when acked; rows
//! handed out but not acked are simply read again after a restart.
//!
//! Durability: WAL with `synchronous=NORMAL` (the default) survives a crash
//! or SIGKILL of saltpipe, since committed pages are in the OS's hands;
//! `sync = "full"` also survives a power cut, at an fsync per commit.
//!
//! One consumer per named queue per file, enforced with a lock file, since
//! two consumers with separate cursors would both deliver every row.

use super::{Consumer, Delivery, Message, Producer, QueueError, SyncMode};
use crate::wal::Checkpointer;
use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// How often a consumer looks for rows written by another process.
const POLL: Duration = Duration::from_millis(50);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_queue_id ON messages(queue, id);
";

fn storage(e: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(e.to_string())
}

struct Inner {
    dir: PathBuf,
    db: PathBuf,
    sync: SyncMode,
    writer: Mutex<Connection>,
    /// Wakes consumers in this process when rows arrive.
    notify: Notify,
    /// Copies the writer's committed WAL pages into the file off its thread.
    checkpointer: Checkpointer,
}

/// An open embedded queue directory. Cheap to clone.
#[derive(Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

/// One `Inner` per directory per process, so a producer's pushes wake the
/// consumers of the same process at once instead of at the next poll.
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Inner>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Weak<Inner>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn open_connection(db: &Path, sync: SyncMode) -> Result<Connection, QueueError> {
    let c =
        Connection::open(db).map_err(|e| QueueError::Storage(format!("{}: {e}", db.display())))?;
    c.busy_timeout(Duration::from_secs(10)).map_err(storage)?;
    let sync = match sync {
        SyncMode::Normal => "NORMAL",
        SyncMode::Full => "FULL",
    };
    crate::wal::set_up(&c, sync).map_err(storage)?;
    Ok(c)
}

impl Embedded {
    /// Opens (creating if needed) the queue in `dir`.
    pub async fn open(dir: &Path, sync: SyncMode) -> Result<Embedded, QueueError> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || Embedded::open_blocking(&dir, sync))
            .await
            .map_err(storage)?
    }

    fn open_blocking(dir: &Path, sync: SyncMode) -> Result<Embedded, QueueError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| QueueError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let key = dir.canonicalize().map_err(storage)?;
        let mut reg = registry().lock().map_err(storage)?;
        if let Some(inner) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(Embedded { inner });
        }
        let db = key.join("queue.db");
        // Another process opening the same queue at the same moment (a
        // `listen` and a `work` started together) may hold the lock while it
        // switches to WAL or creates the table: wait for it, briefly.
        let started = std::time::Instant::now();
        let writer = loop {
            let attempt = open_connection(&db, sync)
                .and_then(|c| c.execute_batch(SCHEMA).map(|_| c).map_err(storage));
            match attempt {
                Err(QueueError::Storage(m))
                    if m.contains("locked") && started.elapsed() < Duration::from_secs(30) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => break other?,
            }
        };
        let checkpointer = Checkpointer::start(&db, &writer).map_err(storage)?;
        let inner = Arc::new(Inner {
            dir: key.clone(),
            db,
            sync,
            writer: Mutex::new(writer),
            notify: Notify::new(),
            checkpointer,
        });
        reg.insert(key, Arc::downgrade(&inner));
        Ok(Embedded { inner })
    }

    /// A consumer of one named queue. Fails if another holds it.
    pub fn consumer(&self, queue: &str) -> Result<EmbeddedConsumer, QueueError> {
        let lock_path = self.inner.dir.join(format!("consumer-{queue}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(storage)?;
        if lock.try_lock().is_err() {
            return Err(QueueError::Busy {
                queue: queue.to_owned(),
                path: lock_path,
            });
        }
        let conn = open_connection(&self.inner.db, self.inner.sync)?;
        Ok(EmbeddedConsumer {
            queue: Arc::from(queue),
            conn: Arc::new(Mutex::new(conn)),
            cursor: 0,
            shared: self.clone(),
            _lock: lock,
        })
    }

    /// Messages in every queue (handed out or not): for status and tests.
    pub async fn stored(&self) -> Result<u64, QueueError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let c = inner.writer.lock().map_err(storage)?;
            c.query_row("SELECT count(*) FROM messages", [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(storage)
        })
        .await
        .map_err(storage)?
    }
}

#[async_trait]
impl Producer for Embedded {
    async fn push(&self, batch: &[Message]) -> Result<(), QueueError> {
        if batch.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let batch = batch.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut c = inner.writer.lock().map_err(storage)?;
            let tx = c.transaction().map_err(storage)?;
            {
                let mut st = tx
                    .prepare_cached("INSERT INTO messages (queue, key, received_ms, body) VALUES (?1, ?2, ?3, ?4)")
                    .map_err(storage)?;
                for m in &batch {
                    st.execute(params![&*m.queue, m.key, m.received_ms, &m.body[..]]).map_err(storage)?;
                }
            }
            tx.commit().map_err(storage)?;
            inner
                .checkpointer
                .nudge(batch.iter().map(|m| m.body.len()).sum());
            inner.notify.notify_waiters();
            Ok(())
        })
        .await
        .map_err(storage)?
    }
}

/// A consumer of one named queue in an embedded queue.
pub struct EmbeddedConsumer {
    queue: Arc<str>,
    conn: Arc<Mutex<Connection>>,
    /// Highest id handed out; rows above it are new to us.
    cursor: i64,
    shared: Embedded,
    _lock: std::fs::File,
}

impl EmbeddedConsumer {
    async fn fetch(
        &self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(i64, Delivery)>, QueueError> {
        let conn = self.conn.clone();
        let queue = self.queue.clone();
        let cursor = self.cursor;
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().map_err(storage)?;
            let mut st = c
                .prepare_cached(
                    "SELECT id, key, received_ms, body FROM messages WHERE queue = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )
                .map_err(storage)?;
            let mut rows = st.query(params![&*queue, cursor, max as i64]).map_err(storage)?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = rows.next().map_err(storage)? {
                let id: i64 = r.get(0).map_err(storage)?;
                let body: Vec<u8> = r.get(3).map_err(storage)?;
                bytes += body.len();
                out.push((
                    id,
                    Delivery {
                        id: id as u64,
                        key: r.get(1).map_err(storage)?,
                        received_ms: r.get(2).map_err(storage)?,
                        body: Bytes::from(body),
                    },
                ));
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .map_err(storage)?
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so a push in between still wakes us.
            let notified = self.shared.inner.notify.notified();
            let rows = self.fetch(max.max(1), max_bytes.max(1)).await?;
            if let Some((last, _)) = rows.last() {
                self.cursor = *last;
                return Ok(rows.into_iter().map(|(_, d)| d).collect());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(vec![]);
            }
            let nap = (deadline - now).min(POLL);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Deletes go through the producer's connection: SQLite allows one
        // writer at a time, and two connections of one process contending
        // for it would sleep in the busy handler instead of queueing here.
        let inner = self.shared.inner.clone();
        let queue = self.queue.clone();
        let runs = contiguous_runs(ids);
        let acked = ids.len();
        tokio::task::spawn_blocking(move || {
            let mut c = inner.writer.lock().map_err(storage)?;
            let tx = c.transaction().map_err(storage)?;
            {
                // Acks of one consumer come in id order, so a batch is
                // usually one range: one statement instead of one per row.
                let mut st = tx
                    .prepare_cached(
                        "DELETE FROM messages WHERE id BETWEEN ?1 AND ?2 AND queue = ?3",
                    )
                    .map_err(storage)?;
                for (lo, hi) in runs {
                    st.execute(params![lo as i64, hi as i64, &*queue])
                        .map_err(storage)?;
                }
            }
            tx.commit().map_err(storage)?;
            // A delete rewrites the pages its rows were on; their size is not
            // known here, so count a typical small event per row.
            inner.checkpointer.nudge(acked * 512);
            Ok(())
        })
        .await
        .map_err(storage)?
    }

    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        let conn = self.conn.clone();
        let queue = self.queue.clone();
        let cursor = self.cursor;
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().map_err(storage)?;
            c.query_row(
                "SELECT count(*) FROM messages WHERE queue = ?1 AND id > ?2",
                params![&*queue, cursor],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| Some(n as u64))
            .map_err(storage)
        })
        .await
        .map_err(storage)?
    }
}

/// Sorted, deduplicated ids grouped into inclusive ranges.
fn contiguous_runs(ids: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, hi)) if *hi + 1 == id => *hi = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(queue: &str, i: usize) -> Message {
        Message {
            queue: Arc::from(queue),
            key: format!("m{}", i % 3),
            body: Bytes::from(format!("salt/job/{i}/ret/m\n\n\u{80}")),
            received_ms: i as i64,
        }
    }

    #[tokio::test]
    async fn push_pull_ack_and_redelivery_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let q = Embedded::open(dir.path(), SyncMode::Normal)
                .await
                .expect("open");
            q.push(&(0..10).map(|i| msg("default", i)).collect::<Vec<_>>())
                .await
                .expect("push");
            q.push(&[msg("state", 99)]).await.expect("push");
            let mut c = q.consumer("default").expect("consumer");
            assert!(
                q.consumer("default").is_err(),
                "second consumer of one queue is refused"
            );
            let a = c.pull(4, usize::MAX, Duration::ZERO).await.expect("pull");
            assert_eq!(a.len(), 4);
            let b = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
            assert_eq!(
                b.len(),
                6,
                "the other queue's message is not delivered here"
            );
            assert_eq!(b[0].received_ms, 4, "order kept");
            c.ack(&a.iter().map(|d| d.id).collect::<Vec<_>>())
                .await
                .expect("ack");
            assert_eq!(
                c.pull(100, usize::MAX, Duration::ZERO)
                    .await
                    .expect("pull")
                    .len(),
                0
            );
            assert_eq!(q.stored().await.expect("stored"), 7);
        }
        // Unacked messages come back after a restart.
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("reopen");
        let mut c = q.consumer("default").expect("consumer");
        let again = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(
            again.iter().map(|d| d.received_ms).collect::<Vec<_>>(),
            vec![4, 5, 6, 7, 8, 9]
        );
        assert_eq!(c.depth().await.expect("depth"), Some(0));
    }

    #[tokio::test]
    async fn pull_wakes_on_push_and_respects_byte_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Embedded::open(dir.path(), SyncMode::Full)
            .await
            .expect("open");
        let mut c = q.consumer("default").expect("consumer");
        let q2 = q.clone();
        let pusher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            q2.push(&(0..5).map(|i| msg("default", i)).collect::<Vec<_>>())
                .await
        });
        let got = c.pull(100, 1, Duration::from_secs(5)).await.expect("pull");
        assert_eq!(got.len(), 1, "stops at the byte limit");
        pusher.await.expect("join").expect("push");
    }

    #[test]
    fn runs() {
        assert_eq!(
            contiguous_runs(&[5, 3, 4, 9, 10, 1, 4]),
            vec![(1, 1), (3, 5), (9, 10)]
        );
        assert!(contiguous_runs(&[]).is_empty());
    }

    #[tokio::test]
    async fn ids_never_go_back_after_the_table_empties() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("open");
        let mut c = q.consumer("default").expect("consumer");
        q.push(&[msg("default", 1)]).await.expect("push");
        let a = c.pull(10, usize::MAX, Duration::ZERO).await.expect("pull");
        c.ack(&[a[0].id]).await.expect("ack");
        q.push(&[msg("default", 2)]).await.expect("push");
        let b = c.pull(10, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(b.len(), 1);
        assert!(b[0].id > a[0].id);
    }
}
