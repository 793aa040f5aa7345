//! Raw block volumes: a device or disk image saved as one stream and
//! restored in place.
//!
//! A block snapshot's root tree holds one file entry, `block`. Restore
//! writes onto a block device of at least that size, or onto an image file
//! (created sparse when missing), and writes only the chunks that differ:
//! - a new image: every non-zero chunk (zero runs stay holes);
//! - an image ferry restored before and nobody touched since (its size,
//!   mtime, ctime and inode match the target's memory): the chunks that
//!   differ from the previous snapshot's chunk list, without reading;
//! - a device, or an image the memory cannot vouch for: the target is read
//!   and hashed at the new chunk boundaries, and the chunks that differ are
//!   written. A device node's times do not follow writes to the device, so
//!   a device is always compared by reading (sequential, no writes).

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::manifest::{NodeKind, SnapshotRecord};
use crate::progress::Progress;
use crate::restore::{
    RestoreOptions, RestorePhases, RestoreSummary, WriteTarget, changed_by_list,
    changed_by_reading, chunk_offsets, transfer,
};
use crate::snapshot::BLOCK_ENTRY;
use crate::target::{TargetFile, TargetState, content_id};
use crate::vault::Vault;

async fn block_chunks(
    vault: &Vault,
    catalog: &dyn Catalog,
    root: &crate::id::BlobId,
) -> Result<Vec<crate::manifest::ChunkRef>> {
    let tree = crate::sync::load_tree(vault, catalog, root).await?;
    match tree
        .entries
        .into_iter()
        .find(|n| n.name.0 == BLOCK_ENTRY)
        .map(|n| n.kind)
    {
        Some(NodeKind::File { chunks, .. }) => Ok(chunks),
        _ => Err(Error::DamagedObject {
            object: format!("tree {}", root.to_hex()),
            reason: "block snapshot without its block entry".into(),
        }),
    }
}

