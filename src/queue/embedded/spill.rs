//! Large containers beside the database, in append-only *spill files*.
//!
//! Why: a container written into SQLite is copied into pages, written to
//! the WAL (a checksum per frame), read back by the checkpoint and written
//! again into the database file: every byte crosses the kernel three times
//! and user space three more. With 100-500 KB returns arriving at 100+ MB/s
//! in a highstate burst, that made the queue's one writer thread the
//! slowest part of the listener, and a burst lost events to overflow
//! (docs/SCALE.md). A container of at least [`SPILL_MIN`] bytes is
//! therefore appended to `spill-<n>.dat` with one `write(2)` and its row
//! holds only (file, offset, length); SQLite keeps the order, the
//! atomicity and the acks, as before. `benches/queue.rs` measures both
//! paths beside a bare `write(2)` of the same bytes.
//!
//! Order of writes: a container's bytes are appended (and, with
//! `sync = "full"`, fsynced) before the transaction holding its row
//! commits, so a committed row points at bytes written before it. With
//! `sync = "normal"` a power cut may keep a row whose bytes the OS had not
//! yet written: such a container reads back short or unreadable and is
//! handed on with the reason, for the worker to dead-letter (`normal` loses
//! the newest events in a power cut either way; a crash of saltpipe loses
//! nothing).
//!
//! Files are rotated past [`FILE_BYTES`], only between transactions, and
//! deleted once no row points into them and no writer holds them. Each
//! writer holds an advisory lock (`flock`) on the file it appends to for
//! as long as it may still commit rows into it, so a collector, in this
//! process or another (`saltpipe work` beside `saltpipe listen`), never
//! deletes a file that is being written; a file no row points into and
//! nobody holds can never gain a row again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Containers at least this large go to a spill file. Below it, the row
/// (and its b-tree page) costs about as much as the bytes, and SQLite's
/// inline blob is as cheap as a file.
pub const SPILL_MIN: usize = 64 << 10;

/// A spill file is closed and a new one started once it is this large
/// (at the next transaction): what one file may keep on disk after most of
/// it is acked.
pub const FILE_BYTES: u64 = 64 << 20;

/// Collections at most this often: each lists the directory.
const COLLECT_EVERY: Duration = Duration::from_millis(200);

fn name(number: u64) -> String {
    format!("spill-{number:010}.dat")
}

/// The number of a spill file's name, or None for any other file.
fn number_of(name: &str) -> Option<u64> {
    name.strip_prefix("spill-")?
        .strip_suffix(".dat")?
        .parse()
        .ok()
}

fn numbers(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        if let Some(n) = entry?.file_name().to_str().and_then(number_of) {
            out.push(n);
        }
    }
    Ok(out)
}

struct Current {
    number: u64,
    file: File,
    len: u64,
    /// Bytes appended since the last fsync.
    unsynced: bool,
}

/// One process's writer of spill files (and collector of spent ones).
pub struct Spill {
    dir: PathBuf,
    fsync: bool,
    current: Option<Current>,
    /// The highest number this writer used: numbers only go up while a
    /// process runs, even once the files below are all collected.
    last: u64,
    last_collect: Option<Instant>,
}

impl Spill {
    pub fn new(dir: &Path, fsync: bool) -> Spill {
        Spill {
            dir: dir.to_path_buf(),
            fsync,
            current: None,
            last: 0,
            last_collect: None,
        }
    }

    /// Called before a transaction's first append: a full file is left
    /// for a new one here, between transactions, so its lock is only
    /// dropped once every row pointing into it is committed.
    pub fn begin(&mut self) {
        if self.current.as_ref().is_some_and(|c| c.len >= FILE_BYTES) {
            self.current = None;
        }
    }

    /// Appends `data`; returns (file number, offset).
    pub fn append(&mut self, data: &[u8]) -> std::io::Result<(u64, u64)> {
        let cur = match self.current.take() {
            Some(cur) => cur,
            None => self.create()?,
        };
        let cur = self.current.insert(cur);
        let off = cur.len;
        if let Err(e) = cur.file.write_all(data) {
            // Part of it may be in the file: start the next container in a
            // new file rather than after bytes of unknown length.
            self.current = None;
            return Err(e);
        }
        cur.len += data.len() as u64;
        cur.unsynced = true;
        Ok((cur.number, off))
    }

