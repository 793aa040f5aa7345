//! Restore: from the vault back into files under a target directory.
//!
//! Plan, fetch, scatter, finish:
//! 1. Walk the snapshot's trees, create directories and symlinks, and open
//!    each regular file under a temporary name (`.ferry-<random>.tmp`, in
//!    its own directory) at its final size. Note, per chunk id, every
//!    (file, offset) that needs it.
//! 2. Group the chunks by pack. Each pack is fetched once (a few ranged
//!    reads covering the blobs needed, several packs at a time), and each
//!    blob is decrypted, verified against its id and written with
//!    positioned writes to every place that needs it.
//! 3. Give each file its metadata and rename it to its real name. A file
//!    whose data could not all be read is removed instead: a crash or an
//!    error never leaves a half-written file under its real name.
//! 4. Hard links, then directory metadata, deepest first.
//!
//! Nothing is written outside the target: every name from a tree is checked
//! to be one plain path component, directories are created, never followed
//! through symlinks, and temporary files are created with O_EXCL|O_NOFOLLOW.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use crate::catalog::{BlobLocation, Catalog};
use crate::codec::ObjectCipher;
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId};
use crate::manifest::{Name, Node, NodeKind, SnapshotRecord};
use crate::pack::PackEntry;
use crate::progress::Progress;
use crate::vault::{Vault, pack_path};

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Packs fetched at once.
    pub packs_in_flight: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self { packs_in_flight: 8 }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreSummary {
    pub snapshot_id: String,
    pub volume: String,
    /// Regular files (and hard links) in the snapshot.
    pub files: u64,
    pub dirs: u64,
    pub files_written: u64,
    /// Bytes written into the target.
    pub bytes_written: u64,
    pub bytes_fetched: u64,
    pub packs_fetched: u64,
    pub duration_s: f64,
    /// Metadata that could not be applied (xattrs, ownership), counted.
    pub warnings: u64,
}

struct FilePlan {
    tmp: PathBuf,
    dest: PathBuf,
    node: Node,
}

#[derive(Default)]
struct Plan {
    files: Vec<FilePlan>,
    dirs: Vec<(PathBuf, Node)>,
    symlinks: Vec<(PathBuf, Node)>,
    hardlinks: Vec<(PathBuf, Name)>,
    /// Chunk id → every (file index, offset) that needs it.
    needs: HashMap<BlobId, Vec<(u32, u64)>>,
    dir_count: u64,
}

fn random_tmp_name() -> String {
    let mut b = [0u8; 8];
    crate::keys::fill_random(&mut b);
    format!(".ferry-{}.tmp", hex::encode(b))
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

async fn build_plan(
    vault: &Vault,
    catalog: &dyn Catalog,
    snap: &SnapshotRecord,
    target: &Path,
    plan: &mut Plan,
) -> Result<()> {
    let mut stack = vec![(snap.root, target.to_path_buf())];
    while let Some((tree_id, dir)) = stack.pop() {
        let tree = crate::sync::load_tree(vault, catalog, &tree_id).await?;
        for node in tree.entries {
            let path = join_safe(&dir, &node.name)?;
            match &node.kind {
                NodeKind::Dir { subtree } => {
                    ensure_dir(&path)?;
                    plan.dir_count += 1;
                    stack.push((*subtree, path.clone()));
                    plan.dirs.push((path, node));
                }
                NodeKind::File { size, chunks } => {
                    let tmp = dir.join(random_tmp_name());
                    let f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&tmp)
                        .map_err(|e| Error::io(&tmp, e))?;
                    let idx = plan.files.len() as u32;
                    plan.files.push(FilePlan {
                        tmp: tmp.clone(),
                        dest: path,
                        node: node.clone(),
                    });
                    f.set_len(*size).map_err(|e| Error::io(&tmp, e))?;
                    let mut off = 0u64;
                    for c in chunks {
                        plan.needs.entry(c.0).or_default().push((idx, off));
                        off += c.1 as u64;
                    }
                }
                NodeKind::Symlink { .. } => plan.symlinks.push((path, node)),
                NodeKind::Hardlink { target } => plan.hardlinks.push((path, target.clone())),
            }
        }
    }
    Ok(())
}

