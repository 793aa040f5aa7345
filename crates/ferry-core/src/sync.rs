//! Keeping a catalog in step with its vault.
//!
//! The vault is the truth; the catalog is an index of it. On open, objects
//! the catalog has not seen (index objects and snapshot records written by
//! other processes or machines) are imported. A rebuild also reads the
//! header of every pack no index object covers (packs of an interrupted
//! snapshot), so nothing stored is ever forgotten. Prune records remove
//! the packs prune deleted; snapshot records gone from the vault (forget)
//! leave the catalog too.

use std::collections::{HashMap, HashSet};

use crate::catalog::{Catalog, CatalogError};
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId};
use crate::manifest::{IndexObject, SnapshotRecord, Tree};
use crate::vault::Vault;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SyncSummary {
    pub index_objects: u64,
    pub snapshots: u64,
    pub packs_from_headers: u64,
    pub prune_records: u64,
    pub snapshots_forgotten: u64,
    /// Index and snapshot objects that could not be read (damaged, or not
    /// ferry's): left out, and read again next time. A snapshot whose
    /// record is damaged is not listed; the packs a damaged index object
    /// described are learned from their own headers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<String>,
}

impl SyncSummary {
    /// Damaged snapshot records: what they reference is unknown, so nothing
    /// may be deleted as unreferenced while there are any.
    pub fn damaged_snapshots(&self) -> impl Iterator<Item = &String> {
        self.damaged.iter().filter(|d| d.starts_with("snapshots/"))
    }
}

/// One damaged object, named, for the summary and the log.
fn damaged(summary: &mut SyncSummary, object: &str, reason: &str) {
    tracing::warn!("vault object {object} is damaged and left out: {reason}");
    summary.damaged.push(format!("{object}: {reason}"));
}

