//! What ferry remembers of a restore target, so that the next restore into
//! it (the final delta) can skip unchanged files by metadata alone instead of
//! re-reading the whole target.
//!
//! Per path: which content ferry left there (a hash of the chunk list) and
//! the file's size, mtime, ctime and inode right after. The memory is
//! trusted only while the file's metadata still matches: a file changed by
//! someone else since has a new ctime, so it is compared or rewritten.
//! Before a file is patched in place its row is forgotten, so a crash in the
//! middle never leaves a row vouching for a torn file.

use std::os::unix::fs::MetadataExt;

use crate::catalog::CatalogResult;
use crate::manifest::ChunkRef;

/// A file as ferry left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetFile {
    /// Path from the target root, components joined by '/'.
    pub path: Vec<u8>,
    /// [`content_id`] of the chunk list ferry wrote.
    pub content: [u8; 32],
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

impl TargetFile {
    pub fn from_md(path: Vec<u8>, content: [u8; 32], md: &std::fs::Metadata) -> Self {
        Self {
            path,
            content,
            size: md.len(),
            mtime_ns: crate::manifest::time_ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: crate::manifest::time_ns(md.ctime(), md.ctime_nsec()),
            inode: md.ino(),
        }
    }

    /// Whether the file on disk is still the one ferry left.
    pub fn matches(&self, md: &std::fs::Metadata) -> bool {
        let now = TargetFile::from_md(self.path.clone(), self.content, md);
        now == *self
    }
}

/// The content of a file as a 32-byte hash of its chunk list.
pub fn content_id(chunks: &[ChunkRef]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry-content-v1");
    for c in chunks {
        h.update(&c.0.0);
        h.update(&c.1.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

pub trait TargetState: Send + Sync {
    /// The snapshot last restored completely into this target.
    fn last_snapshot(&self) -> CatalogResult<Option<String>>;
    /// What ferry left in one directory (path from the target root).
    fn get_dir(&self, dir: &[u8]) -> CatalogResult<Vec<TargetFile>>;
    /// What ferry left at one path, for a plan that needs a few files of a
    /// directory, not all of them.
    fn get_file(&self, path: &[u8]) -> CatalogResult<Option<TargetFile>> {
        let dir = match path.iter().rposition(|b| *b == b'/') {
            Some(i) => &path[..i],
            None => &[],
        };
        Ok(self.get_dir(dir)?.into_iter().find(|f| f.path == path))
    }
    /// Drops rows (files about to be patched in place).
    fn forget(&self, paths: &[Vec<u8>]) -> CatalogResult<()>;
    /// Records the files a restore wrote or checked (rows of other paths
    /// stay: they are checked against the file's metadata before any use);
    /// `snapshot` is set only when the restore was complete.
    fn update(&self, files: &[TargetFile], snapshot: Option<&str>) -> CatalogResult<()>;
}

/// Remembers nothing: every existing file is compared by content.
pub struct NoTargetState;

impl TargetState for NoTargetState {
    fn last_snapshot(&self) -> CatalogResult<Option<String>> {
        Ok(None)
    }
    fn get_dir(&self, _: &[u8]) -> CatalogResult<Vec<TargetFile>> {
        Ok(vec![])
    }
    fn forget(&self, _: &[Vec<u8>]) -> CatalogResult<()> {
        Ok(())
    }
    fn update(&self, _: &[TargetFile], _: Option<&str>) -> CatalogResult<()> {
        Ok(())
    }
}
