//! The catalog's form of a tree: binary, for the catalog's tree cache only.
//!
//! A tree's id is the keyed hash of its JSON (the vault's form, see
//! `docs/FORMAT.md`), so the JSON is what snapshots write to packs. But the
//! catalog hands every tree of the parent snapshot to the next snapshot's
//! reader, and every tree of a snapshot to a restore's planner: decoding
//! JSON with hex chunk ids was a third of the reader's time in a final
//! delta. This form holds ids as raw bytes and numbers as varints, and is
//! told from JSON by its first byte (JSON starts with `{`), so a catalog
//! holding either form reads both.

use super::{ChunkRef, Name, Node, NodeKind, Tree, Xattr};
use crate::id::BlobId;

/// The first byte of the compact form (and its version).
pub(super) const MAGIC: u8 = 0x01;

const FILE: u8 = 0;
const DIR: u8 = 1;
const SYMLINK: u8 = 2;
const HARDLINK: u8 = 3;

pub(super) fn encode(tree: &Tree) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + tree.entries.len() * 96);
    out.push(MAGIC);
    varint(&mut out, tree.entries.len() as u64);
    for n in &tree.entries {
        bytes(&mut out, &n.name.0);
        match &n.kind {
            NodeKind::File { size, chunks } => {
                out.push(FILE);
                varint(&mut out, *size);
                varint(&mut out, chunks.len() as u64);
                for c in chunks {
                    out.extend_from_slice(&c.0.0);
                    varint(&mut out, c.1 as u64);
                }
            }
            NodeKind::Dir { subtree } => {
                out.push(DIR);
                out.extend_from_slice(&subtree.0);
            }
            NodeKind::Symlink { target } => {
                out.push(SYMLINK);
                bytes(&mut out, &target.0);
            }
            NodeKind::Hardlink { target } => {
                out.push(HARDLINK);
                bytes(&mut out, &target.0);
            }
        }
        varint(&mut out, n.mode as u64);
        varint(&mut out, n.uid as u64);
        varint(&mut out, n.gid as u64);
        varint(&mut out, zigzag(n.mtime_ns));
        varint(&mut out, zigzag(n.ctime_ns));
        varint(&mut out, n.inode);
        varint(&mut out, n.xattrs.len() as u64);
        for x in &n.xattrs {
            bytes(&mut out, &x.name.0);
            bytes(&mut out, x.value.as_bytes());
        }
    }
    out
}

/// Decodes the compact form; checks (sorted, safe names) are the caller's.
pub(super) fn decode(b: &[u8]) -> Result<Tree, String> {
    let mut r = Cursor { b, at: 0 };
    if r.byte()? != MAGIC {
        return Err("not a compact tree".into());
    }
    let count = r.len()?;
    // Each entry takes at least 10 bytes: a corrupt count cannot make us
    // reserve more than the input could hold.
    let mut entries = Vec::with_capacity(count.min(b.len() / 10));
    for _ in 0..count {
        let name = Name(r.bytes()?.to_vec());
        let kind = match r.byte()? {
            FILE => {
                let size = r.varint()?;
                let n = r.len()?;
                let mut chunks = Vec::with_capacity(n.min(r.left() / 33));
                for _ in 0..n {
                    let id = r.id()?;
                    let len = u32::try_from(r.varint()?).map_err(|_| "chunk length too large")?;
                    chunks.push(ChunkRef(id, len));
                }
                NodeKind::File { size, chunks }
            }
            DIR => NodeKind::Dir { subtree: r.id()? },
            SYMLINK => NodeKind::Symlink {
                target: Name(r.bytes()?.to_vec()),
            },
            HARDLINK => NodeKind::Hardlink {
                target: Name(r.bytes()?.to_vec()),
            },
            t => return Err(format!("unknown entry type {t}")),
        };
        let small = |v: u64| u32::try_from(v).map_err(|_| "mode, uid or gid too large".to_string());
        let mode = small(r.varint()?)?;
        let uid = small(r.varint()?)?;
        let gid = small(r.varint()?)?;
        let mtime_ns = unzigzag(r.varint()?);
        let ctime_ns = unzigzag(r.varint()?);
        let inode = r.varint()?;
        let nx = r.len()?;
        let mut xattrs = Vec::with_capacity(nx.min(r.left() / 2));
        for _ in 0..nx {
            let name = Name(r.bytes()?.to_vec());
            let value =
                String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "xattr value is not text")?;
            xattrs.push(Xattr { name, value });
        }
        entries.push(Node {
            name,
            kind,
            mode,
            uid,
            gid,
            mtime_ns,
            ctime_ns,
            inode,
            xattrs,
        });
    }
    if r.left() != 0 {
        return Err("trailing bytes after the entries".into());
    }
    Ok(Tree { entries })
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.left() {
            return Err("truncated compact tree".into());
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    /// A count or length: at most what is left of the input.
    fn len(&mut self) -> Result<usize, String> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|n| *n <= self.left())
            .ok_or_else(|| "count or length beyond the input".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }

    fn id(&mut self) -> Result<BlobId, String> {
        let mut id = [0u8; 32];
        id.copy_from_slice(self.take(32)?);
        Ok(BlobId(id))
    }
}
