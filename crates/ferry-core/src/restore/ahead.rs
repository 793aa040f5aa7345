//! Checking the target ahead of a restore, while the snapshot it will
//! restore is still being taken (`ferry sync`, a migration's cutover).
//!
//! Most of a final delta's plan is proving that files are already in
//! place: a listing, a `stat` and a memory lookup per file, one core's work
//! after the snapshot, with the other core idle. This walk does the same
//! proof for the tree the target holds (the snapshot its memory names)
//! beside the snapshot, and records each directory that is in place whole:
//! its listing is exactly the tree's, every file is one the memory vouches
//! for with unchanged metadata, and every subdirectory is in place too. The
//! restore then skips a subdirectory whose new tree id equals the one
//! checked here: same tree, same target, nothing to plan.
//!
//! A directory that is not in place whole (a final delta's changed ones)
//! is recorded too, a byte per entry: which entries of the checked tree the
//! listing held, which files were in place, which were directories, and the
//! names the tree lacks. Its plan then lists nothing and stats only what
//! changed, where it listed the directory and stat'ed every entry again.
//!
//! What changed in the target between this check and the restore goes
//! unseen by this restore, as a change after a plan's `stat` does; the next
//! run's check catches it (the memory no longer matches).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::error::Result;
use crate::id::BlobId;
use crate::manifest::{Node, NodeKind, Tree};
use crate::target::{TargetFile, TargetState, content_id};
use crate::tree_ahead::{TreeSource, TreesAhead};
use crate::vault::Vault;

/// Directories of the target that hold exactly what the checked tree says.
#[derive(Debug, Default)]
pub struct Checked {
    /// Path from the target root → the directory's tree id then, and what
    /// it holds (files, directories, everything under it).
    in_place: HashMap<Vec<u8>, Whole>,
    /// Path from the target root → the directories not in place whole.
    listed: HashMap<Vec<u8>, Listed>,
}

/// What the check found in a directory not in place whole.
#[derive(Debug)]
pub(crate) struct Listed {
    /// The tree it was checked against.
    pub(crate) tree: BlobId,
    /// Per entry of that tree, in its order.
    pub(crate) seen: Vec<Seen>,
    /// Names in the listing the tree lacks.
    pub(crate) extra: Vec<Vec<u8>>,
}

/// An entry of a checked tree, as the target's listing had it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not in the listing.
    Absent,
    /// There, but not known to be the tree's (stat it again).
    Other,
    /// A file the memory vouches holds the tree's entry, metadata included.
    FileInPlace,
    /// A real directory (its contents are its own record).
    Dir,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Whole {
    pub(crate) tree: BlobId,
    pub(crate) files: u64,
    pub(crate) dirs: u64,
}

impl Checked {
    /// The subdirectory at `rel` is in place whole if it was checked with
    /// tree `tree`.
    pub(crate) fn whole(&self, rel: &[u8], tree: &BlobId) -> Option<Whole> {
        self.in_place.get(rel).filter(|w| w.tree == *tree).copied()
    }

    /// What the listing of the directory at `rel` held, if it was checked
    /// against tree `tree`: `Some(None)` when it held that tree whole.
    pub(crate) fn listed(&self, rel: &[u8], tree: &BlobId) -> Option<Option<&Listed>> {
        if self.whole(rel, tree).is_some() {
            return Some(None);
        }
        self.listed.get(rel).filter(|l| l.tree == *tree).map(Some)
    }
}

/// Checks `target` against the snapshot its memory names, on a thread of
/// its own. `None` when there is nothing to check against (a first restore,
/// or a snapshot the catalog no longer has).
pub fn check_ahead(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    state: Arc<dyn TargetState>,
    target: PathBuf,
) -> std::thread::JoinHandle<Result<Option<Checked>>> {
    let rt = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let Some(held) = state.last_snapshot()? else {
            return Ok(None);
        };
        let Some(snap) = catalog.snapshots()?.into_iter().find(|s| s.id == held) else {
            return Ok(None);
        };
        if snap.block {
            return Ok(None);
        }
        let source = TreeSource {
            vault: vault.clone(),
            catalog: catalog.clone(),
            rt: rt.clone(),
        };
        let walk = Walk {
            vault: &vault,
            catalog: catalog.as_ref(),
            state: state.as_ref(),
            rt,
            is_root: super::effective_uid() == 0,
            trees: TreesAhead::start(source, snap.root),
        };
        let mut checked = Checked::default();
        let root = walk.tree(&snap.root)?;
        walk.dir(&snap.root, root, &target, Vec::new(), true, &mut checked)?;
        Ok(Some(checked))
    })
}

