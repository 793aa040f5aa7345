//! Vault check: is every snapshot restorable?
//!
//! Without `read_data`: every pack the catalog knows is in the vault with
//! the right size, and every blob every snapshot references is recorded in
//! some pack. With `read_data`: also download every pack, check it hashes
//! to its name, and decrypt, decompress and hash every blob to its id. The
//! report names damaged packs and the snapshots and files they affect.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::codec::ObjectCipher;
use crate::error::Result;
use crate::id::{BlobId, PackId};
use crate::manifest::{IndexObject, NodeKind, SnapshotRecord};
use crate::sync::PruneRecord;
use crate::vault::{Vault, pack_path};

#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub snapshots: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub blobs_verified: u64,
    pub damaged_packs: Vec<DamagedPack>,
    /// Snapshot records, index objects and prune records that cannot be
    /// read, read from the vault itself: the catalog may hold copies taken
    /// before the damage.
    pub damaged_objects: Vec<DamagedObject>,
    /// Blobs referenced by a snapshot but recorded in no pack.
    pub missing_blobs: Vec<String>,
    /// Files and directories that cannot be fully restored.
    pub affected: Vec<Affected>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DamagedPack {
    pub pack: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DamagedObject {
    pub object: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Affected {
    pub snapshot: String,
    pub volume: String,
    pub path: String,
    pub reason: String,
}

/// How much pack data `check` downloads and verifies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReadData {
    None,
    All,
    /// This percentage of the packs, chosen at random each run.
    Subset(f64),
}

pub async fn check(
    vault: &Arc<Vault>,
    catalog: &dyn Catalog,
    read: ReadData,
) -> Result<CheckReport> {
    crate::lock::shared(
        vault,
        catalog,
        "check",
        crate::lock::SHARED_WAIT,
        check_locked(vault, catalog, read),
    )
    .await
}

async fn check_locked(vault: &Vault, catalog: &dyn Catalog, read: ReadData) -> Result<CheckReport> {
    let mut report = CheckReport {
        damaged_objects: damaged_metadata(vault).await?,
        ..Default::default()
    };
    let in_vault: HashMap<PackId, u64> = vault
        .list("packs/")
        .await?
        .into_iter()
        .filter_map(|o| Some((PackId::from_hex(o.location.filename()?)?, o.size)))
        .collect();
    let known = catalog.packs()?;
    report.packs = known.len() as u64;
    let mut damaged: HashMap<PackId, String> = HashMap::new();
    let mut to_read = Vec::new();
    for (id, size) in &known {
        match in_vault.get(id) {
            None => {
                damaged.insert(*id, "missing from the vault".into());
            }
            Some(s) if s != size => {
                damaged.insert(
                    *id,
                    format!("size {s}, expected {size} (truncated or replaced)"),
                );
            }
            Some(_) => to_read.push(*id),
        }
    }
    if let ReadData::Subset(pct) = read {
        let mut seed = [0u8; 32];
        crate::keys::fill_random(&mut seed);
        let threshold = (pct.clamp(0.0, 100.0) / 100.0 * u32::MAX as f64) as u64;
        to_read.retain(|id| {
            let h = blake3::keyed_hash(&seed, &id.0);
            u64::from(u32::from_le_bytes(
                h.as_bytes()[..4].try_into().expect("4 bytes"),
            )) <= threshold
        });
    }
    if read != ReadData::None {
        let results: Vec<(PackId, Result<u64>)> = futures::stream::iter(to_read)
            .map(|id| async move { (id, verify_pack(vault, &id).await) })
            .buffer_unordered(4)
            .collect()
            .await;
        for (id, r) in results {
            report.packs_read += 1;
            match r {
                Ok(n) => report.blobs_verified += n,
                Err(e) => {
                    damaged.insert(id, e.to_string());
                }
            }
        }
    }
    let mut bad_blobs: HashMap<BlobId, String> = HashMap::new();
    for (p, reason) in &damaged {
        for b in catalog.pack_blobs(p)? {
            bad_blobs.insert(b, format!("pack {}: {reason}", p.to_hex()));
        }
    }

    let snapshots = catalog.snapshots()?;
    report.snapshots = snapshots.len() as u64;
    let mut missing: HashSet<BlobId> = HashSet::new();
    for snap in &snapshots {
        let mut stack = vec![(snap.root, String::new())];
        while let Some((tree_id, dir)) = stack.pop() {
            let mut affect = |path: &str, reason: String| {
                report.affected.push(Affected {
                    snapshot: snap.id.clone(),
                    volume: snap.volume.clone(),
                    path: if path.is_empty() {
                        "/".into()
                    } else {
                        path.to_string()
                    },
                    reason,
                })
            };
            if let Some(r) = bad_blobs.get(&tree_id) {
                affect(&dir, r.clone());
            }
            let tree = match crate::sync::load_tree(vault, catalog, &tree_id).await {
                Ok(t) => t,
                Err(e) => {
                    affect(&dir, e.to_string());
                    continue;
                }
            };
            let ids: Vec<BlobId> = tree
                .entries
                .iter()
                .flat_map(|n| match &n.kind {
                    NodeKind::File { chunks, .. } => chunks.iter().map(|c| c.0).collect(),
                    NodeKind::Dir { subtree } => vec![*subtree],
                    _ => vec![],
                })
                .collect();
            let mut absent = HashSet::new();
            for batch in ids.chunks(1000) {
                for (id, present) in batch.iter().zip(catalog.contains(batch)?) {
                    if !present {
                        absent.insert(*id);
                    }
                }
            }
            for n in &tree.entries {
                let path = format!("{dir}/{}", n.name.display());
                match &n.kind {
                    NodeKind::File { chunks, .. } => {
                        if let Some(c) = chunks.iter().find(|c| absent.contains(&c.0)) {
                            missing.insert(c.0);
                            affect(&path, format!("chunk {} is in no pack", c.0.short()));
                        } else if let Some(r) = chunks.iter().find_map(|c| bad_blobs.get(&c.0)) {
                            affect(&path, r.clone());
                        }
                    }
                    NodeKind::Dir { subtree } => {
                        if absent.contains(subtree) {
                            missing.insert(*subtree);
                            affect(&path, "directory listing is in no pack".into());
                        } else {
                            stack.push((*subtree, path));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    report.damaged_packs = damaged
        .into_iter()
        .map(|(p, reason)| DamagedPack {
            pack: p.to_hex(),
            reason,
        })
        .collect();
    report.damaged_packs.sort_by(|a, b| a.pack.cmp(&b.pack));
    report.missing_blobs = missing.iter().map(|b| b.to_hex()).collect();
    report.missing_blobs.sort();
    report
        .affected
        .sort_by(|a, b| (&a.snapshot, &a.path).cmp(&(&b.snapshot, &b.path)));
    report.ok = report.damaged_objects.is_empty()
        && report.damaged_packs.is_empty()
        && report.missing_blobs.is_empty()
        && report.affected.is_empty();
    Ok(report)
}

/// Reads every snapshot record, index object and prune record in the vault
/// (small objects, eight at a time) and names those that do not
/// authenticate or parse.
async fn damaged_metadata(vault: &Vault) -> Result<Vec<DamagedObject>> {
    let mut names = Vec::new();
    for prefix in ["snapshots/", "index/", "prune/"] {
        names.extend(
            vault
                .list(prefix)
                .await?
                .into_iter()
                .map(|o| o.location.to_string()),
        );
    }
    let read: Vec<Result<()>> = futures::stream::iter(names)
        .map(|name| async move {
            if name.starts_with("snapshots/") {
                vault.get_meta::<SnapshotRecord>(&name).await.map(drop)
            } else if name.starts_with("index/") {
                vault.get_meta::<IndexObject>(&name).await.map(drop)
            } else {
                vault.get_meta::<PruneRecord>(&name).await.map(drop)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut out = Vec::new();
    for r in read {
        match r {
            Ok(()) => {}
            Err(crate::Error::DamagedObject { object, reason }) => {
                out.push(DamagedObject { object, reason })
            }
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(out)
}

/// Downloads a pack and verifies it end to end; returns the blobs checked.
async fn verify_pack(vault: &Vault, id: &PackId) -> Result<u64> {
    let bytes = vault.get(&pack_path(id)).await?;
    let key = *vault.data_key();
    let ids = vault.ids().clone();
    let id = *id;
    tokio::task::spawn_blocking(move || {
        let rec = crate::pack::read_whole(&key, &id, &bytes)?;
        let cipher = ObjectCipher::new(&key, &rec.salt_bytes()?);
        for e in &rec.blobs {
            let mut buf =
                bytes[e.offset as usize..(e.offset + e.stored_len as u64) as usize].to_vec();
            crate::pack::open_blob_with(&cipher, &ids, &id, e, &mut buf)?;
        }
        Ok(rec.blobs.len() as u64)
    })
    .await
    .map_err(|e| crate::Error::Internal(e.to_string()))?
}
