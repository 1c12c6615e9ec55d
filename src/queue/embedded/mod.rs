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
//! Layout: one table, `containers(id, queue, events, data)`, with an index
//! on (queue, id). A row is a *container*: up to 256 consecutive events of
//! one named queue (about 512 KiB at most), in the format the brokers use
//! ([`super::pack`]). One row per event made the queue's own b-tree work
//! (an insert into the table and its index, a read, a delete into both) the
//! largest part of the listener's cost and a fifth of a full-speed replay's;
//! a container turns that into one insert and one delete per few hundred
//! events, and the queue's SQLite cost into little more than copying the
//! bytes. Ids come from AUTOINCREMENT so they never go back even when the
//! table empties, which lets a consumer keep a cursor. A consumer unpacks
//! containers in id order, hands their events out one by one, and deletes a
//! container once every event in it is acked ([`Ledger`]); containers not
//! wholly acked are read again after a restart, whole (the sinks' unique keys
//! make the repeats harmless).
//!
//! A container of 64 KiB or more (large returns, or a full container of
//! small ones) is not stored in its row but appended to a spill file
//! beside the database, its row pointing at it ([`spill`]): SQLite copied
//! each such byte six times (pages, WAL, checkpoint), which made this
//! queue the bottleneck of a highstate burst of 100-500 KB returns.
//!
//! A queue file from an older saltpipe, with one row per event in a
//! `messages` table, is converted to containers when it is opened (in
//! chunks, each one transaction), so nothing it holds is lost or doubled.
//!
//! Durability: WAL with `synchronous=NORMAL` (the default) survives a crash
//! or SIGKILL of saltpipe, since committed pages are in the OS's hands;
//! `sync = "full"` also survives a power cut, at an fsync per commit.
//!
//! One consumer per named queue per file, enforced with a lock file, since
//! two consumers with separate cursors would both deliver every row.

mod spill;

use super::pack::{self, Entry, LIMITS, Ledger};
use super::{Consumer, Delivery, Message, Producer, QueueError, SyncMode};
use crate::wal::Checkpointer;
use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use spill::Spill;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// How often a consumer looks for rows written by another process.
const POLL: Duration = Duration::from_millis(50);

/// `data` is empty when the container is in a spill file: `spill_file`,
/// `spill_off` and `spill_len` say where (NULL otherwise). The spill
/// columns come before `data` so that reading them never walks a large
/// blob's overflow pages (files made before spill files have them after,
/// added by [`add_spill_columns`]).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS containers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    events INTEGER NOT NULL,
    spill_file INTEGER,
    spill_off INTEGER,
    spill_len INTEGER,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS containers_queue_id ON containers(queue, id);
";

/// Lets the collector find the lowest spill file still pointed into
/// without a scan (created after [`add_spill_columns`]).
const SPILL_INDEX: &str = "CREATE INDEX IF NOT EXISTS containers_spill \
    ON containers(spill_file) WHERE spill_file IS NOT NULL";

/// Rows of an older `messages` table converted per transaction.
const CONVERT_CHUNK: i64 = 4096;

fn storage(e: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(e.to_string())
}

struct Inner {
    dir: PathBuf,
    db: PathBuf,
    sync: SyncMode,
    writer: Mutex<Writer>,
    /// Wakes consumers in this process when rows arrive.
    notify: Notify,
    /// Copies the writer's committed WAL pages into the file off its thread.
    checkpointer: Checkpointer,
}

/// The one writing connection of a process, and the spill file it appends to.
struct Writer {
    conn: Connection,
    spill: Spill,
}

impl Writer {
    /// Collects the spill files no row points into any more: deletes them,
    /// or keeps a few of this writer's own to write over ([`Spill::collect`]);
    /// rate-limited unless `now`. A failure only leaves files for the next
    /// time.
    fn collect(&mut self, now: bool) {
        // Checked before the query: most acks free no spill file.
        if !self.spill.due(now) {
            return;
        }
        let lowest = self.conn.query_row(
            "SELECT min(spill_file) FROM containers WHERE spill_file IS NOT NULL",
            [],
            |r| r.get::<_, Option<i64>>(0),
        );
        let result = lowest.map_err(|e| e.to_string()).and_then(|low| {
            // A negative number is no file of ours: collect below 0, i.e. nothing.
            let low = low.map(|n| u64::try_from(n).unwrap_or(0));
            self.spill.collect(low).map_err(|e| e.to_string())
        });
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                files = n,
                "collected spent spill files (deleted, or kept to be written over)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot delete spent spill files; will try again"),
        }
    }
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
    crate::wal::set_up(&c, sync.pragma()).map_err(storage)?;
    Ok(c)
}

