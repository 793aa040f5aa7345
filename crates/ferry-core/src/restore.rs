//! Restore: from the vault back into files under a target directory, which
//! may be empty or may hold an earlier restore (the final delta).
//!
//! Plan, fetch, scatter, finish, a batch of directories (about
//! [`BATCH_FILES`] files) at a time, so memory does not grow with the number
//! of files; the trees are loaded and decoded ahead of the walk on another
//! task:
//! 1. Walk the snapshot's trees beside the target. Per file, decide:
//!    - **unchanged**: the target's memory ([`crate::target`]) says ferry left
//!      this very content there and the file's size, mtime, ctime and inode
//!      still match: nothing is read or written;
//!    - **patch**: a large file (>= 1 MiB) of which at most half changed:
//!      only the changed chunks are written, in place (plus a truncate or an
//!      extension). The changed chunks come from the previous snapshot's
//!      chunk list when the memory vouches for the file, else from reading
//!      the target and hashing it at the new chunk boundaries;
//!    - **fresh**: written under a temporary name (`.ferry-<random>.tmp`, in
//!      its own directory, created O_EXCL|O_NOFOLLOW) and renamed into place,
//!      so a crash never leaves a half-written file under its real name.
//!
//!    Entries of the target the snapshot does not have are deleted with
//!    `delete`, else counted.
//! 2. Group the chunks to write by pack. Each pack is fetched once (a few
//!    ranged reads covering the needed blobs, several packs at a time); each
//!    blob is decrypted, verified against its id and written with positioned
//!    writes to every place that needs it. All-zero chunks of fresh files are
//!    not written: they stay holes (sparse files).
//! 3. Metadata, renames and the target's memory of the batch's files; after
//!    the last batch, hard links and directory metadata, deepest first, and
//!    the memory names the snapshot the target now holds.
//! 4. With `verify`: every file is read back and hashed against the
//!    snapshot.
//!
//! Nothing is written outside the target: every name from a tree must be one
//! plain path component, and directories are created, never followed
//! through symlinks.

pub mod ahead;
mod listing;
pub mod objects;

use std::collections::{HashMap, HashSet};
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use crate::catalog::{BlobLocation, Catalog, CatalogError};
use crate::codec::ObjectCipher;
use crate::error::{Error, Result};
use crate::id::{BlobId, IdHasher, PackId};
use crate::manifest::{ChunkRef, Name, Node, NodeKind, SnapshotRecord, Tree};
use crate::pack::PackEntry;
use crate::progress::Progress;
use crate::target::{TargetFile, TargetState, content_id};
use crate::vault::{Vault, pack_path};
use listing::{DirView, Found};

/// Files smaller than this are rewritten whole (temp + rename) when they
/// changed; larger ones may be patched in place.
pub const PATCH_MIN: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Packs fetched at once.
    pub packs_in_flight: usize,
    /// Remove target entries the snapshot does not have.
    pub delete: bool,
    /// Read every file back and check it against the snapshot.
    pub verify: bool,
    /// Do not trust the target's memory: compare existing files by content.
    pub reread_target: bool,
    /// Take no vault lock (a read-only vault). A prune running at the same
    /// time may then delete what this restore is about to read.
    pub no_lock: bool,
    /// Files planned and written per batch (see [`BATCH_FILES`]).
    pub batch_files: usize,
    /// The target checked ahead against the snapshot it holds (see
    /// [`ahead`]): subdirectories in place whole are not planned again.
    pub checked: Option<Arc<ahead::Checked>>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            packs_in_flight: 8,
            delete: false,
            verify: false,
            reread_target: false,
            no_lock: false,
            batch_files: BATCH_FILES,
            checked: None,
        }
    }
}

/// Seconds, bytes and files per phase: the downtime breakdown.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct RestorePhases {
    /// Walking trees and comparing with the target.
    pub plan_s: f64,
    /// Fetching packs and writing chunks.
    pub transfer_s: f64,
    /// Metadata, renames, links, deletions.
    pub finish_s: f64,
    pub verify_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct RestoreSummary {
    pub snapshot_id: String,
    pub volume: String,
    /// Regular files (and hard links) in the snapshot.
    pub files: u64,
    pub dirs: u64,
    /// Directories found in place whole by the check that ran beside the
    /// snapshot (`ferry sync`, a cutover), so not planned again.
    #[serde(default)]
    pub dirs_checked_in_place: u64,
    /// Directories planned from what that check found in them (not listed
    /// or stat'ed again).
    #[serde(default)]
    pub dirs_listed_ahead: u64,
    /// Files whose content was written (fresh, patched, relinked).
    pub files_written: u64,
    /// Files already equal to the snapshot: nothing written.
    pub files_unchanged: u64,
    /// Files patched in place (only changed chunks written).
    pub files_patched: u64,
    /// Target entries removed because the snapshot does not have them.
    pub files_deleted: u64,
    /// Target entries the snapshot does not have, left in place (no --delete).
    pub extra_entries: u64,
    /// Bytes written into the target.
    pub bytes_written: u64,
    /// Bytes of existing target files read to find what changed.
    pub bytes_compared: u64,
    pub bytes_fetched: u64,
    pub packs_fetched: u64,
    pub duration_s: f64,
    pub phases: RestorePhases,
    /// The cutover report: plan, fetch, write, finish and verify, with
    /// their windows, bytes, files and vault objects (see [`crate::phase`]).
    pub report: Vec<crate::phase::Phase>,
    /// Metadata that could not be applied (xattrs, ownership), counted.
    pub warnings: u64,
    /// Files read back and found equal (with --verify).
    pub files_verified: u64,
    /// When `report`'s clock started: a sync puts the restore's phases on
    /// its own timeline from this, not from when it called the restore
    /// (the lock and the target's memory come in between).
    #[serde(skip)]
    pub started: Option<Instant>,
}

/// Where scatter writes a file's chunks, and whether it is a new file (all
/// holes) or an existing one patched in place.
#[derive(Debug)]
pub struct WriteTarget {
    pub(crate) path: PathBuf,
    /// The real name, for messages (`path` may be a temporary name).
    pub(crate) dest: PathBuf,
    pub(crate) fresh: bool,
    /// A new file not made yet: see [`Creation`].
    pub(crate) create: Option<Creation>,
}

/// A new file under its temporary name is made by the first chunk written
/// to it, on whichever scatter thread that is, not by the plan: the plan
/// then only walks trees, and the inode allocations (most of a small file's
/// cost) run on every core, with one open per file instead of two. The
/// finish makes the files no chunk was written to (empty, or all zeros).
#[derive(Debug, Default)]
pub(crate) struct Creation {
    /// Set once, by the thread that made the file (or failed to: errno).
    made: std::sync::OnceLock<std::result::Result<(), i32>>,
    /// A zero chunk was left as a hole: the finish sets the file's length,
    /// as a trailing hole has no write to extend the file.
    holes: std::sync::atomic::AtomicBool,
}

