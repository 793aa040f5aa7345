//! What a restore's plan knows of one target directory: either its listing,
//! read now with a `stat` per entry, or what the check ahead of a `ferry
//! sync` found there ([`super::ahead::Listed`]), so that only the entries
//! that changed are looked at again.

use std::collections::{HashMap, HashSet};
use std::fs::{DirEntry, Metadata};
use std::path::Path;

use super::ahead::{Listed, Seen};
use crate::error::{Error, Result};
use crate::manifest::{Node, NodeKind, Tree};
use crate::target::{TargetFile, TargetState};

/// One entry of the snapshot's tree, as the target has it.
pub(super) enum Found {
    /// Nothing there (or a link in the snapshot: its plan needs no stat).
    Nothing,
    /// A file the check ahead found holding this very entry.
    InPlace,
    /// A real directory, as the check ahead found it.
    Dir,
    Stat(Metadata),
}

pub(super) enum DirView<'a> {
    Read {
        entries: HashMap<Vec<u8>, DirEntry>,
        /// The target's memory of this directory's files.
        memory: HashMap<Vec<u8>, TargetFile>,
    },
    Checked {
        /// None: the check found the directory holding `old` whole.
        listed: Option<&'a Listed>,
        /// The tree `listed` was checked against.
        old: &'a Tree,
        taken: Vec<bool>,
        extra: HashSet<Vec<u8>>,
    },
}

