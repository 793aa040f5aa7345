//! A bucket as a snapshot source and a restore target: the seam.
//!
//! ferry-core knows no S3 client; ferry-bucket implements these traits
//! over its stores (any S3 endpoint, or a local directory). Keys become
//! paths: `a/b/c` is file `c` in directory `b` in directory `a`, and a key
//! ending in `/` (a "directory" marker) is an empty directory. Keys that
//! cannot be paths (`a//b`, `./x`, `../x`, a file and a directory of the
//! same name) are skipped with a warning, which marks the snapshot
//! incomplete.
//!
//! An object's HTTP metadata travels as extended attributes named
//! `user.s3.<header>` (`user.s3.content-type`, `user.s3.meta.<name>` for
//! user metadata), so a restore into a directory keeps it as user xattrs
//! and a restore into a bucket sets it again.
//!
//! The incremental rule is the directory one: an object's node records its
//! size, its last-modified time (as mtime and ctime) and a hash of its etag
//! (as inode); an object whose listing shows the same three is not read.

use std::io::Read;

use crate::manifest::{Name, Xattr};
use crate::source::Meta;

/// One object of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub modified_ns: i64,
}

/// HTTP metadata of an object: (`content-type`, ...) and (`meta.NAME`, ...)
/// for user metadata, lower-case names.
pub type Headers = Vec<(String, String)>;

pub type Listing<'a> = Box<dyn Iterator<Item = std::io::Result<ObjectEntry>> + Send + 'a>;

/// Where a snapshot reads objects from. Blocking: it is called from the
/// snapshot's reader thread.
pub trait ObjectSource: Send + Sync {
    /// What the snapshot records as its source (`s3://bucket/prefix`).
    fn name(&self) -> String;
    /// Every object, in key byte order.
    fn list(&self) -> Listing<'_>;
    /// One object's metadata and bytes, as listed: fails if it no longer
    /// has the listed etag (rewritten since), so a snapshot never mixes
    /// two versions.
    fn open(&self, e: &ObjectEntry) -> std::io::Result<(Headers, Box<dyn Read + Send>)>;
}

/// Where a restore writes objects. Blocking, like [`ObjectSource`].
pub trait ObjectSink: Send + Sync {
    fn name(&self) -> String;
    /// Every object already there, in key byte order.
    fn list(&self) -> Listing<'_>;
    /// Writes one object of `size` bytes from `body`, all or nothing (a
    /// failed write leaves no object and no open upload). Returns the
    /// etag the store gave it.
    fn put(
        &self,
        key: &str,
        size: u64,
        headers: &Headers,
        body: &mut dyn Read,
    ) -> std::io::Result<String>;
    fn delete(&self, key: &str) -> std::io::Result<()>;
    /// Reads an object back (for `--verify`).
    fn read(&self, key: &str) -> std::io::Result<Box<dyn Read + Send>>;
}

const XATTR_PREFIX: &str = "user.s3.";

pub fn headers_to_xattrs(h: &Headers) -> Vec<Xattr> {
    let mut x: Vec<Xattr> = h
        .iter()
        .map(|(k, v)| Xattr {
            name: Name(format!("{XATTR_PREFIX}{k}").into_bytes()),
            value: hex::encode(v.as_bytes()),
        })
        .collect();
    x.sort_by(|a, b| a.name.cmp(&b.name));
    x
}

pub fn xattrs_to_headers(x: &[Xattr]) -> Headers {
    x.iter()
        .filter_map(|a| {
            let name = std::str::from_utf8(&a.name.0).ok()?;
            let k = name.strip_prefix(XATTR_PREFIX)?;
            let v = hex::decode(&a.value).ok()?;
            Some((k.to_string(), String::from_utf8(v).ok()?))
        })
        .collect()
}

/// A listed object's metadata as a snapshot records it.
pub fn object_meta(e: &ObjectEntry) -> Meta {
    let h = blake3::hash(e.etag.as_bytes());
    Meta {
        size: e.size,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: e.modified_ns,
        ctime_ns: e.modified_ns,
        inode: u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")),
    }
}

/// Directories made up from key prefixes: fixed metadata, so that an
/// unchanged prefix gives the same tree blob run after run.
pub const DIR_META: Meta = Meta {
    size: 0,
    mode: 0o755,
    uid: 0,
    gid: 0,
    mtime_ns: 0,
    ctime_ns: 0,
    inode: 0,
};

/// A key as path components: directories, then the file name (`None` for
/// a directory marker). `None` if the key cannot be a path.
pub fn key_path(key: &str) -> Option<(Vec<&str>, Option<&str>)> {
    let (body, marker) = match key.strip_suffix('/') {
        Some(b) => (b, true),
        None => (key, false),
    };
    let parts: Vec<&str> = body.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return None;
    }
    if marker {
        Some((parts, None))
    } else {
        let (last, dirs) = parts.split_last()?;
        Some((dirs.to_vec(), Some(last)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_paths_or_are_refused() {
        assert_eq!(key_path("a/b/c"), Some((vec!["a", "b"], Some("c"))));
        assert_eq!(key_path("top"), Some((vec![], Some("top"))));
        assert_eq!(key_path("m/n/"), Some((vec!["m", "n"], None)));
        for bad in ["a//b", "/abs", "./x", "a/../b", "..", "", "/"] {
            assert_eq!(key_path(bad), None, "{bad:?}");
        }
        assert_eq!(key_path("x..y/ü +%"), Some((vec!["x..y"], Some("ü +%"))));
    }

    #[test]
    fn headers_survive_the_round_trip_through_xattrs() {
        let h: Headers = vec![
            ("content-type".into(), "text/plain".into()),
            ("meta.owner".into(), "team-a".into()),
        ];
        let x = headers_to_xattrs(&h);
        assert_eq!(x[0].name.0, b"user.s3.content-type");
        let mut back = xattrs_to_headers(&x);
        back.sort();
        assert_eq!(back, h);
        // Other xattrs are not headers.
        let other = vec![Xattr {
            name: Name(b"user.mime".to_vec()),
            value: "78".into(),
        }];
        assert!(xattrs_to_headers(&other).is_empty());
    }

    #[test]
    fn an_objects_metadata_changes_with_its_etag() {
        let e = ObjectEntry {
            key: "k".into(),
            size: 5,
            etag: "abc".into(),
            modified_ns: 7,
        };
        let m = object_meta(&e);
        assert_eq!((m.size, m.mtime_ns, m.ctime_ns), (5, 7, 7));
        let f = ObjectEntry {
            etag: "abd".into(),
            ..e
        };
        assert_ne!(object_meta(&f).inode, m.inode);
    }
}