    /// Before the transaction commits: with `sync = "full"`, the appended
    /// bytes reach the disk first.
    pub fn before_commit(&mut self) -> std::io::Result<()> {
        match &mut self.current {
            Some(cur) if self.fsync && cur.unsynced => {
                cur.file.sync_data()?;
                cur.unsynced = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A new file, numbered above every file in the directory, created,
    /// locked, and checked to still be the file at its name (a collector
    /// may have taken it between the create and the lock).
    fn create(&mut self) -> std::io::Result<Current> {
        loop {
            let number = numbers(&self.dir)?
                .into_iter()
                .max()
                .unwrap_or(0)
                .max(self.last)
                + 1;
            self.last = number;
            let path = self.dir.join(name(number));
            let file = match File::options()
                .append(true)
                .read(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => f,
                // Another writer took that number first.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            if file.try_lock().is_err() {
                continue;
            }
            match std::fs::metadata(&path) {
                Ok(m) if m.ino() == file.metadata()?.ino() => {}
                _ => continue,
            }
            if self.fsync {
                // The new name must survive a power cut with the rows.
                File::open(&self.dir)?.sync_all()?;
            }
            return Ok(Current {
                number,
                file,
                len: 0,
                unsynced: false,
            });
        }
    }

    /// Whether a collection is due: always when `now`, otherwise at most
    /// every [`COLLECT_EVERY`] (each lists the directory, and the caller
    /// asks the database first). Counts as the collection's start.
    pub fn due(&mut self, now: bool) -> bool {
        if !now
            && self
                .last_collect
                .is_some_and(|t| t.elapsed() < COLLECT_EVERY)
        {
            return false;
        }
        self.last_collect = Some(Instant::now());
        true
    }

    /// Deletes the spill files below `lowest_referenced` (the lowest file
    /// number any row points into; None when no row does) that no writer
    /// holds; returns how many it deleted.
    pub fn collect(&mut self, lowest_referenced: Option<u64>) -> std::io::Result<usize> {
        let own = self.current.as_ref().map(|c| c.number);
        let mut deleted = 0;
        for number in numbers(&self.dir)? {
            if Some(number) == own || lowest_referenced.is_some_and(|low| number >= low) {
                continue;
            }
            let path = self.dir.join(name(number));
            let Ok(file) = File::open(&path) else {
                continue;
            };
            // Held: a writer may still commit rows into it.
            if file.try_lock().is_err() {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }
}

/// Reads a spilled container back, checking its extent against the file
/// before allocating (the row is on disk: it is not trusted).
pub fn read(dir: &Path, number: i64, off: i64, len: i64) -> Result<Vec<u8>, String> {
    let (Ok(number), Ok(off), Ok(len)) = (
        u64::try_from(number),
        u64::try_from(off),
        usize::try_from(len),
    ) else {
        return Err(format!(
            "spill reference out of range (file {number}, offset {off}, length {len})"
        ));
    };
    let path = dir.join(name(number));
    let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if off.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(format!(
            "{}: {len} bytes at offset {off} run past its end ({size} bytes)",
            path.display()
        ));
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_and_rotation_waits_for_the_next_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spill::new(dir.path(), true);
        s.begin();
        let (a, off_a) = s.append(b"hello").expect("append");
        let (b, off_b) = s.append(b"world!").expect("append");
        s.before_commit().expect("fsync");
        assert_eq!((a, off_a, b, off_b), (1, 0, 1, 5));
        assert_eq!(read(dir.path(), 1, 5, 6).expect("read"), b"world!");
        // Past FILE_BYTES the next transaction starts a new file.
        s.current.as_mut().expect("current").len = FILE_BYTES;
        s.append(b"x").expect("append");
        assert_eq!(
            s.current.as_ref().map(|c| c.number),
            Some(1),
            "not mid-transaction"
        );
        s.begin();
        let (c, off_c) = s.append(b"next").expect("append");
        assert_eq!((c, off_c), (2, 0));
    }

    #[test]
    fn a_reference_past_the_end_or_to_a_missing_file_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spill::new(dir.path(), false);
        s.append(b"abc").expect("append");
        let past = read(dir.path(), 1, 2, i64::MAX).expect_err("past the end");
        assert!(past.contains("run past its end"), "{past}");
        assert!(read(dir.path(), 1, -1, 2).is_err());
        assert!(read(dir.path(), 7, 0, 1).is_err(), "missing file");
    }

    #[test]
    fn collect_keeps_referenced_and_held_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Files 1 and 2 from a writer that has gone (unlocked), 3 held by
        // another writer, 4 this one's.
        for n in [1, 2] {
            std::fs::write(dir.path().join(name(n)), b"x").expect("write");
        }
        let mut other = Spill::new(dir.path(), false);
        other.append(b"y").expect("append");
        let mut s = Spill::new(dir.path(), false);
        s.append(b"z").expect("append");
        assert_eq!(s.current.as_ref().map(|c| c.number), Some(4));
        std::fs::write(dir.path().join("queue.db"), b"").expect("other file");
        // Rows still point into file 2: only 1 goes.
        assert_eq!(s.collect(Some(2)).expect("collect"), 1);
        let mut left = numbers(dir.path()).expect("list");
        left.sort_unstable();
        assert_eq!(left, vec![2, 3, 4]);
        // No row points anywhere: 2 goes; 3 is held, 4 is ours.
        assert_eq!(s.collect(None).expect("collect"), 1);
        drop(other);
        assert_eq!(s.collect(None).expect("collect"), 1, "3 once released");
        assert_eq!(numbers(dir.path()).expect("list"), vec![4]);
        assert!(
            dir.path().join("queue.db").exists(),
            "other files untouched"
        );
    }
}
