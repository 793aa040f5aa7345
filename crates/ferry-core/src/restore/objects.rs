//! Restore into a bucket: each file of the snapshot becomes an object
//! (its path the key, its `user.s3.*` xattrs the object's metadata), each
//! empty directory a `dir/` marker.
//!
//! Incremental like a directory restore: what ferry wrote last time is
//! remembered per key (`SyncState`: the file's content id, the object's
//! etag and size as written), and an object the destination listing still
//! shows with that etag and size is not written again. With `--delete`,
//! objects the snapshot does not have are removed. Nothing is read from
//! the destination except its listing (and, with `--verify`, what was
//! written).
//!
//! Snapshot walk and destination listing are merged in key order; both
//! stream, so memory is bounded by a directory's entries, the queues and
//! one pack range per writer.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::bucket_state::{ObjectState, SyncState};
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::manifest::{ChunkRef, NodeKind, SnapshotRecord, Xattr};
use crate::objects::{Headers, ObjectEntry, ObjectSink, xattrs_to_headers};
use crate::progress::Progress;
use crate::vault::Vault;

#[derive(Clone, Debug)]
pub struct ObjectRestoreOptions {
    pub delete: bool,
    pub verify: bool,
    /// Objects written at once.
    pub workers: usize,
    /// Take no vault lock (read-only vault credentials).
    pub no_lock: bool,
}

