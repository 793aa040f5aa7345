//! Prune: delete what no snapshot references.
//!
//! Under the vault's exclusive lock (no snapshot, restore or check runs):
//! 1. bring the catalog up to date; walk every snapshot's trees: the live set;
//! 2. packs with no live blob are deleted; packs whose dead bytes exceed the
//!    repack ratio are repacked: their live blobs are rewritten into new
//!    packs, recorded by a new index object, before anything is deleted;
//!    packs in the vault that no catalog knows (left by a killed snapshot)
//!    are deleted too;
//! 3. a prune record listing every pack to delete is written: the commit
//!    point. Every catalog applies it on its next open; a rebuild never
//!    brings those packs back;
//! 4. the packs are deleted and the catalog forgets them.
//!
//! In a local vault, the staging files of writes killed midway (an hour old
//! or more) are removed as well.
//!
//! A crash before 3 leaves extra packs (duplicates) that the next prune
//! deletes; a crash after 3 leaves packs the record already condemned, which
//! the next prune deletes as unknown. Either way every snapshot stays whole.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId};
use crate::lock::VaultLock;
use crate::manifest::{IndexObject, NodeKind};
use crate::pack::PackWriter;
use crate::sync::PruneRecord;
use crate::vault::{Vault, pack_path};

#[derive(Clone, Debug)]
pub struct PruneOptions {
    pub dry_run: bool,
    /// Repack a pack when this fraction of its bytes (or more) is dead.
    pub max_repack_ratio: f64,
    /// How long to wait for running snapshots to finish.
    pub lock_wait: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            max_repack_ratio: 0.3,
            lock_wait: Duration::ZERO,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneSummary {
    pub dry_run: bool,
    pub snapshots: u64,
    pub packs: u64,
    pub live_blobs: u64,
    /// Stored bytes of blobs no snapshot references, before the prune.
    pub unreferenced_bytes: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    /// Packs in the vault no catalog knew (a killed snapshot's).
    pub packs_unknown: u64,
    /// Packs the catalog did not know that hold blobs a snapshot needs (an
    /// index object lost from the vault): learned from their headers and
    /// indexed again, never deleted.
    pub packs_recovered: u64,
    pub packs_written: u64,
    pub bytes_deleted: u64,
    pub bytes_written: u64,
    /// `bytes_deleted - bytes_written`: what the vault shrank by.
    pub bytes_reclaimed: u64,
    /// Staging files of killed writes removed from a local vault (counted
    /// only, in a dry run).
    pub staging_removed: u64,
    pub duration_s: f64,
}

/// Every blob some snapshot needs: trees and file chunks.
pub async fn live_blobs(vault: &Vault, catalog: &dyn Catalog) -> Result<HashSet<BlobId>> {
    let mut live = HashSet::new();
    let mut stack: Vec<BlobId> = catalog.snapshots()?.iter().map(|s| s.root).collect();
    while let Some(tree_id) = stack.pop() {
        if !live.insert(tree_id) {
            continue; // an unchanged subtree, already walked
        }
        let tree = crate::sync::load_tree(vault, catalog, &tree_id).await?;
        for n in &tree.entries {
            match &n.kind {
                NodeKind::File { chunks, .. } => live.extend(chunks.iter().map(|c| c.0)),
                NodeKind::Dir { subtree } => stack.push(*subtree),
                _ => {}
            }
        }
    }
    Ok(live)
}

pub async fn prune(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    opts: &PruneOptions,
) -> Result<PruneSummary> {
    let started = Instant::now();
    let lock = if opts.dry_run {
        None
    } else {
        Some(VaultLock::acquire(vault.clone(), true, "prune", opts.lock_wait).await?)
    };
    let r = run(&vault, catalog.as_ref(), opts).await;
    if let Some(l) = lock {
        l.release().await?;
    }
    let mut s = r?;
    s.duration_s = started.elapsed().as_secs_f64();
    Ok(s)
}

struct PackUse {
    size: u64,
    live: Vec<BlobId>,
    dead_bytes: u64,
}

/// Writes an index object listing `packs`; this catalog has seen it.
async fn write_index(
    vault: &Vault,
    catalog: &dyn Catalog,
    packs: Vec<crate::pack::PackRecord>,
) -> Result<()> {
    let name = format!("index/{}", crate::id::random_hex_id());
    vault.put_meta(&name, &IndexObject { packs }).await?;
    catalog.mark_seen(&[name])?;
    Ok(())
}

/// The live blobs, the catalog's packs with what of each is live, and how
/// many live blobs some known pack holds.
struct Survey {
    live: HashSet<BlobId>,
    packs: HashMap<PackId, PackUse>,
    located: usize,
}

async fn survey(vault: &Vault, catalog: &dyn Catalog) -> Result<Survey> {
    let live = live_blobs(vault, catalog).await?;
    let mut packs: HashMap<PackId, PackUse> = catalog
        .packs()?
        .into_iter()
        .map(|(id, size)| {
            (
                id,
                PackUse {
                    size,
                    live: Vec::new(),
                    dead_bytes: 0,
                },
            )
        })
        .collect();
    let mut located: HashSet<BlobId> = HashSet::new();
    for (blob, pack, stored) in catalog.blob_sizes()? {
        let Some(u) = packs.get_mut(&pack) else {
            continue;
        };
        if live.contains(&blob) {
            located.insert(blob);
            u.live.push(blob);
        } else {
            u.dead_bytes += u64::from(stored);
        }
    }
    Ok(Survey {
        located: located.len(),
        live,
        packs,
    })
}

/// Reads the header of every pack in the vault the catalog does not know
/// and records the readable ones (a damaged one stays unknown).
async fn learn_unknown_packs(
    vault: &Vault,
    catalog: &dyn Catalog,
) -> Result<Vec<crate::pack::PackRecord>> {
    let known: HashSet<PackId> = catalog.packs()?.into_iter().map(|(p, _)| p).collect();
    let mut learned = Vec::new();
    for obj in vault.list("packs/").await? {
        let Some(id) = PackId::from_hex(obj.location.filename().unwrap_or_default()) else {
            continue;
        };
        if known.contains(&id) {
            continue;
        }
        match vault.read_pack_header(&id, obj.size).await {
            Ok(rec) => learned.push(rec),
            Err(Error::DamagedPack { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    catalog.add_packs(&learned)?;
    Ok(learned)
}

async fn run(
    vault: &Arc<Vault>,
    catalog: &dyn Catalog,
    opts: &PruneOptions,
) -> Result<PruneSummary> {
    let synced = crate::sync::sync_catalog(vault, catalog, false).await?;
    let unknown: Vec<&String> = synced.damaged_snapshots().collect();
    if !unknown.is_empty() {
        return Err(Error::Invalid(format!(
            "prune stopped: {} snapshot record(s) in the vault cannot be read, so what they \
             reference is unknown and nothing is deleted ({}); `ferry vault check` lists them; \
             delete such an object from the vault to prune without it",
            unknown.len(),
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    let mut s = PruneSummary {
        dry_run: opts.dry_run,
        snapshots: catalog.snapshots()?.len() as u64,
        ..Default::default()
    };
    // Everything a snapshot needs must be in a pack the catalog knows, or
    // the packs that hold it would look unknown and be deleted. When it is
    // not (an index object lost from the vault), the headers of the packs
    // the catalog does not know are read first and the survey made again.
    let mut surveyed = survey(vault, catalog).await;
    let incomplete = match &surveyed {
        Ok(sv) => sv.live.len() > sv.located,
        Err(Error::MissingBlob { .. }) => true,
        Err(_) => false,
    };
    let mut learned = Vec::new();
    if incomplete {
        learned = learn_unknown_packs(vault, catalog).await?;
        surveyed = survey(vault, catalog).await;
    }
    let Survey {
        live,
        packs,
        located: _,
    } = surveyed?;
    s.live_blobs = live.len() as u64;
    s.packs = packs.len() as u64;
    // What was learned and is needed gets an index object again.
    let recovered: Vec<crate::pack::PackRecord> = learned
        .into_iter()
        .filter(|r| packs.get(&r.id).is_some_and(|u| !u.live.is_empty()))
        .collect();
    s.packs_recovered = recovered.len() as u64;
    if !recovered.is_empty() && !opts.dry_run {
        write_index(vault, catalog, recovered).await?;
    }
    s.staging_removed = vault.sweep_staging(opts.dry_run).await?;

    // Unreferenced: whole packs with nothing live, dead blobs of the others.
    s.unreferenced_bytes = packs
        .values()
        .map(|u| {
            if u.live.is_empty() {
                u.size
            } else {
                u.dead_bytes
            }
        })
        .sum();

    let mut delete: Vec<(PackId, u64)> = Vec::new();
    let mut repack: Vec<(PackId, Vec<BlobId>)> = Vec::new();
    for (id, u) in &packs {
        if u.live.is_empty() {
            delete.push((*id, u.size));
        } else if u.dead_bytes as f64 >= opts.max_repack_ratio * u.size as f64 {
            repack.push((*id, u.live.clone()));
        }
    }
    // Packs in the vault that the catalog does not know: nothing can
    // reference them (no snapshot runs, the catalog is in step and holds
    // every blob a snapshot needs).
    for obj in vault.list("packs/").await? {
        if let Some(id) = PackId::from_hex(obj.location.filename().unwrap_or_default())
            && !packs.contains_key(&id)
        {
            delete.push((id, obj.size));
            s.packs_unknown += 1;
            s.unreferenced_bytes += obj.size;
        }
    }
    s.packs_deleted = delete.len() as u64 - s.packs_unknown;
    s.packs_repacked = repack.len() as u64;
    s.bytes_deleted = delete.iter().map(|(_, n)| n).sum::<u64>()
        + repack.iter().map(|(id, _)| packs[id].size).sum::<u64>();
    if opts.dry_run {
        // The repacked live blobs are written again, about as large.
        let rewritten: u64 = repack
            .iter()
            .map(|(id, _)| packs[id].size - packs[id].dead_bytes)
            .sum();
        s.bytes_reclaimed = s.bytes_deleted.saturating_sub(rewritten);
        return Ok(s);
    }

    // Repack: live blobs into new packs, durable and indexed first.
    let written = repack_live(vault, catalog, &repack).await?;
    s.packs_written = written.len() as u64;
    s.bytes_written = written.iter().map(|p| p.size).sum();
    if !written.is_empty() {
        write_index(vault, catalog, written.clone()).await?;
    }
    let condemned: Vec<PackId> = delete
        .iter()
        .map(|(id, _)| *id)
        .chain(repack.iter().map(|(id, _)| *id))
        .collect();
    if condemned.is_empty() {
        return Ok(s);
    }
    let record_name = format!("prune/{}", crate::id::random_hex_id());
    vault
        .put_meta(
            &record_name,
            &PruneRecord {
                time: crate::vault::now_rfc3339(),
                deleted: condemned.clone(),
            },
        )
        .await?;
    // The catalog points the repacked blobs at their new packs.
    catalog.remove_packs(&condemned)?;
    catalog.add_packs(&written)?;
    let results: Vec<Result<()>> = futures::stream::iter(condemned.iter())
        .map(|id| async move { vault.delete(pack_path(id).as_ref()).await })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    catalog.mark_seen(&[record_name])?;
    s.bytes_reclaimed = s.bytes_deleted.saturating_sub(s.bytes_written);
    Ok(s)
}

/// Reads each pack to repack once, and writes its live blobs into new packs.
async fn repack_live(
    vault: &Arc<Vault>,
    catalog: &dyn Catalog,
    repack: &[(PackId, Vec<BlobId>)],
) -> Result<Vec<crate::pack::PackRecord>> {
    let cfg = vault.config().clone();
    let mut writer = PackWriter::new(vault.data_key(), cfg.pack_size as usize);
    let mut done = Vec::new();
    for (pack, blobs) in repack {
        let bytes = vault.get(&pack_path(pack)).await?;
        let locs = catalog.locate(blobs)?;
        let (key, ids, level) = (
            *vault.data_key(),
            vault.ids().clone(),
            cfg.compression.level,
        );
        let pack = *pack;
        // Decrypt, verify and re-encode off the async threads.
        let (w, full) = tokio::task::spawn_blocking(move || -> Result<(PackWriter, Vec<_>)> {
            let mut full = Vec::new();
            for loc in locs.into_iter().flatten() {
                let e = &loc.entry;
                let end = (e.offset + u64::from(e.stored_len)) as usize;
                let sealed = bytes
                    .get(e.offset as usize..end)
                    .ok_or_else(|| Error::DamagedPack {
                        pack: pack.to_hex(),
                        reason: "shorter than its header says".into(),
                    })?
                    .to_vec();
                let raw = crate::pack::open_blob(&key, &ids, &pack, &loc.salt, e, sealed)?;
                writer.add(e.kind, e.id, &raw, level);
                if writer.is_full() {
                    let next = PackWriter::new(&key, cfg.pack_size as usize);
                    full.push(std::mem::replace(&mut writer, next).finish());
                }
            }
            Ok((writer, full))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        writer = w;
        for f in full {
            vault.put_pack(&f).await?;
            done.push(f.record);
        }
    }
    if !writer.is_empty() {
        let f = writer.finish();
        vault.put_pack(&f).await?;
        done.push(f.record);
    }
    Ok(done)
}
