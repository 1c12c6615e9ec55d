//! The salt-master's own configuration: where its bus, job cache and name
//! are, so `saltpipe run` needs no config of its own on a master whose
//! `/etc/salt/master` moved them.
//!
//! Why here and once: the bus reader (`sock_dir`, `ipc_mode`,
//! `tcp_master_pub_port`), the backfill (`cachedir`, `hash_type`,
//! `job_cache`) and the sink (`id`, written as `salt_events.master_id`)
//! all need the same few keys, and each must agree with what the master
//! itself uses, including its `root_dir` prefix and the files it includes.
//! saltpipe's own config (or `SALTPIPE_*` environment) wins over anything
//! read here; [`MasterOpts::taken`] says what was taken, for `validate`.
//!
//! Written by hand: no YAML crate is in this project's dependency set, and
//! saltpipe needs a handful of top-level scalars, which Salt's own config
//! always writes as `key: value` at column 0. Anything else (nested maps,
//! flow style, Jinja) is ignored; a key saltpipe cannot read keeps Salt's
//! default. Files are read as Salt reads them: the main file, then
//! `default_include` (`master.d/*.conf` by default, relative to the main
//! file's directory), then `include` (a string or a `- item` list), later
//! files overriding earlier ones. Nested includes are not followed.

use crate::source::BusAddress;
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Salt's default master config file.
pub const DEFAULT_PATH: &str = "/etc/salt/master";
/// Salt's default `cachedir` on a master.
pub const DEFAULT_CACHEDIR: &str = "/var/cache/salt/master";
/// Salt's default `sock_dir` on a master.
pub const DEFAULT_SOCK_DIR: &str = "/var/run/salt/master";
/// Salt's default `tcp_master_pub_port` (the bus with `ipc_mode: tcp`).
pub const DEFAULT_TCP_PUB_PORT: u16 = 4512;
/// Salt's default `default_include`.
pub const DEFAULT_INCLUDE: &str = "master.d/*.conf";
/// A master config file larger than this is not read (Salt's are a few
/// KiB; this bounds what a wrong path can make saltpipe allocate).
pub const MAX_FILE: u64 = 4 << 20;
/// At most this many included files are read.
pub const MAX_INCLUDES: usize = 256;

/// What the master config says, and in which file it said it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MasterOpts {
    pub root_dir: Option<PathBuf>,
    pub cachedir: Option<PathBuf>,
    pub sock_dir: Option<PathBuf>,
    pub hash_type: Option<String>,
    pub job_cache: Option<bool>,
    /// `ipc` or `tcp`.
    pub ipc_mode: Option<String>,
    pub tcp_master_pub_port: Option<u16>,
    /// The master's `id` (Salt's default, `<host>_master`, is not guessed).
    pub id: Option<String>,
    default_include: Option<String>,
    include: Vec<String>,
    /// Key -> the file that set it last.
    from: BTreeMap<&'static str, PathBuf>,
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
}

/// Reading the master config failed.
#[derive(Debug, thiserror::Error)]
pub enum MasterConfigError {
    #[error("cannot read the master config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the master config {path} is larger than {MAX_FILE} bytes")]
    TooLarge { path: PathBuf },
}