/// Imports what the catalog has not seen. With `scan_packs`, also reads
/// the headers of packs the catalog does not know.
pub async fn sync_catalog(
    vault: &Vault,
    catalog: &dyn Catalog,
    scan_packs: bool,
) -> Result<SyncSummary> {
    let mut summary = SyncSummary::default();
    // Both asked at once: with a coordinator each is a round trip, and every
    // job starts here. The snapshots are what the catalog knew before the
    // listing: only those can have been forgotten elsewhere. A snapshot
    // committed while the vault is being listed (a restore that starts
    // before its snapshot commits syncs here) is in the catalog but not in
    // the listing, and must stay.
    let (seen, known) = std::thread::scope(|s| {
        let known = s.spawn(|| catalog.snapshots());
        let seen = catalog.seen_objects();
        let known = known
            .join()
            .unwrap_or_else(|_| Err(CatalogError::msg("listing snapshots panicked")));
        (seen, known)
    });
    let (seen, known) = (seen?, known?);
    let known: Vec<String> = known.into_iter().map(|s| s.id).collect();
    let mut new_seen = Vec::new();

    let index: Vec<String> = vault
        .list("index/")
        .await?
        .into_iter()
        .map(|o| o.location.to_string())
        .filter(|n| !seen.contains(n))
        .collect();
    // Packs prune deleted: never (re)learned from an older index object or
    // a leftover pack file. Seen prune records are read again only when
    // something could bring their packs back.
    let mut deleted: HashSet<PackId> = HashSet::new();
    let mut unseen_prunes = Vec::new();
    for obj in vault.list("prune/").await? {
        let name = obj.location.to_string();
        let is_new = !seen.contains(&name);
        if is_new || scan_packs || !index.is_empty() {
            let rec: PruneRecord = vault.get_meta(&name).await?;
            deleted.extend(rec.deleted.iter().copied());
            if is_new {
                unseen_prunes.push((name, rec));
            }
        }
    }
    // Deletions first: blobs a prune moved must not stay recorded in their
    // old packs (the first record of a blob wins).
    for (name, rec) in unseen_prunes {
        catalog.remove_packs(&rec.deleted)?;
        summary.prune_records += 1;
        new_seen.push(name);
    }
    let mut scan_packs = scan_packs;
    for name in index {
        let mut idx: IndexObject = match vault.get_meta(&name).await {
            Ok(idx) => idx,
            Err(Error::DamagedObject { object, reason }) => {
                // An index object only repeats what its packs' headers say:
                // those are read instead.
                damaged(&mut summary, &object, &reason);
                scan_packs = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        idx.packs.retain(|p| !deleted.contains(&p.id));
        catalog.add_packs(&idx.packs)?;
        summary.index_objects += 1;
        new_seen.push(name);
    }
    if scan_packs {
        let known: HashSet<PackId> = catalog.packs()?.into_iter().map(|(p, _)| p).collect();
        for obj in vault.list("packs/").await? {
            let name = obj.location.filename().unwrap_or_default();
            let Some(id) = PackId::from_hex(name) else {
                continue;
            };
            if known.contains(&id) || deleted.contains(&id) {
                continue;
            }
            match vault.read_pack_header(&id, obj.size).await {
                Ok(rec) => {
                    catalog.add_packs(&[rec])?;
                    summary.packs_from_headers += 1;
                }
                // A damaged pack is reported by `vault check`; a rebuild
                // records what it can.
                Err(Error::DamagedPack { pack, reason }) => {
                    tracing::warn!(%pack, %reason, "skipping damaged pack");
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut present = HashSet::new();
    for obj in vault.list("snapshots/").await? {
        let name = obj.location.to_string();
        present.insert(name.trim_start_matches("snapshots/").to_string());
        if seen.contains(&name) {
            continue;
        }
        let snap: SnapshotRecord = match vault.get_meta(&name).await {
            Ok(snap) => snap,
            // One damaged record must not hide the vault's other snapshots.
            Err(Error::DamagedObject { object, reason }) => {
                damaged(&mut summary, &object, &reason);
                continue;
            }
            Err(e) => return Err(e),
        };
        catalog.add_snapshot(&snap)?;
        summary.snapshots += 1;
        new_seen.push(name);
    }
    // Snapshots forgotten elsewhere.
    let gone: Vec<String> = known
        .into_iter()
        .filter(|id| !present.contains(id))
        .collect();
    if !gone.is_empty() {
        catalog.remove_snapshots(&gone)?;
        summary.snapshots_forgotten = gone.len() as u64;
    }
    if !new_seen.is_empty() {
        catalog.mark_seen(&new_seen)?;
    }
    Ok(summary)
}

/// What a prune deleted: written before the deletions start (the commit
/// point), so that every catalog forgets those packs, and a rebuild never
/// brings them back, even if the deletions were interrupted.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PruneRecord {
    pub time: String,
    pub deleted: Vec<PackId>,
}

/// Loads a tree blob: from the catalog's cache, else from the vault (and
/// caches it).
pub async fn load_tree(vault: &Vault, catalog: &dyn Catalog, id: &BlobId) -> Result<Tree> {
    let damaged = |reason| Error::DamagedObject {
        object: format!("tree {}", id.to_hex()),
        reason,
    };
    if let Some(b) = catalog.tree(id)? {
        return Tree::decode_cached(&b).map_err(damaged);
    }
    let loc = catalog
        .locate(&[*id])?
        .pop()
        .flatten()
        .ok_or_else(|| Error::MissingBlob { id: id.to_hex() })?;
    let b = vault.read_blob(&loc.pack, &loc.salt, &loc.entry).await?;
    let tree = Tree::decode(&b).map_err(damaged)?;
    catalog.put_tree(id, &tree.encode_cached())?;
    Ok(tree)
}

/// The trees of `ids` the catalog has cached, decoded, in one catalog call
/// (one round trip to a coordinator). Trees it lacks or cannot decode are
/// left out: [`load_tree`] reads those from the vault, or names the damage.
pub fn cached_trees(catalog: &dyn Catalog, ids: &[BlobId]) -> Result<HashMap<BlobId, Tree>> {
    let found = catalog.trees(ids)?;
    Ok(ids
        .iter()
        .zip(found)
        .filter_map(|(id, b)| Some((*id, Tree::decode_cached(&b?).ok()?)))
        .collect())
}

/// Finds a snapshot by `NAME`, `NAME@ID-PREFIX` or `NAME@latest`: the latest
/// of the volume when no id is given.
pub fn find_snapshot(catalog: &dyn Catalog, spec: &str) -> Result<SnapshotRecord> {
    let (volume, id) = match spec.split_once('@') {
        Some((v, id)) if id != "latest" => (v, Some(id)),
        Some((v, _)) => (v, None),
        None => (spec, None),
    };
    let all: Vec<SnapshotRecord> = catalog
        .snapshots()?
        .into_iter()
        .filter(|s| volume.is_empty() || s.volume == volume)
        .filter(|s| id.is_none_or(|p| s.id.starts_with(p)))
        .collect();
    match (id, all.len()) {
        (_, 0) => Err(Error::NoSnapshot { spec: spec.into() }),
        (Some(_), n) if n > 1 => Err(Error::AmbiguousSnapshot { spec: spec.into() }),
        _ => Ok(all
            .into_iter()
            .max_by_key(|s| s.time_ns)
            .expect("not empty")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{BlobLocation, CatalogResult};
    use crate::pack::PackRecord;
    use std::sync::Mutex;

    /// A snapshot's commit, run against the catalog's snapshots.
    type Commit = Box<dyn FnOnce(&Mutex<Vec<SnapshotRecord>>) + Send>;

    /// Snapshots and seen names in memory; on its first `snapshots()` call
    /// it runs `commit`, a snapshot's commit landing at that moment.
    struct RacingCatalog {
        snaps: Mutex<Vec<SnapshotRecord>>,
        seen: Mutex<HashSet<String>>,
        commit: Mutex<Option<Commit>>,
    }

    impl Catalog for RacingCatalog {
        fn contains(&self, _: &[BlobId]) -> CatalogResult<Vec<bool>> {
            unreachable!()
        }
        fn locate(&self, _: &[BlobId]) -> CatalogResult<Vec<Option<BlobLocation>>> {
            unreachable!()
        }
        fn add_packs(&self, _: &[PackRecord]) -> CatalogResult<()> {
            Ok(())
        }
        fn packs(&self) -> CatalogResult<Vec<(PackId, u64)>> {
            Ok(vec![])
        }
        fn pack_blobs(&self, _: &PackId) -> CatalogResult<Vec<BlobId>> {
            unreachable!()
        }
        fn add_snapshot(&self, snap: &SnapshotRecord) -> CatalogResult<()> {
            let mut s = self.snaps.lock().unwrap();
            if !s.iter().any(|x| x.id == snap.id) {
                s.push(snap.clone());
            }
            Ok(())
        }
        fn snapshots(&self) -> CatalogResult<Vec<SnapshotRecord>> {
            if let Some(commit) = self.commit.lock().unwrap().take() {
                commit(&self.snaps);
            }
            Ok(self.snaps.lock().unwrap().clone())
        }
        fn tree(&self, _: &BlobId) -> CatalogResult<Option<Vec<u8>>> {
            unreachable!()
        }
        fn put_tree(&self, _: &BlobId, _: &[u8]) -> CatalogResult<()> {
            unreachable!()
        }
        fn seen_objects(&self) -> CatalogResult<HashSet<String>> {
            Ok(self.seen.lock().unwrap().clone())
        }
        fn mark_seen(&self, names: &[String]) -> CatalogResult<()> {
            self.seen.lock().unwrap().extend(names.iter().cloned());
            Ok(())
        }
        fn remove_snapshots(&self, ids: &[String]) -> CatalogResult<()> {
            self.snaps.lock().unwrap().retain(|s| !ids.contains(&s.id));
            Ok(())
        }
        fn remove_packs(&self, _: &[PackId]) -> CatalogResult<()> {
            Ok(())
        }
        fn blob_sizes(&self) -> CatalogResult<Vec<(BlobId, PackId, u32)>> {
            unreachable!()
        }
    }

    /// A restore that starts before its snapshot commits brings the
    /// catalog up to date meanwhile: a snapshot committed while the vault's
    /// snapshots are listed (record written to the vault and the catalog
    /// between the listing and the check for forgotten ones) stays.
    #[tokio::test]
    async fn a_snapshot_committed_during_the_sync_is_not_taken_for_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("v");
        std::fs::create_dir_all(&dir).unwrap();
        let loc = crate::vault::Location::Local(dir.clone());
        Vault::init(&loc, b"pw", &Default::default()).await.unwrap();
        let vault = Vault::open(&loc, b"pw").await.unwrap();
        let old = crate::forget::tests::snap("aaaa", "v", 1);
        let new = crate::forget::tests::snap("bbbb", "v", 2);
        vault.put_meta("snapshots/aaaa", &old).await.unwrap();
        vault.put_meta("snapshots/bbbb", &new).await.unwrap();
        // The new record is written aside; the commit puts it in place.
        let (placed, aside) = (dir.join("snapshots/bbbb"), d.path().join("bbbb"));
        std::fs::rename(&placed, &aside).unwrap();
        let catalog = RacingCatalog {
            snaps: Mutex::new(vec![old.clone()]),
            seen: Mutex::new(HashSet::from(["snapshots/aaaa".to_string()])),
            commit: Mutex::new(Some(Box::new(move |snaps| {
                std::fs::rename(&aside, &placed).unwrap();
                snaps.lock().unwrap().push(new);
            }))),
        };
        sync_catalog(&vault, &catalog, false).await.unwrap();
        let ids: Vec<String> = catalog
            .snaps
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.id.clone())
            .collect();
        assert_eq!(ids, ["aaaa", "bbbb"]);
    }
}