impl Default for ObjectRestoreOptions {
    fn default() -> Self {
        Self {
            delete: false,
            verify: false,
            workers: 8,
            no_lock: false,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ObjectRestoreSummary {
    pub snapshot_id: String,
    pub target: String,
    /// Objects in the snapshot.
    pub files: u64,
    pub files_unchanged: u64,
    pub files_written: u64,
    pub files_deleted: u64,
    /// Left in the destination without `--delete`.
    pub files_extra: u64,
    pub bytes_written: u64,
    pub files_verified: u64,
    /// Written but read back different (`--verify`).
    pub mismatched: Vec<String>,
    /// Could not be written or deleted: key and reason.
    pub failed: Vec<(String, String)>,
    /// Entries a bucket cannot hold (symlinks, hard links, special files,
    /// names that are not UTF-8), skipped with a warning.
    pub skipped: u64,
    pub duration_s: f64,
}

/// One entry of the snapshot, by key.
struct Want {
    key: String,
    size: u64,
    chunks: Vec<ChunkRef>,
    xattrs: Vec<Xattr>,
}

enum Task {
    Write(Want),
    Delete(String),
}

enum Outcome {
    Written {
        key: String,
        state: ObjectState,
        verified: Option<bool>,
    },
    Deleted(String),
    Failed(String, String),
}

pub async fn restore_objects(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    snap: &SnapshotRecord,
    sink: Arc<dyn ObjectSink>,
    state: Arc<dyn SyncState>,
    opts: &ObjectRestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<ObjectRestoreSummary> {
    if snap.block {
        return Err(Error::Invalid(format!(
            "snapshot {} is a block volume: restore it to a device or an image file, not a bucket",
            snap.id
        )));
    }
    let run = {
        let (vault, catalog, snap, opts) =
            (vault.clone(), catalog.clone(), snap.clone(), opts.clone());
        async move {
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                restore_blocking(&rt, vault, catalog, &snap, sink, state, &opts, progress)
            })
            .await
            .map_err(|e| Error::Internal(format!("restore: {e}")))?
        }
    };
    if opts.no_lock {
        return run.await;
    }
    crate::lock::shared(
        &vault,
        catalog.as_ref(),
        "restore",
        crate::lock::SHARED_WAIT,
        run,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
fn restore_blocking(
    rt: &tokio::runtime::Handle,
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    snap: &SnapshotRecord,
    sink: Arc<dyn ObjectSink>,
    state: Arc<dyn SyncState>,
    opts: &ObjectRestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<ObjectRestoreSummary> {
    let started = Instant::now();
    let mut summary = ObjectRestoreSummary {
        snapshot_id: snap.id.clone(),
        target: sink.name(),
        ..Default::default()
    };
    let st = |e: crate::catalog::CatalogError| Error::Invalid(format!("target memory: {e}"));

    // The snapshot, in key order, from a walker thread.
    let (want_tx, want_rx) = crossbeam_channel::bounded::<Result<Want>>(1024);
    let skipped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let walker = {
        let (vault, catalog, root, rt, progress, skipped) = (
            vault.clone(),
            catalog.clone(),
            snap.root,
            rt.clone(),
            progress.clone(),
            skipped.clone(),
        );
        std::thread::spawn(move || {
            let mut w = Walker {
                rt,
                vault,
                catalog,
                tx: want_tx.clone(),
                progress,
                skipped,
            };
            if let Err(e) = w.dir(&root, "") {
                let _ = want_tx.send(Err(e));
            }
        })
    };

    // Writers.
    let workers = opts.workers.max(1);
    let (task_tx, task_rx) = crossbeam_channel::bounded::<Task>(workers * 2);
    let (out_tx, out_rx) = crossbeam_channel::bounded::<Outcome>(workers * 4);
    let mut pool = Vec::new();
    for _ in 0..workers {
        let (rx, tx) = (task_rx.clone(), out_tx.clone());
        let (rt, vault, catalog, sink, progress, verify) = (
            rt.clone(),
            vault.clone(),
            catalog.clone(),
            sink.clone(),
            progress.clone(),
            opts.verify,
        );
        pool.push(std::thread::spawn(move || {
            for t in rx {
                let o = match t {
                    Task::Delete(key) => match sink.delete(&key) {
                        Ok(()) => Outcome::Deleted(key),
                        Err(e) => Outcome::Failed(key, e.to_string()),
                    },
                    Task::Write(w) => write_one(
                        &rt,
                        &vault,
                        catalog.as_ref(),
                        sink.as_ref(),
                        w,
                        verify,
                        progress.as_ref(),
                    ),
                };
                if tx.send(o).is_err() {
                    break;
                }
            }
        }));
    }
    drop(task_rx);
    drop(out_tx);

    // The collector: outcomes into the summary and the target memory.
    let collector = {
        let state = state.clone();
        std::thread::spawn(move || -> Result<ObjectRestoreSummary> {
            let mut s = ObjectRestoreSummary::default();
            let mut batch = Vec::new();
            let mut gone = Vec::new();
            for o in out_rx {
                match o {
                    Outcome::Written {
                        key,
                        state: obj,
                        verified,
                    } => {
                        s.files_written += 1;
                        s.bytes_written += obj.src_size;
                        match verified {
                            Some(true) => s.files_verified += 1,
                            Some(false) => s.mismatched.push(key.clone()),
                            None => {}
                        }
                        if verified != Some(false) {
                            batch.push((key, obj));
                        }
                    }
                    Outcome::Deleted(k) => {
                        s.files_deleted += 1;
                        gone.push(k);
                    }
                    Outcome::Failed(k, e) => s.failed.push((k, e)),
                }
                if batch.len() >= 256 {
                    state.put(&std::mem::take(&mut batch)).map_err(st)?;
                }
                if gone.len() >= 256 {
                    state.remove(&std::mem::take(&mut gone)).map_err(st)?;
                }
            }
            state.put(&batch).map_err(st)?;
            state.remove(&gone).map_err(st)?;
            Ok(s)
        })
    };

    // The merge.
    let mut have = sink.list();
    let mut next_have = || -> Result<Option<ObjectEntry>> {
        have.next()
            .transpose()
            .map_err(|e| Error::Invalid(format!("listing {}: {e}", sink.name())))
    };
    let next_want = |rx: &crossbeam_channel::Receiver<Result<Want>>| rx.recv().ok().transpose();
    let mut w_head = next_want(&want_rx)?;
    let mut h_head = next_have()?;
    let mut pending: Vec<(Want, Option<ObjectEntry>)> = Vec::new();
    let result = (|| -> Result<()> {
        loop {
            let step = match (&w_head, &h_head) {
                (None, None) => break,
                (Some(w), Some(h)) => w.key.as_bytes().cmp(h.key.as_bytes()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
            };
            match step {
                std::cmp::Ordering::Less => {
                    pending.push((w_head.take().expect("some"), None));
                    w_head = next_want(&want_rx)?;
                }
                std::cmp::Ordering::Equal => {
                    pending.push((w_head.take().expect("some"), h_head.take()));
                    w_head = next_want(&want_rx)?;
                    h_head = next_have()?;
                }
                std::cmp::Ordering::Greater => {
                    let h = h_head.take().expect("some");
                    h_head = next_have()?;
                    if opts.delete {
                        task_tx.send(Task::Delete(h.key)).map_err(|_| stopped())?;
                    } else {
                        summary.files_extra += 1;
                    }
                }
            }
            if pending.len() >= 256 {
                decide(
                    std::mem::take(&mut pending),
                    state.as_ref(),
                    &task_tx,
                    &mut summary,
                    progress.as_ref(),
                )?;
            }
        }
        decide(
            pending,
            state.as_ref(),
            &task_tx,
            &mut summary,
            progress.as_ref(),
        )
    })();
    drop(task_tx);
    drop(want_rx);
    let _ = walker.join();
    for w in pool {
        let _ = w.join();
    }
    let c = collector
        .join()
        .map_err(|_| Error::Internal("restore collector panicked".into()))?;
    result?;
    let c = c?;
    summary.files_written = c.files_written;
    summary.files_deleted = c.files_deleted;
    summary.bytes_written = c.bytes_written;
    summary.files_verified = c.files_verified;
    summary.mismatched = c.mismatched;
    summary.failed = c.failed;
    summary.skipped = skipped.load(std::sync::atomic::Ordering::Relaxed);
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn stopped() -> Error {
    Error::Internal("restore stopped".into())
}

/// The content id a target memory records for a file.
fn content_hex(chunks: &[ChunkRef]) -> String {
    hex::encode(crate::target::content_id(chunks))
}

fn decide(
    batch: Vec<(Want, Option<ObjectEntry>)>,
    state: &dyn SyncState,
    tasks: &crossbeam_channel::Sender<Task>,
    summary: &mut ObjectRestoreSummary,
    progress: &dyn Progress,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = batch.iter().map(|(w, _)| w.key.clone()).collect();
    let known = state
        .get(&keys)
        .map_err(|e| Error::Invalid(format!("target memory: {e}")))?;
    let (mut files, mut bytes) = (0, 0);
    for ((w, h), k) in batch.into_iter().zip(known) {
        summary.files += 1;
        let same = match (&h, &k) {
            (Some(h), Some(k)) => {
                k.src_etag == content_hex(&w.chunks)
                    && k.src_size == w.size
                    && k.dst_size == h.size
                    && k.dst_etag == h.etag
            }
            _ => false,
        };
        if same {
            summary.files_unchanged += 1;
            continue;
        }
        files += 1;
        bytes += w.size;
        tasks.send(Task::Write(w)).map_err(|_| stopped())?;
    }
    progress.add_total(files, bytes);
    Ok(())
}

fn write_one(
    rt: &tokio::runtime::Handle,
    vault: &Arc<Vault>,
    catalog: &dyn Catalog,
    sink: &dyn ObjectSink,
    w: Want,
    verify: bool,
    progress: &dyn Progress,
) -> Outcome {
    let headers: Headers = xattrs_to_headers(&w.xattrs);
    let mut body = ChunkReader {
        rt: rt.clone(),
        vault: vault.clone(),
        catalog,
        chunks: &w.chunks,
        next: 0,
        buf: Vec::new(),
        pos: 0,
        ready: std::collections::VecDeque::new(),
        hash: blake3::Hasher::new(),
        progress,
    };
    let etag = match sink.put(&w.key, w.size, &headers, &mut body) {
        Ok(e) => e,
        Err(e) => return Outcome::Failed(w.key, e.to_string()),
    };
    let written = body.hash.finalize();
    progress.file_done();
    let verified = verify.then(|| {
        sink.read(&w.key)
            .and_then(|mut r| {
                let mut h = blake3::Hasher::new();
                std::io::copy(&mut r, &mut h)?;
                Ok(h.finalize() == written)
            })
            .unwrap_or(false)
    });
    Outcome::Written {
        state: ObjectState {
            src_etag: content_hex(&w.chunks),
            src_size: w.size,
            dst_etag: etag,
            dst_size: w.size,
        },
        key: w.key,
        verified,
    }
}

/// A file's bytes, read from the vault chunk by chunk. Chunks lying end
/// to end in one pack are fetched with one ranged read (up to 8 MiB).
struct ChunkReader<'a> {
    rt: tokio::runtime::Handle,
    vault: Arc<Vault>,
    catalog: &'a dyn Catalog,
    chunks: &'a [ChunkRef],
    /// The next chunk not yet fetched.
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    /// Fetched chunks not yet read.
    ready: std::collections::VecDeque<Vec<u8>>,
    hash: blake3::Hasher,
    progress: &'a dyn Progress,
}

const RANGE_MAX: u64 = 8 << 20;

impl ChunkReader<'_> {
    fn fetch(&mut self) -> std::io::Result<()> {
        let io = |e: Error| std::io::Error::other(e.to_string());
        let end = (self.next + 64).min(self.chunks.len());
        let ids: Vec<BlobId> = self.chunks[self.next..end].iter().map(|c| c.0).collect();
        let locs = self
            .catalog
            .locate(&ids)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut i = 0;
        while i < locs.len() {
            let first = locs[i].as_ref().ok_or_else(|| {
                std::io::Error::other(format!("chunk {} is in no pack", ids[i].short()))
            })?;
            // Extend over chunks that follow in the same pack.
            let mut j = i + 1;
            let mut stop = first.entry.offset + first.entry.stored_len as u64;
            while j < locs.len() {
                match &locs[j] {
                    Some(l)
                        if l.pack == first.pack
                            && l.entry.offset == stop
                            && stop + l.entry.stored_len as u64 - first.entry.offset
                                <= RANGE_MAX =>
                    {
                        stop += l.entry.stored_len as u64;
                        j += 1;
                    }
                    _ => break,
                }
            }
            let bytes = self
                .rt
                .block_on(self.vault.get_range(
                    &crate::vault::pack_path(&first.pack),
                    first.entry.offset..stop,
                ))
                .map_err(|e| io(crate::vault::missing_pack(&first.pack, e)))?;
            for l in locs[i..j].iter().flatten() {
                let at = (l.entry.offset - first.entry.offset) as usize;
                let sealed = bytes[at..at + l.entry.stored_len as usize].to_vec();
                let plain = crate::pack::open_blob(
                    self.vault.data_key(),
                    self.vault.ids(),
                    &l.pack,
                    &l.salt,
                    &l.entry,
                    sealed,
                )
                .map_err(io)?;
                self.ready.push_back(plain);
            }
            i = j;
        }
        self.next = end;
        Ok(())
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.ready.is_empty() {
                if self.next == self.chunks.len() {
                    return Ok(0);
                }
                self.fetch()?;
            }
            self.buf = self.ready.pop_front().unwrap_or_default();
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.hash.update(&out[..n]);
        self.pos += n;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Walks the snapshot in key order: in each directory, entries sorted by
/// name with a directory's name followed by '/'.
struct Walker {
    rt: tokio::runtime::Handle,
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    tx: crossbeam_channel::Sender<Result<Want>>,
    progress: Arc<dyn Progress>,
    skipped: Arc<std::sync::atomic::AtomicU64>,
}

impl Walker {
    fn skip(&self, what: String) {
        self.skipped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!("{what}");
        self.progress.warn(&what);
    }

    fn dir(&mut self, id: &BlobId, prefix: &str) -> Result<()> {
        let tree = self.rt.block_on(crate::sync::load_tree(
            &self.vault,
            self.catalog.as_ref(),
            id,
        ))?;
        if tree.entries.is_empty() && !prefix.is_empty() {
            // An empty directory: a marker.
            return self.send(Want {
                key: prefix.to_string(),
                size: 0,
                chunks: vec![],
                xattrs: vec![],
            });
        }
        let mut entries: Vec<(String, &crate::manifest::Node)> = Vec::new();
        for n in &tree.entries {
            let Ok(name) = std::str::from_utf8(&n.name.0) else {
                self.skip(format!(
                    "{prefix}{}: not UTF-8; a key must be",
                    n.name.display()
                ));
                continue;
            };
            let sort = match n.kind {
                NodeKind::Dir { .. } => format!("{name}/"),
                _ => name.to_string(),
            };
            entries.push((sort, n));
        }
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (sort, n) in entries {
            let key = format!("{prefix}{sort}");
            match &n.kind {
                NodeKind::Dir { subtree } => self.dir(subtree, &key)?,
                NodeKind::File { size, chunks } => self.send(Want {
                    key,
                    size: *size,
                    chunks: chunks.clone(),
                    xattrs: n.xattrs.clone(),
                })?,
                _ => self.skip(format!("{key}: a bucket holds only files; skipped")),
            }
        }
        Ok(())
    }

    fn send(&self, w: Want) -> Result<()> {
        self.tx.send(Ok(w)).map_err(|_| stopped())
    }
}
