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
//!
//! Spent files are recycled, as PostgreSQL recycles its WAL segments: a
//! writer keeps up to [`SPARE_FILES`] of the files it wrote once they are
//! spent (locked, so no collector takes them) and renames one to its next
//! number instead of creating a file. Writing over pages the page cache
//! already holds is a copy; a new file's pages must first be allocated,
//! and on a VM whose freed memory goes back to the host every new page is
//! a fault there too. With the SQLite sink growing its database beside
//! the queue during a burst, appends to new files ran at 454-584 MB/s and
//! to recycled ones at 1,527-1,760 (docs/BENCHMARKS.md). A recycled file
//! still holds its previous life's bytes past what was written since, so
//! each container starts with a [`HEADER`] naming the file number and
//! offset it was written at: a row whose bytes never reached the disk (a
//! power cut with `sync = "normal"`) reads back as unreadable, as before,
//! never as an older container that happens to sit at its offset.

use std::fs::File;
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

/// Spent files a writer keeps to write its next files over (up to
/// [`FILE_BYTES`] of disk and page cache each).
pub const SPARE_FILES: usize = 2;

/// What each container in a spill file starts with: [`MAGIC`], then the
/// file number and the offset it was written at (u64, little-endian).
/// Containers themselves start with a MessagePack array marker (0x90-0x9f,
/// 0xdc, 0xdd), never `S`, so those written before the header, without
/// one, still read back.
pub const HEADER: usize = 24;
const MAGIC: [u8; 8] = *b"SPILL\x00\x00\x01";

fn header(number: u64, off: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&MAGIC);
    h[8..16].copy_from_slice(&number.to_le_bytes());
    h[16..].copy_from_slice(&off.to_le_bytes());
    h
}

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
    /// Numbers of the files this writer wrote: the only ones it keeps as
    /// spares (a `saltpipe work` beside a `saltpipe listen` deletes the
    /// listener's files as before).
    made: Vec<u64>,
    /// Spent files kept to be written over, locked, with their numbers.
    spare: Vec<(u64, File)>,
}

