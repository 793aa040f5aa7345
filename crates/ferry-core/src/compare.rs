//! A target compared with a snapshot, entry by entry: missing, extra and
//! differing entries, metadata differences, and a content digest of every
//! file on both sides. `restore --verify` and a migration's report both
//! stand on it.
//!
//! A file's digest is the BLAKE3 of its chunk ids in order. The snapshot's
//! side comes from the manifest; the target's is computed by reading the
//! file at the snapshot's chunk boundaries and hashing each piece with the
//! vault's id key, so equal digests mean equal bytes, and nothing but the
//! target is read. (Chunk ids are keyed, so only a holder of the vault's
//! keys can recompute a digest; the report that carries them is signed
//! with the same keys.)

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::{BlobId, IdHasher};
use crate::manifest::{ChunkRef, Name, Node, NodeKind, SnapshotRecord};
use crate::objects::ObjectSink;
use crate::vault::Vault;

/// Files read at once.
const READERS: usize = 4;

#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// Keep every file's digests (for a report), not only the differences.
    pub digests: bool,
    /// Also list target entries the snapshot does not have.
    pub extra: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Comparison {
    pub files: u64,
    pub dirs: u64,
    /// Bytes of the snapshot's files.
    pub bytes: u64,
    /// Files whose content is equal.
    pub files_equal: u64,
    /// In the snapshot, not in the target.
    pub missing: Vec<String>,
    /// In the target, not in the snapshot.
    pub extra: Vec<String>,
    /// Present on both sides with another content, size, link or type.
    pub differing: Vec<String>,
    pub metadata: Vec<MetadataDiff>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<FileDigest>,
}