/// Makes a new file under our temporary name: never an existing one, never
/// through a symlink.
fn create_tmp(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens an existing file for writing, never through a symlink.
fn open_for_write(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens a file for scatter's writes, making it first if it is new.
fn open_target(t: &WriteTarget) -> std::io::Result<File> {
    let Some(c) = &t.create else {
        return open_for_write(&t.path);
    };
    let mut made_here = None;
    let made = c.made.get_or_init(|| match create_tmp(&t.path) {
        Ok(h) => {
            made_here = Some(h);
            Ok(())
        }
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
    });
    match (made_here, made) {
        (Some(h), _) => Ok(h),
        (None, Ok(())) => open_for_write(&t.path),
        (None, Err(code)) => Err(std::io::Error::from_raw_os_error(*code)),
    }
}

/// After the transfer: a new file exists under its temporary name with its
/// full length.
fn settle_created(t: &WriteTarget, size: u64) -> Result<()> {
    let Some(c) = &t.create else {
        return Ok(());
    };
    let h = match c.made.get() {
        None => create_tmp(&t.path),
        Some(Ok(())) if c.holes.load(std::sync::atomic::Ordering::Relaxed) => {
            open_for_write(&t.path)
        }
        Some(Ok(())) => return Ok(()),
        Some(Err(code)) => Err(std::io::Error::from_raw_os_error(*code)),
    }
    .map_err(|e| Error::io(&t.path, e))?;
    if size > 0 {
        h.set_len(size).map_err(|e| Error::io(&t.path, e))?;
    }
    Ok(())
}

/// One file to write. `write` is shared with the transfer (no copy of its
/// two paths per file); `write.dest` is the real name.
struct FilePlan {
    write: Arc<WriteTarget>,
    rel: Vec<u8>,
    node: Node,
}

#[derive(Default)]
struct Plan {
    files: Vec<FilePlan>,
    /// Equal content already in place, with metadata or memory to fix.
    unchanged: Vec<Unchanged>,
    /// Files already right in every way the memory vouches for: nothing
    /// to do but count them (a final delta's plan is mostly these).
    in_place: u64,
    /// Directories not planned: checked ahead, in place whole.
    dirs_ahead: u64,
    listed_ahead: u64,
    dirs: Vec<(PathBuf, Node)>,
    symlinks: Vec<(PathBuf, Node)>,
    hardlinks: Vec<(PathBuf, Name)>,
    /// Chunk id → every (file index, offset) that needs it.
    needs: HashMap<BlobId, Vec<(u32, u64)>>,
    dir_count: u64,
    deleted: u64,
    extra: u64,
    patched: u64,
    bytes_compared: u64,
    /// Bytes the transfer will write (for the progress bar).
    bytes_planned: u64,
}

/// A file whose content is already right.
struct Unchanged {
    path: PathBuf,
    rel: Vec<u8>,
    node: Node,
    md: Metadata,
    /// The target's memory already vouches for it (no new row needed).
    known: bool,
    /// Its extended attributes differ from the snapshot's (an xattr-only
    /// change moves no mtime, so the metadata check would miss it).
    xattrs_stale: bool,
}

/// Whether `path`'s extended attributes differ from `node`'s.
fn xattrs_differ(path: &Path, node: &Node) -> bool {
    crate::source::read_xattrs(path).map_or(true, |x| x != node.xattrs)
}

/// Removes the user and trusted attributes `node` does not have (security
/// and system ones belong to the target system: SELinux labels, ACLs).
fn drop_stale_xattrs(path: &Path, node: &Node) -> u64 {
    let Ok(names) = xattr::list(path) else {
        return 0;
    };
    let mut warnings = 0;
    for n in names {
        let name = Name::from_os(&n);
        let ours = name.0.starts_with(b"user.") || name.0.starts_with(b"trusted.");
        if ours && !node.xattrs.iter().any(|x| x.name == name) && xattr::remove(path, &n).is_err() {
            warnings += 1;
        }
    }
    warnings
}

fn random_tmp_name() -> String {
    let mut b = [0u8; 8];
    crate::keys::fill_random(&mut b);
    format!(".ferry-{}.tmp", hex::encode(b))
}

fn is_our_tmp(name: &[u8]) -> bool {
    name.starts_with(b".ferry-") && name.ends_with(b".tmp") && name.len() == 7 + 16 + 4
}

fn join_safe(dir: &Path, name: &Name) -> Result<PathBuf> {
    if !name.is_safe_component() {
        return Err(Error::Invalid(format!(
            "unsafe name {:?} in snapshot",
            name.display()
        )));
    }
    Ok(dir.join(name.as_os()))
}

fn join_rel(rel: &[u8], name: &Name) -> Vec<u8> {
    let mut r = rel.to_vec();
    if !r.is_empty() {
        r.push(b'/');
    }
    r.extend_from_slice(&name.0);
    r
}

/// Removes whatever is at `path` (a directory with its contents), never
/// following a symlink.
fn remove_any(path: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let r = if md.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    r.map_err(|e| Error::io(path, e))
}

/// Creates a directory, or accepts an existing real directory (never a
/// symlink to one).
fn ensure_dir(path: &Path) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let md = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
            if md.is_dir() {
                Ok(())
            } else {
                Err(Error::io(
                    path,
                    std::io::Error::other("exists and is not a directory"),
                ))
            }
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

pub(crate) fn chunk_offsets(chunks: &[ChunkRef]) -> impl Iterator<Item = (u64, &ChunkRef)> {
    chunks.iter().scan(0u64, |off, c| {
        let at = *off;
        *off += c.1 as u64;
        Some((at, c))
    })
}

/// Which chunks of `new` are not already at their offset in the target,
/// judged from the chunk list of what the target holds (no reading).
pub(crate) fn changed_by_list(old: &[ChunkRef], new: &[ChunkRef]) -> Vec<bool> {
    let have: HashSet<(u64, BlobId, u32)> =
        chunk_offsets(old).map(|(o, c)| (o, c.0, c.1)).collect();
    chunk_offsets(new)
        .map(|(o, c)| !have.contains(&(o, c.0, c.1)))
        .collect()
}

/// Which chunks of `new` differ from the target file, by reading it and
/// hashing each range with the vault's id key.
/// `None` when the target's file may not be opened (its mode shuts us
/// out): it is then written whole under a temporary name and renamed over,
/// which needs only the directory's permission, as rsync does.
fn readable<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn changed_by_reading(
    path: &Path,
    size: u64,
    new: &[ChunkRef],
    ids: &IdHasher,
) -> Result<(Vec<bool>, u64)> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    let mut read = 0u64;
    let mut out = Vec::with_capacity(new.len());
    for (off, c) in chunk_offsets(new) {
        if off + c.1 as u64 > size {
            out.push(true);
            continue;
        }
        buf.resize(c.1 as usize, 0);
        f.read_exact_at(&mut buf, off)
            .map_err(|e| Error::io(path, e))?;
        read += c.1 as u64;
        out.push(ids.id(&buf) != c.0);
    }
    Ok((out, read))
}

/// A directory's tree and the tree the target last got at the same place.
type TreePair = (BlobId, Tree, Option<(BlobId, Tree)>);

/// Trees loaded ahead of the planner that may wait (a few directories).
const TREES_AHEAD: usize = 32;

/// Files (to write or already in place) a restore plans before it writes
/// them, by default: its memory per file is held for one batch at a time. A batch ends
/// with a directory, so one directory larger than this is one batch.
/// Packs mix the files written at the same time, so a pack whose files fall
/// in two batches is fetched twice: batches are large enough that few do.
pub const BATCH_FILES: usize = 32_768;

/// Directories whose trees (and the target's old trees) are asked of the
/// catalog in one call.
const TREES_PER_CALL: usize = 64;

/// Loads the snapshot's trees, each beside the tree the target last got at
/// the same place, ahead of the planner and in the order it walks them
/// (depth first, in the snapshot's order), on another core: loading and decoding
/// trees was half the planning time of a final delta.
fn prefetch_trees(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    root: BlobId,
    old_root: Option<BlobId>,
    opts: RestoreOptions,
) -> (
    tokio::sync::mpsc::Receiver<Result<TreePair>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(TREES_AHEAD);
    let task = tokio::spawn(async move {
        let load = |id: BlobId| {
            let (vault, catalog) = (vault.clone(), catalog.clone());
            async move { crate::sync::load_tree(&vault, catalog.as_ref(), &id).await }
        };
        let mut stack: Vec<(BlobId, Option<BlobId>, Vec<u8>)> = vec![(root, old_root, Vec::new())];
        // Trees of the directories walked next, fetched together: one
        // catalog call (a round trip, with a coordinator) for many
        // directories, their subdirectories too, a few calls at once. At
        // most `TREES_HELD_MAX` (and a call's worth) are held.
        let mut ahead = Ahead {
            trees: HashMap::new(),
            asked: HashSet::new(),
            in_flight: HashSet::new(),
            calls: tokio::task::JoinSet::new(),
            catalog: catalog.clone(),
        };
        while let Some((next, next_old, _)) = stack.last() {
            let (next, next_old) = (*next, *next_old);
            loop {
                let unasked: Vec<BlobId> = std::iter::once(next)
                    .chain(next_old)
                    .filter(|i| !ahead.trees.contains_key(i) && !ahead.asked.contains(i))
                    .collect();
                if !unasked.is_empty() {
                    let mut ids = unasked;
                    // The planner waits: what it needs next comes first, up
                    // to twice the bound (calls that went past a directory
                    // in flight may have filled it with later trees).
                    if ahead.asked.len() < 2 * TREES_HELD_MAX {
                        ids.extend(next_unfetched(&stack, &ahead.trees, &ahead.asked, &opts).0);
                    }
                    ahead.ask(ids);
                }
                if ahead.answered(&next) && next_old.is_none_or(|o| ahead.answered(&o)) {
                    break;
                }
                ahead.wait().await;
            }
            let Some((tree_id, old_id, rel)) = stack.pop() else {
                break;
            };
            let tree = match ahead.take(&tree_id) {
                Some(t) => t,
                None => match load(tree_id).await {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
            };
            let old = match old_id {
                // Unchanged directory: the same listing, parsed once.
                Some(id) if id == tree_id => Some((id, tree.clone())),
                Some(id) => match ahead.take(&id) {
                    Some(t) => Some((id, t)),
                    None => load(id).await.ok().map(|t| (id, t)),
                },
                None => None,
            };
            // Pushed last first, so popped in the snapshot's order.
            for node in tree.entries.iter().rev() {
                if let NodeKind::Dir { subtree } = &node.kind {
                    let child_rel = join_rel(&rel, &node.name);
                    if skipped(&opts, &child_rel, subtree).is_some() {
                        continue;
                    }
                    let old_sub = match old.as_ref().and_then(|(_, o)| o.entry(&node.name.0)) {
                        Some(Node {
                            kind: NodeKind::Dir { subtree },
                            ..
                        }) => Some(*subtree),
                        _ => None,
                    };
                    stack.push((*subtree, old_sub, child_rel));
                }
            }
            ahead.top_up(&stack, &opts);
            if tx.send(Ok((tree_id, tree, old))).await.is_err() {
                return;
            }
        }
    });
    (rx, task)
}

/// Trees fetched ahead of their turn, at most: the prefetch's memory.
const TREES_HELD_MAX: usize = 512;

/// Catalog calls for trees in flight at once, at most: over a link with
/// real latency the planner would otherwise wait a round trip per
/// [`TREES_PER_CALL`] directories.
const TREE_CALLS_IN_FLIGHT: usize = 4;

/// The restore prefetch's trees: fetched, and asked for.
struct Ahead {
    trees: HashMap<BlobId, Tree>,
    /// Asked for and not taken yet: in flight, fetched, or answered as not
    /// cached (then read from the vault in their turn).
    asked: HashSet<BlobId>,
    /// Asked for by a call still in flight.
    in_flight: HashSet<BlobId>,
    calls: tokio::task::JoinSet<(Vec<BlobId>, HashMap<BlobId, Tree>)>,
    catalog: Arc<dyn Catalog>,
}

impl Ahead {
    fn answered(&self, id: &BlobId) -> bool {
        self.trees.contains_key(id) || (self.asked.contains(id) && !self.in_flight.contains(id))
    }

    fn ask(&mut self, mut ids: Vec<BlobId>) {
        ids.sort_unstable();
        ids.dedup();
        self.asked.extend(ids.iter().copied());
        self.in_flight.extend(ids.iter().copied());
        let catalog = self.catalog.clone();
        self.calls.spawn_blocking(move || {
            // Not cached (or not answered): read from the vault in its turn.
            let found = crate::sync::cached_trees(catalog.as_ref(), &ids).unwrap_or_default();
            (ids, found)
        });
    }

    fn answer(&mut self, r: Result<(Vec<BlobId>, HashMap<BlobId, Tree>), tokio::task::JoinError>) {
        if let Ok((ids, found)) = r {
            for i in &ids {
                self.in_flight.remove(i);
            }
            self.trees.extend(found);
        }
        if self.calls.is_empty() {
            // A call that died took its ids with it.
            self.in_flight.clear();
        }
    }

    /// Waits for a call in flight to answer.
    async fn wait(&mut self) {
        match self.calls.join_next().await {
            Some(r) => self.answer(r),
            None => self.in_flight.clear(),
        }
    }

    fn take(&mut self, id: &BlobId) -> Option<Tree> {
        self.asked.remove(id);
        self.trees.remove(id)
    }

    /// Asks for more of the planner's next trees while calls are free and
    /// the bound allows: full calls, or a smaller one when none is in
    /// flight, so that a fast catalog still gets few large calls.
    fn top_up(&mut self, stack: &[(BlobId, Option<BlobId>, Vec<u8>)], opts: &RestoreOptions) {
        while let Some(r) = self.calls.try_join_next() {
            self.answer(r);
        }
        while self.calls.len() < TREE_CALLS_IN_FLIGHT
            && self.asked.len() + 2 * TREES_PER_CALL <= TREES_HELD_MAX
        {
            let (ids, dirs) = next_unfetched(stack, &self.trees, &self.asked, opts);
            let worth =
                dirs == TREES_PER_CALL || (self.calls.is_empty() && dirs >= TREES_PER_CALL / 4);
            if !worth {
                break;
            }
            self.ask(ids);
        }
    }
}

/// The trees to ask for next (new and old) in the planner's order, as far as
/// it is known: below the trees already fetched too, so that one call asks
/// for grandchildren, not only one directory's children. `stack` ends with
/// the next directory, whose tree is not fetched.
fn next_unfetched(
    stack: &[(BlobId, Option<BlobId>, Vec<u8>)],
    ahead: &HashMap<BlobId, Tree>,
    asked: &HashSet<BlobId>,
    opts: &RestoreOptions,
) -> (Vec<BlobId>, usize) {
    let n = TREES_PER_CALL;
    // Bounded work per call, whatever the width of a directory.
    let mut todo: Vec<(BlobId, Option<BlobId>, Vec<u8>)> =
        stack[stack.len().saturating_sub(4 * n)..].to_vec();
    let (mut out, mut dirs, mut visited) = (Vec::new(), 0, 0);
    while let Some((id, old, rel)) = todo.pop() {
        visited += 1;
        if dirs >= n || visited > 16 * n {
            break;
        }
        let Some(tree) = ahead.get(&id) else {
            // Asked for already: what lies below is not known yet.
            if asked.contains(&id) {
                continue;
            }
            dirs += 1;
            out.push(id);
            out.extend(old.filter(|o| *o != id && !ahead.contains_key(o) && !asked.contains(o)));
            continue;
        };
        let old_tree = old.and_then(|o| ahead.get(&o));
        let mut next = Vec::new();
        for node in &tree.entries {
            if let NodeKind::Dir { subtree } = &node.kind {
                let child_rel = join_rel(&rel, &node.name);
                if skipped(opts, &child_rel, subtree).is_some() {
                    continue;
                }
                let old_sub = match old_tree.and_then(|o| o.entry(&node.name.0)) {
                    Some(Node {
                        kind: NodeKind::Dir { subtree },
                        ..
                    }) => Some(*subtree),
                    _ => None,
                };
                next.push((*subtree, old_sub, child_rel));
                if next.len() >= 4 * n {
                    break;
                }
            }
        }
        todo.extend(next.into_iter().rev());
    }
    (out, dirs)
}

/// A subdirectory the restore need not plan: checked ahead and in place
/// whole, with the very tree the snapshot has there.
fn skipped(opts: &RestoreOptions, rel: &[u8], subtree: &BlobId) -> Option<ahead::Whole> {
    if opts.reread_target {
        return None;
    }
    opts.checked.as_ref()?.whole(rel, subtree)
}

struct Walker<'a> {
    vault: &'a Vault,
    state: &'a dyn TargetState,
    opts: &'a RestoreOptions,
    /// Whether ownership is restored (see [`meta_differs`]).
    is_root: bool,
}

/// Directories still to plan: (tree id, path, path from the target).
type WalkStack = Vec<(BlobId, PathBuf, Vec<u8>)>;

impl Walker<'_> {
    /// Plans whole directories from `stack` until the batch holds
    /// `batch_files` files or the walk is done (then true); `trees` yields
    /// the snapshot's trees in the order this walk pops them (see
    /// [`prefetch_trees`]).
    async fn plan(
        &self,
        stack: &mut WalkStack,
        trees: &mut tokio::sync::mpsc::Receiver<Result<TreePair>>,
        plan: &mut Plan,
    ) -> Result<bool> {
        // Files in place hold no memory, so they do not fill a batch.
        while plan.files.len() + plan.unchanged.len() < self.opts.batch_files.max(1) {
            let Some((tree_id, dir, rel)) = stack.pop() else {
                return Ok(true);
            };
            let (loaded_id, tree, old) = trees
                .recv()
                .await
                .ok_or_else(|| Error::Internal("tree loader stopped".into()))??;
            if loaded_id != tree_id {
                return Err(Error::Internal("tree loader out of step".into()));
            }
            let old_node =
                |name: &Name| -> Option<Node> { old.as_ref()?.1.entry(&name.0).cloned() };
            // A directory the check ahead recorded against the tree the
            // target holds is not listed again.
            let listed = match (&old, &self.opts.checked) {
                (Some((old_id, _)), Some(c)) if !self.opts.reread_target => c.listed(&rel, old_id),
                _ => None,
            };
            let mut view = match (listed, &old) {
                (Some(l), Some((_, old_tree))) => {
                    plan.listed_ahead += 1;
                    DirView::checked(l, old_tree)
                }
                _ => DirView::read(&dir, &rel, self.state, self.opts.reread_target)?,
            };
            let mut subdirs = Vec::new();
            for node in tree.entries {
                let path = join_safe(&dir, &node.name)?;
                let child_rel = join_rel(&rel, &node.name);
                if let NodeKind::Dir { subtree } = &node.kind {
                    // Checked ahead, in place whole: the prefetcher skips
                    // it too (the same test, see `skipped`).
                    if let Some(w) = skipped(self.opts, &child_rel, subtree) {
                        view.take(&node, &path);
                        plan.in_place += w.files;
                        plan.dir_count += w.dirs + 1;
                        plan.dirs_ahead += w.dirs + 1;
                        continue;
                    }
                }
                let md = match view.take(&node, &path) {
                    Found::InPlace => {
                        plan.in_place += 1;
                        continue;
                    }
                    Found::Dir => None,
                    Found::Stat(md) => Some(md),
                    Found::Nothing => None,
                };
                match &node.kind {
                    NodeKind::Dir { subtree } => {
                        if md.as_ref().is_some_and(|m| !m.is_dir()) {
                            remove_any(&path)?;
                        }
                        ensure_dir(&path)?;
                        plan.dir_count += 1;
                        subdirs.push((*subtree, path.clone(), child_rel));
                        plan.dirs.push((path, node));
                    }
                    NodeKind::File { .. } => {
                        let old = old_node(&node.name);
                        let known = view.known(&child_rel, self.state)?;
                        self.plan_file(path, child_rel, node, md, old, known.as_ref(), plan)?;
                    }
                    NodeKind::Symlink { .. } => plan.symlinks.push((path, node)),
                    NodeKind::Hardlink { target } => plan.hardlinks.push((path, target.clone())),
                }
            }
            // Popped in the snapshot's order, as the prefetcher loads them:
            // a batch then needs the packs the snapshot wrote at the time.
            stack.extend(subdirs.into_iter().rev());
            for name in view.rest() {
                let path = dir.join(Name(name.clone()).as_os());
                if is_our_tmp(&name) {
                    // Left by an interrupted restore: ours to remove.
                    remove_any(&path)?;
                } else if self.opts.delete {
                    remove_any(&path)?;
                    plan.deleted += 1;
                } else {
                    plan.extra += 1;
                }
            }
        }
        Ok(stack.is_empty())
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_file(
        &self,
        path: PathBuf,
        rel: Vec<u8>,
        node: Node,
        md: Option<Metadata>,
        old: Option<Node>,
        known: Option<&TargetFile>,
        plan: &mut Plan,
    ) -> Result<()> {
        let NodeKind::File { size, chunks } = &node.kind else {
            return Ok(());
        };
        let content = content_id(chunks);
        let mut changed: Option<Vec<bool>> = None;
        match &md {
            Some(m) if m.is_file() => {
                let known = known.filter(|s| s.matches(m));
                if known.as_ref().is_some_and(|k| k.content == content) {
                    // The memory vouches that the target holds what the
                    // previous snapshot had, xattrs included.
                    let xattrs_stale = match &old {
                        Some(o) => o.xattrs != node.xattrs,
                        None => xattrs_differ(&path, &node),
                    };
                    if !xattrs_stale && !meta_differs(m, &node, self.is_root) {
                        plan.in_place += 1;
                        return Ok(());
                    }
                    plan.unchanged.push(Unchanged {
                        path,
                        rel,
                        node,
                        md: m.clone(),
                        known: true,
                        xattrs_stale,
                    });
                    return Ok(());
                }
                let old_chunks = match (&known, old.map(|o| o.kind)) {
                    (Some(k), Some(NodeKind::File { chunks: oc, .. }))
                        if content_id(&oc) == k.content =>
                    {
                        Some(oc)
                    }
                    _ => None,
                };
                if *size >= PATCH_MIN && m.len() >= PATCH_MIN {
                    changed = match old_chunks {
                        Some(oc) => Some(changed_by_list(&oc, chunks)),
                        None => {
                            readable(changed_by_reading(&path, m.len(), chunks, self.vault.ids()))?
                                .map(|(c, read)| {
                                    plan.bytes_compared += read;
                                    c
                                })
                        }
                    };
                } else if old_chunks.is_none() && m.len() == *size {
                    // Small file, unknown to the memory: equal content needs
                    // no write, only the memory updated.
                    let compared = if *size == 0 {
                        Some((Vec::new(), 0))
                    } else {
                        readable(changed_by_reading(&path, m.len(), chunks, self.vault.ids()))?
                    };
                    let (c, read) = compared.unwrap_or((vec![true], 0));
                    plan.bytes_compared += read;
                    if !c.contains(&true) {
                        plan.unchanged.push(Unchanged {
                            xattrs_stale: xattrs_differ(&path, &node),
                            path,
                            rel,
                            node,
                            md: m.clone(),
                            known: false,
                        });
                        return Ok(());
                    }
                }
            }
            Some(_) => remove_any(&path)?,
            None => {}
        }
        let changed_bytes = |c: &[bool]| -> u64 {
            chunks
                .iter()
                .zip(c)
                .filter(|(_, ch)| **ch)
                .map(|(k, _)| k.1 as u64)
                .sum()
        };
        let idx = plan.files.len() as u32;
        match changed {
            Some(c) if !c.contains(&true) && md.as_ref().is_some_and(|m| m.len() == *size) => {
                plan.unchanged.push(Unchanged {
                    xattrs_stale: xattrs_differ(&path, &node),
                    path,
                    rel,
                    node,
                    md: md.clone().expect("compared, so it exists"),
                    known: false,
                });
            }
            Some(c)
                if changed_bytes(&c) * 2 <= *size
                    && let Some(f) =
                        readable(open_for_write(&path).map_err(|e| Error::io(&path, e)))? =>
            {
                // Patch in place: the memory forgets the file first, so a
                // crash mid-patch is caught by the next run.
                self.state.forget(std::slice::from_ref(&rel))?;
                f.set_len(*size).map_err(|e| Error::io(&path, e))?;
                plan.bytes_planned += changed_bytes(&c);
                for ((off, ch), need) in chunk_offsets(chunks).zip(&c) {
                    if *need {
                        plan.needs.entry(ch.0).or_default().push((idx, off));
                    }
                }
                plan.patched += 1;
                plan.files.push(FilePlan {
                    write: Arc::new(WriteTarget {
                        path: path.clone(),
                        dest: path,
                        fresh: false,
                        create: None,
                    }),
                    rel,
                    node,
                });
            }
            _ => {
                let tmp = path
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(random_tmp_name());
                plan.files.push(FilePlan {
                    write: Arc::new(WriteTarget {
                        path: tmp,
                        dest: path,
                        fresh: true,
                        create: Some(Creation::default()),
                    }),
                    rel,
                    node: node.clone(),
                });
                plan.bytes_planned += *size;
                for (off, ch) in chunk_offsets(chunks) {
                    plan.needs.entry(ch.0).or_default().push((idx, off));
                }
            }
        }
        Ok(())
    }
}

/// One restore at a time into a target, on this machine: two would remove
/// each other's temporary files and leave a mix of both snapshots. The
/// lock is on the target directory itself (`flock`), so it holds between
/// processes whatever their state directories (two agents sharing a root)
/// and goes with the process, however it ends.
fn lock_target(target: &Path) -> Result<File> {
    let dir = File::open(target).map_err(|e| Error::io(target, e))?;
    match dir.try_lock() {
        Ok(()) => Ok(dir),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Invalid(format!(
            "{} is being restored by another process: wait for it to end",
            target.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(target, e)),
    }
}

/// An empty snapshot restored with `delete` would empty the target: what a
/// source that is an empty mount point (its volume not mounted) looks like
/// at a cutover. Refused before anything is touched; emptying a target on
/// purpose is a job for `rm`.
async fn refuse_emptying(
    vault: &Vault,
    catalog: &dyn Catalog,
    root: &BlobId,
    target: &Path,
) -> Result<()> {
    if !crate::sync::load_tree(vault, catalog, root)
        .await?
        .entries
        .is_empty()
    {
        return Ok(());
    }
    let held = std::fs::read_dir(target)
        .map_err(|e| Error::io(target, e))?
        .filter_map(|e| e.ok())
        .filter(|e| !is_our_tmp(e.file_name().as_encoded_bytes()))
        .count();
    if held == 0 {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "the snapshot is empty (was its source an empty directory, a volume not mounted?) and \
         --delete would empty {} ({held} entries): nothing was changed; to empty it on purpose, \
         delete its contents yourself",
        target.display()
    )))
}