impl MasterConfigError {
    /// The file is simply not there: Salt's defaults apply.
    pub fn is_not_found(&self) -> bool {
        matches!(self, MasterConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

impl MasterOpts {
    /// Reads the top-level `key: value` lines it knows of one file's text;
    /// the last one wins, as in YAML.
    pub fn parse(text: &str) -> MasterOpts {
        Self::parse_from(text, Path::new("-"))
    }

    fn parse_from(text: &str, file: &Path) -> MasterOpts {
        let mut o = MasterOpts::default();
        let mut list_key: Option<&str> = None;
        for line in text.lines() {
            if let Some(item) = line.trim_start().strip_prefix("- ")
                && list_key == Some("include")
            {
                o.include.push(scalar(item).to_owned());
                continue;
            }
            if line.starts_with([' ', '\t', '#', '-']) {
                continue;
            }
            list_key = None;
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim();
            let value = scalar(value);
            if value.is_empty() {
                list_key = Some(if key == "include" { "include" } else { "" });
                if key == "include" {
                    o.include.clear();
                }
                continue;
            }
            let known: &'static str = match key {
                "root_dir" => {
                    o.root_dir = Some(PathBuf::from(value));
                    "root_dir"
                }
                "cachedir" => {
                    o.cachedir = Some(PathBuf::from(value));
                    "cachedir"
                }
                "sock_dir" => {
                    o.sock_dir = Some(PathBuf::from(value));
                    "sock_dir"
                }
                "hash_type" => {
                    o.hash_type = Some(value.to_ascii_lowercase());
                    "hash_type"
                }
                "job_cache" => {
                    o.job_cache = yaml_bool(value);
                    "job_cache"
                }
                "ipc_mode" => {
                    o.ipc_mode = Some(value.to_ascii_lowercase());
                    "ipc_mode"
                }
                "tcp_master_pub_port" => {
                    o.tcp_master_pub_port = value.parse().ok();
                    "tcp_master_pub_port"
                }
                "id" => {
                    o.id = Some(value.to_owned());
                    "id"
                }
                "default_include" => {
                    o.default_include = Some(value.to_owned());
                    "default_include"
                }
                "include" => {
                    o.include = vec![value.to_owned()];
                    "include"
                }
                _ => continue,
            };
            o.from.insert(known, file.to_path_buf());
        }
        o
    }

    /// `other` read after `self`: what it sets wins.
    fn merge(&mut self, other: MasterOpts) {
        fn take<T>(a: &mut Option<T>, b: Option<T>) {
            if b.is_some() {
                *a = b;
            }
        }
        take(&mut self.root_dir, other.root_dir);
        take(&mut self.cachedir, other.cachedir);
        take(&mut self.sock_dir, other.sock_dir);
        take(&mut self.hash_type, other.hash_type);
        take(&mut self.job_cache, other.job_cache);
        take(&mut self.ipc_mode, other.ipc_mode);
        take(&mut self.tcp_master_pub_port, other.tcp_master_pub_port);
        take(&mut self.id, other.id);
        self.from.extend(other.from);
    }

    /// Reads `path` and the files it includes (the only I/O here).
    pub fn load(path: &Path) -> Result<MasterOpts, MasterConfigError> {
        let mut opts = MasterOpts::parse_from(&read_limited(path)?, path);
        opts.files.push(path.to_path_buf());
        let base = path.parent().unwrap_or(Path::new("/"));
        let mut patterns = vec![
            opts.default_include
                .clone()
                .unwrap_or_else(|| DEFAULT_INCLUDE.into()),
        ];
        patterns.extend(opts.include.iter().cloned());
        let mut read = 0;
        for pattern in patterns {
            let full = if Path::new(&pattern).is_absolute() {
                PathBuf::from(&pattern)
            } else {
                base.join(&pattern)
            };
            let Ok(paths) = glob::glob(&full.to_string_lossy()) else {
                tracing::warn!(pattern = %full.display(), "master config: an include pattern saltpipe cannot read; skipped");
                continue;
            };
            let mut files: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
            files.sort();
            for file in files {
                if read == MAX_INCLUDES {
                    tracing::warn!(
                        limit = MAX_INCLUDES,
                        "master config: too many included files; the rest are not read"
                    );
                    return Ok(opts);
                }
                read += 1;
                match read_limited(&file) {
                    Ok(text) => {
                        opts.merge(MasterOpts::parse_from(&text, &file));
                        opts.files.push(file);
                    }
                    // Salt itself fails on an unreadable include; saltpipe
                    // says so and keeps what it could read.
                    Err(e) => {
                        tracing::warn!(error = %e, "master config: an included file was not read")
                    }
                }
            }
        }
        Ok(opts)
    }

    /// `path` with `root_dir` in front, as Salt's `prepend_root_dir` does
    /// (not when the path already starts with it).
    fn rooted(&self, path: &Path) -> PathBuf {
        match &self.root_dir {
            Some(root) if root != Path::new("/") && !path.starts_with(root) => {
                let rel = path.strip_prefix("/").unwrap_or(path);
                root.join(rel)
            }
            _ => path.to_path_buf(),
        }
    }

    /// `<root_dir><cachedir>/jobs`.
    pub fn jobs_dir(&self) -> PathBuf {
        let cachedir = self
            .cachedir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHEDIR));
        self.rooted(&cachedir).join("jobs")
    }