/// Adds the spill columns (and their index) to a `containers` table made
/// before spill files.
fn add_spill_columns(c: &Connection) -> rusqlite::Result<()> {
    let has: i64 = c.query_row(
        "SELECT count(*) FROM pragma_table_info('containers') WHERE name = 'spill_file'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        c.execute_batch(
            "ALTER TABLE containers ADD COLUMN spill_file INTEGER; \
             ALTER TABLE containers ADD COLUMN spill_off INTEGER; \
             ALTER TABLE containers ADD COLUMN spill_len INTEGER;",
        )?;
    }
    c.execute_batch(SPILL_INDEX)
}

/// Why a push could not be stored.
#[derive(Debug, thiserror::Error)]
enum InsertError {
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot write a spill file: {0}")]
    Spill(#[from] std::io::Error),
}

/// Stores `batch` as containers, each queue's events in their order, the
/// large ones in `spill`'s file; returns the bytes that went into SQLite
/// itself (for the checkpointer).
fn insert_containers(
    tx: &rusqlite::Transaction<'_>,
    spill: &mut Spill,
    batch: &[Message],
) -> Result<usize, InsertError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO containers (queue, events, spill_file, spill_off, spill_len, data) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut inline = 0;
    spill.begin();
    for c in pack::pack(batch, LIMITS) {
        // (file, offset, length) in a spill file, or None with the bytes in the row.
        let spilled = if c.data.len() >= spill::SPILL_MIN {
            Some(spill.append(&c.data)?)
        } else {
            None
        };
        let data: &[u8] = if spilled.is_some() { &[] } else { &c.data };
        st.execute(params![
            &*c.queue,
            c.events as i64,
            spilled.map(|(file, _, _)| file as i64),
            spilled.map(|(_, off, _)| off as i64),
            spilled.map(|(_, _, len)| len as i64),
            data
        ])?;
        // A spilled container's row is a few dozen bytes.
        inline += if spilled.is_some() { 64 } else { data.len() };
    }
    spill.before_commit()?;
    Ok(inline)
}