struct Walk<'a> {
    vault: &'a Vault,
    catalog: &'a dyn Catalog,
    state: &'a dyn TargetState,
    rt: tokio::runtime::Handle,
    is_root: bool,
    /// The held snapshot's trees, fetched ahead in this walk's order.
    trees: TreesAhead,
}

impl Walk<'_> {
    /// The tree `id`, the next this walk visits; read again directly (to
    /// name the error) if the prefetch could not read it.
    fn tree(&self, id: &BlobId) -> Result<Tree> {
        match self.trees.take(id) {
            Some(t) => Ok(t),
            None => self
                .rt
                .block_on(crate::sync::load_tree(self.vault, self.catalog, id)),
        }
    }

    /// Checks one directory and, after it, its subdirectories; records it
    /// if it is in place whole and returns what it holds. `meta_ok`: its
    /// own metadata (checked from its parent's listing) is the tree's; a
    /// directory is skipped by the restore, so it must be right too.
    fn dir(
        &self,
        id: &BlobId,
        tree: Tree,
        dir: &Path,
        rel: Vec<u8>,
        meta_ok: bool,
        checked: &mut Checked,
    ) -> Result<Option<Whole>> {
        let files = self.state.get_dir(&rel)?;
        let memory: HashMap<&[u8], &TargetFile> =
            files.iter().map(|f| (f.path.as_slice(), f)).collect();
        let mut whole = Whole {
            tree: *id,
            files: 0,
            dirs: 0,
        };
        let mut subdirs = Vec::new();
        let mut seen = Vec::with_capacity(tree.entries.len());
        // The listing (and the descriptor it holds) is dropped before the
        // subdirectories are walked.
        let (mut in_place, extra) = {
            let Ok(listing) = std::fs::read_dir(dir) else {
                return Ok(None);
            };
            let mut listing: HashMap<Vec<u8>, std::fs::DirEntry> = listing
                .filter_map(|e| e.ok())
                .map(|e| (e.file_name().into_encoded_bytes(), e))
                .collect();
            let mut ok = listing.len() == tree.entries.len();
            for node in &tree.entries {
                let entry = listing.remove(&node.name.0);
                let present = entry.is_some();
                let md = entry.and_then(|e| e.metadata().ok());
                let child_rel = super::join_rel(&rel, &node.name);
                let s = match (&node.kind, md) {
                    (NodeKind::Dir { subtree }, Some(md)) if md.is_dir() => {
                        let path = super::join_safe(dir, &node.name)?;
                        let meta_ok = !super::meta_differs(&md, node, self.is_root)
                            && !super::xattrs_differ(&path, node);
                        subdirs.push((*subtree, path, child_rel, meta_ok));
                        Seen::Dir
                    }
                    (NodeKind::File { .. }, Some(md)) if md.is_file() => {
                        whole.files += 1;
                        if self.file_in_place(&memory, &child_rel, node, &md) {
                            Seen::FileInPlace
                        } else {
                            ok = false;
                            Seen::Other
                        }
                    }
                    // Links, and anything not of the tree's kind, are left
                    // to the plan.
                    _ => {
                        ok = false;
                        if present { Seen::Other } else { Seen::Absent }
                    }
                };
                seen.push(s);
            }
            (ok, listing.into_keys().collect::<Vec<_>>())
        };
        for (subtree, path, child_rel, meta_ok) in subdirs {
            let sub = self.tree(&subtree)?;
            match self.dir(&subtree, sub, &path, child_rel, meta_ok, checked)? {
                Some(w) => {
                    whole.files += w.files;
                    whole.dirs += w.dirs + 1;
                }
                None => in_place = false,
            }
        }
        if !in_place || !meta_ok {
            let listed = Listed {
                tree: *id,
                seen,
                extra,
            };
            checked.listed.insert(rel, listed);
            return Ok(None);
        }
        checked.in_place.insert(rel, whole);
        Ok(Some(whole))
    }

    /// The memory vouches for this content at this path, the file's stat
    /// is the one it recorded, and its metadata is the tree's.
    fn file_in_place(
        &self,
        memory: &HashMap<&[u8], &TargetFile>,
        rel: &[u8],
        node: &Node,
        md: &std::fs::Metadata,
    ) -> bool {
        let NodeKind::File { chunks, .. } = &node.kind else {
            return false;
        };
        memory
            .get(rel)
            .is_some_and(|k| k.matches(md) && k.content == content_id(chunks))
            && !super::meta_differs(md, node, self.is_root)
    }
}

/// Waits for a check started with [`check_ahead`]; a failed check is no
/// check (the restore plans everything), never a failed restore.
pub fn finish(handle: std::thread::JoinHandle<Result<Option<Checked>>>) -> Option<Checked> {
    match handle.join() {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!("checking the target ahead failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("checking the target ahead panicked");
            None
        }
    }
}