    /// `<root_dir><sock_dir>`.
    pub fn sock_dir(&self) -> PathBuf {
        let sock_dir = self
            .sock_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCK_DIR));
        self.rooted(&sock_dir)
    }

    /// Where the master publishes its event bus: the unix socket in
    /// `sock_dir`, or with `ipc_mode: tcp` 127.0.0.1:`tcp_master_pub_port`
    /// (the master binds it on loopback only).
    pub fn bus_address(&self) -> BusAddress {
        if self.ipc_mode.as_deref() == Some("tcp") {
            let port = self.tcp_master_pub_port.unwrap_or(DEFAULT_TCP_PUB_PORT);
            BusAddress::Tcp(format!("127.0.0.1:{port}"))
        } else {
            BusAddress::Unix(self.sock_dir().join("master_event_pub.ipc"))
        }
    }

    /// `key = value (file)` for every key read, for `validate`.
    pub fn taken(&self) -> Vec<String> {
        let value = |k: &str| -> String {
            match k {
                "root_dir" => show(&self.root_dir),
                "cachedir" => show(&self.cachedir),
                "sock_dir" => show(&self.sock_dir),
                "hash_type" => self.hash_type.clone().unwrap_or_default(),
                "job_cache" => self.job_cache.map(|b| b.to_string()).unwrap_or_default(),
                "ipc_mode" => self.ipc_mode.clone().unwrap_or_default(),
                "tcp_master_pub_port" => self
                    .tcp_master_pub_port
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                "id" => self.id.clone().unwrap_or_default(),
                _ => String::new(),
            }
        };
        self.from
            .iter()
            .filter(|(k, _)| !matches!(**k, "default_include" | "include"))
            .map(|(k, f)| format!("{k} = {} ({})", value(k), f.display()))
            .collect()
    }
}

