//! Kept events the queue writer has no room for yet, held on local disk
//! instead of dropped.
//!
//! Why: the listener may never stall the bus (see [`super`]), so when the
//! queue writer falls behind, what it kept waits in the listener's part of
//! the memory budget. Measured on a 2-core master pushing a highstate of
//! 100-500 KB returns at 115-177 MB/s, the writer (a task and a blocking
//! thread that share those cores with the master) fell behind for seconds
//! at a time: 30-540 returns lost in 9 of 15 runs, a deficit of up to
//! ~90 MB that no sensible memory budget bridges (docs/BENCHMARKS.md).
//! Disk does: past the part's limit, the newest chunks not yet handed on
//! are appended to an overflow file (a `pwrite` per queue in it, into the page
//! cache: far cheaper than the queue's own write, which the reader must
//! not wait for), and read back, in order, when the writer has room.
//! Memory stays bounded; only past `source.overflow_limit` bytes on disk,
//! or when the disk refuses, are events dropped (counted, as before).
//!
//! The file is anonymous (`tempfile`: `O_TMPFILE` or created and unlinked
//! at once) in the queue's directory (the spool's with a broker): the
//! kernel frees it when saltpipe closes it or dies, so it can never be
//! left behind or read as stale. What it holds is not durable, exactly
//! like the memory backlog it extends: those events were never stored yet.
//! A new file is started each time the previous one has been read back
//! whole, so a long-running listener never keeps a large file open.
//!
//! Chunks are written in the queue's container format ([`pack`]), whose
//! decoder checks every length, so even a damaged file cannot make the
//! reader allocate or panic; a part that does not read back is counted as
//! lost.

use super::Chunk;
use crate::memory::Part;
use crate::queue::Message;
use crate::queue::pack::{self, Limits};
use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// One chunk in the overflow file: its containers (one per named queue in
/// it) and what it will be charged when read back.
#[derive(Debug)]
pub struct Spilled {
    /// (queue, offset, length) of each container.
    parts: Vec<(Arc<str>, u64, usize)>,
    /// Events in it.
    pub events: usize,
    /// Its bodies' bytes: the charge it had, and will have again.
    bytes: usize,
    /// Bytes it takes in the file.
    on_disk: u64,
}

/// Why the overflow file could not take or give back a chunk.
#[derive(Debug, thiserror::Error)]
pub enum OverflowError {
    #[error("the overflow file is full ({limit} bytes, source.overflow_limit)")]
    Full { limit: u64 },
    #[error("overflow file in {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overflow file: {0}")]
    Damaged(#[from] pack::PackError),
}

/// The listener's overflow file (see the module docs).
#[derive(Debug)]
pub struct Overflow {
    dir: PathBuf,
    limit: u64,
    /// The file of this episode: opened at the first spill, dropped (and
    /// so freed) once everything in it has been read back.
    file: Option<File>,
    /// Where the next chunk goes.
    end: u64,
    /// Bytes written and not read back yet.
    held: u64,
    /// This episode so far: events written, the most bytes held.
    episode: Episode,
    /// The last episode, once its file is read back whole, until taken.
    finished: Option<Episode>,
}

/// One stretch of the overflow file in use, from its first spill until it
/// has been read back whole: what the operator's log line reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Episode {
    pub events: usize,
    pub peak_bytes: u64,
    pub started: Option<std::time::Instant>,
}

