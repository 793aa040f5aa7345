//! Manifests: what a snapshot says about the files, not their bytes.
//!
//! A directory is a tree blob: the JSON of its sorted entries, stored like a
//! chunk (compressed, encrypted, deduplicated by its keyed id). A
//! subdirectory is named by its tree's id, so an unchanged subtree yields the
//! same id in the next snapshot and costs nothing: neither a new blob in the
//! vault nor a row per file in the catalog.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::id::BlobId;

/// A file name or link target: bytes on Unix, which need not be UTF-8.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(pub Vec<u8>);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum NameRepr {
    Utf8(String),
    Raw { hex: String },
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(t) => NameRepr::Utf8(t.to_string()).serialize(s),
            Err(_) => NameRepr::Raw {
                hex: hex::encode(&self.0),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Name(match NameRepr::deserialize(d)? {
            NameRepr::Utf8(s) => s.into_bytes(),
            NameRepr::Raw { hex } => hex::decode(hex).map_err(serde::de::Error::custom)?,
        }))
    }
}

impl Name {
    pub fn from_os(s: &std::ffi::OsStr) -> Self {
        use std::os::unix::ffi::OsStrExt;
        Name(s.as_bytes().to_vec())
    }

    pub fn as_os(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }

    /// A name that may be joined to a directory without leaving it.
    pub fn is_safe_component(&self) -> bool {
        !self.0.is_empty()
            && self.0 != b"."
            && self.0 != b".."
            && !self.0.contains(&b'/')
            && !self.0.contains(&0)
    }

    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// One chunk of a file: its id and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub BlobId, pub u32);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NodeKind {
    File {
        size: u64,
        chunks: Vec<ChunkRef>,
    },
    Dir {
        subtree: BlobId,
    },
    Symlink {
        target: Name,
    },
    /// Another name of a file earlier in the same snapshot; `target` is its
    /// path from the snapshot root, components joined by '/'.
    Hardlink {
        target: Name,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: Name,
    #[serde(flatten)]
    pub kind: NodeKind,
    /// Permission bits and the set-id/sticky bits (no file type).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// Change detection only (never restored).
    #[serde(default)]
    pub ctime_ns: i64,
    #[serde(default)]
    pub inode: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Name,
    /// Hex.
    pub value: String,
}

/// A directory's entries, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub entries: Vec<Node>,
}

impl Tree {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a tree always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let t: Tree = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        for w in t.entries.windows(2) {
            if w[0].name >= w[1].name {
                return Err("entries are not sorted and unique".into());
            }
        }
        if let Some(bad) = t.entries.iter().find(|n| !n.name.is_safe_component()) {
            return Err(format!("unsafe entry name {:?}", bad.name.display()));
        }
        Ok(t)
    }
}

/// A snapshot record: the commit point of a snapshot. Until it is written
/// to the vault the snapshot does not exist, whatever packs are there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub volume: String,
    pub time: String,
    pub time_ns: i64,
    pub root: BlobId,
    /// The source directory's own metadata (its kind is `dir` of `root`).
    pub root_node: Node,
    #[serde(default)]
    pub parent: Option<String>,
    pub host: String,
    pub source: String,
    pub files: u64,
    pub dirs: u64,
    /// Sum of the file sizes.
    pub bytes: u64,
    /// Some entries could not be read; `warnings` counts them.
    pub incomplete: bool,
    pub warnings: u64,
}

/// The packs one snapshot run wrote, so that another catalog can learn them
/// without reading every pack header.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IndexObject {
    pub packs: Vec<crate::pack::PackRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &[u8], kind: NodeKind) -> Node {
        Node {
            name: Name(name.to_vec()),
            kind,
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime_ns: 3,
            ctime_ns: 4,
            inode: 5,
            xattrs: vec![],
        }
    }

    #[test]
    fn tree_round_trip_with_non_utf8_names() {
        let t = Tree {
            entries: vec![
                node(
                    b"a",
                    NodeKind::File {
                        size: 3,
                        chunks: vec![ChunkRef(BlobId([1; 32]), 3)],
                    },
                ),
                node(
                    b"b\xff",
                    NodeKind::Symlink {
                        target: Name(b"/x\xfe".to_vec()),
                    },
                ),
                node(
                    b"c",
                    NodeKind::Dir {
                        subtree: BlobId([2; 32]),
                    },
                ),
            ],
        };
        let bytes = t.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), t);
        // Deterministic: the same tree gives the same bytes, hence the same id.
        assert_eq!(t.encode(), bytes);
    }

    #[test]
    fn unsafe_or_unsorted_trees_are_rejected() {
        for bad in [&b".."[..], b"a/b", b"", b"."] {
            let t = Tree {
                entries: vec![node(
                    bad,
                    NodeKind::Dir {
                        subtree: BlobId([0; 32]),
                    },
                )],
            };
            assert!(Tree::decode(&t.encode()).is_err());
        }
        let t = Tree {
            entries: vec![
                node(
                    b"b",
                    NodeKind::Symlink {
                        target: Name(vec![]),
                    },
                ),
                node(
                    b"a",
                    NodeKind::Symlink {
                        target: Name(vec![]),
                    },
                ),
            ],
        };
        assert!(Tree::decode(&t.encode()).is_err());
    }
}