impl<'a> DirView<'a> {
    /// Lists `dir` and loads its memory (none with `reread`).
    pub(super) fn read(
        dir: &Path,
        rel: &[u8],
        state: &dyn TargetState,
        reread: bool,
    ) -> Result<Self> {
        let memory = if reread {
            HashMap::new()
        } else {
            state
                .get_dir(rel)?
                .into_iter()
                .map(|f| (f.path.clone(), f))
                .collect()
        };
        // Each entry is looked up relative to the directory it was listed
        // from (`fstatat`), not by its whole path from the root.
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .map(|e| e.map(|e| (e.file_name().into_encoded_bytes(), e)))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(dir, e))?;
        Ok(DirView::Read { entries, memory })
    }

    /// What the check ahead found, standing in for the listing.
    pub(super) fn checked(listed: Option<&'a Listed>, old: &'a Tree) -> Self {
        DirView::Checked {
            listed,
            old,
            taken: vec![false; old.entries.len()],
            extra: listed
                .map(|l| l.extra.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// The entry of `node` (at `path`); each name is taken once.
    pub(super) fn take(&mut self, node: &Node, path: &Path) -> Found {
        let link = matches!(
            node.kind,
            NodeKind::Symlink { .. } | NodeKind::Hardlink { .. }
        );
        match self {
            DirView::Read { entries, .. } => match entries.remove(&node.name.0) {
                Some(e) if !link => e.metadata().map(Found::Stat).unwrap_or(Found::Nothing),
                _ => Found::Nothing,
            },
            DirView::Checked {
                listed,
                old,
                taken,
                extra,
            } => {
                let there = match old
                    .entries
                    .binary_search_by(|n| n.name.0.as_slice().cmp(&node.name.0))
                {
                    Ok(i) => {
                        taken[i] = true;
                        match (seen(*listed, old, i), &node.kind) {
                            (Seen::Absent, _) => false,
                            (Seen::FileInPlace, NodeKind::File { .. })
                                if old.entries[i] == *node =>
                            {
                                return Found::InPlace;
                            }
                            (Seen::Dir, NodeKind::Dir { .. }) => return Found::Dir,
                            _ => true,
                        }
                    }
                    Err(_) => extra.remove(&node.name.0),
                };
                if !there || link {
                    return Found::Nothing;
                }
                std::fs::symlink_metadata(path)
                    .map(Found::Stat)
                    .unwrap_or(Found::Nothing)
            }
        }
    }

    /// The memory of the file at `rel`, a child of this directory.
    pub(super) fn known(&self, rel: &[u8], state: &dyn TargetState) -> Result<Option<TargetFile>> {
        match self {
            DirView::Read { memory, .. } => Ok(memory.get(rel).cloned()),
            DirView::Checked { .. } => Ok(state.get_file(rel)?),
        }
    }

    /// The names in the directory the snapshot's tree does not have.
    pub(super) fn rest(self) -> Vec<Vec<u8>> {
        match self {
            DirView::Read { entries, .. } => entries.into_keys().collect(),
            DirView::Checked {
                listed,
                old,
                taken,
                extra,
            } => old
                .entries
                .iter()
                .enumerate()
                .filter(|(i, _)| !taken[*i] && seen(listed, old, *i) != Seen::Absent)
                .map(|(_, n)| n.name.0.clone())
                .chain(extra)
                .collect(),
        }
    }
}

/// What the check found for entry `i` of `old`; in a directory found whole
/// every entry is a file in place or a directory.
fn seen(listed: Option<&Listed>, old: &Tree, i: usize) -> Seen {
    match (listed, &old.entries[i].kind) {
        (Some(l), _) => l.seen[i],
        (None, NodeKind::Dir { .. }) => Seen::Dir,
        (None, _) => Seen::FileInPlace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::BlobId;
    use crate::manifest::{ChunkRef, Name};
    use crate::target::NoTargetState;

    fn node(name: &str, kind: NodeKind) -> Node {
        Node {
            name: Name(name.as_bytes().to_vec()),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 7,
            ctime_ns: 0,
            inode: 0,
            xattrs: vec![],
        }
    }

    fn file(name: &str, id: u8) -> Node {
        node(
            name,
            NodeKind::File {
                size: 1,
                chunks: vec![ChunkRef(BlobId([id; 32]), 1)],
            },
        )
    }

    /// Only what the check could not vouch for is stat'ed; every name the
    /// snapshot lacks is handed back, whether the old tree had it or not.
    #[test]
    fn a_checked_directory_is_read_from_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for n in ["a", "b", "c", "gone", "tmp"] {
            std::fs::write(d.join(n), b"x").unwrap();
        }
        std::fs::create_dir(d.join("sub")).unwrap();
        let sub = node(
            "sub",
            NodeKind::Dir {
                subtree: BlobId([9; 32]),
            },
        );
        let old = Tree {
            entries: vec![
                file("a", 1),
                file("b", 2),
                file("c", 3),
                file("gone", 4),
                file("missing", 5),
                sub.clone(),
            ],
        };
        let listed = Listed {
            tree: BlobId([0; 32]),
            seen: vec![
                Seen::FileInPlace,
                Seen::FileInPlace,
                Seen::Other,
                Seen::FileInPlace,
                Seen::Absent,
                Seen::Dir,
            ],
            extra: vec![b"tmp".to_vec()],
        };
        let mut view = DirView::checked(Some(&listed), &old);
        let state = NoTargetState;
        assert!(matches!(
            view.take(&file("a", 1), &d.join("a")),
            Found::InPlace
        ));
        // In place, but the snapshot's content is new: stat'ed.
        assert!(matches!(view.take(&file("b", 9), &d.join("b")), Found::Stat(m) if m.is_file()));
        assert!(matches!(
            view.take(&file("c", 3), &d.join("c")),
            Found::Stat(_)
        ));
        assert!(matches!(
            view.take(&file("missing", 5), &d.join("missing")),
            Found::Nothing
        ));
        assert!(matches!(view.take(&sub, &d.join("sub")), Found::Dir));
        // New in the snapshot, not in the listing: nothing there, no stat.
        std::fs::write(d.join("new"), b"made after the check").unwrap();
        assert!(matches!(
            view.take(&file("new", 6), &d.join("new")),
            Found::Nothing
        ));
        assert_eq!(view.known(b"a", &state).unwrap(), None);
        let mut rest = view.rest();
        rest.sort();
        assert_eq!(rest, vec![b"gone".to_vec(), b"tmp".to_vec()]);
    }

    /// A directory found whole needs no stat for entries the snapshot kept.
    #[test]
    fn a_directory_found_whole_is_read_from_its_tree() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b"), b"x").unwrap();
        let sub = node(
            "sub",
            NodeKind::Dir {
                subtree: BlobId([9; 32]),
            },
        );
        let old = Tree {
            entries: vec![file("a", 1), file("b", 2), file("c", 3), sub.clone()],
        };
        let mut view = DirView::checked(None, &old);
        assert!(matches!(
            view.take(&file("a", 1), &d.join("a")),
            Found::InPlace
        ));
        assert!(matches!(
            view.take(&file("b", 5), &d.join("b")),
            Found::Stat(_)
        ));
        assert!(matches!(view.take(&sub, &d.join("sub")), Found::Dir));
        assert_eq!(view.rest(), vec![b"c".to_vec()]);
    }

    /// Without a check, the listing is read: every name, stat'ed now.
    #[test]
    fn an_unchecked_directory_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a"), b"x").unwrap();
        std::fs::write(d.join("extra"), b"y").unwrap();
        let mut view = DirView::read(d, b"", &NoTargetState, false).unwrap();
        assert!(matches!(view.take(&file("a", 1), &d.join("a")), Found::Stat(m) if m.len() == 1));
        assert!(matches!(
            view.take(&file("b", 1), &d.join("b")),
            Found::Nothing
        ));
        assert_eq!(view.rest(), vec![b"extra".to_vec()]);
    }
}