/// Bytes an unprivileged writer may still use on the filesystem of `dir`,
/// if it can be read.
pub fn free_space(dir: &std::path::Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// No limit on a container: a spilled chunk is written whole, one
/// container per queue it holds (the queue writer packs again anyway).
const WHOLE: Limits = Limits {
    events: usize::MAX,
    bytes: usize::MAX,
};

impl Overflow {
    /// An overflow file in `dir` holding at most `limit` bytes.
    pub fn new(dir: PathBuf, limit: u64) -> Overflow {
        Overflow {
            dir,
            limit,
            file: None,
            end: 0,
            held: 0,
            episode: Episode::default(),
            finished: None,
        }
    }

    /// Compares the room left on the file's filesystem with the limit, at
    /// start: a limit the disk cannot hold only shows when a burst needs
    /// it, as drops. Logs a warning if it is short; returns the free bytes.
    pub fn check_room(&self) -> Option<u64> {
        let free = free_space(&self.dir)?;
        if free < self.limit {
            tracing::warn!(
                dir = %self.dir.display(),
                free_bytes = free,
                overflow_limit = self.limit,
                "the overflow file's disk has less room than source.overflow_limit: in a long burst, kept events may be dropped before the limit"
            );
        }
        Some(free)
    }

    /// Bytes on disk not read back yet.
    pub fn held(&self) -> u64 {
        self.held
    }

    fn io(&self, source: std::io::Error) -> OverflowError {
        OverflowError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Appends `chunk`'s events to the file. On an error nothing was added
    /// (a partial write is overwritten by the next one).
    pub fn spill(&mut self, chunk: &Chunk) -> Result<Spilled, OverflowError> {
        let containers = pack::pack(&chunk.messages, WHOLE);
        let size: usize = containers.iter().map(|c| c.data.len()).sum();
        let on_disk = size as u64;
        if self.held.saturating_add(on_disk) > self.limit {
            return Err(OverflowError::Full { limit: self.limit });
        }
        if self.file.is_none() {
            let file = tempfile::tempfile_in(&self.dir).map_err(|e| self.io(e))?;
            self.file = Some(file);
            self.end = 0;
            self.episode = Episode {
                started: Some(std::time::Instant::now()),
                ..Episode::default()
            };
        }
        // Each container straight from its encoding (one per queue in the
        // chunk, most often one): no copy into a buffer of its own.
        let mut parts = Vec::with_capacity(containers.len());
        let mut off = self.end;
        for c in containers {
            if let Some(file) = &self.file {
                file.write_all_at(&c.data, off).map_err(|e| self.io(e))?;
            }
            parts.push((c.queue, off, c.data.len()));
            off += c.data.len() as u64;
        }
        self.end = off;
        self.held += on_disk;
        self.episode.events += chunk.messages.len();
        self.episode.peak_bytes = self.episode.peak_bytes.max(self.held);
        Ok(Spilled {
            parts,
            events: chunk.messages.len(),
            bytes: chunk.charge.bytes(),
            on_disk,
        })
    }

    /// Reads a spilled chunk back, charged to `memory` as it was before.
    /// Its place in the file is given up whether or not it reads back.
    pub fn read_back(
        &mut self,
        spilled: Spilled,
        memory: &Arc<Part>,
    ) -> Result<Chunk, OverflowError> {
        self.held = self.held.saturating_sub(spilled.on_disk);
        let read = self.read_parts(&spilled);
        if self.held == 0 {
            // Everything is back: close (and so free) this file.
            self.file = None;
            self.end = 0;
            self.finished = Some(std::mem::take(&mut self.episode));
        }
        let messages = read?;
        Ok(Chunk {
            messages,
            charge: memory.charge(spilled.bytes),
        })
    }

    /// The episode that ended with the last read back, once.
    pub fn take_finished(&mut self) -> Option<Episode> {
        self.finished.take()
    }

    fn read_parts(&self, spilled: &Spilled) -> Result<Vec<Message>, OverflowError> {
        let Some(file) = &self.file else {
            return Err(self.io(std::io::Error::other("no overflow file is open")));
        };
        let mut messages = Vec::with_capacity(spilled.events);
        for (queue, off, len) in &spilled.parts {
            // Only lengths this process wrote, and below the file's end.
            if off.saturating_add(*len as u64) > self.end {
                return Err(self.io(std::io::Error::other("a part lies past the file's end")));
            }
            let mut buf = vec![0u8; *len];
            file.read_exact_at(&mut buf, *off).map_err(|e| self.io(e))?;
            for e in pack::unpack(&Bytes::from(buf))? {
                messages.push(Message {
                    queue: queue.clone(),
                    key: e.key,
                    body: e.body,
                    received_ms: e.received_ms,
                });
            }
        }
        Ok(messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Part;

    fn chunk(part: &Arc<Part>, queues: &[&str], first: usize) -> Chunk {
        let messages: Vec<Message> = queues
            .iter()
            .enumerate()
            .map(|(i, q)| Message {
                queue: Arc::from(*q),
                key: format!("minion{}", first + i),
                body: Bytes::from(format!("salt/job/{}/ret/m\n\n\u{80}", first + i)),
                received_ms: (first + i) as i64,
            })
            .collect();
        let bytes = messages.iter().map(|m| m.body.len()).sum();
        Chunk {
            messages,
            charge: part.charge(bytes),
        }
    }

    #[test]
    fn chunks_come_back_whole_in_each_queues_order_and_the_file_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let part = Part::standalone(1 << 20);
        let mut o = Overflow::new(dir.path().to_path_buf(), 1 << 20);
        let a = chunk(&part, &["default", "state", "default"], 0);
        let b = chunk(&part, &["default"; 4], 10);
        let (want_a, want_b) = (a.messages.clone(), b.messages.clone());
        let sa = o.spill(&a).unwrap();
        let sb = o.spill(&b).unwrap();
        let (sa_size, sb_size) = (sa.on_disk, sb.on_disk);
        drop((a, b));
        assert_eq!(part.used(), 0, "spilled chunks hold no memory");
        assert!(o.held() > 0);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(
            names.is_empty(),
            "the file has no name to leave behind: {names:?}"
        );

        let back = o.read_back(sa, &part).unwrap();
        // Grouped by queue, each queue in its order.
        let mut want = want_a.clone();
        want.sort_by(|x, y| x.queue.cmp(&y.queue));
        assert_eq!(back.messages, want);
        let charged: usize = want_a.iter().map(|m| m.body.len()).sum();
        assert_eq!(back.charge.bytes(), charged);
        assert_eq!(part.used(), charged, "read back, it is charged again");
        assert!(o.file.is_some(), "b is still in the file");

        assert_eq!(o.take_finished(), None, "not over while b is in the file");
        let back = o.read_back(sb, &part).unwrap();
        assert_eq!(back.messages, want_b);
        assert_eq!(o.held(), 0);
        assert!(o.file.is_none(), "the file is closed once empty");
        let episode = o.take_finished().expect("the episode is over");
        assert_eq!(episode.events, 7);
        assert_eq!(episode.peak_bytes, sa_size + sb_size);
        assert_eq!(o.take_finished(), None, "reported once");

        // The next spill starts a new file at offset 0.
        let c = chunk(&part, &["default"], 20);
        let sc = o.spill(&c).unwrap();
        assert_eq!(sc.parts[0].1, 0);
    }

    #[test]
    fn the_room_on_the_disk_is_read_and_a_missing_directory_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_space(dir.path()).expect("statvfs of a tempdir");
        assert!(free > 0);
        // A limit no disk holds: warned about, and the room is reported.
        let o = Overflow::new(dir.path().to_path_buf(), u64::MAX);
        assert!(o.check_room().is_some_and(|f| f > 0));
        let gone = Overflow::new(PathBuf::from("/nonexistent/saltpipe"), 1 << 20);
        assert_eq!(gone.check_room(), None);
    }

    #[test]
    fn past_the_limit_a_spill_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let part = Part::standalone(1 << 20);
        let a = chunk(&part, &["default"; 8], 0);
        let mut o = Overflow::new(dir.path().to_path_buf(), 100);
        assert!(matches!(
            o.spill(&a),
            Err(OverflowError::Full { limit: 100 })
        ));
        assert_eq!(o.held(), 0);
        assert!(o.file.is_none());
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let part = Part::standalone(1 << 20);
        let a = chunk(&part, &["default"], 0);
        let mut o = Overflow::new(PathBuf::from("/nonexistent/saltpipe-overflow"), 1 << 20);
        let e = o.spill(&a).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/saltpipe-overflow"),
            "{e}"
        );
    }

    #[test]
    fn a_damaged_file_reads_back_as_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let part = Part::standalone(1 << 20);
        let mut o = Overflow::new(dir.path().to_path_buf(), 1 << 20);
        let s = o.spill(&chunk(&part, &["default"; 3], 0)).unwrap();
        let f = o.file.as_ref().unwrap();
        f.write_all_at(&[0xc1; 16], 0).unwrap();
        assert!(matches!(
            o.read_back(s, &part),
            Err(OverflowError::Damaged(_))
        ));
        assert_eq!(
            part.used(),
            0,
            "nothing is charged for what did not come back"
        );
        assert!(o.file.is_none());
    }
}
