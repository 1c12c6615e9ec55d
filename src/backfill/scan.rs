//! The read-only walk of `<cachedir>/jobs`, turning each job into the bus
//! frames Salt would have published for it.
//!
//! Layout (Salt's `local_cache`): `jobs/<h[:2]>/<h[2:]>/` per jid, holding
//! `jid`, `.load.p`, `.minions.p`, `.minions.<syndic>.p`, `nocache`, and a
//! directory per minion with `return.p` (and `out.p`). Values are spliced
//! as raw MessagePack (never decoded into a tree), so a return of any shape
//! reaches the sink byte for byte as the master stored it.

use super::{BackfillError, JobCache, shown};
use crate::msgpack::{self, Item, Reader};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Which jobs a scan takes.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Only job directories modified at or after this time (a new minion
    /// directory updates its job directory's mtime, so a late return of an
    /// old job is still in the window). `None`: all.
    pub since: Option<SystemTime>,
    /// Only this jid.
    pub jid: Option<String>,
}

/// What one scan found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ScanCounts {
    /// Jobs whose `new` event was fed (salt-call jobs have none).
    pub jobs: u64,
    /// Returns fed.
    pub returns: u64,
    /// Being written (no `jid`/`.load.p` yet, a minion directory without
    /// `return.p`): skipped, for the next scan.
    pub skipped: u64,
    /// Files or directories that could not be read or decoded.
    pub unreadable: u64,
}

/// Reads one job cache.
#[derive(Debug, Clone)]
pub struct Scanner {
    cache: JobCache,
    /// Largest `.p` file read; bigger ones are counted unreadable.
    max_file: u64,
}

/// Largest `jid` file: a jid is 20 digits, `_<pid>` with unique_jid.
const MAX_JID_FILE: u64 = 256;

impl Scanner {
    pub fn new(cache: JobCache, max_file: u64) -> Scanner {
        Scanner { cache, max_file }
    }

    pub fn jobs_dir(&self) -> &Path {
        &self.cache.jobs_dir
    }

    /// Walks the cache, calling `emit` with each frame (`salt/job/<jid>/new`
    /// before that job's returns). `emit` returns false to stop early.
    /// Fails only if the `jobs` directory itself cannot be listed.
    pub fn scan(
        &self,
        window: &Window,
        emit: &mut dyn FnMut(Vec<u8>, Kind) -> bool,
    ) -> Result<ScanCounts, BackfillError> {
        let root = &self.cache.jobs_dir;
        let unreadable = |source| BackfillError::Unreadable {
            path: root.clone(),
            source,
        };
        let mut c = ScanCounts::default();
        let mut w = Walk {
            scanner: self,
            window,
            counts: &mut c,
            warned: false,
        };
        if let Some(jid) = &window.jid
            && let Some(dir) = self.cache.jid_dir(jid)
        {
            fs::metadata(root).map_err(unreadable)?;
            if dir.is_dir() {
                w.job(&dir, emit);
            }
            return Ok(c);
        }
        let top = fs::read_dir(root).map_err(unreadable)?;
        for bucket in top {
            let Ok(bucket) = bucket else {
                w.counts.unreadable += 1;
                continue;
            };
            if !bucket.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let jobs = match fs::read_dir(bucket.path()) {
                Ok(j) => j,
                Err(e) => {
                    w.unreadable(&bucket.path(), &e.to_string());
                    continue;
                }
            };
            for job in jobs {
                let Ok(job) = job else {
                    w.counts.unreadable += 1;
                    continue;
                };
                if job.file_type().is_ok_and(|t| t.is_dir()) && !w.job(&job.path(), emit) {
                    return Ok(c);
                }
            }
        }
        Ok(c)
    }
}

/// What a frame carries, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Job,
    Return,
}

struct Walk<'a> {
    scanner: &'a Scanner,
    window: &'a Window,
    counts: &'a mut ScanCounts,
    /// One clear warning per scan; the rest at debug, all counted.
    warned: bool,
}

/// A file read whole, with its mtime.
struct File {
    bytes: Vec<u8>,
    mtime: SystemTime,
}

enum Read {
    Ok(File),
    /// Not there (yet).
    Missing,
    Failed,
}