/// Restores `snap` into `target` (created if missing).
pub async fn restore(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    snap: &SnapshotRecord,
    target: &Path,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    ensure_dir(target)?;
    let mut plan = Plan::default();
    if let Err(e) = build_plan(&vault, catalog.as_ref(), snap, target, &mut plan).await {
        for f in &plan.files {
            let _ = std::fs::remove_file(&f.tmp);
        }
        return Err(e);
    }
    let total: u64 = plan
        .files
        .iter()
        .map(|f| {
            if let NodeKind::File { size, .. } = f.node.kind {
                size
            } else {
                0
            }
        })
        .sum();
    progress.add_total(plan.files.len() as u64, total);

    // Where is each chunk? Unknown chunks fail their files.
    let ids: Vec<BlobId> = plan.needs.keys().copied().collect();
    let mut by_pack: HashMap<PackId, ([u8; 32], Vec<PackEntry>)> = HashMap::new();
    let mut failures: Vec<(u32, String)> = Vec::new();
    for batch in ids.chunks(1000) {
        for (id, loc) in batch.iter().zip(catalog.locate(batch)?) {
            match loc {
                Some(BlobLocation { pack, salt, entry }) => by_pack
                    .entry(pack)
                    .or_insert_with(|| (salt, Vec::new()))
                    .1
                    .push(entry),
                None => {
                    for (f, _) in &plan.needs[id] {
                        failures.push((*f, format!("chunk {} is not in the catalog", id.short())));
                    }
                }
            }
        }
    }

    let files: Arc<Vec<PathBuf>> = Arc::new(plan.files.iter().map(|f| f.tmp.clone()).collect());
    let needs = Arc::new(std::mem::take(&mut plan.needs));
    let results: Vec<PackOutcome> = futures::stream::iter(by_pack)
        .map(|(pack, (salt, entries))| {
            let (vault, files, needs, progress) = (
                vault.clone(),
                files.clone(),
                needs.clone(),
                progress.clone(),
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
                )
                .await
            }
        })
        .buffer_unordered(opts.packs_in_flight.max(1))
        .collect()
        .await;

    let mut summary = RestoreSummary {
        snapshot_id: snap.id.clone(),
        volume: snap.volume.clone(),
        files: (plan.files.len() + plan.hardlinks.len()) as u64,
        dirs: plan.dir_count,
        ..Default::default()
    };
    let mut pack_errors = Vec::new();
    for r in results {
        summary.bytes_written += r.bytes_written;
        summary.bytes_fetched += r.bytes_fetched;
        summary.packs_fetched += 1;
        if let Some((msg, affected)) = r.error {
            for f in affected {
                failures.push((f, msg.clone()));
            }
            pack_errors.push(msg);
        }
    }

    let plan = Arc::new(plan);
    let finish = {
        let plan = plan.clone();
        let target = target.to_path_buf();
        let root_node = snap.root_node.clone();
        tokio::task::spawn_blocking(move || finish(&plan, &target, &root_node, failures))
    };
    let (written, warnings, failed) =
        finish.await.map_err(|e| Error::Internal(e.to_string()))??;
    summary.files_written = written;
    summary.warnings = warnings;
    summary.duration_s = started.elapsed().as_secs_f64();
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
    Ok(summary)
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

