//! The source: a directory tree on the local filesystem.
//!
//! Reads entries in name order (so trees are deterministic) and turns `lstat`
//! results into manifest nodes. Symlinks are never followed.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::manifest::{Name, Node, NodeKind, Xattr};

/// What kind of entry a path is, from `lstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    /// Socket, FIFO, device node: skipped with a counted warning.
    Special(&'static str),
}

pub fn entry_type(md: &Metadata) -> EntryType {
    use std::os::unix::fs::FileTypeExt;
    let ft = md.file_type();
    if ft.is_file() {
        EntryType::File
    } else if ft.is_dir() {
        EntryType::Dir
    } else if ft.is_symlink() {
        EntryType::Symlink
    } else if ft.is_socket() {
        EntryType::Special("socket")
    } else if ft.is_fifo() {
        EntryType::Special("fifo")
    } else if ft.is_block_device() {
        EntryType::Special("block device")
    } else {
        EntryType::Special("character device")
    }
}

/// What a snapshot records of an entry besides its content: from `lstat`
/// for a file, or made up from an object's listing (see `objects`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

impl From<&Metadata> for Meta {
    fn from(md: &Metadata) -> Self {
        Meta {
            size: md.len(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime_ns: crate::manifest::time_ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: crate::manifest::time_ns(md.ctime(), md.ctime_nsec()),
            inode: md.ino(),
        }
    }
}

/// A node with metadata filled in and the given kind.
pub fn node_from(name: Name, md: &Meta, kind: NodeKind, xattrs: Vec<Xattr>) -> Node {
    Node {
        name,
        kind,
        mode: md.mode,
        uid: md.uid,
        gid: md.gid,
        mtime_ns: md.mtime_ns,
        ctime_ns: md.ctime_ns,
        inode: md.inode,
        xattrs,
    }
}

/// Whether a file node still describes an entry with this metadata: then
/// its chunk list is reused and the entry is not read.
pub fn unchanged(old: &Node, md: &Meta) -> Option<Vec<crate::manifest::ChunkRef>> {
    let NodeKind::File { size, chunks } = &old.kind else {
        return None;
    };
    let same = *size == md.size
        && old.mtime_ns == md.mtime_ns
        && old.ctime_ns == md.ctime_ns
        && old.inode == md.inode
        && old.mode == md.mode;
    same.then(|| chunks.clone())
}

/// Extended attributes of `path` (not following symlinks); empty where the
/// filesystem has none or does not support them.
pub fn read_xattrs(path: &Path) -> std::io::Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for n in names {
        if let Some(v) = xattr::get(path, &n)? {
            out.push(Xattr {
                name: Name::from_os(&n),
                value: hex::encode(v),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A directory's entries with their names, sorted bytewise by name. An
/// entry's `metadata()` is looked up relative to the directory.
pub fn sorted_entries(dir: &Path) -> std::io::Result<Vec<(std::ffi::OsString, std::fs::DirEntry)>> {
    let mut entries = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| (e.file_name(), e)))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by(|a, b| {
        use std::os::unix::ffi::OsStrExt;
        a.0.as_bytes().cmp(b.0.as_bytes())
    });
    Ok(entries)
}