impl Walk<'_> {
    fn unreadable(&mut self, path: &Path, why: &str) {
        self.counts.unreadable += 1;
        if self.warned {
            tracing::debug!(path = %shown(path), error = why, "job cache: skipped an unreadable entry");
        } else {
            self.warned = true;
            tracing::warn!(path = %shown(path), error = why, "job cache: skipped an unreadable entry (more are logged at debug and counted in backfill_unreadable)");
        }
    }

    fn read(&mut self, path: &Path, limit: u64) -> Read {
        let mut f = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Missing,
            Err(e) => {
                self.unreadable(path, &e.to_string());
                return Read::Failed;
            }
        };
        let meta = match f.metadata() {
            Ok(m) => m,
            Err(e) => {
                self.unreadable(path, &e.to_string());
                return Read::Failed;
            }
        };
        if meta.len() > limit {
            self.unreadable(
                path,
                &format!("{} bytes, over the limit of {limit}", meta.len()),
            );
            return Read::Failed;
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // `take` keeps a file that grew after the stat within the limit.
        if let Err(e) = (&mut f).take(limit).read_to_end(&mut bytes) {
            self.unreadable(path, &e.to_string());
            return Read::Failed;
        }
        Read::Ok(File {
            bytes,
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }

    /// One job directory. Returns false if `emit` asked to stop.
    fn job(&mut self, dir: &Path, emit: &mut dyn FnMut(Vec<u8>, Kind) -> bool) -> bool {
        if let Some(since) = self.window.since {
            match fs::metadata(dir).and_then(|m| m.modified()) {
                Ok(t) if t >= since => {}
                Ok(_) => return true,
                Err(e) => {
                    self.unreadable(dir, &e.to_string());
                    return true;
                }
            }
        }
        // Salt stores no returns for a `nocache` job.
        if dir.join("nocache").exists() {
            return true;
        }
        let jid = match self.read(&dir.join("jid"), MAX_JID_FILE) {
            Read::Ok(f) => match String::from_utf8(f.bytes) {
                Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
                _ => {
                    self.unreadable(&dir.join("jid"), "not a jid");
                    return true;
                }
            },
            Read::Missing => {
                self.counts.skipped += 1;
                return true;
            }
            Read::Failed => return true,
        };
        if self.window.jid.as_ref().is_some_and(|j| *j != jid) {
            return true;
        }
        let max = self.scanner.max_file;
        let load = match self.read(&dir.join(".load.p"), max) {
            Read::Ok(f) => f,
            Read::Missing => {
                self.counts.skipped += 1;
                return true;
            }
            Read::Failed => return true,
        };
        let mut fields: Vec<(&[u8], &[u8])> = Vec::new();
        match msgpack::for_each_entry(&load.bytes, |k, v| fields.push((k, v))) {
            Ok(true) => {}
            _ => {
                self.unreadable(&dir.join(".load.p"), "not a MessagePack map");
                return true;
            }
        }
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == name.as_bytes())
                .map(|(_, v)| *v)
        };
        // A salt-call job: Salt saved the return itself as the load, and no
        // `new` was ever published.
        let salt_call = get("return").is_some() && get("id").is_some();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.unreadable(dir, &e.to_string());
                return true;
            }
        };
        let mut minion_files = Vec::new();
        let mut minion_dirs = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(".minions") && name.ends_with(".p") {
                minion_files.push(e.path());
            } else if !name.starts_with('.') && e.file_type().is_ok_and(|t| t.is_dir()) {
                minion_dirs.push(name.to_owned());
            }
        }
        if !salt_call {
            let minions = self.minions(&minion_files);
            let data = new_data(&jid, &get, &minions, load.mtime);
            let frame = crate::bus::encode::frame(&format!("salt/job/{jid}/new"), &data);
            self.counts.jobs += 1;
            if !emit(frame, Kind::Job) {
                return false;
            }
        }
        minion_dirs.sort_unstable();
        for minion in minion_dirs {
            let mdir = dir.join(&minion);
            let ret = match self.read(&mdir.join("return.p"), max) {
                Read::Ok(f) => f,
                Read::Missing => {
                    self.counts.skipped += 1;
                    continue;
                }
                Read::Failed => continue,
            };
            let out = match self.read(&mdir.join("out.p"), max) {
                Read::Ok(f) => Some(f.bytes),
                _ => None,
            };
            let Some(data) = ret_data(
                &jid,
                &minion,
                &fields,
                salt_call,
                &ret.bytes,
                out.as_deref(),
                ret.mtime,
            ) else {
                self.unreadable(&mdir.join("return.p"), "not MessagePack");
                continue;
            };
            let frame = crate::bus::encode::frame(&format!("salt/job/{jid}/ret/{minion}"), &data);
            self.counts.returns += 1;
            if !emit(frame, Kind::Return) {
                return false;
            }
        }
        true
    }

    /// The targeted minions: `.minions.p` merged with every syndic's list,
    /// sorted, as `local_cache.get_load` merges them.
    fn minions(&mut self, files: &[PathBuf]) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for f in files {
            let Read::Ok(file) = self.read(f, self.scanner.max_file) else {
                continue;
            };
            let mut r = Reader::new(&file.bytes);
            let Ok(Item::Array(n)) = r.item() else {
                continue;
            };
            for _ in 0..n {
                match r.skip() {
                    Ok(v) => {
                        if let Some(s) = msgpack::as_str(v) {
                            all.insert(s.to_owned());
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        all
    }
}

/// A MessagePack map written entry by entry.
struct MapBuf {
    body: Vec<u8>,
    n: u32,
}

impl MapBuf {
    fn new(capacity: usize) -> MapBuf {
        MapBuf {
            body: Vec::with_capacity(capacity),
            n: 0,
        }
    }

    fn raw(&mut self, key: &[u8], value: &[u8]) {
        // Writing into a Vec cannot fail.
        let _ = rmp::encode::write_str_len(&mut self.body, key.len() as u32);
        self.body.extend_from_slice(key);
        self.body.extend_from_slice(value);
        self.n += 1;
    }

    fn str(&mut self, key: &str, value: &str) {
        let mut v = Vec::with_capacity(value.len() + 5);
        let _ = rmp::encode::write_str(&mut v, value);
        self.raw(key.as_bytes(), &v);
    }

    fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 5);
        let _ = rmp::encode::write_map_len(&mut out, self.n);
        out.extend_from_slice(&self.body);
        out
    }
}

/// `_stamp` as Salt 3008 writes it (`2026-11-25T12:49:27.282661+00:00`).
pub fn stamp(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_micros(t).to_string();
    match s.strip_suffix('Z') {
        Some(s) => format!("{s}+00:00"),
        None => s,
    }
}

/// The data of `salt/job/<jid>/new`, in the bus's key order: the load's
/// jid, tgt_type, tgt, user, fun, arg, then minions and `_stamp`.
fn new_data<'a>(
    jid: &str,
    get: &dyn Fn(&str) -> Option<&'a [u8]>,
    minions: &BTreeSet<String>,
    mtime: SystemTime,
) -> Vec<u8> {
    let mut m = MapBuf::new(256);
    m.str("jid", jid);
    for k in ["tgt_type", "tgt", "user", "fun", "arg"] {
        if let Some(v) = get(k) {
            m.raw(k.as_bytes(), v);
        }
    }
    let mut list = Vec::new();
    let _ = rmp::encode::write_array_len(&mut list, minions.len() as u32);
    for id in minions {
        let _ = rmp::encode::write_str(&mut list, id);
    }
    m.raw(b"minions", &list);
    m.str("_stamp", &stamp(mtime));
    m.finish()
}