async fn restore_pack(
    vault: &Vault,
    pack: PackId,
    salt: [u8; 32],
    mut entries: Vec<PackEntry>,
    files: &[PathBuf],
    needs: &HashMap<BlobId, Vec<(u32, u64)>>,
    progress: &dyn Progress,
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
            Some((_, s_end, list)) if e.offset <= *s_end + MAX_GAP => {
                *s_end = (*s_end).max(end);
                list.push(e);
            }
            _ => spans.push((e.offset, end, vec![e])),
        }
    }
    let cipher = Arc::new(ObjectCipher::new(vault.data_key(), &salt));
    for (i, (start, end, list)) in spans.iter().enumerate() {
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
        let list_for_errors = list.clone();
        let (cipher, ids, list, start) =
            (cipher.clone(), vault.ids().clone(), list.clone(), *start);
        let files = files.to_vec();
        let needs_here: Vec<Vec<(u32, u64)>> = list.iter().map(|e| needs[&e.id].clone()).collect();
        let r = tokio::task::spawn_blocking(move || {
            scatter(
                &cipher,
                &ids,
                &pack,
                start,
                &bytes,
                &list,
                &needs_here,
                &files,
            )
        })
        .await;
        match r {
            Ok(Ok((n, failed))) => {
                out.bytes_written += n;
                progress.advance(n);
                if let Some((_, msg)) = failed.first() {
                    let bad: Vec<PackEntry> = failed
                        .iter()
                        .map(|(i, _)| list_for_errors[*i].clone())
                        .collect();
                    let mut files = affected(&bad);
                    let prev = out.error.take().map(|(_, f)| f).unwrap_or_default();
                    files.extend(prev);
                    out.error = Some((msg.clone(), files));
                }
            }
            Ok(Err(e)) => {
                let rest: Vec<PackEntry> = spans[i..].iter().flat_map(|s| s.2.clone()).collect();
                out.error = Some((e.to_string(), affected(&rest)));
                return out;
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
    files: &[PathBuf],
) -> Result<(u64, Vec<(usize, String)>)> {
    let mut open: HashMap<u32, File> = HashMap::new();
    let mut written = 0u64;
    let mut failed = Vec::new();
    for (i, (e, places)) in list.iter().zip(needs).enumerate() {
        let from = (e.offset - start) as usize;
        let mut buf = bytes[from..from + e.stored_len as usize].to_vec();
        if let Err(err) = crate::pack::open_blob_with(cipher, ids, pack, e, &mut buf) {
            failed.push((i, err.to_string()));
            continue;
        }
        for (f, off) in places {
            let file = match open.entry(*f) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let p = &files[*f as usize];
                    v.insert(
                        OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(p)
                            .map_err(|e| Error::io(p, e))?,
                    )
                }
            };
            file.write_all_at(&buf, *off)
                .map_err(|err| Error::io(&files[*f as usize], err))?;
            written += buf.len() as u64;
        }
    }
    Ok((written, failed))
}

/// Metadata, renames, links. Returns (files written, warnings, failed
/// destinations).
fn finish(
    plan: &Plan,
    target: &Path,
    root: &Node,
    failures: Vec<(u32, String)>,
) -> Result<(u64, u64, Vec<PathBuf>)> {
    let failed: std::collections::HashSet<u32> = failures.iter().map(|(f, _)| *f).collect();
    let mut warnings = 0u64;
    let mut written = 0u64;
    let mut failed_paths = Vec::new();
    let is_root = effective_uid() == 0;
    for (i, f) in plan.files.iter().enumerate() {
        if failed.contains(&(i as u32)) {
            let _ = std::fs::remove_file(&f.tmp);
            failed_paths.push(f.dest.clone());
            continue;
        }
        warnings += apply_meta(&f.tmp, &f.node, is_root, false)?;
        if std::fs::symlink_metadata(&f.dest).is_ok_and(|md| md.is_dir()) {
            let _ = std::fs::remove_file(&f.tmp);
            return Err(Error::io(
                &f.dest,
                std::io::Error::other("is a directory; not replaced"),
            ));
        }
        std::fs::rename(&f.tmp, &f.dest).map_err(|e| Error::io(&f.dest, e))?;
        written += 1;
    }
    for (path, node) in &plan.symlinks {
        let NodeKind::Symlink { target: t } = &node.kind else {
            continue;
        };
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.is_dir() {
                return Err(Error::io(
                    path,
                    std::io::Error::other("is a directory; not replaced"),
                ));
            }
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        std::os::unix::fs::symlink(t.as_os(), path).map_err(|e| Error::io(path, e))?;
        warnings += apply_meta(path, node, is_root, true)?;
    }
    for (path, rel) in &plan.hardlinks {
        let mut src = target.to_path_buf();
        for comp in rel.0.split(|b| *b == b'/') {
            src = join_safe(&src, &Name(comp.to_vec()))?;
        }
        if !src.is_file() {
            failed_paths.push(path.clone());
            continue;
        }
        if std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        std::fs::hard_link(&src, path).map_err(|e| Error::io(path, e))?;
        written += 1;
    }
    for (path, node) in plan.dirs.iter().rev() {
        warnings += apply_meta(path, node, is_root, false)?;
    }
    warnings += apply_meta(target, root, is_root, false)?;
    Ok((written, warnings, failed_paths))
}

fn effective_uid() -> u32 {
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
    if symlink {
        filetime::set_symlink_file_times(path, mtime, mtime).map_err(|e| Error::io(path, e))?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode))
            .map_err(|e| Error::io(path, e))?;
        filetime::set_file_times(path, mtime, mtime).map_err(|e| Error::io(path, e))?;
    }
    Ok(warnings)
}