pub async fn restore_block(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    state: Arc<dyn TargetState>,
    snap: &SnapshotRecord,
    target: &Path,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let chunks = block_chunks(&vault, catalog.as_ref(), &snap.root).await?;
    let size: u64 = chunks.iter().map(|c| c.1 as u64).sum();
    let content = content_id(&chunks);
    let ids = vault.ids().clone();
    let mut summary = RestoreSummary {
        snapshot_id: snap.id.clone(),
        volume: snap.volume.clone(),
        files: 1,
        ..Default::default()
    };

    let md = std::fs::metadata(target).ok();
    let (fresh, changed) = match &md {
        None => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(target)
                .map_err(|e| Error::io(target, e))?;
            f.set_len(size).map_err(|e| Error::io(target, e))?;
            (true, vec![true; chunks.len()])
        }
        Some(m) if m.file_type().is_block_device() => {
            let dev_size = std::fs::File::open(target)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .map_err(|e| Error::io(target, e))?;
            if dev_size < size {
                return Err(Error::Invalid(format!(
                    "{}: the device has {dev_size} bytes, the snapshot needs {size}",
                    target.display()
                )));
            }
            let (c, read) = changed_by_reading(target, dev_size, &chunks, &ids)?;
            summary.bytes_compared = read;
            (false, c)
        }
        Some(m) if m.is_file() => {
            let known = if opts.reread_target {
                None
            } else {
                state
                    .get_dir(b"")?
                    .into_iter()
                    .find(|f| f.path == BLOCK_ENTRY && f.matches(m))
            };
            let old_chunks = match (&known, state.last_snapshot()?) {
                (Some(k), Some(id)) => {
                    match catalog.snapshots()?.into_iter().find(|s| s.id == id) {
                        Some(old) => block_chunks(&vault, catalog.as_ref(), &old.root)
                            .await
                            .ok()
                            .filter(|oc| content_id(oc) == k.content),
                        None => None,
                    }
                }
                _ => None,
            };
            let c = match old_chunks {
                Some(oc) => changed_by_list(&oc, &chunks),
                None => {
                    let (c, read) = changed_by_reading(target, m.len(), &chunks, &ids)?;
                    summary.bytes_compared = read;
                    c
                }
            };
            state.forget(&[BLOCK_ENTRY.to_vec()])?;
            let f = OpenOptions::new()
                .write(true)
                .open(target)
                .map_err(|e| Error::io(target, e))?;
            f.set_len(size).map_err(|e| Error::io(target, e))?;
            (false, c)
        }
        Some(m) => {
            let what = if m.is_dir() {
                "a directory"
            } else {
                "neither a block device nor a regular file"
            };
            return Err(Error::Invalid(format!(
                "{}: a block snapshot restores onto a block device or an image file; this is {what}",
                target.display()
            )));
        }
    };
    let plan_s = started.elapsed().as_secs_f64();

    let mut needs = std::collections::HashMap::new();
    let mut planned = 0u64;
    for ((off, c), need) in chunk_offsets(&chunks).zip(&changed) {
        if *need {
            needs.entry(c.0).or_insert_with(Vec::new).push((0u32, off));
            planned += c.1 as u64;
        }
    }
    progress.add_total(1, planned);
    let t0 = Instant::now();
    let t = transfer(
        &vault,
        catalog.as_ref(),
        vec![std::sync::Arc::new(WriteTarget {
            path: target.to_path_buf(),
            dest: target.to_path_buf(),
            fresh,
            create: None,
        })],
        needs,
        opts.packs_in_flight,
        &progress,
        started,
    )
    .await?;
    let transfer_s = t0.elapsed().as_secs_f64();
    if !t.failures.is_empty() {
        if fresh {
            let _ = std::fs::remove_file(target);
        }
        let cause = t
            .pack_errors
            .first()
            .cloned()
            .unwrap_or_else(|| t.failures[0].1.clone());
        return Err(Error::RestoreFailed {
            target: target.to_path_buf(),
            summary: format!("{cause}; the volume is incomplete"),
        });
    }
    let t1 = Instant::now();
    std::fs::File::open(target)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(target, e))?;
    let md = std::fs::metadata(target).map_err(|e| Error::io(target, e))?;
    if md.is_file() {
        state.update(
            &[TargetFile::from_md(BLOCK_ENTRY.to_vec(), content, &md)],
            Some(&snap.id),
        )?;
    }
    summary.bytes_written = t.bytes_written;
    summary.bytes_fetched = t.bytes_fetched;
    summary.packs_fetched = t.packs_fetched;
    if changed.contains(&true) {
        summary.files_written = 1;
        summary.files_patched = u64::from(!fresh);
    } else {
        summary.files_unchanged = 1;
    }
    summary.phases = RestorePhases {
        plan_s,
        transfer_s,
        finish_s: t1.elapsed().as_secs_f64(),
        verify_s: 0.0,
    };
    let finish_end_s = started.elapsed().as_secs_f64();
    summary.report = vec![
        crate::phase::span("plan", 0.0, plan_s, summary.bytes_compared, 1, 0),
        t.fetch,
        t.write,
        crate::phase::span(
            "finish",
            finish_end_s - summary.phases.finish_s,
            finish_end_s,
            0,
            1,
            0,
        ),
    ];
    if opts.verify {
        let t2 = Instant::now();
        let len = if md.is_file() { md.len() } else { size };
        let (c, read) = changed_by_reading(target, len, &chunks, &ids)?;
        summary.phases.verify_s = t2.elapsed().as_secs_f64();
        let end_s = started.elapsed().as_secs_f64();
        summary.report.push(crate::phase::span(
            "verify",
            end_s - summary.phases.verify_s,
            end_s,
            read,
            1,
            0,
        ));
        if c.contains(&true) {
            state.forget(&[BLOCK_ENTRY.to_vec()])?;
            let bad = c.iter().filter(|x| **x).count();
            return Err(Error::VerifyFailed {
                target: target.to_path_buf(),
                count: bad,
                paths: format!("{bad} chunk(s) of the volume"),
            });
        }
        summary.files_verified = 1;
    }
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}