impl Comparison {
    /// Content and structure agree (extra entries and metadata aside).
    pub fn content_equal(&self) -> bool {
        self.missing.is_empty() && self.differing.is_empty()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetadataDiff {
    pub path: String,
    /// `mode 644 != 600`, `mtime`, `owner 0:0 != 1000:1000`.
    pub fields: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDigest {
    pub path: String,
    pub size: u64,
    pub source: String,
    /// None when the target has no such file.
    pub target: Option<String>,
}

/// The snapshot side of a file's digest.
pub fn source_digest(chunks: &[ChunkRef]) -> String {
    let mut h = blake3::Hasher::new();
    for c in chunks {
        h.update(&c.0.0);
    }
    h.finalize().to_hex().to_string()
}

/// The target side: `body` read at `chunks`' boundaries, then whatever
/// follows (a longer file) in pieces of the last chunk's size, unless
/// `limit` stops at the snapshot's size (a device larger than the volume).
fn digest_reader(
    body: &mut dyn Read,
    chunks: &[ChunkRef],
    ids: &IdHasher,
    stop_at_end: bool,
) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    let mut buf = Vec::new();
    let mut piece = |len: usize, h: &mut blake3::Hasher| -> std::io::Result<bool> {
        buf.resize(len, 0);
        let n = read_full(body, &mut buf)?;
        if n > 0 {
            h.update(&ids.id(&buf[..n]).0);
        }
        Ok(n == len)
    };
    for c in chunks {
        if !piece(c.1 as usize, &mut h)? {
            return Ok(h.finalize().to_hex().to_string());
        }
    }
    if !stop_at_end {
        let tail = chunks.last().map(|c| c.1 as usize).unwrap_or(1 << 20);
        while piece(tail, &mut h)? {}
    }
    Ok(h.finalize().to_hex().to_string())
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The metadata a restore sets, where it differs (owners only as root,
/// since only root can set them).
fn metadata_diff(md: &std::fs::Metadata, node: &Node, owners: bool) -> Vec<String> {
    let mut d = Vec::new();
    if !md.file_type().is_symlink() && md.mode() & 0o7777 != node.mode {
        d.push(format!("mode {:o} != {:o}", node.mode, md.mode() & 0o7777));
    }
    let mtime = crate::manifest::time_ns(md.mtime(), md.mtime_nsec());
    if !md.file_type().is_symlink() && mtime != node.mtime_ns {
        d.push("mtime".into());
    }
    if owners && (md.uid() != node.uid || md.gid() != node.gid) {
        d.push(format!(
            "owner {}:{} != {}:{}",
            node.uid,
            node.gid,
            md.uid(),
            md.gid()
        ));
    }
    d
}

fn rel_of(rel: &str, name: &Name) -> String {
    format!("{rel}/{}", name.display())
}

struct FileJob {
    path: PathBuf,
    rel: String,
    size: u64,
    chunks: Vec<ChunkRef>,
}

/// Compares directory `target` (or, for a block snapshot, the device or
/// image file `target`) with snapshot `snap`.
pub async fn compare_dir(
    vault: &Vault,
    catalog: &dyn Catalog,
    snap: &SnapshotRecord,
    target: &Path,
    opts: &CompareOptions,
) -> Result<Comparison> {
    let mut out = Comparison::default();
    let owners = crate::restore::effective_uid() == 0;
    if snap.block {
        let tree = crate::sync::load_tree(vault, catalog, &snap.root).await?;
        let Some(Node {
            kind: NodeKind::File { size, chunks },
            ..
        }) = tree.entry(b"block")
        else {
            return Err(Error::Invalid(format!(
                "snapshot {}: a block snapshot without its stream",
                snap.id
            )));
        };
        out.files = 1;
        out.bytes = *size;
        let job = FileJob {
            path: target.to_path_buf(),
            rel: "/".into(),
            size: *size,
            chunks: chunks.clone(),
        };
        files(vault.ids(), vec![job], true, opts, &mut out).await?;
        return Ok(out);
    }
    let mut stack = vec![(snap.root, target.to_path_buf(), String::new())];
    while let Some((id, dir, rel)) = stack.pop() {
        let tree = crate::sync::load_tree(vault, catalog, &id).await?;
        out.dirs += 1;
        if opts.extra {
            let mut names: Vec<String> = match std::fs::read_dir(&dir) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok())
                    .map(|e| Name::from_os(&e.file_name()))
                    .filter(|n| tree.entry(&n.0).is_none())
                    .map(|n| rel_of(&rel, &n))
                    .collect(),
                Err(_) => Vec::new(),
            };
            out.extra.append(&mut names);
        }
        let mut jobs = Vec::new();
        for node in &tree.entries {
            if !node.name.is_safe_component() {
                return Err(Error::Invalid(format!(
                    "unsafe name {:?} in snapshot",
                    node.name.display()
                )));
            }
            let path = dir.join(node.name.as_os());
            let r = rel_of(&rel, &node.name);
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                if let NodeKind::File { size, chunks } = &node.kind {
                    out.files += 1;
                    out.bytes += size;
                    if opts.digests {
                        out.digests.push(FileDigest {
                            path: r.clone(),
                            size: *size,
                            source: source_digest(chunks),
                            target: None,
                        });
                    }
                }
                out.missing.push(r);
                continue;
            };
            let same_kind = match &node.kind {
                NodeKind::Dir { subtree } => {
                    if md.is_dir() {
                        stack.push((*subtree, path.clone(), r.clone()));
                    }
                    md.is_dir()
                }
                NodeKind::File { size, chunks } => {
                    out.files += 1;
                    out.bytes += size;
                    if md.is_file() {
                        jobs.push(FileJob {
                            path: path.clone(),
                            rel: r.clone(),
                            size: *size,
                            chunks: chunks.clone(),
                        });
                    }
                    md.is_file()
                }
                NodeKind::Symlink { target: t } => {
                    md.file_type().is_symlink()
                        && std::fs::read_link(&path)
                            .map(|l| Name::from_os(l.as_os_str()) == *t)
                            .unwrap_or(false)
                }
                NodeKind::Hardlink { target: t } => {
                    // The same inode as the file it names.
                    md.is_file()
                        && std::fs::symlink_metadata(target.join(t.as_os()))
                            .map(|o| o.ino() == md.ino() && o.dev() == md.dev())
                            .unwrap_or(false)
                }
            };
            if !same_kind {
                out.differing.push(r);
                continue;
            }
            if !matches!(node.kind, NodeKind::Hardlink { .. }) {
                let fields = metadata_diff(&md, node, owners);
                if !fields.is_empty() {
                    out.metadata.push(MetadataDiff { path: r, fields });
                }
            }
        }
        files(vault.ids(), jobs, false, opts, &mut out).await?;
    }
    out.missing.sort();
    out.extra.sort();
    out.differing.sort();
    out.metadata.sort_by(|a, b| a.path.cmp(&b.path));
    out.digests.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Digests `jobs` READERS at a time; a file that cannot be read differs.
async fn files(
    ids: &IdHasher,
    jobs: Vec<FileJob>,
    device: bool,
    opts: &CompareOptions,
    out: &mut Comparison,
) -> Result<()> {
    let mut results = futures::stream::iter(jobs.into_iter().map(|j| {
        let ids = ids.clone();
        tokio::task::spawn_blocking(move || {
            let got = File::open(&j.path).and_then(|mut f| {
                // A regular file must also have the snapshot's size; a
                // device may be larger than the volume it holds.
                let size_ok = device || f.metadata()?.len() == j.size;
                Ok((size_ok, digest_reader(&mut f, &j.chunks, &ids, device)?))
            });
            (j, got)
        })
    }))
    .buffer_unordered(READERS);
    while let Some(r) = results.next().await {
        let (j, got) = r.map_err(|e| Error::Internal(format!("compare: {e}")))?;
        let source = source_digest(&j.chunks);
        let (size_ok, target) = match got {
            Ok((ok, d)) => (ok, Some(d)),
            Err(_) => (false, None),
        };
        let equal = size_ok && target.as_deref() == Some(source.as_str());
        if equal {
            out.files_equal += 1;
        } else {
            out.differing.push(j.rel.clone());
        }
        if opts.digests || !equal {
            out.digests.push(FileDigest {
                path: j.rel,
                size: j.size,
                source,
                target,
            });
        }
    }
    Ok(())
}

/// Compares a bucket target with snapshot `snap`: keys as the restore
/// names them, each object read and digested at the snapshot's chunk
/// boundaries. Blocking (the sink is): call it from a blocking thread.
pub fn compare_objects(
    rt: &tokio::runtime::Handle,
    vault: &Vault,
    catalog: &dyn Catalog,
    snap: &SnapshotRecord,
    sink: &dyn ObjectSink,
    opts: &CompareOptions,
) -> Result<Comparison> {
    let mut out = Comparison::default();
    let mut want = KeyWalk::new(rt, vault, catalog, snap)?;
    let mut have = sink.list();
    let mut next_have = || -> Result<Option<crate::objects::ObjectEntry>> {
        have.next()
            .transpose()
            .map_err(|e| Error::Invalid(format!("listing {}: {e}", sink.name())))
    };
    let (mut w, mut h) = (want.next()?, next_have()?);
    loop {
        let ord = match (&w, &h) {
            (None, None) => break,
            (Some(a), Some(b)) => a.0.as_bytes().cmp(b.key.as_bytes()),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Greater => {
                out.extra.push(h.take().expect("some").key);
                h = next_have()?;
            }
            std::cmp::Ordering::Less => {
                let (key, size, chunks) = w.take().expect("some");
                if !key.ends_with('/') {
                    out.files += 1;
                    out.bytes += size;
                    if opts.digests {
                        out.digests.push(FileDigest {
                            path: key.clone(),
                            size,
                            source: source_digest(&chunks),
                            target: None,
                        });
                    }
                }
                out.missing.push(key);
                w = want.next()?;
            }
            std::cmp::Ordering::Equal => {
                let (key, size, chunks) = w.take().expect("some");
                let listed = h.take().expect("some");
                if !key.ends_with('/') {
                    out.files += 1;
                    out.bytes += size;
                    let source = source_digest(&chunks);
                    let target = sink
                        .read(&key)
                        .and_then(|mut r| digest_reader(&mut *r, &chunks, vault.ids(), false))
                        .ok();
                    let equal = listed.size == size && target.as_deref() == Some(source.as_str());
                    if equal {
                        out.files_equal += 1;
                    } else {
                        out.differing.push(key.clone());
                    }
                    if opts.digests || !equal {
                        out.digests.push(FileDigest {
                            path: key,
                            size,
                            source,
                            target,
                        });
                    }
                }
                w = want.next()?;
                h = next_have()?;
            }
        }
    }
    if !opts.extra {
        out.extra.clear();
    }
    Ok(out)
}

/// The snapshot's files in key order (directories as `dir/` markers when
/// empty), the way a restore into a bucket names them.
struct KeyWalk<'a> {
    rt: &'a tokio::runtime::Handle,
    vault: &'a Vault,
    catalog: &'a dyn Catalog,
    stack: Vec<std::vec::IntoIter<(String, Node)>>,
}

impl<'a> KeyWalk<'a> {
    fn new(
        rt: &'a tokio::runtime::Handle,
        vault: &'a Vault,
        catalog: &'a dyn Catalog,
        snap: &SnapshotRecord,
    ) -> Result<Self> {
        let mut w = KeyWalk {
            rt,
            vault,
            catalog,
            stack: Vec::new(),
        };
        let root = w.entries(&snap.root, "")?;
        w.stack.push(root.into_iter());
        Ok(w)
    }

