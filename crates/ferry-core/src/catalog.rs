//! The catalog seam: how the data path reaches the chunk index, packs,
//! snapshots and cached trees.
//!
//! The catalog is an index of the vault, never the only copy of anything:
//! everything in it can be rebuilt from the vault ([`crate::sync`]). Embedded
//! mode implements this trait over SQLite in-process; fleet mode implements
//! it over gRPC. Calls take batches so that a remote catalog costs one round
//! trip per batch, not per chunk.

use std::collections::HashSet;

use crate::id::{BlobId, PackId};
use crate::manifest::SnapshotRecord;
use crate::pack::{PackEntry, PackRecord};

/// A catalog failure, whatever the implementation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CatalogError(pub Box<dyn std::error::Error + Send + Sync>);

impl CatalogError {
    pub fn msg(s: impl Into<String>) -> Self {
        CatalogError(s.into().into())
    }
}

pub type CatalogResult<T> = Result<T, CatalogError>;

/// Where a blob is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: PackId,
    pub salt: [u8; 32],
    pub entry: PackEntry,
}

pub trait Catalog: Send + Sync {
    /// Whether each call is a round trip over a network (a coordinator):
    /// callers then keep several calls in flight instead of one at a time.
    fn is_remote(&self) -> bool {
        false
    }

    /// For each id, whether some recorded pack holds it.
    fn contains(&self, ids: &[BlobId]) -> CatalogResult<Vec<bool>>;

    /// For each id, where it is stored, if anywhere.
    fn locate(&self, ids: &[BlobId]) -> CatalogResult<Vec<Option<BlobLocation>>>;

    /// Records packs. Call only once they are durably in the vault.
    fn add_packs(&self, packs: &[PackRecord]) -> CatalogResult<()>;

    /// All recorded packs and their sizes.
    fn packs(&self) -> CatalogResult<Vec<(PackId, u64)>>;

    /// The ids of the blobs a pack holds.
    fn pack_blobs(&self, pack: &PackId) -> CatalogResult<Vec<BlobId>>;

    fn add_snapshot(&self, snap: &SnapshotRecord) -> CatalogResult<()>;

    /// All snapshots, oldest first.
    fn snapshots(&self) -> CatalogResult<Vec<SnapshotRecord>>;

    /// A cached tree blob (plaintext), if the catalog has it.
    fn tree(&self, id: &BlobId) -> CatalogResult<Option<Vec<u8>>>;

    /// Many cached trees at once, in the order of `ids`: a remote catalog
    /// answers in one round trip what a walk would ask one directory at a
    /// time.
    fn trees(&self, ids: &[BlobId]) -> CatalogResult<Vec<Option<Vec<u8>>>> {
        ids.iter().map(|id| self.tree(id)).collect()
    }

    fn put_tree(&self, id: &BlobId, data: &[u8]) -> CatalogResult<()>;

    /// Caches many trees at once: a snapshot makes hundreds, and a catalog
    /// that commits each on its own pays a commit (and a reset of every
    /// reader's cache) per directory.
    fn put_trees(&self, trees: &[(BlobId, Vec<u8>)]) -> CatalogResult<()> {
        trees
            .iter()
            .try_for_each(|(id, data)| self.put_tree(id, data))
    }

    /// Names of the vault's index and snapshot objects already imported.
    fn seen_objects(&self) -> CatalogResult<HashSet<String>>;

    fn mark_seen(&self, names: &[String]) -> CatalogResult<()>;

    /// Forgets snapshots whose records left the vault (`forget`).
    fn remove_snapshots(&self, ids: &[String]) -> CatalogResult<()>;

    /// Forgets packs deleted from the vault (`prune`) and every blob
    /// recorded in them, in one transaction.
    fn remove_packs(&self, packs: &[PackId]) -> CatalogResult<()>;

    /// Every recorded blob: its pack and its stored size (for `prune`).
    fn blob_sizes(&self) -> CatalogResult<Vec<(BlobId, PackId, u32)>>;
}