/// The data of `salt/job/<jid>/ret/<minion>`, in the bus's key order.
/// `None` if `return.p` is not MessagePack.
fn ret_data(
    jid: &str,
    minion: &str,
    load: &[(&[u8], &[u8])],
    salt_call: bool,
    ret: &[u8],
    out: Option<&[u8]>,
    mtime: SystemTime,
) -> Option<Vec<u8>> {
    if !matches!(msgpack::value_len(ret), msgpack::Scan::Complete(_)) {
        return None;
    }
    let mut m = MapBuf::new(ret.len() + 256);
    if salt_call {
        // The load is the return as the master received it.
        for (k, v) in load {
            if *k != b"_stamp" && *k != b"out" {
                m.raw(k, v);
            }
        }
    } else {
        let get = |name: &[u8]| load.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        // return.p is {"return", "retcode", "success"} (whichever the
        // minion sent); very old caches hold the bare return.
        let (mut r, mut retcode, mut success) = (None, None, None);
        let is_map = msgpack::for_each_entry(ret, |k, v| match k {
            b"return" => r = Some(v),
            b"retcode" => retcode = Some(v),
            b"success" => success = Some(v),
            _ => {}
        })
        .ok()?;
        if !is_map || r.is_none() {
            (r, retcode, success) = (Some(ret), None, None);
        }
        m.str("cmd", "_return");
        m.str("id", minion);
        if let Some(v) = success {
            m.raw(b"success", v);
        }
        if let Some(v) = r {
            m.raw(b"return", v);
        }
        if let Some(v) = retcode {
            m.raw(b"retcode", v);
        }
        m.str("jid", jid);
        if let Some(v) = get(b"fun") {
            m.raw(b"fun", v);
        }
        if let Some(v) = get(b"arg") {
            m.raw(b"fun_args", v);
        }
        if let Some(v) = get(b"user") {
            m.raw(b"user", v);
        }
    }
    if let Some(o) = out
        && matches!(msgpack::value_len(o), msgpack::Scan::Complete(_))
    {
        m.raw(b"out", o);
    }
    m.str("_stamp", &stamp(mtime));
    Some(m.finish())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Event, Kind as EvKind};
    use rmpv::Value as V;

    fn pack(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("pack");
        out
    }

    fn map(items: Vec<(&str, V)>) -> V {
        V::Map(items.into_iter().map(|(k, v)| (V::from(k), v)).collect())
    }

    /// Writes one job the way `local_cache` does.
    pub(crate) fn job(
        jobs: &Path,
        jid: &str,
        load: &V,
        minions: &[&str],
        rets: &[(&str, Option<V>)],
    ) {
        let jc = JobCache::at(jobs);
        let dir = jc.jid_dir(jid).expect("sha256");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("jid"), jid).expect("jid");
        fs::write(dir.join(".load.p"), pack(load)).expect("load");
        let list = V::Array(minions.iter().map(|m| V::from(*m)).collect());
        fs::write(dir.join(".minions.p"), pack(&list)).expect("minions");
        for (m, r) in rets {
            fs::create_dir_all(dir.join(m)).expect("mdir");
            if let Some(r) = r {
                fs::write(dir.join(m).join("return.p"), pack(r)).expect("ret");
            }
        }
    }

    fn collect(jobs: &Path, w: &Window) -> (ScanCounts, Vec<Event>) {
        let s = Scanner::new(JobCache::at(jobs), 1 << 20);
        let mut evs = Vec::new();
        let c = s
            .scan(w, &mut |f, _| {
                let body = {
                    let mut r = Reader::new(&f);
                    let _ = r.item();
                    let mut body = None;
                    for _ in 0..2 {
                        let k = r.skip().expect("k");
                        let v = r.skip().expect("v");
                        if msgpack::as_str(k) == Some("body")
                            && let Ok(Item::Bin(b)) = Reader::new(v).item()
                        {
                            body = Some(b.to_vec());
                        }
                    }
                    body.expect("body")
                };
                evs.push(Event::from_body(body.into()).expect("event"));
                true
            })
            .expect("scan");
        (c, evs)
    }

    pub(crate) fn load(jid: &str, fun: &str) -> V {
        map(vec![
            ("fun", V::from(fun)),
            ("arg", V::Array(vec![V::from("exit 3")])),
            ("tgt", V::from("*")),
            ("tgt_type", V::from("glob")),
            ("jid", V::from(jid)),
            ("user", V::from("root")),
            ("ret", V::from("")),
        ])
    }

    pub(crate) fn ret(retcode: i64, success: bool) -> V {
        map(vec![
            ("return", V::from("out")),
            ("retcode", V::from(retcode)),
            ("success", V::from(success)),
        ])
    }

    #[test]
    fn a_job_becomes_new_and_ret_events_and_half_written_dirs_are_skipped() {
        let d = tempfile::tempdir().expect("tmp");
        let jid = "20261202120000000001";
        job(
            d.path(),
            jid,
            &load(jid, "cmd.run"),
            &["m1", "m2", "m3"],
            &[("m1", Some(ret(3, false))), ("m2", None)],
        );
        let (c, evs) = collect(d.path(), &Window::default());
        assert_eq!(
            c,
            ScanCounts {
                jobs: 1,
                returns: 1,
                skipped: 1,
                unreadable: 0
            }
        );
        assert_eq!(evs[0].kind, EvKind::JobNew);
        assert_eq!(evs[0].tag(), format!("salt/job/{jid}/new"));
        let new = msgpack::to_json(evs[0].data(), usize::MAX).expect("json");
        assert!(new.starts_with(&format!("{{\"jid\": \"{jid}\", \"tgt_type\": \"glob\", \"tgt\": \"*\", \"user\": \"root\", \"fun\": \"cmd.run\", \"arg\": [\"exit 3\"], \"minions\": [\"m1\", \"m2\", \"m3\"], \"_stamp\": \"")), "{new}");
        assert!(new.ends_with("+00:00\"}"), "{new}");
        let r = &evs[1];
        assert_eq!(r.kind, EvKind::JobReturn);
        assert_eq!(r.fields.minion.as_deref(), Some("m1"));
        assert_eq!(r.fields.fun, vec!["cmd.run"]);
        assert_eq!(r.fields.success, Some(false));
        assert_eq!(r.fields.retcode, Some(3));
        assert!(!r.is_salt_call_return());
        let json = msgpack::to_json(r.data(), usize::MAX).expect("json");
        assert!(json.starts_with(&format!("{{\"cmd\": \"_return\", \"id\": \"m1\", \"success\": false, \"return\": \"out\", \"retcode\": 3, \"jid\": \"{jid}\", \"fun\": \"cmd.run\", \"fun_args\": [\"exit 3\"], \"user\": \"root\", \"_stamp\": ")), "{json}");

        // The minion finishes writing: the next scan finds it.
        let dir = JobCache::at(d.path()).jid_dir(jid).expect("dir");
        fs::write(dir.join("m2").join("return.p"), pack(&ret(0, true))).expect("w");
        let (c, _) = collect(d.path(), &Window::default());
        assert_eq!((c.returns, c.skipped), (2, 0));
    }

    #[test]
    fn window_by_mtime_and_by_jid() {
        let d = tempfile::tempdir().expect("tmp");
        for jid in ["20261202120000000001", "20261202120000000002"] {
            job(
                d.path(),
                jid,
                &load(jid, "test.ping"),
                &["m"],
                &[("m", Some(ret(0, true)))],
            );
        }
        let future = SystemTime::now() + std::time::Duration::from_secs(3600);
        let (c, _) = collect(
            d.path(),
            &Window {
                since: Some(future),
                jid: None,
            },
        );
        assert_eq!(c, ScanCounts::default(), "nothing modified in the future");
        let (c, evs) = collect(
            d.path(),
            &Window {
                since: None,
                jid: Some("20261202120000000002".into()),
            },
        );
        assert_eq!((c.jobs, c.returns), (1, 1));
        assert_eq!(evs[1].fields.jid.as_deref(), Some("20261202120000000002"));
    }

    #[test]
    fn salt_call_job_has_no_new_and_stays_a_salt_call_return() {
        let d = tempfile::tempdir().expect("tmp");
        let jid = "20261202120000000003";
        let l = map(vec![
            ("cmd", V::from("_return")),
            ("id", V::from("m")),
            ("fun", V::from("test.ping")),
            ("fun_args", V::Array(vec![])),
            ("return", V::from(true)),
            ("retcode", V::from(0)),
            ("jid", V::from(jid)),
            ("arg", V::Array(vec![])),
            ("tgt_type", V::from("glob")),
            ("tgt", V::from("m")),
        ]);
        let r = map(vec![("return", V::from(true)), ("retcode", V::from(0))]);
        job(d.path(), jid, &l, &[], &[("m", Some(r))]);
        let (c, evs) = collect(d.path(), &Window::default());
        assert_eq!((c.jobs, c.returns), (0, 1));
        assert!(evs[0].is_salt_call_return());
    }

    #[test]
    fn garbage_and_nocache_are_skipped_and_counted() {
        let d = tempfile::tempdir().expect("tmp");
        let jid = "20261202120000000004";
        job(
            d.path(),
            jid,
            &load(jid, "test.ping"),
            &["m"],
            &[("m", Some(ret(0, true)))],
        );
        let dir = JobCache::at(d.path()).jid_dir(jid).expect("dir");
        fs::write(dir.join("m").join("return.p"), [0xc1u8, 0xc1]).expect("w");
        let (c, _) = collect(d.path(), &Window::default());
        assert_eq!((c.jobs, c.returns, c.unreadable), (1, 0, 1));
        fs::write(dir.join("nocache"), b"").expect("w");
        let (c, _) = collect(d.path(), &Window::default());
        assert_eq!(c, ScanCounts::default());
    }

    #[test]
    fn a_missing_cache_is_an_error_not_a_panic() {
        let s = Scanner::new(JobCache::at("/nonexistent/saltpipe/jobs"), 1 << 20);
        let e = s
            .scan(&Window::default(), &mut |_, _| true)
            .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/saltpipe/jobs"), "{e}");
        assert!(!e.is_retriable());
    }

    #[test]
    fn stamp_is_salt_3008s() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_795_610_967_282_661);
        assert_eq!(stamp(t), "2026-11-25T12:49:27.282661+00:00");
    }
}
