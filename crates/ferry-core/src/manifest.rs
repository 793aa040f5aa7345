//! Manifests: what a snapshot says about the files, not their bytes.
//!
//! A directory is a tree blob: the JSON of its sorted entries, stored like a
//! chunk (compressed, encrypted, deduplicated by its keyed id). A
//! subdirectory is named by its tree's id, so an unchanged subtree yields the
//! same id in the next snapshot and costs nothing: neither a new blob in the
//! vault nor a row per file in the catalog.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::id::BlobId;

mod compact;

/// A file name or link target: bytes on Unix, which need not be UTF-8.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(pub Vec<u8>);

/// UTF-8 names are JSON strings; others are `{"hex": "..."}`.
#[derive(Serialize)]
struct RawName<'a> {
    hex: &'a str,
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(t) => s.serialize_str(t),
            Err(_) => RawName {
                hex: &hex::encode(&self.0),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Name;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a name: a string or {\"hex\": ...}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Name, E> {
                Ok(Name(v.as_bytes().to_vec()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Name, E> {
                Ok(Name(v.into_bytes()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Name, A::Error> {
                let mut out = None;
                while let Some(k) = m.next_key::<String>()? {
                    let v: String = m.next_value()?;
                    if k == "hex" {
                        out = Some(hex::decode(v).map_err(serde::de::Error::custom)?);
                    }
                }
                out.map(Name)
                    .ok_or_else(|| serde::de::Error::missing_field("hex"))
            }
        }
        d.deserialize_any(V)
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

#[derive(Clone, Debug, PartialEq, Eq)]
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

/// A file time as nanoseconds since the epoch, as trees store it: clamped
/// to what an i64 holds (1677-09-21 to 2262-04-11), where the product
/// would wrap (a file dated 2300 came back as 1901).
pub fn time_ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// A directory entry. Serialized flat (see [`NodeRepr`]): `type` and the
/// fields of that type beside the common ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NodeRepr", into = "NodeRepr")]
pub struct Node {
    pub name: Name,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum NodeType {
    File,
    Dir,
    Symlink,
    Hardlink,
}

/// The JSON form of a [`Node`]: plain fields, so decoding needs no
/// buffering (serde's `flatten` and tagged enums buffer every field).
#[derive(Serialize, Deserialize)]
struct NodeRepr {
    name: Name,
    #[serde(rename = "type")]
    ty: NodeType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunks: Option<Vec<ChunkRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subtree: Option<BlobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<Name>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    #[serde(default)]
    ctime_ns: i64,
    #[serde(default)]
    inode: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    xattrs: Vec<Xattr>,
}

impl TryFrom<NodeRepr> for Node {
    type Error = String;

    fn try_from(r: NodeRepr) -> Result<Self, String> {
        let missing = |f: &str| format!("{:?}: missing {f}", r.name.display());
        let kind = match r.ty {
            NodeType::File => NodeKind::File {
                size: r.size.ok_or_else(|| missing("size"))?,
                chunks: r.chunks.ok_or_else(|| missing("chunks"))?,
            },
            NodeType::Dir => NodeKind::Dir {
                subtree: r.subtree.ok_or_else(|| missing("subtree"))?,
            },
            NodeType::Symlink => NodeKind::Symlink {
                target: r.target.ok_or_else(|| missing("target"))?,
            },
            NodeType::Hardlink => NodeKind::Hardlink {
                target: r.target.ok_or_else(|| missing("target"))?,
            },
        };
        Ok(Node {
            name: r.name,
            kind,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            mtime_ns: r.mtime_ns,
            ctime_ns: r.ctime_ns,
            inode: r.inode,
            xattrs: r.xattrs,
        })
    }
}

impl From<Node> for NodeRepr {
    fn from(n: Node) -> Self {
        let (ty, size, chunks, subtree, target) = match n.kind {
            NodeKind::File { size, chunks } => {
                (NodeType::File, Some(size), Some(chunks), None, None)
            }
            NodeKind::Dir { subtree } => (NodeType::Dir, None, None, Some(subtree), None),
            NodeKind::Symlink { target } => (NodeType::Symlink, None, None, None, Some(target)),
            NodeKind::Hardlink { target } => (NodeType::Hardlink, None, None, None, Some(target)),
        };
        NodeRepr {
            name: n.name,
            ty,
            size,
            chunks,
            subtree,
            target,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            mtime_ns: n.mtime_ns,
            ctime_ns: n.ctime_ns,
            inode: n.inode,
            xattrs: n.xattrs,
        }
    }
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
    /// The entry named `name` (entries are sorted by name).
    pub fn entry(&self, name: &[u8]) -> Option<&Node> {
        self.entries
            .binary_search_by(|n| n.name.0.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a tree always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let t: Tree = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        t.check()?;
        Ok(t)
    }

    /// The catalog's form of the tree (see [`compact`]): never hashed, never
    /// in the vault.
    pub fn encode_cached(&self) -> Vec<u8> {
        compact::encode(self)
    }

    /// Decodes what a catalog holds for a tree: the compact form, or the
    /// vault's JSON (catalogs filled before the compact form).
    pub fn decode_cached(bytes: &[u8]) -> Result<Self, String> {
        if bytes.first() != Some(&compact::MAGIC) {
            return Self::decode(bytes);
        }
        let t = compact::decode(bytes)?;
        t.check()?;
        Ok(t)
    }

    /// Whatever a tree came from, its names are sorted, unique and safe to
    /// join to a directory.
    fn check(&self) -> Result<(), String> {
        for w in self.entries.windows(2) {
            if w[0].name >= w[1].name {
                return Err("entries are not sorted and unique".into());
            }
        }
        if let Some(bad) = self.entries.iter().find(|n| !n.name.is_safe_component()) {
            return Err(format!("unsafe entry name {:?}", bad.name.display()));
        }
        Ok(())
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
    /// A raw block volume: the root tree holds one file, `block`.
    #[serde(default)]
    pub block: bool,
    /// Source files that changed while they were read (the first 1000).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unstable: Vec<String>,
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
    fn times_beyond_2262_are_clamped_not_wrapped() {
        assert_eq!(time_ns(1_700_000_000, 5), 1_700_000_000_000_000_005);
        // 2300-01-01 and 1600-01-01.
        assert_eq!(time_ns(10_413_792_000, 0), i64::MAX);
        assert_eq!(time_ns(-11_676_096_000, 0), i64::MIN);
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
        // The catalog reads both its forms.
        assert_eq!(Tree::decode_cached(&bytes).unwrap(), t);
        assert_eq!(Tree::decode_cached(&t.encode_cached()).unwrap(), t);
    }

    #[test]
    fn json_form_is_flat_and_complete() {
        let n = node(
            b"f",
            NodeKind::File {
                size: 3,
                chunks: vec![ChunkRef(BlobId([1; 32]), 3)],
            },
        );
        let v: serde_json::Value = serde_json::to_value(&n).unwrap();
        assert_eq!(v["type"], "file");
        assert_eq!(v["size"], 3);
        assert!(v.get("subtree").is_none());
        let mut bad = v.clone();
        bad.as_object_mut().unwrap().remove("chunks");
        let e = serde_json::from_value::<Node>(bad).unwrap_err().to_string();
        assert!(e.contains("missing chunks"), "{e}");
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
            assert!(Tree::decode_cached(&t.encode_cached()).is_err());
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
        assert!(Tree::decode_cached(&t.encode_cached()).is_err());
    }

    use proptest::prelude::*;

    /// What any decoded tree must be: names sorted, unique and safe.
    fn sorted_and_safe(t: &Tree) -> Result<(), TestCaseError> {
        for w in t.entries.windows(2) {
            prop_assert!(w[0].name < w[1].name);
        }
        for e in &t.entries {
            prop_assert!(e.name.is_safe_component(), "{:?}", e.name);
        }
        Ok(())
    }

    fn arb_node() -> impl Strategy<Value = Node> {
        let id = any::<[u8; 32]>().prop_map(BlobId);
        let name = proptest::collection::vec(any::<u8>(), 1..8);
        let kind = prop_oneof![
            (
                any::<u64>(),
                proptest::collection::vec((id.clone(), any::<u32>()), 0..4)
            )
                .prop_map(|(size, c)| NodeKind::File {
                    size,
                    chunks: c.into_iter().map(|(i, n)| ChunkRef(i, n)).collect(),
                }),
            id.prop_map(|subtree| NodeKind::Dir { subtree }),
            name.clone()
                .prop_map(|t| NodeKind::Symlink { target: Name(t) }),
            name.clone()
                .prop_map(|t| NodeKind::Hardlink { target: Name(t) }),
        ];
        let xattr = (name.clone(), "[0-9a-f]{0,8}").prop_map(|(n, value)| Xattr {
            name: Name(n),
            value,
        });
        (
            name,
            kind,
            (any::<u32>(), any::<u32>(), any::<u32>()),
            (any::<i64>(), any::<i64>(), any::<u64>()),
            proptest::collection::vec(xattr, 0..3),
        )
            .prop_map(
                |(name, kind, (mode, uid, gid), (mtime_ns, ctime_ns, inode), xattrs)| Node {
                    name: Name(name),
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime_ns,
                    ctime_ns,
                    inode,
                    xattrs,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Fuzzing the tree decoder: arbitrary bytes and damaged JSON are
        /// errors, never panics; whatever decodes has only safe, sorted names.
        #[test]
        fn tree_decoder_never_panics_and_keeps_names_safe(
            junk in proptest::collection::vec(any::<u8>(), 0..300),
            name in proptest::collection::vec(any::<u8>(), 0..12),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let _ = Tree::decode(&junk);
            let t = Tree {
                entries: vec![node(&name, NodeKind::Symlink { target: Name(b"x".to_vec()) })],
            };
            let mut b = serde_json::to_vec(&t).unwrap();
            for (i, x) in &flips {
                let n = b.len();
                b[i.index(n)] = *x;
            }
            if let Ok(t) = Tree::decode(&b) {
                sorted_and_safe(&t)?;
            }
        }

        /// The catalog's compact form gives back the tree it was made of,
        /// every field and kind; damaged or truncated, it is an error, never
        /// a panic, and never a tree with unsafe names.
        #[test]
        fn compact_form_round_trips_and_rejects_damage(
            nodes in proptest::collection::vec(arb_node(), 0..6),
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut entries: Vec<Node> = nodes
                .into_iter()
                .filter(|n| n.name.is_safe_component())
                .collect();
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let t = Tree { entries };
            let b = t.encode_cached();
            prop_assert_eq!(Tree::decode_cached(&b).unwrap(), t.clone());
            let short = &b[..cut.index(b.len())];
            prop_assert!(Tree::decode_cached(short).is_err());
            let mut bad = b.clone();
            for (i, x) in &flips {
                let n = bad.len();
                bad[i.index(n)] = *x;
            }
            if let Ok(d) = Tree::decode_cached(&bad) {
                sorted_and_safe(&d)?;
            }
        }
    }
}
