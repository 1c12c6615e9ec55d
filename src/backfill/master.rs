//! The few keys of the master's config that say where its job cache is.
//!
//! Written by hand: no YAML crate is in this project's dependency set, and
//! saltpipe needs four top-level scalars (`root_dir`, `cachedir`,
//! `hash_type`, `job_cache`), which Salt's own config always writes as
//! `key: value` at column 0. Anything else in the file (nested maps, lists,
//! `include`s, Jinja) is ignored; a key saltpipe cannot read keeps Salt's
//! default, and `[backfill] job_cache_dir` overrides the result anyway.

use sha2::Digest as _;
use std::path::{Path, PathBuf};

/// Salt's default `cachedir` on a master.
pub const DEFAULT_CACHEDIR: &str = "/var/cache/salt/master";

/// What the master config says, where it says it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MasterOpts {
    pub root_dir: Option<PathBuf>,
    pub cachedir: Option<PathBuf>,
    pub hash_type: Option<String>,
    pub job_cache: Option<bool>,
}

impl MasterOpts {
    /// Reads the top-level `key: value` lines it knows; the last one wins,
    /// as in YAML.
    pub fn parse(text: &str) -> MasterOpts {
        let mut o = MasterOpts::default();
        for line in text.lines() {
            if line.starts_with([' ', '\t', '#', '-']) {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = scalar(value);
            if value.is_empty() {
                continue;
            }
            match key.trim() {
                "root_dir" => o.root_dir = Some(PathBuf::from(value)),
                "cachedir" => o.cachedir = Some(PathBuf::from(value)),
                "hash_type" => o.hash_type = Some(value.to_ascii_lowercase()),
                "job_cache" => o.job_cache = yaml_bool(value),
                _ => {}
            }
        }
        o
    }

    /// `<root_dir><cachedir>/jobs`, prefixing `root_dir` as Salt's
    /// `prepend_root_dir` does (not when the path already starts with it).
    pub fn jobs_dir(&self) -> PathBuf {
        let cachedir = self
            .cachedir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHEDIR));
        let full = match &self.root_dir {
            Some(root) if root != Path::new("/") && !cachedir.starts_with(root) => {
                let rel = cachedir.strip_prefix("/").unwrap_or(&cachedir);
                root.join(rel)
            }
            _ => cachedir,
        };
        full.join("jobs")
    }
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
        let o = MasterOpts::parse("root_dir: /r\ncachedir: /r/var/cache/salt/master\n");
        assert_eq!(o.jobs_dir(), PathBuf::from("/r/var/cache/salt/master/jobs"));
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