/// Restores `snap` into `target` (created if missing; may hold an earlier
/// restore, which is updated in place).
pub async fn restore(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    state: Arc<dyn TargetState>,
    snap: &SnapshotRecord,
    target: &Path,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    if snap.block {
        return locked(&vault, &catalog, opts, async {
            crate::block::restore_block(
                vault.clone(),
                catalog.clone(),
                state,
                snap,
                target,
                opts,
                progress,
            )
            .await
        })
        .await;
    }
    let record = Box::pin(std::future::ready(Ok(snap.clone())));
    restore_committing(
        vault, catalog, state, snap.root, record, target, opts, progress,
    )
    .await
}

/// The committed record of a snapshot whose trees are already in the
/// catalog.
pub type Committing = std::pin::Pin<Box<dyn Future<Output = Result<SnapshotRecord>> + Send>>;

/// Restores a directory snapshot that may still be committing: its trees
/// (from `root` down) are all in the catalog, its last packs may still be
/// uploading. `ferry sync` plans the restore meanwhile (listing, stat and
/// deletions of the target; temporary files); nothing is fetched before
/// `record` yields the committed snapshot, and should it fail, the restore
/// stops there with its temporary files removed. Patched files are already
/// forgotten by the target's memory then, so the next run checks them.
#[allow(clippy::too_many_arguments)]
pub async fn restore_committing(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    state: Arc<dyn TargetState>,
    root: BlobId,
    record: Committing,
    target: &Path,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    let (v, c) = (vault.clone(), catalog.clone());
    locked(
        &v,
        &c,
        opts,
        restore_locked(vault, catalog, state, root, record, target, opts, progress),
    )
    .await
}