fn show(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A file's text, refused past [`MAX_FILE`] before it is read.
fn read_limited(path: &Path) -> Result<String, MasterConfigError> {
    let err = |source| MasterConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut text = String::new();
    let n = f
        .take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(err)?;
    if n as u64 > MAX_FILE {
        return Err(MasterConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// A YAML plain or quoted scalar, without a trailing comment.
fn scalar(raw: &str) -> &str {
    let v = raw.trim();
    for q in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(q)
            && let Some(end) = rest.find(q)
        {
            return &rest[..end];
        }
    }
    match v.find(" #") {
        Some(i) => v[..i].trim_end(),
        None => v,
    }
}

/// YAML 1.1 booleans, as PyYAML (Salt's loader) reads them.
fn yaml_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "y" => Some(true),
        "false" | "no" | "off" | "n" => Some(false),
        _ => None,
    }
}

/// Lower-case hex of `hashlib.new(hash_type, data)`, for the hash types this
/// build has (the SHA-2 family: sha256 is Salt's default). `None` for
/// others (md5, sha1, ...): the scanner then finds a jid by its `jid` file.
pub fn hash_hex(hash_type: &str, data: &[u8]) -> Option<String> {
    let bytes: Vec<u8> = match hash_type {
        "sha256" => sha2::Sha256::digest(data).to_vec(),
        "sha224" => sha2::Sha224::digest(data).to_vec(),
        "sha384" => sha2::Sha384::digest(data).to_vec(),
        "sha512" => sha2::Sha512::digest(data).to_vec(),
        _ => return None,
    };
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_top_level_scalars_only() {
        let o = MasterOpts::parse(
            "# a comment\nroot_dir: '/srv/r'\ncachedir: \"/c\"  \nhash_type: SHA512 # why\n\
             job_cache: no\nfile_roots:\n  base:\n    - /srv/salt\n  cachedir: /nested\n",
        );
        assert_eq!(o.root_dir, Some(PathBuf::from("/srv/r")));
        assert_eq!(o.cachedir, Some(PathBuf::from("/c")));
        assert_eq!(o.hash_type.as_deref(), Some("sha512"));
        assert_eq!(o.job_cache, Some(false));
        assert_eq!(o.jobs_dir(), PathBuf::from("/srv/r/c/jobs"));
    }

    #[test]
    fn defaults_and_root_dir_not_doubled() {
        assert_eq!(
            MasterOpts::default().jobs_dir(),
            PathBuf::from("/var/cache/salt/master/jobs")
        );
        assert_eq!(
            MasterOpts::default().bus_address(),
            BusAddress::Unix("/var/run/salt/master/master_event_pub.ipc".into())
        );
        let o = MasterOpts::parse("root_dir: /r\ncachedir: /r/var/cache/salt/master\n");
        assert_eq!(o.jobs_dir(), PathBuf::from("/r/var/cache/salt/master/jobs"));
        assert_eq!(
            o.bus_address(),
            BusAddress::Unix("/r/var/run/salt/master/master_event_pub.ipc".into())
        );
    }

    #[test]
    fn tcp_mode_is_on_loopback_at_the_pub_port() {
        let o = MasterOpts::parse("ipc_mode: tcp\n");
        assert_eq!(o.bus_address(), BusAddress::Tcp("127.0.0.1:4512".into()));
        let o = MasterOpts::parse("ipc_mode: TCP\ntcp_master_pub_port: 14512\n");
        assert_eq!(o.bus_address(), BusAddress::Tcp("127.0.0.1:14512".into()));
    }

    #[test]
    fn includes_override_the_main_file_in_salts_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("master");
        std::fs::write(&main, "id: main\nsock_dir: /a\ninclude:\n  - extra/*.yml\n").expect("main");
        std::fs::create_dir(dir.path().join("master.d")).expect("master.d");
        std::fs::write(dir.path().join("master.d/10-a.conf"), "sock_dir: /b\n").expect("a");
        std::fs::write(dir.path().join("master.d/20-b.conf"), "hash_type: sha512\n").expect("b");
        std::fs::create_dir(dir.path().join("extra")).expect("extra");
        std::fs::write(dir.path().join("extra/x.yml"), "id: from-include\n").expect("x");
        let o = MasterOpts::load(&main).expect("load");
        assert_eq!(o.sock_dir, Some(PathBuf::from("/b")));
        assert_eq!(o.hash_type.as_deref(), Some("sha512"));
        assert_eq!(o.id.as_deref(), Some("from-include"));
        assert_eq!(o.files.len(), 4);
        let taken = o.taken().join("\n");
        assert!(taken.contains("sock_dir = /b ("), "{taken}");
        assert!(taken.contains("10-a.conf"), "{taken}");

        // default_include moved elsewhere: master.d is no longer read.
        std::fs::write(&main, "default_include: other/*.conf\nsock_dir: /a\n").expect("main");
        let o = MasterOpts::load(&main).expect("load");
        assert_eq!(o.sock_dir, Some(PathBuf::from("/a")));
        assert!(MasterOpts::load(&dir.path().join("absent")).is_err_and(|e| e.is_not_found()));
    }

    #[test]
    fn hash_matches_hashlib() {
        // python3 -c 'import hashlib; print(hashlib.sha256(b"abc").hexdigest())'
        assert_eq!(
            hash_hex("sha256", b"abc").as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(hash_hex("md5", b"abc"), None);
    }
}