    fn entries(&self, id: &BlobId, prefix: &str) -> Result<Vec<(String, Node)>> {
        let tree = self
            .rt
            .block_on(crate::sync::load_tree(self.vault, self.catalog, id))?;
        let mut v: Vec<(String, Node)> = tree
            .entries
            .into_iter()
            .filter_map(|n| {
                let name = std::str::from_utf8(&n.name.0).ok()?.to_string();
                let key = match n.kind {
                    NodeKind::Dir { .. } => format!("{prefix}{name}/"),
                    NodeKind::File { .. } => format!("{prefix}{name}"),
                    // A bucket holds only files; the restore skipped these.
                    _ => return None,
                };
                Some((key, n))
            })
            .collect();
        v.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Ok(v)
    }

    /// (key, size, chunks) of the next file or empty-directory marker.
    fn next(&mut self) -> Result<Option<(String, u64, Vec<ChunkRef>)>> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some((key, node)) = top.next() else {
                self.stack.pop();
                continue;
            };
            match node.kind {
                NodeKind::Dir { subtree } => {
                    let sub = self.entries(&subtree, &key)?;
                    if sub.is_empty() {
                        return Ok(Some((key, 0, Vec::new())));
                    }
                    self.stack.push(sub.into_iter());
                }
                NodeKind::File { size, chunks } => return Ok(Some((key, size, chunks))),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_agree_only_for_the_same_bytes() {
        let ids = IdHasher::new([3u8; 32]);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let chunks = vec![
            ChunkRef(ids.id(&data[..4000]), 4000),
            ChunkRef(ids.id(&data[4000..]), 6000),
        ];
        let src = source_digest(&chunks);
        let d = |b: &[u8], stop| digest_reader(&mut &b[..], &chunks, &ids, stop).unwrap();
        assert_eq!(d(&data, false), src);
        let mut flipped = data.clone();
        flipped[9000] ^= 1;
        assert_ne!(d(&flipped, false), src);
        assert_ne!(d(&data[..9999], false), src, "shorter");
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(d(&longer, false), src, "longer");
        // A device larger than the volume: only the volume's bytes count.
        assert_eq!(d(&longer, true), src);
    }
}