/// Converts what an older saltpipe left in `messages` (one row per event)
/// into containers, a chunk per transaction: a crash in between leaves
/// every event in exactly one of the two tables.
fn convert_old_rows(c: &mut Connection, spill: &mut Spill) -> Result<u64, InsertError> {
    let exists: Option<String> = c
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(0);
    }
    let mut moved = 0u64;
    loop {
        let tx = c.transaction()?;
        let (batch, last) = {
            let mut st = tx.prepare(
                "SELECT id, queue, key, received_ms, body FROM messages ORDER BY id LIMIT ?1",
            )?;
            let mut rows = st.query(params![CONVERT_CHUNK])?;
            let mut batch = Vec::new();
            let mut last = 0i64;
            while let Some(r) = rows.next()? {
                last = r.get(0)?;
                let queue: String = r.get(1)?;
                batch.push(Message {
                    queue: Arc::from(queue),
                    key: r.get(2)?,
                    received_ms: r.get(3)?,
                    body: Bytes::from(r.get::<_, Vec<u8>>(4)?),
                });
            }
            (batch, last)
        };
        if batch.is_empty() {
            tx.execute_batch("DROP TABLE messages")?;
            tx.commit()?;
            return Ok(moved);
        }
        insert_containers(&tx, spill, &batch)?;
        tx.execute("DELETE FROM messages WHERE id <= ?1", params![last])?;
        tx.commit()?;
        moved += batch.len() as u64;
    }
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
        // switches to WAL, creates the table or converts old rows: wait for
        // it, briefly.
        let started = std::time::Instant::now();
        let writer = loop {
            let attempt = open_connection(&db, sync).and_then(|mut c| {
                c.execute_batch(SCHEMA).map_err(storage)?;
                add_spill_columns(&c).map_err(storage)?;
                let mut spill = Spill::new(&key, sync == SyncMode::Full);
                let moved = convert_old_rows(&mut c, &mut spill).map_err(storage)?;
                if moved > 0 {
                    tracing::info!(queue = %db.display(), events = moved, "converted an older queue file's events into containers");
                }
                Ok(Writer { conn: c, spill })
            });
            match attempt {
                Err(QueueError::Storage(m))
                    if m.contains("locked") && started.elapsed() < Duration::from_secs(30) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => break other?,
            }
        };
        let checkpointer = Checkpointer::start(&db, &writer.conn).map_err(storage)?;
        // What an earlier run left behind: files whose rows are all acked.
        let mut writer = writer;
        writer.collect(true);
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
            ledger: Ledger::default(),
            spilled: Default::default(),
            shared: self.clone(),
            _lock: lock,
        })
    }

    /// Events in every queue (handed out or not): for status and tests.
    pub async fn stored(&self) -> Result<u64, QueueError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let w = inner.writer.lock().map_err(storage)?;
            w.conn
                .query_row("SELECT coalesce(sum(events), 0) FROM containers", [], |r| {
                    r.get::<_, i64>(0)
                })
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
            let mut guard = inner.writer.lock().map_err(storage)?;
            let w = &mut *guard;
            let tx = w.conn.transaction().map_err(storage)?;
            let inline = insert_containers(&tx, &mut w.spill, &batch).map_err(storage)?;
            tx.commit().map_err(storage)?;
            inner.checkpointer.nudge(inline);
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
    /// Highest container id read; rows above it are new to us.
    cursor: i64,
    /// Containers read and not yet deleted, and their events not yet
    /// handed out. Delivery ids are the ledger's, local to this consumer.
    ledger: Ledger<i64>,
    /// Containers read that are in spill files: acking one may free a file.
    spilled: std::collections::HashSet<i64>,
    shared: Embedded,
    _lock: std::fs::File,
}

/// Containers read in one go: the row id, whether it was in a spill file,
/// and its events.
type Fetched = Vec<(i64, bool, Vec<Entry>)>;