impl Spill {
    pub fn new(dir: &Path, fsync: bool) -> Spill {
        Spill {
            dir: dir.to_path_buf(),
            fsync,
            current: None,
            last: 0,
            last_collect: None,
            made: Vec::new(),
            spare: Vec::new(),
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

    /// Appends `data` after its [`HEADER`]; returns (file number, offset,
    /// length), the extent a row points at.
    pub fn append(&mut self, data: &[u8]) -> std::io::Result<(u64, u64, u64)> {
        let cur = match self.current.take() {
            Some(cur) => cur,
            None => self.create()?,
        };
        let cur = self.current.insert(cur);
        let off = cur.len;
        // Positioned writes: a recycled file is written over from its start.
        let written = cur
            .file
            .write_all_at(&header(cur.number, off), off)
            .and_then(|()| cur.file.write_all_at(data, off + HEADER as u64));
        if let Err(e) = written {
            // Part of it may be in the file: start the next container in a
            // new file rather than after bytes of unknown length.
            self.current = None;
            return Err(e);
        }
        let len = (HEADER + data.len()) as u64;
        cur.len += len;
        cur.unsynced = true;
        Ok((cur.number, off, len))
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

    /// The next file, numbered above every file in the directory: a spare
    /// renamed, or a new file created and locked; checked to still be the
    /// file at its name (a collector may have taken a new one between the
    /// create and the lock).
    fn create(&mut self) -> std::io::Result<Current> {
        loop {
            let present = numbers(&self.dir)?;
            // Files below every file present were collected: forget them.
            if let Some(low) = present.iter().min() {
                self.made.retain(|n| n >= low);
            }
            let number = present.into_iter().max().unwrap_or(0).max(self.last) + 1;
            self.last = number;
            let path = self.dir.join(name(number));
            let file = match self.spare.pop() {
                Some((old, file)) => match self.rename(old, &path) {
                    Ok(()) => file,
                    // Another writer took that number first: the spare
                    // keeps its name for the next try.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        self.spare.push((old, file));
                        continue;
                    }
                    // Dropped (its lock with it): the collector deletes it.
                    Err(_) => continue,
                },
                None => match File::options()
                    .write(true)
                    .read(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(f) => f,
                    // Another writer took that number first.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                },
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
            self.made.push(number);
            return Ok(Current {
                number,
                file,
                len: 0,
                unsynced: false,
            });
        }
    }

    /// Gives spare `old` the name `to`, never over another file: a hard
    /// link (which fails if `to` exists), then the old name removed. A
    /// crash in between leaves a second name below every number in use,
    /// which the next collection deletes.
    fn rename(&self, old: u64, to: &Path) -> std::io::Result<()> {
        let from = self.dir.join(name(old));
        std::fs::hard_link(&from, to)?;
        std::fs::remove_file(&from)
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

    /// Collects the spill files below `lowest_referenced` (the lowest file
    /// number any row points into; None when no row does) that no writer
    /// holds: keeps those this writer wrote as spares, up to
    /// [`SPARE_FILES`], and deletes the rest; returns how many it deleted
    /// or kept.
    pub fn collect(&mut self, lowest_referenced: Option<u64>) -> std::io::Result<usize> {
        let own = self.current.as_ref().map(|c| c.number);
        let mut collected = 0;
        for number in numbers(&self.dir)? {
            if Some(number) == own || lowest_referenced.is_some_and(|low| number >= low) {
                continue;
            }
            let path = self.dir.join(name(number));
            // Writable if it can be: a spare is written over. Read-only
            // is enough to delete it (a file another user left, say). A
            // spare of ours is held, so it fails the lock below and stays.
            let (file, writable) = match File::options().read(true).write(true).open(&path) {
                Ok(f) => (f, true),
                Err(_) => match File::open(&path) {
                    Ok(f) => (f, false),
                    Err(_) => continue,
                },
            };
            // Held: a writer may still commit rows into it.
            if file.try_lock().is_err() {
                continue;
            }
            if writable && self.spare.len() < SPARE_FILES && self.made.contains(&number) {
                self.spare.push((number, file));
                collected += 1;
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => collected += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(collected)
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
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut head = [0u8; HEADER];
    if len >= HEADER {
        file.read_exact_at(&mut head, off).map_err(io)?;
    }
    if head[..8] != MAGIC {
        // Written before the header existed: the whole extent is the container.
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).map_err(io)?;
        return Ok(buf);
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let (was_number, was_off) = (word(8), word(16));
    if (was_number, was_off) != (number, off) {
        return Err(format!(
            "{}: the bytes at offset {off} are those written at offset {was_off} of file {was_number} \
             before the file was recycled: this container's own never reached the disk",
            path.display()
        ));
    }
    let mut buf = vec![0u8; len - HEADER];
    file.read_exact_at(&mut buf, off + HEADER as u64)
        .map_err(io)?;
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
        let (a, off_a, len_a) = s.append(b"hello").expect("append");
        let (b, off_b, len_b) = s.append(b"world!").expect("append");
        s.before_commit().expect("fsync");
        let h = HEADER as u64;
        assert_eq!((a, off_a, len_a), (1, 0, h + 5));
        assert_eq!((b, off_b, len_b), (1, h + 5, h + 6));
        let at = |o: u64, l: u64| read(dir.path(), 1, o as i64, l as i64);
        assert_eq!(at(off_b, len_b).expect("read"), b"world!");
        // Past FILE_BYTES the next transaction starts a new file.
        s.current.as_mut().expect("current").len = FILE_BYTES;
        s.append(b"x").expect("append");
        assert_eq!(
            s.current.as_ref().map(|c| c.number),
            Some(1),
            "not mid-transaction"
        );
        s.begin();
        let (c, off_c, _) = s.append(b"next").expect("append");
        assert_eq!((c, off_c), (2, 0));
    }

    #[test]
    fn a_spent_file_of_ours_is_written_over_under_the_next_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spill::new(dir.path(), false);
        let old = vec![7u8; 100_000];
        let (one, _, _) = s.append(&old).expect("append");
        let inode = |n: u64| {
            std::fs::metadata(dir.path().join(name(n)))
                .expect("file")
                .ino()
        };
        let first = inode(one);
        s.current.as_mut().expect("current").len = FILE_BYTES;
        s.begin();
        let (two, _, _) = s.append(b"in file two").expect("append");
        assert_eq!((one, two), (1, 2));
        // No row points below file 2: file 1 is spent, kept (not deleted).
        assert_eq!(s.collect(Some(2)).expect("collect"), 1);
        assert_eq!(numbers(dir.path()).expect("list").len(), 2);
        // The next file is file 1 renamed, written over from its start.
        s.current.as_mut().expect("current").len = FILE_BYTES;
        s.begin();
        let (three, off, len) = s.append(b"written over").expect("append");
        assert_eq!((three, off), (3, 0));
        assert_eq!(inode(3), first, "the same file, so the same pages");
        let mut left = numbers(dir.path()).expect("list");
        left.sort_unstable();
        assert_eq!(left, vec![2, 3]);
        assert_eq!(
            read(dir.path(), 3, off as i64, len as i64).expect("read"),
            b"written over"
        );
        // Another writer's spent files are never kept: only its own.
        let mut other = Spill::new(dir.path(), false);
        drop(s);
        assert_eq!(other.collect(None).expect("collect"), 2);
        assert!(numbers(dir.path()).expect("list").is_empty());
    }

    #[test]
    fn bytes_a_recycled_file_kept_from_before_never_read_as_this_rows_container() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spill::new(dir.path(), false);
        // A container at offset 0 of file 1, spent and recycled as file 3.
        let (_, _, len) = s.append(&[0x91u8; 1000]).expect("append");
        s.current.as_mut().expect("current").len = FILE_BYTES;
        s.begin();
        s.append(b"two").expect("append");
        s.collect(Some(2)).expect("collect");
        s.current.as_mut().expect("current").len = FILE_BYTES;
        s.begin();
        s.current = Some(s.create().expect("file three"));
        // A row pointing at file 3, offset 0, whose bytes never reached the
        // disk (a power cut): what is there is file 1's container.
        let e = read(dir.path(), 3, 0, len as i64).expect_err("stale");
        assert!(e.contains("offset 0 of file 1"), "{e}");
    }

    #[test]
    fn a_container_written_before_the_header_reads_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old: Vec<u8> = std::iter::once(0x92u8).chain(vec![5u8; 70_000]).collect();
        std::fs::write(dir.path().join(name(4)), [&b"xx"[..], &old].concat()).expect("write");
        assert_eq!(read(dir.path(), 4, 2, old.len() as i64).expect("read"), old);
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