/// Runs a restore under the vault's shared lock (or without it, after a
/// catalog sync, with `no_lock`).
async fn locked<T>(
    vault: &Arc<Vault>,
    catalog: &Arc<dyn Catalog>,
    opts: &RestoreOptions,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    if opts.no_lock {
        crate::sync::sync_catalog(vault, catalog.as_ref(), false).await?;
        return work.await;
    }
    crate::lock::shared(
        vault,
        catalog.as_ref(),
        "restore",
        crate::lock::SHARED_WAIT,
        work,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn restore_locked(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    state: Arc<dyn TargetState>,
    root: BlobId,
    record: Committing,
    target: &Path,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    let mut record = Some(record);
    let mut snap: Option<SnapshotRecord> = None;
    let started = Instant::now();
    std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    // The target itself may be a link to a directory (a volume mounted
    // elsewhere and reached through a link): it is followed, this once;
    // nothing under it ever is.
    let resolved = match std::fs::symlink_metadata(target) {
        Ok(md) if md.file_type().is_symlink() => {
            Some(std::fs::canonicalize(target).map_err(|e| Error::io(target, e))?)
        }
        _ => None,
    };
    let target = resolved.as_deref().unwrap_or(target);
    ensure_dir(target)?;
    let _only_one = lock_target(target)?;
    if opts.delete {
        refuse_emptying(&vault, catalog.as_ref(), &root, target).await?;
    }
    let old_root = match state.last_snapshot()? {
        Some(id) => catalog
            .snapshots()?
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.root),
        None => None,
    };
    let walker = Walker {
        vault: &vault,
        state: state.as_ref(),
        opts,
        is_root: effective_uid() == 0,
    };
    let (mut trees, loader) =
        prefetch_trees(vault.clone(), catalog.clone(), root, old_root, opts.clone());
    let mut stack: WalkStack = vec![(root, target.to_path_buf(), Vec::new())];
    let mut summary = RestoreSummary {
        started: Some(started),
        ..Default::default()
    };
    // Kept to the end: directory metadata goes on deepest first once every
    // file is in place, and a hard link's first name may come in a later
    // batch. One entry per directory or link, not per file.
    let mut dirs: Vec<(PathBuf, Node)> = Vec::new();
    let mut hardlinks: Vec<(PathBuf, Name)> = Vec::new();
    let (mut fetch, mut write) = (None::<crate::phase::Phase>, None::<crate::phase::Phase>);
    let (mut bytes_compared, mut finished) = (0, 0u64);
    let mut plan_end_s: f64;
    let mut failed: Vec<PathBuf> = Vec::new();
    let mut pack_errors: Vec<String> = Vec::new();
    // Batch by batch: plan some directories, fetch and write their files,
    // rename them into place. What a restore holds per file lives only as
    // long as its batch: millions of files need no more memory than
    // thousands.
    loop {
        let plan_start = Instant::now();
        let mut plan = Plan::default();
        let mut planned = walker.plan(&mut stack, &mut trees, &mut plan).await;
        summary.phases.plan_s += plan_start.elapsed().as_secs_f64();
        plan_end_s = started.elapsed().as_secs_f64();
        // Nothing is fetched before the snapshot is committed.
        if planned.is_ok()
            && let Some(r) = record.take()
        {
            match r.await {
                Ok(s) if s.block || s.root != root => {
                    planned = Err(Error::Internal(format!(
                        "snapshot {} is not the directory tree being restored",
                        s.id
                    )))
                }
                Ok(s) => {
                    summary.snapshot_id = s.id.clone();
                    summary.volume = s.volume.clone();
                    snap = Some(s);
                }
                Err(e) => planned = Err(e),
            }
        }
        let done = match planned {
            Ok(done) => done,
            Err(e) => {
                for f in plan.files.iter().filter(|f| f.write.fresh) {
                    let _ = std::fs::remove_file(&f.write.path);
                }
                // The loader may wait on a full channel: dropping it stops it.
                drop(trees);
                let _ = loader.await;
                return Err(e);
            }
        };
        progress.add_total(plan.files.len() as u64, plan.bytes_planned);

        let transfer_start = Instant::now();
        let files: Vec<Arc<WriteTarget>> = plan.files.iter().map(|f| f.write.clone()).collect();
        let needs = std::mem::take(&mut plan.needs);
        let t = transfer(
            &vault,
            catalog.as_ref(),
            files,
            needs,
            opts.packs_in_flight,
            &progress,
            started,
        )
        .await?;
        summary.phases.transfer_s += transfer_start.elapsed().as_secs_f64();
        summary.files +=
            (plan.files.len() + plan.unchanged.len() + plan.hardlinks.len()) as u64 + plan.in_place;
        summary.dirs += plan.dir_count;
        summary.dirs_checked_in_place += plan.dirs_ahead;
        summary.dirs_listed_ahead += plan.listed_ahead;
        summary.files_unchanged += plan.unchanged.len() as u64 + plan.in_place;
        summary.files_patched += plan.patched;
        summary.files_deleted += plan.deleted;
        summary.extra_entries += plan.extra;
        summary.bytes_written += t.bytes_written;
        summary.bytes_fetched += t.bytes_fetched;
        summary.packs_fetched += t.packs_fetched;
        bytes_compared += plan.bytes_compared;
        pack_errors.extend(t.pack_errors);
        fetch = Some(merge_phase(fetch, t.fetch));
        write = Some(merge_phase(write, t.write));

        let finish_start = Instant::now();
        dirs.append(&mut plan.dirs);
        hardlinks.append(&mut plan.hardlinks);
        let (failures, st) = (t.failures, state.clone());
        let fin = tokio::task::spawn_blocking(move || {
            finish_files(&plan, failures, st.as_ref()).map(|f| (f, plan.deleted))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let (fin, deleted) = fin;
        summary.files_written += fin.written;
        summary.warnings += fin.warnings;
        finished += fin.written + deleted;
        failed.extend(fin.failed);
        summary.phases.finish_s += finish_start.elapsed().as_secs_f64();
        if done {
            break;
        }
    }
    drop(trees);
    loader.await.map_err(|e| Error::Internal(e.to_string()))?;
    summary.bytes_compared = bytes_compared;

    let snap = snap.expect("the first batch awaited it");
    let finish_start = Instant::now();
    let fin = {
        let (target, root_node, state) =
            (target.to_path_buf(), snap.root_node.clone(), state.clone());
        let snap_id = failed.is_empty().then(|| snap.id.clone());
        tokio::task::spawn_blocking(move || {
            finish_tree(
                &hardlinks,
                &dirs,
                &target,
                &root_node,
                state.as_ref(),
                snap_id.as_deref(),
            )
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??
    };
    summary.files_written += fin.written;
    summary.warnings += fin.warnings;
    failed.extend(fin.failed);
    let finish_tree_s = finish_start.elapsed().as_secs_f64();
    summary.phases.finish_s += finish_tree_s;
    let finish_end_s = started.elapsed().as_secs_f64();
    summary.report = vec![
        crate::phase::span("plan", 0.0, plan_end_s, bytes_compared, summary.files, 0),
        fetch.unwrap_or_default(),
        write.unwrap_or_default(),
        crate::phase::span(
            "finish",
            (finish_end_s - summary.phases.finish_s).max(0.0),
            finish_end_s,
            0,
            finished + fin.written,
            0,
        ),
    ];
    if !failed.is_empty() {
        let mut names: Vec<String> = failed
            .iter()
            .map(|p| p.strip_prefix(target).unwrap_or(p).display().to_string())
            .collect();
        names.sort();
        let more = names.len().saturating_sub(5);
        names.truncate(5);
        pack_errors.sort();
        pack_errors.dedup();
        let cause = pack_errors
            .first()
            .cloned()
            .unwrap_or_else(|| "data missing".into());
        return Err(Error::RestoreFailed {
            target: target.to_path_buf(),
            summary: format!(
                "{cause}; {} file(s) not restored: {}{}",
                failed.len(),
                names.join(", "),
                if more > 0 {
                    format!(" (+{more} more)")
                } else {
                    String::new()
                }
            ),
        });
    }
    if opts.verify {
        let t = Instant::now();
        let (ok, bad, read) = verify(&vault, catalog.as_ref(), &snap, target).await?;
        summary.phases.verify_s = t.elapsed().as_secs_f64();
        summary.files_verified = ok;
        let end_s = started.elapsed().as_secs_f64();
        summary.report.push(crate::phase::span(
            "verify",
            end_s - summary.phases.verify_s,
            end_s,
            read,
            ok + bad.len() as u64,
            0,
        ));
        if !bad.is_empty() {
            let rels: Vec<Vec<u8>> = bad
                .iter()
                .map(|p| p.trim_start_matches('/').as_bytes().to_vec())
                .collect();
            state.forget(&rels)?;
            let more = bad.len().saturating_sub(10);
            return Err(Error::VerifyFailed {
                target: target.to_path_buf(),
                count: bad.len(),
                paths: format!(
                    "{}{}",
                    bad.iter().take(10).cloned().collect::<Vec<_>>().join(", "),
                    if more > 0 {
                        format!(" (+{more} more)")
                    } else {
                        String::new()
                    }
                ),
            });
        }
    }
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// One phase over several batches: the earliest start, the latest end, the
/// sums. A batch where the phase did nothing does not move its window.
fn merge_phase(acc: Option<crate::phase::Phase>, p: crate::phase::Phase) -> crate::phase::Phase {
    let Some(mut a) = acc else { return p };
    let idle = |p: &crate::phase::Phase| p.seconds == 0.0 && p.bytes == 0 && p.objects == 0;
    if idle(&p) {
        return a;
    }
    if !idle(&a) {
        a.start_s = a.start_s.min(p.start_s);
        a.end_s = a.end_s.max(p.end_s);
    } else {
        (a.start_s, a.end_s) = (p.start_s, p.end_s);
    }
    a.seconds = a.end_s - a.start_s;
    a.bytes += p.bytes;
    a.files += p.files;
    a.objects += p.objects;
    a
}

/// Reads every file of the snapshot back from `target` and checks it chunk
/// by chunk; also sizes, links and types (see [`crate::compare`]).
/// Returns (files verified, paths that differ or are missing, bytes read).
pub async fn verify(
    vault: &Vault,
    catalog: &dyn Catalog,
    snap: &SnapshotRecord,
    target: &Path,
) -> Result<(u64, Vec<String>, u64)> {
    let c = crate::compare::compare_dir(vault, catalog, snap, target, &Default::default()).await?;
    let mut bad = c.missing;
    bad.extend(c.differing);
    bad.sort();
    Ok((c.files_equal, bad, c.bytes))
}

/// What fetching and scattering did.
pub(crate) struct Transfer {
    pub bytes_written: u64,
    pub bytes_fetched: u64,
    pub packs_fetched: u64,
    /// (file index, reason) for files that did not get all their data.
    pub failures: Vec<(u32, String)>,
    pub pack_errors: Vec<String>,
    /// Pack reads and chunk writes, for the cutover report.
    pub fetch: crate::phase::Phase,
    pub write: crate::phase::Phase,
}

/// Chunks located per catalog call.
const LOCATE_BATCH: usize = 1000;

/// Locate calls in flight at once, at most.
const LOCATE_CALLS: usize = 4;

/// Where each of `ids` is stored, a [`LOCATE_BATCH`] per call, a few calls
/// at once: with a coordinator a round trip away, a batch's worth of
/// chunks per round trip in turn was the transfer's first wait.
fn locate_all(catalog: &dyn Catalog, ids: &[BlobId]) -> Result<Vec<Vec<Option<BlobLocation>>>> {
    let mut out = Vec::new();
    for wave in ids.chunks(LOCATE_BATCH * LOCATE_CALLS) {
        let answers = std::thread::scope(|s| {
            let calls: Vec<_> = wave
                .chunks(LOCATE_BATCH)
                .map(|b| s.spawn(move || catalog.locate(b)))
                .collect();
            calls
                .into_iter()
                .map(|c| {
                    c.join()
                        .unwrap_or_else(|_| Err(CatalogError::msg("a locate call panicked")))
                })
                .collect::<Vec<_>>()
        });
        for a in answers {
            out.push(a?);
        }
    }
    Ok(out)
}

/// Fetches every pack that holds a needed chunk, once, `in_flight` at a
/// time, and writes each chunk wherever `needs` says.
pub(crate) async fn transfer(
    vault: &Arc<Vault>,
    catalog: &dyn Catalog,
    files: Vec<Arc<WriteTarget>>,
    needs: HashMap<BlobId, Vec<(u32, u64)>>,
    in_flight: usize,
    progress: &Arc<dyn Progress>,
    t0: Instant,
) -> Result<Transfer> {
    let started_s = t0.elapsed().as_secs_f64();
    let clocks = Arc::new(Clocks {
        fetch: crate::phase::PhaseClock::new(t0),
        write: crate::phase::PhaseClock::new(t0),
    });
    // Where is each chunk? Unknown chunks fail their files.
    let ids: Vec<BlobId> = needs.keys().copied().collect();
    let mut by_pack: HashMap<PackId, ([u8; 32], Vec<PackEntry>)> = HashMap::new();
    let mut t = Transfer {
        bytes_written: 0,
        bytes_fetched: 0,
        packs_fetched: 0,
        failures: Vec::new(),
        pack_errors: Vec::new(),
        fetch: Default::default(),
        write: Default::default(),
    };
    let files_with_data: HashSet<u32> = needs.values().flatten().map(|(f, _)| *f).collect();
    for (batch, located) in ids.chunks(LOCATE_BATCH).zip(locate_all(catalog, &ids)?) {
        for (id, loc) in batch.iter().zip(located) {
            match loc {
                Some(BlobLocation { pack, salt, entry }) => by_pack
                    .entry(pack)
                    .or_insert_with(|| (salt, Vec::new()))
                    .1
                    .push(entry),
                None => {
                    for (f, _) in &needs[id] {
                        t.failures
                            .push((*f, format!("chunk {} is not in the catalog", id.short())));
                    }
                }
            }
        }
    }
    let files = Arc::new(files);
    let needs = Arc::new(needs);
    let results: Vec<PackOutcome> = futures::stream::iter(by_pack)
        .map(|(pack, (salt, entries))| {
            let (vault, files, needs, progress, clocks) = (
                vault.clone(),
                files.clone(),
                needs.clone(),
                progress.clone(),
                clocks.clone(),
            );
            async move {
                restore_pack(
                    &vault,
                    pack,
                    salt,
                    entries,
                    &files,
                    &needs,
                    progress.as_ref(),
                    &clocks,
                )
                .await
            }
        })
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await;
    for r in results {
        t.bytes_written += r.bytes_written;
        t.bytes_fetched += r.bytes_fetched;
        t.packs_fetched += 1;
        if let Some((msg, affected)) = r.error {
            for f in affected {
                t.failures.push((f, msg.clone()));
            }
            t.pack_errors.push(msg);
        }
    }
    clocks.fetch.count(0, t.packs_fetched);
    clocks.write.count(files_with_data.len() as u64, 0);
    t.fetch = clocks.fetch.phase("fetch", started_s);
    t.write = clocks.write.phase("write", started_s);
    Ok(t)
}

/// The windows of a transfer's two overlapping phases.
struct Clocks {
    fetch: crate::phase::PhaseClock,
    write: crate::phase::PhaseClock,
}

struct PackOutcome {
    bytes_written: u64,
    bytes_fetched: u64,
    /// The reason, and the files that did not get their data.
    error: Option<(String, Vec<u32>)>,
}

/// Gaps smaller than this between needed blobs are read rather than
/// skipped: one request is cheaper than two.
const MAX_GAP: u64 = 512 * 1024;

/// A span (one ranged read) stops growing at this length. Restore memory is
/// packs in flight x this, not x the pack size; and buffers this small do
/// not push glibc's adaptive mmap threshold up to where freed 16 MiB
/// buffers stay in per-thread arenas (which made a full restore's RSS
/// several times the data in flight).
const MAX_SPAN: u64 = 2 * 1024 * 1024;

#[allow(clippy::too_many_arguments)]
async fn restore_pack(
    vault: &Vault,
    pack: PackId,
    salt: [u8; 32],
    mut entries: Vec<PackEntry>,
    files: &Arc<Vec<Arc<WriteTarget>>>,
    needs: &HashMap<BlobId, Vec<(u32, u64)>>,
    progress: &dyn Progress,
    clocks: &Arc<Clocks>,
) -> PackOutcome {
    entries.sort_by_key(|e| e.offset);
    let mut out = PackOutcome {
        bytes_written: 0,
        bytes_fetched: 0,
        error: None,
    };
    let affected = |entries: &[PackEntry]| -> Vec<u32> {
        let mut v: Vec<u32> = entries
            .iter()
            .flat_map(|e| needs[&e.id].iter().map(|(f, _)| *f))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    // Spans of nearby blobs, each fetched with one ranged read.
    let mut spans: Vec<(u64, u64, Vec<PackEntry>)> = Vec::new();
    for e in entries {
        let end = e.offset + e.stored_len as u64;
        match spans.last_mut() {
            Some((s_start, s_end, list))
                if e.offset <= *s_end + MAX_GAP && end - *s_start <= MAX_SPAN =>
            {
                *s_end = (*s_end).max(end);
                list.push(e);
            }
            _ => spans.push((e.offset, end, vec![e])),
        }
    }
    let cipher = Arc::new(ObjectCipher::new(vault.data_key(), &salt));
    for (i, (start, end, list)) in spans.iter().enumerate() {
        clocks.fetch.begin();
        let fetched = vault
            .get_range(&pack_path(&pack), *start..*end)
            .await
            .map_err(|e| crate::vault::missing_pack(&pack, e))
            .and_then(|b| {
                if b.len() as u64 == end - start {
                    Ok(b)
                } else {
                    Err(Error::DamagedPack {
                        pack: pack.to_hex(),
                        reason: "truncated".into(),
                    })
                }
            });
        let bytes = match fetched {
            Ok(b) => b,
            Err(e) => {
                let rest: Vec<PackEntry> = spans[i..].iter().flat_map(|s| s.2.clone()).collect();
                out.error = Some((e.to_string(), affected(&rest)));
                return out;
            }
        };
        out.bytes_fetched += bytes.len() as u64;
        clocks.fetch.end(bytes.len() as u64);
        let list_for_errors = list.clone();
        let (cipher, ids, list, start) =
            (cipher.clone(), vault.ids().clone(), list.clone(), *start);
        let files = files.clone();
        let needs_here: Vec<Vec<(u32, u64)>> = list.iter().map(|e| needs[&e.id].clone()).collect();
        let clocks = clocks.clone();
        let r = tokio::task::spawn_blocking(move || {
            clocks.write.begin();
            let sc = scatter(
                &cipher,
                &ids,
                &pack,
                start,
                &bytes,
                &list,
                &needs_here,
                &files,
            );
            clocks.write.end(sc.written);
            sc
        })
        .await;
        match r {
            Ok(sc) => {
                out.bytes_written += sc.written;
                progress.advance(sc.written);
                crate::telemetry::bytes_written(sc.written);
                let mut files: Vec<u32> = sc.failed_files.iter().map(|(f, _)| *f).collect();
                let bad: Vec<PackEntry> = sc
                    .failed_blobs
                    .iter()
                    .map(|(i, _)| list_for_errors[*i].clone())
                    .collect();
                files.extend(affected(&bad));
                let msg = sc
                    .failed_blobs
                    .first()
                    .map(|(_, m)| m)
                    .or(sc.failed_files.first().map(|(_, m)| m));
                if let Some(msg) = msg {
                    let prev = out.error.take().map(|(_, f)| f).unwrap_or_default();
                    files.extend(prev);
                    out.error = Some((msg.clone(), files));
                }
            }
            Err(e) => {
                let rest: Vec<PackEntry> = spans[i..].iter().flat_map(|s| s.2.clone()).collect();
                out.error = Some((format!("pack {}: {e}", pack.to_hex()), affected(&rest)));
                return out;
            }
        }
    }
    out
}

/// Decrypts the blobs of one span and writes each to every place that
/// needs it. A blob that fails (damaged) fails only the files that need it:
/// returns the bytes written and the failed blobs with their reasons.
#[allow(clippy::too_many_arguments)]
fn scatter(
    cipher: &ObjectCipher,
    ids: &crate::id::IdHasher,
    pack: &PackId,
    start: u64,
    bytes: &[u8],
    list: &[PackEntry],
    needs: &[Vec<(u32, u64)>],
    files: &[Arc<WriteTarget>],
) -> Scattered {
    // Only the file written last stays open: a span of small files holds
    // tens of thousands of blobs, and one descriptor each would run out
    // (EMFILE); a large file's chunks come one after another anyway.
    let mut open: Option<(u32, File)> = None;
    let mut out = Scattered {
        written: 0,
        failed_blobs: Vec::new(),
        failed_files: Vec::new(),
    };
    let mut dead: HashSet<u32> = HashSet::new();
    for (i, (e, places)) in list.iter().zip(needs).enumerate() {
        let from = (e.offset - start) as usize;
        let mut buf = bytes[from..from + e.stored_len as usize].to_vec();
        if let Err(err) = crate::pack::open_blob_with(cipher, ids, pack, e, &mut buf) {
            out.failed_blobs.push((i, err.to_string()));
            continue;
        }
        let zero = buf.iter().all(|b| *b == 0);
        for (f, off) in places {
            let t = &files[*f as usize];
            if dead.contains(f) {
                continue;
            }
            if zero && t.fresh {
                // A new file is all holes until written: zero runs stay holes.
                if let Some(c) = &t.create {
                    c.holes.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                continue;
            }
            if open.as_ref().is_none_or(|(g, _)| g != f) {
                open = None;
                match open_target(t) {
                    Ok(h) => open = Some((*f, h)),
                    Err(err) => {
                        dead.insert(*f);
                        out.failed_files
                            .push((*f, Error::io(&t.dest, err).to_string()));
                        continue;
                    }
                }
            }
            let (_, h) = open.as_ref().expect("opened above");
            // A write that fails (a full disk) fails that file only; the
            // message names the file by its real name.
            match h.write_all_at(&buf, *off) {
                Ok(()) => out.written += buf.len() as u64,
                Err(err) => {
                    dead.insert(*f);
                    open = None;
                    out.failed_files
                        .push((*f, Error::io(&t.dest, err).to_string()));
                }
            }
        }
    }
    out
}

/// What one span's scatter did.
struct Scattered {
    written: u64,
    /// Blobs (index in the span) that did not open, with the reason.
    failed_blobs: Vec<(usize, String)>,
    /// Files that could not be written, with the reason.
    failed_files: Vec<(u32, String)>,
}

struct Finished {
    written: u64,
    warnings: u64,
    failed: Vec<PathBuf>,
}

/// Threads that rename a batch's files into place.
const FINISH_THREADS: usize = 4;

/// What the target's memory will say of a file just put in place.
fn remember(path: &Path, rel: &[u8], node: &Node, memory: &mut Vec<TargetFile>) -> Result<()> {
    if let NodeKind::File { chunks, .. } = &node.kind {
        let md = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
        memory.push(TargetFile::from_md(rel.to_vec(), content_id(chunks), &md));
    }
    Ok(())
}

/// Renames a written file into place. A directory in its way (the
/// snapshot has a file where the target has a directory) is removed; that
/// is found by the rename failing, not by a lookup before every rename.
fn rename_over(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST)
            ) && std::fs::symlink_metadata(to).is_ok_and(|md| md.is_dir()) =>
        {
            remove_any(to)?;
            std::fs::rename(from, to).map_err(|e| Error::io(to, e))
        }
        r => r.map_err(|e| Error::io(to, e)),
    }
}

/// Some of a batch's written files (index in the plan, plan): metadata,
/// then the rename into place.
fn finish_part(
    files: &[(usize, &FilePlan)],
    failed: &HashSet<u32>,
    is_root: bool,
) -> Result<(Finished, Vec<TargetFile>)> {
    let mut out = Finished {
        written: 0,
        warnings: 0,
        failed: Vec::new(),
    };
    let mut memory = Vec::new();
    for (i, f) in files {
        if failed.contains(&(*i as u32)) {
            if f.write.fresh {
                let _ = std::fs::remove_file(&f.write.path);
            }
            out.failed.push(f.write.dest.clone());
            continue;
        }
        if let NodeKind::File { size, .. } = &f.node.kind {
            settle_created(&f.write, *size)?;
        }
        out.warnings += apply_meta(&f.write.path, &f.node, is_root, false)?;
        if !f.write.fresh {
            out.warnings += drop_stale_xattrs(&f.write.path, &f.node);
        }
        if f.write.fresh {
            rename_over(&f.write.path, &f.write.dest)?;
        }
        remember(&f.write.dest, &f.rel, &f.node, &mut memory)?;
        out.written += 1;
    }
    Ok((out, memory))
}

/// A batch's files: metadata, renames into place, symlinks, and the
/// target's memory of them.
fn finish_files(
    plan: &Plan,
    failures: Vec<(u32, String)>,
    state: &dyn TargetState,
) -> Result<Finished> {
    let failed: HashSet<u32> = failures.iter().map(|(f, _)| *f).collect();
    let is_root = effective_uid() == 0;
    // Renaming over a file makes ext4 start writing the new one out and
    // free (and, mounted with `discard`, discard) the old one's blocks
    // while we wait: on several threads those waits overlap.
    let files: Vec<(usize, &FilePlan)> = plan.files.iter().enumerate().collect();
    let per = files.len().div_ceil(FINISH_THREADS).max(1);
    let parts: Vec<Result<(Finished, Vec<TargetFile>)>> = std::thread::scope(|s| {
        let failed = &failed;
        let handles: Vec<_> = files
            .chunks(per)
            .map(|part| s.spawn(move || finish_part(part, failed, is_root)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a finishing thread panicked".into())))
            })
            .collect()
    });
    let mut out = Finished {
        written: 0,
        warnings: 0,
        failed: Vec::new(),
    };
    let mut memory: Vec<TargetFile> = Vec::new();
    for part in parts {
        let (done, remembered) = part?;
        out.written += done.written;
        out.warnings += done.warnings;
        out.failed.extend(done.failed);
        memory.extend(remembered);
    }
    for u in &plan.unchanged {
        let fix = meta_differs(&u.md, &u.node, is_root) || u.xattrs_stale;
        if fix {
            out.warnings += apply_meta(&u.path, &u.node, is_root, false)?;
            out.warnings += drop_stale_xattrs(&u.path, &u.node);
        }
        if fix || !u.known {
            remember(&u.path, &u.rel, &u.node, &mut memory)?;
        }
    }
    for (path, node) in &plan.symlinks {
        let NodeKind::Symlink { target: t } = &node.kind else {
            continue;
        };
        let same = std::fs::read_link(path).is_ok_and(|l| Name::from_os(l.as_os_str()) == *t);
        if !same {
            remove_any(path)?;
            std::os::unix::fs::symlink(t.as_os(), path).map_err(|e| Error::io(path, e))?;
        }
        let md = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
        if !same || meta_differs(&md, node, is_root) {
            out.warnings += apply_meta(path, node, is_root, true)?;
        }
    }
    state.update(&memory, None)?;
    Ok(out)
}

/// After every batch: hard links, directory metadata (deepest first) and
/// the root's; then the target's memory names the snapshot it holds
/// (`snap_id`, when every file made it).
fn finish_tree(
    hardlinks: &[(PathBuf, Name)],
    dirs: &[(PathBuf, Node)],
    target: &Path,
    root: &Node,
    state: &dyn TargetState,
    snap_id: Option<&str>,
) -> Result<Finished> {
    let mut out = Finished {
        written: 0,
        warnings: 0,
        failed: Vec::new(),
    };
    let is_root = effective_uid() == 0;
    for (path, rel) in hardlinks {
        // Every directory on the way must be a real one: a symlink (even
        // one this restore made) must not lead the link outside the target.
        let mut src = target.to_path_buf();
        let mut through_symlink = false;
        for comp in rel.0.split(|b| *b == b'/') {
            if src != target && !std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
                through_symlink = true;
                break;
            }
            src = join_safe(&src, &Name(comp.to_vec()))?;
        }
        if through_symlink {
            out.failed.push(path.clone());
            continue;
        }
        let Ok(src_md) = std::fs::symlink_metadata(&src).map(|m| m.is_file().then_some(m)) else {
            out.failed.push(path.clone());
            continue;
        };
        let Some(src_md) = src_md else {
            out.failed.push(path.clone());
            continue;
        };
        let same = std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.ino() == src_md.ino() && m.dev() == src_md.dev());
        if !same {
            remove_any(path)?;
            std::fs::hard_link(&src, path).map_err(|e| Error::io(path, e))?;
            out.written += 1;
        }
    }
    for (path, node) in dirs.iter().rev() {
        let md = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
        if meta_differs(&md, node, is_root) || xattrs_differ(path, node) {
            out.warnings += apply_meta(path, node, is_root, false)?;
            out.warnings += drop_stale_xattrs(path, node);
        }
    }
    let md = std::fs::symlink_metadata(target).map_err(|e| Error::io(target, e))?;
    if meta_differs(&md, root, is_root) {
        out.warnings += apply_meta(target, root, is_root, false)?;
    }
    state.update(&[], snap_id.filter(|_| out.failed.is_empty()))?;
    Ok(out)
}

/// Whether mode, mtime or (as root) ownership differ from the snapshot.
fn meta_differs(md: &Metadata, node: &Node, is_root: bool) -> bool {
    let mtime = crate::manifest::time_ns(md.mtime(), md.mtime_nsec());
    (md.mode() & 0o7777 != node.mode && !md.file_type().is_symlink())
        || mtime != node.mtime_ns
        || (is_root && (md.uid() != node.uid || md.gid() != node.gid))
}

pub(crate) fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective uid: no unsafe call.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

/// Applies xattrs, ownership (as root), mode and mtime. Returns the number
/// of warnings (metadata the target filesystem refused).
fn apply_meta(path: &Path, node: &Node, is_root: bool, symlink: bool) -> Result<u64> {
    let mut warnings = 0;
    for x in &node.xattrs {
        let value = hex::decode(&x.value).unwrap_or_default();
        if xattr::set(path, x.name.as_os(), &value).is_err() {
            warnings += 1;
        }
    }
    if is_root && std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid)).is_err() {
        warnings += 1;
    }
    let mtime = filetime::FileTime::from_unix_time(
        node.mtime_ns.div_euclid(1_000_000_000),
        node.mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    if !symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode))
            .map_err(|e| Error::io(path, e))?;
    }
    // One utimensat on the path, not following a symlink: `set_file_times`
    // opens the file to set its times (an open and a close per file, 4% of a
    // full restore's CPU) and would follow a symlink put in its place.
    filetime::set_symlink_file_times(path, mtime, mtime).map_err(|e| Error::io(path, e))?;
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefetch asks for the next directories in the planner's order,
    /// reaching below the trees it already holds (new and old side by
    /// side), a call's worth at most.
    #[test]
    fn the_tree_prefetch_reaches_below_the_trees_it_holds() {
        let id = |n: u8| BlobId([n; 32]);
        let dir = |name: &str, sub: BlobId| {
            crate::tree_ahead::tests::node(name, NodeKind::Dir { subtree: sub })
        };
        // New root 1: a (2: x 4, y 5), b 3. Old root 11: a (12: x 14), b 3.
        let mut ahead = HashMap::new();
        ahead.insert(
            id(1),
            Tree {
                entries: vec![dir("a", id(2)), dir("b", id(3))],
            },
        );
        ahead.insert(
            id(2),
            Tree {
                entries: vec![dir("x", id(4)), dir("y", id(5))],
            },
        );
        ahead.insert(
            id(11),
            Tree {
                entries: vec![dir("a", id(12)), dir("b", id(3))],
            },
        );
        ahead.insert(
            id(12),
            Tree {
                entries: vec![dir("x", id(14))],
            },
        );
        // The next directory is c (9, never snapshotted before); 1 after it.
        let stack = vec![
            (id(1), Some(id(11)), b"r".to_vec()),
            (id(9), None, b"c".to_vec()),
        ];
        let opts = RestoreOptions::default();
        // c, then below 1: a's x (new 4, old 14) and y (5), then b (3: the
        // same tree on both sides, asked once).
        assert_eq!(
            next_unfetched(&stack, &ahead, &HashSet::new(), &opts).0,
            vec![id(9), id(4), id(14), id(5), id(3)]
        );
        // A call's worth of directories at most, whatever is below.
        let wide = Tree {
            entries: (0..200u8)
                .map(|k| dir(&format!("d{k:03}"), id(k)))
                .collect(),
        };
        let ahead = HashMap::from([(id(250), wide)]);
        let stack = vec![
            (id(250), None, b"w".to_vec()),
            (id(251), None, b"v".to_vec()),
        ];
        let (ids, dirs) = next_unfetched(&stack, &ahead, &HashSet::new(), &opts);
        assert_eq!(dirs, TREES_PER_CALL);
        assert_eq!(ids.len(), TREES_PER_CALL);
        assert_eq!(ids[..3], [id(251), id(0), id(1)]);
    }

    /// Over a catalog a round trip away, the planner's tree prefetch keeps
    /// several calls in flight, and still yields the trees in the planner's
    /// order.
    #[test]
    fn the_planners_tree_calls_overlap_over_a_slow_catalog() {
        use crate::tree_ahead::tests::{TreeCatalog, build_root, test_vault};
        let (mut trees, mut order, mut old_order) = (HashMap::new(), vec![], vec![]);
        // More directories than the prefetch holds at once (512), each with
        // a new and an old tree: the target holds an older snapshot of the
        // same shape in which every directory differs.
        let dirs = [("a", 6, 4), ("b", 7, 3)];
        let root_id = build_root(&dirs, "", &mut trees, &mut order);
        let old_root_id = build_root(&dirs, "~", &mut trees, &mut old_order);
        assert_eq!(order.len(), 1 + 1555 + 400);

        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = tempfile::tempdir().unwrap();
        let vault = test_vault(&rt, d.path());
        let catalog = Arc::new(TreeCatalog {
            trees,
            delay: std::time::Duration::from_millis(20),
            ..Default::default()
        });
        let got: Vec<BlobId> = rt.block_on(async {
            let opts = RestoreOptions::default();
            let (mut rx, task) =
                prefetch_trees(vault, catalog.clone(), root_id, Some(old_root_id), opts);
            let mut got = vec![];
            while let Some(pair) = rx.recv().await {
                let (id, tree, old) = pair.unwrap();
                assert_eq!(tree, Tree::decode_cached(&catalog.trees[&id]).unwrap());
                let (old_id, old_tree) = old.expect("an old tree at every place");
                assert_eq!(old_id, old_order[got.len()].1);
                assert_eq!(
                    old_tree,
                    Tree::decode_cached(&catalog.trees[&old_id]).unwrap()
                );
                got.push(id);
            }
            task.await.unwrap();
            got
        });
        let want: Vec<BlobId> = order.iter().map(|o| o.1).collect();
        assert_eq!(got, want);
        let most = catalog
            .most_in_flight
            .load(std::sync::atomic::Ordering::SeqCst);
        let calls = catalog.calls.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most >= 2, "at most {most} call in flight");
        assert!(
            most <= TREE_CALLS_IN_FLIGHT as u64,
            "{most} calls in flight"
        );
        assert!(calls <= 60, "{calls} calls for {} directories", want.len());
    }

    /// A crafted snapshot whose hard link names a path through a symlink
    /// (which the same restore created) must not link a file from outside
    /// the target into it.
    #[test]
    fn a_hard_link_through_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (target, outside) = (dir.path().join("target"), dir.path().join("outside"));
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"not yours").unwrap();
        std::os::unix::fs::symlink(&outside, target.join("evil")).unwrap();
        let md = std::fs::symlink_metadata(&target).unwrap();
        let root = crate::source::node_from(
            Name(b".".to_vec()),
            &crate::source::Meta::from(&md),
            NodeKind::Dir {
                subtree: BlobId([0; 32]),
            },
            vec![],
        );
        let links = vec![(target.join("copy"), Name(b"evil/secret".to_vec()))];
        let fin = finish_tree(
            &links,
            &[],
            &target,
            &root,
            &crate::target::NoTargetState,
            Some("s"),
        )
        .unwrap();
        assert_eq!(fin.failed, vec![target.join("copy")]);
        assert!(std::fs::symlink_metadata(target.join("copy")).is_err());
        // A link through a real directory still works.
        std::fs::create_dir(target.join("d")).unwrap();
        std::fs::write(target.join("d/f"), b"ours").unwrap();
        let links = vec![(target.join("link"), Name(b"d/f".to_vec()))];
        let fin = finish_tree(
            &links,
            &[],
            &target,
            &root,
            &crate::target::NoTargetState,
            Some("s"),
        )
        .unwrap();
        assert!(fin.failed.is_empty());
        assert_eq!(std::fs::read(target.join("link")).unwrap(), b"ours");
    }
}