impl EmbeddedConsumer {
    /// Reads containers after the cursor until they hold `events` events
    /// or `max_bytes` bytes (at least one container, if there is one).
    async fn fetch(&self, events: usize, max_bytes: usize) -> Result<Fetched, QueueError> {
        let conn = self.conn.clone();
        let queue = self.queue.clone();
        let cursor = self.cursor;
        let dir = self.shared.inner.dir.clone();
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().map_err(storage)?;
            let mut st = c
                .prepare_cached(
                    "SELECT id, data, spill_file, spill_off, spill_len FROM containers \
                     WHERE queue = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )
                .map_err(storage)?;
            let mut rows = st
                .query(params![&*queue, cursor, events.max(1) as i64])
                .map_err(storage)?;
            let mut out = Vec::new();
            let (mut got, mut bytes) = (0usize, 0usize);
            while let Some(r) = rows.next().map_err(storage)? {
                let id: i64 = r.get(0).map_err(storage)?;
                let at = |i| r.get::<_, Option<i64>>(i).map_err(storage);
                let spilled = match (at(2)?, at(3)?, at(4)?) {
                    (Some(f), Some(o), Some(l)) => Some((f, o, l)),
                    _ => None,
                };
                let data = match spilled {
                    None => Bytes::from(r.get::<_, Vec<u8>>(1).map_err(storage)?),
                    Some((file, off, len)) => match spill::read(&dir, file, off, len) {
                        Ok(bytes) => Bytes::from(bytes),
                        // Lost to a power cut with `sync = "normal"`, or
                        // removed by hand: handed on as what it is, for
                        // the worker to dead-letter with this reason
                        // (it does not unpack, see below).
                        Err(e) => {
                            crate::log_limited!(error, queue = %queue, container = id, error = %e, "a queued container's spill file cannot be read; its events go to the dead letters");
                            Bytes::from(format!("saltpipe: unreadable queue container {id}: {e}"))
                        }
                    },
                };
                bytes += data.len();
                // Only our own producer writes here, but the file is on
                // disk: a row that does not unpack is handed on whole, for
                // the worker to dead-letter, instead of stopping the queue.
                let entries = pack::entries(true, data, raw_entry, &queue);
                got += entries.len();
                out.push((id, spilled.is_some(), entries));
                if got >= events || bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .map_err(storage)?
    }
}

/// Never called: every row is a container (see [`pack::entries`]).
fn raw_entry(body: Bytes) -> Entry {
    Entry {
        key: String::new(),
        received_ms: 0,
        body,
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    /// Everything the listener took is in the file before a drain starts
    /// (the pipeline stops the source, flushes the listener, and only then
    /// tells the workers), and a pull reads the file: no wait is needed to
    /// know it is empty. A `listen` in another process may still add
    /// events; they stay queued for the next start, as after any stop.
    fn drain_wait(&self) -> Duration {
        Duration::ZERO
    }

    async fn pull(
        &mut self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let (max, max_bytes) = (max.max(1), max_bytes.max(1));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Read more only while nothing is handed out yet: a pull dropped
            // at an await (the worker's shutdown select does that) must not
            // take events out of the ledger with it.
            let (ready, ready_bytes) = self.ledger.buffered();
            let notified = self.shared.inner.notify.notified();
            if Ledger::<i64>::room(ready, ready_bytes, max, max_bytes) {
                // Interest registered before looking, so a push in between still wakes us.
                let fetched = self
                    .fetch(max - ready, max_bytes.saturating_sub(ready_bytes).max(1))
                    .await?;
                if let Some((last, _, _)) = fetched.last() {
                    self.cursor = *last;
                }
                for (id, spilled, entries) in fetched {
                    if spilled {
                        self.spilled.insert(id);
                    }
                    self.ledger.take(id, entries);
                }
            }
            let mut out = Vec::new();
            self.ledger.hand_out(&mut out, &mut 0, max, max_bytes);
            if !out.is_empty() {
                return Ok(out);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            let nap = (deadline - now).min(POLL);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn ack(&mut self, ids: &[u64]) -> Result<(), QueueError> {
        self.ledger.mark(ids);
        let done: Vec<(u64, i64)> = self.ledger.complete().map(|(f, &row)| (f, row)).collect();
        if done.is_empty() {
            return Ok(());
        }
        // Deletes go through the producer's connection: SQLite allows one
        // writer at a time, and two connections of one process contending
        // for it would sleep in the busy handler instead of queueing here.
        let inner = self.shared.inner.clone();
        let queue = self.queue.clone();
        let runs = contiguous_runs(&done.iter().map(|&(_, row)| row as u64).collect::<Vec<_>>());
        // Deleting a spilled container may leave its file with no row: look
        // at once (otherwise only now and then, for files of other writers).
        let freed_spill = done
            .iter()
            .filter(|&&(_, row)| self.spilled.remove(&row))
            .count()
            > 0;
        tokio::task::spawn_blocking(move || {
            let mut c = inner.writer.lock().map_err(storage)?;
            let tx = c.conn.transaction().map_err(storage)?;
            {
                // Containers are acked in order, so this is usually one range.
                let mut st = tx
                    .prepare_cached(
                        "DELETE FROM containers WHERE id BETWEEN ?1 AND ?2 AND queue = ?3",
                    )
                    .map_err(storage)?;
                for (lo, hi) in runs {
                    st.execute(params![lo as i64, hi as i64, &*queue])
                        .map_err(storage)?;
                }
            }
            tx.commit().map_err(storage)?;
            // A delete frees the container's pages (no rewrite) and edits a
            // leaf or two: count a page per container.
            inner.checkpointer.nudge(16 << 10);
            c.collect(freed_spill);
            Ok::<(), QueueError>(())
        })
        .await
        .map_err(storage)??;
        // Only now: a failed delete leaves them complete, for the next ack.
        self.ledger
            .forget(&done.iter().map(|&(f, _)| f).collect::<Vec<_>>());
        Ok(())
    }

    async fn depth(&mut self) -> Result<Option<u64>, QueueError> {
        let conn = self.conn.clone();
        let queue = self.queue.clone();
        let cursor = self.cursor;
        let buffered = self.ledger.buffered().0 as u64;
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().map_err(storage)?;
            c.query_row(
                "SELECT coalesce(sum(events), 0) FROM containers WHERE queue = ?1 AND id > ?2",
                params![&*queue, cursor],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| Some(n as u64 + buffered))
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

    fn seqs(got: &[Delivery]) -> Vec<i64> {
        got.iter().map(|d| d.received_ms).collect()
    }

    fn ids(got: &[Delivery]) -> Vec<u64> {
        got.iter().map(|d| d.id).collect()
    }

    fn rows(dir: &Path) -> i64 {
        let c = Connection::open(dir.join("queue.db")).expect("open");
        c.query_row("SELECT count(*) FROM containers", [], |r| r.get(0))
            .expect("count")
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
            q.push(&(10..13).map(|i| msg("default", i)).collect::<Vec<_>>())
                .await
                .expect("push");
            let mut c = q.consumer("default").expect("consumer");
            assert!(
                q.consumer("default").is_err(),
                "second consumer of one queue is refused"
            );
            let a = c.pull(4, usize::MAX, Duration::ZERO).await.expect("pull");
            assert_eq!(seqs(&a), vec![0, 1, 2, 3]);
            let b = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
            assert_eq!(
                seqs(&b),
                vec![4, 5, 6, 7, 8, 9, 10, 11, 12],
                "in order; the other queue's message is not delivered here"
            );
            assert_eq!(c.depth().await.expect("depth"), Some(0));
            // The first container partly acked, the second wholly: only the
            // second is gone.
            c.ack(&ids(&a)).await.expect("ack");
            c.ack(&ids(&b[6..])).await.expect("ack");
            assert_eq!(rows(dir.path()), 2);
            assert_eq!(q.stored().await.expect("stored"), 11);
            assert!(
                c.pull(100, usize::MAX, Duration::ZERO)
                    .await
                    .expect("pull")
                    .is_empty()
            );
        }
        // A container not wholly acked comes back whole after a restart.
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("reopen");
        let mut c = q.consumer("default").expect("consumer");
        let again = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(seqs(&again), (0..10).collect::<Vec<i64>>());
        c.ack(&ids(&again)).await.expect("ack");
        assert_eq!(q.stored().await.expect("stored"), 1, "the other queue's");
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
        let rest = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(seqs(&rest), vec![1, 2, 3, 4], "the rest of the container");
    }

    #[tokio::test]
    async fn a_push_to_several_queues_makes_one_container_per_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("open");
        let batch: Vec<Message> = (0..40)
            .map(|i| msg(if i % 2 == 0 { "a" } else { "b" }, i))
            .collect();
        q.push(&batch).await.expect("push");
        assert_eq!(rows(dir.path()), 2, "alternating routes are grouped");
        for (queue, first) in [("a", 0), ("b", 1)] {
            let mut c = q.consumer(queue).expect("consumer");
            let got = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
            assert_eq!(
                seqs(&got),
                (0..20).map(|i| first + 2 * i).collect::<Vec<i64>>(),
                "queue {queue} in its order"
            );
        }
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
    async fn rows_pushed_after_the_table_empties_are_read() {
        // Row ids must not start over when the table empties, or the
        // consumer's cursor would skip the new rows.
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("open");
        let mut c = q.consumer("default").expect("consumer");
        q.push(&[msg("default", 1)]).await.expect("push");
        let a = c.pull(10, usize::MAX, Duration::ZERO).await.expect("pull");
        c.ack(&ids(&a)).await.expect("ack");
        assert_eq!(rows(dir.path()), 0);
        q.push(&[msg("default", 2)]).await.expect("push");
        let b = c.pull(10, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(seqs(&b), vec![2]);
    }

    #[tokio::test]
    async fn an_older_queue_file_is_converted_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // What saltpipe before containers left: a row per event.
            let c = Connection::open(dir.path().join("queue.db")).expect("open");
            c.execute_batch(
                "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, \
                 key TEXT NOT NULL, received_ms INTEGER NOT NULL, body BLOB NOT NULL); \
                 CREATE INDEX messages_queue_id ON messages(queue, id);",
            )
            .expect("old schema");
            for i in 0..5000usize {
                let m = msg(if i % 10 == 0 { "state" } else { "default" }, i);
                c.execute(
                    "INSERT INTO messages (queue, key, received_ms, body) VALUES (?1, ?2, ?3, ?4)",
                    params![&*m.queue, m.key, m.received_ms, &m.body[..]],
                )
                .expect("old row");
            }
        }
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("open");
        assert_eq!(q.stored().await.expect("stored"), 5000);
        let mut c = q.consumer("default").expect("consumer");
        let mut got = Vec::new();
        loop {
            let part = c
                .pull(1000, usize::MAX, Duration::ZERO)
                .await
                .expect("pull");
            if part.is_empty() {
                break;
            }
            got.extend(part);
        }
        let want: Vec<i64> = (0..5000).filter(|i| i % 10 != 0).collect();
        assert_eq!(seqs(&got), want, "every old event once, in order");
        assert_eq!(got[1].key, "m2");
        assert_eq!(got[1].body, msg("default", 2).body);
        let table: Option<String> = Connection::open(dir.path().join("queue.db"))
            .expect("open")
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'messages'",
                [],
                |r| r.get(0),
            )
            .optional()
            .expect("query");
        assert_eq!(table, None, "the old table is gone once empty");
    }

    fn big(i: usize, size: usize) -> Message {
        let mut body = format!("salt/job/{i}/ret/m\n\n").into_bytes();
        body.resize(size, (i % 251) as u8);
        Message {
            queue: Arc::from("default"),
            key: format!("m{i}"),
            body: Bytes::from(body),
            received_ms: i as i64,
        }
    }

    fn spill_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("list")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("spill-"))
            })
            .count()
    }

    /// (spilled containers, of which with an empty `data`, inline ones)
    fn placement(dir: &Path) -> (i64, i64, i64) {
        let c = Connection::open(dir.join("queue.db")).expect("open");
        c.query_row(
            "SELECT count(spill_file), sum(spill_file IS NOT NULL AND length(data) = 0), \
             count(*) - count(spill_file) FROM containers",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, Option<i64>>(1)?.unwrap_or(0),
                    r.get(2)?,
                ))
            },
        )
        .expect("placement")
    }

    #[tokio::test]
    async fn large_containers_go_to_a_spill_file_which_goes_once_every_row_is_acked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batch: Vec<Message> = (0..6).map(|i| big(i, 200 << 10)).collect();
        {
            let q = Embedded::open(dir.path(), SyncMode::Full)
                .await
                .expect("open");
            q.push(&batch).await.expect("push");
            q.push(&[msg("default", 100)]).await.expect("push small");
            // Two 200 KiB events a container (512 KiB at most), each in the
            // spill file; the small one in its row.
            assert_eq!(placement(dir.path()), (3, 3, 1));
            assert_eq!(spill_files(dir.path()), 1);
            let mut c = q.consumer("default").expect("consumer");
            let got = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
            assert_eq!(seqs(&got), vec![0, 1, 2, 3, 4, 5, 100]);
            for (d, m) in got.iter().zip(&batch) {
                assert_eq!(d.body, m.body, "event {} read back whole", m.received_ms);
                assert_eq!(d.key, m.key);
            }
            c.ack(&ids(&got)).await.expect("ack");
            assert_eq!(rows(dir.path()), 0);
            assert_eq!(
                spill_files(dir.path()),
                1,
                "the writer's own file stays while it may append to it"
            );
        }
        // Released with the queue: the next open deletes it.
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("reopen");
        assert_eq!(spill_files(dir.path()), 0);
        q.push(&batch[..2]).await.expect("push");
        assert_eq!(spill_files(dir.path()), 1, "a new file for new containers");
    }

    #[tokio::test]
    async fn spilled_containers_not_acked_come_back_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batch: Vec<Message> = (0..4).map(|i| big(i, 300 << 10)).collect();
        {
            let q = Embedded::open(dir.path(), SyncMode::Normal)
                .await
                .expect("open");
            q.push(&batch).await.expect("push");
            let mut c = q.consumer("default").expect("consumer");
            let got = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
            c.ack(&ids(&got[..2])).await.expect("ack half");
        }
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("reopen");
        assert_eq!(spill_files(dir.path()), 1, "still pointed into");
        let mut c = q.consumer("default").expect("consumer");
        let again = c.pull(100, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(seqs(&again), vec![2, 3]);
        assert_eq!(again[1].body, batch[3].body);
        c.ack(&ids(&again)).await.expect("ack");
        assert_eq!(
            spill_files(dir.path()),
            0,
            "the old file, no longer pointed into and held by no one"
        );
    }

    #[tokio::test]
    async fn a_spill_file_gone_missing_is_handed_on_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("open");
        q.push(&[big(0, 100 << 10)]).await.expect("push");
        q.push(&[msg("default", 1)]).await.expect("push");
        for e in std::fs::read_dir(dir.path()).expect("list") {
            let p = e.expect("entry").path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("spill-"))
            {
                std::fs::remove_file(p).expect("remove");
            }
        }
        let mut c = q.consumer("default").expect("consumer");
        let got = c.pull(10, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(got.len(), 2, "the lost container and the next event");
        let text = String::from_utf8_lossy(&got[0].body);
        assert!(text.contains("unreadable queue container"), "{text}");
        assert_eq!(got[1].body, msg("default", 1).body);
        c.ack(&ids(&got)).await.expect("ack");
        assert_eq!(rows(dir.path()), 0);
    }

    #[tokio::test]
    async fn a_container_table_from_before_spill_files_is_read_and_extended() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = Connection::open(dir.path().join("queue.db")).expect("open");
            c.execute_batch(
                "CREATE TABLE containers (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                 queue TEXT NOT NULL, events INTEGER NOT NULL, data BLOB NOT NULL); \
                 CREATE INDEX containers_queue_id ON containers(queue, id);",
            )
            .expect("old schema");
            for p in pack::pack(&[big(0, 100 << 10), msg("default", 1)], LIMITS) {
                c.execute(
                    "INSERT INTO containers (queue, events, data) VALUES (?1, ?2, ?3)",
                    params![&*p.queue, p.events as i64, p.data],
                )
                .expect("old row");
            }
        }
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("open");
        q.push(&[big(2, 100 << 10)]).await.expect("push");
        assert_eq!(
            placement(dir.path()),
            (1, 1, 1),
            "old row inline, new one spilled"
        );
        let mut c = q.consumer("default").expect("consumer");
        let got = c.pull(10, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(seqs(&got), vec![0, 1, 2]);
        assert_eq!(got[0].body, big(0, 100 << 10).body);
        assert_eq!(got[2].body, big(2, 100 << 10).body);
    }

    #[tokio::test]
    async fn a_row_that_does_not_unpack_is_handed_on_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Embedded::open(dir.path(), SyncMode::Normal)
            .await
            .expect("open");
        q.push(&[msg("default", 0)]).await.expect("push");
        let garbage = b"\x92\x93\xa1m\x04".to_vec();
        Connection::open(dir.path().join("queue.db"))
            .expect("open")
            .execute(
                "INSERT INTO containers (queue, events, data) VALUES ('default', 1, ?1)",
                params![garbage],
            )
            .expect("insert");
        q.push(&[msg("default", 2)]).await.expect("push");
        let mut c = q.consumer("default").expect("consumer");
        let got = c.pull(10, usize::MAX, Duration::ZERO).await.expect("pull");
        assert_eq!(seqs(&got), vec![0, 0, 2]);
        assert_eq!(
            &got[1].body[..],
            &garbage[..],
            "the raw bytes, for the dead letters"
        );
        c.ack(&ids(&got)).await.expect("ack");
        assert_eq!(q.stored().await.expect("stored"), 0, "all of it acked");
    }
}
